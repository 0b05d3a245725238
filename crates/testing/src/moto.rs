//! The local AWS emulator (`moto_server`) and the [`Seeder`] that creates and reads resources
//! through its AWS APIs.
//!
//! The emulator is `NEXPLANE_TEST_MOTO_URL` (`cargo xtask test` starts one). When that is
//! unset, a test run with `CI=true` fails; elsewhere a `moto_server` is started from
//! `<workspace>/.venv-moto` for the life of the test process (a shell watches the process and
//! stops the emulator when it is gone). When there is no emulator, the tests that take it fail:
//! they are never skipped.
//!
//! The emulator holds one state for everyone, so the tests of a process take turns: [`take`]
//! waits for the previous test, resets every service and switches request authentication off;
//! when its [`Turn`] ends (the test passed or panicked) the emulator is reset again.

mod seeder;

pub use seeder::{Rule, Seeder};

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The account every emulator request lands in.
pub const ACCOUNT: &str = "123456789012";

/// The variable naming a running emulator (`http://host:port`).
const URL_VAR: &str = "NEXPLANE_TEST_MOTO_URL";

static URL: OnceLock<Result<String, String>> = OnceLock::new();
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn workspace_root() -> PathBuf {
    // crates/testing -> the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A POST to the emulator's control API (`/moto-api/…`, e.g. `/moto-api/reset`), as a plain
/// HTTP/1.1 request: blocking, so that a [`Turn`] can reset the emulator when it is dropped.
pub fn control(url: &str, path: &str, body: &str) -> Result<(), String> {
    let addr = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url} is not an http:// URL"))?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("{path}: {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("{path}: {e}"))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("{path}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("{path}: {e}"))?;
    let status = answer.lines().next().unwrap_or_default();
    let success = status
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if success {
        Ok(())
    } else {
        Err(format!("{path}: {status}"))
    }
}

/// The emulator's URL: `NEXPLANE_TEST_MOTO_URL`, else a `moto_server` started here.
fn launch() -> Result<String, String> {
    if let Some(url) = std::env::var(URL_VAR).ok().filter(|u| !u.trim().is_empty()) {
        return Ok(url.trim().trim_end_matches('/').to_owned());
    }
    if is_ci() {
        return Err(format!(
            "{URL_VAR} is not set (with CI=true the tests do not start an emulator themselves: \
             run them through `cargo xtask test`)"
        ));
    }
    let venv = workspace_root().join(".venv-moto");
    let server = venv.join("bin/moto_server");
    if !server.exists() {
        return Err(format!(
            "{URL_VAR} is not set and {} does not exist: run `cargo xtask test` (it creates \
             the venv and starts the emulator), or create it with `python3 -m venv .venv-moto \
             && .venv-moto/bin/pip install \"moto[server]>=5,<6\"`",
            server.display()
        ));
    }
    // One log per test binary (`api`, `moto`…), rewritten by each run.
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let stem = exe.file_stem()?.to_string_lossy().into_owned();
            Some(
                stem.rsplit_once('-')
                    .map_or(stem.clone(), |(name, _hash)| name.to_owned()),
            )
        })
        .unwrap_or_else(|| "tests".to_owned());
    let log_path = venv.join(format!("moto_server-{binary}-tests.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot write the emulator log {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let port = crate::free_port();
    // A shell starts the emulator and stops it when this test process is gone.
    Command::new("sh")
        .arg("-c")
        .arg(
            r#""$0" -H 127.0.0.1 -p "$1" & emu=$!
               while kill -0 "$2" 2>/dev/null && kill -0 "$emu" 2>/dev/null; do sleep 1; done
               kill "$emu" 2>/dev/null"#,
        )
        .arg(&server)
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", server.display()))?;
    Ok(format!("http://127.0.0.1:{port}"))
}

/// One test's turn on the emulator (from [`take`]); keep it for the whole test. When it ends
/// (the test passed or panicked) the emulator is reset and authentication is off again, so
/// whatever runs next finds it clean.
#[derive(Debug)]
#[must_use = "the turn ends when it is dropped"]
pub struct Turn {
    url: String,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let _ = control(&self.url, "/moto-api/reset-auth", "inf");
        let _ = control(&self.url, "/moto-api/reset", "");
    }
}

/// Takes the emulator for one test: waits for the previous test, waits until the emulator
/// answers (a minute at most), resets every service and switches authentication off. Returns
/// the turn and the emulator's URL. Panics when there is no emulator.
pub async fn take() -> (Turn, String) {
    let serial = TURN.lock().await;
    let url = URL
        .get_or_init(launch)
        .clone()
        .unwrap_or_else(|e| panic!("AWS emulator: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match control(&url, "/moto-api/reset", "") {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => panic!("AWS emulator at {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    control(&url, "/moto-api/reset-auth", "inf").unwrap();
    let turn = Turn {
        url: url.clone(),
        _serial: serial,
    };
    (turn, url)
}

/// From now on (until the test's [`Turn`] ends) the emulator checks every request's signature
/// and IAM permissions.
pub async fn enable_auth(url: &str) {
    control(url, "/moto-api/reset-auth", "0").unwrap();
}

/// The settings of an `aws` connector pointed at the emulator: the first region is the
/// connector's region, all of them are discovered.
pub fn settings(url: &str, regions: &[&str]) -> Value {
    json!({"endpoint_url": url, "region": regions[0], "regions": regions})
}
