//! Two runners serving different sessions on one PostgreSQL (`runner.id`): sessions spread
//! over both, every caller lists both, and every message is answered exactly once.
//!
//! - Without shared storage (each runner its own data directory), a SIGKILLed runner's
//!   sessions wait: `/readyz` and `/v1/sessions` name the missing runner, messages to its
//!   sessions are taken and kept, and they are answered once, in order, after it returns.
//! - With shared storage (one data directory), the live runner takes the dead one's
//!   sessions over within the lease, and a runner that comes back from a pause with its
//!   old placements cannot write to the sessions taken from it (the fencing token).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroclaw_common::launch::ServiceProcess;
use ferroclaw_e2e::Cluster;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{EnqueueRequest, Origin};
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(90);
const CONVERSATIONS: usize = 40;
/// Every process shares it: the runners live in different data directories.
const INTERNAL_TOKEN: &str = "several-runners-test-internal-token-0123456789";

/// A cluster whose runner is `runner-a`, a second runner `runner-b` beside it, and every
/// other service calling both.
async fn two_runners(
    database: String,
    dir_a: &Path,
    dir_b: Option<&Path>,
) -> anyhow::Result<(Cluster, ServiceProcess)> {
    let shared = dir_b.is_none();
    let mut cluster = Cluster::start(
        dir_a,
        &[
            ("DATABASE_URL", database),
            ("FERROCLAW_INTERNAL_TOKEN", INTERNAL_TOKEN.into()),
            ("FERROCLAW_RUNNER_ID", "runner-a".into()),
            ("FERROCLAW_RUNNER_SHARED_STORAGE", shared.to_string()),
        ],
    )
    .await?;
    let mut overrides = vec![("FERROCLAW_RUNNER_ID", "runner-b".to_string())];
    if let Some(dir_b) = dir_b {
        overrides.push(("FERROCLAW_DATA_DIR", dir_b.display().to_string()));
    }
    let second = cluster.start_another("runner", &overrides).await?;
    let both = format!("{},{}", cluster.runner.grpc_url(), second.grpc_url());
    cluster.envs_set("FERROCLAW_RUNNER_URL", &both);
    cluster.restart_gateway().await?;
    cluster.kill_delivery().await?;
    cluster.restart_delivery().await?;
    // The scheduler keeps calling runner-a, which is never stopped here.
    until_both_live(&[cluster.runner.grpc_url(), second.grpc_url()]).await?;
    Ok((cluster, second))
}

/// A client of the runner at `url`, with the installation's internal token.
fn runner_at(url: &str) -> anyhow::Result<RunnerClient<ferroclaw_common::grpc_auth::GrpcChannel>> {
    let token = ferroclaw_common::grpc_auth::AttachToken::new(Some(INTERNAL_TOKEN))?;
    Ok(RunnerClient::new(ferroclaw_common::grpc::channel(
        url, token,
    )?))
}

/// Waits until every runner of `urls` sees runner-a and runner-b live (each places new
/// sessions over those it sees).
async fn until_both_live(urls: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    for url in urls {
        let mut runner = runner_at(url)?;
        loop {
            let status = runner
                .get_runner_status(ferroclaw_proto::v1::GetRunnerStatusRequest {
                    runners_only: true,
                })
                .await?
                .into_inner();
            let live: Vec<&str> = status
                .runners
                .iter()
                .filter(|r| r.live)
                .map(|r| r.id.as_str())
                .collect();
            if live == ["runner-a", "runner-b"] {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{url} sees {live:?} live");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Sends messages `from..to` to every conversation, each conversation in order.
async fn send_all(
    cluster: &Arc<Mutex<Cluster>>,
    conversations: &[String],
    from: usize,
    to: usize,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    conversations
        .iter()
        .map(|conversation| {
            let cluster = cluster.clone();
            let conversation = conversation.clone();
            tokio::spawn(async move {
                for n in from..to {
                    {
                        let cluster = cluster.lock().await;
                        cluster
                            .post_until_taken(&conversation, &format!("m{n}"), WAIT)
                            .await?;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                anyhow::Ok(())
            })
        })
        .collect()
}

/// Every conversation's replies are `echo: m0` .. `echo: m{n-1}`, each once, in order.
async fn answered_once(
    cluster: &Cluster,
    conversations: &[String],
    n: usize,
) -> anyhow::Result<()> {
    for conversation in conversations {
        let expected: Vec<String> = (0..n).map(|i| format!("echo: m{i}")).collect();
        let seen = cluster
            .wait_for_lines(conversation, &expected, WAIT)
            .await?;
        assert_eq!(seen, expected, "{conversation}: every reply once, in order");
    }
    Ok(())
}

/// The sessions of `GET /v1/sessions`, by conversation key: (id, runner, state).
async fn sessions(cluster: &Cluster) -> anyhow::Result<HashMap<String, (String, String, String)>> {
    let (status, body) = cluster.get("/v1/sessions?limit=500").await?;
    anyhow::ensure!(status == 200, "GET /v1/sessions: {status} {body}");
    let listed = body["sessions"].as_array().cloned().unwrap_or_default();
    Ok(listed
        .iter()
        .map(|s| {
            let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (
                text("conversation_key"),
                (text("id"), text("runner"), text("agent_state")),
            )
        })
        .collect())
}

/// Sends `n` messages to every conversation and waits for their answers; then the
/// sessions as listed, and how many each runner serves.
async fn answered_and_placed(
    cluster: &Arc<Mutex<Cluster>>,
    conversations: &[String],
    n: usize,
) -> anyhow::Result<(
    HashMap<String, (String, String, String)>,
    HashMap<String, usize>,
)> {
    for sender in send_all(cluster, conversations, 0, n).await {
        sender.await??;
    }
    let cluster = cluster.lock().await;
    answered_once(&cluster, conversations, n).await?;
    let placed = sessions(&cluster).await?;
    let counts = spread(&placed);
    println!("sessions by runner: {counts:?}");
    Ok((placed, counts))
}

/// How many sessions each runner serves.
fn spread(sessions: &HashMap<String, (String, String, String)>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (_, runner, _) in sessions.values() {
        *counts.entry(runner.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_wait_for_their_runner_without_shared_storage() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let database = postgres.create_database("several_runners_apart").await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (cluster, second) = two_runners(database, dir_a.path(), Some(dir_b.path())).await?;
    let conversations: Vec<String> = (0..CONVERSATIONS).map(|i| format!("apart-{i}")).collect();
    let cluster = Arc::new(Mutex::new(cluster));

    // Both runners serve: the sessions spread, and each session's files are on its
    // runner's disk only.
    let (placed, counts) = answered_and_placed(&cluster, &conversations, 2).await?;
    assert_eq!(placed.len(), CONVERSATIONS);
    for runner in ["runner-a", "runner-b"] {
        assert!(counts.get(runner).copied().unwrap_or(0) >= 8, "{counts:?}");
    }
    for (id, runner, _) in placed.values() {
        let on_a = dir_a.path().join("sessions/main").join(id).exists();
        let on_b = dir_b.path().join("sessions/main").join(id).exists();
        assert_eq!(
            (on_a, on_b),
            (runner == "runner-a", runner == "runner-b"),
            "{id}"
        );
    }

    // runner-b dies under load: its sessions' messages wait, the others' go on.
    let b_addr = second
        .grpc
        .ok_or_else(|| anyhow::anyhow!("runner-b address"))?;
    let b_proxy = second
        .http
        .ok_or_else(|| anyhow::anyhow!("runner-b proxy"))?;
    let mut second = second;
    let senders = send_all(&cluster, &conversations, 2, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.child.kill().await?;
    second.child.wait().await?;
    let killed = Instant::now();
    // Missing once its lease runs out, and said so.
    loop {
        let (_, ready) = cluster.lock().await.get("/readyz").await?;
        if ready["missing_runners"] == serde_json::json!(["runner-b"]) {
            break;
        }
        anyhow::ensure!(killed.elapsed() < WAIT, "runner-b never missing: {ready}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("runner-b missing after {:?}", killed.elapsed());
    let during = sessions(&*cluster.lock().await).await?;
    for (key, (_, runner, state)) in &during {
        let expected = if runner == "runner-b" {
            "unavailable"
        } else {
            state.as_str()
        };
        assert_eq!(state, expected, "{key} on {runner}");
    }
    assert!(during.values().any(|(_, _, state)| state == "unavailable"));
    for sender in senders {
        sender.await??;
    }
    // The sessions of runner-a are answered while runner-b is away.
    let on_a: Vec<String> = conversations
        .iter()
        .filter(|c| placed[&format!("api:{c}")].1 == "runner-a")
        .cloned()
        .collect();
    answered_once(&*cluster.lock().await, &on_a, 5).await?;

    // runner-b returns on its address: the kept messages enter its mailboxes, in order.
    let cluster = Arc::into_inner(cluster)
        .ok_or_else(|| anyhow::anyhow!("a sender still holds the cluster"))?
        .into_inner();
    let mut returned = cluster
        .start_another(
            "runner",
            &[
                ("FERROCLAW_RUNNER_ID", "runner-b".into()),
                ("FERROCLAW_DATA_DIR", dir_b.path().display().to_string()),
                ("FERROCLAW_RUNNER_ADDR", b_addr.to_string()),
                ("FERROCLAW_PROXY_ADDR", b_proxy.to_string()),
            ],
        )
        .await?;
    answered_once(&cluster, &conversations, 5).await?;
    println!("all answered {:?} after the kill", killed.elapsed());
    let (_, ready) = cluster.get("/readyz").await?;
    assert!(ready.get("missing_runners").is_none(), "{ready}");
    returned.stop(Duration::from_secs(15)).await?;
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_storage_a_live_runner_takes_over_and_a_stale_one_is_fenced()
-> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let database = postgres.create_database("several_runners_shared").await?;
    let dir = tempfile::tempdir()?;
    let (cluster, second) = two_runners(database, dir.path(), None).await?;
    let conversations: Vec<String> = (0..CONVERSATIONS).map(|i| format!("shared-{i}")).collect();
    let cluster = Arc::new(Mutex::new(cluster));
    let (_, counts) = answered_and_placed(&cluster, &conversations, 1).await?;
    assert!(
        counts.get("runner-b").copied().unwrap_or(0) >= 8,
        "{counts:?}"
    );

    // runner-b dies under load: runner-a takes its sessions over within the lease.
    let mut second = second;
    let senders = send_all(&cluster, &conversations, 1, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.child.kill().await?;
    second.child.wait().await?;
    let killed = Instant::now();
    for sender in senders {
        sender.await??;
    }
    let cluster = Arc::into_inner(cluster)
        .ok_or_else(|| anyhow::anyhow!("a sender still holds the cluster"))?
        .into_inner();
    answered_once(&cluster, &conversations, 4).await?;
    let after = sessions(&cluster).await?;
    println!("all answered {:?} after the kill", killed.elapsed());
    assert_eq!(
        spread(&after).get("runner-a"),
        Some(&CONVERSATIONS),
        "{after:?}"
    );

    // runner-b comes back and takes new sessions; then it is paused past its lease, its
    // sessions move to runner-a, and once resumed it cannot write to them.
    let mut returned = cluster
        .start_another("runner", &[("FERROCLAW_RUNNER_ID", "runner-b".into())])
        .await?;
    until_both_live(&[cluster.runner.grpc_url(), returned.grpc_url()]).await?;
    let later: Vec<String> = (0..CONVERSATIONS).map(|i| format!("later-{i}")).collect();
    for conversation in &later {
        cluster.post_until_taken(conversation, "m0", WAIT).await?;
    }
    answered_once(&cluster, &later, 1).await?;
    let placed_later = sessions(&cluster).await?;
    let (victim_id, _, _) = later
        .iter()
        .filter_map(|c| placed_later.get(&format!("api:{c}")))
        .find(|(_, runner, _)| runner == "runner-b")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no new session on runner-b: {placed_later:?}"))?;
    let pid = returned
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("runner-b has no pid"))? as i32;
    // SAFETY: signals to a child process this test started and still waits for.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let paused = Instant::now();
    let taken = loop {
        let now = sessions(&cluster).await?;
        if now.values().all(|(_, runner, _)| runner == "runner-a") {
            break paused.elapsed();
        }
        anyhow::ensure!(paused.elapsed() < WAIT, "never taken over: {now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("sessions of the paused runner taken over after {taken:?}");

    // A message straight to runner-b for a session taken from it: the same request is
    // good (runner-a takes it), but runner-b writes nothing.
    let request = |key: &str| EnqueueRequest {
        session_id: victim_id.clone(),
        kind: "chat".into(),
        content_json: serde_json::json!({"text": key, "sender": "tester"}).to_string(),
        origin: Some(Origin {
            channel: "api".into(),
            conversation: "fenced".into(),
            sender: "tester".into(),
            reply_to_json: r#"{"kind":"api","conversation":"fenced"}"#.into(),
        }),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let mut to_a = runner_at(&cluster.runner.grpc_url())?;
    to_a.enqueue(request("through-a")).await?;
    let mut to_b = runner_at(&returned.grpc_url())?;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let stale =
        tokio::time::timeout(Duration::from_secs(20), to_b.enqueue(request("through-b"))).await;
    println!("runner-b's answer after its pause: {stale:?}");
    assert!(
        !matches!(stale, Ok(Ok(_))),
        "a fenced runner took a message"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), returned.child.wait()).await??;
    assert!(
        !status.success(),
        "runner-b stops once it finds its lease gone"
    );
    let ids = inbound_ids(dir.path(), &victim_id).await?;
    assert!(ids.iter().any(|id| id == "through-a"), "{ids:?}");
    assert!(!ids.iter().any(|id| id == "through-b"), "{ids:?}");
    cluster.stop().await
}

/// The inbound message ids of a session's mailbox.
async fn inbound_ids(data_dir: &Path, session_id: &str) -> anyhow::Result<Vec<String>> {
    let mut conn = ferroclaw_e2e::inbound_db(data_dir, "main", session_id).await?;
    Ok(
        sqlx::query_scalar("SELECT id FROM messages_in ORDER BY seq")
            .fetch_all(&mut conn)
            .await?,
    )
}
