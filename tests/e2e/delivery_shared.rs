//! Two deliveries on one PostgreSQL ledger share the work by destination lane (lane
//! leases): the one holding a lane stuck in a Discord rate-limit wait is SIGKILLed, its
//! peer takes the lane over once the lease expires, and every reply in that lane and in
//! others arrives exactly once, in order.

use std::time::{Duration, Instant};

use ferroclaw_e2e::fake_discord::FakeDiscord;
use ferroclaw_e2e::wait_until;
use sqlx::Connection;

use crate::discord::{ANN, OPEN, discord_cluster_with};

const OTHER: u64 = 555_555_555_555_555_555;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_killed_mid_lane_is_replaced_by_its_peer_with_nothing_lost_or_repeated()
-> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let url = postgres.create_database("delivery_shared").await?;
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let routes = format!("[[discord.routes]]\nchannel = \"{OTHER}\"\nagent = \"main\"\n");
    let mut cluster =
        discord_cluster_with(dir.path(), &fake, &[("DATABASE_URL", url.clone())], &routes).await?;
    let mut peer = cluster.start_another("delivery", &[]).await?;
    fake.user_message(OPEN, ANN, "warm", true);
    fake.user_message(OTHER, ANN, "warm", true);
    fake.wait_lines(OPEN, &["echo: warm"]).await?;
    fake.wait_lines(OTHER, &["echo: warm"]).await?;

    // A reply waits out a rate limit, and another queues behind it in the same lane.
    fake.rate_limit_channel(OPEN, Duration::from_secs(3));
    fake.user_message(OPEN, ANN, "one", true);
    wait_until(Duration::from_secs(20), "the reply meets the 429", || {
        fake.rate_limited_posts() >= 1
    })
    .await?;
    fake.user_message(OPEN, ANN, "two", true);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL whichever delivery holds that lane.
    let mut db = sqlx::postgres::PgConnection::connect(&url).await?;
    let holder: String =
        sqlx::query_scalar("SELECT holder FROM delivery.lane_leases WHERE lane = $1")
            .bind(format!("discord:{OPEN}"))
            .fetch_one(&mut db)
            .await?;
    let pid = |p: &ferroclaw_common::launch::ServiceProcess| p.child.id().unwrap_or_default();
    let holder_pid: u32 = holder.split(':').nth(1).unwrap_or_default().parse()?;
    anyhow::ensure!(
        holder_pid == pid(&cluster.delivery) || holder_pid == pid(&peer),
        "the lane is held by {holder}, neither delivery"
    );
    if holder_pid == pid(&cluster.delivery) {
        // The cluster keeps the survivor, which it stops at the end.
        std::mem::swap(&mut cluster.delivery, &mut peer);
    }
    peer.child.kill().await?;
    peer.child.wait().await?;
    let killed = Instant::now();
    // Another lane goes on meanwhile, through the survivor.
    fake.user_message(OTHER, ANN, "during the takeover", true);

    fake.wait_lines(OPEN, &["echo: warm", "echo: one", "echo: two"])
        .await?;
    let took_over = killed.elapsed();
    fake.wait_lines(OTHER, &["echo: warm", "echo: during the takeover"])
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.lines(OPEN), ["echo: warm", "echo: one", "echo: two"]);
    assert_eq!(
        fake.lines(OTHER),
        ["echo: warm", "echo: during the takeover"]
    );
    assert_eq!(
        fake.repeated_nonces(),
        0,
        "nothing already posted was sent again"
    );
    let deliveries = cluster.deliveries().await?;
    assert!(
        deliveries.iter().all(|d| d.state == "delivered"),
        "{deliveries:?}"
    );
    println!("the survivor finished the dead delivery's lane {took_over:?} after the kill");
    // Within the lease (10 s) plus a retry and the rest of the rate-limit wait.
    assert!(took_over < Duration::from_secs(30), "{took_over:?}");
    cluster.stop().await
}

/// On SQLite a second delivery would send every row again: it refuses to start, and says
/// why, while the first goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_delivery_on_one_sqlite_ledger_refuses_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = ferroclaw_e2e::Cluster::start(dir.path(), &[]).await?;
    let second = cluster.start_another("delivery", &[]).await;
    let error = match second {
        Ok(_) => anyhow::bail!("a second delivery started on the same SQLite ledger"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("exited") || error.contains("ready"),
        "it did not become ready: {error}"
    );
    let (status, body) = cluster.post_message("still-one", "hello", None).await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines(
            "still-one",
            &["echo: hello".into()],
            Duration::from_secs(30),
        )
        .await?;
    cluster.stop().await
}
