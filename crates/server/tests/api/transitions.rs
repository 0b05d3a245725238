//! The transition table of api.md §6.1 for execute and rollback, over HTTP and against the AWS
//! emulator: the states that allow them (and the 409 `invalid_transition` everywhere else,
//! naming the state and the action), who may run them, repeated requests while the job runs,
//! and the configurable number of approvals.
//!
//! `failed` with an applied step and `rollback_failed` need the provider to refuse a step; the
//! `execution` tests cover them (`a_refused_step_fails_and_rollback_undoes_the_applied_part`,
//! `a_failed_rollback_is_retried_without_repeating_undone_steps`).

use crate::both;
use crate::execution::{approved_id, emulated_connector, execute_ok, roll_back_ok, run, trail};
use crate::harness::*;
use nexplane_testing::moto::{self, Seeder};
use rusoto_ec2::Ec2;
use rusoto_iam::Iam;
use serde_json::{json, Value};

async fn act(app: &TestApp, token: &str, id: &str, action: &str, body: Value) -> Resp {
    app.post(&format!("/change-requests/{id}/{action}"), token, body)
        .await
}

async fn state_of(app: &TestApp, id: &str) -> Value {
    app.get(&format!("/change-requests/{id}"), &app.admin_token)
        .await
        .body["state"]
        .clone()
}

/// Asserts that `action` (`execute` or `rollback`) on `id`, in `state`, is a 409
/// `invalid_transition` whose detail names the state and the action, and changed nothing.
async fn assert_invalid(app: &TestApp, token: &str, id: &str, action: &str, state: &str) {
    let events = trail(app, id).await;
    let r = act(app, token, id, action, json!({})).await;
    assert_eq!(
        r.assert_problem(409),
        "invalid_transition",
        "{action} from {state}"
    );
    let detail = r.body["detail"].as_str().unwrap_or_default();
    let words: Vec<&str> = detail
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    assert!(
        words.contains(&state) && words.contains(&action),
        "{action} from {state}: {detail}"
    );
    assert_eq!(state_of(app, id).await, json!(state));
    assert_eq!(
        trail(app, id).await,
        events,
        "a refused {action} is not audited"
    );
}

/// Asserts that a viewer and an approver may not `action` `id`, which stays in `state`.
async fn assert_role_refused(app: &TestApp, id: &str, action: &str, state: &str) {
    for role in ["viewer", "approver"] {
        let (_, token) = app.user(role).await;
        let r = act(app, &token, id, action, json!({})).await;
        assert_eq!(r.assert_problem(403), "forbidden", "{role} {action}");
    }
    assert_eq!(state_of(app, id).await, json!(state));
}

/// A new draft change request of `requester`: deactivate `key` of `user`.
async fn draft(app: &TestApp, requester: &str, cid: &str, user: &str, key: &str) -> String {
    let r = app
        .post(
            "/change-requests",
            requester,
            json!({"title": "deactivate", "connector_id": cid,
                   "change_type": "deactivate_iam_access_key",
                   "target": {"iam_user": user, "access_key_id": key}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

both!(
    execute_and_rollback_follow_the_transition_table,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("svc").await;
        let (key, _) = seed.access_key("svc").await;
        let cid = emulated_connector(&app, &url).await;
        let (_, op) = app.user("operator").await;
        let (_, approver) = app.user("approver").await;

        let draft_id = draft(&app, &op, &cid, "svc", &key).await;
        let submitted = draft(&app, &op, &cid, "svc", &key).await;
        assert_eq!(
            act(&app, &op, &submitted, "submit", json!({})).await.status,
            200
        );
        let rejected = draft(&app, &op, &cid, "svc", &key).await;
        assert_eq!(
            act(&app, &op, &rejected, "submit", json!({})).await.status,
            200
        );
        let r = act(
            &app,
            &approver,
            &rejected,
            "reject",
            json!({"reason": "no"}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let cancelled = draft(&app, &op, &cid, "svc", &key).await;
        assert_eq!(
            act(&app, &op, &cancelled, "cancel", json!({})).await.status,
            200
        );
        let (failed, failed_op) = approved_id(
            &app,
            &cid,
            "stop_ec2_instance",
            json!({"instance_id": "i-0123456789abcdef0"}),
        )
        .await;
        let done = run(&app, &failed_op, &failed, "execute").await;
        assert_eq!(done["state"], json!("failed"), "{done}");

        for (id, state) in [
            (&draft_id, "draft"),
            (&submitted, "submitted"),
            (&rejected, "rejected"),
            (&cancelled, "cancelled"),
            (&failed, "failed"),
        ] {
            for action in ["execute", "rollback"] {
                // Even an admin cannot.
                assert_invalid(&app, &app.admin_token, id, action, state).await;
                assert_invalid(&app, &op, id, action, state).await;
            }
        }

        // approved: nothing to roll back yet; viewers and approvers may not execute; any
        // operator may, not only the requester.
        let (approved, requester) = approved_id(
            &app,
            &cid,
            "deactivate_iam_access_key",
            json!({"iam_user": "svc", "access_key_id": key}),
        )
        .await;
        assert_invalid(&app, &requester, &approved, "rollback", "approved").await;
        assert_role_refused(&app, &approved, "execute", "approved").await;
        assert_eq!(seed.keys("svc").await, [(key.clone(), "Active".to_owned())]);
        let (executor, executor_token) = app.user("operator").await;
        execute_ok(&app, &executor_token, &approved, &["deactivate_access_key"]).await;
        assert_eq!(
            seed.keys("svc").await,
            [(key.clone(), "Inactive".to_owned())]
        );
        let started = app.audit_of("change_request.execution_started").await;
        let started: Vec<&Value> = started
            .iter()
            .filter(|e| e["change_request_id"] == json!(approved))
            .collect();
        assert_eq!(started.len(), 1);
        assert_eq!(started[0]["actor"], executor["email"]);

        // complete: no second execution; viewers and approvers may not roll back; another
        // operator may.
        assert_invalid(&app, &requester, &approved, "execute", "complete").await;
        assert_role_refused(&app, &approved, "rollback", "complete").await;
        assert_eq!(
            seed.keys("svc").await,
            [(key.clone(), "Inactive".to_owned())]
        );
        let (_, other) = app.user("operator").await;
        roll_back_ok(&app, &other, &approved, &["reactivate_access_key"]).await;
        assert_eq!(seed.keys("svc").await, [(key.clone(), "Active".to_owned())]);

        // rolledback is final.
        for action in ["execute", "rollback"] {
            assert_invalid(&app, &app.admin_token, &approved, action, "rolledback").await;
        }
        assert_role_refused(&app, &approved, "execute", "rolledback").await;
        assert_eq!(seed.keys("svc").await, [(key.clone(), "Active".to_owned())]);
    }
);

/// Waits until the paused worker has written its marker (`NEXPLANE_TEST_PAUSE_AT`).
async fn wait_paused(app: &TestApp, point: &str) {
    let marker = app.data_dir.path().join("paused-at");
    for _ in 0..300 {
        if std::fs::read_to_string(&marker).is_ok_and(|p| p == point) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the worker never paused at {point}");
}

fn jobs_of(app: &TestApp, id: &str) -> Vec<String> {
    app.query(&format!(
        "SELECT kind FROM jobs WHERE resource_id = '{id}' ORDER BY created_at"
    ))
}

both!(
    execute_repeated_while_executing_returns_the_same_job,
    vec![(
        "NEXPLANE_TEST_PAUSE_AT",
        "execution:deactivate_access_key:started".into()
    )],
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("svc").await;
        let (key, _) = seed.access_key("svc").await;
        let cid = emulated_connector(&app, &url).await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "deactivate_iam_access_key",
            json!({"iam_user": "svc", "access_key_id": key}),
        )
        .await;
        let first = act(&app, &op, &id, "execute", json!({})).await;
        assert_eq!(first.status, 202, "{}", first.text);
        wait_paused(&app, "execution:deactivate_access_key:started").await;
        assert_eq!(state_of(&app, &id).await, json!("executing"));

        let (_, other) = app.user("operator").await;
        let again = act(&app, &other, &id, "execute", json!({})).await;
        assert_eq!(again.status, 202, "{}", again.text);
        assert_eq!(again.body["id"], first.body["id"]);
        assert_eq!(again.header("location"), first.header("location"));
        assert_eq!(again.body["status"], json!("running"), "{}", again.text);
        assert_invalid(&app, &op, &id, "rollback", "executing").await;
        assert_role_refused(&app, &id, "execute", "executing").await;
        assert_eq!(jobs_of(&app, &id), ["execution"]);
        assert_eq!(
            app.audit_of("change_request.execution_started").await.len(),
            1
        );
        assert_eq!(seed.keys("svc").await, [(key.clone(), "Active".to_owned())]);
    }
);

both!(
    rollback_repeated_while_rolling_back_returns_the_same_job,
    vec![(
        "NEXPLANE_TEST_PAUSE_AT",
        "rollback:reactivate_access_key:started".into()
    )],
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("svc").await;
        let (key, _) = seed.access_key("svc").await;
        let cid = emulated_connector(&app, &url).await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "deactivate_iam_access_key",
            json!({"iam_user": "svc", "access_key_id": key}),
        )
        .await;
        execute_ok(&app, &op, &id, &["deactivate_access_key"]).await;
        let first = act(&app, &op, &id, "rollback", json!({})).await;
        assert_eq!(first.status, 202, "{}", first.text);
        assert_eq!(first.body["kind"], json!("rollback"));
        wait_paused(&app, "rollback:reactivate_access_key:started").await;
        assert_eq!(state_of(&app, &id).await, json!("rolling_back"));

        let again = act(&app, &app.admin_token, &id, "rollback", json!({})).await;
        assert_eq!(again.status, 202, "{}", again.text);
        assert_eq!(again.body["id"], first.body["id"]);
        assert_invalid(&app, &op, &id, "execute", "rolling_back").await;
        assert_role_refused(&app, &id, "rollback", "rolling_back").await;
        assert_eq!(jobs_of(&app, &id), ["execution", "rollback"]);
        assert_eq!(
            app.audit_of("change_request.rollback_started").await.len(),
            1
        );
        assert_eq!(
            seed.keys("svc").await,
            [(key.clone(), "Inactive".to_owned())]
        );
    }
);

both!(
    high_risk_needs_the_configured_number_of_approvals,
    vec![("NEXPLANE_REQUIRED_APPROVALS_HIGH", "3".into())],
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let group = seed
            .security_group("us-east-1", "web-sg", 22, "10.0.0.0/8")
            .await;
        let instance = seed.instance("us-east-1", "web", &group).await;
        let cid = emulated_connector(&app, &url).await;
        let (_, op) = app.user("operator").await;

        // stop_ec2_instance: base 7, +1 for staging = 8, high.
        let r = app
            .post(
                "/change-requests",
                &op,
                json!({"title": "stop web", "connector_id": cid,
                       "change_type": "stop_ec2_instance", "target": {"instance_id": instance}}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["risk"]["score"], json!(8));
        assert_eq!(r.body["risk"]["level"], json!("high"));
        let id = r.body["id"].as_str().unwrap().to_owned();
        let r = act(&app, &op, &id, "submit", json!({})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["required_approvals"], json!(3));
        for n in 1..=3 {
            if n == 3 {
                assert_invalid(&app, &op, &id, "execute", "submitted").await;
            }
            let (_, approver) = app.user("approver").await;
            let r = act(&app, &approver, &id, "approve", json!({})).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let expected = if n < 3 { "submitted" } else { "approved" };
            assert_eq!(r.body["state"], json!(expected), "after {n} approvals");
            assert_eq!(r.body["approvals"].as_array().unwrap().len(), n);
        }
        execute_ok(&app, &op, &id, &["stop_instance"]).await;
        let state = seed
            .ec2("us-east-1")
            .describe_instances(rusoto_ec2::DescribeInstancesRequest {
                instance_ids: Some(vec![instance.clone()]),
                ..Default::default()
            })
            .await
            .unwrap()
            .reservations
            .unwrap()[0]
            .instances
            .as_ref()
            .unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .name
            .clone();
        assert_eq!(state.as_deref(), Some("stopped"));

        // Medium risk keeps its default of one approval.
        seed.user("svc").await;
        let (key, _) = seed.access_key("svc").await;
        let medium = draft(&app, &op, &cid, "svc", &key).await;
        let r = act(&app, &op, &medium, "submit", json!({})).await;
        assert_eq!(r.body["risk"]["level"], json!("medium"), "{}", r.text);
        assert_eq!(r.body["required_approvals"], json!(1));
    }
);

both!(
    execute_racing_cancel_lets_exactly_one_win,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("svc").await;
        let cid = emulated_connector(&app, &url).await;
        for _ in 0..3 {
            let (key, _) = seed.access_key("svc").await;
            let (id, op) = approved_id(
                &app,
                &cid,
                "deactivate_iam_access_key",
                json!({"iam_user": "svc", "access_key_id": key}),
            )
            .await;
            let (exec, cancel) = tokio::join!(
                act(&app, &op, &id, "execute", json!({})),
                act(&app, &op, &id, "cancel", json!({}))
            );
            let statuses = (exec.status.as_u16(), cancel.status.as_u16());
            let events = trail(&app, &id).await;
            if statuses == (202, 409) {
                assert_eq!(cancel.body["code"], json!("invalid_transition"));
                app.wait_job(exec.body["id"].as_str().unwrap(), 60).await;
                assert_eq!(state_of(&app, &id).await, json!("complete"));
                assert!(!events.iter().any(|e| e == "change_request.cancelled"));
                assert_eq!(
                    seed.keys("svc")
                        .await
                        .iter()
                        .find(|k| k.0 == key)
                        .unwrap()
                        .1,
                    "Inactive"
                );
            } else {
                assert_eq!(statuses, (409, 200), "{} {}", exec.text, cancel.text);
                assert_eq!(exec.body["code"], json!("invalid_transition"));
                assert_eq!(state_of(&app, &id).await, json!("cancelled"));
                assert!(!events
                    .iter()
                    .any(|e| e == "change_request.execution_started"));
                assert!(jobs_of(&app, &id).is_empty());
                assert_eq!(
                    seed.keys("svc")
                        .await
                        .iter()
                        .find(|k| k.0 == key)
                        .unwrap()
                        .1,
                    "Active"
                );
            }
            // Free the key slot for the next round.
            seed.iam()
                .delete_access_key(rusoto_iam::DeleteAccessKeyRequest {
                    access_key_id: key.clone(),
                    user_name: Some("svc".into()),
                })
                .await
                .unwrap();
        }
    }
);
