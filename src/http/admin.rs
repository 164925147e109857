//! The admin API: register or replace (`PUT /v1/models/{model}`), remove (`DELETE`) and reload
//! (`POST /v1/models/{model}/reload`) models while serving. A bearer token guards it; with no token configured
//! it is off. Model files come only from the configured models folder.
//!
//! A model that fails to load or to pass the contract check leaves the one it would replace serving.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::MutexGuard;

use crate::config::ModelConfig;
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::views::ModelView;
use crate::registry::ServedModel;

/// The admin token and models folder, once the service has checked both are set.
pub struct Admin {
    pub token: String,
    pub models_dir: PathBuf,
}

fn authorize(state: &SharedState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(admin) = &state.admin else {
        return Err(ApiError::new(
            ErrorCode::AdminDisabled,
            "the admin API is off: no admin token is configured",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), admin.token.as_bytes()) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "a valid `Authorization: Bearer <token>` is required",
        ));
    }
    Ok(())
}

/// Compares without stopping at the first difference, so response times don't reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `file` (and a labels file) relative to the models folder, and inside it once links are resolved.
fn inside_models_dir(models_dir: &Path, file: &Path) -> Result<PathBuf, ApiError> {
    let outside = || {
        ApiError::new(
            ErrorCode::InvalidModelFile,
            format!(
                "`{}` must be a file inside the models folder, given relative to it",
                file.display()
            ),
        )
    };
    if !file.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let root = models_dir.canonicalize().map_err(|_| outside())?;
    let path = root.join(file).canonicalize().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidModelFile,
            format!("`{}` does not exist in the models folder", file.display()),
        )
    })?;
    if !path.starts_with(&root) || !path.is_file() {
        return Err(outside());
    }
    Ok(path)
}

/// The body of `PUT`: a `[[models]]` entry of the config as JSON, without `name` (the URL gives it).
fn model_config(name: &str, body: &[u8], models_dir: &Path) -> Result<ModelConfig, ApiError> {
    let invalid = |message: String| ApiError::new(ErrorCode::InvalidModelConfig, message);
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| invalid("the body must be a JSON object".into()))?;
    object.insert("name".into(), name.into());
    let mut config: ModelConfig =
        serde_json::from_value(value).map_err(|e| invalid(format!("invalid model entry: {e}")))?;
    config.validate().map_err(|e| invalid(e.to_string()))?;
    config.file = inside_models_dir(models_dir, &config.file)?;
    if let Some(labels) = &config.overrides.labels_file {
        config.overrides.labels_file = Some(inside_models_dir(models_dir, labels)?);
    }
    Ok(config)
}

/// Loads on a blocking thread (sessions, contract check, probe Run) and swaps the model in only on success;
/// returns the model now served, and whether it replaced one. The caller holds the admin lock (`_held`) and
/// answers from the returned model: a DELETE may remove it from the registry once the lock is released.
async fn load_and_swap(
    state: &SharedState,
    _held: &MutexGuard<'_, ()>,
    config: ModelConfig,
) -> Result<(Arc<ServedModel>, bool), ApiError> {
    let runtime = state.runtime.clone();
    let model = tokio::task::spawn_blocking(move || ServedModel::load(&runtime, &config))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "loading the model panicked"))?
        .map_err(|e| ApiError::new(ErrorCode::ModelRefused, e.to_string()))?;
    let (model, replaced) = state.registry.insert(model);
    Ok((model, replaced.is_some()))
}

pub async fn put_model(
    State(state): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let models_dir = &state.admin.as_ref().expect("authorized").models_dir;
    let config = model_config(&name, &body, models_dir)?;
    let held = state.admin_lock.lock().await;
    let (model, replaced) = load_and_swap(&state, &held, config).await?;
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(ModelView::from(&model.info))).into_response())
}

pub async fn reload_model(
    State(state): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    // Looked up under the lock, so that a DELETE before it wins (404) rather than being undone by the reload.
    let held = state.admin_lock.lock().await;
    let config = crate::http::handlers::find_model(&state, &name)?
        .config
        .clone();
    let (model, _) = load_and_swap(&state, &held, config).await?;
    Ok(Json(ModelView::from(&model.info)).into_response())
}

pub async fn delete_model(
    State(state): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let _one_at_a_time = state.admin_lock.lock().await;
    match state.registry.remove(&name) {
        Some(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        None => Err(crate::http::handlers::find_model(&state, &name)
            .err()
            .expect("absent")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_cannot_escape_the_models_folder() {
        let root = std::env::temp_dir().join(format!("camserve-admin-{}", std::process::id()));
        std::fs::create_dir_all(root.join("models/sub")).unwrap();
        std::fs::write(root.join("models/sub/m.onnx"), b"x").unwrap();
        std::fs::write(root.join("secret.onnx"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("secret.onnx"), root.join("models/link.onnx"))
            .unwrap();
        let dir = root.join("models");
        assert_eq!(
            inside_models_dir(&dir, Path::new("sub/m.onnx")).unwrap(),
            dir.canonicalize().unwrap().join("sub/m.onnx")
        );
        for escape in [
            "../secret.onnx",
            "/etc/passwd",
            "sub/../../secret.onnx",
            "link.onnx",
            "sub",
            "missing.onnx",
        ] {
            let err = inside_models_dir(&dir, Path::new(escape)).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidModelFile, "{escape}");
        }
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
