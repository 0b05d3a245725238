//! [`Repo`] on a connection that is inside a transaction.

use crate::conn::DbConn;
use crate::error::db_err;
use crate::models::{AuditRow, RefreshTokenRow, SessionRow, UserRow};
use crate::schema::{audit_events, refresh_tokens, sessions, users};
use diesel::prelude::*;
use nexplane_domain::audit::{AuditEvent, NewAuditEvent, GENESIS_HASH};
use nexplane_domain::{RefreshTokenRecord, Session, SessionId, Timestamp, User, UserId};
use nexplane_ports::{AuditFilter, Page, Repo, StoreError};

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
        match r {
            Ok(_) => Ok(()),
            Err(e) => match db_err(e) {
                conflict @ StoreError::Conflict(_) => Err(conflict),
                other => {
                    self.failed.get_or_insert_with(|| other.clone());
                    Err(other)
                }
            },
        }
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
}
