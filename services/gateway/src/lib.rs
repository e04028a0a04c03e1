//! The gateway: the edge. REST API for people and programs, gRPC ingress, routes and API
//! tokens (ARCHITECTURE.md §2, §9).

pub mod command_gate;
pub mod console;
pub mod conversation_events;
pub mod conversation_message;
mod discord;
pub mod error;
mod grpc_service;
pub mod http;
mod http_metrics;
mod http_trace;
pub mod ingress;
pub mod openapi;
mod operator_api;
mod tasks_api;
#[cfg(test)]
mod test_router;

use std::sync::Arc;

use axum::serve::ListenerExt;
use ferroclaw_common::ready::Ready;
use ferroclaw_common::{Config, grpc, grpc_auth};
use ferroclaw_proto::v1::gateway_server::GatewayServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::grpc_service::GatewayService;
use crate::http::AppState;
use crate::ingress::Ingress;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Grpc(#[from] grpc::GrpcError),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// Serves the REST API on `http` and gRPC on `grpc_listener` until `shutdown`; prints
/// `ready` once both serve.
pub async fn run(
    config: Config,
    http: TcpListener,
    grpc_listener: TcpListener,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<(), GatewayError> {
    let config = Arc::new(config);
    let (internal, _) =
        grpc_auth::internal_auth(&config.data_dir).map_err(grpc::GrpcError::from)?;
    let runner = grpc::channel(&config.runner.addr().url(), internal.clone())?;
    let delivery = grpc::channel(&config.delivery.url(), internal.clone())?;
    let scheduler = grpc::channel(&config.scheduler.url(), internal)?;
    let ingress = Ingress::new(config.clone(), runner.clone());
    let state = AppState {
        config: config.clone(),
        shutdown: shutdown.clone(),
        ingress: ingress.clone(),
        runner,
        delivery,
        scheduler,
    };
    let (router, _health) = grpc::server_for::<GatewayServer<GatewayService>>(
        // The public Gateway takes the same API token as REST (open on loopback without one).
        grpc_auth::RequireToken::new(config.gateway.api_token.as_deref(), "API token"),
    )
    .await?;
    let router = router.add_service(GatewayServer::new(GatewayService {
        ingress: ingress.clone(),
        delivery: state.delivery.clone(),
        shutdown: shutdown.clone(),
    }));
    let grpc_task = tokio::spawn(grpc::serve(router, grpc_listener, shutdown.clone()));
    // No database of its own: ready once its routes are built (REST accepts right below).
    ready.announce();
    let discord = discord::start(
        config.clone(),
        state.ingress.clone(),
        state.delivery.clone(),
        shutdown.clone(),
    )
    .await;
    tracing::info!(addr = ?http.local_addr().ok(), "gateway REST API listening");
    // TCP_NODELAY: see `grpc::serve`.
    let http = http.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(http, http::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(GatewayError::Http)?;
    // The bot logs off (a close frame) before the process ends.
    if let Some(discord) = discord
        && let Err(e) = discord.await
    {
        tracing::error!(error = %e, "the Discord shutdown task failed");
    }
    match grpc_task.await {
        Ok(result) => result?,
        Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The gateway as its binary runs it: the config read (`config`, else `$FERROCLAW_CONFIG`,
/// else `./ferroclaw.toml`), its addresses bound, then [`run`] until SIGTERM or Ctrl-C. Both
/// `ferroclaw-gateway` and the one-binary services image start here.
pub async fn serve(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use ferroclaw_common::startup;
    let (s, http) = startup::grpc_and_http_service(
        "gateway",
        config,
        |c| c.gateway.grpc.listen,
        |c| c.gateway.http_addr,
    )
    .await?;
    let result = run(s.config, http, s.listener, s.shutdown, s.ready).await;
    // The last spans go out before the process ends.
    ferroclaw_common::telemetry::shutdown().await;
    result.context("gateway failed")
}
