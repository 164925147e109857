//! camserve as a Label Studio ML backend: the routes Label Studio calls (`/health`, `/setup`, `/predict`,
//! `/webhook`, `/versions`, as label-studio-ml's Flask server answers them) under `label_studio.prefix`.
//!
//! Predictions use only the labels of the project's config: each `<Label>` of its `<RectangleLabels>` and
//! `<BrushLabels>` maps to model classes by its name, its `predicted_values` or the config's `labels` table, and a
//! task is explained for the best-scoring mapped class.
//!
//! A task's image is a `data:` URI, an `http(s)://` URL on one of `label_studio.allowed_hosts` or Label Studio's
//! own host, or a Label Studio path (`/data/upload/...`, its storage proxy) fetched from Label Studio with its
//! token; nothing else is fetched, redirects are not followed, and size and time are bounded, so the service is
//! no open proxy. A task that fails gets an empty prediction; the others are answered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use reqwest::Url;
use serde_json::{Value, json};

mod fetch;
mod project;

use fetch::{Access, Link, fetch_image};
use project::{Plan, Project};

use crate::config::LabelStudioConfig;
use crate::explain::{self, ExplainOptions};
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::formats::{self, FormatOptions};
use crate::http::handlers::on_blocking_thread;
use crate::pipeline::cam::CamMethod;
use crate::registry::ServedModel;

/// The backend: its config, the client that fetches task images, and where Label Studio said it is.
pub struct LabelStudio {
    pub config: LabelStudioConfig,
    client: reqwest::Client,
    /// Label Studio's address and token, as its last `/setup` sent them.
    link: Mutex<Option<Link>>,
    /// The access token last obtained for a personal access token.
    access: Mutex<Option<Access>>,
}

impl LabelStudio {
    /// Fails on an unreadable `ca_file`.
    pub fn new(config: LabelStudioConfig) -> anyhow::Result<Self> {
        // rustls with the public (webpki) roots, plus the config's own authorities. No redirect is followed: it
        // could lead off the allowed hosts.
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("label_studio.ca_file {}: {e}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("label_studio.ca_file {}: {e}", path.display()))?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let link = config.url.as_deref().map(|url| Link {
            base: Url::parse(url).expect("validated with the config"),
            token: None,
        });
        Ok(Self {
            client: builder.build()?,
            link: Mutex::new(link),
            access: Mutex::new(None),
            config,
        })
    }

    /// The route whose requests set their own time budget (see `predict`).
    pub fn predict_route(&self) -> String {
        format!("{}/predict", self.config.prefix)
    }

    fn model_version(&self) -> String {
        format!("camserve-{}", self.config.model)
    }

    /// A prediction with no region: Label Studio stores it, so that the other tasks' predictions are stored too.
    fn empty_prediction(&self) -> Value {
        json!({ "model_version": self.model_version(), "score": 0.0, "result": [] })
    }
}

/// Adds the backend's routes when `[label_studio]` is configured.
pub fn routes(router: Router<SharedState>, backend: Option<&LabelStudio>) -> Router<SharedState> {
    let Some(backend) = backend else {
        return router;
    };
    let prefix = &backend.config.prefix;
    router
        .route(&format!("{prefix}/health"), get(health))
        .route(&format!("{prefix}/setup"), post(setup))
        .route(&backend.predict_route(), post(predict))
        .route(&format!("{prefix}/webhook"), post(webhook))
        .route(&format!("{prefix}/versions"), get(versions))
}

fn backend(state: &SharedState) -> &LabelStudio {
    state
        .label_studio
        .as_ref()
        .expect("routes exist only when configured")
}

async fn health(State(state): State<SharedState>) -> Json<Value> {
    let model = &backend(&state).config.model;
    Json(json!({ "status": "UP", "model_class": "camserve", "model": model }))
}

/// Label Studio calls this when a project connects, with its address and an API token; the answer names the
/// model version its predictions carry. The address is kept only when it is an allowed one: `/setup` takes no
/// credentials, so it must not open other hosts to fetching.
async fn setup(State(state): State<SharedState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let backend = backend(&state);
    let request = parse_json(&body)?;
    let token = request["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let base = request["hostname"]
        .as_str()
        .and_then(|h| Url::parse(h).ok())
        .filter(|url| backend.is_allowed(url));
    let mut link = backend.link.lock().expect("link lock");
    match (base, link.as_mut()) {
        (Some(base), _) => *link = Some(Link { base, token }),
        (None, Some(known)) if token.is_some() => known.token = token,
        _ => {}
    }
    Ok(Json(json!({ "model_version": backend.model_version() })))
}

/// Label Studio posts every event here ("Start training" too); camserve does not train, so it only answers.
async fn webhook(body: Bytes) -> Result<Json<Value>, ApiError> {
    parse_json(&body)?;
    Ok(Json(json!({ "status": "ok" })))
}

/// The model versions this backend serves: one, the model it explains with.
async fn versions(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({ "versions": [backend(&state).model_version()] }))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| ApiError::new(ErrorCode::MalformedBody, "the body must be a JSON object"))
}

/// `{"tasks": [{"data": {...}}], "label_config": "<View>..."}` -> `{"results": [prediction per task], "model_version"}`.
///
/// The request's time budget is `task_timeout_secs` per task, not the server's request timeout; tasks run
/// concurrently, as many as the model has cores. A task that fails gets an empty prediction (the reason goes to
/// the log and to `camserve_label_studio_task_errors_total`); a batch over its budget is answered 503 whole.
async fn predict(State(state): State<SharedState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let backend = backend(&state);
    let config = &backend.config;
    let request = parse_json(&body)?;
    let tasks = request["tasks"]
        .as_array()
        .ok_or_else(|| ApiError::new(ErrorCode::MalformedBody, "the body has no `tasks` list"))?;
    // A task that is not `{"id": integer, "data": {...}}` is not from Label Studio: the request is malformed.
    let malformed =
        |t: &Value| !t["data"].is_object() || t.get("id").is_some_and(|id| !id.is_i64());
    if let Some(i) = tasks.iter().position(malformed) {
        return Err(ApiError::new(
            ErrorCode::MalformedBody,
            format!("task {i} is not an object with a `data` object and an integer `id`"),
        ));
    }
    if tasks.len() > config.max_batch_tasks {
        return Err(ApiError::new(
            ErrorCode::TooManyTasks,
            format!(
                "{} tasks in one request; this backend takes at most label_studio.max_batch_tasks ({}): \
                 select fewer tasks",
                tasks.len(),
                config.max_batch_tasks
            ),
        ));
    }
    let project = match request.get("label_config") {
        None => None,
        Some(Value::String(xml)) => Some(Project::from_label_config(xml)),
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::MalformedBody,
                "`label_config` must be the project's labeling config, a string",
            ));
        }
    };
    let model = state.registry.get(&config.model).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("no model named `{}`", config.model),
        )
    })?;
    let plan = Arc::new(match &project {
        Some(project) => project.plan(&model.info.labels, &config.labels),
        None => Plan::model_labels(&model.info.labels),
    });
    if plan.classes.is_empty() {
        tracing::warn!(
            "no label of the project's config maps to a class of model `{}`: empty predictions",
            config.model
        );
    }
    let budget = Duration::from_secs(config.task_timeout_secs) * tasks.len().max(1) as u32;
    let answers = tokio::time::timeout(budget, predict_all(&state, &model, &plan, tasks))
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "{} tasks took longer than their budget ({} s, label_studio.task_timeout_secs each); \
                     nothing was predicted: select fewer tasks",
                    tasks.len(),
                    budget.as_secs()
                ),
            )
        })?;
    Ok(Json(
        json!({ "results": answers, "model_version": backend.model_version() }),
    ))
}

/// Every task's prediction, in order; tasks run concurrently, as many as the model's sessions can serve at once
/// plus as many fetching, within the model's queue.
async fn predict_all(
    state: &SharedState,
    model: &Arc<ServedModel>,
    plan: &Arc<Plan>,
    tasks: &[Value],
) -> Vec<Value> {
    let model_config = &model.config;
    let lanes =
        (2 * model_config.sessions * model_config.threads).clamp(1, model_config.queue_capacity);
    let permits = Arc::new(tokio::sync::Semaphore::new(lanes));
    let mut running = tokio::task::JoinSet::new();
    for (i, task) in tasks.iter().enumerate() {
        let (state, model, plan, permits) =
            (state.clone(), model.clone(), plan.clone(), permits.clone());
        let task = task.clone();
        running.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("never closed");
            (i, predict_task(&state, &model, &plan, &task).await)
        });
    }
    let backend = backend(state);
    let mut answers = vec![Value::Null; tasks.len()];
    while let Some(joined) = running.join_next().await {
        let (i, answer) = joined.expect("a task's prediction panicked");
        answers[i] = answer.unwrap_or_else(|error| {
            let task = &tasks[i]["id"];
            tracing::warn!(%task, code = %error.code, reason = %error.message, "task not predicted");
            state.metrics.label_studio_task_failed(&error.code.to_string());
            // Label Studio stores `result`, `score` and `model_version` only; `error` is for other callers.
            let mut empty = backend.empty_prediction();
            empty["error"] = json!({ "code": error.code, "message": error.message });
            empty
        });
    }
    answers
}

async fn predict_task(
    state: &SharedState,
    model: &Arc<ServedModel>,
    plan: &Arc<Plan>,
    task: &Value,
) -> Result<Value, ApiError> {
    let backend = backend(state);
    let config = &backend.config;
    if plan.classes.is_empty() {
        return Ok(backend.empty_prediction());
    }
    let url = task["data"][&plan.data_key].as_str().ok_or_else(|| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the task has no image URL at data.{}", plan.data_key),
        )
    })?;
    let bytes = fetch_image(url, backend).await?;
    let (model, limits, plan_for_run, top_k) = (
        model.clone(),
        state.limits.clone(),
        plan.clone(),
        config.top_k,
    );
    let (threshold, max_boxes) = (config.threshold, config.max_boxes);
    let explanation = on_blocking_thread(move |ticket| {
        let targets = plan_for_run.targets(&model, &bytes, &limits, top_k, ticket)?;
        let options = ExplainOptions {
            targets,
            method: CamMethod::GradCam,
            threshold,
            max_boxes,
            ..ExplainOptions::default()
        };
        Ok(explain::explain_image(
            &model, &bytes, &limits, &options, ticket,
        )?)
    })
    .await?;
    let version = backend.model_version();
    let tags = plan.tags(&explanation, top_k);
    let options = FormatOptions {
        model_version: &version,
        max_side: state.limits.max_output_side,
        gray8: false,
    };
    Ok(formats::label_studio(&explanation, &options, &tags))
}
