//! Mapping of driver, pool and migration errors to [`StoreError`].

use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error as DieselError};
use nexplane_ports::StoreError;

/// Unique constraints named in the PostgreSQL migrations, as `table.column` (the form SQLite
/// reports), so both backends name a conflict the same way.
const PG_UNIQUE_CONSTRAINTS: &[(&str, &str)] = &[
    ("users_pkey", "users.id"),
    ("users_email_key", "users.email"),
    ("sessions_pkey", "sessions.id"),
    ("refresh_tokens_pkey", "refresh_tokens.token_hash"),
    ("audit_events_pkey", "audit_events.seq"),
    ("audit_events_id_key", "audit_events.id"),
    ("connectors_pkey", "connectors.id"),
    ("connectors_name_key", "connectors.name"),
    ("connector_credentials_pkey", "connector_credentials.name"),
    ("jobs_pkey", "jobs.id"),
    ("jobs_one_active_discovery_idx", "jobs.resource_id"),
    ("assets_pkey", "assets.id"),
    (
        "assets_connector_type_external_id_key",
        "assets.connector_id, assets.type, assets.external_id",
    ),
    ("enrollment_tokens_pkey", "enrollment_tokens.id"),
    (
        "enrollment_tokens_token_hash_key",
        "enrollment_tokens.token_hash",
    ),
    ("agents_pkey", "agents.id"),
    ("agent_commands_pkey", "agent_commands.id"),
    (
        "agent_commands_job_step_idx",
        "agent_commands.job_id, agent_commands.step",
    ),
    (
        "agent_request_signatures_pkey",
        "agent_request_signatures.signature",
    ),
];

/// The `table.column` (or constraint name) a unique violation is about.
fn conflict_target(info: &dyn DatabaseErrorInformation) -> String {
    if let Some(name) = info.constraint_name() {
        return PG_UNIQUE_CONSTRAINTS
            .iter()
            .find(|(c, _)| *c == name)
            .map_or_else(|| name.to_owned(), |(_, target)| (*target).to_owned());
    }
    // SQLite: "UNIQUE constraint failed: users.email"
    let msg = info.message();
    match msg.split_once("constraint failed: ") {
        Some((_, target)) => target.trim().to_owned(),
        None => msg.to_owned(),
    }
}

/// Maps a diesel error: unique violations → `Conflict`, a lost connection or an exhausted
/// SQLite busy timeout → `Unavailable`, anything else → `Other`.
pub(crate) fn db_err(e: DieselError) -> StoreError {
    match &e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
            StoreError::Conflict(conflict_target(info.as_ref()))
        }
        DieselError::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            info,
        ) => StoreError::Unavailable(info.message().to_owned()),
        DieselError::DatabaseError(_, info)
            if info.message().contains("database is locked")
                || info.message().contains("database is busy") =>
        {
            StoreError::Unavailable(info.message().to_owned())
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// Maps a pool error (checkout timeout, with the last connection error if any).
pub(crate) fn pool_err(e: r2d2::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The driver's own message of a connection error (e.g. "… failed: Connection refused"),
/// on one line.
pub(crate) fn conn_message(e: diesel::ConnectionError) -> String {
    let msg = match e {
        diesel::ConnectionError::BadConnection(m) => m,
        other => other.to_string(),
    };
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A row that does not convert to the domain model.
pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("corrupt {what} row: {detail}"))
}
