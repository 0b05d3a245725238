//! User administration (api.md §2.3) and the bootstrap admin.

use crate::{require, Actor, App, AppError, RequestCtx};
use nexplane_domain::user::{normalize_email, normalize_name, validate_password};
use nexplane_domain::{LockState, Permission, Principal, Role, SecretString, User, UserId};
use nexplane_ports::{read, transaction, Page, Repo};

/// `POST /users` input.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Role name.
    pub role: String,
    /// Initial password.
    pub password: SecretString,
}

/// `PUT /users/{id}` input: each present field replaces the stored one.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    /// New display name.
    pub name: Option<String>,
    /// New role name.
    pub role: Option<String>,
    /// Disable (true) or re-enable (false).
    pub disabled: Option<bool>,
}

fn parse_role(field: &str, s: &str) -> Result<Role, AppError> {
    Role::parse(s)
        .ok_or_else(|| AppError::field(field, "must be one of admin, operator, approver, viewer"))
}

fn not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no user {id}"))
}

impl App {
    /// `GET /users`.
    pub fn list_users(&self, p: &Principal, page: &Page) -> Result<Vec<User>, AppError> {
        require(p, Permission::Read)?;
        read(self.store(), |r: &mut dyn Repo| {
            r.list_users(page).map_err(AppError::from)
        })
    }

    /// `GET /users/{id}` (any role; an unknown or malformed id is a 404).
    pub fn get_user(&self, p: &Principal, id: &str) -> Result<User, AppError> {
        require(p, Permission::Read)?;
        let uid = UserId::parse(id).map_err(|_| not_found(id))?;
        read(self.store(), |r: &mut dyn Repo| {
            r.get_user(&uid).map_err(AppError::from)
        })?
        .ok_or_else(|| not_found(id))
    }

    /// The current user (`GET /auth/me`).
    pub fn me(&self, p: &Principal) -> Result<User, AppError> {
        read(self.store(), |r: &mut dyn Repo| {
            r.get_user(&p.user_id).map_err(AppError::from)
        })?
        .ok_or_else(|| AppError::Unauthorized("account not found".into()))
    }

    /// `POST /users` (admin).
    pub fn create_user(
        &self,
        p: &Principal,
        input: NewUser,
        ctx: &RequestCtx,
    ) -> Result<User, AppError> {
        require(p, Permission::UserAdmin)?;
        let user = self.build_user(input)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            insert_unique(r, &user)?;
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "user.created",
                "user",
                Some(user.id.as_str()),
                serde_json::json!({"email": user.email, "name": user.name, "role": user.role.as_str()}),
            )?;
            Ok(user.clone())
        })
    }

    fn build_user(&self, input: NewUser) -> Result<User, AppError> {
        let mut errors = Vec::new();
        let email = normalize_email("email", &input.email)
            .map_err(|e| errors.push(e))
            .ok();
        let name = normalize_name("name", &input.name)
            .map_err(|e| errors.push(e))
            .ok();
        let role = Role::parse(&input.role);
        if role.is_none() {
            errors.push(nexplane_domain::FieldError::new(
                "role",
                "must be one of admin, operator, approver, viewer",
            ));
        }
        if let Err(e) = validate_password("password", &input.password) {
            errors.push(e);
        }
        let (Some(email), Some(name), Some(role), true) = (email, name, role, errors.is_empty())
        else {
            return Err(AppError::Validation(errors));
        };
        let password_hash = self.deps.hasher.hash(&input.password)?;
        let now = self.now();
        Ok(User {
            id: UserId::new(now, self.deps.random.u128()),
            email,
            name,
            role,
            password_hash,
            disabled_at: None,
            lock: LockState::default(),
            created_at: now,
            updated_at: now,
        })
    }

    /// `PUT /users/{id}` (admin).
    pub fn update_user(
        &self,
        p: &Principal,
        id: &str,
        patch: UserPatch,
        ctx: &RequestCtx,
    ) -> Result<User, AppError> {
        require(p, Permission::UserAdmin)?;
        let uid = UserId::parse(id).map_err(|_| not_found(id))?;
        let mut errors = Vec::new();
        let name = match &patch.name {
            Some(n) => normalize_name("name", n).map_err(|e| errors.push(e)).ok(),
            None => None,
        };
        let role = match &patch.role {
            Some(r) => match parse_role("role", r) {
                Ok(r) => Some(r),
                Err(AppError::Validation(mut e)) => {
                    errors.append(&mut e);
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        if !errors.is_empty() {
            return Err(AppError::Validation(errors));
        }
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut u = r.get_user(&uid)?.ok_or_else(|| not_found(id))?;
            let mut changed = serde_json::Map::new();
            if let Some(n) = &name {
                if *n != u.name {
                    changed.insert("name".into(), n.clone().into());
                    u.name = n.clone();
                }
            }
            if let Some(role) = role {
                if role != u.role {
                    changed.insert("role".into(), role.as_str().into());
                    u.role = role;
                }
            }
            let mut disabled_now = false;
            if let Some(d) = patch.disabled {
                if d != u.is_disabled() {
                    if d && u.id == p.user_id {
                        return Err(AppError::Conflict {
                            code: "cannot_disable_self",
                            detail: "an administrator cannot disable their own account".into(),
                        });
                    }
                    changed.insert("disabled".into(), d.into());
                    u.disabled_at = if d { Some(now) } else { None };
                    disabled_now = d;
                }
            }
            if changed.is_empty() {
                return Ok(u);
            }
            u.updated_at = now;
            r.update_user(&u)?;
            self.audit(
                r,
                ctx,
                Actor::User(p),
                if disabled_now {
                    "user.disabled"
                } else {
                    "user.updated"
                },
                "user",
                Some(u.id.as_str()),
                serde_json::Value::Object(changed),
            )?;
            Ok(u)
        })
    }

    /// `DELETE /users/{id}` (admin): disables; users are never hard-deleted.
    pub fn disable_user(&self, p: &Principal, id: &str, ctx: &RequestCtx) -> Result<(), AppError> {
        self.update_user(
            p,
            id,
            UserPatch {
                disabled: Some(true),
                ..UserPatch::default()
            },
            ctx,
        )
        .map(|_| ())
    }

    /// `POST /users/{id}/password`: one's own password needs the current one; an admin may
    /// reset anyone's.
    pub fn change_password(
        &self,
        p: &Principal,
        id: &str,
        current: Option<&SecretString>,
        new_password: &SecretString,
        ctx: &RequestCtx,
    ) -> Result<(), AppError> {
        let uid = UserId::parse(id).map_err(|_| not_found(id))?;
        let own = uid == p.user_id;
        if !own {
            require(p, Permission::UserAdmin)?;
        }
        validate_password("new_password", new_password)?;
        let user = transaction(self.store(), |r: &mut dyn Repo| {
            r.get_user(&uid).map_err(AppError::from)
        })?
        .ok_or_else(|| not_found(id))?;
        if own {
            let Some(cur) = current else {
                return Err(AppError::field(
                    "current_password",
                    "is required to change your own password",
                ));
            };
            if !self.deps.hasher.verify(&user.password_hash, cur)? {
                return Err(AppError::field("current_password", "is not correct"));
            }
        }
        let hash = self.deps.hasher.hash(new_password)?;
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut u = r.get_user(&uid)?.ok_or_else(|| not_found(id))?;
            u.password_hash = hash.clone();
            u.lock = LockState::default();
            u.updated_at = now;
            r.update_user(&u)?;
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "user.password_changed",
                "user",
                Some(u.id.as_str()),
                serde_json::json!({"by_admin": !own}),
            )?;
            Ok(())
        })
    }

    /// On first start with no users, creates the bootstrap admin. Returns the created user,
    /// or `None` when users already exist.
    pub fn bootstrap_admin(
        &self,
        email: &str,
        password: &SecretString,
    ) -> Result<Option<User>, AppError> {
        let count = transaction(self.store(), |r: &mut dyn Repo| {
            r.count_users().map_err(AppError::from)
        })?;
        if count > 0 {
            return Ok(None);
        }
        let user = self.build_user(NewUser {
            email: email.to_owned(),
            name: "Administrator".to_owned(),
            role: Role::Admin.as_str().to_owned(),
            password: password.clone(),
        })?;
        transaction(self.store(), |r: &mut dyn Repo| {
            if r.count_users()? > 0 {
                return Ok(None);
            }
            insert_unique(r, &user)?;
            self.audit(
                r,
                &RequestCtx::default(),
                Actor::System,
                "user.created",
                "user",
                Some(user.id.as_str()),
                serde_json::json!({"email": user.email, "role": "admin", "bootstrap": true}),
            )?;
            Ok(Some(user.clone()))
        })
    }

    /// Creates a user from the command line (`nexplane user create`), audited as `system`.
    pub fn create_user_cli(&self, input: NewUser) -> Result<User, AppError> {
        let user = self.build_user(input)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            insert_unique(r, &user)?;
            self.audit(
                r,
                &RequestCtx::default(),
                Actor::System,
                "user.created",
                "user",
                Some(user.id.as_str()),
                serde_json::json!({"email": user.email, "name": user.name, "role": user.role.as_str(), "via": "cli"}),
            )?;
            Ok(user.clone())
        })
    }
}

fn insert_unique(r: &mut dyn Repo, user: &User) -> Result<(), AppError> {
    r.insert_user(user).map_err(|e| match e {
        nexplane_ports::StoreError::Conflict(_) => AppError::Conflict {
            code: "duplicate",
            detail: format!("a user with email {} already exists", user.email),
        },
        other => other.into(),
    })
}
