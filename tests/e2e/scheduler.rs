//! Scheduled tasks end to end: the echo agent's `!action` rows stand in for a model's tool
//! calls (`schedule_task`, …) and travel agent → runner → delivery → scheduler; runs come
//! back through runner → agent → delivery like any other message.

use std::time::Duration;

use ferroclaw_e2e::Cluster;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn action(name: &str, params: Value) -> String {
    format!("!action {}", json!({"action": name, "params": params}))
}

async fn wait_state(cluster: &Cluster, id: &str, state: &str) -> anyhow::Result<Value> {
    for _ in 0..100 {
        let task = cluster.task(id).await?;
        if task["state"] == json!(state) {
            return Ok(task);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("task {id} never became {state}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_schedules_tasks_and_their_runs_reply_through_delivery() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;

    // A one-off task 1.5 s from now, in a named zone.
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(1500))
        .with_timezone(&chrono::FixedOffset::east_opt(3600).expect("offset"))
        .to_rfc3339();
    let (status, accepted) = cluster
        .post_message(
            "plans",
            &action("schedule_task", json!({"task_id": "t-once", "name": "ping", "prompt": "say hi", "at": at, "timezone": "Europe/Berlin"})),
            None,
        )
        .await?;
    assert_eq!(status, 202, "{accepted}");
    cluster
        .wait_for_lines("plans", &["echo: task ping: say hi".into()], WAIT)
        .await?;
    let done = wait_state(&cluster, "t-once", "completed").await?;
    assert_eq!(done["session_id"], accepted["session_id"]);
    let (_, runs) = cluster.get("/v1/tasks/t-once/runs").await?;
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(1), "{runs}");
    assert_eq!(runs["runs"][0]["outcome"], json!("enqueued"));

    // An interval task runs repeatedly; the agent pauses it; the operator resumes, runs it
    // now and cancels it through the REST API.
    cluster
        .post_message(
            "plans",
            &action(
                "schedule_task",
                json!({"task_id": "t-tick", "name": "tick", "prompt": "again", "interval_secs": 1}),
            ),
            None,
        )
        .await?;
    let lines = cluster
        .wait_for_lines("plans", &["echo: task tick: again".into()], WAIT)
        .await?;
    assert!(lines.iter().filter(|l| l.contains("task tick")).count() >= 1);
    cluster
        .post_message(
            "plans",
            &action("pause_task", json!({"task_id": "t-tick"})),
            None,
        )
        .await?;
    wait_state(&cluster, "t-tick", "paused").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused_count = count_lines(&cluster, "plans", "task tick").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        count_lines(&cluster, "plans", "task tick").await?,
        paused_count,
        "a paused task ran"
    );

    let (status, resumed) = cluster.post("/v1/tasks/t-tick/resume", &json!({})).await?;
    assert_eq!(
        (status, resumed["state"].clone()),
        (200, json!("active")),
        "{resumed}"
    );
    let (status, _) = cluster.post("/v1/tasks/t-tick/run", &json!({})).await?;
    assert_eq!(status, 200);
    let (status, cancelled) = cluster.post("/v1/tasks/t-tick/cancel", &json!({})).await?;
    assert_eq!(
        (status, cancelled["state"].clone()),
        (200, json!("cancelled"))
    );
    let (status, body) = cluster.post("/v1/tasks/t-tick/resume", &json!({})).await?;
    assert_eq!(status, 409, "a cancelled series cannot resume: {body}");
    let (status, _) = cluster.post("/v1/tasks/nope/pause", &json!({})).await?;
    assert_eq!(status, 404);

    // The session's mailbox mirrors its tasks for the agent's list_tasks.
    let session = accepted["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut mirrored = Vec::new();
    for _ in 0..50 {
        mirrored = cluster.mirrored_tasks("main", &session).await?;
        if mirrored
            .iter()
            .any(|(id, spec)| id == "t-tick" && spec["state"] == json!("cancelled"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states: Vec<(String, Value)> = mirrored
        .iter()
        .map(|(id, s)| (id.clone(), s["state"].clone()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("t-once".to_string(), json!("completed")),
            ("t-tick".to_string(), json!("cancelled"))
        ]
    );
    cluster.stop().await
}

async fn count_lines(cluster: &Cluster, conversation: &str, needle: &str) -> anyhow::Result<usize> {
    Ok(cluster
        .texts(conversation)
        .await?
        .iter()
        .flat_map(|t| t.lines().map(String::from).collect::<Vec<_>>())
        .filter(|l| l.contains(needle))
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_foreign_actions_are_explained_to_the_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    cluster
        .post_message("mine", &action("schedule_task", json!({"task_id": "t-mine", "prompt": "p", "cron": "0 9 * * *", "timezone": "America/New_York"})), None)
        .await?;
    cluster.task("t-mine").await?;

    let cases = [
        (
            action(
                "schedule_task",
                json!({"prompt": "p", "cron": "99 * * * *"}),
            ),
            "invalid cron expression",
        ),
        (
            action(
                "schedule_task",
                json!({"prompt": "p", "cron": "0 9 * * *", "timezone": "Mars/Base"}),
            ),
            "unknown time zone",
        ),
        (
            action("schedule_task", json!({"prompt": "p"})),
            "a schedule is required",
        ),
        (
            action("pause_task", json!({"task_id": "t-mine"})),
            "belongs to another session",
        ),
        (
            action("cancel_task", json!({"task_id": "t-none"})),
            "no task",
        ),
        (action("launch_rocket", json!({})), "unknown action"),
    ];
    for (text, why) in &cases {
        cluster.post_message("other", text, None).await?;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let lines = cluster.texts("other").await?;
            if lines
                .iter()
                .any(|l| l.starts_with("echo: system action_failed:") && l.contains(why))
            {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no notice containing {why:?}; have {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The foreign pause changed nothing.
    assert_eq!(cluster.task("t-mine").await?["state"], json!("active"));
    cluster.stop().await
}
