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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use base64::Engine as _;
use reqwest::Url;
use serde_json::{Value, json};

use crate::config::LabelStudioConfig;
use crate::explain::{self, ExplainOptions, Targets};
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::formats::{self, FormatOptions, LabelStudioControl, LabelStudioTags};
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

#[derive(Debug)]
struct Access {
    refresh: String,
    access: String,
    obtained: Instant,
}

#[derive(Debug, Clone)]
struct Link {
    base: Url,
    token: Option<String>,
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

    /// The Authorization header for a Label Studio token, as its SDK sends them: `Token` for a legacy token,
    /// `Bearer` for a JWT; a personal access token (a JWT refresh token) is first exchanged at
    /// `/api/token/refresh/` for an access token, which is kept for a while (Label Studio's live 5 minutes).
    async fn authorization(&self, token: &str, base: &Url) -> Result<String, ApiError> {
        const KEEP: Duration = Duration::from_secs(240);
        match jwt_type(token).as_deref() {
            None => return Ok(format!("Token {token}")),
            Some("refresh") => {}
            Some(_) => return Ok(format!("Bearer {token}")),
        }
        if let Some(kept) = &*self.access.lock().expect("access lock")
            && kept.refresh == token
            && kept.obtained.elapsed() < KEEP
        {
            return Ok(format!("Bearer {}", kept.access));
        }
        let failed = |detail: String| {
            fetch_failed(format!(
                "Label Studio did not exchange its personal access token at /api/token/refresh/: {detail}"
            ))
        };
        let url = base.join("/api/token/refresh/").expect("a path joins");
        let answer = (self.client.post(url))
            .header("content-type", "application/json")
            .body(json!({ "refresh": token }).to_string())
            .send()
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        if !answer.status().is_success() {
            return Err(failed(format!("it answered {}", answer.status())));
        }
        let body = answer.bytes().await.map_err(|e| failed(error_chain(&e)))?;
        let access = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["access"].as_str().map(str::to_owned));
        let access = access.ok_or_else(|| failed("no `access` in its answer".into()))?;
        *self.access.lock().expect("access lock") = Some(Access {
            refresh: token.to_owned(),
            access: access.clone(),
            obtained: Instant::now(),
        });
        Ok(format!("Bearer {access}"))
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

    fn link(&self) -> Option<Link> {
        self.link.lock().expect("link lock").clone()
    }

    /// `host:port` of a URL, as `allowed_hosts` lists them.
    fn is_allowed(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let port = url.port_or_known_default().unwrap_or(0);
        let own = self.config.url.as_deref().and_then(|u| Url::parse(u).ok());
        let listed = self.config.allowed_hosts.iter().any(|entry| {
            entry == &format!("{host}:{port}")
                || (entry == host && port == if url.scheme() == "https" { 443 } else { 80 })
        });
        listed || own.is_some_and(|own| same_origin(&own, url))
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    (a.scheme(), a.host_str(), a.port_or_known_default())
        == (b.scheme(), b.host_str(), b.port_or_known_default())
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
        threshold: config.threshold,
        model_version: &version,
        max_side: state.limits.max_output_side,
        gray8: false,
    };
    Ok(formats::label_studio(&explanation, &options, &tags))
}

/// What the project's labeling config names: the image tag and its task field, and the two kinds of control
/// tag with their labels.
#[derive(Debug, Default)]
struct Project {
    image: Option<String>,
    data_key: Option<String>,
    rectangles: Option<Control>,
    brush: Option<Control>,
}

#[derive(Debug)]
struct Control {
    name: String,
    labels: Vec<LabelTag>,
}

/// A `<Label>`: the name results carry (its `alias`, else its `value`) and the model class names it may stand
/// for (`value`, `alias`, `predicted_values`).
#[derive(Debug, PartialEq)]
struct LabelTag {
    name: String,
    candidates: Vec<String>,
}

/// A project mapped onto the model: the classes any control can show, and per control class -> label name.
#[derive(Debug)]
struct Plan {
    data_key: String,
    image: String,
    classes: Vec<usize>,
    rectangles: Option<(String, BTreeMap<usize, String>)>,
    brush: Option<(String, BTreeMap<usize, String>)>,
}

impl Project {
    /// Reads `<Image name value="$key">`, `<RectangleLabels name toName>` and `<BrushLabels name toName>` with
    /// their `<Label>`s. A config without one of the two control tags gets no results of that kind.
    fn from_label_config(xml: &str) -> Self {
        let control = |tag: &str| {
            let (attributes, inner) = elements(xml, tag).into_iter().next()?;
            let labels = elements(inner, "Label")
                .iter()
                .filter_map(|(label, _)| LabelTag::from_attributes(label))
                .collect();
            Some((
                Control {
                    name: find(&attributes, "name")?,
                    labels,
                },
                find(&attributes, "toName"),
            ))
        };
        let image = elements(xml, "Image").into_iter().next().map(|(a, _)| a);
        let rectangles = control("RectangleLabels");
        let brush = control("BrushLabels");
        let image_name = image
            .as_deref()
            .and_then(|a| find(a, "name"))
            .or_else(|| rectangles.as_ref().and_then(|(_, to)| to.clone()))
            .or_else(|| brush.as_ref().and_then(|(_, to)| to.clone()));
        Self {
            data_key: image
                .as_deref()
                .and_then(|a| find(a, "value"))
                .map(|v| v.trim_start_matches('$').to_owned()),
            image: image_name,
            rectangles: rectangles.map(|(c, _)| c),
            brush: brush.map(|(c, _)| c),
        }
    }

    /// Maps each control's labels to model classes: a candidate name that is a class label, or a class named for
    /// the label in the config's `labels` table. The first label that maps a class keeps it.
    fn plan(&self, model_labels: &[String], mapping: &BTreeMap<String, Vec<String>>) -> Plan {
        let class_of = |name: &str| model_labels.iter().position(|l| l == name);
        let map = |control: &Control| {
            let mut classes = BTreeMap::new();
            for label in &control.labels {
                let configured = mapping.get(&label.name).into_iter().flatten();
                for class in label
                    .candidates
                    .iter()
                    .chain(configured)
                    .filter_map(|n| class_of(n))
                {
                    classes.entry(class).or_insert_with(|| label.name.clone());
                }
            }
            (control.name.clone(), classes)
        };
        let rectangles = self.rectangles.as_ref().map(map);
        let brush = self.brush.as_ref().map(map);
        let mut classes: Vec<usize> = [&rectangles, &brush]
            .into_iter()
            .flatten()
            .flat_map(|(_, m)| m.keys().copied())
            .collect();
        classes.sort_unstable();
        classes.dedup();
        Plan {
            data_key: self.data_key.clone().unwrap_or_else(|| "image".into()),
            image: self.image.clone().unwrap_or_else(|| "image".into()),
            classes,
            rectangles,
            brush,
        }
    }
}

impl Plan {
    /// No labeling config (a caller other than Label Studio): every class under its model label, and the
    /// README config's tag names.
    fn model_labels(labels: &[String]) -> Self {
        let all: BTreeMap<usize, String> = labels.iter().cloned().enumerate().collect();
        Self {
            data_key: "image".into(),
            image: "image".into(),
            classes: (0..labels.len()).collect(),
            rectangles: Some(("label".into(), all.clone())),
            brush: Some(("mask".into(), all)),
        }
    }

    /// What to explain for one image, in one Run where it can be: every mapped class is scored and gets its
    /// gradient (a seed row each), and when both controls show the same classes only the `top_k` best get maps
    /// (when they differ, every mapped class does). When more classes map than a request may name, a first Run
    /// scores the image and only each control's `top_k` best are explained.
    fn targets(
        &self,
        model: &ServedModel,
        bytes: &[u8],
        limits: &crate::config::Limits,
        top_k: usize,
        ticket: &crate::engine::Ticket,
    ) -> Result<Targets, ApiError> {
        let same = match (&self.rectangles, &self.brush) {
            (Some((_, a)), Some((_, b))) => a.keys().eq(b.keys()),
            _ => true,
        };
        if same && self.classes.len() == model.info.num_classes() {
            return Ok(Targets::TopK(top_k));
        }
        if self.classes.len() <= limits.max_classes_per_request {
            return Ok(if same {
                Targets::BestOf(self.classes.clone(), top_k)
            } else {
                Targets::Classes(self.classes.clone())
            });
        }
        let (logits, _) = explain::predict(model, bytes, limits, ticket)?;
        let mut best: Vec<usize> = [&self.rectangles, &self.brush]
            .into_iter()
            .flatten()
            .flat_map(|(_, m)| top(m.keys().copied(), &logits, top_k))
            .collect();
        best.sort_unstable();
        best.dedup();
        Ok(Targets::Classes(best))
    }

    /// Per control, its `top_k` best-scoring classes among those explained, with their label names.
    fn tags(&self, explanation: &explain::Explanation, top_k: usize) -> LabelStudioTags {
        let control = |(name, classes): &(String, BTreeMap<usize, String>)| {
            let explained = explanation.targets.iter().map(|t| t.class);
            let best = top(
                explained.filter(|c| classes.contains_key(c)),
                &explanation.logits,
                top_k,
            );
            LabelStudioControl {
                name: name.clone(),
                labels: best
                    .into_iter()
                    .map(|class| {
                        let t = explanation.targets.iter().position(|t| t.class == class);
                        (t.expect("explained"), classes[&class].clone())
                    })
                    .collect(),
            }
        };
        LabelStudioTags {
            image: self.image.clone(),
            rectangles: self.rectangles.as_ref().map(control),
            brush: self.brush.as_ref().map(control),
        }
    }
}

/// The `k` classes of `classes` with the largest logits, best first.
fn top(classes: impl Iterator<Item = usize>, logits: &[f32], k: usize) -> Vec<usize> {
    let mut classes: Vec<usize> = classes.collect();
    classes.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    classes.truncate(k);
    classes
}

impl LabelTag {
    fn from_attributes(attributes: &[(String, String)]) -> Option<Self> {
        let value = find(attributes, "value");
        let alias = find(attributes, "alias");
        // Label Studio writes the alias into results when there is one.
        let name = alias.clone().or_else(|| value.clone())?;
        let predicted = find(attributes, "predicted_values").unwrap_or_default();
        let candidates = [value, alias]
            .into_iter()
            .flatten()
            .chain(predicted.split(',').map(|v| v.trim().to_owned()))
            .filter(|v| !v.is_empty())
            .collect();
        Some(Self { name, candidates })
    }
}

fn find(attributes: &[(String, String)], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// Every `<tag ...>` element of `xml`: its attributes, and the text up to its closing tag (empty when it closes
/// itself). Label configs are small XML written by hand; this reads `key="value"` pairs and needs no XML parser.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<(Vec<(String, String)>, &'a str)> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut found = Vec::new();
    for (i, _) in xml.match_indices(&open) {
        let after = &xml[i + open.len()..];
        if !after.starts_with(|c: char| c.is_whitespace() || c == '/' || c == '>') {
            continue;
        }
        let Some(end) = after.find('>') else { break };
        let (inside, rest) = (&after[..end], &after[end + 1..]);
        let inner = if inside.ends_with('/') {
            ""
        } else {
            rest.find(&close).map_or(rest, |e| &rest[..e])
        };
        found.push((attributes(inside.trim_end_matches('/')), inner));
    }
    found
}

fn attributes(inside: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = inside;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .split_whitespace()
            .last()
            .unwrap_or("")
            .to_owned();
        let value_part = rest[eq + 1..].trim_start();
        let Some(quote) = value_part
            .chars()
            .next()
            .filter(|q| *q == '"' || *q == '\'')
        else {
            break;
        };
        let Some(end) = value_part[1..].find(quote) else {
            break;
        };
        pairs.push((key, unescape(&value_part[1..=end])));
        rest = &value_part[end + 2..];
    }
    pairs
}

/// XML's five predefined entities, as label names may hold them (`Salt &amp; pepper`).
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn not_allowed(message: String) -> ApiError {
    ApiError::new(ErrorCode::ImageUrlNotAllowed, message)
}

fn fetch_failed(message: String) -> ApiError {
    ApiError::new(ErrorCode::ImageFetchFailed, message)
}

/// The image bytes of a task: a `data:` URI, an `http(s)://` URL on an allowed host, or a Label Studio path.
async fn fetch_image(url: &str, backend: &LabelStudio) -> Result<Vec<u8>, ApiError> {
    let config = &backend.config;
    let limit = config.fetch_max_bytes;
    if let Some(rest) = url.strip_prefix("data:") {
        return decode_data_uri(rest, limit);
    }
    let link = backend.link();
    let parsed = if url.starts_with('/') && !url.starts_with("//") {
        // Uploads (`/data/upload/...`) and the storage proxy (`/data/...`, `/tasks/.../presign`) are Label
        // Studio's own paths.
        let base = link.as_ref().ok_or_else(|| {
            not_allowed(format!(
                "`{}` is a Label Studio path, but Label Studio's address is unknown: set label_studio.url",
                shorten(url)
            ))
        })?;
        base.base
            .join(url)
            .map_err(|_| not_allowed(format!("`{}` is no path", shorten(url))))?
    } else {
        Url::parse(url).map_err(|_| {
            not_allowed(format!(
                "`{}` is neither an absolute http(s):// URL, a Label Studio path nor a data: URI",
                shorten(url)
            ))
        })?
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(not_allowed(format!(
            "scheme `{}` is not fetched: use http:// or https:// on an allowed host, or a data: URI",
            parsed.scheme()
        )));
    }
    if !backend.is_allowed(&parsed) {
        let host = parsed.host_str().unwrap_or("");
        let port = parsed.port_or_known_default().unwrap_or(0);
        return Err(not_allowed(format!(
            "host `{host}:{port}` is neither label_studio.url nor in label_studio.allowed_hosts"
        )));
    }
    // Label Studio's tokens go to Label Studio only: the one `/setup` sent, then `api_key` if that is refused.
    let tokens: Vec<&str> = match &link {
        Some(link) if same_origin(&link.base, &parsed) => {
            let mut tokens: Vec<&str> = [link.token.as_deref(), config.api_key.as_deref()]
                .into_iter()
                .flatten()
                .collect();
            tokens.dedup();
            tokens
        }
        _ => Vec::new(),
    };
    let timeout = Duration::from_secs(config.fetch_timeout_secs);
    let timed_out = || {
        fetch_failed(format!(
            "fetching the task image timed out after {}s",
            timeout.as_secs()
        ))
    };
    let describe = |e: reqwest::Error| {
        if e.is_timeout() {
            timed_out()
        } else {
            fetch_failed(format!(
                "fetching the task image failed: {}",
                error_chain(&e)
            ))
        }
    };
    let fetch = async {
        let mut response = None;
        for (i, token) in tokens.iter().enumerate() {
            let base = &link.as_ref().expect("tokens come with a link").base;
            let header = backend.authorization(token, base).await?;
            let answer = (backend.client.get(parsed.clone()))
                .header("authorization", header)
                .send()
                .await
                .map_err(describe)?;
            // A token Label Studio refuses (a legacy token where those are off): try the next.
            if !matches!(answer.status().as_u16(), 401 | 403) || i + 1 == tokens.len() {
                response = Some(answer);
                break;
            }
        }
        let mut response = match response {
            Some(response) => response,
            None => (backend.client.get(parsed.clone()).send().await).map_err(describe)?,
        };
        if !response.status().is_success() {
            return Err(fetch_failed(format!(
                "the task image's host answered {}",
                response.status()
            )));
        }
        if response
            .content_length()
            .is_some_and(|n| n as usize > limit)
        {
            return Err(too_large(limit));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    // One bound on connecting, the answer and its body together, whatever the host does.
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| timed_out())?
}

/// A JWT's `token_type` (`"access"` when it names none); `None` for a legacy Label Studio token.
fn jwt_type(token: &str) -> Option<String> {
    let decode = |part: &str| {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice::<Value>(&bytes).ok()
    };
    let [header, payload, _] = token.split('.').collect::<Vec<_>>()[..] else {
        return None;
    };
    decode(header)?;
    let kind = decode(payload)?["token_type"].as_str().map(str::to_owned);
    Some(kind.unwrap_or_else(|| "access".into()))
}

fn decode_data_uri(rest: &str, limit: usize) -> Result<Vec<u8>, ApiError> {
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::new(ErrorCode::MalformedBody, "a data: URI without a comma"))?;
    if !meta.ends_with(";base64") {
        return Err(ApiError::new(
            ErrorCode::MalformedBody,
            "only base64 data: URIs carry images",
        ));
    }
    // base64 is 4/3 of the bytes: refuse before decoding.
    if payload.len() / 4 * 3 > limit {
        return Err(fetch_failed(format!(
            "the data: URI holds more than label_studio.fetch_max_bytes ({limit} bytes)"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::new(ErrorCode::MalformedBody, format!("data: URI: {e}")))
}

fn too_large(limit: usize) -> ApiError {
    fetch_failed(format!(
        "the task image is larger than label_studio.fetch_max_bytes ({limit} bytes)"
    ))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn shorten(url: &str) -> &str {
    let end = (0..=url.len().min(80))
        .rev()
        .find(|&i| url.is_char_boundary(i))
        .unwrap_or(0);
    &url[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn label_config_names() {
        let xml = r#"<View>
            <Image name="img" value="$photo" zoom="true"/>
            <RectangleLabels name="boxes" toName="img"><Label value="red"/></RectangleLabels>
            <BrushLabels name='paint' toName='img'><Label value="red"/></BrushLabels>
        </View>"#;
        let project = Project::from_label_config(xml);
        assert_eq!(project.data_key.as_deref(), Some("photo"));
        assert_eq!(project.image.as_deref(), Some("img"));
        assert_eq!(project.rectangles.as_ref().unwrap().name, "boxes");
        assert_eq!(project.brush.as_ref().unwrap().name, "paint");

        // Only rectangles: no brush results. `<Image>` must not match `<ImageX>`.
        let project = Project::from_label_config(
            r#"<View><ImageX name="no"/><Image name="i" value="$u"/><RectangleLabels name="r" toName="i"/></View>"#,
        );
        assert_eq!(
            (project.data_key.as_deref(), project.image.as_deref()),
            (Some("u"), Some("i"))
        );
        assert!(project.brush.is_none());
        assert!(project.rectangles.unwrap().labels.is_empty());
    }

    #[test]
    fn labels_are_read_with_aliases_and_predicted_values() {
        let xml = r#"<View><Image name="i" value="$image"/>
            <RectangleLabels name="box" toName="i">
              <Label value="Cat" predicted_values="tabby, Egyptian cat" background="red"/>
              <Label value="space shuttle"/>
              <Label value="Salt &amp; pepper" alias="sp"></Label>
              <Labelx value="not a label"/>
            </RectangleLabels>
            <BrushLabels name="paint" toName="i"><Label value="Coffee"/></BrushLabels></View>"#;
        let project = Project::from_label_config(xml);
        let rectangles = project.rectangles.as_ref().unwrap();
        assert_eq!(
            rectangles.labels,
            vec![
                LabelTag {
                    name: "Cat".into(),
                    candidates: labels(&["Cat", "tabby", "Egyptian cat"])
                },
                LabelTag {
                    name: "space shuttle".into(),
                    candidates: labels(&["space shuttle"])
                },
                LabelTag {
                    name: "sp".into(),
                    candidates: labels(&["Salt & pepper", "sp"])
                },
            ]
        );
        assert_eq!(project.brush.as_ref().unwrap().labels.len(), 1);
    }

    #[test]
    fn labels_map_to_classes_by_name_predicted_values_and_config() {
        let model = labels(&["tabby", "Egyptian cat", "espresso", "space shuttle", "cup"]);
        let xml = r#"<View><Image name="photo" value="$img"/>
            <RectangleLabels name="box" toName="photo">
              <Label value="Cat" predicted_values="tabby,Egyptian cat"/>
              <Label value="space shuttle"/>
              <Label value="Coffee"/>
              <Label value="Dog"/>
            </RectangleLabels>
            <BrushLabels name="paint" toName="photo"><Label value="cup"/></BrushLabels></View>"#;
        let mapping =
            BTreeMap::from([("Coffee".to_owned(), labels(&["espresso", "no such class"]))]);
        let plan = Project::from_label_config(xml).plan(&model, &mapping);
        assert_eq!(
            (plan.data_key.as_str(), plan.image.as_str()),
            ("img", "photo")
        );
        assert_eq!(plan.classes, vec![0, 1, 2, 3, 4]);
        let (name, rectangles) = plan.rectangles.as_ref().unwrap();
        assert_eq!(name, "box");
        let expected: BTreeMap<usize, String> =
            [(0, "Cat"), (1, "Cat"), (2, "Coffee"), (3, "space shuttle")]
                .into_iter()
                .map(|(c, l)| (c, l.to_owned()))
                .collect();
        assert_eq!(rectangles, &expected);
        assert_eq!(
            plan.brush.as_ref().unwrap().1,
            BTreeMap::from([(4, "cup".to_owned())])
        );

        // Nothing maps: nothing to explain.
        let none = Project::from_label_config(
            r#"<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"><Label value="Dog"/></RectangleLabels></View>"#,
        )
        .plan(&model, &BTreeMap::new());
        assert!(none.classes.is_empty());
    }

    #[test]
    fn tokens_are_told_apart_as_label_studio_sends_them() {
        assert_eq!(jwt_type("0123abcd"), None);
        assert_eq!(jwt_type("a.b.c"), None);
        // `{"alg":"HS256","typ":"JWT"}` . `{"token_type":"refresh"}` . a signature.
        let refresh = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln";
        assert_eq!(jwt_type(refresh).as_deref(), Some("refresh"));
        // `{"sub":"1"}`: no type, an access token.
        assert_eq!(
            jwt_type("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln").as_deref(),
            Some("access")
        );
    }

    #[test]
    fn top_picks_the_best_scoring_mapped_classes() {
        let logits = [0.5, 3.0, -1.0, 2.0];
        assert_eq!(top([0, 2, 3].into_iter(), &logits, 1), vec![3]);
        assert_eq!(top([0, 2, 3].into_iter(), &logits, 2), vec![3, 0]);
        assert_eq!(top(std::iter::empty(), &logits, 1), Vec::<usize>::new());
    }
}
