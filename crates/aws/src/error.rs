//! Turning rusoto errors into provider messages that never carry a credential value.

use nexplane_ports::cloud::CloudError;
use rusoto_core::request::BufferedHttpResponse;
use rusoto_core::RusotoError;
use std::time::Duration;

/// How a failed call failed: it decides whether a discovery goes on without that part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// No answer: connection refused, DNS failure, TLS failure, time-out.
    Unreachable,
    /// The credentials were refused (unknown key, bad signature, expired token).
    Auth,
    /// Authenticated but not allowed.
    Denied,
    /// Anything else the provider said (unknown region, throttling, bad answer…).
    Other,
}

/// A failed call, already redacted.
#[derive(Debug, Clone)]
pub(crate) struct CallError {
    pub kind: FailureKind,
    /// The provider's error code, when it gave one (`InvalidClientTokenId`).
    pub code: Option<String>,
    /// `Code: message` or a description of the transport failure.
    pub message: String,
}

impl CallError {
    /// Whether this failure means the whole run cannot go on (nothing will answer us, or
    /// nothing will accept these credentials).
    pub fn is_fatal(&self) -> bool {
        matches!(self.kind, FailureKind::Unreachable | FailureKind::Auth)
    }

    pub fn into_cloud(self) -> CloudError {
        CloudError {
            message: self.message,
        }
    }

    pub fn context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// Error codes meaning "these credentials are not valid", across STS, IAM, EC2 and S3.
const AUTH_CODES: [&str; 12] = [
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "ExpiredToken",
    "ExpiredTokenException",
    "UnrecognizedClientException",
    "AuthFailure",
    "InvalidAccessKeyId",
    "MissingAuthenticationToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
];

const DENIED_CODES: [&str; 4] = [
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnauthorizedAccess",
];

fn kind_of_code(code: &str) -> FailureKind {
    if AUTH_CODES.contains(&code) {
        FailureKind::Auth
    } else if DENIED_CODES.contains(&code) {
        FailureKind::Denied
    } else {
        FailureKind::Other
    }
}

/// Removes every secret value from provider text. Built from the credential values of the
/// call (and from temporary credentials obtained from AssumeRole).
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values)", self.secrets.len())
    }
}

impl Redactor {
    /// Adds a secret. Very short values are not worth hiding (and would garble every
    /// message), but credential values are never that short.
    pub fn add(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.chars().count() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_string());
            // Longest first, so a secret containing another is hidden whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// What the call was: for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallSite<'a> {
    /// `STS`, `IAM`, `EC2`, `S3`.
    pub service: &'a str,
    /// The region the request was signed for.
    pub region: &'a str,
    /// The custom endpoint, when the connector has one.
    pub endpoint: Option<&'a str>,
}

impl CallSite<'_> {
    /// `STS at http://127.0.0.1:5000 (region us-east-1)` or `AWS STS (region us-east-1)`.
    fn describe(&self) -> String {
        match self.endpoint {
            Some(endpoint) => format!("{} at {endpoint} (region {})", self.service, self.region),
            None => format!("AWS {} (region {})", self.service, self.region),
        }
    }
}

/// Text between `<tag>` and `</tag>`, first occurrence.
fn xml_element<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&close)?;
    Some(body[start..start + len].trim())
}

/// A short, single-line rendering of a body that is not an AWS error document (HTML error
/// page, plain text).
fn plain_text(body: &str) -> String {
    let mut text = String::with_capacity(body.len().min(400));
    let mut in_tag = false;
    let mut last_space = true;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                if !last_space {
                    text.push(' ');
                    last_space = true;
                }
            }
            _ if in_tag => {}
            c if c.is_whitespace() => {
                if !last_space {
                    text.push(' ');
                    last_space = true;
                }
            }
            c => {
                text.push(c);
                last_space = false;
            }
        }
        if text.chars().count() >= 300 {
            text.push('…');
            break;
        }
    }
    text.trim().to_string()
}

fn from_response(response: &BufferedHttpResponse) -> (FailureKind, Option<String>, String) {
    let body = String::from_utf8_lossy(&response.body);
    let code = xml_element(&body, "Code")
        .or_else(|| xml_element(&body, "code"))
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let message = xml_element(&body, "Message")
        .or_else(|| xml_element(&body, "message"))
        .map(|m| plain_text(&unescape_xml(m)));
    let status = response.status;
    match code {
        Some(code) => {
            let kind = kind_of_code(&code);
            let text = match message {
                Some(m) if !m.is_empty() => format!("{code}: {m}"),
                _ => format!("{code} (HTTP {status})"),
            };
            (kind, Some(code), text)
        }
        None => {
            let kind = match status.as_u16() {
                401 => FailureKind::Auth,
                403 => FailureKind::Denied,
                _ => FailureKind::Other,
            };
            let text = plain_text(&body);
            let text = if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            };
            (kind, None, text)
        }
    }
}

fn unescape_xml(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The variant name of a generated rusoto service error (`NoSuchEntity("…")` →
/// `NoSuchEntity`), which is the AWS error code.
fn variant_name<E: std::fmt::Debug>(err: &E) -> String {
    let debug = format!("{err:?}");
    debug
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Classifies and redacts a rusoto error.
pub(crate) fn classify<E>(err: RusotoError<E>, site: CallSite<'_>, redactor: &Redactor) -> CallError
where
    E: std::error::Error + 'static,
{
    let (kind, code, message) = match &err {
        RusotoError::Service(e) => {
            let code = variant_name(e);
            let text = e.to_string();
            let message = if text.is_empty() || text == code {
                code.clone()
            } else {
                format!("{code}: {text}")
            };
            (kind_of_code(&code), Some(code), message)
        }
        RusotoError::HttpDispatch(e) => {
            let detail = e.to_string();
            let detail = detail
                .strip_prefix("Error during dispatch: ")
                .unwrap_or(&detail)
                .to_string();
            (
                FailureKind::Unreachable,
                None,
                format!("cannot reach {}: {detail}", site.describe()),
            )
        }
        RusotoError::Credentials(e) => (
            FailureKind::Auth,
            None,
            format!("unusable credentials: {e}"),
        ),
        RusotoError::Validation(m) => (
            FailureKind::Other,
            None,
            format!("request rejected before sending: {m}"),
        ),
        RusotoError::ParseError(m) => (
            FailureKind::Other,
            None,
            format!("unexpected answer from {}: {m}", site.describe()),
        ),
        RusotoError::Unknown(response) => from_response(response),
        RusotoError::Blocking => (
            FailureKind::Other,
            None,
            "internal error: blocking call failed".to_string(),
        ),
    };
    CallError {
        kind,
        code,
        message: redactor.redact(&message),
    }
}

/// The error of a call that did not finish in time.
pub(crate) fn timed_out(site: CallSite<'_>, after: Duration, redactor: &Redactor) -> CallError {
    CallError {
        kind: FailureKind::Unreachable,
        code: None,
        message: redactor.redact(&format!(
            "cannot reach {}: no answer within {} s",
            site.describe(),
            after.as_secs_f32()
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn parses_query_error_documents() {
        let body = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code>\
                    <Message>The security token included in the request is invalid.</Message>\
                    </Error></ErrorResponse>";
        let response = BufferedHttpResponse {
            status: hyper::StatusCode::FORBIDDEN,
            body: body.as_bytes().to_vec().into(),
            headers: Default::default(),
        };
        let (kind, code, text) = from_response(&response);
        assert_eq!(kind, FailureKind::Auth);
        assert_eq!(code.as_deref(), Some("InvalidClientTokenId"));
        assert_eq!(
            text,
            "InvalidClientTokenId: The security token included in the request is invalid."
        );
    }

    #[test]
    fn renders_html_pages_briefly() {
        let response = BufferedHttpResponse {
            status: hyper::StatusCode::INTERNAL_SERVER_ERROR,
            body: "<!doctype html>\n<title>500 Internal Server Error</title>\n<h1>Oops</h1>"
                .as_bytes()
                .to_vec()
                .into(),
            headers: Default::default(),
        };
        let (kind, code, text) = from_response(&response);
        assert_eq!(kind, FailureKind::Other);
        assert_eq!(code, None);
        assert_eq!(
            text,
            "HTTP 500 Internal Server Error: 500 Internal Server Error Oops"
        );
    }

    #[test]
    fn redacts_every_secret() {
        let mut r = Redactor::default();
        r.add("AKIAABCDEF");
        r.add("wJalrXUtnFEMI");
        r.add("ab");
        assert_eq!(
            r.redact("key AKIAABCDEF secret wJalrXUtnFEMI ab"),
            "key [redacted] secret [redacted] ab"
        );
    }

    #[test]
    fn names_service_error_variants() {
        #[derive(Debug)]
        #[allow(dead_code)]
        enum E {
            NoSuchEntity(String),
        }
        assert_eq!(variant_name(&E::NoSuchEntity("x".into())), "NoSuchEntity");
    }
}
