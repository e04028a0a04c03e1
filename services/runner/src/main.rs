use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferroclaw_common::{Config, grpc, ready, shutdown, telemetry};

/// ferroclaw runner: sessions, session directories and agents.
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
    telemetry::init("runner");
    let config = Config::load(args.config.as_deref())?;
    let listener = grpc::bind(config.runner.listen).await?;
    let shutdown = shutdown::on_signal();
    ready::announce("runner", listener.local_addr().ok(), None);
    ferroclaw_runner::run(config, listener, shutdown)
        .await
        .context("runner failed")
}
