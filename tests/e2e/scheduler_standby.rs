//! Two schedulers on one task store: one fires, the other stands by and takes over when the
//! active one dies, and no run is delivered twice. A run fired twice (two firers on one due
//! run, as around a handover) goes to the runner twice under one idempotency key: it answers
//! "duplicate", and the run is recorded once.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use ferroclaw_common::launch::ServiceProcess;
use ferroclaw_e2e::Cluster;
use ferroclaw_proto::v1;
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_scheduler::firing::{Firer, SystemClock};
use ferroclaw_scheduler::store::{TaskRow, TaskStore};
use ferroclaw_scheduler::sync::Syncer;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// The value of the sample `series` (its name and labels as printed) on a service's
/// `/metrics`.
async fn metric(addr: Option<SocketAddr>, series: &str) -> anyhow::Result<Option<f64>> {
    let addr = addr.context("the service named no metrics address")?;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(printed, _)| *printed == series)
        .and_then(|(_, value)| value.trim().parse().ok()))
}

async fn is_active(scheduler: &ServiceProcess) -> anyhow::Result<bool> {
    Ok(metric(scheduler.metrics, "ferroclaw_scheduler_active").await? == Some(1.0))
}

/// Waits until exactly one of the two is active; whether it is `one`.
async fn one_active(one: &ServiceProcess, two: &ServiceProcess) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match (is_active(one).await?, is_active(two).await?) {
            (true, false) => return Ok(true),
            (false, true) => return Ok(false),
            seen if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("never exactly one active scheduler: {seen:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// SIGKILLs whichever of the cluster's scheduler and `other` is active (`first`: the
/// cluster's); afterwards `cluster.scheduler` is the survivor and `other` the dead one.
async fn kill_active(
    cluster: &mut Cluster,
    other: &mut ServiceProcess,
    first: bool,
) -> anyhow::Result<()> {
    if first {
        std::mem::swap(&mut cluster.scheduler, other);
    }
    other
        .child
        .kill()
        .await
        .context("kill the active scheduler")?;
    Ok(())
}

/// Every reply line of `conversation` that contains `needle`.
async fn lines_with(cluster: &Cluster, conversation: &str, needle: &str) -> anyhow::Result<usize> {
    Ok(cluster
        .texts(conversation)
        .await?
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| l.contains(needle))
        .count())
}

async fn session_for(cluster: &Cluster, conversation: &str) -> anyhow::Result<String> {
    let (status, body) = cluster.post_message(conversation, "hello", None).await?;
    anyhow::ensure!(status == 202, "{body}");
    cluster
        .wait_for_lines(conversation, &["echo: hello".into()], WAIT)
        .await?;
    Ok(body["session_id"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_fires_a_run_once_when_the_active_scheduler_is_killed() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        eprintln!("skipped: the standby scheduler test needs PostgreSQL");
        return Ok(());
    };
    let url = postgres.create_database("standby").await?;
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), &[("DATABASE_URL", url)]).await?;
    let mut other = cluster.start_another("scheduler", &[]).await?;
    let first = one_active(&cluster.scheduler, &other).await?;
    session_for(&cluster, "standby").await?;

    // A one-off task a few seconds ahead, created through the cluster's scheduler.
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(4000)).to_rfc3339();
    let schedule = json!({"action": "schedule_task", "params":
        {"task_id": "t-standby", "name": "handover", "prompt": "fired once", "at": at}});
    let (status, body) = cluster
        .post_message("standby", &format!("!action {schedule}"), None)
        .await?;
    anyhow::ensure!(status == 202, "{body}");
    let task = cluster.task("t-standby").await?;
    let next_run = task["next_run"]
        .as_i64()
        .context("the task has a next run")?;

    // The active scheduler dies a second before the fire time.
    let until_kill = next_run - 1000 - ferroclaw_mailbox::now_ms();
    anyhow::ensure!(
        until_kill > 0,
        "the task reached the scheduler too late to kill it before the fire time"
    );
    tokio::time::sleep(Duration::from_millis(until_kill as u64)).await;
    kill_active(&mut cluster, &mut other, first).await?;

    // The standby takes over and fires the run, once.
    cluster
        .wait_for_lines("standby", &["echo: task handover: fired once".into()], WAIT)
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lines_with(&cluster, "standby", "task handover").await?,
        1,
        "{:?}",
        cluster.texts("standby").await?
    );
    assert!(
        is_active(&cluster.scheduler).await?,
        "the standby became active"
    );
    let mut survivor =
        SchedulerClient::new(cluster.internal_channel(&cluster.scheduler.grpc_url())?);
    let runs = survivor
        .list_runs(v1::ListRunsRequest {
            task_id: "t-standby".into(),
            limit: 10,
        })
        .await?
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run.outcome, "enqueued");
    assert_eq!(run.scheduled_at_ms, next_run);
    let late = run.fired_at_ms - run.scheduled_at_ms;
    assert!(
        (0..5_000).contains(&late),
        "fired {late} ms after its time: the standby takes over within a few seconds"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_scheduler_on_one_data_dir_stands_by_and_takes_over() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), &[]).await?;
    let mut other = cluster.start_another("scheduler", &[]).await?;
    let first = one_active(&cluster.scheduler, &other).await?;
    assert!(first, "the scheduler that started first fires");
    kill_active(&mut cluster, &mut other, first).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !is_active(&cluster.scheduler).await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the standby did not take over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_firers_on_one_due_run_deliver_it_once_and_record_it_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let session = session_for(&cluster, "double").await?;
    // A task store of its own (the cluster's scheduler does not fire from it), opened twice:
    // two schedulers.
    let db = dir.path().join("double-scheduler.db");
    let firer = |store: TaskStore| -> anyhow::Result<Firer> {
        let runner = cluster.internal_channel(&cluster.runner.grpc_url())?;
        let clock = std::sync::Arc::new(SystemClock);
        Ok(Firer::new(store, runner, Syncer::default(), clock))
    };
    let (one_store, two_store) = (TaskStore::open(&db).await?, TaskStore::open(&db).await?);
    let (one, two) = (firer(one_store.clone())?, firer(two_store.clone())?);
    let now = ferroclaw_mailbox::now_ms();
    one_store
        .insert(&TaskRow {
            id: "t-double".into(),
            series_id: "ser-double".into(),
            session_id: session,
            agent: "main".into(),
            name: "double".into(),
            prompt: "run".into(),
            schedule: v1::Schedule {
                kind: "once".into(),
                at: "2026-01-01T00:00:00Z".into(),
                timezone: "UTC".into(),
                ..Default::default()
            },
            catch_up: "catch_up".into(),
            reply_to: json!({"kind": "api", "conversation": "double"}).to_string(),
            state: "active".into(),
            next_run: Some(now - 10),
            last_run: None,
            created_at: 0,
            updated_at: 0,
        })
        .await?;

    // Both read the run as due before either recorded it, then both fire it.
    let due = one_store.due(now, 10).await?;
    let seen_by_two = two_store.due(now, 10).await?;
    assert_eq!((due.len(), seen_by_two.len()), (1, 1));
    let duplicates_metric =
        "ferroclaw_runner_messages_enqueued_total{agent=\"main\",duplicate=\"true\"}";
    let duplicates_before = metric(cluster.runner.metrics, duplicates_metric)
        .await?
        .unwrap_or(0.0);
    one.fire_task(due[0].clone(), now).await?;
    two.fire_task(seen_by_two[0].clone(), now).await?;
    let duplicates = metric(cluster.runner.metrics, duplicates_metric)
        .await?
        .unwrap_or(0.0)
        - duplicates_before;
    assert_eq!(
        duplicates, 1.0,
        "the runner got the run twice under one key and took it once"
    );

    let runs = two_store.runs("t-double", 10).await?;
    assert_eq!(runs.len(), 1, "recorded once: {runs:?}");
    assert_eq!(
        one_store.get("t-double").await?.map(|t| t.state),
        Some("completed".into())
    );
    cluster
        .wait_for_lines("double", &["echo: task double: run".into()], WAIT)
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lines_with(&cluster, "double", "task double").await?, 1);
    one_store.close().await;
    two_store.close().await;
    cluster.stop().await
}
