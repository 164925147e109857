//! Route handlers: parse, call the pipeline, encode the answer. No math here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::{Caller, Ticket};
use crate::explain::{self, Explanation, Timings};
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::image_body::ImageBody;
use crate::http::metrics::StageTimes;
use crate::http::params;
use crate::http::responses;
use crate::onnx::model::ModelInfo;
use crate::pipeline::cam::CamMethod;
use crate::registry::ServedModel;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<SharedState>) -> Response {
    let models = state.registry.models();
    let models: Vec<&str> = models.iter().map(|m| m.info.name.as_str()).collect();
    if state.ready.load(Ordering::SeqCst) {
        Json(serde_json::json!({ "status": "ready", "models": models })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "shutting_down", "models": models })),
        )
            .into_response()
    }
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    let text = state.metrics.render(&state.registry);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn route_not_found() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no such route; see openapi.yaml")
}

#[derive(Serialize)]
pub struct ModelView<'a> {
    name: &'a str,
    input_size: Size,
    num_classes: usize,
    labels: &'a [String],
    target_layer: &'a str,
    /// Every target layer `layers=` can combine: the target layer first, then the extra ones.
    layers: Vec<&'a str>,
    /// Whether the model has guided backpropagation (`output=guided`).
    guided: bool,
    activation: ActivationShape,
    methods: Vec<&'static str>,
    device: crate::config::ExecutionProvider,
    preprocess: PreprocessView,
    source: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct Size {
    width: usize,
    height: usize,
}

#[derive(Serialize)]
struct ActivationShape {
    channels: usize,
    height: usize,
    width: usize,
}

#[derive(Serialize)]
struct PreprocessView {
    resize: &'static str,
    mean: [f32; 3],
    std: [f32; 3],
    channel_order: &'static str,
    value_range: [f32; 2],
}

impl<'a> From<&'a ModelInfo> for ModelView<'a> {
    fn from(info: &'a ModelInfo) -> Self {
        let p = &info.preprocess;
        let [channels, height, width] = info.activation_shape;
        Self {
            name: &info.name,
            input_size: Size {
                width: p.width,
                height: p.height,
            },
            num_classes: info.num_classes(),
            labels: &info.labels,
            target_layer: &info.target_layer,
            layers: info.layer_names(),
            guided: info.guided,
            activation: ActivationShape {
                channels,
                height,
                width,
            },
            methods: CamMethod::ALL.iter().map(|m| m.name()).collect(),
            device: info.device,
            preprocess: PreprocessView {
                resize: "stretch",
                mean: p.mean,
                std: p.std,
                channel_order: p.channel_order.name(),
                value_range: [p.value_range.0, p.value_range.1],
            },
            source: info.source.as_deref(),
        }
    }
}

pub async fn list_models(State(state): State<SharedState>) -> Response {
    let models = state.registry.models();
    let models: Vec<ModelView> = models.iter().map(|m| ModelView::from(&m.info)).collect();
    Json(serde_json::json!({ "models": models })).into_response()
}

pub(crate) fn find_model(state: &SharedState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    state.registry.get(name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("no model named `{name}`; GET /v1/models lists them"),
        )
    })
}

pub async fn get_model(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let model = find_model(&state, &name)?;
    Ok(Json(ModelView::from(&model.info)).into_response())
}

#[derive(Serialize)]
pub(crate) struct Prediction<'a> {
    class: usize,
    label: &'a str,
    probability: f32,
    logit: f32,
}

pub(crate) fn predictions<'a>(
    info: &'a ModelInfo,
    logits: &[f32],
    probabilities: &[f32],
    top_k: usize,
) -> Vec<Prediction<'a>> {
    crate::onnx::contract::ranked(logits)
        .into_iter()
        .take(top_k)
        .map(|class| Prediction {
            class,
            label: &info.labels[class],
            probability: probabilities[class],
            logit: logits[class],
        })
        .collect()
}

// The model and the query are checked before the body is read, so those errors come first and cost nothing.
pub async fn post_predict(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let model = find_model(&state, &name)?;
    let top_k = params::predict_top_k(query.as_deref(), &model.info)?;
    let ImageBody(bytes) = ImageBody::from_request(request, &()).await?;
    let (logits, timings) = {
        let (model, limits) = (model.clone(), state.limits.clone());
        on_blocking_thread(move |ticket| Ok(explain::predict(&model, &bytes, &limits, ticket)?))
            .await?
    };
    let probabilities = explain::softmax(&logits);
    let body = serde_json::json!({
        "model": model.info.name,
        "predictions": predictions(&model.info, &logits, &probabilities, top_k),
    });
    let mut response = Json(body).into_response();
    add_timing_headers(&mut response, &timings, Duration::ZERO, started.elapsed());
    Ok(response)
}

pub async fn post_explain(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let model = find_model(&state, &name)?;
    let params = params::parse_explain(query.as_deref(), &model.info, &state.limits)?;
    let ImageBody(bytes) = ImageBody::from_request(request, &()).await?;
    let limits = state.limits.clone();
    let (mut response, timings, encoding) = on_blocking_thread(move |ticket| {
        let explanation = explain::explain_image(&model, &bytes, &limits, &params.options, ticket)?;
        let encoding = Instant::now();
        let response = responses::encode(&model.info, &explanation, &params);
        Ok((response, explanation.timings, encoding.elapsed()))
    })
    .await?;
    add_timing_headers(
        &mut response,
        &timings,
        timings.maps + encoding,
        started.elapsed(),
    );
    Ok(response)
}

/// Runs a request's pipeline (decoding, Runs, maps, encoding) on one blocking thread: one hand-off there and one
/// back, instead of one around each stage. The [`Caller`] stays with this future: if it is dropped (the client
/// went away, the request timed out), the request's Runs still queued are skipped.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    work: impl FnOnce(&Ticket) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let caller = Caller::default();
    let ticket = caller.ticket();
    let result = tokio::task::spawn_blocking(move || work(&ticket)).await;
    drop(caller);
    result.unwrap_or_else(|_| {
        tracing::error!("a request's pipeline panicked");
        Err(ApiError::new(ErrorCode::Internal, "the explanation failed"))
    })
}

/// Per-stage times in milliseconds, so clients and load tests see where the time goes.
fn add_timing_headers(
    response: &mut Response,
    timings: &Timings,
    render: Duration,
    total: Duration,
) {
    let headers = response.headers_mut();
    for (name, duration) in [
        ("x-decode-time", timings.decode),
        ("x-queue-time", timings.queue),
        ("x-inference-time", timings.inference),
        ("x-render-time", render),
        ("x-total-time", total),
    ] {
        let value = format!("{:.3}", duration.as_secs_f64() * 1e3);
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).expect("ASCII"),
        );
    }
    response.extensions_mut().insert(StageTimes {
        decode: timings.decode,
        queue: timings.queue,
        inference: timings.inference,
        render,
        batch_size: timings.batch_size,
    });
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-batch-size"),
        HeaderValue::from(timings.batch_size),
    );
}

pub(crate) fn image_size(explanation: &Explanation) -> Size {
    let (width, height) = explanation.photo_size;
    Size { width, height }
}
