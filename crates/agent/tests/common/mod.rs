//! A tiny HTTP/1.1 server on 127.0.0.1 for the protocol tests: one thread per connection, one
//! request per connection (`Connection: close`), every request recorded, the answers scripted
//! by a handler closure. Signatures are checked with `nexplane_crypto::verify_agent_signature`
//! over exactly what arrived.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub const AGENT_ID: &str = "agt_01testagent";
pub const SECRET: &str = "agent-secret-4f1c9a7e2b6d8035";

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target: path and query exactly as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body of {} {} is not JSON: {e}", self.method, self.target))
    }

    /// Checks the agent signature headers against `secret`, as the server would.
    pub fn verify_signature(&self, agent_id: &str, secret: &str) -> Result<(), String> {
        let agent = self
            .header("x-nexplane-agent")
            .ok_or("no X-Nexplane-Agent")?;
        if agent != agent_id {
            return Err(format!("X-Nexplane-Agent is {agent}"));
        }
        let ts: i64 = self
            .header("x-nexplane-timestamp")
            .ok_or("no X-Nexplane-Timestamp")?
            .parse()
            .map_err(|e| format!("bad timestamp: {e}"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        if (now - ts).abs() > 300 {
            return Err(format!("timestamp {ts} is {} s off", now - ts));
        }
        let sig = self
            .header("x-nexplane-signature")
            .ok_or("no X-Nexplane-Signature")?;
        if nexplane_crypto::verify_agent_signature(
            secret.as_bytes(),
            &self.method,
            &self.target,
            ts,
            &self.body,
            sig,
        ) {
            Ok(())
        } else {
            Err(format!("bad signature on {} {}", self.method, self.target))
        }
    }

    /// Whether the secret appears anywhere in the request.
    pub fn leaks(&self, secret: &str) -> bool {
        String::from_utf8_lossy(&self.body).contains(secret)
            || self.target.contains(secret)
            || self.headers.iter().any(|(_, v)| v.contains(secret))
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// Wait this long before answering (a long poll with nothing to deliver).
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: serde_json::to_vec(&body).unwrap(),
            content_type: "application/json",
            delay: Duration::ZERO,
        }
    }

    pub fn problem(status: u16, detail: &str) -> Self {
        Self {
            status,
            body: serde_json::to_vec(&serde_json::json!({
                "type": "urn:nexplane:error:unauthorized",
                "title": "Unauthorized",
                "status": status,
                "detail": detail,
                "code": "unauthorized",
            }))
            .unwrap(),
            content_type: "application/problem+json",
            delay: Duration::ZERO,
        }
    }

    pub fn empty(status: u16) -> Self {
        Self {
            status,
            body: Vec::new(),
            content_type: "application/json",
            delay: Duration::ZERO,
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl TestServer {
    pub fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let handler = handler.clone();
                let recorded = recorded.clone();
                std::thread::spawn(move || serve(stream, &*handler, &recorded));
            }
        });
        Self { base, requests }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self, method: &str, path_suffix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path().ends_with(path_suffix))
            .count()
    }

    /// Waits until `pred` holds for the recorded requests (panics after `timeout`).
    pub fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&[Recorded]) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.requests()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen: Vec<String> = self
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.target))
            .collect();
        panic!("timed out waiting for {what}; requests: {seen:#?}");
    }
}

fn serve(stream: TcpStream, handler: &Handler, recorded: &Mutex<Vec<Recorded>>) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    recorded.lock().unwrap().push(request.clone());
    let reply = handler(&request);
    if !reply.delay.is_zero() {
        std::thread::sleep(reply.delay);
    }
    let reason = match reply.status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        401 => "Unauthorized",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nConnection: close\r\n",
        reply.status
    );
    if reply.status != 204 {
        head.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n",
            reply.content_type,
            reply.body.len()
        ));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(head.as_bytes());
    if reply.status != 204 {
        let _ = stream.write_all(&reply.body);
    }
    let _ = stream.flush();
}

fn read_request(stream: &TcpStream) -> Option<Recorded> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (k, v) = header.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Recorded {
        method,
        target,
        headers,
        body,
        at: Instant::now(),
    })
}

/// Writes a 0600 agent configuration for `server` into `dir`.
pub fn write_config(dir: &Path, server: &str, extra: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"{server}\"\nagent_id = \"{AGENT_ID}\"\nagent_secret = \"{SECRET}\"\n{extra}"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Runs the agent binary with `args`, killing it after `timeout`.
pub fn run_binary(args: &[&str], timeout: Duration) -> std::process::Output {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_nexplane-agent"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_with_timeout(child, timeout)
}

pub fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "nexplane-agent did not exit within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
