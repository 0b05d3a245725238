//! Agents (api.md §7): enrollment tokens, registration and the signed protocol, with requests
//! signed by hand here (the real agent binary is exercised in `agent_binary`).

use crate::both;
use crate::harness::*;
use nexplane_ports::Clock as _;
use serde_json::{json, Value};

/// A registered agent as the tests drive it.
pub struct TestAgent {
    pub id: String,
    pub secret: String,
}

impl TestAgent {
    /// Sends a signed request at the server's (manual) clock time plus `skew` seconds.
    pub async fn send_at(
        &self,
        app: &TestApp,
        method: &str,
        path: &str,
        body: &[u8],
        skew: i64,
    ) -> Resp {
        let ts = app.clock.now().millis() / 1000 + skew;
        let sig = nexplane_crypto::agent_signature(self.secret.as_bytes(), method, path, ts, body);
        self.send_signed(app, method, path, body, ts, &sig).await
    }

    pub async fn send_signed(
        &self,
        app: &TestApp,
        method: &str,
        path: &str,
        body: &[u8],
        ts: i64,
        sig: &str,
    ) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app
            .client
            .request(m, app.url(path))
            .header("x-nexplane-agent", &self.id)
            .header("x-nexplane-timestamp", ts.to_string())
            .header("x-nexplane-signature", sig)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        TestApp::finish(r).await
    }

    pub async fn send(&self, app: &TestApp, method: &str, path: &str, body: Value) -> Resp {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        self.send_at(app, method, path, &body, 0).await
    }
}

pub async fn enrollment_token(app: &TestApp, body: Value) -> Value {
    let r = app
        .post("/agents/enrollment-tokens", &app.admin_token, body)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

pub async fn register(app: &TestApp, token: &str) -> Resp {
    app.post(
        "/agent/register",
        "",
        json!({"enrollment_token": token, "hostname": "web-1", "os": "linux",
               "arch": "x86_64", "version": "0.1.0", "labels": {"role": "web"}}),
    )
    .await
}

pub async fn new_agent(app: &TestApp) -> TestAgent {
    let t = enrollment_token(app, json!({"name": "web"})).await;
    let r = register(app, t["token"].as_str().unwrap()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    TestAgent {
        id: r.body["agent_id"].as_str().unwrap().to_owned(),
        secret: r.body["agent_secret"].as_str().unwrap().to_owned(),
    }
}

both!(
    enrollment_tokens_and_registration,
    |app: TestApp| async move {
        // Admin only; the token is shown once and never listed.
        let (_, op) = app.user("operator").await;
        let r = app.post("/agents/enrollment-tokens", &op, json!({})).await;
        r.assert_problem(403);
        let t = enrollment_token(
            &app,
            json!({"name": "web", "ttl_seconds": 600, "max_uses": 2}),
        )
        .await;
        let token = t["token"].as_str().unwrap().to_owned();
        assert!(token.len() >= 22, "{t}");
        assert_eq!(t["uses"], json!(0));
        assert_eq!(t["max_uses"], json!(2));
        let listed = app.get("/agents/enrollment-tokens", &app.admin_token).await;
        assert_eq!(listed.status, 200, "{}", listed.text);
        assert!(!listed.text.contains(&token));
        assert_eq!(listed.body[0]["id"], t["id"]);
        for bad in [
            json!({"ttl_seconds": 0}),
            json!({"ttl_seconds": 604_801}),
            json!({"max_uses": 0}),
            json!({"tll_seconds": 5}),
        ] {
            let r = app
                .post("/agents/enrollment-tokens", &app.admin_token, bad.clone())
                .await;
            r.assert_problem(422);
        }

        // Two uses, then 401; the agents list shows them online.
        for _ in 0..2 {
            let r = register(&app, &token).await;
            assert_eq!(r.status, 201, "{}", r.text);
            assert!(r.body["agent_id"].as_str().unwrap().starts_with("agt_"));
            assert!(r.body["agent_secret"].as_str().unwrap().len() >= 22);
        }
        let r = register(&app, &token).await;
        r.assert_problem(401);
        let agents = app.get("/agents", &op).await;
        assert_eq!(agents.body.as_array().unwrap().len(), 2, "{}", agents.text);
        assert_eq!(agents.body[0]["status"], json!("online"));
        assert_eq!(agents.body[0]["name"], json!("web"));
        assert_eq!(agents.body[0]["labels"], json!({"role": "web"}));
        assert!(!agents.text.contains("secret"), "{}", agents.text);

        // Unknown, revoked and expired tokens → 401.
        register(&app, "not-a-token").await.assert_problem(401);
        let t2 = enrollment_token(&app, json!({})).await;
        let r = app
            .delete(
                &format!("/agents/enrollment-tokens/{}", t2["id"].as_str().unwrap()),
                &app.admin_token,
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        register(&app, t2["token"].as_str().unwrap())
            .await
            .assert_problem(401);
        let t3 = enrollment_token(&app, json!({"ttl_seconds": 60})).await;
        app.clock.advance_secs(61);
        register(&app, t3["token"].as_str().unwrap())
            .await
            .assert_problem(401);

        // Bad registration content → 422, and uses nothing.
        let t4 = enrollment_token(&app, json!({})).await;
        let r = app
        .post("/agent/register", "", json!({"enrollment_token": t4["token"], "hostname": "", "os": "linux", "arch": "x86_64", "version": "1"}))
        .await;
        r.assert_problem(422);
        assert_eq!(
            register(&app, t4["token"].as_str().unwrap()).await.status,
            201
        );

        // Nothing secret in the audit log.
        let audit = app.get("/audit?limit=500", &app.admin_token).await.text;
        crate::connectors::assert_no_secret(std::slice::from_ref(&audit), &[&token]);
        for e in [
            "agent.enrollment_token_created",
            "agent.enrollment_token_revoked",
            "agent.registered",
        ] {
            assert!(audit.contains(e), "{e} missing");
        }
    }
);

both!(
    a_single_use_token_raced_by_ten_registrations_makes_one_agent,
    |app: TestApp| async move {
        let t = enrollment_token(&app, json!({})).await;
        let token = t["token"].as_str().unwrap().to_owned();
        let app = std::sync::Arc::new(app);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (a, tok) = (app.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                register(&a, &tok).await.status.as_u16()
            }));
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.unwrap());
        }
        codes.sort_unstable();
        assert_eq!(codes, [201, 401, 401, 401, 401, 401, 401, 401, 401, 401]);
        let agents = app.get("/agents", &app.admin_token).await;
        assert_eq!(agents.body.as_array().unwrap().len(), 1);
    }
);

both!(signatures_are_checked, |app: TestApp| async move {
    let agent = new_agent(&app).await;
    let body = br#"{"version":"0.1.1"}"#;
    let ok = agent
        .send_at(&app, "POST", "/agent/heartbeat", body, 0)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(ok.body["server_time"].is_string());

    // The same request again: a replay.
    let ts = app.clock.now().millis() / 1000 - 1;
    let sig = nexplane_crypto::agent_signature(
        agent.secret.as_bytes(),
        "POST",
        "/agent/heartbeat",
        ts,
        body,
    );
    assert_eq!(
        agent
            .send_signed(&app, "POST", "/agent/heartbeat", body, ts, &sig)
            .await
            .status,
        200
    );
    agent
        .send_signed(&app, "POST", "/agent/heartbeat", body, ts, &sig)
        .await
        .assert_problem(401);
    // Body tampered with after signing.
    let sig = nexplane_crypto::agent_signature(
        agent.secret.as_bytes(),
        "POST",
        "/agent/heartbeat",
        ts + 1,
        body,
    );
    agent
        .send_signed(
            &app,
            "POST",
            "/agent/heartbeat",
            br#"{"version":"9.9.9"}"#,
            ts + 1,
            &sig,
        )
        .await
        .assert_problem(401);
    // Forged with another secret; signed for another path; stale and future timestamps.
    let forged = TestAgent {
        id: agent.id.clone(),
        secret: "not-the-secret".into(),
    };
    forged
        .send_at(&app, "POST", "/agent/heartbeat", body, 0)
        .await
        .assert_problem(401);
    let sig = nexplane_crypto::agent_signature(
        agent.secret.as_bytes(),
        "POST",
        "/agent/other",
        ts + 2,
        body,
    );
    agent
        .send_signed(&app, "POST", "/agent/heartbeat", body, ts + 2, &sig)
        .await
        .assert_problem(401);
    agent
        .send_at(&app, "POST", "/agent/heartbeat", body, -301)
        .await
        .assert_problem(401);
    agent
        .send_at(&app, "POST", "/agent/heartbeat", body, 301)
        .await
        .assert_problem(401);
    assert_eq!(
        agent
            .send_at(&app, "POST", "/agent/heartbeat", body, -299)
            .await
            .status,
        200
    );
    // Missing headers, unknown agent.
    let r = app.post("/agent/heartbeat", "", json!({})).await;
    let code = r.assert_problem(401);
    assert_eq!(code, "unauthorized");
    let ghost = TestAgent {
        id: "agt_01m8zzzzzzzzzzzzzzzzzzzzzz".into(),
        secret: agent.secret.clone(),
    };
    ghost
        .send(&app, "POST", "/agent/heartbeat", json!({}))
        .await
        .assert_problem(401);
    // The heartbeat stored the version.
    let a = app
        .get(&format!("/agents/{}", agent.id), &app.admin_token)
        .await;
    assert_eq!(a.body["version"], json!("0.1.1"), "{}", a.text);

    // Revoked: 401 from then on, and the status says so.
    let r = app
        .delete(&format!("/agents/{}", agent.id), &app.admin_token)
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    agent
        .send(&app, "POST", "/agent/heartbeat", json!({}))
        .await
        .assert_problem(401);
    agent
        .send(&app, "GET", "/agent/commands/next", Value::Null)
        .await
        .assert_problem(401);
    let a = app
        .get(&format!("/agents/{}", agent.id), &app.admin_token)
        .await;
    assert_eq!(a.body["status"], json!("revoked"));
    assert!(a.body["revoked_at"].is_string());
    // Neither the agent secret nor the enrollment token reached a log line or the audit log.
    let audit = app.get("/audit?limit=500", &app.admin_token).await.text;
    crate::connectors::assert_no_secret(&[audit], &[&agent.secret]);
});

both!(
    status_goes_offline_without_heartbeats,
    |app: TestApp| async move {
        let agent = new_agent(&app).await;
        let path = format!("/agents/{}", agent.id);
        assert_eq!(
            app.get(&path, &app.admin_token).await.body["status"],
            json!("online")
        );
        app.clock.advance_secs(91);
        assert_eq!(
            app.get(&path, &app.admin_token).await.body["status"],
            json!("offline")
        );
        assert_eq!(
            agent
                .send(&app, "POST", "/agent/heartbeat", json!({}))
                .await
                .status,
            200
        );
        assert_eq!(
            app.get(&path, &app.admin_token).await.body["status"],
            json!("online")
        );
        app.get("/agents/agt_nope", &app.admin_token)
            .await
            .assert_problem(404);
    }
);

both!(
    an_idle_long_poll_answers_204_after_its_wait,
    |app: TestApp| async move {
        let agent = new_agent(&app).await;
        let started = std::time::Instant::now();
        let r = agent
            .send(&app, "GET", "/agent/commands/next?wait=1", Value::Null)
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert!(started.elapsed() >= std::time::Duration::from_millis(900));
        let r = agent
            .send(&app, "GET", "/agent/commands/next?wait=31", Value::Null)
            .await;
        r.assert_problem(422);
        let r = agent
            .send(
                &app,
                "POST",
                "/agent/commands/cmd_01m8zzzzzzzzzzzzzzzzzzzzzz/result",
                json!({"status": "succeeded"}),
            )
            .await;
        r.assert_problem(404);
    }
);

/// Creates, submits and approves an agent change request; returns its id and the
/// requester's token.
pub async fn approved_agent_change(
    app: &TestApp,
    change_type: &str,
    target: Value,
) -> (String, String) {
    let body = json!({"title": format!("{change_type} on a host"), "change_type": change_type,
                      "target": target});
    let (cr, op) = crate::execution::approved_body(app, body).await;
    (cr["id"].as_str().unwrap().to_owned(), op)
}

/// Long-polls until a command arrives (at most `secs`).
pub async fn next_command(app: &TestApp, agent: &TestAgent, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        // An identical request in the same second would be a replay: move the clock on.
        app.clock.advance_secs(1);
        let r = agent
            .send(app, "GET", "/agent/commands/next?wait=2", Value::Null)
            .await;
        if r.status == 200 {
            return r.body;
        }
        assert_eq!(r.status, 204, "{}", r.text);
        assert!(
            std::time::Instant::now() < deadline,
            "no command within {secs} s"
        );
    }
}

both!(
    agent_change_types_dispatch_commands_and_wait_for_results,
    |app: TestApp| async move {
        let agent = new_agent(&app).await;
        // Unknown or revoked agents are refused at create.
        let (_, op) = app.user("operator").await;
        let r = app
        .post("/change-requests", &op, json!({"title": "x", "change_type": "agent_write_file",
            "target": {"agent_id": "agt_01m8zzzzzzzzzzzzzzzzzzzzzz", "path": "/etc/motd", "content": "hi"}}))
        .await;
        r.assert_problem(422);
        assert!(r.text.contains("target.agent_id"), "{}", r.text);

        let (id, op) = approved_agent_change(
        &app,
        "agent_write_file",
        json!({"agent_id": agent.id, "path": "/srv/app/motd", "content": "hello", "mode": "0640"}),
    )
    .await;
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
        let job = r.body["id"].as_str().unwrap().to_owned();

        let cmd = next_command(&app, &agent, 30).await;
        assert_eq!(cmd["type"], json!("write_file"));
        assert_eq!(
            cmd["params"],
            json!({"path": "/srv/app/motd", "content": "hello", "mode": "0640"})
        );
        let cid = cmd["id"].as_str().unwrap().to_owned();
        // Another agent cannot answer it.
        let other = new_agent(&app).await;
        other
            .send(
                &app,
                "POST",
                &format!("/agent/commands/{cid}/result"),
                json!({"status": "succeeded"}),
            )
            .await
            .assert_problem(404);
        let snapshot =
            json!({"existed": true, "content_base64": "b2xkIHNlY3JldCBjb250ZW50", "mode": "0600"});
        let r = agent
        .send(&app, "POST", &format!("/agent/commands/{cid}/result"),
            json!({"status": "succeeded", "output": {"path": "/srv/app/motd", "bytes": 5}, "snapshot": snapshot}))
        .await;
        assert_eq!(r.status, 204, "{}", r.text);
        let r = agent
            .send(
                &app,
                "POST",
                &format!("/agent/commands/{cid}/result"),
                json!({"status": "failed"}),
            )
            .await;
        assert_eq!(r.assert_problem(409), "result_already_recorded");
        let done = app.wait_job(&job, 30).await;
        assert_eq!(done["status"], json!("succeeded"), "{done}");
        let cr = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert_eq!(cr["state"], json!("complete"), "{cr}");

        // Rollback sends the snapshot back.
        let r = app
            .post(&format!("/change-requests/{id}/rollback"), &op, json!({}))
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
        let rb_job = r.body["id"].as_str().unwrap().to_owned();
        let cmd = next_command(&app, &agent, 30).await;
        assert_eq!(cmd["type"], json!("restore_file"));
        assert_eq!(
            cmd["params"],
            json!({"path": "/srv/app/motd", "snapshot": snapshot})
        );
        let r = agent
            .send(
                &app,
                "POST",
                &format!("/agent/commands/{}/result", cmd["id"].as_str().unwrap()),
                json!({"status": "succeeded", "output": {}}),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert_eq!(
            app.wait_job(&rb_job, 30).await["status"],
            json!("succeeded")
        );
        let cr = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert_eq!(cr["state"], json!("rolledback"), "{cr}");

        // The snapshot (old file content) is stored sealed, never in the audit log.
        let audit = app.get("/audit?limit=500", &app.admin_token).await.text;
        assert!(!audit.contains("b2xkIHNlY3JldCBjb250ZW50"));
        let db = app
            .query("SELECT sealed_snapshot FROM agent_commands WHERE sealed_snapshot IS NOT NULL")
            .join("\n");
        assert!(
            db.starts_with("v1.") && !db.contains("b2xkIHNlY3JldCBjb250ZW50"),
            "{db}"
        );
        for e in ["agent.command_dispatched", "agent.command_completed"] {
            assert!(audit.contains(e), "{e} missing");
        }

        // A refused command (the agent reports failure) fails the change request with its reason.
        let (id, op) = approved_agent_change(
            &app,
            "agent_set_file_mode",
            json!({"agent_id": agent.id, "path": "/etc/shadow", "mode": "0644"}),
        )
        .await;
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        let job = r.body["id"].as_str().unwrap().to_owned();
        let cmd = next_command(&app, &agent, 30).await;
        assert_eq!(cmd["type"], json!("set_file_mode"));
        agent
        .send(&app, "POST", &format!("/agent/commands/{}/result", cmd["id"].as_str().unwrap()),
            json!({"status": "failed", "output": {"error": "path /etc/shadow is outside allowed_paths"}}))
        .await;
        app.wait_job(&job, 30).await;
        let cr = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert_eq!(cr["state"], json!("failed"), "{cr}");
        assert!(
            cr["execution"]["error"]
                .as_str()
                .unwrap()
                .contains("outside allowed_paths"),
            "{cr}"
        );
    }
);

both!(
    a_command_nobody_answers_fails_the_change_request_after_its_timeout,
    vec![("NEXPLANE_AGENT_COMMAND_TIMEOUT_SECONDS", "2".into())],
    |app: TestApp| async move {
        let agent = new_agent(&app).await;
        let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": agent.id, "path": "/srv/app/x", "content": "x"}),
        )
        .await;
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        let job = r.body["id"].as_str().unwrap().to_owned();
        let done = app.wait_job(&job, 30).await;
        assert_eq!(done["status"], json!("failed"), "{done}");
        let cr = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert_eq!(cr["state"], json!("failed"));
        assert!(
            cr["execution"]["error"]
                .as_str()
                .unwrap()
                .contains("did not answer within 2 s"),
            "{cr}"
        );
        // The late agent gets the command only if it was not cancelled; a late result is refused.
        let r = agent
            .send(&app, "GET", "/agent/commands/next?wait=0", Value::Null)
            .await;
        assert_eq!(
            r.status, 204,
            "a cancelled command was still handed out: {}",
            r.text
        );
    }
);

both!(
    revoking_an_agent_fails_the_change_request_waiting_for_it,
    |app: TestApp| async move {
        let agent = new_agent(&app).await;
        let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": agent.id, "path": "/srv/app/y", "content": "y"}),
        )
        .await;
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        let job = r.body["id"].as_str().unwrap().to_owned();
        // Wait until the command is queued, then revoke.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while app.query("SELECT id FROM agent_commands").is_empty() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let r = app
            .delete(&format!("/agents/{}", agent.id), &app.admin_token)
            .await;
        assert_eq!(r.status, 204);
        let done = app.wait_job(&job, 30).await;
        assert_eq!(done["status"], json!("failed"), "{done}");
        let cr = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert!(
            cr["execution"]["error"]
                .as_str()
                .unwrap()
                .contains("was revoked"),
            "{cr}"
        );
    }
);

both!(
    a_command_queued_by_one_replica_reaches_a_poll_waiting_on_another,
    |app: TestApp| async move {
        // Replica B shares A's database; its job worker is stopped, so the execution job
        // (and the command it queues) runs on A, and only B's watcher can wake the poll.
        let b = nexplane::start(app.config(), app.clock.clone())
            .await
            .unwrap();
        b.worker.stop();
        b.worker.task.abort();
        let b_base = format!("http://{}", b.addr);

        let agent = new_agent(&app).await;
        let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": agent.id, "path": "/srv/app/z", "content": "z"}),
        )
        .await;
        let path = "/agent/commands/next?wait=20";
        let ts = app.clock.now().millis() / 1000;
        let sig = nexplane_crypto::agent_signature(agent.secret.as_bytes(), "GET", path, ts, b"");
        let poll = app
            .client
            .get(format!("{b_base}{path}"))
            .header("x-nexplane-agent", &agent.id)
            .header("x-nexplane-timestamp", ts.to_string())
            .header("x-nexplane-signature", sig)
            .send();
        let poll = tokio::spawn(poll);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
        let started = std::time::Instant::now();
        let got = poll.await.unwrap().unwrap();
        assert_eq!(got.status(), 200);
        let body: Value = got.json().await.unwrap();
        assert_eq!(body["type"], json!("write_file"), "{body}");
        // Woken by B's once-a-second watcher, not by the end of the 20 s wait.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        b.watcher.abort();
        b.handle.stop(false).await;
    }
);

both!(
    revoking_an_agent_ends_its_waiting_poll_with_401,
    |app: TestApp| async move {
        let agent = new_agent(&app).await;
        let app = std::sync::Arc::new(app);
        let (a, ag) = (
            app.clone(),
            TestAgent {
                id: agent.id.clone(),
                secret: agent.secret.clone(),
            },
        );
        let poll = tokio::spawn(async move {
            ag.send(&a, "GET", "/agent/commands/next?wait=20", Value::Null)
                .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let r = app
            .delete(&format!("/agents/{}", agent.id), &app.admin_token)
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        let r = poll.await.unwrap();
        r.assert_problem(401);
        assert!(r.text.contains("revoked"), "{}", r.text);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
);
