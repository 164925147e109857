//! The service's one error type and its JSON envelope `{"error": {"code", "message", "request_id"}}`.
//!
//! Handlers return `ApiError`; the request middleware writes the envelope, because only it knows the request id.
//! Errors produced outside our handlers (an unknown route, a wrong method) get the same envelope there.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::explain::{ExplainError, RequestError};
use crate::pipeline::preprocess::DecodeError;

/// Writes [`ErrorCode`] and its lists from one table: variant, code, HTTP status.
macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:ident;)*) => {
        /// Stable, machine-readable error codes. Clients act on these; never rename one. docs/errors.md explains
        /// each, under an anchor named after the code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code, in the table's order.
            pub const ALL: &[ErrorCode] = &[$(Self::$variant,)*];

            /// The code as clients see it, e.g. `image_fetch_failed`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)*
                }
            }

            pub fn status(self) -> StatusCode {
                match self {
                    $(Self::$variant => StatusCode::$status,)*
                }
            }
        }
    };
}

error_codes! {
    RouteNotFound = "route_not_found", NOT_FOUND;
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED;
    ModelNotFound = "model_not_found", NOT_FOUND;
    EmptyImage = "empty_image", BAD_REQUEST;
    UndecodableImage = "undecodable_image", BAD_REQUEST;
    MissingImageField = "missing_image_field", BAD_REQUEST;
    MalformedBody = "malformed_body", BAD_REQUEST;
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE;
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE;
    ImageTooLarge = "image_too_large", PAYLOAD_TOO_LARGE;
    InvalidParameter = "invalid_parameter", BAD_REQUEST;
    UnknownParameter = "unknown_parameter", BAD_REQUEST;
    ClassOutOfRange = "class_out_of_range", UNPROCESSABLE_ENTITY;
    TooManyClasses = "too_many_classes", UNPROCESSABLE_ENTITY;
    SingleTargetRequired = "single_target_required", UNPROCESSABLE_ENTITY;
    TooManyChannels = "too_many_channels", UNPROCESSABLE_ENTITY;
    Overloaded = "overloaded", SERVICE_UNAVAILABLE;
    Timeout = "timeout", SERVICE_UNAVAILABLE;
    Unauthorized = "unauthorized", UNAUTHORIZED;
    AdminDisabled = "admin_disabled", FORBIDDEN;
    InvalidModelFile = "invalid_model_file", BAD_REQUEST;
    InvalidModelConfig = "invalid_model_config", BAD_REQUEST;
    ModelRefused = "model_refused", UNPROCESSABLE_ENTITY;
    Internal = "internal", INTERNAL_SERVER_ERROR;
    ImageUrlNotAllowed = "image_url_not_allowed", FORBIDDEN;
    ImageFetchFailed = "image_fetch_failed", BAD_GATEWAY;
    MissingInputGradients = "missing_input_gradients", UNPROCESSABLE_ENTITY;
    MissingLayer = "missing_layer", UNPROCESSABLE_ENTITY;
    TooManyTasks = "too_many_tasks", PAYLOAD_TOO_LARGE;
}

impl ErrorCode {
    /// The code for an error response that did not come from our handlers.
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::RouteNotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            s if s.is_client_error() => Self::InvalidParameter,
            _ => Self::Internal,
        }
    }
}

/// The code as clients see it, for logs and metric labels.
impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The JSON envelope, as sent to the client.
    pub fn envelope(&self, request_id: &str) -> Response {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Body<'a>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            code: ErrorCode,
            message: &'a str,
            request_id: &'a str,
        }
        let body = Envelope {
            error: Body {
                code: self.code,
                message: &self.message,
                request_id,
            },
        };
        let mut response = (self.code.status(), axum::Json(body)).into_response();
        if self.code.status() == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.code == ErrorCode::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl IntoResponse for ApiError {
    /// A placeholder that carries the error to the middleware, which writes the envelope with the request id.
    fn into_response(self) -> Response {
        let mut response = self.code.status().into_response();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        let code = match e {
            DecodeError::Empty => ErrorCode::EmptyImage,
            DecodeError::UnsupportedFormat => ErrorCode::UnsupportedMediaType,
            DecodeError::Undecodable(_) => ErrorCode::UndecodableImage,
            DecodeError::TooLarge { .. } => ErrorCode::ImageTooLarge,
        };
        Self::new(code, e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded => {
                Self::new(ErrorCode::Overloaded, "the model is busy; retry shortly")
            }
            // Nobody reads this answer: the request's handler was dropped, by the timeout or a client gone.
            EngineError::Abandoned => Self::new(ErrorCode::Timeout, e.to_string()),
            EngineError::Failed(detail) => {
                // The detail is for operators, not clients.
                tracing::error!(error = %detail, "inference failed");
                Self::new(ErrorCode::Internal, "inference failed")
            }
        }
    }
}

impl From<ExplainError> for ApiError {
    fn from(e: ExplainError) -> Self {
        match e {
            ExplainError::Decode(e) => e.into(),
            ExplainError::Engine(e) => e.into(),
            ExplainError::Request(e) => e.into(),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let code = match &e {
            RequestError::ClassOutOfRange(_) => ErrorCode::ClassOutOfRange,
            RequestError::TooManyClasses(_) => ErrorCode::TooManyClasses,
            RequestError::TooManyChannels(_) => ErrorCode::TooManyChannels,
            RequestError::MissingInputGradients(_) => ErrorCode::MissingInputGradients,
            RequestError::MissingLayer(_) => ErrorCode::MissingLayer,
            RequestError::Invalid(_) => ErrorCode::InvalidParameter,
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_unique_and_explained_in_the_docs() {
        let docs = include_str!("../../docs/errors.md");
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
            let row = format!(
                "| <a id=\"{code}\"></a>`{code}` | {} |",
                code.status().as_u16()
            );
            assert!(docs.contains(&row), "docs/errors.md has no row `{row}`");
        }
    }
}
