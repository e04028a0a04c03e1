//! `[[webhooks]]`: `POST /v1/hooks/{source}` → agent, with its signature scheme and where
//! the agent's replies go.

use serde::Deserialize;

use super::agents::{AgentConfig, check_agent};
use super::{ConfigError, invalid};
use crate::ids::is_safe_name;

/// `POST /v1/hooks/{source}` → agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRoute {
    pub source: String,
    pub agent: String,
    /// API conversation that receives the agent's replies; default `webhook-<source>`.
    #[serde(default)]
    pub reply_conversation: Option<String>,
    /// Shared secret: requests must be signed (HMAC-SHA256), and replies posted to
    /// `callback_url` are signed with it. Prefer `secret_env`.
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of the environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// "ferroclaw" (timestamped, replay window) or "github" (`X-Hub-Signature-256`).
    #[serde(default = "default_signature")]
    pub signature: String,
    /// How far a signed timestamp may be from now, in seconds.
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
    /// Header carrying the delivery id used for idempotency; default `Idempotency-Key`
    /// (`X-GitHub-Delivery` for the github scheme).
    #[serde(default)]
    pub delivery_id_header: Option<String>,
    /// Largest body for this source (the gateway's limit still applies).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Replies are POSTed here (signed when the source has a secret) instead of being kept
    /// for an API conversation.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Replies go to this Discord channel (by id) instead.
    #[serde(default)]
    pub reply_discord_channel: Option<String>,
}

fn default_signature() -> String {
    "ferroclaw".into()
}
fn default_tolerance() -> u64 {
    300
}

impl WebhookRoute {
    /// Source `source` → `agent`, unsigned, every other setting at its default.
    pub(super) fn unsigned(source: &str, agent: &str) -> Self {
        Self {
            source: source.into(),
            agent: agent.into(),
            reply_conversation: None,
            secret: None,
            secret_env: None,
            signature: default_signature(),
            tolerance_secs: default_tolerance(),
            delivery_id_header: None,
            max_body_bytes: None,
            callback_url: None,
            reply_discord_channel: None,
        }
    }

    /// The secret, from `secret` or the variable `secret_env` names.
    pub fn secret(&self) -> Option<String> {
        self.secret.clone().or_else(|| {
            self.secret_env
                .as_ref()
                .and_then(|var| std::env::var(var).ok())
                .filter(|v| !v.is_empty())
        })
    }

    /// The header whose value is the delivery id.
    pub fn delivery_id_header(&self) -> String {
        match (&self.delivery_id_header, self.signature.as_str()) {
            (Some(h), _) => h.to_ascii_lowercase(),
            (None, "github") => "x-github-delivery".into(),
            (None, _) => "idempotency-key".into(),
        }
    }

    pub fn reply_conversation(&self) -> String {
        self.reply_conversation
            .clone()
            .unwrap_or_else(|| format!("webhook-{}", self.source))
    }
}

/// Checks `[[webhooks]]`; each must route to one of `agents`.
pub(super) fn validate(routes: &[WebhookRoute], agents: &[AgentConfig]) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        if !is_safe_name(&route.source) {
            return Err(invalid(
                format!("webhooks[{i}].source"),
                format!(
                    "{:?} must be letters, digits, '-', '_' or '.'",
                    route.source
                ),
            ));
        }
        check_agent(agents, &format!("webhooks[{i}].agent"), &route.agent)?;
        if !matches!(route.signature.as_str(), "ferroclaw" | "github") {
            return Err(invalid(
                format!("webhooks[{i}].signature"),
                format!("{:?}: expected ferroclaw or github", route.signature),
            ));
        }
        if let Some(var) = &route.secret_env
            && route.secret.is_none()
            && route.secret().is_none()
        {
            return Err(invalid(
                format!("webhooks[{i}].secret_env"),
                format!("environment variable {var} is not set"),
            ));
        }
        if let Some(channel) = &route.reply_discord_channel
            && (channel.parse::<u64>().is_err() || route.callback_url.is_some())
        {
            return Err(invalid(
                format!("webhooks[{i}].reply_discord_channel"),
                format!("{channel:?}: a channel id, and not together with callback_url"),
            ));
        }
        if let Some(url) = &route.callback_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                format!("webhooks[{i}].callback_url"),
                format!("{url:?} is not an http(s) URL"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn routes_name_a_known_agent_and_a_scheme() {
        let c = Config::parse(
            "[[agents]]\nname = \"a\"\n[[webhooks]]\nsource = \"gh\"\nagent = \"b\"\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("webhooks[0].agent"), "{err}");
        let c = Config::parse(
            "[[agents]]\nname = \"a\"\n[[webhooks]]\nsource = \"gh\"\nagent = \"a\"\nsignature = \"stripe\"\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("webhooks[0].signature"), "{err}");
    }

    #[test]
    fn defaults_follow_the_signature_scheme() {
        let c = Config::parse(
            "[[agents]]\nname = \"main\"\n[[webhooks]]\nsource = \"gh\"\nagent = \"main\"\nsignature = \"github\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let route = c.webhook_route("gh").unwrap();
        assert_eq!(route.delivery_id_header(), "x-github-delivery");
        assert_eq!(route.reply_conversation(), "webhook-gh");
        assert_eq!(route.tolerance_secs, 300);
        let default = Config::default();
        assert_eq!(
            default
                .webhook_route("default")
                .unwrap()
                .delivery_id_header(),
            "idempotency-key"
        );
    }
}
