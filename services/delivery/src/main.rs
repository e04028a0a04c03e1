use std::path::PathBuf;

use clap::Parser;

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
    ferroclaw_delivery::serve(args.config.as_deref()).await
}
