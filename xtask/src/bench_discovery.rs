//! `cargo xtask bench discovery [--users N]`: how fast is a discovery job, compared with the
//! script an operator would write and with what the AWS emulator can serve at all?
//!
//! One run:
//! 1. Starts a fresh `moto_server` (the `.venv-moto` of `cargo xtask test`) and seeds N IAM
//!    users (default 2,000), each with two access keys, the one customer-managed policy attached
//!    and membership in the one group. Seeding uses boto3 from that venv with a thread pool; its
//!    time is printed but not measured. It ends by touching EC2 and S3 once: the emulator
//!    builds a service's state on first use (about a second for EC2), a cost real AWS does not
//!    have and that would otherwise land in (a).
//! 2. (a) Starts the release server on a throw-away data dir, creates an `aws` connector pointed
//!    at the emulator, `POST /connectors/{id}/discover`, then `GET /jobs/{id}` every 50 ms: (a) is
//!    the wall time from the POST to the finished job seen. The job must succeed without partial
//!    errors, and the inventory must hold N `iam_user` assets with two keys, a policy and a group
//!    each. The AWS calls the job made are counted in the emulator's request log (one line per
//!    request served).
//!    (b) The sequential boto3 script: ListUsers, then ListAccessKeys, ListAttachedUserPolicies
//!    and ListGroupsForUser for each user, one call after the other, timed inside the script.
//!    (c) The emulator's floor for the calls of (a): its rate for one representative call
//!    (ListAccessKeys of a seeded user, 48 in flight, 5 s after a 2 s warm-up; with `wrk` when it
//!    is on PATH, otherwise with reqwest), measured right before and right after (a) because the
//!    machine may be busy; floor = calls of (a) / the mean of the two rates.
//! 3. Prints the three figures and the ratios against their targets (a/b ≤ 0.5, a/c ≤ 1.3). A
//!    missed target is reported, not an error; the emulator and the server are stopped on every
//!    way out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::aws_emulator;
use crate::bench::{self, Server};

const DEFAULT_USERS: usize = 2000;
const USER_PREFIX: &str = "bench-user-";
/// Dummy credentials: the emulator accepts any.
const ACCESS_KEY_ID: &str = "AKIABENCHEXAMPLE0000";
const SECRET_ACCESS_KEY: &str = "bench-secret-not-a-real-key";
const REGION: &str = "us-east-1";
/// How often the job is polled while it runs.
const POLL_EVERY: Duration = Duration::from_millis(50);
const FLOOR_IN_FLIGHT: usize = 48;
const FLOOR_WARM_UP: Duration = Duration::from_secs(2);
const FLOOR_MEASURE: Duration = Duration::from_secs(5);
const TARGET_A_B: f64 = 0.5;
const TARGET_A_C: f64 = 1.3;
/// The emulator routes an unsigned request by the service in the credential scope; it does not
/// check the signature (its auth is off), so a well-formed header with a dummy one will do.
const FLOOR_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=AKIABENCHEXAMPLE0000/20260101/us-east-1/iam/aws4_request, \
    SignedHeaders=content-type;host, Signature=0000000000000000";

/// Seeds the emulator, then touches EC2 and S3 once so that their state exists. argv: endpoint
/// URL, number of users, user name prefix. Prints one JSON line: users, calls, seconds.
const SEED_PY: &str = r#"
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

THREADS = 16


def main():
    endpoint, users, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIABENCHEXAMPLE0000",
        aws_secret_access_key="bench-secret-not-a-real-key",
        config=Config(max_pool_connections=THREADS * 2, retries={"max_attempts": 5}),
    )
    started = time.monotonic()
    iam.create_group(GroupName="bench-group")
    document = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iam:Get*", "Resource": "*"}],
    }
    policy_arn = iam.create_policy(
        PolicyName="bench-policy", PolicyDocument=json.dumps(document)
    )["Policy"]["Arn"]

    def seed(i):
        name = f"{prefix}{i:05d}"
        iam.create_user(UserName=name)
        iam.create_access_key(UserName=name)
        iam.create_access_key(UserName=name)
        iam.attach_user_policy(UserName=name, PolicyArn=policy_arn)
        iam.add_user_to_group(GroupName="bench-group", UserName=name)

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for _ in pool.map(seed, range(users)):
            pass

    # The emulator builds a service's state on first use (EC2 takes about a second): do that
    # here, so that the discovery is not charged with a one-off cost real AWS does not have.
    for service in ("ec2", "s3"):
        client = boto3.client(
            service,
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="AKIABENCHEXAMPLE0000",
            aws_secret_access_key="bench-secret-not-a-real-key",
        )
        if service == "ec2":
            client.describe_instances()
            client.describe_security_groups()
        else:
            client.list_buckets()
    seconds = time.monotonic() - started
    print(json.dumps({"users": users, "calls": 5 + 5 * users, "seconds": seconds}))


main()
"#;

/// The operator's script. argv: endpoint URL. Prints one JSON line: users, access_keys,
/// policies, groups, calls, seconds (the wall time of the listing, interpreter start excluded).
const OPERATOR_PY: &str = r#"
import json
import sys
import time

import boto3


def main():
    iam = boto3.client(
        "iam",
        endpoint_url=sys.argv[1],
        region_name="us-east-1",
        aws_access_key_id="AKIABENCHEXAMPLE0000",
        aws_secret_access_key="bench-secret-not-a-real-key",
    )
    started = time.monotonic()
    calls = 0
    users = []
    kwargs = {}
    while True:
        page = iam.list_users(**kwargs)
        calls += 1
        users.extend(page["Users"])
        if not page.get("IsTruncated") or not page.get("Marker"):
            break
        kwargs = {"Marker": page["Marker"]}
    inventory = []
    for user in users:
        name = user["UserName"]
        keys = iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
        policies = iam.list_attached_user_policies(UserName=name)["AttachedPolicies"]
        groups = iam.list_groups_for_user(UserName=name)["Groups"]
        calls += 3
        inventory.append(
            {
                "user": name,
                "access_keys": [k["AccessKeyId"] for k in keys],
                "policies": [p["PolicyArn"] for p in policies],
                "groups": [g["GroupName"] for g in groups],
            }
        )
    seconds = time.monotonic() - started
    print(
        json.dumps(
            {
                "users": len(inventory),
                "access_keys": sum(len(u["access_keys"]) for u in inventory),
                "policies": sum(len(u["policies"]) for u in inventory),
                "groups": sum(len(u["groups"]) for u in inventory),
                "calls": calls,
                "seconds": seconds,
            }
        )
    )


main()
"#;

pub fn discovery(args: &[&str]) -> Result<()> {
    let users = parse_users(args)?;
    let root = crate::project_root();
    let binary = bench::build_release_server()?;

    // Dropped in reverse order: the emulator stops before its log's directory goes.
    let scratch = Scratch::create()?;
    let seed_script = scratch.write("nexplane_bench_seed.py", SEED_PY)?;
    let operator_script = scratch.write("nexplane_bench_operator.py", OPERATOR_PY)?;
    let moto_log = scratch.path.join("moto_server.log");
    let emulator = aws_emulator::start_fresh(&root, &moto_log)?;
    let python = aws_emulator::venv_python(&root);
    let moto_url = emulator.url().to_string();

    eprintln!(
        "==> seeding {users} IAM users (2 access keys, 1 managed policy, 1 group each) with boto3"
    );
    let seeded = run_python(
        &python,
        &seed_script,
        &[&moto_url, &users.to_string(), USER_PREFIX],
    )
    .context("seeding the emulator failed")?;
    if seeded["users"].as_u64() != Some(users as u64) {
        bail!("the seed script reports {seeded}, expected {users} users");
    }
    let seed_seconds = number(&seeded, "seconds")?;
    let seed_calls = number(&seeded, "calls")?;
    eprintln!(
        "    seeded in {seed_seconds:.1} s ({seed_calls} calls, {:.0} calls/s; not measured)",
        seed_calls / seed_seconds.max(1e-9)
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;

    // The machine may be shared and busy: (c) is measured right before and right after (a),
    // and the mean of the two rates stands for the emulator's rate while (a) ran.
    let sample_user = format!("{USER_PREFIX}00000");
    let wrk = find_on_path("wrk");
    let measure_rate = |when: &str| -> Result<Rate> {
        eprintln!("==> (c) the emulator's rate for ListAccessKeys at full concurrency, {when}");
        let rate = match &wrk {
            Some(wrk) => rate_with_wrk(wrk, &moto_url, &sample_user, &scratch)?,
            None => runtime.block_on(rate_with_reqwest(&moto_url, &sample_user))?,
        };
        eprintln!(
            "    {:.0} req/s ({} calls in {:.1} s with {})",
            rate.per_second, rate.ok, rate.seconds, rate.tool
        );
        Ok(rate)
    };
    let rate_before = measure_rate("before (a)")?;

    eprintln!("==> (a) nexplane discovery job");
    let ours = runtime.block_on(our_discovery(&binary, &moto_url, users, &moto_log))?;

    let rate_after = measure_rate("after (a)")?;

    eprintln!("==> (b) sequential boto3 script (ListUsers, then 3 calls per user)");
    let operator = run_python(&python, &operator_script, &[&moto_url])
        .context("the operator's script failed")?;
    for (field, expected) in [
        ("users", users),
        ("access_keys", 2 * users),
        ("policies", users),
        ("groups", users),
    ] {
        if operator[field].as_u64() != Some(expected as u64) {
            bail!("the operator's script found {operator}, expected {expected} {field}");
        }
    }
    let b_seconds = number(&operator, "seconds")?;
    let b_calls = number(&operator, "calls")?;
    eprintln!("    {b_seconds:.2} s, {b_calls} calls");

    drop(runtime);
    drop(emulator);

    let (calls, calls_source) = match ours.calls_logged {
        Some(n) => (n, "counted in the emulator's request log"),
        None => (ours.calls_planned, "the adapter's call plan"),
    };
    let rate = (rate_before.per_second + rate_after.per_second) / 2.0;
    let floor = calls as f64 / rate.max(1e-9);
    let a = ours.seconds;
    let a_b = a / b_seconds.max(1e-9);
    let a_c = a / floor.max(1e-9);

    println!();
    println!(
        "IAM users: {users} (2 access keys, 1 attached managed policy, 1 group each); \
         seeding took {seed_seconds:.1} s (not measured)"
    );
    println!(
        "(a) nexplane discovery job   : {a:>8.2} s  {calls} AWS calls ({calls_source}; \
         plan for {users} users and 1 region: {})",
        ours.calls_planned
    );
    println!("(b) sequential boto3 script  : {b_seconds:>8.2} s  {b_calls} calls, one at a time");
    println!(
        "(c) emulator floor           : {floor:>8.2} s  {calls} calls / {rate:.0} req/s, the mean \
         of {:.0} before and {:.0} after (a) (ListAccessKeys, {FLOOR_IN_FLIGHT} in flight, \
         {} s each, {}; {} failed calls left out)",
        rate_before.per_second,
        rate_after.per_second,
        FLOOR_MEASURE.as_secs(),
        rate_after.tool,
        rate_before.non_ok + rate_after.non_ok
    );
    println!(
        "a/b = {a_b:.2} (target ≤ {TARGET_A_B:.2}): {}",
        verdict(a_b <= TARGET_A_B)
    );
    println!(
        "a/c = {a_c:.2} (target ≤ {TARGET_A_C:.2}): {}",
        verdict(a_c <= TARGET_A_C)
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn parse_users(args: &[&str]) -> Result<usize> {
    let mut users = DEFAULT_USERS;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let value = match arg.strip_prefix("--users") {
            Some("") => *rest
                .next()
                .ok_or_else(|| anyhow!("--users needs a number"))?,
            Some(v) if v.starts_with('=') => &v[1..],
            _ => bail!("unknown argument `{arg}` (usage: cargo xtask bench discovery [--users N])"),
        };
        users = value
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| anyhow!("--users wants a positive number, got `{value}`"))?;
    }
    Ok(users)
}

/// A directory under the system temp dir for the scripts and the emulator's log; removed when
/// dropped.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create() -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "nexplane-bench-discovery-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a script with the venv's Python (isolated mode: no user site, no PYTHON* variables, the
/// script's directory not on the import path) and parses the last line it prints as JSON.
fn run_python(python: &Path, script: &Path, args: &[&str]) -> Result<Value> {
    let name = script
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let output = Command::new(python)
        .arg("-I")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !output.status.success() {
        bail!("`python {name}` failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .ok_or_else(|| anyhow!("`python {name}` printed nothing"))?;
    serde_json::from_str(last).with_context(|| format!("`python {name}` printed `{last}`"))
}

fn number(value: &Value, field: &str) -> Result<f64> {
    value[field]
        .as_f64()
        .ok_or_else(|| anyhow!("no number `{field}` in {value}"))
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

// ---------------------------------------------------------------------------------------------
// (a) our discovery

struct OurDiscovery {
    seconds: f64,
    /// Requests the emulator logged while the job ran (`None` when its log was unreadable).
    calls_logged: Option<u64>,
    /// What the adapter plans for one region in an emulator that answers every listing in one
    /// page: GetAccountAuthorizationDetails + ListUsers + ListAccessKeys per user,
    /// DescribeInstances + DescribeSecurityGroups, ListBuckets.
    calls_planned: u64,
}

async fn our_discovery(
    binary: &Path,
    moto_url: &str,
    users: usize,
    moto_log: &Path,
) -> Result<OurDiscovery> {
    let mut server = Server::start(binary, bench::free_port()?)?;
    let result = drive_discovery(&mut server, moto_url, users, moto_log).await;
    drop(server); // stopped before (b) and (c), which it would only disturb
    result
}

async fn drive_discovery(
    server: &mut Server,
    moto_url: &str,
    users: usize,
    moto_log: &Path,
) -> Result<OurDiscovery> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    bench::wait_until_live(server, &client).await?;
    let token = bench::login(&client, &server.base_url).await?;
    let base = server.base_url.clone();
    let api = Api {
        client: &client,
        token: &token,
    };

    let connector = api
        .send(
            reqwest::Method::POST,
            &format!("{base}/connectors"),
            Some(json!({
                "name": "bench-moto",
                "type": "aws",
                "environment": "development",
                "settings": {
                    "endpoint_url": moto_url,
                    "region": REGION,
                    "regions": [REGION],
                },
                "credentials": {
                    "aws_access_key_id": ACCESS_KEY_ID,
                    "aws_secret_access_key": SECRET_ACCESS_KEY,
                },
            })),
            StatusCode::CREATED,
        )
        .await?
        .body;
    let connector_id = connector["id"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /connectors returned no id: {connector}"))?
        .to_string();

    let logged_before = count_logged_requests(moto_log);
    let started = Instant::now();
    let job = api
        .send(
            reqwest::Method::POST,
            &format!("{base}/connectors/{connector_id}/discover"),
            None,
            StatusCode::ACCEPTED,
        )
        .await?
        .body;
    let job_id = job["id"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /connectors/{{id}}/discover returned no job id: {job}"))?
        .to_string();
    let deadline = started + Duration::from_secs(600 + users as u64 / 10);
    let job = loop {
        let job = api
            .send(
                reqwest::Method::GET,
                &format!("{base}/jobs/{job_id}"),
                None,
                StatusCode::OK,
            )
            .await?
            .body;
        match job["status"].as_str() {
            Some("succeeded" | "failed") => break job,
            Some("queued" | "running") => {}
            _ => bail!("GET /jobs/{job_id} answered an unexpected job: {job}"),
        }
        if let Some(status) = server.exited() {
            bail!("the server exited during the discovery ({status})");
        }
        if Instant::now() > deadline {
            bail!("the discovery did not finish in time; last seen: {job}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let logged_after = count_logged_requests(moto_log);
    let calls_logged = match (logged_before, logged_after) {
        (Ok(before), Ok(after)) => Some(after.saturating_sub(before)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("warning: cannot count the emulator's requests: {e:#}");
            None
        }
    };

    if job["status"] != "succeeded" {
        bail!("the discovery job failed: {job}");
    }
    let result = &job["result"];
    if result["partial_errors"]
        .as_array()
        .is_some_and(|errors| !errors.is_empty())
    {
        bail!("the discovery job reports partial errors: {job}");
    }
    if result["by_type"]["iam_user"].as_u64() != Some(users as u64) {
        bail!("the discovery job found other than {users} iam_user assets: {result}");
    }
    eprintln!(
        "    job {job_id} succeeded in {seconds:.2} s: {}",
        serde_json::to_string(result)?
    );
    let stamp = |field: &str| job[field].as_str().and_then(epoch_millis);
    if let (Some(created), Some(started), Some(finished)) = (
        stamp("created_at"),
        stamp("started_at"),
        stamp("finished_at"),
    ) {
        eprintln!(
            "    by the job's timestamps: queued {:.2} s, ran {:.2} s",
            (started - created) as f64 / 1000.0,
            (finished - started) as f64 / 1000.0
        );
    }
    check_inventory(&api, &base, &connector_id, users).await?;

    Ok(OurDiscovery {
        seconds,
        calls_logged,
        calls_planned: users as u64 + 2 + 2 + 1,
    })
}

/// Every `iam_user` asset of the connector has the seeded keys, policy and group.
async fn check_inventory(
    api: &Api<'_>,
    base: &str,
    connector_id: &str,
    users: usize,
) -> Result<()> {
    let mut seen = 0usize;
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/assets?connector_id={connector_id}&type=iam_user&limit=500");
        if let Some(c) = &cursor {
            url.push_str("&cursor=");
            url.push_str(c);
        }
        let page = api
            .send(reqwest::Method::GET, &url, None, StatusCode::OK)
            .await?;
        let assets = page
            .body
            .as_array()
            .ok_or_else(|| anyhow!("GET /assets did not answer a list: {}", page.body))?;
        for asset in assets {
            let attributes = &asset["attributes"];
            let count = |field: &str| attributes[field].as_array().map_or(0, Vec::len);
            if count("access_keys") != 2 || count("attached_policies") != 1 || count("groups") != 1
            {
                bail!("an iam_user asset lacks its seeded keys, policy or group: {asset}");
            }
        }
        seen += assets.len();
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    if seen != users {
        bail!("GET /assets lists {seen} iam_user assets, expected {users}");
    }
    eprintln!("    inventory checked: {seen} iam_user assets with 2 keys, 1 policy, 1 group each");
    Ok(())
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp as the API writes them
/// (`2026-12-04T15:41:22.123Z`); `None` for anything else.
pub(crate) fn epoch_millis(text: &str) -> Option<i64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (parts.next()??, parts.next()??, parts.next()??);
    let digits: String = fraction.chars().chain("000".chars()).take(3).collect();
    let millis: i64 = digits.parse().ok()?;
    // Days from 1970-01-01 to the civil date (proleptic Gregorian calendar).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

/// Lines of the emulator's log that record a request it served (werkzeug writes one per
/// request, before the response body, so a finished job's calls are all there).
fn count_logged_requests(log: &Path) -> Result<u64> {
    let bytes = std::fs::read(log).with_context(|| format!("cannot read {}", log.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .filter(|line| line.contains("] \"") && line.contains(" HTTP/1."))
        .count() as u64)
}

pub(crate) struct Api<'a> {
    pub(crate) client: &'a reqwest::Client,
    pub(crate) token: &'a str,
}

pub(crate) struct Answer {
    pub(crate) body: Value,
    pub(crate) next_cursor: Option<String>,
}

impl Api<'_> {
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Result<Answer> {
        let what = format!("{method} {}", url.split('?').next().unwrap_or(url));
        let mut request = self.client.request(method, url).bearer_auth(self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| what.clone())?;
        let status = response.status();
        let next_cursor = response
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{what}: reading the body"))?;
        if status != expected {
            bail!(
                "{what} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let body = serde_json::from_slice(&bytes)
            .with_context(|| format!("{what} answered something other than JSON"))?;
        Ok(Answer { body, next_cursor })
    }
}

// ---------------------------------------------------------------------------------------------
// (c) the emulator's rate

struct Rate {
    per_second: f64,
    ok: u64,
    seconds: f64,
    non_ok: u64,
    tool: &'static str,
}

fn list_access_keys_body(user: &str) -> String {
    format!("Action=ListAccessKeys&UserName={user}&Version=2010-05-08")
}

async fn rate_with_reqwest(moto_url: &str, user: &str) -> Result<Rate> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(FLOOR_IN_FLIGHT)
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("{moto_url}/");
    let body = list_access_keys_body(user);

    // One call first: it must be the right answer, not just any 200.
    let probe = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", FLOOR_AUTHORIZATION)
        .body(body.clone())
        .send()
        .await
        .context("ListAccessKeys against the emulator failed")?;
    let status = probe.status();
    let text = probe.text().await.unwrap_or_default();
    if status != StatusCode::OK || text.matches("<AccessKeyId>").count() != 2 {
        bail!("ListAccessKeys for {user} answered {status}: {text}");
    }

    load(&client, &url, &body, FLOOR_WARM_UP).await;
    let measured = load(&client, &url, &body, FLOOR_MEASURE).await;
    if measured.ok == 0 {
        bail!(
            "no ListAccessKeys call got a 200; first failure: {}",
            measured.first_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(error) = &measured.first_error {
        eprintln!(
            "warning: {} call(s) did not get a 200; first: {error}",
            measured.non_ok
        );
    }
    Ok(Rate {
        per_second: measured.ok as f64 / measured.seconds.max(1e-9),
        ok: measured.ok,
        seconds: measured.seconds,
        non_ok: measured.non_ok,
        tool: "reqwest",
    })
}

struct Load {
    ok: u64,
    non_ok: u64,
    seconds: f64,
    first_error: Option<String>,
}

/// `FLOOR_IN_FLIGHT` workers, each posting one call after the other until `duration` passed.
async fn load(client: &reqwest::Client, url: &str, body: &str, duration: Duration) -> Load {
    let ok = Arc::new(AtomicU64::new(0));
    let non_ok = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::with_capacity(FLOOR_IN_FLIGHT);
    for _ in 0..FLOOR_IN_FLIGHT {
        let (client, url, body) = (client.clone(), url.to_string(), body.to_string());
        let (ok, non_ok, first_error) = (ok.clone(), non_ok.clone(), first_error.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let sent = client
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("authorization", FLOOR_AUTHORIZATION)
                    .body(body.clone())
                    .send()
                    .await;
                let outcome = match sent {
                    Ok(response) => {
                        let status = response.status();
                        // Read the whole body so the connection can be reused.
                        match response.bytes().await {
                            Ok(_) if status == StatusCode::OK => Ok(()),
                            Ok(bytes) => {
                                Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)))
                            }
                            Err(e) => Err(format!("reading the body: {e}")),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(message) => {
                        non_ok.fetch_add(1, Ordering::Relaxed);
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
            non_ok.fetch_add(1, Ordering::Relaxed);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let first_error = first_error.lock().ok().and_then(|mut slot| slot.take());
    Load {
        ok: ok.load(Ordering::Relaxed),
        non_ok: non_ok.load(Ordering::Relaxed),
        seconds,
        first_error,
    }
}

fn rate_with_wrk(wrk: &Path, moto_url: &str, user: &str, scratch: &Scratch) -> Result<Rate> {
    let script = scratch.write(
        "list_access_keys.lua",
        &format!(
            "wrk.method = \"POST\"\n\
             wrk.body = \"{}\"\n\
             wrk.headers[\"Content-Type\"] = \"application/x-www-form-urlencoded\"\n\
             wrk.headers[\"Authorization\"] = \"{FLOOR_AUTHORIZATION}\"\n",
            list_access_keys_body(user)
        ),
    )?;
    let run = |duration: Duration| -> Result<WrkRun> {
        let output = Command::new(wrk)
            .args([
                "-t2",
                &format!("-c{FLOOR_IN_FLIGHT}"),
                &format!("-d{}s", duration.as_secs()),
                "--timeout",
                "10s",
                "-s",
            ])
            .arg(&script)
            .arg(format!("{moto_url}/"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("wrk failed ({}): {stdout}", output.status);
        }
        parse_wrk(&stdout)
    };
    run(FLOOR_WARM_UP)?;
    let measured = run(FLOOR_MEASURE)?;
    let ok = measured.requests.saturating_sub(measured.non_ok);
    if ok == 0 {
        bail!("wrk: no ListAccessKeys call got a 2xx");
    }
    if measured.non_ok > 0 {
        eprintln!(
            "warning: {} call(s) did not get a 2xx or 3xx",
            measured.non_ok
        );
    }
    Ok(Rate {
        per_second: ok as f64 / measured.seconds.max(1e-9),
        ok,
        seconds: measured.seconds,
        non_ok: measured.non_ok,
        tool: "wrk",
    })
}

#[derive(Debug, PartialEq)]
struct WrkRun {
    requests: u64,
    non_ok: u64,
    seconds: f64,
}

/// The summary lines of wrk's report: `N requests in 5.01s, …` and, when there were any,
/// `Non-2xx or 3xx responses: M`.
fn parse_wrk(report: &str) -> Result<WrkRun> {
    let summary = report
        .lines()
        .find(|line| line.contains(" requests in "))
        .ok_or_else(|| anyhow!("no `requests in` line in wrk's report: {report}"))?;
    let mut words = summary.split_whitespace();
    let requests = words
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("cannot read wrk's `{summary}`"))?;
    let duration = words
        .nth(2)
        .map(|d| d.trim_end_matches(','))
        .ok_or_else(|| anyhow!("cannot read wrk's `{summary}`"))?;
    let seconds = parse_wrk_duration(duration)
        .ok_or_else(|| anyhow!("cannot read the duration `{duration}` of wrk's report"))?;
    let non_ok = report
        .lines()
        .find_map(|line| line.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map(|n| n.trim().parse())
        .transpose()
        .context("cannot read wrk's count of non-2xx responses")?
        .unwrap_or(0);
    Ok(WrkRun {
        requests,
        non_ok,
        seconds,
    })
}

fn parse_wrk_duration(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arguments() -> Result<()> {
        assert_eq!(parse_users(&[])?, DEFAULT_USERS);
        assert_eq!(parse_users(&["--users", "50"])?, 50);
        assert_eq!(parse_users(&["--users=7"])?, 7);
        assert!(parse_users(&["--users"]).is_err());
        assert!(parse_users(&["--users", "0"]).is_err());
        assert!(parse_users(&["--user", "5"]).is_err());
        Ok(())
    }

    #[test]
    fn reads_wrk_reports() -> Result<()> {
        let report = "Running 5s test @ http://127.0.0.1:5000/\n  2 threads and 48 connections\n  \
                      2466 requests in 5.01s, 1.50MB read\n  Non-2xx or 3xx responses: 3\n\
                      Requests/sec:    492.26\nTransfer/sec:    306.76KB\n";
        assert_eq!(
            parse_wrk(report)?,
            WrkRun {
                requests: 2466,
                non_ok: 3,
                seconds: 5.01
            }
        );
        let clean = "  10 requests in 900.00ms, 1.00KB read\nRequests/sec: 11.11\n";
        assert_eq!(parse_wrk(clean)?.non_ok, 0);
        assert!(parse_wrk("nothing").is_err());
        Ok(())
    }

    #[test]
    fn reads_api_timestamps() {
        assert_eq!(epoch_millis("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            epoch_millis("2000-03-01T00:00:01.5Z"),
            Some(951_868_801_500)
        );
        assert_eq!(
            epoch_millis("2026-12-04T15:41:22.123Z"),
            Some(1_796_398_882_123)
        );
        assert_eq!(epoch_millis("2026-12-04 15:41:22"), None);
    }

    #[test]
    fn counts_logged_requests() -> Result<()> {
        let dir = Scratch::create()?;
        let log = dir.write(
            "moto.log",
            " * Running on http://127.0.0.1:5000\n\
             127.0.0.1 - - [04/Dec/2026 17:56:32] \"POST / HTTP/1.1\" 200 -\n\
             127.0.0.1 - - [04/Dec/2026 17:56:32] \"\u{1b}[33mPOST / HTTP/1.1\u{1b}[0m\" 404 -\n",
        )?;
        assert_eq!(count_logged_requests(&log)?, 2);
        Ok(())
    }
}
