use std::collections::HashMap;
use std::time::Duration;

use ferroclaw_e2e::Cluster;

/// Posts until accepted: while the runner is down the gateway answers 503, and a client
/// retries with the same idempotency key.
async fn post_until_accepted(
    cluster: &Cluster,
    conversation: &str,
    text: &str,
) -> anyhow::Result<()> {
    for _ in 0..300 {
        let (status, body) = cluster.post_message(conversation, text, Some(text)).await?;
        match status {
            202 => return Ok(()),
            503 | 502 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("unexpected {other}: {body}"),
        }
    }
    anyhow::bail!("{text} was never accepted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_killed_mid_stream_every_message_gets_exactly_one_reply() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Slow agents, so the kill lands while batches are in flight and replies unsettled.
    let mut cluster =
        Cluster::start(dir.path(), &[("FERROCLAW_ECHO_DELAY_MS", "150".into())]).await?;
    let conversations: Vec<String> = (0..4).map(|i| format!("restart-{i}")).collect();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();

    for round in 0..10 {
        for conversation in &conversations {
            let text = format!("{conversation}-m{round}");
            post_until_accepted(&cluster, conversation, &text).await?;
            expected
                .entry(conversation.clone())
                .or_default()
                .push(format!("echo: {text}"));
        }
        if round == 4 {
            cluster.kill_runner().await?;
            // Messages sent now are refused (503) and retried by the client.
            let retrying = {
                let conversation = conversations[0].clone();
                let text = format!("{conversation}-during-outage");
                expected
                    .entry(conversation.clone())
                    .or_default()
                    .push(format!("echo: {text}"));
                let (status, _) = cluster
                    .post_message(&conversation, &text, Some(&text))
                    .await?;
                assert!(
                    status == 503 || status == 502,
                    "runner is down, got {status}"
                );
                (conversation, text)
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.restart_runner().await?;
            post_until_accepted(&cluster, &retrying.0, &retrying.1).await?;
        }
    }

    for conversation in &conversations {
        let want = &expected[conversation];
        cluster
            .wait_for_lines(conversation, want, Duration::from_secs(60))
            .await?;
    }
    // Give any duplicate time to show up, then check each message was answered once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for conversation in &conversations {
        let lines: Vec<String> = cluster
            .texts(conversation)
            .await?
            .iter()
            .flat_map(|t| t.lines().map(String::from).collect::<Vec<_>>())
            .collect();
        let mut sorted = lines.clone();
        sorted.sort();
        let mut want = expected[conversation].clone();
        want.sort();
        assert_eq!(sorted, want, "{conversation}: replies {lines:?}");
    }
    cluster.stop().await
}
