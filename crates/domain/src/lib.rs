//! # nexplane-domain
//!
//! The model and the rules of the Nexplane control plane, with no IO: users and roles,
//! sessions and token claims, the change-request state machine, the change-type catalog
//! types, jobs, and the hash-chained audit event model. Time and randomness are arguments,
//! so other Rust tools can embed this crate and drive the same rules the server applies.
//!
//! ## Example: a change request from draft to rolled back
//!
//! Stopping an EC2 instance in production scores 9 (base 7 + 2 for production), which is high
//! risk, so it needs two approvals from people other than the requester. Every step returns
//! the new value and the audit events to store with it; ids and time are passed in.
//!
//! ```
//! use nexplane_domain::change_request::{
//!     apply, create, Action, Actor, Environment, NewChangeRequest, Policy, RiskLevel, State,
//! };
//! use nexplane_domain::{ChangeRequestId, ConnectorId, Role, Timestamp, UserId};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), nexplane_domain::DomainError> {
//! let t0 = Timestamp::parse_rfc3339("2026-12-04T15:00:00Z").unwrap();
//! let at = |mins: i64| t0.plus_secs(mins * 60);
//! let policy = Policy::default(); // low 1, medium 1, high 2, critical 2; no self-approval
//!
//! let operator = Actor::user(UserId::new(t0, 1), "ops@example.com", Role::Operator);
//! let alice = Actor::user(UserId::new(t0, 2), "alice@example.com", Role::Approver);
//! let bob = Actor::user(UserId::new(t0, 3), "bob@example.com", Role::Approver);
//!
//! let (cr, events) = create(
//!     NewChangeRequest {
//!         id: ChangeRequestId::new(t0, 42),
//!         title: "Stop the old batch host".into(),
//!         description: "It was replaced last week".into(),
//!         connector_id: Some(ConnectorId::new(t0, 7)),
//!         change_type: "stop_ec2_instance".into(),
//!         target: json!({"instance_id": "i-0123456789abcdef0"}),
//!         environment: Environment::Production,
//!     },
//!     &operator,
//!     &policy,
//!     t0,
//! )?;
//! assert_eq!(cr.state, State::Draft);
//! assert_eq!((cr.risk.score, cr.risk.level), (9, RiskLevel::High));
//! assert_eq!(cr.required_approvals, 2);
//! assert_eq!(events[0].event_type.as_str(), "change_request.created");
//!
//! let (cr, _) = apply(&cr, Action::Submit, &operator, &policy, at(1))?;
//! assert_eq!(cr.state, State::Submitted);
//!
//! // The requester may not approve their own change.
//! let refused = apply(&cr, Action::Approve { comment: None }, &operator, &policy, at(2));
//! assert!(refused.is_err());
//!
//! let first = Action::Approve { comment: Some("looks right".into()) };
//! let (cr, _) = apply(&cr, first, &alice, &policy, at(3))?;
//! assert_eq!(cr.state, State::Submitted); // one of two
//! let (cr, events) = apply(&cr, Action::Approve { comment: None }, &bob, &policy, at(4))?;
//! assert_eq!(cr.state, State::Approved);
//! assert_eq!(events[0].event_type.as_str(), "change_request.approved");
//!
//! let (cr, _) = apply(&cr, Action::Execute, &operator, &policy, at(5))?;
//! assert_eq!(cr.state, State::Executing);
//! // The execution job reports its end as the server.
//! let done = Action::ExecutionFinished { success: true, applied_steps: 1 };
//! let (cr, _) = apply(&cr, done, &Actor::System, &policy, at(6))?;
//! assert_eq!(cr.state, State::Complete);
//!
//! let (cr, _) = apply(&cr, Action::Rollback, &operator, &policy, at(7))?;
//! assert_eq!(cr.state, State::RollingBack);
//! let undone = Action::RollbackFinished { success: true };
//! let (cr, events) = apply(&cr, undone, &Actor::System, &policy, at(8))?;
//! assert_eq!(cr.state, State::Rolledback);
//! assert_eq!(events[0].actor, "system");
//!
//! // Rolled back is final: nothing else is accepted.
//! let err = apply(&cr, Action::Rollback, &operator, &policy, at(9)).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "invalid transition: cannot rollback a change request in state rolledback"
//! );
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod agent;
pub mod asset;
pub mod audit;
pub mod auth;
pub mod change_request;
pub mod change_type;
pub mod connector;
pub mod execution;
pub mod id;
pub mod job;
pub mod secret;
pub mod time;
pub mod user;

pub use asset::Asset;
pub use auth::{AccessClaims, Principal, RefreshTokenRecord, Session};
pub use change_request::{
    apply, create, Action, ActionKind, Actor, Approval, ChangeRequest, DomainError, DomainEvent,
    Environment, NewChangeRequest, Policy, Rejection, RequiredApprovals, Risk, RiskLevel, State,
};
pub use change_type::{ChangeType, ConnectorType, RollbackKind};
pub use connector::{Connector, ConnectorStatus, SealedValue};
pub use id::*;
pub use job::{Job, JobKind, JobOutcome, JobStatus, Progress};
pub use secret::{PasswordHash, SecretString};
pub use time::{Timestamp, TimestampError};
pub use user::{FieldError, LockState, Permission, Role, User};
