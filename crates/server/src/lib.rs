//! # nexplane (server)
//!
//! Wires the adapters (store, crypto) into the use cases and the HTTP layer, and runs them.
//! The binary's CLI lives in `main.rs`; integration tests start the server through [`start`].
//!
//! Licensed GPL-3.0-or-later because it links `actix-governor` (through `nexplane-api`).
#![deny(missing_docs)]

pub mod config;
pub mod worker;

use config::Config;
use nexplane_api::{ApiConfig, ApiState};
use nexplane_app::{App, Deps, Settings};
use nexplane_crypto::{Argon2Hasher, MasterKey, OsRandom, RsaTokenSigner, Sealer};
use nexplane_domain::{SecretString, Timestamp};
use nexplane_ports::cloud::{ChangeProvider, CloudProvider};
use nexplane_ports::{Clock, CredentialSealer, Random};
use nexplane_store::{Db, DbOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Issuer (`iss`) of access tokens.
pub const TOKEN_ISSUER: &str = "nexplane";
/// File in the data dir that holds a generated bootstrap admin password (mode 0600).
pub const ADMIN_PASSWORD_FILE: &str = "initial-admin-password";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Database(String),
    /// Keys could not be loaded or created.
    #[error("keys: {0}")]
    Keys(String),
    /// Anything else (IO, bind).
    #[error("{0}")]
    Other(String),
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp::from_millis(ms)
    }
}

/// Opens (and migrates) the database named by the configuration.
pub fn open_database(cfg: &Config) -> Result<Db, StartError> {
    if cfg.database_url.starts_with("sqlite://") {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            StartError::Other(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
    }
    let db = Db::connect(
        &cfg.database_url,
        DbOptions {
            max_size: cfg.db_pool_size,
            connect_timeout: Duration::from_secs(cfg.db_connect_timeout_secs),
        },
    )
    .map_err(|e| StartError::Database(e.to_string()))?;
    let applied = db
        .migrate()
        .map_err(|e| StartError::Database(e.to_string()))?;
    for m in applied {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(db)
}

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// `NEXPLANE_MASTER_KEY` (the value itself).
    Env,
    /// A key file: `NEXPLANE_MASTER_KEY_FILE`, or `master.key` generated in the data dir.
    File(PathBuf),
}

/// The master keys in force: the current one (seals), the retained ones (still open values
/// sealed before a rotation: `<key file>.previous-*`, and `<key file>.next` left by an
/// interrupted rotation), and where the current one comes from.
pub fn load_master_keys(
    cfg: &Config,
) -> Result<(MasterKey, Vec<MasterKey>, MasterKeySource), StartError> {
    let keys_err = |e: nexplane_ports::CryptoError| StartError::Keys(format!("master key: {e}"));
    let (current, source) = match (&cfg.master_key, &cfg.master_key_file) {
        (Some(k), _) => (
            MasterKey::from_base64(k.expose())
                .map_err(|e| StartError::Keys(format!("NEXPLANE_MASTER_KEY: {e}")))?,
            MasterKeySource::Env,
        ),
        (None, Some(p)) => (
            MasterKey::from_file(p)
                .map_err(|e| StartError::Keys(format!("NEXPLANE_MASTER_KEY_FILE: {e}")))?,
            MasterKeySource::File(p.clone()),
        ),
        (None, None) => (
            MasterKey::load_or_generate(&cfg.data_dir).map_err(keys_err)?,
            MasterKeySource::File(cfg.data_dir.join(nexplane_crypto::MASTER_KEY_FILE)),
        ),
    };
    let retained = match &source {
        MasterKeySource::File(p) => MasterKey::load_retained(p).map_err(keys_err)?,
        MasterKeySource::Env => Vec::new(),
    };
    let mut unique: Vec<MasterKey> = Vec::new();
    for k in retained {
        if k.id() != current.id() && !unique.iter().any(|u| u.id() == k.id()) {
            unique.push(k);
        }
    }
    Ok((current, unique, source))
}

/// The provider adapters the application runs on.
#[derive(Clone)]
pub struct Providers {
    /// Connector tests and discovery.
    pub cloud: Arc<dyn CloudProvider>,
    /// Prechecks, steps and undo steps of change types.
    pub changes: Arc<dyn ChangeProvider>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Providers")
    }
}

impl Providers {
    /// Both roles played by one `aws` adapter.
    pub fn aws(provider: nexplane_aws::AwsProvider) -> Self {
        let aws = Arc::new(provider);
        Self {
            cloud: aws.clone(),
            changes: aws,
        }
    }
}

/// The default providers: the `aws` adapter.
pub fn default_providers() -> Providers {
    Providers::aws(nexplane_aws::AwsProvider::new())
}

/// Builds the application (database, keys, bootstrap admin) without serving it.
pub fn build_app(cfg: &Config, clock: Arc<dyn Clock>) -> Result<App, StartError> {
    build_app_with(cfg, clock, default_providers(), None)
}

/// [`build_app`] with the cloud providers given, and optionally a credential sealer other
/// than the one of the configured master keys (the master-key rotation uses that).
pub fn build_app_with(
    cfg: &Config,
    clock: Arc<dyn Clock>,
    providers: Providers,
    sealer: Option<Arc<dyn CredentialSealer>>,
) -> Result<App, StartError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| StartError::Other(format!("cannot create {}: {e}", cfg.data_dir.display())))?;
    let db = open_database(cfg)?;
    let signer = match &cfg.jwt_key_file {
        Some(p) => RsaTokenSigner::from_pem_file(p, TOKEN_ISSUER.into()),
        None => RsaTokenSigner::load_or_generate(&cfg.data_dir, TOKEN_ISSUER.into()),
    }
    .map_err(|e| StartError::Keys(e.to_string()))?;
    signer
        .load_previous_keys(&cfg.data_dir, clock.now())
        .map_err(|e| StartError::Keys(e.to_string()))?;
    // The master key seals connector credentials; it exists from the first start.
    let sealer = match sealer {
        Some(s) => s,
        None => {
            let (current, retained, _) = load_master_keys(cfg)?;
            Arc::new(
                Sealer::from_master_keys(&current, &retained)
                    .map_err(|e| StartError::Keys(format!("master key: {e}")))?,
            )
        }
    };
    let random: Arc<dyn Random> = Arc::new(OsRandom::new());
    let app = App::new(
        Deps {
            store: Arc::new(db),
            hasher: Arc::new(Argon2Hasher::new()),
            signer: Arc::new(signer),
            clock,
            random: random.clone(),
            sealer,
            cloud: providers.cloud,
            changes: providers.changes,
            agent_signer: Arc::new(nexplane_crypto::HmacAgentSigner),
        },
        Settings {
            session_ttl_secs: cfg.session_ttl_secs,
            allow_self_approval: cfg.allow_self_approval,
            required_approvals: cfg.required_approvals,
            job_lease_secs: cfg.job_lease_secs,
            ..Settings::default()
        },
    );
    bootstrap(cfg, &app, random.as_ref())?;
    Ok(app)
}

fn bootstrap(cfg: &Config, app: &App, random: &dyn Random) -> Result<(), StartError> {
    let (password, generated) = match &cfg.admin_password {
        Some(p) => (p.clone(), false),
        None => (random.token(128), true),
    };
    let created = app
        .bootstrap_admin(&cfg.admin_email, &password)
        .map_err(|e| StartError::Other(format!("bootstrap admin: {e}")))?;
    if let Some(user) = created {
        if generated {
            let path = cfg.data_dir.join(ADMIN_PASSWORD_FILE);
            write_private(&path, password.expose())
                .map_err(|e| StartError::Other(format!("cannot write {}: {e}", path.display())))?;
            tracing::warn!(
                email = %user.email,
                password_file = %path.display(),
                "created the bootstrap admin with a generated password; read it from the password file, change it, then delete the file"
            );
        } else {
            tracing::info!(email = %user.email, "created the bootstrap admin");
        }
    }
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Stops the server.
    pub handle: actix_web::dev::ServerHandle,
    /// Completes when the server has stopped.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The job worker (discoveries, executions, rollbacks).
    pub worker: worker::WorkerHandle,
    /// Wakes agents' long polls for commands queued elsewhere; forgets old signatures.
    pub watcher: tokio::task::JoinHandle<()>,
}

/// Builds everything and starts serving on `cfg.bind`. Must run inside a tokio runtime.
pub async fn start(cfg: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    start_with(cfg, clock, default_providers()).await
}

/// [`start`] with the cloud providers given.
pub async fn start_with(
    cfg: Config,
    clock: Arc<dyn Clock>,
    providers: Providers,
) -> Result<Running, StartError> {
    let c = cfg.clone();
    let app = tokio::task::spawn_blocking(move || build_app_with(&c, clock, providers, None))
        .await
        .map_err(|e| StartError::Other(e.to_string()))??;
    let worker = worker::spawn(
        app.clone(),
        worker::WorkerOptions::new(cfg.job_workers, cfg.job_lease_secs)
            .with_test_pause(
                cfg.test_pause_at.clone(),
                cfg.data_dir.join(worker::PAUSE_MARKER),
            )
            .with_agent_command_timeout(std::time::Duration::from_secs(
                cfg.agent_command_timeout_secs,
            )),
    );
    let listener = TcpListener::bind(cfg.bind).map_err(|e| {
        StartError::Other(format!("NEXPLANE_BIND: cannot listen on {}: {e}", cfg.bind))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let state = ApiState::new(
        app.clone(),
        ApiConfig {
            rate_limit_per_minute: cfg.rate_limit_per_minute,
            ip_rate_limit_per_minute: cfg.ip_rate_limit_per_minute,
            login_rate_limit_per_minute: cfg.login_rate_limit_per_minute,
            agent_rate_limit_per_minute: cfg.agent_rate_limit_per_minute,
        },
    );
    // A command queued by this process wakes its agent's long poll at once; the watcher
    // wakes polls for commands queued by other replicas (one query per second in all).
    let wakeups = state.wakeups.clone();
    app.on_command_queued(Box::new(move |agent| wakeups.wake(agent)));
    let watcher = worker::spawn_agent_watcher(app, state.wakeups.clone());
    let server = nexplane_api::serve(state, listener, cfg.workers)
        .map_err(|e| StartError::Other(e.to_string()))?;
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(%addr, "listening");
    Ok(Running {
        addr,
        handle,
        task,
        worker,
        watcher,
    })
}

/// What `nexplane keys rotate-master` did.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Credential values re-sealed.
    pub resealed: usize,
    /// Id of the new master key.
    pub new_key_id: String,
    /// Id of the key it replaced.
    pub previous_key_id: String,
    /// Where the previous key is kept (when the key is a file), until the operator removes it.
    pub previous_key_file: Option<PathBuf>,
}

/// Rotates the master key: re-seals every stored credential under a new key (read from
/// `new_key_file`, else generated) in one transaction.
///
/// With a key file (generated `master.key`, or `NEXPLANE_MASTER_KEY_FILE`), the old key is
/// first kept as `<key file>.previous-<id>` and the new one written as `<key file>.next`;
/// after the commit the new key replaces the key file. Until the operator deletes the
/// `.previous-` file, the server still opens values sealed with the old key. With
/// `NEXPLANE_MASTER_KEY` (a value), `new_key_file` is required and the operator then sets
/// `NEXPLANE_MASTER_KEY` to its contents.
///
/// Run it while the servers are stopped: a server holds the keys it read at start.
pub fn rotate_master_key(
    cfg: &Config,
    clock: Arc<dyn Clock>,
    new_key_file: Option<&Path>,
) -> Result<Rotation, StartError> {
    let keys_err = |e: nexplane_ports::CryptoError| StartError::Keys(e.to_string());
    let (current, retained, source) = load_master_keys(cfg)?;
    let new = match new_key_file {
        Some(p) => MasterKey::from_file(p).map_err(keys_err)?,
        None => MasterKey::generate().map_err(keys_err)?,
    };
    if new.id() == current.id() {
        return Err(StartError::Keys(
            "the new master key is the current one".into(),
        ));
    }
    let previous_key_file = match &source {
        MasterKeySource::File(p) => Some(current.begin_rotation(p, &new).map_err(keys_err)?),
        MasterKeySource::Env if new_key_file.is_none() => {
            return Err(StartError::Keys(
                "NEXPLANE_MASTER_KEY is set: pass the new key with --new-key-file PATH".into(),
            ))
        }
        MasterKeySource::Env => None,
    };
    let mut previous = vec![current.clone()];
    previous.extend(retained.into_iter().filter(|k| k.id() != new.id()));
    let sealer = Sealer::from_master_keys(&new, &previous).map_err(keys_err)?;
    let app = build_app_with(cfg, clock, default_providers(), Some(Arc::new(sealer)))?;
    let resealed = app
        .reseal_credentials(&new.id())
        .map_err(|e| StartError::Other(format!("re-sealing credentials: {e}")))?;
    if let MasterKeySource::File(p) = &source {
        MasterKey::finish_rotation(p).map_err(keys_err)?;
    }
    Ok(Rotation {
        resealed,
        new_key_id: new.id(),
        previous_key_id: current.id(),
        previous_key_file,
    })
}

/// Reads a password from standard input (one line).
pub fn read_password_stdin() -> std::io::Result<SecretString> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(SecretString::new(
        line.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

/// Rotates the token-signing key kept in the data dir: a new key signs from the next start,
/// the old one still verifies (and is published) until the tokens it signed have expired.
/// Returns (old kid, new kid).
pub fn rotate_jwt_key(cfg: &Config, now: Timestamp) -> Result<(String, String), StartError> {
    if cfg.jwt_key_file.is_some() {
        return Err(StartError::Keys(
            "NEXPLANE_JWT_KEY_FILE is set: rotate by replacing that file".into(),
        ));
    }
    let signer = RsaTokenSigner::load_or_generate(&cfg.data_dir, TOKEN_ISSUER.into())
        .map_err(|e| StartError::Keys(e.to_string()))?;
    let old = signer.current_kid();
    let new = signer
        .rotate(now)
        .map_err(|e| StartError::Keys(e.to_string()))?;
    Ok((old, new))
}
