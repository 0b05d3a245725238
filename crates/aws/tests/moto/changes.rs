//! The eleven AWS change types (api.md §6.3) against the emulator: each precheck, every step
//! and every undo step, with the provider's state checked after each phase through the seeding
//! client (an independent rusoto client, not the adapter). Also the refusals (which must leave
//! the provider as it was), steps resumed after an interruption, and undo steps whose step
//! never happened.

use super::{target, KEY_ID, SECRET};
use nexplane_aws::{AwsProvider, LOCK_POLICY_DOCUMENT, LOCK_POLICY_NAME};
use nexplane_domain::change_type::{builtin_catalog, ConnectorType};
use nexplane_domain::execution::plan;
use nexplane_domain::SecretString;
use nexplane_ports::cloud::{
    ChangeError, ChangeProvider, CloudTarget, Prechecked, StepCall, StepOutcome,
};
use nexplane_testing::free_port;
use nexplane_testing::moto::{self, Rule, Seeder, ACCOUNT};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// Driving a change as the engine does

/// What an execution produced, as the engine journals it.
#[derive(Debug, Default)]
struct Executed {
    /// The precheck's context.
    prechecked: Map<String, Value>,
    /// The outputs of every step.
    outputs: Map<String, Value>,
    /// The precheck's context merged with the outputs: what a rollback gets.
    context: Map<String, Value>,
    secrets: BTreeMap<String, SecretString>,
    details: Vec<String>,
}

struct Change<'a> {
    provider: &'a AwsProvider,
    connector: &'a CloudTarget,
    change_type: &'static str,
    target: Value,
}

impl<'a> Change<'a> {
    fn new(
        provider: &'a AwsProvider,
        connector: &'a CloudTarget,
        change_type: &'static str,
        target: Value,
    ) -> Self {
        Self {
            provider,
            connector,
            change_type,
            target,
        }
    }

    async fn precheck(&self) -> Result<Prechecked, ChangeError> {
        self.provider
            .precheck(self.connector, self.change_type, &self.target)
            .await
    }

    async fn context(&self) -> Map<String, Value> {
        match self.precheck().await {
            Ok(p) => p.context,
            Err(e) => panic!(
                "{} {}: precheck failed: {e:?}",
                self.change_type, self.target
            ),
        }
    }

    /// The precheck's refusal message.
    async fn refusal(&self) -> String {
        match self.precheck().await {
            Err(ChangeError::Refused(message)) => message,
            other => panic!(
                "{} {}: expected a refusal, got {other:?}",
                self.change_type, self.target
            ),
        }
    }

    fn call<'b>(&'b self, step: &'b str, context: &'b Value, resumed: bool) -> StepCall<'b> {
        StepCall {
            change_type: self.change_type,
            step,
            target: &self.target,
            context,
            resumed,
        }
    }

    async fn apply(
        &self,
        step: &str,
        context: &Map<String, Value>,
        resumed: bool,
    ) -> Result<StepOutcome, ChangeError> {
        let context = Value::Object(context.clone());
        self.provider
            .apply_step(self.connector, self.call(step, &context, resumed))
            .await
    }

    async fn undo(
        &self,
        step: &str,
        context: &Map<String, Value>,
    ) -> Result<StepOutcome, ChangeError> {
        let context = Value::Object(context.clone());
        self.provider
            .undo_step(self.connector, self.call(step, &context, false))
            .await
    }

    /// A step that must succeed; returns its detail.
    async fn applied(&self, step: &str, context: &Map<String, Value>, resumed: bool) -> String {
        match self.apply(step, context, resumed).await {
            Ok(outcome) => outcome.detail,
            Err(e) => panic!("{} step {step}: {e:?}", self.change_type),
        }
    }

    /// An undo step that must succeed; returns its detail.
    async fn undone(&self, step: &str, context: &Map<String, Value>) -> String {
        match self.undo(step, context).await {
            Ok(outcome) => outcome.detail,
            Err(e) => panic!("{} undo step {step}: {e:?}", self.change_type),
        }
    }

    /// The precheck and every step, in order, each handed the context so far.
    async fn execute(&self) -> Executed {
        let prechecked = self.context().await;
        let mut run = Executed {
            context: prechecked.clone(),
            prechecked,
            ..Executed::default()
        };
        for def in plan(self.change_type).unwrap() {
            let outcome = self
                .apply(def.name, &run.context, false)
                .await
                .unwrap_or_else(|e| panic!("{} step {}: {e:?}", self.change_type, def.name));
            assert!(!outcome.detail.is_empty(), "{}: empty detail", def.name);
            run.context.extend(outcome.outputs.clone());
            run.outputs.extend(outcome.outputs);
            run.secrets.extend(outcome.secrets);
            run.details.push(outcome.detail);
        }
        run
    }

    /// Every undo step, in reverse order, with what the execution recorded.
    async fn roll_back(&self, context: &Map<String, Value>) -> Vec<String> {
        let mut details = Vec::new();
        for def in plan(self.change_type).unwrap().iter().rev() {
            let undo = def.undo.unwrap();
            details.push(self.undone(undo, context).await);
        }
        details
    }
}

/// Asserts that a secret value appears in none of the texts.
fn assert_hidden(secret: &str, texts: &[String]) {
    assert!(secret.len() >= 16, "implausible secret");
    for text in texts {
        assert!(!text.contains(secret), "the secret leaked into `{text}`");
    }
}

// ---------------------------------------------------------------------------------------------
// Expected state, as the seeding client reads it

fn rule(protocol: &str, from: i64, to: i64, cidr: &str) -> Rule {
    (protocol.into(), from, to, cidr.into())
}

fn pair(id: &str, status: &str) -> (String, String) {
    (id.to_string(), status.to_string())
}

fn sorted_pairs(mut pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    pairs.sort();
    pairs
}

// ---------------------------------------------------------------------------------------------
// Without the emulator

#[tokio::test]
async fn the_adapter_runs_exactly_the_eleven_aws_change_types() {
    let provider = AwsProvider::new();
    let catalog: Vec<&str> = builtin_catalog()
        .iter()
        .filter(|ct| ct.connector_type == ConnectorType::Aws)
        .map(|ct| ct.name.as_str())
        .collect();
    assert_eq!(provider.change_types(), catalog.as_slice());
    assert_eq!(provider.change_types().len(), 11);

    // Anything else is unsupported, before any network call.
    let closed = target(
        &format!("http://127.0.0.1:{}", free_port()),
        json!({}),
        KEY_ID,
        SECRET,
    );
    let err = provider
        .precheck(&closed, "agent_write_file", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, ChangeError::Unsupported(_)), "{err:?}");
    let context = json!({});
    let change_target = json!({"iam_user": "np-x"});
    let call = StepCall {
        change_type: "rotate_iam_access_key",
        step: "delete_everything",
        target: &change_target,
        context: &context,
        resumed: false,
    };
    let err = provider.apply_step(&closed, call).await.unwrap_err();
    assert!(matches!(err, ChangeError::Unsupported(_)), "{err:?}");
    // An undo step name is not an execution step, and the reverse.
    let call = StepCall {
        step: "delete_new_access_key",
        ..call
    };
    let err = provider.apply_step(&closed, call).await.unwrap_err();
    assert!(matches!(err, ChangeError::Unsupported(_)), "{err:?}");
    let call = StepCall {
        change_type: "delete_iam_access_key",
        step: "delete_access_key",
        ..call
    };
    let err = provider.undo_step(&closed, call).await.unwrap_err();
    assert!(matches!(err, ChangeError::Unsupported(_)), "{err:?}");

    // A provider that cannot be reached is a provider error, not a refusal.
    let err = provider
        .precheck(&closed, "lock_iam_user", &change_target)
        .await
        .unwrap_err();
    match &err {
        ChangeError::Provider(e) => {
            assert!(e.message.contains("cannot reach IAM"), "{}", e.message);
            assert!(!e.message.contains(SECRET) && !e.message.contains(KEY_ID));
        }
        other => panic!("expected a provider error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// rotate_iam_access_key

#[tokio::test]
async fn rotate_iam_access_key_creates_a_usable_key_and_rolls_back() {
    let (_turn, url) = moto::take().await;
    let boot = Seeder::new(&url);
    let (admin_key, admin_secret) = boot.admin("np-admin").await;
    let user_arn = boot.user("np-rotate").await;
    let old = boot.access_key("np-rotate").await.0;
    // From here on the emulator checks every signature: the new secret must really work.
    moto::enable_auth(&url).await;
    let seed = Seeder::with_key(&url, &admin_key, &admin_secret);
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), &admin_key, &admin_secret);
    let change = Change::new(
        &provider,
        &conn,
        "rotate_iam_access_key",
        json!({"iam_user": "np-rotate"}),
    );

    let run = change.execute().await;
    assert_eq!(
        Value::Object(run.prechecked.clone()),
        json!({"old_access_key_id": old, "old_key_status": "Active", "keys_before": [old]})
    );
    let new = run.outputs["new_access_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    assert_eq!(run.outputs["old_access_key_id"], old.as_str());
    assert_eq!(
        run.secrets.keys().collect::<Vec<_>>(),
        ["new_secret_access_key"]
    );
    let secret = run.secrets["new_secret_access_key"].expose().to_string();
    assert_eq!(
        run.details,
        [
            format!("created access key {new} for IAM user np-rotate"),
            format!("set access key {old} of IAM user np-rotate Inactive"),
        ]
    );

    // An independent client sees the old key inactive and the new one active, and the new
    // secret signs requests as the user.
    assert_eq!(
        seed.keys("np-rotate").await,
        sorted_pairs(vec![pair(&old, "Inactive"), pair(&new, "Active")])
    );
    assert_eq!(seed.caller_arn(&new, &secret).await.unwrap(), user_arn);
    assert!(seed
        .caller_arn(&new, "not-the-secret-0123456789")
        .await
        .is_err());
    let mut texts = run.details.clone();
    texts.push(Value::Object(run.outputs.clone()).to_string());
    texts.push(format!("{:?}", run.secrets));
    assert_hidden(&secret, &texts);

    let undone = change.roll_back(&run.context).await;
    assert_eq!(
        undone,
        [
            format!("set access key {old} of IAM user np-rotate Active again"),
            format!("deleted access key {new} of IAM user np-rotate"),
        ]
    );
    assert_eq!(seed.keys("np-rotate").await, vec![pair(&old, "Active")]);
    assert_hidden(&secret, &undone);

    // Undo steps run again (a retried rollback) find nothing to undo.
    let again = change.roll_back(&run.context).await;
    assert!(
        again.iter().all(|d| d.contains("nothing to undo")),
        "{again:?}"
    );
    assert_eq!(seed.keys("np-rotate").await, vec![pair(&old, "Active")]);

    // Credentials the provider refuses are a provider error, not a refusal, and the error
    // shows neither the secret tried nor the new one.
    let wrong = "WrongSecretValue/For+NexplaneTests0123456789";
    let bad = target(&url, json!({}), &admin_key, wrong);
    let err = Change::new(
        &provider,
        &bad,
        "rotate_iam_access_key",
        json!({"iam_user": "np-rotate"}),
    )
    .precheck()
    .await
    .unwrap_err();
    let ChangeError::Provider(e) = &err else {
        panic!("expected a provider error, got {err:?}");
    };
    assert!(e.message.contains("SignatureDoesNotMatch"), "{}", e.message);
    assert_hidden(wrong, std::slice::from_ref(&e.message));
    assert_hidden(&secret, std::slice::from_ref(&e.message));
    assert_eq!(seed.keys("np-rotate").await, vec![pair(&old, "Active")]);
}

#[tokio::test]
async fn rotate_iam_access_key_rotates_the_named_key_and_keeps_an_inactive_one_inactive() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-named").await;
    let old = seed.access_key("np-named").await.0;
    seed.set_key_status("np-named", &old, "Inactive").await;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);
    let change = Change::new(
        &provider,
        &conn,
        "rotate_iam_access_key",
        json!({"iam_user": "np-named", "access_key_id": old}),
    );
    let run = change.execute().await;
    assert_eq!(run.prechecked["old_key_status"], "Inactive");
    let new = run.outputs["new_access_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        run.details[1].contains("already Inactive"),
        "{:?}",
        run.details
    );
    assert_eq!(
        seed.keys("np-named").await,
        sorted_pairs(vec![pair(&old, "Inactive"), pair(&new, "Active")])
    );
    let undone = change.roll_back(&run.context).await;
    // The old key was Inactive before: the rollback leaves it so.
    assert!(undone[0].contains("nothing to undo"), "{undone:?}");
    assert_eq!(seed.keys("np-named").await, vec![pair(&old, "Inactive")]);
}

#[tokio::test]
async fn refused_prechecks_change_nothing() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-two").await;
    let two_a = seed.access_key("np-two").await.0;
    let two_b = seed.access_key("np-two").await.0;
    seed.user("np-none").await;
    seed.user("np-one").await;
    let one = seed.access_key("np-one").await.0;
    let policy = seed.policy("np-some-policy", "s3:List*").await;
    let users = ["np-two", "np-none", "np-one"];
    let mut before = Vec::new();
    for user in users {
        before.push(seed.user_state(user).await);
    }
    let names_before = seed.user_names().await;

    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);
    let refusal = |change_type: &'static str, target: Value| {
        let change = Change::new(&provider, &conn, change_type, target);
        async move { change.refusal().await }
    };

    // Two keys and no access_key_id: which one to replace?
    let m = refusal("rotate_iam_access_key", json!({"iam_user": "np-two"})).await;
    assert!(m.contains("set access_key_id"), "{m}");
    assert!(m.contains(&two_a) && m.contains(&two_b), "{m}");
    // Two keys: AWS has no slot for a third, even when the key is named.
    let m = refusal(
        "rotate_iam_access_key",
        json!({"iam_user": "np-two", "access_key_id": two_a}),
    )
    .await;
    assert!(m.contains("no slot is free"), "{m}");
    let m = refusal("rotate_iam_access_key", json!({"iam_user": "np-none"})).await;
    assert_eq!(m, "IAM user np-none has no access key to rotate");
    let m = refusal(
        "rotate_iam_access_key",
        json!({"iam_user": "np-one", "access_key_id": two_a}),
    )
    .await;
    assert!(
        m.contains(&format!(
            "access key {two_a} is not a key of IAM user np-one"
        )),
        "{m}"
    );

    // A missing user, whatever the change type.
    for (change_type, target) in [
        ("rotate_iam_access_key", json!({"iam_user": "np-ghost"})),
        (
            "deactivate_iam_access_key",
            json!({"iam_user": "np-ghost", "access_key_id": one}),
        ),
        (
            "delete_iam_access_key",
            json!({"iam_user": "np-ghost", "access_key_id": one}),
        ),
        ("lock_iam_user", json!({"iam_user": "np-ghost"})),
        ("unlock_iam_user", json!({"iam_user": "np-ghost"})),
        (
            "attach_iam_user_policy",
            json!({"iam_user": "np-ghost", "policy_arn": policy}),
        ),
        (
            "detach_iam_user_policy",
            json!({"iam_user": "np-ghost", "policy_arn": policy}),
        ),
    ] {
        let m = refusal(change_type, target).await;
        assert_eq!(m, "IAM user np-ghost does not exist", "{change_type}");
    }

    // Deleting a key that is still Active.
    let m = refusal(
        "delete_iam_access_key",
        json!({"iam_user": "np-one", "access_key_id": one}),
    )
    .await;
    assert_eq!(
        m,
        format!("access key {one} of IAM user np-one is still Active; deactivate it first")
    );
    // A key of another user.
    let m = refusal(
        "deactivate_iam_access_key",
        json!({"iam_user": "np-one", "access_key_id": two_b}),
    )
    .await;
    assert_eq!(
        m,
        format!("access key {two_b} does not exist for IAM user np-one")
    );
    // Unlocking a user that is not locked; detaching what is not attached; attaching a
    // policy that does not exist.
    let m = refusal("unlock_iam_user", json!({"iam_user": "np-one"})).await;
    assert!(m.contains("is not locked"), "{m}");
    let m = refusal(
        "detach_iam_user_policy",
        json!({"iam_user": "np-one", "policy_arn": policy}),
    )
    .await;
    assert_eq!(
        m,
        format!("policy {policy} is not attached to IAM user np-one")
    );
    let missing = format!("arn:aws:iam::{ACCOUNT}:policy/np-missing");
    let m = refusal(
        "attach_iam_user_policy",
        json!({"iam_user": "np-one", "policy_arn": missing}),
    )
    .await;
    assert_eq!(m, format!("IAM policy {missing} does not exist"));

    let mut after = Vec::new();
    for user in users {
        after.push(seed.user_state(user).await);
    }
    assert_eq!(before, after);
    assert_eq!(seed.user_names().await, names_before);
}

#[tokio::test]
async fn a_resumed_key_creation_never_leaves_a_second_new_key() {
    let (_turn, url) = moto::take().await;
    let boot = Seeder::new(&url);
    let (admin_key, admin_secret) = boot.admin("np-admin").await;
    let user_arn = boot.user("np-resume").await;
    let old = boot.access_key("np-resume").await.0;
    moto::enable_auth(&url).await;
    let seed = Seeder::with_key(&url, &admin_key, &admin_secret);
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), &admin_key, &admin_secret);
    let change = Change::new(
        &provider,
        &conn,
        "rotate_iam_access_key",
        json!({"iam_user": "np-resume"}),
    );
    let mut context = change.context().await;

    // The first attempt's CreateAccessKey reached AWS, but its answer (with the only copy of
    // the secret) was lost in a crash.
    let (lost_key, lost_secret) = seed.access_key("np-resume").await;
    let outcome = change
        .apply("create_access_key", &context, true)
        .await
        .unwrap();
    let new = outcome.outputs["new_access_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, lost_key);
    assert_ne!(new, old);
    assert!(
        outcome.detail.contains(&lost_key) && outcome.detail.contains("interrupted"),
        "{}",
        outcome.detail
    );
    assert_eq!(
        outcome.outputs["discarded_access_key_ids"],
        json!([lost_key])
    );
    // Exactly one new key: the lost one is gone, the new one's secret works.
    assert_eq!(
        seed.keys("np-resume").await,
        sorted_pairs(vec![pair(&old, "Active"), pair(&new, "Active")])
    );
    let secret = outcome.secrets["new_secret_access_key"]
        .expose()
        .to_string();
    assert_eq!(seed.caller_arn(&new, &secret).await.unwrap(), user_arn);
    assert_hidden(
        &secret,
        &[
            outcome.detail.clone(),
            Value::Object(outcome.outputs.clone()).to_string(),
            format!("{outcome:?}"),
        ],
    );
    assert_hidden(&lost_secret, &[format!("{outcome:?}")]);
    context.extend(outcome.outputs);

    // The deactivation, interrupted after its call, is resumed (twice): it does not fail.
    let first = change
        .applied("deactivate_old_access_key", &context, true)
        .await;
    assert_eq!(
        first,
        format!("set access key {old} of IAM user np-resume Inactive")
    );
    let second = change
        .applied("deactivate_old_access_key", &context, true)
        .await;
    assert!(second.contains("already Inactive"), "{second}");
    assert_eq!(
        seed.keys("np-resume").await,
        sorted_pairs(vec![pair(&old, "Inactive"), pair(&new, "Active")])
    );
    assert_hidden(&secret, &[first, second]);

    // The rollback puts everything back as it was before the change.
    let undone = change.roll_back(&context).await;
    assert_hidden(&secret, &undone);
    assert_eq!(seed.keys("np-resume").await, vec![pair(&old, "Active")]);
}

/// Reads one HTTP/1.1 request (head and `Content-Length` body); `None` at the end of the
/// connection.
fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Ok(None);
        }
        request.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    request.extend(body);
    Ok(Some(request))
}

/// Carries one client connection to the emulator, request by request; a request whose text
/// contains `lose` is carried out, but its answer is dropped with the connection.
fn relay(mut client: TcpStream, upstream: &str, lose: &str) -> std::io::Result<()> {
    while let Some(request) = read_request(&mut client)? {
        let text = String::from_utf8_lossy(&request).into_owned();
        // One emulator connection per request, closed after the answer.
        let request = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
        let mut server = TcpStream::connect(upstream)?;
        server.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        server.read_to_end(&mut answer)?;
        if text.contains(lose) {
            return Ok(());
        }
        client.write_all(&answer)?;
    }
    Ok(())
}

/// A loopback proxy to the emulator that loses the answers of the requests containing `lose`
/// (the call happens, the caller never hears of it). Returns its URL.
fn lossy_proxy(upstream: &str, lose: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.strip_prefix("http://").unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let _ = relay(client, &upstream, lose);
            });
        }
    });
    url
}

#[tokio::test]
async fn a_key_whose_creation_answer_was_lost_is_not_left_behind() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-lost").await;
    let old = seed.access_key("np-lost").await.0;
    let proxy = lossy_proxy(&url, "Action=CreateAccessKey");
    let provider = AwsProvider::new();
    let conn = target(&proxy, json!({}), KEY_ID, SECRET);
    let change = Change::new(
        &provider,
        &conn,
        "rotate_iam_access_key",
        json!({"iam_user": "np-lost"}),
    );
    let context = change.context().await;

    // The emulator creates the key, but the answer with its secret never arrives: the step
    // fails, and deletes the key nobody could ever use.
    let err = change
        .apply("create_access_key", &context, false)
        .await
        .unwrap_err();
    let ChangeError::Provider(e) = &err else {
        panic!("expected a provider error, got {err:?}");
    };
    eprintln!("lost answer: {}", e.message);
    assert!(
        e.message
            .starts_with("CreateAccessKey for IAM user np-lost: cannot reach IAM"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("that the unanswered call created"),
        "{}",
        e.message
    );
    assert!(!e.message.contains(SECRET));
    assert_eq!(seed.keys("np-lost").await, vec![pair(&old, "Active")]);
}

#[tokio::test]
async fn rotate_undo_steps_tolerate_a_creation_that_did_not_finish() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-partial").await;
    let old = seed.access_key("np-partial").await.0;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);
    let change = Change::new(
        &provider,
        &conn,
        "rotate_iam_access_key",
        json!({"iam_user": "np-partial"}),
    );
    let context = change.context().await;

    // The creation never happened: both undo steps find nothing to do.
    let details = change.roll_back(&context).await;
    assert_eq!(
        details,
        [
            format!("access key {old} of IAM user np-partial is Active: nothing to undo"),
            "IAM user np-partial has no access key created by this change: nothing to undo"
                .to_string(),
        ]
    );
    assert_eq!(seed.keys("np-partial").await, vec![pair(&old, "Active")]);

    // The creation happened but its answer was lost (no new_access_key_id recorded): the
    // rollback finds the key that was not there before and deletes it, never the old one.
    let lost = seed.access_key("np-partial").await.0;
    let detail = change.undone("delete_new_access_key", &context).await;
    assert_eq!(
        detail,
        format!("deleted access key {lost} of IAM user np-partial")
    );
    assert_eq!(seed.keys("np-partial").await, vec![pair(&old, "Active")]);

    // A recorded new key that is already gone.
    let mut recorded = context.clone();
    recorded.insert("new_access_key_id".into(), json!("AKIAGONEGONEGONE0000"));
    let detail = change.undone("delete_new_access_key", &recorded).await;
    assert!(
        detail.contains("does not exist: nothing to undo"),
        "{detail}"
    );
    // A recorded "new" key that existed before the change is never deleted.
    recorded.insert("new_access_key_id".into(), json!(old));
    let err = change
        .undo("delete_new_access_key", &recorded)
        .await
        .unwrap_err();
    assert!(matches!(err, ChangeError::Refused(_)), "{err:?}");
    assert_eq!(seed.keys("np-partial").await, vec![pair(&old, "Active")]);
}

// ---------------------------------------------------------------------------------------------
// deactivate_iam_access_key, delete_iam_access_key

#[tokio::test]
async fn deactivate_and_delete_iam_access_keys() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-keys").await;
    let a = seed.access_key("np-keys").await.0;
    let b = seed.access_key("np-keys").await.0;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);

    // Deactivate a.
    let deactivate = Change::new(
        &provider,
        &conn,
        "deactivate_iam_access_key",
        json!({"iam_user": "np-keys", "access_key_id": a}),
    );
    let run = deactivate.execute().await;
    assert_eq!(
        Value::Object(run.prechecked.clone()),
        json!({"access_key_id": a, "previous_status": "Active"})
    );
    assert_eq!(
        run.details,
        [format!("set access key {a} of IAM user np-keys Inactive")]
    );
    assert_eq!(
        seed.keys("np-keys").await,
        sorted_pairs(vec![pair(&a, "Inactive"), pair(&b, "Active")])
    );
    // Resumed after its call: already done, no failure.
    let again = deactivate
        .applied("deactivate_access_key", &run.context, true)
        .await;
    assert!(again.contains("already Inactive"), "{again}");
    // Deactivating it once more is refused by the precheck.
    let m = deactivate.refusal().await;
    assert_eq!(
        m,
        format!("access key {a} of IAM user np-keys is already Inactive")
    );
    // Rollback.
    let undone = deactivate.roll_back(&run.context).await;
    assert_eq!(
        undone,
        [format!("set access key {a} of IAM user np-keys Active")]
    );
    assert_eq!(
        seed.keys("np-keys").await,
        sorted_pairs(vec![pair(&a, "Active"), pair(&b, "Active")])
    );
    let undone = deactivate.roll_back(&run.context).await;
    assert!(undone[0].contains("nothing to undo"), "{undone:?}");

    // Delete b: refused while Active, nothing changes.
    let delete = Change::new(
        &provider,
        &conn,
        "delete_iam_access_key",
        json!({"iam_user": "np-keys", "access_key_id": b}),
    );
    let m = delete.refusal().await;
    assert!(m.ends_with("is still Active; deactivate it first"), "{m}");
    assert_eq!(
        seed.keys("np-keys").await,
        sorted_pairs(vec![pair(&a, "Active"), pair(&b, "Active")])
    );
    // Once Inactive it is deleted.
    seed.set_key_status("np-keys", &b, "Inactive").await;
    let run = delete.execute().await;
    assert_eq!(
        Value::Object(run.prechecked.clone()),
        json!({"access_key_id": b, "previous_status": "Inactive"})
    );
    assert_eq!(run.outputs["deleted_access_key_id"], b.as_str());
    assert_eq!(
        run.details,
        [format!("deleted access key {b} of IAM user np-keys")]
    );
    assert_eq!(seed.keys("np-keys").await, vec![pair(&a, "Active")]);
    // Resumed after its call: already deleted, no failure.
    let again = delete
        .applied("delete_access_key", &run.context, true)
        .await;
    assert!(again.contains("already deleted"), "{again}");
    // It has no undo step.
    let err = delete
        .undo("delete_access_key", &run.context)
        .await
        .unwrap_err();
    assert!(matches!(err, ChangeError::Unsupported(_)), "{err:?}");
    assert_eq!(seed.keys("np-keys").await, vec![pair(&a, "Active")]);
}

// ---------------------------------------------------------------------------------------------
// lock_iam_user, unlock_iam_user

#[tokio::test]
async fn lock_and_unlock_an_iam_user() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-lock").await;
    let active = seed.access_key("np-lock").await.0;
    let inactive = seed.access_key("np-lock").await.0;
    seed.set_key_status("np-lock", &inactive, "Inactive").await;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);
    let lock_document: Value = serde_json::from_str(LOCK_POLICY_DOCUMENT).unwrap();
    assert_eq!(
        lock_document,
        json!({"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*"}]})
    );
    let initial_keys = sorted_pairs(vec![pair(&active, "Active"), pair(&inactive, "Inactive")]);

    let lock = Change::new(
        &provider,
        &conn,
        "lock_iam_user",
        json!({"iam_user": "np-lock"}),
    );
    let run = lock.execute().await;
    assert_eq!(
        Value::Object(run.prechecked.clone()),
        json!({"keys_to_deactivate": [active]})
    );
    assert_eq!(run.outputs["deactivated_keys"], json!([active]));
    let mut locked = BTreeMap::new();
    locked.insert(LOCK_POLICY_NAME.to_string(), lock_document.clone());
    assert_eq!(seed.inline_policies("np-lock").await, locked);
    assert_eq!(
        seed.keys("np-lock").await,
        sorted_pairs(vec![pair(&active, "Inactive"), pair(&inactive, "Inactive")])
    );
    // Both steps resumed after their calls: done already, same outputs.
    let again = lock
        .apply("attach_lock_policy", &run.context, true)
        .await
        .unwrap();
    assert!(again.detail.contains("already had"), "{}", again.detail);
    let again = lock
        .apply("deactivate_active_keys", &run.context, true)
        .await
        .unwrap();
    assert_eq!(again.outputs["deactivated_keys"], json!([active]));
    assert!(
        again.detail.contains("already Inactive"),
        "{}",
        again.detail
    );
    // Locking twice is refused.
    let m = lock.refusal().await;
    assert!(m.contains("already locked"), "{m}");

    // Rollback: the policy goes, only the key the lock deactivated comes back.
    let undone = lock.roll_back(&run.context).await;
    assert_eq!(
        undone,
        [
            format!("reactivated access key {active} of IAM user np-lock"),
            format!("removed the inline policy {LOCK_POLICY_NAME} from IAM user np-lock"),
        ]
    );
    assert!(seed.inline_policies("np-lock").await.is_empty());
    assert_eq!(seed.keys("np-lock").await, initial_keys);
    // Undo steps of steps that never happened (or were undone already) do nothing.
    let undone = lock.roll_back(&run.context).await;
    assert!(
        undone.iter().all(|d| d.contains("nothing to undo")),
        "{undone:?}"
    );
    let precheck_only = lock.context().await;
    let undone = lock.roll_back(&precheck_only).await;
    assert!(
        undone.iter().all(|d| d.contains("nothing to undo")),
        "{undone:?}"
    );
    assert_eq!(seed.keys("np-lock").await, initial_keys);

    // Unlock: refused while unlocked; then lock, unlock and roll the unlock back.
    let unlock = Change::new(
        &provider,
        &conn,
        "unlock_iam_user",
        json!({"iam_user": "np-lock"}),
    );
    let m = unlock.refusal().await;
    assert_eq!(
        m,
        format!("IAM user np-lock is not locked: it has no inline policy {LOCK_POLICY_NAME}")
    );
    // A lock document of someone else's making is kept as it was.
    let custom = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "iam:*", "Resource": "*"}]});
    seed.put_inline_policy("np-lock", LOCK_POLICY_NAME, &custom)
        .await;
    let run = unlock.execute().await;
    let recorded: Value =
        serde_json::from_str(run.prechecked["lock_policy_document"].as_str().unwrap()).unwrap();
    assert_eq!(recorded, custom);
    assert!(seed.inline_policies("np-lock").await.is_empty());
    assert_eq!(seed.keys("np-lock").await, initial_keys);
    let again = unlock
        .applied("remove_lock_policy", &run.context, true)
        .await;
    assert!(again.contains("already removed"), "{again}");
    let undone = unlock.roll_back(&run.context).await;
    assert_eq!(
        undone,
        [format!(
            "put the inline policy {LOCK_POLICY_NAME} back on IAM user np-lock"
        )]
    );
    let mut restored = BTreeMap::new();
    restored.insert(LOCK_POLICY_NAME.to_string(), custom);
    assert_eq!(seed.inline_policies("np-lock").await, restored);
    let undone = unlock.roll_back(&run.context).await;
    assert!(undone[0].contains("nothing to undo"), "{undone:?}");
    assert_eq!(seed.inline_policies("np-lock").await, restored);
}

// ---------------------------------------------------------------------------------------------
// attach_iam_user_policy, detach_iam_user_policy

#[tokio::test]
async fn attach_and_detach_managed_policies() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    seed.user("np-pol").await;
    let read = seed.policy("np-read", "s3:Get*").await;
    let write = seed.policy("np-write", "s3:Put*").await;
    seed.attach_user_policy("np-pol", &write).await;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);

    let attach = Change::new(
        &provider,
        &conn,
        "attach_iam_user_policy",
        json!({"iam_user": "np-pol", "policy_arn": read}),
    );
    let run = attach.execute().await;
    assert_eq!(run.prechecked["policy_arn"], read.as_str());
    assert_eq!(
        run.details,
        [format!("attached policy {read} to IAM user np-pol")]
    );
    let mut both = vec![read.clone(), write.clone()];
    both.sort();
    assert_eq!(seed.attached("np-pol").await, both);
    let again = attach
        .applied("attach_user_policy", &run.context, true)
        .await;
    assert!(again.contains("already attached"), "{again}");
    let m = attach.refusal().await;
    assert_eq!(
        m,
        format!("policy {read} is already attached to IAM user np-pol")
    );
    let undone = attach.roll_back(&run.context).await;
    assert_eq!(
        undone,
        [format!("detached policy {read} from IAM user np-pol")]
    );
    assert_eq!(seed.attached("np-pol").await, vec![write.clone()]);
    let undone = attach.roll_back(&run.context).await;
    assert!(undone[0].contains("nothing to undo"), "{undone:?}");

    let detach = Change::new(
        &provider,
        &conn,
        "detach_iam_user_policy",
        json!({"iam_user": "np-pol", "policy_arn": write}),
    );
    let run = detach.execute().await;
    assert_eq!(
        run.details,
        [format!("detached policy {write} from IAM user np-pol")]
    );
    assert!(seed.attached("np-pol").await.is_empty());
    let again = detach
        .applied("detach_user_policy", &run.context, true)
        .await;
    assert!(again.contains("already detached"), "{again}");
    let undone = detach.roll_back(&run.context).await;
    assert_eq!(
        undone,
        [format!("attached policy {write} to IAM user np-pol")]
    );
    assert_eq!(seed.attached("np-pol").await, vec![write.clone()]);
}

// ---------------------------------------------------------------------------------------------
// stop_ec2_instance, start_ec2_instance

#[tokio::test]
async fn stop_and_start_ec2_instances() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let sg = seed
        .security_group("us-east-1", "np-ec2", 80, "0.0.0.0/0")
        .await;
    let web = seed.instance("us-east-1", "web-1", &sg).await;
    let eu_sg = seed
        .security_group("eu-west-1", "np-ec2-eu", 80, "0.0.0.0/0")
        .await;
    let db = seed.instance("eu-west-1", "db-1", &eu_sg).await;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);

    // Stop web (the connector's region).
    let stop = Change::new(
        &provider,
        &conn,
        "stop_ec2_instance",
        json!({"instance_id": web}),
    );
    let run = stop.execute().await;
    assert_eq!(run.prechecked["region"], "us-east-1");
    assert!(matches!(
        run.prechecked["previous_state"].as_str(),
        Some("running" | "pending")
    ));
    assert_eq!(run.outputs["instance_state"], "stopped");
    assert_eq!(
        run.details,
        [format!("stopped instance {web} in us-east-1")]
    );
    assert_eq!(seed.instance_state("us-east-1", &web).await, "stopped");
    let again = stop.applied("stop_instance", &run.context, true).await;
    assert_eq!(
        again,
        format!("instance {web} in us-east-1 was already stopped")
    );
    // A stopped instance cannot be stopped; a running one cannot be started.
    let m = stop.refusal().await;
    assert!(m.contains("is stopped"), "{m}");
    let undone = stop.roll_back(&run.context).await;
    assert_eq!(undone, [format!("started instance {web} in us-east-1")]);
    assert_eq!(seed.instance_state("us-east-1", &web).await, "running");

    let start = Change::new(
        &provider,
        &conn,
        "start_ec2_instance",
        json!({"instance_id": web}),
    );
    let m = start.refusal().await;
    assert_eq!(
        m,
        format!("instance {web} in us-east-1 is running: only a stopped instance can be started")
    );
    assert_eq!(seed.instance_state("us-east-1", &web).await, "running");
    seed.stop_instance("us-east-1", &web).await;
    let run = start.execute().await;
    assert_eq!(run.prechecked["previous_state"], "stopped");
    assert_eq!(seed.instance_state("us-east-1", &web).await, "running");
    let again = start.applied("start_instance", &run.context, true).await;
    assert!(again.contains("already running"), "{again}");
    let undone = start.roll_back(&run.context).await;
    assert_eq!(undone, [format!("stopped instance {web} in us-east-1")]);
    assert_eq!(seed.instance_state("us-east-1", &web).await, "stopped");
    let undone = start.roll_back(&run.context).await;
    assert!(undone[0].contains("nothing to undo"), "{undone:?}");

    // Another region, named by the target.
    let stop_db = Change::new(
        &provider,
        &conn,
        "stop_ec2_instance",
        json!({"instance_id": db, "region": "eu-west-1"}),
    );
    let run = stop_db.execute().await;
    assert_eq!(run.prechecked["region"], "eu-west-1");
    assert_eq!(seed.instance_state("eu-west-1", &db).await, "stopped");
    stop_db.roll_back(&run.context).await;
    assert_eq!(seed.instance_state("eu-west-1", &db).await, "running");

    // Unknown instances (also one in another region) are refused; nothing changes.
    let m = Change::new(
        &provider,
        &conn,
        "stop_ec2_instance",
        json!({"instance_id": db}),
    )
    .refusal()
    .await;
    assert_eq!(m, format!("instance {db} not found in us-east-1"));
    let m = Change::new(
        &provider,
        &conn,
        "stop_ec2_instance",
        json!({"instance_id": "i-0123456789abcdef0"}),
    )
    .refusal()
    .await;
    assert_eq!(m, "instance i-0123456789abcdef0 not found in us-east-1");
    let m = Change::new(
        &provider,
        &conn,
        "start_ec2_instance",
        json!({"instance_id": "i-0123456789abcdef0", "region": "eu-west-1"}),
    )
    .refusal()
    .await;
    assert_eq!(m, "instance i-0123456789abcdef0 not found in eu-west-1");
    assert_eq!(seed.instance_state("us-east-1", &web).await, "stopped");
    assert_eq!(seed.instance_state("eu-west-1", &db).await, "running");
}

// ---------------------------------------------------------------------------------------------
// revoke_security_group_ingress, authorize_security_group_ingress

#[tokio::test]
async fn revoke_and_authorize_one_ingress_rule() {
    let (_turn, url) = moto::take().await;
    let seed = Seeder::new(&url);
    let sg = seed
        .security_group_with(
            "us-east-1",
            "np-rules",
            &[(22, "10.0.0.0/8"), (22, "192.168.0.0/16")],
        )
        .await;
    let provider = AwsProvider::new();
    let conn = target(&url, json!({}), KEY_ID, SECRET);
    let initial = vec![
        rule("tcp", 22, 22, "10.0.0.0/8"),
        rule("tcp", 22, 22, "192.168.0.0/16"),
    ];
    assert_eq!(seed.ingress("us-east-1", &sg).await, initial);

    // Revoke ssh from 10.0.0.0/8 only.
    let revoke = Change::new(
        &provider,
        &conn,
        "revoke_security_group_ingress",
        json!({"group_id": sg, "protocol": "tcp", "from_port": 22, "to_port": 22,
               "cidr": "10.0.0.0/8"}),
    );
    let run = revoke.execute().await;
    assert_eq!(
        Value::Object(run.prechecked.clone()),
        json!({"region": "us-east-1", "rule": {"protocol": "tcp", "from_port": 22,
               "to_port": 22, "cidr": "10.0.0.0/8"}})
    );
    assert_eq!(
        run.details,
        [format!(
            "revoked ingress tcp port 22 from 10.0.0.0/8 from security group {sg} in us-east-1"
        )]
    );
    assert_eq!(
        seed.ingress("us-east-1", &sg).await,
        vec![rule("tcp", 22, 22, "192.168.0.0/16")]
    );
    let again = revoke.applied("revoke_ingress", &run.context, true).await;
    assert!(again.contains("already had no ingress rule"), "{again}");
    let m = revoke.refusal().await;
    assert_eq!(
        m,
        format!(
            "security group {sg} in us-east-1 has no ingress rule for tcp port 22 from 10.0.0.0/8"
        )
    );
    let undone = revoke.roll_back(&run.context).await;
    assert!(undone[0].starts_with("authorized ingress"), "{undone:?}");
    assert_eq!(seed.ingress("us-east-1", &sg).await, initial);

    // Authorizing a rule that exists is refused, nothing changes.
    let existing = Change::new(
        &provider,
        &conn,
        "authorize_security_group_ingress",
        json!({"group_id": sg, "protocol": "tcp", "from_port": 22, "to_port": 22,
               "cidr": "192.168.0.0/16"}),
    );
    let m = existing.refusal().await;
    assert_eq!(
        m,
        format!("security group {sg} in us-east-1 already allows tcp port 22 from 192.168.0.0/16")
    );
    assert_eq!(seed.ingress("us-east-1", &sg).await, initial);

    // Authorize https from anywhere, a udp range, all traffic from a range.
    for (protocol, from, to, cidr) in [
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("udp", 5000, 5010, "203.0.113.0/24"),
        ("-1", -1, -1, "198.51.100.0/24"),
    ] {
        let authorize = Change::new(
            &provider,
            &conn,
            "authorize_security_group_ingress",
            json!({"group_id": sg, "protocol": protocol, "from_port": from, "to_port": to,
                   "cidr": cidr}),
        );
        let run = authorize.execute().await;
        assert!(
            run.details[0].starts_with("authorized ingress"),
            "{:?}",
            run.details
        );
        let mut expected = initial.clone();
        expected.push(rule(protocol, from, to, cidr));
        expected.sort();
        assert_eq!(seed.ingress("us-east-1", &sg).await, expected);
        // Resumed after its call: the rule is there, that is success.
        let again = authorize
            .applied("authorize_ingress", &run.context, true)
            .await;
        assert!(again.contains("already allowed"), "{again}");
        let undone = authorize.roll_back(&run.context).await;
        assert!(undone[0].starts_with("revoked ingress"), "{undone:?}");
        assert_eq!(seed.ingress("us-east-1", &sg).await, initial);
        // Removing it again (or a rule never added) is nothing to undo.
        let undone = authorize.roll_back(&run.context).await;
        assert!(undone[0].contains("nothing to undo"), "{undone:?}");
    }

    // Another region, and unknown groups.
    let eu = seed
        .security_group("eu-west-1", "np-rules-eu", 5432, "10.1.0.0/16")
        .await;
    let eu_revoke = Change::new(
        &provider,
        &conn,
        "revoke_security_group_ingress",
        json!({"group_id": eu, "protocol": "tcp", "from_port": 5432, "to_port": 5432,
               "cidr": "10.1.0.0/16", "region": "eu-west-1"}),
    );
    let run = eu_revoke.execute().await;
    assert!(seed.ingress("eu-west-1", &eu).await.is_empty());
    eu_revoke.roll_back(&run.context).await;
    assert_eq!(
        seed.ingress("eu-west-1", &eu).await,
        vec![rule("tcp", 5432, 5432, "10.1.0.0/16")]
    );
    let m = Change::new(
        &provider,
        &conn,
        "authorize_security_group_ingress",
        json!({"group_id": eu, "protocol": "tcp", "from_port": 80, "to_port": 80,
               "cidr": "0.0.0.0/0"}),
    )
    .refusal()
    .await;
    assert_eq!(m, format!("security group {eu} not found in us-east-1"));
    let m = Change::new(
        &provider,
        &conn,
        "revoke_security_group_ingress",
        json!({"group_id": "sg-0123456789abcdef0", "protocol": "tcp", "from_port": 22,
               "to_port": 22, "cidr": "10.0.0.0/8"}),
    )
    .refusal()
    .await;
    assert_eq!(
        m,
        "security group sg-0123456789abcdef0 not found in us-east-1"
    );
    assert_eq!(seed.ingress("us-east-1", &sg).await, initial);
}
