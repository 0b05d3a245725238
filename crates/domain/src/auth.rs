//! Sessions, refresh tokens and access-token claims.

use crate::{Role, SessionId, Timestamp, UserId};
use serde::{Deserialize, Serialize};

/// Audience of every access token.
pub const TOKEN_AUDIENCE: &str = "nexplane";
/// `typ` claim of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "access";
/// Access-token lifetime in seconds (api.md §0: one hour).
pub const ACCESS_TOKEN_TTL_SECS: i64 = 3600;

/// The claims of an RS256 access token (api.md §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessClaims {
    /// Issuer.
    pub iss: String,
    /// Audience (`nexplane`).
    pub aud: String,
    /// User id.
    pub sub: String,
    /// Session id.
    pub sid: String,
    /// Role at issue time (the current role is re-read on every request).
    pub role: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
    /// Always `access`.
    pub typ: String,
}

/// A login session: every token issued from one login belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Id.
    pub id: SessionId,
    /// Owner.
    pub user_id: UserId,
    /// Login time.
    pub created_at: Timestamp,
    /// Absolute end of the session: no refresh after it.
    pub expires_at: Timestamp,
    /// Set by logout or refresh-token reuse.
    pub revoked_at: Option<Timestamp>,
}

impl Session {
    /// Whether tokens of this session may be used at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// A refresh token as stored: only its SHA-256 hash is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshTokenRecord {
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    /// Session it belongs to.
    pub session_id: SessionId,
    /// Issued.
    pub created_at: Timestamp,
    /// Expires (never after the session).
    pub expires_at: Timestamp,
    /// When it was spent; a second use revokes the session.
    pub used_at: Option<Timestamp>,
}

/// Who is making a request, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User id.
    pub user_id: UserId,
    /// Email (the audit `actor`).
    pub email: String,
    /// Current role.
    pub role: Role,
    /// Session.
    pub session_id: SessionId,
}

/// The stored form of a refresh token: lowercase hex SHA-256 of the token text.
/// (Refresh tokens carry ≥ 256 random bits, so a fast hash is enough.)
pub fn refresh_token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}
