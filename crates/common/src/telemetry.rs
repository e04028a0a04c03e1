//! Logging and tracing. Logs: `tracing` with text on a terminal and JSON lines otherwise;
//! `RUST_LOG` filters. Traces: when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans are exported over OTLP/gRPC, with
//! `service.name` = `ferroclaw-<service>` unless `OTEL_SERVICE_NAME` says otherwise; the
//! SDK reads the other `OTEL_*` variables (sampler, batch delays, headers, timeout).
//! Without it nothing is exported and the propagation helpers below do nothing.
//!
//! A message's trace travels as a W3C `traceparent`: in gRPC metadata between services
//! ([`GrpcServerTraceLayer`], and the clients in [`crate::grpc`]), in the `trace` column of
//! mailbox rows to and from the agent, and in `OutboundMessage.trace` to delivery.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether spans are exported: the propagation helpers are free when not.
static EXPORTING: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The OTLP endpoint from the environment, when tracing is wanted.
pub fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
}

/// Installs the global subscriber for `service` (logs to stderr: stdout carries the
/// readiness line), and the OTLP exporter when the environment asks for one. Must run
/// inside the Tokio runtime (the exporter's gRPC channel lives there). Call [`shutdown`]
/// before the process exits, so the last spans are sent.
pub fn init(service: &str) {
    let otel = otlp_endpoint().and_then(|_| match tracer_provider(service) {
        Ok(provider) => Some(provider),
        Err(e) => {
            eprintln!("OpenTelemetry: cannot export spans: {e}");
            None
        }
    });
    // Spans go to the collector whatever RUST_LOG lets into the logs: each layer filters
    // on its own.
    let otel_layer = otel.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(format!("ferroclaw-{service}")))
            .with_filter(span_filter())
    });
    let terminal = std::io::stderr().is_terminal();
    let text = terminal.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter())
    });
    let json = (!terminal).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(log_filter())
    });
    let result = tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(otel_layer)
        .try_init();
    if result.is_ok() {
        if let Some(provider) = otel {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            let _ = PROVIDER.set(provider);
            EXPORTING.store(true, Ordering::Relaxed);
        }
        tracing::debug!(service, exporting = exporting(), "telemetry initialised");
    }
}

/// What the logs show: `RUST_LOG`, else info without the transport crates' chatter.
fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn,hyper=warn"))
}

/// What becomes spans: ferroclaw's own, at info and above.
fn span_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_target("ferroclaw", tracing::Level::INFO)
        .with_default(tracing::Level::WARN)
}

fn tracer_provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    // The SDK's resource detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
    // ferroclaw's name is the default they override.
    let service_name_set = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !service_name_set {
        resource = resource.with_service_name(format!("ferroclaw-{service}"));
    }
    let resource = resource.build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Sends the spans still buffered and stops the exporter. Runs the blocking flush off the
/// runtime's threads: the exporter's channel needs the runtime to make progress.
pub async fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let provider = provider.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.shutdown() {
                eprintln!("OpenTelemetry: flushing spans failed: {e}");
            }
        })
        .await;
    }
}

/// The W3C `traceparent` of `span`, or an empty string when nothing is exported.
pub fn traceparent_of(span: &tracing::Span) -> String {
    if !exporting() {
        return String::new();
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// The `traceparent` of the current span (see [`traceparent_of`]).
pub fn current_traceparent() -> String {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the span a `traceparent` names, when it is a valid one. A
/// malformed value (it may come from outside: a webhook's header, an agent's row) is
/// ignored: the span starts a trace of its own.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if !exporting() || traceparent.is_empty() || traceparent.len() > 128 {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Runs every gRPC call a server answers in a span that continues the caller's trace (the
/// `traceparent` in its metadata). A pass-through when nothing is exported.
#[derive(Clone, Copy, Default)]
pub struct GrpcServerTraceLayer;

impl<S> tower::Layer<S> for GrpcServerTraceLayer {
    type Service = GrpcServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerTrace { inner }
    }
}

#[derive(Clone)]
pub struct GrpcServerTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcServerTrace<S>
where
    S: tower::Service<http::Request<B>> + Send,
    S::Future: Send + 'static,
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
        if !exporting() {
            return Box::pin(self.inner.call(request));
        }
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        if let Some(parent) = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            continue_trace(&span, parent);
        }
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(future.instrument(span))
    }
}

/// Adds the current span's `traceparent` to an outgoing gRPC request's metadata.
pub fn inject_traceparent(headers: &mut http::HeaderMap) {
    let traceparent = current_traceparent();
    if !traceparent.is_empty()
        && let Ok(value) = http::HeaderValue::from_str(&traceparent)
    {
        headers.insert("traceparent", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_propagated_when_nothing_is_exported() {
        assert!(!exporting());
        let span = tracing::info_span!("x");
        assert_eq!(traceparent_of(&span), "");
        continue_trace(
            &span,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let mut headers = http::HeaderMap::new();
        inject_traceparent(&mut headers);
        assert!(headers.is_empty());
    }
}
