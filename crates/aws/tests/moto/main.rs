//! The aws adapter against a local AWS emulator (`moto_server`).
//!
//! The emulator and the seeding client come from `nexplane-testing` (`moto`): the emulator is
//! `NEXPLANE_TEST_MOTO_URL` (set by `cargo xtask test`), else a `moto_server` started from
//! `<workspace>/.venv-moto` for the life of this test binary; the tests take turns and each
//! starts from a reset emulator.
//!
//! This file holds the connection and discovery tests; `changes` runs the change types
//! (api.md §6.3) against the emulator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod changes;

use futures_util::stream::{self, StreamExt};
use nexplane_aws::{AwsOptions, AwsProvider};
use nexplane_domain::SecretString;
use nexplane_ports::cloud::{
    CloudCredentials, CloudProvider, CloudTarget, DiscoveredAsset, Discovery,
};
use nexplane_testing::free_port;
use nexplane_testing::moto::{self, Seeder, ACCOUNT};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Credentials for runs where the emulator does not check them.
const KEY_ID: &str = "AKIANEXPLANETEST0001";
const SECRET: &str = "nexplane-test-secret-value-0001";

// ---------------------------------------------------------------------------------------------
// Helpers

fn target(url: &str, mut settings: Value, key: &str, secret: &str) -> CloudTarget {
    settings["endpoint_url"] = json!(url);
    let mut values = BTreeMap::new();
    values.insert(
        "aws_access_key_id".to_string(),
        SecretString::new(key.into()),
    );
    values.insert(
        "aws_secret_access_key".to_string(),
        SecretString::new(secret.into()),
    );
    CloudTarget {
        connector_type: "aws".into(),
        settings,
        credentials: CloudCredentials { values },
    }
}

type Progress = Mutex<Vec<(String, u64, Option<u64>)>>;

async fn discover(provider: &AwsProvider, target: &CloudTarget) -> (Discovery, Progress) {
    let seen: Progress = Mutex::new(Vec::new());
    let record = |phase: &str, done: u64, total: Option<u64>| {
        seen.lock().unwrap().push((phase.to_string(), done, total));
    };
    let discovery = provider
        .discover(target, &record)
        .await
        .unwrap_or_else(|e| panic!("discovery failed: {e}"));
    (discovery, seen)
}

fn find<'a>(d: &'a Discovery, asset_type: &str, external_id: &str) -> &'a DiscoveredAsset {
    d.assets
        .iter()
        .find(|a| a.asset_type == asset_type && a.external_id == external_id)
        .unwrap_or_else(|| panic!("no {asset_type} {external_id} among {:#?}", ids(d)))
}

fn ids(d: &Discovery) -> Vec<(String, String, Option<String>)> {
    d.assets
        .iter()
        .map(|a| {
            (
                a.asset_type.clone(),
                a.external_id.clone(),
                a.region.clone(),
            )
        })
        .collect()
}

fn count(d: &Discovery, asset_type: &str) -> usize {
    d.assets
        .iter()
        .filter(|a| a.asset_type == asset_type)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn test_returns_the_account_and_arn() {
    let (_turn, url) = moto::take().await;
    let provider = AwsProvider::new();

    let identity = provider
        .test(&target(&url, json!({}), KEY_ID, SECRET))
        .await
        .unwrap();
    assert_eq!(identity.account_id, ACCOUNT);
    assert!(identity.arn.starts_with("arn:aws:"), "{}", identity.arn);

    // With a real user's key, the identity is that user.
    let seed = Seeder::new(&url);
    let arn = seed.user("np-caller").await;
    let (key_id, secret) = seed.access_key("np-caller").await;
    let identity = provider
        .test(&target(
            &url,
            json!({"region": "eu-west-1"}),
            &key_id,
            &secret,
        ))
        .await
        .unwrap();
    assert_eq!(identity.account_id, ACCOUNT);
    assert_eq!(identity.arn, arn);
}

#[tokio::test]
async fn bad_credentials_are_refused_without_showing_them() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let (admin_key, admin_secret) = seed.admin("np-admin").await;
    moto::enable_auth(&url).await;
    let provider = AwsProvider::new();

    // The right key works with authentication on…
    let good = target(&url, json!({}), &admin_key, &admin_secret);
    let identity = provider.test(&good).await.unwrap();
    assert_eq!(
        identity.arn,
        format!("arn:aws:iam::{ACCOUNT}:user/np-admin")
    );

    // …a wrong secret does not, and the error shows neither the secret nor the key id.
    let wrong_secret = "WrongSecretValue/For+NexplaneTests0123456789";
    let bad = target(&url, json!({}), &admin_key, wrong_secret);
    let err = provider.test(&bad).await.unwrap_err();
    eprintln!("wrong secret: {}", err.message);
    assert!(
        err.message.starts_with("SignatureDoesNotMatch"),
        "{}",
        err.message
    );
    for secret in [wrong_secret, &admin_key, &admin_secret] {
        assert!(!err.message.contains(secret), "{}", err.message);
        assert!(!format!("{err:?}").contains(secret));
    }
    // Discovery with it fails as a whole, with the same kind of message.
    let err = provider
        .discover(&bad, &|_: &str, _: u64, _: Option<u64>| {})
        .await
        .unwrap_err();
    assert!(
        err.message.contains("SignatureDoesNotMatch"),
        "{}",
        err.message
    );
    assert!(!err.message.contains(wrong_secret));

    // An unknown key id.
    let err = provider
        .test(&target(
            &url,
            json!({}),
            "AKIAUNKNOWNKEY000000",
            wrong_secret,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message.starts_with("InvalidClientTokenId"),
        "{}",
        err.message
    );
    assert!(!err.message.contains(wrong_secret));
    assert!(!err.message.contains("AKIAUNKNOWNKEY000000"));

    // With the right key, the whole discovery passes the emulator's IAM checks.
    let (discovery, _) = discover(&provider, &good).await;
    assert!(discovery.errors.is_empty(), "{:?}", discovery.errors);
    assert_eq!(count(&discovery, "iam_user"), 1);
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_quickly() {
    // A loopback port nobody listens on.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let provider = AwsProvider::new();
    let t = target(&closed, json!({}), KEY_ID, SECRET);
    let started = Instant::now();
    let err = provider.test(&t).await.unwrap_err();
    eprintln!("closed port: {}", err.message);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.message
            .starts_with(&format!("cannot reach STS at {closed}")),
        "{}",
        err.message
    );
    assert!(!err.message.contains(SECRET) && !err.message.contains(KEY_ID));
    let err = provider
        .discover(&t, &|_: &str, _: u64, _: Option<u64>| {})
        .await
        .unwrap_err();
    assert!(err.message.contains("cannot reach IAM"), "{}", err.message);

    // An endpoint that accepts connections but never answers: the request time-out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let provider = AwsProvider::with_options(AwsOptions {
        request_timeout: Duration::from_millis(1500),
        ..AwsOptions::default()
    });
    let started = Instant::now();
    let err = provider
        .test(&target(&silent_url, json!({}), KEY_ID, SECRET))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    eprintln!("silent endpoint: {}", err.message);
    assert!(err.message.contains("no answer within"), "{}", err.message);
    drop(silent);
}

#[tokio::test]
async fn invalid_settings_are_refused() {
    let provider = AwsProvider::new();
    let err = provider
        .test(&target(
            "http://127.0.0.1:9",
            json!({"regionz": "x"}),
            KEY_ID,
            SECRET,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("unknown setting `regionz`"),
        "{}",
        err.message
    );
    let mut t = target("http://127.0.0.1:9", json!({}), KEY_ID, SECRET);
    t.credentials.values.remove("aws_secret_access_key");
    let err = provider.test(&t).await.unwrap_err();
    assert!(err.message.contains("aws_secret_access_key"));
}

#[tokio::test]
async fn discovery_finds_every_seeded_asset_with_its_attributes() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);

    // IAM: alice (two keys, one inactive; a local and an AWS policy; two groups), bob (bare).
    let alice_arn = seed.user("alice").await;
    let bob_arn = seed.user("bob").await;
    let (key1, _) = seed.access_key("alice").await;
    let (key2, _) = seed.access_key("alice").await;
    seed.set_key_status("alice", &key2, "Inactive").await;
    let policy_arn = seed.policy("np-read-buckets", "s3:List*").await;
    let ec2_policy_arn = seed.policy("np-read-ec2", "ec2:Describe*").await;
    seed.attach_user_policy("alice", &policy_arn).await;
    seed.attach_user_policy("alice", &ec2_policy_arn).await;
    for group in ["np-devs", "np-oncall"] {
        seed.group_with(group, "alice").await;
    }
    let audit_arn = seed.policy("np-audit", "iam:Get*").await;
    let role_arn = seed.role("np-auditor", &audit_arn).await;

    // EC2 in two regions.
    let web_sg = seed
        .security_group_with(
            "us-east-1",
            "np-web",
            &[(443, "0.0.0.0/0"), (22, "10.0.0.0/8")],
        )
        .await;
    let web = seed.instance("us-east-1", "web-1", &web_sg).await;
    let db_sg = seed
        .security_group("eu-west-1", "np-db", 5432, "10.1.0.0/16")
        .await;
    let db = seed.instance("eu-west-1", "db-1", &db_sg).await;

    // S3.
    seed.bucket("np-bucket-a").await;
    seed.bucket("np-bucket-b").await;

    let provider = AwsProvider::new();
    let t = target(
        &url,
        json!({"regions": ["us-east-1", "eu-west-1"]}),
        KEY_ID,
        SECRET,
    );
    let (d, progress) = discover(&provider, &t).await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);

    // Users.
    assert_eq!(count(&d, "iam_user"), 2);
    let alice = find(&d, "iam_user", &alice_arn);
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.region, None);
    let a = &alice.attributes;
    assert_eq!(a["user_name"], "alice");
    assert_eq!(a["arn"], alice_arn.as_str());
    assert_eq!(a["path"], "/");
    assert!(a["user_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(a["created_at"].as_str().is_some_and(|s| s.len() >= 10));
    assert!(a.get("password_last_used").is_some());
    let keys = a["access_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let status_of = |id: &str| {
        keys.iter()
            .find(|k| k["access_key_id"] == id)
            .unwrap_or_else(|| panic!("key {id} missing from {keys:?}"))["status"]
            .clone()
    };
    assert_eq!(status_of(&key1), "Active");
    assert_eq!(status_of(&key2), "Inactive");
    assert!(keys.iter().all(|k| k["created_at"].is_string()));
    let mut expected_policies = vec![policy_arn.clone(), ec2_policy_arn.clone()];
    expected_policies.sort();
    assert_eq!(a["attached_policies"], json!(expected_policies));
    assert_eq!(a["groups"], json!(["np-devs", "np-oncall"]));
    let bob = &find(&d, "iam_user", &bob_arn).attributes;
    assert_eq!(bob["access_keys"], json!([]));
    assert_eq!(bob["attached_policies"], json!([]));
    assert_eq!(bob["groups"], json!([]));

    // Roles.
    let role = find(&d, "iam_role", &role_arn);
    assert_eq!(role.name, "np-auditor");
    assert_eq!(role.attributes["role_name"], "np-auditor");
    assert_eq!(role.attributes["arn"], role_arn.as_str());
    assert!(role.attributes["created_at"].is_string());
    assert_eq!(role.attributes["attached_policies"], json!([audit_arn]));

    // Instances, each in its region only.
    for (id, region, name, sg) in [
        (&web, "us-east-1", "web-1", &web_sg),
        (&db, "eu-west-1", "db-1", &db_sg),
    ] {
        let instance = find(&d, "ec2_instance", id);
        assert_eq!(instance.region.as_deref(), Some(region));
        assert_eq!(instance.name, name);
        let i = &instance.attributes;
        assert_eq!(i["instance_id"], id.as_str());
        assert_eq!(i["instance_type"], "t3.micro");
        assert_eq!(i["image_id"], "ami-12c6146b");
        assert!(
            matches!(i["state"].as_str(), Some("running" | "pending")),
            "{i}"
        );
        assert!(i["private_ip"].is_string(), "{i}");
        assert!(i.get("public_ip").is_some());
        assert!(
            i["vpc_id"].as_str().is_some_and(|v| v.starts_with("vpc-")),
            "{i}"
        );
        assert!(
            i["subnet_id"]
                .as_str()
                .is_some_and(|v| v.starts_with("subnet-")),
            "{i}"
        );
        assert_eq!(i["security_groups"][0]["group_id"], sg.as_str());
        assert_eq!(i["tags"], json!({"Name": name, "owner": "nexplane-tests"}));
    }
    assert_eq!(count(&d, "ec2_instance"), 2);

    // Security groups with their rules.
    let web_group = find(&d, "ec2_security_group", &web_sg);
    assert_eq!(web_group.region.as_deref(), Some("us-east-1"));
    assert_eq!(web_group.name, "np-web");
    let g = &web_group.attributes;
    assert_eq!(g["group_id"], web_sg.as_str());
    assert_eq!(g["group_name"], "np-web");
    assert!(g["vpc_id"].is_string());
    let ingress = g["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "{ingress:?}");
    for (port, cidr) in [(443, "0.0.0.0/0"), (22, "10.0.0.0/8")] {
        assert!(
            ingress.iter().any(|r| r["protocol"] == "tcp"
                && r["from_port"] == port
                && r["to_port"] == port
                && r["cidr_blocks"] == json!([cidr])),
            "no rule for {port} from {cidr} in {ingress:?}"
        );
    }
    assert!(g["egress"].as_array().is_some_and(|e| !e.is_empty()), "{g}");
    let db_group = find(&d, "ec2_security_group", &db_sg);
    assert_eq!(db_group.region.as_deref(), Some("eu-west-1"));
    assert_eq!(db_group.attributes["ingress"][0]["from_port"], 5432);
    assert_eq!(
        db_group.attributes["ingress"][0]["cidr_blocks"],
        json!(["10.1.0.0/16"])
    );
    // The default group of each region is there too, and each group only in its region.
    for region in ["us-east-1", "eu-west-1"] {
        assert!(d.assets.iter().any(|a| a.asset_type == "ec2_security_group"
            && a.region.as_deref() == Some(region)
            && a.name == "default"));
    }
    assert!(!d
        .assets
        .iter()
        .any(|a| a.external_id == web_sg && a.region.as_deref() == Some("eu-west-1")));

    // Buckets.
    assert_eq!(count(&d, "s3_bucket"), 2);
    for name in ["np-bucket-a", "np-bucket-b"] {
        let bucket = find(&d, "s3_bucket", name);
        assert_eq!(bucket.name, name);
        assert_eq!(bucket.attributes["bucket_name"], name);
        assert!(bucket.attributes["created_at"].is_string());
    }

    // Progress went through every phase and ended complete.
    let progress = progress.into_inner().unwrap();
    for phase in ["iam", "ec2:us-east-1", "ec2:eu-west-1", "s3"] {
        let last = progress
            .iter()
            .rev()
            .find(|(p, _, _)| p == phase)
            .unwrap_or_else(|| panic!("no progress for {phase}: {progress:?}"));
        assert_eq!(last.2, Some(last.1), "{phase}: {progress:?}");
    }
    assert!(progress.contains(&("iam".to_string(), 2, Some(2))));
    assert!(progress.contains(&("s3".to_string(), 2, Some(2))));
}

#[tokio::test]
async fn an_unknown_region_is_a_partial_failure() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let user_arn = seed.user("np-carol").await;
    let sg = seed
        .security_group("us-east-1", "np-app", 80, "0.0.0.0/0")
        .await;
    let instance = seed.instance("us-east-1", "app-1", &sg).await;
    seed.bucket("np-bucket-c").await;

    let provider = AwsProvider::new();
    let t = target(
        &url,
        json!({"region": "us-east-1", "regions": ["us-east-1", "xx-nowhere-1"]}),
        KEY_ID,
        SECRET,
    );
    let (d, _) = discover(&provider, &t).await;

    // The other region, IAM and S3 are kept…
    find(&d, "ec2_instance", &instance);
    find(&d, "ec2_security_group", &sg);
    find(&d, "iam_user", &user_arn);
    find(&d, "s3_bucket", "np-bucket-c");
    assert!(d
        .assets
        .iter()
        .all(|a| a.region.as_deref() != Some("xx-nowhere-1")));
    // …and the unknown region is reported for both of its asset types.
    assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
    for asset_type in ["ec2_instance", "ec2_security_group"] {
        let failure = d
            .errors
            .iter()
            .find(|e| e.asset_type == asset_type)
            .unwrap_or_else(|| panic!("no failure for {asset_type}: {:?}", d.errors));
        eprintln!("{asset_type}: {}", failure.message);
        assert_eq!(failure.region.as_deref(), Some("xx-nowhere-1"));
        assert!(!failure.message.is_empty());
        assert!(!failure.message.contains(SECRET));
    }
}

#[tokio::test]
async fn a_thousand_users_are_discovered() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let started = Instant::now();
    let keys: Vec<(String, String)> = stream::iter(0..1000)
        .map(|i| {
            let seed = &seed;
            async move {
                let name = format!("np-user-{i:04}");
                seed.user(&name).await;
                let (key_id, _) = seed.access_key(&name).await;
                (name, key_id)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    eprintln!("seeded 1000 users in {:?}", started.elapsed());

    let provider = AwsProvider::new();
    let started = Instant::now();
    let (d, progress) = discover(&provider, &target(&url, json!({}), KEY_ID, SECRET)).await;
    eprintln!("discovered them in {:?}", started.elapsed());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(count(&d, "iam_user"), 1000);
    for (name, key_id) in &keys {
        let arn = format!("arn:aws:iam::{ACCOUNT}:user/{name}");
        let user = find(&d, "iam_user", &arn);
        assert_eq!(user.name, *name);
        assert_eq!(
            user.attributes["access_keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| (
                    k["access_key_id"].as_str().unwrap(),
                    k["status"].as_str().unwrap()
                ))
                .collect::<Vec<_>>(),
            vec![(key_id.as_str(), "Active")]
        );
    }
    let progress = progress.into_inner().unwrap();
    assert!(progress.contains(&("iam".to_string(), 1000, Some(1000))));
    let iam_updates = progress.iter().filter(|(p, _, _)| p == "iam").count();
    assert!(iam_updates <= 110, "progress reported {iam_updates} times");
}

#[tokio::test]
async fn an_assumed_role_is_used_for_every_call() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let (admin_key, admin_secret) = seed.admin("np-deployer").await;
    // Only np-deployer may assume the role, and only with the external id.
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/np-deployer")},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": "np-external-1"}},
        }]
    });
    let role_arn = seed.role_with_trust("np-discovery", &trust).await;
    let everything = seed.policy("np-discovery-all", "*").await;
    seed.attach_role_policy("np-discovery", &everything).await;
    seed.bucket("np-bucket-role").await;
    moto::enable_auth(&url).await;

    let provider = AwsProvider::new();
    let t = target(
        &url,
        json!({"assume_role_arn": role_arn, "external_id": "np-external-1"}),
        &admin_key,
        &admin_secret,
    );
    let identity = provider.test(&t).await.unwrap();
    assert_eq!(identity.account_id, ACCOUNT);
    assert_eq!(
        identity.arn,
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/np-discovery/nexplane")
    );

    let (d, _) = discover(&provider, &t).await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    find(&d, "iam_role", &role_arn);
    find(
        &d,
        "iam_user",
        &format!("arn:aws:iam::{ACCOUNT}:user/np-deployer"),
    );
    find(&d, "s3_bucket", "np-bucket-role");

    // The external id is checked by the trust policy: a wrong one is refused.
    let wrong_id = target(
        &url,
        json!({"assume_role_arn": role_arn, "external_id": "np-external-2"}),
        &admin_key,
        &admin_secret,
    );
    let err = provider.test(&wrong_id).await.unwrap_err();
    assert!(
        err.message
            .starts_with(&format!("AssumeRole {role_arn}: AccessDenied")),
        "{}",
        err.message
    );
    let err = provider
        .discover(&wrong_id, &|_: &str, _: u64, _: Option<u64>| {})
        .await
        .unwrap_err();
    assert!(err.message.contains("AccessDenied"), "{}", err.message);

    // A role that does not exist cannot be assumed: the run fails, naming the role.
    let missing = format!("arn:aws:iam::{ACCOUNT}:role/np-missing");
    let t = target(
        &url,
        json!({"assume_role_arn": missing}),
        &admin_key,
        "not-the-secret-at-all-0123456789",
    );
    let err = provider.test(&t).await.unwrap_err();
    assert!(
        err.message.starts_with(&format!("AssumeRole {missing}: ")),
        "{}",
        err.message
    );
    assert!(!err.message.contains("not-the-secret-at-all-0123456789"));
}
