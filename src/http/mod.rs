//! Routes, the request middleware (request ids, error envelopes, access logs) and the server loop.

mod admin;
mod canvas;
mod cors;
mod error;
mod formats;
mod handlers;
pub mod image_body;
mod label_studio;
pub mod metrics;
pub mod params;
mod responses;
mod ui;
mod views;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tracing::Instrument;

pub use admin::Admin;
pub use error::{ApiError, ErrorCode};
pub use label_studio::LabelStudio;

use crate::config::{Config, CorsConfig, Limits, Shutdown};
use crate::http::metrics::{Metrics, StageTimes};
use crate::onnx::runtime::OnnxRuntime;
use crate::registry::Registry;

pub struct AppState {
    pub registry: Registry,
    pub limits: Limits,
    /// Longest time a request may take; past it the client gets 503 `timeout` and its job is dropped.
    pub request_timeout: Duration,
    /// False once shutdown has begun, so that load balancers stop sending new requests.
    pub ready: AtomicBool,
    /// For models loaded at run time.
    pub runtime: OnnxRuntime,
    /// None: the admin API is off.
    pub admin: Option<Admin>,
    /// Admin changes happen one at a time.
    admin_lock: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    /// Origins allowed to call from browsers (none by default).
    pub cors: CorsConfig,
    /// The Label Studio ML backend routes, when configured.
    pub label_studio: Option<LabelStudio>,
}

impl AppState {
    /// Everything the routes share, from the loaded configuration, runtime and models.
    pub fn new(config: &Config, runtime: OnnxRuntime, registry: Registry) -> anyhow::Result<Self> {
        // `Config::load` checked that a token comes with a models folder.
        let admin = config
            .admin
            .token
            .clone()
            .zip(config.admin.models_dir.clone())
            .map(|(token, models_dir)| Admin { token, models_dir });
        Ok(Self {
            registry,
            limits: config.limits.clone(),
            request_timeout: config.server.request_timeout(),
            ready: AtomicBool::new(true),
            runtime,
            admin,
            admin_lock: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
            cors: config.cors.clone(),
            label_studio: config
                .label_studio
                .clone()
                .map(LabelStudio::new)
                .transpose()?,
        })
    }
}

pub type SharedState = Arc<AppState>;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

const FORWARDED_HEADERS: [(&str, &str); 3] = [
    ("x-forwarded-for", "forwarded_for"),
    ("x-forwarded-proto", "forwarded_proto"),
    ("x-forwarded-host", "forwarded_host"),
];

pub fn router(state: SharedState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let routes = Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::list_models))
        .route(
            "/v1/models/{model}",
            get(handlers::get_model)
                .put(admin::put_model)
                .delete(admin::delete_model),
        )
        .route("/v1/models/{model}/reload", post(admin::reload_model))
        .route("/v1/models/{model}/predict", post(handlers::post_predict))
        .route("/v1/models/{model}/explain", post(handlers::post_explain));
    let routes = label_studio::routes(ui::routes(routes), state.label_studio.as_ref());
    let router = routes
        .fallback(handlers::route_not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ));
    // Outermost, so that preflights are answered and error envelopes carry the CORS headers too.
    match cors::layer(&state.cors) {
        Some(cors) => router.layer(cors).with_state(state),
        None => router.with_state(state),
    }
}

/// Serves until `shutdown` resolves, then stops taking requests and lets those in flight finish.
/// Serves until `signal` resolves; then readiness turns false, `timing.delay` later the listener closes, and
/// requests in flight get up to `timing.grace` to finish.
pub async fn serve(
    listener: TcpListener,
    state: SharedState,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    timing: Shutdown,
) -> std::io::Result<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async move {
        let _ = stopped.await;
    });
    let mut server = tokio::spawn(server.into_future());
    tokio::select! {
        result = &mut server => return result.expect("the server task panicked"),
        () = signal => {}
    }
    state.ready.store(false, Ordering::SeqCst);
    tokio::time::sleep(timing.delay).await;
    let _ = stop.send(());
    match tokio::time::timeout(timing.grace, &mut server).await {
        Ok(result) => result.expect("the server task panicked"),
        Err(_) => {
            tracing::warn!(
                grace_secs = timing.grace.as_secs(),
                "requests still in flight after the grace period"
            );
            server.abort();
            Ok(())
        }
    }
}

/// Gives every request an id, turns every error into the JSON envelope carrying that id, and logs the request.
async fn request_context(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(new_request_id, str::to_owned);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    let request_path = request.uri().path().to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        %method,
        route = %route,
        forwarded_for = tracing::field::Empty,
        forwarded_proto = tracing::field::Empty,
        forwarded_host = tracing::field::Empty,
    );
    // Behind a gateway the peer is the gateway: log who the client really was, as the gateway tells it.
    for (header, field) in FORWARDED_HEADERS {
        if let Some(value) = request.headers().get(header).and_then(|v| v.to_str().ok()) {
            span.record(field, value);
        }
    }
    let started = Instant::now();

    let handled = next.run(request).instrument(span.clone());
    // Label Studio's predict sizes its own budget to its batch of tasks.
    let own_budget = (state.label_studio.as_ref()).is_some_and(|ls| route == ls.predict_route());
    let mut response = if own_budget {
        handled.await
    } else {
        match tokio::time::timeout(state.request_timeout, handled).await {
            Ok(response) => response,
            Err(_) => ApiError::new(ErrorCode::Timeout, "the request took too long; retry later")
                .into_response(),
        }
    };

    let status = response.status();
    let mut error = response.extensions_mut().remove::<ApiError>();
    if error.is_none()
        && (status.is_client_error() || status.is_server_error())
        && !is_json(&response)
    {
        // Rejections from axum itself (unknown method, body limit) come as plain text.
        let code = ErrorCode::for_status(status);
        let message = status.canonical_reason().unwrap_or("error").to_lowercase();
        error = Some(ApiError::new(code, message));
    }
    if let Some(error) = &error {
        let headers = std::mem::take(response.headers_mut());
        response = error.envelope(&request_id);
        if let Some(allow) = headers.get(header::ALLOW) {
            response.headers_mut().insert(header::ALLOW, allow.clone());
        }
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    // The model label only for models that exist, so that clients cannot grow the label space.
    let model = model_in_path(&route, request_path.as_str())
        .filter(|name| state.registry.get(name).is_some());
    let stages = response.extensions().get::<StageTimes>().copied();
    state.metrics.record(
        &route,
        model,
        response.status().as_u16(),
        started.elapsed(),
        stages,
    );
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let status = response.status().as_u16();
    span.in_scope(|| match &error {
        Some(e) => {
            tracing::info!(status, elapsed_ms, code = %e.code, reason = %e.message, "served")
        }
        None => tracing::info!(status, elapsed_ms, "served"),
    });
    response
}

/// The `{model}` segment of a path whose route pattern has one.
fn model_in_path<'a>(route: &str, path: &'a str) -> Option<&'a str> {
    let index = route.split('/').position(|segment| segment == "{model}")?;
    path.split('/').nth(index)
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// A process-unique id: a random per-process prefix and a counter, so ids never repeat and need no RNG.
fn new_request_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    format!(
        "{:016x}-{:08x}",
        prefix,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
