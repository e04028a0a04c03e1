//! Discord round trip through every service against the fake Discord: a MESSAGE_CREATE on
//! the gateway websocket → gateway → runner → echo agent → delivery → the reply's POST,
//! one message at a time, then 10 channels at once, then many channels with one of them
//! rate-limited (its lane waits; the others must not move).
//!
//! `cargo build --release --workspace --bins && target/release/discord-bench --help`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_discord::FakeDiscord;

const USER: u64 = 444_444_444_444_444_444;

#[derive(Parser)]
#[command(about = "Discord round trips through every ferroclaw service, against the fake Discord")]
struct Args {
    /// Channels in the lanes run (each its own session and agent).
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Messages per channel in the lanes run.
    #[arg(long, default_value_t = 10)]
    messages: usize,
    /// How long the first channel is rate-limited in the lanes run, in seconds.
    #[arg(long, default_value_t = 5)]
    limited_secs: u64,
    /// Milliseconds between rounds (a round is one message per channel) in the lanes run.
    #[arg(long, default_value_t = 1000)]
    round_ms: u64,
    /// Only the lanes run.
    #[arg(long)]
    lanes_only: bool,
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.lanes_only {
        round_trips().await?;
    }
    lanes(&args, false).await?;
    lanes(&args, true).await
}

/// `n` channel ids.
fn channel_ids(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 100_000_000_000_000_000 + i).collect()
}

/// A cluster whose Discord bot answers in `channels` (agent `main`), connected to `fake`.
async fn discord_cluster(
    dir: &std::path::Path,
    fake: &FakeDiscord,
    channels: &[u64],
    env: &[(&'static str, String)],
) -> anyhow::Result<Cluster> {
    let routes: String = channels
        .iter()
        .map(|c| format!("[[discord.routes]]\nchannel = \"{c}\"\nagent = \"main\"\n"))
        .collect();
    let config = dir.join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!("[discord]\napi_url = \"{}\"\n{routes}", fake.url()),
    )?;
    let mut all = vec![
        ("FERROCLAW_CONFIG", config.display().to_string()),
        ("DISCORD_BOT_TOKEN", "bench".into()),
    ];
    all.extend(env.iter().cloned());
    let cluster = Cluster::start(&dir.join("data"), &all).await?;
    fake.wait_identified(1).await?;
    Ok(cluster)
}

/// One channel, one message at a time; then 10 channels at once.
async fn round_trips() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let channels = channel_ids(10);
    let cluster = discord_cluster(dir.path(), &fake, &channels, &[]).await?;

    let one = channels[0];
    let mut times = Vec::new();
    for i in 0..201 {
        let started = Instant::now();
        fake.user_message(one, USER, &format!("message {i}"), true);
        fake.wait_posted_fast(one, i + 1).await?;
        times.push(started.elapsed());
    }
    let first = times.remove(0);
    println!(
        "one channel: first {:.1} ms (agent start), then p50 {:.1} ms, p99 {:.1} ms over 200",
        first.as_secs_f64() * 1000.0,
        percentile(&mut times, 0.5),
        percentile(&mut times, 0.99)
    );

    // Warm every channel's agent, then 10 channels × 30 messages at once.
    for c in &channels[1..] {
        fake.user_message(*c, USER, "warm up", true);
        fake.wait_posted_fast(*c, 1).await?;
    }
    let started = Instant::now();
    for i in 0..30 {
        for c in &channels {
            fake.user_message(*c, USER, &format!("burst {i}"), true);
        }
    }
    // A batch of several messages is answered in one reply, a line per message.
    let lines = || -> usize {
        fake.posted()
            .iter()
            .map(|p| p.content.lines().count())
            .sum()
    };
    let expected: usize = 201 + 9 + 300;
    while lines() < expected {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {expected} reply lines",
            lines()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    println!(
        "10 channels x 30 messages: all 300 answered in {:.2} s ({:.0} messages/s, {} posts)",
        took.as_secs_f64(),
        300.0 / took.as_secs_f64(),
        fake.posted().len() - 210
    );
    cluster.stop().await
}

/// `channels` × `messages`, a round of one message per channel every `round_ms`; with
/// `limited`, the first channel answers 429 for `limited_secs` from the start. Prints the
/// other channels' p50/p99 (from the user's message to the post holding its reply line)
/// and the total time.
async fn lanes(args: &Args, limited: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let channels = channel_ids(args.channels);
    // Every channel's agent stays warm: this run measures delivery, not slots.
    let slots = [(
        "FERROCLAW_MAX_RUNNING_AGENTS",
        (args.channels + 8).to_string(),
    )];
    let cluster = discord_cluster(dir.path(), &fake, &channels, &slots).await?;
    for c in &channels {
        fake.user_message(*c, USER, "warm up", true);
    }
    for c in &channels {
        fake.wait_posted(*c, 1).await?;
    }
    let warm_posts = fake.posted().len();
    if limited {
        fake.rate_limit_channel(channels[0], Duration::from_secs(args.limited_secs));
    }
    let started = Instant::now();
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut seen: HashMap<String, Duration> = HashMap::new();
    let total = args.channels * args.messages;
    let mut round = 0;
    let mut scanned = warm_posts;
    while seen.len() < total {
        if round < args.messages
            && started.elapsed() >= Duration::from_millis(args.round_ms * round as u64)
        {
            for (ci, c) in channels.iter().enumerate() {
                let text = format!("c{ci} m{round}");
                fake.user_message(*c, USER, &text, true);
                sent.insert(format!("echo: {text}"), Instant::now());
            }
            round += 1;
        }
        let posted = fake.posted();
        for p in &posted[scanned..] {
            for line in p.content.lines() {
                if let Some(at) = sent.get(line) {
                    seen.entry(line.to_string()).or_insert_with(|| at.elapsed());
                }
            }
        }
        scanned = posted.len();
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "only {} of {total} replies",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    let mut others: Vec<Duration> = seen
        .iter()
        .filter(|(line, _)| !line.starts_with("echo: c0 "))
        .map(|(_, d)| *d)
        .collect();
    let mut first: Vec<Duration> = seen
        .iter()
        .filter(|(line, _)| line.starts_with("echo: c0 "))
        .map(|(_, d)| *d)
        .collect();
    println!(
        "{} channels x {} messages{}: other channels p50 {:.1} ms, p99 {:.1} ms; \
         first channel p50 {:.0} ms; all {} answered in {:.2} s; {} 429s",
        args.channels,
        args.messages,
        if limited {
            format!(", the first rate-limited for {} s", args.limited_secs)
        } else {
            ", no rate limit".into()
        },
        percentile(&mut others, 0.5),
        percentile(&mut others, 0.99),
        percentile(&mut first, 0.5),
        total,
        took.as_secs_f64(),
        fake.rate_limited_posts(),
    );
    cluster.stop().await
}
