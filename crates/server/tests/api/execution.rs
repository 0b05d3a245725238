//! Executing and rolling back change requests against the AWS emulator (api.md §6, §6.2):
//! the provider's state is checked with an independent client after each run.

use crate::both;
use crate::connectors::{assert_no_secret, audit_text, create};
use crate::harness::*;
use nexplane_testing::moto::{self, Seeder};
use rusoto_ec2::Ec2;
use rusoto_iam::{Iam, IamClient};
use serde_json::{json, Value};
use std::collections::BTreeMap;

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
    connector_as(app, url, KEY, SECRET).await
}

/// An `aws` connector on the emulator (staging) signing with these credentials (for runs with
/// the emulator's authentication on).
pub async fn connector_as(app: &TestApp, url: &str, key: &str, secret: &str) -> String {
    let c = create(
        app,
        json!({
            "name": format!("emulated-{}", rand_name()),
            "type": "aws",
            "environment": "staging",
            "settings": moto::settings(url, &["us-east-1"]),
            "credentials": {"aws_access_key_id": key, "aws_secret_access_key": secret}
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
    approved_body(
        app,
        json!({"title": format!("{change_type} test"), "connector_id": connector_id,
               "change_type": change_type, "target": target}),
    )
    .await
}

/// [`approved`] for any create body (e.g. an agent change type, without a connector).
pub async fn approved_body(app: &TestApp, body: Value) -> (Value, String) {
    let (_, op) = app.user("operator").await;
    let r = app.post("/change-requests", &op, body).await;
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

/// The access keys of `user`, (id, status) sorted, through a given IAM client (e.g. [`iam_as`] while authentication is on).
pub async fn keys_with(iam: &IamClient, user: &str) -> Vec<(String, String)> {
    let r = iam
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
        assert_eq!(seed.keys("prod-deploy").await, expected);

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
            seed.keys("prod-deploy").await,
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

// ---------------------------------------------------------------------------------------------
// Helpers: running a change request and reading the journals

/// `name:status` of every step of a journal (`execution` or `rollback`), in order.
pub fn step_list(journal: &Value) -> Vec<String> {
    journal["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps: {journal}"))
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["name"].as_str().unwrap(),
                s["status"].as_str().unwrap()
            )
        })
        .collect()
}

fn all(names: &[&str], status: &str) -> Vec<String> {
    names.iter().map(|n| format!("{n}:{status}")).collect()
}

/// Whether `v` is an RFC 3339 UTC timestamp with milliseconds (`2026-12-04T15:41:22.123Z`).
fn is_timestamp(v: &Value) -> bool {
    v.as_str().is_some_and(|t| {
        t.len() == 24
            && t.chars().enumerate().all(|(i, c)| match i {
                4 | 7 => c == '-',
                10 => c == 'T',
                13 | 16 => c == ':',
                19 => c == '.',
                23 => c == 'Z',
                _ => c.is_ascii_digit(),
            })
    })
}

/// Every step of `journal` has a start, an end and a detail saying what it did.
#[track_caller]
fn assert_steps_recorded(journal: &Value) {
    for s in journal["steps"].as_array().unwrap() {
        assert!(is_timestamp(&s["started_at"]), "{s}");
        assert!(is_timestamp(&s["finished_at"]), "{s}");
        assert!(s["detail"].as_str().is_some_and(|d| !d.is_empty()), "{s}");
    }
}

/// The job of a journal: finished with `status`, of `kind`, about change request `id`.
async fn assert_job(app: &TestApp, journal: &Value, id: &str, kind: &str, status: &str) {
    let job = app
        .get(
            &format!("/jobs/{}", journal["job_id"].as_str().unwrap()),
            &app.admin_token,
        )
        .await;
    assert_eq!(job.status, 200, "{}", job.text);
    assert_eq!(
        (
            &job.body["kind"],
            &job.body["status"],
            &job.body["resource_type"],
            &job.body["resource_id"]
        ),
        (
            &json!(kind),
            &json!(status),
            &json!("change_request"),
            &json!(id)
        ),
        "{}",
        job.text
    );
}

/// Creates and approves a change request; returns its id and the requester's token.
pub async fn approved_id(
    app: &TestApp,
    connector_id: &str,
    change_type: &str,
    target: Value,
) -> (String, String) {
    let (cr, op) = approved(app, connector_id, change_type, target).await;
    (cr["id"].as_str().unwrap().to_owned(), op)
}

/// Executes `id` and asserts it ends `complete` with exactly these steps, all succeeded.
pub async fn execute_ok(app: &TestApp, token: &str, id: &str, steps: &[&str]) -> Value {
    let done = run(app, token, id, "execute").await;
    assert_eq!(done["state"], json!("complete"), "{done}");
    assert_eq!(
        step_list(&done["execution"]),
        all(steps, "succeeded"),
        "{done}"
    );
    assert_eq!(done["execution"]["error"], Value::Null, "{done}");
    assert!(is_timestamp(&done["executed_at"]), "{done}");
    assert!(is_timestamp(&done["finished_at"]), "{done}");
    assert_steps_recorded(&done["execution"]);
    assert_job(app, &done["execution"], id, "execution", "succeeded").await;
    done
}

/// Rolls `id` back and asserts it ends `rolledback` with exactly these undo steps, all
/// succeeded.
pub async fn roll_back_ok(app: &TestApp, token: &str, id: &str, steps: &[&str]) -> Value {
    let back = run(app, token, id, "rollback").await;
    assert_eq!(back["state"], json!("rolledback"), "{back}");
    assert_eq!(
        step_list(&back["rollback"]),
        all(steps, "succeeded"),
        "{back}"
    );
    assert_eq!(back["rollback"]["error"], Value::Null, "{back}");
    assert!(is_timestamp(&back["finished_at"]), "{back}");
    assert_steps_recorded(&back["rollback"]);
    assert_job(app, &back["rollback"], id, "rollback", "succeeded").await;
    back
}

/// The `event_type`s audited for a change request, oldest first.
pub async fn trail(app: &TestApp, id: &str) -> Vec<String> {
    let r = app
        .get(
            &format!("/audit?change_request_id={id}&limit=500"),
            &app.admin_token,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut types: Vec<String> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_owned())
        .collect();
    types.reverse();
    types
}

/// The events from `change_request.execution_started` on.
fn since_execution(events: Vec<String>) -> Vec<String> {
    events
        .into_iter()
        .skip_while(|e| e != "change_request.execution_started")
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers: the emulator, seen and seeded with clients independent of the server

/// An IAM client on the emulator signing with these credentials.
pub fn iam_as(url: &str, key: &str, secret: &str) -> IamClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = rusoto_core::Client::new_with(
        rusoto_credential::StaticProvider::new_minimal(key.into(), secret.into()),
        rusoto_core::HttpClient::from_connector(https),
    );
    IamClient::new_with_client(
        client,
        rusoto_core::Region::Custom {
            name: "us-east-1".into(),
            endpoint: url.into(),
        },
    )
}

/// AWS hands inline policy documents back URL-encoded; the emulator may not.
fn decode_document(document: &str) -> Value {
    if let Ok(v) = serde_json::from_str(document) {
        return v;
    }
    let bytes = document.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], document.get(i + 1..i + 3)) {
            (b'%', Some(hex)) if u8::from_str_radix(hex, 16).is_ok() => {
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    serde_json::from_slice(&out).unwrap_or_else(|e| panic!("policy document {document}: {e}"))
}

/// The inline policies of `user`: name → document.
pub async fn inline_policies(iam: &IamClient, user: &str) -> BTreeMap<String, Value> {
    let names = iam
        .list_user_policies(rusoto_iam::ListUserPoliciesRequest {
            user_name: user.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .policy_names;
    let mut out = BTreeMap::new();
    for name in names {
        let doc = iam
            .get_user_policy(rusoto_iam::GetUserPolicyRequest {
                policy_name: name.clone(),
                user_name: user.into(),
            })
            .await
            .unwrap()
            .policy_document;
        out.insert(name, decode_document(&doc));
    }
    out
}

/// Puts an inline policy on `user`.
pub async fn put_inline_policy(iam: &IamClient, user: &str, name: &str, document: &Value) {
    iam.put_user_policy(rusoto_iam::PutUserPolicyRequest {
        policy_document: document.to_string(),
        policy_name: name.into(),
        user_name: user.into(),
    })
    .await
    .unwrap();
}

/// A policy document denying `action` on everything.
fn deny(action: &str) -> Value {
    json!({"Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": action, "Resource": "*"}]})
}

const REGION: &str = "us-east-1";

/// A running instance in a new security group: (group id, instance id).
async fn running_instance(seed: &Seeder, name: &str) -> (String, String) {
    let group = seed
        .security_group(REGION, &format!("{name}-sg"), 22, "10.0.0.0/8")
        .await;
    let id = seed.instance(REGION, name, &group).await;
    assert_eq!(seed.instance_state(REGION, &id).await, "running");
    (group, id)
}

/// Stops an instance at the emulator and waits until it is `stopped`.
async fn stopped_by_seeder(seed: &Seeder, id: &str) {
    seed.ec2(REGION)
        .stop_instances(rusoto_ec2::StopInstancesRequest {
            instance_ids: vec![id.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..100 {
        if seed.instance_state(REGION, id).await == "stopped" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("instance {id} did not stop");
}

/// The ingress rules of a security group, one `protocol from-to cidr` per IP range, sorted.
async fn ingress(seed: &Seeder, group: &str) -> Vec<String> {
    let r = seed
        .ec2(REGION)
        .describe_security_groups(rusoto_ec2::DescribeSecurityGroupsRequest {
            group_ids: Some(vec![group.into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rules = Vec::new();
    for g in r.security_groups.unwrap_or_default() {
        for p in g.ip_permissions.unwrap_or_default() {
            for range in p.ip_ranges.unwrap_or_default() {
                rules.push(format!(
                    "{} {}-{} {}",
                    p.ip_protocol.as_deref().unwrap_or("?"),
                    p.from_port.unwrap_or(-1),
                    p.to_port.unwrap_or(-1),
                    range.cidr_ip.unwrap_or_default()
                ));
            }
        }
    }
    rules.sort();
    rules
}

fn pair(id: &str, status: &str) -> (String, String) {
    (id.to_owned(), status.to_owned())
}

/// `(id, status)` pairs sorted as [`keys`] returns them.
fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Every other AWS change type: execute, check the provider, roll back, check again

both!(
    access_key_changes_execute_and_roll_back,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let cid = emulated_connector(&app, &url).await;

        // deactivate_iam_access_key: only the named key changes.
        seed.user("svc-ci").await;
        let (a, _) = seed.access_key("svc-ci").await;
        let (b, _) = seed.access_key("svc-ci").await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "deactivate_iam_access_key",
            json!({"iam_user": "svc-ci", "access_key_id": a}),
        )
        .await;
        execute_ok(&app, &op, &id, &["deactivate_access_key"]).await;
        assert_eq!(
            seed.keys("svc-ci").await,
            sorted(vec![pair(&a, "Inactive"), pair(&b, "Active")])
        );
        roll_back_ok(&app, &op, &id, &["reactivate_access_key"]).await;
        assert_eq!(
            seed.keys("svc-ci").await,
            sorted(vec![pair(&a, "Active"), pair(&b, "Active")])
        );

        // delete_iam_access_key: the inactive key is gone, and there is no way back.
        seed.user("svc-old").await;
        let (c, _) = seed.access_key("svc-old").await;
        let (keep, _) = seed.access_key("svc-old").await;
        seed.set_key_status("svc-old", &c, "Inactive").await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "delete_iam_access_key",
            json!({"iam_user": "svc-old", "access_key_id": c}),
        )
        .await;
        let done = execute_ok(&app, &op, &id, &["delete_access_key"]).await;
        assert_eq!(
            done["execution"]["outputs"]["deleted_access_key_id"],
            json!(c)
        );
        assert_eq!(seed.keys("svc-old").await, vec![pair(&keep, "Active")]);
        let r = app
            .post(&format!("/change-requests/{id}/rollback"), &op, json!({}))
            .await;
        assert_eq!(r.assert_problem(409), "rollback_unsupported");
        let now = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert_eq!(now["state"], json!("complete"));
        assert_eq!(now["rollback"], Value::Null);
        assert!(!trail(&app, &id)
            .await
            .iter()
            .any(|t| t.starts_with("change_request.rollback")));
        assert_eq!(seed.keys("svc-old").await, vec![pair(&keep, "Active")]);
    }
);

both!(
    lock_and_unlock_execute_and_roll_back,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let iam = seed.iam();
        let cid = emulated_connector(&app, &url).await;

        // lock_iam_user: the deny-all NexplaneLock, and only the Active key deactivated.
        seed.user("contractor").await;
        let (on, _) = seed.access_key("contractor").await;
        let (off, _) = seed.access_key("contractor").await;
        seed.set_key_status("contractor", &off, "Inactive").await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "lock_iam_user",
            json!({"iam_user": "contractor"}),
        )
        .await;
        let done = execute_ok(
            &app,
            &op,
            &id,
            &["attach_lock_policy", "deactivate_active_keys"],
        )
        .await;
        assert_eq!(
            done["execution"]["outputs"]["deactivated_keys"],
            json!([on])
        );
        let policies = inline_policies(&iam, "contractor").await;
        assert_eq!(
            policies.keys().collect::<Vec<_>>(),
            ["NexplaneLock"],
            "{policies:?}"
        );
        let statement = &policies["NexplaneLock"]["Statement"][0];
        assert_eq!(
            (
                &statement["Effect"],
                &statement["Action"],
                &statement["Resource"]
            ),
            (&json!("Deny"), &json!("*"), &json!("*"))
        );
        assert_eq!(
            seed.keys("contractor").await,
            sorted(vec![pair(&on, "Inactive"), pair(&off, "Inactive")])
        );
        roll_back_ok(
            &app,
            &op,
            &id,
            &["reactivate_deactivated_keys", "remove_lock_policy"],
        )
        .await;
        assert!(inline_policies(&iam, "contractor").await.is_empty());
        assert_eq!(
            seed.keys("contractor").await,
            sorted(vec![pair(&on, "Active"), pair(&off, "Inactive")])
        );

        // unlock_iam_user: the lock goes, and the rollback puts back the very document.
        seed.user("locked-out").await;
        let document = deny("iam:*");
        put_inline_policy(&iam, "locked-out", "NexplaneLock", &document).await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "unlock_iam_user",
            json!({"iam_user": "locked-out"}),
        )
        .await;
        execute_ok(&app, &op, &id, &["remove_lock_policy"]).await;
        assert!(inline_policies(&iam, "locked-out").await.is_empty());
        roll_back_ok(&app, &op, &id, &["restore_lock_policy"]).await;
        let mut expected = BTreeMap::new();
        expected.insert("NexplaneLock".to_owned(), document);
        assert_eq!(inline_policies(&iam, "locked-out").await, expected);
    }
);

both!(
    policy_attachments_execute_and_roll_back,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let cid = emulated_connector(&app, &url).await;
        seed.user("deployer").await;
        let read = seed.policy("np-read", "s3:Get*").await;
        let write = seed.policy("np-write", "s3:Put*").await;
        seed.attach_user_policy("deployer", &write).await;

        let (id, op) = approved_id(
            &app,
            &cid,
            "attach_iam_user_policy",
            json!({"iam_user": "deployer", "policy_arn": read}),
        )
        .await;
        execute_ok(&app, &op, &id, &["attach_user_policy"]).await;
        let mut both = vec![read.clone(), write.clone()];
        both.sort();
        assert_eq!(seed.attached("deployer").await, both);
        roll_back_ok(&app, &op, &id, &["detach_user_policy"]).await;
        assert_eq!(
            seed.attached("deployer").await,
            std::slice::from_ref(&write)
        );

        let (id, op) = approved_id(
            &app,
            &cid,
            "detach_iam_user_policy",
            json!({"iam_user": "deployer", "policy_arn": write}),
        )
        .await;
        execute_ok(&app, &op, &id, &["detach_user_policy"]).await;
        assert!(seed.attached("deployer").await.is_empty());
        roll_back_ok(&app, &op, &id, &["reattach_user_policy"]).await;
        assert_eq!(
            seed.attached("deployer").await,
            std::slice::from_ref(&write)
        );
    }
);

both!(
    instances_stop_start_and_roll_back,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let cid = emulated_connector(&app, &url).await;
        let (_, web) = running_instance(&seed, "web").await;
        let (_, batch) = running_instance(&seed, "batch").await;
        stopped_by_seeder(&seed, &batch).await;

        let (id, op) =
            approved_id(&app, &cid, "stop_ec2_instance", json!({"instance_id": web})).await;
        let done = execute_ok(&app, &op, &id, &["stop_instance"]).await;
        assert_eq!(
            done["execution"]["outputs"]["instance_state"],
            json!("stopped")
        );
        assert_eq!(seed.instance_state(REGION, &web).await, "stopped");
        roll_back_ok(&app, &op, &id, &["start_instance"]).await;
        assert_eq!(seed.instance_state(REGION, &web).await, "running");
        assert_eq!(
            seed.instance_state(REGION, &batch).await,
            "stopped",
            "untouched"
        );

        let (id, op) = approved_id(
            &app,
            &cid,
            "start_ec2_instance",
            json!({"instance_id": batch, "region": REGION}),
        )
        .await;
        let done = execute_ok(&app, &op, &id, &["start_instance"]).await;
        assert_eq!(
            done["execution"]["outputs"]["instance_state"],
            json!("running")
        );
        assert_eq!(seed.instance_state(REGION, &batch).await, "running");
        roll_back_ok(&app, &op, &id, &["stop_instance"]).await;
        assert_eq!(seed.instance_state(REGION, &batch).await, "stopped");
        assert_eq!(
            seed.instance_state(REGION, &web).await,
            "running",
            "untouched"
        );
    }
);

both!(
    ingress_rules_revoke_authorize_and_roll_back,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let cid = emulated_connector(&app, &url).await;
        let group = seed
            .security_group(REGION, "bastion", 22, "10.0.0.0/8")
            .await;
        let ssh = "tcp 22-22 10.0.0.0/8".to_owned();
        assert_eq!(ingress(&seed, &group).await, std::slice::from_ref(&ssh));

        let rule = |port: i64, cidr: &str| {
            json!({"group_id": group, "protocol": "tcp", "from_port": port, "to_port": port,
                   "cidr": cidr})
        };
        let (id, op) = approved_id(
            &app,
            &cid,
            "revoke_security_group_ingress",
            rule(22, "10.0.0.0/8"),
        )
        .await;
        execute_ok(&app, &op, &id, &["revoke_ingress"]).await;
        assert!(ingress(&seed, &group).await.is_empty());
        roll_back_ok(&app, &op, &id, &["restore_ingress"]).await;
        assert_eq!(ingress(&seed, &group).await, std::slice::from_ref(&ssh));

        let (id, op) = approved_id(
            &app,
            &cid,
            "authorize_security_group_ingress",
            rule(443, "0.0.0.0/0"),
        )
        .await;
        execute_ok(&app, &op, &id, &["authorize_ingress"]).await;
        assert_eq!(
            ingress(&seed, &group).await,
            [ssh.clone(), "tcp 443-443 0.0.0.0/0".to_owned()]
        );
        roll_back_ok(&app, &op, &id, &["remove_ingress"]).await;
        assert_eq!(ingress(&seed, &group).await, std::slice::from_ref(&ssh));
    }
);

// ---------------------------------------------------------------------------------------------
// Prechecks

/// Executes `id`, whose precheck must fail: `failed`, an error starting with `precheck
/// failed:` and containing `why`, every step skipped, the job failed, and no rollback.
async fn assert_precheck_fails(app: &TestApp, token: &str, id: &str, why: &str) {
    let done = run(app, token, id, "execute").await;
    assert_eq!(done["state"], json!("failed"), "{done}");
    let error = done["execution"]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("precheck failed: "), "{done}");
    assert!(error.contains(why), "{error:?} should say {why:?}");
    let statuses: Vec<&str> = done["execution"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == "skipped"), "{done}");
    let job = app
        .get(
            &format!("/jobs/{}", done["execution"]["job_id"].as_str().unwrap()),
            token,
        )
        .await;
    assert_eq!(job.body["status"], json!("failed"), "{}", job.text);
    assert!(
        job.body["error"].as_str().unwrap_or_default().contains(why),
        "{}",
        job.text
    );
    // Nothing was applied: nothing to roll back.
    let r = app
        .post(&format!("/change-requests/{id}/rollback"), token, json!({}))
        .await;
    assert_eq!(r.assert_problem(409), "invalid_transition");
    let after = app.get(&format!("/change-requests/{id}"), token).await.body;
    assert_eq!(after["state"], json!("failed"));
    assert_eq!(after["rollback"], Value::Null);
    let events = trail(app, id).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("change_request.failed"),
        "{events:?}"
    );
}

both!(failed_prechecks_apply_nothing, |app: TestApp| async move {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let cid = emulated_connector(&app, &url).await;

    // Rotate a user with two keys without saying which.
    seed.user("two-keys").await;
    let (k1, _) = seed.access_key("two-keys").await;
    let (k2, _) = seed.access_key("two-keys").await;
    let (id, op) = approved_id(
        &app,
        &cid,
        "rotate_iam_access_key",
        json!({"iam_user": "two-keys"}),
    )
    .await;
    assert_precheck_fails(&app, &op, &id, "access_key_id").await;
    assert_eq!(
        seed.keys("two-keys").await,
        sorted(vec![pair(&k1, "Active"), pair(&k2, "Active")])
    );
    let r = app
        .post(
            &format!("/change-requests/{id}/reveal-secrets"),
            &op,
            json!({}),
        )
        .await;
    assert_eq!(r.assert_problem(409), "no_secret_outputs");

    // Lock a user that does not exist.
    let before = seed.user_names().await;
    let (id, op) = approved_id(&app, &cid, "lock_iam_user", json!({"iam_user": "ghost"})).await;
    assert_precheck_fails(&app, &op, &id, "IAM user ghost does not exist").await;
    assert_eq!(seed.user_names().await, before);

    // Delete a key that is still Active.
    seed.user("in-use").await;
    let (live, _) = seed.access_key("in-use").await;
    let (id, op) = approved_id(
        &app,
        &cid,
        "delete_iam_access_key",
        json!({"iam_user": "in-use", "access_key_id": live}),
    )
    .await;
    assert_precheck_fails(&app, &op, &id, "still Active").await;
    assert_eq!(seed.keys("in-use").await, vec![pair(&live, "Active")]);

    // Stop an instance that does not exist.
    let (_, web) = running_instance(&seed, "web").await;
    let (id, op) = approved_id(
        &app,
        &cid,
        "stop_ec2_instance",
        json!({"instance_id": "i-0123456789abcdef0"}),
    )
    .await;
    assert_precheck_fails(&app, &op, &id, "i-0123456789abcdef0 not found").await;
    assert_eq!(seed.instance_state(REGION, &web).await, "running");
});

// ---------------------------------------------------------------------------------------------
// Concurrency, failures, retries

both!(
    concurrent_executes_share_one_job,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("racer").await;
        let (old, _) = seed.access_key("racer").await;
        let cid = emulated_connector(&app, &url).await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "rotate_iam_access_key",
            json!({"iam_user": "racer"}),
        )
        .await;
        let (_, other_op) = app.user("operator").await;
        let path = format!("/change-requests/{id}/execute");
        let (a, b) = tokio::join!(
            app.post(&path, &op, json!({})),
            app.post(&path, &other_op, json!({}))
        );
        assert_eq!(
            (a.status.as_u16(), b.status.as_u16()),
            (202, 202),
            "{} {}",
            a.text,
            b.text
        );
        let job = a.body["id"].as_str().unwrap().to_owned();
        assert_eq!(b.body["id"], json!(job));
        assert_eq!(b.header("location"), Some(format!("/jobs/{job}").as_str()));
        app.wait_job(&job, 120).await;

        let done = app.get(&format!("/change-requests/{id}"), &op).await.body;
        assert_eq!(done["state"], json!("complete"), "{done}");
        assert_eq!(done["execution"]["job_id"], json!(job));
        let started = app
            .get(
                &format!(
                    "/audit?change_request_id={id}&event_type=change_request.execution_started"
                ),
                &app.admin_token,
            )
            .await;
        assert_eq!(
            started.body.as_array().unwrap().len(),
            1,
            "{}",
            started.text
        );
        assert_eq!(
            app.query(&format!(
                "SELECT count(*) FROM jobs WHERE resource_id = '{id}'"
            )),
            ["1"]
        );
        let now = seed.keys("racer").await;
        assert_eq!(now.len(), 2, "exactly one new key: {now:?}");
        let new: Vec<&(String, String)> = now.iter().filter(|(k, _)| *k != old).collect();
        assert_eq!(
            new,
            [&pair(
                done["execution"]["outputs"]["new_access_key_id"]
                    .as_str()
                    .unwrap(),
                "Active"
            )]
        );
    }
);

/// A connector signing as `bot`, an emulator user allowed everything but `denied`; turns
/// the emulator's authentication on. Returns the connector and an IAM client signing as the
/// bot (the seeder's own credentials are unknown to the emulator once authentication is on).
pub async fn connector_denied(
    app: &TestApp,
    seed: &Seeder,
    url: &str,
    bot: &str,
    denied: &str,
) -> (String, IamClient) {
    let (key, secret) = seed.admin(bot).await;
    put_inline_policy(&seed.iam(), bot, "NexplaneTestDeny", &deny(denied)).await;
    moto::enable_auth(url).await;
    let cid = connector_as(app, url, &key, &secret).await;
    (cid, iam_as(url, &key, &secret))
}

both!(
    a_refused_step_fails_and_rollback_undoes_the_applied_part,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("contractor").await;
        let (key, _) = seed.access_key("contractor").await;
        // The provider refuses the lock's second step (deactivating the keys).
        let (cid, iam) =
            connector_denied(&app, &seed, &url, "nexplane-bot", "iam:UpdateAccessKey").await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "lock_iam_user",
            json!({"iam_user": "contractor"}),
        )
        .await;

        let done = run(&app, &op, &id, "execute").await;
        assert_eq!(done["state"], json!("failed"), "{done}");
        assert_eq!(
            step_list(&done["execution"]),
            [
                "attach_lock_policy:succeeded",
                "deactivate_active_keys:failed"
            ]
        );
        let error = done["execution"]["error"].as_str().unwrap();
        assert!(
            error.starts_with("step deactivate_active_keys failed: ")
                && error.contains("AccessDenied"),
            "{error}"
        );
        let failed_step = &done["execution"]["steps"][1];
        assert!(
            failed_step["detail"]
                .as_str()
                .is_some_and(|d| d.contains("AccessDenied")),
            "{failed_step}"
        );
        assert!(failed_step["finished_at"].is_string());
        // The first step was applied, the second was not.
        assert!(inline_policies(&iam, "contractor")
            .await
            .contains_key("NexplaneLock"));
        assert_eq!(keys_with(&iam, "contractor").await, [pair(&key, "Active")]);
        // Executing again is not a way out.
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        assert_eq!(r.assert_problem(409), "invalid_transition");

        // A failed execution with an applied step can be rolled back: every started step is
        // undone, in reverse order.
        roll_back_ok(
            &app,
            &op,
            &id,
            &["reactivate_deactivated_keys", "remove_lock_policy"],
        )
        .await;
        assert!(inline_policies(&iam, "contractor").await.is_empty());
        assert_eq!(keys_with(&iam, "contractor").await, [pair(&key, "Active")]);
        assert_eq!(
            since_execution(trail(&app, &id).await),
            [
                "change_request.execution_started",
                "change_request.failed",
                "change_request.rollback_started",
                "change_request.rolledback"
            ]
        );
    }
);

both!(
    a_failed_rollback_is_retried_without_repeating_undone_steps,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("prod-deploy").await;
        let (old, _) = seed.access_key("prod-deploy").await;
        // The provider will refuse the rollback's second undo step (deleting the new key).
        let (cid, iam) =
            connector_denied(&app, &seed, &url, "nexplane-bot", "iam:DeleteAccessKey").await;
        let (id, op) = approved_id(
            &app,
            &cid,
            "rotate_iam_access_key",
            json!({"iam_user": "prod-deploy"}),
        )
        .await;
        let done = execute_ok(
            &app,
            &op,
            &id,
            &["create_access_key", "deactivate_old_access_key"],
        )
        .await;
        let new = done["execution"]["outputs"]["new_access_key_id"]
            .as_str()
            .unwrap()
            .to_owned();

        let failed = run(&app, &op, &id, "rollback").await;
        assert_eq!(failed["state"], json!("rollback_failed"), "{failed}");
        assert_eq!(
            step_list(&failed["rollback"]),
            [
                "reactivate_old_access_key:succeeded",
                "delete_new_access_key:failed"
            ]
        );
        let error = failed["rollback"]["error"].as_str().unwrap();
        assert!(
            error.starts_with("step delete_new_access_key failed: ")
                && error.contains("AccessDenied"),
            "{error}"
        );
        let first_job = failed["rollback"]["job_id"].as_str().unwrap().to_owned();
        let job = app.get(&format!("/jobs/{first_job}"), &op).await;
        assert_eq!(job.body["status"], json!("failed"), "{}", job.text);
        assert_eq!(
            keys_with(&iam, "prod-deploy").await,
            sorted(vec![pair(&old, "Active"), pair(&new, "Active")])
        );
        // rollback_failed allows no execution.
        let r = app
            .post(&format!("/change-requests/{id}/execute"), &op, json!({}))
            .await;
        assert_eq!(r.assert_problem(409), "invalid_transition");

        // Someone fixes the permissions at the provider; the retry runs as a new job and does
        // not run the undo step that already succeeded again.
        iam.delete_user_policy(rusoto_iam::DeleteUserPolicyRequest {
            policy_name: "NexplaneTestDeny".into(),
            user_name: "nexplane-bot".into(),
        })
        .await
        .unwrap();
        app.clock.advance_secs(60);
        let (_, other_op) = app.user("operator").await;
        let back = roll_back_ok(
            &app,
            &other_op,
            &id,
            &["reactivate_old_access_key", "delete_new_access_key"],
        )
        .await;
        assert_ne!(back["rollback"]["job_id"], json!(first_job));
        assert_eq!(
            back["rollback"]["steps"][0], failed["rollback"]["steps"][0],
            "the reactivation is kept as it was, not run again"
        );
        assert_ne!(
            back["rollback"]["steps"][1]["started_at"],
            failed["rollback"]["steps"][1]["started_at"]
        );
        assert_eq!(keys_with(&iam, "prod-deploy").await, [pair(&old, "Active")]);
        assert_eq!(
            since_execution(trail(&app, &id).await),
            [
                "change_request.execution_started",
                "change_request.completed",
                "change_request.rollback_started",
                "change_request.rollback_failed",
                "change_request.rollback_started",
                "change_request.rolledback"
            ]
        );
    }
);

// ---------------------------------------------------------------------------------------------
// reveal-secrets

both!(reveal_secrets_refusals, |app: TestApp| async move {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("prod-deploy").await;
    let (key, _) = seed.access_key("prod-deploy").await;
    let cid = emulated_connector(&app, &url).await;
    let reveal = |id: String, token: String| {
        let app = &app;
        async move {
            app.post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &token,
                json!({}),
            )
            .await
        }
    };

    // Before execution there is nothing to reveal, even for an admin.
    let (rotate, op) = approved_id(
        &app,
        &cid,
        "rotate_iam_access_key",
        json!({"iam_user": "prod-deploy"}),
    )
    .await;
    for token in [&op, &app.admin_token] {
        let r = reveal(rotate.clone(), token.clone()).await;
        assert_eq!(r.assert_problem(409), "no_secret_outputs");
    }

    // A change type without secrets, executed.
    let (deactivate, op2) = approved_id(
        &app,
        &cid,
        "deactivate_iam_access_key",
        json!({"iam_user": "prod-deploy", "access_key_id": key}),
    )
    .await;
    execute_ok(&app, &op2, &deactivate, &["deactivate_access_key"]).await;
    let r = reveal(deactivate.clone(), op2.clone()).await;
    assert_eq!(r.assert_problem(409), "no_secret_outputs");
    roll_back_ok(&app, &op2, &deactivate, &["reactivate_access_key"]).await;

    // Executed: a viewer and an approver are refused, and their attempts destroy nothing.
    execute_ok(
        &app,
        &op,
        &rotate,
        &["create_access_key", "deactivate_old_access_key"],
    )
    .await;
    let (_, viewer) = app.user("viewer").await;
    let (_, approver) = app.user("approver").await;
    for token in [&viewer, &approver] {
        let r = reveal(rotate.clone(), token.clone()).await;
        assert_eq!(r.assert_problem(403), "forbidden");
    }
    // Unknown and malformed ids.
    for bad in [
        "cr_01jef8z7q3m4n5p6r7s8t9v0wx",
        "nope",
        "usr_01jef8z7q3m4n5p6r7s8t9v0wx",
    ] {
        reveal(bad.to_owned(), op.clone()).await.assert_problem(404);
    }
    assert!(app
        .audit_of("change_request.secrets_revealed")
        .await
        .is_empty());
    // The requester still gets the secret, once.
    let r = reveal(rotate.clone(), op.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["new_secret_access_key".to_owned()])
    );
    assert_eq!(
        app.audit_of("change_request.secrets_revealed").await.len(),
        1
    );
    reveal(rotate.clone(), op.clone()).await.assert_problem(410);
});

both!(
    secrets_never_revealed_are_destroyed_by_the_rollback,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("prod-deploy").await;
        seed.access_key("prod-deploy").await;
        let cid = emulated_connector(&app, &url).await;
        let (cr, op) = approved(
            &app,
            &cid,
            "rotate_iam_access_key",
            json!({"iam_user": "prod-deploy"}),
        )
        .await;
        let id = cr["id"].as_str().unwrap().to_owned();
        assert_eq!(
            run(&app, &op, &id, "execute").await["state"],
            json!("complete")
        );
        assert_eq!(
            app.query("SELECT name FROM change_request_secrets"),
            vec!["new_secret_access_key".to_owned()]
        );
        assert_eq!(
            run(&app, &op, &id, "rollback").await["state"],
            json!("rolledback")
        );
        // A list shows the same journals as the change request itself.
        let one = app.get(&format!("/change-requests/{id}"), &op).await.body;
        let listed = app
            .get(&format!("/change-requests?connector_id={cid}"), &op)
            .await
            .body;
        assert_eq!(listed[0]["id"], json!(id));
        assert_eq!(listed[0]["execution"], one["execution"]);
        assert_eq!(listed[0]["rollback"], one["rollback"]);
        assert!(one["rollback"]["steps"].is_array(), "{one}");
        // The key it opened is deleted: its secret is gone too.
        assert!(app
            .query("SELECT name FROM change_request_secrets")
            .is_empty());
        let r = app
            .post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &op,
                json!({}),
            )
            .await;
        assert_eq!(r.assert_problem(410), "gone");
        assert!(
            r.body["detail"].as_str().unwrap().contains("rolled back"),
            "{}",
            r.text
        );
    }
);

both!(
    rotating_the_master_key_reseals_secret_outputs,
    |mut app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("prod-deploy").await;
        seed.access_key("prod-deploy").await;
        let cid = emulated_connector(&app, &url).await;
        let (cr, op) = approved(
            &app,
            &cid,
            "rotate_iam_access_key",
            json!({"iam_user": "prod-deploy"}),
        )
        .await;
        let id = cr["id"].as_str().unwrap().to_owned();
        assert_eq!(
            run(&app, &op, &id, "execute").await["state"],
            json!("complete")
        );
        let key_of = |app: &TestApp| {
            app.query("SELECT sealed_value FROM change_request_secrets")[0]
                .split('.')
                .nth(1)
                .unwrap()
                .to_owned()
        };
        let before = key_of(&app);

        let (cfg, clock) = (app.config(), app.clock.clone());
        let rotation = tokio::task::spawn_blocking(move || {
            nexplane::rotate_master_key(&cfg, clock, None).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(rotation.previous_key_id, before);
        assert_eq!(key_of(&app), rotation.new_key_id);
        let audit = app.audit_of("keys.master_rotated").await;
        assert_eq!(audit[0]["payload"]["secret_outputs_resealed"], json!(1));

        // Without the old key file, the restarted server still reveals the secret.
        std::fs::remove_file(rotation.previous_key_file.unwrap()).unwrap();
        app.restart().await;
        let r = app
            .post(
                &format!("/change-requests/{id}/reveal-secrets"),
                &op,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.body["new_secret_access_key"].as_str().unwrap().len() >= 20);
    }
);
