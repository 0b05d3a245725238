//! `cargo xtask bench agents [--agents N] [--commands M]`: what do thousands of idle agents
//! cost the server, and how fast does a command reach its agent?
//!
//! One run:
//! 1. Raises the soft open-file limit (RLIMIT_NOFILE) of this process towards its hard limit;
//!    the server inherits it. Builds and starts the release server on a throw-away data dir
//!    (SQLite) with rate limits high enough never to interfere, and reads its resident memory
//!    (`VmRSS` of `/proc/<pid>/status`) as the baseline.
//! 2. As admin: one enrollment token with `max_uses` N (default 2,000), an operator and two
//!    approvers. Registers N agents (16 registrations at a time); each becomes a tokio task of
//!    this process that loops on the signed long poll `GET /agent/commands/next?wait=30`,
//!    heartbeats every 30 s between polls like the real agent, and answers a command with a
//!    succeeded result. The first poll of each agent waits 1 to 30 s (spread evenly), so that
//!    the fleet renews its polls evenly over the 30 s instead of in lockstep. All agents share
//!    one HTTP/1.1 client whose pool keeps up to N idle connections, and each agent has at most
//!    one request in flight, so the server holds about one connection per agent (the run counts
//!    the server's sockets to show it). A signature over the same request in the same second is
//!    refused as a replay, so an agent never sends the same poll (or heartbeat) twice within one
//!    second.
//! 3. Once every agent has a poll out, waits one poll cycle and a little (35 s: the steady
//!    state, with polls renewed and heartbeats) and reads the server's `VmRSS` (idle with N
//!    agents waiting), its `VmHWM`, threads and sockets.
//! 4. Prepares M change requests (default 200) `agent_write_file` for M distinct random agents:
//!    created and submitted by the operator, approved by as many approvers as their risk needs
//!    (production agent changes are high risk: 2 approvals by default). Then executes them, 20
//!    per second. The dispatch time of each command is the `timestamp` of its
//!    `agent.command_dispatched` audit event (written when the execution job queues it); the
//!    receive time is this machine's wall clock when the agent has read the command. Latency =
//!    receive − dispatch (same machine, same clock).
//! 5. Checks that every dispatched command reached its agent exactly once and that every change
//!    request ends `complete`, reads `VmRSS` and `VmHWM` again, and prints the figures with their
//!    ratios to the targets: RSS ≤ 150 MB with N agents waiting, p99 latency ≤ 50 ms. A missed
//!    target is reported (FAIL), not an error; a broken run (an agent error, a lost or duplicated
//!    command, a change request that did not complete) is an error.
//!
//! MB here is 10^6 bytes (`/proc` reports KiB), which is the stricter reading of "150 MB".
//!
//! The baseline is read after the bench's users have logged in, so it holds what password
//! hashing left behind: each argon2id hash allocates about 19 MiB, and glibc keeps that block
//! in the malloc arena of whichever blocking thread ran the hash, so the baseline moves in
//! steps of about 20 MB from run to run (30 to 130 MB seen). The agents' share (idle − before)
//! is the stable figure.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::bench::{self, Server};
use crate::bench_discovery::{epoch_millis, Api};

const DEFAULT_AGENTS: usize = 2000;
const DEFAULT_COMMANDS: usize = 200;
/// The most registrations one enrollment token allows.
const MAX_AGENTS: usize = 10_000;
const POLL_WAIT_SECS: u64 = 30;
/// The real agent's default heartbeat interval; the server shows an agent offline after 90 s
/// without one, and an execution refuses an offline agent.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
const REGISTER_CONCURRENCY: usize = 16;
const SETUP_CONCURRENCY: usize = 8;
/// 20 executions per second.
const EXECUTE_EVERY: Duration = Duration::from_millis(50);
/// How long after every agent has sent its first poll the idle memory is read: one whole poll
/// cycle and a little more, so that the server is in its steady state (polls ending with 204
/// and renewed, heartbeats) rather than right after a burst of registrations.
const SETTLE: Duration = Duration::from_secs(POLL_WAIT_SECS + 5);
const TARGET_RSS_MB: f64 = 150.0;
const TARGET_P99_MS: f64 = 50.0;
const AGENT_VERSION: &str = "0.0.0-bench";
/// Only ever used against a throw-away server on loopback.
const USER_PASSWORD: &str = "bench-User-Pass-2026";
const OPERATOR_EMAIL: &str = "bench-operator@example.com";
const APPROVER_EMAILS: [&str; 2] = [
    "bench-approver-1@example.com",
    "bench-approver-2@example.com",
];
const RESULT_BODY: &str = r#"{"status":"succeeded","output":{},"snapshot":{"existed":false}}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    agents: usize,
    commands: usize,
}

pub fn agents(args: &[&str]) -> Result<()> {
    let options = parse_args(args)?;
    let nofile = raise_open_file_limit(options.agents)?;
    eprintln!("==> open-file limit (soft) of this process and the server: {nofile}");
    let binary = bench::build_release_server()?;
    let port = bench::free_port()?;
    let mut server = Server::start_with_env(
        &binary,
        port,
        &[
            ("NEXPLANE_AGENT_RATE_LIMIT_PER_MINUTE", "100000000"),
            ("NEXPLANE_RATE_LIMIT_PER_MINUTE", "100000000"),
            ("NEXPLANE_IP_RATE_LIMIT_PER_MINUTE", "100000000"),
        ],
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(measure(&mut server, options));
    drop(runtime); // stops the simulated agents
    drop(server); // kill the server and remove its data dir before reporting
    result
}

const USAGE: &str = "usage: cargo xtask bench agents [--agents N] [--commands M]";

fn parse_args(args: &[&str]) -> Result<Options> {
    let mut options = Options {
        agents: DEFAULT_AGENTS,
        commands: DEFAULT_COMMANDS,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (*arg, None),
        };
        let slot = match name {
            "--agents" => &mut options.agents,
            "--commands" => &mut options.commands,
            _ => bail!("unknown argument `{arg}` ({USAGE})"),
        };
        let value = match inline {
            Some(v) => v,
            None => rest
                .next()
                .copied()
                .ok_or_else(|| anyhow!("{name} needs a number ({USAGE})"))?,
        };
        *slot = value
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| anyhow!("{name} wants a positive number, got `{value}`"))?;
    }
    if options.agents > MAX_AGENTS {
        bail!("--agents: at most {MAX_AGENTS} (the most one enrollment token allows)");
    }
    if options.commands > options.agents {
        bail!(
            "--commands ({}) goes to distinct agents: at most --agents ({})",
            options.commands,
            options.agents
        );
    }
    Ok(options)
}

/// Raises the soft RLIMIT_NOFILE towards the hard limit (children inherit it) and checks that
/// there is room for one socket per agent, plus some, in each process.
fn raise_open_file_limit(agents: usize) -> Result<u64> {
    let wanted = 2 * agents as u64 + 1024;
    let soft = rlimit::increase_nofile_limit(wanted)
        .context("cannot raise the open-file limit (RLIMIT_NOFILE)")?;
    let needed = agents as u64 + 256;
    if soft < needed {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap_or((soft, soft));
        bail!(
            "the open-file limit is {soft} (hard limit {hard}), {agents} agents need at least \
             {needed}: raise the hard limit (ulimit -Hn) or use fewer --agents"
        );
    }
    Ok(soft)
}

// ---------------------------------------------------------------------------------------------
// The server's memory

/// What `/proc/<pid>/status` says about the server.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStatus {
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
}

fn read_status(pid: u32) -> Result<ProcStatus> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field =
        |name: &str| status_field(&text, name).ok_or_else(|| anyhow!("no `{name}` in {path}"));
    Ok(ProcStatus {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
        threads: field("Threads")?,
    })
}

/// The number of a `Name:  value [kB]` line of `/proc/<pid>/status`.
fn status_field(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Open sockets of a process (its file descriptors that link to `socket:[…]`).
fn count_sockets(pid: u32) -> Option<usize> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count(),
    )
}

/// The soft `Max open files` of `/proc/<pid>/limits`.
fn open_file_limit(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3).map(str::to_string)
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

// ---------------------------------------------------------------------------------------------
// Percentiles

/// The nearest-rank percentile of ascending `sorted` values: the smallest value such that at
/// least `p` % of the values are at or below it. `None` for no values or `p` outside 0..=100.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// The simulated agents

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn now_millis() -> i64 {
    i64::try_from(unix_now().as_millis()).unwrap_or(i64::MAX)
}

/// The current Unix second once it is later than `last` (sleeping into the next second when
/// needed): a signature over the same request in the same second would be a replay.
async fn fresh_second(last: i64) -> i64 {
    loop {
        let now = unix_now();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if secs > last {
            return secs;
        }
        let left = 1000 - u64::from(now.subsec_millis());
        tokio::time::sleep(Duration::from_millis(left + 2)).await;
    }
}

/// A command an agent received.
struct Received {
    command_id: String,
    agent_id: String,
    at_millis: i64,
}

/// What all simulated agents share: counters, what they received, their errors.
#[derive(Default)]
struct Fleet {
    /// Agents that have sent their first poll.
    started: AtomicUsize,
    /// Polls sent and not answered yet.
    polling: AtomicUsize,
    polls: AtomicU64,
    heartbeats: AtomicU64,
    results: AtomicU64,
    received: Mutex<Vec<Received>>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Fleet {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slot) = self.first_error.lock() {
            slot.get_or_insert(message);
        }
    }

    fn received_count(&self) -> usize {
        self.received.lock().map_or(0, |r| r.len())
    }
}

struct SimAgent {
    id: String,
    secret: String,
    base: Arc<str>,
    client: reqwest::Client,
    fleet: Arc<Fleet>,
    /// The `wait` of the first poll (1 to 30 s): agents registered within a second or two
    /// would otherwise renew their polls and heartbeat in lockstep, every 30 s, which real
    /// agents started at different times do not.
    first_wait: u64,
}

impl SimAgent {
    async fn signed(
        &self,
        method: Method,
        path: &str,
        timestamp: i64,
        body: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        let signature = nexplane_crypto::agent_signature(
            self.secret.as_bytes(),
            method.as_str(),
            path,
            timestamp,
            &body,
        );
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("x-nexplane-agent", &self.id)
            .header("x-nexplane-timestamp", timestamp.to_string())
            .header("x-nexplane-signature", signature);
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        request.send().await
    }

    /// Polls, answers commands and heartbeats until the task is aborted.
    async fn run(self) {
        // Registration counts as a heartbeat.
        let mut last_heartbeat = Instant::now();
        let (mut poll_second, mut heartbeat_second) = (0, 0);
        let mut first_poll = true;
        let mut wait = self.first_wait;
        loop {
            if last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
                heartbeat_second = fresh_second(heartbeat_second).await;
                match self.heartbeat(heartbeat_second).await {
                    Ok(()) => {
                        last_heartbeat = Instant::now();
                        self.fleet.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(message) => {
                        self.fleet.error(message);
                        tokio::time::sleep(RETRY_AFTER_ERROR).await;
                        continue;
                    }
                }
            }
            poll_second = fresh_second(poll_second).await;
            self.fleet.polling.fetch_add(1, Ordering::Relaxed);
            if first_poll {
                first_poll = false;
                self.fleet.started.fetch_add(1, Ordering::Relaxed);
            }
            let answer = self.poll(wait, poll_second).await;
            wait = POLL_WAIT_SECS;
            self.fleet.polling.fetch_sub(1, Ordering::Relaxed);
            self.fleet.polls.fetch_add(1, Ordering::Relaxed);
            match answer {
                Ok(None) => {}
                Ok(Some((command_id, at_millis))) => {
                    if let Ok(mut received) = self.fleet.received.lock() {
                        received.push(Received {
                            command_id: command_id.clone(),
                            agent_id: self.id.clone(),
                            at_millis,
                        });
                    }
                    match self.post_result(&command_id).await {
                        Ok(()) => {
                            self.fleet.results.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(message) => self.fleet.error(message),
                    }
                }
                Err(message) => {
                    self.fleet.error(message);
                    tokio::time::sleep(RETRY_AFTER_ERROR).await;
                }
            }
        }
    }

    async fn heartbeat(&self, second: i64) -> Result<(), String> {
        let body = json!({"version": AGENT_VERSION, "hostname": format!("bench-{}", self.id)});
        let response = self
            .signed(
                Method::POST,
                "/agent/heartbeat",
                second,
                body.to_string().into_bytes(),
            )
            .await
            .map_err(|e| format!("heartbeat of {}: {e}", self.id))?;
        expect(response, StatusCode::OK, "heartbeat")
            .await
            .map(drop)
    }

    /// The command id and the wall-clock millisecond it was read, or `None` after a 204.
    async fn poll(&self, wait: u64, second: i64) -> Result<Option<(String, i64)>, String> {
        let path = format!("/agent/commands/next?wait={wait}");
        let response = self
            .signed(Method::GET, &path, second, Vec::new())
            .await
            .map_err(|e| format!("poll of {}: {e}", self.id))?;
        if response.status() == StatusCode::NO_CONTENT {
            let _ = response.bytes().await;
            return Ok(None);
        }
        let body = expect(response, StatusCode::OK, "poll").await?;
        let at_millis = now_millis();
        let command: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("poll of {}: the command is not JSON: {e}", self.id))?;
        command["id"]
            .as_str()
            .map(|id| Some((id.to_string(), at_millis)))
            .ok_or_else(|| format!("poll of {}: a command without id: {command}", self.id))
    }

    async fn post_result(&self, command_id: &str) -> Result<(), String> {
        // A unique path: never a replay, so no need to wait for a fresh second.
        let second = i64::try_from(unix_now().as_secs()).unwrap_or(i64::MAX);
        let response = self
            .signed(
                Method::POST,
                &format!("/agent/commands/{command_id}/result"),
                second,
                RESULT_BODY.as_bytes().to_vec(),
            )
            .await
            .map_err(|e| format!("result of {command_id}: {e}"))?;
        expect(response, StatusCode::NO_CONTENT, "result")
            .await
            .map(drop)
    }
}

/// The body of a response with the expected status, or an error naming what came instead.
async fn expect(
    response: reqwest::Response,
    expected: StatusCode,
    what: &str,
) -> Result<Vec<u8>, String> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("{what}: reading the body: {e}"))?;
    if status != expected {
        return Err(format!(
            "{what} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(body.to_vec())
}

// ---------------------------------------------------------------------------------------------
// The run

struct Users {
    admin: String,
    operator: String,
    approvers: Vec<String>,
}

async fn measure(server: &mut Server, options: Options) -> Result<()> {
    let Options { agents, commands } = options;
    let pid = server.pid();
    let base = server.base_url.clone();
    let admin_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    bench::wait_until_live(server, &admin_client).await?;
    let admin_token = bench::login(&admin_client, &base).await?;
    let users = create_users(&admin_client, &base, admin_token).await?;
    if let Some(limit) = open_file_limit(pid) {
        eprintln!("    the server's open-file limit: {limit}");
    }
    // Let the start-up settle (key generation, migrations, first requests).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = read_status(pid)?;
    eprintln!(
        "    server RSS before the agents: {:.1} MB",
        mb(baseline.rss_kib)
    );

    // One client for all agents: at most one request in flight per agent, and up to N idle
    // connections kept, so each agent has its own keep-alive connection in effect.
    let agent_client = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(agents + 64)
        .pool_idle_timeout(Duration::from_secs(120))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(POLL_WAIT_SECS + 30))
        .build()?;
    let fleet = Arc::new(Fleet::default());
    let mut handles = Vec::with_capacity(agents);
    let outcome = run_fleet(
        server,
        &admin_client,
        &agent_client,
        &users,
        options,
        &fleet,
        &mut handles,
        baseline,
    )
    .await;
    for handle in &handles {
        handle.abort();
    }
    let report = outcome?;
    report.print(agents, commands, baseline);
    report.check()
}

/// The operator and the approvers, each logged in.
async fn create_users(client: &reqwest::Client, base: &str, admin: String) -> Result<Users> {
    let api = Api {
        client,
        token: &admin,
    };
    let mut tokens = Vec::new();
    for (email, role) in std::iter::once((OPERATOR_EMAIL, "operator"))
        .chain(APPROVER_EMAILS.iter().map(|e| (*e, "approver")))
    {
        api.send(
            Method::POST,
            &format!("{base}/users"),
            Some(json!({"email": email, "name": email, "role": role,
                        "password": USER_PASSWORD})),
            StatusCode::CREATED,
        )
        .await?;
        tokens.push(login_as(client, base, email).await?);
    }
    let operator = tokens.remove(0);
    Ok(Users {
        admin,
        operator,
        approvers: tokens,
    })
}

async fn login_as(client: &reqwest::Client, base: &str, email: &str) -> Result<String> {
    let response = client
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": email, "password": USER_PASSWORD}))
        .send()
        .await
        .with_context(|| format!("POST /auth/login as {email}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST /auth/login as {email} answered {status}: {body}");
    }
    body["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("POST /auth/login as {email} returned no access_token"))
}

struct Report {
    idle: ProcStatus,
    idle_polling: usize,
    idle_sockets: Option<usize>,
    after: ProcStatus,
    latencies: Vec<i64>,
    dispatch_span_ms: i64,
    queue_delay_p50_ms: Option<i64>,
    setup_seconds: f64,
    /// Polls answered and heartbeats per second while the commands went out.
    background_per_second: f64,
    polls: u64,
    heartbeats: u64,
    problems: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
async fn run_fleet(
    server: &mut Server,
    admin_client: &reqwest::Client,
    agent_client: &reqwest::Client,
    users: &Users,
    options: Options,
    fleet: &Arc<Fleet>,
    handles: &mut Vec<tokio::task::JoinHandle<()>>,
    baseline: ProcStatus,
) -> Result<Report> {
    let Options { agents, commands } = options;
    let pid = server.pid();
    let base = server.base_url.clone();
    let admin = Api {
        client: admin_client,
        token: &users.admin,
    };

    // Enrollment and registration.
    let token = admin
        .send(
            Method::POST,
            &format!("{base}/agents/enrollment-tokens"),
            Some(json!({"name": "bench", "ttl_seconds": 3600, "max_uses": agents})),
            StatusCode::CREATED,
        )
        .await?
        .body;
    let enrollment = token["token"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /agents/enrollment-tokens returned no token: {token}"))?
        .to_string();
    eprintln!(
        "==> registering {agents} agents ({REGISTER_CONCURRENCY} at a time); each starts its \
         long poll (wait={POLL_WAIT_SECS} s) as soon as it is registered"
    );
    let started = Instant::now();
    let registered = register_agents(
        &base,
        admin_client,
        agent_client,
        &enrollment,
        agents,
        fleet,
    )
    .await?;
    let agent_ids: Vec<String> = registered.iter().map(|(id, _)| id.clone()).collect();
    handles.extend(registered.into_iter().map(|(_, handle)| handle));
    eprintln!("    registered in {:.1} s", started.elapsed().as_secs_f64());

    // Every agent waiting.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.started.load(Ordering::Relaxed) < agents {
        alive(server)?;
        if Instant::now() > deadline {
            bail!(
                "only {} of {agents} agents sent a poll within 60 s of their registration",
                fleet.started.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "==> all {agents} agents are polling; waiting {} s (a whole poll cycle) before reading \
         the server's memory",
        SETTLE.as_secs()
    );
    tokio::time::sleep(SETTLE).await;
    alive(server)?;
    let idle = read_status(pid)?;
    let idle_polling = fleet.polling.load(Ordering::Relaxed);
    let idle_sockets = count_sockets(pid);
    eprintln!(
        "    server RSS with {agents} agents waiting: {:.1} MB (baseline {:.1} MB; VmHWM {:.1} MB; \
         {} threads; {} sockets; {idle_polling} polls out; {} polls renewed and {} heartbeats \
         so far)",
        mb(idle.rss_kib),
        mb(baseline.rss_kib),
        mb(idle.hwm_kib),
        idle.threads,
        idle_sockets.map_or_else(|| "?".to_string(), |n| n.to_string()),
        fleet.polls.load(Ordering::Relaxed),
        fleet.heartbeats.load(Ordering::Relaxed),
    );

    // The change requests, approved and ready to execute.
    let chosen: Vec<String> = {
        let mut rng = rand::thread_rng();
        rand::seq::index::sample(&mut rng, agents, commands)
            .into_iter()
            .map(|i| agent_ids[i].clone())
            .collect()
    };
    eprintln!(
        "==> preparing {commands} agent_write_file change requests for distinct random agents \
         (create, submit, approve; {SETUP_CONCURRENCY} at a time)"
    );
    let setup_started = Instant::now();
    let change_requests = prepare_change_requests(admin_client, &base, users, &chosen).await?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    eprintln!("    prepared in {setup_seconds:.1} s");
    alive(server)?;

    // Execute, 20 per second.
    eprintln!(
        "==> executing them, one every {} ms",
        EXECUTE_EVERY.as_millis()
    );
    let window_start = (
        Instant::now(),
        fleet.polls.load(Ordering::Relaxed) + fleet.heartbeats.load(Ordering::Relaxed),
    );
    let executed = execute_all(admin_client, &base, &users.operator, &change_requests).await;
    let execute_sent: HashMap<String, i64> = executed
        .iter()
        .filter_map(|(id, r)| r.as_ref().ok().map(|at| (id.clone(), *at)))
        .collect();
    let mut problems: Vec<String> = executed
        .into_iter()
        .filter_map(|(id, r)| r.err().map(|e| format!("executing {id}: {e:#}")))
        .collect();
    if problems.len() == change_requests.len() {
        bail!("no execution started: {}", problems.join("; "));
    }

    // Every command received and answered.
    let expected = execute_sent.len();
    let deadline = Instant::now() + Duration::from_secs(120 + commands as u64 / 2);
    let mut last_report = Instant::now();
    loop {
        let received = fleet.received_count();
        let results = fleet.results.load(Ordering::Relaxed) as usize;
        if received >= expected && results >= expected {
            break;
        }
        alive(server)?;
        if Instant::now() > deadline {
            problems.push(format!(
                "after the deadline the agents had received {received} and answered {results} \
                 of {expected} commands"
            ));
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("    {received} of {expected} commands received, {results} answered");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let background_per_second = (fleet.polls.load(Ordering::Relaxed)
        + fleet.heartbeats.load(Ordering::Relaxed))
    .saturating_sub(window_start.1) as f64
        / window_start.0.elapsed().as_secs_f64().max(1e-9);
    let operator = Api {
        client: admin_client,
        token: &users.operator,
    };
    let states = wait_for_final_states(&operator, &base, &change_requests, server).await?;
    let after = read_status(pid)?;

    // Dispatch times from the audit log.
    let dispatched = dispatched_commands(&admin, &base).await?;
    let ours: HashSet<&str> = change_requests.iter().map(|(id, _)| id.as_str()).collect();
    let dispatched: HashMap<String, (i64, String)> = dispatched
        .into_iter()
        .filter(|(_, (_, cr))| ours.contains(cr.as_str()))
        .collect();

    let received = fleet
        .received
        .lock()
        .map_err(|_| anyhow!("the agents' records are poisoned"))?;
    let mut times: HashMap<&str, Vec<(i64, &str)>> = HashMap::new();
    for r in received.iter() {
        times
            .entry(r.command_id.as_str())
            .or_default()
            .push((r.at_millis, r.agent_id.as_str()));
    }
    let agent_of_cr: HashMap<&str, &str> = change_requests
        .iter()
        .map(|(cr, agent)| (cr.as_str(), agent.as_str()))
        .collect();
    let mut latencies = Vec::with_capacity(dispatched.len());
    let mut queue_delays = Vec::with_capacity(dispatched.len());
    for (command, (dispatched_at, cr)) in &dispatched {
        match times.get(command.as_str()).map(Vec::as_slice) {
            Some([(at, agent)]) => {
                if agent_of_cr.get(cr.as_str()) != Some(agent) {
                    problems.push(format!(
                        "command {command} of {cr} went to {agent}, not to the target's agent"
                    ));
                }
                latencies.push(at - dispatched_at);
            }
            Some(many) if many.len() > 1 => problems.push(format!(
                "command {command} was received {} times",
                many.len()
            )),
            _ => problems.push(format!("command {command} ({cr}) was never received")),
        }
        if let Some(sent) = execute_sent.get(cr) {
            queue_delays.push(dispatched_at - sent);
        }
    }
    for command in times.keys() {
        if !dispatched.contains_key(*command) {
            problems.push(format!(
                "an agent received {command}, which no audit event dispatched"
            ));
        }
    }
    if dispatched.len() != expected {
        problems.push(format!(
            "{} commands were dispatched for {expected} executed change requests",
            dispatched.len()
        ));
    }
    let not_complete: Vec<String> = states
        .iter()
        .filter(|(_, state)| state.as_str() != "complete")
        .map(|(id, state)| format!("{id}: {state}"))
        .collect();
    if !not_complete.is_empty() {
        problems.push(format!(
            "{} change requests did not end complete (first: {})",
            not_complete.len(),
            not_complete[0]
        ));
    }
    let errors = fleet.errors.load(Ordering::Relaxed);
    if errors > 0 {
        let first = fleet
            .first_error
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .unwrap_or_default();
        problems.push(format!("{errors} agent request(s) failed; first: {first}"));
    }
    latencies.sort_unstable();
    queue_delays.sort_unstable();
    let stamps: Vec<i64> = dispatched.values().map(|(at, _)| *at).collect();
    let dispatch_span_ms = match (stamps.iter().min(), stamps.iter().max()) {
        (Some(first), Some(last)) => last - first,
        _ => 0,
    };
    Ok(Report {
        idle,
        idle_polling,
        idle_sockets,
        after,
        latencies,
        dispatch_span_ms,
        queue_delay_p50_ms: percentile(&queue_delays, 50.0),
        setup_seconds,
        background_per_second,
        polls: fleet.polls.load(Ordering::Relaxed),
        heartbeats: fleet.heartbeats.load(Ordering::Relaxed),
        problems,
    })
}

fn alive(server: &mut Server) -> Result<()> {
    match server.exited() {
        Some(status) => bail!("the server exited during the run ({status})"),
        None => Ok(()),
    }
}

/// Registers `agents` agents, `REGISTER_CONCURRENCY` at a time, and starts each one's loop as
/// soon as it is registered. Returns the agents' ids (in registration order) and tasks.
async fn register_agents(
    base: &str,
    register_client: &reqwest::Client,
    agent_client: &reqwest::Client,
    enrollment: &str,
    agents: usize,
    fleet: &Arc<Fleet>,
) -> Result<Vec<(String, tokio::task::JoinHandle<()>)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Mutex::new(Vec::with_capacity(agents)));
    let base: Arc<str> = Arc::from(base);
    let mut workers = Vec::new();
    for _ in 0..REGISTER_CONCURRENCY.min(agents) {
        let (next, done, base, fleet) = (next.clone(), done.clone(), base.clone(), fleet.clone());
        let (register_client, agent_client) = (register_client.clone(), agent_client.clone());
        let enrollment = enrollment.to_string();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= agents {
                    return Ok::<(), anyhow::Error>(());
                }
                let response = register_client
                    .post(format!("{base}/agent/register"))
                    .json(&json!({
                        "enrollment_token": enrollment,
                        "hostname": format!("bench-agent-{i:05}"),
                        "os": "linux",
                        "arch": "x86_64",
                        "version": AGENT_VERSION,
                    }))
                    .send()
                    .await
                    .context("POST /agent/register")?;
                let status = response.status();
                let body: Value = response.json().await.unwrap_or_default();
                if status != StatusCode::CREATED {
                    bail!("POST /agent/register answered {status}: {body}");
                }
                let (Some(id), Some(secret)) =
                    (body["agent_id"].as_str(), body["agent_secret"].as_str())
                else {
                    bail!("POST /agent/register returned no agent_id or agent_secret");
                };
                let agent = SimAgent {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    base: base.clone(),
                    client: agent_client.clone(),
                    fleet: fleet.clone(),
                    first_wait: 1 + i as u64 % POLL_WAIT_SECS,
                };
                let handle = tokio::spawn(agent.run());
                let count = {
                    let mut done = done
                        .lock()
                        .map_err(|_| anyhow!("registration records poisoned"))?;
                    done.push((id.to_string(), handle));
                    done.len()
                };
                if count % 500 == 0 {
                    eprintln!("    {count} agents registered");
                }
            }
        }));
    }
    let mut first_error = None;
    for worker in workers {
        let outcome = worker
            .await
            .map_err(|e| anyhow!("a registration task failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    let done = std::mem::take(
        &mut *done
            .lock()
            .map_err(|_| anyhow!("registration records poisoned"))?,
    );
    if let Some(e) = first_error {
        for (_, handle) in &done {
            handle.abort();
        }
        return Err(e);
    }
    Ok(done)
}

/// Creates, submits and approves one change request per chosen agent. Returns (change request
/// id, agent id) pairs.
async fn prepare_change_requests(
    client: &reqwest::Client,
    base: &str,
    users: &Users,
    chosen: &[String],
) -> Result<Vec<(String, String)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let chosen: Arc<Vec<String>> = Arc::new(chosen.to_vec());
    let users = Arc::new((users.operator.clone(), users.approvers.clone()));
    let base: Arc<str> = Arc::from(base);
    let mut workers = Vec::new();
    for _ in 0..SETUP_CONCURRENCY.min(chosen.len()) {
        let (next, chosen, users, base, client) = (
            next.clone(),
            chosen.clone(),
            users.clone(),
            base.clone(),
            client.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(agent) = chosen.get(i) else {
                    return Ok::<_, anyhow::Error>(made);
                };
                let id = prepare_one(&client, &base, &users.0, &users.1, i, agent).await?;
                made.push((i, id, agent.clone()));
            }
        }));
    }
    let mut all = Vec::with_capacity(chosen.len());
    for worker in workers {
        all.extend(
            worker
                .await
                .map_err(|e| anyhow!("a set-up task failed: {e}"))??,
        );
    }
    all.sort_by_key(|(i, _, _)| *i);
    Ok(all.into_iter().map(|(_, id, agent)| (id, agent)).collect())
}

async fn prepare_one(
    client: &reqwest::Client,
    base: &str,
    operator: &str,
    approvers: &[String],
    i: usize,
    agent: &str,
) -> Result<String> {
    let op = Api {
        client,
        token: operator,
    };
    let created = op
        .send(
            Method::POST,
            &format!("{base}/change-requests"),
            Some(json!({
                "title": format!("bench agent write {i:05}"),
                "change_type": "agent_write_file",
                "target": {
                    "agent_id": agent,
                    "path": format!("/tmp/nexplane-bench/file-{i:05}.txt"),
                    "content": "x",
                },
            })),
            StatusCode::CREATED,
        )
        .await?
        .body;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /change-requests returned no id: {created}"))?
        .to_string();
    let required = created["required_approvals"].as_u64().unwrap_or(1) as usize;
    if required > approvers.len() {
        bail!(
            "{id} needs {required} approvals; the bench has {} approvers",
            approvers.len()
        );
    }
    op.send(
        Method::POST,
        &format!("{base}/change-requests/{id}/submit"),
        None,
        StatusCode::OK,
    )
    .await?;
    let mut last = Value::Null;
    for approver in &approvers[..required] {
        let api = Api {
            client,
            token: approver,
        };
        last = api
            .send(
                Method::POST,
                &format!("{base}/change-requests/{id}/approve"),
                Some(json!({})),
                StatusCode::OK,
            )
            .await?
            .body;
    }
    if last["state"] != "approved" {
        bail!(
            "{id} is {} after {required} approvals, not approved",
            last["state"]
        );
    }
    Ok(id)
}

/// `POST /change-requests/{id}/execute`, one every `EXECUTE_EVERY`, each without waiting for
/// the ones before. Returns per change request the wall-clock millisecond the request was sent,
/// or why it failed.
async fn execute_all(
    client: &reqwest::Client,
    base: &str,
    operator: &str,
    change_requests: &[(String, String)],
) -> Vec<(String, Result<i64>)> {
    let mut ticker = tokio::time::interval(EXECUTE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::with_capacity(change_requests.len());
    for (id, _) in change_requests {
        ticker.tick().await;
        let (client, url, token) = (
            client.clone(),
            format!("{base}/change-requests/{id}/execute"),
            operator.to_string(),
        );
        let sent = now_millis();
        tasks.push((
            id.clone(),
            sent,
            tokio::spawn(async move {
                let api = Api {
                    client: &client,
                    token: &token,
                };
                api.send(Method::POST, &url, None, StatusCode::ACCEPTED)
                    .await
                    .map(drop)
            }),
        ));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (id, sent, task) in tasks {
        let outcome = match task.await {
            Ok(Ok(())) => Ok(sent),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow!("the execute task failed: {e}")),
        };
        out.push((id, outcome));
    }
    out
}

/// Waits until every change request is in a final state; returns (id, state) pairs.
async fn wait_for_final_states(
    api: &Api<'_>,
    base: &str,
    change_requests: &[(String, String)],
    server: &mut Server,
) -> Result<Vec<(String, String)>> {
    const FINAL: [&str; 6] = [
        "complete",
        "failed",
        "rolledback",
        "rollback_failed",
        "cancelled",
        "rejected",
    ];
    let ours: HashSet<&str> = change_requests.iter().map(|(id, _)| id.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut states = Vec::with_capacity(ours.len());
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{base}/change-requests?change_type=agent_write_file&limit=500");
            if let Some(c) = &cursor {
                url.push_str("&cursor=");
                url.push_str(c);
            }
            let page = api.send(Method::GET, &url, None, StatusCode::OK).await?;
            let items = page
                .body
                .as_array()
                .ok_or_else(|| anyhow!("GET /change-requests did not answer a list"))?;
            for cr in items {
                if let (Some(id), Some(state)) = (cr["id"].as_str(), cr["state"].as_str()) {
                    if ours.contains(id) {
                        states.push((id.to_string(), state.to_string()));
                    }
                }
            }
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        let all_final =
            states.len() == ours.len() && states.iter().all(|(_, s)| FINAL.contains(&s.as_str()));
        if all_final || Instant::now() > deadline {
            return Ok(states);
        }
        alive(server)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every `agent.command_dispatched` event: command id → (timestamp in ms, change request id).
async fn dispatched_commands(api: &Api<'_>, base: &str) -> Result<HashMap<String, (i64, String)>> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/audit?event_type=agent.command_dispatched&limit=500");
        if let Some(c) = &cursor {
            url.push_str("&cursor=");
            url.push_str(c);
        }
        let page = api.send(Method::GET, &url, None, StatusCode::OK).await?;
        let events = page
            .body
            .as_array()
            .ok_or_else(|| anyhow!("GET /audit did not answer a list: {}", page.body))?;
        for event in events {
            let command = event["resource_id"].as_str();
            let at = event["timestamp"].as_str().and_then(epoch_millis);
            let cr = event["payload"]["change_request_id"]
                .as_str()
                .or_else(|| event["change_request_id"].as_str());
            match (command, at, cr) {
                (Some(command), Some(at), Some(cr)) => {
                    out.insert(command.to_string(), (at, cr.to_string()));
                }
                _ => bail!("an agent.command_dispatched event lacks its command, time or change request: {event}"),
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            return Ok(out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report

fn verdict(met: bool) -> &'static str {
    if met {
        "PASS"
    } else {
        "FAIL"
    }
}

impl Report {
    fn print(&self, agents: usize, commands: usize, baseline: ProcStatus) {
        let ms = |p: f64| percentile(&self.latencies, p);
        let show = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"));
        println!();
        println!(
            "agents: {agents} (signed long polls, wait={POLL_WAIT_SECS} s, heartbeat every {} s); \
             commands: {commands} (agent_write_file to distinct random agents, executed at {}/s; \
             set-up of the change requests took {:.1} s, not measured)",
            HEARTBEAT_EVERY.as_secs(),
            1000 / EXECUTE_EVERY.as_millis().max(1),
            self.setup_seconds
        );
        println!(
            "server RSS before the agents : {:>7.1} MB",
            mb(baseline.rss_kib)
        );
        println!(
            "server RSS, {agents} agents idle: {:>7.1} MB  ({} polls out, {} server sockets, {} \
             threads)",
            mb(self.idle.rss_kib),
            self.idle_polling,
            self.idle_sockets
                .map_or_else(|| "?".to_string(), |n| n.to_string()),
            self.idle.threads
        );
        let share_kib = self.idle.rss_kib.saturating_sub(baseline.rss_kib);
        println!(
            "    the agents' share (idle − before): {:.1} MB, {:.1} KB per agent",
            mb(share_kib),
            share_kib as f64 * 1.024 / agents.max(1) as f64
        );
        println!(
            "server RSS after the commands: {:>7.1} MB; peak (VmHWM) over the run {:.1} MB \
             ({} threads)",
            mb(self.after.rss_kib),
            mb(self.after.hwm_kib),
            self.after.threads
        );
        println!(
            "dispatch → receive latency ({} commands): p50 {}, p90 {}, p99 {}, max {}",
            self.latencies.len(),
            show(ms(50.0)),
            show(ms(90.0)),
            show(ms(99.0)),
            show(self.latencies.last().copied())
        );
        println!(
            "    commands dispatched over {:.1} s; execute → dispatch (job queue) p50 {}; \
             meanwhile {:.0} polls answered + heartbeats per second from the fleet; {} polls \
             and {} heartbeats answered in all",
            self.dispatch_span_ms as f64 / 1000.0,
            show(self.queue_delay_p50_ms),
            self.background_per_second,
            self.polls,
            self.heartbeats
        );
        let idle_ratio = mb(self.idle.rss_kib) / TARGET_RSS_MB;
        let peak_ratio = mb(self.after.hwm_kib) / TARGET_RSS_MB;
        println!(
            "RSS idle / {TARGET_RSS_MB:.0} MB = {idle_ratio:.2} (target ≤ 1.00): {}",
            verdict(idle_ratio <= 1.0)
        );
        println!(
            "RSS peak / {TARGET_RSS_MB:.0} MB = {peak_ratio:.2} (target ≤ 1.00): {}",
            verdict(peak_ratio <= 1.0)
        );
        match ms(99.0) {
            Some(p99) => {
                let ratio = p99 as f64 / TARGET_P99_MS;
                println!(
                    "p99 / {TARGET_P99_MS:.0} ms = {ratio:.2} (target ≤ 1.00): {}",
                    verdict(ratio <= 1.0)
                );
            }
            None => println!("p99 / {TARGET_P99_MS:.0} ms: no latency measured: FAIL"),
        }
        let missed: Vec<&str> = [
            (idle_ratio > 1.0, "idle RSS"),
            (peak_ratio > 1.0, "peak RSS"),
            (
                ms(99.0).is_none_or(|p| p as f64 > TARGET_P99_MS),
                "p99 latency",
            ),
        ]
        .into_iter()
        .filter_map(|(miss, name)| miss.then_some(name))
        .collect();
        if missed.is_empty() {
            println!("all targets met");
        } else {
            println!("targets missed: {}", missed.join(", "));
        }
    }

    fn check(&self) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        bail!(
            "the run is not valid ({} problem(s)):\n  {}",
            self.problems.len(),
            self.problems.join("\n  ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 90.0), Some(90));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        let few = [3, 7, 20];
        assert_eq!(percentile(&few, 50.0), Some(7));
        assert_eq!(percentile(&few, 99.0), Some(20));
        assert_eq!(percentile(&few, 33.0), Some(3));
        assert_eq!(percentile(&few, 34.0), Some(7));
        assert_eq!(percentile(&[42], 99.0), Some(42));
        // 200 values: p99 is the 198th, so the two largest may be outliers.
        let mut two_hundred: Vec<i64> = vec![10; 198];
        two_hundred.extend([500, 900]);
        assert_eq!(percentile(&two_hundred, 99.0), Some(10));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&values, 101.0), None);
        assert_eq!(percentile(&values, -1.0), None);
    }

    #[test]
    fn reads_proc_status() {
        let status = "Name:\tnexplane\nVmPeak:\t  900000 kB\nVmHWM:\t   81234 kB\n\
                      VmRSS:\t   65432 kB\nThreads:\t12\n";
        assert_eq!(status_field(status, "VmRSS"), Some(65_432));
        assert_eq!(status_field(status, "VmHWM"), Some(81_234));
        assert_eq!(status_field(status, "Threads"), Some(12));
        assert_eq!(status_field(status, "VmSwap"), None);
        assert_eq!(status_field(status, "Vm"), None);
        assert!((mb(146_484) - 149.999).abs() < 0.01);
    }

    #[test]
    fn reads_own_status() -> Result<()> {
        let me = read_status(std::process::id())?;
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib && me.threads >= 1);
        Ok(())
    }

    #[test]
    fn parses_arguments() -> Result<()> {
        let defaults = Options {
            agents: DEFAULT_AGENTS,
            commands: DEFAULT_COMMANDS,
        };
        assert_eq!(parse_args(&[])?, defaults);
        assert_eq!(
            parse_args(&["--agents", "50", "--commands=5"])?,
            Options {
                agents: 50,
                commands: 5
            }
        );
        assert_eq!(parse_args(&["--agents=300"])?.agents, 300);
        assert!(parse_args(&["--agents"]).is_err());
        assert!(parse_args(&["--agents", "0"]).is_err());
        assert!(parse_args(&["--agents", "10001"]).is_err());
        assert!(parse_args(&["--agents", "10", "--commands", "11"]).is_err());
        assert!(parse_args(&["--users", "5"]).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn fresh_second_moves_past_the_last_one() {
        let now = i64::try_from(unix_now().as_secs()).unwrap_or(i64::MAX);
        assert!(fresh_second(now - 10).await >= now);
        assert!(fresh_second(now).await > now);
    }
}
