//! The gateway's Prometheus metrics: REST requests by route, method and status, with their
//! latency, and the scrape endpoint itself (`GET /metrics`, on the REST port).

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferroclaw_common::metrics::{
    self, HistogramVec, IntCounterVec, LATENCY_BUCKETS, counter_vec, histogram_vec,
};

struct HttpMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

static METRICS: LazyLock<HttpMetrics> = LazyLock::new(|| HttpMetrics {
    requests: counter_vec(
        "ferroclaw_http_requests_total",
        "REST requests answered, by route template, method and status code.",
        &["route", "method", "status"],
    ),
    seconds: histogram_vec(
        "ferroclaw_http_request_seconds",
        "Time to answer a REST request (for streams and long-polls: until the answer starts).",
        &["route", "method"],
        LATENCY_BUCKETS,
    ),
});

/// Counts and times every request. Labels are the route's template (`/v1/sessions/{id}`),
/// never the path a client sent, and only the methods the API knows, so no client can add
/// label values.
pub async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    METRICS
        .requests
        .with_label_values(&[&route, method, response.status().as_str()])
        .inc();
    METRICS
        .seconds
        .with_label_values(&[&route, method])
        .observe(metrics::seconds_since(started));
    response
}

/// Every metric of the gateway in Prometheus' text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus metrics in the text exposition format (version 0.0.4)", content_type = "text/plain", body = String))
)]
pub(crate) async fn scrape() -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(),
    )
        .into_response()
}
