//! An agent that jams its own `outbound.db` (a FIFO where SQLite opens the file's journal)
//! holds up its own session only: the runner gives up on that file's calls, other sessions
//! are answered, the session list answers, messages to the jammed one get a clear 503, and
//! the runner still stops cleanly.

use std::time::{Duration, Instant};

use ferroclaw_e2e::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_jams_its_file_holds_up_only_its_own_session() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let env = vec![(
        "FERROCLAW_AGENT_BINARY",
        ferroclaw_e2e::binary("hostile-agent")?
            .display()
            .to_string(),
    )];
    let cluster = Cluster::start(&dir.path().join("data"), &env).await?;
    let replies = async |conversation: &str, n: usize| -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let texts = cluster.texts(conversation).await?;
            if texts.len() >= n {
                return Ok(texts);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{conversation}: {} of {n} replies: {texts:?}",
                texts.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let (status, body) = cluster.post_message("bystander", "hello", None).await?;
    assert_eq!(status, 202, "{body}");
    replies("bystander", 1).await?;
    let (status, body) = cluster.post_message("jammer", "jam", None).await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(replies("jammer", 1).await?, vec!["jammed".to_string()]);

    // The runner's reads of the jammer's file now wait in the FIFO's open. Its enqueue
    // reads that file too: it is refused, saying why, and nothing is taken.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tries = 0;
    let refusal = loop {
        tries += 1;
        let (status, body) = cluster
            .post_message("jammer", "anyone there?", Some(&format!("try-{tries}")))
            .await?;
        if status == 503 && body.to_string().contains("did not return within") {
            break body;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no refusal for the jammed session: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("refused: {refusal}");
    // The session list (the console's, the API's) reads every session's files: it answers.
    let (status, listed) = cluster.get("/v1/sessions").await?;
    assert_eq!(status, 200, "{listed}");

    // Every other session goes on being answered (this agent answers a batch once: one
    // message at a time).
    for i in 0..5 {
        let (status, body) = cluster
            .post_message("bystander", &format!("after the jam {i}"), None)
            .await?;
        assert_eq!(status, 202, "{body}");
        replies("bystander", 2 + i).await?;
    }
    let (status, body) = cluster.post_message("newcomer", "hello", None).await?;
    assert_eq!(status, 202, "{body}");
    replies("newcomer", 1).await?;

    // The runner still stops on SIGTERM, though a read of the jammed file never returns.
    cluster.stop().await
}
