//! One connector's view of AWS for the length of a call: its settings, the credentials to
//! sign with (after AssumeRole when configured), and the clients per service and region.

use crate::error::{classify, timed_out, CallError, CallSite, Redactor};
use crate::settings::{parse_target, AwsSettings};
use crate::Dispatcher;
use nexplane_ports::cloud::{CloudError, CloudTarget};
use rusoto_core::{Client, Region, RusotoError};
use rusoto_credential::StaticProvider;
use rusoto_ec2::Ec2Client;
use rusoto_iam::IamClient;
use rusoto_s3::S3Client;
use rusoto_sts::{AssumeRoleRequest, Sts, StsClient};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Session name recorded by CloudTrail for the role we assume.
const ROLE_SESSION_NAME: &str = "nexplane";

/// Error codes worth another try after a pause.
const RETRY_CODES: [&str; 7] = [
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestThrottled",
    "SlowDown",
    "ServiceUnavailable",
];
/// Tries of one call in all (the first and up to three retries).
const MAX_TRIES: u32 = 4;

pub(crate) struct Session {
    client: Client,
    pub settings: AwsSettings,
    redactor: Redactor,
    request_timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("settings", &self.settings)
            .field("credentials", &"[redacted]")
            .finish()
    }
}

impl Session {
    /// Validates the target and, when `assume_role_arn` is set, assumes the role.
    pub async fn open(
        target: &CloudTarget,
        dispatcher: &Arc<Dispatcher>,
        request_timeout: Duration,
    ) -> Result<Self, CloudError> {
        let (settings, keys) = parse_target(target)?;
        let mut redactor = Redactor::default();
        redactor.add(keys.access_key_id.expose());
        redactor.add(keys.secret_access_key.expose());
        if let Some(token) = &keys.session_token {
            redactor.add(token.expose());
        }
        let credentials = StaticProvider::new(
            keys.access_key_id.expose().to_string(),
            keys.secret_access_key.expose().to_string(),
            keys.session_token.as_ref().map(|t| t.expose().to_string()),
            None,
        );
        let mut session = Session {
            client: Client::new_with(credentials, Arc::clone(dispatcher)),
            settings,
            redactor,
            request_timeout,
        };
        if let Some(role_arn) = session.settings.assume_role_arn.clone() {
            let sts = session.sts();
            let request = AssumeRoleRequest {
                role_arn: role_arn.clone(),
                role_session_name: ROLE_SESSION_NAME.to_string(),
                external_id: session.settings.external_id.clone(),
                ..Default::default()
            };
            let region = session.settings.region.clone();
            let response = session
                .call("STS", &region, || sts.assume_role(request.clone()))
                .await
                .map_err(|e| e.context(&format!("AssumeRole {role_arn}")).into_cloud())?;
            let temporary = response.credentials.ok_or_else(|| CloudError {
                message: format!("AssumeRole {role_arn}: STS answered without credentials"),
            })?;
            session.redactor.add(&temporary.access_key_id);
            session.redactor.add(&temporary.secret_access_key);
            session.redactor.add(&temporary.session_token);
            let credentials = StaticProvider::new(
                temporary.access_key_id,
                temporary.secret_access_key,
                Some(temporary.session_token),
                None,
            );
            session.client = Client::new_with(credentials, Arc::clone(dispatcher));
        }
        Ok(session)
    }

    /// The rusoto region for `service` (`iam`, `sts`, `ec2`, `s3`) in region `name`.
    fn region(&self, service: &str, name: &str) -> Region {
        if let Some(endpoint) = &self.settings.endpoint_url {
            return Region::Custom {
                name: name.to_string(),
                endpoint: endpoint.clone(),
            };
        }
        match name.parse::<Region>() {
            Ok(region) => region,
            // IAM is global in the `aws` partition.
            Err(_) if service == "iam" => Region::UsEast1,
            // A region newer than rusoto: its endpoints follow the usual pattern.
            Err(_) => Region::Custom {
                name: name.to_string(),
                endpoint: format!("https://{service}.{name}.amazonaws.com"),
            },
        }
    }

    pub fn sts(&self) -> StsClient {
        StsClient::new_with_client(
            self.client.clone(),
            self.region("sts", &self.settings.region),
        )
    }

    pub fn iam(&self) -> IamClient {
        IamClient::new_with_client(
            self.client.clone(),
            self.region("iam", &self.settings.region),
        )
    }

    pub fn ec2(&self, region: &str) -> Ec2Client {
        Ec2Client::new_with_client(self.client.clone(), self.region("ec2", region))
    }

    pub fn s3(&self) -> S3Client {
        S3Client::new_with_client(
            self.client.clone(),
            self.region("s3", &self.settings.region),
        )
    }

    /// Runs one AWS call with the request time-out, retrying throttled calls with a growing
    /// pause, and turns its error into a redacted [`CallError`].
    pub async fn call<T, E, F, Fut>(
        &self,
        service: &str,
        region: &str,
        make: F,
    ) -> Result<T, CallError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, RusotoError<E>>>,
        E: std::error::Error + 'static,
    {
        let site = CallSite {
            service,
            region,
            endpoint: self.settings.endpoint_url.as_deref(),
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let error = match tokio::time::timeout(self.request_timeout, make()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => classify(err, site, &self.redactor),
                Err(_) => timed_out(site, self.request_timeout, &self.redactor),
            };
            let retry = error
                .code
                .as_deref()
                .is_some_and(|code| RETRY_CODES.contains(&code));
            if !retry || tries >= MAX_TRIES {
                return Err(error);
            }
            tokio::time::sleep(Duration::from_millis(250u64 << tries)).await;
        }
    }
}
