//! Rows as stored, and their conversion to and from the domain model.

use crate::error::corrupt;
use crate::schema::{
    agent_commands, agents, assets, audit_events, change_requests, connector_credentials,
    connectors, enrollment_tokens, jobs, refresh_tokens, sessions, users,
};
use diesel::prelude::*;
use nexplane_domain::agent::{Agent, AgentCommand, CommandStatus, EnrollmentToken};
use nexplane_domain::audit::AuditEvent;
use nexplane_domain::change_request::{Approval, Rejection, Risk, State};
use nexplane_domain::job::Progress;
use nexplane_domain::{
    AgentId, Asset, AssetId, ChangeRequest, ChangeRequestId, CommandId, Connector, ConnectorId,
    ConnectorStatus, EnrollmentTokenId, Environment, EventId, Job, JobId, JobKind, JobStatus,
    LockState, PasswordHash, RefreshTokenRecord, Role, SealedValue, Session, SessionId, Timestamp,
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

fn to_json_text(what: &str, v: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Other(format!("{what}: {e}")))
}

/// A `connectors` row. Settings are JSON text.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = connectors)]
pub(crate) struct ConnectorRow {
    pub id: String,
    pub name: String,
    pub connector_type: String,
    pub environment: String,
    pub settings: String,
    pub status: String,
    pub last_tested_at: Option<i64>,
    pub last_test_error: Option<String>,
    pub last_discovered_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl TryFrom<&Connector> for ConnectorRow {
    type Error = StoreError;
    fn try_from(c: &Connector) -> Result<Self, StoreError> {
        Ok(ConnectorRow {
            id: c.id.as_str().to_owned(),
            name: c.name.clone(),
            connector_type: c.connector_type.clone(),
            environment: c.environment.as_str().to_owned(),
            settings: to_json_text("connector settings", &c.settings)?,
            status: c.status.as_str().to_owned(),
            last_tested_at: c.last_tested_at.map(Timestamp::millis),
            last_test_error: c.last_test_error.clone(),
            last_discovered_at: c.last_discovered_at.map(Timestamp::millis),
            created_at: c.created_at.millis(),
            updated_at: c.updated_at.millis(),
        })
    }
}

impl ConnectorRow {
    /// The domain value, with the names of its stored credentials.
    pub(crate) fn into_connector(
        self,
        credential_keys: Vec<String>,
    ) -> Result<Connector, StoreError> {
        let bad = |d: String| corrupt("connectors", d);
        Ok(Connector {
            id: ConnectorId::parse(&self.id).map_err(|e| bad(e.to_string()))?,
            environment: Environment::parse(&self.environment)
                .ok_or_else(|| bad(format!("unknown environment {:?}", self.environment)))?,
            status: ConnectorStatus::parse(&self.status)
                .ok_or_else(|| bad(format!("unknown status {:?}", self.status)))?,
            settings: serde_json::from_str(&self.settings).map_err(|e| bad(e.to_string()))?,
            name: self.name,
            connector_type: self.connector_type,
            credential_keys,
            last_tested_at: self.last_tested_at.map(ts),
            last_test_error: self.last_test_error,
            last_discovered_at: self.last_discovered_at.map(ts),
            created_at: ts(self.created_at),
            updated_at: ts(self.updated_at),
        })
    }
}

/// A `connector_credentials` row: one sealed value.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = connector_credentials)]
pub(crate) struct CredentialRow {
    pub connector_id: String,
    pub name: String,
    pub sealed_value: String,
}

/// A `jobs` row. Progress and result are JSON text.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = jobs)]
pub(crate) struct JobRow {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub resource_type: String,
    pub resource_id: String,
    pub progress: String,
    pub result: String,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub attempts: i32,
}

impl TryFrom<&Job> for JobRow {
    type Error = StoreError;
    fn try_from(j: &Job) -> Result<Self, StoreError> {
        Ok(JobRow {
            id: j.id.as_str().to_owned(),
            kind: j.kind.as_str().to_owned(),
            status: j.status.as_str().to_owned(),
            resource_type: j.resource_type.clone(),
            resource_id: j.resource_id.clone(),
            progress: to_json_text("job progress", &j.progress)?,
            result: to_json_text("job result", &j.result)?,
            error: j.error.clone(),
            created_at: j.created_at.millis(),
            started_at: j.started_at.map(Timestamp::millis),
            finished_at: j.finished_at.map(Timestamp::millis),
            lease_owner: j.lease_owner.clone(),
            lease_until: j.lease_until.map(Timestamp::millis),
            attempts: i32::try_from(j.attempts).unwrap_or(i32::MAX),
        })
    }
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;
    fn try_from(r: JobRow) -> Result<Self, StoreError> {
        let bad = |d: String| corrupt("jobs", d);
        Ok(Job {
            id: JobId::parse(&r.id).map_err(|e| bad(e.to_string()))?,
            kind: JobKind::parse(&r.kind)
                .ok_or_else(|| bad(format!("unknown kind {:?}", r.kind)))?,
            status: JobStatus::parse(&r.status)
                .ok_or_else(|| bad(format!("unknown status {:?}", r.status)))?,
            progress: serde_json::from_str::<Progress>(&r.progress)
                .map_err(|e| bad(e.to_string()))?,
            result: serde_json::from_str(&r.result).map_err(|e| bad(e.to_string()))?,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            error: r.error,
            created_at: ts(r.created_at),
            started_at: r.started_at.map(ts),
            finished_at: r.finished_at.map(ts),
            lease_owner: r.lease_owner,
            lease_until: r.lease_until.map(ts),
            attempts: u32::try_from(r.attempts).unwrap_or(0),
        })
    }
}

/// An `assets` row. Attributes are JSON text.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = assets)]
pub(crate) struct AssetRow {
    pub id: String,
    pub connector_id: String,
    pub asset_type: String,
    pub external_id: String,
    pub name: String,
    pub region: Option<String>,
    pub environment: String,
    pub attributes: String,
    pub first_seen_at: i64,
    pub last_seen_at: i64,
    pub removed_at: Option<i64>,
}

impl TryFrom<&Asset> for AssetRow {
    type Error = StoreError;
    fn try_from(a: &Asset) -> Result<Self, StoreError> {
        Ok(AssetRow {
            id: a.id.as_str().to_owned(),
            connector_id: a.connector_id.as_str().to_owned(),
            asset_type: a.asset_type.clone(),
            external_id: a.external_id.clone(),
            name: a.name.clone(),
            region: a.region.clone(),
            environment: a.environment.as_str().to_owned(),
            attributes: to_json_text("asset attributes", &a.attributes)?,
            first_seen_at: a.first_seen_at.millis(),
            last_seen_at: a.last_seen_at.millis(),
            removed_at: a.removed_at.map(Timestamp::millis),
        })
    }
}

impl TryFrom<AssetRow> for Asset {
    type Error = StoreError;
    fn try_from(r: AssetRow) -> Result<Self, StoreError> {
        let bad = |d: String| corrupt("assets", d);
        Ok(Asset {
            id: AssetId::parse(&r.id).map_err(|e| bad(e.to_string()))?,
            connector_id: ConnectorId::parse(&r.connector_id).map_err(|e| bad(e.to_string()))?,
            environment: Environment::parse(&r.environment)
                .ok_or_else(|| bad(format!("unknown environment {:?}", r.environment)))?,
            attributes: serde_json::from_str(&r.attributes).map_err(|e| bad(e.to_string()))?,
            asset_type: r.asset_type,
            external_id: r.external_id,
            name: r.name,
            region: r.region,
            first_seen_at: ts(r.first_seen_at),
            last_seen_at: ts(r.last_seen_at),
            removed_at: r.removed_at.map(ts),
        })
    }
}

/// A `change_requests` row. Target, risk, approvals and rejection are JSON text.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = change_requests)]
pub(crate) struct ChangeRequestRow {
    pub id: String,
    pub title: String,
    pub description: String,
    pub connector_id: Option<String>,
    pub change_type: String,
    pub target: String,
    pub state: String,
    pub risk: String,
    pub required_approvals: i32,
    pub approvals: String,
    pub rejection: Option<String>,
    pub requested_by: String,
    pub environment: String,
    pub applied_steps: i32,
    pub created_at: i64,
    pub updated_at: i64,
    pub submitted_at: Option<i64>,
    pub decided_at: Option<i64>,
    pub executed_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl TryFrom<&ChangeRequest> for ChangeRequestRow {
    type Error = StoreError;
    fn try_from(c: &ChangeRequest) -> Result<Self, StoreError> {
        Ok(ChangeRequestRow {
            id: c.id.as_str().to_owned(),
            title: c.title.clone(),
            description: c.description.clone(),
            connector_id: c.connector_id.as_ref().map(|i| i.as_str().to_owned()),
            change_type: c.change_type.clone(),
            target: to_json_text("change request target", &c.target)?,
            state: c.state.as_str().to_owned(),
            risk: to_json_text("change request risk", &c.risk)?,
            required_approvals: i32::try_from(c.required_approvals).unwrap_or(i32::MAX),
            approvals: to_json_text("change request approvals", &c.approvals)?,
            rejection: c
                .rejection
                .as_ref()
                .map(|r| to_json_text("change request rejection", r))
                .transpose()?,
            requested_by: c.requested_by.as_str().to_owned(),
            environment: c.environment.as_str().to_owned(),
            applied_steps: i32::try_from(c.applied_steps).unwrap_or(i32::MAX),
            created_at: c.created_at.millis(),
            updated_at: c.updated_at.millis(),
            submitted_at: c.submitted_at.map(Timestamp::millis),
            decided_at: c.decided_at.map(Timestamp::millis),
            executed_at: c.executed_at.map(Timestamp::millis),
            finished_at: c.finished_at.map(Timestamp::millis),
        })
    }
}

impl TryFrom<ChangeRequestRow> for ChangeRequest {
    type Error = StoreError;
    fn try_from(r: ChangeRequestRow) -> Result<Self, StoreError> {
        let bad = |d: String| corrupt("change_requests", d);
        Ok(ChangeRequest {
            id: ChangeRequestId::parse(&r.id).map_err(|e| bad(e.to_string()))?,
            connector_id: r
                .connector_id
                .as_deref()
                .map(ConnectorId::parse)
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            requested_by: UserId::parse(&r.requested_by).map_err(|e| bad(e.to_string()))?,
            state: State::parse(&r.state)
                .ok_or_else(|| bad(format!("unknown state {:?}", r.state)))?,
            environment: Environment::parse(&r.environment)
                .ok_or_else(|| bad(format!("unknown environment {:?}", r.environment)))?,
            target: serde_json::from_str(&r.target).map_err(|e| bad(e.to_string()))?,
            risk: serde_json::from_str::<Risk>(&r.risk).map_err(|e| bad(e.to_string()))?,
            approvals: serde_json::from_str::<Vec<Approval>>(&r.approvals)
                .map_err(|e| bad(e.to_string()))?,
            rejection: r
                .rejection
                .as_deref()
                .map(serde_json::from_str::<Rejection>)
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            required_approvals: u32::try_from(r.required_approvals).unwrap_or(1),
            applied_steps: u32::try_from(r.applied_steps).unwrap_or(0),
            title: r.title,
            description: r.description,
            change_type: r.change_type,
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
            submitted_at: r.submitted_at.map(ts),
            decided_at: r.decided_at.map(ts),
            executed_at: r.executed_at.map(ts),
            finished_at: r.finished_at.map(ts),
        })
    }
}

/// A count stored as `INTEGER`: out-of-range values are refused, not truncated.
fn count_to_db(what: &str, n: u32) -> Result<i32, StoreError> {
    i32::try_from(n).map_err(|_| StoreError::Other(format!("{what} {n} is out of range")))
}

/// A count read back: a negative value is a corrupt row.
fn count_from_db(table: &str, column: &str, n: i32) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| corrupt(table, format!("negative {column} {n}")))
}

/// An `enrollment_tokens` row (the token itself is never stored, only its SHA-256).
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = enrollment_tokens)]
pub(crate) struct EnrollmentTokenRow {
    pub id: String,
    pub name: Option<String>,
    pub token_hash: String,
    pub expires_at: i64,
    pub max_uses: i32,
    pub uses: i32,
    pub created_by: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl TryFrom<&EnrollmentToken> for EnrollmentTokenRow {
    type Error = StoreError;
    fn try_from(t: &EnrollmentToken) -> Result<Self, StoreError> {
        Ok(EnrollmentTokenRow {
            id: t.id.as_str().to_owned(),
            name: t.name.clone(),
            token_hash: t.token_hash.clone(),
            expires_at: t.expires_at.millis(),
            max_uses: count_to_db("enrollment token max_uses", t.max_uses)?,
            uses: count_to_db("enrollment token uses", t.uses)?,
            created_by: t.created_by.as_str().to_owned(),
            created_at: t.created_at.millis(),
            revoked_at: t.revoked_at.map(Timestamp::millis),
        })
    }
}

impl TryFrom<EnrollmentTokenRow> for EnrollmentToken {
    type Error = StoreError;
    fn try_from(r: EnrollmentTokenRow) -> Result<Self, StoreError> {
        const T: &str = "enrollment_tokens";
        Ok(EnrollmentToken {
            id: EnrollmentTokenId::parse(&r.id).map_err(|e| corrupt(T, e))?,
            created_by: UserId::parse(&r.created_by).map_err(|e| corrupt(T, e))?,
            max_uses: count_from_db(T, "max_uses", r.max_uses)?,
            uses: count_from_db(T, "uses", r.uses)?,
            name: r.name,
            token_hash: r.token_hash,
            expires_at: ts(r.expires_at),
            created_at: ts(r.created_at),
            revoked_at: r.revoked_at.map(ts),
        })
    }
}

/// An `agents` row. Labels are JSON text; the secret is sealed.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = agents)]
pub(crate) struct AgentRow {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub version: String,
    pub labels: String,
    pub sealed_secret: String,
    pub enrollment_token_id: String,
    pub registered_at: i64,
    pub last_heartbeat_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl TryFrom<&Agent> for AgentRow {
    type Error = StoreError;
    fn try_from(a: &Agent) -> Result<Self, StoreError> {
        Ok(AgentRow {
            id: a.id.as_str().to_owned(),
            name: a.name.clone(),
            hostname: a.hostname.clone(),
            os: a.os.clone(),
            arch: a.arch.clone(),
            version: a.version.clone(),
            labels: to_json_text("agent labels", &a.labels)?,
            sealed_secret: a.sealed_secret.as_str().to_owned(),
            enrollment_token_id: a.enrollment_token_id.as_str().to_owned(),
            registered_at: a.registered_at.millis(),
            last_heartbeat_at: a.last_heartbeat_at.map(Timestamp::millis),
            revoked_at: a.revoked_at.map(Timestamp::millis),
        })
    }
}

impl TryFrom<AgentRow> for Agent {
    type Error = StoreError;
    fn try_from(r: AgentRow) -> Result<Self, StoreError> {
        const T: &str = "agents";
        Ok(Agent {
            id: AgentId::parse(&r.id).map_err(|e| corrupt(T, e))?,
            enrollment_token_id: EnrollmentTokenId::parse(&r.enrollment_token_id)
                .map_err(|e| corrupt(T, e))?,
            labels: serde_json::from_str(&r.labels).map_err(|e| corrupt(T, e))?,
            sealed_secret: SealedValue::new(r.sealed_secret),
            name: r.name,
            hostname: r.hostname,
            os: r.os,
            arch: r.arch,
            version: r.version,
            registered_at: ts(r.registered_at),
            last_heartbeat_at: r.last_heartbeat_at.map(ts),
            revoked_at: r.revoked_at.map(ts),
        })
    }
}

/// An `agent_commands` row. Params and output are JSON text; the snapshot is sealed.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = agent_commands)]
pub(crate) struct CommandRow {
    pub id: String,
    pub agent_id: String,
    pub change_request_id: Option<String>,
    pub job_id: Option<String>,
    pub step: String,
    pub command_type: String,
    pub params: String,
    pub status: String,
    pub output: Option<String>,
    pub sealed_snapshot: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub dispatched_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl TryFrom<&AgentCommand> for CommandRow {
    type Error = StoreError;
    fn try_from(c: &AgentCommand) -> Result<Self, StoreError> {
        Ok(CommandRow {
            id: c.id.as_str().to_owned(),
            agent_id: c.agent_id.as_str().to_owned(),
            change_request_id: c.change_request_id.as_ref().map(|i| i.as_str().to_owned()),
            job_id: c.job_id.as_ref().map(|i| i.as_str().to_owned()),
            step: c.step.clone(),
            command_type: c.command_type.clone(),
            params: to_json_text("command params", &c.params)?,
            status: c.status.as_str().to_owned(),
            output: c
                .output
                .as_ref()
                .map(|o| to_json_text("command output", o))
                .transpose()?,
            sealed_snapshot: c.sealed_snapshot.as_ref().map(|s| s.as_str().to_owned()),
            error: c.error.clone(),
            created_at: c.created_at.millis(),
            dispatched_at: c.dispatched_at.map(Timestamp::millis),
            finished_at: c.finished_at.map(Timestamp::millis),
        })
    }
}

impl TryFrom<CommandRow> for AgentCommand {
    type Error = StoreError;
    fn try_from(r: CommandRow) -> Result<Self, StoreError> {
        const T: &str = "agent_commands";
        Ok(AgentCommand {
            id: CommandId::parse(&r.id).map_err(|e| corrupt(T, e))?,
            agent_id: AgentId::parse(&r.agent_id).map_err(|e| corrupt(T, e))?,
            change_request_id: r
                .change_request_id
                .as_deref()
                .map(ChangeRequestId::parse)
                .transpose()
                .map_err(|e| corrupt(T, e))?,
            job_id: r
                .job_id
                .as_deref()
                .map(JobId::parse)
                .transpose()
                .map_err(|e| corrupt(T, e))?,
            status: CommandStatus::parse(&r.status)
                .ok_or_else(|| corrupt(T, format!("unknown status {:?}", r.status)))?,
            params: serde_json::from_str(&r.params).map_err(|e| corrupt(T, e))?,
            output: r
                .output
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| corrupt(T, e))?,
            sealed_snapshot: r.sealed_snapshot.map(SealedValue::new),
            step: r.step,
            command_type: r.command_type,
            error: r.error,
            created_at: ts(r.created_at),
            dispatched_at: r.dispatched_at.map(ts),
            finished_at: r.finished_at.map(ts),
        })
    }
}
