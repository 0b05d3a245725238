//! Users, roles, what each role may do, and the login soft-lock ladder.

use crate::{PasswordHash, SecretString, Timestamp, UserId};
use serde::{Deserialize, Serialize};

/// A role (api.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read everything; create, edit, submit, cancel, execute and roll back change requests;
    /// test and discover connectors.
    Operator,
    /// Read everything; approve and reject change requests.
    Approver,
    /// Read everything.
    Viewer,
}

impl Role {
    /// All roles.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Approver, Role::Viewer];

    /// The role's name as used in the API and in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Viewer => "viewer",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this role may perform `p` at all (ownership rules, such as "requester or
    /// admin", are checked where the resource is known).
    pub fn allows(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Admin => true,
            Role::Operator => matches!(
                p,
                Read | ChangeRequestWrite | ChangeRequestExecute | ConnectorOperate
            ),
            Role::Approver => matches!(p, Read | ChangeRequestDecide),
            Role::Viewer => matches!(p, Read),
        }
    }
}

/// Something a role may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read any resource, including the audit log.
    Read,
    /// Manage users.
    UserAdmin,
    /// Create, update and delete connectors.
    ConnectorAdmin,
    /// Test connectors and start discoveries.
    ConnectorOperate,
    /// Create, edit, submit and cancel change requests.
    ChangeRequestWrite,
    /// Approve and reject change requests.
    ChangeRequestDecide,
    /// Execute and roll back change requests.
    ChangeRequestExecute,
    /// Manage agents and enrollment tokens.
    AgentAdmin,
    /// Verify the audit chain.
    AuditVerify,
}

/// A user account. Users are never hard-deleted, so the audit trail keeps its actors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Id.
    pub id: UserId,
    /// Login email, stored lowercase, unique.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// argon2id hash of the password.
    pub password_hash: PasswordHash,
    /// When the account was disabled; `None` while active.
    pub disabled_at: Option<Timestamp>,
    /// Soft-lock state from failed logins.
    pub lock: LockState,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

impl User {
    /// Whether the account is disabled.
    pub fn is_disabled(&self) -> bool {
        self.disabled_at.is_some()
    }
}

/// Why a piece of user input is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Field path, e.g. `password`.
    pub field: String,
    /// Human-readable reason.
    pub message: String,
}

impl FieldError {
    /// A new field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Minimum password length in characters.
pub const PASSWORD_MIN_CHARS: usize = 12;
/// Maximum password length in characters.
pub const PASSWORD_MAX_CHARS: usize = 256;

/// Checks the password policy: 12–256 characters.
pub fn validate_password(field: &str, pw: &SecretString) -> Result<(), FieldError> {
    let n = pw.char_len();
    if !(PASSWORD_MIN_CHARS..=PASSWORD_MAX_CHARS).contains(&n) {
        return Err(FieldError::new(
            field,
            format!("must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters"),
        ));
    }
    Ok(())
}

/// Normalises and checks an email address (lowercased; one `@`, non-empty parts, a dot in the
/// domain, no spaces, at most 254 characters).
pub fn normalize_email(field: &str, email: &str) -> Result<String, FieldError> {
    let e = email.trim().to_lowercase();
    let bad = || FieldError::new(field, "must be an email address");
    if e.len() > 254 || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = e.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
    {
        return Err(bad());
    }
    Ok(e)
}

/// Checks a display name: 1–200 characters after trimming.
pub fn normalize_name(field: &str, name: &str) -> Result<String, FieldError> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 200 || n.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must be 1 to 200 printable characters",
        ));
    }
    Ok(n.to_owned())
}

/// Failed-login state of an account (the soft-lock ladder of api.md §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockState {
    /// Consecutive failed logins since the last success or daily reset.
    pub failed_logins: u32,
    /// No login is attempted before this time.
    pub locked_until: Option<Timestamp>,
}

/// After this many consecutive failures the account stays locked until the next daily reset.
pub const LOCK_DAILY_THRESHOLD: u32 = 100;

impl LockState {
    /// `Err(until)` while the account is locked at `now`.
    pub fn check(&self, now: Timestamp) -> Result<(), Timestamp> {
        match self.locked_until {
            Some(until) if now < until => Err(until),
            _ => Ok(()),
        }
    }

    /// The state after a failed login at `now`: 1st failure locks 1 s, 2nd 3 s, 3rd 5 s,
    /// 4th and later 10 s; the 100th locks until the next midnight UTC, when the count
    /// starts again.
    ///
    /// ```
    /// use nexplane_domain::{LockState, Timestamp};
    /// let t = Timestamp::from_secs(1_000);
    /// let s = LockState::default().after_failure(t);
    /// assert_eq!(s.check(t.plus_millis(999)), Err(t.plus_secs(1)));
    /// assert_eq!(s.check(t.plus_secs(1)), Ok(()));
    /// ```
    pub fn after_failure(&self, now: Timestamp) -> LockState {
        // A count left over from before a daily reset starts again.
        let prior = match self.locked_until {
            Some(until) if self.failed_logins >= LOCK_DAILY_THRESHOLD && now >= until => 0,
            _ => self.failed_logins,
        };
        let n = prior.saturating_add(1);
        let until = if n >= LOCK_DAILY_THRESHOLD {
            now.next_utc_midnight()
        } else {
            now.plus_secs(match n {
                1 => 1,
                2 => 3,
                3 => 5,
                _ => 10,
            })
        };
        LockState {
            failed_logins: n,
            locked_until: Some(until),
        }
    }

    /// The state after a successful login.
    pub fn after_success(&self) -> LockState {
        LockState::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn ladder_grows_then_locks_for_the_day() {
        let mut s = LockState::default();
        let mut t = Timestamp::parse_rfc3339("2026-12-04T10:00:00Z").unwrap();
        let expected = [1, 3, 5, 10, 10];
        for secs in expected {
            s = s.after_failure(t);
            assert_eq!(s.check(t), Err(t.plus_secs(secs)));
            t = t.plus_secs(secs);
            assert_eq!(s.check(t), Ok(()));
        }
        for _ in expected.len()..(LOCK_DAILY_THRESHOLD as usize - 1) {
            s = s.after_failure(t);
            t = s.locked_until.unwrap();
        }
        s = s.after_failure(t);
        assert_eq!(s.failed_logins, LOCK_DAILY_THRESHOLD);
        let midnight = t.next_utc_midnight();
        assert_eq!(s.check(t.plus_secs(3600)), Err(midnight));
        // After the reset the ladder starts again at 1 s.
        let s2 = s.after_failure(midnight);
        assert_eq!(s2.failed_logins, 1);
        assert_eq!(s2.check(midnight), Err(midnight.plus_secs(1)));
        assert_eq!(s.after_success(), LockState::default());
    }

    #[test]
    fn role_permissions() {
        assert!(Role::Admin.allows(Permission::UserAdmin));
        assert!(!Role::Operator.allows(Permission::UserAdmin));
        assert!(Role::Operator.allows(Permission::ChangeRequestExecute));
        assert!(!Role::Operator.allows(Permission::ChangeRequestDecide));
        assert!(Role::Approver.allows(Permission::ChangeRequestDecide));
        assert!(!Role::Viewer.allows(Permission::ChangeRequestWrite));
        assert!(Role::Viewer.allows(Permission::Read));
        assert!(!Role::Viewer.allows(Permission::AuditVerify));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn input_checks() {
        assert!(validate_password("p", &SecretString::new("short".into())).is_err());
        assert!(validate_password("p", &SecretString::new("x".repeat(12))).is_ok());
        assert!(validate_password("p", &SecretString::new("x".repeat(257))).is_err());
        assert_eq!(
            normalize_email("e", " A@Example.COM ").unwrap(),
            "a@example.com"
        );
        for bad in ["a", "a@b", "@b.c", "a@.c", "a b@c.d", "a@b@c.d"] {
            assert!(normalize_email("e", bad).is_err(), "{bad}");
        }
        assert!(normalize_name("n", "  ").is_err());
    }
}
