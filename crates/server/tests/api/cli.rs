//! The `nexplane` binary itself: its commands, start-up failures, and its log output.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nexplane"));
    for (k, _) in std::env::vars() {
        if k.starts_with("NEXPLANE_") {
            c.env_remove(k);
        }
    }
    c.env("NO_COLOR", "1");
    c
}

#[test]
fn openapi_prints_the_document() {
    let out = bin().arg("openapi").output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    assert!(v["paths"]["/auth/login"]["post"].is_object());
}

#[test]
fn bad_configuration_stops_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("migrate")
        .env("NEXPLANE_DATA_DIR", dir.path())
        .env("NEXPLANE_RATE_LIMIT_PER_MINUTE", "plenty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NEXPLANE_RATE_LIMIT_PER_MINUTE"), "{err}");

    // A config file with an unknown key is refused, naming the key.
    let file = dir.path().join("nexplane.toml");
    std::fs::write(&file, "bind = \"127.0.0.1:0\"\nrate_limit = 5\n").unwrap();
    let out = bin()
        .args(["--config", file.to_str().unwrap(), "migrate"])
        .env("NEXPLANE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rate_limit"));
}

#[test]
fn an_unreachable_postgresql_stops_the_server_quickly_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let started = Instant::now();
    let out = bin()
        .arg("serve")
        .env("NEXPLANE_DATA_DIR", dir.path())
        .env("NEXPLANE_BIND", format!("127.0.0.1:{}", free_port()))
        .env(
            "NEXPLANE_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/nexplane"),
        )
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("connection refused"), "{err}");
}

#[test]
fn migrate_then_user_create_reads_the_password_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("migrate")
        .env("NEXPLANE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("nexplane.db").exists());

    let create = |email: &str, role: &str, password: &str| {
        let mut child = bin()
            .args(["user", "create", "--email", email, "--role", role])
            .env("NEXPLANE_DATA_DIR", dir.path())
            .env("NEXPLANE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = create("ops@example.com", "operator", "operator-password-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["email"], json!("ops@example.com"));
    assert_eq!(v["role"], json!("operator"));
    assert!(v["id"].as_str().unwrap().starts_with("usr_"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("operator-password-1"));

    // Bad input is refused with the reason, and nothing is created.
    let out = create("ops2@example.com", "root", "short");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("role") && err.contains("password"), "{err}");
    let out = create("ops@example.com", "viewer", "another-password-2");
    assert!(!out.status.success(), "duplicate email must be refused");
}

/// Runs the real binary, drives it over HTTP, stops it with SIGTERM, and returns its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_never_carries_a_secret_and_sigterm_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = bin()
        .arg("serve")
        .env("NEXPLANE_DATA_DIR", dir.path())
        .env("NEXPLANE_BIND", format!("127.0.0.1:{port}"))
        .env("NEXPLANE_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if client
            .get(format!("{base}/health/live"))
            .send()
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "server did not start");

    // No password given: it was generated into a private file, never logged.
    let pw_file = dir.path().join("initial-admin-password");
    let admin_pw = std::fs::read_to_string(&pw_file).unwrap().trim().to_owned();
    assert!(admin_pw.len() >= 12);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    let login: Value = client
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": "admin@example.com", "password": admin_pw}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = login["access_token"].as_str().unwrap().to_owned();
    let refresh = login["refresh_token"].as_str().unwrap().to_owned();
    let user_pw = "a-user-password-in-a-log-test";
    let r = client
        .post(format!("{base}/users"))
        .bearer_auth(&access)
        .json(
            &json!({"email": "u@example.com", "name": "U", "role": "viewer", "password": user_pw}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let wrong = "a-wrong-password-in-a-log-test";
    client
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": "u@example.com", "password": wrong}))
        .send()
        .await
        .unwrap();
    let r: Value = client
        .post(format!("{base}/auth/refresh"))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access2 = r["access_token"].as_str().unwrap().to_owned();
    let refresh2 = r["refresh_token"].as_str().unwrap().to_owned();

    // SIGTERM: a graceful stop, well within the shutdown timeout.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("initial-admin-password"),
        "the log must say where the password is"
    );
    assert!(
        log.contains("\"request_id\""),
        "requests are logged with their id"
    );
    for secret in [
        admin_pw.as_str(),
        user_pw,
        wrong,
        &access,
        &refresh,
        &access2,
        &refresh2,
    ] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
}
