//! The store against both backends: every test function runs once on a fresh SQLite file in a
//! temporary directory and once on a fresh PostgreSQL database (server at
//! `NEXPLANE_TEST_DATABASE_URL`, default `postgres://postgres@localhost:5432/postgres`).
//! An unreachable PostgreSQL fails the PostgreSQL tests; nothing is skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use diesel::{Connection, PgConnection, RunQueryDsl};
use nexplane_domain::agent::{Agent, AgentCommand, CommandStatus, EnrollmentToken};
use nexplane_domain::audit::{AuditEvent, ChainCheck, ChainVerifier, NewAuditEvent};
use nexplane_domain::change_request::{self as cr, Action, Actor, NewChangeRequest, Policy};
use nexplane_domain::job::{JobOutcome, Progress};
use nexplane_domain::{AgentId, CommandId, EnrollmentTokenId};
use nexplane_domain::{
    Asset, AssetId, Connector, ConnectorId, ConnectorStatus, Environment, EventId, Job, JobId,
    JobKind, JobStatus, LockState, PasswordHash, RefreshTokenRecord, Role, SealedValue, Session,
    SessionId, Timestamp, User, UserId,
};
use nexplane_domain::{ChangeRequest, ChangeRequestId, State};
use nexplane_ports::{
    transaction, AssetFilter, AuditFilter, ChangeRequestFilter, Page, SealedCredentials, Store,
    StoreError,
};
use nexplane_store::{Backend, Db, DbOptions};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Harness

const DEFAULT_PG_URL: &str = "postgres://postgres@localhost:5432/postgres";

fn admin_url() -> String {
    std::env::var("NEXPLANE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{name}{query}")
}

fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Drops the test database when the test ends (also on failure).
struct PgDatabase {
    admin_url: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

/// A fresh, migrated database. Fields drop in order: the pool first, then the files or the
/// PostgreSQL database.
struct TestDb {
    db: Db,
    url: String,
    /// What the first `migrate` applied.
    applied: Vec<String>,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<PgDatabase>,
}

fn opts() -> DbOptions {
    DbOptions {
        max_size: 10,
        connect_timeout: Duration::from_secs(5),
    }
}

impl TestDb {
    fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet: connect creates it.
        let path = dir.path().join("nested").join("nexplane.db");
        let url = format!("sqlite://{}", path.display());
        let db = Db::connect(&url, opts()).unwrap();
        assert_eq!(db.backend(), Backend::Sqlite);
        assert!(path.exists());
        let applied = db.migrate().unwrap();
        TestDb {
            db,
            url,
            applied,
            _dir: Some(dir),
            _pg: None,
        }
    }

    fn postgres() -> TestDb {
        let admin_url = admin_url();
        let mut admin = PgConnection::establish(&admin_url).unwrap_or_else(|e| {
            panic!("PostgreSQL for the tests is unreachable ({admin_url}): {e}")
        });
        let name = format!("nexplane_store_test_{}", unique_suffix());
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .unwrap();
        let guard = PgDatabase {
            admin_url: admin_url.clone(),
            name: name.clone(),
        };
        let url = with_database(&admin_url, &name);
        let db = Db::connect(&url, opts()).unwrap();
        assert_eq!(db.backend(), Backend::Postgres);
        let applied = db.migrate().unwrap();
        TestDb {
            db,
            url,
            applied,
            _dir: None,
            _pg: Some(guard),
        }
    }
}

/// Generates one `#[test]` per backend for each listed function `fn(&TestDb)`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::TestDb::sqlite()); } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::TestDb::postgres()); } )*
        }
    };
}

on_both_backends!(
    migrations_apply_once,
    ping_answers,
    users_crud_and_conflicts,
    conflict_keeps_transaction_usable,
    users_keyset_paging,
    sessions_and_join,
    refresh_token_spent_once,
    refresh_token_race_has_one_winner,
    audit_chain_under_concurrent_writers,
    audit_filters_and_bounds,
    audit_paging,
    failed_transaction_leaves_nothing,
    swallowed_statement_error_rolls_back,
    connectors_and_sealed_credentials,
    jobs_are_claimed_under_a_lease,
    concurrent_workers_never_claim_the_same_job,
    one_active_discovery_per_connector,
    assets_upsert_filters_and_paging,
    change_requests_round_trip_filters_and_paging,
    concurrent_approvals_are_serialized,
    journals_and_secrets_round_trip,
    enrollment_tokens_round_trip_and_paging,
    unusable_enrollment_tokens_are_not_consumed,
    enrollment_token_race_never_exceeds_max_uses,
    agents_round_trip_and_paging,
    signatures_are_remembered_once,
    commands_round_trip_and_conflict_per_job_step,
    queued_commands_oldest_first,
    concurrent_polls_never_take_the_same_command,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

const T0: i64 = 1_796_398_882_000; // 2026-12-04T15:41:22Z

fn at(offset_ms: i64) -> Timestamp {
    Timestamp::from_millis(T0 + offset_ms)
}

fn rnd() -> u128 {
    static N: AtomicU64 = AtomicU64::new(1);
    u128::from(N.fetch_add(1, Ordering::Relaxed))
}

fn user(email: &str, created: Timestamp) -> User {
    User {
        id: UserId::new(created, rnd()),
        email: email.to_owned(),
        name: format!("Name of {email}"),
        role: Role::Operator,
        password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        disabled_at: None,
        lock: LockState::default(),
        created_at: created,
        updated_at: created,
    }
}

fn session(user: &User, created: Timestamp) -> Session {
    Session {
        id: SessionId::new(created, rnd()),
        user_id: user.id.clone(),
        created_at: created,
        expires_at: created.plus_secs(12 * 3600),
        revoked_at: None,
    }
}

fn token(session: &Session, hash: &str) -> RefreshTokenRecord {
    RefreshTokenRecord {
        token_hash: hash.to_owned(),
        session_id: session.id.clone(),
        created_at: session.created_at,
        expires_at: session.expires_at,
        used_at: None,
    }
}

fn event(event_type: &str, ts: Timestamp) -> NewAuditEvent {
    NewAuditEvent {
        id: EventId::new(ts, rnd()),
        timestamp: ts,
        actor: "system".into(),
        actor_id: None,
        event_type: event_type.into(),
        resource_type: "user".into(),
        resource_id: None,
        change_request_id: None,
        request_id: None,
        payload: serde_json::json!({"n": 1, "nested": {"b": [1, 2], "a": null}}),
    }
}

/// Runs `f` in a transaction of `db` and returns its value.
fn tx<T>(db: &Db, f: impl FnOnce(&mut dyn nexplane_ports::Repo) -> Result<T, StoreError>) -> T {
    transaction(db, f).unwrap()
}

fn seqs(events: &[AuditEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests (each runs on both backends)

fn migrations_apply_once(t: &TestDb) {
    assert_eq!(
        t.applied,
        vec![
            "2026-12-01-000001_identity",
            "2026-12-01-000002_audit",
            "2026-12-04-000003_connectors",
            "2026-12-04-000004_discovery",
            "2026-12-04-000005_change_requests",
            "2026-12-04-000006_execution",
            "2026-12-04-000007_agents"
        ]
    );
    // TestDb already migrated once: a second run, and a run from another pool, apply nothing.
    assert_eq!(t.db.migrate().unwrap(), Vec::<String>::new());
    let other = Db::connect(&t.url, opts()).unwrap();
    assert_eq!(other.migrate().unwrap(), Vec::<String>::new());
    assert_eq!(tx(&other, |r| r.count_users()), 0);
}

fn ping_answers(t: &TestDb) {
    t.db.ping().unwrap();
}

fn users_crud_and_conflicts(t: &TestDb) {
    let db = &t.db;
    let alice = user("alice@example.com", at(0));
    tx(db, |r| r.insert_user(&alice));

    assert_eq!(tx(db, |r| r.get_user(&alice.id)), Some(alice.clone()));
    assert_eq!(
        tx(db, |r| r.get_user_by_email("alice@example.com")),
        Some(alice.clone())
    );
    assert_eq!(tx(db, |r| r.get_user_by_email("nobody@example.com")), None);
    assert_eq!(tx(db, |r| r.get_user(&UserId::new(at(5), 99_999))), None);

    // Same email, other id → conflict on the email.
    let dup = user("alice@example.com", at(1));
    match transaction(db, |r| r.insert_user(&dup)) {
        Err(StoreError::Conflict(target)) => assert_eq!(target, "users.email"),
        other => panic!("expected a conflict on email, got {other:?}"),
    }
    // Same id → conflict on the primary key.
    let mut same_id = user("other@example.com", at(1));
    same_id.id = alice.id.clone();
    match transaction(db, |r| r.insert_user(&same_id)) {
        Err(StoreError::Conflict(target)) => assert_eq!(target, "users.id"),
        other => panic!("expected a conflict on id, got {other:?}"),
    }

    // Update overwrites the mutable fields (not the email, not created_at).
    let mut changed = alice.clone();
    changed.name = "Alice Liddell".into();
    changed.role = Role::Approver;
    changed.password_hash = PasswordHash::new("$argon2id$new".into());
    changed.disabled_at = Some(at(10));
    changed.lock = LockState {
        failed_logins: 3,
        locked_until: Some(at(15)),
    };
    changed.updated_at = at(10);
    tx(db, |r| r.update_user(&changed));
    assert_eq!(tx(db, |r| r.get_user(&alice.id)), Some(changed.clone()));

    let mut email_change = changed.clone();
    email_change.email = "mallory@example.com".into();
    tx(db, |r| r.update_user(&email_change));
    assert_eq!(
        tx(db, |r| r.get_user(&alice.id)).map(|u| u.email),
        Some("alice@example.com".to_owned())
    );

    // Updating a user that does not exist is an error.
    let ghost = user("ghost@example.com", at(20));
    assert!(transaction(db, |r| r.update_user(&ghost)).is_err());

    tx(db, |r| r.insert_user(&user("bob@example.com", at(30))));
    assert_eq!(tx(db, |r| r.count_users()), 2);
}

fn conflict_keeps_transaction_usable(t: &TestDb) {
    let db = &t.db;
    let first = user("first@example.com", at(0));
    tx(db, |r| r.insert_user(&first));
    // Inside one transaction: a duplicate, then more work; the transaction still commits.
    let second = user("second@example.com", at(1));
    let outcome = tx(db, |r| {
        let dup = r.insert_user(&user("first@example.com", at(2)));
        r.insert_user(&second)?;
        Ok((dup, r.count_users()?))
    });
    assert!(matches!(outcome.0, Err(StoreError::Conflict(_))));
    assert_eq!(outcome.1, 2);
    assert_eq!(tx(db, |r| r.count_users()), 2);
}

fn users_keyset_paging(t: &TestDb) {
    let db = &t.db;
    let mut ids: Vec<String> = Vec::new();
    tx(db, |r| {
        for i in 0..23 {
            let u = user(&format!("user{i}@example.com"), at(i * 1000));
            ids.push(u.id.as_str().to_owned());
            r.insert_user(&u)?;
        }
        Ok(())
    });
    ids.sort();
    ids.reverse(); // newest first

    let mut seen: Vec<String> = Vec::new();
    let mut page = Page {
        limit: 5,
        after: None,
    };
    let mut pages = 0;
    loop {
        let batch = tx(db, |r| r.list_users(&page));
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 5);
        pages += 1;
        page.after = batch.last().map(|u| u.id.as_str().to_owned());
        seen.extend(batch.into_iter().map(|u| u.id.as_str().to_owned()));
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, ids, "pages in id order, no duplicates, no gaps");

    // A page that ends exactly at the end, and a limit larger than the table.
    let all = tx(db, |r| {
        r.list_users(&Page {
            limit: 500,
            after: None,
        })
    });
    assert_eq!(all.len(), 23);
    let last_two = tx(db, |r| {
        r.list_users(&Page {
            limit: 2,
            after: Some(ids[20].clone()),
        })
    });
    assert_eq!(
        last_two.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        vec![ids[21].as_str(), ids[22].as_str()]
    );
}

fn sessions_and_join(t: &TestDb) {
    let db = &t.db;
    let carol = user("carol@example.com", at(0));
    let s = session(&carol, at(100));
    tx(db, |r| {
        r.insert_user(&carol)?;
        r.insert_session(&s)
    });
    assert_eq!(tx(db, |r| r.get_session(&s.id)), Some(s.clone()));
    assert_eq!(
        tx(db, |r| r.get_session_with_user(&s.id)),
        Some((s.clone(), carol.clone()))
    );
    let missing = SessionId::new(at(1), 12_345);
    assert_eq!(tx(db, |r| r.get_session(&missing)), None);
    assert_eq!(tx(db, |r| r.get_session_with_user(&missing)), None);

    // Revocation keeps the first time; revoking an unknown session is harmless.
    tx(db, |r| r.revoke_session(&s.id, at(200)));
    tx(db, |r| r.revoke_session(&s.id, at(300)));
    tx(db, |r| r.revoke_session(&missing, at(300)));
    let revoked = tx(db, |r| r.get_session(&s.id)).unwrap();
    assert_eq!(revoked.revoked_at, Some(at(200)));
    assert!(!revoked.is_active(at(250)));

    // Foreign keys are enforced (SQLite: PRAGMA foreign_keys=ON on every connection).
    let stranger = user("stranger@example.com", at(0));
    let orphan = session(&stranger, at(0));
    assert!(transaction(db, |r| r.insert_session(&orphan)).is_err());
    assert_eq!(tx(db, |r| r.get_session(&orphan.id)), None);
}

fn refresh_token_spent_once(t: &TestDb) {
    let db = &t.db;
    let dave = user("dave@example.com", at(0));
    let s = session(&dave, at(0));
    let rec = token(&s, "aa11");
    tx(db, |r| {
        r.insert_user(&dave)?;
        r.insert_session(&s)?;
        r.insert_refresh_token(&rec)
    });
    assert_eq!(tx(db, |r| r.get_refresh_token("aa11")), Some(rec.clone()));
    assert_eq!(tx(db, |r| r.get_refresh_token("nope")), None);

    assert!(tx(db, |r| r.spend_refresh_token("aa11", at(10))));
    assert!(!tx(db, |r| r.spend_refresh_token("aa11", at(20))));
    assert!(!tx(db, |r| r.spend_refresh_token("nope", at(20))));
    assert_eq!(
        tx(db, |r| r.get_refresh_token("aa11")).unwrap().used_at,
        Some(at(10))
    );
    // A duplicate hash is a conflict.
    assert!(matches!(
        transaction(db, |r| r.insert_refresh_token(&rec)),
        Err(StoreError::Conflict(_))
    ));
}

fn refresh_token_race_has_one_winner(t: &TestDb) {
    let db = &t.db;
    let erin = user("erin@example.com", at(0));
    let s = session(&erin, at(0));
    const ROUNDS: usize = 15;
    tx(db, |r| {
        r.insert_user(&erin)?;
        r.insert_session(&s)?;
        for i in 0..ROUNDS {
            r.insert_refresh_token(&token(&s, &format!("race{i}")))?;
        }
        Ok(())
    });
    let inside = db.backend() == Backend::Postgres;
    for i in 0..ROUNDS {
        let hash = format!("race{i}");
        let barrier = Arc::new(Barrier::new(2));
        let wins: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|k| {
                    let barrier = Arc::clone(&barrier);
                    let hash = hash.clone();
                    scope.spawn(move || {
                        // SQLite transactions are IMMEDIATE, so the second one starts only
                        // after the first commits: meet before. PostgreSQL: meet inside,
                        // after both have read the token as unused.
                        if !inside {
                            barrier.wait();
                        }
                        transaction(db, |r| {
                            // Read first, like the refresh use case, then spend.
                            let rec = r.get_refresh_token(&hash)?;
                            let rec = rec.expect("token exists");
                            if inside {
                                // Both saw it unused: only the conditional UPDATE decides.
                                assert_eq!(rec.used_at, None);
                                barrier.wait();
                            }
                            r.spend_refresh_token(&hash, at(k))
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {i}: {wins:?}"
        );
    }
}

fn verify_chain(db: &Db) -> ChainCheck {
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let batch = tx(db, |r| r.scan_audit(after, 50));
        if batch.is_empty() {
            break;
        }
        for ev in &batch {
            verifier.push(ev);
        }
        after = batch.last().map_or(after, |e| e.seq);
    }
    verifier.finish()
}

fn audit_chain_under_concurrent_writers(t: &TestDb) {
    let db = &t.db;
    const THREADS: usize = 8;
    const PER_THREAD: usize = 15;
    let barrier = Barrier::new(THREADS);
    let appended: Vec<AuditEvent> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let mut mine = Vec::new();
                    for i in 0..PER_THREAD {
                        // Some transactions do other reads first, as use cases do.
                        let ev = tx(db, |r| {
                            if i % 2 == 0 {
                                r.count_users()?;
                            }
                            let mut e = event("auth.login", at((k * 1000 + i) as i64));
                            e.actor_id = Some(format!("usr_thread{k}"));
                            r.append_audit(e)
                        });
                        mine.push(ev);
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let total = (THREADS * PER_THREAD) as i64;
    let distinct: HashSet<i64> = appended.iter().map(|e| e.seq).collect();
    assert_eq!(distinct.len() as i64, total);
    assert_eq!(distinct.iter().copied().max(), Some(total));
    for ev in &appended {
        assert!(ev.verify_hash());
    }
    match verify_chain(db) {
        ChainCheck::Ok { events, head } => {
            assert_eq!(events, total);
            let last = appended.iter().max_by_key(|e| e.seq).unwrap();
            assert_eq!(head, last.hash);
        }
        broken => panic!("chain broken: {broken:?}"),
    }
    // What was stored is exactly what append returned (payload JSON round-trips).
    let stored = tx(db, |r| r.scan_audit(0, 1000));
    let mut returned = appended.clone();
    returned.sort_by_key(|e| e.seq);
    assert_eq!(stored, returned);
}

fn audit_filters_and_bounds(t: &TestDb) {
    let db = &t.db;
    // Ten events, one per second from T0, with varied attributes.
    let specs: Vec<NewAuditEvent> = (0..10)
        .map(|i| {
            let mut e = event(
                if i % 3 == 0 {
                    "change_request.created"
                } else {
                    "auth.login"
                },
                at(i * 1000),
            );
            e.actor_id = Some(if i % 2 == 0 { "usr_a" } else { "usr_b" }.into());
            e.change_request_id = (i < 4).then(|| "cr_1".to_owned());
            e.resource_type = if i < 5 { "user" } else { "connector" }.into();
            e.resource_id = Some(format!("res_{}", i % 2));
            e.request_id = Some(format!("req_{i}"));
            e
        })
        .collect();
    tx(db, |r| {
        for e in specs {
            r.append_audit(e)?;
        }
        Ok(())
    });
    let all = Page {
        limit: 100,
        after: None,
    };
    let list = |f: AuditFilter| seqs(&tx(db, |r| r.list_audit(&f, &all)));

    assert_eq!(
        list(AuditFilter::default()),
        (1..=10).rev().collect::<Vec<_>>()
    );
    assert_eq!(
        list(AuditFilter {
            change_request_id: Some("cr_1".into()),
            ..Default::default()
        }),
        vec![4, 3, 2, 1]
    );
    assert_eq!(
        list(AuditFilter {
            user_id: Some("usr_b".into()),
            ..Default::default()
        }),
        vec![10, 8, 6, 4, 2]
    );
    assert_eq!(
        list(AuditFilter {
            resource_type: Some("connector".into()),
            ..Default::default()
        }),
        vec![10, 9, 8, 7, 6]
    );
    assert_eq!(
        list(AuditFilter {
            resource_type: Some("user".into()),
            resource_id: Some("res_0".into()),
            ..Default::default()
        }),
        vec![5, 3, 1]
    );
    assert_eq!(
        list(AuditFilter {
            resource_id: Some("res_1".into()),
            ..Default::default()
        }),
        vec![10, 8, 6, 4, 2]
    );
    assert_eq!(
        list(AuditFilter {
            event_type: Some("change_request.created".into()),
            ..Default::default()
        }),
        vec![10, 7, 4, 1]
    );
    assert_eq!(
        list(AuditFilter {
            event_type: Some("nothing.such".into()),
            ..Default::default()
        }),
        Vec::<i64>::new()
    );
    // from is inclusive, to exclusive: [T0+2s, T0+5s) → events 3, 4, 5.
    assert_eq!(
        list(AuditFilter {
            from: Some(at(2000)),
            to: Some(at(5000)),
            ..Default::default()
        }),
        vec![5, 4, 3]
    );
    assert_eq!(
        list(AuditFilter {
            from: Some(at(9000)),
            ..Default::default()
        }),
        vec![10]
    );
    assert_eq!(
        list(AuditFilter {
            to: Some(at(1)),
            ..Default::default()
        }),
        vec![1]
    );
    assert_eq!(
        list(AuditFilter {
            from: Some(at(1)),
            to: Some(at(1000)),
            ..Default::default()
        }),
        Vec::<i64>::new()
    );
    // Filters combine.
    assert_eq!(
        list(AuditFilter {
            user_id: Some("usr_a".into()),
            event_type: Some("auth.login".into()),
            from: Some(at(1000)),
            ..Default::default()
        }),
        vec![9, 5, 3]
    );
    // The stored fields come back as given.
    let first = tx(db, |r| r.scan_audit(0, 1)).remove(0);
    assert_eq!(first.request_id.as_deref(), Some("req_0"));
    assert_eq!(first.change_request_id.as_deref(), Some("cr_1"));
    assert_eq!(first.timestamp, at(0));
}

fn audit_paging(t: &TestDb) {
    let db = &t.db;
    tx(db, |r| {
        for i in 0..12 {
            let mut e = event("user.updated", at(i));
            e.resource_id = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
            r.append_audit(e)?;
        }
        Ok(())
    });
    // Unfiltered, pages of 5: 12..8, 7..3, 2..1.
    let mut page = Page {
        limit: 5,
        after: None,
    };
    let mut got = Vec::new();
    loop {
        let batch = tx(db, |r| r.list_audit(&AuditFilter::default(), &page));
        if batch.is_empty() {
            break;
        }
        page.after = batch.last().map(|e| e.seq.to_string());
        got.push(seqs(&batch));
    }
    assert_eq!(
        got,
        vec![vec![12, 11, 10, 9, 8], vec![7, 6, 5, 4, 3], vec![2, 1]]
    );
    // Filtered paging.
    let filter = AuditFilter {
        resource_id: Some("odd".into()),
        ..Default::default()
    };
    let p1 = tx(db, |r| {
        r.list_audit(
            &filter,
            &Page {
                limit: 4,
                after: None,
            },
        )
    });
    assert_eq!(seqs(&p1), vec![12, 10, 8, 6]);
    let p2 = tx(db, |r| {
        r.list_audit(
            &filter,
            &Page {
                limit: 4,
                after: Some("6".into()),
            },
        )
    });
    assert_eq!(seqs(&p2), vec![4, 2]);
    // scan_audit is ascending from after_seq.
    assert_eq!(seqs(&tx(db, |r| r.scan_audit(9, 10))), vec![10, 11, 12]);
    assert_eq!(seqs(&tx(db, |r| r.scan_audit(0, 2))), vec![1, 2]);
    // A cursor that is not a seq is refused.
    assert!(transaction(db, |r| r.list_audit(
        &AuditFilter::default(),
        &Page {
            limit: 5,
            after: Some("evt_x".into()),
        }
    ))
    .is_err());
}

#[derive(Debug, PartialEq)]
enum AppError {
    Store(StoreError),
    Refused,
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Store(e)
    }
}

fn failed_transaction_leaves_nothing(t: &TestDb) {
    let db = &t.db;
    let frank = user("frank@example.com", at(0));
    let s = session(&frank, at(0));
    let result: Result<(), AppError> = transaction(db, |r| {
        r.insert_user(&frank)?;
        r.insert_session(&s)?;
        r.insert_refresh_token(&token(&s, "ff00"))?;
        r.append_audit(event("user.created", at(0)))?;
        Err(AppError::Refused)
    });
    assert_eq!(result, Err(AppError::Refused));
    assert_eq!(tx(db, |r| r.count_users()), 0);
    assert_eq!(tx(db, |r| r.get_session(&s.id)), None);
    assert_eq!(tx(db, |r| r.get_refresh_token("ff00")), None);
    assert!(tx(db, |r| r.scan_audit(0, 10)).is_empty());

    // A store error inside the closure also rolls back what came before it.
    let dup_target = user("grace@example.com", at(1));
    tx(db, |r| r.insert_user(&dup_target));
    let result: Result<(), StoreError> = transaction(db, |r| {
        r.append_audit(event("user.created", at(2)))?;
        r.insert_user(&user("grace@example.com", at(3)))
    });
    assert!(matches!(result, Err(StoreError::Conflict(_))));
    assert!(tx(db, |r| r.scan_audit(0, 10)).is_empty());

    // The chain continues from genesis after the rollbacks; a committed append is kept.
    let ev = tx(db, |r| r.append_audit(event("user.created", at(4))));
    assert_eq!(ev.seq, 1);
    assert!(matches!(verify_chain(db), ChainCheck::Ok { events: 1, .. }));
    // The pool still works after the failed transactions.
    db.ping().unwrap();
}

fn swallowed_statement_error_rolls_back(t: &TestDb) {
    let db = &t.db;
    let heidi = user("heidi@example.com", at(0));
    let orphan = session(&user("nobody@example.com", at(0)), at(0));
    // The closure ignores a failed statement (a foreign-key violation) and returns Ok. On
    // PostgreSQL that statement aborted the transaction; on both backends the store rolls
    // back and reports the failure instead of committing half of the work.
    let result = transaction(db, |r| {
        r.insert_user(&heidi)?;
        let ignored = r.insert_session(&orphan);
        assert!(ignored.is_err());
        Ok::<_, StoreError>(())
    });
    assert!(result.is_err(), "{result:?}");
    assert_eq!(tx(db, |r| r.get_user(&heidi.id)), None);
    // The next transaction on the pool is fine.
    tx(db, |r| r.insert_user(&heidi));
    assert_eq!(tx(db, |r| r.count_users()), 1);
}

// ---------------------------------------------------------------------------------------------
// Connection failures (not per backend)

#[test]
fn unreachable_postgres_fails_fast_with_the_real_cause() {
    let started = Instant::now();
    let err = Db::connect(
        "postgres://postgres@127.0.0.1:1/postgres",
        DbOptions {
            max_size: 2,
            connect_timeout: Duration::from_secs(3),
        },
    )
    .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    match err {
        StoreError::Unavailable(msg) => {
            eprintln!("unreachable PostgreSQL after {elapsed:?}: {msg}");
            assert!(
                msg.to_lowercase().contains("connection refused"),
                "message without the cause: {msg}"
            );
            assert!(!msg.contains("Invalid connection url"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn sqlite_file_is_private_and_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("x.db");
    // A bare path works as well as sqlite://PATH.
    let db = Db::connect(path.to_str().unwrap(), opts()).unwrap();
    db.migrate().unwrap();
    tx(&db, |r| r.append_audit(event("user.created", at(0))));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // WAL mode keeps a -wal file next to the database while connections are open.
    assert!(dir.path().join("a").join("b").join("x.db-wal").exists());
}

#[test]
fn unsupported_scheme_is_refused() {
    assert!(matches!(
        Db::connect("mysql://localhost/db", DbOptions::default()),
        Err(StoreError::Other(_))
    ));
}

#[test]
fn unusable_sqlite_path_reports_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    // The parent "directory" is a regular file.
    let url = format!("sqlite://{}/db.sqlite", file.display());
    match Db::connect(&url, DbOptions::default()) {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("cannot"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn dropped_postgres_database_is_unavailable_not_a_panic() {
    let t = TestDb::postgres();
    t.db.ping().unwrap();
    // Terminate the pool's connections from outside, like a server restart.
    let name = t.url.rsplit('/').next().unwrap().to_owned();
    let mut admin = PgConnection::establish(&admin_url()).unwrap();
    diesel::sql_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .execute(&mut admin)
    .unwrap();
    // The pool notices broken connections and reconnects.
    let mut ok = false;
    for _ in 0..3 {
        if t.db.ping().is_ok() && transaction(&t.db, |r| r.count_users()).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "the pool did not recover after the connections were killed"
    );
}

// ---------------------------------------------------------------------------------------------
// Connectors, jobs and assets

fn connector(name: &str, created: Timestamp) -> Connector {
    Connector {
        id: ConnectorId::new(created, rnd()),
        name: name.to_owned(),
        connector_type: "aws".into(),
        environment: Environment::Staging,
        settings: serde_json::json!({"region": "us-east-1", "regions": ["us-east-1"]}),
        credential_keys: vec!["aws_access_key_id".into(), "aws_secret_access_key".into()],
        status: ConnectorStatus::Untested,
        last_tested_at: None,
        last_test_error: None,
        last_discovered_at: None,
        created_at: created,
        updated_at: created,
    }
}

fn sealed(pairs: &[(&str, &str)]) -> SealedCredentials {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), SealedValue::new(format!("v1.k.{v}"))))
        .collect()
}

fn discovery_job(c: &Connector, created: Timestamp) -> Job {
    Job::new(
        JobId::new(created, rnd()),
        JobKind::Discovery,
        "connector",
        c.id.as_str(),
        created,
    )
}

fn asset(c: &Connector, ty: &str, ext: &str, name: &str, created: Timestamp) -> Asset {
    Asset {
        id: AssetId::new(created, rnd()),
        connector_id: c.id.clone(),
        asset_type: ty.to_owned(),
        external_id: ext.to_owned(),
        name: name.to_owned(),
        region: Some("us-east-1".into()),
        environment: c.environment,
        attributes: serde_json::json!({"name": name}),
        first_seen_at: created,
        last_seen_at: created,
        removed_at: None,
    }
}

fn connectors_and_sealed_credentials(t: &TestDb) {
    let db = &t.db;
    let a = connector("prod", at(0));
    let creds = sealed(&[
        ("aws_access_key_id", "n1.c1"),
        ("aws_secret_access_key", "n2.c2"),
    ]);
    tx(db, |r| r.insert_connector(&a, &creds));
    assert_eq!(tx(db, |r| r.get_connector(&a.id)), Some(a.clone()));
    assert_eq!(tx(db, |r| r.get_credentials(&a.id)), creds);

    // A duplicate name is a conflict that leaves the transaction usable.
    let dup = connector("prod", at(1));
    let n = tx(db, |r| {
        assert_eq!(
            r.insert_connector(&dup, &creds),
            Err(StoreError::Conflict("connectors.name".into()))
        );
        r.list_connectors(&Page {
            limit: 10,
            after: None,
        })
        .map(|v| v.len())
    });
    assert_eq!(n, 1);

    // Update, credentials replaced, rename onto a taken name refused.
    let b = connector("staging", at(2));
    tx(db, |r| r.insert_connector(&b, &SealedCredentials::new()));
    assert_eq!(
        tx(db, |r| r.get_connector(&b.id)).unwrap().credential_keys,
        Vec::<String>::new()
    );
    let mut a2 = a.clone();
    a2.status = ConnectorStatus::Ok;
    a2.last_tested_at = Some(at(3));
    a2.environment = Environment::Production;
    a2.updated_at = at(3);
    tx(db, |r| r.update_connector(&a2));
    let one = sealed(&[("aws_session_token", "n3.c3")]);
    tx(db, |r| r.replace_credentials(&a.id, &one));
    let mut want = a2.clone();
    want.credential_keys = vec!["aws_session_token".into()];
    assert_eq!(tx(db, |r| r.get_connector(&a.id)), Some(want.clone()));
    let mut clash = b.clone();
    clash.name = "prod".into();
    assert_eq!(
        transaction(db, |r| r.update_connector(&clash)),
        Err(StoreError::Conflict("connectors.name".into()))
    );

    // Keyset list, newest first; lock; re-sealing.
    let list = tx(db, |r| {
        r.list_connectors(&Page {
            limit: 1,
            after: None,
        })
    });
    assert_eq!(
        list.iter().map(|c| &c.name).collect::<Vec<_>>(),
        ["staging"]
    );
    let next = tx(db, |r| {
        r.list_connectors(&Page {
            limit: 5,
            after: Some(b.id.to_string()),
        })
    });
    assert_eq!(next, vec![want.clone()]);
    assert_eq!(tx(db, |r| r.lock_connector(&a.id)), Some(want));
    let all = tx(db, |r| r.all_credentials());
    assert_eq!(all.len(), 1);
    tx(db, |r| {
        r.update_credential(
            &a.id,
            "aws_session_token",
            &SealedValue::new("v1.k2.x.y".into()),
        )
    });
    assert_eq!(
        tx(db, |r| r.get_credentials(&a.id))["aws_session_token"],
        SealedValue::new("v1.k2.x.y".into())
    );
    // Plain text is refused by the schema.
    let bad: SealedCredentials = [("x".to_owned(), SealedValue::new("plaintext".into()))]
        .into_iter()
        .collect();
    assert!(transaction(db, |r| r.replace_credentials(&a.id, &bad)).is_err());

    // Delete takes credentials and assets along.
    let x = asset(&a, "iam_user", "arn:1", "u", at(4));
    tx(db, |r| r.insert_assets(std::slice::from_ref(&x)));
    assert!(tx(db, |r| r.delete_connector(&a.id)));
    assert!(!tx(db, |r| r.delete_connector(&a.id)));
    assert_eq!(tx(db, |r| r.get_connector(&a.id)), None);
    assert!(tx(db, |r| r.get_credentials(&a.id)).is_empty());
    assert_eq!(tx(db, |r| r.get_asset(&x.id)), None);
}

fn jobs_are_claimed_under_a_lease(t: &TestDb) {
    let db = &t.db;
    let c = connector("c", at(0));
    tx(db, |r| r.insert_connector(&c, &SealedCredentials::new()));
    let job = discovery_job(&c, at(0));
    tx(db, |r| r.insert_job(&job));
    assert_eq!(tx(db, |r| r.get_job(&job.id)), Some(job.clone()));
    let kinds = [JobKind::Discovery];
    assert_eq!(
        tx(db, |r| r.next_claimable_job(&[JobKind::Execution], at(1))),
        None
    );

    // Worker A claims it for 60 s.
    let claim = |worker: &'static str, now: Timestamp| {
        transaction(db, |r| {
            let Some(j) = r.next_claimable_job(&kinds, now)? else {
                return Ok(None);
            };
            let claimed = j.claim(worker, now, 60).unwrap();
            r.update_job(&claimed)?;
            Ok::<_, StoreError>(Some(claimed))
        })
        .unwrap()
    };
    let a = claim("worker-a", at(1_000)).unwrap();
    assert_eq!(a.status, JobStatus::Running);
    assert_eq!(tx(db, |r| r.get_job(&job.id)), Some(a.clone()));
    // Nobody else gets it while the lease runs, even when A is silent.
    assert_eq!(claim("worker-b", at(30_000)), None);
    assert_eq!(claim("worker-b", at(60_999)), None);
    // A renews and reports progress.
    let renewed = a
        .renew("worker-a", at(50_000), 60)
        .unwrap()
        .report_progress(
            "worker-a",
            Progress {
                phase: "iam".into(),
                done: 5,
                total: Some(9),
            },
        )
        .unwrap();
    tx(db, |r| r.update_job(&renewed));
    assert_eq!(claim("worker-b", at(100_000)), None);
    // A crashes: after its lease, B takes the job over, progress kept.
    let b = claim("worker-b", at(110_000)).unwrap();
    assert_eq!(b.lease_owner.as_deref(), Some("worker-b"));
    assert_eq!(b.attempts, 2);
    assert_eq!(b.progress.done, 5);
    assert_eq!(b.started_at, Some(at(1_000)));
    let stored = tx(db, |r| r.lock_job(&job.id)).unwrap();
    assert!(
        stored.renew("worker-a", at(111_000), 60).is_err(),
        "A lost it"
    );
    let done = stored
        .finish(
            "worker-b",
            at(120_000),
            JobOutcome::succeeded(serde_json::json!({"n": 1})),
        )
        .unwrap();
    tx(db, |r| r.update_job(&done));
    assert_eq!(tx(db, |r| r.get_job(&job.id)), Some(done));
    assert_eq!(
        claim("worker-c", at(999_000)),
        None,
        "finished jobs are never claimed"
    );
    assert_eq!(
        tx(db, |r| r.find_active_job(
            JobKind::Discovery,
            "connector",
            c.id.as_str()
        )),
        None
    );
}

fn concurrent_workers_never_claim_the_same_job(t: &TestDb) {
    let db = &t.db;
    const JOBS: usize = 12;
    const WORKERS: usize = 4;
    let mut ids = HashSet::new();
    for i in 0..JOBS {
        let c = connector(&format!("c{i}"), at(i as i64));
        let j = discovery_job(&c, at(i as i64));
        ids.insert(j.id.clone());
        tx(db, |r| {
            r.insert_connector(&c, &SealedCredentials::new())?;
            r.insert_job(&j)
        });
    }
    let barrier = Barrier::new(WORKERS);
    let claimed: Vec<Vec<JobId>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let name = format!("w{w}");
                    let mut mine = Vec::new();
                    loop {
                        let got = transaction(db, |r| {
                            let Some(j) = r.next_claimable_job(&[JobKind::Discovery], at(5_000))?
                            else {
                                return Ok::<_, StoreError>(None);
                            };
                            let c = j.claim(&name, at(5_000), 60).unwrap();
                            r.update_job(&c)?;
                            Ok(Some(c.id))
                        })
                        .unwrap();
                        match got {
                            Some(id) => mine.push(id),
                            None => return mine,
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<&JobId> = claimed.iter().flatten().collect();
    assert_eq!(
        all.len(),
        JOBS,
        "every job claimed exactly once: {claimed:?}"
    );
    let unique: HashSet<&JobId> = all.iter().copied().collect();
    assert_eq!(unique.len(), JOBS);
    assert!(unique.iter().all(|id| ids.contains(*id)));
}

fn one_active_discovery_per_connector(t: &TestDb) {
    let db = &t.db;
    let c = connector("c", at(0));
    tx(db, |r| r.insert_connector(&c, &SealedCredentials::new()));
    let first = discovery_job(&c, at(0));
    tx(db, |r| r.insert_job(&first));
    // A second active one conflicts, and the transaction goes on.
    let second = discovery_job(&c, at(1));
    let active = tx(db, |r| {
        assert_eq!(
            r.insert_job(&second),
            Err(StoreError::Conflict("jobs.resource_id".into()))
        );
        r.find_active_job(JobKind::Discovery, "connector", c.id.as_str())
    });
    assert_eq!(active, Some(first.clone()));
    // Once the first has finished, a new one is accepted.
    let done = first
        .claim("w", at(2), 60)
        .unwrap()
        .finish("w", at(3), JobOutcome::failed("x"))
        .unwrap();
    tx(db, |r| r.update_job(&done));
    tx(db, |r| r.insert_job(&second));
    assert_eq!(
        tx(db, |r| r.find_active_job(
            JobKind::Discovery,
            "connector",
            c.id.as_str()
        )),
        Some(second)
    );
}

fn assets_upsert_filters_and_paging(t: &TestDb) {
    let db = &t.db;
    let c = connector("c", at(0));
    let d = connector("d", at(0));
    tx(db, |r| {
        r.insert_connector(&c, &SealedCredentials::new())?;
        r.insert_connector(&d, &SealedCredentials::new())
    });
    let mut list = Vec::new();
    for i in 0..7 {
        list.push(asset(
            &c,
            "iam_user",
            &format!("arn:aws:iam::1:user/User_{i}"),
            &format!("User_{i}"),
            at(i),
        ));
    }
    list.push(asset(&c, "s3_bucket", "bucket-50%", "bucket-50%", at(10)));
    list.push(asset(
        &d,
        "iam_user",
        "arn:aws:iam::1:user/other",
        "other",
        at(11),
    ));
    tx(db, |r| r.insert_assets(&list));
    // (connector, type, external id) is unique.
    let dup = asset(
        &c,
        "iam_user",
        "arn:aws:iam::1:user/User_0",
        "again",
        at(12),
    );
    assert!(transaction(db, |r| r.insert_assets(std::slice::from_ref(&dup))).is_err());

    let page = |limit: u32, after: Option<&AssetId>| Page {
        limit,
        after: after.map(|a| a.to_string()),
    };
    let f =
        |conn: Option<&Connector>, ty: Option<&str>, q: Option<&str>, removed: bool| AssetFilter {
            connector_id: conn.map(|c| c.id.clone()),
            asset_type: ty.map(str::to_owned),
            q: q.map(str::to_owned),
            include_removed: removed,
        };
    let names = |v: Vec<Asset>| v.into_iter().map(|a| a.name).collect::<Vec<_>>();
    assert_eq!(
        tx(db, |r| r
            .list_assets(&f(None, None, None, false), &page(100, None)))
        .len(),
        9
    );
    assert_eq!(
        tx(db, |r| r.list_assets(
            &f(Some(&c), None, None, false),
            &page(100, None)
        ))
        .len(),
        8
    );
    assert_eq!(
        names(tx(db, |r| r.list_assets(
            &f(Some(&c), Some("s3_bucket"), None, false),
            &page(100, None)
        ))),
        ["bucket-50%"]
    );
    assert_eq!(
        names(tx(db, |r| r.list_assets(
            &f(None, Some("iam_user"), Some("OTH"), false),
            &page(100, None)
        ))),
        ["other"]
    );
    assert_eq!(
        names(tx(db, |r| r.list_assets(
            &f(None, None, Some("50%"), false),
            &page(100, None)
        ))),
        ["bucket-50%"]
    );
    assert_eq!(
        tx(db, |r| r.list_assets(
            &f(None, None, Some("%"), false),
            &page(100, None)
        ))
        .len(),
        1
    );
    assert_eq!(
        tx(db, |r| r.list_assets(
            &f(None, None, Some("user_"), false),
            &page(100, None)
        ))
        .len(),
        7
    );
    assert_eq!(
        tx(db, |r| r.list_assets(
            &f(None, None, Some("ser\\_"), false),
            &page(100, None)
        ))
        .len(),
        0
    );

    // Keyset pages, newest first.
    let mut seen = Vec::new();
    let mut after: Option<AssetId> = None;
    loop {
        let p = tx(db, |r| {
            r.list_assets(
                &f(Some(&c), Some("iam_user"), None, false),
                &page(3, after.as_ref()),
            )
        });
        if p.is_empty() {
            break;
        }
        after = p.last().map(|a| a.id.clone());
        seen.extend(p.into_iter().map(|a| a.name));
    }
    assert_eq!(
        seen,
        (0..7)
            .rev()
            .map(|i| format!("User_{i}"))
            .collect::<Vec<_>>()
    );

    // Touch, update, remove, environment.
    let ids: Vec<AssetId> = list[..3].iter().map(|a| a.id.clone()).collect();
    tx(db, |r| r.touch_assets(&ids, at(100)));
    assert_eq!(
        tx(db, |r| r.get_asset(&ids[0])).unwrap().last_seen_at,
        at(100)
    );
    tx(db, |r| r.mark_assets_removed(&ids[1..], at(200)));
    tx(db, |r| r.mark_assets_removed(&ids[1..], at(300)));
    let removed = tx(db, |r| r.get_asset(&ids[1])).unwrap();
    assert_eq!(
        removed.removed_at,
        Some(at(200)),
        "the first removal time stays"
    );
    assert_eq!(
        tx(db, |r| r.list_assets(
            &f(Some(&c), None, None, false),
            &page(100, None)
        ))
        .len(),
        6
    );
    assert_eq!(
        tx(db, |r| r.list_assets(
            &f(Some(&c), None, None, true),
            &page(100, None)
        ))
        .len(),
        8
    );
    let mut back = removed.clone();
    back.removed_at = None;
    back.attributes = serde_json::json!({"changed": true});
    tx(db, |r| r.update_asset(&back));
    assert_eq!(tx(db, |r| r.get_asset(&back.id)), Some(back));
    tx(db, |r| {
        r.set_assets_environment(&c.id, Environment::Development)
    });
    assert!(tx(db, |r| r.connector_assets(&c.id))
        .iter()
        .all(|a| a.environment == Environment::Development));
    assert_eq!(tx(db, |r| r.count_connector_assets(&c.id)), 8);
    assert_eq!(
        tx(db, |r| r.connector_assets(&d.id))[0].environment,
        Environment::Staging
    );
}

// ---------------------------------------------------------------------------------------------
// Change requests

fn actor(role: Role, created: Timestamp) -> Actor {
    let id = UserId::new(created, rnd());
    Actor::user(id.clone(), format!("{id}@example.com"), role)
}

fn change_request(
    c: Option<&Connector>,
    change_type: &str,
    target: serde_json::Value,
    by: &Actor,
    created: Timestamp,
) -> ChangeRequest {
    let new = NewChangeRequest {
        id: ChangeRequestId::new(created, rnd()),
        title: format!("{change_type} at {}", created.millis()),
        description: "why".into(),
        connector_id: c.map(|c| c.id.clone()),
        change_type: change_type.into(),
        target,
        environment: c.map_or(Environment::Production, |c| c.environment),
    };
    cr::create(new, by, &Policy::default(), created).unwrap().0
}

fn step(c: &ChangeRequest, action: Action, by: &Actor, now: Timestamp) -> ChangeRequest {
    cr::apply(c, action, by, &Policy::default(), now).unwrap().0
}

fn change_requests_round_trip_filters_and_paging(t: &TestDb) {
    let db = &t.db;
    let c = connector("c", at(0));
    let d = connector("d", at(0));
    tx(db, |r| {
        r.insert_connector(&c, &SealedCredentials::new())?;
        r.insert_connector(&d, &SealedCredentials::new())
    });
    let op = actor(Role::Operator, at(0));
    let other = actor(Role::Operator, at(0));
    let alice = actor(Role::Approver, at(0));
    let bob = actor(Role::Approver, at(0));

    // A full round trip of every field, through submit, two approvals and a rejection.
    let stop = change_request(
        Some(&c),
        "stop_ec2_instance",
        serde_json::json!({"instance_id": "i-0123456789abcdef0"}),
        &op,
        at(1),
    );
    tx(db, |r| r.insert_change_request(&stop));
    assert_eq!(
        tx(db, |r| r.get_change_request(&stop.id)),
        Some(stop.clone())
    );
    let submitted = step(&stop, Action::Submit, &op, at(2));
    let once = step(
        &submitted,
        Action::Approve {
            comment: Some("ok".into()),
        },
        &alice,
        at(3),
    );
    tx(db, |r| r.update_change_request(&once));
    assert_eq!(
        tx(db, |r| r.lock_change_request(&stop.id)),
        Some(once.clone())
    );
    let twice = step(&once, Action::Approve { comment: None }, &bob, at(4));
    assert_eq!(twice.state, State::Approved);
    tx(db, |r| r.update_change_request(&twice));
    assert_eq!(
        tx(db, |r| r.get_change_request(&stop.id)),
        Some(twice.clone())
    );

    let rotate = change_request(
        Some(&d),
        "rotate_iam_access_key",
        serde_json::json!({"iam_user": "prod-deploy"}),
        &other,
        at(5),
    );
    let rejected = step(
        &step(&rotate, Action::Submit, &other, at(6)),
        Action::Reject {
            reason: "not now".into(),
        },
        &alice,
        at(7),
    );
    tx(db, |r| r.insert_change_request(&rejected));
    assert_eq!(
        tx(db, |r| r.get_change_request(&rejected.id)),
        Some(rejected.clone())
    );
    let agent = change_request(
        None,
        "agent_set_file_mode",
        serde_json::json!({"agent_id": "agt_01jef8z7q3m4n5p6r7s8t9v0wx", "path": "/etc/x", "mode": "600"}),
        &op,
        at(8),
    );
    tx(db, |r| r.insert_change_request(&agent));
    assert_eq!(
        tx(db, |r| r.get_change_request(&agent.id)),
        Some(agent.clone())
    );
    assert_eq!(
        tx(db, |r| r
            .get_change_request(&ChangeRequestId::new(at(0), rnd()))),
        None
    );
    let mut drafts = Vec::new();
    for i in 0..5 {
        let cr = change_request(
            Some(&c),
            "start_ec2_instance",
            serde_json::json!({"instance_id": "i-01234567"}),
            &op,
            at(10 + i),
        );
        tx(db, |r| r.insert_change_request(&cr));
        drafts.push(cr);
    }

    let list = |f: ChangeRequestFilter, limit: u32, after: Option<&ChangeRequestId>| {
        tx(db, |r| {
            r.list_change_requests(
                &f,
                &Page {
                    limit,
                    after: after.map(|a| a.to_string()),
                },
            )
        })
        .into_iter()
        .map(|c| c.id)
        .collect::<Vec<_>>()
    };
    let all = list(ChangeRequestFilter::default(), 100, None);
    assert_eq!(all.len(), 8);
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| b.as_str().cmp(a.as_str()));
    assert_eq!(all, sorted, "newest first");
    let f =
        |state: Option<State>, conn: Option<&Connector>, ty: Option<&str>, by: Option<&Actor>| {
            ChangeRequestFilter {
                state,
                connector_id: conn.map(|c| c.id.clone()),
                change_type: ty.map(str::to_owned),
                requested_by: by.and_then(|a| a.user_id().cloned()),
            }
        };
    assert_eq!(
        list(f(Some(State::Approved), None, None, None), 100, None),
        std::slice::from_ref(&stop.id)
    );
    assert_eq!(
        list(f(Some(State::Rejected), Some(&d), None, None), 100, None),
        std::slice::from_ref(&rejected.id)
    );
    assert_eq!(list(f(None, Some(&c), None, None), 100, None).len(), 6);
    assert_eq!(
        list(f(None, None, Some("agent_set_file_mode"), None), 100, None),
        std::slice::from_ref(&agent.id)
    );
    assert_eq!(
        list(f(None, None, None, Some(&other)), 100, None),
        std::slice::from_ref(&rejected.id)
    );
    assert_eq!(
        list(f(Some(State::Draft), None, None, Some(&op)), 100, None).len(),
        6
    );
    assert!(list(f(Some(State::Draft), Some(&d), None, None), 100, None).is_empty());

    // Keyset pages of one filter.
    let mut seen = Vec::new();
    let mut after: Option<ChangeRequestId> = None;
    loop {
        let p = list(
            f(None, None, Some("start_ec2_instance"), None),
            2,
            after.as_ref(),
        );
        if p.is_empty() {
            break;
        }
        after = p.last().cloned();
        seen.extend(p);
    }
    assert_eq!(
        seen,
        drafts
            .iter()
            .rev()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>()
    );

    // What holds a connector: submitted, approved, executing, rolling back.
    let blocking: Vec<State> = State::ALL
        .into_iter()
        .filter(|s| s.blocks_connector_delete())
        .collect();
    assert_eq!(
        tx(db, |r| r.count_connector_change_requests(&c.id, &blocking)),
        1
    );
    assert_eq!(
        tx(db, |r| r.count_connector_change_requests(&d.id, &blocking)),
        0
    );
    assert_eq!(
        tx(db, |r| r
            .count_connector_change_requests(&c.id, &[State::Draft])),
        5
    );
    // Deleting a connector keeps the history of its change requests.
    assert!(tx(db, |r| r.delete_connector(&d.id)));
    assert_eq!(
        tx(db, |r| r.get_change_request(&rejected.id)),
        Some(rejected.clone())
    );
}

fn concurrent_approvals_are_serialized(t: &TestDb) {
    let db = &t.db;
    let c = connector("c", at(0));
    tx(db, |r| r.insert_connector(&c, &SealedCredentials::new()));
    let op = actor(Role::Operator, at(0));
    let stop = change_request(
        Some(&c),
        "stop_ec2_instance",
        serde_json::json!({"instance_id": "i-0123456789abcdef0"}),
        &op,
        at(1),
    );
    assert_eq!(stop.required_approvals, 2);
    let submitted = step(&stop, Action::Submit, &op, at(2));
    tx(db, |r| r.insert_change_request(&submitted));

    let approvers: Vec<Actor> = (0..2).map(|_| actor(Role::Approver, at(0))).collect();
    let barrier = Arc::new(Barrier::new(approvers.len()));
    let handles: Vec<_> = approvers
        .into_iter()
        .map(|a| {
            let db = db.clone();
            let barrier = barrier.clone();
            let id = submitted.id.clone();
            std::thread::spawn(move || {
                barrier.wait();
                transaction(&db, |r| {
                    let cur = r.lock_change_request(&id)?.unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    let next = step(&cur, Action::Approve { comment: None }, &a, at(3));
                    r.update_change_request(&next)
                })
                .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let done = tx(db, |r| r.get_change_request(&submitted.id)).unwrap();
    assert_eq!(done.approvals.len(), 2, "both approvals count");
    assert_eq!(done.state, State::Approved);
}

fn journals_and_secrets_round_trip(t: &TestDb) {
    use nexplane_domain::execution::{Journal, JournalKind};
    let db = &t.db;
    let c = connector("journal", at(0));
    tx(db, |r| r.insert_connector(&c, &SealedCredentials::new()));
    let op = actor(Role::Operator, at(0));
    let cr = change_request(
        Some(&c),
        "rotate_iam_access_key",
        serde_json::json!({"iam_user": "prod-deploy"}),
        &op,
        at(1),
    );
    tx(db, |r| r.insert_change_request(&cr));
    assert_eq!(
        tx(db, |r| r.get_journal(&cr.id, JournalKind::Execution)),
        None
    );

    // Written before and after each step: the second write replaces the first.
    let mut j = Journal::for_execution(JobId::new(at(2), rnd()), "rotate_iam_access_key").unwrap();
    tx(db, |r| r.put_journal(&cr.id, &j, at(2)));
    j.precheck_passed(serde_json::Map::new(), at(3));
    j.step_started(0, at(3));
    tx(db, |r| r.put_journal(&cr.id, &j, at(3)));
    assert_eq!(
        tx(db, |r| r.get_journal(&cr.id, JournalKind::Execution)),
        Some(j.clone())
    );
    let rb = Journal::for_rollback(JobId::new(at(4), rnd()), &j, None);
    tx(db, |r| r.put_journal(&cr.id, &rb, at(4)));
    assert_eq!(
        tx(db, |r| r.get_journal(&cr.id, JournalKind::Rollback)),
        Some(rb)
    );
    assert_eq!(
        tx(db, |r| r.get_journal(&cr.id, JournalKind::Execution)),
        Some(j.clone())
    );
    let mut both = tx(db, |r| r.get_journals(std::slice::from_ref(&cr.id)));
    both.sort_by_key(|(_, j)| j.kind.as_str());
    assert_eq!(both.len(), 2);
    assert_eq!(both[0].1, j);
    assert_eq!(both[1].1.kind, JournalKind::Rollback);

    // Secrets: stored sealed only (the schema refuses anything else), replaced by name,
    // deleted all at once.
    let sealed = SealedValue::new("v1.k1.bm9uY2U.Y2lwaGVy".into());
    tx(db, |r| {
        r.put_secret(&cr.id, "new_secret_access_key", &sealed, at(5))
    });
    tx(db, |r| {
        r.put_secret(&cr.id, "new_secret_access_key", &sealed, at(6))
    });
    assert_eq!(
        tx(db, |r| r.get_secrets(&cr.id)),
        vec![("new_secret_access_key".to_owned(), sealed.clone())]
    );
    assert_eq!(tx(db, |r| r.all_secrets()).len(), 1);
    let plain = SealedValue::new("plain text".into());
    let refused = transaction(db, |r: &mut dyn nexplane_ports::Repo| {
        r.put_secret(&cr.id, "other", &plain, at(7))
    });
    assert!(refused.is_err(), "a plain-text secret was stored");
    assert_eq!(tx(db, |r| r.delete_secrets(&cr.id)), 1);
    assert_eq!(tx(db, |r| r.delete_secrets(&cr.id)), 0);
    assert!(tx(db, |r| r.get_secrets(&cr.id)).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Agents

fn enrollment_token(hash: &str, created: Timestamp, max_uses: u32) -> EnrollmentToken {
    EnrollmentToken {
        id: EnrollmentTokenId::new(created, rnd()),
        name: Some(format!("token {hash}")),
        token_hash: hash.to_owned(),
        expires_at: created.plus_secs(1800),
        max_uses,
        uses: 0,
        created_by: UserId::new(created, rnd()),
        created_at: created,
        revoked_at: None,
    }
}

fn agent(token: &EnrollmentToken, host: &str, registered: Timestamp) -> Agent {
    Agent {
        id: AgentId::new(registered, rnd()),
        name: host.to_owned(),
        hostname: format!("{host}.example.internal"),
        os: "linux".into(),
        arch: "x86_64".into(),
        version: "0.1.0".into(),
        labels: serde_json::json!({"env": "staging", "role": host}),
        sealed_secret: SealedValue::new(format!("v1.k1.bm9uY2U.{host}")),
        enrollment_token_id: token.id.clone(),
        registered_at: registered,
        last_heartbeat_at: None,
        revoked_at: None,
    }
}

fn command(a: &Agent, job: Option<&JobId>, step: &str, created: Timestamp) -> AgentCommand {
    AgentCommand {
        id: CommandId::new(created, rnd()),
        agent_id: a.id.clone(),
        change_request_id: Some(ChangeRequestId::new(created, rnd())),
        job_id: job.cloned(),
        step: step.to_owned(),
        command_type: "write_file".into(),
        params: serde_json::json!({"path": "/etc/motd", "content": "hello", "mode": 420}),
        status: CommandStatus::Queued,
        output: None,
        sealed_snapshot: None,
        error: None,
        created_at: created,
        dispatched_at: None,
        finished_at: None,
    }
}

/// Pages through `list` with pages of `size` and returns the ids seen, and the page count.
fn page_all(size: u32, mut list: impl FnMut(&Page) -> Vec<String>) -> (Vec<String>, usize) {
    let mut page = Page {
        limit: size,
        after: None,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let batch = list(&page);
        if batch.is_empty() {
            return (seen, pages);
        }
        assert!(batch.len() <= size as usize);
        pages += 1;
        page.after = batch.last().cloned();
        seen.extend(batch);
    }
}

fn enrollment_tokens_round_trip_and_paging(t: &TestDb) {
    let db = &t.db;
    let mut first = enrollment_token("h0", at(0), 3);
    first.name = None;
    tx(db, |r| r.insert_enrollment_token(&first));
    assert_eq!(
        tx(db, |r| r.get_enrollment_token(&first.id)),
        Some(first.clone())
    );
    assert_eq!(
        tx(db, |r| r.get_enrollment_token(&EnrollmentTokenId::new(
            at(1),
            424_242
        ))),
        None
    );

    // The hash is unique.
    let dup = enrollment_token("h0", at(1), 1);
    assert_eq!(
        transaction(db, |r| r.insert_enrollment_token(&dup)),
        Err(StoreError::Conflict("enrollment_tokens.token_hash".into()))
    );

    let mut ids = vec![first.id.as_str().to_owned()];
    tx(db, |r| {
        for i in 1..13 {
            let tok = enrollment_token(&format!("h{i}"), at(i * 1000), 1);
            ids.push(tok.id.as_str().to_owned());
            r.insert_enrollment_token(&tok)?;
        }
        Ok(())
    });
    ids.sort();
    ids.reverse(); // newest first
    let (seen, pages) = page_all(5, |page| {
        tx(db, |r| r.list_enrollment_tokens(page))
            .into_iter()
            .map(|t| t.id.as_str().to_owned())
            .collect()
    });
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "pages in id order, no duplicates, no gaps");

    // Revocation keeps the first time; an unknown token is reported.
    assert!(tx(db, |r| r.revoke_enrollment_token(&first.id, at(100))));
    assert!(tx(db, |r| r.revoke_enrollment_token(&first.id, at(200))));
    assert!(!tx(db, |r| r.revoke_enrollment_token(
        &EnrollmentTokenId::new(at(1), 99),
        at(200)
    )));
    assert_eq!(
        tx(db, |r| r.get_enrollment_token(&first.id))
            .unwrap()
            .revoked_at,
        Some(at(100))
    );
}

fn unusable_enrollment_tokens_are_not_consumed(t: &TestDb) {
    let db = &t.db;
    let two = enrollment_token("two", at(0), 2);
    let mut expired = enrollment_token("expired", at(0), 5);
    expired.expires_at = at(1000);
    let revoked = enrollment_token("revoked", at(0), 5);
    let mut used_up = enrollment_token("used_up", at(0), 2);
    used_up.uses = 2;
    tx(db, |r| {
        for tok in [&two, &expired, &revoked, &used_up] {
            r.insert_enrollment_token(tok)?;
        }
        r.revoke_enrollment_token(&revoked.id, at(10))
    });

    let one = tx(db, |r| r.consume_enrollment_token("two", at(500))).unwrap();
    assert_eq!(one.uses, 1);
    assert_eq!(
        one,
        EnrollmentToken {
            uses: 1,
            ..two.clone()
        }
    );
    let second = tx(db, |r| r.consume_enrollment_token("two", at(500))).unwrap();
    assert_eq!(second.uses, 2);
    assert_eq!(tx(db, |r| r.consume_enrollment_token("two", at(500))), None);

    // Expired: at `expires_at` it no longer works.
    assert_eq!(
        tx(db, |r| r.consume_enrollment_token("expired", at(999)))
            .unwrap()
            .uses,
        1
    );
    assert_eq!(
        tx(db, |r| r.consume_enrollment_token("expired", at(1000))),
        None
    );
    assert_eq!(
        tx(db, |r| r.consume_enrollment_token("expired", at(5000))),
        None
    );
    assert_eq!(
        tx(db, |r| r.consume_enrollment_token("revoked", at(500))),
        None
    );
    assert_eq!(
        tx(db, |r| r.consume_enrollment_token("used_up", at(500))),
        None
    );
    assert_eq!(
        tx(db, |r| r.consume_enrollment_token("unknown", at(500))),
        None
    );

    // Refusals changed nothing.
    let uses = |id: &EnrollmentTokenId| tx(db, |r| r.get_enrollment_token(id)).unwrap().uses;
    assert_eq!(uses(&two.id), 2);
    assert_eq!(uses(&expired.id), 1);
    assert_eq!(uses(&revoked.id), 0);
    assert_eq!(uses(&used_up.id), 2);

    // The schema itself bounds the uses.
    let mut over = enrollment_token("over", at(0), 1);
    over.uses = 2;
    assert!(transaction(db, |r| r.insert_enrollment_token(&over)).is_err());
}

fn enrollment_token_race_never_exceeds_max_uses(t: &TestDb) {
    const THREADS: usize = 10;
    let db = &t.db;
    let inside = db.backend() == Backend::Postgres;
    for (hash, max_uses) in [("single", 1_u32), ("triple", 3)] {
        let tok = enrollment_token(hash, at(0), max_uses);
        tx(db, |r| r.insert_enrollment_token(&tok));
        let barrier = Barrier::new(THREADS);
        let got: Vec<Option<EnrollmentToken>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let barrier = &barrier;
                    let tok = &tok;
                    scope.spawn(move || {
                        // SQLite transactions are IMMEDIATE: meet before. PostgreSQL: meet
                        // inside, once every transaction has read the token as usable.
                        if !inside {
                            barrier.wait();
                        }
                        transaction(db, |r| {
                            if inside {
                                let seen = r.get_enrollment_token(&tok.id)?.expect("token");
                                assert!(seen.is_usable(at(10)));
                                barrier.wait();
                            }
                            r.consume_enrollment_token(hash, at(10))
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<&EnrollmentToken> = got.iter().flatten().collect();
        assert_eq!(winners.len(), max_uses as usize, "{hash}: {got:?}");
        let mut uses: Vec<u32> = winners.iter().map(|t| t.uses).collect();
        uses.sort_unstable();
        assert_eq!(uses, (1..=max_uses).collect::<Vec<_>>(), "{hash}");
        assert_eq!(
            tx(db, |r| r.get_enrollment_token(&tok.id)).unwrap().uses,
            max_uses
        );
    }
}

fn agents_round_trip_and_paging(t: &TestDb) {
    let db = &t.db;
    let tok = enrollment_token("agents", at(0), 20);
    tx(db, |r| r.insert_enrollment_token(&tok));
    let web = agent(&tok, "web", at(0));
    tx(db, |r| r.insert_agent(&web));
    assert_eq!(tx(db, |r| r.get_agent(&web.id)), Some(web.clone()));
    assert_eq!(tx(db, |r| r.get_agent(&AgentId::new(at(0), 77_777))), None);
    assert!(matches!(
        transaction(db, |r| r.insert_agent(&web)),
        Err(StoreError::Conflict(target)) if target == "agents.id"
    ));

    // Update overwrites the mutable fields, not the token or the registration time.
    let mut changed = web.clone();
    changed.name = "web-1".into();
    changed.hostname = "web-1.example.internal".into();
    changed.os = "freebsd".into();
    changed.arch = "aarch64".into();
    changed.version = "0.2.0".into();
    changed.labels = serde_json::json!({"env": "production", "tier": ["a", "b"]});
    changed.sealed_secret = SealedValue::new("v1.k2.bm9uY2U.rotated".into());
    changed.last_heartbeat_at = Some(at(50));
    changed.revoked_at = Some(at(60));
    tx(db, |r| r.update_agent(&changed));
    assert_eq!(tx(db, |r| r.get_agent(&web.id)), Some(changed.clone()));
    let mut other_fields = changed.clone();
    other_fields.registered_at = at(999);
    other_fields.enrollment_token_id = EnrollmentTokenId::new(at(1), 5);
    tx(db, |r| r.update_agent(&other_fields));
    assert_eq!(tx(db, |r| r.get_agent(&web.id)), Some(changed.clone()));
    assert!(transaction(db, |r| r.update_agent(&agent(&tok, "ghost", at(1)))).is_err());

    // The schema refuses a plain-text secret, on insert and on update.
    let mut plain = agent(&tok, "plain", at(1));
    plain.sealed_secret = SealedValue::new("plain text secret".into());
    assert!(transaction(db, |r| r.insert_agent(&plain)).is_err());
    assert_eq!(tx(db, |r| r.get_agent(&plain.id)), None);
    let mut plain_update = changed.clone();
    plain_update.sealed_secret = SealedValue::new("hunter2".into());
    assert!(transaction(db, |r| r.update_agent(&plain_update)).is_err());
    assert_eq!(tx(db, |r| r.get_agent(&web.id)), Some(changed));

    let mut ids = vec![web.id.as_str().to_owned()];
    tx(db, |r| {
        for i in 1..12 {
            let a = agent(&tok, &format!("host{i}"), at(i * 1000));
            ids.push(a.id.as_str().to_owned());
            r.insert_agent(&a)?;
        }
        Ok(())
    });
    ids.sort();
    ids.reverse();
    let (seen, pages) = page_all(4, |page| {
        tx(db, |r| r.list_agents(page))
            .into_iter()
            .map(|a| a.id.as_str().to_owned())
            .collect()
    });
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "pages in id order, no duplicates, no gaps");
}

fn signatures_are_remembered_once(t: &TestDb) {
    let db = &t.db;
    let a = AgentId::new(at(0), rnd());
    let b = AgentId::new(at(0), rnd());
    assert!(tx(db, |r| r.remember_signature(&a, "sig-1", at(300_000))));
    // A replay, from any agent: refused, and the transaction goes on and commits.
    let (replay, other) = tx(db, |r| {
        let replay = r.remember_signature(&a, "sig-1", at(300_000))?;
        let again = r.remember_signature(&b, "sig-1", at(400_000))?;
        assert!(!again);
        let other = r.remember_signature(&b, "sig-2", at(310_000))?;
        Ok((replay, other))
    });
    assert!(!replay);
    assert!(other, "the transaction stayed usable after the replay");
    assert!(tx(db, |r| r.remember_signature(&a, "sig-3", at(320_000))));

    // Forgotten once expired (strictly before `now`); then a signature is new again.
    assert_eq!(tx(db, |r| r.forget_signatures(at(300_000))), 0);
    assert_eq!(tx(db, |r| r.forget_signatures(at(310_001))), 2);
    assert_eq!(tx(db, |r| r.forget_signatures(at(310_001))), 0);
    assert!(!tx(db, |r| r.remember_signature(&a, "sig-3", at(320_000))));
    assert!(tx(db, |r| r.remember_signature(&a, "sig-1", at(600_000))));
    assert_eq!(tx(db, |r| r.forget_signatures(at(1_000_000))), 2);
}

fn commands_round_trip_and_conflict_per_job_step(t: &TestDb) {
    let db = &t.db;
    let tok = enrollment_token("commands", at(0), 5);
    let web = agent(&tok, "web", at(0));
    tx(db, |r| {
        r.insert_enrollment_token(&tok)?;
        r.insert_agent(&web)
    });
    let job = JobId::new(at(1), rnd());
    let first = command(&web, Some(&job), "0", at(1));
    tx(db, |r| r.insert_command(&first));
    assert_eq!(tx(db, |r| r.get_command(&first.id)), Some(first.clone()));
    assert_eq!(tx(db, |r| r.lock_command(&first.id)), Some(first.clone()));
    assert_eq!(
        tx(db, |r| r.find_job_command(&job, "0")),
        Some(first.clone())
    );
    assert_eq!(tx(db, |r| r.find_job_command(&job, "1")), None);
    assert_eq!(tx(db, |r| r.get_command(&CommandId::new(at(1), 5))), None);

    // The same (job, step) again conflicts, and the transaction goes on.
    let again = command(&web, Some(&job), "0", at(2));
    let next_step = command(&web, Some(&job), "1", at(2));
    let found = tx(db, |r| {
        assert_eq!(
            r.insert_command(&again),
            Err(StoreError::Conflict(
                "agent_commands.job_id, agent_commands.step".into()
            ))
        );
        r.insert_command(&next_step)?;
        r.find_job_command(&job, "0")
    });
    assert_eq!(found, Some(first.clone()));
    assert_eq!(tx(db, |r| r.get_command(&again.id)), None);
    // Commands without a job never conflict; another job may use the same step.
    let loose_a = command(&web, None, "0", at(3));
    let loose_b = command(&web, None, "0", at(3));
    let other_job = command(&web, Some(&JobId::new(at(3), rnd())), "0", at(3));
    tx(db, |r| {
        r.insert_command(&loose_a)?;
        r.insert_command(&loose_b)?;
        r.insert_command(&other_job)
    });
    // A command needs an existing agent.
    let stranger = agent(&tok, "stranger", at(0));
    assert!(transaction(db, |r| r.insert_command(&command(
        &stranger,
        None,
        "0",
        at(4)
    )))
    .is_err());

    // Update overwrites status, output, snapshot, error and times.
    let mut done = first.clone();
    done.status = CommandStatus::Succeeded;
    done.output = Some(serde_json::json!({"written": true, "bytes": 5}));
    done.sealed_snapshot = Some(SealedValue::new("v1.k1.bm9uY2U.c25hcA".into()));
    done.dispatched_at = Some(at(10));
    done.finished_at = Some(at(20));
    tx(db, |r| r.update_command(&done));
    assert_eq!(tx(db, |r| r.get_command(&first.id)), Some(done.clone()));
    let mut failed = next_step.clone();
    failed.status = CommandStatus::Failed;
    failed.error = Some("permission denied".into());
    failed.finished_at = Some(at(21));
    tx(db, |r| r.update_command(&failed));
    assert!(
        transaction(db, |r| r.update_command(&command(&web, None, "x", at(5)))).is_err(),
        "updating a missing command"
    );
    // A plain-text snapshot is refused by the schema.
    let mut plain = done.clone();
    plain.sealed_snapshot = Some(SealedValue::new("root:x:0:0".into()));
    assert!(transaction(db, |r| r.update_command(&plain)).is_err());
    assert_eq!(tx(db, |r| r.get_command(&first.id)), Some(done.clone()));

    // The agent's commands by status, oldest first.
    let ids = |cs: Vec<AgentCommand>| cs.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(tx(db, |r| r.agent_commands(
            &web.id,
            &[CommandStatus::Succeeded, CommandStatus::Failed]
        ))),
        vec![first.id.clone(), next_step.id.clone()]
    );
    let mut queued = vec![loose_a.id.clone(), loose_b.id.clone(), other_job.id.clone()];
    queued.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(
        ids(tx(db, |r| r.agent_commands(&web.id, &[CommandStatus::Queued]))),
        queued
    );
    assert!(tx(db, |r| r.agent_commands(&web.id, &[])).is_empty());
    assert!(tx(db, |r| r
        .agent_commands(&stranger.id, &[CommandStatus::Queued]))
    .is_empty());
}

fn queued_commands_oldest_first(t: &TestDb) {
    let db = &t.db;
    let tok = enrollment_token("queue", at(0), 5);
    let a = agent(&tok, "a", at(0));
    let b = agent(&tok, "b", at(0));
    let c = agent(&tok, "c", at(0));
    tx(db, |r| {
        r.insert_enrollment_token(&tok)?;
        r.insert_agent(&a)?;
        r.insert_agent(&b)?;
        r.insert_agent(&c)
    });
    assert_eq!(tx(db, |r| r.next_queued_command(&a.id)), None);
    assert!(tx(db, |r| r.agents_with_queued_commands()).is_empty());

    // Inserted newest first: the order comes from the ids, not from the insertion.
    let a_cmds: Vec<AgentCommand> = (0..3)
        .map(|i| command(&a, None, &i.to_string(), at(i * 10)))
        .collect();
    let b_cmd = command(&b, None, "0", at(5));
    let mut c_done = command(&c, None, "0", at(5));
    c_done.status = CommandStatus::Dispatched;
    tx(db, |r| {
        for cmd in a_cmds.iter().rev() {
            r.insert_command(cmd)?;
        }
        r.insert_command(&b_cmd)?;
        r.insert_command(&c_done)
    });
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(tx(db, |r| r.agents_with_queued_commands()), expected);

    // Each poll takes the oldest queued command of its agent.
    for cmd in &a_cmds {
        let got = tx(db, |r| {
            let Some(mut next) = r.next_queued_command(&a.id)? else {
                return Ok(None);
            };
            next.status = CommandStatus::Dispatched;
            next.dispatched_at = Some(at(100));
            r.update_command(&next)?;
            Ok(Some(next.id))
        });
        assert_eq!(got.as_ref(), Some(&cmd.id));
    }
    assert_eq!(tx(db, |r| r.next_queued_command(&a.id)), None);
    assert_eq!(tx(db, |r| r.next_queued_command(&c.id)), None);
    assert_eq!(tx(db, |r| r.next_queued_command(&b.id)), Some(b_cmd));
    assert_eq!(
        tx(db, |r| r.agents_with_queued_commands()),
        vec![b.id.clone()]
    );
}

fn concurrent_polls_never_take_the_same_command(t: &TestDb) {
    const COMMANDS: i64 = 12;
    const POLLERS: usize = 4;
    let db = &t.db;
    let tok = enrollment_token("polls", at(0), 5);
    let a = agent(&tok, "a", at(0));
    let cmds: Vec<AgentCommand> = (0..COMMANDS)
        .map(|i| command(&a, None, &i.to_string(), at(i)))
        .collect();
    tx(db, |r| {
        r.insert_enrollment_token(&tok)?;
        r.insert_agent(&a)?;
        cmds.iter().try_for_each(|c| r.insert_command(c))
    });

    if db.backend() == Backend::Postgres {
        // Two transactions open at once: the second skips the command the first holds. (The
        // first gives up waiting after a while, so a poll that blocks on the lock instead of
        // skipping it fails the assertions below rather than hanging.)
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let (taken_tx, taken_rx) = std::sync::mpsc::channel::<()>();
        let a = &a;
        let (first, second) = std::thread::scope(|scope| {
            let one = scope.spawn(move || {
                tx(db, |r| {
                    let got = r.next_queued_command(&a.id)?;
                    held_tx.send(()).unwrap();
                    // Keep the row locked until the other has polled.
                    let _ = taken_rx.recv_timeout(Duration::from_secs(5));
                    Ok(got.map(|c| c.id))
                })
            });
            let two = scope.spawn(move || {
                held_rx.recv().unwrap();
                let got = tx(db, |r| Ok(r.next_queued_command(&a.id)?.map(|c| c.id)));
                let _ = taken_tx.send(());
                got
            });
            (one.join().unwrap(), two.join().unwrap())
        });
        assert_eq!(first.as_ref(), Some(&cmds[0].id));
        assert_eq!(second.as_ref(), Some(&cmds[1].id));
    }

    // Pollers dispatch every command, each exactly once.
    let barrier = Barrier::new(POLLERS);
    let taken: Vec<Vec<CommandId>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..POLLERS)
            .map(|_| {
                let barrier = &barrier;
                let a = &a;
                scope.spawn(move || {
                    barrier.wait();
                    let mut mine = Vec::new();
                    loop {
                        let got = tx(db, |r| {
                            let Some(mut next) = r.next_queued_command(&a.id)? else {
                                return Ok(None);
                            };
                            next.status = CommandStatus::Dispatched;
                            next.dispatched_at = Some(at(1000));
                            r.update_command(&next)?;
                            Ok(Some(next.id))
                        });
                        match got {
                            Some(id) => mine.push(id),
                            None => return mine,
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<&CommandId> = taken.iter().flatten().collect();
    assert_eq!(all.len(), cmds.len(), "each command once: {taken:?}");
    let unique: HashSet<&CommandId> = all.iter().copied().collect();
    assert_eq!(unique.len(), cmds.len());
    assert!(tx(db, |r| r.agents_with_queued_commands()).is_empty());
}
