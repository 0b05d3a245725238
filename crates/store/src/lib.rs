//! # nexplane-store
//!
//! The storage adapter of Nexplane: one diesel codebase over SQLite (the embedded default)
//! and PostgreSQL (production, several replicas), an r2d2 connection pool, and one embedded
//! migration tree per backend (`migrations/sqlite`, `migrations/postgres`).
//!
//! [`Db`] implements [`nexplane_ports::Store`]: every use case runs in one transaction on one
//! pooled connection, through the [`nexplane_ports::Repo`] operations.
//!
//! * SQLite connections use WAL, a busy timeout and foreign keys; transactions start with
//!   `BEGIN IMMEDIATE`, so concurrent writers queue on the busy timeout instead of failing
//!   when a reader upgrades to a writer.
//! * PostgreSQL transactions are ordinary (read committed); audit appends take a
//!   transaction-scoped advisory lock so the hash chain stays linear across processes.
//! * Lists page by keyset (`WHERE key < :after ORDER BY key DESC LIMIT n`), never OFFSET.
//!
//! Everything here is blocking: call it from a blocking thread pool.
//!
//! ```no_run
//! use nexplane_store::{Db, DbOptions};
//! # fn main() -> Result<(), nexplane_ports::StoreError> {
//! let db = Db::connect("sqlite:///var/lib/nexplane/nexplane.db", DbOptions::default())?;
//! let applied = db.migrate()?;
//! let users = nexplane_ports::transaction(&db, |repo| repo.count_users())?;
//! # let _ = (applied, users);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod conn;
mod error;
mod models;
mod repo;
mod schema;

use crate::conn::{DbConn, Manager, SqliteSettings};
use crate::error::{conn_message, db_err, pool_err};
use crate::repo::SqlRepo;
use diesel::connection::AnsiTransactionManager;
use diesel::r2d2::R2D2Connection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use nexplane_ports::{Repo, Store, StoreError};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The SQLite migration tree, embedded at build time.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
/// The PostgreSQL migration tree, embedded at build time.
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

/// How long a SQLite writer waits for the write lock before giving up.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;
/// Key of the PostgreSQL advisory lock held while migrating ("nxpmigra").
const MIGRATION_LOCK_KEY: i64 = 0x6e78_706d_6967_7261;
/// Upper bound for the pool checkout of [`Store::ping`].
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The database engine behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// SQLite, a file on local disk.
    Sqlite,
    /// PostgreSQL, over the network.
    Postgres,
}

impl Backend {
    /// `"sqlite"` or `"postgres"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Pool settings of [`Db::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbOptions {
    /// Maximum number of pooled connections (at least 1).
    pub max_size: u32,
    /// How long to wait for a connection: to establish one (PostgreSQL `connect_timeout`,
    /// rounded up to whole seconds) and to check one out of the pool.
    pub connect_timeout: Duration,
}

impl Default for DbOptions {
    /// 10 connections, 5 s timeout.
    fn default() -> Self {
        Self {
            max_size: 10,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A pooled database of either backend. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Db {
    pool: r2d2::Pool<Manager>,
    backend: Backend,
    checkout_timeout: Duration,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.pool.state();
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

/// What a database URL designates: the backend and the string handed to the driver.
struct Target {
    backend: Backend,
    driver_url: String,
}

impl Target {
    /// `postgres://…` / `postgresql://…`, `sqlite://PATH`, `sqlite:PATH` or a bare path.
    fn parse(url: &str, connect_timeout: Duration) -> Result<Target, StoreError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target {
                backend: Backend::Postgres,
                driver_url: with_connect_timeout(url, connect_timeout),
            });
        }
        let path = if let Some(rest) = url.strip_prefix("sqlite://") {
            rest
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            rest
        } else if url.contains("://") {
            let scheme = url.split("://").next().unwrap_or_default();
            return Err(StoreError::Other(format!(
                "unsupported database URL scheme {scheme:?} (use sqlite:// or postgres://)"
            )));
        } else {
            url
        };
        if path.is_empty() || path == ":memory:" {
            return Err(StoreError::Other(
                "a SQLite database needs a file path (sqlite://PATH)".into(),
            ));
        }
        Ok(Target {
            backend: Backend::Sqlite,
            driver_url: path.to_owned(),
        })
    }
}

/// Adds libpq's `connect_timeout` (whole seconds, at least 1) unless the URL sets one.
fn with_connect_timeout(url: &str, timeout: Duration) -> String {
    if url.contains("connect_timeout=") {
        return url.to_owned();
    }
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}connect_timeout={}", secs.max(1))
}

/// Creates the parent directory and the database file (owner-only on Unix: it holds
/// password hashes).
fn prepare_sqlite_file(path: &str) -> Result<(), StoreError> {
    let path = Path::new(path);
    let fail = |what: &str, e: std::io::Error| {
        StoreError::Unavailable(format!("cannot {what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail("create directory for", e))?;
    }
    if !path.exists() {
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            open.mode(0o600);
        }
        open.open(path).map_err(|e| fail("create", e))?;
    }
    Ok(())
}

/// Logs connection errors the pool meets in the background.
#[derive(Debug, Clone, Copy)]
struct LogPoolErrors;

impl r2d2::HandleError<diesel::r2d2::Error> for LogPoolErrors {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::warn!(%error, "database connection error");
    }
}

impl Db {
    /// Connects to the database at `url` and builds the pool.
    ///
    /// * `postgres://…` or `postgresql://…`: PostgreSQL.
    /// * `sqlite://PATH`, `sqlite:PATH` or a bare `PATH`: a SQLite file; its directory and
    ///   the file are created if missing (`sqlite:///abs/path` for an absolute path).
    ///
    /// One connection is opened directly first, so a failure reports the driver's own
    /// cause (e.g. "Connection refused") as [`StoreError::Unavailable`] within
    /// `opts.connect_timeout`, instead of a generic pool timeout.
    pub fn connect(url: &str, opts: DbOptions) -> Result<Db, StoreError> {
        let timeout = opts.connect_timeout.max(Duration::from_millis(1));
        let target = Target::parse(url, timeout)?;
        let settings = SqliteSettings {
            busy_timeout_ms: SQLITE_BUSY_TIMEOUT_MS,
        };
        if target.backend == Backend::Sqlite {
            prepare_sqlite_file(&target.driver_url)?;
        }
        let mut first = DbConn::open(target.backend, &target.driver_url).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to {}: {}",
                target.backend,
                conn_message(e)
            ))
        })?;
        settings.apply(&mut first).map_err(db_err)?;
        drop(first);

        let max_size = opts.max_size.max(1);
        let pool = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(Some(1))
            .connection_timeout(timeout)
            .connection_customizer(Box::new(settings))
            .error_handler(Box::new(LogPoolErrors))
            .build(Manager {
                backend: target.backend,
                url: target.driver_url,
            })
            .map_err(pool_err)?;
        Ok(Db {
            pool,
            backend: target.backend,
            checkout_timeout: timeout,
        })
    }

    /// The database engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the pending embedded migrations of this backend, all in one transaction
    /// (serialized against other processes: `BEGIN IMMEDIATE` on SQLite, an advisory lock
    /// on PostgreSQL). Returns the names of the migrations applied, oldest first; empty
    /// when the schema was already current.
    pub fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let mut pooled = self.checkout(self.checkout_timeout)?;
        let conn: &mut DbConn = &mut pooled;
        match conn {
            DbConn::Pg(c) => run_migrations(
                c,
                "BEGIN",
                Some(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
                )),
                POSTGRES_MIGRATIONS,
            ),
            DbConn::Sqlite(c) => run_migrations(c, "BEGIN IMMEDIATE", None, SQLITE_MIGRATIONS),
        }
    }

    fn checkout(&self, timeout: Duration) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        self.pool.get_timeout(timeout).map_err(pool_err)
    }
}

type MigrationResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs every pending migration of `source` inside one transaction begun with `begin_sql`
/// (each migration then runs in a savepoint).
fn run_migrations<C>(
    c: &mut C,
    begin_sql: &str,
    lock_sql: Option<&str>,
    source: EmbeddedMigrations,
) -> Result<Vec<String>, StoreError>
where
    C: Connection<TransactionManager = AnsiTransactionManager> + MigrationHarness<C::Backend>,
{
    use diesel::connection::TransactionManager;

    fn apply<C>(
        c: &mut C,
        lock_sql: Option<&str>,
        source: EmbeddedMigrations,
    ) -> MigrationResult<Vec<String>>
    where
        C: Connection + MigrationHarness<C::Backend>,
    {
        if let Some(sql) = lock_sql {
            c.batch_execute(sql)?;
        }
        let pending = c.pending_migrations(source)?;
        let mut names = Vec::with_capacity(pending.len());
        for m in &pending {
            c.run_migration(m.as_ref())?;
            names.push(m.name().to_string());
        }
        Ok(names)
    }

    AnsiTransactionManager::begin_transaction_sql(c, begin_sql).map_err(db_err)?;
    match apply(c, lock_sql, source) {
        Ok(names) => {
            AnsiTransactionManager::commit_transaction(c).map_err(db_err)?;
            if !names.is_empty() {
                tracing::info!(migrations = ?names, "database migrated");
            }
            Ok(names)
        }
        Err(e) => {
            // A failed rollback leaves the transaction manager in error: the pool then
            // discards the connection.
            let _ = AnsiTransactionManager::rollback_transaction(c);
            Err(StoreError::Other(format!("migration failed: {e}")))
        }
    }
}

/// Starts the transaction of [`Store::transaction_dyn`].
fn begin(conn: &mut DbConn) -> diesel::QueryResult<()> {
    match conn {
        DbConn::Pg(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN"),
        DbConn::Sqlite(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE"),
    }
}

/// Commits (on `Ok`) or rolls back (on `Err`) the transaction opened by [`begin`].
fn finish(conn: &mut DbConn, outcome: Result<(), StoreError>) -> Result<(), StoreError> {
    use diesel::connection::TransactionManager;
    match outcome {
        Ok(()) => match conn {
            DbConn::Pg(c) => AnsiTransactionManager::commit_transaction(c),
            DbConn::Sqlite(c) => AnsiTransactionManager::commit_transaction(c),
        }
        .map_err(db_err),
        Err(e) => {
            let rolled_back = match conn {
                DbConn::Pg(c) => AnsiTransactionManager::rollback_transaction(c),
                DbConn::Sqlite(c) => AnsiTransactionManager::rollback_transaction(c),
            };
            if let Err(rb) = rolled_back {
                // The transaction manager is now in error: the pool discards the connection.
                tracing::warn!(error = %rb, "rollback failed");
            }
            Err(e)
        }
    }
}

impl Store for Db {
    fn transaction_dyn(
        &self,
        f: &mut dyn FnMut(&mut dyn Repo) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut pooled = self.checkout(self.checkout_timeout)?;
        let conn: &mut DbConn = &mut pooled;
        begin(conn).map_err(db_err)?;
        let mut repo = SqlRepo::new(&mut *conn);
        let outcome = match (f(&mut repo), repo.failure()) {
            // The closure went on after a failed statement: roll back and report it.
            (Ok(()), Some(failed)) => Err(failed),
            (outcome, _) => outcome,
        };
        finish(conn, outcome)
    }

    fn read_dyn(
        &self,
        f: &mut dyn FnMut(&mut dyn Repo) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // No BEGIN: on SQLite an IMMEDIATE transaction would queue every reader behind the
        // writers' lock; a read needs only statement-level consistency here.
        let mut pooled = self.checkout(self.checkout_timeout)?;
        let conn: &mut DbConn = &mut pooled;
        let mut repo = SqlRepo::new(&mut *conn);
        match (f(&mut repo), repo.failure()) {
            (Ok(()), Some(failed)) => Err(failed),
            (outcome, _) => outcome,
        }
    }

    fn ping(&self) -> Result<(), StoreError> {
        let mut pooled = self.checkout(self.checkout_timeout.min(PING_TIMEOUT))?;
        pooled.ping().map_err(db_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Duration::from_millis(2500);
        let pg = Target::parse("postgres://u@h:5432/db", t).unwrap();
        assert_eq!(pg.backend, Backend::Postgres);
        assert_eq!(pg.driver_url, "postgres://u@h:5432/db?connect_timeout=3");
        let pg = Target::parse("postgresql://h/db?sslmode=disable", t).unwrap();
        assert_eq!(
            pg.driver_url,
            "postgresql://h/db?sslmode=disable&connect_timeout=3"
        );
        let pg = Target::parse("postgres://h/db?connect_timeout=9", t).unwrap();
        assert_eq!(pg.driver_url, "postgres://h/db?connect_timeout=9");
        for (url, path) in [
            ("sqlite:///abs/x.db", "/abs/x.db"),
            ("sqlite://rel/x.db", "rel/x.db"),
            ("sqlite:x.db", "x.db"),
            ("data/x.db", "data/x.db"),
        ] {
            let s = Target::parse(url, t).unwrap();
            assert_eq!((s.backend, s.driver_url.as_str()), (Backend::Sqlite, path));
        }
        assert!(Target::parse("mysql://h/db", t).is_err());
        assert!(Target::parse("sqlite://", t).is_err());
        assert!(Target::parse("sqlite::memory:", t).is_err());
    }
}
