use std::time::Duration;

use ferroclaw_e2e::Cluster;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_and_api_message_each_get_their_echo_reply() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let timeout = Duration::from_secs(30);

    let (status, body) = cluster
        .post_message("chat-1", "hello <there>", None)
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["duplicate"], json!(false));
    assert!(
        body["session_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("ses_"))
    );
    cluster
        .wait_for_lines("chat-1", &["echo: hello <there>".into()], timeout)
        .await?;

    let (status, body) = cluster
        .post_hook(
            "default",
            &json!({"event": "build", "ok": true}),
            Some("hook-1"),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["message_id"], json!("hook-1"));
    cluster
        .wait_for_lines(
            "webhook-default",
            &[r#"echo: webhook default: {"event":"build","ok":true}"#.into()],
            timeout,
        )
        .await?;

    // A repeated idempotency key returns the first result and produces no second reply.
    let (status, again) = cluster
        .post_hook(
            "default",
            &json!({"event": "build", "ok": true}),
            Some("hook-1"),
        )
        .await?;
    assert_eq!(status, 202);
    assert_eq!(again["duplicate"], json!(true));
    assert_eq!(again["session_id"], body["session_id"]);
    // A marker after the duplicate: once its reply is there, a reply to the duplicate
    // would have been there too (one agent answers a session in order).
    cluster
        .post_hook("default", &json!("marker"), Some("hook-2"))
        .await?;
    let lines = cluster
        .wait_for_lines(
            "webhook-default",
            &[r#"echo: webhook default: "marker""#.into()],
            timeout,
        )
        .await?;
    assert_eq!(lines.len(), 2, "{lines:?}");

    let (status, sessions) = cluster.get("/v1/sessions").await?;
    assert_eq!(status, 200);
    assert_eq!(
        sessions["sessions"].as_array().map(Vec::len),
        Some(2),
        "{sessions}"
    );
    let (status, ready) = cluster.get("/readyz").await?;
    assert_eq!(status, 200, "{ready}");

    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_the_reply_is_there() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let (_, cursor) = cluster.messages("poll", 0, 0.0).await?;
    let waiting = {
        let api = cluster.api();
        tokio::spawn(async move {
            let url = format!("{api}/v1/conversations/poll/messages?after={cursor}&wait=30");
            let started = std::time::Instant::now();
            let body: serde_json::Value = reqwest::get(url).await?.json().await?;
            anyhow::Ok((body, started.elapsed()))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.post_message("poll", "ping", None).await?;
    let (body, elapsed) = waiting.await??;
    assert_eq!(body["messages"][0]["text"], json!("echo: ping"), "{body}");
    assert!(
        elapsed < Duration::from_secs(25),
        "long-poll did not wake: {elapsed:?}"
    );
    cluster.stop().await
}
