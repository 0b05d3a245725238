//! A database that stops answering: 503, never 500, and the server recovers nothing it
//! should not (PostgreSQL only: the database is dropped under the running server).

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_gives_503_problems_and_a_degraded_health() {
    let app = TestApp::start(Backend::Postgres, vec![]).await;
    assert_eq!(app.get("/auth/me", &app.admin_token).await.status, 200);
    let name = app.database_url.rsplit('/').next().unwrap().to_owned();
    let admin = pg_admin_url();
    let out = std::process::Command::new("psql")
        .arg(&admin)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("DROP DATABASE {name} WITH (FORCE)"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let r = app.req(reqwest::Method::GET, "/health", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["status"], "degraded");
    assert_eq!(r.body["db"], "unreachable");
    assert_eq!(r.body["version"], env!("CARGO_PKG_VERSION"));

    let live = app
        .req(reqwest::Method::GET, "/health/live", None, None)
        .await;
    assert_eq!(live.status, 200);

    for r in [
        app.get("/auth/me", &app.admin_token).await,
        app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await,
    ] {
        assert_eq!(r.assert_problem(503), "database_unavailable");
        assert!(r.body["request_id"].as_str().is_some(), "{}", r.text);
        assert!(
            !r.text.to_lowercase().contains(&name),
            "internal detail leaked: {}",
            r.text
        );
    }
}
