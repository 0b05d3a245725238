//! Project automation for the Nexplane workspace, run as `cargo xtask <command>`.
//!
//! - `cargo xtask test`: make sure the services the tests need are reachable, then run every
//!   test of the workspace (all targets, then the doc tests).
//! - `cargo xtask ci`: fmt check, clippy `-D warnings`, the codegen freshness check, the
//!   licence/dependency policy (cargo-deny), then the same as `cargo xtask test`.
//! - `cargo xtask codegen [--check]`: regenerate (or check) `docs/openapi.json`.
//! - `cargo xtask bench auth`: compare the throughput of `GET /auth/me` with `GET /health`.
//! - `cargo xtask bench discovery [--users N]`: time a discovery job of N IAM users in the AWS
//!   emulator against a sequential boto3 script and against the emulator's own rate.
//! - `cargo xtask bench agents [--agents N] [--commands M]`: the server's memory with N agents
//!   long-polling, and the latency from dispatching a command to its agent receiving it.

use std::ffi::OsStr;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

mod aws_emulator;
mod bench;
mod bench_agents;
mod bench_discovery;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test               prepare services (PostgreSQL) and run all workspace tests
  ci                 fmt check, clippy -D warnings, codegen check, cargo-deny, then `test`
  codegen [--check]  regenerate docs/openapi.json (--check: fail when it is stale)
  bench auth         requests/second of GET /auth/me vs GET /health (release build)
  bench discovery [--users N]
                     discovery job of N IAM users (default 2000) in the AWS emulator vs a
                     sequential boto3 script and vs the emulator's request rate (release build)
  bench agents [--agents N] [--commands M]
                     N simulated agents (default 2000) long-polling the server: its memory
                     (RSS) and the dispatch-to-receive latency of M commands (default 200)
                     (release build)

environment:
  NEXPLANE_TEST_DATABASE_URL  PostgreSQL for the tests (default postgres://postgres@localhost:5432/postgres)
  CI=true                     strict mode: a missing service or tool fails the run
";

const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@localhost:5432/postgres";
const OPENAPI_PATH: &str = "docs/openapi.json";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["test"] => test(),
        ["ci"] => ci(),
        ["codegen"] => codegen(false),
        ["codegen", "--check"] => codegen(true),
        ["bench", "auth"] => bench::auth(),
        ["bench", "discovery", rest @ ..] => bench_discovery::discovery(rest),
        ["bench", "agents", rest @ ..] => bench_agents::agents(rest),
        ["help" | "--help" | "-h"] => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The cargo that started us (set by `cargo run`), or the one on PATH.
fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(project_root());
    cmd
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn describe(cmd: &Command) -> String {
    let args: Vec<_> = cmd.get_args().map(OsStr::to_string_lossy).collect();
    let program = Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    format!("{} {}", program.to_string_lossy(), args.join(" "))
}

/// Runs a command with inherited stdio and fails when it exits non-zero.
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ci

fn ci() -> Result<()> {
    type Step = (&'static str, fn() -> Result<()>);
    let steps: [Step; 5] = [
        ("fmt", || {
            run(cargo().args(["fmt", "--all", "--", "--check"]))
        }),
        ("clippy", || {
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }),
        ("codegen --check", || codegen(true)),
        ("licences and dependencies (cargo-deny)", deny),
        ("test", test),
    ];
    for (name, step) in steps {
        eprintln!("\n==> ci step: {name}");
        step().with_context(|| format!("ci step `{name}` failed"))?;
    }
    eprintln!("\n==> ci: all steps passed");
    Ok(())
}

/// cargo-deny: licences, bans and sources, offline. Advisories need the advisory database,
/// which needs network access; they are configured in deny.toml for machines that have it
/// (`cargo deny check advisories`).
fn deny() -> Result<()> {
    let installed = cargo()
        .args(["deny", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        let msg = "cargo-deny is not installed: `cargo install --locked cargo-deny`";
        if is_ci() {
            bail!("{msg} (required when CI=true)");
        }
        eprintln!("warning: {msg}; skipping the licence/dependency check (not allowed in CI)");
        return Ok(());
    }
    // `--offline` keeps cargo-deny from fetching the advisory database, but its `cargo
    // metadata` then needs every package of the graph (all platforms) on disk: fetch them.
    run(cargo().arg("fetch"))?;
    run(cargo().args([
        "deny",
        "--offline",
        "--workspace",
        "check",
        "licenses",
        "bans",
        "sources",
    ]))
}

// ---------------------------------------------------------------------------------------------
// test

fn test() -> Result<()> {
    let database_url = prepare_postgres()?;
    let extra_env = prepare_aws_emulator()?;

    let configure = |cmd: &mut Command| {
        cmd.env("NEXPLANE_TEST_DATABASE_URL", &database_url);
        cmd.envs(extra_env.iter().map(|(k, v)| (k, v)));
    };
    // `--all-targets` leaves out doc tests, so they get their own run.
    let mut all_targets = cargo();
    all_targets.args(["test", "--workspace", "--all-targets"]);
    configure(&mut all_targets);
    run(&mut all_targets)?;

    let mut doc = cargo();
    doc.args(["test", "--workspace", "--doc"]);
    configure(&mut doc);
    run(&mut doc)
}

/// The AWS emulator: a Python venv at `.venv-moto` with `moto[server]` 5.x (created or
/// repaired when needed) and a `moto_server` on a free loopback port, or the one named by
/// `NEXPLANE_TEST_MOTO_URL`. The returned guard yields the environment for the test run
/// (`NEXPLANE_TEST_MOTO_URL`) and stops the server when dropped, also when the tests fail.
/// Fails when the emulator cannot be prepared (never skipped, CI or not).
fn prepare_aws_emulator() -> Result<aws_emulator::AwsEmulator> {
    aws_emulator::prepare(&project_root())
}

/// Makes sure a PostgreSQL answers at the test database URL and returns that URL.
fn prepare_postgres() -> Result<String> {
    let url = std::env::var("NEXPLANE_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_DATABASE_URL.to_string());
    let (host, port) = postgres_host_port(&url)?;
    eprintln!("==> PostgreSQL for tests: {}", redact_url(&url));

    if postgres_ready(&url, &host, port) {
        return Ok(url);
    }
    let local = matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1");
    let started = if local {
        eprintln!("PostgreSQL at {host}:{port} does not answer; starting the local cluster");
        start_local_postgres()
    } else {
        Err(anyhow!(
            "{host} is not this machine, so there is nothing to start here"
        ))
    };
    let start_error = match started {
        Ok(()) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if postgres_ready(&url, &host, port) {
                    eprintln!("PostgreSQL is up");
                    return Ok(url);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            "started a cluster, but it did not answer within 30 s".to_string()
        }
        Err(e) => format!("{e:#}"),
    };
    let how = "start it with `pg_ctlcluster --skip-systemctl-redirect <version> main start` \
               (version: `ls /etc/postgresql`), or point NEXPLANE_TEST_DATABASE_URL at a \
               reachable PostgreSQL";
    if is_ci() {
        bail!(
            "PostgreSQL at {host}:{port} is unreachable ({start_error}); CI=true never skips \
             tests for a missing service: {how}"
        );
    }
    bail!("PostgreSQL at {host}:{port} is unreachable ({start_error}); the tests need it: {how}")
}

/// Host and port of a `postgres://[user[:password]@]host[:port][/db][?…]` URL.
fn postgres_host_port(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| anyhow!("NEXPLANE_TEST_DATABASE_URL must start with postgres://"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| anyhow!("malformed IPv6 host in the database URL"))?;
        (host, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("bad port `{p}` in the database URL"))?,
        None => 5432,
    };
    let host = if host.is_empty() { "localhost" } else { host };
    Ok((host.to_string(), port))
}

/// The URL without its password, for messages.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{masked}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// A TCP connect, then `pg_isready` when it is installed (an open port can still be a server
/// that is starting up and refuses connections).
fn postgres_ready(url: &str, host: &str, port: u16) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    let tcp_ok = addrs
        .into_iter()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok());
    if !tcp_ok {
        return false;
    }
    match Command::new("pg_isready")
        .args(["-q", "-t", "2", "-d", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) => status.success(),
        Err(_) => true, // pg_isready not installed: the TCP connect has to do
    }
}

/// `pg_ctlcluster --skip-systemctl-redirect <version> main start` for the newest cluster under
/// /etc/postgresql (Debian/Ubuntu layout).
fn start_local_postgres() -> Result<()> {
    let etc = Path::new("/etc/postgresql");
    let mut versions: Vec<(u32, String)> = std::fs::read_dir(etc)
        .with_context(|| format!("no local PostgreSQL clusters ({} missing)", etc.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("main").is_dir())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .map(|v| {
            (
                v.split('.')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0),
                v,
            )
        })
        .collect();
    versions.sort();
    let (_, version) = versions
        .pop()
        .ok_or_else(|| anyhow!("no cluster named `main` under {}", etc.display()))?;
    let output = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "start"])
        .output()
        .context("cannot run pg_ctlcluster (is postgresql-common installed?)")?;
    if !output.status.success() {
        let said = format!(
            "{} {}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        if said.contains("already running") {
            bail!("the local cluster {version}/main is already running, but not at this address");
        }
        bail!(
            "`pg_ctlcluster --skip-systemctl-redirect {version} main start` failed ({}): {}",
            output.status,
            said.trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// codegen

fn codegen(check: bool) -> Result<()> {
    let output = cargo()
        .args(["run", "--quiet", "--package", "nexplane", "--", "openapi"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run `cargo run --package nexplane -- openapi`")?;
    if !output.status.success() {
        bail!("`nexplane openapi` failed ({})", output.status);
    }
    let spec: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("`nexplane openapi` did not print valid JSON")?;
    let mut generated = serde_json::to_string_pretty(&spec)?;
    generated.push('\n');

    let path = project_root().join(OPENAPI_PATH);
    if check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            bail!("{OPENAPI_PATH} is stale: run cargo xtask codegen");
        }
        eprintln!("{OPENAPI_PATH} is up to date");
    } else {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, generated).with_context(|| format!("cannot write {OPENAPI_PATH}"))?;
        eprintln!("wrote {OPENAPI_PATH}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_urls() -> Result<()> {
        assert_eq!(
            postgres_host_port("postgres://postgres@localhost:5432/postgres")?,
            ("localhost".to_string(), 5432)
        );
        assert_eq!(
            postgres_host_port("postgresql://u:p@db.internal/app?sslmode=disable")?,
            ("db.internal".to_string(), 5432)
        );
        assert_eq!(
            postgres_host_port("postgres://u@[::1]:6543/x")?,
            ("::1".to_string(), 6543)
        );
        assert!(postgres_host_port("mysql://localhost").is_err());
        Ok(())
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
