//! Change requests: the model, the risk score, and the state machine of api.md §6.1 as pure
//! functions.
//!
//! [`create`] makes a `draft`; [`apply`] performs one [`Action`] on a change request and returns
//! the new value together with the audit events to write in the same database transaction.
//! Every rule — who may act (roles and "requester or admin" ownership), from which state,
//! separation of duties, approval counting, rollback availability — is decided here. Neither
//! function reads a clock, a database or a random source: `now` and ids are arguments, and the
//! input value is never modified (a refused action returns `Err` and nothing else happens).
//!
//! | from | action | to | who |
//! |---|---|---|---|
//! | — | [`create`] | `draft` | operator, admin |
//! | `draft` | [`Action::Edit`] | `draft` | requester, admin |
//! | `draft` | [`Action::Submit`] | `submitted` | requester, admin |
//! | `submitted` | [`Action::Approve`] | `submitted`, or `approved` at `required_approvals` | approver, admin; not the requester; once per person |
//! | `submitted` | [`Action::Reject`] | `rejected` | approver, admin |
//! | `draft`, `submitted`, `approved` | [`Action::Cancel`] | `cancelled` | requester, admin |
//! | `approved` | [`Action::Execute`] | `executing` | operator, admin |
//! | `executing` | [`Action::ExecutionFinished`] | `complete` or `failed` | the server ([`Actor::System`]) |
//! | `complete`, `failed` (a step was applied), `rollback_failed` | [`Action::Rollback`] | `rolling_back` | operator, admin |
//! | `rolling_back` | [`Action::RollbackFinished`] | `rolledback` or `rollback_failed` | the server ([`Actor::System`]) |
//!
//! Checks run in this order, so the error is predictable: the state (→
//! [`DomainError::InvalidTransition`]), the actor (→ [`DomainError::Forbidden`] /
//! [`DomainError::SelfApproval`]), then the rules of the action (→
//! [`DomainError::AlreadyApproved`], [`DomainError::RollbackUnsupported`],
//! [`DomainError::Validation`]). In a final state (`rejected`, `cancelled`, `rolledback`)
//! every action is an invalid transition, whoever asks.
//!
//! Change types are looked up in the built-in catalog
//! ([`crate::change_type::find_builtin`]).

use crate::audit::{NewAuditEvent, SYSTEM_ACTOR};
use crate::auth::Principal;
use crate::change_type::{find_builtin, ChangeType, ConnectorType};
use crate::{
    ChangeRequestId, ConnectorId, EventId, FieldError, Permission, Role, Timestamp, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt;

/// Longest title, in characters.
pub const TITLE_MAX_CHARS: usize = 200;
/// Longest description, in characters.
pub const DESCRIPTION_MAX_CHARS: usize = 10_000;
/// Longest approval comment or rejection reason, in characters.
pub const COMMENT_MAX_CHARS: usize = 2_000;
/// The `resource_type` of change-request audit events.
pub const RESOURCE_TYPE: &str = "change_request";
/// Target fields that may hold secrets and are left out of audit payloads.
pub const REDACTED_TARGET_FIELDS: &[&str] = &["content"];

// ---------------------------------------------------------------------------------------------
// States and actions

/// The state of a change request (api.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Being written; editable.
    Draft,
    /// Waiting for approvals.
    Submitted,
    /// Approved; may be executed.
    Approved,
    /// Rejected by an approver (final).
    Rejected,
    /// Cancelled by the requester or an admin (final).
    Cancelled,
    /// The execution job is running.
    Executing,
    /// Executed successfully.
    Complete,
    /// Execution failed (possibly after applying some steps).
    Failed,
    /// The rollback job is running.
    RollingBack,
    /// Rolled back (final).
    Rolledback,
    /// Rollback failed; it may be retried.
    RollbackFailed,
}

impl State {
    /// All states, in the order of api.md §6.1.
    pub const ALL: [State; 11] = [
        State::Draft,
        State::Submitted,
        State::Approved,
        State::Rejected,
        State::Cancelled,
        State::Executing,
        State::Complete,
        State::Failed,
        State::RollingBack,
        State::Rolledback,
        State::RollbackFailed,
    ];

    /// The state's name as used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Draft => "draft",
            State::Submitted => "submitted",
            State::Approved => "approved",
            State::Rejected => "rejected",
            State::Cancelled => "cancelled",
            State::Executing => "executing",
            State::Complete => "complete",
            State::Failed => "failed",
            State::RollingBack => "rolling_back",
            State::Rolledback => "rolledback",
            State::RollbackFailed => "rollback_failed",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<State> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether no action leaves this state (`rejected`, `cancelled`, `rolledback`).
    pub fn is_final(self) -> bool {
        matches!(self, State::Rejected | State::Cancelled | State::Rolledback)
    }

    /// Whether a job (execution or rollback) is running in this state.
    pub fn is_running(self) -> bool {
        matches!(self, State::Executing | State::RollingBack)
    }

    /// Whether the change request still holds its connector "in use" (api.md §4: a connector
    /// cannot be deleted while one of its change requests is `submitted`, `approved`,
    /// `executing` or `rolling_back`).
    pub fn blocks_connector_delete(self) -> bool {
        matches!(
            self,
            State::Submitted | State::Approved | State::Executing | State::RollingBack
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something done to a change request. See the module docs for who may do what, when.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Change fields of a draft (`PUT /change-requests/{id}`); `None` keeps a field.
    Edit {
        /// New title.
        title: Option<String>,
        /// New description.
        description: Option<String>,
        /// New target (validated against the change type's schema).
        target: Option<Value>,
        /// The connector's current environment, when the caller knows it; the risk is
        /// recomputed with it (otherwise with the stored one).
        environment: Option<Environment>,
    },
    /// Send the draft for approval.
    Submit,
    /// Approve (once per person).
    Approve {
        /// Optional comment.
        comment: Option<String>,
    },
    /// Reject, with a reason.
    Reject {
        /// Why; must not be blank.
        reason: String,
    },
    /// Cancel a change request that has not started executing.
    Cancel,
    /// Start the execution job.
    Execute,
    /// The execution job ended (reported by the server, [`Actor::System`]).
    ExecutionFinished {
        /// Whether every step succeeded.
        success: bool,
        /// How many steps changed something in the world (rollback needs at least one).
        applied_steps: u32,
    },
    /// Start the rollback job.
    Rollback,
    /// The rollback job ended (reported by the server, [`Actor::System`]).
    RollbackFinished {
        /// Whether every applied step was undone.
        success: bool,
    },
}

impl Action {
    /// The kind of the action, without its data.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Edit { .. } => ActionKind::Edit,
            Action::Submit => ActionKind::Submit,
            Action::Approve { .. } => ActionKind::Approve,
            Action::Reject { .. } => ActionKind::Reject,
            Action::Cancel => ActionKind::Cancel,
            Action::Execute => ActionKind::Execute,
            Action::ExecutionFinished { .. } => ActionKind::ExecutionFinished,
            Action::Rollback => ActionKind::Rollback,
            Action::RollbackFinished { .. } => ActionKind::RollbackFinished,
        }
    }
}

/// The kind of an [`Action`], as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// [`create`] (not an [`Action`]: it starts from no change request at all).
    Create,
    /// [`Action::Edit`].
    Edit,
    /// [`Action::Submit`].
    Submit,
    /// [`Action::Approve`].
    Approve,
    /// [`Action::Reject`].
    Reject,
    /// [`Action::Cancel`].
    Cancel,
    /// [`Action::Execute`].
    Execute,
    /// [`Action::ExecutionFinished`].
    ExecutionFinished,
    /// [`Action::Rollback`].
    Rollback,
    /// [`Action::RollbackFinished`].
    RollbackFinished,
}

impl ActionKind {
    /// All action kinds.
    pub const ALL: [ActionKind; 10] = [
        ActionKind::Create,
        ActionKind::Edit,
        ActionKind::Submit,
        ActionKind::Approve,
        ActionKind::Reject,
        ActionKind::Cancel,
        ActionKind::Execute,
        ActionKind::ExecutionFinished,
        ActionKind::Rollback,
        ActionKind::RollbackFinished,
    ];

    /// The action's name: `create`, `edit`, `submit`, `approve`, `reject`, `cancel`, `execute`,
    /// `execution_finished`, `rollback`, `rollback_finished`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Create => "create",
            ActionKind::Edit => "edit",
            ActionKind::Submit => "submit",
            ActionKind::Approve => "approve",
            ActionKind::Reject => "reject",
            ActionKind::Cancel => "cancel",
            ActionKind::Execute => "execute",
            ActionKind::ExecutionFinished => "execution_finished",
            ActionKind::Rollback => "rollback",
            ActionKind::RollbackFinished => "rollback_finished",
        }
    }

    /// The states this kind of action may start from (before any other rule is checked).
    /// [`ActionKind::Rollback`] from `complete` or `failed` additionally needs an applied step;
    /// [`ActionKind::Create`] starts from no state.
    pub fn from_states(self) -> &'static [State] {
        match self {
            ActionKind::Create => &[],
            ActionKind::Edit | ActionKind::Submit => &[State::Draft],
            ActionKind::Approve | ActionKind::Reject => &[State::Submitted],
            ActionKind::Cancel => &[State::Draft, State::Submitted, State::Approved],
            ActionKind::Execute => &[State::Approved],
            ActionKind::ExecutionFinished => &[State::Executing],
            ActionKind::Rollback => &[State::Complete, State::Failed, State::RollbackFailed],
            ActionKind::RollbackFinished => &[State::RollingBack],
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Actors and policy

/// Who performs an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A signed-in user.
    User {
        /// The user's id.
        user_id: UserId,
        /// The user's email (the audit `actor`).
        email: String,
        /// The user's current role.
        role: Role,
    },
    /// The server itself: job workers reporting the end of an execution or rollback. It may
    /// do nothing else, and users may not report job results.
    System,
}

impl Actor {
    /// A user actor.
    pub fn user(user_id: UserId, email: impl Into<String>, role: Role) -> Actor {
        Actor::User {
            user_id,
            email: email.into(),
            role,
        }
    }

    /// The user's id (`None` for [`Actor::System`]).
    pub fn user_id(&self) -> Option<&UserId> {
        match self {
            Actor::User { user_id, .. } => Some(user_id),
            Actor::System => None,
        }
    }

    /// The name written to the audit log: the user's email, or `system`.
    pub fn audit_name(&self) -> &str {
        match self {
            Actor::User { email, .. } => email,
            Actor::System => SYSTEM_ACTOR,
        }
    }

    fn role(&self) -> Option<Role> {
        match self {
            Actor::User { role, .. } => Some(*role),
            Actor::System => None,
        }
    }
}

impl From<&Principal> for Actor {
    fn from(p: &Principal) -> Actor {
        Actor::user(p.user_id.clone(), p.email.clone(), p.role)
    }
}

/// How many approvals each risk level needs (api.md §6: low 1, medium 1, high 2, critical 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequiredApprovals {
    /// For [`RiskLevel::Low`].
    pub low: u32,
    /// For [`RiskLevel::Medium`].
    pub medium: u32,
    /// For [`RiskLevel::High`].
    pub high: u32,
    /// For [`RiskLevel::Critical`].
    pub critical: u32,
}

impl Default for RequiredApprovals {
    fn default() -> Self {
        Self {
            low: 1,
            medium: 1,
            high: 2,
            critical: 2,
        }
    }
}

impl RequiredApprovals {
    /// The number of approvals a change of `level` needs; never less than 1.
    pub fn for_level(&self, level: RiskLevel) -> u32 {
        let n = match level {
            RiskLevel::Low => self.low,
            RiskLevel::Medium => self.medium,
            RiskLevel::High => self.high,
            RiskLevel::Critical => self.critical,
        };
        n.max(1)
    }
}

/// Server-wide rules that [`create`] and [`apply`] follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Policy {
    /// `NEXPLANE_ALLOW_SELF_APPROVAL`: the requester may approve their own change request
    /// (the approval is then marked `self_approved`). One approval per person still holds.
    pub allow_self_approval: bool,
    /// Approvals needed per risk level.
    pub required_approvals: RequiredApprovals,
}

// ---------------------------------------------------------------------------------------------
// Risk

/// The environment of a connector (api.md §4); it feeds the risk score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    /// Production (+2 risk). The default.
    #[default]
    Production,
    /// Staging (+1 risk).
    Staging,
    /// Development (+0 risk).
    Development,
}

impl Environment {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Staging => "staging",
            Environment::Development => "development",
        }
    }

    /// Parses an environment name.
    pub fn parse(s: &str) -> Option<Environment> {
        [
            Environment::Production,
            Environment::Staging,
            Environment::Development,
        ]
        .into_iter()
        .find(|e| e.as_str() == s)
    }

    /// What this environment adds to the risk score.
    pub fn risk_points(self) -> u8 {
        match self {
            Environment::Production => 2,
            Environment::Staging => 1,
            Environment::Development => 0,
        }
    }
}

/// A risk level: 1–3 low, 4–6 medium, 7–9 high, 10 critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    /// Score 1–3.
    Low,
    /// Score 4–6.
    Medium,
    /// Score 7–9.
    High,
    /// Score 10.
    Critical,
}

impl RiskLevel {
    /// The level of a score (scores outside 1..=10 are clamped first).
    pub fn from_score(score: u8) -> RiskLevel {
        match score.clamp(Risk::MIN_SCORE, Risk::MAX_SCORE) {
            1..=3 => RiskLevel::Low,
            4..=6 => RiskLevel::Medium,
            7..=9 => RiskLevel::High,
            _ => RiskLevel::Critical,
        }
    }

    /// The level's name as used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
            RiskLevel::Critical => "critical",
        }
    }
}

/// The risk of a change request (api.md §6).
///
/// ```
/// use nexplane_domain::change_request::{Environment, Risk, RiskLevel};
/// use nexplane_domain::change_type::find_builtin;
///
/// let delete_key = find_builtin("delete_iam_access_key").unwrap();
/// let risk = Risk::assess(delete_key, Environment::Production);
/// assert_eq!((risk.score, risk.level), (10, RiskLevel::Critical)); // 6 + 2 prod + 2 no rollback
///
/// let start = find_builtin("start_ec2_instance").unwrap();
/// assert_eq!(Risk::assess(start, Environment::Development).level, RiskLevel::Low);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Risk {
    /// 1..=10.
    pub score: u8,
    /// Derived from `score`.
    pub level: RiskLevel,
    /// Human-readable reasons, one per contribution to the score.
    pub factors: Vec<String>,
}

impl Risk {
    /// Lowest score.
    pub const MIN_SCORE: u8 = 1;
    /// Highest score.
    pub const MAX_SCORE: u8 = 10;

    /// The risk of a change of type `change_type` against a connector in `environment`.
    pub fn assess(change_type: &ChangeType, environment: Environment) -> Risk {
        Risk::compute(
            &change_type.name,
            change_type.base_risk,
            environment,
            change_type.has_rollback(),
        )
    }

    /// The risk from its inputs: `base_risk`, +2 production / +1 staging, +2 without
    /// rollback, clamped to 1..=10.
    pub fn compute(
        change_type: &str,
        base_risk: u8,
        environment: Environment,
        has_rollback: bool,
    ) -> Risk {
        let mut factors = vec![format!("change type {change_type}: base risk {base_risk}")];
        let mut raw = u32::from(base_risk);
        let env_points = environment.risk_points();
        raw += u32::from(env_points);
        factors.push(format!(
            "{} environment: +{env_points}",
            environment.as_str()
        ));
        if !has_rollback {
            raw += 2;
            factors.push("no rollback: +2".to_owned());
        }
        let max = u32::from(Self::MAX_SCORE);
        let min = u32::from(Self::MIN_SCORE);
        let clamped = raw.clamp(min, max);
        if clamped != raw {
            factors.push(format!("clamped from {raw} to {clamped}"));
        }
        let score = u8::try_from(clamped).unwrap_or(Self::MAX_SCORE);
        Risk {
            score,
            level: RiskLevel::from_score(score),
            factors,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The change request

/// One approval of a change request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub user_id: UserId,
    /// Their email at the time.
    pub actor: String,
    /// When.
    pub at: Timestamp,
    /// Optional comment.
    pub comment: Option<String>,
    /// The requester approved their own change (only with self-approval allowed).
    pub self_approved: bool,
}

/// The rejection of a change request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Who rejected.
    pub user_id: UserId,
    /// Their email at the time.
    pub actor: String,
    /// When.
    pub at: Timestamp,
    /// Why (never blank).
    pub reason: String,
}

/// The part of a change request (api.md §6) that the domain owns. The execution and rollback
/// journals and secret outputs belong to the execution engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRequest {
    /// Id.
    pub id: ChangeRequestId,
    /// Short title.
    pub title: String,
    /// Longer description (may be empty).
    pub description: String,
    /// The connector it acts through; `None` for agent change types.
    pub connector_id: Option<ConnectorId>,
    /// Name of the change type.
    pub change_type: String,
    /// What it acts on, valid against the change type's schema.
    pub target: Value,
    /// Environment used for the risk score (the connector's; `production` for agents unless
    /// the caller says otherwise).
    pub environment: Environment,
    /// Current state.
    pub state: State,
    /// Current risk.
    pub risk: Risk,
    /// Approvals needed to reach `approved`.
    pub required_approvals: u32,
    /// Approvals so far, one per person, in order.
    pub approvals: Vec<Approval>,
    /// Set when rejected.
    pub rejection: Option<Rejection>,
    /// Who created it.
    pub requested_by: UserId,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// Submitted for approval.
    pub submitted_at: Option<Timestamp>,
    /// Approved or rejected.
    pub decided_at: Option<Timestamp>,
    /// Execution started.
    pub executed_at: Option<Timestamp>,
    /// The last execution or rollback job ended.
    pub finished_at: Option<Timestamp>,
    /// How many execution steps changed something in the world; rollback from `complete` or
    /// `failed` needs at least one.
    pub applied_steps: u32,
}

impl ChangeRequest {
    /// Whether `user` has already approved.
    pub fn has_approved(&self, user: &UserId) -> bool {
        self.approvals.iter().any(|a| &a.user_id == user)
    }

    /// Number of approvals still missing (0 once approved).
    pub fn approvals_missing(&self) -> u32 {
        let have = u32::try_from(self.approvals.len()).unwrap_or(u32::MAX);
        self.required_approvals.saturating_sub(have)
    }

    /// The target with secret-bearing fields ([`REDACTED_TARGET_FIELDS`]) replaced by a
    /// placeholder, for audit payloads and logs.
    pub fn redacted_target(&self) -> Value {
        redact_target(&self.target)
    }
}

/// Input of [`create`] (the body of `POST /change-requests`, plus what the caller resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct NewChangeRequest {
    /// The id to give it.
    pub id: ChangeRequestId,
    /// Title (trimmed; 1–200 characters).
    pub title: String,
    /// Description (up to 10 000 characters; may be empty).
    pub description: String,
    /// Required for `aws` change types, absent for agent change types.
    pub connector_id: Option<ConnectorId>,
    /// Name of a change type of the built-in catalog.
    pub change_type: String,
    /// The target, validated against the change type's schema.
    pub target: Value,
    /// The connector's environment (use the default, `production`, for agent change types).
    pub environment: Environment,
}

// ---------------------------------------------------------------------------------------------
// Events and errors

/// The audit event type of a change-request event (api.md §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// `change_request.created`
    #[serde(rename = "change_request.created")]
    Created,
    /// `change_request.updated`
    #[serde(rename = "change_request.updated")]
    Updated,
    /// `change_request.submitted`
    #[serde(rename = "change_request.submitted")]
    Submitted,
    /// `change_request.approved` (one per approval, also those that do not yet reach the
    /// required number)
    #[serde(rename = "change_request.approved")]
    Approved,
    /// `change_request.rejected`
    #[serde(rename = "change_request.rejected")]
    Rejected,
    /// `change_request.cancelled`
    #[serde(rename = "change_request.cancelled")]
    Cancelled,
    /// `change_request.execution_started`
    #[serde(rename = "change_request.execution_started")]
    ExecutionStarted,
    /// `change_request.completed`
    #[serde(rename = "change_request.completed")]
    Completed,
    /// `change_request.failed`
    #[serde(rename = "change_request.failed")]
    Failed,
    /// `change_request.rollback_started`
    #[serde(rename = "change_request.rollback_started")]
    RollbackStarted,
    /// `change_request.rolledback`
    #[serde(rename = "change_request.rolledback")]
    Rolledback,
    /// `change_request.rollback_failed`
    #[serde(rename = "change_request.rollback_failed")]
    RollbackFailed,
    /// `change_request.secrets_revealed` (payload: the names, never the values)
    #[serde(rename = "change_request.secrets_revealed")]
    SecretsRevealed,
}

impl EventType {
    /// The audit `event_type`, e.g. `change_request.submitted`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "change_request.created",
            EventType::Updated => "change_request.updated",
            EventType::Submitted => "change_request.submitted",
            EventType::Approved => "change_request.approved",
            EventType::Rejected => "change_request.rejected",
            EventType::Cancelled => "change_request.cancelled",
            EventType::ExecutionStarted => "change_request.execution_started",
            EventType::Completed => "change_request.completed",
            EventType::Failed => "change_request.failed",
            EventType::RollbackStarted => "change_request.rollback_started",
            EventType::Rolledback => "change_request.rolledback",
            EventType::RollbackFailed => "change_request.rollback_failed",
            EventType::SecretsRevealed => "change_request.secrets_revealed",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a change request, to be written to the audit log in the same
/// transaction as the new state. The payload never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainEvent {
    /// The audit event type.
    pub event_type: EventType,
    /// The change request.
    pub change_request_id: ChangeRequestId,
    /// The audit `actor`: the user's email or `system`.
    pub actor: String,
    /// The user's id (`None` for the server).
    pub actor_id: Option<UserId>,
    /// When.
    pub at: Timestamp,
    /// Details: always `from_state` and `to_state`, plus per-event fields.
    pub payload: Value,
}

impl DomainEvent {
    /// The audit event to append, with its `id` and the HTTP `request_id` (if any).
    pub fn to_audit_event(&self, id: EventId, request_id: Option<String>) -> NewAuditEvent {
        NewAuditEvent {
            id,
            timestamp: self.at,
            actor: self.actor.clone(),
            actor_id: self.actor_id.as_ref().map(|u| u.as_str().to_owned()),
            event_type: self.event_type.as_str().to_owned(),
            resource_type: RESOURCE_TYPE.to_owned(),
            resource_id: Some(self.change_request_id.as_str().to_owned()),
            change_request_id: Some(self.change_request_id.as_str().to_owned()),
            request_id,
            payload: self.payload.clone(),
        }
    }
}

/// Why an action on a change request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The action is not possible in the current state (409 `invalid_transition`).
    #[error("invalid transition: cannot {action} a change request in state {state}")]
    InvalidTransition {
        /// The current state.
        state: State,
        /// The refused action.
        action: ActionKind,
    },
    /// The actor's role or relation to the change request does not allow the action (403).
    #[error("forbidden: {reason}")]
    Forbidden {
        /// The refused action.
        action: ActionKind,
        /// Why, for the response `detail`.
        reason: &'static str,
    },
    /// Separation of duties: the requester may not approve their own change request (403).
    #[error("forbidden: the requester may not approve their own change request")]
    SelfApproval,
    /// This user has already approved (409).
    #[error("this user has already approved the change request")]
    AlreadyApproved,
    /// The change type cannot be rolled back (409 `rollback_unsupported`).
    #[error("change type {change_type} has no rollback")]
    RollbackUnsupported {
        /// The change type.
        change_type: String,
    },
    /// The input is not valid (422 with field errors).
    #[error("invalid input: {}", summarize(.0))]
    Validation(Vec<FieldError>),
}

fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl DomainError {
    /// The problem `code` of api.md §1: `invalid_transition`, `forbidden`,
    /// `already_approved`, `rollback_unsupported` or `validation_failed`.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::InvalidTransition { .. } => "invalid_transition",
            DomainError::Forbidden { .. } | DomainError::SelfApproval => "forbidden",
            DomainError::AlreadyApproved => "already_approved",
            DomainError::RollbackUnsupported { .. } => "rollback_unsupported",
            DomainError::Validation(_) => "validation_failed",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Create

/// Creates a `draft` change request (`POST /change-requests`): operator or admin only
/// ([`DomainError::Forbidden`]); the title, description, change type, connector presence
/// (required for `aws` types, absent for agent types) and the target are validated, all
/// problems reported at once ([`DomainError::Validation`]). The risk and the number of
/// required approvals are computed from the change type, the environment and `policy`.
/// Returns the change request and its `change_request.created` event.
pub fn create(
    new: NewChangeRequest,
    actor: &Actor,
    policy: &Policy,
    now: Timestamp,
) -> Result<(ChangeRequest, Vec<DomainEvent>), DomainError> {
    let may_create = actor
        .role()
        .is_some_and(|r| r.allows(Permission::ChangeRequestWrite));
    let Some(requested_by) = actor.user_id().filter(|_| may_create).cloned() else {
        return Err(DomainError::Forbidden {
            action: ActionKind::Create,
            reason: "only operators and admins may create change requests",
        });
    };

    let mut errors = Vec::new();
    let title = check_title(&new.title, &mut errors);
    check_description(&new.description, &mut errors);
    let change_type = find_builtin(&new.change_type);
    match change_type {
        None => errors.push(FieldError::new("change_type", "is not a known change type")),
        Some(ct) => {
            match (ct.connector_type, &new.connector_id) {
                (ConnectorType::Aws, None) => errors.push(FieldError::new(
                    "connector_id",
                    "is required for aws change types",
                )),
                (ConnectorType::Agent, Some(_)) => errors.push(FieldError::new(
                    "connector_id",
                    "must be omitted for agent change types (the target names the agent)",
                )),
                _ => {}
            }
            if let Err(e) = ct.validate_target(&new.target) {
                errors.extend(e);
            }
        }
    }
    let Some(ct) = change_type.filter(|_| errors.is_empty()) else {
        return Err(DomainError::Validation(errors));
    };

    let risk = Risk::assess(ct, new.environment);
    let required_approvals = policy.required_approvals.for_level(risk.level);
    let cr = ChangeRequest {
        id: new.id,
        title,
        description: new.description,
        connector_id: new.connector_id,
        change_type: new.change_type,
        target: new.target,
        environment: new.environment,
        state: State::Draft,
        risk,
        required_approvals,
        approvals: Vec::new(),
        rejection: None,
        requested_by,
        created_at: now,
        updated_at: now,
        submitted_at: None,
        decided_at: None,
        executed_at: None,
        finished_at: None,
        applied_steps: 0,
    };
    let payload = json!({
        "from_state": Value::Null,
        "to_state": State::Draft,
        "title": cr.title,
        "change_type": cr.change_type,
        "connector_id": cr.connector_id,
        "target": cr.redacted_target(),
        "environment": cr.environment,
        "risk": cr.risk,
        "required_approvals": cr.required_approvals,
    });
    let event = event(&cr, EventType::Created, actor, now, payload);
    Ok((cr, vec![event]))
}

// ---------------------------------------------------------------------------------------------
// Apply

/// Performs `action` by `actor` on `cr` at `now` under `policy`.
///
/// On success returns the new change request (with `updated_at = now`) and the audit events
/// to write with it (exactly one per action). On refusal returns the reason; `cr` is never
/// modified either way. See the module docs for the rules and their order.
///
/// The "repeat execute/rollback while its job runs returns the same job" rule of api.md §6.1
/// is the caller's: here a second [`Action::Execute`] is an invalid transition from
/// `executing`.
pub fn apply(
    cr: &ChangeRequest,
    action: Action,
    actor: &Actor,
    policy: &Policy,
    now: Timestamp,
) -> Result<(ChangeRequest, Vec<DomainEvent>), DomainError> {
    let kind = action.kind();
    check_state(cr, kind)?;
    authorize(cr, kind, actor, policy)?;

    let mut next = cr.clone();
    next.updated_at = now;
    let from = cr.state;
    let (event_type, mut payload) = match action {
        Action::Edit {
            title,
            description,
            target,
            environment,
        } => {
            let changed = edit(&mut next, title, description, target, environment, policy)?;
            let mut p = json!({
                "changed": changed,
                "risk": next.risk,
                "required_approvals": next.required_approvals,
            });
            if changed.contains(&"title") {
                set(&mut p, "title", json!(next.title));
            }
            if changed.contains(&"target") {
                set(&mut p, "target", next.redacted_target());
            }
            if changed.contains(&"environment") {
                set(&mut p, "environment", json!(next.environment));
            }
            (EventType::Updated, p)
        }
        Action::Submit => {
            // The policy in force at submission fixes how many approvals are needed.
            next.required_approvals = policy.required_approvals.for_level(next.risk.level);
            next.state = State::Submitted;
            next.submitted_at = Some(now);
            (
                EventType::Submitted,
                json!({"required_approvals": next.required_approvals, "risk": next.risk}),
            )
        }
        Action::Approve { comment } => {
            let Actor::User { user_id, email, .. } = actor else {
                return Err(forbidden(kind, "only users may approve"));
            };
            if next.has_approved(user_id) {
                return Err(DomainError::AlreadyApproved);
            }
            let comment = check_comment("comment", comment)?;
            let self_approved = *user_id == cr.requested_by;
            next.approvals.push(Approval {
                user_id: user_id.clone(),
                actor: email.clone(),
                at: now,
                comment: comment.clone(),
                self_approved,
            });
            if next.approvals_missing() == 0 {
                next.state = State::Approved;
                next.decided_at = Some(now);
            }
            (
                EventType::Approved,
                json!({
                    "comment": comment,
                    "self_approved": self_approved,
                    "approvals": next.approvals.len(),
                    "required_approvals": next.required_approvals,
                }),
            )
        }
        Action::Reject { reason } => {
            let Actor::User { user_id, email, .. } = actor else {
                return Err(forbidden(kind, "only users may reject"));
            };
            let reason = reason.trim();
            if reason.is_empty() {
                return Err(DomainError::Validation(vec![FieldError::new(
                    "reason",
                    "is required",
                )]));
            }
            if reason.chars().count() > COMMENT_MAX_CHARS {
                return Err(DomainError::Validation(vec![FieldError::new(
                    "reason",
                    format!("must be at most {COMMENT_MAX_CHARS} characters"),
                )]));
            }
            next.rejection = Some(Rejection {
                user_id: user_id.clone(),
                actor: email.clone(),
                at: now,
                reason: reason.to_owned(),
            });
            next.state = State::Rejected;
            next.decided_at = Some(now);
            (EventType::Rejected, json!({ "reason": reason }))
        }
        Action::Cancel => {
            next.state = State::Cancelled;
            (EventType::Cancelled, json!({}))
        }
        Action::Execute => {
            next.state = State::Executing;
            next.executed_at = Some(now);
            next.finished_at = None;
            (
                EventType::ExecutionStarted,
                json!({"change_type": next.change_type}),
            )
        }
        Action::ExecutionFinished {
            success,
            applied_steps,
        } => {
            next.applied_steps = applied_steps;
            next.finished_at = Some(now);
            let (state, ev) = if success {
                (State::Complete, EventType::Completed)
            } else {
                (State::Failed, EventType::Failed)
            };
            next.state = state;
            (ev, json!({ "applied_steps": applied_steps }))
        }
        Action::Rollback => {
            let rollback_possible =
                find_builtin(&cr.change_type).is_some_and(|ct| ct.has_rollback());
            if !rollback_possible {
                return Err(DomainError::RollbackUnsupported {
                    change_type: cr.change_type.clone(),
                });
            }
            next.state = State::RollingBack;
            next.finished_at = None;
            (
                EventType::RollbackStarted,
                json!({ "applied_steps": next.applied_steps }),
            )
        }
        Action::RollbackFinished { success } => {
            next.finished_at = Some(now);
            let (state, ev) = if success {
                (State::Rolledback, EventType::Rolledback)
            } else {
                (State::RollbackFailed, EventType::RollbackFailed)
            };
            next.state = state;
            (ev, json!({}))
        }
    };
    set(&mut payload, "from_state", json!(from));
    set(&mut payload, "to_state", json!(next.state));
    let ev = event(&next, event_type, actor, now, payload);
    Ok((next, vec![ev]))
}

/// Whether `kind` is possible from the change request's current state.
fn check_state(cr: &ChangeRequest, kind: ActionKind) -> Result<(), DomainError> {
    let invalid = DomainError::InvalidTransition {
        state: cr.state,
        action: kind,
    };
    if !kind.from_states().contains(&cr.state) {
        return Err(invalid);
    }
    // Rolling back an execution that changed nothing has nothing to undo.
    if kind == ActionKind::Rollback
        && matches!(cr.state, State::Complete | State::Failed)
        && cr.applied_steps == 0
    {
        return Err(invalid);
    }
    Ok(())
}

fn forbidden(action: ActionKind, reason: &'static str) -> DomainError {
    DomainError::Forbidden { action, reason }
}

/// Whether `actor` may perform `kind` on `cr` (the state is already known to allow it).
fn authorize(
    cr: &ChangeRequest,
    kind: ActionKind,
    actor: &Actor,
    policy: &Policy,
) -> Result<(), DomainError> {
    let (user_id, role) = match actor {
        Actor::System => {
            return match kind {
                ActionKind::ExecutionFinished | ActionKind::RollbackFinished => Ok(()),
                _ => Err(forbidden(kind, "the server may only report job results")),
            };
        }
        Actor::User { user_id, role, .. } => (user_id, *role),
    };
    match kind {
        ActionKind::Edit | ActionKind::Submit | ActionKind::Cancel => {
            if !role.allows(Permission::ChangeRequestWrite) {
                return Err(forbidden(
                    kind,
                    "only operators and admins may change change requests",
                ));
            }
            if role != Role::Admin && *user_id != cr.requested_by {
                return Err(forbidden(
                    kind,
                    "only the requester or an admin may do this",
                ));
            }
            Ok(())
        }
        ActionKind::Approve | ActionKind::Reject => {
            if !role.allows(Permission::ChangeRequestDecide) {
                return Err(forbidden(
                    kind,
                    "only approvers and admins may approve or reject",
                ));
            }
            if kind == ActionKind::Approve
                && *user_id == cr.requested_by
                && !policy.allow_self_approval
            {
                return Err(DomainError::SelfApproval);
            }
            Ok(())
        }
        ActionKind::Execute | ActionKind::Rollback => {
            if !role.allows(Permission::ChangeRequestExecute) {
                return Err(forbidden(
                    kind,
                    "only operators and admins may execute or roll back",
                ));
            }
            Ok(())
        }
        ActionKind::ExecutionFinished | ActionKind::RollbackFinished => Err(forbidden(
            kind,
            "job results are reported by the server, not by users",
        )),
        ActionKind::Create => Err(forbidden(
            kind,
            "create is not an action on a change request",
        )),
    }
}

/// Applies an edit to `cr` (a clone); returns the names of the fields that changed.
fn edit(
    cr: &mut ChangeRequest,
    title: Option<String>,
    description: Option<String>,
    target: Option<Value>,
    environment: Option<Environment>,
    policy: &Policy,
) -> Result<Vec<&'static str>, DomainError> {
    let mut errors = Vec::new();
    let mut changed = Vec::new();
    let change_type = find_builtin(&cr.change_type);
    if let Some(t) = title {
        let t = check_title(&t, &mut errors);
        if t != cr.title {
            cr.title = t;
            changed.push("title");
        }
    }
    if let Some(d) = description {
        check_description(&d, &mut errors);
        if d != cr.description {
            cr.description = d;
            changed.push("description");
        }
    }
    if let Some(t) = target {
        match change_type {
            Some(ct) => {
                if let Err(e) = ct.validate_target(&t) {
                    errors.extend(e);
                }
            }
            None => errors.push(FieldError::new("change_type", "is not a known change type")),
        }
        if t != cr.target {
            cr.target = t;
            changed.push("target");
        }
    }
    if let Some(env) = environment {
        if env != cr.environment {
            cr.environment = env;
            changed.push("environment");
        }
    }
    if !errors.is_empty() {
        return Err(DomainError::Validation(errors));
    }
    if let Some(ct) = change_type {
        cr.risk = Risk::assess(ct, cr.environment);
        cr.required_approvals = policy.required_approvals.for_level(cr.risk.level);
    }
    Ok(changed)
}

fn check_title(title: &str, errors: &mut Vec<FieldError>) -> String {
    let t = title.trim();
    let n = t.chars().count();
    if n == 0 {
        errors.push(FieldError::new("title", "must not be empty"));
    } else if n > TITLE_MAX_CHARS {
        errors.push(FieldError::new(
            "title",
            format!("must be at most {TITLE_MAX_CHARS} characters"),
        ));
    } else if t.chars().any(char::is_control) {
        errors.push(FieldError::new(
            "title",
            "must not contain control characters",
        ));
    }
    t.to_owned()
}

fn check_description(description: &str, errors: &mut Vec<FieldError>) {
    if description.chars().count() > DESCRIPTION_MAX_CHARS {
        errors.push(FieldError::new(
            "description",
            format!("must be at most {DESCRIPTION_MAX_CHARS} characters"),
        ));
    }
}

fn check_comment(field: &str, comment: Option<String>) -> Result<Option<String>, DomainError> {
    let Some(c) = comment else { return Ok(None) };
    let c = c.trim();
    if c.chars().count() > COMMENT_MAX_CHARS {
        return Err(DomainError::Validation(vec![FieldError::new(
            field,
            format!("must be at most {COMMENT_MAX_CHARS} characters"),
        )]));
    }
    Ok((!c.is_empty()).then(|| c.to_owned()))
}

/// Adds `key` to a payload object (payloads are always objects).
fn set(payload: &mut Value, key: &str, value: Value) {
    if let Some(obj) = payload.as_object_mut() {
        obj.insert(key.to_owned(), value);
    }
}

fn redact_target(target: &Value) -> Value {
    let mut t = target.clone();
    if let Some(obj) = t.as_object_mut() {
        for field in REDACTED_TARGET_FIELDS {
            if let Some(v) = obj.get_mut(*field) {
                let size = v.as_str().map_or(0, str::len);
                *v = json!(format!("[redacted: {size} bytes]"));
            }
        }
    }
    t
}

fn event(
    cr: &ChangeRequest,
    event_type: EventType,
    actor: &Actor,
    at: Timestamp,
    payload: Value,
) -> DomainEvent {
    DomainEvent {
        event_type,
        change_request_id: cr.id.clone(),
        actor: actor.audit_name().to_owned(),
        actor_id: actor.user_id().cloned(),
        at,
        payload,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::SessionId;

    fn t(mins: i64) -> Timestamp {
        Timestamp::from_secs(1_800_000_000 + mins * 60)
    }

    fn user(n: u128, role: Role) -> Actor {
        Actor::user(UserId::new(t(0), n), format!("u{n}@example.com"), role)
    }

    fn requester() -> Actor {
        user(1, Role::Operator)
    }

    fn new_cr(change_type: &str, target: Value, env: Environment) -> NewChangeRequest {
        let agent =
            find_builtin(change_type).is_some_and(|c| c.connector_type == ConnectorType::Agent);
        NewChangeRequest {
            id: ChangeRequestId::new(t(0), 100),
            title: "  Rotate prod-deploy IAM key ".into(),
            description: "Quarterly credential rotation".into(),
            connector_id: (!agent).then(|| ConnectorId::new(t(0), 5)),
            change_type: change_type.into(),
            target,
            environment: env,
        }
    }

    fn rotate() -> NewChangeRequest {
        // 5 + 0 (development) → medium → 1 approval
        new_cr(
            "rotate_iam_access_key",
            json!({"iam_user": "prod-deploy"}),
            Environment::Development,
        )
    }

    fn draft(new: NewChangeRequest) -> ChangeRequest {
        create(new, &requester(), &Policy::default(), t(0))
            .unwrap()
            .0
    }

    fn step(cr: &ChangeRequest, action: Action, actor: &Actor) -> ChangeRequest {
        apply(cr, action, actor, &Policy::default(), t(1))
            .unwrap()
            .0
    }

    fn approve() -> Action {
        Action::Approve { comment: None }
    }

    fn submitted(new: NewChangeRequest) -> ChangeRequest {
        step(&draft(new), Action::Submit, &requester())
    }

    fn approved(new: NewChangeRequest) -> ChangeRequest {
        let mut cr = submitted(new);
        let mut n = 10;
        while cr.state == State::Submitted {
            cr = step(&cr, approve(), &user(n, Role::Approver));
            n += 1;
        }
        cr
    }

    fn finished(new: NewChangeRequest, success: bool, applied_steps: u32) -> ChangeRequest {
        let cr = step(&approved(new), Action::Execute, &requester());
        step(
            &cr,
            Action::ExecutionFinished {
                success,
                applied_steps,
            },
            &Actor::System,
        )
    }

    fn err(cr: &ChangeRequest, action: Action, actor: &Actor, policy: &Policy) -> DomainError {
        let before = cr.clone();
        let e = apply(cr, action, actor, policy, t(9)).unwrap_err();
        assert_eq!(cr, &before, "a refused action leaves the value unchanged");
        e
    }

    fn is_forbidden(e: &DomainError) -> bool {
        matches!(e, DomainError::Forbidden { .. })
    }

    #[test]
    fn create_by_operator_or_admin() {
        let (cr, events) = create(rotate(), &requester(), &Policy::default(), t(0)).unwrap();
        assert_eq!(cr.state, State::Draft);
        assert_eq!(cr.title, "Rotate prod-deploy IAM key", "title is trimmed");
        assert_eq!(Some(&cr.requested_by), requester().user_id());
        assert_eq!((cr.created_at, cr.updated_at), (t(0), t(0)));
        assert!(cr.approvals.is_empty() && cr.rejection.is_none());
        assert_eq!((cr.risk.score, cr.risk.level), (5, RiskLevel::Medium));
        assert_eq!(cr.required_approvals, 1);
        assert_eq!(events.len(), 1);
        let ev = &events[0];
        assert_eq!(ev.event_type, EventType::Created);
        assert_eq!(ev.actor, "u1@example.com");
        assert_eq!(ev.payload["to_state"], "draft");
        assert_eq!(ev.payload["target"], json!({"iam_user": "prod-deploy"}));
        assert_eq!(ev.payload["risk"]["level"], "medium");

        assert!(create(rotate(), &user(2, Role::Admin), &Policy::default(), t(0)).is_ok());
        for actor in [
            user(3, Role::Approver),
            user(4, Role::Viewer),
            Actor::System,
        ] {
            let e = create(rotate(), &actor, &Policy::default(), t(0)).unwrap_err();
            assert!(is_forbidden(&e), "{actor:?}: {e}");
        }
    }

    #[test]
    fn create_reports_every_invalid_field() {
        let mut bad = rotate();
        bad.title = "   ".into();
        bad.description = "x".repeat(DESCRIPTION_MAX_CHARS + 1);
        bad.connector_id = None;
        bad.target = json!({"iam_user": "a b", "targte": 1});
        let DomainError::Validation(errors) =
            create(bad, &requester(), &Policy::default(), t(0)).unwrap_err()
        else {
            panic!("expected a validation error");
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "title",
                "description",
                "connector_id",
                "target.iam_user",
                "target.targte"
            ]
        );

        let mut unknown = rotate();
        unknown.change_type = "reboot_the_world".into();
        let e = create(unknown, &requester(), &Policy::default(), t(0)).unwrap_err();
        assert_eq!(
            e,
            DomainError::Validation(vec![FieldError::new(
                "change_type",
                "is not a known change type"
            )])
        );
        assert_eq!(e.code(), "validation_failed");

        let agent_target = json!({"agent_id": "agt_01jef8z7q3m4n5p6r7s8t9v0wx", "path": "/etc/motd", "content": "hi"});
        let mut with_conn = new_cr(
            "agent_write_file",
            agent_target.clone(),
            Environment::Production,
        );
        with_conn.connector_id = Some(ConnectorId::new(t(0), 1));
        let e = create(with_conn, &requester(), &Policy::default(), t(0)).unwrap_err();
        assert!(matches!(&e, DomainError::Validation(v) if v[0].field == "connector_id"));
        let ok = new_cr("agent_write_file", agent_target, Environment::Production);
        assert!(create(ok, &requester(), &Policy::default(), t(0)).is_ok());
    }

    #[test]
    fn risk_scores_and_levels() {
        let cases = [
            (
                "start_ec2_instance",
                Environment::Development,
                2,
                RiskLevel::Low,
            ),
            (
                "start_ec2_instance",
                Environment::Staging,
                3,
                RiskLevel::Low,
            ),
            (
                "deactivate_iam_access_key",
                Environment::Development,
                4,
                RiskLevel::Medium,
            ),
            (
                "rotate_iam_access_key",
                Environment::Staging,
                6,
                RiskLevel::Medium,
            ),
            (
                "rotate_iam_access_key",
                Environment::Production,
                7,
                RiskLevel::High,
            ),
            (
                "delete_iam_access_key",
                Environment::Development,
                8,
                RiskLevel::High,
            ),
            (
                "stop_ec2_instance",
                Environment::Production,
                9,
                RiskLevel::High,
            ),
            (
                "delete_iam_access_key",
                Environment::Production,
                10,
                RiskLevel::Critical,
            ),
        ];
        for (name, env, score, level) in cases {
            let r = Risk::assess(find_builtin(name).unwrap(), env);
            assert_eq!((r.score, r.level), (score, level), "{name} {env:?}");
        }
        let r = Risk::compute("x", 9, Environment::Production, false);
        assert_eq!((r.score, r.level), (10, RiskLevel::Critical));
        assert_eq!(
            r.factors,
            [
                "change type x: base risk 9",
                "production environment: +2",
                "no rollback: +2",
                "clamped from 13 to 10"
            ]
        );
        let r = Risk::compute("x", 0, Environment::Development, true);
        assert_eq!((r.score, r.level), (1, RiskLevel::Low));
        for s in 0..=20u8 {
            let l = RiskLevel::from_score(s);
            let c = s.clamp(1, 10);
            let want = match c {
                1..=3 => RiskLevel::Low,
                4..=6 => RiskLevel::Medium,
                7..=9 => RiskLevel::High,
                _ => RiskLevel::Critical,
            };
            assert_eq!(l, want);
        }
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["level"], "low");
    }

    #[test]
    fn required_approvals_follow_the_policy() {
        let p = Policy::default();
        assert_eq!(
            [
                RiskLevel::Low,
                RiskLevel::Medium,
                RiskLevel::High,
                RiskLevel::Critical
            ]
            .map(|l| p.required_approvals.for_level(l)),
            [1, 1, 2, 2]
        );
        let zero = RequiredApprovals {
            low: 0,
            medium: 0,
            high: 0,
            critical: 0,
        };
        assert_eq!(
            zero.for_level(RiskLevel::Critical),
            1,
            "at least one approval, always"
        );
        let strict = Policy {
            allow_self_approval: false,
            required_approvals: RequiredApprovals {
                low: 1,
                medium: 3,
                high: 3,
                critical: 4,
            },
        };
        let (cr, _) = create(rotate(), &requester(), &strict, t(0)).unwrap();
        assert_eq!(cr.required_approvals, 3);
    }

    #[test]
    fn edit_by_requester_or_admin_recomputes_risk() {
        let cr = draft(rotate());
        let edit = |env: Option<Environment>| Action::Edit {
            title: Some("New title".into()),
            description: None,
            target: Some(json!({"iam_user": "ci", "access_key_id": "AKIAIOSFODNN7EXAMPLE"})),
            environment: env,
        };
        let (e1, events) = apply(
            &cr,
            edit(Some(Environment::Production)),
            &requester(),
            &Policy::default(),
            t(3),
        )
        .unwrap();
        assert_eq!(e1.state, State::Draft);
        assert_eq!(e1.title, "New title");
        assert_eq!(e1.target["iam_user"], "ci");
        assert_eq!(e1.updated_at, t(3));
        assert_eq!(
            (e1.risk.score, e1.risk.level, e1.required_approvals),
            (7, RiskLevel::High, 2)
        );
        assert_eq!(events[0].event_type, EventType::Updated);
        assert_eq!(
            events[0].payload["changed"],
            json!(["title", "target", "environment"])
        );
        assert_eq!(events[0].payload["from_state"], "draft");

        assert!(apply(
            &cr,
            edit(None),
            &user(2, Role::Admin),
            &Policy::default(),
            t(3)
        )
        .is_ok());
        for actor in [
            user(2, Role::Operator),
            user(3, Role::Approver),
            user(4, Role::Viewer),
            Actor::System,
        ] {
            assert!(
                is_forbidden(&err(&cr, edit(None), &actor, &Policy::default())),
                "{actor:?}"
            );
        }
        // A requester whose role was lowered to viewer can no longer edit.
        let demoted = Actor::user(cr.requested_by.clone(), "u1@example.com", Role::Viewer);
        assert!(is_forbidden(&err(
            &cr,
            edit(None),
            &demoted,
            &Policy::default()
        )));

        let bad = Action::Edit {
            title: Some(String::new()),
            description: None,
            target: Some(json!({})),
            environment: None,
        };
        let DomainError::Validation(v) = err(&cr, bad, &requester(), &Policy::default()) else {
            panic!()
        };
        assert_eq!(
            v.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(),
            ["title", "target.iam_user"]
        );

        let s = submitted(rotate());
        assert_eq!(
            err(&s, edit(None), &requester(), &Policy::default()),
            DomainError::InvalidTransition {
                state: State::Submitted,
                action: ActionKind::Edit
            }
        );
    }

    #[test]
    fn audit_payloads_never_carry_file_content() {
        let secret = "db_password=hunter2hunter2";
        let target = json!({"agent_id": "agt_01jef8z7q3m4n5p6r7s8t9v0wx", "path": "/etc/app.env", "content": secret});
        let (cr, events) = create(
            new_cr("agent_write_file", target.clone(), Environment::Staging),
            &requester(),
            &Policy::default(),
            t(0),
        )
        .unwrap();
        assert_eq!(
            cr.target["content"], secret,
            "the change request keeps the content"
        );
        let mut new_target = target;
        new_target["content"] = json!("db_password=other-secret");
        let edit = Action::Edit {
            title: None,
            description: None,
            target: Some(new_target),
            environment: None,
        };
        let (_, more) = apply(&cr, edit, &requester(), &Policy::default(), t(1)).unwrap();
        for ev in events.iter().chain(&more) {
            let text = ev.payload.to_string();
            assert!(
                !text.contains("hunter2") && !text.contains("other-secret"),
                "{text}"
            );
            let shown = ev.payload["target"]["content"].as_str().unwrap();
            assert!(
                shown.starts_with("[redacted: ") && shown.ends_with(" bytes]"),
                "{shown}"
            );
        }
    }

    #[test]
    fn submit_by_requester_or_admin() {
        let cr = draft(rotate());
        let (s, events) =
            apply(&cr, Action::Submit, &requester(), &Policy::default(), t(2)).unwrap();
        assert_eq!(s.state, State::Submitted);
        assert_eq!(s.submitted_at, Some(t(2)));
        assert_eq!(events[0].event_type, EventType::Submitted);
        assert!(apply(
            &cr,
            Action::Submit,
            &user(2, Role::Admin),
            &Policy::default(),
            t(2)
        )
        .is_ok());
        assert!(is_forbidden(&err(
            &cr,
            Action::Submit,
            &user(2, Role::Operator),
            &Policy::default()
        )));
        assert!(is_forbidden(&err(
            &cr,
            Action::Submit,
            &user(2, Role::Approver),
            &Policy::default()
        )));
        // The policy in force at submission decides the number of approvals.
        let strict = Policy {
            allow_self_approval: false,
            required_approvals: RequiredApprovals {
                medium: 3,
                ..RequiredApprovals::default()
            },
        };
        let (s, _) = apply(&cr, Action::Submit, &requester(), &strict, t(2)).unwrap();
        assert_eq!(s.required_approvals, 3);
        assert_eq!(
            err(&s, Action::Submit, &requester(), &Policy::default()),
            DomainError::InvalidTransition {
                state: State::Submitted,
                action: ActionKind::Submit
            }
        );
    }

    #[test]
    fn approvals_count_distinct_people_up_to_the_requirement() {
        // stop_ec2_instance in production: 9, high, two approvals.
        let cr = submitted(new_cr(
            "stop_ec2_instance",
            json!({"instance_id": "i-01234567"}),
            Environment::Production,
        ));
        assert_eq!(cr.required_approvals, 2);
        let alice = user(20, Role::Approver);
        let (a1, ev1) = apply(
            &cr,
            Action::Approve {
                comment: Some(" ok ".into()),
            },
            &alice,
            &Policy::default(),
            t(5),
        )
        .unwrap();
        assert_eq!(a1.state, State::Submitted);
        assert_eq!(a1.approvals.len(), 1);
        assert_eq!(a1.approvals[0].comment.as_deref(), Some("ok"));
        assert_eq!(a1.approvals[0].actor, "u20@example.com");
        assert!(!a1.approvals[0].self_approved);
        assert_eq!(a1.decided_at, None);
        assert_eq!(a1.approvals_missing(), 1);
        assert_eq!(ev1[0].event_type, EventType::Approved);
        assert_eq!(ev1[0].payload["approvals"], 1);
        assert_eq!(ev1[0].payload["to_state"], "submitted");

        // Once per person.
        let e = err(&a1, approve(), &alice, &Policy::default());
        assert_eq!(e, DomainError::AlreadyApproved);
        assert_eq!(e.code(), "already_approved");
        // Even if their role changed to admin meanwhile.
        let alice_admin = Actor::user(
            alice.user_id().unwrap().clone(),
            "u20@example.com",
            Role::Admin,
        );
        assert_eq!(
            err(&a1, approve(), &alice_admin, &Policy::default()),
            DomainError::AlreadyApproved
        );

        let (a2, ev2) = apply(
            &a1,
            approve(),
            &user(21, Role::Admin),
            &Policy::default(),
            t(6),
        )
        .unwrap();
        assert_eq!(a2.state, State::Approved);
        assert_eq!(a2.decided_at, Some(t(6)));
        assert_eq!(ev2[0].event_type, EventType::Approved);
        assert_eq!(ev2[0].payload["to_state"], "approved");
        assert!(matches!(
            err(
                &a2,
                approve(),
                &user(22, Role::Approver),
                &Policy::default()
            ),
            DomainError::InvalidTransition { .. }
        ));
    }

    #[test]
    fn only_approvers_and_admins_approve_and_never_the_requester() {
        let cr = submitted(rotate());
        for actor in [
            user(2, Role::Operator),
            user(3, Role::Viewer),
            Actor::System,
        ] {
            assert!(
                is_forbidden(&err(&cr, approve(), &actor, &Policy::default())),
                "{actor:?}"
            );
        }
        // The requester, even as an admin or approver now.
        for role in [Role::Admin, Role::Approver] {
            let me = Actor::user(cr.requested_by.clone(), "u1@example.com", role);
            let e = err(&cr, approve(), &me, &Policy::default());
            assert_eq!(e, DomainError::SelfApproval);
            assert_eq!(e.code(), "forbidden");
        }
        // Unless self-approval is on; then the approval is marked.
        let eval = Policy {
            allow_self_approval: true,
            ..Policy::default()
        };
        let me = Actor::user(cr.requested_by.clone(), "u1@example.com", Role::Admin);
        let (a, ev) = apply(&cr, approve(), &me, &eval, t(4)).unwrap();
        assert_eq!(a.state, State::Approved);
        assert!(a.approvals[0].self_approved);
        assert_eq!(ev[0].payload["self_approved"], true);
        // ... but the requester's operator role still does not approve.
        assert!(is_forbidden(&err(&cr, approve(), &requester(), &eval)));
    }

    #[test]
    fn reject_needs_a_reason() {
        let cr = submitted(rotate());
        let approver = user(30, Role::Approver);
        for reason in ["", "   \n"] {
            let e = err(
                &cr,
                Action::Reject {
                    reason: reason.into(),
                },
                &approver,
                &Policy::default(),
            );
            assert_eq!(
                e,
                DomainError::Validation(vec![FieldError::new("reason", "is required")])
            );
        }
        let long = "x".repeat(COMMENT_MAX_CHARS + 1);
        assert!(matches!(
            err(
                &cr,
                Action::Reject { reason: long },
                &approver,
                &Policy::default()
            ),
            DomainError::Validation(_)
        ));
        assert!(is_forbidden(&err(
            &cr,
            Action::Reject {
                reason: "no".into()
            },
            &requester(),
            &Policy::default()
        )));

        let (r, ev) = apply(
            &cr,
            Action::Reject {
                reason: " wrong key ".into(),
            },
            &approver,
            &Policy::default(),
            t(7),
        )
        .unwrap();
        assert_eq!(r.state, State::Rejected);
        assert_eq!(r.decided_at, Some(t(7)));
        let rej = r.rejection.as_ref().unwrap();
        assert_eq!(
            (rej.reason.as_str(), rej.actor.as_str(), rej.at),
            ("wrong key", "u30@example.com", t(7))
        );
        assert_eq!(ev[0].event_type, EventType::Rejected);
        assert_eq!(ev[0].payload["reason"], "wrong key");
    }

    #[test]
    fn cancel_before_execution_by_requester_or_admin() {
        for cr in [draft(rotate()), submitted(rotate()), approved(rotate())] {
            let (c, ev) =
                apply(&cr, Action::Cancel, &requester(), &Policy::default(), t(8)).unwrap();
            assert_eq!(c.state, State::Cancelled);
            assert_eq!(ev[0].event_type, EventType::Cancelled);
            assert_eq!(ev[0].payload["from_state"], cr.state.as_str());
            assert!(apply(
                &cr,
                Action::Cancel,
                &user(2, Role::Admin),
                &Policy::default(),
                t(8)
            )
            .is_ok());
            for actor in [
                user(2, Role::Operator),
                user(3, Role::Approver),
                user(4, Role::Viewer),
            ] {
                assert!(is_forbidden(&err(
                    &cr,
                    Action::Cancel,
                    &actor,
                    &Policy::default()
                )));
            }
        }
        let running = step(&approved(rotate()), Action::Execute, &requester());
        assert_eq!(
            err(&running, Action::Cancel, &requester(), &Policy::default()),
            DomainError::InvalidTransition {
                state: State::Executing,
                action: ActionKind::Cancel
            }
        );
    }

    #[test]
    fn execute_by_operator_or_admin_and_results_from_the_server() {
        let cr = approved(rotate());
        for actor in [
            user(3, Role::Approver),
            user(4, Role::Viewer),
            Actor::System,
        ] {
            assert!(
                is_forbidden(&err(&cr, Action::Execute, &actor, &Policy::default())),
                "{actor:?}"
            );
        }
        assert!(apply(
            &cr,
            Action::Execute,
            &user(2, Role::Admin),
            &Policy::default(),
            t(9)
        )
        .is_ok());
        let (x, ev) = apply(
            &cr,
            Action::Execute,
            &user(2, Role::Operator),
            &Policy::default(),
            t(9),
        )
        .unwrap();
        assert_eq!(x.state, State::Executing);
        assert_eq!(x.executed_at, Some(t(9)));
        assert_eq!(ev[0].event_type, EventType::ExecutionStarted);
        assert!(matches!(
            err(&x, Action::Execute, &requester(), &Policy::default()),
            DomainError::InvalidTransition { .. }
        ));

        let finish = |success| Action::ExecutionFinished {
            success,
            applied_steps: 2,
        };
        assert!(is_forbidden(&err(
            &x,
            finish(true),
            &user(2, Role::Admin),
            &Policy::default()
        )));
        let (ok, ev) = apply(&x, finish(true), &Actor::System, &Policy::default(), t(10)).unwrap();
        assert_eq!(
            (ok.state, ok.applied_steps, ok.finished_at),
            (State::Complete, 2, Some(t(10)))
        );
        assert_eq!(
            (
                ev[0].event_type,
                ev[0].actor.as_str(),
                ev[0].actor_id.as_ref()
            ),
            (EventType::Completed, "system", None)
        );
        let (bad, ev) =
            apply(&x, finish(false), &Actor::System, &Policy::default(), t(10)).unwrap();
        assert_eq!(bad.state, State::Failed);
        assert_eq!(ev[0].event_type, EventType::Failed);
        // The server may do nothing but report results.
        assert!(is_forbidden(&err(
            &submitted(rotate()),
            approve(),
            &Actor::System,
            &Policy::default()
        )));
    }

    #[test]
    fn rollback_rules() {
        let op = user(2, Role::Operator);
        for cr in [finished(rotate(), true, 1), finished(rotate(), false, 1)] {
            let (rb, ev) = apply(&cr, Action::Rollback, &op, &Policy::default(), t(11)).unwrap();
            assert_eq!(rb.state, State::RollingBack);
            assert_eq!(rb.finished_at, None);
            assert_eq!(ev[0].event_type, EventType::RollbackStarted);
            for actor in [
                user(3, Role::Approver),
                user(4, Role::Viewer),
                Actor::System,
            ] {
                assert!(is_forbidden(&err(
                    &cr,
                    Action::Rollback,
                    &actor,
                    &Policy::default()
                )));
            }
            let (done, ev) = apply(
                &rb,
                Action::RollbackFinished { success: true },
                &Actor::System,
                &Policy::default(),
                t(12),
            )
            .unwrap();
            assert_eq!(
                (done.state, ev[0].event_type),
                (State::Rolledback, EventType::Rolledback)
            );
            let (failed, ev) = apply(
                &rb,
                Action::RollbackFinished { success: false },
                &Actor::System,
                &Policy::default(),
                t(12),
            )
            .unwrap();
            assert_eq!(
                (failed.state, ev[0].event_type),
                (State::RollbackFailed, EventType::RollbackFailed)
            );
            // Retry after a failed rollback.
            let (retry, _) =
                apply(&failed, Action::Rollback, &op, &Policy::default(), t(13)).unwrap();
            assert_eq!(retry.state, State::RollingBack);
            assert!(is_forbidden(&err(
                &rb,
                Action::RollbackFinished { success: true },
                &op,
                &Policy::default()
            )));
        }
        // Nothing applied: nothing to roll back.
        let nothing = finished(rotate(), false, 0);
        assert_eq!(
            err(&nothing, Action::Rollback, &op, &Policy::default()),
            DomainError::InvalidTransition {
                state: State::Failed,
                action: ActionKind::Rollback
            }
        );
        // A change type without rollback.
        let delete = new_cr(
            "delete_iam_access_key",
            json!({"iam_user": "u", "access_key_id": "AKIAIOSFODNN7EXAMPLE"}),
            Environment::Development,
        );
        let done = finished(delete, true, 1);
        let e = err(&done, Action::Rollback, &op, &Policy::default());
        assert_eq!(
            e,
            DomainError::RollbackUnsupported {
                change_type: "delete_iam_access_key".into()
            }
        );
        assert_eq!(e.code(), "rollback_unsupported");
        assert_eq!(
            e.to_string(),
            "change type delete_iam_access_key has no rollback"
        );
    }

    #[test]
    fn final_states_accept_nothing() {
        let rejected = step(
            &submitted(rotate()),
            Action::Reject {
                reason: "no".into(),
            },
            &user(9, Role::Approver),
        );
        let cancelled = step(&draft(rotate()), Action::Cancel, &requester());
        let rb = step(&finished(rotate(), true, 1), Action::Rollback, &requester());
        let rolledback = step(
            &rb,
            Action::RollbackFinished { success: true },
            &Actor::System,
        );
        let actions = [
            Action::Edit {
                title: Some("x".into()),
                description: None,
                target: None,
                environment: None,
            },
            Action::Submit,
            approve(),
            Action::Reject { reason: "r".into() },
            Action::Cancel,
            Action::Execute,
            Action::ExecutionFinished {
                success: true,
                applied_steps: 1,
            },
            Action::Rollback,
            Action::RollbackFinished { success: true },
        ];
        for cr in [rejected, cancelled, rolledback] {
            assert!(cr.state.is_final());
            for action in actions.clone() {
                let kind = action.kind();
                for actor in [
                    requester(),
                    user(2, Role::Admin),
                    user(3, Role::Approver),
                    Actor::System,
                ] {
                    let e = err(
                        &cr,
                        action.clone(),
                        &actor,
                        &Policy {
                            allow_self_approval: true,
                            ..Policy::default()
                        },
                    );
                    assert_eq!(
                        e,
                        DomainError::InvalidTransition {
                            state: cr.state,
                            action: kind
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn invalid_transition_names_state_and_action() {
        let e = DomainError::InvalidTransition {
            state: State::RollbackFailed,
            action: ActionKind::Approve,
        };
        assert_eq!(
            e.to_string(),
            "invalid transition: cannot approve a change request in state rollback_failed"
        );
        assert_eq!(e.code(), "invalid_transition");
        let v = DomainError::Validation(vec![
            FieldError::new("title", "must not be empty"),
            FieldError::new("reason", "is required"),
        ]);
        assert_eq!(
            v.to_string(),
            "invalid input: title: must not be empty; reason: is required"
        );
    }

    #[test]
    fn names_and_serde() {
        for s in State::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::RollingBack.as_str(), "rolling_back");
        assert_eq!(State::RollbackFailed.as_str(), "rollback_failed");
        for k in ActionKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(
            serde_json::to_value(EventType::ExecutionStarted).unwrap(),
            "change_request.execution_started"
        );
        assert_eq!(Environment::parse("staging"), Some(Environment::Staging));
        assert_eq!(Environment::default(), Environment::Production);
        let cr = approved(rotate());
        let v = serde_json::to_value(&cr).unwrap();
        assert_eq!(v["state"], "approved");
        assert_eq!(v["risk"]["level"], "medium");
        assert!(v["approvals"][0]["at"].as_str().unwrap().ends_with('Z'));
        let back: ChangeRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, cr);
    }

    #[test]
    fn events_become_audit_events() {
        let (cr, events) = create(rotate(), &requester(), &Policy::default(), t(0)).unwrap();
        let a = events[0].to_audit_event(EventId::new(t(0), 1), Some("req-1".into()));
        assert_eq!(a.event_type, "change_request.created");
        assert_eq!(a.resource_type, "change_request");
        assert_eq!(a.resource_id.as_deref(), Some(cr.id.as_str()));
        assert_eq!(a.change_request_id.as_deref(), Some(cr.id.as_str()));
        assert_eq!(a.actor, "u1@example.com");
        assert_eq!(a.actor_id.as_deref(), Some(cr.requested_by.as_str()));
        assert_eq!(a.request_id.as_deref(), Some("req-1"));
        assert_eq!(a.timestamp, t(0));
    }

    #[test]
    fn actor_from_principal() {
        let p = Principal {
            user_id: UserId::new(t(0), 77),
            email: "p@example.com".into(),
            role: Role::Approver,
            session_id: SessionId::new(t(0), 1),
        };
        let a = Actor::from(&p);
        assert_eq!(
            a,
            Actor::user(p.user_id.clone(), "p@example.com", Role::Approver)
        );
        assert_eq!(a.audit_name(), "p@example.com");
        assert_eq!(Actor::System.audit_name(), "system");
        assert_eq!(Actor::System.user_id(), None);
    }

    #[test]
    fn state_helpers() {
        let finals: Vec<State> = State::ALL.into_iter().filter(|s| s.is_final()).collect();
        assert_eq!(
            finals,
            [State::Rejected, State::Cancelled, State::Rolledback]
        );
        let blocking: Vec<State> = State::ALL
            .into_iter()
            .filter(|s| s.blocks_connector_delete())
            .collect();
        assert_eq!(
            blocking,
            [
                State::Submitted,
                State::Approved,
                State::Executing,
                State::RollingBack
            ]
        );
        assert!(State::Executing.is_running() && !State::Complete.is_running());
    }
}
