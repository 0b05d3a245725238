//! Request and response bodies, as documented in the OpenAPI schema.

use nexplane_domain::audit::AuditEvent;
use nexplane_domain::User;
use paperclip::actix::Apiv2Schema;
use serde::{Deserialize, Serialize};

/// `POST /auth/login` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    /// Login email.
    pub email: String,
    /// Password (never logged or stored in plain text).
    pub password: String,
}

/// `POST /auth/refresh` body. Omit the body entirely to refresh with a still-valid bearer
/// access token instead.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshRequest {
    /// The refresh token from the last login or refresh. Single use.
    pub refresh_token: String,
}

/// Tokens issued by login and refresh.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct TokenResponse {
    /// RS256 JWT access token; send it as `Authorization: Bearer <token>`.
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// Seconds until the access token expires (3600, or less near the end of the session).
    pub expires_in: i64,
    /// Single-use refresh token for `POST /auth/refresh`.
    pub refresh_token: String,
    /// Seconds until the session (and so the refresh token) ends.
    pub refresh_expires_in: i64,
}

/// A user account.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct UserDto {
    /// `usr_…`
    pub id: String,
    /// Login email (lowercase).
    pub email: String,
    /// Display name.
    pub name: String,
    /// `admin`, `operator`, `approver` or `viewer`.
    pub role: String,
    /// Whether the account is disabled.
    pub disabled: bool,
    /// When it was disabled.
    pub disabled_at: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last changed (RFC 3339).
    pub updated_at: String,
}

impl From<&User> for UserDto {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.to_string(),
            email: u.email.clone(),
            name: u.name.clone(),
            role: u.role.as_str().to_owned(),
            disabled: u.is_disabled(),
            disabled_at: u.disabled_at.map(|t| t.to_rfc3339()),
            created_at: u.created_at.to_rfc3339(),
            updated_at: u.updated_at.to_rfc3339(),
        }
    }
}

/// `POST /users` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateUserRequest {
    /// Login email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `admin`, `operator`, `approver` or `viewer`.
    pub role: String,
    /// 12 to 256 characters.
    pub password: String,
}

/// `PUT /users/{id}` body; each present field replaces the stored one.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateUserRequest {
    /// Display name.
    pub name: Option<String>,
    /// Role.
    pub role: Option<String>,
    /// Disable (true) or re-enable (false).
    pub disabled: Option<bool>,
}

/// `POST /users/{id}/password` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordRequest {
    /// Required when changing one's own password.
    pub current_password: Option<String>,
    /// 12 to 256 characters.
    pub new_password: String,
}

/// An audit event.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct AuditEventDto {
    /// `evt_…`
    pub id: String,
    /// Position in the hash chain, from 1.
    pub seq: i64,
    /// RFC 3339.
    pub timestamp: String,
    /// User email, `agent:<id>` or `system`.
    pub actor: String,
    /// User or agent id.
    pub actor_id: Option<String>,
    /// E.g. `auth.login`.
    pub event_type: String,
    /// E.g. `user`.
    pub resource_type: String,
    /// Id of the resource.
    pub resource_id: Option<String>,
    /// Change request concerned.
    pub change_request_id: Option<String>,
    /// Request id of the request that caused it.
    pub request_id: Option<String>,
    /// Details (never secrets).
    pub payload: serde_json::Value,
    /// Hash of the previous event.
    pub prev_hash: String,
    /// SHA-256 over `prev_hash` and this event's canonical JSON.
    pub hash: String,
}

impl From<&AuditEvent> for AuditEventDto {
    fn from(e: &AuditEvent) -> Self {
        Self {
            id: e.id.to_string(),
            seq: e.seq,
            timestamp: e.timestamp.to_rfc3339(),
            actor: e.actor.clone(),
            actor_id: e.actor_id.clone(),
            event_type: e.event_type.clone(),
            resource_type: e.resource_type.clone(),
            resource_id: e.resource_id.clone(),
            change_request_id: e.change_request_id.clone(),
            request_id: e.request_id.clone(),
            payload: e.payload.clone(),
            prev_hash: e.prev_hash.clone(),
            hash: e.hash.clone(),
        }
    }
}

/// `GET /audit/verify` answer.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct VerifyResponse {
    /// Whether every stored event verified.
    pub ok: bool,
    /// Number of events (when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<i64>,
    /// Hash of the last event (when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The first altered or missing event (when not ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<i64>,
}

/// `GET /health` answer.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct HealthResponse {
    /// `ok` or `degraded`.
    pub status: String,
    /// `connected` or `unreachable`.
    pub db: String,
    /// Server version.
    pub version: String,
}

/// `GET /health/live` answer.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct LiveResponse {
    /// Always `ok`.
    pub status: String,
}

/// Paging parameters of every list.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    /// Opaque cursor from the previous page's `X-Next-Cursor`.
    pub cursor: Option<String>,
}

/// Filters and paging of `GET /audit`.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Events of this change request.
    pub change_request_id: Option<String>,
    /// Events whose actor is this user.
    pub user_id: Option<String>,
    /// Resource type, e.g. `user`.
    pub resource_type: Option<String>,
    /// Resource id.
    pub resource_id: Option<String>,
    /// Event type, e.g. `auth.login`.
    pub event_type: Option<String>,
    /// ISO 8601; events at or after it.
    pub from: Option<String>,
    /// ISO 8601; events before it.
    pub to: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    /// Opaque cursor from the previous page.
    pub cursor: Option<String>,
}
