//! # nexplane (server)
//!
//! Wires the adapters (store, crypto) into the use cases and the HTTP layer, and runs them.
//! The binary's CLI lives in `main.rs`; integration tests start the server through [`start`].
//!
//! Licensed GPL-3.0-or-later because it links `actix-governor` (through `nexplane-api`).
#![deny(missing_docs)]

pub mod config;

use config::Config;
use nexplane_api::{ApiConfig, ApiState};
use nexplane_app::{App, Deps, Settings};
use nexplane_crypto::{Argon2Hasher, MasterKey, OsRandom, RsaTokenSigner};
use nexplane_domain::{SecretString, Timestamp};
use nexplane_ports::{Clock, Random};
use nexplane_store::{Db, DbOptions};
use std::net::{SocketAddr, TcpListener};
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

/// Builds the application (database, keys, bootstrap admin) without serving it.
pub fn build_app(cfg: &Config, clock: Arc<dyn Clock>) -> Result<App, StartError> {
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
    // The master key seals connector credentials; make sure it exists from the first start.
    let _master = match (&cfg.master_key, &cfg.master_key_file) {
        (Some(k), _) => MasterKey::from_base64(k.expose()),
        (None, Some(p)) => MasterKey::from_file(p),
        (None, None) => MasterKey::load_or_generate(&cfg.data_dir),
    }
    .map_err(|e| StartError::Keys(format!("NEXPLANE_MASTER_KEY: {e}")))?;
    let random: Arc<dyn Random> = Arc::new(OsRandom::new());
    let app = App::new(
        Deps {
            store: Arc::new(db),
            hasher: Arc::new(Argon2Hasher::new()),
            signer: Arc::new(signer),
            clock,
            random: random.clone(),
        },
        Settings {
            session_ttl_secs: cfg.session_ttl_secs,
            allow_self_approval: cfg.allow_self_approval,
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
}

/// Builds everything and starts serving on `cfg.bind`. Must run inside a tokio runtime.
pub async fn start(cfg: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    let c = cfg.clone();
    let app = tokio::task::spawn_blocking(move || build_app(&c, clock))
        .await
        .map_err(|e| StartError::Other(e.to_string()))??;
    let listener = TcpListener::bind(cfg.bind).map_err(|e| {
        StartError::Other(format!("NEXPLANE_BIND: cannot listen on {}: {e}", cfg.bind))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let state = ApiState::new(
        app,
        ApiConfig {
            rate_limit_per_minute: cfg.rate_limit_per_minute,
            ip_rate_limit_per_minute: cfg.ip_rate_limit_per_minute,
            login_rate_limit_per_minute: cfg.login_rate_limit_per_minute,
        },
    );
    let server = nexplane_api::serve(state, listener, cfg.workers)
        .map_err(|e| StartError::Other(e.to_string()))?;
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(%addr, "listening");
    Ok(Running { addr, handle, task })
}

/// Reads a password from standard input (one line).
pub fn read_password_stdin() -> std::io::Result<SecretString> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(SecretString::new(
        line.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}
