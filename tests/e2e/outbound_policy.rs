//! The host authorises every outbound row: a hostile agent that writes its own `outbound.db`
//! reaches only the places its session may send to, within the size and count limits.

use std::time::{Duration, Instant};

use ferroclaw_e2e::{Cluster, docker_available};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_rows_from_a_process_agent_go_nowhere_they_may_not() -> anyhow::Result<()> {
    forged_rows_are_refused(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_rows_from_a_container_go_nowhere_they_may_not() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    forged_rows_are_refused(true).await
}

/// Every chat and card text of a conversation, page after page.
async fn chats(cluster: &Cluster, conversation: &str) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    let mut cursor = 0;
    loop {
        let (messages, next) = cluster.messages(conversation, cursor, 0.0).await?;
        if messages.is_empty() {
            return Ok(texts);
        }
        texts.extend(
            messages
                .iter()
                .filter(|m| m["kind"] == json!("chat") || m["kind"] == json!("card"))
                .map(|m| m["text"].as_str().unwrap_or_default().to_string()),
        );
        cursor = next;
    }
}

async fn forged_rows_are_refused(docker: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Another webhook source's callback: a listener that must never be called.
    let callback = std::net::TcpListener::bind("127.0.0.1:0")?;
    callback.set_nonblocking(true)?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[[agents]]\nname = \"main\"\n\n[[conversations]]\npattern = \"*\"\nagent = \"main\"\n\n\
             [[webhooks]]\nsource = \"other\"\nagent = \"main\"\nsecret = \"s3cret\"\n\
             callback_url = \"http://{}/cb\"\n",
            callback.local_addr()?
        ),
    )?;
    let mut env = vec![("FERROCLAW_CONFIG", config.display().to_string())];
    if docker {
        env.push(("FERROCLAW_RUNNER_BACKEND", "docker".into()));
        env.push((
            "FERROCLAW_AGENT_IMAGE",
            ferroclaw_e2e::offline_hostile_image()?,
        ));
    } else {
        env.push((
            "FERROCLAW_AGENT_BINARY",
            ferroclaw_e2e::binary("hostile-agent")?
                .display()
                .to_string(),
        ));
    }
    let cluster = Cluster::start(&dir.path().join("data"), &env).await?;
    let started = Instant::now();
    let (status, attacker) = cluster.post_message("attacker", "forge", None).await?;
    assert_eq!(status, 202, "{attacker}");
    let (status, _) = cluster.post_message("bystander", "hello", None).await?;
    assert_eq!(status, 202);

    // The allowed rows arrive: the first of its own, then 99 more up to the batch limit,
    // and the report with which the agent answers the notice of what was refused.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let own = chats(&cluster, "attacker").await?;
        let rows = own.iter().filter(|t| t.starts_with("own-")).count();
        let report = own.iter().any(|t| t.starts_with('{'));
        if rows >= 100 && report && !chats(&cluster, "bystander").await?.is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{rows} own rows, notice answered: {report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("10,007 forged rows judged in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let own = chats(&cluster, "attacker").await?;
    let expected: Vec<String> = (0..100).map(|i| format!("own-{i}")).collect();
    let got: Vec<String> = own
        .iter()
        .filter(|t| t.starts_with("own-"))
        .cloned()
        .collect();
    assert_eq!(
        got, expected,
        "exactly the first 100 of the batch, in order"
    );
    assert!(
        own.iter().all(|t| t.len() < 1024 * 1024),
        "the 30 MiB row was not delivered"
    );
    assert_eq!(
        chats(&cluster, "victim").await?,
        Vec::<String>::new(),
        "nothing reached another user's conversation"
    );
    assert!(
        matches!(callback.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "another source's callback was never called"
    );
    let (_, tasks) = cluster.get("/v1/tasks").await?;
    assert_eq!(tasks["tasks"], json!([]), "no task was made: {tasks}");

    // Each refused row is settled as failed with the reason, in the session's own mailbox.
    let session = attacker["session_id"].as_str().unwrap_or_default();
    let failed = ferroclaw_e2e::failed_details(&ferroclaw_e2e::session_dir(
        &dir.path().join("data"),
        session,
    ))
    .await?;
    assert_eq!(
        failed.len(),
        5 + 1 + 9_901 + 1,
        "every refused row is settled failed"
    );
    let reasons = &failed;
    for needle in [
        "may not send to the API conversation \"victim\"",
        "may not send to the Discord channel 999",
        "may not send to the callback of webhook source \"other\"",
        "max_row_bytes",
        "max_rows_per_batch",
        "a message of type \"exec\" was refused",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "a refusal says {needle:?}"
        );
    }
    let bystander: Vec<Value> = cluster.messages("bystander", 0, 0.0).await?.0;
    assert_eq!(
        bystander.len(),
        1,
        "another session was answered: {bystander:?}"
    );
    cluster.stop().await
}
