//! `cargo xtask bench auth`: how much does authentication cost per request?
//!
//! Starts a release build of the server on a throw-away data dir, logs in, and compares the
//! throughput of the authenticated `GET /auth/me` with the public `GET /health`. Both touch the
//! database and return a small JSON body, so the difference is (mostly) the token check and the
//! session lookup. Target: `/auth/me` reaches at least 80 % of the `/health` rate.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

const CONCURRENCY: usize = 32;
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(5);
const ROUNDS: usize = 2;
const TARGET_RATIO: f64 = 0.80;
const ADMIN_EMAIL: &str = "bench@example.com";
/// 20 characters; only ever used against a throw-away server on loopback.
const ADMIN_PASSWORD: &str = "bench-Pass-2026-wxyz";

pub fn auth() -> Result<()> {
    let binary = build_release_server()?;
    let port = free_port()?;
    let mut server = Server::start(&binary, port)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(measure(&mut server));
    drop(server); // kill the server and remove its data dir before reporting
    result
}

/// `cargo build --release --bin nexplane`, returning the path of the built executable.
pub(crate) fn build_release_server() -> Result<PathBuf> {
    eprintln!("==> building the release server");
    let output = crate::cargo()
        .args([
            "build",
            "--release",
            "--package",
            "nexplane",
            "--bin",
            "nexplane",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo build")?;
    if !output.status.success() {
        bail!(
            "`cargo build --release --bin nexplane` failed ({})",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "nexplane")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo build did not report the nexplane executable"))
}

pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The running server; dropping it kills the process and removes the data dir.
pub(crate) struct Server {
    child: Child,
    data_dir: PathBuf,
    pub(crate) base_url: String,
}

impl Server {
    pub(crate) fn start(binary: &Path, port: u16) -> Result<Self> {
        Self::start_with_env(binary, port, &[])
    }

    /// [`Server::start`] with more environment variables (they win over the defaults here).
    pub(crate) fn start_with_env(
        binary: &Path,
        port: u16,
        extra_env: &[(&str, &str)],
    ) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let data_dir =
            std::env::temp_dir().join(format!("nexplane-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let bind = format!("127.0.0.1:{port}");
        eprintln!("==> starting {} serve on {bind}", binary.display());
        let spawned = Command::new(binary)
            .arg("serve")
            .env("NEXPLANE_DATA_DIR", &data_dir)
            .env("NEXPLANE_BIND", &bind)
            .env("NEXPLANE_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("NEXPLANE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("NEXPLANE_RATE_LIMIT_PER_MINUTE", "100000000")
            .env("NEXPLANE_LOGIN_RATE_LIMIT_PER_MINUTE", "1000")
            .env("NEXPLANE_IP_RATE_LIMIT_PER_MINUTE", "100000000")
            .env("RUST_LOG", "warn")
            .env_remove("NEXPLANE_DATABASE_URL")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&data_dir);
                return Err(e).context("cannot start the server");
            }
        };
        Ok(Self {
            child,
            data_dir,
            base_url: format!("http://{bind}"),
        })
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

async fn measure(server: &mut Server) -> Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(Duration::from_secs(10))
        .build()?;
    wait_until_live(server, &client).await?;
    let token = login(&client, &server.base_url).await?;

    let me = Endpoint {
        label: "GET /auth/me",
        url: format!("{}/auth/me", server.base_url),
        bearer: Some(token),
    };
    let health = Endpoint {
        label: "GET /health",
        url: format!("{}/health", server.base_url),
        bearer: None,
    };

    eprintln!(
        "==> warm-up ({} s each), then {ROUNDS} interleaved rounds of {} s, {CONCURRENCY} in flight",
        WARM_UP.as_secs(),
        MEASURE.as_secs()
    );
    let mut errors = Errors::default();
    for endpoint in [&me, &health] {
        let warm = run_load(&client, endpoint, WARM_UP).await;
        errors.add(&warm);
    }
    let (mut me_total, mut health_total) = (Totals::default(), Totals::default());
    for round in 1..=ROUNDS {
        for (endpoint, totals) in [(&me, &mut me_total), (&health, &mut health_total)] {
            let load = run_load(&client, endpoint, MEASURE).await;
            eprintln!(
                "    round {round}: {:<14} {:>10.0} req/s ({} ok, {} errors)",
                endpoint.label,
                load.rate(),
                load.ok,
                load.failed
            );
            errors.add(&load);
            totals.add(&load);
        }
    }

    let me_rate = me_total.rate();
    let health_rate = health_total.rate();
    let ratio = if health_rate > 0.0 {
        me_rate / health_rate
    } else {
        0.0
    };
    println!("GET /auth/me : {me_rate:>10.0} req/s");
    println!("GET /health  : {health_rate:>10.0} req/s");
    println!(
        "ratio /auth/me / /health = {ratio:.2} (target ≥ {TARGET_RATIO:.2}): {}",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    if errors.count > 0 {
        bail!(
            "{} request(s) did not get a 200; first: {}",
            errors.count,
            errors.first.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

pub(crate) async fn wait_until_live(server: &mut Server, client: &reqwest::Client) -> Result<()> {
    let url = format!("{}/health/live", server.base_url);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = client.get(&url).send().await {
            if resp.status().is_success() {
                return Ok(());
            }
        }
        if let Some(status) = server.exited() {
            bail!("the server exited before it became live ({status})");
        }
        if Instant::now() >= deadline {
            bail!("the server did not answer GET /health/live within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn login(client: &reqwest::Client, base_url: &str) -> Result<String> {
    let resp = client
        .post(format!("{base_url}/auth/login"))
        .json(&serde_json::json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD }))
        .send()
        .await
        .context("POST /auth/login failed")?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST /auth/login answered {status}: {body}");
    }
    body["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("POST /auth/login returned no access_token: {body}"))
}

struct Endpoint {
    label: &'static str,
    url: String,
    bearer: Option<String>,
}

struct Load {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    first_error: Option<String>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Default)]
struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn add(&mut self, load: &Load) {
        self.count += load.failed;
        if self.first.is_none() {
            self.first.clone_from(&load.first_error);
        }
    }
}

#[derive(Default)]
struct Totals {
    ok: u64,
    elapsed: Duration,
}

impl Totals {
    fn add(&mut self, load: &Load) {
        self.ok += load.ok;
        self.elapsed += load.elapsed;
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `CONCURRENCY` workers, each sending one request after the other over the shared keep-alive
/// pool until `duration` has passed. Every response must be 200.
async fn run_load(client: &reqwest::Client, endpoint: &Endpoint, duration: Duration) -> Load {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;

    let mut workers = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let url = endpoint.url.clone();
        let bearer = endpoint.bearer.clone();
        let label = endpoint.label;
        let (ok, failed, first_error) = (ok.clone(), failed.clone(), first_error.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut request = client.get(&url);
                if let Some(token) = &bearer {
                    request = request.bearer_auth(token);
                }
                let outcome = match request.send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        // Read the whole body so the connection goes back to the pool.
                        match resp.bytes().await {
                            Ok(_) if status == reqwest::StatusCode::OK => Ok(()),
                            Ok(body) => Err(format!(
                                "{label} answered {status}: {}",
                                String::from_utf8_lossy(&body)
                            )),
                            Err(e) => Err(format!("{label}: reading the body failed: {e}")),
                        }
                    }
                    Err(e) => Err(format!("{label}: {e}")),
                };
                match outcome {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(message) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(message);
                        }
                    }
                }
            }
        }));
    }
    for worker in workers {
        if worker.await.is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let elapsed = start.elapsed();
    let first_error = first_error.lock().ok().and_then(|mut slot| slot.take());
    Load {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed,
        first_error,
    }
}
