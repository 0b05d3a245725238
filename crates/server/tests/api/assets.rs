//! Discovery against the AWS emulator and the asset inventory (api.md §4 test and discover,
//! §5 assets, §8 jobs): seeded IAM users, roles, EC2 instances and security groups in two
//! regions and S3 buckets are discovered with their attributes; a changed seed shows updates,
//! removals and reappearance; filters and keyset paging; bad credentials.

use crate::both;
use crate::connectors::{assert_no_secret, audit_text, create, test_connector};
use crate::harness::*;
use crate::jobs::discover;
use nexplane_testing::moto::{self, Seeder, ACCOUNT};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const KEY: &str = "AKIANEXPLANEASSETS01";
const SECRET: &str = "assets-test-secret/Value+0123456789";

fn connector_body(name: &str, url: &str) -> Value {
    json!({
        "name": name,
        "type": "aws",
        "environment": "staging",
        "settings": moto::settings(url, &["us-east-1", "eu-west-1"]),
        "credentials": {"aws_access_key_id": KEY, "aws_secret_access_key": SECRET}
    })
}

/// Every asset of a query, following the cursor pages of `limit` items.
async fn all_pages(app: &TestApp, query: &str, limit: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = format!("/assets?{query}&limit={limit}");
    loop {
        let r = app.get(&path, &app.admin_token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let page = r.body.as_array().unwrap().clone();
        assert!(page.len() <= limit as usize);
        out.extend(page);
        match r.header("x-next-cursor") {
            Some(c) => {
                let link = r.header("link").unwrap();
                assert!(link.contains(&format!("cursor={c}")) && link.contains("rel=\"next\""));
                path = format!("/assets?{query}&limit={limit}&cursor={c}");
            }
            None => return out,
        }
    }
}

fn find<'a>(assets: &'a [Value], asset_type: &str, external_id: &str) -> &'a Value {
    assets
        .iter()
        .find(|a| a["type"] == json!(asset_type) && a["external_id"] == json!(external_id))
        .unwrap_or_else(|| panic!("no {asset_type} {external_id} in {assets:#?}"))
}

async fn run_discovery(app: &TestApp, connector_id: &str) -> Value {
    let r = discover(app, &app.admin_token, connector_id).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = app.wait_job(r.body["id"].as_str().unwrap(), 120).await;
    assert_eq!(job["status"], json!("succeeded"), "{job}");
    assert_eq!(job["error"], Value::Null, "{job}");
    job
}

both!(
    discovery_end_to_end_against_the_emulator,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let mut seen: Vec<String> = Vec::new();

        // The seed: two users (alice with two keys, a policy and a group), a role, an instance and
        // a security group in each of two regions, two buckets.
        let alice_arn = seed.user("np-alice").await;
        let (alice_key1, _) = seed.access_key("np-alice").await;
        let (alice_key2, _) = seed.access_key("np-alice").await;
        let policy = seed.policy("np-read", "s3:Get*").await;
        seed.attach_user_policy("np-alice", &policy).await;
        seed.group_with("np-devs", "np-alice").await;
        let bob_arn = seed.user("np-bob").await;
        seed.access_key("np-bob").await;
        let role_arn = seed.role("np-app", &policy).await;
        let sg_east = seed
            .security_group("us-east-1", "np-web", 443, "0.0.0.0/0")
            .await;
        let i_east = seed.instance("us-east-1", "np-east", &sg_east).await;
        let sg_west = seed
            .security_group("eu-west-1", "np-db", 5432, "10.0.0.0/8")
            .await;
        let i_west = seed.instance("eu-west-1", "np-west", &sg_west).await;
        seed.bucket("np-bucket-a").await;
        seed.bucket("np-bucket-b").await;

        let c = create(&app, connector_body("emulated", &url)).await;
        let cid = c["id"].as_str().unwrap().to_owned();

        // Test: the emulator's account and caller.
        let r = test_connector(&app, &cid).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["ok"], json!(true), "{}", r.text);
        assert_eq!(r.body["identity"]["account_id"], json!(ACCOUNT));
        assert!(r.body["identity"]["arn"].is_string());
        assert!(r.body["latency_ms"].is_u64());
        seen.push(r.text);
        let after = app
            .get(&format!("/connectors/{cid}"), &app.admin_token)
            .await;
        assert_eq!(after.body["status"], json!("ok"));
        assert_eq!(after.body["last_test_error"], Value::Null);

        // First discovery.
        let job = run_discovery(&app, &cid).await;
        seen.push(job.to_string());
        let result = &job["result"];
        let by_type = &result["by_type"];
        assert_eq!(by_type["iam_user"], json!(2), "{job}");
        assert_eq!(by_type["iam_role"], json!(1), "{job}");
        assert_eq!(by_type["ec2_instance"], json!(2), "{job}");
        assert_eq!(by_type["s3_bucket"], json!(2), "{job}");
        // Each region's default VPC has a default group besides ours.
        assert!(
            by_type["ec2_security_group"].as_u64().unwrap() >= 2,
            "{job}"
        );
        let total: u64 = by_type
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(result["assets_created"], json!(total));
        assert_eq!(
            (
                result["assets_updated"].clone(),
                result["assets_removed"].clone()
            ),
            (json!(0), json!(0))
        );
        assert_eq!(result["partial_errors"], json!([]));
        assert_eq!(
            job["progress"],
            json!({"phase": "done", "done": total, "total": total})
        );

        // Every asset, through keyset pages of 3.
        let assets = all_pages(&app, &format!("connector_id={cid}"), 3).await;
        assert_eq!(assets.len() as u64, total);
        let ids: BTreeSet<&str> = assets.iter().map(|a| a["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), assets.len(), "no duplicates across pages");
        for a in &assets {
            assert_eq!(a["connector_id"], json!(cid));
            assert_eq!(a["environment"], json!("staging"));
            assert_eq!(a["removed_at"], Value::Null);
            assert_eq!(a["first_seen_at"], a["last_seen_at"]);
        }

        let alice = find(&assets, "iam_user", &alice_arn);
        let at = &alice["attributes"];
        assert_eq!(alice["name"], json!("np-alice"));
        assert_eq!(at["user_name"], json!("np-alice"));
        assert_eq!(at["arn"], json!(alice_arn));
        assert!(at["user_id"].is_string() && at["created_at"].is_string());
        assert_eq!(at["path"], json!("/"));
        let keys = at["access_keys"].as_array().unwrap();
        let key_ids: BTreeSet<&str> = keys
            .iter()
            .map(|k| k["access_key_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            key_ids,
            BTreeSet::from([alice_key1.as_str(), alice_key2.as_str()])
        );
        assert!(keys
            .iter()
            .all(|k| k["status"] == json!("Active") && k["created_at"].is_string()));
        assert_eq!(at["attached_policies"], json!([policy]));
        assert_eq!(at["groups"], json!(["np-devs"]));
        assert!(at.get("password_last_used").is_some());
        let bob = find(&assets, "iam_user", &bob_arn).clone();

        let role = find(&assets, "iam_role", &role_arn);
        assert_eq!(role["attributes"]["role_name"], json!("np-app"));
        assert_eq!(role["attributes"]["attached_policies"], json!([policy]));

        for (id, region, sg) in [
            (&i_east, "us-east-1", &sg_east),
            (&i_west, "eu-west-1", &sg_west),
        ] {
            let i = find(&assets, "ec2_instance", id);
            assert_eq!(i["region"], json!(region));
            let at = &i["attributes"];
            assert_eq!(at["instance_id"], json!(id));
            assert_eq!(at["instance_type"], json!("t3.micro"));
            assert_eq!(at["state"], json!("running"));
            assert_eq!(at["image_id"], json!("ami-12c6146b"));
            assert!(
                at["private_ip"].is_string()
                    && at["vpc_id"].is_string()
                    && at["subnet_id"].is_string()
            );
            assert!(at.get("public_ip").is_some());
            assert!(
                at["security_groups"].to_string().contains(sg.as_str()),
                "{at}"
            );
            assert!(at["tags"].to_string().contains("nexplane-tests"), "{at}");
        }
        let web = find(&assets, "ec2_security_group", &sg_east);
        assert_eq!(web["region"], json!("us-east-1"));
        assert_eq!(web["attributes"]["group_name"], json!("np-web"));
        assert!(web["attributes"]["vpc_id"].is_string());
        let ingress = web["attributes"]["ingress"].to_string();
        assert!(
            ingress.contains("443") && ingress.contains("0.0.0.0/0"),
            "{ingress}"
        );
        assert!(web["attributes"]["egress"].is_array());
        let db = find(&assets, "ec2_security_group", &sg_west);
        assert_eq!(db["region"], json!("eu-west-1"));
        let bucket = find(&assets, "s3_bucket", "np-bucket-a");
        assert_eq!(bucket["attributes"]["bucket_name"], json!("np-bucket-a"));
        assert!(bucket["attributes"]["created_at"].is_string());

        // One asset by id, as any role.
        let (_, viewer) = app.user("viewer").await;
        let r = app
            .get(
                &format!("/assets/{}", alice["id"].as_str().unwrap()),
                &viewer,
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body, alice);

        // Filters: type, q (case-insensitive, name or external id), connector.
        let users = all_pages(&app, &format!("connector_id={cid}&type=iam_user"), 50).await;
        assert_eq!(users.len(), 2);
        let r = app.get("/assets?q=NP-ALI", &viewer).await;
        assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.text);
        assert_eq!(r.body[0]["external_id"], json!(alice_arn));
        let r = app
            .get(&format!("/assets?q={}", &i_west[2..]), &viewer)
            .await;
        assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.text);
        let r = app.get("/assets?type=s3_bucket&q=bucket", &viewer).await;
        assert_eq!(r.body.as_array().unwrap().len(), 2);
        let r = app.get("/assets?q=%25", &viewer).await;
        assert_eq!(r.body, json!([]), "% is a character, not a wildcard");

        let c = app
            .get(&format!("/connectors/{cid}"), &app.admin_token)
            .await
            .body;
        assert!(c["last_discovered_at"].is_string());
        let succeeded = app.audit_of("discovery.succeeded").await;
        assert_eq!(succeeded.len(), 1);
        assert_eq!(succeeded[0]["actor"], json!("system"));
        assert_eq!(succeeded[0]["payload"]["assets_created"], json!(total));

        // The seed changes: bob is deleted, one of alice's keys deactivated, an instance added.
        app.clock.advance_secs(60);
        seed.delete_user("np-bob").await;
        seed.set_key_status("np-alice", &alice_key1, "Inactive")
            .await;
        let i_new = seed.instance("eu-west-1", "np-west-2", &sg_west).await;
        let job = run_discovery(&app, &cid).await;
        let result = &job["result"];
        assert_eq!(result["assets_created"], json!(1), "{job}");
        assert_eq!(result["assets_removed"], json!(1), "{job}");
        assert!(result["assets_updated"].as_u64().unwrap() >= 1, "{job}");
        assert_eq!(result["by_type"]["iam_user"], json!(1));
        assert_eq!(result["by_type"]["ec2_instance"], json!(3));

        let now_assets = all_pages(&app, &format!("connector_id={cid}"), 500).await;
        assert!(
            now_assets
                .iter()
                .all(|a| a["external_id"] != json!(bob_arn)),
            "removed are hidden"
        );
        let alice2 = find(&now_assets, "iam_user", &alice_arn);
        assert_eq!(alice2["id"], alice["id"], "updated in place");
        assert_eq!(alice2["first_seen_at"], alice["first_seen_at"]);
        assert_ne!(alice2["last_seen_at"], alice["last_seen_at"]);
        let statuses: Vec<(String, String)> = alice2["attributes"]["access_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["access_key_id"].as_str().unwrap().to_owned(),
                    k["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert!(
            statuses.contains(&(alice_key1.clone(), "Inactive".to_owned())),
            "{statuses:?}"
        );
        assert!(
            statuses.contains(&(alice_key2.clone(), "Active".to_owned())),
            "{statuses:?}"
        );
        let unchanged = find(&now_assets, "s3_bucket", "np-bucket-a");
        assert_eq!(unchanged["id"], bucket["id"]);
        assert_ne!(
            unchanged["last_seen_at"], bucket["last_seen_at"],
            "seen again"
        );
        find(&now_assets, "ec2_instance", &i_new);

        let with_removed = all_pages(
            &app,
            &format!("connector_id={cid}&include_removed=true"),
            500,
        )
        .await;
        let bob_now = find(&with_removed, "iam_user", &bob_arn);
        assert_eq!(bob_now["id"], bob["id"]);
        assert!(bob_now["removed_at"].is_string());
        let r = app
            .get(&format!("/assets/{}", bob["id"].as_str().unwrap()), &viewer)
            .await;
        assert!(
            r.body["removed_at"].is_string(),
            "a removed asset stays readable by id"
        );

        // Bob comes back: same asset, no longer removed.
        app.clock.advance_secs(60);
        seed.user("np-bob").await;
        let job = run_discovery(&app, &cid).await;
        assert_eq!(job["result"]["assets_created"], json!(0), "{job}");
        assert_eq!(job["result"]["assets_removed"], json!(0), "{job}");
        assert!(job["result"]["assets_updated"].as_u64().unwrap() >= 1);
        let back = all_pages(&app, &format!("connector_id={cid}&type=iam_user"), 50).await;
        let bob_back = find(&back, "iam_user", &bob_arn);
        assert_eq!(bob_back["id"], bob["id"]);
        assert_eq!(bob_back["removed_at"], Value::Null);
        assert_eq!(bob_back["first_seen_at"], bob["first_seen_at"]);

        // Deleting the connector takes its assets along.
        let r = app
            .delete(&format!("/connectors/{cid}"), &app.admin_token)
            .await;
        assert_eq!(r.status, 204);
        app.get(
            &format!("/assets/{}", alice["id"].as_str().unwrap()),
            &viewer,
        )
        .await
        .assert_problem(404);
        assert_eq!(
            all_pages(&app, "include_removed=true", 500).await,
            Vec::<Value>::new()
        );

        seen.push(audit_text(&app).await);
        assert_no_secret(&seen, &[KEY, SECRET]);
    }
);

both!(
    bad_credentials_fail_the_test_and_the_discovery_clearly,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let (admin_key, admin_secret) = seed.admin("np-admin").await;
        moto::enable_auth(&url).await;
        let wrong = "WrongSecret/ForNexplane+Tests0123456789";
        let mut seen = Vec::new();

        let body = |name: &str, secret: &str| {
            json!({"name": name, "type": "aws", "settings": moto::settings(&url, &["us-east-1"]),
               "credentials": {"aws_access_key_id": admin_key, "aws_secret_access_key": secret}})
        };
        let good = create(&app, body("good", &admin_secret)).await;
        let bad = create(&app, body("bad", wrong)).await;

        let r = test_connector(&app, good["id"].as_str().unwrap()).await;
        assert_eq!(r.body["ok"], json!(true), "{}", r.text);
        assert_eq!(
            r.body["identity"]["arn"],
            json!(format!("arn:aws:iam::{ACCOUNT}:user/np-admin"))
        );
        seen.push(r.text);

        let r = test_connector(&app, bad["id"].as_str().unwrap()).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["ok"], json!(false));
        let error = r.body["error"].as_str().unwrap();
        assert!(error.starts_with("SignatureDoesNotMatch"), "{error}");
        seen.push(r.text.clone());
        let after = app
            .get(
                &format!("/connectors/{}", bad["id"].as_str().unwrap()),
                &app.admin_token,
            )
            .await;
        assert_eq!(after.body["status"], json!("error"));
        seen.push(after.text);

        let r = discover(&app, &app.admin_token, bad["id"].as_str().unwrap()).await;
        let job = app.wait_job(r.body["id"].as_str().unwrap(), 60).await;
        assert_eq!(job["status"], json!("failed"), "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.starts_with("discovery failed: "), "{error}");
        assert!(error.contains("SignatureDoesNotMatch"), "{error}");
        seen.push(job.to_string());

        // The good one discovers under authentication.
        let job = run_discovery(&app, good["id"].as_str().unwrap()).await;
        assert_eq!(job["result"]["by_type"]["iam_user"], json!(1), "{job}");

        seen.push(audit_text(&app).await);
        assert_no_secret(&seen, &[wrong, &admin_secret, &admin_key]);
        // The inventory lists the access key ids of every IAM user, the connector's own included
        // (a key id is public metadata in IAM); secret values never appear there.
        let all = app
            .get("/assets?include_removed=true&limit=500", &app.admin_token)
            .await;
        assert!(all.text.contains(&admin_key));
        assert_no_secret(&[all.text], &[wrong, &admin_secret]);
    }
);

both!(asset_queries_are_checked, |app: TestApp| async move {
    let t = &app.admin_token;
    app.get("/assets?limit=0", t).await.assert_problem(422);
    app.get("/assets?limit=501", t).await.assert_problem(422);
    app.get("/assets?cursor=zz", t).await.assert_problem(400);
    app.get(&format!("/assets?cursor={}", hex_of("usr_x")), t)
        .await
        .assert_problem(400);
    let r = app.get("/assets?connector_id=nope", t).await;
    r.assert_problem(422);
    assert_eq!(r.body["errors"][0]["field"], json!("connector_id"));
    app.get("/assets?include_removed=maybe", t)
        .await
        .assert_problem(400);
    app.get("/assets?colour=red", t).await.assert_problem(400);
    app.get(&format!("/assets?q={}", "x".repeat(201)), t)
        .await
        .assert_problem(422);
    app.get("/assets/nope", t).await.assert_problem(404);
    app.get("/assets/ast_01jzzzzzzzzzzzzzzzzzzzzzzz", t)
        .await
        .assert_problem(404);
    let r = app
        .get(
            "/assets?connector_id=conn_01jzzzzzzzzzzzzzzzzzzzzzzz&type=iam_user",
            t,
        )
        .await;
    assert_eq!(r.body, json!([]));
    app.req(reqwest::Method::GET, "/assets", None, None)
        .await
        .assert_problem(401);
});

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

both!(
    a_partial_failure_keeps_the_assets_it_could_not_list,
    |app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        seed.user("np-stays").await;
        let leaving = seed.user("np-leaves").await;
        let temp = seed
            .security_group("us-east-1", "np-temp", 22, "10.1.0.0/16")
            .await;
        let mut body = connector_body("partial", &url);
        body["settings"] = moto::settings(&url, &["us-east-1"]);
        let c = create(&app, body).await;
        let cid = c["id"].as_str().unwrap().to_owned();
        let first = run_discovery(&app, &cid).await;
        assert_eq!(first["result"]["by_type"]["iam_user"], json!(2));

        // The user and the group go; the next run cannot list one of its regions.
        seed.delete_user("np-leaves").await;
        seed.delete_security_group("us-east-1", &temp).await;
        let r = app
            .put(
                &format!("/connectors/{cid}"),
                &app.admin_token,
                json!({"name": "partial", "environment": "staging",
                   "settings": moto::settings(&url, &["us-east-1", "xx-nowhere-1"])}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        app.clock.advance_secs(60);
        let r = discover(&app, &app.admin_token, &cid).await;
        let job = app.wait_job(r.body["id"].as_str().unwrap(), 120).await;
        assert_eq!(job["status"], json!("succeeded"), "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.starts_with("partial discovery"), "{error}");
        assert!(error.contains("xx-nowhere-1"), "{error}");
        let partial = job["result"]["partial_errors"].as_array().unwrap();
        assert_eq!(partial.len(), 2, "{job}");
        assert!(partial.iter().all(|p| p["region"] == json!("xx-nowhere-1")));
        // IAM was listed completely: the deleted user is removed. EC2 was not: the deleted
        // group keeps its place until a complete run.
        assert_eq!(job["result"]["assets_removed"], json!(1), "{job}");
        let assets = all_pages(
            &app,
            &format!("connector_id={cid}&include_removed=true"),
            500,
        )
        .await;
        assert!(find(&assets, "iam_user", &leaving)["removed_at"].is_string());
        assert_eq!(
            find(&assets, "ec2_security_group", &temp)["removed_at"],
            Value::Null
        );
        let succeeded = app.audit_of("discovery.succeeded").await;
        assert_eq!(
            succeeded[0]["payload"]["partial_errors"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
);

both!(
    a_discovery_interrupted_by_a_restart_completes_after_it,
    |mut app: TestApp| async move {
        let (_turn, url) = moto::take().await;
        let seed = Seeder::new(&url);
        let user = seed.user("np-survivor").await;
        let c = create(&app, connector_body("restarted", &url)).await;
        let cid = c["id"].as_str().unwrap().to_owned();
        // The server that was running this discovery died; its lease has 60 s to go.
        let now = nexplane_ports::Clock::now(app.clock.as_ref()).millis();
        let job = "job_01jccccccccccccccccccccccc";
        app.sql(&format!(
        "INSERT INTO jobs (id, kind, status, resource_type, resource_id, progress, result, error, \
         created_at, started_at, finished_at, lease_owner, lease_until, attempts) VALUES \
         ('{job}', 'discovery', 'running', 'connector', '{cid}', \
         '{{\"phase\":\"iam\",\"done\":1,\"total\":null}}', 'null', NULL, {now}, {now}, NULL, \
         'worker-of-the-dead-server', {}, 1)",
        now + 60_000
    ));
        app.restart().await;
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let r = app.get(&format!("/jobs/{job}"), &app.admin_token).await;
        assert_eq!(
            r.body["status"],
            json!("running"),
            "the lease still holds: {}",
            r.text
        );
        // Once the lease has run out, the new server's worker resumes it.
        app.clock.advance_secs(61);
        let done = app.wait_job(job, 120).await;
        assert_eq!(done["status"], json!("succeeded"), "{done}");
        assert_eq!(
            app.query(&format!("SELECT attempts FROM jobs WHERE id = '{job}'")),
            ["2"]
        );
        let assets = all_pages(&app, &format!("connector_id={cid}"), 500).await;
        find(&assets, "iam_user", &user);
    }
);
