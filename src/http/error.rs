//! The service's one error type and its JSON envelope `{"error": {"code", "message", "request_id"}}`.
//!
//! Handlers return `ApiError`; the request middleware writes the envelope, because only it knows the request id.
//! Errors produced outside our handlers (an unknown route, a wrong method) get the same envelope there.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::explain::ExplainError;
use crate::pipeline::preprocess::DecodeError;

/// Stable, machine-readable error codes. Clients act on these; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    RouteNotFound,
    MethodNotAllowed,
    ModelNotFound,
    EmptyImage,
    UndecodableImage,
    MissingImageField,
    MalformedBody,
    UnsupportedMediaType,
    PayloadTooLarge,
    ImageTooLarge,
    InvalidParameter,
    UnknownParameter,
    ClassOutOfRange,
    TooManyClasses,
    SingleTargetRequired,
    TooManyChannels,
    Overloaded,
    Timeout,
    Unauthorized,
    AdminDisabled,
    InvalidModelFile,
    InvalidModelConfig,
    ModelRefused,
    Internal,
    ImageUrlNotAllowed,
    ImageFetchFailed,
    MissingInputGradients,
    MissingLayer,
    TooManyTasks,
}

impl ErrorCode {
    /// Every code, for the test that keeps openapi.yaml's list equal to this one.
    pub const ALL: [ErrorCode; 29] = [
        Self::RouteNotFound,
        Self::MethodNotAllowed,
        Self::ModelNotFound,
        Self::EmptyImage,
        Self::UndecodableImage,
        Self::MissingImageField,
        Self::MalformedBody,
        Self::UnsupportedMediaType,
        Self::PayloadTooLarge,
        Self::ImageTooLarge,
        Self::InvalidParameter,
        Self::UnknownParameter,
        Self::ClassOutOfRange,
        Self::TooManyClasses,
        Self::SingleTargetRequired,
        Self::TooManyChannels,
        Self::Overloaded,
        Self::Timeout,
        Self::Unauthorized,
        Self::AdminDisabled,
        Self::InvalidModelFile,
        Self::InvalidModelConfig,
        Self::ModelRefused,
        Self::Internal,
        Self::ImageUrlNotAllowed,
        Self::ImageFetchFailed,
        Self::MissingInputGradients,
        Self::MissingLayer,
        Self::TooManyTasks,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Self::RouteNotFound | Self::ModelNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::EmptyImage
            | Self::UndecodableImage
            | Self::MissingImageField
            | Self::MalformedBody
            | Self::InvalidParameter
            | Self::UnknownParameter => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge | Self::ImageTooLarge | Self::TooManyTasks => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::ClassOutOfRange
            | Self::TooManyClasses
            | Self::SingleTargetRequired
            | Self::TooManyChannels
            | Self::MissingInputGradients
            | Self::MissingLayer => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded | Self::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::AdminDisabled => StatusCode::FORBIDDEN,
            Self::InvalidModelFile | Self::InvalidModelConfig => StatusCode::BAD_REQUEST,
            Self::ModelRefused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ImageUrlNotAllowed => StatusCode::FORBIDDEN,
            Self::ImageFetchFailed => StatusCode::BAD_GATEWAY,
        }
    }

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

/// The code as clients see it (`image_fetch_failed`), for logs and metric labels.
impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(code)) => f.write_str(&code),
            _ => Err(std::fmt::Error),
        }
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
        }
    }
}
