//! The one place where errors become HTTP responses: RFC 9457 problem+json.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use nexplane_app::AppError;
use serde_json::{json, Value};

/// Content type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    inner: AppError,
    request_id: Option<String>,
}

impl ApiError {
    /// Attaches the request id (shown in 5xx bodies so operators can find the log line).
    pub fn with_request_id(mut self, id: Option<String>) -> Self {
        self.request_id = id;
        self
    }
    /// The application error.
    pub fn inner(&self) -> &AppError {
        &self.inner
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl From<AppError> for ApiError {
    fn from(inner: AppError) -> Self {
        Self {
            inner,
            request_id: None,
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        AppError::Internal("blocking pool closed".into()).into()
    }
}

impl paperclip::v2::schema::Apiv2Errors for ApiError {}

fn status_of(e: &AppError) -> (StatusCode, &'static str, &'static str) {
    match e {
        AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "Bad request"),
        AppError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
        AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
        AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
        AppError::Conflict { code, .. } => (StatusCode::CONFLICT, code, "Conflict"),
        AppError::Gone(_) => (StatusCode::GONE, "gone", "Gone"),
        AppError::Validation(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "Validation failed",
        ),
        AppError::TooManyRequests { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many requests",
        ),
        AppError::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "Service unavailable",
        ),
        AppError::Internal(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal server error",
        ),
    }
}

/// Builds a problem+json response.
pub fn problem(
    status: StatusCode,
    code: &str,
    title: &str,
    detail: &str,
    extra: Value,
) -> HttpResponse {
    let mut body = json!({
        "type": format!("urn:nexplane:error:{code}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    if let (Value::Object(b), Value::Object(x)) = (&mut body, extra) {
        b.extend(x);
    }
    let mut resp = HttpResponse::build(status);
    resp.insert_header((header::CONTENT_TYPE, PROBLEM_JSON));
    if status == StatusCode::UNAUTHORIZED {
        resp.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"nexplane\""));
    }
    resp.body(body.to_string())
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        status_of(&self.inner).0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code, title) = status_of(&self.inner);
        let mut extra = json!({});
        let detail = match &self.inner {
            AppError::Internal(msg) => {
                tracing::error!(request_id = ?self.request_id, error = %msg, "internal error");
                extra = json!({"request_id": self.request_id});
                "an internal error occurred; quote the request_id when reporting it".to_owned()
            }
            AppError::Unavailable(msg) => {
                tracing::warn!(request_id = ?self.request_id, error = %msg, "database unavailable");
                extra = json!({"request_id": self.request_id});
                "the database is not reachable".to_owned()
            }
            AppError::Validation(errors) => {
                extra = json!({"errors": errors.iter().map(|e| json!({"field": e.field, "message": e.message})).collect::<Vec<_>>()});
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
            other => other.to_string(),
        };
        let mut resp = problem(status, code, title, &detail, extra);
        if let AppError::TooManyRequests {
            retry_after_secs, ..
        } = &self.inner
        {
            if let Ok(v) = header::HeaderValue::from_str(&retry_after_secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
