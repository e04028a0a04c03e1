//! Chaos over the scaled setup: two runners on one session store (one active and one
//! standing by, or two serving different sessions with `runner.id`), two deliveries, two
//! schedulers and a gateway that lists them all, on one PostgreSQL database. While 1,000
//! messages go through, a random runner, delivery or scheduler is SIGKILLed every 2 s and
//! started again on its address. Every message is answered exactly once, in order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferroclaw_common::launch::ServiceProcess;
use ferroclaw_e2e::Cluster;
use serde_json::{Value, json};

const CONVERSATIONS: usize = 20;
const MESSAGES: usize = 50;
const KILL_EVERY: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(180);
const KINDS: [&str; 3] = ["runner", "delivery", "scheduler"];

/// Where an instance listens, so that it comes back on the same address (the others list it).
fn same_address(kind: &str, p: &ServiceProcess) -> Vec<(&'static str, String)> {
    let grpc = p.grpc.map(|a| a.to_string()).unwrap_or_default();
    match kind {
        "runner" => vec![
            ("FERROCLAW_RUNNER_ADDR", grpc),
            (
                "FERROCLAW_PROXY_ADDR",
                p.http.map(|a| a.to_string()).unwrap_or_default(),
            ),
        ],
        "delivery" => vec![("FERROCLAW_DELIVERY_ADDR", grpc)],
        _ => vec![("FERROCLAW_SCHEDULER_ADDR", grpc)],
    }
}

/// The instance `i` (0: the cluster's own, 1: the second) of `kind`.
fn instance<'a>(
    cluster: &'a mut Cluster,
    seconds: &'a mut HashMap<&'static str, ServiceProcess>,
    kind: &'static str,
    i: usize,
) -> &'a mut ServiceProcess {
    match (kind, i) {
        ("runner", 0) => &mut cluster.runner,
        ("delivery", 0) => &mut cluster.delivery,
        ("scheduler", 0) => &mut cluster.scheduler,
        _ => seconds
            .get_mut(kind)
            .expect("a second instance of every kind"),
    }
}

/// The runners' ids when they serve different sessions (the cluster's is runner-a).
const RUNNER_IDS: [&str; 2] = ["runner-a", "runner-b"];

/// Stops (SIGKILL when `kill`, else SIGTERM) and starts again an instance on its address
/// (a runner with its id, when `placed`).
async fn replace(
    cluster: &mut Cluster,
    seconds: &mut HashMap<&'static str, ServiceProcess>,
    kind: &'static str,
    i: usize,
    kill: bool,
    placed: bool,
) -> anyhow::Result<()> {
    let p = instance(cluster, seconds, kind, i);
    let mut overrides = same_address(kind, p);
    if placed && kind == "runner" {
        overrides.push(("FERROCLAW_RUNNER_ID", RUNNER_IDS[i].into()));
    }
    if kill {
        p.child.kill().await?;
        p.child.wait().await?;
    } else {
        p.stop(Duration::from_secs(15)).await?;
    }
    let fresh = cluster.start_another(kind, &overrides).await?;
    *instance(cluster, seconds, kind, i) = fresh;
    Ok(())
}

/// Every reply line of a conversation, read again until the API answers.
async fn reply_lines(http: &reqwest::Client, api: &str, conversation: &str) -> Vec<String> {
    let url = format!("{api}/v1/conversations/{conversation}/messages?after=0&limit=500");
    let Ok(response) = http.get(&url).send().await else {
        return Vec::new();
    };
    let Ok(body) = response.json::<Value>().await else {
        return Vec::new();
    };
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| {
            m["text"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_instance_killed_every_two_seconds_loses_and_repeats_nothing() -> anyhow::Result<()>
{
    chaos("chaos", false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_two_runners_serving_different_sessions_loses_and_repeats_nothing()
-> anyhow::Result<()> {
    chaos("chaos_placed", true).await
}

/// The chaos run on database `name`; with `placed`, both runners serve sessions of their
/// own (shared storage: a runner's sessions move if it stays away past its lease).
async fn chaos(name: &str, placed: bool) -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let url = postgres.create_database(name).await?;
    let dir = tempfile::tempdir()?;
    let mut extra = vec![("DATABASE_URL", url)];
    if placed {
        extra.push(("FERROCLAW_RUNNER_ID", RUNNER_IDS[0].into()));
        extra.push(("FERROCLAW_RUNNER_SHARED_STORAGE", "true".into()));
    }
    let mut cluster = Cluster::start(dir.path(), &extra).await?;
    let mut seconds: HashMap<&'static str, ServiceProcess> = HashMap::new();
    // Second instances, each told of every instance started before it; then the first
    // ones and the gateway are started again with the full lists.
    let second_runner: Vec<(&'static str, String)> = if placed {
        vec![("FERROCLAW_RUNNER_ID", RUNNER_IDS[1].into())]
    } else {
        Vec::new()
    };
    seconds.insert(
        "runner",
        cluster.start_another("runner", &second_runner).await?,
    );
    let list =
        |a: &ServiceProcess, b: &ServiceProcess| format!("{},{}", a.grpc_url(), b.grpc_url());
    let runners = list(&cluster.runner, &seconds["runner"]);
    cluster.envs_set("FERROCLAW_RUNNER_URL", &runners);
    seconds.insert("scheduler", cluster.start_another("scheduler", &[]).await?);
    let schedulers = list(&cluster.scheduler, &seconds["scheduler"]);
    cluster.envs_set("FERROCLAW_SCHEDULER_URL", &schedulers);
    seconds.insert("delivery", cluster.start_another("delivery", &[]).await?);
    let deliveries = list(&cluster.delivery, &seconds["delivery"]);
    cluster.envs_set("FERROCLAW_DELIVERY_URL", &deliveries);
    for kind in ["scheduler", "delivery"] {
        replace(&mut cluster, &mut seconds, kind, 0, false, placed).await?;
    }
    cluster.restart_gateway().await?;
    let api = cluster.api();

    // Senders: each conversation's messages in order, each tried until the API takes it,
    // under one idempotency key.
    let http = reqwest::Client::new();
    let started = Instant::now();
    let senders: Vec<_> = (0..CONVERSATIONS)
        .map(|c| {
            let (http, api) = (http.clone(), api.clone());
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    let body = json!({"conversation": format!("chaos-{c}"),
                        "text": format!("m{n}"), "sender": "tester"});
                    loop {
                        let sent = http
                            .post(format!("{api}/v1/messages"))
                            .header("Idempotency-Key", format!("chaos-{c}-{n}"))
                            .json(&body)
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status() == 202) {
                            break;
                        }
                        anyhow::ensure!(started.elapsed() < WAIT, "chaos-{c}: m{n} never taken");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();

    // Chaos until every reply is in.
    let expected: Vec<String> = (0..MESSAGES).map(|n| format!("echo: m{n}")).collect();
    let mut seed = started.elapsed().subsec_nanos() as u64 | 1;
    println!("chaos seed {seed}");
    let mut kills = Vec::new();
    loop {
        let mut complete = true;
        for c in 0..CONVERSATIONS {
            let lines = reply_lines(&http, &api, &format!("chaos-{c}")).await;
            complete &= expected.iter().all(|l| lines.contains(l));
        }
        if complete {
            break;
        }
        anyhow::ensure!(started.elapsed() < WAIT, "not every message was answered");
        tokio::time::sleep(KILL_EVERY).await;
        // xorshift: a different instance each round, reproducible from the seed.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kind = KINDS[(seed % 3) as usize];
        let i = ((seed >> 8) % 2) as usize;
        kills.push(format!("{kind}#{i}"));
        replace(&mut cluster, &mut seconds, kind, i, true, placed).await?;
    }
    for sender in senders {
        sender.await??;
    }
    let took = started.elapsed();
    // Nothing comes twice, even a moment later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in 0..CONVERSATIONS {
        let lines = reply_lines(&http, &api, &format!("chaos-{c}")).await;
        assert_eq!(lines, expected, "chaos-{c}: every reply once, in order");
    }
    println!(
        "{} messages answered once in {took:?} with {} kills: {kills:?}",
        CONVERSATIONS * MESSAGES,
        kills.len()
    );
    anyhow::ensure!(!kills.is_empty(), "the load ended before any kill");
    for (_, mut p) in seconds {
        p.stop(Duration::from_secs(15)).await?;
    }
    cluster.stop().await
}
