//! OpenAPI and Swagger UI (api.md §11), and health (§3).

use crate::both;
use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::io::{Read, Write};

/// Every path of this issue, with the methods it must document.
const PATHS: &[(&str, &[&str])] = &[
    ("/auth/login", &["post"]),
    ("/auth/refresh", &["post"]),
    ("/auth/logout", &["post"]),
    ("/auth/me", &["get"]),
    ("/.well-known/jwks.json", &["get"]),
    ("/health", &["get"]),
    ("/health/live", &["get"]),
    ("/users", &["get", "post"]),
    ("/users/{id}", &["get", "put", "delete"]),
    ("/users/{id}/password", &["post"]),
    ("/audit", &["get"]),
    ("/audit/verify", &["get"]),
    ("/connectors", &["get", "post"]),
    ("/connectors/{id}", &["get", "put", "delete"]),
    ("/connectors/{id}/test", &["post"]),
    ("/connectors/{id}/discover", &["post"]),
    ("/jobs/{id}", &["get"]),
    ("/assets", &["get"]),
    ("/assets/{id}", &["get"]),
    ("/change-types", &["get"]),
    ("/change-requests", &["get", "post"]),
    ("/change-requests/{id}", &["get", "put"]),
    ("/change-requests/{id}/submit", &["post"]),
    ("/change-requests/{id}/approve", &["post"]),
    ("/change-requests/{id}/reject", &["post"]),
    ("/change-requests/{id}/cancel", &["post"]),
    ("/change-requests/{id}/execute", &["post"]),
    ("/change-requests/{id}/rollback", &["post"]),
    ("/change-requests/{id}/reveal-secrets", &["post"]),
    ("/agents/enrollment-tokens", &["get", "post"]),
    ("/agents/enrollment-tokens/{id}", &["delete"]),
    ("/agents", &["get"]),
    ("/agents/{id}", &["get", "delete"]),
    ("/agent/register", &["post"]),
    ("/agent/heartbeat", &["post"]),
    ("/agent/commands/next", &["get"]),
    ("/agent/commands/{id}/result", &["post"]),
];

const PUBLIC: &[&str] = &[
    "/auth/login",
    "/.well-known/jwks.json",
    "/health",
    "/health/live",
];

/// Sends a request line exactly as written (no client-side path normalisation) and returns
/// the status code, or `None` when the connection closed without an answer.
fn raw_status(base: &str, target: &str) -> Option<u16> {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    let status = head.split_whitespace().nth(1)?;
    status.parse().ok()
}

async fn raw(app: &TestApp, target: &'static str) -> Option<u16> {
    let base = app.base.clone();
    tokio::task::spawn_blocking(move || raw_status(&base, target))
        .await
        .unwrap()
}

both!(
    openapi_documents_every_endpoint,
    |app: TestApp| async move {
        let r = app.req(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(r.status, 200, "public");
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
        let spec = r.body;
        assert!(
            spec["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.")),
            "{}",
            spec["openapi"]
        );
        assert!(spec["info"]["title"].is_string());
        assert_eq!(spec["info"]["version"], json!(env!("CARGO_PKG_VERSION")));

        let schemes = spec["components"]["securitySchemes"]
            .as_object()
            .expect("securitySchemes");
        let bearer: Vec<&String> = schemes
            .iter()
            .filter(|(_, s)| {
                s["type"] == json!("http")
                    && s["scheme"]
                        .as_str()
                        .is_some_and(|v| v.eq_ignore_ascii_case("bearer"))
            })
            .map(|(k, _)| k)
            .collect();
        assert_eq!(bearer.len(), 1, "one http bearer scheme: {schemes:?}");
        let bearer = bearer[0].clone();

        let paths = spec["paths"].as_object().expect("paths");
        for (path, methods) in PATHS {
            let item = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} is not documented"));
            for m in *methods {
                let op = &item[*m];
                assert!(op.is_object(), "{m} {path} is not documented");
                let responses = op["responses"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{m} {path}: no responses"));
                assert!(
                    responses.keys().any(|c| c.starts_with('2')),
                    "{m} {path}: no success response"
                );
                // Protected operations name the bearer scheme; public ones need nothing.
                let security = &op["security"];
                let needs_bearer = security
                    .as_array()
                    .is_some_and(|a| a.iter().any(|req| req.get(&bearer).is_some()));
                let signed = security
                    .as_array()
                    .is_some_and(|a| a.iter().any(|req| req.get("agentSignature").is_some()));
                if PUBLIC.contains(path) || *path == "/agent/register" {
                    assert!(!needs_bearer && !signed, "{m} {path} is public");
                } else if path.starts_with("/agent/") {
                    // Agents sign their requests instead of sending a bearer token.
                    assert!(signed && !needs_bearer, "{m} {path}: {security}");
                    assert!(responses.contains_key("401"), "{m} {path}");
                } else {
                    assert!(
                        needs_bearer,
                        "{m} {path} does not declare the bearer scheme: {security}"
                    );
                    assert!(
                        responses.contains_key("401") && responses.contains_key("403"),
                        "{m} {path}"
                    );
                }
                // Errors are documented as problem+json (except the health answer, whose 503
                // is the health document itself).
                for (code, resp) in responses {
                    if (code.starts_with('4') || code.starts_with('5'))
                        && !(*path == "/health" && code == "503")
                    {
                        assert!(
                            resp["content"]["application/problem+json"].is_object(),
                            "{m} {path} {code} is not problem+json"
                        );
                    }
                }
            }
        }
        // Request bodies are described for the writes.
        for (path, m) in [
            ("/users", "post"),
            ("/users/{id}", "put"),
            ("/users/{id}/password", "post"),
            ("/auth/login", "post"),
            ("/change-requests", "post"),
            ("/change-requests/{id}", "put"),
            ("/change-requests/{id}/approve", "post"),
            ("/change-requests/{id}/reject", "post"),
        ] {
            assert!(
                paths[path][m]["requestBody"].is_object(),
                "{m} {path} has no request body schema"
            );
        }
        assert!(paths["/users/{id}"]["get"]["responses"]
            .get("404")
            .is_some());
        let health_503 = &paths["/health"]["get"]["responses"]["503"];
        assert!(
            health_503.is_object(),
            "the degraded health answer is documented"
        );

        // The Swagger UI points at the spec.
        let r = app.req(Method::GET, "/docs", None, None).await;
        assert!(r.status.is_redirection(), "{}", r.status);
        let location = r.header("location").unwrap().to_owned();
        assert!(location.starts_with("/docs/index.html"), "{location}");
        let r = app.req(Method::GET, &location, None, None).await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert!(r.text.to_lowercase().contains("swagger"));
        for file in [
            "/docs/index.html",
            "/docs/swagger-ui-bundle.js",
            "/docs/swagger-ui.css",
            "/docs/swagger-ui-standalone-preset.js",
        ] {
            let r = app.client.get(app.url(file)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{file}");
            assert!(!r.bytes().await.unwrap().is_empty(), "{file}");
        }
    }
);

both!(docs_never_crash_a_worker, |app: TestApp| async move {
    // Through the HTTP client (which normalises dot segments itself)…
    for path in [
        "/docs/nope.js",
        "/docs/%00",
        "/docs/index.html.bak",
        "/docs/swagger-ui-bundle.js.map",
        "/docs/a/b",
        "/docs/%2e%2e/%2e%2e/etc/passwd",
    ] {
        let r = app.req(Method::GET, path, None, None).await;
        r.assert_problem(404);
    }
    // …and byte for byte on a raw connection, including queries on the docs root.
    let targets = [
        "/docs/../../etc/passwd",
        "/docs/..%2f..%2fetc%2fpasswd",
        "/docs/%00",
        "/docs/nope.js",
        "/docs/./index.html",
        "/docs//index.html",
        "/docs/index.html/",
        "/docs?x=1",
        "/docs/?x=1",
        "/docs?url=/etc/passwd",
        "/docs/?",
    ];
    for target in targets {
        let status = raw(&app, target).await;
        assert!(
            matches!(status, Some(s) if s == 404 || (300..400).contains(&s)),
            "{target}: {status:?}"
        );
    }
    // The server kept every worker: many requests later, all still answered.
    let rs = futures_util::future::join_all((0..40).map(|i| {
        let path = if i % 2 == 0 {
            "/docs/index.html"
        } else {
            "/health/live"
        };
        app.req(Method::GET, path, None, None)
    }))
    .await;
    assert!(rs.iter().all(|r| r.status == 200));
    for target in targets {
        assert!(raw(&app, target).await.is_some(), "{target}");
    }
    assert_eq!(app.get("/auth/me", &app.admin_token).await.status, 200);
});

both!(health_and_liveness, |app: TestApp| async move {
    let r = app.req(Method::GET, "/health", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"status": "ok", "db": "connected", "version": env!("CARGO_PKG_VERSION")})
    );
    assert!(r.header("x-request-id").is_some() && r.header("x-ratelimit-limit").is_some());
    let r = app.req(Method::GET, "/health/live", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!({"status": "ok"}));
    // A token does not change the answers.
    let r = app.get("/health", &app.admin_token).await;
    assert_eq!(r.body["status"], json!("ok"));
    let jwks: Value = app
        .req(Method::GET, "/.well-known/jwks.json", None, None)
        .await
        .body;
    assert!(jwks["keys"].as_array().is_some_and(|k| !k.is_empty()));
});
