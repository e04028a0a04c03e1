//! The Discord bot's inbound side (serenity's gateway client): messages in routed channels
//! become chat messages for their agent, keyed by the Discord message id, so a repeated
//! event is enqueued once.

use std::sync::{Arc, OnceLock};

use ferroclaw_common::Config;
use serenity::all::{Context, EventHandler, GatewayIntents, Message, Ready, UserId};
use serenity::async_trait;
use serenity::http::HttpBuilder;
use tokio_util::sync::CancellationToken;

use crate::command_gate::{self, Gate};
use crate::ingress::Ingress;

struct Handler {
    config: Arc<Config>,
    ingress: Ingress,
    bot: OnceLock<UserId>,
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

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        let _ = self.bot.set(ready.user.id);
        tracing::info!(user = %ready.user.name, "connected to Discord");
    }

    async fn message(&self, ctx: Context, msg: Message) {
        if msg.author.bot {
            return; // our own messages and other bots'
        }
        let channel = msg.channel_id.to_string();
        let Some(route) = self.config.discord.route(&channel, msg.guild_id.is_none()) else {
            return;
        };
        let sender = msg.author.id.to_string();
        if !route.allow.is_empty() && !route.allow.contains(&sender) {
            return;
        }
        let bot = self.bot.get().copied();
        let mentioned = bot.is_some_and(|b| msg.mentions.iter().any(|u| u.id == b));
        if route.engage == "mention" && !mentioned {
            return;
        }
        let text = match bot {
            Some(b) => without_mention(&msg.content, b),
            None => msg.content.clone(),
        };
        if text.is_empty() {
            return;
        }
        let answer = match command_gate::check(&self.config, &route.agent, &sender, &text) {
            Gate::Pass => None,
            Gate::Answer(a) | Gate::Deny(a) => Some(a),
        };
        if let Some(answer) = answer {
            if let Err(e) = msg.channel_id.say(&ctx.http, answer).await {
                tracing::warn!(error = %e, "cannot answer a command on Discord");
            }
            return;
        }
        let enqueued = self
            .ingress
            .discord_message(&route.agent, &channel, &msg.id.to_string(), &sender, text)
            .await;
        if let Err(e) = enqueued {
            // Catch-up after reconnects is not built yet: this message waits for a resend.
            tracing::error!(error = %e, message = %msg.id, "cannot enqueue a Discord message");
        }
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
