//! Warm pipeline overhead: inject over REST → echo agent → reply visible through the API.
//!
//! Starts the four services (as the end-to-end tests do), warms one session per
//! conversation, then sends messages from one client per conversation, each waiting for its
//! reply through the long-poll endpoint before sending the next. Prints p50/p90/p99,
//! messages per second, and the agents the runner started per message during the timed
//! run (from the session listing's `agent_starts_total`), and the CPU time per message of
//! each process (from /proc; the agents' includes those that exited during the run).
//!
//! `cargo build --release --workspace --bins && target/release/pipeline-bench --help`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser};
use ferroclaw_e2e::Cluster;

#[derive(Parser)]
#[command(
    name = "pipeline-bench",
    about = "Warm pipeline overhead: REST in, through the echo agent, to the reply over the API"
)]
struct Options {
    /// Messages in the timed run, spread evenly over the conversations.
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Conversations (each its own session and client).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    conversations: u32,
    /// The session databases' journal.
    #[arg(long, default_value = "wal", value_parser = ["wal", "delete"])]
    journal_mode: String,
    /// Then run the same load again with notifications off and NanoClaw's waits (agents
    /// poll every 500 ms, the host reads replies every 1 s), and print both and their ratio.
    #[arg(long)]
    poll_baseline: bool,
    /// Deliveries sharing the work (more than one needs a PostgreSQL `DATABASE_URL` in the
    /// environment: they split the lanes by lease).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    deliveries: u32,
    /// Runners serving different sessions (more than one needs a PostgreSQL `DATABASE_URL`:
    /// each gets an id, and they share the data directory).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    runners: u32,
    /// Export every process's spans over OTLP to a collector started by the bench (to
    /// measure what tracing costs).
    #[arg(long)]
    otlp: bool,
}

/// NanoClaw v2's waits: its agents poll their inbound database every 500 ms, its host polls
/// the outbound databases every second.
const BASELINE_ENV: &[(&str, &str)] = &[
    ("FERROCLAW_AGENT_POLL_MS", "500"),
    ("FERROCLAW_OUTBOUND_POLL_MS", "1000"),
];

/// One timed run's figures.
struct Figures {
    p50: Duration,
    p99: Duration,
    throughput: f64,
}

/// The command line; a usage error ends the program the way clap's own errors do.
fn options() -> Options {
    let options = Options::parse();
    if options.messages < options.conversations as usize {
        Options::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--messages must be at least --conversations (one message per conversation)",
            )
            .exit();
    }
    let on_postgres = std::env::var("DATABASE_URL").is_ok_and(|u| u.starts_with("postgres"));
    if options.runners > 1 && !on_postgres {
        Options::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--runners above 1 needs DATABASE_URL=postgres://… (runners share their \
                 registry only on PostgreSQL)",
            )
            .exit();
    }
    if options.deliveries > 1 && !on_postgres {
        Options::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--deliveries above 1 needs DATABASE_URL=postgres://… (deliveries share lanes \
                 only on PostgreSQL)",
            )
            .exit();
    }
    options
}

/// Sends `count` messages in `conversation` one after another; returns each round trip.
async fn client(
    cluster: &Cluster,
    conversation: String,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (_, mut cursor) = cluster.messages(&conversation, 0, 0.0).await?;
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let text = format!("m{i}");
        let want = format!("echo: {text}");
        let started = Instant::now();
        let (status, body) = cluster.post_message(&conversation, &text, None).await?;
        if status != 202 {
            bail!("POST got {status}: {body}");
        }
        loop {
            let (messages, next) = cluster.messages(&conversation, cursor, 30.0).await?;
            cursor = next;
            if messages
                .iter()
                .any(|m| m["text"].as_str() == Some(want.as_str()))
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("{conversation}: no reply to {text}");
            }
        }
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options();
    let ours = run(&options, &[]).await?;
    if options.poll_baseline {
        println!("baseline: notifications off, agents poll every 500 ms, replies read every 1 s");
        let baseline = run(&options, BASELINE_ENV).await?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "ferroclaw vs polling baseline: p50 {:.2} ms vs {:.2} ms ({:.1}x faster), p99 {:.2} ms vs {:.2} ms ({:.1}x), throughput {:.1} vs {:.1} msg/s ({:.1}x)",
            ms(ours.p50),
            ms(baseline.p50),
            baseline.p50.as_secs_f64() / ours.p50.as_secs_f64().max(1e-9),
            ms(ours.p99),
            ms(baseline.p99),
            baseline.p99.as_secs_f64() / ours.p99.as_secs_f64().max(1e-9),
            ours.throughput,
            baseline.throughput,
            ours.throughput / baseline.throughput.max(1e-9),
        );
    }
    Ok(())
}

/// Starts a cluster with `env` added, warms it, times the load, prints the figures.
async fn run(options: &Options, env: &[(&'static str, &'static str)]) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let mut cluster_env = vec![("FERROCLAW_JOURNAL_MODE", options.journal_mode.clone())];
    cluster_env.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let collector = match options.otlp {
        true => Some(ferroclaw_e2e::otlp_receiver::OtlpReceiver::start().await?),
        false => None,
    };
    if let Some(collector) = &collector {
        cluster_env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()));
    }
    if options.runners > 1 {
        cluster_env.push(("FERROCLAW_RUNNER_ID", "runner-1".into()));
        cluster_env.push(("FERROCLAW_RUNNER_SHARED_STORAGE", "true".into()));
    }
    let mut cluster = Cluster::start(dir.path(), &cluster_env).await?;
    let mut runners = Vec::new();
    for n in 2..=options.runners {
        let id = format!("runner-{n}");
        runners.push(
            cluster
                .start_another("runner", &[("FERROCLAW_RUNNER_ID", id)])
                .await?,
        );
    }
    if !runners.is_empty() {
        // Every caller lists every runner; each runner places new sessions over all of them
        // once it has read the others' leases (every 2 s).
        let all: Vec<String> = std::iter::once(cluster.runner.grpc_url())
            .chain(runners.iter().map(|r| r.grpc_url()))
            .collect();
        cluster.envs_set("FERROCLAW_RUNNER_URL", &all.join(","));
        cluster.restart_gateway().await?;
        cluster.kill_delivery().await?;
        cluster.restart_delivery().await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut peers = Vec::new();
    for _ in 1..options.deliveries {
        peers.push(cluster.start_another("delivery", &[]).await?);
    }
    let conversations: Vec<String> = (0..options.conversations)
        .map(|i| format!("bench-{i}"))
        .collect();

    // Warm-up: every session exists and its agent runs.
    let warm: Vec<_> = conversations
        .iter()
        .map(|c| client(&cluster, c.clone(), 3))
        .collect();
    for result in futures_join(warm).await {
        result?;
    }

    let starts_before = agent_starts_total(&cluster).await?;
    let cpu_before = cpu(&cluster, &runners);
    let per_conversation = options.messages / options.conversations as usize;
    let started = Instant::now();
    let runs: Vec<_> = conversations
        .iter()
        .map(|c| client(&cluster, c.clone(), per_conversation))
        .collect();
    let mut all = Vec::new();
    for result in futures_join(runs).await {
        all.extend(result?);
    }
    let elapsed = started.elapsed();
    let starts = agent_starts_total(&cluster).await? - starts_before;
    let cpu_after = cpu(&cluster, &runners);
    all.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "journal {}  runners {}  deliveries {}  messages {}  conversations {}  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  throughput {:.1} msg/s  agent starts {}  agent starts per message {:.3}",
        options.journal_mode,
        options.runners,
        options.deliveries,
        all.len(),
        options.conversations,
        ms(percentile(&all, 0.50)),
        ms(percentile(&all, 0.90)),
        ms(percentile(&all, 0.99)),
        ms(*all.last().unwrap_or(&Duration::ZERO)),
        all.len() as f64 / elapsed.as_secs_f64(),
        starts,
        starts as f64 / all.len().max(1) as f64
    );
    let per_message = |name: &str| {
        let at = |cpu: &[(&str, f64)]| {
            cpu.iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, s)| *s)
        };
        (at(&cpu_after) - at(&cpu_before)).max(0.0) * 1000.0 / all.len().max(1) as f64
    };
    println!(
        "CPU per message: runner {:.2} ms, agents {:.2} ms, delivery {:.2} ms, gateway {:.2} ms, scheduler {:.2} ms",
        per_message("runner"),
        per_message("agents"),
        per_message("delivery"),
        per_message("gateway"),
        per_message("scheduler"),
    );
    if let Some(collector) = &collector {
        println!("spans exported: {}", collector.spans().len());
    }
    let figures = Figures {
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        throughput: all.len() as f64 / elapsed.as_secs_f64(),
    };
    for mut peer in peers.into_iter().chain(runners) {
        peer.stop(Duration::from_secs(15)).await?;
    }
    cluster.stop().await?;
    Ok(figures)
}

/// CPU seconds so far of each service (the runners together), and of the agents: those
/// the runners have reaped plus those running.
fn cpu(
    cluster: &Cluster,
    more_runners: &[ferroclaw_common::launch::ServiceProcess],
) -> Vec<(&'static str, f64)> {
    let own = |p: &ferroclaw_common::launch::ServiceProcess| {
        p.child
            .id()
            .and_then(ferroclaw_e2e::cpu_times)
            .unwrap_or_default()
    };
    let runner = std::iter::once(&cluster.runner)
        .chain(more_runners)
        .map(own)
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let running: f64 = ferroclaw_e2e::agent_processes(&cluster.data_dir)
        .into_iter()
        .filter_map(|(pid, _)| ferroclaw_e2e::cpu_times(pid))
        .map(|(own, _)| own)
        .sum();
    vec![
        ("runner", runner.0),
        ("agents", runner.1 + running),
        ("delivery", own(&cluster.delivery).0),
        ("gateway", own(&cluster.gateway).0),
        ("scheduler", own(&cluster.scheduler).0),
    ]
}

/// Agents the runners started so far, from `GET /v1/sessions`.
async fn agent_starts_total(cluster: &Cluster) -> anyhow::Result<u64> {
    let (status, listing) = cluster.get("/v1/sessions").await?;
    if status != 200 {
        bail!("GET /v1/sessions: {status} {listing}");
    }
    listing["agent_starts_total"]
        .as_u64()
        .context("the session listing has no agent_starts_total")
}

/// Runs futures concurrently on this task and returns their outputs in order.
async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
