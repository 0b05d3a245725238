//! The connection type (one enum over both backends), the r2d2 manager that picks the backend
//! by URL scheme, and the per-connection SQLite settings.

use crate::Backend;
use diesel::connection::SimpleConnection;
use diesel::r2d2::R2D2Connection;
use diesel::{Connection, ConnectionError, PgConnection, SqliteConnection};
use std::fmt;

/// A connection to either backend. Queries written against it run on both; code that must
/// differ matches on the variant.
#[derive(diesel::MultiConnection)]
pub(crate) enum DbConn {
    /// PostgreSQL.
    Pg(PgConnection),
    /// SQLite.
    Sqlite(SqliteConnection),
}

impl DbConn {
    /// Opens one connection of the given backend (no pragmas applied yet).
    pub(crate) fn open(backend: Backend, url: &str) -> Result<DbConn, ConnectionError> {
        match backend {
            Backend::Postgres => PgConnection::establish(url).map(DbConn::Pg),
            Backend::Sqlite => SqliteConnection::establish(url).map(DbConn::Sqlite),
        }
    }
}

/// Creates pooled connections of one backend. Unlike `ConnectionManager<DbConn>`, it never
/// tries the other backend, so a failure carries the real cause.
#[derive(Clone)]
pub(crate) struct Manager {
    pub(crate) backend: Backend,
    /// The URL handed to the driver (for SQLite: the file path).
    pub(crate) url: String,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("Manager")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = DbConn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConn, Self::Error> {
        DbConn::open(self.backend, &self.url).map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut DbConn) -> bool {
        // An open or failed transaction (e.g. after a panic in a closure) is not reused.
        std::thread::panicking() || conn.is_broken()
    }
}

/// Applies the SQLite settings to every new connection: busy timeout (so writers queue
/// instead of failing), WAL journal, foreign keys on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SqliteSettings {
    pub(crate) busy_timeout_ms: u64,
}

impl SqliteSettings {
    pub(crate) fn apply(&self, conn: &mut DbConn) -> diesel::QueryResult<()> {
        if let DbConn::Sqlite(c) = conn {
            // busy_timeout first: switching to WAL needs a lock another connection may hold.
            c.batch_execute(&format!(
                "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;",
                self.busy_timeout_ms
            ))?;
        }
        Ok(())
    }
}

impl r2d2::CustomizeConnection<DbConn, diesel::r2d2::Error> for SqliteSettings {
    fn on_acquire(&self, conn: &mut DbConn) -> Result<(), diesel::r2d2::Error> {
        self.apply(conn).map_err(diesel::r2d2::Error::QueryError)
    }
}
