//! Discord catch-up finds everything (issue 12, item 5), against the fake Discord, whose
//! history answers without `guild_id` as Discord's does: thread messages missed in an
//! outage go to their parent channel's route, a channel empty at the first connect is
//! covered, threads opened during an outage are found, the bot resumes on the session's
//! `resume_gateway_url` and logs off with a close frame.

use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_discord::FakeDiscord;

const OPEN: u64 = 111_111_111_111_111_111;
const QUIET: u64 = 222_222_222_222_222_222;
const DM: u64 = 333_333_333_333_333_333;
const ANN: u64 = 444_444_444_444_444_444;
const THREAD: u64 = 777_777_777_777_777_777;

/// A cluster whose Discord routes are OPEN and QUIET (agent "main"), and with `dm` a DM
/// route to another agent ("dmagent").
async fn cluster(dir: &std::path::Path, fake: &FakeDiscord, dm: bool) -> anyhow::Result<Cluster> {
    let config = dir.join("ferroclaw.toml");
    let dm_route = if dm {
        "[[discord.routes]]\nchannel = \"dm\"\nagent = \"dmagent\"\n"
    } else {
        ""
    };
    std::fs::write(
        &config,
        format!(
            "[discord]\napi_url = \"{}\"\n\
             [[discord.routes]]\nchannel = \"{OPEN}\"\nagent = \"main\"\n\
             [[discord.routes]]\nchannel = \"{QUIET}\"\nagent = \"main\"\n{dm_route}\
             [[agents]]\nname = \"main\"\n[[agents]]\nname = \"dmagent\"\n",
            fake.url()
        ),
    )?;
    let cluster = Cluster::start(
        &dir.join("data"),
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("DISCORD_BOT_TOKEN", "fake-bot-token".into()),
        ],
    )
    .await?;
    fake.wait_identified(1).await?;
    Ok(cluster)
}

/// Waits until the gateway's cursor file has a cursor for every one of `channels` (the
/// first connect's work is done).
async fn wait_cursors(cluster: &Cluster, channels: &[u64]) -> anyhow::Result<()> {
    let path = cluster.data_dir.join("discord-cursors.json");
    for _ in 0..300 {
        let cursors: serde_json::Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if channels
            .iter()
            .all(|c| cursors[c.to_string()].as_u64().is_some())
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "no cursors for {channels:?}: {:?}",
        std::fs::read_to_string(&path)
    )
}

/// An outage: the bot is disconnected when this returns.
async fn outage(fake: &FakeDiscord) -> anyhow::Result<()> {
    fake.go_down();
    fake.wait_disconnected().await
}

/// After the outage: the bot reconnects (its `n`th session).
async fn recover(fake: &FakeDiscord, n: usize) -> anyhow::Result<()> {
    fake.come_up();
    fake.wait_identified(n).await
}

/// The agents of the sessions, by conversation key.
async fn sessions(cluster: &Cluster) -> anyhow::Result<Vec<(String, String)>> {
    let (_, body) = cluster.get("/v1/sessions").await?;
    let mut found: Vec<(String, String)> = body["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["conversation_key"].as_str().unwrap_or("").to_string(),
                s["agent"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    found.sort();
    Ok(found)
}

async fn thread_message_missed_in_an_outage(with_dm_route: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    fake.add_thread(THREAD, OPEN);
    let cluster = cluster(dir.path(), &fake, with_dm_route).await?;

    // The thread is in use: answered live, in the channel's session.
    fake.user_message(THREAD, ANN, "live in the thread", true);
    fake.wait_lines(THREAD, &["echo: live in the thread"])
        .await?;
    if with_dm_route {
        fake.user_message(DM, ANN, "live dm", false);
        fake.wait_lines(DM, &["echo: live dm"]).await?;
    }
    wait_cursors(&cluster, &[OPEN, QUIET, THREAD]).await?;

    outage(&fake).await?;
    fake.user_message(THREAD, ANN, "missed in the thread", true);
    if with_dm_route {
        fake.user_message(DM, ANN, "missed dm", false);
    }
    recover(&fake, 2).await?;
    fake.wait_lines(THREAD, &["echo: missed in the thread"])
        .await?;
    if with_dm_route {
        fake.wait_lines(DM, &["echo: missed dm"]).await?;
    }

    // A later message in the same session comes after any duplicate would have.
    fake.user_message(THREAD, ANN, "marker", true);
    fake.wait_lines(THREAD, &["echo: marker"]).await?;
    assert_eq!(
        fake.lines(THREAD),
        vec![
            "echo: live in the thread",
            "echo: missed in the thread",
            "echo: marker"
        ],
        "answered once, in the thread"
    );
    let mut expected = vec![(format!("discord:{OPEN}"), "main".to_string())];
    if with_dm_route {
        expected.push((format!("discord:{DM}"), "dmagent".to_string()));
        assert_eq!(fake.lines(DM), vec!["echo: live dm", "echo: missed dm"]);
    }
    expected.sort();
    assert_eq!(
        sessions(&cluster).await?,
        expected,
        "the thread's messages went to the parent channel's route and session, not the DM agent"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_message_missed_in_an_outage_goes_to_the_thread_route_not_the_dm_route()
-> anyhow::Result<()> {
    thread_message_missed_in_an_outage(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_message_missed_in_an_outage_is_answered_without_a_dm_route() -> anyhow::Result<()>
{
    thread_message_missed_in_an_outage(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_empty_at_the_first_connect_is_caught_up_after_an_outage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = cluster(dir.path(), &fake, false).await?;
    // QUIET has no message at all, yet gets a cursor.
    wait_cursors(&cluster, &[OPEN, QUIET]).await?;

    outage(&fake).await?;
    fake.user_message(QUIET, ANN, "first while away", true);
    fake.user_message(QUIET, ANN, "second while away", true);
    recover(&fake, 2).await?;
    fake.wait_lines(
        QUIET,
        &["echo: first while away", "echo: second while away"],
    )
    .await?;

    fake.user_message(QUIET, ANN, "marker", true);
    fake.wait_lines(QUIET, &["echo: marker"]).await?;
    assert_eq!(
        fake.lines(QUIET),
        vec![
            "echo: first while away",
            "echo: second while away",
            "echo: marker"
        ],
        "each answered once"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_opened_during_an_outage_is_found_and_answered() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = cluster(dir.path(), &fake, true).await?;
    wait_cursors(&cluster, &[OPEN, QUIET]).await?;

    outage(&fake).await?;
    let thread = fake.new_thread(OPEN);
    fake.user_message(thread, ANN, "in a new thread", true);
    recover(&fake, 2).await?;
    fake.wait_lines(thread, &["echo: in a new thread"]).await?;

    fake.user_message(thread, ANN, "marker", true);
    fake.wait_lines(thread, &["echo: marker"]).await?;
    assert_eq!(
        fake.lines(thread),
        vec!["echo: in a new thread", "echo: marker"],
        "answered once, in the thread"
    );
    assert_eq!(
        sessions(&cluster).await?,
        vec![(format!("discord:{OPEN}"), "main".to_string())],
        "in the parent channel's session"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_resumes_on_the_resume_url_and_logs_off_with_a_close_frame() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = cluster(dir.path(), &fake, false).await?;
    wait_cursors(&cluster, &[OPEN, QUIET]).await?;

    // Discord asks for a reconnect; the bot resumes at once, on READY's resume_gateway_url.
    fake.ask_reconnect();
    fake.wait_identified(2).await?;
    assert_eq!(
        fake.gateway_log(),
        vec!["identify:/", "resume:/resume"],
        "identify on the gateway URL, resume on the session's resume URL"
    );
    // Still connected: a message is answered.
    fake.user_message(OPEN, ANN, "after the resume", true);
    fake.wait_lines(OPEN, &["echo: after the resume"]).await?;

    cluster.stop().await?;
    assert_eq!(fake.wait_close().await?, Some(1000), "a clean close frame");
    assert_eq!(fake.close_codes(), vec![Some(1000)]);
    Ok(())
}
