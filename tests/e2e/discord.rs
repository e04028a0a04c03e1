//! Discord end to end against the fake Discord: serenity's gateway client in the gateway
//! service, its HTTP client in delivery, the echo agent in between.

use std::time::Duration;

use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_discord::{BOT_ID, FakeDiscord};
use serde_json::json;

pub(crate) const OPEN: u64 = 111_111_111_111_111_111;
const MENTION_ONLY: u64 = 222_222_222_222_222_222;
const DM: u64 = 333_333_333_333_333_333;
pub(crate) const ANN: u64 = 444_444_444_444_444_444;
const THREADED: u64 = 666_666_666_666_666_666;
const USER_THREAD: u64 = 777_777_777_777_777_777;

async fn discord_cluster(dir: &std::path::Path, fake: &FakeDiscord) -> anyhow::Result<Cluster> {
    discord_cluster_with(dir, fake, &[], "").await
}

pub(crate) async fn discord_cluster_with(
    dir: &std::path::Path,
    fake: &FakeDiscord,
    env: &[(&'static str, String)],
    extra_toml: &str,
) -> anyhow::Result<Cluster> {
    let config = dir.join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[discord]\napi_url = \"{}\"\n\
             [[discord.routes]]\nchannel = \"{OPEN}\"\nagent = \"main\"\n\
             [[discord.routes]]\nchannel = \"{MENTION_ONLY}\"\nagent = \"main\"\nengage = \"mention\"\n\
             [[discord.routes]]\nchannel = \"dm\"\nagent = \"main\"\n\
             [[discord.routes]]\nchannel = \"{THREADED}\"\nagent = \"main\"\nengage = \"mention\"\nthread_on_mention = true\n{extra_toml}\n",
            fake.url()
        ),
    )?;
    let mut all = vec![
        ("FERROCLAW_CONFIG", config.display().to_string()),
        ("DISCORD_BOT_TOKEN", "fake-bot-token".into()),
    ];
    all.extend(env.iter().cloned());
    let cluster = Cluster::start(&dir.join("data"), &all).await?;
    fake.wait_identified(1).await?;
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_mention_and_dm_messages_get_one_reply_each() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster(dir.path(), &fake).await?;

    // A message in an open channel, then the same event again: one reply.
    let event = fake.user_message(OPEN, ANN, "hello bot", true);
    fake.dispatch("MESSAGE_CREATE", event);
    let replies = fake.wait_posted(OPEN, 1).await?;
    assert_eq!(replies[0].content, "echo: hello bot");

    // Other bots are ignored.
    fake.other_bot_message(OPEN, "ignore me");

    // Mention-only channel: without a mention nothing happens; with one, the mention is
    // stripped.
    fake.user_message(MENTION_ONLY, ANN, "just chatting", true);
    fake.user_message(
        MENTION_ONLY,
        ANN,
        &format!("<@{BOT_ID}> what time is it?"),
        true,
    );
    let replies = fake.wait_posted(MENTION_ONLY, 1).await?;
    assert_eq!(replies[0].content, "echo: what time is it?");

    // A direct message goes to the "dm" route and is answered in the DM channel.
    fake.user_message(DM, ANN, "psst", false);
    assert_eq!(fake.wait_posted(DM, 1).await?[0].content, "echo: psst");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let open: Vec<String> = fake
        .posted()
        .into_iter()
        .filter(|p| p.channel_id == OPEN.to_string())
        .map(|p| p.content)
        .collect();
    assert_eq!(
        open,
        vec!["echo: hello bot"],
        "duplicate and bot messages gave nothing"
    );
    assert_eq!(fake.wait_posted(MENTION_ONLY, 1).await?.len(), 1);

    // The channel's session reads as a chat in the operator console: what Ann wrote and
    // the reply, delivered (the console is open without an API token, on loopback).
    let (_, listed) = cluster.get("/v1/sessions?limit=50").await?;
    let session = listed["sessions"]
        .as_array()
        .and_then(|all| {
            all.iter().find(|s| {
                s["conversation_key"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("discord:") && k.contains(&OPEN.to_string()))
            })
        })
        .ok_or_else(|| anyhow::anyhow!("no session of the open channel in {listed}"))?;
    assert_eq!(session["messages_in"], json!(1), "{session}");
    assert_eq!(session["messages_out"], json!(1), "{session}");
    let id = session["id"].as_str().unwrap_or_default();
    let html = reqwest::get(format!("{}/ui/sessions/{id}/messages", cluster.api()))
        .await?
        .text()
        .await?;
    let mine = html.find(r#"class="msg mine""#).unwrap_or(usize::MAX);
    let agent = html.find(r#"class="msg agent""#).unwrap_or(usize::MAX);
    assert!(mine < agent && agent < usize::MAX, "{html}");
    assert!(html[mine..agent].contains("hello bot"), "{html}");
    assert!(
        html[agent..].contains("echo: hello bot") && html[agent..].contains("delivered"),
        "{html}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reply_arrives_as_ordered_chunks_and_failures_are_handled() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster(dir.path(), &fake).await?;

    let text: String = (0..300)
        .map(|i| format!("line {i:03} of a long message"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.len() > 4500);
    fake.user_message(OPEN, ANN, &text, true);
    let chunks = fake.wait_posted(OPEN, 5).await?;
    assert!(chunks.iter().all(|c| c.content.chars().count() <= 2000));
    let joined: Vec<String> = chunks.iter().map(|c| c.content.clone()).collect();
    assert_eq!(
        joined.join("\n"),
        format!("echo: {text}"),
        "nothing lost or reordered"
    );
    let nonces: std::collections::HashSet<_> = chunks.iter().map(|c| c.nonce.clone()).collect();
    assert_eq!(nonces.len(), chunks.len(), "a nonce per chunk");

    // Rate limited twice: delivered after the retries.
    let before = fake.posted().len();
    fake.fail_next_posts(
        2,
        429,
        json!({"message": "You are being rate limited.", "retry_after": 0.1, "global": false, "code": 0}),
    );
    fake.user_message(OPEN, ANN, "after a rate limit", true);
    let posted = fake.wait_posted(OPEN, chunks.len() + 1).await?;
    assert_eq!(
        posted.last().map(|p| p.content.as_str()),
        Some("echo: after a rate limit")
    );
    assert_eq!(fake.posted().len(), before + 1);

    // Missing permission: recorded as failed, and the agent is told; its answer to the
    // notice arrives (the fake refuses only once).
    fake.fail_next_posts(
        1,
        403,
        json!({"message": "Missing Permissions", "code": 50013}),
    );
    fake.user_message(OPEN, ANN, "this reply is refused", true);
    let posted = fake.wait_posted(OPEN, chunks.len() + 2).await?;
    let notice = &posted.last().map(|p| p.content.clone()).unwrap_or_default();
    assert!(
        notice.starts_with("echo: system delivery_failed: Your message did not arrive. Discord refused the message: the bot may not post in this channel."),
        "a plain sentence, without Discord's own text: {notice}"
    );
    assert!(!notice.contains("Missing Permissions"), "{notice}");
    assert!(
        !posted
            .iter()
            .any(|p| p.content == "echo: this reply is refused")
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_posted_during_an_outage_or_a_gateway_restart_are_all_answered()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let mut cluster = discord_cluster(dir.path(), &fake).await?;
    fake.user_message(OPEN, ANN, "before", true);
    fake.wait_posted(OPEN, 1).await?;
    // Nothing is answered in the mention-only channel yet, so it has no cursor of its own
    // until the bot next connects and starts one at its latest message.
    fake.user_message(MENTION_ONLY, ANN, "just chatting", true);

    // The connection drops; messages are posted while the bot cannot see them.
    fake.go_down();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.user_message(OPEN, ANN, "missed one", true);
    fake.user_message(OPEN, ANN, "missed two", true);
    fake.come_up();
    fake.wait_identified(2).await?;
    fake.wait_lines(OPEN, &["echo: missed one", "echo: missed two"])
        .await?;

    // The gateway itself restarts; a message posted meanwhile is caught up from the saved
    // cursor.
    let identified = 2;
    fake.go_down();
    cluster.restart_gateway().await?;
    fake.user_message(OPEN, ANN, "while restarting", true);
    fake.user_message(
        MENTION_ONLY,
        ANN,
        &format!("<@{BOT_ID}> missed mention"),
        true,
    );
    fake.come_up();
    fake.wait_identified(identified + 1).await?;
    fake.wait_lines(OPEN, &["echo: while restarting"]).await?;
    fake.wait_lines(MENTION_ONLY, &["echo: missed mention"])
        .await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut texts = fake.lines(OPEN);
    texts.sort();
    let mut expected = vec![
        "echo: before",
        "echo: missed one",
        "echo: missed two",
        "echo: while restarting",
    ];
    expected.sort();
    assert_eq!(texts, expected, "every message answered exactly once");
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_share_or_own_a_session_and_a_mention_opens_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster(dir.path(), &fake).await?;

    // A thread someone opened under a "channel"-session route: answered in the thread,
    // in the channel's session.
    fake.add_thread(USER_THREAD, OPEN);
    fake.user_message(OPEN, ANN, "in the channel", true);
    fake.wait_posted(OPEN, 1).await?;
    fake.user_message(USER_THREAD, ANN, "in the thread", true);
    assert_eq!(
        fake.wait_posted(USER_THREAD, 1).await?[0].content,
        "echo: in the thread"
    );

    // A mention in a thread_on_mention channel opens a thread named after the message;
    // the answer and the rest of the conversation are in it, without further mentions.
    let asked = fake.user_message(THREADED, ANN, &format!("<@{BOT_ID}> plan a trip"), true);
    let thread: u64 = asked["id"].as_str().unwrap_or_default().parse()?;
    let answer = fake.wait_posted(thread, 1).await?;
    assert_eq!(answer[0].content, "echo: plan a trip");
    assert!(
        fake.threads()
            .contains(&(thread.to_string(), THREADED.to_string()))
    );
    fake.user_message(thread, ANN, "to Lisbon", true);
    assert_eq!(
        fake.wait_posted(thread, 2).await?[1].content,
        "echo: to Lisbon"
    );
    assert!(
        fake.posted()
            .iter()
            .all(|p| p.channel_id != THREADED.to_string()),
        "nothing was answered in the channel itself"
    );

    let (_, sessions) = cluster.get("/v1/sessions").await?;
    let mut keys: Vec<String> = sessions["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["conversation_key"].as_str().map(str::to_string))
        .collect();
    keys.sort();
    let mut expected = vec![format!("discord:{OPEN}"), format!("discord:{thread}")];
    expected.sort();
    assert_eq!(
        keys, expected,
        "the user's thread shares the channel's session"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_reaches_the_model_and_a_file_goes_back_as_an_attachment()
-> anyhow::Result<()> {
    use ferroclaw_e2e::fake_model::{FakeModel, Step};
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let model = FakeModel::start("sk-key").await?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[discord]\napi_url = \"{}\"\nmax_upload_bytes = 1000\n\
             [[discord.routes]]\nchannel = \"{OPEN}\"\nagent = \"main\"\n\
             [[agents]]\nname = \"main\"\nprovider = \"anthropic\"\nmodel = \"m\"\napi_base_url = \"{}\"\n",
            fake.url(),
            model.url()
        ),
    )?;
    let cluster = Cluster::start(
        &dir.path().join("data"),
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("DISCORD_BOT_TOKEN", "fake-bot-token".into()),
            ("ANTHROPIC_API_KEY", "sk-key".into()),
        ],
    )
    .await?;
    fake.wait_identified(1).await?;
    // Files the agent can read (the process backend's agent sees host paths).
    let files = cluster.data_dir.join("agents/main");
    std::fs::create_dir_all(&files)?;
    std::fs::write(files.join("big.bin"), vec![7u8; 5000])?;
    let path = |name: &str| files.join(name).display().to_string();
    model.push([
        Step::Tools(vec![
            (
                "send_file".into(),
                json!({"path": path("summary.txt"), "caption": "here it is"}),
            ),
            ("send_file".into(), json!({"path": path("big.bin")})),
        ]),
        Step::Text("sent".into()),
    ]);
    std::fs::write(
        cluster.data_dir.join("agents/main/summary.txt"),
        "the summary",
    )?;
    fake.user_message_with_file(OPEN, ANN, "summarise this", "notes.txt", b"some notes");

    // The model sees the message with the attachment's local path, and the file is there.
    let received = model.wait_for_requests(1).await?;
    let prompt = ferroclaw_e2e::fake_model::last_user_text(&received[0].body);
    let path = prompt
        .split("path=\"")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .ok_or_else(|| anyhow::anyhow!("no attachment in {prompt}"))?;
    assert!(
        path.contains("/in/inbox/") && path.ends_with("/notes.txt"),
        "{path}"
    );
    assert_eq!(std::fs::read(path)?, b"some notes");

    // Its file comes back as an attachment with its caption; one over the upload limit
    // fails clearly and the agent is told.
    let posted = fake.wait_posted(OPEN, 3).await?;
    let with_file = posted
        .iter()
        .find(|p| !p.files.is_empty())
        .ok_or_else(|| anyhow::anyhow!("no attachment in {posted:?}"))?;
    assert_eq!(with_file.content, "here it is");
    assert_eq!(
        with_file.files,
        vec![("summary.txt".to_string(), b"the summary".to_vec())]
    );
    assert!(posted.iter().any(|p| p.content == "sent"));
    // Requests 1 and 2 are the turn (message, tool results); 3 is the failure notice.
    let notice = model.wait_for_requests(3).await?;
    let told = ferroclaw_e2e::fake_model::last_user_text(&notice[2].body);
    assert!(
        told.contains("delivery_failed")
            && told.contains(
                "The file big.bin is too big for this Discord server (5000 bytes; the limit is 1000)."
            ),
        "{told}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_shows_typing_while_the_agent_works() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(
        dir.path(),
        &fake,
        &[("FERROCLAW_ECHO_DELAY_MS", "1500".into())],
        "",
    )
    .await?;
    fake.user_message(OPEN, ANN, "take your time", true);
    fake.wait_posted(OPEN, 1).await?;
    let log = fake.log();
    let typing = log.iter().position(|e| *e == format!("typing:{OPEN}"));
    let posted = log.iter().position(|e| *e == format!("post:{OPEN}"));
    assert!(
        matches!((typing, posted), (Some(t), Some(p)) if t < p),
        "typing shown before the reply: {log:?}"
    );
    cluster.stop().await
}

fn card(question_id: &str, expires_in_secs: u64) -> String {
    let card = json!({
        "question_id": question_id,
        "text": "Deploy now?",
        "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "Not yet"}],
        "expires_in_secs": expires_in_secs,
    });
    format!("!card {card}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn question_buttons_take_one_allowed_timely_click() -> anyhow::Result<()> {
    const BOB: u64 = 888_888_888_888_888_888;
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(
        dir.path(),
        &fake,
        &[],
        &format!(
            "[roles]\nadmins = [\"{ANN}\"]\n[[agents]]\nname = \"main\"\nanswerers = \"admins\""
        ),
    )
    .await?;

    fake.user_message(OPEN, ANN, &card("q-deploy", 0), true);
    let posted = fake.wait_posted(OPEN, 1).await?;
    let question = posted[0].clone();
    assert_eq!(question.content, "Deploy now?");
    assert_eq!(question.buttons, vec!["q:q-deploy:0", "q:q-deploy:1"]);

    // Someone who may not answer: told so, privately; the card stays.
    let forged = fake.click(&question, BOB, "q:q-deploy:0");
    let reply = fake.wait_interaction_reply(&forged).await?;
    assert_eq!(reply.kind, 4);
    assert_eq!(reply.data["flags"], json!(64), "ephemeral");
    assert!(
        reply.data["content"]
            .as_str()
            .unwrap_or("")
            .contains("only admins may answer"),
        "{reply:?}"
    );

    // The admin's click: the card shows the answer without buttons, and the agent gets it.
    let click = fake.click(&question, ANN, "q:q-deploy:0");
    let reply = fake.wait_interaction_reply(&click).await?;
    assert_eq!(reply.kind, 7, "the clicked card is updated");
    assert_eq!(reply.data["components"], json!([]));
    assert!(
        reply.data["content"]
            .as_str()
            .unwrap_or("")
            .contains("**Yes**"),
        "{reply:?}"
    );
    let posted = fake.wait_posted(OPEN, 2).await?;
    assert_eq!(
        posted[1].content,
        format!("echo: system question_response: <@{ANN}> answered \"Yes\"")
    );

    // A second click changes nothing.
    let again = fake.click(&question, ANN, "q:q-deploy:1");
    let reply = fake.wait_interaction_reply(&again).await?;
    assert_eq!((reply.kind, reply.data["flags"].clone()), (4, json!(64)));
    assert!(
        reply.data["content"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("already answered (yes by <@{ANN}>)")),
        "{reply:?}"
    );

    // A click after the question expired.
    fake.user_message(OPEN, ANN, &card("q-late", 1), true);
    let late = fake.wait_posted(OPEN, 3).await?[2].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let click = fake.click(&late, ANN, "q:q-late:1");
    let reply = fake.wait_interaction_reply(&click).await?;
    assert!(
        reply.data["content"]
            .as_str()
            .unwrap_or("")
            .contains("expired"),
        "{reply:?}"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.posted().len(), 3, "one answer reached the agent");

    // The command gate on Discord: a non-admin's admin command gets a one-line answer in
    // the channel; /help is answered for anyone; neither reaches the agent.
    fake.user_message(OPEN, BOB, "/clear", true);
    let posted = fake.wait_posted(OPEN, 4).await?;
    assert_eq!(
        posted[3].content,
        format!("/clear is for admins only, and <@{BOB}> is not one.")
    );
    fake.user_message(OPEN, BOB, "/help", true);
    let posted = fake.wait_posted(OPEN, 5).await?;
    assert!(
        posted[4].content.contains("/compact"),
        "{}",
        posted[4].content
    );
    // An admin's admin command passes to the agent (echo quotes it).
    fake.user_message(OPEN, ANN, "/cost", true);
    assert_eq!(fake.wait_posted(OPEN, 6).await?[5].content, "echo: /cost");
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_source_can_reply_in_a_discord_channel() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(
        dir.path(),
        &fake,
        &[],
        &format!(
            "[[webhooks]]\nsource = \"ci\"\nagent = \"main\"\nreply_discord_channel = \"{OPEN}\""
        ),
    )
    .await?;
    let (status, body) = cluster
        .post_hook("ci", &json!({"build": "green"}), None)
        .await?;
    assert_eq!(status, 202, "{body}");
    let posted = fake.wait_posted(OPEN, 1).await?;
    assert_eq!(posted[0].content, r#"echo: webhook ci: {"build":"green"}"#);
    cluster.stop().await
}

/// A session that takes no work (here: over its disk quota) is no silent black hole on
/// Discord: the person is told in the channel why their message was not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_explained_in_the_channel() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeDiscord::start().await?;
    let cluster = discord_cluster_with(
        dir.path(),
        &fake,
        &[
            (
                "FERROCLAW_AGENT_BINARY",
                ferroclaw_e2e::binary("hostile-agent")?
                    .display()
                    .to_string(),
            ),
            ("FERROCLAW_SESSION_DISK_MB", "1".into()),
        ],
        "",
    )
    .await?;
    fake.user_message(OPEN, ANN, "fill", true);
    let filled = || {
        std::fs::read_dir(cluster.data_dir.join("sessions/main"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|s| s.path().join("out/workspace/fill.bin").exists())
    };
    let started = std::time::Instant::now();
    while !filled() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "never filled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the runner has seen the quota passed, the next message is refused and explained.
    let mut n = 0;
    let refusal = loop {
        n += 1;
        fake.user_message(OPEN, ANN, &format!("more {n}"), true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let open = OPEN.to_string();
        if let Some(post) = fake.posted().into_iter().find(|p| p.channel_id == open) {
            break post;
        }
        anyhow::ensure!(n < 30, "no message was explained as refused");
    };
    assert!(
        refusal.content.starts_with("Not taken: ")
            && refusal.content.contains("over the quota of 1 MB"),
        "{}",
        refusal.content
    );
    cluster.stop().await
}
