//! Exact fixed-window request counting (api.md §10).
//!
//! Each key (a user id, an agent id or a client IP) gets `limit` requests per window of
//! `window_secs`; the window starts with the key's first request. Counting happens under a
//! lock, so of N concurrent requests exactly `limit` are admitted.

use nexplane_domain::Timestamp;
use std::collections::HashMap;
use std::sync::Mutex;

/// The outcome of counting one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request is admitted.
    pub allowed: bool,
    /// The limit per window.
    pub limit: u32,
    /// Requests left in the current window.
    pub remaining: u32,
    /// Unix seconds when the window frees up.
    pub reset_at: i64,
    /// Seconds to wait before retrying (≥ 1 when refused, 0 when allowed).
    pub retry_after_secs: u64,
}

/// A fixed-window limiter keyed by string.
#[derive(Debug)]
pub struct RateLimiter {
    limit: u32,
    window_ms: i64,
    windows: Mutex<HashMap<String, (Timestamp, u32)>>,
}

impl RateLimiter {
    /// `limit` requests per `window_secs` for each key.
    pub fn new(limit: u32, window_secs: i64) -> Self {
        Self {
            limit,
            window_ms: window_secs.max(1) * 1000,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Counts one request of `key` at `now`.
    pub fn check(&self, key: &str, now: Timestamp) -> RateDecision {
        let mut map = match self.windows.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() > 100_000 {
            let w = self.window_ms;
            map.retain(|_, (start, _)| now.millis() < start.millis() + w);
        }
        let entry = map.entry(key.to_owned()).or_insert((now, 0));
        if now.millis() >= entry.0.millis() + self.window_ms {
            *entry = (now, 0);
        }
        let reset = entry.0.plus_millis(self.window_ms);
        let reset_at = (reset.millis() + 999).div_euclid(1000);
        if entry.1 < self.limit {
            entry.1 += 1;
            RateDecision {
                allowed: true,
                limit: self.limit,
                remaining: self.limit - entry.1,
                reset_at,
                retry_after_secs: 0,
            }
        } else {
            let wait_ms = reset.millis() - now.millis();
            RateDecision {
                allowed: false,
                limit: self.limit,
                remaining: 0,
                reset_at,
                retry_after_secs: u64::try_from((wait_ms + 999) / 1000).unwrap_or(1).max(1),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn window_counts_exactly_and_resets() {
        let rl = RateLimiter::new(3, 60);
        let t = Timestamp::from_secs(1000);
        let d: Vec<_> = (0..5).map(|_| rl.check("u", t)).collect();
        assert_eq!(d.iter().filter(|d| d.allowed).count(), 3);
        assert_eq!(d[2].remaining, 0);
        assert_eq!(d[4].retry_after_secs, 60);
        assert_eq!(d[0].reset_at, 1060);
        assert!(rl.check("other", t).allowed);
        assert!(!rl.check("u", t.plus_secs(59)).allowed);
        assert!(rl.check("u", t.plus_secs(60)).allowed);
    }

    #[test]
    fn exact_under_threads() {
        let rl = Arc::new(RateLimiter::new(100, 60));
        let t = Timestamp::from_secs(5);
        let handles: Vec<_> = (0..150)
            .map(|_| {
                let rl = rl.clone();
                std::thread::spawn(move || rl.check("u", t).allowed)
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join())
            .filter(|r| matches!(r, Ok(true)))
            .count();
        assert_eq!(ok, 100);
    }
}
