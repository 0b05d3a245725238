//! # nexplane-ports
//!
//! The traits the Nexplane core needs from the world: storage ([`Store`] / [`Repo`]),
//! password hashing, token signing, the clock and randomness. Adapters (`nexplane-store`,
//! `nexplane-crypto`) implement them; `nexplane-app` is written against them only.
//!
//! Storage is synchronous (diesel is blocking): callers run it on a blocking thread pool.
#![deny(missing_docs)]

pub mod cloud;

use nexplane_domain::agent::{Agent, AgentCommand, CommandStatus, EnrollmentToken};
use nexplane_domain::audit::{AuditEvent, NewAuditEvent};
use nexplane_domain::execution::{Journal, JournalKind};
use nexplane_domain::{
    AccessClaims, AgentId, Asset, AssetId, ChangeRequest, ChangeRequestId, CommandId, Connector,
    ConnectorId, EnrollmentTokenId, Environment, Job, JobId, JobKind, PasswordHash,
    RefreshTokenRecord, SealedValue, SecretString, Session, SessionId, State, Timestamp, User,
    UserId,
};
use std::collections::BTreeMap;

/// A storage failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint was violated; the string names the constraint or column.
    #[error("conflict on {0}")]
    Conflict(String),
    /// The database cannot be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The transaction closure asked for a rollback (used by [`transaction`]).
    #[error("rolled back")]
    RolledBack,
    /// Anything else.
    #[error("database error: {0}")]
    Other(String),
}

/// Keyset page request: newest first, strictly after (older than) `after`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Maximum rows to return.
    pub limit: u32,
    /// Key of the last row of the previous page (an id, or a `seq` as text for audit events).
    pub after: Option<String>,
}

/// Filters of `GET /audit` (api.md §9). `from` is inclusive, `to` exclusive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditFilter {
    /// Events of this change request.
    pub change_request_id: Option<String>,
    /// Events whose actor is this user id.
    pub user_id: Option<String>,
    /// Resource type.
    pub resource_type: Option<String>,
    /// Resource id.
    pub resource_id: Option<String>,
    /// Event type.
    pub event_type: Option<String>,
    /// At or after.
    pub from: Option<Timestamp>,
    /// Before.
    pub to: Option<Timestamp>,
}

/// Filters of `GET /assets` (api.md §5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AssetFilter {
    /// Assets of this connector.
    pub connector_id: Option<ConnectorId>,
    /// Assets of this type.
    pub asset_type: Option<String>,
    /// Case-insensitive substring of the name or the external id.
    pub q: Option<String>,
    /// Include assets a discovery no longer found.
    pub include_removed: bool,
}

/// Filters of `GET /change-requests` (api.md §6). Every given filter must match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeRequestFilter {
    /// Change requests in this state.
    pub state: Option<State>,
    /// Change requests on this connector.
    pub connector_id: Option<ConnectorId>,
    /// Change requests of this change type.
    pub change_type: Option<String>,
    /// Change requests created by this user.
    pub requested_by: Option<UserId>,
}

/// The sealed credentials of a connector, by name.
pub type SealedCredentials = BTreeMap<String, SealedValue>;

/// The operations available inside one database transaction.
pub trait Repo {
    /// Inserts a user. Duplicate email → [`StoreError::Conflict`].
    fn insert_user(&mut self, user: &User) -> Result<(), StoreError>;
    /// Overwrites a user's mutable fields (name, role, hash, disabled, lock state, updated_at).
    fn update_user(&mut self, user: &User) -> Result<(), StoreError>;
    /// A user by id.
    fn get_user(&mut self, id: &UserId) -> Result<Option<User>, StoreError>;
    /// A user by (lowercase) email.
    fn get_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError>;
    /// Users, newest first, keyset by id.
    fn list_users(&mut self, page: &Page) -> Result<Vec<User>, StoreError>;
    /// Number of users.
    fn count_users(&mut self) -> Result<i64, StoreError>;

    /// Inserts a session.
    fn insert_session(&mut self, session: &Session) -> Result<(), StoreError>;
    /// A session by id.
    fn get_session(&mut self, id: &SessionId) -> Result<Option<Session>, StoreError>;
    /// Marks a session revoked (idempotent: keeps the first revocation time).
    fn revoke_session(&mut self, id: &SessionId, at: Timestamp) -> Result<(), StoreError>;
    /// The session and its user, in one query (the per-request authentication check).
    fn get_session_with_user(
        &mut self,
        id: &SessionId,
    ) -> Result<Option<(Session, User)>, StoreError>;

    /// Inserts a refresh token record.
    fn insert_refresh_token(&mut self, rec: &RefreshTokenRecord) -> Result<(), StoreError>;
    /// A refresh token by its hash.
    fn get_refresh_token(
        &mut self,
        token_hash: &str,
    ) -> Result<Option<RefreshTokenRecord>, StoreError>;
    /// Spends a refresh token: sets `used_at` only if it was unused. Returns whether this call
    /// spent it (false: it was already spent — a reuse).
    fn spend_refresh_token(&mut self, token_hash: &str, at: Timestamp) -> Result<bool, StoreError>;

    /// Appends an event to the audit chain, assigning `seq`, `prev_hash` and `hash`.
    /// Appends are serialized so the chain stays linear.
    fn append_audit(&mut self, event: NewAuditEvent) -> Result<AuditEvent, StoreError>;
    /// Audit events matching `filter`, newest first, keyset by `seq` (`page.after` is a seq).
    fn list_audit(
        &mut self,
        filter: &AuditFilter,
        page: &Page,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// Up to `limit` events with `seq > after_seq`, in ascending `seq` order (for verification).
    fn scan_audit(&mut self, after_seq: i64, limit: u32) -> Result<Vec<AuditEvent>, StoreError>;

    /// Inserts a connector and its sealed credentials. Duplicate name →
    /// [`StoreError::Conflict`] (the transaction stays usable).
    fn insert_connector(
        &mut self,
        connector: &Connector,
        credentials: &SealedCredentials,
    ) -> Result<(), StoreError>;
    /// Overwrites a connector's mutable fields (name, environment, settings, status, test and
    /// discovery times, updated_at). Duplicate name → [`StoreError::Conflict`] (the
    /// transaction stays usable). `credential_keys` is ignored: see
    /// [`Repo::replace_credentials`].
    fn update_connector(&mut self, connector: &Connector) -> Result<(), StoreError>;
    /// A connector by id (with its credential names).
    fn get_connector(&mut self, id: &ConnectorId) -> Result<Option<Connector>, StoreError>;
    /// A connector by id, locked until the end of the transaction (`FOR UPDATE` on
    /// PostgreSQL; SQLite transactions hold the write lock already).
    fn lock_connector(&mut self, id: &ConnectorId) -> Result<Option<Connector>, StoreError>;
    /// Connectors, newest first, keyset by id.
    fn list_connectors(&mut self, page: &Page) -> Result<Vec<Connector>, StoreError>;
    /// Deletes a connector with its credentials and assets. Returns whether it existed.
    fn delete_connector(&mut self, id: &ConnectorId) -> Result<bool, StoreError>;
    /// The sealed credentials of a connector.
    fn get_credentials(&mut self, id: &ConnectorId) -> Result<SealedCredentials, StoreError>;
    /// Replaces the whole stored credential set of a connector.
    fn replace_credentials(
        &mut self,
        id: &ConnectorId,
        credentials: &SealedCredentials,
    ) -> Result<(), StoreError>;
    /// Every stored credential of every connector, ordered by connector id then name (for
    /// re-sealing under a new master key).
    fn all_credentials(&mut self) -> Result<Vec<(ConnectorId, String, SealedValue)>, StoreError>;
    /// Overwrites one stored credential value.
    fn update_credential(
        &mut self,
        id: &ConnectorId,
        name: &str,
        value: &SealedValue,
    ) -> Result<(), StoreError>;

    /// Inserts a job. A second queued or running discovery of the same connector →
    /// [`StoreError::Conflict`] (the transaction stays usable).
    fn insert_job(&mut self, job: &Job) -> Result<(), StoreError>;
    /// A job by id.
    fn get_job(&mut self, id: &JobId) -> Result<Option<Job>, StoreError>;
    /// A job by id, locked until the end of the transaction (`FOR UPDATE` on PostgreSQL).
    fn lock_job(&mut self, id: &JobId) -> Result<Option<Job>, StoreError>;
    /// Overwrites a job's mutable fields (status, progress, result, error, times, lease,
    /// attempts).
    fn update_job(&mut self, job: &Job) -> Result<(), StoreError>;
    /// The queued or running job of `kind` on a resource, if any (the newest).
    fn find_active_job(
        &mut self,
        kind: JobKind,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<Job>, StoreError>;
    /// The oldest job of one of `kinds` that a worker may claim at `now` (queued, or running
    /// with an expired lease), locked for this transaction so no other worker gets it:
    /// `FOR UPDATE SKIP LOCKED` on PostgreSQL, the write lock of the transaction on SQLite.
    fn next_claimable_job(
        &mut self,
        kinds: &[JobKind],
        now: Timestamp,
    ) -> Result<Option<Job>, StoreError>;

    /// Every stored asset of a connector, removed ones included.
    fn connector_assets(&mut self, connector_id: &ConnectorId) -> Result<Vec<Asset>, StoreError>;
    /// Inserts new assets.
    fn insert_assets(&mut self, assets: &[Asset]) -> Result<(), StoreError>;
    /// Overwrites an asset's name, region, environment, attributes, last_seen_at and
    /// removed_at.
    fn update_asset(&mut self, asset: &Asset) -> Result<(), StoreError>;
    /// Sets `last_seen_at` of these assets.
    fn touch_assets(&mut self, ids: &[AssetId], at: Timestamp) -> Result<(), StoreError>;
    /// Sets `removed_at` of these assets.
    fn mark_assets_removed(&mut self, ids: &[AssetId], at: Timestamp) -> Result<(), StoreError>;
    /// Sets the environment of every asset of a connector (after the connector's changed).
    fn set_assets_environment(
        &mut self,
        connector_id: &ConnectorId,
        environment: Environment,
    ) -> Result<(), StoreError>;
    /// Number of stored assets of a connector, removed ones included.
    fn count_connector_assets(&mut self, connector_id: &ConnectorId) -> Result<i64, StoreError>;
    /// Assets matching `filter`, newest first, keyset by id.
    fn list_assets(&mut self, filter: &AssetFilter, page: &Page) -> Result<Vec<Asset>, StoreError>;
    /// An asset by id.
    fn get_asset(&mut self, id: &AssetId) -> Result<Option<Asset>, StoreError>;

    /// Inserts a change request.
    fn insert_change_request(&mut self, cr: &ChangeRequest) -> Result<(), StoreError>;
    /// Overwrites every mutable field of a change request (all but id, change type,
    /// connector, requester and created_at).
    fn update_change_request(&mut self, cr: &ChangeRequest) -> Result<(), StoreError>;
    /// A change request by id.
    fn get_change_request(
        &mut self,
        id: &ChangeRequestId,
    ) -> Result<Option<ChangeRequest>, StoreError>;
    /// A change request by id, locked until the end of the transaction (`FOR UPDATE` on
    /// PostgreSQL; SQLite transactions hold the write lock already), so that concurrent
    /// transitions of the same change request run one after the other.
    fn lock_change_request(
        &mut self,
        id: &ChangeRequestId,
    ) -> Result<Option<ChangeRequest>, StoreError>;
    /// Change requests matching `filter`, newest first, keyset by id.
    fn list_change_requests(
        &mut self,
        filter: &ChangeRequestFilter,
        page: &Page,
    ) -> Result<Vec<ChangeRequest>, StoreError>;
    /// Number of change requests on a connector that are in one of `states`.
    fn count_connector_change_requests(
        &mut self,
        connector_id: &ConnectorId,
        states: &[State],
    ) -> Result<i64, StoreError>;

    /// The journal of a change request's execution or rollback.
    fn get_journal(
        &mut self,
        id: &ChangeRequestId,
        kind: JournalKind,
    ) -> Result<Option<Journal>, StoreError>;
    /// Every journal of these change requests, in one query per few hundred ids (for lists).
    fn get_journals(
        &mut self,
        ids: &[ChangeRequestId],
    ) -> Result<Vec<(ChangeRequestId, Journal)>, StoreError>;
    /// Stores a journal (inserts it, or replaces the one of the same kind).
    fn put_journal(
        &mut self,
        id: &ChangeRequestId,
        journal: &Journal,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Stores a sealed secret output of a change request (replacing one of the same name).
    fn put_secret(
        &mut self,
        id: &ChangeRequestId,
        name: &str,
        value: &SealedValue,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// The sealed secret outputs of a change request, by name.
    fn get_secrets(
        &mut self,
        id: &ChangeRequestId,
    ) -> Result<Vec<(String, SealedValue)>, StoreError>;
    /// Deletes every secret output of a change request; returns how many there were.
    fn delete_secrets(&mut self, id: &ChangeRequestId) -> Result<u64, StoreError>;
    /// Every sealed secret output (for re-sealing under a new master key).
    fn all_secrets(&mut self) -> Result<Vec<(ChangeRequestId, String, SealedValue)>, StoreError>;

    /// Inserts an enrollment token.
    fn insert_enrollment_token(&mut self, token: &EnrollmentToken) -> Result<(), StoreError>;
    /// Enrollment tokens, newest first, keyset by id.
    fn list_enrollment_tokens(&mut self, page: &Page) -> Result<Vec<EnrollmentToken>, StoreError>;
    /// An enrollment token by id.
    fn get_enrollment_token(
        &mut self,
        id: &EnrollmentTokenId,
    ) -> Result<Option<EnrollmentToken>, StoreError>;
    /// Sets `revoked_at` (if not set yet); `false` when there is no such token.
    fn revoke_enrollment_token(
        &mut self,
        id: &EnrollmentTokenId,
        at: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Consumes one use of the token with this hash if it is usable at `now` (not revoked,
    /// not expired, uses below max_uses), atomically (one conditional UPDATE, so racing
    /// registrations never exceed max_uses). Returns the token after the update, or `None`.
    fn consume_enrollment_token(
        &mut self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<Option<EnrollmentToken>, StoreError>;
    /// Inserts an agent.
    fn insert_agent(&mut self, agent: &Agent) -> Result<(), StoreError>;
    /// An agent by id.
    fn get_agent(&mut self, id: &AgentId) -> Result<Option<Agent>, StoreError>;
    /// Agents, newest first, keyset by id.
    fn list_agents(&mut self, page: &Page) -> Result<Vec<Agent>, StoreError>;
    /// Overwrites an agent's mutable fields (name, hostname, os, arch, version, labels,
    /// sealed secret, last heartbeat, revoked_at).
    fn update_agent(&mut self, agent: &Agent) -> Result<(), StoreError>;
    /// Remembers the signature of an accepted agent request until `expires_at`; `false` when
    /// it was seen already (a replay).
    fn remember_signature(
        &mut self,
        agent_id: &AgentId,
        signature: &str,
        expires_at: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Forgets the signatures that expired before `now`; returns how many.
    fn forget_signatures(&mut self, now: Timestamp) -> Result<u64, StoreError>;
    /// Inserts a command. A second command for the same (job, step) is a
    /// `StoreError::Conflict`.
    fn insert_command(&mut self, command: &AgentCommand) -> Result<(), StoreError>;
    /// A command by id.
    fn get_command(&mut self, id: &CommandId) -> Result<Option<AgentCommand>, StoreError>;
    /// A command by id, locked until the end of the transaction.
    fn lock_command(&mut self, id: &CommandId) -> Result<Option<AgentCommand>, StoreError>;
    /// The command a job sent for a step, if any.
    fn find_job_command(
        &mut self,
        job_id: &JobId,
        step: &str,
    ) -> Result<Option<AgentCommand>, StoreError>;
    /// The oldest `queued` command of an agent, locked (`FOR UPDATE SKIP LOCKED` on
    /// PostgreSQL), so two polls never take the same command.
    fn next_queued_command(
        &mut self,
        agent_id: &AgentId,
    ) -> Result<Option<AgentCommand>, StoreError>;
    /// Overwrites a command's status, output, snapshot, error and times.
    fn update_command(&mut self, command: &AgentCommand) -> Result<(), StoreError>;
    /// An agent's commands in one of `statuses`, oldest first.
    fn agent_commands(
        &mut self,
        agent_id: &AgentId,
        statuses: &[CommandStatus],
    ) -> Result<Vec<AgentCommand>, StoreError>;
    /// The agents that have at least one `queued` command (one query for all agents).
    fn agents_with_queued_commands(&mut self) -> Result<Vec<AgentId>, StoreError>;
    /// Every sealed command snapshot (for re-sealing under a new master key).
    fn all_command_snapshots(&mut self) -> Result<Vec<(CommandId, SealedValue)>, StoreError>;
    /// Replaces a command's sealed snapshot.
    fn set_command_snapshot(
        &mut self,
        id: &CommandId,
        value: &SealedValue,
    ) -> Result<(), StoreError>;
}

/// A database: runs closures inside transactions.
pub trait Store: Send + Sync {
    /// Runs `f` in one transaction; commits when it returns `Ok`, rolls back on `Err`.
    /// Prefer the typed helper [`transaction`].
    fn transaction_dyn(
        &self,
        f: &mut dyn FnMut(&mut dyn Repo) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Runs read-only `f` on one connection without opening a write transaction (each
    /// statement sees committed data). Cheaper than [`Store::transaction_dyn`] on the hot
    /// path (authentication). The default runs it in a transaction.
    fn read_dyn(
        &self,
        f: &mut dyn FnMut(&mut dyn Repo) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.transaction_dyn(f)
    }
    /// Checks that the database answers.
    fn ping(&self) -> Result<(), StoreError>;
}

/// The dyn-safe entry points of [`Store`], for [`run_typed`].
type DynRunner<'s> =
    &'s dyn Fn(&mut dyn FnMut(&mut dyn Repo) -> Result<(), StoreError>) -> Result<(), StoreError>;

/// Runs a typed closure through one of the store's dyn-safe entry points, carrying its value
/// or its own error type out.
fn run_typed<T, E, F>(run: DynRunner<'_>, f: F) -> Result<T, E>
where
    E: From<StoreError>,
    F: FnOnce(&mut dyn Repo) -> Result<T, E>,
{
    let mut f = Some(f);
    let mut out: Option<Result<T, E>> = None;
    let r = run(&mut |repo| {
        let Some(f) = f.take() else {
            return Err(StoreError::Other("store closure called twice".into()));
        };
        let res = f(repo);
        let failed = res.is_err();
        out = Some(res);
        if failed {
            Err(StoreError::RolledBack)
        } else {
            Ok(())
        }
    });
    match (r, out) {
        (_, Some(Err(e))) => Err(e),
        (Ok(()), Some(Ok(v))) => Ok(v),
        (Err(e), _) => Err(e.into()),
        (Ok(()), None) => Err(StoreError::Other("store closure not run".into()).into()),
    }
}

/// Runs `f` in one transaction of `store`, with any error type that a [`StoreError`] converts
/// into. The transaction commits only when `f` returns `Ok` and the commit succeeds.
pub fn transaction<T, E, F>(store: &dyn Store, f: F) -> Result<T, E>
where
    E: From<StoreError>,
    F: FnOnce(&mut dyn Repo) -> Result<T, E>,
{
    run_typed(&|g| store.transaction_dyn(g), f)
}

/// Runs read-only `f` against `store` without a write transaction (see [`Store::read_dyn`]).
/// Use it only for closures that write nothing.
pub fn read<T, E, F>(store: &dyn Store, f: F) -> Result<T, E>
where
    E: From<StoreError>,
    F: FnOnce(&mut dyn Repo) -> Result<T, E>,
{
    run_typed(&|g| store.read_dyn(g), f)
}

/// A crypto failure (key material or a backend error; never carries secret values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("crypto error: {0}")]
pub struct CryptoError(pub String);

/// Why an access token was refused. Every variant is a 401 to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Expired.
    #[error("token expired")]
    Expired,
    /// Malformed, wrong algorithm, unknown key, bad signature or wrong claims.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Seals credential values for storage and opens them again (AES-256-GCM in
/// `nexplane-crypto`). `aad` binds a sealed value to its record (the connector id), so it
/// does not open anywhere else.
pub trait CredentialSealer: Send + Sync {
    /// Encrypts `value` under the current master key with a fresh nonce.
    fn seal(&self, value: &SecretString, aad: &str) -> Result<SealedValue, CryptoError>;
    /// Decrypts a value made by [`CredentialSealer::seal`] with the same `aad`, under
    /// whichever known key it names.
    fn open(&self, sealed: &SealedValue, aad: &str) -> Result<SecretString, CryptoError>;
}

/// Computes and checks agent request signatures (api.md §7.2: HMAC-SHA256 over the method,
/// the path with its query, the timestamp and the body's SHA-256).
pub trait AgentSigner: Send + Sync {
    /// The lowercase hex signature of a request.
    fn sign(
        &self,
        secret: &[u8],
        method: &str,
        path_with_query: &str,
        timestamp: i64,
        body: &[u8],
    ) -> String;
    /// Whether `signature` is the signature of this request (constant-time comparison).
    fn verify(
        &self,
        secret: &[u8],
        method: &str,
        path_with_query: &str,
        timestamp: i64,
        body: &[u8],
        signature: &str,
    ) -> bool;
}

/// Password hashing (argon2id). Blocking and slow by design: call on a blocking pool.
pub trait PasswordHasher: Send + Sync {
    /// Hashes a password with a fresh salt.
    fn hash(&self, password: &SecretString) -> Result<PasswordHash, CryptoError>;
    /// Whether `password` matches `hash`.
    fn verify(&self, hash: &PasswordHash, password: &SecretString) -> Result<bool, CryptoError>;
}

/// Signs and verifies RS256 access tokens and publishes the verification keys.
pub trait TokenSigner: Send + Sync {
    /// Signs `claims` with the current key (header carries its `kid`).
    fn sign(&self, claims: &AccessClaims) -> Result<String, CryptoError>;
    /// Verifies signature (RS256 with a known `kid` only), `exp` against `now`, `aud`, `iss`
    /// and `typ`, and returns the claims.
    fn verify(&self, token: &str, now: Timestamp) -> Result<AccessClaims, TokenError>;
    /// The JWKS document (`{"keys":[…]}`).
    fn jwks(&self) -> serde_json::Value;
    /// The issuer this signer puts in and expects in `iss`.
    fn issuer(&self) -> &str;
}

/// The clock.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// A cryptographically secure random source.
pub trait Random: Send + Sync {
    /// 128 random bits.
    fn u128(&self) -> u128;
    /// A URL-safe random token with at least `bits` bits of entropy.
    fn token(&self, bits: usize) -> SecretString;
}
