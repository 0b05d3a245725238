//! Parsing and validation of an `aws` connector's settings and credentials (api.md §4).

use nexplane_domain::SecretString;
use nexplane_ports::cloud::{CloudCredentials, CloudError, CloudTarget};
use serde_json::Value;

/// The region used when neither the settings nor the credentials name one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The setting names an `aws` connector accepts.
pub const SETTING_NAMES: [&str; 5] = [
    "region",
    "regions",
    "endpoint_url",
    "assume_role_arn",
    "external_id",
];

/// Validated, non-secret settings of an `aws` connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// The home region: STS and S3 are called there (IAM is global).
    pub region: String,
    /// The regions whose EC2 resources are discovered (never empty, no duplicates).
    pub regions: Vec<String>,
    /// An AWS-compatible endpoint used for every service (e.g. a local emulator), without a
    /// trailing slash.
    pub endpoint_url: Option<String>,
    /// A role to assume (STS AssumeRole) before any other call.
    pub assume_role_arn: Option<String>,
    /// The external id to pass to AssumeRole.
    pub external_id: Option<String>,
}

/// The credential values of an `aws` connector.
#[derive(Debug, Clone)]
pub(crate) struct AwsKeys {
    pub access_key_id: SecretString,
    pub secret_access_key: SecretString,
    pub session_token: Option<SecretString>,
}

fn invalid(message: impl Into<String>) -> CloudError {
    CloudError {
        message: message.into(),
    }
}

/// Whether `name` looks like an AWS region name (`us-east-1`, `eu-west-3`, `us-gov-west-1`).
/// Whether AWS knows it is found out by calling it.
fn valid_region_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn optional_string(key: &str, value: &Value) -> Result<Option<String>, CloudError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.trim().to_string())),
        _ => Err(invalid(format!("setting `{key}` must be a string"))),
    }
}

fn region_setting(key: &str, name: &str) -> Result<String, CloudError> {
    if valid_region_name(name) {
        Ok(name.to_string())
    } else {
        Err(invalid(format!(
            "setting `{key}`: `{name}` is not a region name (lower-case letters, digits and \
             dashes, e.g. `us-east-1`)"
        )))
    }
}

fn endpoint_setting(url: &str) -> Result<String, CloudError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            invalid("setting `endpoint_url` must start with http:// or https:// (e.g. `http://127.0.0.1:5000`)")
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains('@') || url.chars().any(char::is_whitespace) {
        return Err(invalid(
            "setting `endpoint_url` must be a URL with a host and no user information \
             (e.g. `https://aws.example.internal`)",
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Parses a connector's `settings` object. `fallback_region` is a `region` given among the
/// credentials (accepted there too, api.md §4); the settings' own `region` wins.
pub fn parse_settings(
    settings: &Value,
    fallback_region: Option<&str>,
) -> Result<AwsSettings, CloudError> {
    let empty = serde_json::Map::new();
    let object = match settings {
        Value::Null => &empty,
        Value::Object(map) => map,
        _ => {
            return Err(invalid(
                "the settings of an aws connector must be a JSON object",
            ))
        }
    };
    let mut region = None;
    let mut regions = None;
    let mut endpoint_url = None;
    let mut assume_role_arn = None;
    let mut external_id = None;
    for (key, value) in object {
        match key.as_str() {
            "region" => {
                region = optional_string(key, value)?
                    .map(|r| region_setting(key, &r))
                    .transpose()?;
            }
            "regions" => match value {
                Value::Null => {}
                Value::Array(items) => {
                    let mut list: Vec<String> = Vec::with_capacity(items.len());
                    for item in items {
                        let Value::String(name) = item else {
                            return Err(invalid(
                                "setting `regions` must be a list of region names",
                            ));
                        };
                        let name = region_setting(key, name.trim())?;
                        if !list.contains(&name) {
                            list.push(name);
                        }
                    }
                    if list.is_empty() {
                        return Err(invalid(
                            "setting `regions` must name at least one region (leave it out to \
                             discover the connector's `region`)",
                        ));
                    }
                    regions = Some(list);
                }
                _ => return Err(invalid("setting `regions` must be a list of region names")),
            },
            "endpoint_url" => {
                endpoint_url = optional_string(key, value)?
                    .map(|u| endpoint_setting(&u))
                    .transpose()?;
            }
            "assume_role_arn" => {
                let arn = optional_string(key, value)?;
                if let Some(arn) = &arn {
                    if !arn.starts_with("arn:") || !arn.contains(":role/") {
                        return Err(invalid(format!(
                            "setting `assume_role_arn`: `{arn}` is not a role ARN \
                             (arn:aws:iam::<account>:role/<name>)"
                        )));
                    }
                }
                assume_role_arn = arn;
            }
            "external_id" => external_id = optional_string(key, value)?,
            other => {
                return Err(invalid(format!(
                    "unknown setting `{other}` for an aws connector (expected {})",
                    SETTING_NAMES.join(", ")
                )))
            }
        }
    }
    if external_id.is_some() && assume_role_arn.is_none() {
        return Err(invalid(
            "setting `external_id` is only used with `assume_role_arn`, which is not set",
        ));
    }
    let region = match (region, fallback_region) {
        (Some(r), _) => r,
        (None, Some(r)) if !r.trim().is_empty() => region_setting("region", r.trim())?,
        (None, _) => DEFAULT_REGION.to_string(),
    };
    let regions = regions.unwrap_or_else(|| vec![region.clone()]);
    Ok(AwsSettings {
        region,
        regions,
        endpoint_url,
        assume_role_arn,
        external_id,
    })
}

fn credential<'a>(credentials: &'a CloudCredentials, key: &str) -> Option<&'a SecretString> {
    credentials
        .values
        .get(key)
        .filter(|v| !v.expose().trim().is_empty())
}

/// Validates the target and splits it into settings and credential values.
pub(crate) fn parse_target(target: &CloudTarget) -> Result<(AwsSettings, AwsKeys), CloudError> {
    if target.connector_type != "aws" {
        return Err(invalid(format!(
            "connector type `{}` is not served by the aws adapter",
            target.connector_type
        )));
    }
    let creds = &target.credentials;
    let missing = |key: &str| invalid(format!("credential `{key}` is missing"));
    let keys = AwsKeys {
        access_key_id: credential(creds, "aws_access_key_id")
            .cloned()
            .ok_or_else(|| missing("aws_access_key_id"))?,
        secret_access_key: credential(creds, "aws_secret_access_key")
            .cloned()
            .ok_or_else(|| missing("aws_secret_access_key"))?,
        session_token: credential(creds, "aws_session_token").cloned(),
    };
    let fallback_region = credential(creds, "region").map(SecretString::expose);
    let settings = parse_settings(&target.settings, fallback_region)?;
    Ok((settings, keys))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults() {
        let s = parse_settings(&json!({}), None).unwrap();
        assert_eq!(s.region, "us-east-1");
        assert_eq!(s.regions, vec!["us-east-1"]);
        assert_eq!(s.endpoint_url, None);
        let s = parse_settings(&Value::Null, Some("eu-west-1")).unwrap();
        assert_eq!(s.regions, vec!["eu-west-1"]);
        let s = parse_settings(&json!({"region": "eu-central-1"}), Some("eu-west-1")).unwrap();
        assert_eq!(s.region, "eu-central-1");
    }

    #[test]
    fn full_settings() {
        let s = parse_settings(
            &json!({
                "region": "eu-west-1",
                "regions": ["us-east-1", "eu-west-1", "us-east-1"],
                "endpoint_url": "http://127.0.0.1:5000/",
                "assume_role_arn": "arn:aws:iam::123456789012:role/audit",
                "external_id": "x-1",
            }),
            None,
        )
        .unwrap();
        assert_eq!(s.regions, vec!["us-east-1", "eu-west-1"]);
        assert_eq!(s.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(s.external_id.as_deref(), Some("x-1"));
    }

    #[test]
    fn rejects_bad_settings() {
        let cases = [
            (json!({"regoin": "us-east-1"}), "unknown setting `regoin`"),
            (json!({"region": 3}), "`region` must be a string"),
            (json!({"region": "US EAST"}), "not a region name"),
            (json!({"regions": []}), "at least one region"),
            (json!({"regions": "us-east-1"}), "list of region names"),
            (json!({"regions": [1]}), "list of region names"),
            (json!({"endpoint_url": "ftp://x"}), "http:// or https://"),
            (json!({"endpoint_url": "http://"}), "with a host"),
            (
                json!({"endpoint_url": "http://u:p@h"}),
                "no user information",
            ),
            (json!({"assume_role_arn": "role"}), "not a role ARN"),
            (
                json!({"external_id": "x"}),
                "only used with `assume_role_arn`",
            ),
            (json!([]), "must be a JSON object"),
        ];
        for (settings, expected) in cases {
            let err = parse_settings(&settings, None).unwrap_err();
            assert!(
                err.message.contains(expected),
                "{settings}: `{}` lacks `{expected}`",
                err.message
            );
        }
    }

    #[test]
    fn credentials_are_required() {
        let mut values = std::collections::BTreeMap::new();
        values.insert(
            "aws_access_key_id".to_string(),
            SecretString::new("AKIAEXAMPLE".into()),
        );
        let mut target = CloudTarget {
            connector_type: "aws".into(),
            settings: json!({}),
            credentials: CloudCredentials {
                values: values.clone(),
            },
        };
        let err = parse_target(&target).unwrap_err();
        assert!(err.message.contains("aws_secret_access_key"));
        values.insert(
            "aws_secret_access_key".to_string(),
            SecretString::new("s3cr3t-value".into()),
        );
        values.insert("region".to_string(), SecretString::new("eu-west-2".into()));
        target.credentials = CloudCredentials { values };
        let (settings, keys) = parse_target(&target).unwrap();
        assert_eq!(settings.region, "eu-west-2");
        assert!(keys.session_token.is_none());
        target.connector_type = "gcp".into();
        assert!(parse_target(&target)
            .unwrap_err()
            .message
            .contains("not served"));
    }
}
