//! An operator retries a failed delivery: a Discord reply given up after server errors is
//! marked retryable, goes out exactly once when retried after the outage (also when the
//! first retry was cut short before the runner reopened the row), and cannot be retried
//! again; a reply Discord refused is not retryable; the runner reopening a row on its own
//! sends nothing (delivery's ledger decides).

use std::time::Duration;

use ferroclaw_e2e::fake_discord::FakeDiscord;
use ferroclaw_e2e::{Cluster, session_dir};
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{DeliveryRecord, ReopenOutboundRequest, RetryDeliveryRequest};
use serde_json::json;

use crate::discord::{ANN, OPEN, discord_cluster_with};

/// Polls the ledger until `ready` holds for it; returns it.
async fn ledger_until(
    cluster: &Cluster,
    what: &str,
    ready: impl Fn(&[DeliveryRecord]) -> bool,
) -> anyhow::Result<Vec<DeliveryRecord>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let deliveries = cluster.deliveries().await?;
        if ready(&deliveries) {
            return Ok(deliveries);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "waited in vain: {what}: {deliveries:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn retry(cluster: &Cluster, row: &DeliveryRecord) -> Result<String, tonic::Status> {
    let channel = cluster
        .internal_channel(&cluster.delivery.grpc_url())
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    DeliveryClient::new(channel)
        .retry_delivery(RetryDeliveryRequest {
            session_id: row.session_id.clone(),
            out_seq: row.out_seq,
        })
        .await
        .map(|r| r.into_inner().state)
}

/// The outcome the runner recorded for an outbound row (its `delivered` table).
async fn runner_outcome(session: &std::path::Path, seq: i64) -> anyhow::Result<Option<String>> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(session.join("in/inbound.db"))
        .read_only(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(options)
        .await?;
    let outcome = sqlx::query_scalar("SELECT outcome FROM delivered WHERE out_seq = $1")
        .bind(seq)
        .fetch_optional(&pool)
        .await?;
    pool.close().await;
    Ok(outcome)
}

/// Waits until the runner has recorded each (seq, outcome).
async fn runner_outcomes(
    session: &std::path::Path,
    expected: &[(i64, &str)],
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut found = Vec::new();
        for (seq, _) in expected {
            found.push(runner_outcome(session, *seq).await?);
        }
        if expected
            .iter()
            .zip(&found)
            .all(|((_, want), got)| got.as_deref() == Some(*want))
        {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the runner's outcomes are {found:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn posts_of(fake: &FakeDiscord, line: &str) -> usize {
    fake.lines(OPEN).iter().filter(|l| *l == line).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_given_up_in_an_outage_is_retried_once_and_a_refused_one_is_not()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let env = [("FERROCLAW_MAX_REPLY_AGE_SECS", "3".to_string())];
    let mut cluster = discord_cluster_with(dir.path(), &fake, &env, "").await?;

    // Discord answers 502 to every post: the reply is given up after 3 s, and so is the
    // agent's answer to the failure notice (no further notice: no loop).
    fake.fail_next_posts(100_000, 502, json!({"message": "Bad Gateway", "code": 0}));
    fake.user_message(OPEN, ANN, "lost in an outage", true);
    let deliveries = ledger_until(&cluster, "the reply and the notice's answer fail", |d| {
        d.iter().filter(|d| d.state == "failed").count() == 2
    })
    .await?;
    let mut failed: Vec<DeliveryRecord> = deliveries
        .into_iter()
        .filter(|d| d.state == "failed")
        .collect();
    failed.sort_by_key(|d| d.out_seq);
    let (reply, notice_answer) = (failed[0].clone(), failed[1].clone());
    assert_eq!(
        reply.reason, "Discord kept failing for 3 seconds; the reply was not sent.",
        "{reply:?}"
    );
    assert!(reply.detail.contains("502"), "{reply:?}");
    assert!(reply.retryable, "given up after server errors: {reply:?}");
    assert!(notice_answer.retryable, "{notice_answer:?}");
    let session = session_dir(&cluster.data_dir, &reply.session_id);
    runner_outcomes(
        &session,
        &[(reply.out_seq, "failed"), (notice_answer.out_seq, "failed")],
    )
    .await?;

    // The outage ends. The operator retries while the runner is down: the ledger entry
    // is marked, the runner is not told. That is where a delivery that died between the
    // two steps would leave it; nothing sends it.
    fake.clear_failures();
    cluster.kill_runner().await?;
    let cut_short = retry(&cluster, &reply).await.expect_err("runner down");
    assert_eq!(cut_short.code(), tonic::Code::Unavailable, "{cut_short:?}");
    let marked = cluster
        .deliveries()
        .await?
        .into_iter()
        .find(|d| d.out_seq == reply.out_seq)
        .unwrap_or_default();
    assert_eq!(
        (marked.state.as_str(), marked.retryable),
        ("pending", false)
    );
    // Longer than the maximum age since the first retry, too.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    cluster.restart_runner().await?;
    // Delivery is streaming from the new runner once a new reply gets through.
    fake.user_message(OPEN, ANN, "back", true);
    fake.wait_lines(OPEN, &["echo: back"]).await?;
    assert_eq!(posts_of(&fake, "echo: lost in an outage"), 0);

    // The runner reopening a row by itself sends nothing: the ledger still says failed,
    // so delivery settles it failed again.
    let runner = RunnerClient::new(cluster.internal_channel(&cluster.runner.grpc_url())?);
    let reopened = runner
        .clone()
        .reopen_outbound(ReopenOutboundRequest {
            session_id: notice_answer.session_id.clone(),
            out_seq: notice_answer.out_seq,
        })
        .await?
        .into_inner();
    assert!(reopened.reopened);

    // Retried again: its first post meets one more server error and is tried again, as
    // its maximum age counts from this retry. It arrives once.
    fake.fail_next_posts(1, 502, json!({"message": "Bad Gateway", "code": 0}));
    assert_eq!(retry(&cluster, &reply).await?, "pending");
    fake.wait_lines(OPEN, &["echo: lost in an outage"]).await?;
    let deliveries = ledger_until(&cluster, "the retried reply is delivered", |d| {
        d.iter()
            .any(|d| d.out_seq == reply.out_seq && d.state == "delivered")
    })
    .await?;
    let retried = deliveries
        .iter()
        .find(|d| d.out_seq == reply.out_seq)
        .cloned()
        .unwrap_or_default();
    assert!(!retried.retryable, "{retried:?}");
    assert!(
        retried.attempts > reply.attempts,
        "attempts kept: {retried:?}"
    );
    // The runner has the reply delivered, and the reopened notice answer settled failed
    // again (never posted).
    runner_outcomes(
        &session,
        &[
            (reply.out_seq, "delivered"),
            (notice_answer.out_seq, "failed"),
        ],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        posts_of(&fake, "echo: lost in an outage"),
        1,
        "exactly once"
    );
    assert_eq!(
        fake.lines(OPEN),
        ["echo: back", "echo: lost in an outage"],
        "the reopened notice answer was not posted"
    );
    assert_eq!(fake.repeated_nonces(), 0);
    let notice_now = cluster
        .deliveries()
        .await?
        .into_iter()
        .find(|d| d.out_seq == notice_answer.out_seq)
        .unwrap_or_default();
    assert_eq!(notice_now.state, "failed", "{notice_now:?}");

    // Retried again once delivered: refused. An unknown row: not found.
    let again = retry(&cluster, &reply)
        .await
        .expect_err("delivered already");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    let unknown = DeliveryRecord {
        out_seq: 999_999,
        ..reply.clone()
    };
    let missing = retry(&cluster, &unknown).await.expect_err("no such row");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    // Discord refuses the next reply (403): not retryable.
    fake.fail_next_posts(
        1,
        403,
        json!({"message": "Missing Permissions", "code": 50013}),
    );
    fake.user_message(OPEN, ANN, "refused", true);
    let deliveries = ledger_until(&cluster, "the refused reply fails", |d| {
        d.iter().any(|d| d.state == "failed" && !d.retryable)
    })
    .await?;
    let refused = deliveries
        .iter()
        .find(|d| d.state == "failed" && !d.retryable)
        .cloned()
        .unwrap_or_default();
    assert!(
        refused
            .reason
            .contains("the bot may not post in this channel"),
        "{refused:?}"
    );
    let status = retry(&cluster, &refused).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("was refused by the destination; sending it again would fail the same way"),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(posts_of(&fake, "echo: refused"), 0);
    cluster.stop().await
}
