//! # nexplane-api
//!
//! The thin HTTP layer of Nexplane: actix-web routes, the bearer-token extractor, one mapping
//! of errors to RFC 9457 problem+json, rate limits, request ids, the OpenAPI schema
//! (paperclip) and Swagger UI served from files built into the binary.
//!
//! Licensed GPL-3.0-or-later because it links `actix-governor`.
#![deny(missing_docs)]

pub mod agents;
mod dto;
mod error;
mod extract;
mod metrics;
mod middleware;
pub mod openapi;
mod respond;
mod routes;
mod state;

pub use error::{problem, ApiError, PROBLEM_JSON};
pub use state::{ApiConfig, ApiState};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{web as aweb, HttpRequest};
use nexplane_app::AppError;
use paperclip::actix::OpenApiExt;
use std::net::TcpListener;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub(crate) type LoginGovernor = actix_governor::Governor<
    middleware::LoginKey,
    actix_governor::governor::middleware::NoOpMiddleware<
        actix_governor::governor::clock::QuantaInstant,
    >,
>;

/// Maps a JSON body error to the right status: syntax → 400, content (unknown field, wrong
/// type, missing field) → 422.
pub(crate) fn json_error(e: &serde_json::Error) -> AppError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => AppError::field("body", &e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            AppError::BadRequest(format!("malformed JSON: {e}"))
        }
    }
}

fn json_payload_error(err: JsonPayloadError, req: &HttpRequest) -> actix_web::Error {
    let rid = extract::ctx_of(req).request_id;
    let app_err = match &err {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            return actix_web::error::InternalError::from_response(
                "",
                problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "Payload too large",
                    "the request body is larger than 1 MiB",
                    serde_json::json!({}),
                ),
            )
            .into();
        }
        JsonPayloadError::ContentType => {
            return actix_web::error::InternalError::from_response(
                "",
                problem(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "Unsupported media type",
                    "send the body as application/json",
                    serde_json::json!({}),
                ),
            )
            .into();
        }
        JsonPayloadError::Deserialize(e) => json_error(e),
        JsonPayloadError::Serialize(_) => AppError::Internal("serialize".into()),
        other => AppError::BadRequest(format!("could not read the body: {other}")),
    };
    ApiError::from(app_err).with_request_id(rid).into()
}

fn query_error(err: QueryPayloadError, req: &HttpRequest) -> actix_web::Error {
    let rid = extract::ctx_of(req).request_id;
    ApiError::from(AppError::BadRequest(format!("malformed query: {err}")))
        .with_request_id(rid)
        .into()
}

fn path_error(_err: PathError, req: &HttpRequest) -> actix_web::Error {
    let rid = extract::ctx_of(req).request_id;
    ApiError::from(AppError::NotFound("no such resource".into()))
        .with_request_id(rid)
        .into()
}

pub(crate) type LoginLimit = actix_governor::GovernorConfig<
    middleware::LoginKey,
    actix_governor::governor::middleware::NoOpMiddleware<
        actix_governor::governor::clock::QuantaInstant,
    >,
>;

/// The per-IP login limiter. Built once per server and shared by every worker (each clone
/// of the config shares one limiter), so the limit holds whatever worker takes a connection.
fn login_limit(per_minute: u32) -> Option<LoginLimit> {
    let per_minute = u64::from(per_minute.max(1));
    let period = std::time::Duration::from_millis((60_000 / per_minute).max(1));
    actix_governor::GovernorConfigBuilder::default()
        .key_extractor(middleware::LoginKey)
        .period(period)
        .burst_size(u32::try_from(per_minute).unwrap_or(u32::MAX))
        .finish()
}

/// Builds the actix application for one worker.
pub fn build_app(
    state: aweb::Data<ApiState>,
) -> actix_web::App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let limit = login_limit(state.config.login_rate_limit_per_minute);
    app_with_login_limit(state, limit.as_ref())
}

fn app_with_login_limit(
    state: aweb::Data<ApiState>,
    login: Option<&LoginLimit>,
) -> actix_web::App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let governor = login.map(actix_governor::Governor::new);
    actix_web::App::new()
        .app_data(state.clone())
        .app_data(
            aweb::JsonConfig::default()
                .limit(MAX_BODY_BYTES)
                .error_handler(json_payload_error),
        )
        .app_data(aweb::PayloadConfig::default().limit(MAX_BODY_BYTES))
        .app_data(aweb::QueryConfig::default().error_handler(query_error))
        .app_data(aweb::PathConfig::default().error_handler(path_error))
        .wrap(actix_web::middleware::from_fn(middleware::docs_and_spec))
        .wrap(actix_web::middleware::from_fn(middleware::rate_limit))
        .wrap(actix_web::middleware::from_fn(middleware::frame))
        .wrap_api()
        .configure(|cfg| routes::configure(cfg, governor))
        .with_json_spec_v3_at(openapi::RAW_SPEC_PATH)
        .with_swagger_ui_at("/docs")
        .build()
        .route("/metrics", aweb::get().to(metrics::metrics))
        .default_service(aweb::to(middleware::not_found))
}

/// Starts the HTTP server on `listener` (it stops gracefully on SIGTERM/SIGINT).
pub fn serve(
    state: ApiState,
    listener: TcpListener,
    workers: usize,
) -> std::io::Result<actix_web::dev::Server> {
    let state = aweb::Data::new(state);
    let login = login_limit(state.config.login_rate_limit_per_minute);
    Ok(
        actix_web::HttpServer::new(move || app_with_login_limit(state.clone(), login.as_ref()))
            .workers(workers.max(1))
            .shutdown_timeout(10)
            .listen(listener)?
            .run(),
    )
}
