//! Request extractors: the authenticated caller and the request context.

use crate::error::ApiError;
use crate::state::ApiState;
use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use nexplane_app::ratelimit::RateDecision;
use nexplane_app::{AppError, RequestCtx};
use nexplane_domain::Principal;
use paperclip::actix::OperationModifier;
use paperclip::v2::models::{DefaultOperationRaw, DefaultSchemaRaw};
use paperclip::v2::schema::Apiv2Schema;
use std::collections::BTreeMap;

/// The request id, set by the framing middleware.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The request context (request id and client IP) for the audit log.
#[derive(Debug, Clone)]
pub struct Ctx(pub RequestCtx);

pub(crate) fn ctx_of(req: &HttpRequest) -> RequestCtx {
    RequestCtx {
        request_id: req.extensions().get::<RequestId>().map(|r| r.0.clone()),
        client_ip: client_ip(req),
    }
}

pub(crate) fn client_ip(req: &HttpRequest) -> Option<String> {
    req.peer_addr().map(|a| a.ip().to_string())
}

impl FromRequest for Ctx {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Ok(Ctx(ctx_of(req))))
    }
}

impl Apiv2Schema for Ctx {}
impl OperationModifier for Ctx {
    fn update_parameter(_op: &mut DefaultOperationRaw) {}
    fn update_definitions(_map: &mut BTreeMap<String, DefaultSchemaRaw>) {}
}

/// An authenticated, rate-limited caller. Extracting it verifies the bearer token (a verified
/// token is cached), re-reads the session and the user, and counts the request against the
/// user's limit.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal, pub nexplane_domain::User);

fn bearer(req: &HttpRequest) -> Option<String> {
    let h = req.headers().get(actix_web::http::header::AUTHORIZATION)?;
    let s = h.to_str().ok()?;
    let (scheme, token) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

pub(crate) fn limited(d: &RateDecision) -> AppError {
    AppError::TooManyRequests {
        retry_after_secs: d.retry_after_secs,
        detail: format!("rate limit of {} requests per minute exceeded", d.limit),
    }
}

impl FromRequest for Auth {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let rid = req.extensions().get::<RequestId>().map(|r| r.0.clone());
            let Some(state) = req.app_data::<web::Data<ApiState>>().cloned() else {
                return Err(ApiError::from(AppError::Internal("state missing".into())));
            };
            let fail = |e: AppError| {
                // A failed authentication counts against the client IP instead.
                let ip = client_ip(&req).unwrap_or_default();
                let d = state.ip_limiter.check(&ip, state.app.now());
                req.extensions_mut().insert(d);
                let e = if d.allowed { e } else { limited(&d) };
                ApiError::from(e).with_request_id(rid.clone())
            };
            let Some(token) = bearer(&req) else {
                return Err(fail(AppError::Unauthorized(
                    "missing bearer token in the Authorization header".into(),
                )));
            };
            let app = state.app.clone();
            let res = web::block(move || app.authenticate_user(&token)).await;
            let (principal, user) = match res {
                Ok(Ok(pu)) => pu,
                Ok(Err(e @ AppError::Unauthorized(_))) => return Err(fail(e)),
                Ok(Err(e)) => return Err(ApiError::from(e).with_request_id(rid)),
                Err(e) => return Err(ApiError::from(e).with_request_id(rid)),
            };
            let d = state
                .user_limiter
                .check(principal.user_id.as_str(), state.app.now());
            req.extensions_mut().insert(d);
            if !d.allowed {
                return Err(ApiError::from(limited(&d)).with_request_id(rid));
            }
            Ok(Auth(principal, user))
        })
    }
}

impl Apiv2Schema for Auth {}
impl OperationModifier for Auth {
    fn update_parameter(_op: &mut DefaultOperationRaw) {}
    fn update_definitions(_map: &mut BTreeMap<String, DefaultSchemaRaw>) {}
}
