//! The agent against a scripted local HTTP server: signing of every call, the command loop,
//! results and snapshots, retries, 401 handling, enrollment and status.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{run_binary, write_config, Recorded, Reply, TestServer, AGENT_ID, SECRET};
use nexplane_agent::Config;
use serde_json::{json, Value};

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A control plane with a queue of commands; records results; answers 409 to results of
/// commands whose id ends in `_dup`.
fn control_plane(prefix: &'static str, commands: Vec<Value>) -> TestServer {
    let queue = Arc::new(Mutex::new(VecDeque::from(commands)));
    TestServer::start(move |req: &Recorded| {
        let path = req
            .path()
            .strip_prefix(prefix)
            .unwrap_or("/not-under-prefix");
        match (req.method.as_str(), path) {
            ("POST", "/agent/heartbeat") => {
                Reply::json(200, json!({ "server_time": now_rfc3339() }))
            }
            ("GET", "/agent/commands/next") => match queue.lock().unwrap().pop_front() {
                Some(cmd) => Reply::json(200, cmd),
                None => Reply::empty(204).after(Duration::from_millis(100)),
            },
            ("POST", p) if p.starts_with("/agent/commands/") && p.ends_with("/result") => {
                if p.contains("_dup/") {
                    Reply::problem(409, "result already recorded")
                } else {
                    Reply::empty(204)
                }
            }
            _ => Reply::problem(404, "no such route"),
        }
    })
}

fn config_for(server: &str, allowed: &Path, poll_wait: u64) -> Config {
    let mut config = Config::enrolled(
        server.to_string(),
        AGENT_ID.to_string(),
        nexplane_agent::AgentSecret::new(SECRET.to_string()),
    );
    config.allowed_paths = vec![allowed.to_path_buf()];
    config.poll_wait_seconds = poll_wait;
    config.heartbeat_seconds = 1;
    config
}

/// Runs the agent library in its own thread and runtime; returns a stop handle and the join
/// handle with the run result.
fn spawn_agent(
    config: Config,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::thread::JoinHandle<Result<(), nexplane_agent::RunError>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let handle = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(nexplane_agent::run(config, rx))
    });
    (tx, handle)
}

fn results(server: &TestServer) -> Vec<(String, Value)> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/result"))
        .map(|r| {
            let id = r
                .path()
                .trim_end_matches("/result")
                .rsplit('/')
                .next()
                .unwrap()
                .to_string();
            (id, r.json())
        })
        .collect()
}

#[test]
fn run_signs_every_call_and_reports_results_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("etc-app");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let existing = allowed.join("existing.conf");
    std::fs::write(&existing, "old content\n").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o640)).unwrap();
    let new_file = allowed.join("new.conf");
    let p = |path: &Path| path.to_str().unwrap().to_string();

    let commands = vec![
        json!({"id": "cmd_1", "type": "write_file",
               "params": {"path": p(&new_file), "content": "a = 1\n", "mode": "0600"}}),
        json!({"id": "cmd_2", "type": "write_file",
               "params": {"path": p(&existing), "content": "new content\n"}}),
        json!({"id": "cmd_3", "type": "write_file",
               "params": {"path": p(&outside.join("x")), "content": "nope"}}),
        json!({"id": "cmd_4", "type": "reboot", "params": {}}),
        json!({"id": "cmd_5", "type": "set_file_mode",
               "params": {"path": p(&existing), "mode": "0600"}}),
        json!({"id": "cmd_6_dup", "type": "restore_file_mode",
               "params": {"path": p(&existing), "mode": "0640"}}),
        json!({"id": "cmd_7", "type": "restore_file",
               "params": {"path": p(&new_file), "snapshot": {"existed": false}}}),
    ];
    // The server URL has a path prefix: it is part of what is signed.
    let server = control_plane("/np", commands);
    let (stop, agent) = spawn_agent(config_for(&format!("{}/np/", server.base), &allowed, 2));

    server.wait_for(Duration::from_secs(30), "seven results", |reqs| {
        reqs.iter()
            .filter(|r| r.path().ends_with("/result"))
            .count()
            >= 7
    });
    server.wait_for(Duration::from_secs(10), "two heartbeats", |reqs| {
        reqs.iter()
            .filter(|r| r.path().ends_with("/heartbeat"))
            .count()
            >= 2
    });
    stop.send(true).unwrap();
    agent.join().unwrap().unwrap();

    // Every call is signed over exactly what arrived, and none carries the secret.
    let requests = server.requests();
    for r in &requests {
        r.verify_signature(AGENT_ID, SECRET)
            .unwrap_or_else(|e| panic!("{} {}: {e}", r.method, r.target));
        assert!(
            !r.leaks(SECRET),
            "{} {} carries the secret",
            r.method,
            r.target
        );
    }
    let poll = requests.iter().find(|r| r.method == "GET").unwrap();
    let (path, nonce) = poll.target.split_once("&nonce=").unwrap();
    assert_eq!(path, "/np/agent/commands/next?wait=2");
    assert_eq!(nonce.len(), 32, "{}", poll.target);
    assert!(poll.body.is_empty());
    // Every request is unique (a random nonce in the signed query), so two identical calls in
    // the same second are never taken for a replay.
    let mut targets: Vec<&str> = requests.iter().map(|r| r.target.as_str()).collect();
    let n = targets.len();
    targets.sort_unstable();
    targets.dedup();
    assert_eq!(targets.len(), n, "a request target repeated");
    let beat = requests
        .iter()
        .find(|r| r.path() == "/np/agent/heartbeat")
        .unwrap();
    let beat_body = beat.json();
    assert_eq!(beat_body["version"], nexplane_agent::VERSION);
    assert!(beat_body["hostname"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));

    let results = results(&server);
    let by_id = |id: &str| {
        results
            .iter()
            .find(|(rid, _)| rid == id)
            .unwrap_or_else(|| panic!("no result for {id}"))
            .1
            .clone()
    };
    assert_eq!(
        by_id("cmd_1"),
        json!({"status": "succeeded",
               "output": {"path": p(&new_file), "bytes": 6, "mode": "0600"},
               "snapshot": {"existed": false}})
    );
    assert_eq!(
        by_id("cmd_2"),
        json!({"status": "succeeded",
               "output": {"path": p(&existing), "bytes": 12, "mode": "0640"},
               "snapshot": {"existed": true, "content_base64": "b2xkIGNvbnRlbnQK", "mode": "0640"}})
    );
    assert_eq!(
        by_id("cmd_3"),
        json!({"status": "failed",
               "output": {"error": format!("path {} is outside allowed_paths", p(&outside.join("x")))}})
    );
    assert_eq!(
        by_id("cmd_4"),
        json!({"status": "failed", "output": {"error": "unknown command type reboot"}})
    );
    assert_eq!(
        by_id("cmd_5"),
        json!({"status": "succeeded",
               "output": {"path": p(&existing), "mode": "0600"},
               "snapshot": {"existed": true, "mode": "0640"}})
    );
    // Answered 409 by the server: logged, and the agent went on with the next command.
    assert_eq!(
        by_id("cmd_6_dup"),
        json!({"status": "succeeded", "output": {"path": p(&existing), "mode": "0640"}})
    );
    assert_eq!(
        by_id("cmd_7"),
        json!({"status": "succeeded", "output": {"path": p(&new_file), "restored": "removed"}})
    );
    assert_eq!(results.len(), 7, "each result posted once");

    // The host's state.
    assert!(!new_file.exists());
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "new content\n");
    assert_eq!(
        std::fs::metadata(&existing).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn run_backs_off_on_server_errors_and_delivers_results_eventually() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f.conf");
    let polls = Arc::new(Mutex::new(0u32));
    let result_attempts = Arc::new(Mutex::new(0u32));
    let target_text = target.to_str().unwrap().to_string();
    let server = {
        let polls = polls.clone();
        let result_attempts = result_attempts.clone();
        TestServer::start(move |req| match (req.method.as_str(), req.path()) {
            ("POST", "/agent/heartbeat") => Reply::problem(503, "database unreachable"),
            ("GET", _) => {
                let mut n = polls.lock().unwrap();
                *n += 1;
                match *n {
                    1 | 2 => Reply::problem(503, "database unreachable"),
                    3 => Reply::json(
                        200,
                        json!({"id": "cmd_r", "type": "write_file",
                               "params": {"path": target_text, "content": "x"}}),
                    ),
                    _ => Reply::empty(204).after(Duration::from_millis(100)),
                }
            }
            ("POST", _) => {
                let mut n = result_attempts.lock().unwrap();
                *n += 1;
                if *n == 1 {
                    Reply::problem(503, "database unreachable")
                } else {
                    Reply::empty(204)
                }
            }
            _ => Reply::problem(404, "no such route"),
        })
    };
    let (stop, agent) = spawn_agent(config_for(&server.base, dir.path(), 1));
    server.wait_for(Duration::from_secs(30), "the result delivered", |_| {
        *result_attempts.lock().unwrap() >= 2
    });
    stop.send(true).unwrap();
    agent.join().unwrap().unwrap();

    // Backoff, not a busy loop: the retries are spaced by at least the minimum delay.
    let polls_at: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.at)
        .collect();
    assert!(polls_at.len() >= 3);
    for pair in polls_at[..3].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(900), "retry after {gap:?}");
    }
    let posts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path().ends_with("/result"))
        .collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(
        posts[0].body, posts[1].body,
        "the same result is posted again"
    );
    assert!(posts[1].at - posts[0].at >= Duration::from_millis(900));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
}

#[test]
fn run_exits_non_zero_on_401() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(|_| Reply::problem(401, "agent agt_01testagent is revoked"));
    let config = write_config(dir.path(), &server.base, "");
    let out = run_binary(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(nexplane_agent::exit::REJECTED)),
        "{stderr}"
    );
    assert!(stderr.contains("is revoked"), "{stderr}");
    assert!(!stderr.contains(SECRET));
    for r in server.requests() {
        r.verify_signature(AGENT_ID, SECRET).unwrap();
    }
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = control_plane("", Vec::new());
    let config = write_config(dir.path(), &server.base, "poll_wait_seconds = 1\n");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_nexplane-agent"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    server.wait_for(Duration::from_secs(20), "a poll", |reqs| {
        reqs.iter().any(|r| r.method == "GET")
    });
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = common::wait_with_timeout(child, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(!stderr.contains(SECRET));
}

#[test]
fn run_refuses_an_unsafe_or_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9", "");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_binary(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");

    let config = write_config(dir.path(), "http://127.0.0.1:9", "allowed_dirs = []\n");
    let out = run_binary(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("unknown field `allowed_dirs`"), "{stderr}");
    assert!(!stderr.contains(SECRET));
}

const TOKEN: &str = "enr-token-9d8c7b6a5f4e3d2c1b0a";

fn enrollment_server(reply: Reply) -> TestServer {
    TestServer::start(move |req| {
        if req.method == "POST" && req.path() == "/agent/register" {
            reply.clone()
        } else {
            Reply::problem(404, "no such route")
        }
    })
}

#[test]
fn enroll_writes_a_0600_config_and_never_prints_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = enrollment_server(Reply::json(
        201,
        json!({"agent_id": AGENT_ID, "agent_secret": SECRET}),
    ));
    let config = dir.path().join("etc/nexplane-agent/agent.toml");
    let config_arg = config.to_str().unwrap();
    let args = [
        "enroll",
        "--server",
        &server.base,
        "--token",
        TOKEN,
        "--config",
        config_arg,
        "--label",
        "env=prod",
        "--label",
        "role=web=1",
    ];
    let out = run_binary(&args, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains(TOKEN), "{text}");
    }
    assert!(stdout.contains(AGENT_ID), "{stdout}");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let body = reqs[0].json();
    assert_eq!(body["enrollment_token"], TOKEN);
    assert_eq!(body["os"], std::env::consts::OS);
    assert_eq!(body["arch"], std::env::consts::ARCH);
    assert_eq!(body["version"], nexplane_agent::VERSION);
    assert!(body["hostname"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(body["labels"], json!({"env": "prod", "role": "web=1"}));
    assert_eq!(reqs[0].header("content-type"), Some("application/json"));

    let meta = std::fs::metadata(&config).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let loaded = Config::load(&config).unwrap();
    assert_eq!(loaded.server, server.base);
    assert_eq!(loaded.agent_id, AGENT_ID);
    assert_eq!(loaded.agent_secret.expose(), SECRET);
    assert!(loaded.allowed_paths.is_empty());
    assert_eq!(loaded.poll_wait_seconds, 30);
    assert_eq!(loaded.heartbeat_seconds, 30);

    // A second enrollment refuses to overwrite, before spending a token.
    let out = run_binary(&args, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(server.requests().len(), 1);

    let mut forced = args.to_vec();
    forced.push("--force");
    let out = run_binary(&forced, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(
        std::fs::read_dir(config.parent().unwrap()).unwrap().count(),
        1,
        "no temporary file left behind"
    );
}

#[test]
fn enroll_reports_a_refused_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = enrollment_server(Reply::problem(401, "enrollment token expired"));
    let config = dir.path().join("agent.toml");
    let out = run_binary(
        &[
            "enroll",
            "--server",
            &server.base,
            "--token",
            TOKEN,
            "--config",
            config.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(nexplane_agent::exit::REJECTED)),
        "{stderr}"
    );
    assert!(stderr.contains("enrollment token expired"), "{stderr}");
    assert!(!stderr.contains(TOKEN));
    assert!(!config.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn status_reports_whether_the_server_accepts_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ok = TestServer::start(|req| {
        if req.verify_signature(AGENT_ID, SECRET).is_ok() {
            Reply::json(200, json!({"server_time": "2026-12-04T15:41:22.123Z"}))
        } else {
            Reply::problem(401, "bad signature")
        }
    });
    let config = write_config(
        dir.path(),
        &ok.base,
        "allowed_paths = [\"/etc/app\", \"/srv/www\"]\n",
    );
    let out = run_binary(
        &["status", "--config", config.to_str().unwrap()],
        Duration::from_secs(20),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(AGENT_ID), "{stdout}");
    assert!(stdout.contains(&ok.base), "{stdout}");
    assert!(stdout.contains("/etc/app, /srv/www"), "{stdout}");
    assert!(stdout.contains("2026-12-04T15:41:22.123Z"), "{stdout}");
    assert!(!stdout.contains(SECRET));
    assert_eq!(ok.requests()[0].path(), "/agent/heartbeat");

    let revoked = TestServer::start(|_| Reply::problem(401, "agent revoked"));
    let config = write_config(dir.path(), &revoked.base, "");
    let out = run_binary(
        &["status", "--config", config.to_str().unwrap()],
        Duration::from_secs(20),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0));
    assert!(stdout.contains("agent revoked"), "{stdout}");
}
