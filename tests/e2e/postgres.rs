//! The services on PostgreSQL: one `DATABASE_URL` for all three stores (a throwaway cluster,
//! see ferroclaw_common::test_postgres), a message and a scheduled task through them, and
//! the rows read back from PostgreSQL, where each service has a schema of its own.

use std::time::Duration;

use ferroclaw_e2e::Cluster;
use serde_json::json;
use sqlx::Connection;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_keep_their_state_in_postgres() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let url = postgres.create_database("e2e").await?;
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[("DATABASE_URL", url.clone())]).await?;

    let (status, accepted) = cluster
        .post_message("pg-chat", "hello postgres", None)
        .await?;
    assert_eq!(status, 202, "{accepted}");
    cluster
        .wait_for_lines("pg-chat", &["echo: hello postgres".into()], WAIT)
        .await?;

    // A one-off task a second from now, scheduled by the echo agent's action row.
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(1000)).to_rfc3339();
    let schedule = json!({"action": "schedule_task", "params":
        {"task_id": "t-pg", "name": "ping", "prompt": "from postgres", "at": at}});
    cluster
        .post_message("pg-chat", &format!("!action {schedule}"), None)
        .await?;
    cluster
        .wait_for_lines("pg-chat", &["echo: task ping: from postgres".into()], WAIT)
        .await?;
    let mut state = json!(null);
    for _ in 0..100 {
        state = cluster.task("t-pg").await?["state"].clone();
        if state == json!("completed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, json!("completed"));

    // The rows are in PostgreSQL, and no service made its SQLite file.
    let mut db = sqlx::postgres::PgConnection::connect(&url).await?;
    let session = accepted["session_id"].as_str().unwrap_or_default();
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM runner.sessions WHERE id = $1")
        .bind(session)
        .fetch_one(&mut db)
        .await?;
    assert_eq!(sessions, 1, "session {session} in runner.sessions");
    let texts: Vec<String> = sqlx::query_scalar(
        "SELECT text FROM delivery.conversation_messages WHERE conversation = 'pg-chat'
         ORDER BY cursor",
    )
    .fetch_all(&mut db)
    .await?;
    assert!(
        texts.iter().any(|t| t == "echo: hello postgres")
            && texts.iter().any(|t| t == "echo: task ping: from postgres"),
        "{texts:?}"
    );
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM delivery.ledger WHERE session_id = $1 AND state = 'delivered'",
    )
    .bind(session)
    .fetch_one(&mut db)
    .await?;
    assert!(delivered >= 2, "{delivered} delivered rows");
    let task: (String, String) =
        sqlx::query_as("SELECT state, session_id FROM scheduler.tasks WHERE id = 't-pg'")
            .fetch_one(&mut db)
            .await?;
    assert_eq!(task, ("completed".to_string(), session.to_string()));
    let runs: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM scheduler.runs WHERE task_id = 't-pg'")
            .fetch_all(&mut db)
            .await?;
    assert_eq!(runs, ["enqueued"]);
    for service in ["runner", "delivery", "scheduler"] {
        let versions: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT version FROM {service}._sqlx_migrations ORDER BY version"
        ))
        .fetch_all(&mut db)
        .await?;
        // Every migration the binary knows, applied once each, in order from 1.
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert!(!versions.is_empty(), "{service} ran no migration");
        assert_eq!(versions, expected, "{service}'s migrations");
        let file = dir.path().join(format!("{service}.db"));
        assert!(!file.exists(), "{} was made", file.display());
    }
    db.close().await?;
    cluster.stop().await
}
