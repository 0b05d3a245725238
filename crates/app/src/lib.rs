//! # nexplane-app
//!
//! The use cases of the Nexplane control plane, written against `nexplane-domain` and the
//! traits of `nexplane-ports`. Every method here is synchronous and may block (database,
//! password hashing): the HTTP layer calls it on a blocking thread pool.
#![deny(missing_docs)]

pub mod agents;
pub mod assets;
pub mod audit;
pub mod auth;
pub mod change_requests;
pub mod connectors;
pub mod discovery;
mod error;
pub mod execution;
pub mod ratelimit;
pub mod users;

pub use error::AppError;

use nexplane_domain::audit::NewAuditEvent;
use nexplane_domain::{AgentId, EventId, Principal, Timestamp};
use nexplane_ports::cloud::{ChangeProvider, CloudProvider};
use nexplane_ports::{
    AgentSigner, Clock, CredentialSealer, PasswordHasher, Random, Repo, Store, StoreError,
    TokenSigner,
};
use std::sync::Arc;

/// The adapters the use cases run on.
#[derive(Clone)]
pub struct Deps {
    /// Database.
    pub store: Arc<dyn Store>,
    /// argon2id.
    pub hasher: Arc<dyn PasswordHasher>,
    /// RS256 token signer.
    pub signer: Arc<dyn TokenSigner>,
    /// Clock.
    pub clock: Arc<dyn Clock>,
    /// CSPRNG.
    pub random: Arc<dyn Random>,
    /// Seals and opens connector credentials (AES-256-GCM under the master key).
    pub sealer: Arc<dyn CredentialSealer>,
    /// The cloud providers (connector tests and discovery).
    pub cloud: Arc<dyn CloudProvider>,
    /// The adapters that make changes (prechecks, steps and undo steps).
    pub changes: Arc<dyn ChangeProvider>,
    /// Agent request signatures (HMAC-SHA256).
    pub agent_signer: Arc<dyn AgentSigner>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deps")
    }
}

/// Tunables of the use cases.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Absolute lifetime of a login session, in seconds (default 12 h).
    pub session_ttl_secs: i64,
    /// Access-token lifetime in seconds (default 3600).
    pub access_ttl_secs: i64,
    /// Whether a requester may approve their own change request.
    pub allow_self_approval: bool,
    /// Approvals a change request needs, per risk level.
    pub required_approvals: nexplane_domain::change_request::RequiredApprovals,
    /// The lease a job worker holds, in seconds (renewed with every journal write).
    pub job_lease_secs: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            session_ttl_secs: 12 * 3600,
            access_ttl_secs: nexplane_domain::auth::ACCESS_TOKEN_TTL_SECS,
            allow_self_approval: false,
            required_approvals: Default::default(),
            job_lease_secs: nexplane_domain::job::DEFAULT_LEASE_SECS,
        }
    }
}

/// Where a request came from, for the audit log and limits.
#[derive(Debug, Clone, Default)]
pub struct RequestCtx {
    /// The request id (`X-Request-Id`).
    pub request_id: Option<String>,
    /// The client IP address.
    pub client_ip: Option<String>,
}

/// The application: every use case hangs off this.
#[derive(Debug, Clone)]
pub struct App {
    pub(crate) deps: Deps,
    pub(crate) settings: Settings,
    pub(crate) tokens: Arc<auth::TokenCache>,
    pub(crate) unknown_logins: Arc<auth::UnknownLogins>,
    pub(crate) job_listener: Arc<JobListener>,
    pub(crate) command_listener: Arc<CommandListener>,
}

/// Called after a command for an agent has been committed, so that agent's long poll (if it
/// waits on this process) answers at once.
#[derive(Default)]
pub(crate) struct CommandListener(std::sync::OnceLock<CommandQueuedFn>);

/// What [`App::on_command_queued`] registers.
pub type CommandQueuedFn = Box<dyn Fn(&AgentId) + Send + Sync>;

impl std::fmt::Debug for CommandListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommandListener")
    }
}

/// Called after a new job has been committed, so a worker can start it at once instead of at
/// its next poll.
#[derive(Default)]
pub(crate) struct JobListener(std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>);

impl std::fmt::Debug for JobListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "JobListener(set)"
        } else {
            "JobListener"
        })
    }
}

impl App {
    /// Builds the application from its adapters.
    pub fn new(deps: Deps, settings: Settings) -> Self {
        Self {
            deps,
            settings,
            tokens: Arc::new(auth::TokenCache::new(10_000)),
            unknown_logins: Arc::new(auth::UnknownLogins::new(100_000)),
            job_listener: Arc::new(JobListener::default()),
            command_listener: Arc::new(CommandListener::default()),
        }
    }

    /// Registers the function told about every newly queued job (the first call wins; every
    /// clone of this `App` shares it). Workers still poll, so a missed call only delays.
    pub fn on_job_queued(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.job_listener.0.set(f);
    }

    /// Registers the function told about every newly queued agent command (the first call
    /// wins).
    pub fn on_command_queued(&self, f: CommandQueuedFn) {
        let _ = self.command_listener.0.set(f);
    }

    pub(crate) fn command_queued(&self, agent: &AgentId) {
        if let Some(f) = self.command_listener.0.get() {
            f(agent);
        }
    }

    pub(crate) fn job_queued(&self) {
        if let Some(f) = self.job_listener.0.get() {
            f();
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Now, from the injected clock.
    pub fn now(&self) -> Timestamp {
        self.deps.clock.now()
    }

    /// The JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        self.deps.signer.jwks()
    }

    /// Whether the database answers.
    pub fn health(&self) -> Result<(), AppError> {
        self.deps.store.ping().map_err(|e| match e {
            StoreError::Unavailable(m) => AppError::Unavailable(m),
            other => AppError::Unavailable(other.to_string()),
        })
    }

    pub(crate) fn new_event_id(&self, now: Timestamp) -> EventId {
        EventId::new(now, self.deps.random.u128())
    }

    /// Appends an audit event inside the caller's transaction.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn audit(
        &self,
        repo: &mut dyn Repo,
        ctx: &RequestCtx,
        actor: Actor<'_>,
        event_type: &str,
        resource_type: &str,
        resource_id: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<(), StoreError> {
        let now = self.now();
        let (actor, actor_id) = match actor {
            Actor::User(p) => (p.email.clone(), Some(p.user_id.to_string())),
            Actor::Named { email, id } => (email.to_owned(), id.map(str::to_owned)),
            Actor::System => (nexplane_domain::audit::SYSTEM_ACTOR.to_owned(), None),
        };
        repo.append_audit(NewAuditEvent {
            id: self.new_event_id(now),
            timestamp: now,
            actor,
            actor_id,
            event_type: event_type.to_owned(),
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.map(str::to_owned),
            change_request_id: None,
            request_id: ctx.request_id.clone(),
            payload,
        })?;
        Ok(())
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.deps.store.as_ref()
    }
}

/// Who an audit event is attributed to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Actor<'a> {
    /// An authenticated user.
    User(&'a Principal),
    /// A user known by email (e.g. a failed login), with their id when known.
    Named { email: &'a str, id: Option<&'a str> },
    /// The server itself.
    System,
}

/// Checks that `p` may perform `perm`, else a 403.
pub fn require(p: &Principal, perm: nexplane_domain::Permission) -> Result<(), AppError> {
    if p.role.allows(perm) {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "the {} role may not do this",
            p.role.as_str()
        )))
    }
}
