//! The real `nexplane-agent` binary against the real server (api.md §7): `enroll`, `run` and
//! `status` as child processes, file changes through change requests and their rollback,
//! the `allowed_paths` refusal, revocation (exit code 3), and two agents side by side.
//!
//! The binary is `NEXPLANE_TEST_AGENT_BIN`, else `nexplane-agent` next to this test
//! executable's `deps` directory (`cargo test --workspace` builds it; so does
//! `cargo build -p nexplane-agent`).

use crate::agents::{approved_agent_change, enrollment_token};
use crate::both;
use crate::harness::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The agent binary; panics (never skips) when it has not been built.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NEXPLANE_TEST_AGENT_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "NEXPLANE_TEST_AGENT_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/api-… → <target>/<profile>/nexplane-agent
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lies in <target>/<profile>/deps");
    let p = profile.join("nexplane-agent");
    assert!(
        p.is_file(),
        "the agent binary {} is missing: build it first with `cargo build -p nexplane-agent` \
         (or set NEXPLANE_TEST_AGENT_BIN)",
        p.display()
    );
    p
}

fn agent_cmd() -> Command {
    let mut c = Command::new(agent_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NEXPLANE_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info").env("NO_COLOR", "1");
    c.stdin(Stdio::null());
    c
}

/// Runs the agent binary to completion (off the runtime's worker threads: the server under
/// test runs on them).
async fn agent_output(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || agent_cmd().args(&args).output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A host directory (canonical, so it matches what the agent resolves).
fn host_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = std::fs::canonicalize(d.path()).unwrap();
    (d, p)
}

/// An agent enrolled with `nexplane-agent enroll`: its configuration file and identity.
struct Enrolled {
    _dir: tempfile::TempDir,
    config: PathBuf,
    id: String,
    secret: String,
    /// What `enroll` printed.
    output: Output,
    token: String,
}

impl Enrolled {
    fn config_str(&self) -> &str {
        path_str(&self.config)
    }
}

/// Creates an enrollment token and runs `enroll` with it; asserts it succeeded.
async fn enroll(app: &TestApp, name: &str) -> Enrolled {
    let t = enrollment_token(app, json!({"name": name})).await;
    let token = t["token"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let out = agent_output(&[
        "enroll",
        "--server",
        &app.base,
        "--token",
        &token,
        "--config",
        path_str(&config),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "enroll failed: {}", text(&out));
    let parsed: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let id = parsed["agent_id"].as_str().unwrap().to_owned();
    let secret = parsed["agent_secret"].as_str().unwrap().to_owned();
    Enrolled {
        _dir: dir,
        config,
        id,
        secret,
        output: out,
        token,
    }
}

/// Sets `allowed_paths` and the intervals in an enrolled configuration (keeping its mode).
fn configure(config: &Path, allowed: &[&Path], poll_wait: u64, heartbeat: u64) {
    let old = std::fs::read_to_string(config).unwrap();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or_default().trim();
            !matches!(
                key,
                "allowed_paths" | "poll_wait_seconds" | "heartbeat_seconds"
            )
        })
        .map(str::to_owned)
        .collect();
    let dirs: Vec<String> = allowed
        .iter()
        .map(|d| format!("{:?}", path_str(d)))
        .collect();
    lines.push(format!("allowed_paths = [{}]", dirs.join(", ")));
    lines.push(format!("poll_wait_seconds = {poll_wait}"));
    lines.push(format!("heartbeat_seconds = {heartbeat}"));
    std::fs::write(config, lines.join("\n") + "\n").unwrap();
    assert_eq!(mode_of(config), 0o600);
}

/// A `nexplane-agent run` child process, killed when dropped. Its stdout and stderr go to a
/// log file shown in failure messages.
struct RunningAgent {
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl RunningAgent {
    fn start(config: &Path) -> Self {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("agent.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = agent_cmd()
            .args(["run", "--config", path_str(config)])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            _log_dir: log_dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let out = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "kill: {}", text(&out));
    }

    /// Waits for the process to exit (at most `secs`).
    async fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent still runs after {secs} s; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails (with the log) if the process has exited.
    #[track_caller]
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the agent exited ({status}); its log:\n{}", self.logs());
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /agents/{id}` until its status is `want` (at most `secs`).
async fn wait_agent_status(app: &TestApp, id: &str, want: &str, secs: u64, agent: &RunningAgent) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = app.get(&format!("/agents/{id}"), &app.admin_token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.body["status"] == json!(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent {id} is not {want} after {secs} s: {}\nagent log:\n{}",
            r.text,
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn agent_status(app: &TestApp, id: &str) -> Value {
    let r = app.get(&format!("/agents/{id}"), &app.admin_token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

/// Enrolls an agent with the binary, allows `allowed`, and starts `run` (poll 1 s,
/// heartbeat 2 s).
async fn start_agent(app: &TestApp, name: &str, allowed: &[&Path]) -> (Enrolled, RunningAgent) {
    let e = enroll(app, name).await;
    configure(&e.config, allowed, 1, 2);
    let agent = RunningAgent::start(&e.config);
    (e, agent)
}

/// Executes (or rolls back, `action` = "rollback") a change request, waits for its job and
/// returns the change request.
async fn run_action(
    app: &TestApp,
    id: &str,
    token: &str,
    action: &str,
    agent: &RunningAgent,
) -> Value {
    let r = app
        .post(&format!("/change-requests/{id}/{action}"), token, json!({}))
        .await;
    assert_eq!(r.status, 202, "{action}: {}", r.text);
    let job = r.body["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.get(&format!("/jobs/{job}"), &app.admin_token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let status = r.body["status"].as_str().unwrap_or_default();
        if status == "succeeded" || status == "failed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{action} job {job} still {status} after 30 s: {}\nagent log:\n{}",
            r.text,
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = app.get(&format!("/change-requests/{id}"), token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

// ---------------------------------------------------------------------------------------------

both!(enroll_run_status_and_stop, |app: TestApp| async move {
    let e = enroll(&app, "bin").await;
    // The configuration: 0600, the agent's id, a secret never printed.
    assert_eq!(mode_of(&e.config), 0o600);
    assert!(e.id.starts_with("agt_"), "{}", e.id);
    assert!(e.secret.len() >= 22);
    let printed = text(&e.output);
    assert!(printed.contains(&e.id), "{printed}");
    assert!(
        !printed.contains(&e.secret),
        "the secret was printed: {printed}"
    );
    assert!(
        !printed.contains(&e.token),
        "the token was printed: {printed}"
    );
    let a = agent_status(&app, &e.id).await;
    assert_eq!(a["name"], json!("bin"), "{a}");
    assert_eq!(a["os"], json!(std::env::consts::OS), "{a}");
    assert_eq!(a["arch"], json!(std::env::consts::ARCH), "{a}");
    assert!(!a["hostname"].as_str().unwrap().is_empty(), "{a}");

    // Enrolling again over it is refused before the new token is spent.
    let t2 = enrollment_token(&app, json!({})).await;
    let before = std::fs::read_to_string(&e.config).unwrap();
    let out = agent_output(&[
        "enroll",
        "--server",
        &app.base,
        "--token",
        t2["token"].as_str().unwrap(),
        "--config",
        e.config_str(),
    ])
    .await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&e.config).unwrap(), before);
    let tokens = app.get("/agents/enrollment-tokens", &app.admin_token).await;
    let t2_listed = tokens
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == t2["id"])
        .unwrap()
        .clone();
    assert_eq!(t2_listed["uses"], json!(0), "{t2_listed}");

    let (_keep, dir) = host_dir();
    configure(&e.config, &[&dir], 1, 2);

    // `status` with the agent stopped: accepted.
    let out = agent_output(&["status", "--config", e.config_str()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains(&e.id), "{stdout}");
    assert!(stdout.contains(path_str(&dir)), "{stdout}");
    assert!(!text(&out).contains(&e.secret));

    // Offline without heartbeats; `run` brings it online at once (its first heartbeat may
    // land in the same second as `status`'s: the nonce keeps them distinct).
    app.clock.advance_secs(91);
    assert_eq!(agent_status(&app, &e.id).await["status"], json!("offline"));
    let mut agent = RunningAgent::start(&e.config);
    wait_agent_status(&app, &e.id, "online", 15, &agent).await;
    agent.assert_running();

    // SIGTERM: a clean stop (exit 0); then offline once 90 s pass without heartbeats.
    agent.signal("TERM");
    let status = agent.wait_exit(10).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.logs());
    assert!(!agent.logs().contains(&e.secret));
    app.clock.advance_secs(91);
    assert_eq!(agent_status(&app, &e.id).await["status"], json!("offline"));
});

// ---------------------------------------------------------------------------------------------
// Real agent processes running change requests. Each agent request carries a random nonce
// in its signed query, so a poll right after a result, or `status` next to `run`, is never
// mistaken for a replay.

both!(
    write_file_and_set_file_mode_apply_and_roll_back,
    |app: TestApp| { write_file_and_set_file_mode_apply_and_roll_back(app) }
);
both!(paths_outside_allowed_paths_are_refused, |app: TestApp| {
    paths_outside_allowed_paths_are_refused(app)
});
both!(
    two_agents_each_get_only_their_own_commands,
    |app: TestApp| { two_agents_each_get_only_their_own_commands(app) }
);
both!(status_while_the_agent_runs, |app: TestApp| {
    status_while_the_agent_runs(app)
});

/// `write_file` (over an existing file and a new one) and `set_file_mode` through change
/// requests, and their rollbacks, checked on disk.
async fn write_file_and_set_file_mode_apply_and_roll_back(app: TestApp) {
    let (_keep, dir) = host_dir();
    let (e, mut agent) = start_agent(&app, "files", &[&dir]).await;

    // A pre-existing file: replaced, then restored (content and mode).
    let existing = dir.join("app.conf");
    std::fs::write(&existing, "old content\n").unwrap();
    set_mode(&existing, 0o600);
    let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": e.id, "path": path_str(&existing), "content": "new content\n", "mode": "0640"}),
        )
        .await;
    let cr = run_action(&app, &id, &op, "execute", &agent).await;
    assert_eq!(cr["state"], json!("complete"), "{cr}\n{}", agent.logs());
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "new content\n");
    assert_eq!(mode_of(&existing), 0o640);
    let cr = run_action(&app, &id, &op, "rollback", &agent).await;
    assert_eq!(cr["state"], json!("rolledback"), "{cr}\n{}", agent.logs());
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "old content\n");
    assert_eq!(mode_of(&existing), 0o600);

    // A new file: created with its mode, removed by the rollback.
    let fresh = dir.join("sub-less.env");
    let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": e.id, "path": path_str(&fresh), "content": "KEY=value\n", "mode": "0600"}),
        )
        .await;
    let cr = run_action(&app, &id, &op, "execute", &agent).await;
    assert_eq!(cr["state"], json!("complete"), "{cr}\n{}", agent.logs());
    assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "KEY=value\n");
    assert_eq!(mode_of(&fresh), 0o600);
    let cr = run_action(&app, &id, &op, "rollback", &agent).await;
    assert_eq!(cr["state"], json!("rolledback"), "{cr}\n{}", agent.logs());
    assert!(!fresh.exists(), "the rollback left the new file behind");

    // set_file_mode, and its rollback.
    let script = dir.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    set_mode(&script, 0o644);
    let (id, op) = approved_agent_change(
        &app,
        "agent_set_file_mode",
        json!({"agent_id": e.id, "path": path_str(&script), "mode": "0750"}),
    )
    .await;
    let cr = run_action(&app, &id, &op, "execute", &agent).await;
    assert_eq!(cr["state"], json!("complete"), "{cr}\n{}", agent.logs());
    assert_eq!(mode_of(&script), 0o750);
    let cr = run_action(&app, &id, &op, "rollback", &agent).await;
    assert_eq!(cr["state"], json!("rolledback"), "{cr}\n{}", agent.logs());
    assert_eq!(mode_of(&script), 0o644);
    assert_eq!(std::fs::read_to_string(&script).unwrap(), "#!/bin/sh\n");

    // The file content never reaches the agent's log.
    assert!(!agent.logs().contains("KEY=value"), "{}", agent.logs());
    agent.assert_running();
}

/// Paths outside `allowed_paths` (directly, or through a symlink inside an allowed directory)
/// are refused: the change request fails naming allowed_paths, nothing changes there.
async fn paths_outside_allowed_paths_are_refused(app: TestApp) {
    let (_keep_in, inside) = host_dir();
    let (_keep_out, outside) = host_dir();
    let (e, mut agent) = start_agent(&app, "fenced", &[&inside]).await;

    // A new file outside: refused, nothing written.
    let target = outside.join("evil.conf");
    let (id, op) = approved_agent_change(
        &app,
        "agent_write_file",
        json!({"agent_id": e.id, "path": path_str(&target), "content": "pwned"}),
    )
    .await;
    let cr = run_action(&app, &id, &op, "execute", &agent).await;
    assert_eq!(cr["state"], json!("failed"), "{cr}\n{}", agent.logs());
    let error = cr["execution"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("allowed_paths"), "{cr}");
    assert!(
        !target.exists(),
        "a refused command wrote {}",
        target.display()
    );

    // An existing file outside keeps its mode.
    let victim = outside.join("victim");
    std::fs::write(&victim, "x").unwrap();
    set_mode(&victim, 0o600);
    let (id, op) = approved_agent_change(
        &app,
        "agent_set_file_mode",
        json!({"agent_id": e.id, "path": path_str(&victim), "mode": "0666"}),
    )
    .await;
    let cr = run_action(&app, &id, &op, "execute", &agent).await;
    assert_eq!(cr["state"], json!("failed"), "{cr}\n{}", agent.logs());
    assert!(
        cr["execution"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("allowed_paths"),
        "{cr}"
    );
    assert_eq!(mode_of(&victim), 0o600);

    // Through a symlink inside the allowed directory that leads outside: refused too.
    std::os::unix::fs::symlink(&outside, inside.join("link")).unwrap();
    let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": e.id, "path": path_str(&inside.join("link").join("via-link")), "content": "pwned"}),
        )
        .await;
    let cr = run_action(&app, &id, &op, "execute", &agent).await;
    assert_eq!(cr["state"], json!("failed"), "{cr}\n{}", agent.logs());
    assert!(
        cr["execution"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("allowed_paths"),
        "{cr}"
    );
    assert!(!outside.join("via-link").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);

    // The agent keeps running after refusals.
    agent.assert_running();
}

both!(
    a_revoked_agent_stops_with_exit_code_3,
    |app: TestApp| async move {
        let (_keep, dir) = host_dir();
        let (e, mut agent) = start_agent(&app, "doomed", &[&dir]).await;
        // Make sure `run` is heartbeating before revoking it.
        app.clock.advance_secs(91);
        wait_agent_status(&app, &e.id, "online", 15, &agent).await;
        agent.assert_running();

        let r = app
            .delete(&format!("/agents/{}", e.id), &app.admin_token)
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        let started = Instant::now();
        let status = agent.wait_exit(10).await;
        assert_eq!(status.code(), Some(3), "log:\n{}", agent.logs());
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "took {:?}",
            started.elapsed()
        );
        assert!(agent.logs().contains("401"), "{}", agent.logs());
        assert_eq!(agent_status(&app, &e.id).await["status"], json!("revoked"));

        // `status` says it is rejected, with exit code 3 as well.
        let out = agent_output(&["status", "--config", e.config_str()]).await;
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    }
);

/// Two agent processes at once: each executes only the commands queued for it.
async fn two_agents_each_get_only_their_own_commands(app: TestApp) {
    // Both may write the same directory: a command handed to the wrong agent would work.
    let (_keep, dir) = host_dir();
    let (a, mut agent_a) = start_agent(&app, "alpha", &[&dir]).await;
    let (b, mut agent_b) = start_agent(&app, "beta", &[&dir]).await;

    let mut changes = Vec::new();
    for (who, file) in [(&a, "a1"), (&b, "b1"), (&a, "a2"), (&b, "b2")] {
        let (id, op) = approved_agent_change(
            &app,
            "agent_write_file",
            json!({"agent_id": who.id, "path": path_str(&dir.join(file)), "content": file}),
        )
        .await;
        changes.push((id, op));
    }
    // Execute all four at once.
    let mut jobs = Vec::new();
    for (id, op) in &changes {
        let r = app
            .post(&format!("/change-requests/{id}/execute"), op, json!({}))
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
        jobs.push(r.body["id"].as_str().unwrap().to_owned());
    }
    for job in &jobs {
        let done = app.wait_job(job, 30).await;
        assert_eq!(
            done["status"],
            json!("succeeded"),
            "{done}\nalpha:\n{}\nbeta:\n{}",
            agent_a.logs(),
            agent_b.logs()
        );
    }
    for (id, op) in &changes {
        let cr = app.get(&format!("/change-requests/{id}"), op).await.body;
        assert_eq!(cr["state"], json!("complete"), "{cr}");
    }
    for f in ["a1", "b1", "a2", "b2"] {
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), f);
    }

    // Each command was executed by the agent it was queued for, and only by it.
    let rows = app.query("SELECT id, agent_id FROM agent_commands");
    assert_eq!(rows.len(), 4, "{rows:?}");
    let (logs_a, logs_b) = (agent_a.logs(), agent_b.logs());
    for row in &rows {
        let (cmd, owner) = row.split_once('|').unwrap();
        let (mine, theirs) = if owner == a.id {
            (&logs_a, &logs_b)
        } else {
            assert_eq!(owner, b.id, "{row}");
            (&logs_b, &logs_a)
        };
        assert!(
            mine.contains(cmd),
            "{cmd} missing from its agent's log:\n{mine}"
        );
        assert!(
            !theirs.contains(cmd),
            "{cmd} reached the other agent:\n{theirs}"
        );
    }
    agent_a.assert_running();
    agent_b.assert_running();
}

/// `status` while `run` is running (what an operator does on a live host): both keep
/// working. Today one of the two identical heartbeats signed in the same second is refused as
/// a replay, and when it is `run`'s, the agent stops with exit code 3.
async fn status_while_the_agent_runs(app: TestApp) {
    let (_keep, dir) = host_dir();
    let e = enroll(&app, "live").await;
    configure(&e.config, &[&dir], 1, 1);
    let mut agent = RunningAgent::start(&e.config);
    app.clock.advance_secs(91);
    wait_agent_status(&app, &e.id, "online", 15, &agent).await;
    // A second apart: two `status` runs in the same second are identical requests too.
    for _ in 0..4 {
        let out = agent_output(&["status", "--config", e.config_str()]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}
agent log:
{}",
            text(&out),
            agent.logs()
        );
        agent.assert_running();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    agent.assert_running();
}
