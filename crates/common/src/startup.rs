//! The start of every gRPC service binary: telemetry, config, listeners, shutdown token, and
//! the readiness line the service prints once it can serve (see [`Ready`]).

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::grpc::{self, GrpcError};
use crate::ready::Ready;
use crate::{shutdown, telemetry};

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
    /// The readiness line naming the bound addresses: `run` prints it once its database is
    /// open and migrated, right before it serves.
    pub ready: Ready,
}

/// Loads the config, binds the service's gRPC address (`listen` picks it from the config),
/// arms the shutdown signals and prepares the readiness line (not printed yet).
pub async fn grpc_service(
    name: &str,
    config_path: Option<&Path>,
    listen: impl Fn(&Config) -> SocketAddr,
) -> Result<Startup, StartupError> {
    let (config, listener) = load_and_bind(name, config_path, listen).await?;
    Ok(prepare(name, config, listener, None))
}

/// As [`grpc_service`], for a service that also serves HTTP (the runner's credential
/// proxy): both addresses are bound, and the readiness line names them.
pub async fn grpc_and_http_service(
    name: &str,
    config_path: Option<&Path>,
    listen: impl Fn(&Config) -> SocketAddr,
    http_listen: impl Fn(&Config) -> SocketAddr,
) -> Result<(Startup, TcpListener), StartupError> {
    let (config, listener) = load_and_bind(name, config_path, listen).await?;
    let http = grpc::bind(http_listen(&config)).await?;
    let startup = prepare(name, config, listener, http.local_addr().ok());
    Ok((startup, http))
}

async fn load_and_bind(
    name: &str,
    config_path: Option<&Path>,
    listen: impl Fn(&Config) -> SocketAddr,
) -> Result<(Config, TcpListener), StartupError> {
    telemetry::init(name);
    let config = Config::load(config_path)?;
    let listener = grpc::bind(listen(&config)).await?;
    Ok((config, listener))
}

fn prepare(name: &str, config: Config, listener: TcpListener, http: Option<SocketAddr>) -> Startup {
    let shutdown = shutdown::on_signal();
    let ready = Ready::new(name, listener.local_addr().ok(), http);
    Startup {
        config,
        listener,
        shutdown,
        ready,
    }
}
