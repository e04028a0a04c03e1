//! The credential proxy's cost: the same streamed Messages API request sent straight to a
//! fake model API and through the runner's proxy (token check, budget lookup, key swap,
//! streaming pass-through, usage recording), sequentially and 8 at a time; then a whole
//! agent turn (message → model → reply) through all services.
//!
//! `cargo build --release --workspace --bins && target/release/proxy-bench`

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_model::FakeModel;
use serde_json::json;

const KEY: &str = "sk-bench";

/// The credential proxy's cost: streamed Messages API requests straight to a fake model API
/// and through the runner's proxy, then whole agent turns through all services.
///
/// Needs the service binaries: `cargo build --release --workspace --bins`.
#[derive(Parser)]
#[command(name = "proxy-bench")]
struct Args {
    /// Requests per measurement (sequential, then the same number concurrently).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Requests in flight at once in the concurrent measurement.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Agent turns through every service (the first starts the agent).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..))]
    turns: u64,
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

async fn one(http: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let body = http
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "m", "max_tokens": 10, "stream": true,
                      "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    anyhow::ensure!(body.contains("message_stop"), "{body}");
    Ok(started.elapsed())
}

async fn measure(args: &Args, label: &str, base: &str, key: &str) -> anyhow::Result<()> {
    let (requests, concurrency) = (args.requests as usize, args.concurrency as usize);
    let http = reqwest::Client::new();
    for _ in 0..20 {
        one(&http, base, key).await?;
    }
    let mut sequential = Vec::with_capacity(requests);
    for _ in 0..requests {
        sequential.push(one(&http, base, key).await?);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let each = requests.div_ceil(concurrency);
    for _ in 0..concurrency {
        let (http, base, key) = (http.clone(), base.to_string(), key.to_string());
        tasks.spawn(async move {
            for _ in 0..each {
                one(&http, &base, &key).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = (each * concurrency) as f64 / started.elapsed().as_secs_f64();
    println!(
        "{label:>8}: p50 {:.2} ms, p99 {:.2} ms sequential; {rate:.0} requests/s with {concurrency} concurrent",
        percentile(&mut sequential, 0.5),
        percentile(&mut sequential, 0.99),
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[[agents]]\nname = \"main\"\nprovider = \"anthropic\"\nmodel = \"m\"\napi_base_url = \"{}\"\n",
            fake.url()
        ),
    )?;
    let data = dir.path().join("data");
    let cluster = Cluster::start(
        &data,
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("ANTHROPIC_API_KEY", KEY.into()),
        ],
    )
    .await?;

    // A whole turn through every service, from a new session (agent start included) and
    // then warm.
    let mut turns = Vec::new();
    for i in 0..args.turns as usize {
        let started = Instant::now();
        let (_, accepted) = cluster
            .post_message("bench", &format!("hi {i}"), None)
            .await?;
        anyhow::ensure!(accepted["session_id"].is_string(), "{accepted}");
        loop {
            let texts = cluster.texts("bench").await?;
            if texts.len() > i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        turns.push(started.elapsed());
    }
    let first = turns[0];
    let mut warm = turns[1..].to_vec();
    println!(
        "agent turn (message → model via proxy → reply): first {:.1} ms (agent start), warm p50 {:.1} ms",
        first.as_secs_f64() * 1000.0,
        percentile(&mut warm, 0.5)
    );

    let (_, sessions) = cluster.get("/v1/sessions").await?;
    let session = sessions["sessions"][0]["id"]
        .as_str()
        .context("a session")?
        .to_string();
    let secret = std::fs::read(data.join("runner.proxy-key"))?;
    let grant = ferroclaw_common::signing::TokenGrant {
        session_id: session,
        agent: "main".into(),
        expires_at: i64::MAX,
    };
    let token = ferroclaw_common::signing::session_token(&secret, &grant);
    let proxy = format!(
        "http://{}",
        cluster
            .runner
            .http
            .context("the runner announces its proxy")?
    );
    measure(&args, "direct", &fake.url(), KEY).await?;
    measure(&args, "proxy", &proxy, &token).await?;
    cluster.stop().await
}
