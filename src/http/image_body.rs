//! The uploaded image: the raw request body, or the multipart field named `image`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;

use crate::http::error::{ApiError, ErrorCode};

/// The encoded bytes of the uploaded image; decoding sniffs the format from the bytes themselves.
pub struct ImageBody(pub Vec<u8>);

const RAW_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/webp",
    "application/octet-stream",
];

impl<S: Send + Sync> FromRequest<S> for ImageBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        match content_type.as_deref() {
            Some("multipart/form-data") => {
                from_multipart(Multipart::from_request(request, state).await.map_err(|e| {
                    ApiError::new(
                        code_for(e.status()),
                        format!("malformed multipart body: {}", e.body_text()),
                    )
                })?)
                .await
            }
            Some(t) if RAW_TYPES.contains(&t) => {
                let bytes = Bytes::from_request(request, state)
                    .await
                    .map_err(|e| ApiError::new(code_for(e.status()), e.body_text()))?;
                Ok(Self(bytes.into()))
            }
            other => Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "content type {} is not accepted: send the image as {} or as multipart/form-data with a field `image`",
                    other.map_or("(none)".to_owned(), |t| format!("`{t}`")),
                    RAW_TYPES.join(", ")
                ),
            )),
        }
    }
}

async fn from_multipart(mut multipart: Multipart) -> Result<ImageBody, ApiError> {
    loop {
        let field = multipart.next_field().await.map_err(|e| {
            ApiError::new(
                code_for(e.status()),
                format!("malformed multipart body: {}", e.body_text()),
            )
        })?;
        let Some(field) = field else {
            return Err(ApiError::new(
                ErrorCode::MissingImageField,
                "the multipart body has no field named `image`",
            ));
        };
        if field.name() == Some("image") {
            let bytes = field.bytes().await.map_err(|e| {
                ApiError::new(
                    code_for(e.status()),
                    format!("malformed multipart body: {}", e.body_text()),
                )
            })?;
            return Ok(ImageBody(bytes.into()));
        }
    }
}

fn code_for(status: axum::http::StatusCode) -> ErrorCode {
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ErrorCode::PayloadTooLarge
    } else {
        ErrorCode::MalformedBody
    }
}
