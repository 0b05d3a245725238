//! The port to cloud providers (api.md §4 test, §5 discovery). The `aws` adapter implements it.
//!
//! Calls are asynchronous (they cross the network) and return boxed futures, so the trait
//! stays object-safe and free of any runtime crate. They are never made while a database
//! transaction is open.

use nexplane_domain::SecretString;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

/// A boxed future returned by the cloud port.
pub type CloudFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Credentials of a connector, opened from their sealed form just for the call.
#[derive(Debug, Clone)]
pub struct CloudCredentials {
    /// Every credential value by name (e.g. `aws_access_key_id`). Values are secret.
    pub values: BTreeMap<String, SecretString>,
}

/// Non-secret connector settings (api.md §4 `settings`), as JSON.
#[derive(Debug, Clone)]
pub struct CloudTarget {
    /// Connector type, e.g. `aws`.
    pub connector_type: String,
    /// The connector's `settings` object.
    pub settings: serde_json::Value,
    /// The connector's credentials.
    pub credentials: CloudCredentials,
}

/// Who the credentials are, per the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudIdentity {
    /// Account id.
    pub account_id: String,
    /// ARN (or the provider's equivalent) of the caller.
    pub arn: String,
}

/// A provider-side failure. The message is the provider's, never containing a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CloudError {
    /// Provider message, e.g. `InvalidClientTokenId: The security token … is invalid`.
    pub message: String,
}

/// One discovered resource.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredAsset {
    /// Asset type, e.g. `iam_user`, `ec2_instance`.
    pub asset_type: String,
    /// The provider's stable id (ARN, instance id).
    pub external_id: String,
    /// Display name.
    pub name: String,
    /// Region, for regional resources.
    pub region: Option<String>,
    /// Type-specific attributes (api.md §5).
    pub attributes: serde_json::Value,
}

/// The result of one discovery run: what was found, and what could not be listed.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// Everything found.
    pub assets: Vec<DiscoveredAsset>,
    /// Partial failures, e.g. `ec2_instance in eu-west-3: UnauthorizedOperation …`.
    /// Asset types listed here were not completely discovered (so nothing of those types is
    /// marked removed).
    pub errors: Vec<PartialFailure>,
}

/// A part of a discovery that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialFailure {
    /// Asset type concerned.
    pub asset_type: String,
    /// Region concerned, if regional.
    pub region: Option<String>,
    /// Provider message.
    pub message: String,
}

/// Progress callback of a discovery: (phase, done, total).
pub type ProgressFn<'a> = &'a (dyn Fn(&str, u64, Option<u64>) + Send + Sync);

/// A cloud provider adapter.
pub trait CloudProvider: Send + Sync {
    /// Connector types this adapter serves (e.g. `["aws"]`).
    fn connector_types(&self) -> &'static [&'static str];
    /// Checks the credentials (for `aws`: STS GetCallerIdentity, assuming the role when set).
    fn test<'a>(
        &'a self,
        target: &'a CloudTarget,
    ) -> CloudFuture<'a, Result<CloudIdentity, CloudError>>;
    /// Lists every supported asset in every configured region. A failure of the whole run
    /// (bad credentials, unreachable endpoint) is `Err`; partial failures are in the result.
    fn discover<'a>(
        &'a self,
        target: &'a CloudTarget,
        progress: ProgressFn<'a>,
    ) -> CloudFuture<'a, Result<Discovery, CloudError>>;
}

// ---------------------------------------------------------------------------------------------
// Changes (api.md §6.2, §6.3)

/// What a change type's precheck found at the provider: the state its steps (and their undo)
/// act on, e.g. `{"old_access_key_id": "AKIA…", "keys_before": ["AKIA…"]}`. Never secret.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prechecked {
    /// Recorded in the execution journal's context and handed to every step.
    pub context: serde_json::Map<String, serde_json::Value>,
}

/// One step (or undo step) to run.
#[derive(Debug, Clone, Copy)]
pub struct StepCall<'a> {
    /// The change type, e.g. `rotate_iam_access_key`.
    pub change_type: &'a str,
    /// The step name from `nexplane_domain::execution::plan` (an undo step's name during a
    /// rollback), e.g. `create_access_key` or `delete_new_access_key`.
    pub step: &'a str,
    /// The change request's `target`, valid against the change type's schema.
    pub target: &'a serde_json::Value,
    /// The precheck's context merged with the outputs of the steps run so far (for a
    /// rollback: everything the execution recorded), as a JSON object.
    pub context: &'a serde_json::Value,
    /// The step was started before an interruption (crash, restart): its provider call may
    /// or may not have happened. The adapter must look at the provider first and never make
    /// the change twice (e.g. never create a second access key).
    pub resumed: bool,
}

/// What a step did.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// One line for people, e.g. `created access key AKIA…`. Never secret.
    pub detail: String,
    /// Non-secret outputs, merged into the journal's outputs (e.g. `new_access_key_id`).
    pub outputs: serde_json::Map<String, serde_json::Value>,
    /// Secret outputs by name (e.g. `new_secret_access_key`): sealed by the engine, revealed
    /// once.
    pub secrets: BTreeMap<String, SecretString>,
}

/// Why a change (precheck or step) did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The provider's state does not allow the change (missing user, no free key slot, key
    /// still active, unknown instance…). Nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// The provider call failed (error message from the provider, never a credential).
    #[error("{0}")]
    Provider(CloudError),
    /// This adapter does not know the change type or step.
    #[error("unsupported change: {0}")]
    Unsupported(String),
}

impl From<CloudError> for ChangeError {
    fn from(e: CloudError) -> Self {
        ChangeError::Provider(e)
    }
}

/// A provider adapter that can make changes (the `aws` adapter for the AWS change types).
pub trait ChangeProvider: Send + Sync {
    /// The change types this adapter runs.
    fn change_types(&self) -> &'static [&'static str];
    /// Checks, read-only, that the change can be made against the live provider, and
    /// records what the steps need. Runs before the first mutating step.
    fn precheck<'a>(
        &'a self,
        target: &'a CloudTarget,
        change_type: &'a str,
        change_target: &'a serde_json::Value,
    ) -> CloudFuture<'a, Result<Prechecked, ChangeError>>;
    /// Runs one execution step.
    fn apply_step<'a>(
        &'a self,
        target: &'a CloudTarget,
        call: StepCall<'a>,
    ) -> CloudFuture<'a, Result<StepOutcome, ChangeError>>;
    /// Runs one undo step of a rollback. Undo steps tolerate a change that was made only in
    /// part or not at all (the step failed or was interrupted): undoing nothing succeeds.
    fn undo_step<'a>(
        &'a self,
        target: &'a CloudTarget,
        call: StepCall<'a>,
    ) -> CloudFuture<'a, Result<StepOutcome, ChangeError>>;
}
