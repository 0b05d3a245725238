//! The AWS emulator (`moto_server`) for the discovery tests, and seeding it through its AWS
//! APIs with rusoto.
//!
//! The emulator is `NEXPLANE_TEST_MOTO_URL` (`cargo xtask test` starts one). When that is
//! unset, a test run with `CI=true` fails; elsewhere a `moto_server` is started from
//! `<workspace>/.venv-moto` for the life of this test process. The emulator holds one state
//! for everyone, so the tests that use it take turns: each takes the emulator, resets it and
//! switches request authentication off.

use crate::harness::free_port;
use rusoto_core::{Client, HttpClient, Region};
use rusoto_credential::StaticProvider;
use rusoto_ec2::Ec2;
use rusoto_iam::Iam;
use rusoto_s3::S3;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The account every emulator request lands in.
pub const ACCOUNT: &str = "123456789012";

static URL: OnceLock<Result<String, String>> = OnceLock::new();
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A POST to the emulator's control API, e.g. `/moto-api/reset`.
async fn control(url: &str, path: &str, body: &str) -> Result<(), String> {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .body(body.to_owned())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!("{path}: HTTP {}", r.status()))
    }
}

fn launch() -> Result<String, String> {
    if let Some(url) = std::env::var("NEXPLANE_TEST_MOTO_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return Ok(url.trim().trim_end_matches('/').to_owned());
    }
    if is_ci() {
        return Err(
            "NEXPLANE_TEST_MOTO_URL is not set (with CI=true the tests do not start an emulator \
             themselves: run them through `cargo xtask test`)"
                .into(),
        );
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let server = root.join(".venv-moto/bin/moto_server");
    if !server.exists() {
        return Err(format!(
            "NEXPLANE_TEST_MOTO_URL is not set and {} does not exist: run `cargo xtask test`",
            server.display()
        ));
    }
    let port = free_port();
    // A shell starts the emulator and stops it when this test process is gone.
    Command::new("sh")
        .arg("-c")
        .arg(
            r#""$0" -H 127.0.0.1 -p "$1" >/dev/null 2>&1 & emu=$!
               while kill -0 "$2" 2>/dev/null && kill -0 "$emu" 2>/dev/null; do sleep 1; done
               kill "$emu" 2>/dev/null"#,
        )
        .arg(&server)
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", server.display()))?;
    Ok(format!("http://127.0.0.1:{port}"))
}

/// Takes the emulator for one test: waits for the previous user, resets every service and
/// switches authentication off. Keep the guard for the whole test.
pub async fn take() -> (tokio::sync::MutexGuard<'static, ()>, String) {
    let turn = TURN.lock().await;
    let url = URL
        .get_or_init(launch)
        .clone()
        .unwrap_or_else(|e| panic!("AWS emulator: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match control(&url, "/moto-api/reset", "").await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => panic!("AWS emulator at {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    control(&url, "/moto-api/reset-auth", "inf").await.unwrap();
    (turn, url)
}

/// From now on the emulator checks every request's signature and IAM permissions.
pub async fn enable_auth(url: &str) {
    control(url, "/moto-api/reset-auth", "0").await.unwrap();
}

/// Creates resources through the emulator's AWS APIs.
pub struct Seeder {
    client: Client,
    url: String,
}

impl Seeder {
    pub fn new(url: &str) -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            client: Client::new_with(
                StaticProvider::new_minimal("AKIASEEDER0000000000".into(), "seeder-secret".into()),
                HttpClient::from_connector(https),
            ),
            url: url.to_owned(),
        }
    }

    fn region(&self, name: &str) -> Region {
        Region::Custom {
            name: name.into(),
            endpoint: self.url.clone(),
        }
    }

    pub fn iam(&self) -> rusoto_iam::IamClient {
        rusoto_iam::IamClient::new_with_client(self.client.clone(), self.region("us-east-1"))
    }

    pub fn ec2(&self, region: &str) -> rusoto_ec2::Ec2Client {
        rusoto_ec2::Ec2Client::new_with_client(self.client.clone(), self.region(region))
    }

    pub async fn user(&self, name: &str) -> String {
        let r = self
            .iam()
            .create_user(rusoto_iam::CreateUserRequest {
                user_name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        r.user.unwrap().arn
    }

    /// Deletes a user with its access keys, policies and group memberships.
    pub async fn delete_user(&self, name: &str) {
        let iam = self.iam();
        let keys = iam
            .list_access_keys(rusoto_iam::ListAccessKeysRequest {
                user_name: Some(name.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        for k in keys.access_key_metadata {
            iam.delete_access_key(rusoto_iam::DeleteAccessKeyRequest {
                access_key_id: k.access_key_id.unwrap(),
                user_name: Some(name.into()),
            })
            .await
            .unwrap();
        }
        let groups = iam
            .list_groups_for_user(rusoto_iam::ListGroupsForUserRequest {
                user_name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        for g in groups.groups {
            iam.remove_user_from_group(rusoto_iam::RemoveUserFromGroupRequest {
                group_name: g.group_name,
                user_name: name.into(),
            })
            .await
            .unwrap();
        }
        let policies = iam
            .list_attached_user_policies(rusoto_iam::ListAttachedUserPoliciesRequest {
                user_name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        for p in policies.attached_policies.unwrap_or_default() {
            iam.detach_user_policy(rusoto_iam::DetachUserPolicyRequest {
                policy_arn: p.policy_arn.unwrap(),
                user_name: name.into(),
            })
            .await
            .unwrap();
        }
        iam.delete_user(rusoto_iam::DeleteUserRequest {
            user_name: name.into(),
        })
        .await
        .unwrap();
    }

    /// A new access key of `user`: (key id, secret).
    pub async fn access_key(&self, user: &str) -> (String, String) {
        let k = self
            .iam()
            .create_access_key(rusoto_iam::CreateAccessKeyRequest {
                user_name: Some(user.into()),
            })
            .await
            .unwrap()
            .access_key;
        (k.access_key_id, k.secret_access_key)
    }

    pub async fn set_key_status(&self, user: &str, key_id: &str, status: &str) {
        self.iam()
            .update_access_key(rusoto_iam::UpdateAccessKeyRequest {
                access_key_id: key_id.into(),
                status: status.into(),
                user_name: Some(user.into()),
            })
            .await
            .unwrap();
    }

    /// A customer-managed policy allowing `action` on everything; returns its ARN.
    pub async fn policy(&self, name: &str, action: &str) -> String {
        let doc = json!({"Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]});
        self.iam()
            .create_policy(rusoto_iam::CreatePolicyRequest {
                policy_name: name.into(),
                policy_document: doc.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .policy
            .unwrap()
            .arn
            .unwrap()
    }

    pub async fn attach_user_policy(&self, user: &str, policy_arn: &str) {
        self.iam()
            .attach_user_policy(rusoto_iam::AttachUserPolicyRequest {
                policy_arn: policy_arn.into(),
                user_name: user.into(),
            })
            .await
            .unwrap();
    }

    pub async fn group_with(&self, group: &str, user: &str) {
        let iam = self.iam();
        iam.create_group(rusoto_iam::CreateGroupRequest {
            group_name: group.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        iam.add_user_to_group(rusoto_iam::AddUserToGroupRequest {
            group_name: group.into(),
            user_name: user.into(),
        })
        .await
        .unwrap();
    }

    /// A role that the account may assume, with `policy_arn` attached; returns its ARN.
    pub async fn role(&self, name: &str, policy_arn: &str) -> String {
        let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")},
            "Action": "sts:AssumeRole"}]});
        let iam = self.iam();
        let arn = iam
            .create_role(rusoto_iam::CreateRoleRequest {
                role_name: name.into(),
                assume_role_policy_document: trust.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .role
            .arn;
        iam.attach_role_policy(rusoto_iam::AttachRolePolicyRequest {
            policy_arn: policy_arn.into(),
            role_name: name.into(),
        })
        .await
        .unwrap();
        arn
    }

    /// A user allowed everything, with an access key (for runs with authentication on).
    pub async fn admin(&self, name: &str) -> (String, String) {
        self.user(name).await;
        let policy = self.policy(&format!("{name}-everything"), "*").await;
        self.attach_user_policy(name, &policy).await;
        self.access_key(name).await
    }

    /// A security group in the default VPC of `region` allowing TCP `port` from `cidr`.
    pub async fn security_group(&self, region: &str, name: &str, port: i64, cidr: &str) -> String {
        let ec2 = self.ec2(region);
        let id = ec2
            .create_security_group(rusoto_ec2::CreateSecurityGroupRequest {
                group_name: name.into(),
                description: format!("{name} (nexplane tests)"),
                ..Default::default()
            })
            .await
            .unwrap()
            .group_id
            .unwrap();
        ec2.authorize_security_group_ingress(rusoto_ec2::AuthorizeSecurityGroupIngressRequest {
            group_id: Some(id.clone()),
            ip_permissions: Some(vec![rusoto_ec2::IpPermission {
                ip_protocol: Some("tcp".into()),
                from_port: Some(port),
                to_port: Some(port),
                ip_ranges: Some(vec![rusoto_ec2::IpRange {
                    cidr_ip: Some(cidr.into()),
                    description: None,
                }]),
                ..Default::default()
            }]),
            ..Default::default()
        })
        .await
        .unwrap();
        id
    }

    pub async fn delete_security_group(&self, region: &str, group_id: &str) {
        self.ec2(region)
            .delete_security_group(rusoto_ec2::DeleteSecurityGroupRequest {
                group_id: Some(group_id.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// A running instance named `name` in `region`; returns its id.
    pub async fn instance(&self, region: &str, name: &str, group_id: &str) -> String {
        let tags = vec![
            rusoto_ec2::Tag {
                key: Some("Name".into()),
                value: Some(name.into()),
            },
            rusoto_ec2::Tag {
                key: Some("owner".into()),
                value: Some("nexplane-tests".into()),
            },
        ];
        let r = self
            .ec2(region)
            .run_instances(rusoto_ec2::RunInstancesRequest {
                image_id: Some("ami-12c6146b".into()),
                instance_type: Some("t3.micro".into()),
                min_count: 1,
                max_count: 1,
                security_group_ids: Some(vec![group_id.into()]),
                tag_specifications: Some(vec![rusoto_ec2::TagSpecification {
                    resource_type: Some("instance".into()),
                    tags: Some(tags),
                }]),
                ..Default::default()
            })
            .await
            .unwrap();
        r.instances.unwrap()[0].instance_id.clone().unwrap()
    }

    pub async fn bucket(&self, name: &str) {
        rusoto_s3::S3Client::new_with_client(self.client.clone(), self.region("us-east-1"))
            .create_bucket(rusoto_s3::CreateBucketRequest {
                bucket: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// The settings of a connector pointed at the emulator.
pub fn settings(url: &str, regions: &[&str]) -> Value {
    json!({"endpoint_url": url, "region": regions[0], "regions": regions})
}
