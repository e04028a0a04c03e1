//! Agents in containers: cold start (first message of a new session → reply, through all
//! services) against a bare `docker run` of the same image doing the same work, the warm
//! pipeline through containers, and the memory of an idle agent container.
//!
//! `cargo build --release --workspace --bins && docker/build-offline.sh --profile release --tag bench --no-build && target/release/container-bench`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferroclaw_e2e::{Cluster, docker};
use ferroclaw_mailbox::content::ChatIn;
use ferroclaw_mailbox::{
    Destination, HostMailbox, InboundContent, JournalMode, NewInbound, Origin, SessionPaths,
};

/// Agents in containers: cold start against a bare `docker run`, the warm pipeline through
/// containers, and an idle agent container's memory.
///
/// Needs the service binaries and the agent image: `cargo build --release --workspace --bins &&
/// docker/build-offline.sh --profile release --tag bench --no-build`.
#[derive(Parser)]
#[command(name = "container-bench")]
struct Args {
    /// The agent image.
    #[arg(long, default_value = "ferroclaw-agent:bench")]
    image: String,
    /// Sessions (and bare `docker run`s) for the cold starts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Warm rounds: each sends one message to every session, one at a time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One `docker run --rm` of the agent on a session holding one message: it answers, then
/// exits at once (idle timeout 0).
async fn bare_run(root: &std::path::Path, image: &str, i: u64) -> anyhow::Result<Duration> {
    let paths = SessionPaths::new(root.join(format!("bare-{i}")));
    let host = HostMailbox::open(paths.clone(), JournalMode::Delete).await?;
    host.enqueue(&NewInbound {
        id: format!("m{i}"),
        content: InboundContent::Chat(ChatIn {
            text: "hi".into(),
            sender: String::new(),
            attachments: vec![],
        }),
        origin: Origin {
            channel: "api".into(),
            conversation: "c".into(),
            sender: String::new(),
            reply_to: Destination::Api {
                conversation: "c".into(),
            },
        },
        process_after: None,
        trace: None,
    })
    .await?;
    std::os::unix::fs::chown(paths.out_dir(), Some(10001), Some(10001))?;
    let started = Instant::now();
    docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--user",
        "10001:10001",
        "-v",
        &format!("{}:/session/in:ro", paths.in_dir().display()),
        "-v",
        &format!("{}:/session/out:rw", paths.out_dir().display()),
        image,
        "--session-dir",
        "/session",
        "--idle-timeout-secs",
        "0",
        "--journal-mode",
        "delete",
    ])?;
    let elapsed = started.elapsed();
    if host.unsettled_after(0, usize::MAX).await?.len() != 1 {
        bail!("the bare run did not answer");
    }
    host.close().await;
    Ok(elapsed)
}

async fn round_trip(cluster: &Cluster, conversation: &str, text: &str) -> anyhow::Result<Duration> {
    let (_, cursor) = cluster.messages(conversation, 0, 0.0).await?;
    let started = Instant::now();
    let (status, body) = cluster.post_message(conversation, text, None).await?;
    if status != 202 {
        bail!("{body}");
    }
    let want = format!("echo: {text}");
    let mut cursor = cursor;
    loop {
        let (messages, next) = cluster.messages(conversation, cursor, 30.0).await?;
        cursor = next;
        if messages
            .iter()
            .any(|m| m["text"].as_str() == Some(want.as_str()))
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("no reply in {conversation}");
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        image,
        runs,
        rounds,
    } = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut bare = Vec::new();
    for i in 0..runs {
        bare.push(bare_run(dir.path(), &image, i).await?);
    }

    let cluster = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_RUNNER_BACKEND", "docker".into()),
            ("FERROCLAW_AGENT_IMAGE", image.clone()),
            // Room for every session: warm means the agents stay up.
            ("FERROCLAW_MAX_RUNNING_AGENTS", runs.max(16).to_string()),
        ],
    )
    .await?;
    let mut cold = Vec::new();
    for i in 0..runs {
        cold.push(round_trip(&cluster, &format!("cold-{i}"), "hi").await?);
    }
    let mut warm = Vec::new();
    for round in 0..rounds {
        for i in 0..runs {
            warm.push(round_trip(&cluster, &format!("cold-{i}"), &format!("w{round}")).await?);
        }
    }
    let (bare_m, cold_m) = (median(bare), median(cold));
    let mut warm_sorted = warm.clone();
    warm_sorted.sort();
    println!(
        "cold start: bare docker run {:.0} ms, ferroclaw first message → reply {:.0} ms, ratio {:.2}",
        ms(bare_m),
        ms(cold_m),
        cold_m.as_secs_f64() / bare_m.as_secs_f64()
    );
    println!(
        "warm through containers ({} messages, one at a time): p50 {:.1} ms p99 {:.1} ms",
        warm_sorted.len(),
        ms(warm_sorted[warm_sorted.len() / 2]),
        ms(warm_sorted[warm_sorted.len() * 99 / 100])
    );
    let (_, sessions) = cluster.get("/v1/sessions").await?;
    let session = sessions["sessions"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["agent_state"] == serde_json::json!("running"))
        })
        .and_then(|s| s["id"].as_str())
        .context("a session with a running agent")?
        .to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let memory = docker(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.MemUsage}}",
        &format!("ferroclaw-agent-{session}"),
    ])?;
    println!("idle agent container memory: {}", memory.trim());
    cluster.stop().await
}
