//! The start of every gRPC service binary: telemetry, config, listener, readiness line,
//! shutdown token.

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::grpc::{self, GrpcError};
use crate::{ready, shutdown, telemetry};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
}

/// What a service runs with.
pub struct Startup {
    pub config: Config,
    pub listener: TcpListener,
    pub shutdown: CancellationToken,
}

/// Loads the config, binds the service's gRPC address (`listen` picks it from the config),
/// announces readiness and arms the shutdown signals.
pub async fn grpc_service(
    name: &str,
    config_path: Option<&Path>,
    listen: impl Fn(&Config) -> SocketAddr,
) -> Result<Startup, StartupError> {
    telemetry::init(name);
    let config = Config::load(config_path)?;
    let listener = grpc::bind(listen(&config)).await?;
    let shutdown = shutdown::on_signal();
    ready::announce(name, listener.local_addr().ok(), None);
    Ok(Startup {
        config,
        listener,
        shutdown,
    })
}
