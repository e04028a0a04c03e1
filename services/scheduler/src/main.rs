use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferroclaw_common::startup;

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
    let s =
        startup::grpc_service("scheduler", args.config.as_deref(), |c| c.scheduler.listen).await?;
    ferroclaw_scheduler::run(s.config, s.listener, s.shutdown)
        .await
        .context("scheduler failed")
}
