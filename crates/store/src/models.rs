//! Rows as stored, and their conversion to and from the domain model.

use crate::error::corrupt;
use crate::schema::{audit_events, refresh_tokens, sessions, users};
use diesel::prelude::*;
use nexplane_domain::audit::AuditEvent;
use nexplane_domain::{
    EventId, LockState, PasswordHash, RefreshTokenRecord, Role, Session, SessionId, Timestamp,
    User, UserId,
};
use nexplane_ports::StoreError;

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// A `users` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = users)]
pub(crate) struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub password_hash: String,
    pub disabled_at: Option<i64>,
    pub failed_logins: i32,
    pub locked_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<&User> for UserRow {
    fn from(u: &User) -> Self {
        UserRow {
            id: u.id.as_str().to_owned(),
            email: u.email.clone(),
            name: u.name.clone(),
            role: u.role.as_str().to_owned(),
            password_hash: u.password_hash.as_str().to_owned(),
            disabled_at: u.disabled_at.map(Timestamp::millis),
            failed_logins: i32::try_from(u.lock.failed_logins).unwrap_or(i32::MAX),
            locked_until: u.lock.locked_until.map(Timestamp::millis),
            created_at: u.created_at.millis(),
            updated_at: u.updated_at.millis(),
        }
    }
}

impl TryFrom<UserRow> for User {
    type Error = StoreError;
    fn try_from(r: UserRow) -> Result<Self, StoreError> {
        Ok(User {
            id: UserId::parse(&r.id).map_err(|e| corrupt("users", e))?,
            role: Role::parse(&r.role)
                .ok_or_else(|| corrupt("users", format!("unknown role {:?}", r.role)))?,
            email: r.email,
            name: r.name,
            password_hash: PasswordHash::new(r.password_hash),
            disabled_at: r.disabled_at.map(ts),
            lock: LockState {
                failed_logins: u32::try_from(r.failed_logins).unwrap_or(0),
                locked_until: r.locked_until.map(ts),
            },
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        })
    }
}

/// A `sessions` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = sessions)]
pub(crate) struct SessionRow {
    pub id: String,
    pub user_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

impl From<&Session> for SessionRow {
    fn from(s: &Session) -> Self {
        SessionRow {
            id: s.id.as_str().to_owned(),
            user_id: s.user_id.as_str().to_owned(),
            created_at: s.created_at.millis(),
            expires_at: s.expires_at.millis(),
            revoked_at: s.revoked_at.map(Timestamp::millis),
        }
    }
}

impl TryFrom<SessionRow> for Session {
    type Error = StoreError;
    fn try_from(r: SessionRow) -> Result<Self, StoreError> {
        Ok(Session {
            id: SessionId::parse(&r.id).map_err(|e| corrupt("sessions", e))?,
            user_id: UserId::parse(&r.user_id).map_err(|e| corrupt("sessions", e))?,
            created_at: ts(r.created_at),
            expires_at: ts(r.expires_at),
            revoked_at: r.revoked_at.map(ts),
        })
    }
}

/// A `refresh_tokens` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = refresh_tokens)]
pub(crate) struct RefreshTokenRow {
    pub token_hash: String,
    pub session_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

impl From<&RefreshTokenRecord> for RefreshTokenRow {
    fn from(t: &RefreshTokenRecord) -> Self {
        RefreshTokenRow {
            token_hash: t.token_hash.clone(),
            session_id: t.session_id.as_str().to_owned(),
            created_at: t.created_at.millis(),
            expires_at: t.expires_at.millis(),
            used_at: t.used_at.map(Timestamp::millis),
        }
    }
}

impl TryFrom<RefreshTokenRow> for RefreshTokenRecord {
    type Error = StoreError;
    fn try_from(r: RefreshTokenRow) -> Result<Self, StoreError> {
        Ok(RefreshTokenRecord {
            session_id: SessionId::parse(&r.session_id)
                .map_err(|e| corrupt("refresh_tokens", e))?,
            token_hash: r.token_hash,
            created_at: ts(r.created_at),
            expires_at: ts(r.expires_at),
            used_at: r.used_at.map(ts),
        })
    }
}

/// An `audit_events` row. The payload is stored as JSON text.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = audit_events)]
pub(crate) struct AuditRow {
    pub seq: i64,
    pub id: String,
    pub timestamp: i64,
    pub actor: String,
    pub actor_id: Option<String>,
    pub event_type: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub change_request_id: Option<String>,
    pub request_id: Option<String>,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

impl TryFrom<&AuditEvent> for AuditRow {
    type Error = StoreError;
    fn try_from(e: &AuditEvent) -> Result<Self, StoreError> {
        Ok(AuditRow {
            seq: e.seq,
            id: e.id.as_str().to_owned(),
            timestamp: e.timestamp.millis(),
            actor: e.actor.clone(),
            actor_id: e.actor_id.clone(),
            event_type: e.event_type.clone(),
            resource_type: e.resource_type.clone(),
            resource_id: e.resource_id.clone(),
            change_request_id: e.change_request_id.clone(),
            request_id: e.request_id.clone(),
            payload: serde_json::to_string(&e.payload)
                .map_err(|err| StoreError::Other(format!("audit payload: {err}")))?,
            prev_hash: e.prev_hash.clone(),
            hash: e.hash.clone(),
        })
    }
}

impl TryFrom<AuditRow> for AuditEvent {
    type Error = StoreError;
    fn try_from(r: AuditRow) -> Result<Self, StoreError> {
        Ok(AuditEvent {
            id: EventId::parse(&r.id).map_err(|e| corrupt("audit_events", e))?,
            seq: r.seq,
            timestamp: ts(r.timestamp),
            actor: r.actor,
            actor_id: r.actor_id,
            event_type: r.event_type,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            change_request_id: r.change_request_id,
            request_id: r.request_id,
            payload: serde_json::from_str(&r.payload).map_err(|e| corrupt("audit_events", e))?,
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}
