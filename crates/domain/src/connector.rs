//! Connectors (api.md §4): a named link to a cloud account, its visible `settings`, and
//! write-only `credentials`.
//!
//! This module holds the model and the input rules; sealing the credentials and storing them
//! is done by the adapters. [`validate`] turns a create or replace request into a
//! [`ValidConnector`] or the full list of field errors:
//!
//! ```
//! use nexplane_domain::connector::{validate, ConnectorInput};
//! use nexplane_domain::Environment;
//! use serde_json::json;
//!
//! let input = ConnectorInput {
//!     name: "prod-aws".into(),
//!     connector_type: "aws".into(),
//!     environment: None,
//!     settings: None,
//!     credentials: Some(json!({
//!         "aws_access_key_id": "AKIAEXAMPLE",
//!         "aws_secret_access_key": "example-secret",
//!         "region": "eu-west-1"
//!     })),
//! };
//! let valid = validate(input, true).unwrap();
//! assert_eq!(valid.environment, Environment::Production);
//! // `region` given among the credentials moves into the settings.
//! assert_eq!(valid.settings, json!({"region": "eu-west-1", "regions": ["eu-west-1"]}));
//! let creds = valid.credentials.unwrap();
//! assert_eq!(creds.keys().collect::<Vec<_>>(), ["aws_access_key_id", "aws_secret_access_key"]);
//! assert_eq!(format!("{:?}", creds["aws_secret_access_key"]), "[redacted]");
//!
//! // A missing credential and an unknown setting are both reported, by field.
//! let bad = ConnectorInput {
//!     name: "x".into(),
//!     connector_type: "aws".into(),
//!     environment: Some("production".into()),
//!     settings: Some(json!({"regoin": "eu-west-1"})),
//!     credentials: Some(json!({"aws_access_key_id": "AKIAEXAMPLE"})),
//! };
//! let errors = validate(bad, true).unwrap_err();
//! let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
//! assert_eq!(fields, ["settings.regoin", "credentials.aws_secret_access_key"]);
//! ```

use crate::{ConnectorId, Environment, FieldError, SecretString, Timestamp};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The connector types this version supports.
pub const CONNECTOR_TYPES: &[&str] = &["aws"];

/// Longest connector name, in characters.
pub const NAME_MAX_CHARS: usize = 100;
/// Longest credential value, in characters (STS session tokens run to a few thousand).
pub const CREDENTIAL_MAX_CHARS: usize = 8192;
/// The most regions one connector may list.
pub const MAX_REGIONS: usize = 40;
/// The region used when none is configured.
pub const DEFAULT_AWS_REGION: &str = "us-east-1";

/// Credential names an `aws` connector requires.
pub const AWS_REQUIRED_CREDENTIALS: &[&str] = &["aws_access_key_id", "aws_secret_access_key"];
/// Credential names an `aws` connector accepts besides the required ones.
pub const AWS_OPTIONAL_CREDENTIALS: &[&str] = &["aws_session_token"];
/// Setting names an `aws` connector accepts.
pub const AWS_SETTINGS: &[&str] = &[
    "region",
    "regions",
    "endpoint_url",
    "assume_role_arn",
    "external_id",
];

/// Where a connector stands after its last test (api.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConnectorStatus {
    /// Never tested (or its credentials changed since).
    #[default]
    Untested,
    /// The last test succeeded.
    Ok,
    /// The last test failed.
    Error,
}

impl ConnectorStatus {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectorStatus::Untested => "untested",
            ConnectorStatus::Ok => "ok",
            ConnectorStatus::Error => "error",
        }
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Option<ConnectorStatus> {
        [
            ConnectorStatus::Untested,
            ConnectorStatus::Ok,
            ConnectorStatus::Error,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ConnectorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A credential value in its sealed (encrypted) form, as stored. It is ciphertext, but it is
/// still never shown: `Debug` prints `[sealed]`.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedValue(String);

impl SealedValue {
    /// Wraps a sealed value.
    pub fn new(text: String) -> Self {
        Self(text)
    }
    /// The sealed text, for storage and for opening.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SealedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[sealed]")
    }
}

/// A connector as stored and shown (without its credentials, which live apart, sealed).
#[derive(Debug, Clone, PartialEq)]
pub struct Connector {
    /// Id.
    pub id: ConnectorId,
    /// Unique name.
    pub name: String,
    /// Type, e.g. `aws`.
    pub connector_type: String,
    /// Environment; it feeds the risk score of change requests.
    pub environment: Environment,
    /// Non-secret settings (normalised: for `aws`, `region` and `regions` are always set).
    pub settings: Value,
    /// Names of the stored credentials (never their values), sorted.
    pub credential_keys: Vec<String>,
    /// Result of the last test.
    pub status: ConnectorStatus,
    /// When it was last tested.
    pub last_tested_at: Option<Timestamp>,
    /// Why the last test failed (the provider's message, no secrets).
    pub last_test_error: Option<String>,
    /// When a discovery of it last finished.
    pub last_discovered_at: Option<Timestamp>,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A create or replace request, before validation. `settings` and `credentials` are raw JSON
/// so that every problem is reported by field, and so that no credential value is ever
/// echoed in an error message.
#[derive(Debug, Clone)]
pub struct ConnectorInput {
    /// Name.
    pub name: String,
    /// Type, e.g. `aws`.
    pub connector_type: String,
    /// `production` (default), `staging` or `development`.
    pub environment: Option<String>,
    /// Settings object (absent or `null`: the defaults).
    pub settings: Option<Value>,
    /// Credentials object of strings (absent: none given).
    pub credentials: Option<Value>,
}

/// A request that passed [`validate`].
#[derive(Debug, Clone)]
pub struct ValidConnector {
    /// Trimmed name.
    pub name: String,
    /// A supported type.
    pub connector_type: String,
    /// Environment.
    pub environment: Environment,
    /// Normalised settings.
    pub settings: Value,
    /// The credentials, when given (values secret), without the ones moved to settings.
    pub credentials: Option<BTreeMap<String, SecretString>>,
}

/// Checks a connector name: 1–100 characters after trimming, none of them control characters.
pub fn normalize_name(field: &str, name: &str) -> Result<String, FieldError> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > NAME_MAX_CHARS || n.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("must be 1 to {NAME_MAX_CHARS} printable characters"),
        ));
    }
    Ok(n.to_owned())
}

/// Checks a create (`require_credentials`) or replace request and normalises it.
///
/// Rules for `aws`: credentials `aws_access_key_id` and `aws_secret_access_key` are required
/// and `aws_session_token` is optional; a `region` among the credentials is accepted and
/// moved into the settings unless they name a region themselves; any other credential name
/// is refused. Settings accept `region` (default `us-east-1`), `regions` (default
/// `[region]`), `endpoint_url`, `assume_role_arn` and `external_id`, nothing else.
/// Every problem is reported; messages never contain a credential value.
pub fn validate(
    input: ConnectorInput,
    require_credentials: bool,
) -> Result<ValidConnector, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = normalize_name("name", &input.name)
        .map_err(|e| errors.push(e))
        .ok();
    let environment = match input.environment.as_deref() {
        None => Some(Environment::default()),
        Some(s) => {
            let env = Environment::parse(s);
            if env.is_none() {
                errors.push(FieldError::new(
                    "environment",
                    "must be one of production, staging, development",
                ));
            }
            env
        }
    };
    let connector_type = input.connector_type.trim().to_owned();
    if !CONNECTOR_TYPES.contains(&connector_type.as_str()) {
        errors.push(FieldError::new(
            "type",
            format!(
                "unknown connector type; supported: {}",
                CONNECTOR_TYPES.join(", ")
            ),
        ));
        // The other fields depend on the type: nothing more to check.
        return Err(errors);
    }

    let mut settings = match input.settings {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            errors.push(FieldError::new("settings", "must be an object"));
            None
        }
    };
    let credentials_given = !matches!(input.credentials, None | Some(Value::Null));
    let mut credentials = match input.credentials {
        None | Some(Value::Null) => None,
        Some(v) => parse_credentials(v, &mut errors),
    };
    // `region` among the credentials (as in the reference example) is a setting.
    if let Some(region) = credentials.as_mut().and_then(|c| c.remove("region")) {
        if let Some(s) = settings.as_mut() {
            s.entry("region")
                .or_insert_with(|| Value::String(region.expose().trim().to_owned()));
        }
    }
    let settings = settings.and_then(|s| check_aws_settings(s, &mut errors));
    match &credentials {
        Some(c) => check_aws_credentials(c, &mut errors),
        None if require_credentials && !credentials_given => {
            errors.push(FieldError::new("credentials", "is required"));
        }
        None => {}
    }

    match (name, environment, settings, errors.is_empty()) {
        (Some(name), Some(environment), Some(settings), true) => Ok(ValidConnector {
            name,
            connector_type,
            environment,
            settings,
            credentials,
        }),
        _ => Err(errors),
    }
}

/// The credentials object: string values only, taken into [`SecretString`]s at once.
fn parse_credentials(
    v: Value,
    errors: &mut Vec<FieldError>,
) -> Option<BTreeMap<String, SecretString>> {
    let Value::Object(map) = v else {
        errors.push(FieldError::new(
            "credentials",
            "must be an object of strings",
        ));
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, v) in map {
        let field = format!("credentials.{k}");
        match v {
            Value::String(s) => {
                let n = s.chars().count();
                if n == 0 || n > CREDENTIAL_MAX_CHARS {
                    errors.push(FieldError::new(
                        field,
                        format!("must be 1 to {CREDENTIAL_MAX_CHARS} characters"),
                    ));
                    ok = false;
                } else {
                    out.insert(k, SecretString::new(s));
                }
            }
            _ => {
                errors.push(FieldError::new(field, "must be a string"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn check_aws_credentials(c: &BTreeMap<String, SecretString>, errors: &mut Vec<FieldError>) {
    for key in c.keys() {
        let known = AWS_REQUIRED_CREDENTIALS.contains(&key.as_str())
            || AWS_OPTIONAL_CREDENTIALS.contains(&key.as_str());
        if !known {
            errors.push(FieldError::new(
                format!("credentials.{key}"),
                "unknown credential for type aws; accepted: aws_access_key_id, \
                 aws_secret_access_key, aws_session_token, region",
            ));
        }
    }
    for key in AWS_REQUIRED_CREDENTIALS {
        match c.get(*key) {
            Some(v) if !v.expose().trim().is_empty() => {}
            Some(_) => errors.push(FieldError::new(
                format!("credentials.{key}"),
                "must not be blank",
            )),
            None => errors.push(FieldError::new(format!("credentials.{key}"), "is required")),
        }
    }
}

/// A region name such as `eu-west-1`: lowercase letters, digits and hyphens, starting with a
/// letter, at most 32 characters.
pub fn is_region_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn string_setting<'v>(key: &str, v: &'v Value, errors: &mut Vec<FieldError>) -> Option<&'v str> {
    match v.as_str() {
        Some(s) => Some(s),
        None => {
            errors.push(FieldError::new(
                format!("settings.{key}"),
                "must be a string",
            ));
            None
        }
    }
}

fn check_aws_settings(mut s: Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<Value> {
    let before = errors.len();
    let unknown: Vec<String> = s
        .keys()
        .filter(|k| !AWS_SETTINGS.contains(&k.as_str()))
        .cloned()
        .collect();
    for k in unknown {
        errors.push(FieldError::new(
            format!("settings.{k}"),
            format!(
                "unknown setting for type aws; accepted: {}",
                AWS_SETTINGS.join(", ")
            ),
        ));
    }
    let mut region = DEFAULT_AWS_REGION.to_owned();
    if let Some(v) = s.get("region") {
        if let Some(r) = string_setting("region", v, errors) {
            let r = r.trim();
            if is_region_name(r) {
                region = r.to_owned();
            } else {
                errors.push(FieldError::new(
                    "settings.region",
                    "must be a region name such as us-east-1",
                ));
            }
        }
    }
    let mut regions = vec![region.clone()];
    if let Some(v) = s.get("regions") {
        match v.as_array() {
            Some(items) if !items.is_empty() && items.len() <= MAX_REGIONS => {
                let mut seen = BTreeSet::new();
                regions.clear();
                for (i, item) in items.iter().enumerate() {
                    let field = format!("settings.regions[{i}]");
                    match item.as_str().map(str::trim) {
                        Some(r) if is_region_name(r) => {
                            if seen.insert(r.to_owned()) {
                                regions.push(r.to_owned());
                            } else {
                                errors.push(FieldError::new(field, "is listed twice"));
                            }
                        }
                        _ => errors.push(FieldError::new(
                            field,
                            "must be a region name such as us-east-1",
                        )),
                    }
                }
            }
            _ => errors.push(FieldError::new(
                "settings.regions",
                format!("must be a list of 1 to {MAX_REGIONS} region names"),
            )),
        }
    }
    if let Some(v) = s.get("endpoint_url") {
        if let Some(url) = string_setting("endpoint_url", v, errors) {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            let host_ok = rest.is_some_and(|r| {
                !r.is_empty() && !r.starts_with('/') && !r.starts_with(':') && !r.contains('@')
            });
            if !host_ok || url.len() > 2048 || url.chars().any(|c| c.is_whitespace()) {
                errors.push(FieldError::new(
                    "settings.endpoint_url",
                    "must be an http:// or https:// URL with a host (and no user info)",
                ));
            }
        }
    }
    if let Some(v) = s.get("assume_role_arn") {
        if let Some(arn) = string_setting("assume_role_arn", v, errors) {
            if !arn.starts_with("arn:") || !arn.contains(":role/") || arn.len() > 2048 {
                errors.push(FieldError::new(
                    "settings.assume_role_arn",
                    "must be a role ARN such as arn:aws:iam::123456789012:role/name",
                ));
            }
        }
    }
    if let Some(v) = s.get("external_id") {
        if let Some(id) = string_setting("external_id", v, errors) {
            let n = id.chars().count();
            if !(2..=1224).contains(&n) || id.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    "settings.external_id",
                    "must be 2 to 1224 printable characters",
                ));
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    s.insert("region".into(), Value::String(region));
    s.insert(
        "regions".into(),
        Value::Array(regions.into_iter().map(Value::String).collect()),
    );
    Some(Value::Object(s))
}

/// Replaces every occurrence of each secret's value in `text` with `[redacted]`. Used on
/// provider messages before they are stored, returned or audited, as a second line of
/// defence behind the adapter. Values shorter than 4 characters are left alone (they would
/// redact ordinary words).
///
/// ```
/// use nexplane_domain::connector::redact_secrets;
/// use nexplane_domain::SecretString;
/// let s = [SecretString::new("wJalrXUtnFEMI".into())];
/// assert_eq!(
///     redact_secrets("signature for wJalrXUtnFEMI does not match", s.iter()),
///     "signature for [redacted] does not match"
/// );
/// ```
pub fn redact_secrets<'a>(text: &str, secrets: impl Iterator<Item = &'a SecretString>) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        let v = s.expose();
        if v.chars().count() >= 4 && out.contains(v) {
            out = out.replace(v, "[redacted]");
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(settings: Option<Value>, credentials: Option<Value>) -> ConnectorInput {
        ConnectorInput {
            name: "  prod-aws ".into(),
            connector_type: "aws".into(),
            environment: Some("staging".into()),
            settings,
            credentials,
        }
    }

    fn creds() -> Value {
        json!({"aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "s3cr3t-value"})
    }

    fn fields(e: &[FieldError]) -> Vec<&str> {
        e.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn minimal_aws_connector_gets_default_settings() {
        let v = validate(input(None, Some(creds())), true).unwrap();
        assert_eq!(v.name, "prod-aws");
        assert_eq!(v.environment, Environment::Staging);
        assert_eq!(
            v.settings,
            json!({"region": "us-east-1", "regions": ["us-east-1"]})
        );
        assert_eq!(v.credentials.unwrap().len(), 2);
    }

    #[test]
    fn region_in_credentials_moves_unless_settings_name_one() {
        let mut c = creds();
        c["region"] = json!("eu-west-1");
        let v = validate(input(None, Some(c.clone())), true).unwrap();
        assert_eq!(v.settings["region"], json!("eu-west-1"));
        assert_eq!(v.settings["regions"], json!(["eu-west-1"]));
        assert!(!v.credentials.unwrap().contains_key("region"));

        let v = validate(
            input(
                Some(json!({"region": "us-west-2", "regions": ["us-west-2", "eu-central-1"]})),
                Some(c),
            ),
            true,
        )
        .unwrap();
        assert_eq!(v.settings["region"], json!("us-west-2"));
        assert_eq!(v.settings["regions"], json!(["us-west-2", "eu-central-1"]));
        assert!(!v.credentials.unwrap().contains_key("region"));
    }

    #[test]
    fn every_setting_is_checked() {
        let v = validate(
            input(
                Some(json!({
                    "region": "eu-west-1",
                    "endpoint_url": "http://127.0.0.1:5000",
                    "assume_role_arn": "arn:aws:iam::123456789012:role/reader",
                    "external_id": "ext-1"
                })),
                Some(creds()),
            ),
            true,
        )
        .unwrap();
        assert_eq!(v.settings["endpoint_url"], json!("http://127.0.0.1:5000"));

        let e = validate(
            input(
                Some(json!({
                    "region": "EU west",
                    "regions": ["eu-west-1", "eu-west-1", 5],
                    "endpoint_url": "ftp://x",
                    "assume_role_arn": "role",
                    "external_id": "x",
                    "colour": "blue"
                })),
                Some(creds()),
            ),
            true,
        )
        .unwrap_err();
        assert_eq!(
            fields(&e),
            [
                "settings.colour",
                "settings.region",
                "settings.regions[1]",
                "settings.regions[2]",
                "settings.endpoint_url",
                "settings.assume_role_arn",
                "settings.external_id"
            ]
        );
        let e = validate(input(Some(json!([1])), Some(creds())), true).unwrap_err();
        assert_eq!(fields(&e), ["settings"]);
        let e = validate(input(Some(json!({"regions": []})), Some(creds())), true).unwrap_err();
        assert_eq!(fields(&e), ["settings.regions"]);
        for url in ["http://", "https:///x", "http://user:pw@host", "http://a b"] {
            let e = validate(
                input(Some(json!({"endpoint_url": url})), Some(creds())),
                true,
            )
            .unwrap_err();
            assert_eq!(fields(&e), ["settings.endpoint_url"], "{url}");
        }
    }

    #[test]
    fn credentials_rules_and_no_value_in_messages() {
        let e = validate(input(None, None), true).unwrap_err();
        assert_eq!(fields(&e), ["credentials"]);
        assert!(validate(input(None, None), false).is_ok());

        let e = validate(
            input(
                None,
                Some(json!({"aws_access_key_id": "AKIAEXAMPLE", "token": "TOPSECRETVALUE"})),
            ),
            true,
        )
        .unwrap_err();
        assert_eq!(
            fields(&e),
            ["credentials.token", "credentials.aws_secret_access_key"]
        );
        let e = validate(
            input(
                None,
                Some(json!({"aws_access_key_id": 12345, "aws_secret_access_key": ""})),
            ),
            true,
        )
        .unwrap_err();
        assert_eq!(
            fields(&e),
            [
                "credentials.aws_access_key_id",
                "credentials.aws_secret_access_key"
            ]
        );
        let e = validate(input(None, Some(json!("AKIA-TOPSECRET"))), true).unwrap_err();
        assert_eq!(fields(&e), ["credentials"]);
        for err in &e {
            assert!(!err.message.contains("TOPSECRET"));
        }
        let mut c = creds();
        c["aws_session_token"] = json!("token-value");
        let v = validate(input(None, Some(c)), true).unwrap();
        assert_eq!(v.credentials.unwrap().len(), 3);
    }

    #[test]
    fn name_type_and_environment() {
        let mut i = input(None, Some(creds()));
        i.name = " ".into();
        i.environment = Some("prod".into());
        let e = validate(i, true).unwrap_err();
        assert_eq!(fields(&e), ["name", "environment"]);
        let mut i = input(Some(json!({"anything": 1})), Some(json!({"x": "y"})));
        i.connector_type = "gcp".into();
        let e = validate(i, true).unwrap_err();
        assert_eq!(
            fields(&e),
            ["type"],
            "nothing else is checked for an unknown type"
        );
        let mut i = input(None, Some(creds()));
        i.environment = None;
        assert_eq!(
            validate(i, true).unwrap().environment,
            Environment::Production
        );
    }

    #[test]
    fn status_names_and_sealed_debug() {
        for s in [
            ConnectorStatus::Untested,
            ConnectorStatus::Ok,
            ConnectorStatus::Error,
        ] {
            assert_eq!(ConnectorStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            format!("{:?}", SealedValue::new("v1.k.n.c".into())),
            "[sealed]"
        );
        assert!(is_region_name("us-gov-west-1"));
        assert!(!is_region_name("-us"));
        assert!(!is_region_name("us-"));
    }

    #[test]
    fn redaction() {
        let s = [
            SecretString::new("abc".into()),
            SecretString::new("longsecret".into()),
        ];
        assert_eq!(
            redact_secrets("abc longsecret longsecret", s.iter()),
            "abc [redacted] [redacted]"
        );
    }
}
