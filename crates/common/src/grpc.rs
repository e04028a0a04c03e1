//! gRPC serving and client helpers: every server carries health and reflection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::transport::{Endpoint, Server};
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::grpc_auth::{AttachToken, GrpcChannel, RequireToken};

/// A server's routes behind its caller check.
pub type AuthRouter = Router<Stack<RequireToken, Identity>>;

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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferroclaw_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let router = Server::builder()
        .layer(auth)
        .add_service(health)
        .add_service(reflection);
    Ok((router, reporter))
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
/// presents `auth` on every call.
pub fn channel(url: &str, auth: AttachToken) -> Result<GrpcChannel, GrpcError> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| GrpcError::Url {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(GrpcChannel::new(channel, auth))
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
