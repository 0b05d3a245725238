//! Typed responses that also describe themselves in the OpenAPI schema.

use crate::error::ApiError;
use actix_web::body::BoxBody;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse, Responder};
use nexplane_app::AppError;
use paperclip::actix::OperationModifier;
use paperclip::v2::models::{DefaultOperationRaw, Either, Header, Response};
use paperclip::v2::schema::Apiv2Schema;
use serde::Serialize;

/// Default page size.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size.
pub const MAX_LIMIT: u32 = 500;

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> HttpResponse {
    match serde_json::to_string(body) {
        Ok(b) => HttpResponse::build(status)
            .content_type("application/json")
            .body(b),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

fn insert_response<T: Apiv2Schema>(
    op: &mut DefaultOperationRaw,
    status: StatusCode,
    headers: &[(&str, &str)],
) {
    let mut def = T::schema_with_ref();
    def.retain_ref();
    op.responses.insert(
        status.as_str().into(),
        Either::Right(Response {
            description: status.canonical_reason().map(ToString::to_string),
            schema: Some(def),
            headers: headers
                .iter()
                .map(|(name, desc)| {
                    (
                        (*name).to_owned(),
                        Header {
                            description: Some((*desc).to_owned()),
                            data_type: Some(paperclip::v2::models::DataType::String),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }),
    );
}

/// `201 Created` with a `Location` header and the resource in the body.
#[derive(Debug)]
pub struct Created<T> {
    /// Where the new resource lives.
    pub location: String,
    /// The resource.
    pub body: T,
}

impl<T: Serialize> Responder for Created<T> {
    type Body = BoxBody;
    fn respond_to(self, _: &HttpRequest) -> HttpResponse {
        let mut r = json_response(StatusCode::CREATED, &self.body);
        if let Ok(v) = header::HeaderValue::from_str(&self.location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }
}
impl<T: Apiv2Schema> Apiv2Schema for Created<T> {
    fn name() -> Option<String> {
        T::name()
    }
    fn raw_schema() -> paperclip::v2::models::DefaultSchemaRaw {
        T::raw_schema()
    }
}
impl<T: Apiv2Schema> OperationModifier for Created<T> {
    fn update_response(op: &mut DefaultOperationRaw) {
        insert_response::<T>(
            op,
            StatusCode::CREATED,
            &[("Location", "URL of the new resource")],
        );
    }
}

/// `202 Accepted` for asynchronous work: the job in the body and `Location: /jobs/{id}`.
#[derive(Debug)]
pub struct Accepted<T> {
    /// Where the job can be followed.
    pub location: String,
    /// The job.
    pub body: T,
}

impl<T: Serialize> Responder for Accepted<T> {
    type Body = BoxBody;
    fn respond_to(self, _: &HttpRequest) -> HttpResponse {
        let mut r = json_response(StatusCode::ACCEPTED, &self.body);
        if let Ok(v) = header::HeaderValue::from_str(&self.location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }
}
impl<T: Apiv2Schema> Apiv2Schema for Accepted<T> {
    fn name() -> Option<String> {
        T::name()
    }
    fn raw_schema() -> paperclip::v2::models::DefaultSchemaRaw {
        T::raw_schema()
    }
}
impl<T: Apiv2Schema> OperationModifier for Accepted<T> {
    fn update_response(op: &mut DefaultOperationRaw) {
        insert_response::<T>(
            op,
            StatusCode::ACCEPTED,
            &[("Location", "URL of the job (`/jobs/{id}`)")],
        );
    }
}

/// One page of a list: a JSON array, with `Link: <…>; rel="next"` and `X-Next-Cursor` when
/// more items exist.
#[derive(Debug)]
pub struct Paged<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Cursor of the next page, if any.
    pub next_cursor: Option<String>,
}

impl<T: Serialize> Responder for Paged<T> {
    type Body = BoxBody;
    fn respond_to(self, req: &HttpRequest) -> HttpResponse {
        let mut r = json_response(StatusCode::OK, &self.items);
        if let Some(c) = &self.next_cursor {
            let mut query: Vec<String> = req
                .query_string()
                .split('&')
                .filter(|kv| !kv.is_empty() && !kv.starts_with("cursor="))
                .map(str::to_owned)
                .collect();
            query.push(format!("cursor={c}"));
            let link = format!("<{}?{}>; rel=\"next\"", req.path(), query.join("&"));
            if let Ok(v) = header::HeaderValue::from_str(&link) {
                r.headers_mut().insert(header::LINK, v);
            }
            if let Ok(v) = header::HeaderValue::from_str(c) {
                r.headers_mut()
                    .insert(header::HeaderName::from_static("x-next-cursor"), v);
            }
        }
        r
    }
}
impl<T: Apiv2Schema> Apiv2Schema for Paged<T> {
    fn raw_schema() -> paperclip::v2::models::DefaultSchemaRaw {
        <Vec<T>>::raw_schema()
    }
}
impl<T: Apiv2Schema> OperationModifier for Paged<T> {
    fn update_response(op: &mut DefaultOperationRaw) {
        insert_response::<Vec<T>>(
            op,
            StatusCode::OK,
            &[
                ("Link", "`<…&cursor=…>; rel=\"next\"` when more items exist"),
                (
                    "X-Next-Cursor",
                    "cursor of the next page when more items exist",
                ),
            ],
        );
    }
}

/// Checks `limit` (default 50, 1..=500, else 422).
pub fn check_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(AppError::field("limit", "must be between 1 and 500").into()),
    }
}

/// Encodes a keyset position as an opaque cursor.
pub fn encode_cursor(key: &str) -> String {
    hex::encode(key.as_bytes())
}

/// Decodes a cursor; a malformed one is a 400.
pub fn decode_cursor(c: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(c) = c else { return Ok(None) };
    hex::decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .map(Some)
        .ok_or_else(|| AppError::BadRequest("cursor is not valid".into()).into())
}

/// Cuts a `limit + 1` fetch down to `limit` and computes the next cursor from `key`.
pub fn paginate<T, U>(
    mut rows: Vec<T>,
    limit: u32,
    key: impl Fn(&T) -> String,
    map: impl Fn(&T) -> U,
) -> Paged<U> {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(|r| encode_cursor(&key(r)))
    } else {
        None
    };
    Paged {
        items: rows.iter().map(map).collect(),
        next_cursor,
    }
}
