//! Error paths and the headers every response carries (api.md §1, §10): malformed JSON,
//! unknown fields, wrong types, oversized bodies, wrong content types, unknown routes;
//! problem+json everywhere; `X-Request-Id` and `X-RateLimit-*` on every response; no 500.

use crate::both;
use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const JSON: &str = "application/json";

/// A request and its expected status: method, path, token, body, status.
type Probe = (Method, String, Option<String>, Option<Value>, u16);

/// The full problem+json shape: type/title/status/detail/code, consistent with each other.
#[track_caller]
fn assert_full_problem(r: &Resp, status: u16) -> String {
    let code = r.assert_problem(status);
    assert!(!code.is_empty(), "no code: {}", r.text);
    for k in ["title", "detail"] {
        assert!(
            r.body[k].as_str().is_some_and(|s| !s.is_empty()),
            "{k} missing: {}",
            r.text
        );
    }
    code
}

/// `X-Request-Id` and the three rate-limit headers, all well-formed.
#[track_caller]
fn assert_frame_headers(r: &Resp, what: &str) {
    let rid = r.header("x-request-id");
    assert!(
        rid.is_some_and(|v| !v.is_empty()),
        "{what}: no X-Request-Id"
    );
    let limit: u64 = r
        .header("x-ratelimit-limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no X-RateLimit-Limit"));
    let remaining: u64 = r
        .header("x-ratelimit-remaining")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no X-RateLimit-Remaining"));
    let reset: i64 = r
        .header("x-ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no X-RateLimit-Reset"));
    assert!(remaining <= limit, "{what}");
    assert!(
        reset > 1_700_000_000,
        "{what}: reset is Unix seconds, got {reset}"
    );
}

fn fields(r: &Resp) -> BTreeSet<String> {
    r.body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors[]: {}", r.text))
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

both!(bad_bodies_on_create_and_update, |app: TestApp| async move {
    let admin = app.admin_token.clone();
    let (target, _) = app.user("viewer").await;
    let target_path = format!("/users/{}", target["id"].as_str().unwrap());
    let user_count = || async {
        app.get("/users", &admin)
            .await
            .body
            .as_array()
            .unwrap()
            .len()
    };
    let before = user_count().await;

    let endpoints = [
        (Method::POST, "/users".to_owned()),
        (Method::PUT, target_path.clone()),
    ];
    for (method, path) in &endpoints {
        let what = format!("{method} {path}");
        let send =
            |ct: &'static str, body: Vec<u8>| app.raw(method.clone(), path, Some(&admin), ct, body);

        // Malformed JSON → 400.
        for body in [
            &b"{"[..],
            b"{\"name\": ",
            b"{name: 'x'}",
            b"{\"name\": \"x\",}",
            b"not json",
            b"",
            b"\xff\xfe",
        ] {
            let r = send(JSON, body.to_vec()).await;
            assert_eq!(
                assert_full_problem(&r, 400),
                "bad_request",
                "{what} {:?}",
                String::from_utf8_lossy(body)
            );
            assert_frame_headers(&r, &what);
        }

        // Valid JSON followed by more text is malformed too.
        let valid = if *method == Method::POST {
            json!({"email": "trail@example.com", "name": "T", "role": "viewer", "password": USER_PASSWORD})
        } else {
            json!({"name": "Trailing"})
        };
        let r = send(JSON, format!("{valid} trailing").into_bytes()).await;
        assert_full_problem(&r, 400);

        // Unknown field (a typo) → 422 naming the problem.
        let typo = if *method == Method::POST {
            json!({"email": "typo@example.com", "name": "T", "rol": "viewer", "password": USER_PASSWORD})
        } else {
            json!({"rol": "admin"})
        };
        let r = send(JSON, typo.to_string().into_bytes()).await;
        assert_eq!(assert_full_problem(&r, 422), "validation_failed", "{what}");
        assert!(!fields(&r).is_empty());
        assert!(
            r.body["detail"].as_str().unwrap().contains("rol"),
            "{what}: {}",
            r.text
        );

        // Wrong types → 422.
        let wrong_types: Vec<Value> = if *method == Method::POST {
            vec![
                json!({"email": 5, "name": "T", "role": "viewer", "password": USER_PASSWORD}),
                json!({"email": "t@example.com", "name": ["T"], "role": "viewer", "password": USER_PASSWORD}),
                json!({"email": "t@example.com", "name": "T", "role": "viewer", "password": null}),
                json!({"email": "t@example.com", "name": "T", "role": "viewer"}),
                json!([]),
                json!("string"),
                json!(null),
            ]
        } else {
            vec![
                json!({"disabled": "yes"}),
                json!({"disabled": 1}),
                json!({"name": 42}),
                json!({"role": {"name": "admin"}}),
                json!([]),
                json!(7),
            ]
        };
        for body in wrong_types {
            let r = send(JSON, body.to_string().into_bytes()).await;
            assert_eq!(
                assert_full_problem(&r, 422),
                "validation_failed",
                "{what} {body}"
            );
            assert!(!fields(&r).is_empty(), "{what} {body}");
        }

        // Over 1 MiB → 413, even when it is valid JSON; just under is read (and judged).
        let big = |n: usize| format!("{{\"name\": \"{}\"}}", "a".repeat(n - 12)).into_bytes();
        let r = send(JSON, big(1024 * 1024 + 1)).await;
        assert_eq!(assert_full_problem(&r, 413), "payload_too_large", "{what}");
        assert_frame_headers(&r, &what);
        let r = send(JSON, big(4 * 1024 * 1024)).await;
        assert_full_problem(&r, 413);
        let r = send(JSON, big(1024 * 1024)).await;
        assert_full_problem(&r, 422);

        // Not JSON at all → 415.
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/xml",
            "multipart/form-data; boundary=x",
        ] {
            let r = send(ct, b"{\"name\": \"x\"}".to_vec()).await;
            assert_eq!(
                assert_full_problem(&r, 415),
                "unsupported_media_type",
                "{what} {ct}"
            );
            assert_frame_headers(&r, &what);
        }
        let mut rb = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(&admin);
        rb = rb.body("{\"name\": \"x\"}");
        let r = TestApp::finish(rb.send().await.unwrap()).await;
        assert_full_problem(&r, 415);
    }

    // Endpoints that read the raw body answer the same 413 problem.
    let huge = format!("{{\"refresh_token\": \"{}\"}}", "r".repeat(1024 * 1024)).into_bytes();
    for path in ["/auth/refresh", "/auth/login"] {
        let r = app.raw(Method::POST, path, None, JSON, huge.clone()).await;
        assert_eq!(assert_full_problem(&r, 413), "payload_too_large", "{path}");
        assert_frame_headers(&r, path);
    }

    // A JSON content type with parameters is still JSON.
    let ok = json!({"email": "charset@example.com", "name": "C", "role": "viewer", "password": USER_PASSWORD});
    let r = app
        .raw(
            Method::POST,
            "/users",
            Some(&admin),
            "application/json; charset=utf-8",
            ok.to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // None of the refused bodies created or changed anything.
    assert_eq!(user_count().await, before + 1);
    assert_eq!(app.get(&target_path, &admin).await.body, target);
});

both!(
    unknown_routes_and_methods_are_problems,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        for path in [
            "/nope",
            "/users/x/y/z",
            "/api/users",
            "/auth",
            "/auth/me/x",
            "/audit/x",
            "/health/x",
            "/%00",
            "/users%2F",
        ] {
            for token in [None, Some(admin.as_str())] {
                let r = app.req(Method::GET, path, token, None).await;
                assert_eq!(assert_full_problem(&r, 404), "not_found", "{path}");
                assert_frame_headers(&r, path);
            }
        }
        // A method the route does not have is an error too, in the same shape.
        for (method, path) in [
            (Method::PATCH, "/users"),
            (Method::DELETE, "/users"),
            (Method::POST, "/auth/me"),
            (Method::GET, "/auth/login"),
            (Method::PUT, "/audit"),
            (Method::POST, "/health"),
        ] {
            let r = app.req(method.clone(), path, Some(&admin), None).await;
            assert_eq!(
                assert_full_problem(&r, 405),
                "method_not_allowed",
                "{method} {path}"
            );
            assert_frame_headers(&r, path);
        }
    }
);

both!(
    request_id_and_rate_headers_on_every_response,
    |app: TestApp| async move {
        let admin = app.admin_token.clone();
        let (viewer, viewer_token) = app.user("viewer").await;
        let vid = viewer["id"].as_str().unwrap();

        // Public and authenticated, success and error.
        let requests: Vec<Probe> = vec![
            (Method::GET, "/health".into(), None, None, 200),
            (Method::GET, "/health/live".into(), None, None, 200),
            (Method::GET, "/openapi.json".into(), None, None, 200),
            (
                Method::GET,
                "/.well-known/jwks.json".into(),
                None,
                None,
                200,
            ),
            (Method::GET, "/docs/index.html".into(), None, None, 200),
            (
                Method::POST,
                "/auth/login".into(),
                None,
                Some(json!({"email": "x@example.com", "password": "wrong-password"})),
                401,
            ),
            (Method::GET, "/users".into(), None, None, 401),
            (
                Method::GET,
                "/auth/me".into(),
                Some(admin.clone()),
                None,
                200,
            ),
            (Method::GET, "/users".into(), Some(admin.clone()), None, 200),
            (
                Method::GET,
                format!("/users/{vid}"),
                Some(viewer_token.clone()),
                None,
                200,
            ),
            (
                Method::GET,
                "/users/nope".into(),
                Some(admin.clone()),
                None,
                404,
            ),
            (
                Method::GET,
                "/users?limit=0".into(),
                Some(admin.clone()),
                None,
                422,
            ),
            (
                Method::GET,
                "/users?cursor=zz".into(),
                Some(admin.clone()),
                None,
                400,
            ),
            (
                Method::POST,
                "/users".into(),
                Some(viewer_token.clone()),
                Some(
                    json!({"email": "v@example.com", "name": "V", "role": "admin", "password": USER_PASSWORD}),
                ),
                403,
            ),
            (
                Method::POST,
                "/users".into(),
                Some(admin.clone()),
                Some(json!({"email": "bad"})),
                422,
            ),
            (
                Method::GET,
                "/audit/verify".into(),
                Some(viewer_token.clone()),
                None,
                403,
            ),
            (
                Method::GET,
                "/audit?from=yesterday".into(),
                Some(admin.clone()),
                None,
                422,
            ),
            (
                Method::GET,
                "/users".into(),
                Some("garbage".into()),
                None,
                401,
            ),
        ];
        let mut seen = BTreeSet::new();
        for (method, path, token, body, status) in &requests {
            let what = format!("{method} {path}");
            let r = app
                .req(method.clone(), path, token.as_deref(), body.clone())
                .await;
            assert_eq!(r.status.as_u16(), *status, "{what}: {}", r.text);
            assert_frame_headers(&r, &what);
            if *status >= 400 {
                assert_full_problem(&r, *status);
            }
            assert!(
                seen.insert(r.header("x-request-id").unwrap().to_owned()),
                "request ids repeat"
            );
        }

        // A well-formed incoming id is echoed, on success and on error, and the audit event of
        // the request records it; a malformed one is replaced by a fresh id.
        let send =
            |method: Method, path: &str, token: Option<&str>, rid: &str, body: Option<Value>| {
                let mut rb = app
                    .client
                    .request(method, app.url(path))
                    .header("x-request-id", rid);
                if let Some(t) = token {
                    rb = rb.bearer_auth(t);
                }
                if let Some(b) = body {
                    rb = rb.json(&b);
                }
                async move { TestApp::finish(rb.send().await.unwrap()).await }
            };
        for (method, path, token, status) in [
            (Method::GET, "/health", None, 200),
            (Method::GET, "/auth/me", Some(admin.as_str()), 200),
            (Method::GET, "/users/nope", Some(admin.as_str()), 404),
            (Method::GET, "/nope", None, 404),
        ] {
            let r = send(method, path, token, "client-trace-0001", None).await;
            assert_eq!(r.status.as_u16(), status);
            assert_eq!(
                r.header("x-request-id"),
                Some("client-trace-0001"),
                "{path}"
            );
        }
        let r = send(
        Method::POST,
        "/users",
        Some(&admin),
        "trace:create.user_1",
        Some(json!({"email": "traced@example.com", "name": "T", "role": "viewer", "password": USER_PASSWORD})),
    )
    .await;
        assert_eq!(r.status, 201);
        assert_eq!(r.header("x-request-id"), Some("trace:create.user_1"));
        let ev = app.audit_of("user.created").await;
        assert_eq!(ev[0]["resource_id"], r.body["id"]);
        assert_eq!(ev[0]["request_id"], json!("trace:create.user_1"));

        let too_long = "a".repeat(129);
        for bad in [
            "has space",
            "semi;colon",
            "<script>",
            too_long.as_str(),
            "ünïcode",
        ] {
            let mut rb = app.client.get(app.url("/health"));
            if let Ok(v) = reqwest::header::HeaderValue::from_bytes(bad.as_bytes()) {
                rb = rb.header("x-request-id", v);
            }
            let r = TestApp::finish(rb.send().await.unwrap()).await;
            let rid = r.header("x-request-id").unwrap();
            assert_ne!(rid, bad);
            assert!(!rid.is_empty() && rid.is_ascii());
        }
    }
);

both!(no_request_makes_a_500, |app: TestApp| async move {
    let admin = app.admin_token.clone();
    let (u, _) = app.user("viewer").await;
    let id = u["id"].as_str().unwrap();
    let long = "x".repeat(8000);
    let queries = [
        "limit=".to_owned(),
        "limit=99999999999999999999".to_owned(),
        "limit=1.5".to_owned(),
        "limit=1&limit=2".to_owned(),
        "cursor=%00".to_owned(),
        format!("cursor={long}"),
        "cursor=7fffffffffffffff".to_owned(),
        "unknown=1".to_owned(),
        "from=%00".to_owned(),
        "from=9999-12-31T23:59:59Z".to_owned(),
        "from=-0001-01-01T00:00:00Z".to_owned(),
        "to=1970-01-01T00:00:00Z".to_owned(),
        "from=2026-01-01T00:00:00Z&to=2025-01-01T00:00:00Z".to_owned(),
        format!("user_id={long}"),
        "event_type=%27%3B%20DROP%20TABLE%20audit_events%3B--".to_owned(),
        "resource_id=%E2%80%AE".to_owned(),
        "%%%".to_owned(),
    ];
    let mut statuses = Vec::new();
    for q in &queries {
        for path in ["/users", "/audit"] {
            let r = app.get(&format!("{path}?{q}"), &admin).await;
            assert!(
                r.status.as_u16() < 500,
                "{path}?{q}: {} {}",
                r.status,
                r.text
            );
            if r.status != 200 {
                assert_full_problem(&r, r.status.as_u16());
            }
            statuses.push(r.status.as_u16());
        }
    }
    assert!(statuses.contains(&200) && statuses.contains(&400) && statuses.contains(&422));
    let bodies = [
        json!({"email": "\u{0}@example.com", "name": "\u{0}", "role": "viewer", "password": USER_PASSWORD}),
        json!({"email": format!("{long}@example.com"), "name": long, "role": "viewer", "password": long}),
        json!({"email": "emoji😀@example.com", "name": "😀", "role": "viewer", "password": "😀".repeat(12)}),
        json!({"email": "deep@example.com", "name": {"a": {"b": {"c": [1, 2, 3]}}}, "role": "viewer", "password": USER_PASSWORD}),
    ];
    for b in bodies {
        let r = app.post("/users", &admin, b.clone()).await;
        assert!(r.status.as_u16() < 500, "{b}: {}", r.text);
        let r = app.put(&format!("/users/{id}"), &admin, b.clone()).await;
        assert!(r.status.as_u16() < 500, "{b}: {}", r.text);
    }
    // Deeply nested JSON must not overflow the stack.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let r = app
        .raw(Method::POST, "/users", Some(&admin), JSON, deep)
        .await;
    assert!(
        r.status.as_u16() < 500 && r.status.as_u16() >= 400,
        "{}",
        r.status
    );
    // The server still answers.
    assert_eq!(app.get("/auth/me", &admin).await.status, 200);
    let r = app.get("/audit/verify", &admin).await;
    assert_eq!(r.body["ok"], json!(true), "{}", r.text);
});
