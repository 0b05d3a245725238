//! `GET /metrics`: Prometheus text format (public).

use crate::state::ApiState;
use actix_web::{web, HttpResponse};
use std::sync::atomic::Ordering;

/// Renders the counters.
pub(crate) async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    let mut out = String::new();
    out.push_str(
        "# HELP nexplane_build_info Build information.\n# TYPE nexplane_build_info gauge\n",
    );
    out.push_str(&format!(
        "nexplane_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    ));
    out.push_str("# HELP nexplane_http_responses_total HTTP responses by status class.\n");
    out.push_str("# TYPE nexplane_http_responses_total counter\n");
    for (i, c) in state.metrics.responses.iter().enumerate() {
        out.push_str(&format!(
            "nexplane_http_responses_total{{class=\"{}xx\"}} {}\n",
            i + 1,
            c.load(Ordering::Relaxed)
        ));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out)
}
