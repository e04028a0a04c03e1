//! gRPC serving and client helpers: every server carries health and reflection.

use crate::metrics::GrpcServerMetricsLayer;
use crate::telemetry::GrpcServerTraceLayer;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::grpc_auth::{AttachToken, GrpcChannel, RequireToken};

/// A server's routes behind its caller check.
pub type AuthRouter = Router<
    Stack<RequireToken, Stack<GrpcServerTraceLayer, Stack<GrpcServerMetricsLayer, Identity>>>,
>;

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Auth(#[from] crate::grpc_auth::AuthError),
    #[error("invalid gRPC URL {url:?}: {message}")]
    Url { url: String, message: String },
}

/// A server builder with `grpc.health.v1` (reporting `S` as serving) and reflection, whose
/// calls (health excepted) must present what `auth` requires.
pub async fn server_for<S: NamedService>(
    auth: RequireToken,
) -> Result<(AuthRouter, HealthReporter), GrpcError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let router = Server::builder()
        // Outside the token check, so refused calls are counted too.
        .layer(GrpcServerMetricsLayer)
        .layer(GrpcServerTraceLayer)
        .layer(auth)
        .add_service(health)
        // Both reflection versions: grpcurl speaks v1, many clients (Python's
        // grpcio-reflection, older tools) only v1alpha.
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok((router, reporter))
}

/// What every server reflects: ferroclaw's services, health and both reflection versions
/// (each build lists both, so a client of either version sees the whole server).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferroclaw_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false)
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GrpcError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GrpcError::Bind { addr, source })
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains open calls.
pub async fn serve(
    router: AuthRouter,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    // Without TCP_NODELAY, a response written in several pieces waits for the peer's
    // delayed ACK (Nagle): about 40 ms per call on loopback.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    });
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// A channel that connects on first use, reconnects by itself after a peer restarts, and
/// presents `auth` on every call, within the default [`CallLimits`]. `url` may list several
/// instances of the service, comma-separated: calls then go to those that serve
/// ([`crate::grpc_instances`]).
pub fn channel(url: &str, auth: AttachToken) -> Result<GrpcChannel, GrpcError> {
    channel_with_limits(url, auth, CallLimits::default())
}

/// [`channel`] with other limits (tests use short ones).
pub fn channel_with_limits(
    url: &str,
    auth: AttachToken,
    limits: CallLimits,
) -> Result<GrpcChannel, GrpcError> {
    let instances = crate::grpc_instances::instances(url);
    let endpoints = instances
        .iter()
        .map(|u| Ok((u.to_string(), endpoint(u)?)))
        .collect::<Result<Vec<_>, GrpcError>>()?;
    let channel = match endpoints.as_slice() {
        [] => {
            return Err(GrpcError::Url {
                url: url.to_string(),
                message: "no URL in it".into(),
            });
        }
        [(_, one)] => one.connect_lazy(),
        _ => crate::grpc_instances::balanced(endpoints)?,
    };
    Ok(GrpcChannel::new(LimitedChannel::new(channel, limits), auth))
}

/// How every internal client connects to one peer instance.
fn endpoint(url: &str) -> Result<Endpoint, GrpcError> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| GrpcError::Url {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // A peer that stops answering pings (hung, or its host gone) fails its open calls
        // and streams within interval + timeout.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// Bounds on an internal client, so a hung peer cannot pile up requests: at most
/// `max_in_flight` calls wait for response headers at once (more queue for a slot within
/// their deadline), and a unary call without a deadline of its own gets `default_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub default_timeout: Duration,
    pub max_in_flight: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            max_in_flight: 512,
        }
    }
}

/// Methods that legitimately stay open: server streams (`Watch*`, whose headers come at
/// once but whose body lasts) and the conversation long-poll, whose callers set a deadline
/// from the wait they ask for. They get no default timeout; keep-alive pings still end
/// them when the peer is gone.
fn is_long_lived(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    method.starts_with("Watch") || method == "ListConversationMessages"
}

/// The deadline a call runs under: its own `grpc-timeout` (set with
/// `tonic::Request::set_timeout`, plus a moment for the peer's own DEADLINE_EXCEEDED to
/// arrive first), else the default unless it is long-lived.
fn call_deadline(request: &http::Request<Body>, limits: &CallLimits) -> Option<Duration> {
    let own = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    match own {
        Some(own) => Some(own + Duration::from_secs(1)),
        None if is_long_lived(request.uri().path()) => None,
        None => Some(limits.default_timeout),
    }
}

/// `grpc-timeout` is at most 8 digits and a unit (gRPC over HTTP/2 spec).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A tonic channel under [`CallLimits`]. Every way a call can be lost below gRPC (no
/// connection, the connection cut mid-call or mid-stream, no answer in time) comes out as
/// `UNAVAILABLE` or `DEADLINE_EXCEEDED` naming the method and the cause, instead of
/// tonic's `UNKNOWN "transport error"`, so callers can tell "retry later" from a bug.
#[derive(Clone)]
pub struct LimitedChannel {
    inner: Channel,
    slots: Arc<Semaphore>,
    limits: CallLimits,
}

impl LimitedChannel {
    pub fn new(inner: Channel, limits: CallLimits) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            limits,
        }
    }
}

/// The method a request calls, without the leading slash: `ferroclaw.v1.Runner/Enqueue`.
fn method_of<B>(request: &http::Request<B>) -> String {
    request.uri().path().trim_start_matches('/').to_string()
}

fn lost(method: &str, error: &(dyn std::error::Error + 'static)) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "{method}: peer unreachable or connection lost: {}",
        crate::error_text::with_causes(error)
    ))
}

impl tower::Service<http::Request<Body>> for LimitedChannel {
    type Response = http::Response<Body>;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    // Readiness is awaited inside the call, after a slot is taken, so the wait for a slot
    // counts against the call's deadline.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The caller's trace goes with the call (W3C traceparent in the metadata).
        crate::telemetry::inject_traceparent(request.headers_mut());
        let method = method_of(&request);
        let deadline = call_deadline(&request, &self.limits);
        let slots = self.slots.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let call = async {
                let _slot = slots
                    .acquire_owned()
                    .await
                    .map_err(|_| tonic::Status::unavailable(format!("{method}: channel closed")))?;
                std::future::poll_fn(|cx| tower::Service::poll_ready(&mut inner, cx))
                    .await
                    .map_err(|e| lost(&method, &e))?;
                let response = tower::Service::call(&mut inner, request)
                    .await
                    .map_err(|e| lost(&method, &e))?;
                // The slot is released here, at the headers: a stream's body does not hold it.
                let (parts, body) = response.into_parts();
                let body = Body::new(LossMapped {
                    inner: body,
                    method: method.clone(),
                });
                Ok(http::Response::from_parts(parts, body))
            };
            match deadline {
                None => call.await,
                Some(deadline) => tokio::time::timeout(deadline, call)
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::deadline_exceeded(format!(
                            "{method}: no answer within {deadline:?}"
                        )))
                    }),
            }
        })
    }
}

/// A response body whose transport errors (the connection lost mid-body) read as
/// `UNAVAILABLE`; statuses the peer sent in trailers are not body errors and pass as they are.
struct LossMapped {
    inner: Body,
    method: String,
}

impl http_body::Body for LossMapped {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(status))) => {
                Poll::Ready(Some(Err(tonic::Status::unavailable(format!(
                    "{}: connection lost mid-response: {}",
                    this.method,
                    status.message()
                )))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Asks a peer's health service whether it serves (`""` = the whole server).
pub async fn is_serving(channel: GrpcChannel, service: &str) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut client = HealthClient::new(channel);
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    match tokio::time::timeout(Duration::from_secs(2), client.check(request)).await {
        Ok(Ok(response)) => response.into_inner().status == 1,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn streams_and_the_long_poll_get_no_default_timeout() {
        let limits = CallLimits::default();
        let request = |path: &str, timeout: Option<&str>| {
            let mut builder = http::Request::builder().uri(format!("http://peer{path}"));
            if let Some(t) = timeout {
                builder = builder.header("grpc-timeout", t);
            }
            builder.body(Body::empty()).unwrap()
        };
        let deadline = |path, timeout| call_deadline(&request(path, timeout), &limits);
        assert_eq!(
            deadline("/ferroclaw.v1.Runner/ListSessions", None),
            Some(limits.default_timeout)
        );
        assert_eq!(deadline("/ferroclaw.v1.Runner/WatchOutbound", None), None);
        assert_eq!(
            deadline("/ferroclaw.v1.Delivery/ListConversationMessages", None),
            None
        );
        // A deadline of the caller's own wins, either way.
        assert_eq!(
            deadline(
                "/ferroclaw.v1.Delivery/ListConversationMessages",
                Some("90S")
            ),
            Some(Duration::from_secs(91))
        );
        assert_eq!(
            deadline("/ferroclaw.v1.Runner/ListSessions", Some("100m")),
            Some(Duration::from_millis(1100))
        );
    }

    /// A peer that completes the HTTP/2 handshake, then never answers; counts the calls
    /// (HEADERS frames) that reached it.
    async fn hung_peer() -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    // Server SETTINGS (empty), then an ACK of the client's.
                    let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                    let _ = tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                    let mut preface = [0u8; 24];
                    if tcp.read_exact(&mut preface).await.is_err() {
                        return;
                    }
                    loop {
                        let mut head = [0u8; 9];
                        if tcp.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0u8; len];
                        if tcp.read_exact(&mut payload).await.is_err() {
                            return;
                        }
                        if head[3] == 0x1 {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        (url, calls)
    }

    async fn check(channel: GrpcChannel) -> Result<(), tonic::Status> {
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn a_hung_peer_times_out_and_holds_at_most_the_limit() {
        let (url, calls) = hung_peer().await;
        let limits = CallLimits {
            default_timeout: Duration::from_millis(600),
            max_in_flight: 2,
        };
        let channel = channel_with_limits(&url, AttachToken::new(None).unwrap(), limits).unwrap();
        let started = Instant::now();
        let pending: Vec<_> = (0..5)
            .map(|_| tokio::spawn(check(channel.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "only two calls may be in flight"
        );
        for call in pending {
            let status = call.await.unwrap().unwrap_err();
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(
                status.message().contains("grpc.health.v1.Health/Check"),
                "{status:?}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // (Whether a queued call reaches the peer in the instant the first two time out and
        // free their slots, or times out itself first, is a race of two timers set together:
        // CI saw both. The limit is what the count at 300 ms checks.)
    }

    #[tokio::test]
    async fn a_peer_that_drops_the_connection_mid_call_is_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                // Read the request's start, then vanish like a killed process.
                let mut buf = [0u8; 64];
                let _ = tcp.read(&mut buf).await;
                drop(tcp);
            }
        });
        let channel = channel(&url, AttachToken::new(None).unwrap()).unwrap();
        let status = check(channel).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("grpc.health.v1.Health/Check"),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn nobody_listening_is_unavailable() {
        // Bind then drop: a port with no listener.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let channel = channel(&format!("http://{addr}"), AttachToken::new(None).unwrap()).unwrap();
        let status = check(channel).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    #[tokio::test]
    async fn a_stream_outlives_the_default_timeout() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("probe", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        let limits = CallLimits {
            default_timeout: Duration::from_millis(200),
            max_in_flight: 4,
        };
        let channel = channel_with_limits(&url, AttachToken::new(None).unwrap(), limits).unwrap();
        let mut stream = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: "probe".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::NotServing);
        tokio::time::sleep(Duration::from_millis(600)).await;
        reporter
            .set_service_status("probe", tonic_health::ServingStatus::Serving)
            .await;
        let next = stream.message().await.unwrap().unwrap();
        assert_eq!(next.status(), ServingStatus::Serving);
        // A unary call on the same channel still works (the stream holds no slot).
        assert!(is_serving(channel, "probe").await);
        shutdown.cancel();
    }
}
