//! Shared state of the HTTP layer.

use nexplane_app::ratelimit::RateLimiter;
use nexplane_app::App;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Limits and switches of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Requests per minute per authenticated user.
    pub rate_limit_per_minute: u32,
    /// Requests per minute per client IP on unauthenticated requests.
    pub ip_rate_limit_per_minute: u32,
    /// Login attempts per minute per client IP.
    pub login_rate_limit_per_minute: u32,
    /// Requests per minute per agent (signed agent requests).
    pub agent_rate_limit_per_minute: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            rate_limit_per_minute: 100,
            ip_rate_limit_per_minute: 600,
            login_rate_limit_per_minute: 10,
            agent_rate_limit_per_minute: 120,
        }
    }
}

/// Request counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses by status class 1xx..5xx (index 0..4).
    pub responses: [AtomicU64; 5],
}

/// Everything a handler needs.
#[derive(Debug)]
pub struct ApiState {
    /// The use cases.
    pub app: App,
    /// Per-user limiter.
    pub user_limiter: RateLimiter,
    /// Per-IP limiter for unauthenticated requests.
    pub ip_limiter: RateLimiter,
    /// Per-agent limiter for signed agent requests.
    pub agent_limiter: RateLimiter,
    /// Wakes agents' long polls on this process.
    pub wakeups: Arc<crate::agents::AgentWakeups>,
    /// The HTTP configuration.
    pub config: ApiConfig,
    /// The OpenAPI document served at `/openapi.json`.
    pub spec: Arc<serde_json::Value>,
    /// Counters.
    pub metrics: Metrics,
}

impl ApiState {
    /// Builds the state.
    pub fn new(app: App, config: ApiConfig) -> Self {
        Self {
            app,
            user_limiter: RateLimiter::new(config.rate_limit_per_minute, 60),
            ip_limiter: RateLimiter::new(config.ip_rate_limit_per_minute, 60),
            agent_limiter: RateLimiter::new(config.agent_rate_limit_per_minute, 60),
            wakeups: Arc::default(),
            config,
            spec: Arc::new(crate::openapi::openapi_spec()),
            metrics: Metrics::default(),
        }
    }
}
