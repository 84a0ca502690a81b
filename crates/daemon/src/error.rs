//! The daemon's error type: an [`ApiError`] (code + message) that every layer converts into, and
//! that axum renders as `{"code", "message", "op_id"}` with the matching HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use wick_model::api::{ApiError, ErrorCode};
use wick_store::StoreError;
use wick_vmm::VmmError;

/// An error bound for the API caller.
#[derive(Debug, Clone)]
pub struct Error(pub ApiError);

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error(ApiError::new(code, message))
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::InvalidArgument, message)
    }
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Conflict, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Internal, message)
    }
    pub fn precondition(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::FailedPrecondition, message)
    }
    pub fn cancelled() -> Error {
        Error::new(ErrorCode::Cancelled, "operation cancelled")
    }
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for Error {}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        let code = match &e {
            StoreError::NameTaken(_) | StoreError::SnapshotNameTaken(_) => ErrorCode::Conflict,
            StoreError::NotFound(_) | StoreError::SnapshotNotFound(_) => ErrorCode::NotFound,
            StoreError::Ambiguous { .. } => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        };
        Error::new(code, e.to_string())
    }
}

impl From<VmmError> for Error {
    fn from(e: VmmError) -> Error {
        let code = match &e {
            VmmError::BinaryNotFound(_) => ErrorCode::FailedPrecondition,
            _ => ErrorCode::Internal,
        };
        Error::new(code, e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::internal(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}
