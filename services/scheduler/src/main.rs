use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferroclaw_common::{Config, grpc, ready, shutdown, telemetry};

/// ferroclaw scheduler: scheduled tasks.
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
    telemetry::init("scheduler");
    let config = Config::load(args.config.as_deref())?;
    let listener = grpc::bind(config.scheduler.listen).await?;
    let shutdown = shutdown::on_signal();
    ready::announce("scheduler", listener.local_addr().ok(), None);
    ferroclaw_scheduler::run(config, listener, shutdown)
        .await
        .context("scheduler failed")
}
