use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferroclaw_common::{Config, grpc, ready, shutdown, telemetry};

/// ferroclaw gateway: REST API, webhooks and gRPC ingress.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Config file (default: $FERROCLAW_CONFIG, else ./ferroclaw.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init("gateway");
    let config = Config::load(args.config.as_deref())?;
    let http_addr = config.gateway.http_addr;
    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot listen on {http_addr}"))?;
    let grpc_listener = grpc::bind(config.gateway.grpc.listen).await?;
    let shutdown = shutdown::on_signal();
    ready::announce(
        "gateway",
        grpc_listener.local_addr().ok(),
        http.local_addr().ok(),
    );
    ferroclaw_gateway::run(config, http, grpc_listener, shutdown)
        .await
        .context("gateway failed")
}
