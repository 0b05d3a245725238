//! Users (api.md §2.3): list with keyset paging, create, get, update, disable, passwords,
//! and the audit events they leave.

use crate::both;
use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// One page of a walk through a list.
pub struct Walked {
    pub items: Vec<Value>,
    pub pages: usize,
}

/// Follows `Link: <…>; rel="next"` from `first` until the last page, checking on each page
/// that `X-Next-Cursor` and the link agree and that the last page announces nothing.
pub async fn walk_pages(app: &TestApp, first: &str, token: &str) -> Walked {
    let mut path = first.to_owned();
    let mut items = Vec::new();
    let mut pages = 0;
    loop {
        let r = app.get(&path, token).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        pages += 1;
        assert!(pages < 1000, "paging does not end");
        let page = r.body.as_array().expect("a list is a JSON array").clone();
        let link = r.header("link").map(str::to_owned);
        let next_cursor = r.header("x-next-cursor").map(str::to_owned);
        items.extend(page.iter().cloned());
        let Some(link) = link else {
            assert!(
                next_cursor.is_none(),
                "X-Next-Cursor without Link on {path}"
            );
            break;
        };
        assert!(
            !page.is_empty(),
            "an empty page announced a next one: {path}"
        );
        let cursor = next_cursor.expect("Link without X-Next-Cursor");
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("Link is not `<…>; rel=\"next\"`: {link}"));
        assert!(
            target.contains(&format!("cursor={cursor}")),
            "Link {link} does not carry X-Next-Cursor {cursor}"
        );
        path = target.to_owned();
    }
    Walked { items, pages }
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Field names of the 422 body.
fn error_fields(r: &Resp) -> BTreeSet<String> {
    r.assert_problem(422);
    r.body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("422 without errors[]: {}", r.text))
        .iter()
        .map(|e| {
            assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{}",
                r.text
            );
            e["field"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn set(fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|s| (*s).to_owned()).collect()
}

/// No key anywhere in `v` looks like a secret, and no value is the password.
fn assert_no_secret(v: &Value, password: &str) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let k = k.to_lowercase();
                assert!(
                    !k.contains("password") && !k.contains("hash") && !k.contains("secret"),
                    "secret-looking field {k} in {v}"
                );
                assert_no_secret(child, password);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| assert_no_secret(c, password)),
        Value::String(s) => {
            assert!(!s.contains(password), "password in {v}");
            assert!(!s.starts_with("$argon2"), "password hash in {v}");
        }
        _ => {}
    }
}

fn new_user(email: &str, role: &str) -> Value {
    json!({"email": email, "name": "Some One", "role": role, "password": USER_PASSWORD})
}

both!(
    list_pages_newest_first_and_every_user_once,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        let mut created = Vec::new();
        for i in 0..11 {
            // Ids sort by creation time at millisecond precision.
            app.clock.advance_millis(3);
            let r = app
                .post(
                    "/users",
                    &admin,
                    new_user(&format!("list{i}@example.com"), "viewer"),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
            created.push(r.body["id"].as_str().unwrap().to_owned());
        }

        let r = app.get("/users", &admin).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let all = r.body.as_array().unwrap().clone();
        assert_eq!(all.len(), 12, "11 created + the bootstrap admin");
        assert!(r.header("link").is_none() && r.header("x-next-cursor").is_none());
        let mut newest_first: Vec<String> = created.iter().rev().cloned().collect();
        assert_eq!(ids(&all)[..11], newest_first[..], "newest first");
        assert_eq!(
            all[11]["email"],
            json!(ADMIN_EMAIL),
            "the oldest user comes last"
        );

        let walked = walk_pages(&app, "/users?limit=4", &admin).await;
        assert_eq!(walked.pages, 3);
        newest_first.push(all[11]["id"].as_str().unwrap().to_owned());
        assert_eq!(
            ids(&walked.items),
            newest_first,
            "every user exactly once, in order"
        );

        // A page size that divides the count exactly: no empty last page is announced.
        let walked = walk_pages(&app, "/users?limit=6", &admin).await;
        assert_eq!(ids(&walked.items), newest_first);
        assert_eq!(walked.pages, 2);
        let walked = walk_pages(&app, "/users?limit=1", &admin).await;
        assert_eq!(ids(&walked.items), newest_first);
        assert_eq!(walked.pages, 12);

        // The first page of limit=5 hands a cursor that continues where it stopped.
        let r = app.get("/users?limit=5", &admin).await;
        assert_eq!(ids(r.body.as_array().unwrap()), newest_first[..5]);
        let cursor = r.header("x-next-cursor").unwrap().to_owned();
        let r = app
            .get(&format!("/users?cursor={cursor}&limit=5"), &admin)
            .await;
        assert_eq!(ids(r.body.as_array().unwrap()), newest_first[5..10]);

        // A user created after the walk started shows up on a fresh first page, not mid-walk.
        app.clock.advance_millis(3);
        let r = app
            .post("/users", &admin, new_user("late@example.com", "viewer"))
            .await;
        let late = r.body["id"].as_str().unwrap().to_owned();
        let r = app
            .get(&format!("/users?cursor={cursor}&limit=50"), &admin)
            .await;
        assert!(!ids(r.body.as_array().unwrap()).contains(&late));
        let r = app.get("/users?limit=1", &admin).await;
        assert_eq!(ids(r.body.as_array().unwrap()), vec![late]);

        for limit in ["0", "501", "100000"] {
            let r = app.get(&format!("/users?limit={limit}"), &admin).await;
            assert_eq!(error_fields(&r), set(&["limit"]), "limit={limit}");
        }
        let r = app.get("/users?limit=500", &admin).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_array().unwrap().len(), 13);
        // Not hex, not UTF-8, empty, or hex of something that is no user position.
        let forged = "cursor=68656c6c6f"; // "hello"
        for q in [
            "cursor=nothex",
            "cursor=",
            "cursor=zz",
            "cursor=ff",
            forged,
            "limit=abc",
            "limit=-1",
        ] {
            app.get(&format!("/users?{q}"), &admin)
                .await
                .assert_problem(400);
        }
    }
);

both!(
    create_answers_201_with_location_and_no_secret,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        let r = app
        .post(
            "/users",
            &admin,
            json!({"email": "  Mixed.Case@Example.COM ", "name": "  Mixed Case ", "role": "operator", "password": USER_PASSWORD}),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let id = r.body["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("usr_") && id.len() == 30, "{id}");
        assert_eq!(r.header("location"), Some(format!("/users/{id}").as_str()));
        assert_eq!(r.body["email"], json!("mixed.case@example.com"));
        assert_eq!(r.body["name"], json!("Mixed Case"));
        assert_eq!(r.body["role"], json!("operator"));
        assert_eq!(r.body["disabled"], json!(false));
        assert_eq!(r.body["disabled_at"], Value::Null);
        let created_at = r.body["created_at"].as_str().unwrap();
        assert!(
            created_at.len() == 24
                && created_at.ends_with('Z')
                && created_at.as_bytes()[19] == b'.',
            "RFC 3339 UTC with milliseconds: {created_at}"
        );
        assert_no_secret(&r.body, USER_PASSWORD);

        let got = app.get(&format!("/users/{id}"), &admin).await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.body, r.body,
            "GET Location answers the created resource"
        );
        assert_no_secret(&got.body, USER_PASSWORD);
        let list = app.get("/users", &admin).await;
        assert_no_secret(&list.body, USER_PASSWORD);

        // The normalised email logs in, whatever its case.
        app.login_ok("MIXED.case@example.com", USER_PASSWORD).await;

        // Duplicate emails, case-insensitively and after trimming.
        for email in [
            "mixed.case@example.com",
            "MIXED.CASE@EXAMPLE.COM",
            " mixed.case@example.com",
        ] {
            let r = app.post("/users", &admin, new_user(email, "viewer")).await;
            r.assert_problem(409);
            assert!(r.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
        let r = app
            .post(
                "/users",
                &admin,
                new_user(&ADMIN_EMAIL.to_uppercase(), "admin"),
            )
            .await;
        r.assert_problem(409);
        assert_eq!(
            app.get("/users", &admin)
                .await
                .body
                .as_array()
                .unwrap()
                .len(),
            2
        );

        // The audit event names the user and never the password.
        let evs = app.audit_of("user.created").await;
        let ev = evs
            .iter()
            .find(|e| e["resource_id"] == json!(id))
            .expect("user.created");
        assert_eq!(ev["actor"], json!(ADMIN_EMAIL));
        assert_eq!(ev["resource_type"], json!("user"));
        assert_eq!(ev["payload"]["email"], json!("mixed.case@example.com"));
        assert_eq!(ev["payload"]["role"], json!("operator"));
        assert_no_secret(&ev["payload"], USER_PASSWORD);
        assert!(!ev.to_string().contains(USER_PASSWORD));
    }
);

both!(create_validates_every_field, |app: TestApp| async move {
    let admin = app.admin_token.clone();
    let post = |body: Value| app.post("/users", &admin, body);
    let base = |k: &str, v: Value| {
        let mut b = new_user("valid@example.com", "viewer");
        b[k] = v;
        b
    };
    for email in [
        "",
        "no-at-sign",
        "a@b",
        "@example.com",
        "a@",
        "a b@example.com",
        "a@@example.com",
        "a@.com",
    ] {
        let r = post(base("email", json!(email))).await;
        assert_eq!(error_fields(&r), set(&["email"]), "email {email:?}");
    }
    let long_email = format!("{}@example.com", "a".repeat(250));
    assert_eq!(
        error_fields(&post(base("email", json!(long_email))).await),
        set(&["email"])
    );
    for role in ["root", "Admin", "", "superuser"] {
        let r = post(base("role", json!(role))).await;
        assert_eq!(error_fields(&r), set(&["role"]), "role {role:?}");
    }
    for name in ["", "   "] {
        assert_eq!(
            error_fields(&post(base("name", json!(name))).await),
            set(&["name"])
        );
    }
    assert_eq!(
        error_fields(&post(base("name", json!("n".repeat(201)))).await),
        set(&["name"])
    );
    for pw in [String::new(), "x".repeat(11), "x".repeat(257)] {
        let r = post(base("password", json!(pw))).await;
        assert_eq!(
            error_fields(&r),
            set(&["password"]),
            "password of {} chars",
            pw.len()
        );
    }
    // Characters, not bytes: 11 two-byte characters are still too short.
    assert_eq!(
        error_fields(&post(base("password", json!("é".repeat(11)))).await),
        set(&["password"])
    );
    // Every bad field is reported at once.
    let r = post(json!({"email": "nope", "name": "", "role": "root", "password": "short"})).await;
    assert_eq!(
        error_fields(&r),
        set(&["email", "name", "role", "password"])
    );
    // Nothing was created by any of that.
    assert_eq!(
        app.get("/users", &admin)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The bounds themselves are accepted: 12 and 256 characters.
    for (i, pw) in ["x".repeat(12), "y".repeat(256), "é".repeat(12)]
        .into_iter()
        .enumerate()
    {
        let email = format!("bound{i}@example.com");
        let r =
            post(json!({"email": email, "name": "Bound", "role": "viewer", "password": pw})).await;
        assert_eq!(r.status, 201, "{}", r.text);
        app.login_ok(&email, &pw).await;
    }
    for role in ["admin", "operator", "approver", "viewer"] {
        let r = post(new_user(&format!("r-{role}@example.com"), role)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["role"], json!(role));
    }
});

both!(
    unknown_and_malformed_ids_are_404,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        let (viewer, _) = app.user("viewer").await;
        let known = viewer["id"].as_str().unwrap().to_owned();
        // Well-formed but unknown: same shape as a real id, another value.
        let unknown = format!("usr_{}", "0".repeat(26));
        let other_kind = known.replacen("usr_", "ses_", 1);
        let long = format!("usr_{}", "a".repeat(5000));
        let ids = [
            unknown.as_str(),
            other_kind.as_str(),
            "nope",
            "usr_",
            "usr_..",
            "usr_%2e%2e%2fx",
            "%00",
            "usr_%00",
            "USR_01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "usr_01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "usr_zzzzzzzzzzzzzzzzzzzzzzzzzz",
            "usr_81arz3ndektsv4rrffq69g5fav",
            "%F0%9F%98%80",
            "'%20OR%201=1--",
            long.as_str(),
        ];
        for id in ids {
            let path = format!("/users/{id}");
            let r = app.get(&path, &admin).await;
            r.assert_problem(404);
            assert_eq!(r.body["code"], json!("not_found"), "{path}");
            app.put(&path, &admin, json!({"name": "X"}))
                .await
                .assert_problem(404);
            app.delete(&path, &admin).await.assert_problem(404);
            app.post(
                &format!("{path}/password"),
                &admin,
                json!({"new_password": "a-long-new-password"}),
            )
            .await
            .assert_problem(404);
        }
        // Paths that cannot be a user at all are unknown routes, still 404 problem+json.
        for path in [
            "/users/usr_../x",
            "/users/nope/x",
            "/users//",
            "/users/a/b/c",
        ] {
            let r = app.req(Method::GET, path, Some(&admin), None).await;
            r.assert_problem(404);
        }
        // The real one is still there.
        assert_eq!(
            app.get(&format!("/users/{known}"), &admin).await.status,
            200
        );
    }
);

both!(
    update_changes_name_role_and_disabled,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        let (u, token) = app.user("admin").await;
        let id = u["id"].as_str().unwrap().to_owned();
        let path = format!("/users/{id}");
        assert_eq!(
            app.post("/users", &token, new_user("made@example.com", "viewer"))
                .await
                .status,
            201
        );

        app.clock.advance_secs(5);
        let r = app.put(&path, &admin, json!({"name": "Renamed"})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["name"], json!("Renamed"));
        assert_eq!(r.body["role"], json!("admin"), "absent fields stay");
        assert_eq!(r.body["email"], u["email"]);
        assert_eq!(r.body["created_at"], u["created_at"]);
        assert_ne!(r.body["updated_at"], u["updated_at"]);

        // A role change acts on the next request of the same token.
        let r = app.put(&path, &admin, json!({"role": "viewer"})).await;
        assert_eq!(r.body["role"], json!("viewer"));
        assert_eq!(r.body["name"], json!("Renamed"));
        app.post("/users", &token, new_user("made2@example.com", "viewer"))
            .await
            .assert_problem(403);
        assert_eq!(
            app.get("/auth/me", &token).await.body["role"],
            json!("viewer")
        );

        // Several fields at once, and an empty body changes nothing.
        let r = app
            .put(
                &path,
                &admin,
                json!({"name": "Both", "role": "approver", "disabled": false}),
            )
            .await;
        assert_eq!(
            (r.body["name"].clone(), r.body["role"].clone()),
            (json!("Both"), json!("approver"))
        );
        let before = app.get(&path, &admin).await.body;
        let r = app.put(&path, &admin, json!({})).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, before);

        // Invalid values are 422 and change nothing.
        assert_eq!(
            error_fields(&app.put(&path, &admin, json!({"role": "root"})).await),
            set(&["role"])
        );
        assert_eq!(
            error_fields(&app.put(&path, &admin, json!({"name": " "})).await),
            set(&["name"])
        );
        assert_eq!(app.get(&path, &admin).await.body, before);

        // disabled:true disables, disabled:false re-enables.
        let r = app.put(&path, &admin, json!({"disabled": true})).await;
        assert_eq!(r.body["disabled"], json!(true));
        assert!(r.body["disabled_at"].is_string());
        app.get("/auth/me", &token).await.assert_problem(401);
        assert_eq!(
            app.login(u["email"].as_str().unwrap(), USER_PASSWORD)
                .await
                .status,
            401
        );
        let r = app.put(&path, &admin, json!({"disabled": false})).await;
        assert_eq!(r.body["disabled"], json!(false));
        assert_eq!(r.body["disabled_at"], Value::Null);
        app.login_ok(u["email"].as_str().unwrap(), USER_PASSWORD)
            .await;

        // An admin cannot lock themselves out.
        let me = app.get("/auth/me", &admin).await.body["id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.put(&format!("/users/{me}"), &admin, json!({"disabled": true}))
            .await
            .assert_problem(409);
        app.delete(&format!("/users/{me}"), &admin)
            .await
            .assert_problem(409);
        assert_eq!(app.get("/auth/me", &admin).await.status, 200);

        // Audit: one user.updated per effective change, with what changed; user.disabled for
        // the disabling.
        let updated: Vec<Value> = app
            .audit_of("user.updated")
            .await
            .into_iter()
            .filter(|e| e["resource_id"] == json!(id))
            .collect();
        let payloads: Vec<Value> = updated.iter().rev().map(|e| e["payload"].clone()).collect();
        assert_eq!(
            payloads,
            vec![
                json!({"name": "Renamed"}),
                json!({"role": "viewer"}),
                json!({"name": "Both", "role": "approver"}),
                json!({"disabled": false}),
            ]
        );
        let disabled: Vec<Value> = app
            .audit_of("user.disabled")
            .await
            .into_iter()
            .filter(|e| e["resource_id"] == json!(id))
            .collect();
        assert_eq!(disabled.len(), 1);
        assert_eq!(disabled[0]["actor"], json!(ADMIN_EMAIL));
    }
);

both!(
    delete_disables_and_keeps_the_user,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        let (u, token) = app.user("operator").await;
        let id = u["id"].as_str().unwrap().to_owned();
        let email = u["email"].as_str().unwrap().to_owned();
        // A refresh token of the user, to show the whole session stops.
        let pair = app.login_ok(&email, USER_PASSWORD).await;
        assert_eq!(app.get("/auth/me", &token).await.status, 200);

        let r = app.delete(&format!("/users/{id}"), &admin).await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert!(r.text.is_empty());

        // Still there, marked disabled.
        let got = app.get(&format!("/users/{id}"), &admin).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body["disabled"], json!(true));
        assert!(got.body["disabled_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        let list = app.get("/users", &admin).await;
        let listed = list
            .body
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == json!(id))
            .cloned();
        assert_eq!(
            listed.expect("a disabled user stays listed")["disabled"],
            json!(true)
        );

        // Tokens stop at once; login and refresh are refused.
        app.get("/auth/me", &token).await.assert_problem(401);
        app.login(&email, USER_PASSWORD).await.assert_problem(401);
        let r = app
            .req(
                Method::POST,
                "/auth/refresh",
                None,
                Some(json!({"refresh_token": pair["refresh_token"]})),
            )
            .await;
        r.assert_problem(401);

        // Deleting again is harmless and leaves a single user.disabled event.
        assert_eq!(
            app.delete(&format!("/users/{id}"), &admin).await.status,
            204
        );
        let evs: Vec<Value> = app
            .audit_of("user.disabled")
            .await
            .into_iter()
            .filter(|e| e["resource_id"] == json!(id))
            .collect();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0]["payload"], json!({"disabled": true}));
        assert_eq!(
            evs[0]["actor_id"],
            app.get("/auth/me", &admin).await.body["id"]
        );
    }
);

both!(password_changes, |app: TestApp| async move {
    let admin = app.admin_token.clone();
    let (op, op_token) = app.user("operator").await;
    let (other, _) = app.user("viewer").await;
    let op_path = format!("/users/{}/password", op["id"].as_str().unwrap());
    let other_path = format!("/users/{}/password", other["id"].as_str().unwrap());
    let op_email = op["email"].as_str().unwrap().to_owned();
    let other_email = other["email"].as_str().unwrap().to_owned();

    // Own password: the current one is required and must be right.
    let new1 = "operator-new-password-1";
    let r = app
        .post(&op_path, &op_token, json!({"new_password": new1}))
        .await;
    assert_eq!(error_fields(&r), set(&["current_password"]));
    let r = app
        .post(
            &op_path,
            &op_token,
            json!({"current_password": "not-the-password", "new_password": new1}),
        )
        .await;
    assert_eq!(error_fields(&r), set(&["current_password"]));
    let r = app
        .post(
            &op_path,
            &op_token,
            json!({"current_password": USER_PASSWORD, "new_password": "short"}),
        )
        .await;
    assert_eq!(error_fields(&r), set(&["new_password"]));
    let r = app
        .post(
            &op_path,
            &op_token,
            json!({"current_password": USER_PASSWORD, "new_password": "z".repeat(257)}),
        )
        .await;
    assert_eq!(error_fields(&r), set(&["new_password"]));
    app.login_ok(&op_email, USER_PASSWORD).await;

    let r = app
        .post(
            &op_path,
            &op_token,
            json!({"current_password": USER_PASSWORD, "new_password": new1}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty());
    app.login(&op_email, USER_PASSWORD)
        .await
        .assert_problem(401);
    app.clock.advance_secs(60); // past the soft lock of that failed login
    app.login_ok(&op_email, new1).await;

    // An operator may not change someone else's password, with or without the current one.
    for body in [
        json!({"new_password": "hijacked-password-1"}),
        json!({"current_password": USER_PASSWORD, "new_password": "hijacked-password-1"}),
    ] {
        app.post(&other_path, &op_token, body)
            .await
            .assert_problem(403);
    }
    app.login_ok(&other_email, USER_PASSWORD).await;

    // An admin resets anyone's without the current password.
    let reset = "reset-by-the-admin-1";
    let r = app
        .post(&other_path, &admin, json!({"new_password": reset}))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    app.login(&other_email, USER_PASSWORD)
        .await
        .assert_problem(401);
    app.clock.advance_secs(60); // past the soft lock of that failed login
    app.login_ok(&other_email, reset).await;

    // The admin's own password follows the own-password rule.
    let me = app.get("/auth/me", &admin).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post(
            &format!("/users/{me}/password"),
            &admin,
            json!({"new_password": "admin-new-password"}),
        )
        .await;
    assert_eq!(error_fields(&r), set(&["current_password"]));

    // Audit: who changed whose password, never the password itself.
    let evs = app.audit_of("user.password_changed").await;
    assert_eq!(evs.len(), 2);
    let by_admin = &evs[0];
    assert_eq!(by_admin["resource_id"], other["id"]);
    assert_eq!(by_admin["actor"], json!(ADMIN_EMAIL));
    assert_eq!(by_admin["payload"]["by_admin"], json!(true));
    let own = &evs[1];
    assert_eq!(own["resource_id"], op["id"]);
    assert_eq!(own["actor_id"], op["id"]);
    assert_eq!(own["payload"]["by_admin"], json!(false));
    for e in &evs {
        let text = e.to_string();
        for secret in [USER_PASSWORD, new1, reset, "hijacked-password-1"] {
            assert!(!text.contains(secret), "password in audit: {text}");
        }
        assert_no_secret(&e["payload"], new1);
    }
    // No user event anywhere carries a password.
    let r = app.get("/audit?resource_type=user&limit=500", &admin).await;
    for secret in [USER_PASSWORD, new1, reset, ADMIN_PASSWORD] {
        assert!(!r.text.contains(secret));
    }
});
