//! The run loop: heartbeat every `heartbeat_seconds` (its own task), long-poll for commands,
//! execute each on the blocking pool, post its result. Network trouble is retried with a
//! capped, jittered exponential backoff (1 s → 30 s); a 401 from any call stops the agent with
//! [`RunError::Rejected`]; the shutdown signal stops it cleanly.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use crate::client::{AgentClient, ApiError, ResultAck};
use crate::commands::{self, Command, Outcome, Status};
use crate::config::Config;

/// The first retry delay after a failed call.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest `Retry-After` the agent honours.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(120);
/// Clock difference with the server worth a warning (the server refuses more than 300 s).
const SKEW_WARNING_SECS: i64 = 60;

/// Why the run loop stopped other than by the shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The server answered 401 (revoked agent, bad secret, clock skew): the agent stops.
    #[error("the server rejected the agent (401): {0}")]
    Rejected(String),
    /// The HTTP client could not be set up.
    #[error("cannot start the client: {0}")]
    Client(#[from] ApiError),
}

/// Exponential backoff with jitter: each delay is drawn from the top quarter of the current
/// step (never under [`BACKOFF_MIN`]), so many agents that lost the server at once do not
/// come back in lockstep.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { step: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(BACKOFF_MAX);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let quarter = step / 4;
        (step - quarter + quarter.mul_f64(f64::from(nanos % 1000) / 1000.0)).max(BACKOFF_MIN)
    }
}

/// A 401 seen by the heartbeat task, handed to the poll loop.
#[derive(Debug, Default)]
struct Fatal {
    reason: Mutex<Option<String>>,
    notify: Notify,
}

impl Fatal {
    fn set(&self, reason: String) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(reason);
        drop(slot);
        self.notify.notify_one();
    }

    async fn wait(&self) -> String {
        loop {
            let current = self
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(reason) = current {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

/// Resolves when `shutdown` turns `true`; never when its sender is gone without doing so.
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Sleeps `delay` unless shutdown (→ `Stop`) or a 401 (→ error) comes first.
async fn pause(
    delay: Duration,
    shutdown: &mut watch::Receiver<bool>,
    fatal: &Fatal,
) -> Result<Flow, RunError> {
    tokio::select! {
        biased;
        () = wait_shutdown(shutdown) => Ok(Flow::Stop),
        reason = fatal.wait() => Err(RunError::Rejected(reason)),
        () = tokio::time::sleep(delay) => Ok(Flow::Continue),
    }
}

/// Runs the agent until `shutdown` turns `true` (→ `Ok`) or the server rejects it.
///
/// The caller owns the runtime and the signal handling: the binary flips `shutdown` on SIGTERM
/// or SIGINT. A command already executing is finished and its result posted before stopping
/// (a result still failing to get through when shutdown comes is dropped, with a warning).
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let client = Arc::new(AgentClient::new(&config)?);
    let hostname = crate::hostname();
    info!(
        agent_id = %config.agent_id,
        server = %config.server,
        allowed_paths = ?config.allowed_paths,
        version = crate::VERSION,
        "agent started"
    );
    if config.allowed_paths.is_empty() {
        warn!("allowed_paths is empty: every file command will be refused");
    }
    let fatal = Arc::new(Fatal::default());
    let heartbeat = tokio::spawn(heartbeat_loop(
        client.clone(),
        Duration::from_secs(config.heartbeat_seconds),
        hostname,
        fatal.clone(),
    ));
    let result = poll_loop(&client, &config, &fatal, &mut shutdown).await;
    heartbeat.abort();
    match &result {
        Ok(()) => info!("agent stopped"),
        Err(e) => error!(error = %e, "agent stopping"),
    }
    result
}

async fn heartbeat_loop(
    client: Arc<AgentClient>,
    interval: Duration,
    hostname: String,
    fatal: Arc<Fatal>,
) {
    loop {
        match client.heartbeat(&hostname).await {
            Ok(beat) => {
                debug!(server_time = ?beat.server_time, "heartbeat accepted");
                if let Some(time) = &beat.server_time {
                    warn_on_clock_skew(time);
                }
            }
            Err(ApiError::Unauthorized(reason)) => {
                fatal.set(reason);
                return;
            }
            Err(e) => warn!(error = %e, retry_in = ?interval, "heartbeat failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

fn warn_on_clock_skew(server_time: &str) {
    let Ok(server) =
        time::OffsetDateTime::parse(server_time, &time::format_description::well_known::Rfc3339)
    else {
        return;
    };
    let skew = (time::OffsetDateTime::now_utc() - server).whole_seconds();
    if skew.abs() > SKEW_WARNING_SECS {
        warn!(
            skew_seconds = skew,
            "this host's clock differs from the server's; signed requests fail beyond 300 s of skew"
        );
    }
}

async fn poll_loop(
    client: &AgentClient,
    config: &Config,
    fatal: &Fatal,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let allowed = Arc::new(config.allowed_paths.clone());
    let mut backoff = Backoff::new();
    loop {
        let polled = tokio::select! {
            biased;
            () = wait_shutdown(shutdown) => return Ok(()),
            reason = fatal.wait() => return Err(RunError::Rejected(reason)),
            polled = client.next_command(config.poll_wait_seconds) => polled,
        };
        match polled {
            Ok(None) => backoff.reset(),
            Ok(Some(command)) => {
                backoff.reset();
                if handle(client, command, &allowed, fatal, shutdown).await? == Flow::Stop {
                    return Ok(());
                }
            }
            Err(ApiError::Unauthorized(reason)) => return Err(RunError::Rejected(reason)),
            Err(e) => {
                let delay = retry_delay(&e, &mut backoff);
                warn!(error = %e, retry_in = ?delay, "polling for commands failed");
                if pause(delay, shutdown, fatal).await? == Flow::Stop {
                    return Ok(());
                }
            }
        }
    }
}

fn retry_delay(e: &ApiError, backoff: &mut Backoff) -> Duration {
    let computed = backoff.next_delay();
    match e.retry_after() {
        Some(asked) => asked.clamp(BACKOFF_MIN, RETRY_AFTER_MAX),
        None => computed,
    }
}

async fn handle(
    client: &AgentClient,
    command: Command,
    allowed: &Arc<Vec<PathBuf>>,
    fatal: &Fatal,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Flow, RunError> {
    let id = command.id.clone();
    info!(command_id = %id, command_type = %command.kind, path = ?command.path(), "executing command");
    let allowed = allowed.clone();
    let Command { kind, params, .. } = command;
    let outcome = match tokio::task::spawn_blocking(move || {
        commands::execute(&kind, &params, &allowed)
    })
    .await
    {
        Ok(outcome) => outcome,
        Err(e) => {
            error!(command_id = %id, error = %e, "the command's task failed");
            Outcome {
                status: Status::Failed,
                output: json!({ "error": "the agent failed while executing the command" }),
                snapshot: None,
            }
        }
    };
    match outcome.status {
        Status::Succeeded => info!(command_id = %id, output = %outcome.output, "command succeeded"),
        Status::Failed => {
            warn!(command_id = %id, error = outcome.error().unwrap_or_default(), "command failed")
        }
    }
    deliver(client, &id, &outcome, fatal, shutdown).await
}

async fn deliver(
    client: &AgentClient,
    id: &str,
    outcome: &Outcome,
    fatal: &Fatal,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Flow, RunError> {
    let mut backoff = Backoff::new();
    loop {
        match client.post_result(id, outcome).await {
            Ok(ResultAck::Recorded) => {
                info!(command_id = %id, "result recorded");
                return Ok(Flow::Continue);
            }
            Ok(ResultAck::AlreadyRecorded) => {
                warn!(command_id = %id, "the server had already recorded a result for this command (409)");
                return Ok(Flow::Continue);
            }
            Err(ApiError::Unauthorized(reason)) => return Err(RunError::Rejected(reason)),
            Err(e) if e.is_retryable() => {
                let delay = retry_delay(&e, &mut backoff);
                warn!(command_id = %id, error = %e, retry_in = ?delay, "posting the result failed");
                if pause(delay, shutdown, fatal).await? == Flow::Stop {
                    warn!(command_id = %id, "stopping before the result was delivered");
                    return Ok(Flow::Stop);
                }
            }
            Err(e) => {
                error!(command_id = %id, error = %e, "the server refused the result; it is dropped");
                return Ok(Flow::Continue);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let mut last_step = Duration::ZERO;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= BACKOFF_MIN / 2, "{d:?}");
            assert!(d <= BACKOFF_MAX, "{d:?}");
            last_step = b.step;
        }
        assert_eq!(last_step, BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let mut b = Backoff::new();
        let e = |secs| ApiError::Status {
            status: 429,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(retry_delay(&e(7), &mut b), Duration::from_secs(7));
        assert_eq!(retry_delay(&e(0), &mut b), BACKOFF_MIN);
        assert_eq!(retry_delay(&e(100_000), &mut b), RETRY_AFTER_MAX);
    }
}
