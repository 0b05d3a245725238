//! Timestamps: milliseconds since the Unix epoch, shown as RFC 3339 UTC with millisecond precision.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A point in time, in whole milliseconds since 1970-01-01T00:00:00Z.
///
/// The domain never reads the clock: callers pass `now` in.
///
/// ```
/// use nexplane_domain::Timestamp;
/// let t = Timestamp::from_millis(1_796_398_882_123);
/// assert_eq!(t.to_rfc3339(), "2026-12-04T15:41:22.123Z");
/// assert_eq!(Timestamp::parse_rfc3339("2026-12-04T16:41:22.123+01:00").unwrap(), t);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

/// A timestamp that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an ISO 8601 / RFC 3339 timestamp: {0}")]
pub struct TimestampError(pub String);

impl Timestamp {
    /// From milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }
    /// From whole seconds since the epoch.
    pub const fn from_secs(s: i64) -> Self {
        Self(s.saturating_mul(1000))
    }
    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }
    /// Whole seconds since the epoch (rounded down).
    pub const fn secs(self) -> i64 {
        self.0.div_euclid(1000)
    }
    /// This time plus `s` seconds.
    pub const fn plus_secs(self, s: i64) -> Self {
        Self(self.0.saturating_add(s.saturating_mul(1000)))
    }
    /// This time plus `ms` milliseconds.
    pub const fn plus_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }
    /// The next midnight UTC strictly after this time.
    pub const fn next_utc_midnight(self) -> Self {
        const DAY: i64 = 86_400_000;
        Self((self.0.div_euclid(DAY) + 1) * DAY)
    }
    /// RFC 3339 in UTC with millisecond precision and a `Z`.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(dt) => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second(),
                dt.millisecond()
            ),
            Err(_) => "invalid-timestamp".to_owned(),
        }
    }
    /// Parses an ISO 8601 / RFC 3339 timestamp with an offset (`Z` or `±hh:mm`).
    /// Precision below a millisecond is truncated.
    pub fn parse_rfc3339(s: &str) -> Result<Self, TimestampError> {
        let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|_| TimestampError(s.to_owned()))?;
        let ms = dt.unix_timestamp_nanos().div_euclid(1_000_000);
        i64::try_from(ms)
            .map(Self)
            .map_err(|_| TimestampError(s.to_owned()))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}
impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}
impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    #[test]
    fn formats_with_millis_and_z() {
        assert_eq!(
            Timestamp::from_millis(0).to_rfc3339(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_millis(1).to_rfc3339(),
            "1970-01-01T00:00:00.001Z"
        );
    }
    #[test]
    fn parses_offsets_and_rejects_garbage() {
        let t = Timestamp::parse_rfc3339("2026-12-04T15:41:22Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-04T15:41:22.000Z");
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
        assert!(Timestamp::parse_rfc3339("2026-13-04T15:41:22Z").is_err());
    }
    #[test]
    fn midnight() {
        let t = Timestamp::parse_rfc3339("2026-12-04T15:41:22Z").unwrap();
        assert_eq!(
            t.next_utc_midnight().to_rfc3339(),
            "2026-12-05T00:00:00.000Z"
        );
    }
}
