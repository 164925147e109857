//! A task's image, fetched as Label Studio's own backends do: a `data:` URI, an `http(s)://` URL on an allowed host,
//! or a Label Studio path with its token; nothing else, no redirects, bounded in size and time.

use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Url;
use serde_json::{Value, json};

use super::LabelStudio;
use crate::http::error::{ApiError, ErrorCode};

#[derive(Debug)]
pub(super) struct Access {
    refresh: String,
    access: String,
    obtained: Instant,
}

#[derive(Debug, Clone)]
pub(super) struct Link {
    pub(super) base: Url,
    pub(super) token: Option<String>,
}

impl LabelStudio {
    /// The Authorization header for a Label Studio token, as its SDK sends them: `Token` for a legacy token,
    /// `Bearer` for a JWT; a personal access token (a JWT refresh token) is first exchanged at
    /// `/api/token/refresh/` for an access token, which is kept for a while (Label Studio's live 5 minutes).
    pub(super) async fn authorization(&self, token: &str, base: &Url) -> Result<String, ApiError> {
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

    pub(super) fn link(&self) -> Option<Link> {
        self.link.lock().expect("link lock").clone()
    }

    /// `host:port` of a URL, as `allowed_hosts` lists them.
    pub(super) fn is_allowed(&self, url: &Url) -> bool {
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

pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    (a.scheme(), a.host_str(), a.port_or_known_default())
        == (b.scheme(), b.host_str(), b.port_or_known_default())
}

pub(super) fn not_allowed(message: String) -> ApiError {
    ApiError::new(ErrorCode::ImageUrlNotAllowed, message)
}

pub(super) fn fetch_failed(message: String) -> ApiError {
    ApiError::new(ErrorCode::ImageFetchFailed, message)
}

/// The image bytes of a task: a `data:` URI, an `http(s)://` URL on an allowed host, or a Label Studio path.
pub(super) async fn fetch_image(url: &str, backend: &LabelStudio) -> Result<Vec<u8>, ApiError> {
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
pub(super) fn jwt_type(token: &str) -> Option<String> {
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

pub(super) fn decode_data_uri(rest: &str, limit: usize) -> Result<Vec<u8>, ApiError> {
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

pub(super) fn too_large(limit: usize) -> ApiError {
    fetch_failed(format!(
        "the task image is larger than label_studio.fetch_max_bytes ({limit} bytes)"
    ))
}

pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

pub(super) fn shorten(url: &str) -> &str {
    let end = (0..=url.len().min(80))
        .rev()
        .find(|&i| url.is_char_boundary(i))
        .unwrap_or(0);
    &url[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
