//! Prefixed, time-sortable identifiers such as `usr_01jef8…`.
//!
//! The suffix is a ULID (48-bit millisecond time + 80 random bits) in lowercase Crockford
//! base32, so ids of one kind sort by creation time. Time and randomness are arguments.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// An id string that is not a valid id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind} id")]
pub struct IdError {
    /// The expected prefix, e.g. `usr`.
    pub kind: &'static str,
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The type prefix of this id kind (without `_`).
            pub const PREFIX: &'static str = $prefix;

            /// A new id for something created at `now`, with 80 bits of caller-supplied randomness.
            pub fn new(now: crate::Timestamp, random: u128) -> Self {
                let ms = u64::try_from(now.millis().max(0)).unwrap_or(0) & ((1u64 << 48) - 1);
                let ulid = ulid::Ulid::from_parts(ms, random & ((1u128 << 80) - 1));
                Self(format!("{}_{}", $prefix, ulid.to_string().to_lowercase()))
            }

            /// Parses `prefix_suffix`; anything else is an [`IdError`].
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let err = IdError { kind: $prefix };
                let rest = s
                    .strip_prefix($prefix)
                    .and_then(|r| r.strip_prefix('_'))
                    .ok_or_else(|| err.clone())?;
                // 26 lowercase Crockford characters; the first is at most `7` (128 bits).
                if rest.len() != 26
                    || !rest.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
                    || rest.as_bytes()[0] > b'7'
                {
                    return Err(err);
                }
                ulid::Ulid::from_string(&rest.to_ascii_uppercase()).map_err(|_| err)?;
                Ok(Self(s.to_owned()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(/// A user (`usr_`).
    UserId, "usr");
define_id!(/// A connector (`conn_`).
    ConnectorId, "conn");
define_id!(/// A discovered asset (`ast_`).
    AssetId, "ast");
define_id!(/// A change request (`cr_`).
    ChangeRequestId, "cr");
define_id!(/// An agent (`agt_`).
    AgentId, "agt");
define_id!(/// An agent enrollment token (`enr_`).
    EnrollmentTokenId, "enr");
define_id!(/// An audit event (`evt_`).
    EventId, "evt");
define_id!(/// A background job (`job_`).
    JobId, "job");
define_id!(/// A command sent to an agent (`cmd_`).
    CommandId, "cmd");
define_id!(/// A login session (`ses_`).
    SessionId, "ses");

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::Timestamp;

    #[test]
    fn round_trips_and_sorts_by_time() {
        let a = UserId::new(Timestamp::from_millis(1_000), u128::MAX);
        let b = UserId::new(Timestamp::from_millis(1_001), 0);
        assert!(a < b);
        assert!(a.as_str().starts_with("usr_"));
        assert_eq!(UserId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn rejects_wrong_prefix_and_garbage() {
        let a = UserId::new(Timestamp::from_millis(1_000), 7);
        assert!(SessionId::parse(a.as_str()).is_err());
        assert!(UserId::parse("usr_").is_err());
        assert!(UserId::parse("usr_../../etc/passwd").is_err());
        assert!(UserId::parse(&a.as_str().to_uppercase()).is_err());
        assert!(UserId::parse("usr_zzzzzzzzzzzzzzzzzzzzzzzzzz").is_err());
    }
}
