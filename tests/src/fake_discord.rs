//! A fake Discord on loopback: the REST routes ferroclaw uses (gateway discovery, create
//! message with nonce deduplication, scripted failures) and the gateway websocket (HELLO,
//! IDENTIFY → READY, heartbeats, dispatched events). serenity is pointed at it with its
//! proxy setting and finds the websocket through `GET /api/v10/gateway`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub const BOT_ID: u64 = 900_000_000_000_000_001;
pub const GUILD_ID: u64 = 800_000_000_000_000_001;

/// A message the bot posted.
#[derive(Debug, Clone)]
pub struct Posted {
    pub id: String,
    pub channel_id: String,
    pub content: String,
    pub nonce: Option<String>,
    /// Attached files: (name, bytes).
    pub files: Files,
    /// Custom ids of its buttons, row by row.
    pub buttons: Vec<String>,
    /// The post's `allowed_mentions` (Null when it had none).
    pub allowed_mentions: Value,
}

/// The bot's answer to an interaction (a button click).
#[derive(Debug, Clone)]
pub struct InteractionReply {
    pub interaction_id: String,
    /// 4: a new message (ephemeral when flags has 64); 7: the clicked message updated.
    pub kind: u64,
    pub data: Value,
}

#[derive(Default)]
struct Shared {
    posted: Vec<Posted>,
    /// Statuses the next create-message calls answer with, before succeeding again.
    failures: VecDeque<(u16, Value)>,
    /// Channels rate-limited until an instant: posts there get Discord's 429.
    limited: std::collections::HashMap<String, std::time::Instant>,
    /// Every post is rate-limited until this instant (a global limit).
    limited_globally: Option<std::time::Instant>,
    /// 429 answers given.
    rate_limited_posts: usize,
    /// Posts that repeated an earlier post's nonce (a resend Discord deduplicated).
    repeated_nonces: usize,
    post_attempts: usize,
    identified: usize,
    /// Every user message, by channel: what a catch-up read returns.
    history: Vec<Value>,
    /// While set, the gateway refuses connections (an outage).
    down: bool,
    /// Threads: id → parent channel id.
    threads: std::collections::BTreeMap<String, String>,
    interaction_replies: Vec<InteractionReply>,
    /// Typing indicators and posts, in the order they came: "typing:<channel>", "post:<channel>".
    log: Vec<String>,
    /// Users' attachments served for download: (attachment id, file name) → bytes.
    downloads: std::collections::BTreeMap<(String, String), Vec<u8>>,
    /// DM channels (`user_message` with `guild` false): `GET /channels/{id}` answers type 1.
    dms: std::collections::BTreeSet<String>,
    /// Gateway connections in order: "identify:<path>" or "resume:<path>" (the websocket
    /// URL's path; READY's `resume_gateway_url` has the path `/resume`).
    gateway_log: Vec<String>,
    /// Close codes of the close frames the bot sent (`None`: a close frame without one).
    closes: Vec<Option<u16>>,
    /// Gateway connections open now.
    open_sessions: usize,
}

/// Discord's epoch (2015-01-01) in Unix milliseconds.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// The snowflake of this millisecond (its low 22 bits zero), as Discord makes ids.
fn snowflake_now() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms.saturating_sub(DISCORD_EPOCH_MS) << 22
}

#[derive(Clone)]
struct Fake {
    shared: Arc<Mutex<Shared>>,
    ids: Arc<AtomicU64>,
    ws_url: String,
    events: broadcast::Sender<Value>,
    /// Ends every open gateway connection.
    kick: broadcast::Sender<()>,
    /// Asks every open gateway connection to reconnect (op 7), as Discord does.
    reconnect: broadcast::Sender<()>,
}

pub struct FakeDiscord {
    pub addr: SocketAddr,
    fake: Fake,
}

impl FakeDiscord {
    pub async fn start() -> anyhow::Result<Self> {
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let ws_addr = ws.local_addr()?;
        let (events, _) = broadcast::channel(256);
        let (kick, _) = broadcast::channel(4);
        let (reconnect, _) = broadcast::channel(4);
        let fake = Fake {
            shared: Arc::new(Mutex::new(Shared::default())),
            // Ids are snowflakes of the time they are made, as Discord's are.
            ids: Arc::new(AtomicU64::new(snowflake_now())),
            ws_url: format!("ws://{ws_addr}"),
            events,
            kick,
            reconnect,
        };
        let app = axum::Router::new()
            .route("/api/v10/gateway", get(gateway))
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route("/api/v10/users/@me", get(current_user))
            .route("/api/v10/channels/{channel}", get(get_channel))
            .route(
                "/api/v10/guilds/{guild}/threads/active",
                get(active_threads),
            )
            .route(
                "/api/v10/channels/{channel}/messages/{message}/threads",
                post(create_thread),
            )
            .route(
                "/api/v10/channels/{channel}/messages",
                post(create_message).get(list_messages),
            )
            .route("/attachments/{id}/{name}", get(download))
            .route("/api/v10/channels/{channel}/typing", post(typing))
            .route(
                "/api/v10/interactions/{id}/{token}/callback",
                post(interaction_callback),
            )
            .fallback(unknown)
            .with_state(fake.clone());
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = rest.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(rest, app).await;
        });
        let for_ws = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = ws.accept().await {
                if for_ws.shared.lock().map(|s| s.down).unwrap_or(false) {
                    drop(stream);
                    continue;
                }
                let fake = for_ws.clone();
                tokio::spawn(async move {
                    let count = |by: isize| {
                        if let Ok(mut s) = fake.shared.lock() {
                            s.open_sessions = s.open_sessions.saturating_add_signed(by);
                        }
                    };
                    count(1);
                    if let Err(e) = session(fake.clone(), stream).await {
                        eprintln!("fake discord websocket: {e}");
                    }
                    count(-1);
                });
            }
        });
        Ok(Self { addr, fake })
    }

    /// The REST base to give serenity as its proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `n` gateway sessions have identified (the bot is connected).
    pub async fn wait_identified(&self, n: usize) -> anyhow::Result<()> {
        for _ in 0..1200 {
            if self.lock().identified >= n {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!("the bot never identified to the fake gateway")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.fake
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new id: above every earlier one and above the snowflake of this millisecond, so a
    /// cursor taken as "now" is below every message posted later.
    fn next_id(&self) -> String {
        self.next_snowflake().to_string()
    }

    fn next_snowflake(&self) -> u64 {
        let now = snowflake_now() + 1;
        let previous = self
            .fake
            .ids
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(last.saturating_add(1).max(now))
            })
            .unwrap_or_else(|last| last);
        previous.saturating_add(1).max(now)
    }

    /// A user's message in a guild channel (or a DM when `guild` is false); returns the
    /// MESSAGE_CREATE event, so a test can dispatch it again.
    pub fn user_message(&self, channel_id: u64, user_id: u64, content: &str, guild: bool) -> Value {
        let id = self.next_id();
        let mentions_bot = content.contains(&format!("<@{BOT_ID}>"));
        let mut message = message_json(
            &id,
            &channel_id.to_string(),
            json!({"id": user_id.to_string(), "username": format!("user{user_id}"),
                   "discriminator": "0", "global_name": null, "avatar": null, "bot": false}),
            content,
        );
        if mentions_bot {
            message["mentions"] = json!([bot_user()]);
        }
        if guild {
            message["guild_id"] = json!(GUILD_ID.to_string());
        }
        {
            let mut shared = self.lock();
            if !guild {
                shared.dms.insert(channel_id.to_string());
            }
            shared.history.push(message.clone());
        }
        self.dispatch("MESSAGE_CREATE", message.clone());
        message
    }

    /// A thread someone opened under `parent`.
    pub fn add_thread(&self, thread_id: u64, parent_id: u64) {
        self.lock()
            .threads
            .insert(thread_id.to_string(), parent_id.to_string());
    }

    /// Threads (id, parent) that exist, the bot's included.
    pub fn threads(&self) -> Vec<(String, String)> {
        self.lock()
            .threads
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Gateway connections in order: "identify:<path>" or "resume:<path>".
    pub fn gateway_log(&self) -> Vec<String> {
        self.lock().gateway_log.clone()
    }

    /// Close codes of the close frames the bot sent, in order.
    pub fn close_codes(&self) -> Vec<Option<u16>> {
        self.lock().closes.clone()
    }

    /// Waits until the bot has sent a close frame; returns its code.
    pub async fn wait_close(&self) -> anyhow::Result<Option<u16>> {
        for _ in 0..300 {
            if let Some(code) = self.lock().closes.first() {
                return Ok(*code);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!("the bot sent no close frame")
    }

    /// Waits until no gateway connection is open (after `go_down`, before posting what the
    /// bot is to miss).
    pub async fn wait_disconnected(&self) -> anyhow::Result<()> {
        for _ in 0..300 {
            if self.lock().open_sessions == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        anyhow::bail!("a gateway connection stayed open")
    }

    /// A thread someone opens now under `parent` (its id a new snowflake); returns its id.
    pub fn new_thread(&self, parent_id: u64) -> u64 {
        let id = self.next_snowflake();
        self.add_thread(id, parent_id);
        id
    }

    /// Asks every open gateway connection to reconnect (op 7 RECONNECT): the bot is to
    /// resume its session on a new connection.
    pub fn ask_reconnect(&self) {
        let _ = self.fake.reconnect.send(());
    }

    /// An outage: open gateway connections end and new ones are refused until `up`.
    pub fn go_down(&self) {
        self.lock().down = true;
        let _ = self.fake.kick.send(());
    }

    pub fn come_up(&self) {
        self.lock().down = false;
    }

    /// A user's guild message with one attached file, served for download by the fake.
    pub fn user_message_with_file(
        &self,
        channel_id: u64,
        user_id: u64,
        content: &str,
        name: &str,
        data: &[u8],
    ) -> Value {
        let id = self.next_id();
        let attachment_id = self.next_id();
        let url = format!("{}/attachments/{attachment_id}/{name}", self.url());
        let mut message = message_json(
            &id,
            &channel_id.to_string(),
            json!({"id": user_id.to_string(), "username": format!("user{user_id}"),
                   "discriminator": "0", "global_name": null, "avatar": null, "bot": false}),
            content,
        );
        message["guild_id"] = json!(GUILD_ID.to_string());
        message["attachments"] = json!([{"id": attachment_id, "filename": name,
            "size": data.len(), "url": url, "proxy_url": url}]);
        {
            let mut shared = self.lock();
            shared
                .downloads
                .insert((attachment_id, name.to_string()), data.to_vec());
            shared.history.push(message.clone());
        }
        self.dispatch("MESSAGE_CREATE", message.clone());
        message
    }

    /// A user clicks a button of a message the bot posted; returns the interaction id.
    pub fn click(&self, posted: &Posted, user_id: u64, custom_id: &str) -> String {
        let id = self.next_id();
        let message = message_json(&posted.id, &posted.channel_id, bot_user(), &posted.content);
        let interaction = json!({
            "id": id, "application_id": BOT_ID.to_string(), "type": 3,
            "data": {"custom_id": custom_id, "component_type": 2},
            "guild_id": GUILD_ID.to_string(), "channel_id": posted.channel_id,
            "user": {"id": user_id.to_string(), "username": format!("user{user_id}"),
                     "discriminator": "0", "global_name": null, "avatar": null},
            "token": format!("token-{id}"), "version": 1, "message": message,
            "locale": "en-US", "entitlements": [], "attachment_size_limit": 26214400,
        });
        self.dispatch("INTERACTION_CREATE", interaction);
        id
    }

    /// Waits for the bot's answer to an interaction.
    pub async fn wait_interaction_reply(
        &self,
        interaction_id: &str,
    ) -> anyhow::Result<InteractionReply> {
        for _ in 0..300 {
            if let Some(r) = self
                .lock()
                .interaction_replies
                .iter()
                .find(|r| r.interaction_id == interaction_id)
            {
                return Ok(r.clone());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!("no answer to interaction {interaction_id}")
    }

    /// A message from another bot in a guild channel.
    pub fn other_bot_message(&self, channel_id: u64, content: &str) {
        let id = self.next_id();
        let mut message = message_json(
            &id,
            &channel_id.to_string(),
            json!({"id": "555", "username": "otherbot", "discriminator": "0",
                   "global_name": null, "avatar": null, "bot": true}),
            content,
        );
        message["guild_id"] = json!(GUILD_ID.to_string());
        self.dispatch("MESSAGE_CREATE", message);
    }

    /// Sends an event to every connected gateway session.
    pub fn dispatch(&self, event: &str, data: Value) {
        let _ = self.fake.events.send(json!({"t": event, "d": data}));
    }

    /// The next `n` create-message calls fail with `status` and this Discord error body.
    pub fn fail_next_posts(&self, n: usize, status: u16, body: Value) {
        let mut shared = self.lock();
        for _ in 0..n {
            shared.failures.push_back((status, body.clone()));
        }
    }

    /// Forgets the scripted failures not yet answered: the next posts succeed (an outage
    /// ends).
    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// Posts to `channel_id` answer Discord's real 429 (body, `Retry-After` and
    /// `X-RateLimit-*` headers) for `duration`, each asking to wait for what is left of it.
    pub fn rate_limit_channel(&self, channel_id: u64, duration: std::time::Duration) {
        self.lock()
            .limited
            .insert(channel_id.to_string(), std::time::Instant::now() + duration);
    }

    /// Every post answers a global 429 for `duration`.
    pub fn rate_limit_globally(&self, duration: std::time::Duration) {
        self.lock().limited_globally = Some(std::time::Instant::now() + duration);
    }

    /// How many posts repeated an earlier one's nonce (sent twice, shown once).
    pub fn repeated_nonces(&self) -> usize {
        self.lock().repeated_nonces
    }

    /// How many posts were answered with a 429.
    pub fn rate_limited_posts(&self) -> usize {
        self.lock().rate_limited_posts
    }

    pub fn posted(&self) -> Vec<Posted> {
        self.lock().posted.clone()
    }

    /// Typing indicators and posts in order ("typing:<channel>", "post:<channel>").
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    pub fn post_attempts(&self) -> usize {
        self.lock().post_attempts
    }

    /// Every line the bot posted in `channel_id`, in order (an agent answers a batch of
    /// several messages in one reply, a line each).
    pub fn lines(&self, channel_id: u64) -> Vec<String> {
        let channel = channel_id.to_string();
        self.posted()
            .into_iter()
            .filter(|p| p.channel_id == channel)
            .flat_map(|p| p.content.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    /// Waits until every one of `expected` is among the lines posted in `channel_id`.
    pub async fn wait_lines(&self, channel_id: u64, expected: &[&str]) -> anyhow::Result<()> {
        for _ in 0..600 {
            let lines = self.lines(channel_id);
            if expected.iter().all(|e| lines.iter().any(|l| l == e)) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "channel {channel_id}: expected {expected:?}, have {:?}",
            self.lines(channel_id)
        )
    }

    /// As [`Self::wait_posted`], polling every millisecond (for benchmarks).
    pub async fn wait_posted_fast(&self, channel_id: u64, n: usize) -> anyhow::Result<()> {
        let channel = channel_id.to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self
            .lock()
            .posted
            .iter()
            .filter(|p| p.channel_id == channel)
            .count()
            < n
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "channel {channel}: no reply"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Waits for at least `n` posted messages in `channel_id`; returns them in order.
    pub async fn wait_posted(&self, channel_id: u64, n: usize) -> anyhow::Result<Vec<Posted>> {
        let channel = channel_id.to_string();
        for _ in 0..600 {
            let got: Vec<Posted> = self
                .posted()
                .into_iter()
                .filter(|p| p.channel_id == channel)
                .collect();
            if got.len() >= n {
                return Ok(got);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "channel {channel}: expected {n} messages, have {:?}",
            self.posted()
        )
    }
}

fn bot_user() -> Value {
    json!({"id": BOT_ID.to_string(), "username": "ferroclaw", "discriminator": "0",
           "global_name": null, "avatar": null, "bot": true})
}

fn message_json(id: &str, channel_id: &str, author: Value, content: &str) -> Value {
    json!({
        "id": id, "channel_id": channel_id, "author": author, "content": content,
        "timestamp": "2026-11-25T10:00:00.000000+00:00", "edited_timestamp": null,
        "tts": false, "mention_everyone": false, "mentions": [], "mention_roles": [],
        "attachments": [], "embeds": [], "pinned": false, "type": 0,
    })
}

async fn gateway(State(fake): State<Fake>) -> Json<Value> {
    Json(json!({"url": fake.ws_url}))
}

async fn gateway_bot(State(fake): State<Fake>) -> Json<Value> {
    Json(
        json!({"url": fake.ws_url, "shards": 1, "session_start_limit":
        {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}}),
    )
}

async fn current_user() -> Json<Value> {
    Json(bot_user())
}

async fn unknown(uri: axum::http::Uri) -> Response {
    eprintln!("fake discord: unhandled {uri}");
    (
        StatusCode::NOT_FOUND,
        Json(json!({"message": "404: Not Found", "code": 0})),
    )
        .into_response()
}

fn thread_json(id: &str, parent: &str) -> Value {
    json!({"id": id, "type": 11, "name": "a thread", "guild_id": GUILD_ID.to_string(),
           "parent_id": parent, "thread_metadata": {"archived": false,
           "auto_archive_duration": 1440, "archive_timestamp": "2026-11-25T10:00:00.000000+00:00",
           "locked": false}})
}

/// A thread's channel object (type 11, guild_id, parent_id), a DM channel (type 1) for a
/// channel a DM was written in, or a plain text channel for any other id.
async fn get_channel(State(fake): State<Fake>, Path(channel): Path<String>) -> Json<Value> {
    let (parent, dm) = fake
        .shared
        .lock()
        .map(|s| (s.threads.get(&channel).cloned(), s.dms.contains(&channel)))
        .unwrap_or_default();
    Json(match parent {
        Some(parent) => thread_json(&channel, &parent),
        None if dm => json!({"id": channel, "type": 1, "last_message_id": null,
            "recipients": [{"id": "1", "username": "someone", "discriminator": "0",
                            "global_name": null, "avatar": null}]}),
        None => {
            json!({"id": channel, "type": 0, "name": "general", "guild_id": GUILD_ID.to_string()})
        }
    })
}

/// `GET /guilds/{guild}/threads/active`: every thread, as all of them are active here.
async fn active_threads(State(fake): State<Fake>, Path(guild): Path<String>) -> Json<Value> {
    let threads: Vec<Value> = if guild == GUILD_ID.to_string() {
        fake.shared
            .lock()
            .map(|s| {
                s.threads
                    .iter()
                    .map(|(id, parent)| thread_json(id, parent))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Json(json!({"threads": threads, "members": [], "has_more": false}))
}

/// Starts a thread on a message: the thread's id is the message's.
async fn create_thread(
    State(fake): State<Fake>,
    Path((channel, message)): Path<(String, String)>,
) -> Response {
    let mut shared = fake
        .shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if shared.threads.contains_key(&message) {
        let error = json!({"message": "A thread has already been created for this message", "code": 160004});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    shared.threads.insert(message.clone(), channel.clone());
    Json(thread_json(&message, &channel)).into_response()
}

#[derive(serde::Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /channels/{id}/messages?after=&limit=`: newest first, as Discord answers.
async fn list_messages(
    State(fake): State<Fake>,
    Path(channel): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ListQuery>,
) -> Json<Value> {
    let after: Option<u64> = query.after.and_then(|a| a.parse().ok());
    let limit = query.limit.unwrap_or(50).min(100);
    let shared = fake
        .shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut found: Vec<Value> = shared
        .history
        .iter()
        .filter(|m| m["channel_id"] == json!(channel))
        .filter(|m| {
            let id = m["id"]
                .as_str()
                .and_then(|i| i.parse::<u64>().ok())
                .unwrap_or(0);
            after.is_none_or(|after| id > after)
        })
        .cloned()
        .collect();
    if after.is_some() {
        // The oldest `limit` after the cursor.
        found.truncate(limit);
    } else {
        // The latest `limit`.
        found = found.split_off(found.len().saturating_sub(limit));
    }
    // Newest first, as Discord answers, and without `guild_id` (history has none).
    found.reverse();
    for m in &mut found {
        if let Some(m) = m.as_object_mut() {
            m.remove("guild_id");
        }
    }
    Json(Value::Array(found))
}

async fn interaction_callback(
    State(fake): State<Fake>,
    Path((id, _token)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    raw: axum::body::Bytes,
) -> StatusCode {
    let Some((body, _)) = read_post(&headers, &raw) else {
        return StatusCode::BAD_REQUEST;
    };
    if let Ok(mut s) = fake.shared.lock() {
        s.interaction_replies.push(InteractionReply {
            interaction_id: id,
            kind: body["type"].as_u64().unwrap_or(0),
            data: body["data"].clone(),
        });
    }
    StatusCode::NO_CONTENT
}

async fn typing(State(fake): State<Fake>, Path(channel): Path<String>) -> StatusCode {
    if let Ok(mut s) = fake.shared.lock() {
        s.log.push(format!("typing:{channel}"));
    }
    StatusCode::NO_CONTENT
}

async fn download(State(fake): State<Fake>, Path((id, name)): Path<(String, String)>) -> Response {
    let found = fake
        .shared
        .lock()
        .ok()
        .and_then(|s| s.downloads.get(&(id, name)).cloned());
    match found {
        Some(bytes) => bytes.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The JSON payload and files of a create-message request: plain JSON, or
/// multipart/form-data with `payload_json` and `files[n]` parts (when files are attached).
/// Files of a post: (name, bytes).
type Files = Vec<(String, Vec<u8>)>;

fn read_post(headers: &axum::http::HeaderMap, body: &[u8]) -> Option<(Value, Files)> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(boundary) = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
    else {
        return Some((serde_json::from_slice(body).ok()?, Vec::new()));
    };
    let boundary = format!("--{}", boundary.trim_matches('"'));
    let mut payload = Value::Null;
    let mut files = Vec::new();
    let mut rest = body;
    while let Some(start) = find(rest, boundary.as_bytes()) {
        rest = &rest[start + boundary.len()..];
        let Some(end) = find(rest, boundary.as_bytes()) else {
            break;
        };
        let part = &rest[..end];
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let split = find(part, b"\r\n\r\n")?;
        let headers = String::from_utf8_lossy(&part[..split]).to_string();
        let content = &part[split + 4..];
        let field = |key: &str| {
            headers
                .split(';')
                .find_map(|h| h.trim().strip_prefix(&format!("{key}=\"")))
                .and_then(|v| v.split('"').next())
                .map(str::to_string)
        };
        match (field("name"), field("filename")) {
            (Some(name), _) if name == "payload_json" => {
                payload = serde_json::from_slice(content).ok()?;
            }
            (_, Some(filename)) => files.push((filename, content.to_vec())),
            _ => {}
        }
    }
    Some((payload, files))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn create_message(
    State(fake): State<Fake>,
    Path(channel): Path<String>,
    headers: axum::http::HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    let Some((body, files)) = read_post(&headers, &raw) else {
        let error = json!({"message": "Cannot parse the body", "code": 50109});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    };
    let mut shared = fake
        .shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    shared.post_attempts += 1;
    if let Some((status, error)) = shared.failures.pop_front() {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (code, Json(error)).into_response();
    }
    let now = std::time::Instant::now();
    let global = shared.limited_globally.filter(|until| *until > now);
    let local = shared
        .limited
        .get(&channel)
        .copied()
        .filter(|until| *until > now);
    if let Some(until) = global.or(local) {
        shared.rate_limited_posts += 1;
        return rate_limited(until - now, global.is_some());
    }
    let nonce = match &body["nonce"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    // enforce_nonce: a second post with the same nonce returns the first message.
    if body["enforce_nonce"] == json!(true)
        && let Some(existing) = shared
            .posted
            .iter()
            .find(|p| p.nonce.is_some() && p.nonce == nonce && p.channel_id == channel)
    {
        let m = message_json(&existing.id, &channel, bot_user(), &existing.content);
        shared.repeated_nonces += 1;
        return Json(m).into_response();
    }
    let content = body["content"].as_str().unwrap_or("").to_string();
    if content.chars().count() > 2000 {
        let error = json!({"message": "Invalid Form Body", "code": 50035});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    let id = fake.ids.fetch_add(1, Ordering::SeqCst).to_string();
    let buttons: Vec<String> = body["components"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["custom_id"].as_str().map(str::to_string))
        .collect();
    shared.log.push(format!("post:{channel}"));
    shared.posted.push(Posted {
        allowed_mentions: body["allowed_mentions"].clone(),
        buttons,
        id: id.clone(),
        channel_id: channel.clone(),
        content: content.clone(),
        nonce,
        files,
    });
    let mut response = Json(message_json(&id, &channel, bot_user(), &content)).into_response();
    // Like Discord: every answer names its bucket and what is left of it.
    for (name, value) in [
        ("x-ratelimit-bucket", "fake-messages-bucket"),
        ("x-ratelimit-limit", "5"),
        ("x-ratelimit-remaining", "4"),
        ("x-ratelimit-reset-after", "1.000"),
    ] {
        response.headers_mut().insert(
            axum::http::HeaderName::from_static(name),
            axum::http::HeaderValue::from_static(value),
        );
    }
    response
}

/// Discord's 429, as it sends it: the JSON body with `retry_after` in (fractional)
/// seconds and `global`, `Retry-After` in whole seconds, and the `X-RateLimit-*` headers.
fn rate_limited(wait: std::time::Duration, global: bool) -> Response {
    let secs = wait.as_secs_f64();
    let body =
        json!({"message": "You are being rate limited.", "retry_after": secs, "global": global});
    let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    let headers = response.headers_mut();
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            headers.insert(axum::http::HeaderName::from_static(name), value);
        }
    };
    put("retry-after", (secs.ceil() as u64).to_string());
    put("x-ratelimit-limit", "5".into());
    put("x-ratelimit-remaining", "0".into());
    put("x-ratelimit-reset-after", format!("{secs:.3}"));
    put("x-ratelimit-bucket", "fake-messages-bucket".into());
    put(
        "x-ratelimit-scope",
        if global { "global" } else { "user" }.into(),
    );
    if global {
        put("x-ratelimit-global", "true".into());
    }
    response
}

/// One gateway connection: HELLO, then IDENTIFY → READY, heartbeats acknowledged, and
/// every dispatched event sent with the next sequence number.
async fn session(fake: Fake, stream: tokio::net::TcpStream) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let mut path = String::new();
    // The callback's type is tungstenite's (its error is a whole HTTP response).
    #[allow(clippy::result_large_err)]
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp: Response| {
        path = req.uri().path().to_string();
        Ok(resp)
    })
    .await?;
    let mut events = fake.events.subscribe();
    let mut kick = fake.kick.subscribe();
    let mut reconnect = fake.reconnect.subscribe();
    // A 1 s heartbeat (Discord's is about 41 s): serenity notices a dropped connection at
    // its next heartbeat, and tests should not wait long for that.
    ws.send(WsMessage::text(
        json!({"op": 10, "d": {"heartbeat_interval": 1000}}).to_string(),
    ))
    .await?;
    let mut seq = 0u64;
    let mut ready = false;
    loop {
        tokio::select! {
            incoming = ws.next() => {
                let Some(incoming) = incoming else { return Ok(()) };
                let text = match incoming? {
                    WsMessage::Text(t) => t,
                    WsMessage::Close(frame) => {
                        if let Ok(mut s) = fake.shared.lock() {
                            s.closes.push(frame.map(|f| u16::from(f.code)));
                        }
                        // Answers the close (tungstenite queued the reply).
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                    _ => continue,
                };
                let payload: Value = serde_json::from_str(&text)?;
                match payload["op"].as_u64() {
                    Some(1) => {
                        ws.send(WsMessage::text(json!({"op": 11}).to_string())).await?;
                    }
                    Some(op @ (2 | 6)) => {
                        if let Ok(mut s) = fake.shared.lock() {
                            let what = if op == 2 { "identify" } else { "resume" };
                            s.gateway_log.push(format!("{what}:{path}"));
                        }
                        seq += 1;
                        let resume_url = format!("{}/resume", fake.ws_url);
                        let ready_event = json!({"op": 0, "s": seq, "t": "READY", "d": {
                            "v": 10, "user": bot_user(), "guilds": [],
                            "session_id": "fake-session", "resume_gateway_url": resume_url,
                            "shard": [0, 1], "application": {"id": BOT_ID.to_string(), "flags": 0},
                        }});
                        ws.send(WsMessage::text(ready_event.to_string())).await?;
                        ready = true;
                        if let Ok(mut s) = fake.shared.lock() {
                            s.identified += 1;
                        }
                    }
                    _ => {}
                }
            }
            _ = reconnect.recv() => {
                ws.send(WsMessage::text(json!({"op": 7, "d": null}).to_string())).await?;
            }
            _ = kick.recv() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            event = events.recv(), if ready => {
                let Ok(event) = event else { continue };
                seq += 1;
                let frame = json!({"op": 0, "s": seq, "t": event["t"], "d": event["d"]});
                ws.send(WsMessage::text(frame.to_string())).await?;
            }
        }
    }
}
