//! Request and response bodies, as documented in the OpenAPI schema.

use nexplane_app::execution::ChangeRequestView;
use nexplane_domain::audit::AuditEvent;
use nexplane_domain::execution::Journal;
use nexplane_domain::{Asset, ChangeRequest, ChangeType, Connector, Job, User};
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

/// A connector (api.md §4). Credential values are write-only: only their names are shown.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct ConnectorDto {
    /// `conn_…`
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Connector type: `aws`.
    #[serde(rename = "type")]
    pub connector_type: String,
    /// `production`, `staging` or `development`; feeds the risk score of change requests.
    pub environment: String,
    /// Non-secret settings. For `aws`: `region`, `regions` (discovered regions),
    /// `endpoint_url`, `assume_role_arn`, `external_id`.
    pub settings: serde_json::Value,
    /// Names of the stored credentials (never their values).
    pub credential_keys: Vec<String>,
    /// `untested`, `ok` or `error` (the last test's result).
    pub status: String,
    /// When it was last tested (RFC 3339).
    pub last_tested_at: Option<String>,
    /// Why the last test failed.
    pub last_test_error: Option<String>,
    /// When a discovery of it last finished (RFC 3339).
    pub last_discovered_at: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last changed (RFC 3339).
    pub updated_at: String,
}

impl From<&Connector> for ConnectorDto {
    fn from(c: &Connector) -> Self {
        Self {
            id: c.id.to_string(),
            name: c.name.clone(),
            connector_type: c.connector_type.clone(),
            environment: c.environment.as_str().to_owned(),
            settings: c.settings.clone(),
            credential_keys: c.credential_keys.clone(),
            status: c.status.as_str().to_owned(),
            last_tested_at: c.last_tested_at.map(|t| t.to_rfc3339()),
            last_test_error: c.last_test_error.clone(),
            last_discovered_at: c.last_discovered_at.map(|t| t.to_rfc3339()),
            created_at: c.created_at.to_rfc3339(),
            updated_at: c.updated_at.to_rfc3339(),
        }
    }
}

/// `POST /connectors` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateConnectorRequest {
    /// Unique name, 1 to 100 characters.
    pub name: String,
    /// Connector type: `aws`.
    #[serde(rename = "type")]
    pub connector_type: String,
    /// `production` (default), `staging` or `development`.
    pub environment: Option<String>,
    /// Settings. For `aws`: `region` (default `us-east-1`), `regions` (default `[region]`),
    /// `endpoint_url` (an AWS-compatible endpoint such as a local emulator), `assume_role_arn`,
    /// `external_id`. Unknown keys are refused.
    pub settings: Option<serde_json::Value>,
    /// Write-only credentials, an object of strings, sealed at rest and never returned. For
    /// `aws`: `aws_access_key_id` and `aws_secret_access_key` (required), `aws_session_token`
    /// (optional); a `region` here moves into the settings.
    pub credentials: Option<serde_json::Value>,
}

/// `PUT /connectors/{id}` body. `name`, `environment` and `settings` replace the stored ones
/// (absent `environment` means `production`, absent `settings` the defaults); `credentials`,
/// when present, replace the whole stored set, and when absent the stored set stays. `type`
/// may be sent but cannot change.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateConnectorRequest {
    /// Unique name.
    pub name: String,
    /// The connector's type (cannot change).
    #[serde(rename = "type")]
    pub connector_type: Option<String>,
    /// `production` (default), `staging` or `development`.
    pub environment: Option<String>,
    /// Settings (see `POST /connectors`).
    pub settings: Option<serde_json::Value>,
    /// Write-only credentials (see `POST /connectors`).
    pub credentials: Option<serde_json::Value>,
}

/// Who the tested credentials are.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct IdentityDto {
    /// Account id.
    pub account_id: String,
    /// ARN of the caller.
    pub arn: String,
}

/// `POST /connectors/{id}/test` answer: `{ok:true, latency_ms, identity}` or
/// `{ok:false, error}` (the provider's message; never a credential value).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct ConnectorTestResponse {
    /// Whether the credentials work.
    pub ok: bool,
    /// Duration of the provider call in milliseconds (when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Who the credentials are (when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityDto>,
    /// Why the test failed (when not ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How far a job has got.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct ProgressDto {
    /// What it is doing, e.g. `iam_user`.
    pub phase: String,
    /// Units done.
    pub done: u64,
    /// Units in total, when known.
    pub total: Option<u64>,
}

/// A background job (api.md §8).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct JobDto {
    /// `job_…`
    pub id: String,
    /// `discovery`, `execution` or `rollback`.
    pub kind: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    /// What it works on, e.g. `connector`.
    pub resource_type: String,
    /// That resource's id.
    pub resource_id: String,
    /// Progress.
    pub progress: ProgressDto,
    /// Result. Discovery: `{assets_created, assets_updated, assets_removed, by_type: {type:
    /// count}, partial_errors: [{asset_type, region, message}]}`.
    pub result: serde_json::Value,
    /// Why it failed. A discovery that could not list everything succeeds with what it found
    /// and names the failed parts here.
    pub error: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// First picked up by a worker.
    pub started_at: Option<String>,
    /// Finished.
    pub finished_at: Option<String>,
}

impl From<&Job> for JobDto {
    fn from(j: &Job) -> Self {
        Self {
            id: j.id.to_string(),
            kind: j.kind.as_str().to_owned(),
            status: j.status.as_str().to_owned(),
            resource_type: j.resource_type.clone(),
            resource_id: j.resource_id.clone(),
            progress: ProgressDto {
                phase: j.progress.phase.clone(),
                done: j.progress.done,
                total: j.progress.total,
            },
            result: j.result.clone(),
            error: j.error.clone(),
            created_at: j.created_at.to_rfc3339(),
            started_at: j.started_at.map(|t| t.to_rfc3339()),
            finished_at: j.finished_at.map(|t| t.to_rfc3339()),
        }
    }
}

/// A discovered asset (api.md §5).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct AssetDto {
    /// `ast_…`
    pub id: String,
    /// The connector that found it.
    pub connector_id: String,
    /// `iam_user`, `iam_role`, `ec2_instance`, `ec2_security_group` or `s3_bucket`.
    #[serde(rename = "type")]
    pub asset_type: String,
    /// The provider's stable id (ARN, instance id, …).
    pub external_id: String,
    /// Display name.
    pub name: String,
    /// Region, for regional resources.
    pub region: Option<String>,
    /// The connector's environment.
    pub environment: String,
    /// Type-specific attributes.
    pub attributes: serde_json::Value,
    /// First discovered (RFC 3339).
    pub first_seen_at: String,
    /// Last discovered (RFC 3339).
    pub last_seen_at: String,
    /// When a complete discovery no longer found it.
    pub removed_at: Option<String>,
}

impl From<&Asset> for AssetDto {
    fn from(a: &Asset) -> Self {
        Self {
            id: a.id.to_string(),
            connector_id: a.connector_id.to_string(),
            asset_type: a.asset_type.clone(),
            external_id: a.external_id.clone(),
            name: a.name.clone(),
            region: a.region.clone(),
            environment: a.environment.as_str().to_owned(),
            attributes: a.attributes.clone(),
            first_seen_at: a.first_seen_at.to_rfc3339(),
            last_seen_at: a.last_seen_at.to_rfc3339(),
            removed_at: a.removed_at.map(|t| t.to_rfc3339()),
        }
    }
}

/// Filters and paging of `GET /assets`.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AssetQuery {
    /// Assets of this connector.
    pub connector_id: Option<String>,
    /// Assets of this type, e.g. `iam_user`, `ec2_instance`.
    #[serde(rename = "type")]
    pub asset_type: Option<String>,
    /// Case-insensitive substring of the name or the external id (at most 200 characters).
    pub q: Option<String>,
    /// Also list assets a discovery no longer found (default false).
    pub include_removed: Option<bool>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    /// Opaque cursor from the previous page.
    pub cursor: Option<String>,
}

/// A change type of the catalog (api.md §6.3, §7.3).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct ChangeTypeDto {
    /// Unique name, e.g. `rotate_iam_access_key`.
    pub name: String,
    /// What it acts on: `aws` (a connector) or `agent` (the target names an agent).
    pub connector_type: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of the change request's `target`.
    pub target_schema: serde_json::Value,
    /// Base risk, 1 to 10, before the environment and rollback factors.
    pub base_risk: u32,
    /// `automatic` or `none`.
    pub rollback: String,
}

impl From<&ChangeType> for ChangeTypeDto {
    fn from(ct: &ChangeType) -> Self {
        Self {
            name: ct.name.clone(),
            connector_type: ct.connector_type.as_str().to_owned(),
            description: ct.description.clone(),
            target_schema: ct.target_schema.clone(),
            base_risk: u32::from(ct.base_risk),
            rollback: if ct.has_rollback() {
                "automatic"
            } else {
                "none"
            }
            .to_owned(),
        }
    }
}

/// The risk of a change request.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct RiskDto {
    /// 1 to 10: the change type's base risk, +2 production / +1 staging, +2 without rollback.
    pub score: u32,
    /// `low` (1–3), `medium` (4–6), `high` (7–9) or `critical` (10).
    pub level: String,
    /// One line per contribution to the score.
    pub factors: Vec<String>,
}

/// One approval.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct ApprovalDto {
    /// Who approved.
    pub user_id: String,
    /// Their email.
    pub actor: String,
    /// When (RFC 3339).
    pub at: String,
    /// Optional comment.
    pub comment: Option<String>,
    /// The requester approved their own change (only with `NEXPLANE_ALLOW_SELF_APPROVAL`).
    pub self_approved: bool,
}

/// The rejection of a change request.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct RejectionDto {
    /// Who rejected.
    pub user_id: String,
    /// Their email.
    pub actor: String,
    /// When (RFC 3339).
    pub at: String,
    /// Why.
    pub reason: String,
}

/// A change request (api.md §6).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct ChangeRequestDto {
    /// `cr_…`
    pub id: String,
    /// Short title.
    pub title: String,
    /// Longer description (may be empty).
    pub description: String,
    /// The connector it acts through (`null` for agent change types).
    pub connector_id: Option<String>,
    /// Name of the change type (`GET /change-types`).
    pub change_type: String,
    /// What it acts on, valid against the change type's `target_schema`.
    pub target: serde_json::Value,
    /// `draft`, `submitted`, `approved`, `rejected`, `cancelled`, `executing`, `complete`,
    /// `failed`, `rolling_back`, `rolledback` or `rollback_failed`.
    pub state: String,
    /// The connector environment the risk was computed with.
    pub environment: String,
    /// Risk, computed at create and on every edit.
    pub risk: RiskDto,
    /// Approvals needed to reach `approved` (low 1, medium 1, high 2, critical 2).
    pub required_approvals: u32,
    /// Approvals so far, one per person, in order.
    pub approvals: Vec<ApprovalDto>,
    /// Set when rejected.
    pub rejection: Option<RejectionDto>,
    /// The user who created it.
    pub requested_by: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last changed (RFC 3339).
    pub updated_at: String,
    /// Submitted for approval.
    pub submitted_at: Option<String>,
    /// Approved or rejected.
    pub decided_at: Option<String>,
    /// Execution started.
    pub executed_at: Option<String>,
    /// The last execution or rollback finished.
    pub finished_at: Option<String>,
    /// The execution journal (`null` until executed).
    pub execution: Option<JournalDto>,
    /// The rollback journal (`null` until rolled back; a retried rollback keeps the undo
    /// steps that had succeeded).
    pub rollback: Option<JournalDto>,
    /// Names of the secrets the change produced (never their values), e.g.
    /// `["new_secret_access_key"]`. `POST /change-requests/{id}/reveal-secrets` returns the
    /// values once.
    pub secret_outputs: Vec<String>,
    /// When the secret outputs were revealed (and destroyed); `null` before.
    pub secrets_revealed_at: Option<String>,
}

/// An execution or rollback journal (api.md §6): written before and after every provider
/// call, so it shows exactly which steps were made.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct JournalDto {
    /// The job running it (`GET /jobs/{id}`).
    pub job_id: String,
    /// The steps in the order they run (a rollback undoes the started execution steps in
    /// reverse).
    pub steps: Vec<StepDto>,
    /// Non-secret results, e.g. `new_access_key_id`, `old_access_key_id`.
    pub outputs: serde_json::Value,
    /// Why it failed (`precheck failed: …` when nothing was applied).
    pub error: Option<String>,
}

/// One step of a journal.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct StepDto {
    /// Step name, e.g. `create_access_key`.
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed` or `skipped` (not run after a failed
    /// precheck or step).
    pub status: String,
    /// When it (last) started.
    pub started_at: Option<String>,
    /// When it ended.
    pub finished_at: Option<String>,
    /// What it did, or why it failed.
    pub detail: Option<String>,
    /// How many times it was started: more than 1 when a crash or restart interrupted it and
    /// the resumed job reconciled it with the provider.
    pub attempts: u32,
}

impl From<&Journal> for JournalDto {
    fn from(j: &Journal) -> Self {
        Self {
            job_id: j.job_id.to_string(),
            steps: j
                .steps
                .iter()
                .map(|s| StepDto {
                    name: s.name.clone(),
                    status: serde_json::to_value(s.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    started_at: s.started_at.map(|t| t.to_rfc3339()),
                    finished_at: s.finished_at.map(|t| t.to_rfc3339()),
                    detail: s.detail.clone(),
                    attempts: s.attempts,
                })
                .collect(),
            outputs: serde_json::Value::Object(j.outputs.clone()),
            error: j.error.clone(),
        }
    }
}

impl From<&ChangeRequestView> for ChangeRequestDto {
    fn from(v: &ChangeRequestView) -> Self {
        let mut dto = ChangeRequestDto::from(&v.change_request);
        dto.execution = v.execution.as_ref().map(JournalDto::from);
        dto.rollback = v.rollback.as_ref().map(JournalDto::from);
        if let Some(e) = &v.execution {
            dto.secret_outputs = e.secret_outputs.clone();
            dto.secrets_revealed_at = e.secrets_revealed_at.map(|t| t.to_rfc3339());
        }
        dto
    }
}

impl From<&ChangeRequest> for ChangeRequestDto {
    fn from(c: &ChangeRequest) -> Self {
        Self {
            id: c.id.to_string(),
            title: c.title.clone(),
            description: c.description.clone(),
            connector_id: c.connector_id.as_ref().map(ToString::to_string),
            change_type: c.change_type.clone(),
            target: c.target.clone(),
            state: c.state.as_str().to_owned(),
            environment: c.environment.as_str().to_owned(),
            risk: RiskDto {
                score: u32::from(c.risk.score),
                level: c.risk.level.as_str().to_owned(),
                factors: c.risk.factors.clone(),
            },
            required_approvals: c.required_approvals,
            approvals: c
                .approvals
                .iter()
                .map(|a| ApprovalDto {
                    user_id: a.user_id.to_string(),
                    actor: a.actor.clone(),
                    at: a.at.to_rfc3339(),
                    comment: a.comment.clone(),
                    self_approved: a.self_approved,
                })
                .collect(),
            rejection: c.rejection.as_ref().map(|r| RejectionDto {
                user_id: r.user_id.to_string(),
                actor: r.actor.clone(),
                at: r.at.to_rfc3339(),
                reason: r.reason.clone(),
            }),
            requested_by: c.requested_by.to_string(),
            created_at: c.created_at.to_rfc3339(),
            updated_at: c.updated_at.to_rfc3339(),
            submitted_at: c.submitted_at.map(|t| t.to_rfc3339()),
            decided_at: c.decided_at.map(|t| t.to_rfc3339()),
            executed_at: c.executed_at.map(|t| t.to_rfc3339()),
            finished_at: c.finished_at.map(|t| t.to_rfc3339()),
            execution: None,
            rollback: None,
            secret_outputs: Vec::new(),
            secrets_revealed_at: None,
        }
    }
}

/// `POST /change-requests` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateChangeRequestRequest {
    /// Title, 1 to 200 characters.
    pub title: String,
    /// Description, up to 10 000 characters.
    pub description: Option<String>,
    /// The connector (required for `aws` change types; its type must match the change
    /// type's `connector_type`; omit it for agent change types).
    pub connector_id: Option<String>,
    /// A change type of `GET /change-types`.
    pub change_type: String,
    /// What to change; validated against the change type's `target_schema` (errors name
    /// fields such as `target.iam_user`).
    pub target: Option<serde_json::Value>,
}

/// `PUT /change-requests/{id}` body (a draft only): each present field replaces the stored
/// one; the risk is recomputed.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateChangeRequestRequest {
    /// New title.
    pub title: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New target.
    pub target: Option<serde_json::Value>,
}

/// `POST /change-requests/{id}/approve` body (optional).
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApproveRequest {
    /// Optional comment, up to 2000 characters.
    pub comment: Option<String>,
}

/// `POST /change-requests/{id}/reject` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RejectRequest {
    /// Why (required, up to 2000 characters).
    pub reason: Option<String>,
}

/// Filters and paging of `GET /change-requests`.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeRequestQueryDto {
    /// Change requests in this state, e.g. `submitted`.
    pub state: Option<String>,
    /// Change requests on this connector.
    pub connector_id: Option<String>,
    /// Change requests of this change type.
    pub change_type: Option<String>,
    /// Change requests created by this user (`usr_…`).
    pub requested_by: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    /// Opaque cursor from the previous page.
    pub cursor: Option<String>,
}
