//! Firing with a controlled clock: the scheduler's firing step runs in-process with chosen
//! times against the real runner, delivery and agents started as processes.

use std::time::Duration;

use ferroclaw_e2e::Cluster;
use ferroclaw_proto::v1;
use ferroclaw_scheduler::firing::{Firer, run_key};
use ferroclaw_scheduler::store::{TaskRow, TaskStore};
use ferroclaw_scheduler::sync::Syncer;
use serde_json::json;

const HOUR: i64 = 3_600_000;

fn task(
    id: &str,
    session: &str,
    conversation: &str,
    schedule: v1::Schedule,
    catch_up: &str,
    next_run: i64,
) -> TaskRow {
    TaskRow {
        id: id.into(),
        series_id: format!("ser-{id}"),
        session_id: session.into(),
        agent: "main".into(),
        name: id.into(),
        prompt: "run".into(),
        schedule,
        catch_up: catch_up.into(),
        reply_to: json!({"kind": "api", "conversation": conversation}).to_string(),
        state: "active".into(),
        next_run: Some(next_run),
        last_run: None,
        created_at: 0,
        updated_at: 0,
    }
}

async fn session_for(cluster: &Cluster, conversation: &str) -> anyhow::Result<String> {
    let (status, body) = cluster.post_message(conversation, "hello", None).await?;
    anyhow::ensure!(status == 202, "{body}");
    cluster
        .wait_for_lines(
            conversation,
            &["echo: hello".into()],
            Duration::from_secs(30),
        )
        .await?;
    Ok(body["session_id"].as_str().unwrap_or_default().to_string())
}

async fn firer(cluster: &Cluster, db: &std::path::Path) -> anyhow::Result<(Firer, TaskStore)> {
    let store = TaskStore::open(db).await?;
    let runner = cluster.internal_channel(&cluster.runner.grpc_url())?;
    let clock = std::sync::Arc::new(ferroclaw_scheduler::firing::SystemClock);
    Ok((
        Firer::new(store.clone(), runner, Syncer::default(), clock),
        store,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_exactly_at_fire_time_gives_one_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let session = session_for(&cluster, "clock").await?;
    let db = dir.path().join("clock-scheduler.db");
    let due = ferroclaw_mailbox::now_ms() - 10;
    let once = v1::Schedule {
        kind: "once".into(),
        at: "2026-01-01T00:00:00Z".into(),
        timezone: "UTC".into(),
        ..Default::default()
    };
    let t = task("t-restart", &session, "clock", once, "catch_up", due);
    {
        let (first, store) = firer(&cluster, &db).await?;
        store.insert(&t).await?;
        // The first scheduler enqueues the run and dies before recording it.
        first.enqueue_run(&t, &run_key(&t, due)).await?;
        store.close().await;
    }
    let (second, store) = firer(&cluster, &db).await?;
    assert_eq!(
        second.fire_due(due + 5).await?,
        1,
        "the restarted scheduler fires it again"
    );
    assert_eq!(second.fire_due(due + 10).await?, 0, "and only once");
    let runs = store.runs("t-restart", 10).await?;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        store.get("t-restart").await?.map(|t| t.state),
        Some("completed".into())
    );

    cluster
        .wait_for_lines(
            "clock",
            &["echo: task t-restart: run".into()],
            Duration::from_secs(30),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replies: Vec<String> = cluster.texts("clock").await?;
    let runs_seen = replies
        .iter()
        .filter(|t| t.contains("task t-restart"))
        .count();
    assert_eq!(runs_seen, 1, "{replies:?}");
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downtime_over_several_runs_gives_one_catch_up_then_the_schedule() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let session = session_for(&cluster, "down").await?;
    let (firer, store) = firer(&cluster, &dir.path().join("down-scheduler.db")).await?;
    // Half past the hour, whenever the test runs: in the first minutes after a full hour
    // the latest missed run would still be within the firing grace, on time and not missed.
    let real_now = ferroclaw_mailbox::now_ms();
    let this_hour = real_now - real_now % HOUR;
    let now = this_hour + HOUR / 2;
    let hourly = v1::Schedule {
        kind: "cron".into(),
        cron: "0 * * * *".into(),
        timezone: "Europe/Berlin".into(),
        ..Default::default()
    };
    // Both were due five hours ago: the scheduler was down since.
    store
        .insert(&task(
            "t-catch",
            &session,
            "down",
            hourly.clone(),
            "catch_up",
            this_hour - 5 * HOUR,
        ))
        .await?;
    store
        .insert(&task(
            "t-skip",
            &session,
            "down",
            hourly,
            "skip",
            this_hour - 5 * HOUR,
        ))
        .await?;
    assert_eq!(firer.fire_due(now).await?, 2);
    assert_eq!(firer.fire_due(now).await?, 0);

    let caught = store.get("t-catch").await?.expect("task");
    assert_eq!(
        caught.last_run,
        Some(this_hour),
        "the one catch-up run is the latest missed"
    );
    assert_eq!(
        caught.next_run,
        Some(this_hour + HOUR),
        "then the normal schedule"
    );
    let skipped = store.get("t-skip").await?.expect("task");
    assert_eq!(skipped.next_run, Some(this_hour + HOUR));
    let skip_runs = store.runs("t-skip", 10).await?;
    assert_eq!(skip_runs.len(), 1);
    assert_eq!(skip_runs[0].1.outcome, "skipped");

    cluster
        .wait_for_lines(
            "down",
            &["echo: task t-catch: run".into()],
            Duration::from_secs(30),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replies = cluster.texts("down").await?;
    assert_eq!(
        replies
            .iter()
            .filter(|t| t.contains("task t-catch"))
            .count(),
        1,
        "{replies:?}"
    );
    assert_eq!(
        replies.iter().filter(|t| t.contains("task t-skip")).count(),
        0,
        "{replies:?}"
    );

    // The next hour fires normally.
    assert_eq!(firer.fire_due(this_hour + HOUR + 50).await?, 2);
    cluster.stop().await
}
