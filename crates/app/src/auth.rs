//! Login, refresh, logout and per-request authentication (api.md §2.1).

use crate::{Actor, App, AppError, RequestCtx};
use nexplane_domain::auth::{refresh_token_hash, ACCESS_TOKEN_TYPE, TOKEN_AUDIENCE};
use nexplane_domain::{
    AccessClaims, PasswordHash, Principal, RefreshTokenRecord, SecretString, Session, SessionId,
    Timestamp, User, UserId,
};
use nexplane_ports::{read, transaction, Repo, TokenError};
use std::collections::HashMap;
use std::sync::Mutex;

/// A freshly issued token pair (login and refresh answer with it).
#[derive(Debug, Clone)]
pub struct TokenPair {
    /// The RS256 access token.
    pub access_token: SecretString,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// The single-use refresh token.
    pub refresh_token: SecretString,
    /// Seconds until the refresh token (and the session) expires.
    pub refresh_expires_in: i64,
}

/// The message of every refused login, whatever the reason (no user enumeration).
pub const LOGIN_REFUSED: &str = "invalid email or password";

/// Verified access tokens, so a request does not pay an RSA verification each time.
/// Only the signature check is cached: session and user state are read on every request.
#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    map: Mutex<HashMap<String, AccessClaims>>,
}

impl TokenCache {
    /// A cache holding at most `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, token: &str, now: Timestamp) -> Option<AccessClaims> {
        let map = self.map.lock().ok()?;
        map.get(token).filter(|c| now.secs() < c.exp).cloned()
    }

    fn put(&self, token: &str, claims: &AccessClaims, now: Timestamp) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.capacity {
                map.retain(|_, c| now.secs() < c.exp);
                if map.len() >= self.capacity {
                    map.clear();
                }
            }
            map.insert(token.to_owned(), claims.clone());
        }
    }
}

fn locked(until: Timestamp, now: Timestamp) -> AppError {
    let retry = (until.millis() - now.millis() + 999) / 1000;
    AppError::TooManyRequests {
        retry_after_secs: u64::try_from(retry.max(1)).unwrap_or(1),
        detail: "too many failed logins for this account; try again later".into(),
    }
}

/// Failed-login lock state of emails that have no account (bounded, in memory).
#[derive(Debug)]
pub struct UnknownLogins {
    capacity: usize,
    map: Mutex<HashMap<String, nexplane_domain::LockState>>,
}

impl UnknownLogins {
    /// Tracks at most `capacity` emails.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, email: &str, now: Timestamp) -> Result<(), Timestamp> {
        match self.map.lock() {
            Ok(m) => m.get(email).map_or(Ok(()), |s| s.check(now)),
            Err(_) => Ok(()),
        }
    }

    fn fail(&self, email: &str, now: Timestamp) {
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= self.capacity && !m.contains_key(email) {
                m.retain(|_, s| s.check(now).is_err());
                if m.len() >= self.capacity {
                    m.clear();
                }
            }
            let next = m.get(email).copied().unwrap_or_default().after_failure(now);
            m.insert(email.to_owned(), next);
        }
    }
}

enum RefreshOutcome {
    Issued(Box<(Session, User, SecretString)>),
    Reused,
    Refused,
}

impl App {
    /// `POST /auth/login`.
    pub fn login(
        &self,
        email: &str,
        password: &SecretString,
        ctx: &RequestCtx,
    ) -> Result<TokenPair, AppError> {
        let now = self.now();
        let email = email.trim().to_lowercase();
        let user = transaction(self.store(), |r: &mut dyn Repo| {
            r.get_user_by_email(&email).map_err(AppError::from)
        })?;
        let Some(user) = user else {
            // An unknown email gets the same lock ladder as a real account, kept in memory,
            // so a 429 does not reveal which emails exist.
            if let Err(until) = self.unknown_logins.check(&email, now) {
                return Err(locked(until, now));
            }
            // Same work as for a real account, so timing does not tell who exists either.
            let _ = self.deps.hasher.verify(&self.dummy_hash(), password);
            self.unknown_logins.fail(&email, now);
            transaction(self.store(), |r: &mut dyn Repo| {
                self.audit(
                    r,
                    ctx,
                    Actor::Named { email: &email, id: None },
                    "auth.login_failed",
                    "user",
                    None,
                    serde_json::json!({"email": email, "reason": "unknown_email", "client_ip": ctx.client_ip}),
                )
                .map_err(AppError::from)
            })?;
            return Err(AppError::Unauthorized(LOGIN_REFUSED.into()));
        };
        if let Err(until) = user.lock.check(now) {
            return Err(locked(until, now));
        }
        let ok = self.deps.hasher.verify(&user.password_hash, password)?;
        if !ok || user.is_disabled() {
            let reason = if ok { "disabled" } else { "wrong_password" };
            transaction(self.store(), |r: &mut dyn Repo| {
                if let Some(mut u) = r.get_user(&user.id)? {
                    if !ok {
                        u.lock = u.lock.after_failure(now);
                        r.update_user(&u)?;
                    }
                }
                self.audit(
                    r,
                    ctx,
                    Actor::Named { email: &user.email, id: Some(user.id.as_str()) },
                    "auth.login_failed",
                    "user",
                    Some(user.id.as_str()),
                    serde_json::json!({"email": user.email, "reason": reason, "client_ip": ctx.client_ip}),
                )
                .map_err(AppError::from)
            })?;
            return Err(AppError::Unauthorized(LOGIN_REFUSED.into()));
        }
        let session = Session {
            id: SessionId::new(now, self.deps.random.u128()),
            user_id: user.id.clone(),
            created_at: now,
            expires_at: now.plus_secs(self.settings.session_ttl_secs),
            revoked_at: None,
        };
        let refresh = self.deps.random.token(256);
        transaction(self.store(), |r: &mut dyn Repo| {
            if let Some(mut u) = r.get_user(&user.id)? {
                if u.lock != u.lock.after_success() {
                    u.lock = u.lock.after_success();
                    r.update_user(&u)?;
                }
            }
            r.insert_session(&session)?;
            r.insert_refresh_token(&refresh_record(&refresh, &session, now))?;
            let p = principal(&user, &session);
            self.audit(
                r,
                ctx,
                Actor::User(&p),
                "auth.login",
                "session",
                Some(session.id.as_str()),
                serde_json::json!({"client_ip": ctx.client_ip}),
            )
            .map_err(AppError::from)
        })?;
        self.issue(&user, &session, refresh, now)
    }

    /// `POST /auth/refresh` with a refresh token: rotates it. Reuse of a spent token revokes
    /// the whole session.
    pub fn refresh_with_token(
        &self,
        refresh_token: &SecretString,
        ctx: &RequestCtx,
    ) -> Result<TokenPair, AppError> {
        let now = self.now();
        let hash = refresh_token_hash(refresh_token.expose());
        let new_refresh = self.deps.random.token(256);
        let outcome = transaction(self.store(), |r: &mut dyn Repo| {
            let Some(rec) = r.get_refresh_token(&hash)? else {
                return Ok(RefreshOutcome::Refused);
            };
            let Some((session, user)) = r.get_session_with_user(&rec.session_id)? else {
                return Ok(RefreshOutcome::Refused);
            };
            if rec.used_at.is_some() || !r.spend_refresh_token(&hash, now)? {
                if session.revoked_at.is_none() {
                    r.revoke_session(&session.id, now)?;
                    let p = principal(&user, &session);
                    self.audit(
                        r,
                        ctx,
                        Actor::User(&p),
                        "auth.refresh_reuse_detected",
                        "session",
                        Some(session.id.as_str()),
                        serde_json::json!({"client_ip": ctx.client_ip, "session_revoked": true}),
                    )?;
                }
                return Ok(RefreshOutcome::Reused);
            }
            if !session.is_active(now) || now >= rec.expires_at || user.is_disabled() {
                return Ok(RefreshOutcome::Refused);
            }
            r.insert_refresh_token(&refresh_record(&new_refresh, &session, now))?;
            Ok::<_, AppError>(RefreshOutcome::Issued(Box::new((
                session,
                user,
                new_refresh.clone(),
            ))))
        })?;
        match outcome {
            RefreshOutcome::Issued(b) => {
                let (session, user, refresh) = *b;
                self.issue(&user, &session, refresh, now)
            }
            RefreshOutcome::Reused => Err(AppError::Unauthorized(
                "refresh token already used; the session has been revoked".into(),
            )),
            RefreshOutcome::Refused => Err(AppError::Unauthorized(
                "refresh token is invalid or expired".into(),
            )),
        }
    }

    /// `POST /auth/refresh` with no body and a still-valid access token.
    pub fn refresh_with_access(&self, p: &Principal) -> Result<TokenPair, AppError> {
        let now = self.now();
        let new_refresh = self.deps.random.token(256);
        let (session, user) = transaction(self.store(), |r: &mut dyn Repo| {
            let Some((session, user)) = r.get_session_with_user(&p.session_id)? else {
                return Err(AppError::Unauthorized("session ended".into()));
            };
            if !session.is_active(now) || user.is_disabled() {
                return Err(AppError::Unauthorized("session ended".into()));
            }
            r.insert_refresh_token(&refresh_record(&new_refresh, &session, now))?;
            Ok((session, user))
        })?;
        self.issue(&user, &session, new_refresh, now)
    }

    /// `POST /auth/logout`: revokes the session; its tokens stop working at once.
    pub fn logout(&self, p: &Principal, ctx: &RequestCtx) -> Result<(), AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            r.revoke_session(&p.session_id, now)?;
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "auth.logout",
                "session",
                Some(p.session_id.as_str()),
                serde_json::json!({}),
            )
            .map_err(AppError::from)
        })
    }

    /// Authenticates a bearer token: signature (cached), then the session and the user as
    /// they are now (logout and disabling act at once; the role is the current one).
    pub fn authenticate(&self, token: &str) -> Result<Principal, AppError> {
        self.authenticate_user(token).map(|(p, _)| p)
    }

    /// Like [`App::authenticate`], also returning the user as just read (so a request that
    /// needs the current user does not read it twice).
    pub fn authenticate_user(&self, token: &str) -> Result<(Principal, User), AppError> {
        let now = self.now();
        let claims = match self.tokens.get(token, now) {
            Some(c) => c,
            None => {
                let c = self.deps.signer.verify(token, now).map_err(|e| match e {
                    TokenError::Expired => AppError::Unauthorized("token expired".into()),
                    TokenError::Invalid(_) => AppError::Unauthorized("invalid token".into()),
                })?;
                self.tokens.put(token, &c, now);
                c
            }
        };
        let bad = || AppError::Unauthorized("invalid token".into());
        let sid = SessionId::parse(&claims.sid).map_err(|_| bad())?;
        let uid = UserId::parse(&claims.sub).map_err(|_| bad())?;
        let found = read(self.store(), |r: &mut dyn Repo| {
            r.get_session_with_user(&sid).map_err(AppError::from)
        })?;
        let Some((session, user)) = found else {
            return Err(bad());
        };
        if user.id != uid {
            return Err(bad());
        }
        if !session.is_active(now) {
            return Err(AppError::Unauthorized("session ended".into()));
        }
        if user.is_disabled() {
            return Err(AppError::Unauthorized("account disabled".into()));
        }
        Ok((principal(&user, &session), user))
    }

    fn issue(
        &self,
        user: &User,
        session: &Session,
        refresh: SecretString,
        now: Timestamp,
    ) -> Result<TokenPair, AppError> {
        let exp = now
            .plus_secs(self.settings.access_ttl_secs)
            .min(session.expires_at);
        let claims = AccessClaims {
            iss: self.deps.signer.issuer().to_owned(),
            aud: TOKEN_AUDIENCE.to_owned(),
            sub: user.id.to_string(),
            sid: session.id.to_string(),
            role: user.role.as_str().to_owned(),
            iat: now.secs(),
            exp: exp.secs(),
            jti: format!("{:032x}", self.deps.random.u128()),
            typ: ACCESS_TOKEN_TYPE.to_owned(),
        };
        let access = self.deps.signer.sign(&claims)?;
        Ok(TokenPair {
            access_token: SecretString::new(access),
            expires_in: exp.secs() - now.secs(),
            refresh_token: refresh,
            refresh_expires_in: session.expires_at.secs() - now.secs(),
        })
    }

    fn dummy_hash(&self) -> PasswordHash {
        static DUMMY: std::sync::OnceLock<Option<PasswordHash>> = std::sync::OnceLock::new();
        DUMMY
            .get_or_init(|| {
                self.deps
                    .hasher
                    .hash(&SecretString::new("not-a-real-password".into()))
                    .ok()
            })
            .clone()
            .unwrap_or_else(|| PasswordHash::new(String::new()))
    }
}

/// The stored form of a new refresh token of `session` (it lives as long as the session).
fn refresh_record(token: &SecretString, session: &Session, now: Timestamp) -> RefreshTokenRecord {
    RefreshTokenRecord {
        token_hash: refresh_token_hash(token.expose()),
        session_id: session.id.clone(),
        created_at: now,
        expires_at: session.expires_at,
        used_at: None,
    }
}

fn principal(user: &User, session: &Session) -> Principal {
    Principal {
        user_id: user.id.clone(),
        email: user.email.clone(),
        role: user.role,
        session_id: session.id.clone(),
    }
}
