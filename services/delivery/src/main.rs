use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferroclaw_common::startup;

/// ferroclaw delivery: the outbound ledger and channel senders.
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
        startup::grpc_service("delivery", args.config.as_deref(), |c| c.delivery.listen).await?;
    ferroclaw_delivery::run(s.config, s.listener, s.shutdown)
        .await
        .context("delivery failed")
}
