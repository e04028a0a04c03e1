//! What quiet sessions cost the runner: N conversations get one message each and their
//! answer, their agents exit, and then the runner's resident memory, threads, open files
//! and CPU time over a quiet stretch are read from /proc.
//!
//! With `--console-runs N`, each operator console page is then fetched N times from the
//! quiet installation and its time to the last byte reported (the issue's "every page
//! under 50 ms with 10,000 sessions on disk").
//!
//! `cargo build --release --workspace --bins && target/release/idle-bench --sessions 10000`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ferroclaw_e2e::{Cluster, Footprint, cpu_times, footprint};

#[derive(Parser)]
#[command(about = "The runner's footprint with many quiet sessions on disk")]
struct Args {
    /// Sessions to create (one message each).
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Messages in flight at once while the sessions are created.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long to watch the quiet runner's CPU time, in seconds.
    #[arg(long, default_value_t = 30)]
    quiet_secs: u64,
    /// Fetch each console page this many times once quiet, and report the times (0: skip).
    #[arg(long, default_value_t = 0)]
    console_runs: usize,
}

/// Each console page fetched `runs` times: median and slowest time to the last byte.
async fn time_console_pages(cluster: &Cluster, runs: usize) -> anyhow::Result<()> {
    let api = cluster.api();
    let http = reqwest::Client::new();
    let (_, listed) = cluster.get("/v1/sessions?sort=recent&limit=1").await?;
    let session = listed["sessions"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pages = [
        "/ui/sessions".to_string(),
        "/ui/sessions?page=100&sort=oldest".into(),
        "/ui/sessions/rows?state=idle".into(),
        format!("/ui/sessions/{session}"),
        "/ui/conversations/idle-5".into(),
        "/ui/tasks".into(),
        "/ui/deliveries".into(),
        "/ui/agents".into(),
        "/ui/health".into(),
    ];
    for page in &pages {
        let mut times = Vec::with_capacity(runs);
        let mut bytes = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let response = http.get(format!("{api}{page}")).send().await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{page}: {}",
                response.status()
            );
            bytes = response.bytes().await?.len();
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "console {page}: median {:.2} ms, slowest {:.2} ms ({bytes} bytes, {runs} runs)",
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() - 1].as_secs_f64() * 1000.0,
        );
    }
    Ok(())
}

fn show(label: &str, f: &Footprint) {
    println!(
        "{label}: RSS {:.1} MB, {} threads, {} open files",
        f.rss_kb as f64 / 1024.0,
        f.threads,
        f.files
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let cluster = Arc::new(
        Cluster::start(
            &dir.path().join("data"),
            &[
                ("FERROCLAW_IDLE_TIMEOUT_SECS", "1".into()),
                ("FERROCLAW_MAILBOX_IDLE_SECS", "5".into()),
            ],
        )
        .await?,
    );
    let pid = cluster
        .runner
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("the runner has no pid"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    show("before any session", &footprint(pid)?);

    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.sessions {
        let permit = slots.clone().acquire_owned().await?;
        let cluster = cluster.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let conversation = format!("idle-{i}");
            let (status, body) = cluster.post_message(&conversation, "hello", None).await?;
            anyhow::ensure!(status == 202 || status == 200, "{status}: {body}");
            for _ in 0..20 {
                let (messages, _) = cluster.messages(&conversation, 0, 25.0).await?;
                if !messages.is_empty() {
                    return Ok(());
                }
            }
            anyhow::bail!("{conversation} got no answer")
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    println!(
        "{} sessions answered in {:.1} s",
        args.sessions,
        started.elapsed().as_secs_f64()
    );
    show("right after the last answer", &footprint(pid)?);

    // Agents exit after 1 s idle, mailboxes close after 5 s unused, and the outbound feed
    // forgets sessions 30 s after their last activity.
    tokio::time::sleep(Duration::from_secs(40)).await;
    show("quiet", &footprint(pid)?);
    let cpu_before = cpu_times(pid);
    tokio::time::sleep(Duration::from_secs(args.quiet_secs)).await;
    let cpu_after = cpu_times(pid);
    let later = footprint(pid)?;
    let cpu = |at: Option<(f64, f64)>| at.map_or(0.0, |(own, _)| own);
    println!(
        "quiet for {} s: runner CPU {:.2} s; then RSS {:.1} MB, {} threads, {} open files",
        args.quiet_secs,
        (cpu(cpu_after) - cpu(cpu_before)).max(0.0),
        later.rss_kb as f64 / 1024.0,
        later.threads,
        later.files
    );
    if args.console_runs > 0 {
        time_console_pages(&cluster, args.console_runs).await?;
    }
    match Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.stop().await,
        Err(_) => Ok(()),
    }
}
