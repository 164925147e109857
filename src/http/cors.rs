//! CORS for browser pages on other origins (a labeling tool, a notebook); off unless origins are configured.

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

/// Response headers a page may read: the request id, the drawn class and range, the stage timings.
const EXPOSED: [&str; 9] = [
    "x-request-id",
    "x-cam-class",
    "x-cam-range",
    "x-decode-time",
    "x-queue-time",
    "x-inference-time",
    "x-render-time",
    "x-total-time",
    "x-batch-size",
];

/// `None` when no origin is allowed: then no CORS header is ever sent and browsers keep pages out.
pub fn layer(config: &CorsConfig) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .map(|o| HeaderValue::from_str(o).expect("checked when the config was read")),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers(EXPOSED.map(HeaderName::from_static))
            .max_age(std::time::Duration::from_secs(600)),
    )
}
