use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferroclaw_agent::AgentOptions;
use ferroclaw_common::{shutdown, telemetry};
use ferroclaw_mailbox::JournalMode;

/// ferroclaw-agent: answers one session's messages. Started by the runner.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The session directory (holds in/ and out/).
    #[arg(long, env = "FERROCLAW_SESSION_DIR", default_value = "/session")]
    session_dir: PathBuf,
    /// The agent's folder: the operator's instructions (AGENT.md), read-only for agents.
    #[arg(long, env = "FERROCLAW_AGENT_DIR", default_value = "/agent")]
    agent_dir: PathBuf,
    /// The session's own workspace: the tools' working directory and the notes the agent
    /// keeps (default: `out/workspace` in the session directory).
    #[arg(long, env = "FERROCLAW_WORKSPACE_DIR")]
    workspace_dir: Option<PathBuf>,
    /// Memory shared by the agent's sessions (only with `agents.shared_memory = true`).
    #[arg(long, env = "FERROCLAW_MEMORY_DIR")]
    memory_dir: Option<PathBuf>,
    /// Shared read-only memory.
    #[arg(long, env = "FERROCLAW_GLOBAL_DIR", default_value = "/global")]
    global_dir: PathBuf,
    #[arg(long, env = "FERROCLAW_PROVIDER", default_value = "echo")]
    provider: String,
    /// IANA time zone (the session's meta overrides it).
    #[arg(long, env = "FERROCLAW_TIMEZONE", default_value = "UTC")]
    timezone: String,
    #[arg(long, env = "FERROCLAW_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    idle_timeout_secs: u64,
    #[arg(long, env = "FERROCLAW_JOURNAL_MODE", default_value = "delete")]
    journal_mode: String,
    #[arg(long, env = "FERROCLAW_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: i64,
    /// Benchmark baseline only (`pipeline-bench --poll-baseline`): look for messages every
    /// this many milliseconds instead of waking on the doorbell. 0: the doorbell.
    #[arg(long, env = "FERROCLAW_AGENT_POLL_MS", default_value_t = 0)]
    poll_ms: u64,
    /// Exit when the parent process exits.
    #[arg(long)]
    exit_with_parent: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Serve ferroclaw's tools over MCP on stdio for one turn (started by Claude Code).
    McpServer {
        #[arg(long)]
        session_dir: PathBuf,
        #[arg(long)]
        workspace_dir: PathBuf,
        /// Where the turn's messages go (JSON, as in the mailbox).
        #[arg(long)]
        destination: String,
        #[arg(long)]
        in_reply_to: i64,
        #[arg(long, default_value = "delete")]
        journal_mode: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init("agent");
    if let Some(Sub::McpServer {
        session_dir,
        workspace_dir,
        destination,
        in_reply_to,
        journal_mode,
    }) = args.command
    {
        let turn = ferroclaw_agent::mcp_server::McpTurn {
            session_dir,
            workspace_dir,
            destination: serde_json::from_str(&destination)
                .context("--destination is not a mailbox destination")?,
            in_reply_to,
            journal_mode: journal_mode
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--journal-mode: {e}"))?,
        };
        return ferroclaw_agent::mcp_server::serve(turn).await;
    }
    let timezone = args
        .timezone
        .parse()
        .map_err(|_| anyhow::anyhow!("--timezone {:?} is not an IANA time zone", args.timezone))?;
    let journal_mode: JournalMode = args
        .journal_mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--journal-mode: {e}"))?;
    let workspace_dir = args
        .workspace_dir
        .unwrap_or_else(|| args.session_dir.join("out").join("workspace"));
    let options = AgentOptions {
        session_dir: args.session_dir,
        agent_dir: args.agent_dir,
        workspace_dir,
        memory_dir: args.memory_dir,
        global_dir: args.global_dir,
        provider: args.provider,
        timezone,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        journal_mode,
        max_attempts: args.max_attempts,
        exit_with_parent: args.exit_with_parent,
        poll: (args.poll_ms > 0).then(|| Duration::from_millis(args.poll_ms)),
    };
    let shutdown = shutdown::on_signal();
    let result = ferroclaw_agent::run(options, shutdown).await;
    // The last spans go out before the process ends.
    telemetry::shutdown().await;
    result.context("agent failed")
}
