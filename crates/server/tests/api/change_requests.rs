//! Change requests (api.md §6) up to the decision: the catalog, create and edit with
//! validation and risk, submit, approve (separation of duties, counting), reject, cancel,
//! invalid transitions, roles, the audit trail, list filters and paging, and the connector
//! DELETE rule of §4.

use crate::both;
use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};

const KEY_ID: &str = "AKIANEXPLANECREQ0001";
const SECRET: &str = "cr-test-secret/Value+0123456789abcdef";

/// Creates an aws connector in `environment` as the admin; returns its id.
async fn connector(app: &TestApp, name: &str, environment: &str) -> String {
    let r = app
        .post(
            "/connectors",
            &app.admin_token,
            json!({"name": name, "type": "aws", "environment": environment,
                "credentials": {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

fn rotate_body(connector_id: &str) -> Value {
    json!({
        "title": "Rotate prod-deploy IAM key",
        "connector_id": connector_id,
        "change_type": "rotate_iam_access_key",
        "target": {"iam_user": "prod-deploy"},
        "description": "Quarterly credential rotation"
    })
}

fn stop_body(connector_id: &str) -> Value {
    json!({
        "title": "Stop the old batch host",
        "connector_id": connector_id,
        "change_type": "stop_ec2_instance",
        "target": {"instance_id": "i-0123456789abcdef0"}
    })
}

/// Creates a change request as `token`; returns it. The test clock moves on by a millisecond
/// first, so ids (time-sortable) follow the order of creation.
async fn create(app: &TestApp, token: &str, body: Value) -> Value {
    app.clock.advance_millis(1);
    let r = app.post("/change-requests", token, body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

async fn act(app: &TestApp, token: &str, id: &str, action: &str, body: Option<Value>) -> Resp {
    app.req(
        Method::POST,
        &format!("/change-requests/{id}/{action}"),
        Some(token),
        body,
    )
    .await
}

#[track_caller]
fn fields(r: &Resp) -> Vec<String> {
    r.body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no field errors: {}", r.text))
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

/// The audit events of a change request, oldest first.
async fn trail(app: &TestApp, id: &str) -> Vec<Value> {
    let r = app
        .get(
            &format!("/audit?change_request_id={id}&limit=500"),
            &app.admin_token,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut events = r.body.as_array().unwrap().clone();
    events.reverse();
    for e in &events {
        assert_eq!(e["change_request_id"], json!(id));
        assert_eq!(e["resource_type"], json!("change_request"));
        assert_eq!(e["resource_id"], json!(id));
    }
    events
}

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect()
}

both!(
    change_types_are_listed_for_every_role,
    |app: TestApp| async move {
        let (_, viewer) = app.user("viewer").await;
        let r = app.get("/change-types", &viewer).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let list = r.body.as_array().unwrap();
        assert_eq!(list.len(), 13);
        let rotate = list
            .iter()
            .find(|t| t["name"] == "rotate_iam_access_key")
            .unwrap();
        assert_eq!(rotate["connector_type"], "aws");
        assert_eq!(rotate["base_risk"], 5);
        assert_eq!(rotate["rollback"], "automatic");
        assert_eq!(rotate["target_schema"]["required"], json!(["iam_user"]));
        assert!(rotate["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
        let delete = list
            .iter()
            .find(|t| t["name"] == "delete_iam_access_key")
            .unwrap();
        assert_eq!(delete["rollback"], "none");
        assert!(list.iter().any(|t| t["connector_type"] == "agent"));
        let r = app.req(Method::GET, "/change-types", None, None).await;
        r.assert_problem(401);
    }
);

both!(create_validate_edit_and_read, |app: TestApp| async move {
    let prod = connector(&app, "prod", "production").await;
    let staging = connector(&app, "staging", "staging").await;
    let (op_user, op) = app.user("operator").await;

    let r = app.post("/change-requests", &op, rotate_body(&prod)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let cr = r.body.clone();
    let id = cr["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cr_"), "{id}");
    assert_eq!(
        r.header("location"),
        Some(format!("/change-requests/{id}").as_str())
    );
    assert_eq!(cr["state"], "draft");
    assert_eq!(cr["title"], "Rotate prod-deploy IAM key");
    assert_eq!(cr["description"], "Quarterly credential rotation");
    assert_eq!(cr["connector_id"], json!(prod));
    assert_eq!(cr["change_type"], "rotate_iam_access_key");
    assert_eq!(cr["target"], json!({"iam_user": "prod-deploy"}));
    // 5 + 2 for production = 7: high, two approvals.
    assert_eq!(cr["risk"]["score"], 7);
    assert_eq!(cr["risk"]["level"], "high");
    assert!(!cr["risk"]["factors"].as_array().unwrap().is_empty());
    assert_eq!(cr["required_approvals"], 2);
    assert_eq!(cr["approvals"], json!([]));
    assert_eq!(cr["rejection"], Value::Null);
    assert_eq!(cr["requested_by"], op_user["id"]);
    for k in [
        "submitted_at",
        "decided_at",
        "executed_at",
        "finished_at",
        "execution",
        "rollback",
    ] {
        assert_eq!(cr[k], Value::Null, "{k}");
    }
    assert_eq!(cr["secret_outputs"], json!([]));
    assert!(cr["created_at"].as_str().unwrap().ends_with('Z'));

    let (_, viewer) = app.user("viewer").await;
    let r = app.get(&format!("/change-requests/{id}"), &viewer).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, cr);

    // The staging connector scores one less: medium, one approval.
    let s = create(&app, &op, rotate_body(&staging)).await;
    assert_eq!(
        (s["risk"]["score"].clone(), s["risk"]["level"].clone()),
        (json!(6), json!("medium"))
    );
    assert_eq!(s["required_approvals"], 1);

    // Schema errors name the field paths.
    let mut bad = rotate_body(&prod);
    bad["target"] = json!({"iam_usr": "prod-deploy"});
    let r = app.post("/change-requests", &op, bad).await;
    assert_eq!(r.assert_problem(422), "validation_failed");
    assert_eq!(fields(&r), ["target.iam_user", "target.iam_usr"]);
    let mut bad = rotate_body(&prod);
    bad["target"] = json!({"iam_user": "has space"});
    bad["title"] = json!("  ");
    let r = app.post("/change-requests", &op, bad).await;
    r.assert_problem(422);
    assert_eq!(fields(&r), ["title", "target.iam_user"]);
    // Unknown change type, unknown or malformed connector, connector on an agent type.
    let mut bad = rotate_body(&prod);
    bad["change_type"] = json!("format_disk");
    let r = app.post("/change-requests", &op, bad).await;
    r.assert_problem(422);
    assert_eq!(fields(&r), ["change_type"]);
    let unknown = "conn_01jef8z7q3m4n5p6r7s8t9v0wx";
    let r = app
        .post("/change-requests", &op, rotate_body(unknown))
        .await;
    r.assert_problem(422);
    assert_eq!(fields(&r), ["connector_id"]);
    let r = app.post("/change-requests", &op, rotate_body("nope")).await;
    r.assert_problem(422);
    assert_eq!(fields(&r), ["connector_id"]);
    let mut bad = rotate_body(&prod);
    bad.as_object_mut().unwrap().remove("connector_id");
    let r = app.post("/change-requests", &op, bad).await;
    r.assert_problem(422);
    assert_eq!(fields(&r), ["connector_id"]);
    let r = app
        .post(
            "/change-requests",
            &op,
            json!({"title": "chmod", "connector_id": prod, "change_type": "agent_set_file_mode",
                "target": {"agent_id": "agt_01jef8z7q3m4n5p6r7s8t9v0wx", "path": "/etc/x", "mode": "600"}}),
        )
        .await;
    r.assert_problem(422);
    // Both problems at once: agent types take no connector, and this agent does not exist.
    assert_eq!(fields(&r), ["target.agent_id", "connector_id"]);
    // Unknown body fields.
    let mut bad = rotate_body(&prod);
    bad["targte"] = json!({});
    app.post("/change-requests", &op, bad)
        .await
        .assert_problem(422);

    // Edit: the requester (or an admin), a draft only; the risk follows the target's type.
    let r = app
        .put(
            &format!("/change-requests/{id}"),
            &op,
            json!({"title": "Rotate the deploy key", "target": {"iam_user": "deploy", "access_key_id": "AKIAIOSFODNN7EXAMPLE"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["title"], "Rotate the deploy key");
    assert_eq!(r.body["description"], "Quarterly credential rotation");
    assert_eq!(r.body["target"]["iam_user"], "deploy");
    assert_eq!(r.body["risk"]["score"], 7);
    let r = app
        .put(
            &format!("/change-requests/{id}"),
            &op,
            json!({"target": {"iam_user": ""}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(fields(&r), ["target.iam_user"]);
    app.put(
        &format!("/change-requests/{id}"),
        &op,
        json!({"titel": "x"}),
    )
    .await
    .assert_problem(422);
    let (_, other_op) = app.user("operator").await;
    app.put(
        &format!("/change-requests/{id}"),
        &other_op,
        json!({"title": "mine"}),
    )
    .await
    .assert_problem(403);
    let r = app
        .put(
            &format!("/change-requests/{id}"),
            &app.admin_token,
            json!({"description": "by the admin"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        types(&trail(&app, &id).await),
        [
            "change_request.created",
            "change_request.updated",
            "change_request.updated"
        ]
    );

    // An edit recomputes the risk with the connector's current environment.
    let r = app
        .put(
            &format!("/connectors/{prod}"),
            &app.admin_token,
            json!({"name": "prod", "environment": "development"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app
        .put(
            &format!("/change-requests/{id}"),
            &op,
            json!({"title": "Rotate the deploy key (dev)"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["environment"], "development");
    assert_eq!(r.body["risk"]["score"], 5);
    assert_eq!(r.body["risk"]["level"], "medium");
    assert_eq!(r.body["required_approvals"], 1);

    // Unknown and malformed ids are 404s.
    for bad in [
        "cr_01jef8z7q3m4n5p6r7s8t9v0wx",
        "nope",
        "usr_01jef8z7q3m4n5p6r7s8t9v0wx",
    ] {
        app.get(&format!("/change-requests/{bad}"), &viewer)
            .await
            .assert_problem(404);
        act(&app, &op, bad, "submit", None)
            .await
            .assert_problem(404);
        app.put(
            &format!("/change-requests/{bad}"),
            &op,
            json!({"title": "x"}),
        )
        .await
        .assert_problem(404);
    }

    // Once submitted, a change request is no longer editable.
    let r = act(&app, &op, &id, "submit", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app
        .put(
            &format!("/change-requests/{id}"),
            &op,
            json!({"title": "late"}),
        )
        .await;
    assert_eq!(r.assert_problem(409), "invalid_transition");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("edit") && detail.contains("submitted"),
        "{detail}"
    );
});

both!(roles_are_enforced, |app: TestApp| async move {
    let prod = connector(&app, "prod", "production").await;
    let (_, viewer) = app.user("viewer").await;
    let (_, approver) = app.user("approver").await;
    let (_, op) = app.user("operator").await;
    for token in [&viewer, &approver] {
        app.post("/change-requests", token, rotate_body(&prod))
            .await
            .assert_problem(403);
    }
    let cr = create(&app, &op, rotate_body(&prod)).await;
    let id = cr["id"].as_str().unwrap();
    for token in [&viewer, &approver] {
        act(&app, token, id, "submit", None)
            .await
            .assert_problem(403);
        act(&app, token, id, "cancel", None)
            .await
            .assert_problem(403);
        app.put(
            &format!("/change-requests/{id}"),
            token,
            json!({"title": "x"}),
        )
        .await
        .assert_problem(403);
    }
    assert_eq!(act(&app, &op, id, "submit", None).await.status, 200);
    // Operators and viewers do not decide.
    for token in [&viewer, &op] {
        act(&app, token, id, "approve", None)
            .await
            .assert_problem(403);
        act(&app, token, id, "reject", Some(json!({"reason": "no"})))
            .await
            .assert_problem(403);
    }
    // Everyone reads.
    for token in [&viewer, &approver, &op] {
        assert_eq!(
            app.get(&format!("/change-requests/{id}"), token)
                .await
                .status,
            200
        );
        assert_eq!(app.get("/change-requests", token).await.status, 200);
    }
    // Refused calls changed nothing.
    let now = app
        .get(&format!("/change-requests/{id}"), &viewer)
        .await
        .body;
    assert_eq!(now["state"], "submitted");
    assert_eq!(now["approvals"], json!([]));
    assert_eq!(
        types(&trail(&app, id).await),
        ["change_request.created", "change_request.submitted"]
    );
});

both!(
    two_distinct_approvers_for_high_risk,
    |app: TestApp| async move {
        let prod = connector(&app, "prod", "production").await;
        let (_, alice) = app.user("approver").await;
        let (bob_user, bob) = app.user("approver").await;
        // The admin requests: an admin may approve in general, but not their own change.
        let cr = create(&app, &app.admin_token, stop_body(&prod)).await;
        let id = cr["id"].as_str().unwrap().to_owned();
        assert_eq!(cr["risk"]["score"], 9);
        assert_eq!(cr["risk"]["level"], "high");
        assert_eq!(cr["required_approvals"], 2);

        // Not before it is submitted.
        let r = act(&app, &alice, &id, "approve", None).await;
        assert_eq!(r.assert_problem(409), "invalid_transition");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains("approve") && detail.contains("draft"),
            "{detail}"
        );

        let r = act(&app, &app.admin_token, &id, "submit", None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "submitted");
        assert!(r.body["submitted_at"].is_string());
        // Submitting twice is an invalid transition.
        assert_eq!(
            act(&app, &app.admin_token, &id, "submit", None)
                .await
                .assert_problem(409),
            "invalid_transition"
        );

        // The requester may not approve.
        let r = act(&app, &app.admin_token, &id, "approve", None).await;
        assert_eq!(r.assert_problem(403), "forbidden");

        let r = act(
            &app,
            &alice,
            &id,
            "approve",
            Some(json!({"comment": "looks right"})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "submitted", "one of two");
        assert_eq!(r.body["approvals"][0]["comment"], "looks right");
        assert_eq!(r.body["approvals"][0]["self_approved"], false);
        assert_eq!(r.body["decided_at"], Value::Null);
        // One person counts once.
        let r = act(&app, &alice, &id, "approve", None).await;
        assert_eq!(r.assert_problem(409), "already_approved");
        // Unknown fields in the body are refused.
        act(&app, &bob, &id, "approve", Some(json!({"coment": "typo"})))
            .await
            .assert_problem(422);

        let r = act(&app, &bob, &id, "approve", None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "approved");
        assert!(r.body["decided_at"].is_string());
        let approvals = r.body["approvals"].as_array().unwrap();
        assert_eq!(approvals.len(), 2);
        assert_eq!(approvals[1]["user_id"], bob_user["id"]);
        assert_eq!(approvals[1]["actor"], bob_user["email"]);
        assert_eq!(approvals[1]["comment"], Value::Null);

        // Approved: no more approvals or rejections.
        let (_, carol) = app.user("approver").await;
        let r = act(&app, &carol, &id, "approve", None).await;
        assert_eq!(r.assert_problem(409), "invalid_transition");
        assert!(r.body["detail"].as_str().unwrap().contains("approved"));
        act(&app, &carol, &id, "reject", Some(json!({"reason": "late"})))
            .await
            .assert_problem(409);

        let events = trail(&app, &id).await;
        assert_eq!(
            types(&events),
            [
                "change_request.created",
                "change_request.submitted",
                "change_request.approved",
                "change_request.approved"
            ]
        );
        assert_eq!(events[2]["payload"]["self_approved"], false);
        assert_eq!(events[3]["payload"]["to_state"], "approved");
        assert_eq!(events[3]["actor"], bob_user["email"]);
    }
);

both!(concurrent_approvals_both_count, |app: TestApp| async move {
    let prod = connector(&app, "prod", "production").await;
    let (_, op) = app.user("operator").await;
    let mut approvers = Vec::new();
    for _ in 0..2 {
        approvers.push(app.user("approver").await.1);
    }
    let cr = create(&app, &op, stop_body(&prod)).await;
    let id = cr["id"].as_str().unwrap().to_owned();
    assert_eq!(act(&app, &op, &id, "submit", None).await.status, 200);
    let (a, b) = tokio::join!(
        act(&app, &approvers[0], &id, "approve", None),
        act(&app, &approvers[1], &id, "approve", None)
    );
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "{} {}",
        a.text,
        b.text
    );
    let now = app.get(&format!("/change-requests/{id}"), &op).await.body;
    assert_eq!(now["state"], "approved");
    assert_eq!(now["approvals"].as_array().unwrap().len(), 2);
});

both!(
    self_approval_when_allowed,
    vec![("NEXPLANE_ALLOW_SELF_APPROVAL", "true".to_owned())],
    |app: TestApp| async move {
        let dev = connector(&app, "dev", "development").await;
        let body = json!({"title": "start", "connector_id": dev, "change_type": "start_ec2_instance",
            "target": {"instance_id": "i-01234567"}});
        let cr = create(&app, &app.admin_token, body).await;
        let id = cr["id"].as_str().unwrap().to_owned();
        assert_eq!(cr["risk"]["level"], "low");
        assert_eq!(cr["required_approvals"], 1);
        assert_eq!(
            act(&app, &app.admin_token, &id, "submit", None)
                .await
                .status,
            200
        );
        let r = act(&app, &app.admin_token, &id, "approve", None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "approved");
        assert_eq!(r.body["approvals"][0]["self_approved"], true);
        let events = trail(&app, &id).await;
        let approved: Vec<&Value> = events
            .iter()
            .filter(|e| e["event_type"] == "change_request.approved")
            .collect();
        assert_eq!(approved.len(), 1);
        assert_eq!(approved[0]["payload"]["self_approved"], true);

        // Still once per person: with two required, the requester's approval counts once.
        let prod = connector(&app, "prod", "production").await;
        let cr = create(&app, &app.admin_token, stop_body(&prod)).await;
        let id = cr["id"].as_str().unwrap().to_owned();
        assert_eq!(
            act(&app, &app.admin_token, &id, "submit", None)
                .await
                .status,
            200
        );
        let r = act(&app, &app.admin_token, &id, "approve", None).await;
        assert_eq!(r.body["state"], "submitted", "{}", r.text);
        assert_eq!(
            act(&app, &app.admin_token, &id, "approve", None)
                .await
                .assert_problem(409),
            "already_approved"
        );
    }
);

both!(reject_and_cancel, |app: TestApp| async move {
    let prod = connector(&app, "prod", "production").await;
    let (_, op) = app.user("operator").await;
    let (_, other_op) = app.user("operator").await;
    let (approver_user, approver) = app.user("approver").await;

    let cr = create(&app, &op, rotate_body(&prod)).await;
    let id = cr["id"].as_str().unwrap().to_owned();
    assert_eq!(act(&app, &op, &id, "submit", None).await.status, 200);
    // A reason is required.
    for body in [None, Some(json!({})), Some(json!({"reason": "   "}))] {
        let r = act(&app, &approver, &id, "reject", body).await;
        r.assert_problem(422);
        assert_eq!(fields(&r), ["reason"]);
    }
    let r = act(
        &app,
        &approver,
        &id,
        "reject",
        Some(json!({"reason": "wrong key"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "rejected");
    assert_eq!(r.body["rejection"]["reason"], "wrong key");
    assert_eq!(r.body["rejection"]["user_id"], approver_user["id"]);
    assert_eq!(r.body["rejection"]["actor"], approver_user["email"]);
    assert!(r.body["decided_at"].is_string());
    // Rejected is final.
    for action in ["submit", "cancel", "approve"] {
        let r = act(&app, &app.admin_token, &id, action, None).await;
        assert_eq!(r.assert_problem(409), "invalid_transition");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(action) && detail.contains("rejected"),
            "{detail}"
        );
    }
    let events = trail(&app, &id).await;
    assert_eq!(
        types(&events),
        [
            "change_request.created",
            "change_request.submitted",
            "change_request.rejected"
        ]
    );
    assert_eq!(events[2]["payload"]["reason"], "wrong key");

    // Cancel: the requester or an admin, from draft, submitted or approved.
    let draft = create(&app, &op, rotate_body(&prod)).await;
    let draft_id = draft["id"].as_str().unwrap().to_owned();
    act(&app, &other_op, &draft_id, "cancel", None)
        .await
        .assert_problem(403);
    let r = act(&app, &op, &draft_id, "cancel", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "cancelled");
    assert_eq!(
        act(&app, &op, &draft_id, "cancel", None)
            .await
            .assert_problem(409),
        "invalid_transition"
    );

    let dev = connector(&app, "dev", "development").await;
    let low = create(
        &app,
        &op,
        json!({"title": "start", "connector_id": dev, "change_type": "start_ec2_instance",
            "target": {"instance_id": "i-01234567"}}),
    )
    .await;
    let low_id = low["id"].as_str().unwrap().to_owned();
    assert_eq!(act(&app, &op, &low_id, "submit", None).await.status, 200);
    let r = act(&app, &approver, &low_id, "approve", None).await;
    assert_eq!(r.body["state"], "approved", "{}", r.text);
    let r = act(&app, &app.admin_token, &low_id, "cancel", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "cancelled");
    let events = trail(&app, &low_id).await;
    assert_eq!(
        types(&events),
        [
            "change_request.created",
            "change_request.submitted",
            "change_request.approved",
            "change_request.cancelled"
        ]
    );
    assert_eq!(events[3]["payload"]["from_state"], "approved");
    assert_eq!(events[3]["actor"], json!(ADMIN_EMAIL));
});

both!(list_filters_and_paging, |app: TestApp| async move {
    let prod = connector(&app, "prod", "production").await;
    let dev = connector(&app, "dev", "development").await;
    let (op_user, op) = app.user("operator").await;
    let (_, viewer) = app.user("viewer").await;
    let mut on_prod = Vec::new();
    for _ in 0..5 {
        let cr = create(&app, &op, rotate_body(&prod)).await;
        on_prod.push(cr["id"].as_str().unwrap().to_owned());
    }
    let stop = create(&app, &app.admin_token, stop_body(&dev)).await;
    let stop_id = stop["id"].as_str().unwrap().to_owned();
    assert_eq!(
        act(&app, &app.admin_token, &stop_id, "submit", None)
            .await
            .status,
        200
    );

    let ids = |r: &Resp| -> Vec<String> {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = app.get("/change-requests", &viewer).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let all = ids(&r);
    assert_eq!(all.len(), 6);
    assert_eq!(all[0], stop_id, "newest first");
    let r = app.get("/change-requests?state=submitted", &viewer).await;
    assert_eq!(ids(&r), std::slice::from_ref(&stop_id));
    let r = app
        .get(&format!("/change-requests?connector_id={prod}"), &viewer)
        .await;
    assert_eq!(ids(&r).len(), 5);
    let r = app
        .get("/change-requests?change_type=stop_ec2_instance", &viewer)
        .await;
    assert_eq!(ids(&r), std::slice::from_ref(&stop_id));
    let r = app
        .get(
            &format!(
                "/change-requests?requested_by={}&state=draft",
                op_user["id"].as_str().unwrap()
            ),
            &viewer,
        )
        .await;
    assert_eq!(ids(&r).len(), 5);
    let r = app
        .get(
            &format!("/change-requests?connector_id={dev}&state=draft"),
            &viewer,
        )
        .await;
    assert!(ids(&r).is_empty());

    // Keyset pages.
    let mut seen = Vec::new();
    let mut path = format!("/change-requests?connector_id={prod}&limit=2");
    loop {
        let r = app.get(&path, &viewer).await;
        assert_eq!(r.status, 200, "{}", r.text);
        seen.extend(ids(&r));
        match r.header("x-next-cursor") {
            Some(c) => {
                assert!(r.header("link").unwrap().contains("rel=\"next\""));
                path = format!("/change-requests?connector_id={prod}&limit=2&cursor={c}");
            }
            None => break,
        }
    }
    let mut expected = on_prod.clone();
    expected.reverse();
    assert_eq!(seen, expected);

    // Bad filters.
    for q in [
        "state=done",
        "change_type=format_disk",
        "connector_id=nope",
        "requested_by=nope",
        "limit=501",
        "limit=0",
    ] {
        app.get(&format!("/change-requests?{q}"), &viewer)
            .await
            .assert_problem(422);
    }
    app.get("/change-requests?cursor=zz", &viewer)
        .await
        .assert_problem(400);
    app.get("/change-requests?bogus=1", &viewer)
        .await
        .assert_problem(400);
});

both!(
    connector_delete_waits_for_open_change_requests,
    |app: TestApp| async move {
        let prod = connector(&app, "prod", "production").await;
        let (_, op) = app.user("operator").await;
        // A draft does not hold the connector.
        let draft = create(&app, &op, rotate_body(&prod)).await;
        let draft_id = draft["id"].as_str().unwrap().to_owned();
        let cr = create(&app, &op, rotate_body(&prod)).await;
        let id = cr["id"].as_str().unwrap().to_owned();
        assert_eq!(act(&app, &op, &id, "submit", None).await.status, 200);

        let r = app
            .delete(&format!("/connectors/{prod}"), &app.admin_token)
            .await;
        assert_eq!(r.assert_problem(409), "connector_in_use");
        assert_eq!(
            app.get(&format!("/connectors/{prod}"), &app.admin_token)
                .await
                .status,
            200
        );
        assert!(app.audit_of("connector.deleted").await.is_empty());

        assert_eq!(act(&app, &op, &id, "cancel", None).await.status, 200);
        let r = app
            .delete(&format!("/connectors/{prod}"), &app.admin_token)
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        // The history stays.
        let r = app.get(&format!("/change-requests/{id}"), &op).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "cancelled");
        assert_eq!(r.body["connector_id"], json!(prod));
        // A draft whose connector is gone cannot be submitted.
        let r = act(&app, &op, &draft_id, "submit", None).await;
        assert_eq!(r.assert_problem(409), "connector_deleted");
    }
);
