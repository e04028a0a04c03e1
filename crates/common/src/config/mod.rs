//! `ferroclaw.toml` plus `FERROCLAW_*` environment overrides, validated at start.
//!
//! Every process reads the same file and uses its own section. Without a file, ferroclaw
//! runs one agent, `main`, with the echo provider; every API conversation and the webhook
//! source `default` route to it.
//!
//! This module holds the root: loading, the order in which sections take their environment
//! overrides and are validated, and lookups across sections. Each section lives in its own
//! module with its defaults, overrides and validation beside it.

mod agents;
mod conversations;
mod database;
mod delivery;
mod discord;
mod env;
mod gateway;
mod roles;
mod runner;
mod scheduler;
mod service_addr;
mod telemetry;
mod webhooks;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use agents::{AgentConfig, MAX_TOKENS_FIELDS, PROVIDERS, default_max_tokens_field};
pub use conversations::ConversationRoute;
pub use delivery::DeliveryConfig;
pub use discord::{DiscordConfig, DiscordRoute};
pub use gateway::GatewayConfig;
pub use roles::Roles;
pub use runner::RunnerConfig;
pub use scheduler::SchedulerConfig;
pub use service_addr::ServiceAddr;
pub use telemetry::MetricsConfig;
pub use webhooks::WebhookRoute;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

/// A refused value of config key `key` (what every section's validation returns).
fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of every service's state: databases and session directories.
    pub data_dir: PathBuf,
    pub gateway: GatewayConfig,
    pub runner: RunnerConfig,
    pub delivery: DeliveryConfig,
    pub scheduler: SchedulerConfig,
    pub agents: Vec<AgentConfig>,
    pub webhooks: Vec<WebhookRoute>,
    pub conversations: Vec<ConversationRoute>,
    /// Who may use admin commands everywhere.
    pub roles: Roles,
    pub discord: DiscordConfig,
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ferroclaw-data"),
            gateway: GatewayConfig::default(),
            runner: RunnerConfig::default(),
            delivery: DeliveryConfig::default(),
            scheduler: SchedulerConfig::default(),
            metrics: MetricsConfig::default(),
            agents: vec![AgentConfig::echo("main")],
            webhooks: vec![WebhookRoute::unsigned("default", "main")],
            conversations: vec![ConversationRoute {
                pattern: "*".into(),
                agent: "main".into(),
            }],
            roles: Roles::default(),
            discord: DiscordConfig::default(),
        }
    }
}

impl Config {
    /// Loads `path`, or `$FERROCLAW_CONFIG`, or `./ferroclaw.toml` when it exists, or the
    /// defaults; then applies `FERROCLAW_*` overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env_path = std::env::var_os("FERROCLAW_CONFIG").map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path).or_else(|| {
            let local = PathBuf::from("ferroclaw.toml");
            local.exists().then_some(local)
        });
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse { path, message })?
            }
            None => Self::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `FERROCLAW_*` overrides read through `get`, section by section (the first
    /// bad variable is the one reported).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("FERROCLAW_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        self.gateway.apply_env(&get)?;
        self.scheduler.apply_env(&get)?;
        self.metrics.apply_env(&get)?;
        self.delivery.apply_env(&get)?;
        self.runner.apply_env(&get)?;
        Ok(())
    }

    /// Checks every section; routes must name an agent of `[[agents]]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        agents::validate(&self.agents)?;
        webhooks::validate(&self.webhooks, &self.agents)?;
        conversations::validate(&self.conversations, &self.agents)?;
        self.discord.validate(&self.agents)?;
        self.runner.validate()?;
        self.delivery.validate()?;
        self.gateway.validate()?;
        self.scheduler.validate()?;
        database::validate_distinct(&[
            ("runner", self.runner.database_url.as_deref()),
            ("delivery", self.delivery.database_url.as_deref()),
            ("scheduler", self.scheduler.database_url.as_deref()),
        ])
    }

    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.name == name)
    }

    pub fn webhook_route(&self, source: &str) -> Option<&WebhookRoute> {
        self.webhooks.iter().find(|r| r.source == source)
    }

    pub fn conversation_route(&self, conversation: &str) -> Option<&ConversationRoute> {
        self.conversations.iter().find(|r| r.matches(conversation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_route_everything_to_main() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.webhook_route("default").unwrap().agent, "main");
        assert!(c.webhook_route("other").is_none());
        assert_eq!(c.conversation_route("anything").unwrap().agent, "main");
        assert_eq!(c.runner.addr().url(), "http://127.0.0.1:50051");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("data_dirr = \"x\"").unwrap_err();
        assert!(err.contains("data_dirr"), "{err}");
    }

    #[test]
    fn env_overrides_name_the_variable() {
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "FERROCLAW_RUNNER_ADDR").then(|| "nope".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("FERROCLAW_RUNNER_ADDR"), "{err}");
        c.apply_env(|k| (k == "FERROCLAW_DATA_DIR").then(|| "/tmp/x".to_string()))
            .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        // A name resolves (compose binds the runner by a per-network alias).
        let mut named = Config::default();
        named
            .apply_env(|k| (k == "FERROCLAW_RUNNER_ADDR").then(|| "localhost:50051".to_string()))
            .unwrap();
        assert!(named.runner.listen.ip().is_loopback());
        assert_eq!(named.runner.listen.port(), 50051);
    }

    #[test]
    fn every_section_takes_its_overrides() {
        let vars = [
            ("FERROCLAW_HTTP_ADDR", "127.0.0.1:1"),
            ("FERROCLAW_SCHEDULER_URL", "http://scheduler:1"),
            ("FERROCLAW_SCHEDULER_METRICS_ADDR", "127.0.0.1:2"),
            ("FERROCLAW_MAX_REPLY_AGE_SECS", "3"),
            ("FERROCLAW_IDLE_TIMEOUT_SECS", "4"),
        ];
        let mut c = Config::default();
        c.apply_env(|k| {
            vars.iter()
                .find(|(var, _)| *var == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        assert_eq!(c.gateway.http_addr.port(), 1);
        assert_eq!(c.scheduler.url(), "http://scheduler:1");
        assert_eq!(c.metrics.scheduler.port(), 2);
        assert_eq!(c.delivery.max_reply_age_secs, 3);
        assert_eq!(c.runner.idle_timeout_secs, 4);
        c.validate().unwrap();
    }
}
