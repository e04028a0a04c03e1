//! `ferroclaw.toml` plus `FERROCLAW_*` environment overrides, validated at start.
//!
//! Every process reads the same file and uses its own section. Without a file, ferroclaw
//! runs one agent, `main`, with the echo provider; every API conversation and the webhook
//! source `default` route to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::is_safe_name;

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of every service's state: databases and session directories.
    pub data_dir: PathBuf,
    pub gateway: GatewayConfig,
    pub runner: RunnerConfig,
    pub delivery: DeliveryConfig,
    pub scheduler: ServiceAddr,
    pub agents: Vec<AgentConfig>,
    pub webhooks: Vec<WebhookRoute>,
    pub conversations: Vec<ConversationRoute>,
    /// Who may use admin commands everywhere.
    pub roles: Roles,
    pub discord: DiscordConfig,
    pub metrics: MetricsConfig,
}

/// Where the services without an HTTP API serve Prometheus' `GET /metrics` (the gateway
/// serves it on its HTTP address). Each is named in the service's readiness line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub runner: SocketAddr,
    pub delivery: SocketAddr,
    pub scheduler: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        let on = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            runner: on(9461),
            delivery: on(9462),
            scheduler: on(9463),
        }
    }
}

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

/// People by their sender id (an API message's `sender`, later a Discord user id).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Roles {
    pub owners: Vec<String>,
    pub admins: Vec<String>,
}

/// Where a gRPC service listens and where its peers reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAddr {
    pub listen: SocketAddr,
    /// Defaults to `http://<listen>` (with an unspecified IP replaced by loopback).
    #[serde(default)]
    pub url: Option<String>,
}

impl ServiceAddr {
    fn on(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            url: None,
        }
    }

    pub fn url(&self) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub http_addr: SocketAddr,
    pub grpc: ServiceAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Bearer token for the REST API (prefer `FERROCLAW_API_TOKEN`). Without one the
    /// gateway refuses to listen on anything but loopback.
    pub api_token: Option<String>,
    /// Longest long-poll a client may ask for, in seconds.
    pub max_wait_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc: ServiceAddr::on(50054),
            max_body_bytes: 1024 * 1024,
            api_token: None,
            max_wait_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    pub listen: SocketAddr,
    pub url: Option<String>,
    /// "process": agents as local child processes (not a security boundary); "docker": each
    /// agent in its own locked-down container.
    pub backend: String,
    /// The `ferroclaw-agent` executable; defaults to the one beside the runner's.
    pub agent_binary: Option<PathBuf>,
    /// An agent with nothing to do for this long exits.
    pub idle_timeout_secs: u64,
    /// A session's mailbox (its SQLite connections, threads and files) unused this long is
    /// closed; it opens again when the session has work.
    pub mailbox_idle_secs: u64,
    /// Journal of the session databases: "wal" (the default for the process backend: readers
    /// never wait for the writer) or "delete" (for mounts that cannot share WAL's memory
    /// index, such as VM-backed Docker Desktop volumes).
    pub journal_mode: String,
    /// Restarts of a crashing agent before its batch is given up.
    pub max_restarts: u32,
    /// Agents running at once; sessions beyond wait their turn in a fair queue.
    pub max_running_agents: usize,
    /// An agent with a claimed batch and no heartbeat for this long is killed and retried.
    pub stuck_after_secs: u64,
    /// The longest a batch may stay claimed, heartbeat or not: past it the agent is stopped
    /// and the batch retried or failed as for a stale heartbeat.
    pub max_batch_secs: u64,
    /// Disk a session's `out/` (workspace, outbox, state) may take. Over it, the agent is
    /// stopped and the session takes no new messages until the limit is raised or files go.
    pub session_disk_mb: u64,
    /// Disk an agent's shared memory (`agents.shared_memory`) may take.
    pub agent_disk_mb: u64,
    /// docker backend: the agent image.
    pub agent_image: String,
    /// docker backend: limits of each agent container.
    pub agent_memory_mb: i64,
    pub agent_cpus: f64,
    pub agent_pids: i64,
    /// The credential proxy for model APIs: agents call it with a per-session token and it
    /// adds the real API key, so no key ever enters an agent.
    pub proxy_listen: SocketAddr,
    /// The proxy's base URL as agents reach it; defaults to `http://<proxy_listen>` (right
    /// for the process backend).
    pub proxy_url: Option<String>,
    /// docker backend: the internal network model agents join (created when absent).
    pub agent_network: String,
    /// Largest outbound row an agent may write (its content and destination as JSON): a
    /// bigger one is refused, and the agent told, without ever entering the outbound stream.
    pub max_row_bytes: usize,
    /// Most rows that may answer one inbound message (one batch of the agent's).
    pub max_rows_per_batch: usize,
    /// Most rows one session may send in any minute: a ceiling against a flood, well above
    /// what a busy conversation answers (rows per message are bounded by the batch limit).
    pub max_rows_per_minute: usize,
    /// Benchmark baseline only (`pipeline-bench --poll-baseline`): when not 0, the runner
    /// ignores agents' doorbells and reads active sessions' outbound rows every this many
    /// milliseconds, as NanoClaw's host does (1,000). 0, the default: doorbells.
    pub outbound_poll_ms: u64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            url: None,
            backend: "process".into(),
            agent_binary: None,
            idle_timeout_secs: 300,
            mailbox_idle_secs: 30,
            journal_mode: "wal".into(),
            max_restarts: 5,
            max_running_agents: 8,
            stuck_after_secs: 120,
            max_batch_secs: 15 * 60,
            session_disk_mb: 1024,
            agent_disk_mb: 1024,
            agent_image: "ferroclaw-agent:latest".into(),
            agent_memory_mb: 512,
            agent_cpus: 1.0,
            agent_pids: 256,
            proxy_listen: SocketAddr::from(([127, 0, 0, 1], 50055)),
            proxy_url: None,
            agent_network: "ferroclaw-agents".into(),
            max_row_bytes: 64 * 1024,
            max_rows_per_batch: 100,
            max_rows_per_minute: 6_000,
            outbound_poll_ms: 0,
        }
    }
}

/// Delivery: where it listens, and how long it keeps trying to deliver a reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub listen: SocketAddr,
    pub url: Option<String>,
    /// A reply that cannot be delivered (rate limits, a destination down) is given up on
    /// this long after its agent wrote it; a permanent refusal ends it at once.
    pub max_reply_age_secs: u64,
    /// Sends in flight at once across all destinations (waiting lanes hold none).
    pub max_concurrent_sends: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            listen: ServiceAddr::on(50052).listen,
            url: None,
            max_reply_age_secs: 15 * 60,
            max_concurrent_sends: 32,
        }
    }
}

impl DeliveryConfig {
    pub fn addr(&self) -> ServiceAddr {
        ServiceAddr {
            listen: self.listen,
            url: self.url.clone(),
        }
    }

    pub fn url(&self) -> String {
        self.addr().url()
    }
}

impl RunnerConfig {
    pub fn addr(&self) -> ServiceAddr {
        ServiceAddr {
            listen: self.listen,
            url: self.url.clone(),
        }
    }
}

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

/// API conversations whose id matches `pattern` → agent. `*` matches everything; `abc*`
/// matches ids starting with `abc`; anything else matches exactly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationRoute {
    pub pattern: String,
    pub agent: String,
}

impl ConversationRoute {
    pub fn matches(&self, conversation: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => conversation.starts_with(prefix),
            None => self.pattern == conversation,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ferroclaw-data"),
            gateway: GatewayConfig::default(),
            runner: RunnerConfig::default(),
            delivery: DeliveryConfig::default(),
            scheduler: ServiceAddr::on(50053),
            metrics: MetricsConfig::default(),
            agents: vec![AgentConfig::echo("main")],
            webhooks: vec![WebhookRoute {
                source: "default".into(),
                agent: "main".into(),
                reply_conversation: None,
                secret: None,
                secret_env: None,
                signature: default_signature(),
                tolerance_secs: default_tolerance(),
                delivery_id_header: None,
                max_body_bytes: None,
                callback_url: None,
                reply_discord_channel: None,
            }],
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

    /// Applies `FERROCLAW_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                var: var.into(),
                message: format!("{value:?}: {e}"),
            })
        }
        /// A listen address: `ip:port`, or `name:port` resolved now, so a container can
        /// bind to its address on one network only (compose's per-network aliases).
        fn listen_addr(var: &str, value: &str) -> Result<SocketAddr, ConfigError> {
            if let Ok(addr) = value.parse() {
                return Ok(addr);
            }
            use std::net::ToSocketAddrs;
            let error = |message: String| ConfigError::Env {
                var: var.into(),
                message: format!("{value:?}: {message}"),
            };
            let mut found = value.to_socket_addrs().map_err(|e| {
                error(format!(
                    "not an address, and the name does not resolve: {e}"
                ))
            })?;
            found
                .next()
                .ok_or_else(|| error("the name resolves to no address".into()))
        }
        if let Some(v) = get("FERROCLAW_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("FERROCLAW_HTTP_ADDR") {
            self.gateway.http_addr = parse("FERROCLAW_HTTP_ADDR", &v)?;
        }
        if let Some(v) = get("FERROCLAW_API_TOKEN").filter(|v| !v.is_empty()) {
            self.gateway.api_token = Some(v);
        }
        if let Some(v) = get("FERROCLAW_MAX_BODY_BYTES") {
            self.gateway.max_body_bytes = parse("FERROCLAW_MAX_BODY_BYTES", &v)?;
        }
        for (prefix, addr) in [
            ("FERROCLAW_GATEWAY_GRPC", &mut self.gateway.grpc),
            ("FERROCLAW_SCHEDULER", &mut self.scheduler),
        ] {
            let var = format!("{prefix}_ADDR");
            if let Some(v) = get(&var) {
                addr.listen = listen_addr(&var, &v)?;
            }
            if let Some(v) = get(&format!("{prefix}_URL")) {
                addr.url = Some(v);
            }
        }
        for (var, addr) in [
            ("FERROCLAW_RUNNER_METRICS_ADDR", &mut self.metrics.runner),
            (
                "FERROCLAW_DELIVERY_METRICS_ADDR",
                &mut self.metrics.delivery,
            ),
            (
                "FERROCLAW_SCHEDULER_METRICS_ADDR",
                &mut self.metrics.scheduler,
            ),
        ] {
            if let Some(v) = get(var) {
                *addr = listen_addr(var, &v)?;
            }
        }
        if let Some(v) = get("FERROCLAW_DELIVERY_ADDR") {
            self.delivery.listen = listen_addr("FERROCLAW_DELIVERY_ADDR", &v)?;
        }
        if let Some(v) = get("FERROCLAW_DELIVERY_URL") {
            self.delivery.url = Some(v);
        }
        if let Some(v) = get("FERROCLAW_MAX_REPLY_AGE_SECS") {
            self.delivery.max_reply_age_secs = parse("FERROCLAW_MAX_REPLY_AGE_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_RUNNER_ADDR") {
            self.runner.listen = listen_addr("FERROCLAW_RUNNER_ADDR", &v)?;
        }
        if let Some(v) = get("FERROCLAW_RUNNER_URL") {
            self.runner.url = Some(v);
        }
        if let Some(v) = get("FERROCLAW_AGENT_BINARY") {
            self.runner.agent_binary = Some(PathBuf::from(v));
        }
        if let Some(v) = get("FERROCLAW_MAX_RESTARTS") {
            self.runner.max_restarts = parse("FERROCLAW_MAX_RESTARTS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_MAX_RUNNING_AGENTS") {
            self.runner.max_running_agents = parse("FERROCLAW_MAX_RUNNING_AGENTS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_SESSION_DISK_MB") {
            self.runner.session_disk_mb = parse("FERROCLAW_SESSION_DISK_MB", &v)?;
        }
        if let Some(v) = get("FERROCLAW_MAX_BATCH_SECS") {
            self.runner.max_batch_secs = parse("FERROCLAW_MAX_BATCH_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_STUCK_AFTER_SECS") {
            self.runner.stuck_after_secs = parse("FERROCLAW_STUCK_AFTER_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_PROXY_ADDR") {
            self.runner.proxy_listen = listen_addr("FERROCLAW_PROXY_ADDR", &v)?;
        }
        if let Some(v) = get("FERROCLAW_PROXY_URL") {
            self.runner.proxy_url = Some(v);
        }
        if let Some(v) = get("FERROCLAW_AGENT_NETWORK") {
            self.runner.agent_network = v;
        }
        if let Some(v) = get("FERROCLAW_RUNNER_BACKEND") {
            self.runner.backend = v;
        }
        if let Some(v) = get("FERROCLAW_AGENT_IMAGE") {
            self.runner.agent_image = v;
        }
        if let Some(v) = get("FERROCLAW_JOURNAL_MODE") {
            self.runner.journal_mode = v;
        }
        if let Some(v) = get("FERROCLAW_MAILBOX_IDLE_SECS") {
            self.runner.mailbox_idle_secs = parse("FERROCLAW_MAILBOX_IDLE_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_OUTBOUND_POLL_MS") {
            self.runner.outbound_poll_ms = parse("FERROCLAW_OUTBOUND_POLL_MS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_IDLE_TIMEOUT_SECS") {
            self.runner.idle_timeout_secs = parse("FERROCLAW_IDLE_TIMEOUT_SECS", &v)?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| Err(ConfigError::Invalid { key, message });
        if self.agents.is_empty() {
            return invalid("agents".into(), "at least one agent is needed".into());
        }
        for (i, agent) in self.agents.iter().enumerate() {
            let key = format!("agents[{i}]");
            if !is_safe_name(&agent.name) {
                return invalid(
                    format!("{key}.name"),
                    format!("{:?} must be letters, digits, '-', '_' or '.'", agent.name),
                );
            }
            if self.agents[..i].iter().any(|a| a.name == agent.name) {
                return invalid(
                    format!("{key}.name"),
                    format!("{:?} appears twice", agent.name),
                );
            }
            if agent.timezone.parse::<chrono_tz::Tz>().is_err() {
                return invalid(
                    format!("{key}.timezone"),
                    format!("{:?} is not an IANA time zone", agent.timezone),
                );
            }
            if !PROVIDERS.contains(&agent.provider.as_str()) {
                return invalid(
                    format!("{key}.provider"),
                    format!(
                        "unknown provider {:?} (available: {})",
                        agent.provider,
                        PROVIDERS.join(", ")
                    ),
                );
            }
            if matches!(agent.provider.as_str(), "anthropic" | "openai")
                && agent.model.as_deref().unwrap_or("").is_empty()
            {
                return invalid(
                    format!("{key}.model"),
                    format!("the {} provider needs a model name", agent.provider),
                );
            }
            if let Some(url) = &agent.api_base_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return invalid(
                    format!("{key}.api_base_url"),
                    format!("{url:?} is not an http(s) URL"),
                );
            }
            if let Some(field) = &agent.max_tokens_field
                && !MAX_TOKENS_FIELDS.contains(&field.as_str())
            {
                return invalid(
                    format!("{key}.max_tokens_field"),
                    format!("{field:?}: expected {}", MAX_TOKENS_FIELDS.join(" or ")),
                );
            }
            if !matches!(agent.answerers.as_str(), "anyone" | "admins") {
                return invalid(
                    format!("{key}.answerers"),
                    format!("{:?}: expected anyone or admins", agent.answerers),
                );
            }
            if let Some(bad) = agent
                .send_to
                .iter()
                .find(|c| c.is_empty() || c.contains(','))
            {
                return invalid(
                    format!("{key}.send_to"),
                    format!("{bad:?} is not a conversation id"),
                );
            }
            if agent.max_tokens == 0 || u64::from(agent.max_tokens) >= agent.context_window {
                return invalid(
                    format!("{key}.max_tokens"),
                    format!(
                        "{} must be above 0 and below context_window ({})",
                        agent.max_tokens, agent.context_window
                    ),
                );
            }
        }
        for (i, route) in self.webhooks.iter().enumerate() {
            if !is_safe_name(&route.source) {
                return invalid(
                    format!("webhooks[{i}].source"),
                    format!(
                        "{:?} must be letters, digits, '-', '_' or '.'",
                        route.source
                    ),
                );
            }
            self.check_agent(&format!("webhooks[{i}].agent"), &route.agent)?;
            if !matches!(route.signature.as_str(), "ferroclaw" | "github") {
                return invalid(
                    format!("webhooks[{i}].signature"),
                    format!("{:?}: expected ferroclaw or github", route.signature),
                );
            }
            if let Some(var) = &route.secret_env
                && route.secret.is_none()
                && route.secret().is_none()
            {
                return invalid(
                    format!("webhooks[{i}].secret_env"),
                    format!("environment variable {var} is not set"),
                );
            }
            if let Some(channel) = &route.reply_discord_channel
                && (channel.parse::<u64>().is_err() || route.callback_url.is_some())
            {
                return invalid(
                    format!("webhooks[{i}].reply_discord_channel"),
                    format!("{channel:?}: a channel id, and not together with callback_url"),
                );
            }
            if let Some(url) = &route.callback_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return invalid(
                    format!("webhooks[{i}].callback_url"),
                    format!("{url:?} is not an http(s) URL"),
                );
            }
        }
        for (i, route) in self.conversations.iter().enumerate() {
            self.check_agent(&format!("conversations[{i}].agent"), &route.agent)?;
        }
        for (i, route) in self.discord.routes.iter().enumerate() {
            let key = format!("discord.routes[{i}]");
            self.check_agent(&format!("{key}.agent"), &route.agent)?;
            if route.channel != "dm" && route.channel.parse::<u64>().is_err() {
                return invalid(
                    format!("{key}.channel"),
                    format!("{:?}: expected a channel id or \"dm\"", route.channel),
                );
            }
            if let Some(senders) = &route.senders
                && !matches!(senders.as_str(), "everyone" | "allowlist" | "known")
            {
                return invalid(
                    format!("{key}.senders"),
                    format!("{senders:?}: expected everyone, allowlist or known"),
                );
            }
            if !matches!(route.sessions.as_str(), "channel" | "thread") {
                return invalid(
                    format!("{key}.sessions"),
                    format!("{:?}: expected channel or thread", route.sessions),
                );
            }
            if !matches!(route.engage.as_str(), "always" | "mention") {
                return invalid(
                    format!("{key}.engage"),
                    format!("{:?}: expected always or mention", route.engage),
                );
            }
            if let Some(bad) = route
                .allow_mentions
                .iter()
                .find(|m| !matches!(m.as_str(), "roles" | "everyone"))
            {
                return invalid(
                    format!("{key}.allow_mentions"),
                    format!("{bad:?}: expected \"roles\" or \"everyone\""),
                );
            }
        }
        if !matches!(self.runner.backend.as_str(), "process" | "docker") {
            return invalid(
                "runner.backend".into(),
                format!(
                    "unknown backend {:?} (available: process, docker)",
                    self.runner.backend
                ),
            );
        }
        if self.delivery.max_concurrent_sends == 0 {
            return invalid(
                "delivery.max_concurrent_sends".into(),
                "must be at least 1".into(),
            );
        }
        if self.runner.max_running_agents == 0 {
            return invalid(
                "runner.max_running_agents".into(),
                "must be at least 1".into(),
            );
        }
        for (key, value) in [
            ("runner.max_row_bytes", self.runner.max_row_bytes),
            ("runner.max_rows_per_batch", self.runner.max_rows_per_batch),
            (
                "runner.max_rows_per_minute",
                self.runner.max_rows_per_minute,
            ),
            ("runner.max_batch_secs", self.runner.max_batch_secs as usize),
            (
                "runner.session_disk_mb",
                self.runner.session_disk_mb as usize,
            ),
            ("runner.agent_disk_mb", self.runner.agent_disk_mb as usize),
        ] {
            if value == 0 {
                return invalid(key.into(), "must be at least 1".into());
            }
        }
        if self.runner.stuck_after_secs < 1 {
            return invalid(
                "runner.stuck_after_secs".into(),
                "must be at least 1".into(),
            );
        }
        if self.runner.agent_memory_mb < 16
            || self.runner.agent_pids < 8
            || self.runner.agent_cpus <= 0.0
        {
            return invalid(
                "runner.agent_memory_mb / agent_cpus / agent_pids".into(),
                "limits too small (at least 16 MiB, 8 pids and some CPU)".into(),
            );
        }
        if let Err(e) = self.runner.journal_mode.parse::<JournalModeName>() {
            return invalid("runner.journal_mode".into(), e);
        }
        if self.gateway.api_token.is_none() && !self.gateway.http_addr.ip().is_loopback() {
            return invalid(
                "gateway.http_addr".into(),
                format!(
                    "{} is not a loopback address: set FERROCLAW_API_TOKEN before exposing the API",
                    self.gateway.http_addr
                ),
            );
        }
        // The public gRPC ingress takes the same token: open only on loopback without one.
        if self.gateway.api_token.is_none() && !self.gateway.grpc.listen.ip().is_loopback() {
            return invalid(
                "gateway.grpc".into(),
                format!(
                    "{} is not a loopback address: set FERROCLAW_API_TOKEN before exposing the gRPC API",
                    self.gateway.grpc.listen
                ),
            );
        }
        Ok(())
    }

    fn check_agent(&self, key: &str, agent: &str) -> Result<(), ConfigError> {
        if self.agent(agent).is_some() {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            key: key.into(),
            message: format!("no agent named {agent:?} in [[agents]]"),
        })
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

    /// Whether `sender` may use admin commands with `agent`. With no owner or admin named
    /// anywhere (a single-user setup), everyone may.
    pub fn is_admin(&self, agent: &str, sender: &str) -> bool {
        let agent_admins = self
            .agents
            .iter()
            .find(|a| a.name == agent)
            .map(|a| &a.admins);
        let nobody_named = self.roles.owners.is_empty()
            && self.roles.admins.is_empty()
            && self.agents.iter().all(|a| a.admins.is_empty());
        if nobody_named {
            return true;
        }
        let named = |list: &Vec<String>| list.iter().any(|s| s == sender);
        !sender.is_empty()
            && (named(&self.roles.owners)
                || named(&self.roles.admins)
                || agent_admins.is_some_and(named))
    }
}

/// Journal mode names accepted in `runner.journal_mode` (the mailbox crate owns the type).
struct JournalModeName;

impl std::str::FromStr for JournalModeName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "delete" | "wal" => Ok(Self),
            other => Err(format!(
                "unknown journal mode {other:?} (expected delete or wal)"
            )),
        }
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
    fn unknown_keys_and_bad_values_are_named() {
        let err = Config::parse("data_dirr = \"x\"").unwrap_err();
        assert!(err.contains("data_dirr"), "{err}");
        let c = Config::parse("[[agents]]\nname = \"a\"\ntimezone = \"Mars/Base\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("agents[0].timezone"), "{err}");
        let c = Config::parse(
            "[[agents]]\nname = \"a\"\n[[webhooks]]\nsource = \"gh\"\nagent = \"b\"\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("webhooks[0].agent"), "{err}");
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
    fn public_address_needs_a_token() {
        let mut c = Config::default();
        c.gateway.http_addr = "0.0.0.0:8080".parse().unwrap();
        assert!(c.validate().is_err());
        c.gateway.api_token = Some("t".into());
        c.validate().unwrap();
    }

    #[test]
    fn conversation_patterns() {
        let r = ConversationRoute {
            pattern: "ops-*".into(),
            agent: "a".into(),
        };
        assert!(r.matches("ops-1"));
        assert!(!r.matches("dev-1"));
    }
}
