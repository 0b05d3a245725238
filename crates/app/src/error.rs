//! The one error type of the use-case layer.

use nexplane_domain::FieldError;
use nexplane_ports::{CryptoError, StoreError};

/// Why a use case did not succeed. The API maps each variant to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing, invalid or expired credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: state conflict; `code` is the machine-readable reason.
    #[error("{detail}")]
    Conflict {
        /// e.g. `duplicate`, `invalid_transition`.
        code: &'static str,
        /// Human-readable detail.
        detail: String,
    },
    /// 410: the resource existed and is gone for good.
    #[error("{0}")]
    Gone(String),
    /// 422: well-formed but invalid content.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 429: too many attempts; retry after this many seconds.
    #[error("{detail}")]
    TooManyRequests {
        /// Seconds until a retry may succeed (at least 1).
        retry_after_secs: u64,
        /// Human-readable detail.
        detail: String,
    },
    /// 503: the database does not answer.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected failure. The text is logged, never shown to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    /// A 422 with one field error.
    pub fn field(field: &str, message: &str) -> Self {
        AppError::Validation(vec![FieldError::new(field, message)])
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => AppError::Unavailable(m),
            StoreError::Conflict(what) => AppError::Conflict {
                code: "duplicate",
                detail: format!("already exists: {what}"),
            },
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<CryptoError> for AppError {
    fn from(e: CryptoError) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl From<FieldError> for AppError {
    fn from(e: FieldError) -> Self {
        AppError::Validation(vec![e])
    }
}
