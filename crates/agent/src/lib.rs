//! The Nexplane host agent (api.md §7).
//!
//! The agent enrolls once with an enrollment token (`nexplane-agent enroll`), which writes its
//! configuration file (§7.4) with the agent id and secret. `nexplane-agent run` then reaches the
//! control plane by outbound HTTP only: it heartbeats, long-polls for commands, executes them on
//! the host and posts their results. Every call after registration is signed with
//! [`nexplane_crypto::agent_signature`] (§7.2).
//!
//! The commands ([`commands`]) write files and change file modes, only below the directories
//! the operator listed in `allowed_paths`; each records a snapshot of what it replaced so the
//! control plane can roll it back (`restore_file`, `restore_file_mode`).
//!
//! Modules:
//! - [`config`]: the TOML configuration file (0600, validated, unknown keys refused).
//! - [`paths`]: the `allowed_paths` check (lexical and after resolving symlinks).
//! - [`commands`]: the command types and their execution.
//! - [`client`]: the signed HTTP client for the agent endpoints.
//! - [`agent`]: the run loop (heartbeat, long poll, execute, report, backoff, shutdown).
#![deny(missing_docs)]

#[cfg(not(unix))]
compile_error!("nexplane-agent supports Unix hosts only (file modes, atomic renames)");

pub mod agent;
pub mod client;
pub mod commands;
pub mod config;
mod fsutil;
pub mod paths;

pub use agent::{run, RunError};
pub use client::{AgentClient, ApiError};
pub use config::{AgentSecret, Config, ConfigError, DEFAULT_CONFIG_PATH};

/// The agent's version, sent at registration and in every heartbeat.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Process exit codes of the `nexplane-agent` binary.
pub mod exit {
    /// Clean stop (or success).
    pub const OK: u8 = 0;
    /// Any other failure (network, server error, IO).
    pub const FAILURE: u8 = 1;
    /// The server refused the agent's credentials (401): revoked agent, bad secret, clock skew,
    /// or a refused enrollment token. The systemd unit does not restart on this code.
    pub const REJECTED: u8 = 3;
    /// The configuration file is missing, unsafe or invalid (`EX_CONFIG`). The systemd unit does
    /// not restart on this code either.
    pub const CONFIG: u8 = 78;
}

/// The host name reported at registration and in heartbeats: the kernel's, else `$HOSTNAME`,
/// else `unknown`.
pub fn hostname() -> String {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    from_kernel
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
