//! The handlers. Each one parses input, calls one use case on the blocking pool, and shapes
//! the answer; every rule lives in `nexplane-app` and `nexplane-domain`.

use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{Auth, Ctx};
use crate::respond::{check_limit, decode_cursor, paginate, Created, Paged};
use crate::state::ApiState;
use actix_web::http::StatusCode;
use nexplane_app::users::{NewUser, UserPatch};
use nexplane_app::{auth::TokenPair, AppError};
use nexplane_domain::audit::ChainCheck;
use nexplane_domain::{SecretString, Timestamp};
use nexplane_ports::{AuditFilter, Page};
use paperclip::actix::{api_v2_operation, web, NoContent};

type Data = web::Data<ApiState>;

/// Runs a blocking use case and attaches the request id to its error.
async fn run<T, F>(ctx: &Ctx, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
{
    let rid = ctx.0.request_id.clone();
    match web::block(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::from(e).with_request_id(rid)),
        Err(e) => Err(ApiError::from(e).with_request_id(rid)),
    }
}

fn tokens(t: TokenPair) -> TokenResponse {
    TokenResponse {
        access_token: t.access_token.expose().to_owned(),
        token_type: "bearer".into(),
        expires_in: t.expires_in,
        refresh_token: t.refresh_token.expose().to_owned(),
        refresh_expires_in: t.refresh_expires_in,
    }
}

/// Log in with email and password.
///
/// Answers an RS256 access token (1 hour) and a single-use refresh token. A wrong email and a
/// wrong password give the same 401. Failed logins lock the account for growing intervals,
/// and each client IP has its own login limit: both answer 429 with `Retry-After`.
#[api_v2_operation(tags(Auth))]
pub(crate) async fn login(
    state: Data,
    ctx: Ctx,
    body: web::Json<LoginRequest>,
) -> Result<web::Json<TokenResponse>, ApiError> {
    let LoginRequest { email, password } = body.into_inner();
    let password = SecretString::new(password);
    let app = state.app.clone();
    let c = ctx.0.clone();
    let t = run(&ctx, move || app.login(&email, &password, &c)).await?;
    Ok(web::Json(tokens(t)))
}

/// Get new tokens without re-entering credentials.
///
/// Either send `{"refresh_token": …}` (it rotates: each refresh token works once, and reusing
/// a spent one revokes the whole session), or send no body with a still-valid bearer access
/// token. After the session's absolute lifetime (12 h by default) or after logout → 401.
#[api_v2_operation(tags(Auth))]
pub(crate) async fn refresh(
    state: Data,
    ctx: Ctx,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> Result<web::Json<TokenResponse>, ApiError> {
    let rid = ctx.0.request_id.clone();
    if body.iter().all(u8::is_ascii_whitespace) {
        use actix_web::FromRequest;
        let auth = Auth::extract(&req).await?;
        let app = state.app.clone();
        let t = run(&ctx, move || app.refresh_with_access(&auth.0)).await?;
        return Ok(web::Json(tokens(t)));
    }
    let parsed: RefreshRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::from(crate::json_error(&e)).with_request_id(rid))?;
    let token = SecretString::new(parsed.refresh_token);
    let app = state.app.clone();
    let c = ctx.0.clone();
    let t = run(&ctx, move || app.refresh_with_token(&token, &c)).await?;
    Ok(web::Json(tokens(t)))
}

/// Log out: revokes the session; its access and refresh tokens stop working at once.
#[api_v2_operation(tags(Auth))]
pub(crate) async fn logout(state: Data, ctx: Ctx, auth: Auth) -> Result<NoContent, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    run(&ctx, move || app.logout(&auth.0, &c)).await?;
    Ok(NoContent)
}

/// The current user.
#[api_v2_operation(tags(Auth))]
pub(crate) async fn me(auth: Auth) -> Result<web::Json<UserDto>, ApiError> {
    // The extractor has just read the user, as it is now.
    Ok(web::Json(UserDto::from(&auth.1)))
}

/// The public keys that verify access tokens (JWKS). Public.
#[api_v2_operation(tags(Auth))]
pub(crate) async fn jwks(state: Data) -> Result<web::Json<serde_json::Value>, ApiError> {
    Ok(web::Json(state.app.jwks()))
}

/// Health, including the database. Public. 503 with `"status":"degraded"` when the
/// database does not answer.
#[api_v2_operation(tags(Health))]
pub(crate) async fn health(state: Data) -> Result<HealthReply, ApiError> {
    let app = state.app.clone();
    let ok = matches!(web::block(move || app.health()).await, Ok(Ok(())));
    Ok(HealthReply(HealthResponse {
        status: if ok { "ok" } else { "degraded" }.into(),
        db: if ok { "connected" } else { "unreachable" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}

/// The health answer with its status code (200 or 503).
pub(crate) struct HealthReply(HealthResponse);

impl paperclip::v2::schema::Apiv2Schema for HealthReply {}

impl actix_web::Responder for HealthReply {
    type Body = actix_web::body::BoxBody;
    fn respond_to(self, _: &actix_web::HttpRequest) -> actix_web::HttpResponse {
        let status = if self.0.db == "connected" {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        actix_web::HttpResponse::build(status).json(self.0)
    }
}
impl paperclip::actix::OperationModifier for HealthReply {
    fn update_response(op: &mut paperclip::v2::models::DefaultOperationRaw) {
        use paperclip::v2::models::{Either, Response};
        use paperclip::v2::schema::Apiv2Schema;
        for (code, desc) in [("200", "OK"), ("503", "database unreachable")] {
            let mut def = <HealthResponse as Apiv2Schema>::schema_with_ref();
            def.retain_ref();
            op.responses.insert(
                code.into(),
                Either::Right(Response {
                    description: Some(desc.into()),
                    schema: Some(def),
                    ..Default::default()
                }),
            );
        }
    }
}

/// Liveness: answers without touching the database. Public.
#[api_v2_operation(tags(Health))]
pub(crate) async fn live() -> Result<web::Json<LiveResponse>, ApiError> {
    Ok(web::Json(LiveResponse {
        status: "ok".into(),
    }))
}

/// List users (any role), newest first.
#[api_v2_operation(tags(Users))]
pub(crate) async fn list_users(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<ListQuery>,
) -> Result<Paged<UserDto>, ApiError> {
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    if after
        .as_deref()
        .is_some_and(|a| nexplane_domain::UserId::parse(a).is_err())
    {
        return Err(AppError::BadRequest("cursor is not valid".into()).into());
    }
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || app.list_users(&auth.0, &page)).await?;
    Ok(paginate(
        rows,
        limit,
        |u| u.id.to_string(),
        |u| UserDto::from(u),
    ))
}

/// Create a user (admin).
#[api_v2_operation(tags(Users))]
pub(crate) async fn create_user(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    body: web::Json<CreateUserRequest>,
) -> Result<Created<UserDto>, ApiError> {
    let b = body.into_inner();
    let input = NewUser {
        email: b.email,
        name: b.name,
        role: b.role,
        password: SecretString::new(b.password),
    };
    let app = state.app.clone();
    let c = ctx.0.clone();
    let u = run(&ctx, move || app.create_user(&auth.0, input, &c)).await?;
    Ok(Created {
        location: format!("/users/{}", u.id),
        body: UserDto::from(&u),
    })
}

/// Get a user (any role).
#[api_v2_operation(tags(Users))]
pub(crate) async fn get_user(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<UserDto>, ApiError> {
    let app = state.app.clone();
    let id = id.into_inner();
    let u = run(&ctx, move || app.get_user(&auth.0, &id)).await?;
    Ok(web::Json(UserDto::from(&u)))
}

/// Update a user's name, role or disabled flag (admin).
#[api_v2_operation(tags(Users))]
pub(crate) async fn update_user(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
    body: web::Json<UpdateUserRequest>,
) -> Result<web::Json<UserDto>, ApiError> {
    let b = body.into_inner();
    let patch = UserPatch {
        name: b.name,
        role: b.role,
        disabled: b.disabled,
    };
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    let u = run(&ctx, move || app.update_user(&auth.0, &id, patch, &c)).await?;
    Ok(web::Json(UserDto::from(&u)))
}

/// Disable a user (admin). Users are never hard-deleted, so the audit trail keeps its actors;
/// a disabled user's tokens stop working at once.
#[api_v2_operation(tags(Users))]
pub(crate) async fn delete_user(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<NoContent, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    run(&ctx, move || app.disable_user(&auth.0, &id, &c)).await?;
    Ok(NoContent)
}

/// Change a password: your own needs `current_password`; an admin may reset anyone's.
#[api_v2_operation(tags(Users))]
pub(crate) async fn change_password(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
    body: web::Json<PasswordRequest>,
) -> Result<NoContent, ApiError> {
    let b = body.into_inner();
    let current = b.current_password.map(SecretString::new);
    let new = SecretString::new(b.new_password);
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    run(&ctx, move || {
        app.change_password(&auth.0, &id, current.as_ref(), &new, &c)
    })
    .await?;
    Ok(NoContent)
}

fn parse_time(field: &str, v: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    v.map(|s| {
        Timestamp::parse_rfc3339(s).map_err(|_| {
            ApiError::from(AppError::field(
                field,
                "must be an ISO 8601 timestamp such as 2026-12-04T15:41:22Z",
            ))
        })
    })
    .transpose()
}

/// Audit events (any role), newest first, with filters. `from` is inclusive, `to` exclusive.
#[api_v2_operation(tags(Audit))]
pub(crate) async fn list_audit(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<AuditQuery>,
) -> Result<Paged<AuditEventDto>, ApiError> {
    let q = q.into_inner();
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    if after.as_deref().is_some_and(|a| a.parse::<i64>().is_err()) {
        return Err(AppError::BadRequest("cursor is not valid".into()).into());
    }
    let filter = AuditFilter {
        change_request_id: q.change_request_id,
        user_id: q.user_id,
        resource_type: q.resource_type,
        resource_id: q.resource_id,
        event_type: q.event_type,
        from: parse_time("from", q.from.as_deref())?,
        to: parse_time("to", q.to.as_deref())?,
    };
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || app.list_audit(&auth.0, &filter, &page)).await?;
    Ok(paginate(
        rows,
        limit,
        |e| e.seq.to_string(),
        |e| AuditEventDto::from(e),
    ))
}

/// Verify the audit hash chain (admin): reports the first altered or missing event.
#[api_v2_operation(tags(Audit))]
pub(crate) async fn verify_audit(
    state: Data,
    ctx: Ctx,
    auth: Auth,
) -> Result<web::Json<VerifyResponse>, ApiError> {
    let app = state.app.clone();
    let check = run(&ctx, move || app.verify_audit(&auth.0)).await?;
    Ok(web::Json(match check {
        ChainCheck::Ok { events, head } => VerifyResponse {
            ok: true,
            events: Some(events),
            head: Some(head),
            first_bad_seq: None,
        },
        ChainCheck::Broken { first_bad_seq } => VerifyResponse {
            ok: false,
            events: None,
            head: None,
            first_bad_seq: Some(first_bad_seq),
        },
    }))
}

/// Registers every API route (used for serving and for generating the OpenAPI schema).
pub(crate) fn configure(cfg: &mut web::ServiceConfig, login_limit: Option<crate::LoginGovernor>) {
    let login_res = web::resource("/auth/login").route(web::post().to(login));
    match login_limit {
        Some(g) => cfg.service(login_res.wrap(g)),
        None => cfg.service(login_res),
    };
    cfg.service(web::resource("/auth/refresh").route(web::post().to(refresh)))
        .service(web::resource("/auth/logout").route(web::post().to(logout)))
        .service(web::resource("/auth/me").route(web::get().to(me)))
        .service(web::resource("/.well-known/jwks.json").route(web::get().to(jwks)))
        .service(web::resource("/health").route(web::get().to(health)))
        .service(web::resource("/health/live").route(web::get().to(live)))
        .service(
            web::resource("/users")
                .route(web::get().to(list_users))
                .route(web::post().to(create_user)),
        )
        .service(
            web::resource("/users/{id}")
                .route(web::get().to(get_user))
                .route(web::put().to(update_user))
                .route(web::delete().to(delete_user)),
        )
        .service(web::resource("/users/{id}/password").route(web::post().to(change_password)))
        .service(web::resource("/audit").route(web::get().to(list_audit)))
        .service(web::resource("/audit/verify").route(web::get().to(verify_audit)));
}
