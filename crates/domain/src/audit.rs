//! The audit event model and its hash chain (api.md §9).
//!
//! Each event's `hash` is SHA-256 (hex) over the previous event's hash, a newline, and the
//! event's canonical JSON (every field but `hash` and `prev_hash`, object keys sorted, no
//! whitespace). The first event's previous hash is [`GENESIS_HASH`].
//!
//! ```
//! use nexplane_domain::audit::{AuditEvent, NewAuditEvent, GENESIS_HASH};
//! use nexplane_domain::{EventId, Timestamp};
//! let now = Timestamp::from_secs(1_800_000_000);
//! let new = NewAuditEvent {
//!     id: EventId::new(now, 1),
//!     timestamp: now,
//!     actor: "system".into(),
//!     actor_id: None,
//!     event_type: "user.created".into(),
//!     resource_type: "user".into(),
//!     resource_id: Some("usr_x".into()),
//!     change_request_id: None,
//!     request_id: None,
//!     payload: serde_json::json!({"role": "admin"}),
//! };
//! let ev = AuditEvent::chain(new, 1, GENESIS_HASH);
//! assert!(ev.verify_hash());
//! ```

use crate::{EventId, Timestamp};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The previous hash of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The actor name for things the server does by itself.
pub const SYSTEM_ACTOR: &str = "system";

/// An event about to be appended (the store assigns `seq` and the hashes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewAuditEvent {
    /// Id.
    pub id: EventId,
    /// When it happened.
    pub timestamp: Timestamp,
    /// User email, `agent:<id>` or `system`.
    pub actor: String,
    /// User or agent id, when there is one.
    pub actor_id: Option<String>,
    /// E.g. `auth.login`.
    pub event_type: String,
    /// E.g. `user`.
    pub resource_type: String,
    /// Id of the resource.
    pub resource_id: Option<String>,
    /// Change request it concerns, if any.
    pub change_request_id: Option<String>,
    /// Request id of the HTTP request that caused it.
    pub request_id: Option<String>,
    /// Event details. Never holds a secret.
    pub payload: Value,
}

/// A stored, chained audit event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    /// Id.
    pub id: EventId,
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When it happened.
    pub timestamp: Timestamp,
    /// User email, `agent:<id>` or `system`.
    pub actor: String,
    /// User or agent id.
    pub actor_id: Option<String>,
    /// Event type.
    pub event_type: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: Option<String>,
    /// Change request id.
    pub change_request_id: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Details.
    pub payload: Value,
    /// Hash of the previous event.
    pub prev_hash: String,
    /// Hash of this event.
    pub hash: String,
}

impl AuditEvent {
    /// Links `new` after the event whose hash is `prev_hash`, as number `seq`.
    pub fn chain(new: NewAuditEvent, seq: i64, prev_hash: &str) -> AuditEvent {
        let mut ev = AuditEvent {
            id: new.id,
            seq,
            timestamp: new.timestamp,
            actor: new.actor,
            actor_id: new.actor_id,
            event_type: new.event_type,
            resource_type: new.resource_type,
            resource_id: new.resource_id,
            change_request_id: new.change_request_id,
            request_id: new.request_id,
            payload: new.payload,
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        ev.hash = ev.compute_hash();
        ev
    }

    /// The canonical JSON of the event: all fields but the hashes, keys sorted, compact.
    pub fn canonical_json(&self) -> String {
        let v = serde_json::json!({
            "id": self.id.as_str(),
            "seq": self.seq,
            "timestamp": self.timestamp.to_rfc3339(),
            "actor": self.actor,
            "actor_id": self.actor_id,
            "event_type": self.event_type,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "change_request_id": self.change_request_id,
            "request_id": self.request_id,
            "payload": self.payload,
        });
        let mut out = String::new();
        write_canonical(&v, &mut out);
        out
    }

    /// SHA-256 over `prev_hash`, `\n` and the canonical JSON, as lowercase hex.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(self.canonical_json().as_bytes());
        hex::encode(h.finalize())
    }

    /// Whether the stored hash matches the content.
    pub fn verify_hash(&self) -> bool {
        self.hash == self.compute_hash()
    }
}

/// The result of checking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    /// Every event verified.
    Ok {
        /// Number of events.
        events: i64,
        /// Hash of the last event (the genesis hash when empty).
        head: String,
    },
    /// The first event that is altered, missing or out of place.
    Broken {
        /// Its sequence number.
        first_bad_seq: i64,
    },
}

/// Incrementally verifies a chain fed in `seq` order.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    expected_seq: i64,
    prev_hash: String,
    broken: Option<i64>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            broken: None,
        }
    }
}

impl ChainVerifier {
    /// Feeds the next stored event. Returns `false` once the chain is known to be broken.
    pub fn push(&mut self, ev: &AuditEvent) -> bool {
        if self.broken.is_some() {
            return false;
        }
        if ev.seq != self.expected_seq {
            // A gap: the event with the expected number was removed.
            self.broken = Some(self.expected_seq.min(ev.seq));
            return false;
        }
        if ev.prev_hash != self.prev_hash || !ev.verify_hash() {
            self.broken = Some(ev.seq);
            return false;
        }
        self.prev_hash = ev.hash.clone();
        self.expected_seq += 1;
        true
    }

    /// The verdict over everything fed so far.
    pub fn finish(self) -> ChainCheck {
        match self.broken {
            Some(seq) => ChainCheck::Broken { first_bad_seq: seq },
            None => ChainCheck::Ok {
                events: self.expected_seq - 1,
                head: self.prev_hash,
            },
        }
    }
}

/// Compact JSON with object keys sorted, independent of serde_json's map ordering feature.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(child) = map.get(k) {
                    write_canonical(child, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn new(i: u128, payload: Value) -> NewAuditEvent {
        let now = Timestamp::from_secs(1_800_000_000);
        NewAuditEvent {
            id: EventId::new(now, i),
            timestamp: now,
            actor: "a@example.com".into(),
            actor_id: None,
            event_type: "auth.login".into(),
            resource_type: "user".into(),
            resource_id: None,
            change_request_id: None,
            request_id: None,
            payload,
        }
    }

    fn chain(n: usize) -> Vec<AuditEvent> {
        let mut prev = GENESIS_HASH.to_owned();
        (0..n)
            .map(|i| {
                let ev = AuditEvent::chain(
                    new(i as u128, serde_json::json!({"i": i})),
                    i as i64 + 1,
                    &prev,
                );
                prev = ev.hash.clone();
                ev
            })
            .collect()
    }

    fn check(evs: &[AuditEvent]) -> ChainCheck {
        let mut v = ChainVerifier::default();
        for e in evs {
            v.push(e);
        }
        v.finish()
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let ev = AuditEvent::chain(
            new(1, serde_json::json!({"b": 1, "a": {"d": 2, "c": 3}})),
            1,
            GENESIS_HASH,
        );
        assert!(ev
            .canonical_json()
            .contains(r#""payload":{"a":{"c":3,"d":2},"b":1}"#));
    }

    #[test]
    fn intact_chain_verifies() {
        let evs = chain(5);
        assert_eq!(
            check(&evs),
            ChainCheck::Ok {
                events: 5,
                head: evs[4].hash.clone()
            }
        );
        assert_eq!(
            check(&[]),
            ChainCheck::Ok {
                events: 0,
                head: GENESIS_HASH.into()
            }
        );
    }

    #[test]
    fn tampered_removed_and_truncated_head_are_found() {
        let mut evs = chain(5);
        evs[2].payload = serde_json::json!({"i": 99});
        assert_eq!(check(&evs), ChainCheck::Broken { first_bad_seq: 3 });

        let mut evs = chain(5);
        evs.remove(1);
        assert_eq!(check(&evs), ChainCheck::Broken { first_bad_seq: 2 });

        let mut evs = chain(5);
        evs.remove(0);
        assert_eq!(check(&evs), ChainCheck::Broken { first_bad_seq: 1 });

        // Rewriting an event together with its own hash still breaks the next link.
        let mut evs = chain(5);
        evs[1].actor = "mallory@example.com".into();
        evs[1].hash = evs[1].compute_hash();
        assert_eq!(check(&evs), ChainCheck::Broken { first_bad_seq: 3 });
    }
}
