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
