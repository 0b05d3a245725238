//! The `aws` connector adapter: [`AwsProvider`] implements
//! [`nexplane_ports::cloud::CloudProvider`] (connection test, discovery) and
//! [`nexplane_ports::cloud::ChangeProvider`] (the eleven AWS change types) with rusoto (STS,
//! IAM, EC2, S3). This is the only crate of the workspace that knows AWS (rusoto is
//! unmaintained, RUSTSEC-2022-0071, and stays confined here).
//!
//! # Connector
//! - Credentials: `aws_access_key_id`, `aws_secret_access_key` (required) and
//!   `aws_session_token` (optional); a `region` given there is used when the settings have none.
//! - Settings ([`settings::parse_settings`]): `region` (default `us-east-1`), `regions`
//!   (default `[region]`), `endpoint_url` (every service is called there, `http://` included,
//!   e.g. a local emulator), `assume_role_arn` and `external_id` (STS AssumeRole first, then
//!   everything runs under the temporary credentials). Any other key is an error.
//!
//! # Calls
//! - `test`: STS GetCallerIdentity.
//! - `discover`: IAM GetAccountAuthorizationDetails (users and roles with their groups and
//!   attached policies, paged) together with ListUsers (for `password_last_used`), then
//!   ListAccessKeys per user with bounded parallelism; per region of `regions`,
//!   DescribeInstances and DescribeSecurityGroups (paged); S3 ListBuckets. For N users in one
//!   IAM page that is N + 2 IAM calls, 2 calls per region and 1 for S3 (+1 with AssumeRole).
//!
//! # Asset types and attributes (api.md §5)
//! - `iam_user` (external id: ARN): `user_name`, `user_id`, `arn`, `path`, `created_at`,
//!   `password_last_used` (null when never used or unknown), `access_keys`
//!   (`[{access_key_id, status, created_at}]`), `attached_policies` (`[arn]`), `groups`
//!   (`[name]`), `inline_policies` (`[name]`), `permissions_boundary`, `tags` (`{key: value}`).
//! - `iam_role` (ARN): `role_name`, `role_id`, `arn`, `path`, `created_at`, `attached_policies`,
//!   `inline_policies`, `last_used_at`, `tags`.
//! - `ec2_instance` (instance id, `region` set): `instance_id`, `instance_type`, `state`,
//!   `image_id`, `private_ip`, `public_ip`, `vpc_id`, `subnet_id`, `security_groups`
//!   (`[{group_id, group_name}]`), `tags`, `launch_time`, `availability_zone`, `key_name`.
//! - `ec2_security_group` (group id, `region` set): `group_id`, `group_name`, `description`,
//!   `vpc_id`, `owner_id`, `ingress` and `egress` (`[{protocol, from_port, to_port,
//!   cidr_blocks, ipv6_cidr_blocks, source_security_groups, prefix_list_ids}]`), `tags`.
//! - `s3_bucket` (bucket name): `bucket_name`, `created_at`.
//!
//! # Changes (api.md §6.2, §6.3)
//! The step names are those of `nexplane_domain::execution::plan`. `precheck` only reads; it
//! answers `ChangeError::Refused` (nothing changed) when the provider's state does not allow
//! the change or when its rollback could damage what was there before, and
//! `ChangeError::Provider` when a call fails for another reason (credentials, network).
//! Its context is handed back to every step merged with the outputs of the earlier steps.
//! Every step and undo step looks at the provider before it acts: run again after an
//! interruption (`resumed`) it never makes its change twice, and an undo step whose step was
//! made only in part, or not at all, succeeds with a detail saying there was nothing to undo.
//! A missing user is refused as `IAM user <name> does not exist`.
//!
//! - `rotate_iam_access_key` (`iam_user`, optional `access_key_id`). Precheck: the user
//!   exists; the key to replace is one of its keys, or, when none is named, its only key (no
//!   key, or two keys and no `access_key_id`, is refused); fewer than two keys (a slot is free).
//!   Context: `old_access_key_id`, `old_key_status` (`Active`/`Inactive`), `keys_before`
//!   (`[id]`). Steps: `create_access_key` (CreateAccessKey; outputs `new_access_key_id`,
//!   `old_access_key_id`, and `discarded_access_key_ids` when a key was deleted, see below;
//!   secret `new_secret_access_key`), `deactivate_old_access_key` (old key `Inactive`). Resumed,
//!   `create_access_key` first deletes every key that is neither the old key nor in
//!   `keys_before` (created by the interrupted attempt; its secret is lost), then creates a
//!   fresh one. A CreateAccessKey whose answer never arrives (time-out, dropped connection)
//!   does the same clean-up before failing. Undo: `reactivate_old_access_key` (old key `Active`
//!   again, only if `old_key_status` was `Active`), `delete_new_access_key` (deletes
//!   `new_access_key_id`, or, when none was recorded, every key that is neither the old key
//!   nor in `keys_before`; never a key that existed before).
//! - `deactivate_iam_access_key` (`iam_user`, `access_key_id`). Precheck: the key is the
//!   user's and `Active`. Context: `access_key_id`, `previous_status`. Step
//!   `deactivate_access_key`; undo `reactivate_access_key`.
//! - `delete_iam_access_key` (`iam_user`, `access_key_id`). Precheck: the key is the user's and
//!   already `Inactive` (an `Active` key: "… is still Active; deactivate it first"). Context:
//!   `access_key_id`, `previous_status`. Step `delete_access_key` (output
//!   `deleted_access_key_id`; refused if the key became `Active` again); no undo.
//! - `lock_iam_user` (`iam_user`). Precheck: the user has no inline policy
//!   [`LOCK_POLICY_NAME`] yet. Context: `keys_to_deactivate` (the ids of its `Active` keys).
//!   Steps: `attach_lock_policy` (PutUserPolicy of the deny-all [`LOCK_POLICY_DOCUMENT`]),
//!   `deactivate_active_keys` (output `deactivated_keys`). Undo: `reactivate_deactivated_keys`
//!   (`deactivated_keys`, else `keys_to_deactivate`), `remove_lock_policy`.
//! - `unlock_iam_user` (`iam_user`). Precheck: the user has `NexplaneLock`. Context:
//!   `lock_policy_document` (its document, decoded). Step `remove_lock_policy`; undo
//!   `restore_lock_policy` (puts the recorded document back).
//! - `attach_iam_user_policy` / `detach_iam_user_policy` (`iam_user`, `policy_arn`). Precheck:
//!   the user exists; for attach the policy exists and is not attached, for detach it is
//!   attached. Context: `policy_arn`. Steps `attach_user_policy` / `detach_user_policy`; undo
//!   `detach_user_policy` / `reattach_user_policy`.
//! - `stop_ec2_instance` / `start_ec2_instance` (`instance_id`, optional `region`, default the
//!   connector's `region`). Precheck: the instance exists in the region ("instance i-… not
//!   found in `<region>`") and is `running`/`pending` (stop) or `stopped` (start). Context:
//!   `region`, `previous_state`. Steps `stop_instance` / `start_instance` (output
//!   `instance_state`); undo `start_instance` / `stop_instance`. Each asks for the move at most
//!   once and waits (DescribeInstances with growing pauses, up to [`AwsOptions::state_wait`])
//!   until the instance is `stopped` / `running`.
//! - `revoke_security_group_ingress` / `authorize_security_group_ingress` (`group_id`,
//!   `protocol`, `from_port`, `to_port`, `cidr`, optional `region`). Precheck: the group exists
//!   in the region, and the exact rule exists (revoke) or does not (authorize). Context:
//!   `region`, `rule` (`{protocol, from_port, to_port, cidr}`). Steps `revoke_ingress` /
//!   `authorize_ingress`; undo `restore_ingress` / `remove_ingress`; each one IpPermission with
//!   one IpRange.
//!
//! Step details are one line for people and outputs are never secret; the only secret is
//! `new_secret_access_key`, which appears in no message.
//!
//! # Errors
//! Messages carry the provider's code and message (`InvalidClientTokenId: The security token
//! included in the request is invalid.`) or say which endpoint could not be reached; every
//! credential value (also the temporary ones from AssumeRole) is replaced by `[redacted]`
//! should the provider echo one. Every call has a time-out, so nothing hangs.
#![deny(missing_docs)]

mod change;
mod discover;
mod error;
mod session;
pub mod settings;

pub use change::{LOCK_POLICY_DOCUMENT, LOCK_POLICY_NAME};
use hyper::client::HttpConnector;
use hyper_rustls::HttpsConnector;
use nexplane_ports::cloud::{
    CloudError, CloudFuture, CloudIdentity, CloudProvider, CloudTarget, Discovery, ProgressFn,
};
use rusoto_core::HttpClient;
use rusoto_sts::{GetCallerIdentityRequest, Sts};
use session::Session;
use std::sync::Arc;
use std::time::Duration;

/// The connector type this adapter serves.
pub const CONNECTOR_TYPE: &str = "aws";

/// The asset types a discovery returns (api.md §5).
pub const ASSET_TYPES: [&str; 5] = [
    discover::IAM_USER,
    discover::IAM_ROLE,
    discover::EC2_INSTANCE,
    discover::EC2_SECURITY_GROUP,
    discover::S3_BUCKET,
];

/// The HTTP client every rusoto client of the process shares (connection pool included).
pub(crate) type Dispatcher = HttpClient<HttpsConnector<HttpConnector>>;

/// Time-outs and parallelism of an [`AwsProvider`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsOptions {
    /// Time allowed to open a TCP connection (default 10 s).
    pub connect_timeout: Duration,
    /// Time allowed for one request, connection included (default 20 s). Throttled calls are
    /// retried a few times, each try with this limit.
    pub request_timeout: Duration,
    /// Per-user IAM calls in flight at once during discovery (default 16).
    pub max_in_flight: usize,
    /// How long a stop or start step waits for the instance to be `stopped` or `running`
    /// (default 5 min; the instance is looked at with growing pauses of up to 5 s).
    pub state_wait: Duration,
}

impl Default for AwsOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(20),
            max_in_flight: 16,
            state_wait: Duration::from_secs(300),
        }
    }
}

/// The `aws` cloud provider. Cheap to share: one per process is enough (it holds the HTTP
/// connection pool).
///
/// ```
/// use nexplane_aws::AwsProvider;
/// use nexplane_ports::cloud::CloudProvider;
/// let provider = AwsProvider::new();
/// assert_eq!(provider.connector_types(), &["aws"]);
/// ```
pub struct AwsProvider {
    dispatcher: Arc<Dispatcher>,
    options: AwsOptions,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Default for AwsProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl AwsProvider {
    /// A provider with the default [`AwsOptions`].
    pub fn new() -> Self {
        Self::with_options(AwsOptions::default())
    }

    /// A provider with the given time-outs and parallelism.
    pub fn with_options(options: AwsOptions) -> Self {
        let mut http = HttpConnector::new();
        // The https connector below decides the scheme; plain http is allowed so that an
        // `endpoint_url` such as `http://127.0.0.1:5000` (an emulator) works.
        http.enforce_http(false);
        http.set_connect_timeout(Some(options.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let options = AwsOptions {
            max_in_flight: options.max_in_flight.max(1),
            ..options
        };
        Self {
            dispatcher: Arc::new(HttpClient::from_connector(connector)),
            options,
        }
    }

    /// The options in force.
    pub fn options(&self) -> AwsOptions {
        self.options
    }

    async fn test_identity(&self, target: &CloudTarget) -> Result<CloudIdentity, CloudError> {
        let session = Session::open(target, &self.dispatcher, self.options.request_timeout).await?;
        let sts = session.sts();
        let region = session.settings.region.clone();
        let answer = session
            .call("STS", &region, || {
                sts.get_caller_identity(GetCallerIdentityRequest {})
            })
            .await
            .map_err(error::CallError::into_cloud)?;
        match (answer.account, answer.arn) {
            (Some(account_id), Some(arn)) => Ok(CloudIdentity { account_id, arn }),
            _ => Err(CloudError {
                message: "STS GetCallerIdentity answered without an account or ARN".into(),
            }),
        }
    }
}

impl CloudProvider for AwsProvider {
    fn connector_types(&self) -> &'static [&'static str] {
        &[CONNECTOR_TYPE]
    }

    fn test<'a>(
        &'a self,
        target: &'a CloudTarget,
    ) -> CloudFuture<'a, Result<CloudIdentity, CloudError>> {
        Box::pin(self.test_identity(target))
    }

    fn discover<'a>(
        &'a self,
        target: &'a CloudTarget,
        progress: ProgressFn<'a>,
    ) -> CloudFuture<'a, Result<Discovery, CloudError>> {
        Box::pin(async move {
            let session =
                Session::open(target, &self.dispatcher, self.options.request_timeout).await?;
            discover::run(&session, progress, self.options.max_in_flight).await
        })
    }
}
