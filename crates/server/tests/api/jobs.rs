//! Discovery jobs (api.md §4 discover, §8): 202 with the job, one active discovery per
//! connector, `GET /jobs/{id}`, failures with a clear error, leases that expire and are taken
//! over, and a connector deleted while its discovery runs.
//!
//! An endpoint that accepts connections but never answers keeps a discovery running (until
//! the adapter's request time-out), so these tests need no AWS emulator.

use crate::both;
use crate::connectors::{
    assert_no_secret, audit_text, aws_body, closed_endpoint, create, KEY_ID, SECRET,
};
use crate::harness::*;
use nexplane_ports::Clock;
use reqwest::Method;
use serde_json::{json, Value};
use std::net::TcpListener;

/// A loopback endpoint that accepts connections and never answers; keep it alive while used.
pub fn silent_endpoint() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

pub async fn discover(app: &TestApp, token: &str, connector_id: &str) -> Resp {
    app.req(
        Method::POST,
        &format!("/connectors/{connector_id}/discover"),
        Some(token),
        None,
    )
    .await
}

/// Polls the job until its status is `want` (at most 30 s).
async fn wait_status(app: &TestApp, id: &str, want: &str) -> Value {
    for _ in 0..300 {
        let r = app.get(&format!("/jobs/{id}"), &app.admin_token).await;
        if r.body["status"] == json!(want) {
            return r.body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {id} never became {want}");
}

both!(
    discover_answers_202_and_returns_the_active_job,
    |app: TestApp| async move {
        let (_silent, endpoint) = silent_endpoint();
        let c = create(&app, aws_body("slow", &endpoint)).await;
        let id = c["id"].as_str().unwrap().to_owned();
        let (_, operator) = app.user("operator").await;

        let r = discover(&app, &operator, &id).await;
        assert_eq!(r.status, 202, "{}", r.text);
        let job = r.body.clone();
        let job_id = job["id"].as_str().unwrap().to_owned();
        assert!(job_id.starts_with("job_"));
        assert_eq!(
            r.header("location"),
            Some(format!("/jobs/{job_id}").as_str())
        );
        assert_eq!(job["kind"], json!("discovery"));
        assert_eq!(job["resource_type"], json!("connector"));
        assert_eq!(job["resource_id"], json!(id));
        assert!(["queued", "running"].contains(&job["status"].as_str().unwrap()));
        assert_eq!(job["progress"]["done"], json!(0));
        assert!(job.get("lease_owner").is_none());

        // While it runs, a second request gets the same job; so do concurrent ones.
        let running = wait_status(&app, &job_id, "running").await;
        assert!(running["started_at"].is_string());
        let r = discover(&app, &app.admin_token, &id).await;
        assert_eq!(r.status, 202);
        assert_eq!(r.body["id"], json!(job_id));
        let many =
            futures_util::future::join_all((0..8).map(|_| discover(&app, &operator, &id))).await;
        for r in many {
            assert_eq!(r.status, 202, "{}", r.text);
            assert_eq!(r.body["id"], json!(job_id));
        }
        assert_eq!(app.audit_of("discovery.started").await.len(), 1);

        // Any role reads it.
        let (_, viewer) = app.user("viewer").await;
        let r = app.get(&format!("/jobs/{job_id}"), &viewer).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["id"], json!(job_id));
        discover(&app, &viewer, &id).await.assert_problem(403);
        let (_, approver) = app.user("approver").await;
        discover(&app, &approver, &id).await.assert_problem(403);
        app.get("/jobs/job_01jzzzzzzzzzzzzzzzzzzzzzzz", &viewer)
            .await
            .assert_problem(404);
        app.get("/jobs/nope", &viewer).await.assert_problem(404);
        discover(&app, &operator, "conn_01jzzzzzzzzzzzzzzzzzzzzzzz")
            .await
            .assert_problem(404);
        discover(&app, &operator, "nope").await.assert_problem(404);
    }
);

both!(
    a_discovery_that_cannot_reach_the_provider_fails_clearly,
    |app: TestApp| async move {
        let c = create(&app, aws_body("unreachable", &closed_endpoint())).await;
        let id = c["id"].as_str().unwrap().to_owned();
        let r = discover(&app, &app.admin_token, &id).await;
        assert_eq!(r.status, 202);
        let job = app.wait_job(r.body["id"].as_str().unwrap(), 60).await;
        assert_eq!(job["status"], json!("failed"), "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.starts_with("discovery failed: "), "{error}");
        assert!(error.contains("cannot reach IAM"), "{error}");
        assert!(job["finished_at"].is_string());
        let failed = app.audit_of("discovery.failed").await;
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["actor"], json!("system"));
        assert_eq!(failed[0]["resource_id"], json!(id));
        assert_eq!(failed[0]["payload"]["job_id"], job["id"]);
        let started = app.audit_of("discovery.started").await;
        assert_eq!(started[0]["actor"], json!(ADMIN_EMAIL));
        let c = app
            .get(&format!("/connectors/{id}"), &app.admin_token)
            .await
            .body;
        assert_eq!(c["last_discovered_at"], Value::Null);
        // A finished job does not block the next discovery.
        let r = discover(&app, &app.admin_token, &id).await;
        assert_eq!(r.status, 202);
        assert_ne!(r.body["id"], job["id"]);
        app.wait_job(r.body["id"].as_str().unwrap(), 60).await;
        assert_no_secret(&[audit_text(&app).await], &[KEY_ID, SECRET]);
    }
);

both!(an_expired_lease_is_taken_over, |app: TestApp| async move {
    let c = create(&app, aws_body("orphaned", &closed_endpoint())).await;
    let id = c["id"].as_str().unwrap().to_owned();
    let now = app.clock.now().millis();
    let started = now - 600_000;
    // Two jobs a crashed worker left running: one lease expired, one still valid for 30 s.
    let row = |job: &str, until: i64| {
        format!(
            "INSERT INTO jobs (id, kind, status, resource_type, resource_id, progress, result, \
             error, created_at, started_at, finished_at, lease_owner, lease_until, attempts) \
             VALUES ('{job}', 'discovery', 'running', 'connector', '{id}', \
             '{{\"phase\":\"iam\",\"done\":3,\"total\":10}}', 'null', NULL, {started}, {started}, \
             NULL, 'crashed-worker', {until}, 1)"
        )
    };
    app.sql(&row("job_01jaaaaaaaaaaaaaaaaaaaaaaa", now - 1_000));
    let expired = app.wait_job("job_01jaaaaaaaaaaaaaaaaaaaaaaa", 60).await;
    assert_eq!(expired["status"], json!("failed"));
    assert!(expired["error"].as_str().unwrap().contains("cannot reach"));
    assert_eq!(
        expired["started_at"].as_str().unwrap(),
        nexplane_domain::Timestamp::from_millis(started).to_rfc3339(),
        "a takeover keeps the first start"
    );
    let attempts =
        app.query("SELECT attempts FROM jobs WHERE id = 'job_01jaaaaaaaaaaaaaaaaaaaaaaa'");
    assert_eq!(attempts, ["2"]);

    // The other one (a different connector: one active discovery per connector) waits for
    // its lease to run out.
    let c2 = create(&app, aws_body("orphaned-2", &closed_endpoint())).await;
    let id2 = c2["id"].as_str().unwrap();
    app.sql(&row("job_01jbbbbbbbbbbbbbbbbbbbbbbb", now + 30_000).replace(&id, id2));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = app
        .get("/jobs/job_01jbbbbbbbbbbbbbbbbbbbbbbb", &app.admin_token)
        .await;
    assert_eq!(r.body["status"], json!("running"), "{}", r.text);
    assert_eq!(
        r.body["progress"],
        json!({"phase": "iam", "done": 3, "total": 10})
    );
    assert_eq!(
        app.query("SELECT lease_owner FROM jobs WHERE id = 'job_01jbbbbbbbbbbbbbbbbbbbbbbb'"),
        ["crashed-worker"]
    );
    // A discovery request meanwhile returns that job.
    let r = discover(&app, &app.admin_token, id2).await;
    assert_eq!(r.body["id"], json!("job_01jbbbbbbbbbbbbbbbbbbbbbbb"));
    app.clock.advance_secs(31);
    let done = app.wait_job("job_01jbbbbbbbbbbbbbbbbbbbbbbb", 60).await;
    assert_eq!(done["status"], json!("failed"));
});

both!(
    a_connector_deleted_while_its_discovery_runs,
    |app: TestApp| async move {
        let (_silent, endpoint) = silent_endpoint();
        let c = create(&app, aws_body("vanishing", &endpoint)).await;
        let id = c["id"].as_str().unwrap().to_owned();
        let r = discover(&app, &app.admin_token, &id).await;
        let job_id = r.body["id"].as_str().unwrap().to_owned();
        wait_status(&app, &job_id, "running").await;
        let r = app
            .delete(&format!("/connectors/{id}"), &app.admin_token)
            .await;
        assert_eq!(r.status, 204, "{}", r.text);

        // The worker stays healthy: another connector's discovery runs meanwhile.
        let other = create(&app, aws_body("other", &closed_endpoint())).await;
        let r = discover(&app, &app.admin_token, other["id"].as_str().unwrap()).await;
        let other_job = app.wait_job(r.body["id"].as_str().unwrap(), 60).await;
        assert_eq!(other_job["status"], json!("failed"));

        // The provider call ends (the adapter's request time-out); the job fails cleanly.
        let job = app.wait_job(&job_id, 120).await;
        assert_eq!(job["status"], json!("failed"), "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.contains("connector was deleted"), "{error}");
        let failed = app.audit_of("discovery.failed").await;
        assert!(failed
            .iter()
            .any(|e| e["payload"]["job_id"] == json!(job_id)));
        let r = app
            .get(
                &format!("/assets?connector_id={id}&include_removed=true"),
                &app.admin_token,
            )
            .await;
        assert_eq!(r.body, json!([]));
        app.get(&format!("/connectors/{id}"), &app.admin_token)
            .await
            .assert_problem(404);
    }
);
