//! The audit log (api.md §9): every filter of `GET /audit`, keyset paging newest first, the
//! event shape and hash chain, and `GET /audit/verify` catching altered and removed rows.

use crate::both;
use crate::harness::*;
use crate::users::walk_pages;
use nexplane_domain::Timestamp;
use serde_json::{json, Value};

fn seqs(evs: &[Value]) -> Vec<i64> {
    evs.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

fn millis(e: &Value) -> i64 {
    Timestamp::parse_rfc3339(e["timestamp"].as_str().unwrap())
        .unwrap()
        .millis()
}

/// What the test did, to check the filters against.
struct Story {
    a: String,
    b: String,
    /// X-Request-Id of the request that created A.
    create_a_rid: String,
}

/// Writes events spread over time: the clock moves 10 s before each step.
async fn story(app: &TestApp) -> Story {
    let admin = app.admin_token.clone();
    let mut created = Vec::new();
    let mut rid = String::new();
    for name in ["a", "b"] {
        app.clock.advance_secs(10);
        let r = app
            .post(
                "/users",
                &admin,
                json!({"email": format!("{name}@example.com"), "name": name, "role": "operator", "password": USER_PASSWORD}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        if name == "a" {
            rid = r.header("x-request-id").unwrap().to_owned();
        }
        created.push(r.body["id"].as_str().unwrap().to_owned());
    }
    let (a, b) = (created[0].clone(), created[1].clone());
    app.clock.advance_secs(10);
    assert_eq!(
        app.put(&format!("/users/{a}"), &admin, json!({"name": "A"}))
            .await
            .status,
        200
    );
    app.clock.advance_secs(10);
    let a_token = app.login_ok("a@example.com", USER_PASSWORD).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    app.clock.advance_secs(10);
    let r = app
        .post(
            &format!("/users/{a}/password"),
            &a_token,
            json!({"current_password": USER_PASSWORD, "new_password": "a-brand-new-password"}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    app.clock.advance_secs(10);
    app.login("b@example.com", "wrong-password!")
        .await
        .assert_problem(401);
    app.clock.advance_secs(10);
    assert_eq!(
        app.req(reqwest::Method::POST, "/auth/logout", Some(&a_token), None)
            .await
            .status,
        204
    );
    app.clock.advance_secs(10);
    Story {
        a,
        b,
        create_a_rid: rid,
    }
}

/// `GET /audit?{query}` (walking every page) answers exactly the events of `all` that
/// `keep` selects, newest first; and the filter really selects (not none, not all).
async fn check_filter(
    app: &TestApp,
    all: &[Value],
    query: &str,
    keep: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let expected: Vec<i64> = all
        .iter()
        .filter(|e| keep(e))
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(
        !expected.is_empty() && expected.len() < all.len(),
        "{query} does not discriminate"
    );
    let got = walk_pages(app, &format!("/audit?{query}&limit=2"), &app.admin_token)
        .await
        .items;
    assert_eq!(seqs(&got), expected, "{query}");
    let one = app.get(&format!("/audit?{query}"), &app.admin_token).await;
    assert_eq!(
        seqs(one.body.as_array().unwrap()),
        expected,
        "{query} (one page)"
    );
    got
}

both!(
    every_filter_paging_and_event_shape,
    |app: TestApp| async move {
        let s = story(&app).await;
        let admin = app.admin_token.clone();
        let (_, viewer) = app.user("viewer").await;

        let r = app.get("/audit?limit=500", &viewer).await;
        assert_eq!(r.status, 200, "any role reads the audit log");
        let all = r.body.as_array().unwrap().clone();
        assert!(r.header("link").is_none());
        let n = all.len() as i64;
        assert!(n >= 10);
        // Newest first, seq contiguous from 1, each event linked to the one before it.
        assert_eq!(seqs(&all), (1..=n).rev().collect::<Vec<_>>());
        for w in all.windows(2) {
            assert_eq!(
                w[0]["prev_hash"], w[1]["hash"],
                "chain link at seq {}",
                w[0]["seq"]
            );
            assert!(millis(&w[0]) >= millis(&w[1]));
        }
        for e in &all {
            assert!(e["id"].as_str().unwrap().starts_with("evt_"), "{e}");
            let ts = e["timestamp"].as_str().unwrap();
            assert!(ts.len() == 24 && ts.ends_with('Z'), "{ts}");
            assert_eq!(e["hash"].as_str().unwrap().len(), 64);
            for k in ["actor", "event_type", "resource_type"] {
                assert!(e[k].as_str().is_some_and(|v| !v.is_empty()), "{k} in {e}");
            }
            assert!(e["payload"].is_object(), "{e}");
            assert!(
                !e.to_string().contains(USER_PASSWORD)
                    && !e.to_string().contains("a-brand-new-password")
            );
        }
        let boot = all.last().unwrap();
        assert_eq!(
            (boot["event_type"].clone(), boot["actor"].clone()),
            (json!("user.created"), json!("system"))
        );
        let created_a = all
            .iter()
            .find(|e| e["event_type"] == json!("user.created") && e["resource_id"] == json!(s.a))
            .unwrap();
        assert_eq!(created_a["actor"], json!(ADMIN_EMAIL));
        assert_eq!(
            created_a["request_id"],
            json!(s.create_a_rid),
            "the request id is recorded"
        );
        assert_eq!(created_a["resource_type"], json!("user"));
        assert_eq!(created_a["change_request_id"], Value::Null);
        let failed = all
            .iter()
            .find(|e| e["event_type"] == json!("auth.login_failed"))
            .unwrap();
        assert_eq!(failed["actor"], json!("b@example.com"));
        assert_eq!(failed["actor_id"], json!(s.b));

        // Each filter alone.
        let a = s.a.clone();
        let got = check_filter(&app, &all, &format!("user_id={a}"), |e| {
            e["actor_id"] == json!(a)
        })
        .await;
        let kinds: Vec<&str> = got
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["auth.logout", "user.password_changed", "auth.login"]
        );
        check_filter(&app, &all, &format!("resource_id={a}"), |e| {
            e["resource_id"] == json!(a)
        })
        .await;
        check_filter(&app, &all, "resource_type=session", |e| {
            e["resource_type"] == json!("session")
        })
        .await;
        check_filter(&app, &all, "resource_type=user", |e| {
            e["resource_type"] == json!("user")
        })
        .await;
        let got = check_filter(&app, &all, "event_type=user.created", |e| {
            e["event_type"] == json!("user.created")
        })
        .await;
        assert_eq!(got.len(), 4, "bootstrap, a, b, the viewer");
        check_filter(&app, &all, "event_type=auth.login", |e| {
            e["event_type"] == json!("auth.login")
        })
        .await;
        // No change request exists yet: the filter selects nothing (it is not ignored).
        for cr in ["cr_01jef8zzzzzzzzzzzzzzzzzzzz", "anything"] {
            let r = app
                .get(&format!("/audit?change_request_id={cr}"), &admin)
                .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body, json!([]));
        }
        for q in [
            "user_id=usr_01jef8zzzzzzzzzzzzzzzzzzzz",
            "event_type=no.such",
            "resource_type=nothing",
            "resource_id=x",
        ] {
            assert_eq!(
                app.get(&format!("/audit?{q}"), &admin).await.body,
                json!([]),
                "{q}"
            );
        }

        // Filters combine (AND).
        let a = s.a.clone();
        let got = check_filter(
            &app,
            &all,
            &format!("event_type=user.created&resource_id={a}"),
            |e| e["event_type"] == json!("user.created") && e["resource_id"] == json!(a),
        )
        .await;
        assert_eq!(got.len(), 1);
        let b = s.b.clone();
        check_filter(
            &app,
            &all,
            &format!("resource_type=user&user_id={b}"),
            |e| e["resource_type"] == json!("user") && e["actor_id"] == json!(b),
        )
        .await;

        // Time: from inclusive, to exclusive, at millisecond precision.
        let t_update = millis(
            all.iter()
                .find(|e| e["event_type"] == json!("user.updated"))
                .unwrap(),
        );
        let t_pw = millis(
            all.iter()
                .find(|e| e["event_type"] == json!("user.password_changed"))
                .unwrap(),
        );
        let iso = |ms: i64| Timestamp::from_millis(ms).to_rfc3339();
        let (from, to) = (iso(t_update), iso(t_pw));
        check_filter(&app, &all, &format!("from={from}"), |e| {
            millis(e) >= t_update
        })
        .await;
        check_filter(&app, &all, &format!("to={to}"), |e| millis(e) < t_pw).await;
        let got = check_filter(&app, &all, &format!("from={from}&to={to}"), |e| {
            (t_update..t_pw).contains(&millis(e))
        })
        .await;
        let kinds: Vec<&str> = got
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["auth.login", "user.updated"]);
        // One millisecond later excludes the event at `from`; one earlier includes the one at `to`.
        check_filter(&app, &all, &format!("from={}", iso(t_update + 1)), |e| {
            millis(e) > t_update
        })
        .await;
        check_filter(&app, &all, &format!("to={}", iso(t_pw + 1)), |e| {
            millis(e) <= t_pw
        })
        .await;
        // The same instant written with an offset, or without milliseconds.
        let shifted = iso(t_update + 2 * 3_600_000).replace('Z', "%2B02:00");
        check_filter(&app, &all, &format!("from={shifted}"), |e| {
            millis(e) >= t_update
        })
        .await;
        let plus_zero = from.replace('Z', "%2B00:00");
        check_filter(&app, &all, &format!("from={plus_zero}"), |e| {
            millis(e) >= t_update
        })
        .await;
        // An empty window is empty, not an error.
        let r = app
            .get(&format!("/audit?from={from}&to={from}"), &admin)
            .await;
        assert_eq!((r.status.as_u16(), r.body.clone()), (200, json!([])));

        // Malformed times → 422 naming the parameter; to before from → 422.
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-01-01T25:00:00Z",
            "1700000000",
            "",
            "2026-01-01T00:00:00",
        ] {
            for field in ["from", "to"] {
                let r = app.get(&format!("/audit?{field}={bad}"), &admin).await;
                r.assert_problem(422);
                assert_eq!(
                    r.body["errors"][0]["field"],
                    json!(field),
                    "{field}={bad}: {}",
                    r.text
                );
            }
        }
        app.get(&format!("/audit?from={to}&to={from}"), &admin)
            .await
            .assert_problem(422);

        // Paging: newest first, every event once, pages of the asked size.
        let walked = walk_pages(&app, "/audit?limit=3", &admin).await;
        assert_eq!(seqs(&walked.items), seqs(&all));
        assert_eq!(walked.pages, all.len().div_ceil(3));
        let first = app.get("/audit?limit=3", &admin).await;
        let link = first.header("link").unwrap();
        assert!(
            link.starts_with("</audit?") && link.contains("limit=3"),
            "{link}"
        );
        let walked = walk_pages(&app, "/audit?event_type=auth.login&limit=1", &admin).await;
        assert!(walked
            .items
            .iter()
            .all(|e| e["event_type"] == json!("auth.login")));
        assert_eq!(
            walked.items.len(),
            all.iter()
                .filter(|e| e["event_type"] == json!("auth.login"))
                .count()
        );
        // Default page size 50, limits checked, cursors opaque and checked.
        for limit in ["0", "501"] {
            app.get(&format!("/audit?limit={limit}"), &admin)
                .await
                .assert_problem(422);
        }
        for c in ["zz", "ff", "616263", ""] {
            app.get(&format!("/audit?cursor={c}"), &admin)
                .await
                .assert_problem(400);
        }

        // Verify: ok, every event counted, the head is the newest hash.
        let r = app.get("/audit/verify", &admin).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let total = app.get("/audit?limit=500", &admin).await.body;
        assert_eq!(
            r.body,
            json!({"ok": true, "events": total.as_array().unwrap().len(), "head": total[0]["hash"]})
        );
        // Reading the log leaves no events of its own.
        assert_eq!(app.get("/audit?limit=500", &admin).await.body, total);
        for role in ["viewer", "operator", "approver"] {
            let (_, t) = app.user(role).await;
            app.get("/audit/verify", &t).await.assert_problem(403);
            assert_eq!(app.get("/audit", &t).await.status, 200);
        }
    }
);

async fn verify(app: &TestApp) -> Value {
    let r = app.get("/audit/verify", &app.admin_token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

both!(
    verify_reports_the_first_altered_or_removed_row,
    |app: TestApp| async move {
        story(&app).await;
        app.user("viewer").await;
        let all = app.get("/audit?limit=500", &app.admin_token).await.body;
        let n = all.as_array().unwrap().len() as i64;
        assert!(n >= 10);
        let v = verify(&app).await;
        assert_eq!(v, json!({"ok": true, "events": n, "head": all[0]["hash"]}));

        // Each tampering is earlier in the chain than the previous one, so each is the first bad
        // row when reported.
        app.sql(&format!(
            "UPDATE audit_events SET payload = '{{\"email\":\"evil@example.com\"}}' WHERE seq = {}",
            n - 1
        ));
        assert_eq!(
            verify(&app).await,
            json!({"ok": false, "first_bad_seq": n - 1})
        );

        app.sql(&format!("DELETE FROM audit_events WHERE seq = {}", n - 3));
        assert_eq!(
            verify(&app).await,
            json!({"ok": false, "first_bad_seq": n - 3})
        );

        app.sql("UPDATE audit_events SET actor = 'mallory@example.com' WHERE seq = 6");
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 6}));

        app.sql("UPDATE audit_events SET timestamp = timestamp + 1 WHERE seq = 5");
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 5}));

        // Rewriting a row's stored hash breaks its own check.
        app.sql(&format!(
            "UPDATE audit_events SET hash = '{}' WHERE seq = 4",
            "0".repeat(64)
        ));
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 4}));

        app.sql("UPDATE audit_events SET event_type = 'user.updated' WHERE seq = 3");
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 3}));

        app.sql("DELETE FROM audit_events WHERE seq = 1");
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 1}));
    }
);

both!(
    verify_reports_a_row_that_no_longer_parses,
    |app: TestApp| async move {
        story(&app).await;
        app.sql("UPDATE audit_events SET payload = 'not json at all' WHERE seq = 4");
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 4}));
        app.sql("UPDATE audit_events SET id = 'evt_forged' WHERE seq = 2");
        assert_eq!(verify(&app).await, json!({"ok": false, "first_bad_seq": 2}));
        // The server still answers everything else.
        assert_eq!(app.get("/auth/me", &app.admin_token).await.status, 200);
    }
);

both!(
    verify_finds_a_removed_row_deep_in_a_long_chain,
    |app: TestApp| async move {
        // More events than one verification batch reads at a time (1000).
        let admin = app.admin_token.clone();
        let (u, _) = app.user("viewer").await;
        let path = format!("/users/{}", u["id"].as_str().unwrap());
        for chunk in 0..20 {
            let futs = (0..50)
                .map(|i| app.put(&path, &admin, json!({"name": format!("name {chunk} {i}")})));
            for r in futures_util::future::join_all(futs).await {
                assert_eq!(r.status, 200, "{}", r.text);
            }
        }
        let v = verify(&app).await;
        assert_eq!(v["ok"], json!(true), "{v}");
        let n = v["events"].as_i64().unwrap();
        assert!(n > 1003, "{n}");
        let head = app.get("/audit?limit=1", &admin).await.body;
        assert_eq!(v["head"], head[0]["hash"]);
        app.sql("DELETE FROM audit_events WHERE seq = 1002");
        assert_eq!(
            verify(&app).await,
            json!({"ok": false, "first_bad_seq": 1002})
        );
        // A tampered row in the first batch is found before it.
        app.sql("UPDATE audit_events SET payload = 'garbage' WHERE seq = 999");
        assert_eq!(
            verify(&app).await,
            json!({"ok": false, "first_bad_seq": 999})
        );
    }
);
