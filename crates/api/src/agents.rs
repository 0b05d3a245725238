//! Agent endpoints (api.md §7): administration (bearer tokens) and the agent side (signed
//! requests, no bearer token), with the long poll for commands.

use crate::error::ApiError;
use crate::extract::{client_ip, ctx_of, limited, Auth, Ctx};
use crate::respond::{check_limit, decode_cursor, paginate, Created, Paged};
use crate::routes::{check_cursor, run};
use crate::state::ApiState;
use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse};
use futures_util::future::LocalBoxFuture;
use nexplane_app::agents::{AgentCredentials, CommandResult, NewEnrollmentToken, Registration};
use nexplane_app::AppError;
use nexplane_domain::agent::{Agent, AgentStatus, EnrollmentToken, MAX_WAIT_SECS};
use nexplane_domain::{AgentId, SecretString};
use nexplane_ports::Page;
use paperclip::actix::{api_v2_operation, web, Apiv2Schema, NoContent};
use paperclip::v2::models::{DefaultOperationRaw, DefaultSchemaRaw};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

type Data = web::Data<ApiState>;

/// Wakes the long polls of agents waiting on this process when a command is queued for them.
/// One entry per agent that has polled here; a wake with no poller waiting leaves a permit,
/// so a command queued between a poll's query and its wait is not missed.
#[derive(Debug, Default)]
pub struct AgentWakeups(Mutex<HashMap<String, Arc<Notify>>>);

impl AgentWakeups {
    fn slot(&self, agent: &str) -> Arc<Notify> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(agent.to_owned()).or_default().clone()
    }

    /// Wakes the poll of `agent`, if it polls here.
    pub fn wake(&self, agent: &AgentId) {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get(agent.as_str()) {
            n.notify_one();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DTOs

/// `POST /agents/enrollment-tokens` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateEnrollmentTokenRequest {
    /// Label (also the name of the agents registered with it).
    pub name: Option<String>,
    /// Lifetime in seconds (default 1800, at most 604800).
    pub ttl_seconds: Option<i64>,
    /// How many agents may register with it (default 1).
    pub max_uses: Option<u32>,
}

/// An enrollment token (the token itself only in the answer to its creation).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct EnrollmentTokenDto {
    /// `enr_…`
    pub id: String,
    /// The token (≥ 128 bits from a CSPRNG): present only in the `201` of its creation;
    /// stored only as a hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Label.
    pub name: Option<String>,
    /// When it stops working.
    pub expires_at: String,
    /// Registrations it allows.
    pub max_uses: u32,
    /// Registrations it served.
    pub uses: u32,
    /// Created.
    pub created_at: String,
    /// Set when revoked.
    pub revoked_at: Option<String>,
}

impl EnrollmentTokenDto {
    fn new(t: &EnrollmentToken, token: Option<String>) -> Self {
        Self {
            id: t.id.to_string(),
            token,
            name: t.name.clone(),
            expires_at: t.expires_at.to_rfc3339(),
            max_uses: t.max_uses,
            uses: t.uses,
            created_at: t.created_at.to_rfc3339(),
            revoked_at: t.revoked_at.map(|x| x.to_rfc3339()),
        }
    }
}

/// An agent (api.md §7.1).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct AgentDto {
    /// `agt_…`
    pub id: String,
    /// Name.
    pub name: String,
    /// Host name it reported.
    pub hostname: String,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Agent version.
    pub version: String,
    /// Labels `{key: value}`.
    pub labels: serde_json::Value,
    /// `online` (heartbeat within 90 s), `offline` or `revoked`.
    pub status: String,
    /// Registered.
    pub registered_at: String,
    /// Last heartbeat.
    pub last_heartbeat_at: Option<String>,
    /// Set when revoked.
    pub revoked_at: Option<String>,
}

impl AgentDto {
    fn new(a: &Agent, s: AgentStatus) -> Self {
        Self {
            id: a.id.to_string(),
            name: a.name.clone(),
            hostname: a.hostname.clone(),
            os: a.os.clone(),
            arch: a.arch.clone(),
            version: a.version.clone(),
            labels: a.labels.clone(),
            status: s.as_str().to_owned(),
            registered_at: a.registered_at.to_rfc3339(),
            last_heartbeat_at: a.last_heartbeat_at.map(|t| t.to_rfc3339()),
            revoked_at: a.revoked_at.map(|t| t.to_rfc3339()),
        }
    }
}

/// `POST /agent/register` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    /// An enrollment token from `POST /agents/enrollment-tokens`.
    pub enrollment_token: String,
    /// Host name.
    pub hostname: String,
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `x86_64`.
    pub arch: String,
    /// Agent version.
    pub version: String,
    /// Labels `{key: value}` (strings).
    pub labels: Option<serde_json::Value>,
}

/// `POST /agent/register` answer: the agent's id and secret (shown only here).
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct RegisterResponse {
    /// `agt_…`
    pub agent_id: String,
    /// The secret the agent signs its requests with (HMAC-SHA256). Stored sealed.
    pub agent_secret: String,
}

/// `POST /agent/heartbeat` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatRequest {
    /// Agent version.
    pub version: Option<String>,
    /// Host name.
    pub hostname: Option<String>,
}

/// `POST /agent/heartbeat` answer.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct HeartbeatResponse {
    /// The server's clock (RFC 3339), to detect skew.
    pub server_time: String,
}

/// A command for the agent.
#[derive(Serialize, Apiv2Schema)]
pub(crate) struct CommandDto {
    /// `cmd_…`
    pub id: String,
    /// `write_file`, `set_file_mode`, `restore_file` or `restore_file_mode`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// Parameters of the command.
    pub params: serde_json::Value,
}

/// `POST /agent/commands/{id}/result` body.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommandResultRequest {
    /// `succeeded` or `failed`.
    pub status: String,
    /// What happened (for a failure: `{"error": "…"}`).
    pub output: Option<serde_json::Value>,
    /// The previous state, for rollback (stored sealed).
    pub snapshot: Option<serde_json::Value>,
}

/// `GET /agent/commands/next` query.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NextQuery {
    /// Seconds to wait for a command (0 to 30, default 0).
    pub wait: Option<u64>,
    /// Any unique string, at most 128 characters (otherwise ignored). Agents add one to every request so that two identical
    /// requests in the same second do not carry the same signature (a replay).
    pub nonce: Option<String>,
}

/// Keyset paging query.
#[derive(Deserialize, Apiv2Schema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    /// Page size (default 50, at most 500).
    pub limit: Option<u32>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The signed-request extractor

/// A signed agent request: the agent, and the body exactly as signed.
pub(crate) struct AgentCall {
    agent: Agent,
    body: actix_web::web::Bytes,
}

fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl FromRequest for AgentCall {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let body = actix_web::web::Bytes::from_request(&req, payload);
        Box::pin(async move {
            let rid = ctx_of(&req).request_id;
            let Some(state) = req.app_data::<Data>().cloned() else {
                return Err(ApiError::from(AppError::Internal("state missing".into())));
            };
            let body = body.await.map_err(|e| {
                ApiError::from(AppError::BadRequest(e.to_string())).with_request_id(rid.clone())
            })?;
            let fail = |e: AppError| {
                let ip = client_ip(&req).unwrap_or_default();
                let d = state.ip_limiter.check(&ip, state.app.now());
                req.extensions_mut().insert(d);
                let e = if d.allowed { e } else { limited(&d) };
                ApiError::from(e).with_request_id(rid.clone())
            };
            let (Some(agent_id), Some(timestamp), Some(signature)) = (
                header(&req, "x-nexplane-agent"),
                header(&req, "x-nexplane-timestamp"),
                header(&req, "x-nexplane-signature"),
            ) else {
                return Err(fail(AppError::Unauthorized(
                    "agent requests carry X-Nexplane-Agent, X-Nexplane-Timestamp and \
                     X-Nexplane-Signature"
                        .into(),
                )));
            };
            let creds = AgentCredentials {
                agent_id,
                timestamp,
                signature,
            };
            let method = req.method().as_str().to_owned();
            let path = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.path().to_owned(), |p| p.as_str().to_owned());
            let (app, b) = (state.app.clone(), body.clone());
            let res =
                actix_web::web::block(move || app.authenticate_agent(&creds, &method, &path, &b))
                    .await;
            let agent = match res {
                Ok(Ok(a)) => a,
                Ok(Err(e @ AppError::Unauthorized(_))) => return Err(fail(e)),
                Ok(Err(e)) => return Err(ApiError::from(e).with_request_id(rid)),
                Err(e) => return Err(ApiError::from(e).with_request_id(rid)),
            };
            let d = state
                .agent_limiter
                .check(agent.id.as_str(), state.app.now());
            req.extensions_mut().insert(d);
            if !d.allowed {
                return Err(ApiError::from(limited(&d)).with_request_id(rid));
            }
            Ok(AgentCall { agent, body })
        })
    }
}

impl paperclip::v2::schema::Apiv2Schema for AgentCall {}
impl paperclip::actix::OperationModifier for AgentCall {
    fn update_parameter(_op: &mut DefaultOperationRaw) {}
    fn update_definitions(_map: &mut BTreeMap<String, DefaultSchemaRaw>) {}
}

impl AgentCall {
    fn json<T: serde::de::DeserializeOwned>(&self, ctx: &Ctx) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| {
            ApiError::from(crate::json_error(&e)).with_request_id(ctx.0.request_id.clone())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Administration

/// Create an enrollment token (admin). The `token` is in this answer only.
#[api_v2_operation(tags(Agents))]
pub(crate) async fn create_enrollment_token(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    body: web::Json<CreateEnrollmentTokenRequest>,
) -> Result<Created<EnrollmentTokenDto>, ApiError> {
    let b = body.into_inner();
    let input = NewEnrollmentToken {
        name: b.name,
        ttl_seconds: b.ttl_seconds,
        max_uses: b.max_uses,
    };
    let (app, c) = (state.app.clone(), ctx.0.clone());
    let (t, secret) = run(&ctx, move || {
        app.create_enrollment_token(&auth.0, input, &c)
    })
    .await?;
    Ok(Created {
        location: format!("/agents/enrollment-tokens/{}", t.id),
        body: EnrollmentTokenDto::new(&t, Some(secret.expose().to_owned())),
    })
}

/// List enrollment tokens (admin), newest first, without the tokens.
#[api_v2_operation(tags(Agents))]
pub(crate) async fn list_enrollment_tokens(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<PageQuery>,
) -> Result<Paged<EnrollmentTokenDto>, ApiError> {
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    check_cursor(after.as_deref(), nexplane_domain::EnrollmentTokenId::parse)?;
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || app.list_enrollment_tokens(&auth.0, &page)).await?;
    Ok(paginate(
        rows,
        limit,
        |t| t.id.to_string(),
        |t| EnrollmentTokenDto::new(t, None),
    ))
}

/// Revoke an enrollment token (admin): no agent can register with it any more.
#[api_v2_operation(tags(Agents))]
pub(crate) async fn revoke_enrollment_token(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<NoContent, ApiError> {
    let (app, c, id) = (state.app.clone(), ctx.0.clone(), id.into_inner());
    run(&ctx, move || app.revoke_enrollment_token(&auth.0, &id, &c)).await?;
    Ok(NoContent)
}

/// List agents (any role), newest first, with their status.
#[api_v2_operation(tags(Agents))]
pub(crate) async fn list_agents(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    q: web::Query<PageQuery>,
) -> Result<Paged<AgentDto>, ApiError> {
    let limit = check_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    check_cursor(after.as_deref(), AgentId::parse)?;
    let app = state.app.clone();
    let page = Page {
        limit: limit + 1,
        after,
    };
    let rows = run(&ctx, move || app.list_agents(&auth.0, &page)).await?;
    Ok(paginate(
        rows,
        limit,
        |(a, _)| a.id.to_string(),
        |(a, s)| AgentDto::new(a, *s),
    ))
}

/// Get an agent (any role).
#[api_v2_operation(tags(Agents))]
pub(crate) async fn get_agent(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<web::Json<AgentDto>, ApiError> {
    let (app, id) = (state.app.clone(), id.into_inner());
    let (a, s) = run(&ctx, move || app.get_agent(&auth.0, &id)).await?;
    Ok(web::Json(AgentDto::new(&a, s)))
}

/// Revoke an agent (admin): its signed requests get 401 from now on; its queued commands are
/// cancelled and the change requests waiting for them fail.
#[api_v2_operation(tags(Agents))]
pub(crate) async fn revoke_agent(
    state: Data,
    ctx: Ctx,
    auth: Auth,
    id: web::Path<String>,
) -> Result<NoContent, ApiError> {
    let (app, c, id) = (state.app.clone(), ctx.0.clone(), id.into_inner());
    run(&ctx, move || app.revoke_agent(&auth.0, &id, &c)).await?;
    Ok(NoContent)
}

// ---------------------------------------------------------------------------------------------
// Agent side

/// Register an agent with an enrollment token (no bearer token). The token's use is consumed
/// atomically; expired, revoked or used-up tokens → 401.
#[api_v2_operation(tags(AgentProtocol))]
pub(crate) async fn register(
    state: Data,
    ctx: Ctx,
    body: web::Json<RegisterRequest>,
) -> Result<Created<RegisterResponse>, ApiError> {
    let b = body.into_inner();
    let input = Registration {
        enrollment_token: SecretString::new(b.enrollment_token),
        hostname: b.hostname,
        os: b.os,
        arch: b.arch,
        version: b.version,
        labels: b.labels,
    };
    let (app, c) = (state.app.clone(), ctx.0.clone());
    let (agent, secret) = run(&ctx, move || app.register_agent(input, &c)).await?;
    Ok(Created {
        location: format!("/agents/{}", agent.id),
        body: RegisterResponse {
            agent_id: agent.id.to_string(),
            agent_secret: secret.expose().to_owned(),
        },
    })
}

/// Heartbeat (signed).
#[api_v2_operation(tags(AgentProtocol))]
pub(crate) async fn heartbeat(
    state: Data,
    ctx: Ctx,
    call: AgentCall,
) -> Result<web::Json<HeartbeatResponse>, ApiError> {
    let b: HeartbeatRequest = call.json(&ctx)?;
    let app = state.app.clone();
    let now = run(&ctx, move || {
        app.agent_heartbeat(&call.agent, b.version, b.hostname)
    })
    .await?;
    Ok(web::Json(HeartbeatResponse {
        server_time: now.to_rfc3339(),
    }))
}

/// The agent's next command (signed long poll): 200 with one command, or 204 when none
/// arrived within `wait` seconds (0 to 30). A waiting poll costs no database query until a
/// command is queued for the agent (or the wait ends).
#[api_v2_operation(tags(AgentProtocol))]
pub(crate) async fn next_command(
    state: Data,
    ctx: Ctx,
    call: AgentCall,
    q: web::Query<NextQuery>,
) -> Result<HttpResponse, ApiError> {
    let wait = q.wait.unwrap_or(0);
    if q.nonce.as_ref().is_some_and(|n| n.len() > 128) {
        return Err(
            ApiError::from(AppError::field("nonce", "must be at most 128 characters"))
                .with_request_id(ctx.0.request_id.clone()),
        );
    }
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::from(AppError::field(
            "wait",
            &format!("must be at most {MAX_WAIT_SECS}"),
        ))
        .with_request_id(ctx.0.request_id.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(wait);
    let wake = state.wakeups.slot(call.agent.id.as_str());
    let agent = Arc::new(call.agent);
    loop {
        let (app, a) = (state.app.clone(), agent.clone());
        if let Some(c) = run(&ctx, move || app.claim_agent_command(&a)).await? {
            return Ok(HttpResponse::Ok().json(CommandDto {
                id: c.id.to_string(),
                command_type: c.command_type,
                params: c.params,
            }));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(HttpResponse::NoContent().finish());
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(deadline - now) => {}
        }
    }
}

/// Report a command's result (signed). A second result for the same command → 409.
#[api_v2_operation(tags(AgentProtocol))]
pub(crate) async fn command_result(
    state: Data,
    ctx: Ctx,
    call: AgentCall,
    id: web::Path<String>,
) -> Result<NoContent, ApiError> {
    let b: CommandResultRequest = call.json(&ctx)?;
    let result = CommandResult {
        status: b.status,
        output: b.output.unwrap_or(serde_json::Value::Null),
        snapshot: b.snapshot,
    };
    let (app, c, id) = (state.app.clone(), ctx.0.clone(), id.into_inner());
    run(&ctx, move || {
        app.record_command_result(&call.agent, &id, result, &c)
    })
    .await?;
    Ok(NoContent)
}

/// Registers the agent routes.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/agents/enrollment-tokens")
            .route(web::get().to(list_enrollment_tokens))
            .route(web::post().to(create_enrollment_token)),
    )
    .service(
        web::resource("/agents/enrollment-tokens/{id}")
            .route(web::delete().to(revoke_enrollment_token)),
    )
    .service(web::resource("/agents").route(web::get().to(list_agents)))
    .service(
        web::resource("/agents/{id}")
            .route(web::get().to(get_agent))
            .route(web::delete().to(revoke_agent)),
    )
    .service(web::resource("/agent/register").route(web::post().to(register)))
    .service(web::resource("/agent/heartbeat").route(web::post().to(heartbeat)))
    .service(web::resource("/agent/commands/next").route(web::get().to(next_command)))
    .service(web::resource("/agent/commands/{id}/result").route(web::post().to(command_result)));
}
