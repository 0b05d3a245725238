//! The HTTP client for the agent endpoints (api.md §7.2).
//!
//! Registration is unsigned (it carries the enrollment token). Every other call is signed:
//! `X-Nexplane-Agent`, `X-Nexplane-Timestamp` (Unix seconds) and `X-Nexplane-Signature`
//! computed by [`nexplane_crypto::agent_signature`] over the method, the request's path and
//! query exactly as sent (including the `server` URL's path prefix, if any) and the exact body
//! bytes. Redirects are not followed: they would change the signed path.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::commands::{Command, Outcome};
use crate::config::{server_url, AgentSecret, Config};

/// The agent id header.
pub const HEADER_AGENT: &str = "X-Nexplane-Agent";
/// The timestamp header (Unix seconds).
pub const HEADER_TIMESTAMP: &str = "X-Nexplane-Timestamp";
/// The signature header (lowercase hex HMAC-SHA256).
pub const HEADER_SIGNATURE: &str = "X-Nexplane-Signature";

/// Connect timeout of every call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a call other than the long poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than `wait` a long poll may take before it is abandoned.
const POLL_GRACE: Duration = Duration::from_secs(20);

/// Why a call did not get the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: revoked agent, bad secret, clock skew, or a refused enrollment token. Holds the
    /// server's problem `detail`.
    #[error("the server refused the credentials (401): {0}")]
    Unauthorized(String),
    /// Another unexpected status.
    #[error("the server answered {status}: {detail}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The problem `detail` (or `title`, or the reason phrase).
        detail: String,
        /// The `Retry-After` delay, when given in seconds.
        retry_after: Option<Duration>,
    },
    /// The server could not be reached or the exchange broke off.
    #[error("cannot reach the server: {0}")]
    Network(String),
    /// A success status with a body the agent cannot use, or an unusable URL.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl ApiError {
    /// Whether trying again later may succeed: network trouble, 408, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Network(_) => true,
            ApiError::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..600).contains(status)
            }
            ApiError::Unauthorized(_) | ApiError::Protocol(_) => false,
        }
    }

    /// The delay the server asked for (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn network(e: reqwest::Error) -> ApiError {
    // reqwest's Display leaves out the cause ("connection refused", "timed out", …).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    ApiError::Network(text)
}

/// The problem+json `detail` (or `title`) of an error body, else a short excerpt of it.
fn problem_detail(status: StatusCode, body: &str) -> String {
    if let Ok(problem) = serde_json::from_str::<Value>(body) {
        for key in ["detail", "title"] {
            if let Some(text) = problem.get(key).and_then(Value::as_str) {
                if !text.is_empty() {
                    return text.to_string();
                }
            }
        }
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no reason given")
            .to_string()
    } else {
        trimmed.chars().take(200).collect()
    }
}

async fn error_from(response: reqwest::Response) -> ApiError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.text().await.unwrap_or_default();
    let detail = problem_detail(status, &body);
    if status == StatusCode::UNAUTHORIZED {
        ApiError::Unauthorized(detail)
    } else {
        ApiError::Status {
            status: status.as_u16(),
            detail,
            retry_after,
        }
    }
}

fn http_client() -> Result<reqwest::Client, ApiError> {
    reqwest::Client::builder()
        .user_agent(format!("nexplane-agent/{}", crate::VERSION))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|e| ApiError::Protocol(format!("cannot build the HTTP client: {e}")))
}

/// `server` joined with an absolute API path (`/agent/…`), keeping any path prefix.
fn endpoint(server: &str, path_and_query: &str) -> Result<Url, ApiError> {
    let base = server_url(server).map_err(ApiError::Protocol)?;
    let joined = format!("{}{path_and_query}", base.as_str().trim_end_matches('/'));
    Url::parse(&joined).map_err(|e| ApiError::Protocol(format!("bad URL {joined}: {e}")))
}

/// The path and query of `url` as the request line carries them (what is signed).
pub fn path_with_query(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The body of `POST /agent/register`.
#[derive(Clone, Serialize)]
pub struct RegisterRequest {
    /// The enrollment token (secret: not shown by `Debug`).
    pub enrollment_token: String,
    /// The host name.
    pub hostname: String,
    /// The operating system (`linux`).
    pub os: String,
    /// The CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// The agent version.
    pub version: String,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("enrollment_token", &"[redacted]")
            .field("hostname", &self.hostname)
            .field("os", &self.os)
            .field("arch", &self.arch)
            .field("version", &self.version)
            .field("labels", &self.labels)
            .finish()
    }
}

impl RegisterRequest {
    /// A registration for this host: host name, OS, architecture and version filled in.
    pub fn for_this_host(enrollment_token: String, labels: BTreeMap<String, String>) -> Self {
        Self {
            enrollment_token,
            hostname: crate::hostname(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            version: crate::VERSION.to_string(),
            labels,
        }
    }
}

/// The answer to a registration.
#[derive(Debug, Clone, Deserialize)]
pub struct Registration {
    /// The new agent's id.
    pub agent_id: String,
    /// Its secret (shown by the server only in this answer).
    pub agent_secret: AgentSecret,
}

/// `POST {server}/agent/register` (unsigned). 401: the token is expired, revoked or used up.
pub async fn register(server: &str, request: &RegisterRequest) -> Result<Registration, ApiError> {
    let url = endpoint(server, "/agent/register")?;
    let body =
        serde_json::to_vec(request).map_err(|e| ApiError::Protocol(format!("encoding: {e}")))?;
    let response = http_client()?
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(CALL_TIMEOUT)
        .send()
        .await
        .map_err(network)?;
    if !response.status().is_success() {
        return Err(error_from(response).await);
    }
    let bytes = response.bytes().await.map_err(network)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::Protocol(format!(
            "the registration answer lacks agent_id/agent_secret: {e}"
        ))
    })
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// The server's clock (RFC 3339), when it sent one.
    pub server_time: Option<String>,
}

/// What became of a posted result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultAck {
    /// 204: recorded.
    Recorded,
    /// 409: a result for this command was recorded before.
    AlreadyRecorded,
}

/// A signed client for one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    server: String,
    agent_id: String,
    secret: AgentSecret,
}

impl AgentClient {
    /// A client for the agent a configuration describes.
    pub fn new(config: &Config) -> Result<Self, ApiError> {
        Self::with_credentials(
            &config.server,
            config.agent_id.clone(),
            config.agent_secret.clone(),
        )
    }

    /// A client for `server` signing as `agent_id` with `secret`.
    pub fn with_credentials(
        server: &str,
        agent_id: String,
        secret: AgentSecret,
    ) -> Result<Self, ApiError> {
        server_url(server).map_err(ApiError::Protocol)?;
        Ok(Self {
            http: http_client()?,
            server: server.to_string(),
            agent_id,
            secret,
        })
    }

    /// Sends one signed request and returns the response, whatever its status.
    async fn send_signed(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ApiError> {
        // A random nonce in the (signed) query makes every request unique: the server refuses
        // a signature it has seen before as a replay, and two identical requests in the same
        // second (a poll right after a command, `status` while `run` heartbeats, a retried
        // result) would otherwise carry the same signature.
        let separator = if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let nonce: u128 = rand::random();
        let path_and_query = format!("{path_and_query}{separator}nonce={nonce:032x}");
        let url = endpoint(&self.server, &path_and_query)?;
        let timestamp = unix_now();
        let signature = nexplane_crypto::agent_signature(
            self.secret.expose().as_bytes(),
            method.as_str(),
            &path_with_query(&url),
            timestamp,
            &body,
        );
        let mut request = self
            .http
            .request(method, url)
            .header(HEADER_AGENT, &self.agent_id)
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, signature)
            .timeout(timeout);
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        request.send().await.map_err(network)
    }

    /// `POST /agent/heartbeat` `{version, hostname}` → 200 `{server_time}`.
    pub async fn heartbeat(&self, hostname: &str) -> Result<Heartbeat, ApiError> {
        let body = serde_json::to_vec(&serde_json::json!({
            "version": crate::VERSION,
            "hostname": hostname,
        }))
        .map_err(|e| ApiError::Protocol(format!("encoding: {e}")))?;
        let response = self
            .send_signed(Method::POST, "/agent/heartbeat", body, CALL_TIMEOUT)
            .await?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        let bytes = response.bytes().await.map_err(network)?;
        let server_time = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
            v.get("server_time")
                .and_then(Value::as_str)
                .map(String::from)
        });
        Ok(Heartbeat { server_time })
    }

    /// `GET /agent/commands/next?wait=N`: a command, or `None` when none arrived in time.
    pub async fn next_command(&self, wait_seconds: u64) -> Result<Option<Command>, ApiError> {
        let response = self
            .send_signed(
                Method::GET,
                &format!("/agent/commands/next?wait={wait_seconds}"),
                Vec::new(),
                Duration::from_secs(wait_seconds) + POLL_GRACE,
            )
            .await?;
        match response.status() {
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::OK => {
                let bytes = response.bytes().await.map_err(network)?;
                let value: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| ApiError::Protocol(format!("the command is not JSON: {e}")))?;
                Command::from_json(&value)
                    .map(Some)
                    .map_err(ApiError::Protocol)
            }
            status if status.is_success() => Err(ApiError::Protocol(format!(
                "unexpected status {status} for the command poll"
            ))),
            _ => Err(error_from(response).await),
        }
    }

    /// `POST /agent/commands/{id}/result` with the outcome → 204 (409: already recorded).
    pub async fn post_result(
        &self,
        command_id: &str,
        outcome: &Outcome,
    ) -> Result<ResultAck, ApiError> {
        if command_id.is_empty()
            || !command_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ApiError::Protocol(format!(
                "the command id {command_id:?} is not a plain id"
            )));
        }
        let body = serde_json::to_vec(outcome)
            .map_err(|e| ApiError::Protocol(format!("encoding: {e}")))?;
        let response = self
            .send_signed(
                Method::POST,
                &format!("/agent/commands/{command_id}/result"),
                body,
                CALL_TIMEOUT,
            )
            .await?;
        let status = response.status();
        if status.is_success() {
            Ok(ResultAck::Recorded)
        } else if status == StatusCode::CONFLICT {
            Ok(ResultAck::AlreadyRecorded)
        } else {
            Err(error_from(response).await)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_the_server_path_prefix() {
        let url = endpoint("http://h:8000", "/agent/commands/next?wait=30").unwrap();
        assert_eq!(url.as_str(), "http://h:8000/agent/commands/next?wait=30");
        assert_eq!(path_with_query(&url), "/agent/commands/next?wait=30");
        for server in ["https://h/nexplane", "https://h/nexplane/"] {
            let url = endpoint(server, "/agent/heartbeat").unwrap();
            assert_eq!(path_with_query(&url), "/nexplane/agent/heartbeat");
        }
    }

    #[test]
    fn problem_details_are_extracted() {
        let body = r#"{"type":"urn:nexplane:error:unauthorized","title":"Unauthorized","status":401,"detail":"agent revoked","code":"unauthorized"}"#;
        assert_eq!(
            problem_detail(StatusCode::UNAUTHORIZED, body),
            "agent revoked"
        );
        assert_eq!(
            problem_detail(StatusCode::UNAUTHORIZED, r#"{"title":"Unauthorized"}"#),
            "Unauthorized"
        );
        assert_eq!(problem_detail(StatusCode::BAD_GATEWAY, ""), "Bad Gateway");
        assert_eq!(problem_detail(StatusCode::BAD_GATEWAY, "oops"), "oops");
    }

    #[test]
    fn retryable_errors() {
        let status = |s| ApiError::Status {
            status: s,
            detail: String::new(),
            retry_after: None,
        };
        assert!(ApiError::Network("x".into()).is_retryable());
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(404).is_retryable());
        assert!(!status(413).is_retryable());
        assert!(!ApiError::Unauthorized("x".into()).is_retryable());
    }

    #[test]
    fn the_enrollment_token_is_redacted() {
        let r = RegisterRequest::for_this_host("tok-123456".into(), BTreeMap::new());
        assert!(!format!("{r:?}").contains("tok-123456"));
        assert_eq!(r.os, std::env::consts::OS);
    }
}
