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

/// `sslmode=verify-full` with the server's CA: every service's connection is encrypted and
/// the server's certificate checked, and a service given another CA refuses to start rather
/// than talk to a server it cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_reach_postgres_over_verified_tls() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let Some(ca) = postgres.ca_file() else {
        anyhow::ensure!(
            std::env::var("FERROCLAW_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "FERROCLAW_REQUIRE_POSTGRES=1, but the test PostgreSQL has no TLS (no openssl?)"
        );
        eprintln!("skipped: the test PostgreSQL has no TLS (no openssl command)");
        return Ok(());
    };
    let plain = postgres.create_database("tls").await?;
    let url = format!("{plain}?sslmode=verify-full&sslrootcert={}", ca.display());
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[("DATABASE_URL", url.clone())]).await?;
    let (status, body) = cluster.post_message("pg-tls", "over tls", None).await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines("pg-tls", &["echo: over tls".into()], WAIT)
        .await?;

    // Every connection to this database but the test's own (plain) one is encrypted.
    let mut db = sqlx::postgres::PgConnection::connect(&plain).await?;
    let (encrypted, unencrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut db)
    .await?;
    assert!(encrypted >= 3, "{encrypted} encrypted connections");
    assert_eq!(unencrypted, 0, "plain connections besides the test's");
    db.close().await?;

    // Another CA: the server cannot be verified, so delivery will not start.
    let other = tempfile::tempdir()?;
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "1",
            "-subj",
            "/CN=another CA",
            "-nodes",
        ])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-keyout", "ca.key", "-out", "ca.pem"])
        .current_dir(other.path())
        .output()?;
    anyhow::ensure!(made.status.success(), "openssl: {made:?}");
    let wrong = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        other.path().join("ca.pem").display()
    );
    let refused = cluster
        .start_another("delivery", &[("DATABASE_URL", wrong)])
        .await;
    assert!(
        refused.is_err(),
        "a delivery that cannot verify the server started"
    );
    cluster.stop().await
}

/// A service started before PostgreSQL answers waits for it (here: nothing listens at the
/// database's address for 2 s, then a forwarder to the real server does) and then starts,
/// instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_postgres_waits_for_it() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let url = postgres.create_database("late").await?;
    let server: std::net::SocketAddr = {
        let rest = url.rsplit_once('@').map(|(_, r)| r).unwrap_or_default();
        rest.split('/').next().unwrap_or_default().parse()?
    };
    // A free port, closed again: connections to it are refused until the forwarder binds it.
    let late = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let late_url = url.replace(&server.to_string(), &late.to_string());
    let forwarder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let listener = tokio::net::TcpListener::bind(late).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(server).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });

    let dir = tempfile::tempdir()?;
    let started = std::time::Instant::now();
    let cluster = Cluster::start(dir.path(), &[("DATABASE_URL", late_url)]).await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "ready before PostgreSQL could be reached: {waited:?}"
    );
    let (status, body) = cluster.post_message("pg-late", "waited", None).await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines("pg-late", &["echo: waited".into()], WAIT)
        .await?;
    cluster.stop().await?;
    forwarder.abort();
    Ok(())
}
