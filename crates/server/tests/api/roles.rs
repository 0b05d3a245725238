//! Every role against every endpoint of this issue (api.md §2.2): user management and audit
//! verification are admin-only, everyone reads; refused calls change nothing.

use crate::both;
use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};

const ROLES: [&str; 4] = ["admin", "operator", "approver", "viewer"];

struct Case {
    method: Method,
    path: String,
    body: Option<Value>,
    /// Status for a role that may do it; everyone else gets 403.
    ok: u16,
    admin_only: bool,
}

fn case(method: Method, path: &str, body: Option<Value>, ok: u16, admin_only: bool) -> Case {
    Case {
        method,
        path: path.to_owned(),
        body,
        ok,
        admin_only,
    }
}

/// The endpoints, in an order where each call leaves the next one meaningful (logout last).
fn cases(role: &str, target: &str) -> Vec<Case> {
    let user = format!("/users/{target}");
    vec![
        case(Method::GET, "/auth/me", None, 200, false),
        case(Method::GET, "/users", None, 200, false),
        case(Method::GET, &user, None, 200, false),
        case(Method::GET, "/audit", None, 200, false),
        case(
            Method::GET,
            "/audit?event_type=user.created",
            None,
            200,
            false,
        ),
        case(Method::GET, "/audit/verify", None, 200, true),
        case(
            Method::POST,
            "/users",
            Some(
                json!({"email": format!("made-by-{role}@example.com"), "name": "Made",
                "role": "viewer", "password": USER_PASSWORD}),
            ),
            201,
            true,
        ),
        case(
            Method::PUT,
            &user,
            Some(json!({"name": format!("renamed by {role}"), "role": "approver"})),
            200,
            true,
        ),
        case(
            Method::POST,
            &format!("{user}/password"),
            Some(json!({"new_password": "set-by-someone-else"})),
            204,
            true,
        ),
        case(Method::DELETE, &user, None, 204, true),
        case(Method::POST, "/auth/refresh", None, 200, false),
        case(Method::POST, "/auth/logout", None, 204, false),
    ]
}

both!(
    every_role_against_every_endpoint,
    |app: TestApp| async move {
        for role in ROLES {
            let (me, token) = app.user(role).await;
            let (target, _) = app.user("viewer").await;
            let target_id = target["id"].as_str().unwrap().to_owned();
            let target_email = target["email"].as_str().unwrap().to_owned();
            let users_before = app.get("/users?limit=500", &app.admin_token).await.body;

            for c in cases(role, &target_id) {
                let r = app
                    .req(c.method.clone(), &c.path, Some(&token), c.body.clone())
                    .await;
                let what = format!("{role} {} {}", c.method, c.path);
                if c.admin_only && role != "admin" {
                    assert_eq!(r.status, 403, "{what}: {}", r.text);
                    assert_eq!(r.assert_problem(403), "forbidden", "{what}");
                } else {
                    assert_eq!(r.status.as_u16(), c.ok, "{what}: {}", r.text);
                }
                assert!(r.header("x-request-id").is_some(), "{what}");
                assert!(r.header("x-ratelimit-remaining").is_some(), "{what}");
            }
            // After logout the token is dead.
            app.get("/auth/me", &token).await.assert_problem(401);

            let target_now = app
                .get(&format!("/users/{target_id}"), &app.admin_token)
                .await
                .body;
            if role == "admin" {
                assert_eq!(target_now["name"], json!("renamed by admin"));
                assert_eq!(target_now["role"], json!("approver"));
                assert_eq!(target_now["disabled"], json!(true));
                let made = app.get("/users?limit=500", &app.admin_token).await.body;
                assert!(made
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|u| u["email"] == json!("made-by-admin@example.com")));
            } else {
                // Refused calls changed nothing: same users, same target, same password.
                let users_after = app.get("/users?limit=500", &app.admin_token).await.body;
                assert_eq!(users_after, users_before, "{role} changed the users");
                assert_eq!(target_now, target, "{role} changed the target");
                app.login_ok(&target_email, USER_PASSWORD).await;
                let evs = app
                    .get(
                        &format!("/audit?user_id={}&limit=500", me["id"].as_str().unwrap()),
                        &app.admin_token,
                    )
                    .await
                    .body;
                let kinds: Vec<&str> = evs
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["event_type"].as_str().unwrap())
                    .collect();
                assert!(
                    kinds.iter().all(|k| k.starts_with("auth.")),
                    "{role}: a refused call left an event: {kinds:?}"
                );
            }
        }
    }
);

both!(
    no_token_is_401_on_every_protected_endpoint,
    |app: TestApp| async move {
        let (target, _) = app.user("viewer").await;
        let id = target["id"].as_str().unwrap();
        let protected = [
            (Method::GET, "/auth/me".to_owned(), None),
            (Method::POST, "/auth/logout".to_owned(), None),
            (Method::POST, "/auth/refresh".to_owned(), None),
            (Method::GET, "/users".to_owned(), None),
            (
                Method::POST,
                "/users".to_owned(),
                Some(
                    json!({"email": "anon@example.com", "name": "A", "role": "admin", "password": USER_PASSWORD}),
                ),
            ),
            (Method::GET, format!("/users/{id}"), None),
            (
                Method::PUT,
                format!("/users/{id}"),
                Some(json!({"role": "admin"})),
            ),
            (Method::DELETE, format!("/users/{id}"), None),
            (
                Method::POST,
                format!("/users/{id}/password"),
                Some(json!({"new_password": "anonymous-reset-1"})),
            ),
            (Method::GET, "/audit".to_owned(), None),
            (Method::GET, "/audit/verify".to_owned(), None),
        ];
        for (method, path, body) in protected {
            let r = app.req(method.clone(), &path, None, body.clone()).await;
            assert_eq!(r.assert_problem(401), "unauthorized", "{method} {path}");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{method} {path}"
            );
            // A bearer that is no token at all is the same 401.
            let r = app
                .req(method.clone(), &path, Some("not-a-jwt"), body)
                .await;
            r.assert_problem(401);
        }
        // Nothing happened.
        let t = app
            .get(&format!("/users/{id}"), &app.admin_token)
            .await
            .body;
        assert_eq!(t, target);
        assert_eq!(
            app.get("/users", &app.admin_token)
                .await
                .body
                .as_array()
                .unwrap()
                .len(),
            2
        );
        app.login_ok(target["email"].as_str().unwrap(), USER_PASSWORD)
            .await;

        // The public endpoints answer without a token.
        for path in [
            "/health",
            "/health/live",
            "/.well-known/jwks.json",
            "/openapi.json",
        ] {
            let r = app.req(Method::GET, path, None, None).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
        }
    }
);
