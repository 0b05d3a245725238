//! The handlers. Each one parses input, calls one use case on the blocking pool, and shapes
//! the answer; every rule lives in `nexplane-app` and `nexplane-domain`.

use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{Auth, Ctx};
use crate::respond::{check_limit, decode_cursor, paginate, Accepted, Created, Paged};
use crate::state::ApiState;
use actix_web::http::StatusCode;
use nexplane_app::change_requests::{
    ChangeRequestQuery, CreateChangeRequest, Decision, EditChangeRequest,
};
use nexplane_app::connectors::{ConnectorReplacement, NewConnector, TestReport};
use nexplane_app::users::{NewUser, UserPatch};
use nexplane_app::{auth::TokenPair, AppError};
use nexplane_domain::audit::ChainCheck;
use nexplane_domain::execution::JournalKind;
use nexplane_domain::{SecretString, Timestamp};
use nexplane_ports::{AssetFilter, AuditFilter, Page};
use paperclip::actix::{api_v2_operation, web, NoContent};

type Data = web::Data<ApiState>;

/// Runs a blocking use case and attaches the request id to its error.
pub(crate) async fn run<T, F>(ctx: &Ctx, f: F) -> Result<T, ApiError>
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

/// Checks that a decoded cursor is an id of the listed kind (else 400).
pub(crate) fn check_cursor<T>(
    after: Option<&str>,
    parse: fn(&str) -> Result<T, nexplane_domain::IdError>,
) -> Result<(), ApiError> {
    if after.is_some_and(|a| parse(a).is_err()) {
        return Err(AppError::BadRequest("cursor is not valid".into()).into());
    }
    Ok(())
}

/// List connectors (any role), newest first. Credential values are never shown, only
/// `credential_keys`.
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn list_connectors(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<ListQuery>,
) -> Result<Paged<ConnectorDto>, ApiError> {
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    check_cursor(after.as_deref(), nexplane_domain::ConnectorId::parse)?;
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || app.list_connectors(&auth.0, &page)).await?;
    Ok(paginate(
        rows,
        limit,
        |c| c.id.to_string(),
        |c| ConnectorDto::from(c),
    ))
}

/// Create a connector (admin).
///
/// `credentials` are sealed at rest (AES-256-GCM, the connector id bound in) and never
/// returned, logged or audited. A duplicate name → 409; an unknown type, a missing required
/// credential, an unknown field or setting → 422.
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn create_connector(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    body: web::Json<CreateConnectorRequest>,
) -> Result<Created<ConnectorDto>, ApiError> {
    let b = body.into_inner();
    let input = NewConnector {
        name: b.name,
        connector_type: b.connector_type,
        environment: b.environment,
        settings: b.settings,
        credentials: b.credentials,
    };
    let app = state.app.clone();
    let c = ctx.0.clone();
    let conn = run(&ctx, move || app.create_connector(&auth.0, input, &c)).await?;
    Ok(Created {
        location: format!("/connectors/{}", conn.id),
        body: ConnectorDto::from(&conn),
    })
}

/// Get a connector (any role).
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn get_connector(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<ConnectorDto>, ApiError> {
    let app = state.app.clone();
    let id = id.into_inner();
    let c = run(&ctx, move || app.get_connector(&auth.0, &id)).await?;
    Ok(web::Json(ConnectorDto::from(&c)))
}

/// Replace a connector (admin).
///
/// `name`, `environment` and `settings` replace the stored ones; `credentials`, when present,
/// replace the whole stored set, and when absent the stored set stays. New settings or
/// credentials reset `status` to `untested`.
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn update_connector(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
    body: web::Json<UpdateConnectorRequest>,
) -> Result<web::Json<ConnectorDto>, ApiError> {
    let b = body.into_inner();
    let input = ConnectorReplacement {
        name: b.name,
        connector_type: b.connector_type,
        environment: b.environment,
        settings: b.settings,
        credentials: b.credentials,
    };
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    let conn = run(&ctx, move || app.replace_connector(&auth.0, &id, input, &c)).await?;
    Ok(web::Json(ConnectorDto::from(&conn)))
}

/// Delete a connector (admin); its assets go with it, its audit history stays.
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn delete_connector(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<NoContent, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    run(&ctx, move || app.delete_connector(&auth.0, &id, &c)).await?;
    Ok(NoContent)
}

fn test_response(r: TestReport) -> ConnectorTestResponse {
    ConnectorTestResponse {
        ok: r.ok,
        latency_ms: r.latency_ms,
        identity: r.identity.map(|i| IdentityDto {
            account_id: i.account_id,
            arn: i.arn,
        }),
        error: r.error,
    }
}

/// Test a connector's credentials (operator, admin).
///
/// For `aws`: STS GetCallerIdentity (after assuming `assume_role_arn` when set). Updates
/// `status`, `last_tested_at` and `last_test_error`. Bad credentials or an unreachable
/// endpoint answer 200 with `ok: false` and the provider's message.
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn test_connector(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<ConnectorTestResponse>, ApiError> {
    let app = state.app.clone();
    let id = id.into_inner();
    let principal = auth.0.clone();
    let probe = run(&ctx, move || app.prepare_connector_test(&principal, &id)).await?;
    // The provider call: no transaction is open.
    let result = state.app.probe_connector(&probe).await;
    let app = state.app.clone();
    let c = ctx.0.clone();
    let report = run(&ctx, move || {
        app.record_connector_test(&auth.0, &probe, result, &c)
    })
    .await?;
    Ok(web::Json(test_response(report)))
}

/// Start a discovery of a connector's assets (operator, admin).
///
/// Answers 202 with the job and `Location: /jobs/{id}`. A discovery already queued or running
/// for this connector is returned instead of starting a second one.
#[api_v2_operation(tags(Connectors))]
pub(crate) async fn discover_connector(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<Accepted<JobDto>, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    let (job, _new) = run(&ctx, move || app.request_discovery(&auth.0, &id, &c)).await?;
    Ok(Accepted {
        location: format!("/jobs/{}", job.id),
        body: JobDto::from(&job),
    })
}

/// Get a job (any role): status, progress and result.
#[api_v2_operation(tags(Jobs))]
pub(crate) async fn get_job(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<JobDto>, ApiError> {
    let app = state.app.clone();
    let id = id.into_inner();
    let j = run(&ctx, move || app.get_job(&auth.0, &id)).await?;
    Ok(web::Json(JobDto::from(&j)))
}

/// List discovered assets (any role), newest first.
///
/// Filters: `connector_id`, `type`, `q` (case-insensitive substring of the name or the
/// external id) and `include_removed` (assets a later complete discovery no longer found are
/// hidden unless true).
#[api_v2_operation(tags(Assets))]
pub(crate) async fn list_assets(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<AssetQuery>,
) -> Result<Paged<AssetDto>, ApiError> {
    let q = q.into_inner();
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    check_cursor(after.as_deref(), nexplane_domain::AssetId::parse)?;
    let connector_id = q
        .connector_id
        .as_deref()
        .map(|c| {
            nexplane_domain::ConnectorId::parse(c).map_err(|_| {
                ApiError::from(AppError::field("connector_id", "is not a connector id"))
            })
        })
        .transpose()?;
    let filter = AssetFilter {
        connector_id,
        asset_type: q.asset_type,
        q: q.q,
        include_removed: q.include_removed.unwrap_or(false),
    };
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || app.list_assets(&auth.0, &filter, &page)).await?;
    Ok(paginate(
        rows,
        limit,
        |a| a.id.to_string(),
        |a| AssetDto::from(a),
    ))
}

/// Get an asset (any role), removed or not.
#[api_v2_operation(tags(Assets))]
pub(crate) async fn get_asset(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<AssetDto>, ApiError> {
    let app = state.app.clone();
    let id = id.into_inner();
    let a = run(&ctx, move || app.get_asset(&auth.0, &id)).await?;
    Ok(web::Json(AssetDto::from(&a)))
}

/// The change-type catalog (any role): every change type with its target schema, base risk
/// and whether it can be rolled back.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn list_change_types(
    state: Data,
    ctx: Ctx,
    auth: Auth,
) -> Result<web::Json<Vec<ChangeTypeDto>>, ApiError> {
    let app = state.app.clone();
    let types = run(&ctx, move || app.list_change_types(&auth.0)).await?;
    Ok(web::Json(types.iter().map(ChangeTypeDto::from).collect()))
}

/// List change requests (any role), newest first.
///
/// Filters: `state`, `connector_id`, `change_type`, `requested_by` (a user id); an unknown
/// state or change type, or a malformed id, is a 422.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn list_change_requests(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<ChangeRequestQueryDto>,
) -> Result<Paged<ChangeRequestDto>, ApiError> {
    let q = q.into_inner();
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    check_cursor(after.as_deref(), nexplane_domain::ChangeRequestId::parse)?;
    let query = ChangeRequestQuery {
        state: q.state,
        connector_id: q.connector_id,
        change_type: q.change_type,
        requested_by: q.requested_by,
    };
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || {
        app.list_change_requests(&auth.0, &query, &page)
    })
    .await?;
    Ok(paginate(
        rows,
        limit,
        |c| c.change_request.id.to_string(),
        |c| ChangeRequestDto::from(c),
    ))
}

/// Create a change request (operator, admin): a `draft`.
///
/// The change type must exist, the connector must exist and be of the change type's
/// `connector_type`, and `target` must match the change type's `target_schema`; otherwise
/// 422 with field errors (e.g. `target.iam_user`). The risk comes from the change type and
/// the connector's environment and fixes `required_approvals`.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn create_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    body: web::Json<CreateChangeRequestRequest>,
) -> Result<Created<ChangeRequestDto>, ApiError> {
    let b = body.into_inner();
    let input = CreateChangeRequest {
        title: b.title,
        description: b.description,
        connector_id: b.connector_id,
        change_type: b.change_type,
        target: b.target,
    };
    let app = state.app.clone();
    let c = ctx.0.clone();
    let cr = run(&ctx, move || app.create_change_request(&auth.0, input, &c)).await?;
    Ok(Created {
        location: format!("/change-requests/{}", cr.id),
        body: ChangeRequestDto::from(&cr),
    })
}

/// Get a change request (any role).
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn get_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    let app = state.app.clone();
    let id = id.into_inner();
    let cr = run(&ctx, move || app.get_change_request(&auth.0, &id)).await?;
    Ok(web::Json(ChangeRequestDto::from(&cr)))
}

/// Edit a draft change request (the requester or an admin): `title`, `description`,
/// `target`. The risk is recomputed; any state but `draft` → 409.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn update_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
    body: web::Json<UpdateChangeRequestRequest>,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    let b = body.into_inner();
    let input = EditChangeRequest {
        title: b.title,
        description: b.description,
        target: b.target,
    };
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    let cr = run(&ctx, move || {
        app.edit_change_request(&auth.0, &id, input, &c)
    })
    .await?;
    Ok(web::Json(ChangeRequestDto::from(&cr)))
}

/// Parses an optional JSON body: empty means `None`.
fn optional_body<T: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    body: &[u8],
) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|e| {
        ApiError::from(crate::json_error(&e)).with_request_id(ctx.0.request_id.clone())
    })
}

async fn decide(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: String,
    decision: Decision,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    let cr = run(&ctx, move || {
        app.decide_change_request(&auth.0, &id, decision, &c)
    })
    .await?;
    Ok(web::Json(ChangeRequestDto::from(&cr)))
}

/// Submit a draft for approval (the requester or an admin).
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn submit_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    decide(state, ctx, auth, id.into_inner(), Decision::Submit).await
}

/// Approve a submitted change request (approver, admin), with an optional body
/// `{"comment": …}`.
///
/// Nobody approves their own change request (403) unless the server runs with
/// `NEXPLANE_ALLOW_SELF_APPROVAL=true` (the approval is then marked `self_approved`); one
/// person's approval counts once (a second → 409 `already_approved`). The change request
/// becomes `approved` when the approvals reach `required_approvals`.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn approve_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    let comment = optional_body::<ApproveRequest>(&ctx, &body)?.and_then(|b| b.comment);
    decide(
        state,
        ctx,
        auth,
        id.into_inner(),
        Decision::Approve { comment },
    )
    .await
}

/// Reject a submitted change request (approver, admin) with `{"reason": …}` (required).
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn reject_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    let reason = optional_body::<RejectRequest>(&ctx, &body)?.and_then(|b| b.reason);
    decide(
        state,
        ctx,
        auth,
        id.into_inner(),
        Decision::Reject { reason },
    )
    .await
}

/// Cancel a change request that is `draft`, `submitted` or `approved` (the requester or an
/// admin).
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn cancel_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<ChangeRequestDto>, ApiError> {
    decide(state, ctx, auth, id.into_inner(), Decision::Cancel).await
}

async fn run_change(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: String,
    kind: JournalKind,
) -> Result<Accepted<JobDto>, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    let (job, _new) = run(&ctx, move || app.run_change_request(&auth.0, &id, kind, &c)).await?;
    Ok(Accepted {
        location: format!("/jobs/{}", job.id),
        body: JobDto::from(&job),
    })
}

/// Execute an approved change request (operator, admin): 202 with the execution job.
///
/// The change request becomes `executing`; a durable job runs the change type's precheck
/// against the live provider, then each step, journaling it before and after its provider
/// call (`execution.steps`), and ends `complete` or `failed` (a failed precheck applies
/// nothing). Repeating the call while the job runs returns the same job; any state but
/// `approved` → 409 `invalid_transition`.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn execute_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<Accepted<JobDto>, ApiError> {
    run_change(state, ctx, auth, id.into_inner(), JournalKind::Execution).await
}

/// Roll back a change request (operator, admin): 202 with the rollback job.
///
/// Possible from `complete` or `failed` when a step was applied, and from
/// `rollback_failed` (a retry keeps the undo steps that succeeded). The job undoes the
/// started execution steps in reverse order from the journal and ends `rolledback` or
/// `rollback_failed`. Repeating the call while the job runs returns the same job. A change
/// type without rollback → 409 `rollback_unsupported`; any other state → 409
/// `invalid_transition`.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn rollback_change_request(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<Accepted<JobDto>, ApiError> {
    run_change(state, ctx, auth, id.into_inner(), JournalKind::Rollback).await
}

/// Reveal the secret outputs of a change request, once (the requester or an admin).
///
/// Answers `{name: value}` (e.g. `{"new_secret_access_key": "…"}`) and destroys the stored
/// values in the same transaction: a second call → 410 `gone`. A change request that
/// produced no secret → 409 `no_secret_outputs`. Audited as
/// `change_request.secrets_revealed` with the names only.
#[api_v2_operation(tags(ChangeRequests))]
pub(crate) async fn reveal_secrets(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<std::collections::BTreeMap<String, String>>, ApiError> {
    let app = state.app.clone();
    let c = ctx.0.clone();
    let id = id.into_inner();
    let secrets = run(&ctx, move || app.reveal_secrets(&auth.0, &id, &c)).await?;
    Ok(web::Json(
        secrets
            .into_iter()
            .map(|(k, v)| (k, v.expose().to_owned()))
            .collect(),
    ))
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
        .service(web::resource("/audit/verify").route(web::get().to(verify_audit)))
        .service(
            web::resource("/connectors")
                .route(web::get().to(list_connectors))
                .route(web::post().to(create_connector)),
        )
        .service(
            web::resource("/connectors/{id}")
                .route(web::get().to(get_connector))
                .route(web::put().to(update_connector))
                .route(web::delete().to(delete_connector)),
        )
        .service(web::resource("/connectors/{id}/test").route(web::post().to(test_connector)))
        .service(
            web::resource("/connectors/{id}/discover").route(web::post().to(discover_connector)),
        )
        .service(web::resource("/jobs/{id}").route(web::get().to(get_job)))
        .service(web::resource("/assets").route(web::get().to(list_assets)))
        .service(web::resource("/assets/{id}").route(web::get().to(get_asset)))
        .service(web::resource("/change-types").route(web::get().to(list_change_types)))
        .service(
            web::resource("/change-requests")
                .route(web::get().to(list_change_requests))
                .route(web::post().to(create_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}")
                .route(web::get().to(get_change_request))
                .route(web::put().to(update_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/submit")
                .route(web::post().to(submit_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/approve")
                .route(web::post().to(approve_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/reject")
                .route(web::post().to(reject_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/cancel")
                .route(web::post().to(cancel_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/execute")
                .route(web::post().to(execute_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/rollback")
                .route(web::post().to(rollback_change_request)),
        )
        .service(
            web::resource("/change-requests/{id}/reveal-secrets")
                .route(web::post().to(reveal_secrets)),
        );
    crate::agents::configure(cfg);
}
