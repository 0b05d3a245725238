//! Starts the real server on port 0 against a fresh SQLite file or a fresh PostgreSQL
//! database, with a clock the test controls, and talks HTTP to it.

use nexplane::config::{Config, Source};
use nexplane_domain::Timestamp;
use nexplane_ports::Clock;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

/// The bootstrap admin of every test server.
pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";
/// Password of every user a test creates.
pub const USER_PASSWORD: &str = "user-password-0123";

/// A clock the test moves by hand; starts at the real time.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new() -> Self {
        Self(AtomicI64::new(nexplane::SystemClock.now().millis()))
    }
    pub fn advance_secs(&self, s: i64) {
        self.0.fetch_add(s * 1000, Ordering::SeqCst);
    }
    pub fn advance_millis(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server the tests use. Tests fail (never skip) when it is unreachable.
pub fn pg_admin_url() -> String {
    std::env::var("NEXPLANE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".into())
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new, empty PostgreSQL database for one test server; its URL.
pub fn fresh_pg_database() -> String {
    let admin = pg_admin_url();
    let name = format!(
        "nexplane_test_{}_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::SeqCst),
        rand_suffix()
    );
    let out = std::process::Command::new("psql")
        .arg(&admin)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("psql must be installed to create test databases");
    assert!(
        out.status.success(),
        "PostgreSQL at {admin} is required: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match admin.rfind('/') {
        Some(i) => format!("{}/{}", &admin[..i], name),
        None => panic!("bad NEXPLANE_TEST_DATABASE_URL {admin}"),
    }
}

pub use nexplane_testing::free_port;

/// Runs a query against a test database and returns its rows, one line each, columns
/// separated by `|` (NULL as an empty column).
pub fn query_database(backend: Backend, database_url: &str, statement: &str) -> Vec<String> {
    let out = match backend {
        Backend::Postgres => std::process::Command::new("psql")
            .arg(database_url)
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", statement])
            .output()
            .unwrap(),
        Backend::Sqlite => {
            let path = database_url.trim_start_matches("sqlite://").to_owned();
            let script = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\n\
                for row in c.execute(sys.argv[2]): print('|'.join('' if v is None else str(v) for v in row))";
            std::process::Command::new("python3")
                .args(["-c", script, &path, statement])
                .output()
                .unwrap()
        }
    };
    assert!(
        out.status.success(),
        "query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{t:x}")
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub clock: Arc<ManualClock>,
    pub admin_token: String,
    pub backend: Backend,
    pub database_url: String,
    pub data_dir: tempfile::TempDir,
    running: nexplane::Running,
    users: AtomicU32,
    /// The configuration the server was started with (for restarts and CLI commands).
    vars: BTreeMap<String, String>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.running.worker.stop();
        self.running.worker.task.abort();
        self.running.watcher.abort();
        let h = self.running.handle.clone();
        drop(h.stop(false));
        self.running.task.abort();
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Asserts a problem+json error with this status and returns its `code`.
    #[track_caller]
    pub fn assert_problem(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "body: {}",
            self.text
        );
        assert_eq!(self.body["status"], json!(status));
        let code = self.body["code"].as_str().unwrap_or_default().to_owned();
        assert_eq!(
            self.body["type"],
            json!(format!("urn:nexplane:error:{code}"))
        );
        code
    }
}

/// Test-specific configuration changes, as environment variables.
pub type Env = Vec<(&'static str, String)>;

impl TestApp {
    pub async fn start(backend: Backend, env: Env) -> TestApp {
        capture_logs();
        let data_dir = tempfile::tempdir().unwrap();
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}/nexplane.db", data_dir.path().display()),
            Backend::Postgres => tokio::task::spawn_blocking(fresh_pg_database)
                .await
                .unwrap(),
        };
        let mut vars: BTreeMap<String, String> = [
            ("NEXPLANE_BIND", "127.0.0.1:0".to_owned()),
            ("NEXPLANE_DATA_DIR", data_dir.path().display().to_string()),
            ("NEXPLANE_DATABASE_URL", database_url.clone()),
            ("NEXPLANE_ADMIN_EMAIL", ADMIN_EMAIL.to_owned()),
            ("NEXPLANE_ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
            ("NEXPLANE_WORKERS", "2".to_owned()),
            ("NEXPLANE_DB_POOL_SIZE", "4".to_owned()),
            ("NEXPLANE_RATE_LIMIT_PER_MINUTE", "100000".to_owned()),
            ("NEXPLANE_IP_RATE_LIMIT_PER_MINUTE", "100000".to_owned()),
            ("NEXPLANE_LOGIN_RATE_LIMIT_PER_MINUTE", "100000".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in env {
            vars.insert(k.to_owned(), v);
        }
        let cfg = Config::from_source(&Source::from_maps(vars.clone(), BTreeMap::new())).unwrap();
        let clock = Arc::new(ManualClock::new());
        let running = nexplane::start(cfg, clock.clone()).await.unwrap();
        let base = format!("http://{}", running.addr);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut app = TestApp {
            base,
            client,
            clock,
            admin_token: String::new(),
            backend,
            database_url,
            data_dir,
            running,
            users: AtomicU32::new(0),
            vars,
        };
        app.admin_token = app.login_ok(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        app
    }

    /// The configuration of this test server.
    pub fn config(&self) -> Config {
        Config::from_source(&Source::from_maps(self.vars.clone(), BTreeMap::new())).unwrap()
    }

    /// Stops this server (HTTP and job worker, at once: like a crash) and starts a new one on
    /// the same database, data dir and clock; logs the admin in again.
    pub async fn restart(&mut self) {
        self.running.worker.stop();
        self.running.worker.task.abort();
        self.running.watcher.abort();
        self.running.handle.stop(false).await;
        self.running.task.abort();
        let running = nexplane::start(self.config(), self.clock.clone())
            .await
            .unwrap();
        self.base = format!("http://{}", running.addr);
        self.running = running;
        self.admin_token = self.login_ok(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
    }

    /// Runs a query against this test's database and returns its rows, one line each, columns
    /// separated by `|`.
    pub fn query(&self, statement: &str) -> Vec<String> {
        query_database(self.backend, &self.database_url, statement)
    }

    /// Polls `GET /jobs/{id}` until the job has finished (at most `secs` seconds).
    pub async fn wait_job(&self, id: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let r = self.get(&format!("/jobs/{id}"), &self.admin_token).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let status = r.body["status"].as_str().unwrap_or_default();
            if status == "succeeded" || status == "failed" {
                return r.body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} still {status} after {secs} s: {}",
                r.text
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request; `body` is JSON when given.
    pub async fn req(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut rb = self.client.request(method, self.url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        Self::finish(rb.send().await.unwrap()).await
    }

    /// Sends a raw body with a content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Resp {
        let mut rb = self
            .client
            .request(method, self.url(path))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        Self::finish(rb.send().await.unwrap()).await
    }

    pub async fn finish(r: reqwest::Response) -> Resp {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.req(Method::GET, path, Some(token), None).await
    }
    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.req(Method::POST, path, Some(token), Some(body)).await
    }
    pub async fn put(&self, path: &str, token: &str, body: Value) -> Resp {
        self.req(Method::PUT, path, Some(token), Some(body)).await
    }
    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.req(Method::DELETE, path, Some(token), None).await
    }

    pub async fn login(&self, email: &str, password: &str) -> Resp {
        self.req(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    pub async fn login_ok(&self, email: &str, password: &str) -> Value {
        let r = self.login(email, password).await;
        assert_eq!(r.status, StatusCode::OK, "login failed: {}", r.text);
        r.body
    }

    /// Creates a user with `role` (as the admin) and logs them in: (user json, access token).
    pub async fn user(&self, role: &str) -> (Value, String) {
        let n = self.users.fetch_add(1, Ordering::SeqCst);
        let email = format!("{role}{n}@example.com");
        let r = self
            .post(
                "/users",
                &self.admin_token,
                json!({"email": email, "name": format!("{role} {n}"), "role": role, "password": USER_PASSWORD}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let token = self.login_ok(&email, USER_PASSWORD).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        (r.body, token)
    }

    /// Audit events of a type, newest first.
    pub async fn audit_of(&self, event_type: &str) -> Vec<Value> {
        let r = self
            .get(
                &format!("/audit?event_type={event_type}&limit=500"),
                &self.admin_token,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body.as_array().unwrap().clone()
    }

    /// Runs SQL against this test's database (for tamper tests).
    pub fn sql(&self, statement: &str) {
        let out = match self.backend {
            Backend::Postgres => std::process::Command::new("psql")
                .arg(&self.database_url)
                .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", statement])
                .output()
                .unwrap(),
            Backend::Sqlite => {
                let path = self.database_url.trim_start_matches("sqlite://").to_owned();
                let script = "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()";
                std::process::Command::new("python3")
                    .args(["-c", script, &path, statement])
                    .output()
                    .unwrap()
            }
        };
        assert!(
            out.status.success(),
            "sql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs an async test body against SQLite and against PostgreSQL.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:expr) => {
        both!($name, Vec::new(), $body);
    };
    ($name:ident, $env:expr, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app =
                    $crate::harness::TestApp::start($crate::harness::Backend::Sqlite, $env).await;
                ($body)(app).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let app =
                    $crate::harness::TestApp::start($crate::harness::Backend::Postgres, $env).await;
                ($body)(app).await;
            }
        }
    };
}

/// Every log line the in-process servers of this test binary wrote (all tests share it).
static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();

struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the servers' logs (nexplane at debug, the rest at info) into a buffer tests can scan.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,nexplane=debug"))
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .try_init();
        buf
    });
}

/// Everything logged so far by the servers of this test binary.
pub fn captured_logs() -> String {
    LOGS.get()
        .and_then(|b| {
            b.lock()
                .ok()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        })
        .unwrap_or_default()
}
