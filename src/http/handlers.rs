//! Route handlers: parse, call the pipeline, encode the answer. No math here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::engine::{Caller, Ticket};
use crate::explain::{self, Timings};
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::image_body::ImageBody;
use crate::http::metrics::StageTimes;
use crate::http::params;
use crate::http::responses;
use crate::http::views::{ModelView, predictions};
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
