use std::path::PathBuf;

use clap::Parser;

/// ferroclaw runner: sessions, session directories and agents.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Config file (default: $FERROCLAW_CONFIG, else ./ferroclaw.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(ferroclaw_runner::serve(args.config.as_deref()));
    // A read stuck on a file an agent planted holds a blocking thread, which a plain drop
    // of the runtime would wait for without end.
    runtime.shutdown_timeout(ferroclaw_runner::BLOCKING_GRACE);
    served
}
