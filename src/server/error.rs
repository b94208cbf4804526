//! Errors as A1111's API reports them: a status code and `{"error", "detail", "body",
//! "errors"}` (its `api_middleware` exception handler), never a dropped connection.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A1111 puts the exception's type here.
    pub kind: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self { status, kind, detail: detail.into() }
    }

    /// 422: the request is well-formed JSON but asks for something invalid.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "RequestValidationError", detail)
    }

    /// 413: the request is larger than the server takes.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "HTTPException", detail)
    }

    /// 500: sdw failed (the model, the GPU); the message says what happened.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "RuntimeError", detail)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.kind,
            "detail": self.detail,
            "body": "",
            "errors": self.detail,
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::pipeline::PipelineError> for ApiError {
    fn from(e: crate::pipeline::PipelineError) -> Self {
        match e {
            crate::pipeline::PipelineError::Invalid(m) => Self::unprocessable(m),
            crate::pipeline::PipelineError::Embedding(e) => Self::unprocessable(e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<crate::models_dir::NameError> for ApiError {
    fn from(e: crate::models_dir::NameError) -> Self {
        match e {
            crate::models_dir::NameError::Unsafe(_) => Self::unprocessable(e.to_string()),
            crate::models_dir::NameError::NotFound { .. } => Self::not_found(e.to_string()),
        }
    }
}
