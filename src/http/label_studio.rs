//! camserve as a Label Studio ML backend: the routes Label Studio calls (`/health`, `/setup`, `/predict`, as
//! label-studio-ml's Flask server answers them) under `label_studio.prefix`.
//!
//! A task's image is a `data:` URI or an `http://` URL on one of `label_studio.allowed_hosts`; nothing else is
//! fetched, redirects are not followed, and size and time are bounded, so the service is no open proxy.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::cam::CamMethod;
use crate::config::LabelStudioConfig;
use crate::explain::{self, ExplainOptions, Targets};
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::formats::{self, FormatOptions, LabelStudioNames};
use crate::http::handlers::on_blocking_thread;

/// Adds the backend's routes when `[label_studio]` is configured.
pub fn routes(
    router: Router<SharedState>,
    config: Option<&LabelStudioConfig>,
) -> Router<SharedState> {
    let Some(config) = config else {
        return router;
    };
    let prefix = &config.prefix;
    router
        .route(&format!("{prefix}/health"), get(health))
        .route(&format!("{prefix}/setup"), post(setup))
        .route(&format!("{prefix}/predict"), post(predict))
}

fn config(state: &SharedState) -> &LabelStudioConfig {
    state
        .label_studio
        .as_ref()
        .expect("routes exist only when configured")
}

fn model_version(config: &LabelStudioConfig) -> String {
    format!("camserve-{}", config.model)
}

async fn health(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({ "status": "UP", "model_class": "camserve", "model": config(&state).model }))
}

/// Label Studio calls this when a project connects; the answer names the model version its predictions carry.
async fn setup(State(state): State<SharedState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    parse_json(&body)?;
    Ok(Json(
        json!({ "model_version": model_version(config(&state)) }),
    ))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| ApiError::new(ErrorCode::MalformedBody, "the body must be a JSON object"))
}

/// `{"tasks": [{"data": {...}}], "label_config": "<View>..."}` -> `{"results": [prediction per task], "model_version"}`.
async fn predict(State(state): State<SharedState>, body: Bytes) -> Result<Response, ApiError> {
    let config = config(&state);
    let request = parse_json(&body)?;
    let tasks = request["tasks"]
        .as_array()
        .ok_or_else(|| ApiError::new(ErrorCode::MalformedBody, "the body has no `tasks` list"))?;
    let tags = match request.get("label_config") {
        None => Tags::default(),
        Some(Value::String(xml)) => Tags::from_label_config(xml),
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
    let options = ExplainOptions {
        targets: Targets::TopK(config.top_k.min(model.info.num_classes())),
        method: CamMethod::GradCam,
        threshold: config.threshold,
        max_boxes: config.max_boxes,
        ..ExplainOptions::default()
    };
    let version = model_version(config);
    let mut results = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.iter().enumerate() {
        let url = task_image(task, &tags.data_key).ok_or_else(|| {
            ApiError::new(
                ErrorCode::MalformedBody,
                format!("task {i} has no image URL at data.{}", tags.data_key),
            )
        })?;
        let bytes = fetch_image(url, config).await?;
        let explanation = {
            let (model, limits, options) = (model.clone(), state.limits.clone(), options.clone());
            on_blocking_thread(move |ticket| {
                Ok(explain::explain(&model, &bytes, &limits, &options, ticket)?)
            })
            .await?
        };
        let format_options = FormatOptions {
            threshold: config.threshold,
            model_version: &version,
            max_side: state.limits.max_output_side,
            gray8: false,
        };
        results.push(formats::label_studio(
            &model.info,
            &explanation,
            &format_options,
            &tags.names,
        ));
    }
    Ok(Json(json!({ "results": results, "model_version": version })).into_response())
}

/// What the project's labeling config names: the control tags results go to and the task field of the image.
#[derive(Debug)]
struct Tags {
    names: LabelStudioNames,
    data_key: String,
}

impl Default for Tags {
    fn default() -> Self {
        Self {
            names: LabelStudioNames::default(),
            data_key: "image".into(),
        }
    }
}

impl Tags {
    /// Reads `<Image name value="$key">`, `<RectangleLabels name toName>` and `<BrushLabels name toName>`.
    /// A config without one of the two control tags gets no results of that kind.
    fn from_label_config(xml: &str) -> Self {
        let image = attributes(xml, "Image");
        let rectangles = attributes(xml, "RectangleLabels");
        let brush = attributes(xml, "BrushLabels");
        let find = |tag: &[(String, String)], key: &str| {
            tag.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
        };
        let image_name = image
            .as_deref()
            .and_then(|a| find(a, "name"))
            .or_else(|| rectangles.as_deref().and_then(|a| find(a, "toName")))
            .or_else(|| brush.as_deref().and_then(|a| find(a, "toName")))
            .unwrap_or_else(|| "image".into());
        let data_key = image
            .as_deref()
            .and_then(|a| find(a, "value"))
            .map(|v| v.trim_start_matches('$').to_owned())
            .unwrap_or_else(|| "image".into());
        Self {
            names: LabelStudioNames {
                rectangles: rectangles.as_deref().and_then(|a| find(a, "name")),
                brush: brush.as_deref().and_then(|a| find(a, "name")),
                image: image_name,
            },
            data_key,
        }
    }
}

/// The attributes of the first `<tag ...>` element. Label configs are small, flat XML written by hand; this
/// reads `key="value"` pairs and needs no XML parser.
fn attributes(xml: &str, tag: &str) -> Option<Vec<(String, String)>> {
    let open = format!("<{tag}");
    let start = xml.match_indices(&open).find_map(|(i, _)| {
        let after = &xml[i + open.len()..];
        after
            .starts_with(|c: char| c.is_whitespace() || c == '/' || c == '>')
            .then_some(after)
    })?;
    let inside = &start[..start.find('>')?];
    let mut pairs = Vec::new();
    let mut rest = inside;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_owned();
        let value_part = rest[eq + 1..].trim_start();
        let quote = value_part.chars().next()?;
        if quote != '"' && quote != '\'' {
            break;
        }
        let end = value_part[1..].find(quote)? + 1;
        pairs.push((key, value_part[1..end].to_owned()));
        rest = &value_part[end + 1..];
    }
    Some(pairs)
}

fn task_image<'a>(task: &'a Value, key: &str) -> Option<&'a str> {
    task["data"][key].as_str()
}

fn not_allowed(message: String) -> ApiError {
    ApiError::new(ErrorCode::ImageUrlNotAllowed, message)
}

fn fetch_failed(message: String) -> ApiError {
    ApiError::new(ErrorCode::ImageFetchFailed, message)
}

/// The image bytes of a task: a `data:` URI, or an `http://` URL on an allowed host.
async fn fetch_image(url: &str, config: &LabelStudioConfig) -> Result<Vec<u8>, ApiError> {
    let limit = config.fetch_max_bytes;
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, payload) = rest.split_once(',').ok_or_else(|| {
            ApiError::new(ErrorCode::MalformedBody, "a data: URI without a comma")
        })?;
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
        return base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| ApiError::new(ErrorCode::MalformedBody, format!("data: URI: {e}")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| {
        not_allowed(format!(
            "`{}` is not an absolute http:// URL; relative Label Studio upload paths are not fetched: serve \
             task images from a host in label_studio.allowed_hosts",
            shorten(url)
        ))
    })?;
    if parsed.scheme() != "http" {
        return Err(not_allowed(format!(
            "scheme `{}` is not fetched: use http:// on an allowed host, or a data: URI",
            parsed.scheme()
        )));
    }
    let host = parsed.host_str().unwrap_or("");
    let port = parsed.port_or_known_default().unwrap_or(80);
    let allowed = config
        .allowed_hosts
        .iter()
        .any(|entry| entry == &format!("{host}:{port}") || (entry == host && port == 80));
    if !allowed {
        return Err(not_allowed(format!(
            "host `{host}:{port}` is not in label_studio.allowed_hosts"
        )));
    }
    let timeout = Duration::from_secs(config.fetch_timeout_secs);
    let describe = |e: reqwest::Error| {
        if e.is_timeout() {
            fetch_failed(format!(
                "fetching the task image timed out after {}s",
                timeout.as_secs()
            ))
        } else {
            fetch_failed(format!(
                "fetching the task image failed: {}",
                error_chain(&e)
            ))
        }
    };
    let fetch = async {
        let mut response = client()
            .get(parsed.clone())
            .send()
            .await
            .map_err(describe)?;
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
    tokio::time::timeout(timeout, fetch).await.map_err(|_| {
        fetch_failed(format!(
            "fetching the task image timed out after {}s",
            timeout.as_secs()
        ))
    })?
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
    url.get(..80).unwrap_or(url)
}

/// One client for every fetch: it keeps connections alive and never follows a redirect off the allowed hosts.
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("a client without TLS builds")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_config_names() {
        let xml = r#"<View>
            <Image name="img" value="$photo" zoom="true"/>
            <RectangleLabels name="boxes" toName="img"><Label value="red"/></RectangleLabels>
            <BrushLabels name='paint' toName='img'><Label value="red"/></BrushLabels>
        </View>"#;
        let tags = Tags::from_label_config(xml);
        assert_eq!(tags.data_key, "photo");
        assert_eq!(tags.names.image, "img");
        assert_eq!(tags.names.rectangles.as_deref(), Some("boxes"));
        assert_eq!(tags.names.brush.as_deref(), Some("paint"));

        // Only rectangles: no brush results. `<Image>` must not match `<ImageX>`.
        let tags = Tags::from_label_config(
            r#"<View><ImageX name="no"/><Image name="i" value="$u"/><RectangleLabels name="r" toName="i"/></View>"#,
        );
        assert_eq!(
            (tags.data_key.as_str(), tags.names.image.as_str()),
            ("u", "i")
        );
        assert_eq!(tags.names.brush, None);
    }
}
