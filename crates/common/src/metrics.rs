//! Prometheus metrics. Each process keeps its metrics in one registry (the `prometheus`
//! crate's default) and serves them as text on `GET /metrics`: the gateway on its HTTP port,
//! the other services on their metrics address (`<service>.metrics_listen`,
//! `FERROCLAW_<SERVICE>_METRICS_ADDR`), named in their readiness line.
//!
//! Label values come only from closed sets (routes, gRPC methods, outcomes, agent names from
//! the config), never from what a client sends, so no caller can grow the registry.

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use prometheus::{CounterVec, HistogramVec, IntCounterVec, IntGaugeVec};
use prometheus::{Encoder, HistogramOpts, Opts, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds, from a warm message's few milliseconds to a model's minute.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A counter family in the process's registry. Registering the same name twice (a bug) is
/// logged and the metric still counts, unexported, rather than stopping the service.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = match IntCounterVec::new(Opts::new(name, help), labels) {
        Ok(metric) => metric,
        Err(e) => unreachable_metric(name, &e),
    };
    register(name, Box::new(metric.clone()));
    metric
}

/// A gauge family in the process's registry (see [`counter_vec`]).
pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = match IntGaugeVec::new(Opts::new(name, help), labels) {
        Ok(metric) => metric,
        Err(e) => unreachable_metric(name, &e),
    };
    register(name, Box::new(metric.clone()));
    metric
}

/// A counter family of fractional values (costs) in the process's registry.
pub fn float_counter_vec(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let metric = match CounterVec::new(Opts::new(name, help), labels) {
        Ok(metric) => metric,
        Err(e) => unreachable_metric(name, &e),
    };
    register(name, Box::new(metric.clone()));
    metric
}

/// A histogram family in the process's registry (see [`counter_vec`]).
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let metric = match HistogramVec::new(opts, labels) {
        Ok(metric) => metric,
        Err(e) => unreachable_metric(name, &e),
    };
    register(name, Box::new(metric.clone()));
    metric
}

/// Names and help are constants of this code base: an invalid one is a programming error,
/// caught by the unit tests of each service's metrics.
fn unreachable_metric(name: &str, error: &prometheus::Error) -> ! {
    panic!("metric {name} is invalid: {error}")
}

fn register(name: &str, metric: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = prometheus::default_registry().register(metric) {
        tracing::warn!(metric = name, error = %e, "metric not registered");
    }
}

/// Seconds since `started`, for a histogram.
pub fn seconds_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

/// Seconds between two Unix-millisecond times (0 when the clock went backwards).
pub fn seconds_between_ms(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms).max(0) as f64 / 1000.0
}

/// Every metric of this process in the text exposition format (version 0.0.4).
pub fn render() -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus::default_registry().gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown`: a scrape endpoint on its own
/// address, for the services without an HTTP API. One request per connection, which is all
/// a Prometheus scrape needs.
pub fn serve(listener: TcpListener, shutdown: CancellationToken) -> Option<SocketAddr> {
    let addr = listener.local_addr().ok();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(answer(stream));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.cancelled() => break,
            }
        }
    });
    addr
}

/// Binds `addr` and serves `GET /metrics` there (see [`serve`]); returns the bound address
/// for the readiness line.
pub async fn serve_on(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, crate::grpc::GrpcError> {
    let listener = crate::grpc::bind(addr).await?;
    Ok(serve(listener, shutdown))
}

/// The longest request head a scrape sends, and the time it may take to send it.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn answer(mut stream: TcpStream) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let response = response_to(&head);
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

/// The whole HTTP/1.1 response to a request head.
fn response_to(head: &[u8]) -> Vec<u8> {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split(|b| *b == b'?').next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", CONTENT_TYPE, render()),
        (Some(_), Some(b"/metrics")) => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("allow: GET\r\n");
    }
    response.push_str("\r\n");
    let mut bytes = response.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// Counts and times every gRPC call a server answers, by method and status code.
#[derive(Clone, Copy, Default)]
pub struct GrpcServerMetricsLayer;

impl<S> tower::Layer<S> for GrpcServerMetricsLayer {
    type Service = GrpcServerMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcServerMetrics<S> {
    inner: S,
}

struct GrpcServerFamilies {
    calls: IntCounterVec,
    seconds: HistogramVec,
}

fn grpc_server_families() -> &'static GrpcServerFamilies {
    static FAMILIES: std::sync::OnceLock<GrpcServerFamilies> = std::sync::OnceLock::new();
    FAMILIES.get_or_init(|| GrpcServerFamilies {
        calls: counter_vec(
            "ferroclaw_grpc_server_calls_total",
            "gRPC calls answered, by method and status code (for streams: when the stream opened).",
            &["method", "code"],
        ),
        seconds: histogram_vec(
            "ferroclaw_grpc_server_call_seconds",
            "Time to answer a gRPC call (for streams: to open it).",
            &["method"],
            LATENCY_BUCKETS,
        ),
    })
}

/// The gRPC status code of a response: in its headers when the call failed before any
/// message (a "trailers-only" answer), otherwise OK for the purpose of counting.
fn grpc_code(headers: &http::HeaderMap) -> &'static str {
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        None | Some("0") => "OK",
        Some(code) => match tonic::Code::from(code.parse::<i32>().unwrap_or(2)) {
            tonic::Code::Ok => "OK",
            tonic::Code::Cancelled => "CANCELLED",
            tonic::Code::Unknown => "UNKNOWN",
            tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
            tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            tonic::Code::NotFound => "NOT_FOUND",
            tonic::Code::AlreadyExists => "ALREADY_EXISTS",
            tonic::Code::PermissionDenied => "PERMISSION_DENIED",
            tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
            tonic::Code::Aborted => "ABORTED",
            tonic::Code::OutOfRange => "OUT_OF_RANGE",
            tonic::Code::Unimplemented => "UNIMPLEMENTED",
            tonic::Code::Internal => "INTERNAL",
            tonic::Code::Unavailable => "UNAVAILABLE",
            tonic::Code::DataLoss => "DATA_LOSS",
            tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        },
    }
}

/// The method label: the request path for ferroclaw's, health's and reflection's methods;
/// anything else (a path no service has, answered UNIMPLEMENTED) is "other", so a client
/// cannot add label values.
fn method_label(path: &str, code: &str) -> String {
    if code == "UNIMPLEMENTED" || path.len() > 96 {
        "other".into()
    } else {
        path.to_string()
    }
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for GrpcServerMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => grpc_code(response.headers()),
                Err(_) => "UNAVAILABLE",
            };
            let method = method_label(&path, code);
            let families = grpc_server_families();
            families.calls.with_label_values(&[&method, code]).inc();
            families
                .seconds
                .with_label_values(&[&method])
                .observe(seconds_since(started));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_gets_the_registry_as_text() {
        let calls = counter_vec(
            "ferroclaw_test_scrapes_total",
            "Test counter.",
            &["outcome"],
        );
        calls.with_label_values(&["ok"]).inc_by(3);
        let response = String::from_utf8(response_to(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            .expect("utf-8");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains(CONTENT_TYPE));
        assert!(
            response.contains("ferroclaw_test_scrapes_total{outcome=\"ok\"} 3"),
            "{response}"
        );
        let length: usize = response
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.parse().ok())
            .expect("content-length");
        let body = response.split("\r\n\r\n").nth(1).expect("body");
        assert_eq!(body.len(), length);
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let not_found = String::from_utf8(response_to(b"GET / HTTP/1.1\r\n\r\n")).expect("utf-8");
        assert!(not_found.starts_with("HTTP/1.1 404"), "{not_found}");
        let post =
            String::from_utf8(response_to(b"POST /metrics HTTP/1.1\r\n\r\n")).expect("utf-8");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("allow: GET"));
        let garbage = String::from_utf8(response_to(b"\x00\x01")).expect("utf-8");
        assert!(garbage.starts_with("HTTP/1.1 404"), "{garbage}");
    }

    #[test]
    fn unknown_grpc_paths_share_one_label() {
        assert_eq!(method_label("/x.Y/Z", "UNIMPLEMENTED"), "other");
        assert_eq!(
            method_label("/ferroclaw.v1.Runner/Enqueue", "OK"),
            "/ferroclaw.v1.Runner/Enqueue"
        );
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_code(&headers), "OK");
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_code(&headers), "UNAVAILABLE");
        headers.insert("grpc-status", http::HeaderValue::from_static("junk"));
        assert_eq!(grpc_code(&headers), "UNKNOWN");
    }
}
