//! Crash safety of executions and rollbacks (api.md §6.2, §8) on the real `nexplane` binary,
//! against SQLite and PostgreSQL.
//!
//! `NEXPLANE_TEST_PAUSE_AT` stops the job worker for good at one point of a step (`started`:
//! journaled `running`, provider not called yet; `called`: the provider call returned, the
//! journal not updated yet; `journaled`: the step's result stored). Each test rotates the
//! access key of `prod-deploy` at the AWS emulator, SIGKILLs the server at one point of one
//! execution step, starts it again without the pause point on the same data dir and database,
//! and checks that the change ends `complete` with exactly the keys it should have made; then
//! it does the same to the rollback, killing it at the same point of the undo of that step.
//! 2 steps × 3 points, execution and rollback: the 12 points.

use crate::harness::{
    free_port, fresh_pg_database, query_database, Backend, Resp, TestApp, ADMIN_EMAIL,
    ADMIN_PASSWORD, USER_PASSWORD,
};
use nexplane_testing::moto::{self, Seeder};
use reqwest::StatusCode;
use rusoto_core::signature::SignedRequest;
use rusoto_core::{HttpClient, Region};
use rusoto_credential::StaticProvider;
use serde_json::{json, Value};
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `NEXPLANE_JOB_LEASE_SECONDS` of every server here (the smallest allowed).
const LEASE_SECS: u64 = 4;
/// A resumed job must have finished this long after the restart began.
const FINISH_WITHIN: Duration = Duration::from_secs(LEASE_SECS + 15);
const IAM_USER: &str = "prod-deploy";
/// The file (in the data dir) a paused worker writes its pause point to.
const PAUSE_MARKER: &str = "paused-at";

/// A running `nexplane serve`; killed (SIGKILL) when dropped, also when a test panics.
struct Process {
    child: Child,
    base: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One deployment: a data dir and a database that outlive the server processes run on them.
struct Node {
    backend: Backend,
    dir: tempfile::TempDir,
    database_url: String,
    client: reqwest::Client,
    process: Option<Process>,
    starts: u32,
    admin: String,
}

impl Node {
    async fn new(backend: Backend) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}/nexplane.db", dir.path().display()),
            Backend::Postgres => tokio::task::spawn_blocking(fresh_pg_database)
                .await
                .unwrap(),
        };
        Node {
            backend,
            dir,
            database_url,
            client: reqwest::Client::new(),
            process: None,
            starts: 0,
            admin: String::new(),
        }
    }

    /// Runs a query on this node's database: one line per row, columns separated by `|`.
    fn query(&self, statement: &str) -> Vec<String> {
        query_database(self.backend, &self.database_url, statement)
    }

    /// How many times each step of a stored journal was started, and how many times its job
    /// was claimed: ([(step, attempts)], job attempts).
    fn attempts(&self, id: &str, kind: &str) -> (Vec<(String, u64)>, u64) {
        let rows = self.query(&format!(
            "SELECT j.body, jobs.attempts FROM change_request_journals j \
             JOIN jobs ON jobs.id = j.job_id \
             WHERE j.change_request_id = '{id}' AND j.kind = '{kind}'"
        ));
        assert_eq!(rows.len(), 1, "{rows:?}");
        let (body, job) = rows[0].rsplit_once('|').unwrap();
        let journal: Value = serde_json::from_str(body).unwrap();
        let steps = journal["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["attempts"].as_u64().unwrap(),
                )
            })
            .collect();
        (steps, job.parse().unwrap())
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join(PAUSE_MARKER)
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("server-{n}.log"))
    }

    /// The end of every log the servers of this node wrote, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
            all.push_str(&format!("--- server start {n} ---\n{text}"));
        }
        let cut = all.len().saturating_sub(12_000);
        let cut = (cut..all.len())
            .find(|&i| all.is_char_boundary(i))
            .unwrap_or(0);
        all[cut..].to_owned()
    }

    /// Starts `nexplane serve` on this node (stopping at `pause` when given) and logs the
    /// admin in.
    async fn start(&mut self, pause: Option<&str>) {
        assert!(self.process.is_none(), "a server is already running");
        let _ = std::fs::remove_file(self.marker());
        for _ in 0..5 {
            if let Some(process) = self.spawn(pause).await {
                self.process = Some(process);
                self.admin = self.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
                return;
            }
        }
        panic!("no free port found in 5 tries:\n{}", self.logs());
    }

    /// Spawns the server on a free port and waits until it serves there; `None` when another
    /// process took the port first.
    async fn spawn(&mut self, pause: Option<&str>) -> Option<Process> {
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let log = File::create(&log_path).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexplane"));
        for (k, _) in std::env::vars() {
            if k.starts_with("NEXPLANE_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("serve")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,nexplane=debug")
            .env("NEXPLANE_BIND", &addr)
            .env("NEXPLANE_DATA_DIR", self.dir.path())
            .env("NEXPLANE_DATABASE_URL", &self.database_url)
            .env("NEXPLANE_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("NEXPLANE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("NEXPLANE_JOB_LEASE_SECONDS", LEASE_SECS.to_string())
            .env("NEXPLANE_WORKERS", "2")
            .env("NEXPLANE_DB_POOL_SIZE", "4")
            .env("NEXPLANE_RATE_LIMIT_PER_MINUTE", "100000")
            .env("NEXPLANE_IP_RATE_LIMIT_PER_MINUTE", "100000")
            .env("NEXPLANE_LOGIN_RATE_LIMIT_PER_MINUTE", "100000")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        if let Some(point) = pause {
            cmd.env("NEXPLANE_TEST_PAUSE_AT", point);
        }
        let mut process = Process {
            child: cmd.spawn().unwrap(),
            base: format!("http://{addr}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(status) = process.child.try_wait().unwrap() {
                if log.contains("NEXPLANE_BIND: cannot listen") {
                    return None;
                }
                panic!("the server stopped at start ({status}):\n{}", self.logs());
            }
            // Only once it logged that it listens is the port its own (and not another
            // test's that took it in between).
            let listening = log
                .lines()
                .any(|l| l.contains("listening") && l.contains(&addr));
            if listening
                && self
                    .client
                    .get(format!("{}/health/live", process.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            {
                return Some(process);
            }
            assert!(
                Instant::now() < deadline,
                "the server did not start within 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the server: no shutdown code runs, the job keeps its lease until it runs out.
    fn kill(&mut self) {
        let mut process = self.process.take().expect("no server to kill");
        process.child.kill().unwrap();
        let status = process.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status}");
    }

    /// Waits until the paused worker has written `point` to its marker file.
    async fn wait_paused(&mut self, point: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(at) = std::fs::read_to_string(self.marker()) {
                assert_eq!(at, point);
                return;
            }
            if let Some(status) = self.process.as_mut().unwrap().child.try_wait().unwrap() {
                panic!(
                    "the server stopped ({status}) before {point}:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not reach {point} within 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> &str {
        &self.process.as_ref().expect("no server running").base
    }

    async fn send(&self, method: reqwest::Method, path: &str, token: &str, body: Value) -> Resp {
        let mut rb = self
            .client
            .request(method.clone(), format!("{}{path}", self.base()))
            .bearer_auth(token);
        if method != reqwest::Method::GET {
            rb = rb.json(&body);
        }
        TestApp::finish(rb.send().await.unwrap()).await
    }

    async fn get(&self, path: &str, token: &str) -> Resp {
        self.send(reqwest::Method::GET, path, token, Value::Null)
            .await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.send(reqwest::Method::POST, path, token, body).await
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let r = self
            .client
            .post(format!("{}/auth/login", self.base()))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        let r = TestApp::finish(r).await;
        assert_eq!(r.status, StatusCode::OK, "login failed: {}", r.text);
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    /// A new user with `role`; returns its email.
    async fn user(&self, role: &str, n: u32) -> String {
        let email = format!("{role}{n}@example.com");
        let r = self
            .post(
                "/users",
                &self.admin,
                json!({"email": email, "name": format!("{role} {n}"), "role": role,
                       "password": USER_PASSWORD}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        email
    }

    async fn change_request(&self, id: &str) -> Value {
        let r = self
            .get(&format!("/change-requests/{id}"), &self.admin)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body
    }

    /// POSTs `execute` or `rollback`; returns the job id.
    async fn run(&self, token: &str, id: &str, action: &str) -> String {
        let r = self
            .post(&format!("/change-requests/{id}/{action}"), token, json!({}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        r.body["id"].as_str().unwrap().to_owned()
    }

    /// Polls the job until it has finished, failing after `deadline`.
    async fn wait_job(&self, job_id: &str, deadline: Instant) -> Value {
        loop {
            let r = self.get(&format!("/jobs/{job_id}"), &self.admin).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let status = r.body["status"].as_str().unwrap_or_default();
            if status == "succeeded" || status == "failed" {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} still {status} {} s after the restart (lease {LEASE_SECS} s): {}\n{}",
                FINISH_WITHIN.as_secs(),
                r.text,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The status of `old` and the other keys, checking there is at most one other.
async fn key_state(seed: &Seeder, old: &str) -> (String, Option<(String, String)>) {
    let all = seed.keys(IAM_USER).await;
    let old_status = all
        .iter()
        .find(|(id, _)| id == old)
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| panic!("the old key {old} is gone: {all:?}"));
    let others: Vec<(String, String)> = all.iter().filter(|(id, _)| id != old).cloned().collect();
    assert!(others.len() <= 1, "an extra key: {all:?}");
    (old_status, others.into_iter().next())
}

/// What AWS holds at the pause point: the old key's status and how many other keys, before
/// (`applied` false) or after the provider call of `step`.
fn expected_at_pause(step: &str, applied: bool) -> (&'static str, usize) {
    match (step, applied) {
        ("create_access_key", false) => ("Active", 0),
        ("create_access_key", true) => ("Active", 1),
        ("deactivate_old_access_key", false) => ("Active", 1),
        ("deactivate_old_access_key", true) => ("Inactive", 1),
        ("reactivate_old_access_key", false) => ("Inactive", 1),
        ("reactivate_old_access_key", true) => ("Active", 1),
        ("delete_new_access_key", false) => ("Active", 1),
        ("delete_new_access_key", true) => ("Active", 0),
        _ => panic!("unknown step {step}"),
    }
}

/// How many times each of `steps` is started when the server was killed at `phase` of
/// `killed`: twice when killed before its result was stored, else once.
fn expected_attempts(steps: &[&str], killed: &str, phase: &str) -> Vec<(String, u64)> {
    steps
        .iter()
        .map(|s| {
            let n = if *s == killed && phase != "journaled" {
                2
            } else {
                1
            };
            ((*s).to_owned(), n)
        })
        .collect()
}

/// The undo step of an execution step of `rotate_iam_access_key`.
fn undo_of(step: &str) -> &'static str {
    match step {
        "create_access_key" => "delete_new_access_key",
        "deactivate_old_access_key" => "reactivate_old_access_key",
        _ => panic!("unknown step {step}"),
    }
}

/// `[(name, status)]` of a journal's steps.
fn steps(journal: &Value) -> Vec<(String, String)> {
    journal["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps: {journal}"))
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// STS GetCallerIdentity signed with this key: (HTTP status, body). With the emulator's
/// authentication on it checks the key exists and the signature (so the secret) is right;
/// the call itself needs no permission.
async fn caller_identity(url: &str, key_id: &str, secret: &str) -> (u16, String) {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = rusoto_core::Client::new_with(
        StaticProvider::new_minimal(key_id.into(), secret.into()),
        HttpClient::from_connector(https),
    );
    let region = Region::Custom {
        name: "us-east-1".into(),
        endpoint: url.into(),
    };
    let mut request = SignedRequest::new("POST", "sts", &region, "/");
    request.set_payload(Some(
        "Action=GetCallerIdentity&Version=2011-06-15".to_owned(),
    ));
    request.set_content_type("application/x-www-form-urlencoded".to_owned());
    let mut response = client.sign_and_dispatch(request).await.unwrap();
    let body = response.buffer().await.unwrap();
    (body.status.as_u16(), body.body_as_str().to_owned())
}

/// Kills the server at `execution:<step>:<phase>`, restarts it and checks the rotation;
/// then kills it at `rollback:<undo of step>:<phase>`, restarts it and checks the rollback.
async fn kill_and_resume(backend: Backend, step: &str, phase: &str) {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user(IAM_USER).await;
    let (old, _) = seed.access_key(IAM_USER).await;
    let mut node = Node::new(backend).await;

    // ---- The execution, killed at the point.
    let point = format!("execution:{step}:{phase}");
    node.start(Some(&point)).await;
    let r = node
        .post(
            "/connectors",
            &node.admin,
            json!({"name": "emulated", "type": "aws", "environment": "staging",
                   "settings": moto::settings(&url, &["us-east-1"]),
                   "credentials": {"aws_access_key_id": "AKIANEXPLANECRASH001",
                                   "aws_secret_access_key": "crash-test-secret/0123456789"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let connector = r.body["id"].as_str().unwrap().to_owned();
    let operator = node.user("operator", 0).await;
    let op = node.login(&operator, USER_PASSWORD).await;
    let r = node
        .post(
            "/change-requests",
            &op,
            json!({"title": "rotate prod-deploy", "connector_id": connector,
                   "change_type": "rotate_iam_access_key", "target": {"iam_user": IAM_USER}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = node
        .post(&format!("/change-requests/{id}/submit"), &op, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for n in 0..r.body["required_approvals"].as_u64().unwrap() {
        let approver = node.user("approver", u32::try_from(n).unwrap()).await;
        let token = node.login(&approver, USER_PASSWORD).await;
        let r = node
            .post(&format!("/change-requests/{id}/approve"), &token, json!({}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let job = node.run(&op, &id, "execute").await;
    node.wait_paused(&point).await;

    // Paused exactly there: the journal and AWS say so.
    let applied = phase != "started";
    let cr = node.change_request(&id).await;
    assert_eq!(cr["state"], json!("executing"), "{cr}");
    let at = if phase == "journaled" {
        "succeeded"
    } else {
        "running"
    };
    assert!(
        steps(&cr["execution"]).contains(&(step.to_owned(), at.to_owned())),
        "{point}: {cr}"
    );
    let (old_status, other) = key_state(&seed, &old).await;
    assert_eq!(
        (old_status.as_str(), usize::from(other.is_some())),
        expected_at_pause(step, applied),
        "AWS at {point}"
    );
    let key_at_pause = other.map(|(k, _)| k);

    node.kill();
    let restarted = Instant::now();
    node.start(None).await;
    let done = node.wait_job(&job, restarted + FINISH_WITHIN).await;
    eprintln!(
        "{point}: resumed and finished {:?} after the restart began",
        restarted.elapsed()
    );
    assert_eq!(
        done["status"],
        json!("succeeded"),
        "{done}\n{}",
        node.logs()
    );
    let cr = node.change_request(&id).await;
    assert_eq!(cr["state"], json!("complete"), "{cr}\n{}", node.logs());
    let exec = &cr["execution"];
    assert_eq!(
        steps(exec),
        [
            ("create_access_key".to_owned(), "succeeded".to_owned()),
            (
                "deactivate_old_access_key".to_owned(),
                "succeeded".to_owned()
            ),
        ],
        "{cr}"
    );
    // The job was taken over once; the step killed before its result was stored ran again
    // (reconciled), a step whose result was stored did not.
    let (started, claimed) = node.attempts(&id, "execution");
    assert_eq!(
        started,
        expected_attempts(
            &["create_access_key", "deactivate_old_access_key"],
            step,
            phase
        ),
        "{point}"
    );
    assert_eq!(claimed, 2, "{point}");
    // The API shows the same counts.
    let shown: Vec<(String, u64)> = exec["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, started, "{cr}");
    assert_eq!(exec["outputs"]["old_access_key_id"], json!(old), "{cr}");
    let new = exec["outputs"]["new_access_key_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no new_access_key_id: {cr}"))
        .to_owned();
    // AWS: the old key Inactive and exactly one other key, Active: the recorded new one.
    let mut expected = vec![
        (old.clone(), "Inactive".to_owned()),
        (new.clone(), "Active".to_owned()),
    ];
    expected.sort();
    assert_eq!(seed.keys(IAM_USER).await, expected, "after {point}");
    match (step, phase) {
        // Killed after CreateAccessKey answered but before the answer (and so the secret)
        // was stored: the resumed step deleted that key and made a fresh one.
        ("create_access_key", "called") => {
            let lost = key_at_pause.expect("a key was created before the kill");
            assert_ne!(lost, new);
            assert_eq!(
                exec["outputs"]["discarded_access_key_ids"],
                json!([lost]),
                "{cr}"
            );
        }
        // Otherwise no key was discarded, and a key made before the kill is the new key.
        _ => {
            assert!(
                exec["outputs"]["discarded_access_key_ids"].is_null(),
                "{cr}"
            );
            if let Some(k) = key_at_pause {
                assert_eq!(k, new, "the new key was made again");
            }
        }
    }

    // The secret: revealed once, and it is the new key's.
    assert_eq!(
        cr["secret_outputs"],
        json!(["new_secret_access_key"]),
        "{cr}"
    );
    let op = node.login(&operator, USER_PASSWORD).await;
    let reveal = format!("/change-requests/{id}/reveal-secrets");
    let r = node.post(&reveal, &op, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let secret = r.body["new_secret_access_key"].as_str().unwrap().to_owned();
    let r = node.post(&reveal, &op, json!({})).await;
    assert_eq!(r.status, StatusCode::GONE, "{}", r.text);
    moto::enable_auth(&url).await;
    let wrong = caller_identity(&url, &new, "not-the-secret-of-this-key-0123456789").await;
    let right = caller_identity(&url, &new, &secret).await;
    moto::control(&url, "/moto-api/reset-auth", "inf").unwrap();
    assert_eq!(wrong.0, 403, "the emulator checks signatures: {}", wrong.1);
    assert_eq!(
        right.0, 200,
        "the revealed secret does not sign: {}",
        right.1
    );
    assert!(
        right
            .1
            .contains(&format!("arn:aws:iam::{}:user/{IAM_USER}", moto::ACCOUNT)),
        "{}",
        right.1
    );

    // ---- The rollback, killed at the same point of the undo step.
    node.kill();
    let undo = undo_of(step);
    let point = format!("rollback:{undo}:{phase}");
    node.start(Some(&point)).await;
    let op = node.login(&operator, USER_PASSWORD).await;
    let job = node.run(&op, &id, "rollback").await;
    node.wait_paused(&point).await;
    let cr = node.change_request(&id).await;
    assert_eq!(cr["state"], json!("rolling_back"), "{cr}");
    assert!(
        steps(&cr["rollback"]).contains(&(undo.to_owned(), at.to_owned())),
        "{point}: {cr}"
    );
    let (old_status, other) = key_state(&seed, &old).await;
    assert_eq!(
        (old_status.as_str(), usize::from(other.is_some())),
        expected_at_pause(undo, applied),
        "AWS at {point}"
    );
    if let Some((k, _)) = other {
        assert_eq!(k, new);
    }

    node.kill();
    let restarted = Instant::now();
    node.start(None).await;
    let done = node.wait_job(&job, restarted + FINISH_WITHIN).await;
    eprintln!(
        "{point}: resumed and finished {:?} after the restart began",
        restarted.elapsed()
    );
    assert_eq!(
        done["status"],
        json!("succeeded"),
        "{done}\n{}",
        node.logs()
    );
    let cr = node.change_request(&id).await;
    assert_eq!(cr["state"], json!("rolledback"), "{cr}\n{}", node.logs());
    assert_eq!(
        steps(&cr["rollback"]),
        [
            (
                "reactivate_old_access_key".to_owned(),
                "succeeded".to_owned()
            ),
            ("delete_new_access_key".to_owned(), "succeeded".to_owned()),
        ],
        "{cr}"
    );
    let (started, claimed) = node.attempts(&id, "rollback");
    assert_eq!(
        started,
        expected_attempts(
            &["reactivate_old_access_key", "delete_new_access_key"],
            undo,
            phase
        ),
        "{point}"
    );
    assert_eq!(claimed, 2, "{point}");
    // Only the old key, Active again: never an extra key.
    assert_eq!(
        seed.keys(IAM_USER).await,
        [(old.clone(), "Active".to_owned())],
        "after {point}"
    );

    // Each transition happened once, in order (no step or ending ran twice).
    let r = node
        .get(
            &format!("/audit?change_request_id={id}&limit=500"),
            &node.admin,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut types: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    types.reverse();
    assert_eq!(
        types,
        [
            "change_request.created",
            "change_request.submitted",
            "change_request.approved",
            "change_request.execution_started",
            "change_request.completed",
            "change_request.secrets_revealed",
            "change_request.rollback_started",
            "change_request.rolledback"
        ]
    );
}

/// One test per execution step and pause point (the rollback is killed at the same point of
/// that step's undo), on both backends.
macro_rules! kill_points {
    ($($name:ident => $step:literal, $phase:literal;)*) => {
        $(
            mod $name {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    kill_and_resume(Backend::Sqlite, $step, $phase).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    kill_and_resume(Backend::Postgres, $step, $phase).await;
                }
            }
        )*
    };
}

kill_points! {
    sigkill_when_create_access_key_started => "create_access_key", "started";
    sigkill_when_create_access_key_called => "create_access_key", "called";
    sigkill_when_create_access_key_journaled => "create_access_key", "journaled";
    sigkill_when_deactivate_old_access_key_started => "deactivate_old_access_key", "started";
    sigkill_when_deactivate_old_access_key_called => "deactivate_old_access_key", "called";
    sigkill_when_deactivate_old_access_key_journaled => "deactivate_old_access_key", "journaled";
}
