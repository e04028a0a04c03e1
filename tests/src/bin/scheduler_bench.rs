//! Scheduler benchmark: firing precision (due → enqueued) and scale with many tasks.
//!
//! 1. Fills the scheduler's database with `--bulk` tasks (default 100,000) due days ahead,
//!    and times the queries the firing loop makes on it: the earliest next run and the
//!    due batch.
//! 2. Starts the four services on that database, reports the scheduler's memory, then
//!    creates `--tasks` one-off tasks (default 500) due over the next seconds through gRPC
//!    and reports how late each run was enqueued (from the scheduler's run history).
//!
//! `cargo build --release --workspace --bins && target/release/scheduler-bench`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferroclaw_e2e::Cluster;
use ferroclaw_proto::v1;
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_scheduler::store::{TaskRow, TaskStore};
use serde_json::json;

/// Scheduler benchmark: firing precision (due → enqueued) and scale with many tasks.
///
/// Needs the service binaries: `cargo build --release --workspace --bins`.
#[derive(Parser)]
#[command(name = "scheduler-bench")]
struct Args {
    /// Tasks in the database, due days ahead (the scale part).
    #[arg(long, default_value_t = 100_000)]
    bulk: usize,
    /// One-off tasks created through gRPC, due over the next seconds (the precision part).
    #[arg(long, default_value_t = 500, value_parser = at_least_one)]
    tasks: usize,
    /// Milliseconds between the due times of those tasks.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(0..))]
    spacing_ms: i64,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        bulk,
        tasks,
        spacing_ms: spacing,
    } = Args::parse();
    let dir = tempfile::tempdir()?;
    let now = ferroclaw_mailbox::now_ms();

    // 1. Scale of the store.
    let store = TaskStore::open(&dir.path().join("scheduler.db")).await?;
    let started = Instant::now();
    let schedule = v1::Schedule {
        kind: "cron".into(),
        cron: "0 9 * * *".into(),
        timezone: "Europe/Berlin".into(),
        ..Default::default()
    };
    for i in 0..bulk {
        let id = format!("bulk-{i}");
        store
            .insert(&TaskRow {
                id: id.clone(),
                series_id: format!("ser-{i}"),
                session_id: format!("bulk-session-{}", i % 1000),
                agent: "main".into(),
                name: id,
                prompt: "p".into(),
                schedule: schedule.clone(),
                catch_up: "catch_up".into(),
                reply_to: json!({"kind": "api", "conversation": "bulk"}).to_string(),
                state: "active".into(),
                // Spread over the next 30 days, never within this run.
                next_run: Some(now + 86_400_000 + (i as i64 * 7_919) % (30 * 86_400_000)),
                last_run: None,
                created_at: now,
                updated_at: now,
            })
            .await?;
    }
    let insert = started.elapsed();
    let rounds = 1000;
    let started = Instant::now();
    for _ in 0..rounds {
        store.earliest_next_run().await?;
    }
    let earliest = started.elapsed() / rounds;
    let started = Instant::now();
    for _ in 0..rounds {
        store.due(now, 500).await?;
    }
    let due = started.elapsed() / rounds;
    store.close().await;
    let db_size = std::fs::metadata(dir.path().join("scheduler.db"))?.len();
    println!(
        "store: {bulk} tasks inserted in {:.1} s; earliest next run {:.0} µs; due batch {:.0} µs; database {:.1} MiB",
        insert.as_secs_f64(),
        earliest.as_secs_f64() * 1e6,
        due.as_secs_f64() * 1e6,
        db_size as f64 / 1048576.0
    );

    // 2. Precision with the services running on that database.
    let journal = std::env::var("FERROCLAW_JOURNAL_MODE").unwrap_or_else(|_| "wal".into());
    let cluster =
        Cluster::start(dir.path(), &[("FERROCLAW_JOURNAL_MODE", journal.clone())]).await?;
    println!("session journal mode: {journal}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = cluster.scheduler.child.id().context("scheduler pid")?;
    println!(
        "scheduler memory with {bulk} tasks: {} MiB RSS",
        rss_kib(pid).unwrap_or(0) / 1024
    );
    let mut sessions = Vec::new();
    for c in 0..10 {
        let (status, body) = cluster
            .post_message(&format!("prec-{c}"), "hi", None)
            .await?;
        if status != 202 {
            bail!("{body}");
        }
        sessions.push(body["session_id"].as_str().unwrap_or_default().to_string());
    }
    let mut scheduler =
        SchedulerClient::new(cluster.internal_channel(&cluster.scheduler.grpc_url())?);
    // Far enough ahead that creating them all finishes first.
    let base = ferroclaw_mailbox::now_ms() + 3_000 + tasks as i64 * 4;
    for i in 0..tasks {
        let at = chrono::DateTime::from_timestamp_millis(base + (i as i64) * spacing)
            .context("time")?
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let c = i % sessions.len();
        scheduler
            .create_task(v1::CreateTaskRequest {
                session_id: sessions[c].clone(),
                agent: "main".into(),
                task_id: format!("prec-{i}"),
                name: format!("p{i}"),
                prompt: "tick".into(),
                schedule: Some(v1::Schedule {
                    kind: "once".into(),
                    at,
                    ..Default::default()
                }),
                catch_up: String::new(),
                reply_to_json: json!({"kind": "api", "conversation": format!("prec-{c}")})
                    .to_string(),
            })
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lateness = Vec::new();
    for i in 0..tasks {
        loop {
            let runs = scheduler
                .list_runs(v1::ListRunsRequest {
                    task_id: format!("prec-{i}"),
                    limit: 1,
                })
                .await?
                .into_inner()
                .runs;
            if let Some(run) = runs.first() {
                lateness.push(run.fired_at_ms - run.scheduled_at_ms);
                break;
            }
            if Instant::now() > deadline {
                bail!("task prec-{i} never ran");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    lateness.sort();
    println!(
        "firing precision over {tasks} one-off tasks {spacing} ms apart (due → enqueued): p50 {} ms  p99 {} ms  max {} ms",
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        lateness.last().copied().unwrap_or(0)
    );
    println!(
        "scheduler memory after: {} MiB RSS",
        rss_kib(pid).unwrap_or(0) / 1024
    );
    cluster.stop().await
}
