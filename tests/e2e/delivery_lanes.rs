//! Delivery lanes against the fake Discord: a rate-limited channel holds up no other,
//! Discord's 429 is a wait (its body, `Retry-After` and `X-RateLimit-*` headers) and never
//! a failure until the maximum age, order holds within a lane, a delivery killed mid-lane
//! loses and duplicates nothing, and no reply pings everyone or a role.

use std::time::{Duration, Instant};

use ferroclaw_e2e::fake_discord::FakeDiscord;
use ferroclaw_e2e::wait_until;
use serde_json::json;

use crate::discord::{ANN, OPEN, discord_cluster_with};

/// A second routed channel, and one whose route lets replies ping everyone and roles.
const OTHER: u64 = 555_555_555_555_555_555;
const LOUD: u64 = 888_888_888_888_888_888;

fn routes() -> String {
    format!(
        "[[discord.routes]]\nchannel = \"{OTHER}\"\nagent = \"main\"\n\
         [[discord.routes]]\nchannel = \"{LOUD}\"\nagent = \"main\"\nallow_mentions = [\"everyone\", \"roles\"]\n"
    )
}

fn posts_in(fake: &FakeDiscord, channel: u64) -> Vec<String> {
    let channel = channel.to_string();
    fake.posted()
        .into_iter()
        .filter(|p| p.channel_id == channel)
        .map(|p| p.content)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_channel_holds_up_no_other_and_its_reply_arrives_once_after_the_wait()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(dir.path(), &fake, &[], &routes()).await?;
    // Both sessions' agents warm, so what follows measures delivery only.
    fake.user_message(OPEN, ANN, "warm", true);
    fake.user_message(OTHER, ANN, "warm", true);
    fake.wait_posted(OPEN, 1).await?;
    fake.wait_posted(OTHER, 1).await?;

    fake.rate_limit_channel(OPEN, Duration::from_secs(6));
    fake.user_message(OPEN, ANN, "stuck behind a rate limit", true);
    wait_until(
        Duration::from_secs(20),
        "the reply in OPEN meets the 429",
        || fake.rate_limited_posts() >= 1,
    )
    .await?;
    let asked = Instant::now();
    fake.user_message(OTHER, ANN, "not held up", true);
    fake.wait_posted(OTHER, 2).await?;
    let other_took = asked.elapsed();
    assert_eq!(
        posts_in(&fake, OPEN),
        ["echo: warm"],
        "OTHER's reply went out while OPEN was still waiting"
    );
    println!("the other channel's reply took {other_took:?} while OPEN was rate-limited");

    // OPEN's reply goes out once, after the wait, with no failure notice; the 429 was a
    // wait, not a failed attempt.
    fake.wait_posted(OPEN, 2).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        posts_in(&fake, OPEN),
        ["echo: warm", "echo: stuck behind a rate limit"]
    );
    let deliveries = cluster.deliveries().await?;
    let waited: Vec<_> = deliveries
        .iter()
        .filter(|d| d.rate_limit_waits > 0)
        .collect();
    assert_eq!(waited.len(), 1, "{deliveries:?}");
    assert_eq!(waited[0].state, "delivered");
    assert!(
        deliveries.iter().all(|d| d.state == "delivered"),
        "{deliveries:?}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_longer_than_the_maximum_age_gives_one_plain_failure_notice()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let env = [("FERROCLAW_MAX_REPLY_AGE_SECS", "3".to_string())];
    let cluster = discord_cluster_with(dir.path(), &fake, &env, &routes()).await?;

    // A global limit first: it holds every channel, and is waited out.
    fake.rate_limit_globally(Duration::from_millis(1500));
    fake.user_message(OTHER, ANN, "after a global limit", true);
    fake.wait_posted(OTHER, 1).await?;

    // Limited for 5 s, given up after 3: the user reads one plain sentence once the
    // channel takes posts again.
    fake.rate_limit_channel(OPEN, Duration::from_secs(5));
    fake.user_message(OPEN, ANN, "never delivered", true);
    let posted = fake.wait_posted(OPEN, 1).await?;
    assert_eq!(
        posted[0].content,
        "echo: system delivery_failed: Your message did not arrive. \
         Discord kept rate-limiting this channel for 3 seconds; the reply was not sent."
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(posts_in(&fake, OPEN).len(), 1, "one notice, no reply");

    let deliveries = cluster.deliveries().await?;
    let failed: Vec<_> = deliveries.iter().filter(|d| d.state == "failed").collect();
    assert_eq!(failed.len(), 1, "{deliveries:?}");
    assert!(
        failed[0]
            .reason
            .starts_with("Discord kept rate-limiting this channel"),
        "{failed:?}"
    );
    assert!(
        failed[0].detail.contains("429"),
        "details for operators: {failed:?}"
    );
    assert!(failed[0].rate_limit_waits >= 1, "{failed:?}");
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_keeps_its_order_when_its_first_row_needs_retries() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(dir.path(), &fake, &[], &routes()).await?;
    fake.user_message(OPEN, ANN, "warm", true);
    fake.wait_posted(OPEN, 1).await?;

    // The first reply meets three server errors; two more replies queue behind it.
    fake.fail_next_posts(3, 502, json!({"message": "Bad Gateway", "code": 0}));
    let attempts = fake.post_attempts();
    fake.user_message(OPEN, ANN, "first", true);
    wait_until(Duration::from_secs(20), "the first reply is tried", || {
        fake.post_attempts() > attempts
    })
    .await?;
    fake.user_message(OPEN, ANN, "second", true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.user_message(OPEN, ANN, "third", true);
    fake.wait_lines(
        OPEN,
        &["echo: warm", "echo: first", "echo: second", "echo: third"],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.lines(OPEN),
        ["echo: warm", "echo: first", "echo: second", "echo: third"],
        "in order, each once"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_killed_mid_lane_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let mut cluster = discord_cluster_with(dir.path(), &fake, &[], &routes()).await?;
    fake.user_message(OPEN, ANN, "warm", true);
    fake.wait_posted(OPEN, 1).await?;

    // One reply waits out a rate limit; others queue behind it in the same lane.
    fake.rate_limit_channel(OPEN, Duration::from_secs(3));
    fake.user_message(OPEN, ANN, "one", true);
    wait_until(Duration::from_secs(20), "the reply meets the 429", || {
        fake.rate_limited_posts() >= 1
    })
    .await?;
    fake.user_message(OPEN, ANN, "two", true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill_delivery().await?;
    // While delivery is down, another channel gets a message too.
    fake.user_message(OTHER, ANN, "during the restart", true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart_delivery().await?;

    fake.wait_lines(OPEN, &["echo: warm", "echo: one", "echo: two"])
        .await?;
    fake.wait_lines(OTHER, &["echo: during the restart"])
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.lines(OPEN), ["echo: warm", "echo: one", "echo: two"]);
    assert_eq!(fake.lines(OTHER), ["echo: during the restart"]);
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
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_never_ping_everyone_or_roles_unless_the_route_allows_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(dir.path(), &fake, &[], &routes()).await?;
    let text = "@everyone look, <@&123456789012345678> too, and <@444444444444444444>";

    fake.user_message(OPEN, ANN, text, true);
    let posted = fake.wait_posted(OPEN, 1).await?;
    assert_eq!(posted[0].content, format!("echo: {text}"));
    assert_eq!(
        posted[0].allowed_mentions,
        json!({"parse": ["users"], "replied_user": true}),
        "people named may be pinged; everyone and roles may not"
    );

    fake.user_message(LOUD, ANN, text, true);
    let posted = fake.wait_posted(LOUD, 1).await?;
    assert_eq!(
        posted[0].allowed_mentions,
        json!({"parse": ["users", "everyone", "roles"], "replied_user": true}),
        "the route widened it"
    );
    cluster.stop().await
}
