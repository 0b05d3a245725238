//! Agent request signatures (api.md §7.2).
//!
//! `X-Nexplane-Signature` = hex HMAC-SHA256(agent secret,
//! `METHOD + "\n" + PATH_WITH_QUERY + "\n" + TIMESTAMP + "\n" + hex SHA-256(body)`), where
//! `TIMESTAMP` is the `X-Nexplane-Timestamp` value (Unix seconds, decimal). The clock-skew
//! check (300 s) belongs to the caller, which knows `now`.

use aws_lc_rs::hmac as lc_hmac;
use sha2::{Digest, Sha256};

/// The text that is signed. The method is upper-cased.
fn string_to_sign(method: &str, path_with_query: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_with_query,
        timestamp,
        hex::encode(Sha256::digest(body))
    )
}

/// The lowercase hex signature of an agent request.
///
/// ```
/// use nexplane_crypto::{agent_signature, verify_agent_signature};
/// let body = br#"{"version":"0.1.0"}"#;
/// let sig = agent_signature(b"secret", "POST", "/api/v1/agent/heartbeat", 1_796_398_882, body);
/// assert_eq!(sig.len(), 64);
/// assert!(verify_agent_signature(b"secret", "POST", "/api/v1/agent/heartbeat", 1_796_398_882, body, &sig));
/// assert!(!verify_agent_signature(b"secret", "POST", "/api/v1/agent/heartbeat", 1_796_398_883, body, &sig));
/// ```
pub fn agent_signature(
    secret: &[u8],
    method: &str,
    path_with_query: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let key = lc_hmac::Key::new(lc_hmac::HMAC_SHA256, secret);
    let message = string_to_sign(method, path_with_query, timestamp, body);
    hex::encode(lc_hmac::sign(&key, message.as_bytes()).as_ref())
}

/// Whether `signature_hex` (hex, either case) is the signature of this request. The
/// comparison is constant-time; malformed hex is simply `false`.
pub fn verify_agent_signature(
    secret: &[u8],
    method: &str,
    path_with_query: &str,
    timestamp: i64,
    body: &[u8],
    signature_hex: &str,
) -> bool {
    let Ok(tag) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let key = lc_hmac::Key::new(lc_hmac::HMAC_SHA256, secret);
    let message = string_to_sign(method, path_with_query, timestamp, body);
    lc_hmac::verify(&key, message.as_bytes(), &tag).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use ::hmac::Mac;

    const SECRET: &[u8] = b"agent-secret-0123456789";
    const TS: i64 = 1_796_398_882;
    const BODY: &[u8] = br#"{"version":"0.1.0"}"#;
    const PATH: &str = "/api/v1/agent/heartbeat?x=1";

    /// Computed outside Rust (Python `hmac` + `hashlib`).
    const HEARTBEAT_SIG: &str = "9e25538d300098429d98a0b4aa8bbc2a7edc8d7dd826e2d9fdcc2bfc21fa9a74";
    const POLL_SIG: &str = "8e8ecba96a33f421322fe1fdd00d4e411d99802b208a1bf6fa0f480f6a0dc741";

    /// The same construction with the RustCrypto `hmac` crate.
    fn reference(method: &str, path: &str, ts: i64, body: &[u8]) -> String {
        let body_hash = hex::encode(Sha256::digest(body));
        let mut mac = ::hmac::Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(format!("{method}\n{path}\n{ts}\n{body_hash}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            hex::encode(Sha256::digest(BODY)),
            "701d838178929148f2eb418c3c97c99636c033fc2efa6874d65299f6df4929d2"
        );
        assert_eq!(
            agent_signature(SECRET, "POST", PATH, TS, BODY),
            HEARTBEAT_SIG
        );
        assert_eq!(
            agent_signature(
                SECRET,
                "GET",
                "/api/v1/agent/commands/next?wait=30",
                TS,
                b""
            ),
            POLL_SIG
        );
        assert_eq!(reference("POST", PATH, TS, BODY), HEARTBEAT_SIG);
        assert_eq!(
            agent_signature(SECRET, "PUT", "/x", -5, b"\x00\xff"),
            reference("PUT", "/x", -5, b"\x00\xff")
        );
    }

    #[test]
    fn rfc4231_case_2_through_the_same_primitive() {
        // HMAC-SHA256 with key "Jefe": checks the primitive the helper uses.
        let key = lc_hmac::Key::new(lc_hmac::HMAC_SHA256, b"Jefe");
        let tag = lc_hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verification() {
        let ok = |sig: &str| verify_agent_signature(SECRET, "POST", PATH, TS, BODY, sig);
        assert!(ok(HEARTBEAT_SIG));
        assert!(ok(&HEARTBEAT_SIG.to_uppercase()));
        assert!(verify_agent_signature(
            SECRET,
            "post",
            PATH,
            TS,
            BODY,
            HEARTBEAT_SIG
        ));
        assert!(!ok(POLL_SIG));
        assert!(!ok(&HEARTBEAT_SIG[..62]));
        assert!(!ok(&format!("{HEARTBEAT_SIG}00")));
        assert!(!ok("zz"));
        assert!(!ok(""));
        assert!(!verify_agent_signature(
            b"other",
            "POST",
            PATH,
            TS,
            BODY,
            HEARTBEAT_SIG
        ));
        assert!(!verify_agent_signature(
            SECRET,
            "PUT",
            PATH,
            TS,
            BODY,
            HEARTBEAT_SIG
        ));
        assert!(!verify_agent_signature(
            SECRET,
            "POST",
            "/api/v1/agent/heartbeat",
            TS,
            BODY,
            HEARTBEAT_SIG
        ));
        assert!(!verify_agent_signature(
            SECRET,
            "POST",
            PATH,
            TS + 1,
            BODY,
            HEARTBEAT_SIG
        ));
        assert!(!verify_agent_signature(
            SECRET,
            "POST",
            PATH,
            TS,
            b"{}",
            HEARTBEAT_SIG
        ));
    }
}

/// The [`nexplane_ports::AgentSigner`] of the server: [`agent_signature`] and
/// [`verify_agent_signature`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HmacAgentSigner;

impl nexplane_ports::AgentSigner for HmacAgentSigner {
    fn sign(
        &self,
        secret: &[u8],
        method: &str,
        path_with_query: &str,
        timestamp: i64,
        body: &[u8],
    ) -> String {
        agent_signature(secret, method, path_with_query, timestamp, body)
    }

    fn verify(
        &self,
        secret: &[u8],
        method: &str,
        path_with_query: &str,
        timestamp: i64,
        body: &[u8],
        signature: &str,
    ) -> bool {
        verify_agent_signature(secret, method, path_with_query, timestamp, body, signature)
    }
}
