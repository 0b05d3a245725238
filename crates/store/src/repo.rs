//! [`Repo`] on a connection that is inside a transaction.

use crate::conn::DbConn;
use crate::error::db_err;
use crate::models::{
    AgentRow, AssetRow, AuditRow, ChangeRequestRow, CommandRow, ConnectorRow, CredentialRow,
    EnrollmentTokenRow, JobRow, RefreshTokenRow, SessionRow, UserRow,
};
use crate::schema::{
    agent_commands, agent_request_signatures, agents, assets, audit_events,
    change_request_journals, change_request_secrets, change_requests, connector_credentials,
    connectors, enrollment_tokens, jobs, refresh_tokens, sessions, users,
};
use diesel::prelude::*;
use nexplane_domain::agent::{Agent, AgentCommand, CommandStatus, EnrollmentToken};
use nexplane_domain::audit::{AuditEvent, NewAuditEvent, GENESIS_HASH};
use nexplane_domain::execution::{Journal, JournalKind};
use nexplane_domain::{
    AgentId, Asset, AssetId, ChangeRequest, ChangeRequestId, CommandId, Connector, ConnectorId,
    EnrollmentTokenId, Environment, Job, JobId, JobKind, RefreshTokenRecord, SealedValue, Session,
    SessionId, State, Timestamp, User, UserId,
};
use nexplane_ports::{
    AssetFilter, AuditFilter, ChangeRequestFilter, Page, Repo, SealedCredentials, StoreError,
};
use std::collections::BTreeMap;

/// The row of `$table` with primary key `$id` as `$row`, locked until the end of the
/// transaction: `FOR UPDATE` on PostgreSQL; on SQLite the IMMEDIATE transaction holds the
/// database's write lock already. Evaluates to `Result<Option<$row>, StoreError>`.
macro_rules! find_locked {
    ($self:ident, $table:ident, $row:ty, $id:expr) => {{
        let r = match &mut *$self.conn {
            DbConn::Pg(c) => $table::table
                .find($id)
                .select(<$row>::as_select())
                .for_update()
                .first(c)
                .optional(),
            DbConn::Sqlite(c) => $table::table
                .find($id)
                .select(<$row>::as_select())
                .first(c)
                .optional(),
        };
        $self.track(r)
    }};
}

diesel::define_sql_function! {
    /// SQL `lower(text)`, the same on both backends.
    fn lower(x: diesel::sql_types::Text) -> diesel::sql_types::Text;
}

/// Rows per statement for batched inserts and `IN (…)` lists (well below SQLite's limit of
/// bound parameters).
const CHUNK: usize = 500;

/// `LIKE` pattern for a substring, with `\`, `%` and `_` escaped (escape character `\`).
fn contains_pattern(needle: &str) -> String {
    let mut p = String::with_capacity(needle.len() + 2);
    p.push('%');
    for c in needle.chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// Key of the PostgreSQL advisory lock that serializes audit appends ("nxpaudit").
pub(crate) const AUDIT_LOCK_KEY: i64 = 0x6e78_7061_7564_6974;

/// The repository of one open transaction.
///
/// A failed statement is remembered: on PostgreSQL it aborts the transaction, and a later
/// `COMMIT` would silently roll back. So if the closure swallows such an error and returns
/// `Ok`, [`SqlRepo::failure`] makes the transaction roll back and report it, on both
/// backends alike. (A duplicate in [`Repo::insert_user`] runs in a savepoint and does not
/// count: the caller may handle that conflict and go on.)
pub(crate) struct SqlRepo<'c> {
    conn: &'c mut DbConn,
    failed: Option<StoreError>,
}

impl<'c> SqlRepo<'c> {
    pub(crate) fn new(conn: &'c mut DbConn) -> Self {
        Self { conn, failed: None }
    }

    /// The first statement error of this transaction, if any.
    pub(crate) fn failure(&mut self) -> Option<StoreError> {
        self.failed.take()
    }

    /// Maps the result of a statement run in a savepoint: a unique violation is returned
    /// without poisoning the transaction; any other failure is remembered.
    fn track_allowing_conflict<T>(&mut self, r: QueryResult<T>) -> Result<T, StoreError> {
        r.map_err(|e| match db_err(e) {
            conflict @ StoreError::Conflict(_) => conflict,
            other => {
                self.failed.get_or_insert_with(|| other.clone());
                other
            }
        })
    }

    /// The credential names of these connectors.
    fn credential_keys(
        &mut self,
        ids: &[&str],
    ) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for chunk in ids.chunks(CHUNK) {
            let r = connector_credentials::table
                .filter(connector_credentials::connector_id.eq_any(chunk))
                .select((
                    connector_credentials::connector_id,
                    connector_credentials::name,
                ))
                .order((
                    connector_credentials::connector_id.asc(),
                    connector_credentials::name.asc(),
                ))
                .load::<(String, String)>(self.conn);
            for (id, name) in self.track(r)? {
                out.entry(id).or_default().push(name);
            }
        }
        Ok(out)
    }

    /// Attaches credential names to connector rows.
    fn connectors_from(&mut self, rows: Vec<ConnectorRow>) -> Result<Vec<Connector>, StoreError> {
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let mut keys = self.credential_keys(&ids)?;
        rows.into_iter()
            .map(|r| {
                let k = keys.remove(&r.id).unwrap_or_default();
                r.into_connector(k)
            })
            .collect()
    }

    fn one_connector(
        &mut self,
        row: Option<ConnectorRow>,
    ) -> Result<Option<Connector>, StoreError> {
        match row {
            Some(r) => Ok(self.connectors_from(vec![r])?.pop()),
            None => Ok(None),
        }
    }

    /// Maps a statement result, remembering the first failure.
    fn track<T>(&mut self, r: QueryResult<T>) -> Result<T, StoreError> {
        r.map_err(|e| {
            let e = db_err(e);
            if self.failed.is_none() {
                self.failed = Some(e.clone());
            }
            e
        })
    }
}

fn limit(page_limit: u32) -> i64 {
    i64::from(page_limit)
}

/// `page.after` of the audit list: a seq as text.
fn after_seq(page: &Page) -> Result<Option<i64>, StoreError> {
    page.after
        .as_deref()
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| StoreError::Other(format!("invalid audit cursor {s:?}")))
        })
        .transpose()
}

impl Repo for SqlRepo<'_> {
    fn insert_user(&mut self, user: &User) -> Result<(), StoreError> {
        let row = UserRow::from(user);
        // In a savepoint, so a duplicate leaves the surrounding PostgreSQL transaction usable.
        let r = self
            .conn
            .transaction(|c| diesel::insert_into(users::table).values(&row).execute(c));
        self.track_allowing_conflict(r).map(drop)
    }

    fn update_user(&mut self, user: &User) -> Result<(), StoreError> {
        let row = UserRow::from(user);
        let r = diesel::update(users::table.find(&row.id))
            .set((
                users::name.eq(&row.name),
                users::role.eq(&row.role),
                users::password_hash.eq(&row.password_hash),
                users::disabled_at.eq(row.disabled_at),
                users::failed_logins.eq(row.failed_logins),
                users::locked_until.eq(row.locked_until),
                users::updated_at.eq(row.updated_at),
            ))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no user {}", row.id)));
        }
        Ok(())
    }

    fn get_user(&mut self, id: &UserId) -> Result<Option<User>, StoreError> {
        let r = users::table
            .find(id.as_str())
            .select(UserRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(User::try_from).transpose()
    }

    fn get_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError> {
        let r = users::table
            .filter(users::email.eq(email))
            .select(UserRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(User::try_from).transpose()
    }

    fn list_users(&mut self, page: &Page) -> Result<Vec<User>, StoreError> {
        let mut q = users::table.select(UserRow::as_select()).into_boxed();
        if let Some(after) = &page.after {
            q = q.filter(users::id.lt(after));
        }
        let r = q
            .order(users::id.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        self.track(r)?.into_iter().map(User::try_from).collect()
    }

    fn count_users(&mut self) -> Result<i64, StoreError> {
        let r = users::table.count().get_result(self.conn);
        self.track(r)
    }

    fn insert_session(&mut self, session: &Session) -> Result<(), StoreError> {
        let r = diesel::insert_into(sessions::table)
            .values(SessionRow::from(session))
            .execute(self.conn);
        self.track(r).map(drop)
    }

    fn get_session(&mut self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let r = sessions::table
            .find(id.as_str())
            .select(SessionRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(Session::try_from).transpose()
    }

    fn revoke_session(&mut self, id: &SessionId, at: Timestamp) -> Result<(), StoreError> {
        // Only an unrevoked session changes: the first revocation time is kept.
        let r = diesel::update(
            sessions::table
                .find(id.as_str())
                .filter(sessions::revoked_at.is_null()),
        )
        .set(sessions::revoked_at.eq(Some(at.millis())))
        .execute(self.conn);
        self.track(r).map(drop)
    }

    fn get_session_with_user(
        &mut self,
        id: &SessionId,
    ) -> Result<Option<(Session, User)>, StoreError> {
        let r = sessions::table
            .inner_join(users::table)
            .filter(sessions::id.eq(id.as_str()))
            .select((SessionRow::as_select(), UserRow::as_select()))
            .first::<(SessionRow, UserRow)>(self.conn)
            .optional();
        match self.track(r)? {
            Some((s, u)) => Ok(Some((Session::try_from(s)?, User::try_from(u)?))),
            None => Ok(None),
        }
    }

    fn insert_refresh_token(&mut self, rec: &RefreshTokenRecord) -> Result<(), StoreError> {
        let r = diesel::insert_into(refresh_tokens::table)
            .values(RefreshTokenRow::from(rec))
            .execute(self.conn);
        self.track(r).map(drop)
    }

    fn get_refresh_token(
        &mut self,
        token_hash: &str,
    ) -> Result<Option<RefreshTokenRecord>, StoreError> {
        let r = refresh_tokens::table
            .find(token_hash)
            .select(RefreshTokenRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(RefreshTokenRecord::try_from).transpose()
    }

    fn spend_refresh_token(&mut self, token_hash: &str, at: Timestamp) -> Result<bool, StoreError> {
        // One conditional UPDATE: of two racing spenders, exactly one changes the row (on
        // PostgreSQL the second waits for the first's row lock, then re-checks `used_at`).
        let r = diesel::update(
            refresh_tokens::table
                .find(token_hash)
                .filter(refresh_tokens::used_at.is_null()),
        )
        .set(refresh_tokens::used_at.eq(Some(at.millis())))
        .execute(self.conn);
        Ok(self.track(r)? == 1)
    }

    fn append_audit(&mut self, event: NewAuditEvent) -> Result<AuditEvent, StoreError> {
        // Serialize appenders until commit. SQLite: the IMMEDIATE transaction already holds
        // the write lock. PostgreSQL: a transaction-scoped advisory lock, which also
        // serializes several server processes; read committed then shows the head that the
        // previous holder committed.
        if let DbConn::Pg(c) = &mut *self.conn {
            let r = diesel::sql_query(format!("SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})"))
                .execute(c);
            self.track(r)?;
        }
        let r = audit_events::table
            .select((audit_events::seq, audit_events::hash))
            .order(audit_events::seq.desc())
            .first::<(i64, String)>(self.conn)
            .optional();
        let head = self.track(r)?;
        let (seq, prev) = match &head {
            Some((seq, hash)) => (seq.saturating_add(1), hash.as_str()),
            None => (1, GENESIS_HASH),
        };
        let ev = AuditEvent::chain(event, seq, prev);
        let row = AuditRow::try_from(&ev)?;
        let r = diesel::insert_into(audit_events::table)
            .values(row)
            .execute(self.conn);
        self.track(r)?;
        Ok(ev)
    }

    fn list_audit(
        &mut self,
        filter: &AuditFilter,
        page: &Page,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let mut q = audit_events::table
            .select(AuditRow::as_select())
            .into_boxed();
        if let Some(v) = &filter.change_request_id {
            q = q.filter(audit_events::change_request_id.eq(v));
        }
        if let Some(v) = &filter.user_id {
            q = q.filter(audit_events::actor_id.eq(v));
        }
        if let Some(v) = &filter.resource_type {
            q = q.filter(audit_events::resource_type.eq(v));
        }
        if let Some(v) = &filter.resource_id {
            q = q.filter(audit_events::resource_id.eq(v));
        }
        if let Some(v) = &filter.event_type {
            q = q.filter(audit_events::event_type.eq(v));
        }
        if let Some(from) = filter.from {
            q = q.filter(audit_events::timestamp.ge(from.millis()));
        }
        if let Some(to) = filter.to {
            q = q.filter(audit_events::timestamp.lt(to.millis()));
        }
        if let Some(after) = after_seq(page)? {
            q = q.filter(audit_events::seq.lt(after));
        }
        let r = q
            .order(audit_events::seq.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        self.track(r)?
            .into_iter()
            .map(AuditEvent::try_from)
            .collect()
    }

    fn scan_audit(&mut self, after_seq: i64, limit_n: u32) -> Result<Vec<AuditEvent>, StoreError> {
        let r = audit_events::table
            .select(AuditRow::as_select())
            .filter(audit_events::seq.gt(after_seq))
            .order(audit_events::seq.asc())
            .limit(limit(limit_n))
            .load(self.conn);
        self.track(r)?
            .into_iter()
            .map(AuditEvent::try_from)
            .collect()
    }

    fn insert_connector(
        &mut self,
        connector: &Connector,
        credentials: &SealedCredentials,
    ) -> Result<(), StoreError> {
        let row = ConnectorRow::try_from(connector)?;
        let creds = credential_rows(&connector.id, credentials);
        // In a savepoint, so a duplicate name leaves the transaction usable.
        let r = self.conn.transaction(|c| {
            diesel::insert_into(connectors::table)
                .values(&row)
                .execute(c)?;
            for cred in &creds {
                diesel::insert_into(connector_credentials::table)
                    .values(cred)
                    .execute(c)?;
            }
            Ok::<_, diesel::result::Error>(())
        });
        self.track_allowing_conflict(r)
    }

    fn update_connector(&mut self, connector: &Connector) -> Result<(), StoreError> {
        let row = ConnectorRow::try_from(connector)?;
        let r = self.conn.transaction(|c| {
            diesel::update(connectors::table.find(&row.id))
                .set((
                    connectors::name.eq(&row.name),
                    connectors::environment.eq(&row.environment),
                    connectors::settings.eq(&row.settings),
                    connectors::status.eq(&row.status),
                    connectors::last_tested_at.eq(row.last_tested_at),
                    connectors::last_test_error.eq(&row.last_test_error),
                    connectors::last_discovered_at.eq(row.last_discovered_at),
                    connectors::updated_at.eq(row.updated_at),
                ))
                .execute(c)
        });
        if self.track_allowing_conflict(r)? == 0 {
            return Err(StoreError::Other(format!("no connector {}", row.id)));
        }
        Ok(())
    }

    fn get_connector(&mut self, id: &ConnectorId) -> Result<Option<Connector>, StoreError> {
        let r = connectors::table
            .find(id.as_str())
            .select(ConnectorRow::as_select())
            .first(self.conn)
            .optional();
        let row = self.track(r)?;
        self.one_connector(row)
    }

    fn lock_connector(&mut self, id: &ConnectorId) -> Result<Option<Connector>, StoreError> {
        let row = find_locked!(self, connectors, ConnectorRow, id.as_str())?;
        self.one_connector(row)
    }

    fn list_connectors(&mut self, page: &Page) -> Result<Vec<Connector>, StoreError> {
        let mut q = connectors::table
            .select(ConnectorRow::as_select())
            .into_boxed();
        if let Some(after) = &page.after {
            q = q.filter(connectors::id.lt(after));
        }
        let r = q
            .order(connectors::id.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        let rows = self.track(r)?;
        self.connectors_from(rows)
    }

    fn delete_connector(&mut self, id: &ConnectorId) -> Result<bool, StoreError> {
        // Lock the row first: a discovery finishing concurrently (which locks it too) either
        // completes before, and its assets go with the connector, or finds it gone.
        if self.lock_connector(id)?.is_none() {
            return Ok(false);
        }
        let r = diesel::delete(assets::table.filter(assets::connector_id.eq(id.as_str())))
            .execute(self.conn);
        self.track(r)?;
        let r = diesel::delete(
            connector_credentials::table
                .filter(connector_credentials::connector_id.eq(id.as_str())),
        )
        .execute(self.conn);
        self.track(r)?;
        let r = diesel::delete(connectors::table.find(id.as_str())).execute(self.conn);
        Ok(self.track(r)? == 1)
    }

    fn get_credentials(&mut self, id: &ConnectorId) -> Result<SealedCredentials, StoreError> {
        let r = connector_credentials::table
            .filter(connector_credentials::connector_id.eq(id.as_str()))
            .select((
                connector_credentials::name,
                connector_credentials::sealed_value,
            ))
            .load::<(String, String)>(self.conn);
        Ok(self
            .track(r)?
            .into_iter()
            .map(|(name, v)| (name, SealedValue::new(v)))
            .collect())
    }

    fn replace_credentials(
        &mut self,
        id: &ConnectorId,
        credentials: &SealedCredentials,
    ) -> Result<(), StoreError> {
        let r = diesel::delete(
            connector_credentials::table
                .filter(connector_credentials::connector_id.eq(id.as_str())),
        )
        .execute(self.conn);
        self.track(r)?;
        for row in credential_rows(id, credentials) {
            let r = diesel::insert_into(connector_credentials::table)
                .values(&row)
                .execute(self.conn);
            self.track(r)?;
        }
        Ok(())
    }

    fn all_credentials(&mut self) -> Result<Vec<(ConnectorId, String, SealedValue)>, StoreError> {
        let r = connector_credentials::table
            .select(CredentialRow::as_select())
            .order((
                connector_credentials::connector_id.asc(),
                connector_credentials::name.asc(),
            ))
            .load(self.conn);
        self.track(r)?
            .into_iter()
            .map(|row| {
                let id = ConnectorId::parse(&row.connector_id)
                    .map_err(|e| crate::error::corrupt("connector_credentials", e))?;
                Ok((id, row.name, SealedValue::new(row.sealed_value)))
            })
            .collect()
    }

    fn update_credential(
        &mut self,
        id: &ConnectorId,
        name: &str,
        value: &SealedValue,
    ) -> Result<(), StoreError> {
        let r = diesel::update(connector_credentials::table.find((id.as_str(), name)))
            .set(connector_credentials::sealed_value.eq(value.as_str()))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no credential {name} of {id}")));
        }
        Ok(())
    }

    fn insert_job(&mut self, job: &Job) -> Result<(), StoreError> {
        let row = JobRow::try_from(job)?;
        // In a savepoint: a racing second discovery of the same connector is a conflict the
        // caller answers by reading the first one.
        let r = self
            .conn
            .transaction(|c| diesel::insert_into(jobs::table).values(&row).execute(c));
        self.track_allowing_conflict(r).map(drop)
    }

    fn get_job(&mut self, id: &JobId) -> Result<Option<Job>, StoreError> {
        let r = jobs::table
            .find(id.as_str())
            .select(JobRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(Job::try_from).transpose()
    }

    fn lock_job(&mut self, id: &JobId) -> Result<Option<Job>, StoreError> {
        find_locked!(self, jobs, JobRow, id.as_str())?
            .map(Job::try_from)
            .transpose()
    }

    fn update_job(&mut self, job: &Job) -> Result<(), StoreError> {
        let row = JobRow::try_from(job)?;
        let r = diesel::update(jobs::table.find(&row.id))
            .set((
                jobs::status.eq(&row.status),
                jobs::progress.eq(&row.progress),
                jobs::result.eq(&row.result),
                jobs::error.eq(&row.error),
                jobs::started_at.eq(row.started_at),
                jobs::finished_at.eq(row.finished_at),
                jobs::lease_owner.eq(&row.lease_owner),
                jobs::lease_until.eq(row.lease_until),
                jobs::attempts.eq(row.attempts),
            ))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no job {}", row.id)));
        }
        Ok(())
    }

    fn find_active_job(
        &mut self,
        kind: JobKind,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<Job>, StoreError> {
        let r = jobs::table
            .filter(jobs::resource_type.eq(resource_type))
            .filter(jobs::resource_id.eq(resource_id))
            .filter(jobs::kind.eq(kind.as_str()))
            .filter(jobs::status.eq_any(["queued", "running"]))
            .order((jobs::created_at.desc(), jobs::id.desc()))
            .select(JobRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(Job::try_from).transpose()
    }

    fn next_claimable_job(
        &mut self,
        kinds: &[JobKind],
        now: Timestamp,
    ) -> Result<Option<Job>, StoreError> {
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let now = now.millis();
        macro_rules! query {
            () => {
                jobs::table
                    .filter(jobs::status.eq_any(["queued", "running"]))
                    .filter(jobs::kind.eq_any(kinds.clone()))
                    .filter(
                        jobs::status
                            .eq("queued")
                            .or(jobs::lease_until.is_null().or(jobs::lease_until.le(now))),
                    )
                    .order((jobs::created_at.asc(), jobs::id.asc()))
                    .select(JobRow::as_select())
            };
        }
        let r = match &mut *self.conn {
            // Rows another worker is claiming right now are skipped, not waited for.
            DbConn::Pg(c) => query!().for_update().skip_locked().first(c).optional(),
            // The IMMEDIATE transaction holds the database's write lock already.
            DbConn::Sqlite(c) => query!().first(c).optional(),
        };
        self.track(r)?.map(Job::try_from).transpose()
    }

    fn connector_assets(&mut self, connector_id: &ConnectorId) -> Result<Vec<Asset>, StoreError> {
        let r = assets::table
            .filter(assets::connector_id.eq(connector_id.as_str()))
            .select(AssetRow::as_select())
            .load(self.conn);
        self.track(r)?.into_iter().map(Asset::try_from).collect()
    }

    fn insert_assets(&mut self, new: &[Asset]) -> Result<(), StoreError> {
        let rows = new
            .iter()
            .map(AssetRow::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let r = match &mut *self.conn {
            // One multi-row INSERT per chunk saves round trips to the server.
            DbConn::Pg(c) => rows.chunks(CHUNK / 10).try_for_each(|chunk| {
                diesel::insert_into(assets::table)
                    .values(chunk)
                    .execute(c)
                    .map(drop)
            }),
            // In-process: one statement per row costs little.
            DbConn::Sqlite(c) => rows.iter().try_for_each(|row| {
                diesel::insert_into(assets::table)
                    .values(row)
                    .execute(c)
                    .map(drop)
            }),
        };
        self.track(r)
    }

    fn update_asset(&mut self, asset: &Asset) -> Result<(), StoreError> {
        let row = AssetRow::try_from(asset)?;
        let r = diesel::update(assets::table.find(&row.id))
            .set((
                assets::name.eq(&row.name),
                assets::region.eq(&row.region),
                assets::environment.eq(&row.environment),
                assets::attributes.eq(&row.attributes),
                assets::last_seen_at.eq(row.last_seen_at),
                assets::removed_at.eq(row.removed_at),
            ))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no asset {}", row.id)));
        }
        Ok(())
    }

    fn touch_assets(&mut self, ids: &[AssetId], at: Timestamp) -> Result<(), StoreError> {
        for chunk in ids.chunks(CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(AssetId::as_str).collect();
            let r = diesel::update(assets::table.filter(assets::id.eq_any(ids)))
                .set(assets::last_seen_at.eq(at.millis()))
                .execute(self.conn);
            self.track(r)?;
        }
        Ok(())
    }

    fn mark_assets_removed(&mut self, ids: &[AssetId], at: Timestamp) -> Result<(), StoreError> {
        for chunk in ids.chunks(CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(AssetId::as_str).collect();
            let r = diesel::update(
                assets::table
                    .filter(assets::id.eq_any(ids))
                    .filter(assets::removed_at.is_null()),
            )
            .set(assets::removed_at.eq(Some(at.millis())))
            .execute(self.conn);
            self.track(r)?;
        }
        Ok(())
    }

    fn set_assets_environment(
        &mut self,
        connector_id: &ConnectorId,
        environment: Environment,
    ) -> Result<(), StoreError> {
        let r =
            diesel::update(assets::table.filter(assets::connector_id.eq(connector_id.as_str())))
                .set(assets::environment.eq(environment.as_str()))
                .execute(self.conn);
        self.track(r).map(drop)
    }

    fn count_connector_assets(&mut self, connector_id: &ConnectorId) -> Result<i64, StoreError> {
        let r = assets::table
            .filter(assets::connector_id.eq(connector_id.as_str()))
            .count()
            .get_result(self.conn);
        self.track(r)
    }

    fn list_assets(&mut self, filter: &AssetFilter, page: &Page) -> Result<Vec<Asset>, StoreError> {
        let mut q = assets::table.select(AssetRow::as_select()).into_boxed();
        if let Some(c) = &filter.connector_id {
            q = q.filter(assets::connector_id.eq(c.as_str().to_owned()));
        }
        if let Some(t) = &filter.asset_type {
            q = q.filter(assets::asset_type.eq(t.clone()));
        }
        if !filter.include_removed {
            q = q.filter(assets::removed_at.is_null());
        }
        if let Some(needle) = filter.q.as_deref().filter(|s| !s.is_empty()) {
            let pattern = contains_pattern(&needle.to_lowercase());
            q = q.filter(
                lower(assets::name)
                    .like(pattern.clone())
                    .escape('\\')
                    .or(lower(assets::external_id).like(pattern).escape('\\')),
            );
        }
        if let Some(after) = &page.after {
            q = q.filter(assets::id.lt(after.clone()));
        }
        let r = q
            .order(assets::id.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        self.track(r)?.into_iter().map(Asset::try_from).collect()
    }

    fn get_asset(&mut self, id: &AssetId) -> Result<Option<Asset>, StoreError> {
        let r = assets::table
            .find(id.as_str())
            .select(AssetRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(Asset::try_from).transpose()
    }

    fn insert_change_request(&mut self, cr: &ChangeRequest) -> Result<(), StoreError> {
        let row = ChangeRequestRow::try_from(cr)?;
        let r = diesel::insert_into(change_requests::table)
            .values(&row)
            .execute(self.conn);
        self.track(r).map(drop)
    }

    fn update_change_request(&mut self, cr: &ChangeRequest) -> Result<(), StoreError> {
        let row = ChangeRequestRow::try_from(cr)?;
        let r = diesel::update(change_requests::table.find(&row.id))
            .set((
                change_requests::title.eq(&row.title),
                change_requests::description.eq(&row.description),
                change_requests::target.eq(&row.target),
                change_requests::state.eq(&row.state),
                change_requests::risk.eq(&row.risk),
                change_requests::required_approvals.eq(row.required_approvals),
                change_requests::approvals.eq(&row.approvals),
                change_requests::rejection.eq(&row.rejection),
                change_requests::environment.eq(&row.environment),
                change_requests::applied_steps.eq(row.applied_steps),
                change_requests::updated_at.eq(row.updated_at),
                change_requests::submitted_at.eq(row.submitted_at),
                change_requests::decided_at.eq(row.decided_at),
                change_requests::executed_at.eq(row.executed_at),
                change_requests::finished_at.eq(row.finished_at),
            ))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no change request {}", row.id)));
        }
        Ok(())
    }

    fn get_change_request(
        &mut self,
        id: &ChangeRequestId,
    ) -> Result<Option<ChangeRequest>, StoreError> {
        let r = change_requests::table
            .find(id.as_str())
            .select(ChangeRequestRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(ChangeRequest::try_from).transpose()
    }

    fn lock_change_request(
        &mut self,
        id: &ChangeRequestId,
    ) -> Result<Option<ChangeRequest>, StoreError> {
        find_locked!(self, change_requests, ChangeRequestRow, id.as_str())?
            .map(ChangeRequest::try_from)
            .transpose()
    }

    fn list_change_requests(
        &mut self,
        filter: &ChangeRequestFilter,
        page: &Page,
    ) -> Result<Vec<ChangeRequest>, StoreError> {
        let mut q = change_requests::table
            .select(ChangeRequestRow::as_select())
            .into_boxed();
        if let Some(s) = filter.state {
            q = q.filter(change_requests::state.eq(s.as_str()));
        }
        if let Some(c) = &filter.connector_id {
            q = q.filter(change_requests::connector_id.eq(c.as_str().to_owned()));
        }
        if let Some(t) = &filter.change_type {
            q = q.filter(change_requests::change_type.eq(t.clone()));
        }
        if let Some(u) = &filter.requested_by {
            q = q.filter(change_requests::requested_by.eq(u.as_str().to_owned()));
        }
        if let Some(after) = &page.after {
            q = q.filter(change_requests::id.lt(after.clone()));
        }
        let r = q
            .order(change_requests::id.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        self.track(r)?
            .into_iter()
            .map(ChangeRequest::try_from)
            .collect()
    }

    fn count_connector_change_requests(
        &mut self,
        connector_id: &ConnectorId,
        states: &[State],
    ) -> Result<i64, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let r = change_requests::table
            .filter(change_requests::connector_id.eq(connector_id.as_str()))
            .filter(change_requests::state.eq_any(states))
            .count()
            .get_result(self.conn);
        self.track(r)
    }

    fn get_journal(
        &mut self,
        id: &ChangeRequestId,
        kind: JournalKind,
    ) -> Result<Option<Journal>, StoreError> {
        let r = change_request_journals::table
            .find((id.as_str(), kind.as_str()))
            .select(change_request_journals::body)
            .first::<String>(self.conn)
            .optional();
        self.track(r)?
            .map(|body| {
                serde_json::from_str(&body)
                    .map_err(|e| crate::error::corrupt("change_request_journals", e))
            })
            .transpose()
    }

    fn get_journals(
        &mut self,
        ids: &[ChangeRequestId],
    ) -> Result<Vec<(ChangeRequestId, Journal)>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let keys: Vec<&str> = chunk.iter().map(ChangeRequestId::as_str).collect();
            let r = change_request_journals::table
                .filter(change_request_journals::change_request_id.eq_any(keys))
                .select((
                    change_request_journals::change_request_id,
                    change_request_journals::body,
                ))
                .load::<(String, String)>(self.conn);
            for (id, body) in self.track(r)? {
                let bad = |e: String| crate::error::corrupt("change_request_journals", e);
                let id = ChangeRequestId::parse(&id).map_err(|e| bad(e.to_string()))?;
                let journal = serde_json::from_str(&body).map_err(|e| bad(e.to_string()))?;
                out.push((id, journal));
            }
        }
        Ok(out)
    }

    fn put_journal(
        &mut self,
        id: &ChangeRequestId,
        journal: &Journal,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(journal)
            .map_err(|e| StoreError::Other(format!("journal: {e}")))?;
        let key = (id.as_str(), journal.kind.as_str());
        let r = diesel::update(change_request_journals::table.find(key))
            .set((
                change_request_journals::job_id.eq(journal.job_id.as_str()),
                change_request_journals::body.eq(&body),
                change_request_journals::updated_at.eq(at.millis()),
            ))
            .execute(self.conn);
        if self.track(r)? == 1 {
            return Ok(());
        }
        let r = diesel::insert_into(change_request_journals::table)
            .values((
                change_request_journals::change_request_id.eq(id.as_str()),
                change_request_journals::kind.eq(journal.kind.as_str()),
                change_request_journals::job_id.eq(journal.job_id.as_str()),
                change_request_journals::body.eq(&body),
                change_request_journals::updated_at.eq(at.millis()),
            ))
            .execute(self.conn);
        self.track(r).map(|_| ())
    }

    fn put_secret(
        &mut self,
        id: &ChangeRequestId,
        name: &str,
        value: &SealedValue,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let r = diesel::delete(change_request_secrets::table.find((id.as_str(), name)))
            .execute(self.conn);
        self.track(r)?;
        let r = diesel::insert_into(change_request_secrets::table)
            .values((
                change_request_secrets::change_request_id.eq(id.as_str()),
                change_request_secrets::name.eq(name),
                change_request_secrets::sealed_value.eq(value.as_str()),
                change_request_secrets::created_at.eq(at.millis()),
            ))
            .execute(self.conn);
        self.track(r).map(|_| ())
    }

    fn get_secrets(
        &mut self,
        id: &ChangeRequestId,
    ) -> Result<Vec<(String, SealedValue)>, StoreError> {
        let r = change_request_secrets::table
            .filter(change_request_secrets::change_request_id.eq(id.as_str()))
            .select((
                change_request_secrets::name,
                change_request_secrets::sealed_value,
            ))
            .order(change_request_secrets::name.asc())
            .load::<(String, String)>(self.conn);
        Ok(self
            .track(r)?
            .into_iter()
            .map(|(name, v)| (name, SealedValue::new(v)))
            .collect())
    }

    fn delete_secrets(&mut self, id: &ChangeRequestId) -> Result<u64, StoreError> {
        let r = diesel::delete(
            change_request_secrets::table
                .filter(change_request_secrets::change_request_id.eq(id.as_str())),
        )
        .execute(self.conn);
        Ok(u64::try_from(self.track(r)?).unwrap_or(0))
    }

    fn all_secrets(&mut self) -> Result<Vec<(ChangeRequestId, String, SealedValue)>, StoreError> {
        let r = change_request_secrets::table
            .select((
                change_request_secrets::change_request_id,
                change_request_secrets::name,
                change_request_secrets::sealed_value,
            ))
            .order((
                change_request_secrets::change_request_id.asc(),
                change_request_secrets::name.asc(),
            ))
            .load::<(String, String, String)>(self.conn);
        self.track(r)?
            .into_iter()
            .map(|(id, name, v)| {
                let id = ChangeRequestId::parse(&id)
                    .map_err(|e| crate::error::corrupt("change_request_secrets", e))?;
                Ok((id, name, SealedValue::new(v)))
            })
            .collect()
    }

    fn insert_enrollment_token(&mut self, token: &EnrollmentToken) -> Result<(), StoreError> {
        let row = EnrollmentTokenRow::try_from(token)?;
        let r = diesel::insert_into(enrollment_tokens::table)
            .values(&row)
            .execute(self.conn);
        self.track(r).map(drop)
    }

    fn list_enrollment_tokens(&mut self, page: &Page) -> Result<Vec<EnrollmentToken>, StoreError> {
        let mut q = enrollment_tokens::table
            .select(EnrollmentTokenRow::as_select())
            .into_boxed();
        if let Some(after) = &page.after {
            q = q.filter(enrollment_tokens::id.lt(after.clone()));
        }
        let r = q
            .order(enrollment_tokens::id.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        self.track(r)?
            .into_iter()
            .map(EnrollmentToken::try_from)
            .collect()
    }

    fn get_enrollment_token(
        &mut self,
        id: &EnrollmentTokenId,
    ) -> Result<Option<EnrollmentToken>, StoreError> {
        let r = enrollment_tokens::table
            .find(id.as_str())
            .select(EnrollmentTokenRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(EnrollmentToken::try_from).transpose()
    }

    fn revoke_enrollment_token(
        &mut self,
        id: &EnrollmentTokenId,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        // Only an unrevoked token changes: the first revocation time is kept.
        let r = diesel::update(
            enrollment_tokens::table
                .find(id.as_str())
                .filter(enrollment_tokens::revoked_at.is_null()),
        )
        .set(enrollment_tokens::revoked_at.eq(Some(at.millis())))
        .execute(self.conn);
        if self.track(r)? == 1 {
            return Ok(true);
        }
        // Already revoked, or no such token.
        let r = enrollment_tokens::table
            .find(id.as_str())
            .count()
            .get_result::<i64>(self.conn);
        Ok(self.track(r)? > 0)
    }

    fn consume_enrollment_token(
        &mut self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<Option<EnrollmentToken>, StoreError> {
        // One conditional UPDATE decides: of racing registrations, at most `max_uses - uses`
        // change the row (on PostgreSQL a waiting UPDATE re-checks the condition on the row
        // the previous one committed; SQLite transactions hold the write lock). The schema
        // also bounds `uses <= max_uses`.
        let r = diesel::update(
            enrollment_tokens::table
                .filter(enrollment_tokens::token_hash.eq(token_hash))
                .filter(enrollment_tokens::revoked_at.is_null())
                .filter(enrollment_tokens::expires_at.gt(now.millis()))
                .filter(enrollment_tokens::uses.lt(enrollment_tokens::max_uses)),
        )
        .set(enrollment_tokens::uses.eq(enrollment_tokens::uses + 1))
        .execute(self.conn);
        if self.track(r)? != 1 {
            return Ok(None);
        }
        let r = enrollment_tokens::table
            .filter(enrollment_tokens::token_hash.eq(token_hash))
            .select(EnrollmentTokenRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(EnrollmentToken::try_from).transpose()
    }

    fn insert_agent(&mut self, agent: &Agent) -> Result<(), StoreError> {
        let row = AgentRow::try_from(agent)?;
        let r = diesel::insert_into(agents::table)
            .values(&row)
            .execute(self.conn);
        self.track(r).map(drop)
    }

    fn get_agent(&mut self, id: &AgentId) -> Result<Option<Agent>, StoreError> {
        let r = agents::table
            .find(id.as_str())
            .select(AgentRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(Agent::try_from).transpose()
    }

    fn list_agents(&mut self, page: &Page) -> Result<Vec<Agent>, StoreError> {
        let mut q = agents::table.select(AgentRow::as_select()).into_boxed();
        if let Some(after) = &page.after {
            q = q.filter(agents::id.lt(after.clone()));
        }
        let r = q
            .order(agents::id.desc())
            .limit(limit(page.limit))
            .load(self.conn);
        self.track(r)?.into_iter().map(Agent::try_from).collect()
    }

    fn update_agent(&mut self, agent: &Agent) -> Result<(), StoreError> {
        let row = AgentRow::try_from(agent)?;
        let r = diesel::update(agents::table.find(&row.id))
            .set((
                agents::name.eq(&row.name),
                agents::hostname.eq(&row.hostname),
                agents::os.eq(&row.os),
                agents::arch.eq(&row.arch),
                agents::version.eq(&row.version),
                agents::labels.eq(&row.labels),
                agents::sealed_secret.eq(&row.sealed_secret),
                agents::last_heartbeat_at.eq(row.last_heartbeat_at),
                agents::revoked_at.eq(row.revoked_at),
            ))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no agent {}", row.id)));
        }
        Ok(())
    }

    fn remember_signature(
        &mut self,
        agent_id: &AgentId,
        signature: &str,
        expires_at: Timestamp,
    ) -> Result<bool, StoreError> {
        // In a savepoint: a replay (the signature is the primary key) leaves the surrounding
        // PostgreSQL transaction usable.
        let r = self.conn.transaction(|c| {
            diesel::insert_into(agent_request_signatures::table)
                .values((
                    agent_request_signatures::signature.eq(signature),
                    agent_request_signatures::agent_id.eq(agent_id.as_str()),
                    agent_request_signatures::expires_at.eq(expires_at.millis()),
                ))
                .execute(c)
        });
        match self.track_allowing_conflict(r) {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn forget_signatures(&mut self, now: Timestamp) -> Result<u64, StoreError> {
        let r = diesel::delete(
            agent_request_signatures::table
                .filter(agent_request_signatures::expires_at.lt(now.millis())),
        )
        .execute(self.conn);
        Ok(u64::try_from(self.track(r)?).unwrap_or(0))
    }

    fn insert_command(&mut self, command: &AgentCommand) -> Result<(), StoreError> {
        let row = CommandRow::try_from(command)?;
        // In a savepoint: a second command for the same (job, step) — a dispatch retried
        // after a crash — is a conflict the caller answers by reading the first one.
        let r = self.conn.transaction(|c| {
            diesel::insert_into(agent_commands::table)
                .values(&row)
                .execute(c)
        });
        self.track_allowing_conflict(r).map(drop)
    }

    fn get_command(&mut self, id: &CommandId) -> Result<Option<AgentCommand>, StoreError> {
        let r = agent_commands::table
            .find(id.as_str())
            .select(CommandRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(AgentCommand::try_from).transpose()
    }

    fn lock_command(&mut self, id: &CommandId) -> Result<Option<AgentCommand>, StoreError> {
        find_locked!(self, agent_commands, CommandRow, id.as_str())?
            .map(AgentCommand::try_from)
            .transpose()
    }

    fn find_job_command(
        &mut self,
        job_id: &JobId,
        step: &str,
    ) -> Result<Option<AgentCommand>, StoreError> {
        let r = agent_commands::table
            .filter(agent_commands::job_id.eq(job_id.as_str()))
            .filter(agent_commands::step.eq(step))
            .select(CommandRow::as_select())
            .first(self.conn)
            .optional();
        self.track(r)?.map(AgentCommand::try_from).transpose()
    }

    fn next_queued_command(
        &mut self,
        agent_id: &AgentId,
    ) -> Result<Option<AgentCommand>, StoreError> {
        macro_rules! query {
            () => {
                agent_commands::table
                    .filter(agent_commands::agent_id.eq(agent_id.as_str()))
                    .filter(agent_commands::status.eq(CommandStatus::Queued.as_str()))
                    .order(agent_commands::id.asc())
                    .select(CommandRow::as_select())
            };
        }
        let r = match &mut *self.conn {
            // A command another poll is taking right now is skipped, not waited for.
            DbConn::Pg(c) => query!().for_update().skip_locked().first(c).optional(),
            // The IMMEDIATE transaction holds the database's write lock already.
            DbConn::Sqlite(c) => query!().first(c).optional(),
        };
        self.track(r)?.map(AgentCommand::try_from).transpose()
    }

    fn update_command(&mut self, command: &AgentCommand) -> Result<(), StoreError> {
        let row = CommandRow::try_from(command)?;
        let r = diesel::update(agent_commands::table.find(&row.id))
            .set((
                agent_commands::status.eq(&row.status),
                agent_commands::output.eq(&row.output),
                agent_commands::sealed_snapshot.eq(&row.sealed_snapshot),
                agent_commands::error.eq(&row.error),
                agent_commands::dispatched_at.eq(row.dispatched_at),
                agent_commands::finished_at.eq(row.finished_at),
            ))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no command {}", row.id)));
        }
        Ok(())
    }

    fn agent_commands(
        &mut self,
        agent_id: &AgentId,
        statuses: &[CommandStatus],
    ) -> Result<Vec<AgentCommand>, StoreError> {
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let r = agent_commands::table
            .filter(agent_commands::agent_id.eq(agent_id.as_str()))
            .filter(agent_commands::status.eq_any(statuses))
            .order(agent_commands::id.asc())
            .select(CommandRow::as_select())
            .load(self.conn);
        self.track(r)?
            .into_iter()
            .map(AgentCommand::try_from)
            .collect()
    }

    fn agents_with_queued_commands(&mut self) -> Result<Vec<AgentId>, StoreError> {
        let r = agent_commands::table
            .filter(agent_commands::status.eq(CommandStatus::Queued.as_str()))
            .select(agent_commands::agent_id)
            .distinct()
            .order(agent_commands::agent_id.asc())
            .load::<String>(self.conn);
        self.track(r)?
            .into_iter()
            .map(|id| AgentId::parse(&id).map_err(|e| crate::error::corrupt("agent_commands", e)))
            .collect()
    }

    fn all_command_snapshots(&mut self) -> Result<Vec<(CommandId, SealedValue)>, StoreError> {
        let r = agent_commands::table
            .filter(agent_commands::sealed_snapshot.is_not_null())
            .select((agent_commands::id, agent_commands::sealed_snapshot))
            .order(agent_commands::id.asc())
            .load::<(String, Option<String>)>(self.conn);
        self.track(r)?
            .into_iter()
            .filter_map(|(id, v)| v.map(|v| (id, v)))
            .map(|(id, v)| {
                let id = CommandId::parse(&id)
                    .map_err(|e| crate::error::corrupt("agent_commands", e))?;
                Ok((id, SealedValue::new(v)))
            })
            .collect()
    }

    fn set_command_snapshot(
        &mut self,
        id: &CommandId,
        value: &SealedValue,
    ) -> Result<(), StoreError> {
        let r = diesel::update(agent_commands::table.find(id.as_str()))
            .set(agent_commands::sealed_snapshot.eq(Some(value.as_str())))
            .execute(self.conn);
        if self.track(r)? == 0 {
            return Err(StoreError::Other(format!("no command {id}")));
        }
        Ok(())
    }
}

fn credential_rows(id: &ConnectorId, credentials: &SealedCredentials) -> Vec<CredentialRow> {
    credentials
        .iter()
        .map(|(name, v)| CredentialRow {
            connector_id: id.as_str().to_owned(),
            name: name.clone(),
            sealed_value: v.as_str().to_owned(),
        })
        .collect()
}
