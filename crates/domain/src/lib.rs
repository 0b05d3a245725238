//! # nexplane-domain
//!
//! The model and the rules of the Nexplane control plane, with no IO: users and roles,
//! sessions and token claims, the change-request state machine, the change-type catalog
//! types, jobs, and the hash-chained audit event model. Time and randomness are arguments,
//! so other Rust tools can embed this crate and drive the same rules the server applies.
#![deny(missing_docs)]

pub mod audit;
pub mod auth;
pub mod id;
pub mod secret;
pub mod time;
pub mod user;

pub use auth::{AccessClaims, Principal, RefreshTokenRecord, Session};
pub use id::*;
pub use secret::{PasswordHash, SecretString};
pub use time::{Timestamp, TimestampError};
pub use user::{FieldError, LockState, Permission, Role, User};
