//! Discord round trip through every service against the fake Discord: a MESSAGE_CREATE on
//! the gateway websocket → gateway → runner → echo agent → delivery → the reply's POST,
//! one message at a time, then 10 channels at once.
//!
//! `cargo build --release --workspace --bins && target/release/discord-bench`

use std::time::{Duration, Instant};

use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_discord::FakeDiscord;

const USER: u64 = 444_444_444_444_444_444;

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let channels: Vec<u64> = (0..10).map(|i| 100_000_000_000_000_000 + i).collect();
    let routes: String = channels
        .iter()
        .map(|c| format!("[[discord.routes]]\nchannel = \"{c}\"\nagent = \"main\"\n"))
        .collect();
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!("[discord]\napi_url = \"{}\"\n{routes}", fake.url()),
    )?;
    let cluster = Cluster::start(
        &dir.path().join("data"),
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("DISCORD_BOT_TOKEN", "bench".into()),
        ],
    )
    .await?;
    fake.wait_identified(1).await?;

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
