//! The AWS emulator for the tests: `moto_server` from a Python venv at `<workspace>/.venv-moto`.
//!
//! [`prepare`] makes sure the venv has `moto[server]` 5.x (creating or repairing it with
//! `python3 -m venv` and pip), starts `moto_server` on a free loopback port and waits until it
//! answers. The returned [`AwsEmulator`] carries `NEXPLANE_TEST_MOTO_URL` for the test command
//! and stops the server when it is dropped, whether the tests passed or not.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The pip requirement, as in the stack notes.
const MOTO_REQUIREMENT: &str = "moto[server]>=5,<6";
/// The environment variable the tests read.
pub(crate) const MOTO_URL_VAR: &str = "NEXPLANE_TEST_MOTO_URL";
const VENV_DIR: &str = ".venv-moto";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running emulator (or one given from outside) and the environment for the tests.
#[derive(Debug)]
pub(crate) struct AwsEmulator {
    env: Vec<(String, String)>,
    url: String,
    child: Option<Child>,
}

impl AwsEmulator {
    /// Environment variables to pass to the test run.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, (String, String)> {
        self.env.iter()
    }

    /// The emulator's base URL (`http://127.0.0.1:PORT`).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for AwsEmulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("==> AWS emulator stopped");
        }
    }
}

/// Makes sure the emulator runs (see the module doc). Fails when it cannot be prepared: the
/// AWS adapter's tests need it, in CI and elsewhere.
pub(crate) fn prepare(root: &Path) -> Result<AwsEmulator> {
    if let Some(url) = std::env::var(MOTO_URL_VAR)
        .ok()
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
    {
        let addr = loopback_or_host(&url)?;
        if !answers(&addr) {
            bail!("{MOTO_URL_VAR}={url} is set, but nothing answers there");
        }
        eprintln!("==> AWS emulator for tests: {url} (from {MOTO_URL_VAR})");
        return Ok(AwsEmulator {
            env: vec![(MOTO_URL_VAR.to_string(), url.clone())],
            url,
            child: None,
        });
    }

    let venv = prepared_venv(root)?;
    start_with_retries(&venv, &venv.join("moto_server.log"))
}

/// A new `moto_server` of its own (never the one named by `NEXPLANE_TEST_MOTO_URL`), logging
/// to `log_path`, with the venv prepared as for [`prepare`]. For benchmarks: a fresh emulator
/// holds only what they seed, and its log has one line per request it served.
pub(crate) fn start_fresh(root: &Path, log_path: &Path) -> Result<AwsEmulator> {
    let venv = prepared_venv(root)?;
    start_with_retries(&venv, log_path)
}

/// The venv directory, created or repaired when needed.
fn prepared_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    ensure_venv(&venv).with_context(|| {
        format!(
            "cannot prepare the AWS emulator venv at {} (it needs python3 with the venv module \
             and access to PyPI for `pip install \"{MOTO_REQUIREMENT}\"`)",
            venv.display()
        )
    })?;
    Ok(venv)
}

/// The venv's Python interpreter (moto[server] brings boto3 along).
pub(crate) fn venv_python(root: &Path) -> PathBuf {
    root.join(VENV_DIR).join("bin/python")
}

fn start_with_retries(venv: &Path, log_path: &Path) -> Result<AwsEmulator> {
    let mut last_error = anyhow!("not started");
    for _ in 0..3 {
        match start(venv, log_path) {
            Ok(emulator) => return Ok(emulator),
            Err(err) => {
                eprintln!("moto_server did not start: {err:#}");
                last_error = err;
            }
        }
    }
    Err(last_error.context(format!(
        "cannot start the AWS emulator (moto_server); its log is {}",
        log_path.display()
    )))
}

/// `python -c` check that moto 5 and its server dependencies import.
fn venv_ok(venv: &Path) -> bool {
    let python = venv.join("bin/python");
    if !python.exists() || !venv.join("bin/moto_server").exists() {
        return false;
    }
    Command::new(&python)
        .args([
            "-c",
            "import moto, flask, werkzeug; import sys; \
             sys.exit(0 if moto.__version__.split('.')[0] == '5' else 1)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_venv(venv: &Path) -> Result<()> {
    if venv_ok(venv) {
        return Ok(());
    }
    eprintln!(
        "==> creating the AWS emulator venv at {} (moto[server] 5.x)",
        venv.display()
    );
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    crate::run(
        Command::new(&python)
            .args(["-m", "venv", "--clear"])
            .arg(venv),
    )?;
    crate::run(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                MOTO_REQUIREMENT,
            ])
            .env("PIP_NO_INPUT", "1"),
    )?;
    if !venv_ok(venv) {
        bail!("the venv was created, but moto 5 still does not import");
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn start(venv: &Path, log_path: &Path) -> Result<AwsEmulator> {
    let port = free_port()?;
    let log = std::fs::File::create(log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let log_err = log.try_clone()?;
    let mut child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .context("cannot run moto_server")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if answers(&addr) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!("moto_server exited ({status}) before answering on port {port}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "moto_server did not answer on port {port} within {} s",
                STARTUP_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = format!("http://127.0.0.1:{port}");
    eprintln!("==> AWS emulator: {url} (log: {})", log_path.display());
    Ok(AwsEmulator {
        env: vec![(MOTO_URL_VAR.to_string(), url.clone())],
        url,
        child: Some(child),
    })
}

/// The socket address of an `http://host:port` URL.
fn loopback_or_host(url: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{MOTO_URL_VAR} must be an http:// URL, got {url}"))?
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {authority}"))
}

/// Whether an HTTP server answers the emulator's dashboard request with 200.
fn answers(addr: &SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /moto-api/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..read]);
    head.starts_with("HTTP/1.") && head.get(9..12) == Some("200")
}
