//! Connectors (api.md §4): create, read, replace, delete, test; validation; roles; sealed
//! credentials that no response or audit payload ever shows; master-key rotation.
//!
//! These tests need no AWS emulator: a connector whose `endpoint_url` is a closed loopback
//! port answers its test with `ok: false`. The emulator tests are in `discovery.rs`.

use crate::both;
use crate::harness::*;
use nexplane_ports::Clock;
use reqwest::Method;
use serde_json::{json, Value};

pub const KEY_ID: &str = "AKIANEXPLANECONN0001";
pub const SECRET: &str = "conn-test-secret/Value+0123456789abcdef";
pub const TOKEN: &str = "conn-test-session-token-0123456789";

/// A loopback URL nobody listens on (the port was free a moment ago).
pub fn closed_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

pub fn aws_body(name: &str, endpoint: &str) -> Value {
    json!({
        "name": name,
        "type": "aws",
        "environment": "staging",
        "settings": {"endpoint_url": endpoint, "regions": ["us-east-1", "eu-west-1"]},
        "credentials": {
            "aws_access_key_id": KEY_ID,
            "aws_secret_access_key": SECRET,
            "region": "us-east-1"
        }
    })
}

/// Creates a connector as the admin and returns it.
pub async fn create(app: &TestApp, body: Value) -> Value {
    let r = app.post("/connectors", &app.admin_token, body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

/// Fails when any of `texts` shows one of `secrets`.
#[track_caller]
pub fn assert_no_secret(texts: &[String], secrets: &[&str]) {
    for t in texts {
        for s in secrets {
            assert!(!t.contains(s), "a secret value leaked into: {t}");
        }
    }
    // And none reached a log line of any server of this test run.
    let logs = crate::harness::captured_logs();
    assert!(!logs.is_empty(), "log capture is not working");
    for s in secrets {
        assert!(!logs.contains(s), "a secret value reached the log");
    }
}

/// `POST /connectors/{id}/test` as the admin.
pub async fn test_connector(app: &TestApp, id: &str) -> Resp {
    app.req(
        Method::POST,
        &format!("/connectors/{id}/test"),
        Some(&app.admin_token),
        None,
    )
    .await
}

/// Every audit event as text (newest 500).
pub async fn audit_text(app: &TestApp) -> String {
    let r = app.get("/audit?limit=500", &app.admin_token).await;
    assert_eq!(r.status, 200);
    r.text
}

both!(
    create_read_list_and_nothing_secret_shows,
    |app: TestApp| async move {
        let mut seen = Vec::new();
        let endpoint = closed_endpoint();
        let r = app
            .post(
                "/connectors",
                &app.admin_token,
                aws_body("prod-aws", &endpoint),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        seen.push(r.text.clone());
        let c = r.body.clone();
        let id = c["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("conn_"));
        assert_eq!(
            r.header("location"),
            Some(format!("/connectors/{id}").as_str())
        );
        assert_eq!(c["name"], json!("prod-aws"));
        assert_eq!(c["type"], json!("aws"));
        assert_eq!(c["environment"], json!("staging"));
        assert_eq!(c["status"], json!("untested"));
        assert_eq!(
            c["credential_keys"],
            json!(["aws_access_key_id", "aws_secret_access_key"])
        );
        // `region` given with the credentials is a setting.
        assert_eq!(
            c["settings"],
            json!({"endpoint_url": endpoint, "region": "us-east-1",
               "regions": ["us-east-1", "eu-west-1"]})
        );
        assert!(c.get("credentials").is_none());
        for k in ["last_tested_at", "last_test_error", "last_discovered_at"] {
            assert_eq!(c[k], Value::Null, "{k}");
        }
        assert!(c["created_at"].as_str().unwrap().ends_with('Z'));

        let (_, viewer) = app.user("viewer").await;
        let r = app.get(&format!("/connectors/{id}"), &viewer).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body, c);
        seen.push(r.text);
        let r = app.get("/connectors", &viewer).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, json!([c]));
        seen.push(r.text);

        // The default environment is production; settings get their defaults.
        let r = app
            .post(
                "/connectors",
                &app.admin_token,
                json!({"name": "minimal", "type": "aws", "credentials":
                {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET}}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["environment"], json!("production"));
        assert_eq!(
            r.body["settings"],
            json!({"region": "us-east-1", "regions": ["us-east-1"]})
        );
        seen.push(r.text);

        let created = app.audit_of("connector.created").await;
        assert_eq!(created.len(), 2);
        let ev = created
            .iter()
            .find(|e| e["resource_id"] == json!(id))
            .unwrap();
        assert_eq!(ev["actor"], json!(ADMIN_EMAIL));
        assert_eq!(ev["payload"]["name"], json!("prod-aws"));
        assert_eq!(
            ev["payload"]["credential_keys"],
            json!(["aws_access_key_id", "aws_secret_access_key"])
        );
        seen.push(audit_text(&app).await);
        assert_no_secret(&seen, &[KEY_ID, SECRET]);

        // At rest: one row per credential, sealed (v1.<key id>.…), never the plain value.
        let rows = app.query(&format!(
        "SELECT name, sealed_value FROM connector_credentials WHERE connector_id = '{id}' ORDER BY name"
    ));
        assert_eq!(rows.len(), 2, "{rows:?}");
        for row in &rows {
            let (_, sealed) = row.split_once('|').unwrap();
            assert!(sealed.starts_with("v1."), "{sealed}");
            assert!(!sealed.contains(KEY_ID) && !sealed.contains(SECRET));
        }
        // Nothing else of the database holds them either.
        let settings = app.query("SELECT settings FROM connectors");
        assert_no_secret(&settings, &[KEY_ID, SECRET]);
    }
);

both!(
    every_validation_error_of_section_4,
    |app: TestApp| async move {
        let endpoint = closed_endpoint();
        create(&app, aws_body("taken", &endpoint)).await;
        let t = &app.admin_token;
        let fields = |r: &Resp| -> Vec<String> {
            r.body["errors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| e["field"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut seen = Vec::new();

        // Unknown type.
        let mut b = aws_body("x1", &endpoint);
        b["type"] = json!("gcp");
        let r = app.post("/connectors", t, b).await;
        assert_eq!(r.assert_problem(422), "validation_failed");
        assert_eq!(fields(&r), ["type"]);
        seen.push(r.text);

        // A missing required credential, and no credentials at all.
        let mut b = aws_body("x2", &endpoint);
        b["credentials"]
            .as_object_mut()
            .unwrap()
            .remove("aws_secret_access_key");
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["credentials.aws_secret_access_key"]);
        seen.push(r.text);
        let mut b = aws_body("x3", &endpoint);
        b.as_object_mut().unwrap().remove("credentials");
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["credentials"]);

        // Duplicate name.
        let r = app
            .post("/connectors", t, aws_body("taken", &endpoint))
            .await;
        assert_eq!(r.assert_problem(409), "duplicate");
        assert!(r.body["detail"].as_str().unwrap().contains("taken"));
        seen.push(r.text);

        // Unknown fields: in the body, among the settings, among the credentials.
        let mut b = aws_body("x4", &endpoint);
        b["credentails"] = json!({});
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert!(r.text.contains("credentails"), "{}", r.text);
        seen.push(r.text);
        let mut b = aws_body("x5", &endpoint);
        b["settings"]["regoin"] = json!("eu-west-1");
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["settings.regoin"]);
        let mut b = aws_body("x6", &endpoint);
        b["credentials"]["aws_token"] = json!("TOPSECRETTOKENVALUE");
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["credentials.aws_token"]);
        seen.push(r.text);

        // Wrong shapes never echo a credential value.
        let mut b = aws_body("x7", &endpoint);
        b["credentials"] = json!("AKIA-TOPSECRET-AS-A-STRING");
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["credentials"]);
        seen.push(r.text);
        let mut b = aws_body("x8", &endpoint);
        b["credentials"]["aws_secret_access_key"] = json!(987654321987654321u64);
        let r = app.post("/connectors", t, b).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["credentials.aws_secret_access_key"]);
        seen.push(r.text);

        // Other rules, all reported together.
        let r = app
            .post(
                "/connectors",
                t,
                json!({"name": "", "type": "aws", "environment": "prod",
                   "settings": {"region": "Mars 1", "endpoint_url": "ftp://x"},
                   "credentials": {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET}}),
            )
            .await;
        r.assert_problem(422);
        assert_eq!(
            fields(&r),
            [
                "name",
                "environment",
                "settings.region",
                "settings.endpoint_url"
            ]
        );
        // Missing name or type: the body does not parse.
        let r = app
            .post("/connectors", t, json!({"type": "aws", "credentials": {}}))
            .await;
        r.assert_problem(422);
        let r = app
            .raw(
                Method::POST,
                "/connectors",
                Some(t),
                "application/json",
                b"{".to_vec(),
            )
            .await;
        r.assert_problem(400);

        // Nothing was created by the refused requests.
        let r = app.get("/connectors", t).await;
        assert_eq!(r.body.as_array().unwrap().len(), 1);
        seen.push(audit_text(&app).await);
        assert_no_secret(&seen, &[SECRET, KEY_ID, "TOPSECRET", "987654321987654321"]);
    }
);

both!(
    roles_on_every_connector_endpoint,
    |app: TestApp| async move {
        let endpoint = closed_endpoint();
        for role in ["admin", "operator", "approver", "viewer"] {
            let (_, token) = app.user(role).await;
            let c = create(&app, aws_body(&format!("for-{role}"), &endpoint)).await;
            let id = c["id"].as_str().unwrap().to_owned();
            let path = format!("/connectors/{id}");
            let is_admin = role == "admin";
            let operates = matches!(role, "admin" | "operator");

            for (method, path, ok) in [
                (Method::GET, "/connectors".to_owned(), true),
                (Method::GET, path.clone(), true),
            ] {
                let r = app.req(method, &path, Some(&token), None).await;
                assert_eq!(r.status, if ok { 200 } else { 403 }, "{role} {path}");
            }
            // Create, replace: admin only.
            let r = app
                .post(
                    "/connectors",
                    &token,
                    aws_body(&format!("by-{role}"), &endpoint),
                )
                .await;
            assert_eq!(
                r.status,
                if is_admin { 201 } else { 403 },
                "{role}: {}",
                r.text
            );
            let r = app
                .put(&path, &token, json!({"name": format!("renamed-by-{role}")}))
                .await;
            assert_eq!(
                r.status,
                if is_admin { 200 } else { 403 },
                "{role}: {}",
                r.text
            );
            // Test and discover: operator and admin.
            let r = app
                .req(Method::POST, &format!("{path}/test"), Some(&token), None)
                .await;
            assert_eq!(
                r.status,
                if operates { 200 } else { 403 },
                "{role}: {}",
                r.text
            );
            if operates {
                assert_eq!(r.body["ok"], json!(false));
            }
            let r = app
                .req(
                    Method::POST,
                    &format!("{path}/discover"),
                    Some(&token),
                    None,
                )
                .await;
            assert_eq!(
                r.status,
                if operates { 202 } else { 403 },
                "{role}: {}",
                r.text
            );
            if operates {
                app.wait_job(r.body["id"].as_str().unwrap(), 60).await;
            }
            // Delete: admin only.
            let r = app.req(Method::DELETE, &path, Some(&token), None).await;
            assert_eq!(
                r.status,
                if is_admin { 204 } else { 403 },
                "{role}: {}",
                r.text
            );
            let after = app.get(&path, &app.admin_token).await;
            if is_admin {
                after.assert_problem(404);
            } else {
                assert_eq!(after.status, 200);
                assert_eq!(
                    after.body["name"], c["name"],
                    "{role} changed the connector"
                );
                let status = if operates { "error" } else { "untested" };
                assert_eq!(after.body["status"], json!(status), "{}", after.text);
            }
            // Without a token: 401.
            app.req(Method::GET, "/connectors", None, None)
                .await
                .assert_problem(401);
        }
    }
);

both!(
    put_replaces_and_keeps_credentials_unless_given,
    |app: TestApp| async move {
        let endpoint = closed_endpoint();
        let c = create(&app, aws_body("original", &endpoint)).await;
        let id = c["id"].as_str().unwrap().to_owned();
        let path = format!("/connectors/{id}");
        let t = &app.admin_token;
        let sealed = |app: &TestApp| {
            app.query(&format!(
            "SELECT name, sealed_value FROM connector_credentials WHERE connector_id = '{id}' ORDER BY name"
        ))
        };
        let before = sealed(&app);

        // Test it (fails: closed port) so the status is `error`.
        let r = app
            .req(Method::POST, &format!("{path}/test"), Some(t), None)
            .await;
        assert_eq!(r.body["ok"], json!(false));

        // Name, environment and settings are replaced; without credentials the stored set stays.
        app.clock.advance_secs(5);
        let r = app
            .put(
                &path,
                t,
                json!({"name": "renamed", "type": "aws", "environment": "development",
                   "settings": {"region": "eu-central-1", "endpoint_url": endpoint}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["name"], json!("renamed"));
        assert_eq!(r.body["environment"], json!("development"));
        assert_eq!(
            r.body["settings"],
            json!({"region": "eu-central-1", "regions": ["eu-central-1"], "endpoint_url": endpoint})
        );
        assert_eq!(
            r.body["credential_keys"],
            json!(["aws_access_key_id", "aws_secret_access_key"])
        );
        assert_eq!(
            r.body["status"],
            json!("untested"),
            "new settings were not tested"
        );
        assert_ne!(r.body["updated_at"], c["updated_at"]);
        assert_eq!(r.body["created_at"], c["created_at"]);
        assert_eq!(sealed(&app), before, "credentials untouched");

        // An absent environment means production; absent settings the defaults.
        let r = app.put(&path, t, json!({"name": "renamed"})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["environment"], json!("production"));
        assert_eq!(
            r.body["settings"],
            json!({"region": "us-east-1", "regions": ["us-east-1"]})
        );

        // Credentials, when present, replace the whole set.
        let r = app
            .put(
                &path,
                t,
                json!({"name": "renamed", "credentials": {"aws_access_key_id": "AKIAOTHER",
                "aws_secret_access_key": "other-secret-value", "aws_session_token": TOKEN}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.body["credential_keys"],
            json!([
                "aws_access_key_id",
                "aws_secret_access_key",
                "aws_session_token"
            ])
        );
        let r = app
            .put(
                &path,
                t,
                json!({"name": "renamed", "credentials":
                {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET}}),
            )
            .await;
        assert_eq!(
            r.body["credential_keys"],
            json!(["aws_access_key_id", "aws_secret_access_key"])
        );
        let after = sealed(&app);
        assert_eq!(after.len(), 2);
        assert_ne!(after, before, "re-sealed with fresh nonces");

        // Refusals: type change, invalid credentials, duplicate name, unknown field, missing name.
        let other = create(&app, aws_body("other", &endpoint)).await;
        let r = app
            .put(&path, t, json!({"name": "renamed", "type": "gcp"}))
            .await;
        r.assert_problem(422);
        assert_eq!(r.body["errors"][0]["field"], json!("type"));
        let r = app
            .put(
                &path,
                t,
                json!({"name": "renamed", "credentials": {"aws_access_key_id": "A"}}),
            )
            .await;
        r.assert_problem(422);
        let r = app.put(&path, t, json!({"name": "other"})).await;
        assert_eq!(r.assert_problem(409), "duplicate");
        let r = app
            .put(&path, t, json!({"name": "renamed", "nmae": "x"}))
            .await;
        r.assert_problem(422);
        let r = app.put(&path, t, json!({"environment": "staging"})).await;
        r.assert_problem(422);
        assert_eq!(
            app.get(&path, t).await.body["name"],
            json!("renamed"),
            "refused requests changed nothing"
        );
        assert_ne!(other["id"], json!(id));

        // Unknown and malformed ids.
        app.put(
            "/connectors/conn_01jzzzzzzzzzzzzzzzzzzzzzzz",
            t,
            json!({"name": "n"}),
        )
        .await
        .assert_problem(404);
        app.put("/connectors/nope", t, json!({"name": "n"}))
            .await
            .assert_problem(404);
        app.get("/connectors/nope", t).await.assert_problem(404);
        app.delete("/connectors/conn_01jzzzzzzzzzzzzzzzzzzzzzzz", t)
            .await
            .assert_problem(404);

        let updates = app.audit_of("connector.updated").await;
        assert_eq!(updates.len(), 4, "{updates:?}");
        assert_eq!(
            updates.last().unwrap()["payload"]["changed"],
            json!(["name", "environment", "settings"])
        );
        assert_no_secret(
            &[audit_text(&app).await],
            &[KEY_ID, SECRET, TOKEN, "other-secret-value", "AKIAOTHER"],
        );
    }
);

both!(
    a_failed_test_is_recorded_without_secrets,
    |app: TestApp| async move {
        let endpoint = closed_endpoint();
        let c = create(&app, aws_body("unreachable", &endpoint)).await;
        let id = c["id"].as_str().unwrap();
        let (_, operator) = app.user("operator").await;
        let r = app
            .req(
                Method::POST,
                &format!("/connectors/{id}/test"),
                Some(&operator),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["ok"], json!(false));
        let error = r.body["error"].as_str().unwrap();
        assert!(error.contains("cannot reach STS"), "{error}");
        assert!(r.body.get("identity").is_none());
        let after = app.get(&format!("/connectors/{id}"), &operator).await.body;
        assert_eq!(after["status"], json!("error"));
        assert_eq!(after["last_test_error"], json!(error));
        assert!(after["last_tested_at"].is_string());
        let tested = app.audit_of("connector.tested").await;
        assert_eq!(tested.len(), 1);
        assert_eq!(tested[0]["payload"]["ok"], json!(false));
        assert_eq!(tested[0]["resource_id"], json!(id));
        assert_no_secret(&[r.text, audit_text(&app).await], &[KEY_ID, SECRET]);
        app.req(
            Method::POST,
            "/connectors/conn_01jzzzzzzzzzzzzzzzzzzzzzzz/test",
            Some(&operator),
            None,
        )
        .await
        .assert_problem(404);
    }
);

both!(
    delete_removes_the_connector_and_its_assets,
    |app: TestApp| async move {
        let endpoint = closed_endpoint();
        let c = create(&app, aws_body("doomed", &endpoint)).await;
        let keep = create(&app, aws_body("kept", &endpoint)).await;
        let id = c["id"].as_str().unwrap().to_owned();
        let now = app.clock.now().millis();
        // Assets as a discovery would have stored them.
        for (conn, asset, ext) in [
            (
                id.as_str(),
                "ast_01jddddddddddddddddddddddd",
                "arn:aws:iam::1:user/a",
            ),
            (
                id.as_str(),
                "ast_01jeeeeeeeeeeeeeeeeeeeeeee",
                "arn:aws:iam::1:user/b",
            ),
            (
                keep["id"].as_str().unwrap(),
                "ast_01jkkkkkkkkkkkkkkkkkkkkkkk",
                "arn:aws:iam::1:user/c",
            ),
        ] {
            app.sql(&format!(
            "INSERT INTO assets (id, connector_id, type, external_id, name, region, environment, \
             attributes, first_seen_at, last_seen_at, removed_at) VALUES ('{asset}', '{conn}', \
             'iam_user', '{ext}', 'n', NULL, 'staging', '{{}}', {now}, {now}, NULL)"
        ));
        }
        let r = app
            .get(&format!("/assets?connector_id={id}"), &app.admin_token)
            .await;
        assert_eq!(r.body.as_array().unwrap().len(), 2, "{}", r.text);

        let r = app
            .delete(&format!("/connectors/{id}"), &app.admin_token)
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert!(r.text.is_empty());
        app.get(&format!("/connectors/{id}"), &app.admin_token)
            .await
            .assert_problem(404);
        app.get("/assets/ast_01jddddddddddddddddddddddd", &app.admin_token)
            .await
            .assert_problem(404);
        let r = app
            .get(
                &format!("/assets?connector_id={id}&include_removed=true"),
                &app.admin_token,
            )
            .await;
        assert_eq!(r.body, json!([]));
        // The other connector's assets stay.
        assert_eq!(
            app.get("/assets/ast_01jkkkkkkkkkkkkkkkkkkkkkkk", &app.admin_token)
                .await
                .status,
            200
        );
        assert!(app
            .query(&format!(
                "SELECT name FROM connector_credentials WHERE connector_id = '{id}'"
            ))
            .is_empty());
        let deleted = app.audit_of("connector.deleted").await;
        assert_eq!(deleted.len(), 1);
        assert_eq!(deleted[0]["payload"]["assets_deleted"], json!(2));
        assert_eq!(deleted[0]["payload"]["name"], json!("doomed"));
        // Deleting again: 404.
        app.delete(&format!("/connectors/{id}"), &app.admin_token)
            .await
            .assert_problem(404);
        // The name is free again.
        create(&app, aws_body("doomed", &endpoint)).await;
    }
);

both!(connector_list_pages_by_keyset, |app: TestApp| async move {
    let endpoint = closed_endpoint();
    for i in 0..5 {
        create(&app, aws_body(&format!("c{i}"), &endpoint)).await;
        // Ids sort by creation time (to the millisecond).
        app.clock.advance_millis(2);
    }
    let mut names = Vec::new();
    let mut path = "/connectors?limit=2".to_owned();
    loop {
        let r = app.get(&path, &app.admin_token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        names.extend(
            r.body
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_owned()),
        );
        match r.header("x-next-cursor") {
            Some(c) => {
                assert!(r.header("link").unwrap().contains("rel=\"next\""));
                path = format!("/connectors?limit=2&cursor={c}");
            }
            None => break,
        }
    }
    assert_eq!(names, ["c4", "c3", "c2", "c1", "c0"]);
    app.get("/connectors?limit=501", &app.admin_token)
        .await
        .assert_problem(422);
    app.get("/connectors?cursor=zz", &app.admin_token)
        .await
        .assert_problem(400);
});

both!(
    rotating_the_master_key_reseals_every_credential,
    |mut app: TestApp| async move {
        let endpoint = closed_endpoint();
        let a = create(&app, aws_body("a", &endpoint)).await;
        create(&app, aws_body("b", &endpoint)).await;
        let a_id = a["id"].as_str().unwrap().to_owned();
        let key_ids = |app: &TestApp| -> Vec<String> {
            let mut ids: Vec<String> = app
                .query("SELECT sealed_value FROM connector_credentials")
                .iter()
                .map(|v| v.split('.').nth(1).unwrap().to_owned())
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        let old = key_ids(&app);
        assert_eq!(old.len(), 1);
        // An agent's secret is sealed under the master key too.
        let agent = crate::agents::new_agent(&app).await;

        let cfg = app.config();
        let clock = app.clock.clone();
        let rotation = tokio::task::spawn_blocking(move || {
            nexplane::rotate_master_key(&cfg, clock, None).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(rotation.resealed, 4);
        assert_eq!(rotation.previous_key_id, old[0]);
        assert_eq!(key_ids(&app), vec![rotation.new_key_id.clone()]);
        let kept = rotation.previous_key_file.clone().unwrap();
        assert!(kept.exists());
        let audit = app.audit_of("keys.master_rotated").await;
        assert_eq!(audit[0]["payload"]["credentials_resealed"], json!(4));
        assert_eq!(audit[0]["payload"]["agent_values_resealed"], json!(1));
        let agent_key = app.query("SELECT sealed_secret FROM agents");
        assert_eq!(
            agent_key[0].split('.').nth(1),
            Some(rotation.new_key_id.as_str())
        );

        // A restarted server opens the re-sealed credentials with the new key: the test reaches
        // the provider (and fails only because nobody listens there).
        app.restart().await;
        let r = test_connector(&app, &a_id).await;
        assert!(
            r.body["error"]
                .as_str()
                .unwrap()
                .contains("cannot reach STS"),
            "{}",
            r.text
        );
        // The operator removes the old key file: nothing needs it any more.
        std::fs::remove_file(&kept).unwrap();
        app.restart().await;
        let r = test_connector(&app, &a_id).await;
        assert!(
            r.body["error"]
                .as_str()
                .unwrap()
                .contains("cannot reach STS"),
            "{}",
            r.text
        );
        assert_no_secret(&[r.text, audit_text(&app).await], &[KEY_ID, SECRET]);
        // The agent still signs its requests with the secret it was given.
        let r = agent
            .send(
                &app,
                "POST",
                "/agent/heartbeat",
                json!({"version": "0.1.0"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
);
