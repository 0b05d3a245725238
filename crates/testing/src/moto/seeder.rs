//! Seeding and inspecting the emulator through its AWS APIs, with rusoto: an independent
//! client, not the adapter under test.

use super::ACCOUNT;
use rusoto_core::{Client, HttpClient, Region};
use rusoto_credential::StaticProvider;
use rusoto_ec2::Ec2;
use rusoto_iam::Iam;
use rusoto_s3::S3;
use rusoto_sts::Sts;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt;

/// An ingress rule as [`Seeder::ingress`] reads it: `(protocol, from port, to port, cidr)`.
pub type Rule = (String, i64, i64, String);

/// Creates and reads resources through the emulator's AWS APIs (IAM and S3 in `us-east-1`,
/// EC2 in any region). Every call that fails panics.
pub struct Seeder {
    client: Client,
    url: String,
}

impl fmt::Debug for Seeder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seeder").field("url", &self.url).finish()
    }
}

impl Seeder {
    /// A seeder signing with a fixed test key (the emulator checks nothing until
    /// [`enable_auth`](super::enable_auth)).
    pub fn new(url: &str) -> Self {
        Self::with_key(url, "AKIASEEDER0000000000", "seeder-secret")
    }

    /// A seeder signing with this key (for calls while authentication is on).
    pub fn with_key(url: &str, key_id: &str, secret: &str) -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            client: Client::new_with(
                StaticProvider::new_minimal(key_id.into(), secret.into()),
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

    /// An IAM client of this seeder.
    pub fn iam(&self) -> rusoto_iam::IamClient {
        rusoto_iam::IamClient::new_with_client(self.client.clone(), self.region("us-east-1"))
    }

    /// An EC2 client of this seeder in `region`.
    pub fn ec2(&self, region: &str) -> rusoto_ec2::Ec2Client {
        rusoto_ec2::Ec2Client::new_with_client(self.client.clone(), self.region(region))
    }

    /// An S3 client of this seeder.
    pub fn s3(&self) -> rusoto_s3::S3Client {
        rusoto_s3::S3Client::new_with_client(self.client.clone(), self.region("us-east-1"))
    }

    // -----------------------------------------------------------------------------------------
    // IAM

    /// A new IAM user; returns its ARN.
    pub async fn user(&self, name: &str) -> String {
        self.iam()
            .create_user(rusoto_iam::CreateUserRequest {
                user_name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .user
            .unwrap()
            .arn
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
        for policy_arn in self.attached(name).await {
            iam.detach_user_policy(rusoto_iam::DetachUserPolicyRequest {
                policy_arn,
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

    /// Sets an access key of `user` `Active` or `Inactive`.
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

    /// A customer-managed policy allowing `action` on everything; returns its ARN. (The
    /// emulator does not load the AWS-managed policies unless told to.)
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

    /// Attaches a managed policy to a user.
    pub async fn attach_user_policy(&self, user: &str, policy_arn: &str) {
        self.iam()
            .attach_user_policy(rusoto_iam::AttachUserPolicyRequest {
                policy_arn: policy_arn.into(),
                user_name: user.into(),
            })
            .await
            .unwrap();
    }

    /// Puts an inline policy on a user.
    pub async fn put_inline_policy(&self, user: &str, name: &str, document: &Value) {
        self.iam()
            .put_user_policy(rusoto_iam::PutUserPolicyRequest {
                policy_document: document.to_string(),
                policy_name: name.into(),
                user_name: user.into(),
            })
            .await
            .unwrap();
    }

    /// A new group with `user` in it.
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
        let arn = self.role_with_trust(name, &trust).await;
        self.attach_role_policy(name, policy_arn).await;
        arn
    }

    /// A role with this trust policy and no permissions; returns its ARN.
    pub async fn role_with_trust(&self, name: &str, trust: &Value) -> String {
        self.iam()
            .create_role(rusoto_iam::CreateRoleRequest {
                role_name: name.into(),
                assume_role_policy_document: trust.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .role
            .arn
    }

    /// Attaches a managed policy to a role.
    pub async fn attach_role_policy(&self, role: &str, policy_arn: &str) {
        self.iam()
            .attach_role_policy(rusoto_iam::AttachRolePolicyRequest {
                policy_arn: policy_arn.into(),
                role_name: role.into(),
            })
            .await
            .unwrap();
    }

    /// A user allowed everything, with an access key (for runs with authentication on):
    /// (key id, secret).
    pub async fn admin(&self, name: &str) -> (String, String) {
        self.user(name).await;
        let policy = self.policy(&format!("{name}-everything"), "*").await;
        self.attach_user_policy(name, &policy).await;
        self.access_key(name).await
    }

    /// Whom a key/secret pair signs as, by STS GetCallerIdentity (with authentication on,
    /// this checks that the key exists and the secret is right).
    pub async fn caller_arn(&self, key_id: &str, secret: &str) -> Result<String, String> {
        let signer = Seeder::with_key(&self.url, key_id, secret);
        rusoto_sts::StsClient::new_with_client(signer.client, self.region("us-east-1"))
            .get_caller_identity(rusoto_sts::GetCallerIdentityRequest {})
            .await
            .map(|identity| identity.arn.unwrap_or_default())
            .map_err(|e| e.to_string())
    }

    /// `(access key id, status)` of every key of a user, sorted.
    pub async fn keys(&self, user: &str) -> Vec<(String, String)> {
        let mut keys: Vec<(String, String)> = self
            .iam()
            .list_access_keys(rusoto_iam::ListAccessKeysRequest {
                user_name: Some(user.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .access_key_metadata
            .into_iter()
            .map(|k| (k.access_key_id.unwrap(), k.status.unwrap()))
            .collect();
        keys.sort();
        keys
    }

    /// Inline policy names and documents of a user.
    pub async fn inline_policies(&self, user: &str) -> BTreeMap<String, Value> {
        let iam = self.iam();
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
            let document = iam
                .get_user_policy(rusoto_iam::GetUserPolicyRequest {
                    policy_name: name.clone(),
                    user_name: user.into(),
                })
                .await
                .unwrap()
                .policy_document;
            out.insert(name, serde_json::from_str(&document).unwrap());
        }
        out
    }

    /// ARNs of the managed policies attached to a user, sorted.
    pub async fn attached(&self, user: &str) -> Vec<String> {
        let mut arns: Vec<String> = self
            .iam()
            .list_attached_user_policies(rusoto_iam::ListAttachedUserPoliciesRequest {
                user_name: user.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .attached_policies
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.policy_arn.unwrap())
            .collect();
        arns.sort();
        arns
    }

    /// Everything an IAM change may touch on a user: its keys, inline and attached policies.
    pub async fn user_state(&self, user: &str) -> Value {
        json!({
            "keys": self.keys(user).await,
            "inline": self.inline_policies(user).await,
            "attached": self.attached(user).await,
        })
    }

    /// The names of every IAM user, sorted.
    pub async fn user_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .iam()
            .list_users(rusoto_iam::ListUsersRequest::default())
            .await
            .unwrap()
            .users
            .into_iter()
            .map(|u| u.user_name)
            .collect();
        names.sort();
        names
    }

    // -----------------------------------------------------------------------------------------
    // EC2 and S3

    /// A security group in the default VPC of `region` allowing TCP `port` from `cidr`;
    /// returns its id.
    pub async fn security_group(&self, region: &str, name: &str, port: i64, cidr: &str) -> String {
        self.security_group_with(region, name, &[(port, cidr)])
            .await
    }

    /// A security group in the default VPC of `region` allowing TCP from each `(port, cidr)`;
    /// returns its id.
    pub async fn security_group_with(
        &self,
        region: &str,
        name: &str,
        rules: &[(i64, &str)],
    ) -> String {
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
        let permissions = rules
            .iter()
            .map(|&(port, cidr)| rusoto_ec2::IpPermission {
                ip_protocol: Some("tcp".into()),
                from_port: Some(port),
                to_port: Some(port),
                ip_ranges: Some(vec![rusoto_ec2::IpRange {
                    cidr_ip: Some(cidr.into()),
                    description: None,
                }]),
                ..Default::default()
            })
            .collect();
        ec2.authorize_security_group_ingress(rusoto_ec2::AuthorizeSecurityGroupIngressRequest {
            group_id: Some(id.clone()),
            ip_permissions: Some(permissions),
            ..Default::default()
        })
        .await
        .unwrap();
        id
    }

    /// Deletes a security group.
    pub async fn delete_security_group(&self, region: &str, group_id: &str) {
        self.ec2(region)
            .delete_security_group(rusoto_ec2::DeleteSecurityGroupRequest {
                group_id: Some(group_id.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// `(protocol, from, to, cidr)` of every IPv4 ingress rule of a group, sorted.
    pub async fn ingress(&self, region: &str, group_id: &str) -> Vec<Rule> {
        let groups = self
            .ec2(region)
            .describe_security_groups(rusoto_ec2::DescribeSecurityGroupsRequest {
                group_ids: Some(vec![group_id.into()]),
                ..Default::default()
            })
            .await
            .unwrap()
            .security_groups
            .unwrap();
        let mut rules = Vec::new();
        for permission in groups[0].ip_permissions.clone().unwrap_or_default() {
            for range in permission.ip_ranges.clone().unwrap_or_default() {
                rules.push((
                    permission.ip_protocol.clone().unwrap(),
                    permission.from_port.unwrap_or(-1),
                    permission.to_port.unwrap_or(-1),
                    range.cidr_ip.unwrap(),
                ));
            }
        }
        rules.sort();
        rules
    }

    /// A running instance named `name` in `region` (tags `Name` and
    /// `owner: nexplane-tests`); returns its id.
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

    /// The state name of an instance (`running`, `stopped`…).
    pub async fn instance_state(&self, region: &str, id: &str) -> String {
        self.ec2(region)
            .describe_instances(rusoto_ec2::DescribeInstancesRequest {
                instance_ids: Some(vec![id.into()]),
                ..Default::default()
            })
            .await
            .unwrap()
            .reservations
            .unwrap_or_default()
            .into_iter()
            .flat_map(|r| r.instances.unwrap_or_default())
            .find(|i| i.instance_id.as_deref() == Some(id))
            .and_then(|i| i.state)
            .and_then(|s| s.name)
            .unwrap_or_else(|| panic!("instance {id} not found"))
    }

    /// Asks the emulator to stop an instance (it does not wait).
    pub async fn stop_instance(&self, region: &str, id: &str) {
        self.ec2(region)
            .stop_instances(rusoto_ec2::StopInstancesRequest {
                instance_ids: vec![id.into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// A new S3 bucket.
    pub async fn bucket(&self, name: &str) {
        self.s3()
            .create_bucket(rusoto_s3::CreateBucketRequest {
                bucket: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}
