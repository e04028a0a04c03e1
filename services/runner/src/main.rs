use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferroclaw_common::startup;

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
    let (s, proxy) = startup::grpc_and_http_service(
        "runner",
        args.config.as_deref(),
        |c| c.runner.listen,
        |c| c.runner.proxy_listen,
    )
    .await?;
    ferroclaw_runner::run(s.config, s.listener, proxy, s.shutdown)
        .await
        .context("runner failed")
}
