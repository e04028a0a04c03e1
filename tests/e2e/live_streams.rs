//! Live conversation streams instead of polling: `GET /v1/conversations/{id}/events` (SSE),
//! `Gateway.WatchConversation` (gRPC) and `ferroclaw chat` on top of them. Replies come from
//! the echo agent; what the streams carry is compared with `/messages`, the stored truth.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use ferroclaw_common::grpc::channel;
use ferroclaw_common::grpc_auth::AttachToken;
use ferroclaw_e2e::{Cluster, binary};
use ferroclaw_proto::v1::gateway_client::GatewayClient;
use ferroclaw_proto::v1::inject_message_request::Target;
use ferroclaw_proto::v1::{InjectMessageRequest, WatchConversationRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const TOKEN: &str = "live-token";
const TIMEOUT: Duration = Duration::from_secs(30);

async fn start(dir: &std::path::Path) -> anyhow::Result<Cluster> {
    Cluster::start(
        dir,
        &[
            ("FERROCLAW_API_TOKEN", TOKEN.into()),
            // Short heartbeats, so a test sees one.
            ("FERROCLAW_SSE_HEARTBEAT_SECS", "0.3".into()),
        ],
    )
    .await
}

/// One server-sent event, or a comment line.
#[derive(Debug)]
enum Frame {
    Event {
        event: String,
        id: String,
        data: Value,
    },
    Comment(String),
}

/// An open `/events` stream, read frame by frame (the gateway writes `field: value` lines).
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    /// Opens the stream; the status and JSON error when it does not open.
    async fn open(
        cluster: &Cluster,
        conversation: &str,
        query: &str,
        last_event_id: Option<&str>,
        token: Option<&str>,
    ) -> anyhow::Result<Result<Self, (u16, Value)>> {
        let url = format!(
            "{}/v1/conversations/{conversation}/events{query}",
            cluster.api()
        );
        let mut request = cluster.http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        if status != 200 {
            return Ok(Err((status, response.json().await.unwrap_or(Value::Null))));
        }
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        anyhow::ensure!(kind.starts_with("text/event-stream"), "content type {kind}");
        Ok(Ok(Self {
            response,
            buffer: String::new(),
        }))
    }

    async fn connect(
        cluster: &Cluster,
        conversation: &str,
        last: Option<i64>,
    ) -> anyhow::Result<Self> {
        let id = last.map(|c| c.to_string());
        match Self::open(cluster, conversation, "", id.as_deref(), Some(TOKEN)).await? {
            Ok(events) => Ok(events),
            Err((status, body)) => bail!("/events: {status} {body}"),
        }
    }

    /// The next frame; `None` when the stream ended.
    async fn frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return parse_frame(block.trim_end()).map(Some);
            }
            let chunk = tokio::time::timeout(TIMEOUT, self.response.chunk())
                .await
                .context("no frame in time")??;
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes)?),
                None => return Ok(None),
            }
        }
    }

    /// The next message event (comments skipped): (id as a cursor, data).
    async fn message(&mut self) -> anyhow::Result<(i64, Value)> {
        loop {
            match self.frame().await?.context("stream ended")? {
                Frame::Comment(_) => continue,
                Frame::Event { event, id, data } => {
                    assert_eq!(event, "message");
                    let cursor: i64 = id.parse()?;
                    assert_eq!(data["cursor"], json!(cursor), "id is the cursor");
                    return Ok((cursor, data));
                }
            }
        }
    }

    /// Waits for the stream to end (heartbeats are skipped); fails on a message.
    async fn end(&mut self, within: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(within, async {
            loop {
                match self.frame().await {
                    Ok(Some(Frame::Comment(_))) => continue,
                    Ok(Some(event)) => bail!("a message instead of the end: {event:?}"),
                    // A connection cut off mid-stream is an end too.
                    Ok(None) | Err(_) => return Ok(()),
                }
            }
        })
        .await
        .context("the stream did not end")?
    }
}

fn parse_frame(block: &str) -> anyhow::Result<Frame> {
    if let Some(comment) = block.strip_prefix(':') {
        return Ok(Frame::Comment(comment.trim().to_string()));
    }
    let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
    for line in block.lines() {
        let (field, value) = line.split_once(": ").context("a field line")?;
        match field {
            "event" => event = value.into(),
            "id" => id = value.into(),
            "data" => data.push_str(value),
            other => bail!("unexpected field {other:?}"),
        }
    }
    Ok(Frame::Event {
        event,
        id,
        data: serde_json::from_str(&data)?,
    })
}

/// The stored messages after `after`, as `/messages` shows them.
async fn stored_after(
    cluster: &Cluster,
    conversation: &str,
    after: i64,
) -> anyhow::Result<Vec<Value>> {
    Ok(cluster.messages(conversation, after, 0.0).await?.0)
}

fn cursors(messages: &[Value]) -> Vec<i64> {
    messages
        .iter()
        .filter_map(|m| m["cursor"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_carries_a_reply_posted_after_it_opened() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = start(dir.path()).await?;

    let refused = Events::open(&cluster, "live-a", "", None, None).await?;
    let (status, body) = refused.err().context("opened without a token")?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("unauthorized"))
    );
    let bad = Events::open(&cluster, "live-a", "", Some("-3"), Some(TOKEN)).await?;
    let (status, body) = bad.err().context("took a bad Last-Event-ID")?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request"))
    );

    let mut events = Events::connect(&cluster, "live-a", None).await?;
    // An idle stream carries heartbeats.
    match events.frame().await?.context("stream ended")? {
        Frame::Comment(text) => assert_eq!(text, "keep-alive"),
        other => bail!("expected a heartbeat first, got {other:?}"),
    }
    let (status, body) = cluster.post_message("live-a", "hello stream", None).await?;
    assert_eq!(status, 202, "{body}");
    let (cursor, data) = events.message().await?;
    assert_eq!(data["text"], json!("echo: hello stream"));
    // Exactly what `/messages` shows for it.
    assert_eq!(stored_after(&cluster, "live-a", 0).await?, vec![data]);
    assert!(cursor > 0);
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_with_no_gap_and_no_repeat() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = start(dir.path()).await?;
    let conversation = "live-b";

    let mut events = Events::connect(&cluster, conversation, None).await?;
    cluster.post_message(conversation, "m1", None).await?;
    let (first, data) = events.message().await?;
    assert_eq!(data["text"], json!("echo: m1"));
    drop(events);

    // Sent while no stream is open.
    for text in ["m2", "m3", "m4"] {
        cluster.post_message(conversation, text, None).await?;
    }
    cluster
        .wait_for_lines(
            conversation,
            &["echo: m2".into(), "echo: m3".into(), "echo: m4".into()],
            TIMEOUT,
        )
        .await?;
    let missed = stored_after(&cluster, conversation, first).await?;
    assert!(!missed.is_empty());

    // Last-Event-ID wins over a stale `?after=` in the URL (what a browser resends).
    let resumed = Events::open(
        &cluster,
        conversation,
        "?after=0",
        Some(&first.to_string()),
        Some(TOKEN),
    )
    .await?;
    let mut events = resumed.ok().context("resume refused")?;
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        got.push(events.message().await?.1);
    }
    assert_eq!(got, missed, "exactly the messages after {first}");
    // Then live, and nothing in between.
    cluster.post_message(conversation, "m5", None).await?;
    let (live, data) = events.message().await?;
    assert_eq!(data["text"], json!("echo: m5"));
    assert_eq!(
        cursors(&stored_after(&cluster, conversation, first).await?).last(),
        Some(&live)
    );

    // `?after=` alone resumes the same way.
    let mut events = Events::open(
        &cluster,
        conversation,
        &format!("?after={first}"),
        None,
        Some(TOKEN),
    )
    .await?
    .ok()
    .context("?after= refused")?;
    let mut again = Vec::new();
    for _ in 0..=missed.len() {
        again.push(events.message().await?.0);
    }
    assert_eq!(
        again,
        cursors(&stored_after(&cluster, conversation, first).await?)
    );
    cluster.stop().await
}

fn inject(conversation: &str, text: &str) -> InjectMessageRequest {
    InjectMessageRequest {
        target: Some(Target::Conversation(conversation.into())),
        payload_json: json!({"text": text}).to_string(),
        idempotency_key: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_conversation_streams_and_resumes_exactly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = start(dir.path()).await?;
    let conversation = "live-c";
    let url = cluster.gateway.grpc_url();
    let watch = |after: i64| WatchConversationRequest {
        conversation_id: conversation.into(),
        after_cursor: after,
    };

    let mut anonymous = GatewayClient::new(channel(&url, AttachToken::new(None)?)?);
    let refused = anonymous.watch_conversation(watch(0)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut gateway = GatewayClient::new(channel(&url, AttachToken::new(Some(TOKEN))?)?);
    let bad = gateway
        .watch_conversation(WatchConversationRequest {
            conversation_id: "a\nb".into(),
            after_cursor: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let mut stream = gateway.watch_conversation(watch(0)).await?.into_inner();
    gateway.inject_message(inject(conversation, "g1")).await?;
    let first = tokio::time::timeout(TIMEOUT, stream.message())
        .await??
        .context("stream ended")?;
    assert_eq!(first.text, "echo: g1");
    assert_eq!(first.conversation, conversation);
    drop(stream);

    for text in ["g2", "g3"] {
        gateway.inject_message(inject(conversation, text)).await?;
    }
    cluster
        .wait_for_lines(
            conversation,
            &["echo: g2".into(), "echo: g3".into()],
            TIMEOUT,
        )
        .await?;
    let missed = cursors(&stored_after(&cluster, conversation, first.cursor).await?);
    let mut stream = gateway
        .watch_conversation(watch(first.cursor))
        .await?
        .into_inner();
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        let m = tokio::time::timeout(TIMEOUT, stream.message())
            .await??
            .context("stream ended")?;
        got.push(m.cursor);
    }
    assert_eq!(got, missed, "exactly the messages after {}", first.cursor);
    gateway.inject_message(inject(conversation, "g4")).await?;
    let live = tokio::time::timeout(TIMEOUT, stream.message())
        .await??
        .context("stream ended")?;
    assert_eq!(live.text, "echo: g4");
    assert_eq!(
        cursors(&stored_after(&cluster, conversation, first.cursor).await?).last(),
        Some(&live.cursor)
    );
    cluster.stop().await
}

/// Opens `/events` again, while the gateway's channel to a restarted delivery reconnects.
async fn reconnect(cluster: &Cluster, conversation: &str) -> anyhow::Result<Events> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Events::open(cluster, conversation, "", None, Some(TOKEN)).await? {
            Ok(events) => return Ok(events),
            Err((503, _)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err((status, body)) => bail!("/events: {status} {body}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_delivery_goes_away_and_when_services_stop() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = start(dir.path()).await?;
    let conversation = "live-e";

    let mut events = Events::connect(&cluster, conversation, None).await?;
    cluster.kill_delivery().await?;
    events.end(Duration::from_secs(15)).await?;
    // Without delivery the stream does not start: a JSON error a client can retry on.
    let down = Events::open(&cluster, conversation, "", None, Some(TOKEN)).await?;
    let (status, body) = down.err().context("opened without delivery")?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    cluster.restart_delivery().await?;

    // Open on every layer while everything stops: each ends, and every service exits in time.
    let mut events = reconnect(&cluster, conversation).await?;
    let mut gateway = GatewayClient::new(channel(
        &cluster.gateway.grpc_url(),
        AttachToken::new(Some(TOKEN))?,
    )?);
    let request = WatchConversationRequest {
        conversation_id: conversation.into(),
        after_cursor: 0,
    };
    let mut via_gateway = gateway
        .watch_conversation(request.clone())
        .await?
        .into_inner();
    let mut delivery = ferroclaw_proto::v1::delivery_client::DeliveryClient::new(
        cluster.internal_channel(&cluster.delivery.grpc_url())?,
    );
    let mut via_delivery = delivery.watch_conversation(request).await?.into_inner();
    cluster.stop().await?;
    events.end(Duration::from_secs(5)).await?;
    for stream in [&mut via_gateway, &mut via_delivery] {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await? {
            Ok(None) => {}
            Ok(Some(m)) => bail!("a message instead of the end: {m:?}"),
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        }
    }
    Ok(())
}

/// Reads the chat's output into `shown` until the line `want`.
async fn until(
    stdout: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    shown: &mut Vec<String>,
    want: &str,
) -> anyhow::Result<()> {
    tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = stdout.next_line().await? {
            shown.push(line.clone());
            if line == want {
                return anyhow::Ok(());
            }
        }
        bail!("chat ended before {want:?}; it printed {shown:?}")
    })
    .await
    .with_context(|| format!("no {want:?} in time"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferroclaw_chat_prints_replies_and_reconnects() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = start(dir.path()).await?;
    let mut chat = Command::new(binary("ferroclaw")?)
        .args(["chat", "--api", &cluster.api(), "-c", "live-d"])
        .env("FERROCLAW_API_TOKEN", TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = chat.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(chat.stdout.take().context("stdout")?).lines();
    let mut shown = Vec::new();

    stdin.write_all(b"one\n").await?;
    until(&mut stdout, &mut shown, "echo: one").await?;
    // The stream drops with the gateway; the chat reconnects and misses nothing.
    cluster.restart_gateway().await?;
    stdin.write_all(b"\ntwo\n").await?;
    until(&mut stdout, &mut shown, "echo: two").await?;
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(10), chat.wait())
        .await
        .context("chat did not end at end of input")??;
    let mut stderr = String::new();
    if let Some(mut err) = chat.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut err, &mut stderr).await?;
    }
    assert!(status.success(), "{status}: {stderr}");
    while let Some(line) = stdout.next_line().await? {
        shown.push(line);
    }
    assert_eq!(
        shown,
        ["echo: one", "echo: two"],
        "each reply once; stderr: {stderr}"
    );
    // Both lines reached the conversation, and nothing else (the blank line is skipped).
    assert_eq!(cluster.texts("live-d").await?, ["echo: one", "echo: two"]);
    cluster.stop().await
}
