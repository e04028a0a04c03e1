//! `ferroclaw`: the operator CLI. A library too, so the multi-call binary of the services
//! image (`ferroclaw-services`) can be `ferroclaw` as well.

mod api;
mod chat;
mod sse;
mod status;
mod table;
mod up;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "ferroclaw: a self-hosted personal AI assistant platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the four services locally (agents as local processes) until Ctrl-C.
    Up {
        /// Where databases and session directories live.
        #[arg(long, default_value = "ferroclaw-data")]
        data_dir: PathBuf,
        /// Where the REST API listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: String,
        /// Config file (default: $FERROCLAW_CONFIG, else ./ferroclaw.toml when present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Send a chat message to an API conversation and print the replies.
    Send {
        #[command(flatten)]
        api: api::ApiArgs,
        #[arg(long, short, default_value = "cli")]
        conversation: String,
        #[arg(long, default_value = "operator")]
        sender: String,
        /// Seconds to wait for replies (0: do not wait).
        #[arg(long, default_value_t = 30.0)]
        wait: f64,
        /// Makes a retried send safe: the same key is accepted once.
        #[arg(long)]
        idempotency_key: Option<String>,
        text: String,
    },
    /// Chat in an API conversation: each line typed is sent, replies print as they arrive
    /// (over the conversation's event stream). Ctrl-D ends.
    Chat {
        #[command(flatten)]
        api: api::ApiArgs,
        #[arg(long, short)]
        conversation: String,
        #[arg(long, default_value = "operator")]
        sender: String,
    },
    /// Scheduled tasks: list them, see a task's runs, pause, resume, cancel or run one now.
    Tasks {
        #[command(flatten)]
        api: api::ApiArgs,
        #[command(subcommand)]
        action: api::TaskCommand,
    },
    /// The services, the agents against the cap, the queue and recent delivery failures,
    /// as tables. Exits 1 when a service does not answer.
    Status {
        #[command(flatten)]
        api: api::ApiArgs,
    },
    /// Sessions as a table: state, last activity, messages in and out, tokens and cost.
    Sessions(status::SessionsArgs),
    /// Exit 0 when a service answers: `grpc://HOST:PORT` (gRPC health), `http://…` (GET),
    /// or `tcp://HOST:PORT` (a connection opens).
    /// For container health checks, where images hold no shell or curl.
    Probe { target: String },
    /// Inject a webhook: a JSON document (argument, or stdin when absent).
    Hook {
        #[command(flatten)]
        api: api::ApiArgs,
        source: String,
        json: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

/// Runs the CLI with `args` (the program name first, as `std::env::args_os`).
pub async fn main_from(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Up {
            data_dir,
            http_addr,
            config,
        } => {
            ferroclaw_common::telemetry::init("ferroclaw");
            up::run(data_dir, http_addr, config).await
        }
        Command::Send {
            api,
            conversation,
            sender,
            wait,
            idempotency_key,
            text,
        } => {
            api::send(
                &api,
                &conversation,
                &sender,
                &text,
                wait,
                idempotency_key.as_deref(),
            )
            .await
        }
        Command::Chat {
            api,
            conversation,
            sender,
        } => chat::run(&api, &conversation, &sender).await,
        Command::Tasks { api, action } => api::tasks(&api, action).await,
        Command::Probe { target } => probe(&target).await,
        Command::Status { api } => status::status(&api).await,
        Command::Sessions(args) => status::sessions(&args).await,
        Command::Hook {
            api,
            source,
            json,
            idempotency_key,
        } => api::hook(&api, &source, json, idempotency_key.as_deref()).await,
    }
}

async fn probe(target: &str) -> anyhow::Result<()> {
    // tcp://host:port: can a connection be opened at all (what a network allows).
    if let Some(addr) = target.strip_prefix("tcp://") {
        let connect = tokio::net::TcpStream::connect(addr);
        return match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => anyhow::bail!("{target}: {e}"),
            Err(_) => anyhow::bail!("{target}: no answer within 3 s"),
        };
    }
    if let Some(addr) = target.strip_prefix("grpc://") {
        let channel = ferroclaw_common::grpc::channel(
            &format!("http://{addr}"),
            ferroclaw_common::grpc_auth::AttachToken::new(None)?,
        )?;
        anyhow::ensure!(
            ferroclaw_common::grpc::is_serving(channel, "").await,
            "{target} is not serving"
        );
        return Ok(());
    }
    let response = reqwest::Client::new()
        .get(target)
        .timeout(std::time::Duration::from_secs(3))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{target}: {}",
        response.status()
    );
    Ok(())
}
