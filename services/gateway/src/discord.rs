//! The Discord bot's inbound side (serenity's gateway client): messages in routed channels
//! become chat messages for their agent, keyed by the Discord message id, so a repeated
//! event is enqueued once.
//!
//! Catch-up: the last message id enqueued per channel is kept in
//! `<data>/discord-cursors.json`. Each time the bot (re)connects with a new session (after
//! a disconnect Discord would not resume, or a gateway restart), every channel with a
//! cursor is read from that id on, and what was missed is handled like a new message.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ferroclaw_common::Config;
use serenity::all::{
    ChannelId, Context, EventHandler, GatewayIntents, GetMessages, Http, Message, MessageId, Ready,
    UserId,
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
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(&*map)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot save Discord cursors");
        }
    }
}

/// Starts the bot when the config has Discord routes; it runs until `shutdown`.
pub async fn start(config: Arc<Config>, ingress: Ingress, shutdown: CancellationToken) {
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

/// The message without mentions of the bot (`<@id>` or `<@!id>`).
fn without_mention(text: &str, bot: UserId) -> String {
    text.replace(&format!("<@{bot}>"), "")
        .replace(&format!("<@!{bot}>"), "")
        .trim()
        .to_string()
}

impl Handler {
    /// Handles one message, live or caught up; `false` when it could not be enqueued (it is
    /// to be read again).
    async fn handle(&self, http: &Http, msg: &Message) -> bool {
        if msg.author.bot {
            return true; // our own messages and other bots'
        }
        let channel = msg.channel_id.to_string();
        let Some(route) = self.config.discord.route(&channel, msg.guild_id.is_none()) else {
            return true;
        };
        let sender = msg.author.id.to_string();
        if !route.allow.is_empty() && !route.allow.contains(&sender) {
            return true;
        }
        let bot = self.bot.get().copied();
        let mentioned = bot.is_some_and(|b| msg.mentions.iter().any(|u| u.id == b));
        if route.engage == "mention" && !mentioned {
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
        let enqueued = self
            .ingress
            .discord_message(&route.agent, &channel, &msg.id.to_string(), &sender, text)
            .await;
        match enqueued {
            Ok(_) => {
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
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let _ = self.handle(&ctx.http, &msg).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_of_the_bot_are_removed() {
        let bot = UserId::new(42);
        assert_eq!(without_mention("<@42> hello <@!42>", bot), "hello");
        assert_eq!(without_mention("<@7> hi", bot), "<@7> hi");
    }
}
