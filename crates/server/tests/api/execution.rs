//! Executing and rolling back change requests against the AWS emulator (api.md §6, §6.2):
//! the provider's state is checked with an independent client after each run.

use crate::both;
use crate::connectors::{assert_no_secret, audit_text, create};
use crate::harness::*;
use crate::moto::{self, Seeder};
use rusoto_iam::Iam;
use serde_json::{json, Value};

const KEY: &str = "AKIANEXPLANEEXEC0001";
const SECRET: &str = "execution-test-secret/Value+0123456789";

fn rand_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An `aws` connector on the emulator (staging: +1 risk).
pub async fn emulated_connector(app: &TestApp, url: &str) -> String {
    let c = create(
        app,
        json!({
            "name": format!("emulated-{}", rand_name()),
            "type": "aws",
            "environment": "staging",
            "settings": moto::settings(url, &["us-east-1"]),
            "credentials": {"aws_access_key_id": KEY, "aws_secret_access_key": SECRET}
        }),
    )
    .await;
    c["id"].as_str().unwrap().to_owned()
}

/// Creates, submits and approves (by as many approvers as needed) a change request; returns
/// it `approved`, with the requester's token.
pub async fn approved(
    app: &TestApp,
    connector_id: &str,
    change_type: &str,
    target: Value,
) -> (Value, String) {
    let (_, op) = app.user("operator").await;
    let r = app
        .post(
            "/change-requests",
            &op,
            json!({"title": format!("{change_type} test"), "connector_id": connector_id,
                   "change_type": change_type, "target": target}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(&format!("/change-requests/{id}/submit"), &op, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let needed = r.body["required_approvals"].as_u64().unwrap();
    let mut last = r.body;
    for _ in 0..needed {
        let (_, approver) = app.user("approver").await;
        let r = app
            .post(
                &format!("/change-requests/{id}/approve"),
                &approver,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        last = r.body;
    }
    assert_eq!(last["state"], json!("approved"), "{last}");
    (last, op)
}

/// Runs execute or rollback and waits for the job; returns the change request afterwards.
pub async fn run(app: &TestApp, token: &str, id: &str, action: &str) -> Value {
    let r = app
        .post(&format!("/change-requests/{id}/{action}"), token, json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(
        r.header("location"),
        Some(format!("/jobs/{}", r.body["id"].as_str().unwrap()).as_str())
    );
    let kind = if action == "execute" {
        "execution"
    } else {
        "rollback"
    };
    assert_eq!(r.body["kind"], json!(kind));
    app.wait_job(r.body["id"].as_str().unwrap(), 120).await;
    app.get(&format!("/change-requests/{id}"), token).await.body
}

async fn keys(seed: &Seeder, user: &str) -> Vec<(String, String)> {
    let r = seed
        .iam()
        .list_access_keys(rusoto_iam::ListAccessKeysRequest {
            user_name: Some(user.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out: Vec<(String, String)> = r
        .access_key_metadata
        .into_iter()
        .map(|k| (k.access_key_id.unwrap(), k.status.unwrap()))
        .collect();
    out.sort();
    out
}

both!(
    rotate_execute_reveal_and_roll_back,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("prod-deploy").await;
        let (old_key, _) = seed.access_key("prod-deploy").await;
        let cid = emulated_connector(&app, &url).await;
        let (cr, op) = approved(
            &app,
            &cid,
            "rotate_iam_access_key",
            json!({"iam_user": "prod-deploy"}),
        )
        .await;
        let id = cr["id"].as_str().unwrap().to_owned();

        let done = run(&app, &op, &id, "execute").await;
        assert_eq!(done["state"], json!("complete"), "{done}");
        let exec = &done["execution"];
        let steps: Vec<(&str, &str)> = exec["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            steps,
            [
                ("create_access_key", "succeeded"),
                ("deactivate_old_access_key", "succeeded")
            ]
        );
        let new_key = exec["outputs"]["new_access_key_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(exec["outputs"]["old_access_key_id"], json!(old_key));
        assert_eq!(done["secret_outputs"], json!(["new_secret_access_key"]));
        let mut expected = vec![
            (old_key.clone(), "Inactive".to_owned()),
            (new_key.clone(), "Active".to_owned()),
        ];
        expected.sort();
        assert_eq!(keys(&seed, "prod-deploy").await, expected);

        // Execute again: the state does not allow it.
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        assert_eq!(r.assert_problem(409), "invalid_transition");

        // Reveal: only the requester or an admin, once.
        let (_, other) = app.user("operator").await;
        let r = app
            .post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &other,
                json!({}),
            )
            .await;
        r.assert_problem(403);
        let r = app
            .post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &op,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let secret = r.body["new_secret_access_key"].as_str().unwrap().to_owned();
        assert!(secret.len() >= 20, "{}", r.text);
        let r = app
            .post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &op,
                json!({}),
            )
            .await;
        assert_eq!(r.assert_problem(410), "gone");
        let r = app
            .post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &app.admin_token,
                json!({}),
            )
            .await;
        r.assert_problem(410);

        let back = run(&app, &op, &id, "rollback").await;
        assert_eq!(back["state"], json!("rolledback"), "{back}");
        let names: Vec<&str> = back["rollback"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["reactivate_old_access_key", "delete_new_access_key"]
        );
        assert_eq!(
            keys(&seed, "prod-deploy").await,
            vec![(old_key.clone(), "Active".to_owned())]
        );

        // The whole story, in order, in the audit log.
        let r = app
            .get(
                &format!("/audit?change_request_id={id}&limit=500"),
                &app.admin_token,
            )
            .await;
        let mut types: Vec<&str> = r
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        types.reverse();
        assert_eq!(
            types,
            [
                "change_request.created",
                "change_request.submitted",
                "change_request.approved",
                "change_request.execution_started",
                "change_request.completed",
                "change_request.secrets_revealed",
                "change_request.rollback_started",
                "change_request.rolledback"
            ]
        );
        // The secret is nowhere but in the one reveal response.
        let everything = format!(
            "{} {} {}",
            app.get(&format!("/change-requests/{id}"), &op).await.text,
            audit_text(&app).await,
            app.get(
                &format!("/jobs/{}", back["execution"]["job_id"].as_str().unwrap()),
                &op
            )
            .await
            .text,
        );
        let db = app
            .query("SELECT body FROM change_request_journals")
            .join("\n");
        assert_no_secret(&[everything, db], &[&secret, SECRET]);
    }
);
