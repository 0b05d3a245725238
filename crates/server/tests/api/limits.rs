//! Rate limits (api.md §10): per user across tokens, exact under concurrency, headers on
//! every response, 429 problem+json with Retry-After, windows that free up with time; and
//! per-IP limits on unauthenticated requests.

use crate::both;
use crate::harness::*;
use futures_util::future::join_all;
use nexplane_ports::Clock;
use reqwest::Method;
use serde_json::json;

fn limit_env(per_user: u32, per_ip: u32) -> Env {
    vec![
        ("NEXPLANE_RATE_LIMIT_PER_MINUTE", per_user.to_string()),
        ("NEXPLANE_IP_RATE_LIMIT_PER_MINUTE", per_ip.to_string()),
    ]
}

fn num(r: &Resp, h: &str) -> i64 {
    r.header(h)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{h} missing or not a number: {:?}", r.header(h)))
}

/// Sends `GET /auth/me` with each token, all at once.
async fn burst(app: &TestApp, tokens: &[&str]) -> Vec<Resp> {
    join_all(tokens.iter().map(|t| app.get("/auth/me", t))).await
}

#[track_caller]
fn assert_limited(r: &Resp, limit: i64) {
    assert_eq!(r.assert_problem(429), "rate_limited");
    let retry = num(r, "retry-after");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(num(r, "x-ratelimit-remaining"), 0);
    assert_eq!(num(r, "x-ratelimit-limit"), limit);
    assert!(r.header("x-request-id").is_some());
}

both!(
    exactly_the_limit_under_concurrency,
    limit_env(100, 100_000),
    |app: TestApp| async move {
        let (user, token) = app.user("viewer").await;
        let now = app.clock.now().secs();

        let rs = burst(&app, &vec![token.as_str(); 150]).await;
        let ok: Vec<&Resp> = rs.iter().filter(|r| r.status == 200).collect();
        let limited: Vec<&Resp> = rs.iter().filter(|r| r.status == 429).collect();
        assert_eq!(
            (ok.len(), limited.len()),
            (100, 50),
            "statuses: {:?}",
            rs.iter().map(|r| r.status).collect::<Vec<_>>()
        );

        // Each admitted request saw a distinct remaining count: 99 down to 0.
        let mut remaining: Vec<i64> = ok.iter().map(|r| num(r, "x-ratelimit-remaining")).collect();
        remaining.sort_unstable();
        assert_eq!(remaining, (0..100).collect::<Vec<_>>());
        for r in &ok {
            assert_eq!(r.body["id"], user["id"]);
            assert_eq!(num(r, "x-ratelimit-limit"), 100);
            assert!(r.header("retry-after").is_none());
        }
        for r in &limited {
            assert_limited(r, 100);
        }
        // Reset is Unix seconds within the next minute, the same for the whole window.
        let resets: std::collections::BTreeSet<i64> =
            rs.iter().map(|r| num(r, "x-ratelimit-reset")).collect();
        assert_eq!(resets.len(), 1, "{resets:?}");
        let reset = *resets.iter().next().unwrap();
        assert!(reset > now && reset <= now + 61, "reset {reset}, now {now}");

        // Still limited a little later, on every endpoint, with Retry-After counting down.
        app.clock.advance_secs(30);
        let r = app.get("/auth/me", &token).await;
        assert_limited(&r, 100);
        assert!(
            (29..=31).contains(&num(&r, "retry-after")),
            "{:?}",
            r.header("retry-after")
        );
        assert_limited(&app.get("/users", &token).await, 100);
        assert_limited(&app.get("/audit", &token).await, 100);

        // Once the window has passed, requests succeed again with a full allowance.
        app.clock.advance_secs(31);
        let r = app.get("/auth/me", &token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(num(&r, "x-ratelimit-remaining"), 99);
        let new_reset = num(&r, "x-ratelimit-reset");
        let now = app.clock.now().secs();
        assert!(new_reset > now && new_reset <= now + 61);
    }
);

both!(
    counted_per_user_across_tokens,
    limit_env(100, 100_000),
    |app: TestApp| async move {
        let (user, first) = app.user("operator").await;
        let email = user["email"].as_str().unwrap();
        let second = app.login_ok(email, USER_PASSWORD).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(first, second);
        let (_, other) = app.user("operator").await;

        // 75 + 75 requests over two tokens of one user, with another user's interleaved.
        let mut tokens: Vec<&str> = Vec::new();
        for i in 0..150 {
            tokens.push(if i % 2 == 0 { &first } else { &second });
        }
        let mut all = tokens.clone();
        all.extend(std::iter::repeat_n(other.as_str(), 40));
        let rs = burst(&app, &all).await;
        let mine = &rs[..150];
        let theirs = &rs[150..];
        assert_eq!(mine.iter().filter(|r| r.status == 200).count(), 100);
        assert_eq!(mine.iter().filter(|r| r.status == 429).count(), 50);
        for r in mine.iter().filter(|r| r.status == 429) {
            assert_limited(r, 100);
        }
        // The other user is unaffected and counted alone.
        assert!(theirs.iter().all(|r| r.status == 200));
        let mut left: Vec<i64> = theirs
            .iter()
            .map(|r| num(r, "x-ratelimit-remaining"))
            .collect();
        left.sort_unstable();
        assert_eq!(left, (60..100).collect::<Vec<_>>());

        // A third token of the limited user is limited too; the admin is not.
        let third = app.login_ok(email, USER_PASSWORD).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_limited(&app.get("/auth/me", &third).await, 100);
        assert_eq!(app.get("/auth/me", &app.admin_token).await.status, 200);
        assert_eq!(app.get("/auth/me", &other).await.status, 200);
    }
);

both!(
    unauthenticated_requests_are_limited_per_ip,
    limit_env(100_000, 5),
    |app: TestApp| async move {
        // The harness's admin login already used one of the five.
        let mut statuses = Vec::new();
        let mut remaining = Vec::new();
        for _ in 0..6 {
            let r = app.req(Method::GET, "/health/live", None, None).await;
            assert_eq!(num(&r, "x-ratelimit-limit"), 5);
            remaining.push(num(&r, "x-ratelimit-remaining"));
            statuses.push(r.status.as_u16());
            if r.status == 429 {
                assert_limited(&r, 5);
            }
        }
        assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
        assert_eq!(remaining, [3, 2, 1, 0, 0, 0]);

        // Every unauthenticated endpoint shares the address's allowance, login included, and
        // so do requests whose token is no token.
        for (method, path, body) in [
            (Method::GET, "/health", None),
            (Method::GET, "/openapi.json", None),
            (Method::GET, "/.well-known/jwks.json", None),
            (Method::GET, "/users", None),
            (Method::GET, "/nope", None),
            (
                Method::POST,
                "/auth/login",
                Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
            ),
        ] {
            let r = app.req(method.clone(), path, None, body).await;
            assert_limited(&r, 5);
        }
        assert_limited(&app.get("/users", "not-a-token").await, 5);

        // An authenticated user is counted per user, not per address.
        let r = app.get("/auth/me", &app.admin_token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(num(&r, "x-ratelimit-limit"), 100_000);

        // The window passes.
        app.clock.advance_secs(60);
        let r = app.req(Method::GET, "/health", None, None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(num(&r, "x-ratelimit-remaining"), 4);
        app.login_ok(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    }
);
