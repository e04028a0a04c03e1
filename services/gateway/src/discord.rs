//! The Discord bot's inbound side (serenity's gateway client): messages in routed channels
//! become chat messages for their agent, keyed by the Discord message id, so a repeated
//! event is enqueued once.
//!
//! Catch-up: the last message id enqueued per channel is kept in
//! `<data>/discord-cursors.json`. Each time the bot (re)connects with a new session (after
//! a disconnect Discord would not resume, or a gateway restart), every channel with a
//! cursor is read from that id on, and what was missed is handled like a new message.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ferroclaw_common::Config;
use ferroclaw_common::config::DiscordRoute;
use ferroclaw_proto::v1::AnswerQuestionRequest;
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use serenity::all::{
    Channel, ChannelId, ComponentInteraction, Context, CreateInteractionResponse,
    CreateInteractionResponseMessage, CreateThread, EventHandler, GatewayIntents, GetMessages,
    Http, Interaction, Message, MessageId, Ready, UserId,
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
    /// Thread → parent channel (`None`: not a thread), learnt once per channel.
    parents: Mutex<HashMap<u64, Option<u64>>>,
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

    fn all(&self) -> Vec<(String, u64)> {
        self.map
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
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

/// Starts the bot when the config has Discord routes; it runs until `shutdown`.
pub async fn start(
    config: Arc<Config>,
    ingress: Ingress,
    delivery: ferroclaw_common::grpc_auth::GrpcChannel,
    shutdown: CancellationToken,
) {
    if config.discord.routes.is_empty() {
        return;
    }
    let Some(token) = config.discord.token() else {
        tracing::error!(
            var = %config.discord.token_env,
            "Discord routes are configured but the bot token is not set; Discord is off"
        );
        return;
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
    let handler = Handler {
        config: config.clone(),
        ingress,
        bot: OnceLock::new(),
        cursors: Cursors::load(config.data_dir.join("discord-cursors.json")),
        parents: Mutex::new(HashMap::new()),
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
            return;
        }
    };
    let shards = client.shard_manager.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        shards.shutdown_all().await;
    });
    tokio::spawn(async move {
        if let Err(e) = client.start().await {
            tracing::error!(error = %e, "the Discord client stopped");
        }
    });
}

/// An answer only the clicker sees.
fn refusal(text: String) -> CreateInteractionResponse {
    CreateInteractionResponse::Message(
        CreateInteractionResponseMessage::new()
            .content(text)
            .ephemeral(true),
    )
}

/// The message without mentions of the bot (`<@id>` or `<@!id>`).
fn without_mention(text: &str, bot: UserId) -> String {
    text.replace(&format!("<@{bot}>"), "")
        .replace(&format!("<@!{bot}>"), "")
        .trim()
        .to_string()
}

impl Handler {
    /// The parent channel of a thread, `None` for other channels (asked once, then kept).
    async fn parent_of(&self, http: &Http, channel: ChannelId) -> Option<u64> {
        if let Some(known) = self
            .parents
            .lock()
            .ok()
            .and_then(|p| p.get(&channel.get()).copied())
        {
            return known;
        }
        let parent = match http.get_channel(channel).await {
            Ok(Channel::Guild(c)) if c.thread_metadata.is_some() => c.parent_id.map(|p| p.get()),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, %channel, "cannot look up a Discord channel");
                return None; // not kept: asked again next time
            }
        };
        if let Ok(mut p) = self.parents.lock() {
            p.insert(channel.get(), parent);
        }
        parent
    }

    /// Finds the route of a message: its channel's own, or for a thread its parent's.
    async fn place(&self, http: &Http, msg: &Message) -> Option<Placement<'_>> {
        let channel = msg.channel_id.to_string();
        let discord = &self.config.discord;
        if let Some(route) = discord.route(&channel, msg.guild_id.is_none()) {
            return Some(Placement {
                route,
                conversation: channel,
                in_thread: false,
            });
        }
        msg.guild_id?;
        let parent = self.parent_of(http, msg.channel_id).await?.to_string();
        let route = discord.route(&parent, false)?;
        let own_session = route.sessions == "thread" || route.thread_on_mention;
        Some(Placement {
            route,
            conversation: if own_session { channel } else { parent },
            in_thread: true,
        })
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
                if let Ok(mut p) = self.parents.lock() {
                    p.insert(thread.id.get(), Some(msg.channel_id.get()));
                }
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

    /// Handles one message, live or caught up; `false` when it could not be enqueued (it is
    /// to be read again).
    async fn handle(&self, http: &Http, msg: &Message) -> bool {
        let own = self.bot.get().is_some_and(|b| *b == msg.author.id);
        if own {
            return true;
        }
        let channel = msg.channel_id.to_string();
        let Some(placement) = self.place(http, msg).await else {
            return true;
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
        let answer = match command_gate::check(&self.config, &route.agent, &sender, &text) {
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

    /// Routed channels without a cursor start from their latest message, so an outage is
    /// caught up even in a channel where nothing was handled yet.
    async fn start_cursors(&self, http: &Http) {
        let known: Vec<String> = self.cursors.all().into_iter().map(|(c, _)| c).collect();
        for route in &self.config.discord.routes {
            let Ok(id) = route.channel.parse::<u64>() else {
                continue;
            };
            if known.contains(&route.channel) {
                continue;
            }
            match ChannelId::new(id)
                .messages(http, GetMessages::new().limit(1))
                .await
            {
                Ok(latest) => {
                    if let Some(m) = latest.first() {
                        self.cursors.advance(&route.channel, m.id.get());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, channel = %route.channel, "cannot read a routed channel")
                }
            }
        }
    }

    /// Reads every channel with a cursor from there on and handles what was missed.
    async fn catch_up(&self, http: &Http) {
        for (channel, after) in self.cursors.all() {
            let Ok(id) = channel.parse::<u64>() else {
                continue;
            };
            let channel_id = ChannelId::new(id);
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
                for msg in &page {
                    if !self.handle(http, msg).await {
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
        self.catch_up(&ctx.http).await;
        self.start_cursors(&ctx.http).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        if let Interaction::Component(click) = interaction {
            self.click(&ctx.http, &click).await;
        }
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let _ = self.handle(&ctx.http, &msg).await;
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
    fn mentions_of_the_bot_are_removed() {
        let bot = UserId::new(42);
        assert_eq!(without_mention("<@42> hello <@!42>", bot), "hello");
        assert_eq!(without_mention("<@7> hi", bot), "<@7> hi");
    }
}
