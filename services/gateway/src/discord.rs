//! The Discord bot's inbound side (serenity's gateway client): messages in routed channels
//! become chat messages for their agent, keyed by the Discord message id, so a repeated
//! event is enqueued once.
//!
//! Catch-up: the last message id handled per channel (or thread, or DM) is kept in
//! `<data>/discord-cursors.json`. Every routed channel gets a cursor when the bot first
//! connects, even an empty one. Each time the bot (re)connects with a new session (after a
//! disconnect Discord would not resume, or a gateway restart), the active threads of the
//! routed channels' guilds get cursors too, every channel with a cursor is read from that id
//! on, and what was missed is handled like a new message. Discord's history omits
//! `guild_id`, so what kind of channel is read (a DM, a guild channel, a thread and its
//! parent) is asked of Discord once and kept; a cursor never moves past a message that was
//! not handled.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ferroclaw_common::Config;
use ferroclaw_common::config::DiscordRoute;
use ferroclaw_proto::v1::AnswerQuestionRequest;
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use serenity::all::{
    Channel, ChannelId, ChannelType, ComponentInteraction, ConnectionStage, Context,
    CreateInteractionResponse, CreateInteractionResponseMessage, CreateThread, EventHandler,
    GatewayIntents, GetMessages, GuildChannel, GuildId, Http, Interaction, Message, MessageId,
    Ready, UserId,
};
use serenity::async_trait;
use serenity::http::HttpBuilder;
use tokio_util::sync::CancellationToken;

use crate::command_gate::{self, Gate};
use crate::ingress::Ingress;

struct Handler {
    config: Arc<Config>,
    ingress: Ingress,
    bot: OnceLock<UserId>,
    cursors: Cursors,
    /// What each channel is (a DM, a guild channel, a thread), learnt once per channel.
    kinds: Mutex<HashMap<u64, Kind>>,
    /// The shards' gateway URL (serenity's `Client::ws_url`): set to the session's
    /// `resume_gateway_url` on READY, so a resume goes where Discord asks.
    ws_url: Arc<OnceLock<Arc<tokio::sync::Mutex<String>>>>,
    /// Downloads attachments.
    http: reqwest::Client,
    /// Answers to questions (button clicks) go to delivery.
    delivery: ferroclaw_common::grpc_auth::GrpcChannel,
}

/// How long a click may wait for delivery: Discord wants an answer within 3 s.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The question and option index of a question button (`q:<question>:<index>`).
fn parse_button(custom_id: &str) -> Option<(&str, usize)> {
    let rest = custom_id.strip_prefix("q:")?;
    let (question, index) = rest.rsplit_once(':')?;
    Some((question, index.parse().ok()?))
}

/// Largest attachment taken in (the runner's limit too).
const MAX_ATTACHMENT_BYTES: u64 = 25 * 1024 * 1024;

/// What a channel is, as far as routing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A direct message channel.
    Dm,
    /// A channel of a guild; `parent` is set for a thread.
    Guild { guild: u64, parent: Option<u64> },
}

/// The snowflake of a moment (Discord's epoch is 2015-01-01): a valid `after` cursor that
/// every message posted later is above.
fn snowflake_at(unix_ms: u64) -> u64 {
    unix_ms.saturating_sub(1_420_070_400_000) << 22
}

fn snowflake_now() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    snowflake_at(ms)
}

/// The key of the cursor file's entry that holds when the bot first connected (a
/// snowflake): nothing older is caught up. Not a channel id, so never read as one.
const SINCE: &str = "since";

/// Where a message belongs: its route, the conversation (session) it is part of, and
/// whether it was written inside a thread.
struct Placement<'r> {
    route: &'r DiscordRoute,
    conversation: String,
    in_thread: bool,
}

/// The last message id handled in each channel, kept in a file so a restarted gateway
/// knows where to catch up from.
#[derive(Clone)]
struct Cursors {
    path: PathBuf,
    map: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Cursors {
    fn load(path: PathBuf) -> Self {
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            map: Arc::new(Mutex::new(map)),
        }
    }

    /// Every channel's cursor (not the `since` entry).
    fn all(&self) -> Vec<(String, u64)> {
        self.map
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.as_str() != SINCE)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn get(&self, key: &str) -> Option<u64> {
        self.map.lock().ok().and_then(|m| m.get(key).copied())
    }

    /// Moves a channel's cursor forward (never back) and writes the file atomically.
    fn advance(&self, channel: &str, id: u64) {
        let Ok(mut map) = self.map.lock() else { return };
        let current = map.entry(channel.to_string()).or_insert(0);
        if id <= *current {
            return;
        }
        *current = id;
        let written = serde_json::to_vec(&*map)
            .map_err(std::io::Error::other)
            .and_then(|json| ferroclaw_common::atomic_file::write(&self.path, &json));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot save Discord cursors");
        }
    }
}

/// How long shutdown waits for Discord to answer the bot's close frame.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);

/// How often the shards' connection is checked; after two checks in a row without one,
/// the gateway URL goes back to the one Discord gave for new connections.
const URL_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the bot when the config has Discord routes; it runs until `shutdown`. The task
/// returned ends once the bot has logged off (a close frame with code 1000 sent and
/// answered, or a timeout): the gateway awaits it before it exits.
pub async fn start(
    config: Arc<Config>,
    ingress: Ingress,
    delivery: ferroclaw_common::grpc_auth::GrpcChannel,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.discord.routes.is_empty() {
        return None;
    }
    let Some(token) = config.discord.token() else {
        tracing::error!(
            var = %config.discord.token_env,
            "Discord routes are configured but the bot token is not set; Discord is off"
        );
        return None;
    };
    let mut http = HttpBuilder::new(&token);
    if let Some(url) = &config.discord.api_url {
        http = http
            .proxy(url.trim_end_matches('/'))
            .ratelimiter_disabled(true);
    }
    let intents = GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::GUILD_MESSAGE_REACTIONS;
    let ws_url = Arc::new(OnceLock::new());
    let handler = Handler {
        config: config.clone(),
        ingress,
        bot: OnceLock::new(),
        cursors: Cursors::load(config.data_dir.join("discord-cursors.json")),
        kinds: Mutex::new(HashMap::new()),
        ws_url: ws_url.clone(),
        http: reqwest::Client::new(),
        delivery,
    };
    let built = serenity::all::ClientBuilder::new_with_http(http.build(), intents)
        .event_handler(handler)
        .await;
    let mut client = match built {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the Discord client; Discord is off");
            return None;
        }
    };
    // serenity 0.12 connects, resumes and re-identifies on this one URL: READY sets it to
    // the session's resume URL; the gateway URL comes back when no shard is connected for
    // a while (the resume host may be gone, and a new session starts on the gateway URL).
    let url = client.ws_url.clone();
    let gateway_url = url.lock().await.clone();
    let _ = ws_url.set(url.clone());
    let shards = client.shard_manager.clone();
    let running = tokio::spawn(async move {
        if let Err(e) = client.start().await {
            tracing::error!(error = %e, "the Discord client stopped");
        }
    });
    let watched = shards.clone();
    let stop_watching = shutdown.clone();
    tokio::spawn(async move {
        let mut unconnected = 0;
        loop {
            tokio::select! {
                () = stop_watching.cancelled() => return,
                () = tokio::time::sleep(URL_CHECK) => {}
            }
            let connected = watched
                .runners
                .lock()
                .await
                .values()
                .any(|r| r.stage == ConnectionStage::Connected);
            unconnected = if connected { 0 } else { unconnected + 1 };
            if unconnected >= 2 {
                let mut current = url.lock().await;
                if *current != gateway_url {
                    tracing::info!(
                        "no Discord session for a while; connecting to the gateway URL again"
                    );
                    current.clone_from(&gateway_url);
                }
            }
        }
    });
    Some(tokio::spawn(async move {
        shutdown.cancelled().await;
        // Each shard sends a close frame (1000) and waits for Discord's (up to 5 s).
        if tokio::time::timeout(CLOSE_TIMEOUT, shards.shutdown_all())
            .await
            .is_err()
        {
            tracing::warn!("the Discord connection did not close in time");
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, running).await;
    }))
}

/// An answer only the clicker sees.
fn refusal(text: String) -> CreateInteractionResponse {
    CreateInteractionResponse::Message(
        CreateInteractionResponseMessage::new()
            .content(text)
            .ephemeral(true),
    )
}

/// What a guild channel is: a thread (with its parent) or not.
fn guild_kind(c: &GuildChannel) -> Kind {
    let thread = c.thread_metadata.is_some()
        || matches!(
            c.kind,
            ChannelType::PublicThread | ChannelType::PrivateThread | ChannelType::NewsThread
        );
    Kind::Guild {
        guild: c.guild_id.get(),
        parent: if thread {
            c.parent_id.map(|p| p.get())
        } else {
            None
        },
    }
}

/// The message without mentions of the bot (`<@id>` or `<@!id>`).
fn without_mention(text: &str, bot: UserId) -> String {
    text.replace(&format!("<@{bot}>"), "")
        .replace(&format!("<@!{bot}>"), "")
        .trim()
        .to_string()
}

impl Handler {
    /// What a channel is (asked of Discord once, then kept); `None` when Discord could not
    /// say (not kept: asked again next time).
    async fn kind_of(&self, http: &Http, channel: ChannelId) -> Option<Kind> {
        if let Some(known) = self
            .kinds
            .lock()
            .ok()
            .and_then(|k| k.get(&channel.get()).copied())
        {
            return Some(known);
        }
        let kind = match http.get_channel(channel).await {
            Ok(Channel::Guild(c)) => guild_kind(&c),
            Ok(Channel::Private(_)) => Kind::Dm,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(error = %e, %channel, "cannot look up a Discord channel");
                return None;
            }
        };
        self.remember(channel.get(), kind);
        Some(kind)
    }

    fn remember(&self, channel: u64, kind: Kind) {
        if let Ok(mut k) = self.kinds.lock() {
            k.insert(channel, kind);
        }
    }

    /// Finds the route of a message: its channel's own, or for a thread its parent's.
    /// `dm` says whether it was written in a DM channel. `Err` when that cannot be told
    /// now (Discord did not say what the channel is): the message is to be read again.
    async fn place(
        &self,
        http: &Http,
        msg: &Message,
        dm: bool,
    ) -> Result<Option<Placement<'_>>, ()> {
        let channel = msg.channel_id.to_string();
        let discord = &self.config.discord;
        if let Some(route) = discord.route(&channel, dm) {
            return Ok(Some(Placement {
                route,
                conversation: channel,
                in_thread: false,
            }));
        }
        if dm {
            return Ok(None);
        }
        let parent = match self.kind_of(http, msg.channel_id).await {
            Some(Kind::Guild {
                parent: Some(parent),
                ..
            }) => parent.to_string(),
            Some(_) => return Ok(None),
            None => return Err(()),
        };
        let Some(route) = discord.route(&parent, false) else {
            return Ok(None);
        };
        let own_session = route.sessions == "thread" || route.thread_on_mention;
        Ok(Some(Placement {
            route,
            conversation: if own_session { channel } else { parent },
            in_thread: true,
        }))
    }

    /// Opens a thread on a message (its id is the message's); `None` when Discord refuses.
    async fn open_thread(&self, http: &Http, msg: &Message, text: &str) -> Option<String> {
        let name: String = text.chars().take(80).collect();
        let name = if name.trim().is_empty() {
            "conversation".to_string()
        } else {
            name
        };
        match msg
            .channel_id
            .create_thread_from_message(http, msg.id, CreateThread::new(name))
            .await
        {
            Ok(thread) => {
                self.remember(thread.id.get(), guild_kind(&thread));
                Some(thread.id.to_string())
            }
            // Already opened (a redelivered event): a message's thread has its id.
            Err(serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(e)))
                if e.error.code == 160004 =>
            {
                Some(msg.id.to_string())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a thread; answering in the channel");
                None
            }
        }
    }

    /// Handles one message, live or caught up (`dm`: written in a DM channel); `false` when
    /// it could not be handled now (it is to be read again).
    async fn handle(&self, http: &Http, msg: &Message, dm: bool) -> bool {
        let own = self.bot.get().is_some_and(|b| *b == msg.author.id);
        if own {
            return true;
        }
        let channel = msg.channel_id.to_string();
        let placement = match self.place(http, msg, dm).await {
            Ok(Some(p)) => p,
            Ok(None) => return true,
            Err(()) => return false,
        };
        let route = placement.route;
        if msg.author.bot && !route.allow_bots {
            return true; // other bots, unless the route takes them
        }
        let sender = msg.author.id.to_string();
        if !self.config.discord_sender_allowed(route, &sender) {
            return true;
        }
        let bot = self.bot.get().copied();
        let mentioned = bot.is_some_and(|b| msg.mentions.iter().any(|u| u.id == b));
        // Inside a thread the bot opened, the thread is the conversation: no mention needed.
        let engaged = mentioned || (placement.in_thread && route.thread_on_mention);
        if route.engage == "mention" && !engaged {
            return true;
        }
        let text = match bot {
            Some(b) => without_mention(&msg.content, b),
            None => msg.content.clone(),
        };
        if text.is_empty() {
            return true;
        }
        // On Discord a person is named by a mention.
        let mention = format!("<@{sender}>");
        let gate = command_gate::check_as(&self.config, &route.agent, &sender, &mention, &text);
        let answer = match gate {
            Gate::Pass => None,
            Gate::Answer(a) | Gate::Deny(a) => Some(a),
        };
        if let Some(answer) = answer {
            if let Err(e) = msg.channel_id.say(http, answer).await {
                tracing::warn!(error = %e, "cannot answer a command on Discord");
            }
            self.cursors.advance(&channel, msg.id.get());
            return true;
        }
        let mut conversation = placement.conversation;
        let mut reply_channel = channel.clone();
        if route.thread_on_mention
            && mentioned
            && !placement.in_thread
            && let Some(thread) = self.open_thread(http, msg, &text).await
        {
            conversation = thread.clone();
            reply_channel = thread;
        }
        let (attachments, notes) = self.attachments(msg, &route.agent, &conversation).await;
        let text = if notes.is_empty() {
            text
        } else {
            format!("{text}\n{}", notes.join("\n"))
        };
        let enqueued = self
            .ingress
            .discord_message(
                &route.agent,
                &conversation,
                &reply_channel,
                &msg.id.to_string(),
                &sender,
                text,
                attachments,
            )
            .await;
        match enqueued {
            Ok(_) => {
                self.cursors.advance(&channel, msg.id.get());
                true
            }
            // The session takes no work (over its disk quota, or tampered with): the person
            // is told why, since no agent will answer, and the message counts as handled.
            Err(crate::error::ApiError::Conflict(why)) => {
                tracing::warn!(%why, message = %msg.id, "a Discord message was refused");
                if let Err(e) = msg.channel_id.say(http, format!("Not taken: {why}")).await {
                    tracing::warn!(error = %e, "cannot say why a message was refused");
                }
                self.cursors.advance(&channel, msg.id.get());
                true
            }
            // The cursor stays behind it: the next catch-up fetches it again.
            Err(e) => {
                tracing::error!(error = %e, message = %msg.id, "cannot enqueue a Discord message");
                false
            }
        }
    }

    /// Downloads a message's attachments into its session's inbox. One that is too big or
    /// cannot be fetched becomes a note in the text, so the agent knows it was there.
    async fn attachments(
        &self,
        msg: &Message,
        agent: &str,
        conversation: &str,
    ) -> (Vec<ferroclaw_content::Attachment>, Vec<String>) {
        let mut taken = Vec::new();
        let mut notes = Vec::new();
        for a in &msg.attachments {
            if u64::from(a.size) > MAX_ATTACHMENT_BYTES {
                notes.push(format!(
                    "[attachment {} not taken: {} bytes, over the {MAX_ATTACHMENT_BYTES}-byte limit]",
                    a.filename, a.size
                ));
                continue;
            }
            let fetched = async {
                let response = self.http.get(&a.url).send().await?.error_for_status()?;
                response.bytes().await
            }
            .await;
            let data = match fetched {
                Ok(d) if d.len() as u64 <= MAX_ATTACHMENT_BYTES => d.to_vec(),
                Ok(d) => {
                    notes.push(format!(
                        "[attachment {} not taken: {} bytes]",
                        a.filename,
                        d.len()
                    ));
                    continue;
                }
                Err(e) => {
                    notes.push(format!(
                        "[attachment {} could not be downloaded: {e}]",
                        a.filename
                    ));
                    continue;
                }
            };
            let stored = self
                .ingress
                .put_inbox_file(
                    agent,
                    format!("discord:{conversation}"),
                    &msg.id.to_string(),
                    &a.filename,
                    data,
                )
                .await;
            match stored {
                Ok(attachment) => taken.push(attachment),
                Err(e) => notes.push(format!("[attachment {} not stored: {e}]", a.filename)),
            }
        }
        (taken, notes)
    }

    /// A click on a question's button: the answer is checked by delivery first, then the
    /// card is updated to show it (buttons removed), or the clicker alone is told why not.
    async fn click(&self, http: &Http, click: &ComponentInteraction) {
        let Some((question_id, index)) = parse_button(&click.data.custom_id) else {
            return;
        };
        let user = click.user.id.to_string();
        let request = AnswerQuestionRequest {
            question_id: question_id.to_string(),
            option: format!("#{index}"),
            user: user.clone(),
        };
        let answered = tokio::time::timeout(
            ANSWER_TIMEOUT,
            DeliveryClient::new(self.delivery.clone()).answer_question(request),
        )
        .await;
        let response = match answered {
            Ok(Ok(answer)) => {
                let label = answer.into_inner().label;
                let text = format!(
                    "{}\n\n**{label}** (answered by <@{user}>)",
                    click.message.content
                );
                CreateInteractionResponse::UpdateMessage(
                    CreateInteractionResponseMessage::new()
                        .content(text)
                        .components(Vec::new()),
                )
            }
            Ok(Err(status)) => refusal(format!("Your answer was not taken: {}.", status.message())),
            Err(_) => {
                refusal("Your answer could not be recorded just now; please try again.".into())
            }
        };
        if let Err(e) = click.create_response(http, response).await {
            tracing::warn!(error = %e, "cannot answer a Discord interaction");
        }
    }

    /// Routed channels without a cursor start from their latest message, or from now when
    /// they have none, so an outage is caught up even in a channel where nothing was handled
    /// yet. The first connect is remembered too: nothing older is caught up.
    async fn start_cursors(&self, http: &Http) {
        if self.cursors.get(SINCE).is_none() {
            self.cursors.advance(SINCE, snowflake_now());
        }
        let known: Vec<String> = self.cursors.all().into_iter().map(|(c, _)| c).collect();
        for route in &self.config.discord.routes {
            let Ok(id) = route.channel.parse::<u64>() else {
                continue;
            };
            if known.contains(&route.channel) {
                continue;
            }
            // Taken before the read: a message posted meanwhile is above it.
            let now = snowflake_now();
            match ChannelId::new(id)
                .messages(http, GetMessages::new().limit(1))
                .await
            {
                Ok(latest) => {
                    let start = latest.first().map_or(now, |m| m.id.get());
                    self.cursors.advance(&route.channel, start);
                }
                Err(e) => {
                    tracing::warn!(error = %e, channel = %route.channel, "cannot read a routed channel")
                }
            }
        }
    }

    /// Threads of routed channels that are active now and have no cursor get one: from
    /// their start, or from the first connect when they are older. They were opened, or
    /// written in, while the bot could not see it.
    async fn find_active_threads(&self, http: &Http) {
        let mut guilds = std::collections::BTreeSet::new();
        for route in &self.config.discord.routes {
            let Ok(id) = route.channel.parse::<u64>() else {
                continue;
            };
            if let Some(Kind::Guild { guild, .. }) = self.kind_of(http, ChannelId::new(id)).await {
                guilds.insert(guild);
            }
        }
        let since = self.cursors.get(SINCE).unwrap_or_else(snowflake_now);
        let known: std::collections::HashSet<String> =
            self.cursors.all().into_iter().map(|(c, _)| c).collect();
        for guild in guilds {
            let active = match http.get_guild_active_threads(GuildId::new(guild)).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, guild, "cannot list a guild's active threads");
                    continue;
                }
            };
            for thread in &active.threads {
                let kind = guild_kind(thread);
                self.remember(thread.id.get(), kind);
                let Kind::Guild {
                    parent: Some(parent),
                    ..
                } = kind
                else {
                    continue;
                };
                let id = thread.id.to_string();
                if known.contains(&id)
                    || self
                        .config
                        .discord
                        .route(&parent.to_string(), false)
                        .is_none()
                {
                    continue;
                }
                tracing::info!(thread = %id, "catching up on a thread found active");
                self.cursors.advance(&id, thread.id.get().max(since));
            }
        }
    }

    /// Reads every channel with a cursor from there on and handles what was missed.
    async fn catch_up(&self, http: &Http) {
        self.find_active_threads(http).await;
        for (channel, after) in self.cursors.all() {
            let Ok(id) = channel.parse::<u64>() else {
                continue;
            };
            let channel_id = ChannelId::new(id);
            // History carries no guild_id: what the channel is decides the route.
            let Some(kind) = self.kind_of(http, channel_id).await else {
                continue; // read again at the next catch-up
            };
            let (dm, guild) = match kind {
                Kind::Dm => (true, None),
                Kind::Guild { guild, .. } => (false, Some(GuildId::new(guild))),
            };
            let mut cursor = after;
            loop {
                let page = channel_id
                    .messages(
                        http,
                        GetMessages::new().after(MessageId::new(cursor)).limit(100),
                    )
                    .await;
                let mut page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, %channel, "catch-up read failed");
                        break;
                    }
                };
                page.sort_by_key(|m| m.id);
                let full = page.len() == 100;
                let mut stuck = false;
                for msg in &mut page {
                    msg.guild_id = msg.guild_id.or(guild);
                    if !self.handle(http, msg, dm).await {
                        stuck = true; // keep the order: the rest waits for the next catch-up
                        break;
                    }
                    cursor = cursor.max(msg.id.get());
                    // Skipped messages (bots', not engaged) move the cursor too.
                    self.cursors.advance(&channel, msg.id.get());
                }
                if stuck {
                    break;
                }
                if !page.is_empty() {
                    tracing::info!(%channel, missed = page.len(), "caught up on Discord messages");
                }
                if !full {
                    break;
                }
            }
        }
    }
}

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        let _ = self.bot.set(ready.user.id);
        tracing::info!(user = %ready.user.name, "connected to Discord");
        if !ready.resume_gateway_url.is_empty()
            && let Some(url) = self.ws_url.get()
        {
            ready.resume_gateway_url.clone_into(&mut *url.lock().await);
        }
        self.catch_up(&ctx.http).await;
        self.start_cursors(&ctx.http).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        if let Interaction::Component(click) = interaction {
            self.click(&ctx.http, &click).await;
        }
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let dm = msg.guild_id.is_none();
        let _ = self.handle(&ctx.http, &msg, dm).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn button_ids_parse() {
        assert_eq!(parse_button("q:q_abc:3"), Some(("q_abc", 3)));
        assert_eq!(parse_button("q:a:b:12"), Some(("a:b", 12)));
        assert_eq!(parse_button("other"), None);
        assert_eq!(parse_button("q:x:y"), None);
    }

    #[test]
    fn snowflakes_of_moments() {
        assert_eq!(snowflake_at(1_420_070_400_000), 0);
        // Discord's documented example: 175928847299117063 was made at 1462015105796.
        assert_eq!(
            snowflake_at(1_462_015_105_796),
            175_928_847_299_117_063 >> 22 << 22
        );
        assert!(snowflake_now() > snowflake_at(1_700_000_000_000));
    }

    #[test]
    fn mentions_of_the_bot_are_removed() {
        let bot = UserId::new(42);
        assert_eq!(without_mention("<@42> hello <@!42>", bot), "hello");
        assert_eq!(without_mention("<@7> hi", bot), "<@7> hi");
    }
}
