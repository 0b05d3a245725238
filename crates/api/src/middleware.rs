//! Request framing: request ids, rate limits and their headers, the OpenAPI document, and a
//! guard in front of the Swagger UI files.

use crate::error::{problem, ApiError};
use crate::extract::{limited, RequestId};
use crate::state::ApiState;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage, HttpResponse, ResponseError};
use nexplane_app::ratelimit::RateDecision;
use std::sync::atomic::Ordering;

const X_REQUEST_ID: &str = "x-request-id";

fn valid_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')))
    .then(|| s.to_owned())
}

/// Assigns the request id (echoing a well-formed incoming one), logs the request, counts it.
pub(crate) async fn frame(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let rid = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(valid_request_id)
        .unwrap_or_else(|| format!("req_{:032x}", rand::random::<u128>()));
    req.extensions_mut().insert(RequestId(rid.clone()));
    let state = req.app_data::<web::Data<ApiState>>().cloned();
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let started = std::time::Instant::now();
    let mut res = as_problem(next.call(req).await?, &rid);
    if let Ok(v) = HeaderValue::from_str(&rid) {
        res.headers_mut()
            .insert(HeaderName::from_static(X_REQUEST_ID), v);
    }
    let status = res.status().as_u16();
    if let Some(st) = state {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        st.metrics.responses[class].fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(
        request_id = %rid,
        %method,
        %path,
        status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    Ok(res)
}

/// Turns an error answered by the framework itself (405 for a method a route lacks, 413 or
/// 400 from a raw-body extractor, …), which has no body or a plain-text one, into the same
/// problem+json as every other error. Status and headers are kept.
fn as_problem<B>(res: ServiceResponse<B>, rid: &str) -> ServiceResponse<EitherBody<B>> {
    let status = res.status();
    // Our own answers are problem+json, or JSON on purpose (`/health` says 503 in its body).
    let is_problem = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(crate::PROBLEM_JSON.as_bytes())
            || v.as_bytes().starts_with(b"application/json")
    });
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return res.map_into_left_body();
    }
    let (req, old) = res.into_parts();
    let title = status.canonical_reason().unwrap_or("Error");
    let (code, detail, extra) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed".to_owned(),
            "this endpoint does not support the request method".to_owned(),
            serde_json::json!({}),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large".to_owned(),
            "the request body is larger than 1 MiB".to_owned(),
            serde_json::json!({}),
        ),
        StatusCode::TOO_MANY_REQUESTS => (
            "rate_limited".to_owned(),
            "too many requests; try again later".to_owned(),
            serde_json::json!({}),
        ),
        s if s.is_server_error() => {
            tracing::error!(request_id = %rid, status = s.as_u16(), "error answered without a problem body");
            (
                "internal_error".to_owned(),
                "an internal error occurred; quote the request_id when reporting it".to_owned(),
                serde_json::json!({"request_id": rid}),
            )
        }
        s => (
            title.to_lowercase().replace(' ', "_"),
            format!("the request could not be handled ({})", s.as_u16()),
            serde_json::json!({}),
        ),
    };
    let mut resp = problem(status, &code, title, &detail, extra);
    let own: Vec<HeaderName> = resp.headers().keys().cloned().collect();
    for (k, v) in old.headers() {
        if !own.contains(k) && *k != header::CONTENT_LENGTH {
            resp.headers_mut().append(k.clone(), v.clone());
        }
    }
    ServiceResponse::new(req, resp).map_into_right_body()
}

fn set_rate_headers<B>(res: &mut ServiceResponse<B>, d: &RateDecision) {
    let h = res.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", d.limit.to_string()),
        ("x-ratelimit-remaining", d.remaining.to_string()),
        ("x-ratelimit-reset", d.reset_at.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    if !d.allowed {
        if let Ok(v) = HeaderValue::from_str(&d.retry_after_secs.to_string()) {
            h.insert(header::RETRY_AFTER, v);
        }
    }
}

/// Unauthenticated requests are counted per client IP before they run; authenticated ones
/// are counted per user by the `Auth` extractor. Every response gets `X-RateLimit-*`.
pub(crate) async fn rate_limit(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let Some(state) = req.app_data::<web::Data<ApiState>>().cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let ip = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    // Bearer requests are counted per user, signed agent requests per agent (by their
    // extractors); the rest per client IP here.
    let has_auth = req.headers().contains_key(header::AUTHORIZATION)
        || req.headers().contains_key("x-nexplane-agent");
    if !has_auth {
        let d = state.ip_limiter.check(&ip, state.app.now());
        req.extensions_mut().insert(d);
        if !d.allowed {
            let rid = req.extensions().get::<RequestId>().map(|r| r.0.clone());
            let resp = ApiError::from(limited(&d))
                .with_request_id(rid)
                .error_response();
            let mut res = req.into_response(resp).map_into_right_body();
            set_rate_headers(&mut res, &d);
            return Ok(res);
        }
    }
    let mut res = next.call(req).await?;
    let d = res.request().extensions().get::<RateDecision>().copied();
    let d = d.unwrap_or_else(|| state.ip_limiter.check(&ip, state.app.now()));
    set_rate_headers(&mut res, &d);
    Ok(res.map_into_left_body())
}

/// The Swagger UI page: the built-in bundle, our document, "Authorize" with a bearer token.
const DOCS_INDEX: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>Nexplane API</title>
<link rel="stylesheet" type="text/css" href="./swagger-ui.css">
<link rel="icon" type="image/png" href="./favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="./swagger-ui-bundle.js" charset="UTF-8"></script>
<script src="./swagger-ui-standalone-preset.js" charset="UTF-8"></script>
<script>
window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
</script>
</body>
</html>
"##;

/// Files the built-in Swagger UI may serve; anything else under `/docs/` is a 404 (the
/// underlying file server panics on a missing file, so it never sees one).
const DOCS_FILES: &[&str] = &[
    "index.html",
    "swagger-ui.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-ui.js",
    "favicon-16x16.png",
    "favicon-32x32.png",
    "oauth2-redirect.html",
];

/// Serves the finished OpenAPI document at `/openapi.json` and guards `/docs`.
pub(crate) async fn docs_and_spec(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let path = req.path().to_owned();
    if path == crate::openapi::SPEC_PATH {
        if let Some(state) = req.app_data::<web::Data<ApiState>>().cloned() {
            if req.method() == actix_web::http::Method::GET {
                let resp = HttpResponse::Ok()
                    .content_type("application/json")
                    .body(state.spec.to_string());
                return Ok(req.into_response(resp).map_into_right_body());
            }
        }
    }
    if (path == "/docs" || path == "/docs/") && req.method() == actix_web::http::Method::GET {
        // The file server behind this panics on the docs root with any query string, so the
        // root is always answered here.
        let resp = HttpResponse::PermanentRedirect()
            .insert_header((
                header::LOCATION,
                format!("/docs/index.html?url={}", crate::openapi::SPEC_PATH),
            ))
            .finish();
        return Ok(req.into_response(resp).map_into_right_body());
    }
    if path == "/docs/index.html" && req.method() == actix_web::http::Method::GET {
        // Our own page: the bundled one points at a public sample document (Swagger UI
        // ignores `?url=` by default), and this one loads ours and keeps the token.
        let resp = HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(DOCS_INDEX);
        return Ok(req.into_response(resp).map_into_right_body());
    }
    if let Some(file) = path.strip_prefix("/docs/") {
        if !file.is_empty() && !DOCS_FILES.contains(&file) {
            let resp = problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "Not found",
                "no such documentation file",
                serde_json::json!({}),
            );
            return Ok(req.into_response(resp).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// The answer for any route that does not exist.
pub(crate) async fn not_found(req: actix_web::HttpRequest) -> HttpResponse {
    let _ = req;
    problem(
        StatusCode::NOT_FOUND,
        "not_found",
        "Not found",
        "no such endpoint",
        serde_json::json!({}),
    )
}

/// Key of the per-IP login limit: the peer address (never fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoginKey;

impl actix_governor::KeyExtractor for LoginKey {
    type Key = String;
    type KeyExtractionError = actix_governor::SimpleKeyExtractionError<&'static str>;

    fn extract(&self, req: &ServiceRequest) -> Result<Self::Key, Self::KeyExtractionError> {
        Ok(req
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default())
    }

    fn exceed_rate_limit_response(
        &self,
        negative: &actix_governor::governor::NotUntil<
            actix_governor::governor::clock::QuantaInstant,
        >,
        _response: actix_web::HttpResponseBuilder,
    ) -> HttpResponse {
        use actix_governor::governor::clock::{Clock, DefaultClock};
        let wait = negative.wait_time_from(DefaultClock::default().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut resp = problem(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many requests",
            "too many login attempts from this address; try again later",
            serde_json::json!({}),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}
