//! Host agents (api.md §7): enrollment tokens, agents and the commands sent to them.
//!
//! The rules here are pure: whether an enrollment token can still be used at `now`, an
//! agent's `status` at `now`, whether a signed request's timestamp is within the allowed
//! skew, and how a command moves from `queued` to a result. The store consumes a token's use
//! with a conditional update, so racing registrations never exceed `max_uses`.

use crate::{
    AgentId, ChangeRequestId, CommandId, EnrollmentTokenId, JobId, SealedValue, Timestamp, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An agent is `online` when its last heartbeat is at most this old (api.md §7.1).
pub const ONLINE_WITHIN_SECS: i64 = 90;
/// Allowed clock skew of a signed agent request, in seconds (api.md §7.2).
pub const MAX_SKEW_SECS: i64 = 300;
/// Longest long-poll wait, in seconds (api.md §7.2).
pub const MAX_WAIT_SECS: u64 = 30;
/// Default lifetime of an enrollment token, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 1800;
/// Longest lifetime of an enrollment token, in seconds (7 days).
pub const MAX_TOKEN_TTL_SECS: i64 = 604_800;
/// Entropy of an enrollment token and of an agent secret, in bits.
pub const TOKEN_BITS: usize = 256;
/// The `resource_type` of agents in the audit log.
pub const RESOURCE_TYPE: &str = "agent";

/// An enrollment token (the token itself is shown once and stored only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    /// Id.
    pub id: EnrollmentTokenId,
    /// Optional label.
    pub name: Option<String>,
    /// SHA-256 hex of the token.
    pub token_hash: String,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// How many registrations it allows.
    pub max_uses: u32,
    /// How many it has served.
    pub uses: u32,
    /// The admin who created it.
    pub created_by: UserId,
    /// Created.
    pub created_at: Timestamp,
    /// Set when revoked.
    pub revoked_at: Option<Timestamp>,
}

impl EnrollmentToken {
    /// Whether a registration may use it at `now`.
    pub fn is_usable(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && now < self.expires_at && self.uses < self.max_uses
    }
}

/// An agent's status (api.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Heartbeat within the last 90 s.
    Online,
    /// No recent heartbeat.
    Offline,
    /// Revoked: its requests are refused.
    Revoked,
}

impl AgentStatus {
    /// `online`, `offline` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Online => "online",
            AgentStatus::Offline => "offline",
            AgentStatus::Revoked => "revoked",
        }
    }
}

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Id.
    pub id: AgentId,
    /// Name (the enrollment token's name, or the hostname).
    pub name: String,
    /// Host name it reported.
    pub hostname: String,
    /// Operating system it reported.
    pub os: String,
    /// CPU architecture it reported.
    pub arch: String,
    /// Agent version it reported (updated by heartbeats).
    pub version: String,
    /// Labels (`{key: value}`).
    pub labels: Value,
    /// The agent secret, sealed under the master key (the server must verify HMACs).
    pub sealed_secret: SealedValue,
    /// The token it registered with.
    pub enrollment_token_id: EnrollmentTokenId,
    /// Registered.
    pub registered_at: Timestamp,
    /// Last heartbeat.
    pub last_heartbeat_at: Option<Timestamp>,
    /// Set when revoked.
    pub revoked_at: Option<Timestamp>,
}

impl Agent {
    /// Its status at `now`.
    pub fn status(&self, now: Timestamp) -> AgentStatus {
        if self.revoked_at.is_some() {
            return AgentStatus::Revoked;
        }
        match self.last_heartbeat_at {
            Some(t) if now.millis() - t.millis() <= ONLINE_WITHIN_SECS * 1000 => {
                AgentStatus::Online
            }
            _ => AgentStatus::Offline,
        }
    }
}

/// Whether a signed request's timestamp (Unix seconds) is within the allowed skew of `now`.
pub fn timestamp_acceptable(timestamp_secs: i64, now: Timestamp) -> bool {
    (now.millis() / 1000 - timestamp_secs).abs() <= MAX_SKEW_SECS
}

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Waiting for the agent to fetch it.
    Queued,
    /// Handed to the agent; waiting for its result.
    Dispatched,
    /// The agent reported success.
    Succeeded,
    /// The agent reported failure (or refused it).
    Failed,
    /// Cancelled (agent revoked, or no answer within the timeout): a late result is refused.
    Cancelled,
}

impl CommandStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Dispatched => "dispatched",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<CommandStatus> {
        [
            CommandStatus::Queued,
            CommandStatus::Dispatched,
            CommandStatus::Succeeded,
            CommandStatus::Failed,
            CommandStatus::Cancelled,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }

    /// Whether the command has ended (a result, or cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandStatus::Succeeded | CommandStatus::Failed | CommandStatus::Cancelled
        )
    }
}

/// A command for an agent, sent by a change request's execution or rollback job.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentCommand {
    /// Id.
    pub id: CommandId,
    /// The agent.
    pub agent_id: AgentId,
    /// The change request it serves.
    pub change_request_id: Option<ChangeRequestId>,
    /// The job that sent it.
    pub job_id: Option<JobId>,
    /// The journal step it carries out (with the job id, makes dispatching idempotent).
    pub step: String,
    /// Command type, e.g. `write_file`.
    pub command_type: String,
    /// Parameters.
    pub params: Value,
    /// Status.
    pub status: CommandStatus,
    /// What the agent reported.
    pub output: Option<Value>,
    /// The agent's snapshot of the previous state, sealed (it can hold file content).
    pub sealed_snapshot: Option<SealedValue>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Created.
    pub created_at: Timestamp,
    /// Fetched by the agent.
    pub dispatched_at: Option<Timestamp>,
    /// Ended.
    pub finished_at: Option<Timestamp>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_secs(1_800_000_000 + s)
    }

    #[test]
    fn tokens_expire_run_out_and_can_be_revoked() {
        let tok = EnrollmentToken {
            id: EnrollmentTokenId::new(t(0), 1),
            name: None,
            token_hash: "h".into(),
            expires_at: t(1800),
            max_uses: 2,
            uses: 1,
            created_by: UserId::new(t(0), 2),
            created_at: t(0),
            revoked_at: None,
        };
        assert!(tok.is_usable(t(10)));
        assert!(!tok.is_usable(t(1800)));
        assert!(!EnrollmentToken {
            uses: 2,
            ..tok.clone()
        }
        .is_usable(t(10)));
        assert!(!EnrollmentToken {
            revoked_at: Some(t(5)),
            ..tok
        }
        .is_usable(t(10)));
    }

    #[test]
    fn skew_is_bounded_both_ways() {
        let now = t(0);
        let secs = now.millis() / 1000;
        assert!(timestamp_acceptable(secs, now));
        assert!(timestamp_acceptable(secs - 300, now));
        assert!(timestamp_acceptable(secs + 300, now));
        assert!(!timestamp_acceptable(secs - 301, now));
        assert!(!timestamp_acceptable(secs + 301, now));
    }

    #[test]
    fn status_is_online_within_90_seconds_of_a_heartbeat_and_revoked_wins() {
        let a = Agent {
            id: AgentId::new(t(0), 1),
            name: "web".into(),
            hostname: "web-1".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            version: "0.1.0".into(),
            labels: serde_json::json!({}),
            sealed_secret: SealedValue::new("v1.k.n.c".into()),
            enrollment_token_id: EnrollmentTokenId::new(t(0), 2),
            registered_at: t(0),
            last_heartbeat_at: Some(t(0)),
            revoked_at: None,
        };
        assert_eq!(a.status(t(90)), AgentStatus::Online);
        assert_eq!(a.status(t(91)), AgentStatus::Offline);
        let never = Agent {
            last_heartbeat_at: None,
            ..a.clone()
        };
        assert_eq!(never.status(t(1)), AgentStatus::Offline);
        let revoked = Agent {
            revoked_at: Some(t(1)),
            ..a
        };
        assert_eq!(revoked.status(t(1)), AgentStatus::Revoked);
    }

    #[test]
    fn command_status_names_round_trip() {
        for s in ["queued", "dispatched", "succeeded", "failed", "cancelled"] {
            assert_eq!(CommandStatus::parse(s).unwrap().as_str(), s);
        }
        assert!(CommandStatus::parse("done").is_none());
    }
}
