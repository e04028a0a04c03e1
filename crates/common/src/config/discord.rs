//! `[discord]`: the bot's token and API, and its routes from channels to agents with who
//! may talk to them.

use serde::Deserialize;

use super::agents::{AgentConfig, check_agent};
use super::{Config, ConfigError, invalid};

/// The Discord bot: on when it has routes and a token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordConfig {
    /// The environment variable holding the bot token.
    pub token_env: String,
    /// Another Discord API base (a fake in tests, or an API proxy); Discord's when unset.
    /// Rate limiting is then left to ferroclaw's retries.
    pub api_url: Option<String>,
    /// Largest file the bot uploads (Discord's limit for the server).
    pub max_upload_bytes: u64,
    pub routes: Vec<DiscordRoute>,
}

impl Default for DiscordConfig {
    fn default() -> Self {
        Self {
            token_env: "DISCORD_BOT_TOKEN".into(),
            api_url: None,
            max_upload_bytes: 10 * 1024 * 1024,
            routes: Vec::new(),
        }
    }
}

impl DiscordConfig {
    pub fn token(&self) -> Option<String> {
        std::env::var(&self.token_env)
            .ok()
            .filter(|t| !t.is_empty())
    }

    /// The route of a channel: by its id, else "dm" for direct messages.
    pub fn route(&self, channel_id: &str, is_dm: bool) -> Option<&DiscordRoute> {
        self.routes
            .iter()
            .find(|r| r.channel == channel_id)
            .or_else(|| {
                is_dm
                    .then(|| self.routes.iter().find(|r| r.channel == "dm"))
                    .flatten()
            })
    }
}

/// A Discord channel (by id) or "dm" → an agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordRoute {
    pub channel: String,
    pub agent: String,
    /// "always", or "mention": only messages that mention the bot.
    #[serde(default = "default_engage")]
    pub engage: String,
    /// Who may talk to the agent: "everyone", "allowlist" (the ids in `allow`) or "known"
    /// (`allow` plus the owners and admins). A non-empty `allow` alone means "allowlist".
    #[serde(default)]
    pub senders: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    /// Answer other bots too (never the bot itself).
    #[serde(default)]
    pub allow_bots: bool,
    /// Threads under this channel: "channel" (they share the channel's session) or
    /// "thread" (each thread is its own session).
    #[serde(default = "default_sessions")]
    pub sessions: String,
    /// A mention of the bot outside a thread opens a thread for that conversation.
    #[serde(default)]
    pub thread_on_mention: bool,
    /// Mentions a reply may ping besides the people it names: "roles", "everyone"
    /// (`@everyone`/`@here`). Empty by default: replies never ping a role or everyone.
    #[serde(default)]
    pub allow_mentions: Vec<String>,
}

fn default_sessions() -> String {
    "channel".into()
}

fn default_engage() -> String {
    "always".into()
}

impl DiscordConfig {
    /// Checks `[[discord.routes]]`; each must route to one of `agents`.
    pub(super) fn validate(&self, agents: &[AgentConfig]) -> Result<(), ConfigError> {
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("discord.routes[{i}]");
            check_agent(agents, &format!("{key}.agent"), &route.agent)?;
            route.validate(&key)?;
        }
        Ok(())
    }
}

impl DiscordRoute {
    /// Its own settings; `key` is where it sits (`discord.routes[i]`).
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.channel != "dm" && self.channel.parse::<u64>().is_err() {
            return Err(invalid(
                format!("{key}.channel"),
                format!("{:?}: expected a channel id or \"dm\"", self.channel),
            ));
        }
        if let Some(senders) = &self.senders
            && !matches!(senders.as_str(), "everyone" | "allowlist" | "known")
        {
            return Err(invalid(
                format!("{key}.senders"),
                format!("{senders:?}: expected everyone, allowlist or known"),
            ));
        }
        if !matches!(self.sessions.as_str(), "channel" | "thread") {
            return Err(invalid(
                format!("{key}.sessions"),
                format!("{:?}: expected channel or thread", self.sessions),
            ));
        }
        if !matches!(self.engage.as_str(), "always" | "mention") {
            return Err(invalid(
                format!("{key}.engage"),
                format!("{:?}: expected always or mention", self.engage),
            ));
        }
        if let Some(bad) = self
            .allow_mentions
            .iter()
            .find(|m| !matches!(m.as_str(), "roles" | "everyone"))
        {
            return Err(invalid(
                format!("{key}.allow_mentions"),
                format!("{bad:?}: expected \"roles\" or \"everyone\""),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Whether a Discord route lets `sender` talk to its agent.
    pub fn discord_sender_allowed(&self, route: &DiscordRoute, sender: &str) -> bool {
        let listed = route.allow.iter().any(|s| s == sender);
        let policy = route
            .senders
            .as_deref()
            .unwrap_or(if route.allow.is_empty() {
                "everyone"
            } else {
                "allowlist"
            });
        match policy {
            "allowlist" => listed,
            "known" => {
                let agent_admin = self
                    .agents
                    .iter()
                    .any(|a| a.name == route.agent && a.admins.iter().any(|s| s == sender));
                listed
                    || agent_admin
                    || self.roles.owners.iter().any(|s| s == sender)
                    || self.roles.admins.iter().any(|s| s == sender)
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discord_sender_policies() {
        let c = Config::parse(
            r#"
[roles]
admins = ["adam"]
[[agents]]
name = "main"
admins = ["mia"]
[[discord.routes]]
channel = "1"
agent = "main"
[[discord.routes]]
channel = "2"
agent = "main"
allow = ["ann"]
[[discord.routes]]
channel = "3"
agent = "main"
senders = "known"
allow = ["ann"]
[[discord.routes]]
channel = "dm"
agent = "main"
senders = "allowlist"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let allowed = |channel: &str, who: &str| {
            let route = c.discord.route(channel, channel == "99").unwrap();
            c.discord_sender_allowed(route, who)
        };
        assert!(allowed("1", "bob"), "everyone");
        assert!(allowed("2", "ann") && !allowed("2", "bob"), "allowlist");
        for who in ["ann", "adam", "mia"] {
            assert!(allowed("3", who), "known: {who}");
        }
        assert!(!allowed("3", "bob"));
        assert!(!allowed("99", "ann"), "an empty allowlist lets nobody in");
        let bad =
            Config::parse("[[discord.routes]]\nchannel = \"general\"\nagent = \"main\"\n").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("discord.routes[0].channel"), "{err}");
    }

    #[test]
    fn route_settings_are_checked() {
        for (setting, key) in [
            ("senders = \"friends\"", "senders"),
            ("sessions = \"forum\"", "sessions"),
            ("engage = \"sometimes\"", "engage"),
            ("allow_mentions = [\"here\"]", "allow_mentions"),
        ] {
            let c = Config::parse(&format!(
                "[[discord.routes]]\nchannel = \"1\"\nagent = \"main\"\n{setting}\n"
            ))
            .unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("discord.routes[0].{key}")), "{err}");
        }
        let c =
            Config::parse("[[discord.routes]]\nchannel = \"dm\"\nagent = \"nobody\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("discord.routes[0].agent"), "{err}");
    }
}
