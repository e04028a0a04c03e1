//! `[[agents]]`: each agent's provider, model API and limits, and who may administer it.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::ids::is_safe_name;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// echo, anthropic or openai (any OpenAI-compatible server: Ollama, vLLM, OpenRouter).
    #[serde(default = "default_provider")]
    pub provider: String,
    /// IANA time zone the agent sees times in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The model name the provider asks for (required for anthropic and openai).
    #[serde(default)]
    pub model: Option<String>,
    /// Further models the agent may ask for through the proxy besides `model` (Claude Code
    /// uses a small model for side tasks, for example). The proxy refuses any other.
    #[serde(default)]
    pub models: Vec<String>,
    /// Hosts `web_fetch` may reach although they resolve to a loopback, private or
    /// link-local address (by default it reaches the public internet only).
    #[serde(default)]
    pub web_fetch_allow: Vec<String>,
    /// A writable memory folder shared by all of the agent's sessions (`<data>/memory/<agent>`,
    /// at `/memory` in containers). Off by default: a public conversation could plant notes
    /// there that private ones then read. The agent's own folder (AGENT.md) stays read-only.
    #[serde(default)]
    pub shared_memory: bool,
    /// The model API the runner's proxy forwards to; defaults to the provider's public API.
    #[serde(default)]
    pub api_base_url: Option<String>,
    /// The environment variable (of the runner) that holds the API key; defaults to
    /// ANTHROPIC_API_KEY or OPENAI_API_KEY. Keyless servers (a local Ollama) need none.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Most tokens one model response may have.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// openai: the request field that carries `max_tokens`, "max_tokens" or
    /// "max_completion_tokens". Unset: "max_completion_tokens" when the upstream is OpenAI's
    /// own API (api.openai.com, where `max_tokens` is deprecated and refused by reasoning
    /// models), "max_tokens" for other servers (Ollama, vLLM, LiteLLM, …).
    #[serde(default)]
    pub max_tokens_field: Option<String>,
    /// The model's context window in tokens: the history is compacted before it fills.
    #[serde(default = "default_context_window")]
    pub context_window: u64,
    /// Tokens (input plus output) all sessions of this agent may use; unset: no limit.
    #[serde(default)]
    pub token_budget: Option<u64>,
    /// Who may answer its questions: "anyone" (in the conversation) or "admins".
    #[serde(default = "default_answerers")]
    pub answerers: String,
    /// Admins of this agent only (besides the global owners and admins).
    #[serde(default)]
    pub admins: Vec<String>,
    /// API conversations its model may send messages to besides the one it answers.
    #[serde(default)]
    pub send_to: Vec<String>,
    /// claude-code: the Claude Code executable (default `claude` on the agent's PATH).
    #[serde(default)]
    pub command: Option<String>,
    /// Dollars per million input and output tokens, for `/cost`.
    #[serde(default)]
    pub price_per_mtok: Option<(f64, f64)>,
}

impl AgentConfig {
    /// An echo agent with every other setting at its default.
    pub fn echo(name: &str) -> Self {
        Self {
            name: name.into(),
            provider: default_provider(),
            timezone: default_timezone(),
            model: None,
            models: Vec::new(),
            web_fetch_allow: Vec::new(),
            shared_memory: false,
            api_base_url: None,
            api_key_env: None,
            max_tokens: default_max_tokens(),
            max_tokens_field: None,
            context_window: default_context_window(),
            token_budget: None,
            price_per_mtok: None,
            command: None,
            send_to: Vec::new(),
            admins: Vec::new(),
            answerers: default_answerers(),
        }
    }

    /// Whether this agent talks to a model API (through the runner's proxy).
    pub fn uses_model_api(&self) -> bool {
        matches!(
            self.provider.as_str(),
            "anthropic" | "openai" | "claude-code"
        )
    }

    /// The agent's shared memory folder under `data_dir`, when it has one.
    pub fn shared_memory_dir(&self, data_dir: &std::path::Path) -> Option<PathBuf> {
        self.shared_memory
            .then(|| data_dir.join("memory").join(&self.name))
    }

    /// Whether the proxy may forward a request that names `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.model.as_deref() == Some(model) || self.models.iter().any(|m| m == model)
    }

    /// The wire format of its model API: Claude Code speaks Anthropic's.
    pub fn api_flavour(&self) -> &str {
        match self.provider.as_str() {
            "openai" => "openai",
            _ => "anthropic",
        }
    }

    /// The upstream API the proxy forwards this agent's calls to.
    pub fn upstream_base_url(&self) -> &str {
        match (&self.api_base_url, self.api_flavour()) {
            (Some(url), _) => url.trim_end_matches('/'),
            (None, "anthropic") => "https://api.anthropic.com",
            (None, _) => "https://api.openai.com",
        }
    }

    /// The field its OpenAI-compatible requests limit the answer with (see
    /// `max_tokens_field`): the configured one, else the one its upstream wants.
    pub fn max_tokens_field(&self) -> &str {
        match &self.max_tokens_field {
            Some(field) => field,
            None => default_max_tokens_field(self.upstream_base_url()),
        }
    }

    /// The API key from the runner's environment, if this agent has one.
    pub fn api_key(&self) -> Option<String> {
        let var = match (&self.api_key_env, self.api_flavour()) {
            (Some(var), _) => var.as_str(),
            (None, "anthropic") => "ANTHROPIC_API_KEY",
            (None, _) => "OPENAI_API_KEY",
        };
        std::env::var(var).ok().filter(|k| !k.is_empty())
    }
}

/// Providers the agent binary knows.
pub const PROVIDERS: &[&str] = &["echo", "anthropic", "openai", "claude-code"];

/// Values of `agents.max_tokens_field`.
pub const MAX_TOKENS_FIELDS: &[&str] = &["max_tokens", "max_completion_tokens"];

/// The max-tokens field an OpenAI-compatible server at `base_url` wants: OpenAI's own API
/// (host api.openai.com) wants "max_completion_tokens", every other server "max_tokens".
pub fn default_max_tokens_field(base_url: &str) -> &'static str {
    let host = base_url.parse::<http::Uri>().ok().and_then(|uri| {
        uri.host()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    });
    match host.as_deref() {
        Some("api.openai.com") => "max_completion_tokens",
        _ => "max_tokens",
    }
}

fn default_provider() -> String {
    "echo".into()
}
fn default_answerers() -> String {
    "anyone".into()
}
fn default_max_tokens() -> u32 {
    4096
}
fn default_context_window() -> u64 {
    200_000
}
fn default_timezone() -> String {
    "UTC".into()
}

/// Checks `[[agents]]`: at least one, unique safe names, and each agent's own settings.
pub(super) fn validate(agents: &[AgentConfig]) -> Result<(), ConfigError> {
    if agents.is_empty() {
        return Err(invalid("agents", "at least one agent is needed"));
    }
    for (i, agent) in agents.iter().enumerate() {
        let key = format!("agents[{i}]");
        if !is_safe_name(&agent.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} must be letters, digits, '-', '_' or '.'", agent.name),
            ));
        }
        if agents[..i].iter().any(|a| a.name == agent.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} appears twice", agent.name),
            ));
        }
        agent.validate(&key)?;
    }
    Ok(())
}

/// A route's `agent` (at config key `key`) must name one of `agents`.
pub(super) fn check_agent(
    agents: &[AgentConfig],
    key: &str,
    agent: &str,
) -> Result<(), ConfigError> {
    if agents.iter().any(|a| a.name == agent) {
        return Ok(());
    }
    Err(invalid(
        key,
        format!("no agent named {agent:?} in [[agents]]"),
    ))
}

impl AgentConfig {
    /// Its own settings; `key` is where it sits (`agents[i]`).
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(invalid(
                format!("{key}.timezone"),
                format!("{:?} is not an IANA time zone", self.timezone),
            ));
        }
        if !PROVIDERS.contains(&self.provider.as_str()) {
            return Err(invalid(
                format!("{key}.provider"),
                format!(
                    "unknown provider {:?} (available: {})",
                    self.provider,
                    PROVIDERS.join(", ")
                ),
            ));
        }
        if matches!(self.provider.as_str(), "anthropic" | "openai")
            && self.model.as_deref().unwrap_or("").is_empty()
        {
            return Err(invalid(
                format!("{key}.model"),
                format!("the {} provider needs a model name", self.provider),
            ));
        }
        if let Some(url) = &self.api_base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                format!("{key}.api_base_url"),
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        if let Some(field) = &self.max_tokens_field
            && !MAX_TOKENS_FIELDS.contains(&field.as_str())
        {
            return Err(invalid(
                format!("{key}.max_tokens_field"),
                format!("{field:?}: expected {}", MAX_TOKENS_FIELDS.join(" or ")),
            ));
        }
        if !matches!(self.answerers.as_str(), "anyone" | "admins") {
            return Err(invalid(
                format!("{key}.answerers"),
                format!("{:?}: expected anyone or admins", self.answerers),
            ));
        }
        if let Some(bad) = self
            .send_to
            .iter()
            .find(|c| c.is_empty() || c.contains(','))
        {
            return Err(invalid(
                format!("{key}.send_to"),
                format!("{bad:?} is not a conversation id"),
            ));
        }
        if self.max_tokens == 0 || u64::from(self.max_tokens) >= self.context_window {
            return Err(invalid(
                format!("{key}.max_tokens"),
                format!(
                    "{} must be above 0 and below context_window ({})",
                    self.max_tokens, self.context_window
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn bad_values_are_named() {
        let c = Config::parse("[[agents]]\nname = \"a\"\ntimezone = \"Mars/Base\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("agents[0].timezone"), "{err}");
        let twice = Config::parse("[[agents]]\nname = \"a\"\n[[agents]]\nname = \"a\"\n").unwrap();
        let err = twice.validate().unwrap_err().to_string();
        assert!(
            err.contains("agents[1].name") && err.contains("appears twice"),
            "{err}"
        );
    }

    #[test]
    fn model_agents_are_checked() {
        let c = Config::parse(
            r#"
[[agents]]
name = "main"
provider = "anthropic"
model = "claude-sonnet-4-5"
token_budget = 5000000
price_per_mtok = [3.0, 15.0]

[[agents]]
name = "local"
provider = "openai"
model = "llama3.1"
api_base_url = "http://ollama:11434/"
api_key_env = "OLLAMA_KEY"

[[agents]]
name = "coder"
provider = "claude-code"
command = "/usr/local/bin/claude"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.agents[0].price_per_mtok, Some((3.0, 15.0)));
        assert_eq!(c.agents[1].upstream_base_url(), "http://ollama:11434");
        assert_eq!(c.agents[2].upstream_base_url(), "https://api.anthropic.com");
        assert!(c.agents.iter().all(AgentConfig::uses_model_api));
        assert_eq!(c.agents[2].api_flavour(), "anthropic");

        let no_model =
            Config::parse("[[agents]]\nname = \"main\"\nprovider = \"openai\"\n").unwrap();
        let err = no_model.validate().unwrap_err().to_string();
        assert!(err.contains("agents[0].model"), "{err}");
        let unknown = Config::parse("[[agents]]\nname = \"main\"\nprovider = \"gpt\"\n").unwrap();
        let err = unknown.validate().unwrap_err().to_string();
        assert!(err.contains("unknown provider \"gpt\""), "{err}");
        let big = Config::parse(
            "[[agents]]\nname = \"main\"\nmax_tokens = 9000\ncontext_window = 8000\n",
        )
        .unwrap();
        let err = big.validate().unwrap_err().to_string();
        assert!(err.contains("agents[0].max_tokens"), "{err}");
    }

    #[test]
    fn max_tokens_field_follows_the_upstream_host_unless_set() {
        let c = Config::parse(
            r#"
[[agents]]
name = "main"
provider = "openai"
model = "gpt-4o"

[[agents]]
name = "explicit"
provider = "openai"
model = "gpt-4o"
api_base_url = "https://API.OpenAI.com:443/"

[[agents]]
name = "vllm"
provider = "openai"
model = "llama"
api_base_url = "http://vllm:8000"

[[agents]]
name = "proxy"
provider = "openai"
model = "o3"
api_base_url = "http://litellm:4000"
max_tokens_field = "max_completion_tokens"

[[agents]]
name = "old"
provider = "openai"
model = "gpt-4o"
max_tokens_field = "max_tokens"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let fields: Vec<&str> = c.agents.iter().map(|a| a.max_tokens_field()).collect();
        assert_eq!(
            fields,
            [
                "max_completion_tokens",
                "max_completion_tokens",
                "max_tokens",
                "max_completion_tokens",
                "max_tokens"
            ]
        );
        assert_eq!(
            default_max_tokens_field("https://api.openai.com.evil.example"),
            "max_tokens"
        );

        let bad = Config::parse(
            "[[agents]]\nname = \"main\"\nprovider = \"openai\"\nmodel = \"m\"\nmax_tokens_field = \"max_output_tokens\"\n",
        )
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("agents[0].max_tokens_field")
                && err.contains(
                    "\"max_output_tokens\": expected max_tokens or max_completion_tokens"
                ),
            "{err}"
        );
    }
}
