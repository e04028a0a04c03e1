//! `[runner]`: the agents' host: backend, limits, the credential proxy and the mailboxes.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::env::{Get, listen_addr, parse};
use super::service_addr::ServiceAddr;
use super::{ConfigError, invalid};

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
    /// The OTLP/gRPC endpoint agents export their spans to. Process backend: defaults to the
    /// runner's own `OTEL_EXPORTER_OTLP_ENDPOINT`. Docker backend: agents sit on an internal
    /// network, so they export only when this names an address reachable there (for example
    /// a collector attached to the agents network); nothing else is allowed.
    pub agent_otlp_endpoint: Option<String>,
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
    /// The session registry and model usage: `postgres://…` or `sqlite:…`; unset,
    /// `<data_dir>/runner.db`.
    pub database_url: Option<String>,
    /// Several runners serving different sessions (PostgreSQL only): this runner's id, the
    /// same across its restarts. Unset: one runner serves every session, and others on the
    /// same store stand by.
    pub id: Option<String>,
    /// Several runners: the URL the other runners call this one at; defaults to
    /// `http://<listen>` when that names an address others can reach.
    pub advertise_url: Option<String>,
    /// Several runners: every runner mounts the sessions' storage at the same path (a
    /// network volume), so a live runner takes over the sessions of a missing one. Without
    /// it, a missing runner's sessions wait for it to return.
    pub shared_storage: bool,
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
            agent_otlp_endpoint: None,
            max_row_bytes: 64 * 1024,
            max_rows_per_batch: 100,
            max_rows_per_minute: 6_000,
            outbound_poll_ms: 0,
            database_url: None,
            id: None,
            advertise_url: None,
            shared_storage: false,
        }
    }
}

impl RunnerConfig {
    pub fn addr(&self) -> ServiceAddr {
        ServiceAddr {
            listen: self.listen,
            url: self.url.clone(),
        }
    }

    pub(super) fn apply_env(&mut self, get: Get<'_>) -> Result<(), ConfigError> {
        let mut addr = self.addr();
        addr.apply_env("FERROCLAW_RUNNER", get)?;
        (self.listen, self.url) = (addr.listen, addr.url);
        if let Some(v) = get("FERROCLAW_AGENT_BINARY") {
            self.agent_binary = Some(PathBuf::from(v));
        }
        if let Some(v) = get("FERROCLAW_MAX_RESTARTS") {
            self.max_restarts = parse("FERROCLAW_MAX_RESTARTS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_MAX_RUNNING_AGENTS") {
            self.max_running_agents = parse("FERROCLAW_MAX_RUNNING_AGENTS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_SESSION_DISK_MB") {
            self.session_disk_mb = parse("FERROCLAW_SESSION_DISK_MB", &v)?;
        }
        if let Some(v) = get("FERROCLAW_MAX_BATCH_SECS") {
            self.max_batch_secs = parse("FERROCLAW_MAX_BATCH_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_STUCK_AFTER_SECS") {
            self.stuck_after_secs = parse("FERROCLAW_STUCK_AFTER_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_PROXY_ADDR") {
            self.proxy_listen = listen_addr("FERROCLAW_PROXY_ADDR", &v)?;
        }
        if let Some(v) = get("FERROCLAW_PROXY_URL") {
            self.proxy_url = Some(v);
        }
        if let Some(v) = get("FERROCLAW_AGENT_NETWORK") {
            self.agent_network = v;
        }
        if let Some(v) = get("FERROCLAW_RUNNER_BACKEND") {
            self.backend = v;
        }
        if let Some(v) = get("FERROCLAW_AGENT_IMAGE") {
            self.agent_image = v;
        }
        if let Some(v) = get("FERROCLAW_JOURNAL_MODE") {
            self.journal_mode = v;
        }
        if let Some(v) = get("FERROCLAW_MAILBOX_IDLE_SECS") {
            self.mailbox_idle_secs = parse("FERROCLAW_MAILBOX_IDLE_SECS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_OUTBOUND_POLL_MS") {
            self.outbound_poll_ms = parse("FERROCLAW_OUTBOUND_POLL_MS", &v)?;
        }
        if let Some(v) = get("FERROCLAW_IDLE_TIMEOUT_SECS") {
            self.idle_timeout_secs = parse("FERROCLAW_IDLE_TIMEOUT_SECS", &v)?;
        }
        // Empty counts as unset, so compose can pass the variable through unconditionally.
        if let Some(v) = get("FERROCLAW_AGENT_OTLP_ENDPOINT").filter(|v| !v.is_empty()) {
            self.agent_otlp_endpoint = Some(v);
        }
        if let Some(v) = get("FERROCLAW_RUNNER_ID").filter(|v| !v.is_empty()) {
            self.id = Some(v);
        }
        if let Some(v) = get("FERROCLAW_RUNNER_ADVERTISE_URL").filter(|v| !v.is_empty()) {
            self.advertise_url = Some(v);
        }
        if let Some(v) = get("FERROCLAW_RUNNER_SHARED_STORAGE") {
            self.shared_storage = parse("FERROCLAW_RUNNER_SHARED_STORAGE", &v)?;
        }
        if let Some(url) = super::database::from_env(get, "runner") {
            self.database_url = Some(url);
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.backend.as_str(), "process" | "docker") {
            return Err(invalid(
                "runner.backend",
                format!(
                    "unknown backend {:?} (available: process, docker)",
                    self.backend
                ),
            ));
        }
        if self.max_running_agents == 0 {
            return Err(invalid("runner.max_running_agents", "must be at least 1"));
        }
        for (key, value) in [
            ("runner.max_row_bytes", self.max_row_bytes),
            ("runner.max_rows_per_batch", self.max_rows_per_batch),
            ("runner.max_rows_per_minute", self.max_rows_per_minute),
            ("runner.max_batch_secs", self.max_batch_secs as usize),
            ("runner.session_disk_mb", self.session_disk_mb as usize),
            ("runner.agent_disk_mb", self.agent_disk_mb as usize),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.stuck_after_secs < 1 {
            return Err(invalid("runner.stuck_after_secs", "must be at least 1"));
        }
        if self.agent_memory_mb < 16 || self.agent_pids < 8 || self.agent_cpus <= 0.0 {
            return Err(invalid(
                "runner.agent_memory_mb / agent_cpus / agent_pids",
                "limits too small (at least 16 MiB, 8 pids and some CPU)",
            ));
        }
        if let Err(e) = self.journal_mode.parse::<JournalModeName>() {
            return Err(invalid("runner.journal_mode", e));
        }
        if let Some(url) = &self.agent_otlp_endpoint
            && !is_http_url(url)
        {
            return Err(invalid(
                "runner.agent_otlp_endpoint",
                format!("{url:?} is not an http(s) URL (such as http://collector:4317)"),
            ));
        }
        if let Some(id) = &self.id {
            let fine = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !fine {
                return Err(invalid(
                    "runner.id",
                    format!("{id:?}: 1 to 64 letters, digits, '-', '_' or '.'"),
                ));
            }
            let on_postgres = self
                .database_url
                .as_deref()
                .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
            if !on_postgres {
                return Err(invalid(
                    "runner.id",
                    "several runners share their sessions' registry in PostgreSQL: set \
                     runner.database_url (or DATABASE_URL) to a postgres:// URL",
                ));
            }
        }
        if let Some(url) = &self.advertise_url
            && !is_http_url(url)
        {
            return Err(invalid(
                "runner.advertise_url",
                format!("{url:?} is not an http(s) URL (such as http://runner-2:50051)"),
            ));
        }
        super::database::validate("runner", self.database_url.as_deref())
    }

    /// Several runners: the URL this one is called at by the others, or why there is none.
    pub fn own_url(&self, bound: SocketAddr) -> Result<String, ConfigError> {
        if let Some(url) = &self.advertise_url {
            return Ok(url.clone());
        }
        if bound.ip().is_unspecified() {
            return Err(invalid(
                "runner.advertise_url",
                format!(
                    "the runner listens on {bound}, which is no address for the other runners \
                     to call: set runner.advertise_url (FERROCLAW_RUNNER_ADVERTISE_URL)"
                ),
            ));
        }
        Ok(format!("http://{bound}"))
    }
}

/// An absolute `http://` or `https://` URL with a host.
fn is_http_url(url: &str) -> bool {
    url.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.host().is_some_and(|h| !h.is_empty())
    })
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
    use super::super::Config;

    #[test]
    fn agent_otlp_endpoint_is_an_http_url() {
        assert_eq!(Config::default().runner.agent_otlp_endpoint, None);
        let c =
            Config::parse("[runner]\nagent_otlp_endpoint = \"http://collector:4317\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.runner.agent_otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );

        let mut c = Config::default();
        let env = |value: &'static str| {
            move |k: &str| (k == "FERROCLAW_AGENT_OTLP_ENDPOINT").then(|| value.to_string())
        };
        c.apply_env(env("")).unwrap();
        assert_eq!(c.runner.agent_otlp_endpoint, None, "empty is unset");
        c.apply_env(env("https://otel.example:4317/")).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.runner.agent_otlp_endpoint.as_deref(),
            Some("https://otel.example:4317/")
        );

        for bad in [
            "collector:4317",
            "grpc://collector:4317",
            "http://",
            "not a url",
        ] {
            let mut c = Config::default();
            c.apply_env(env(bad)).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("runner.agent_otlp_endpoint") && err.contains("http(s) URL"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn runner_limits_and_modes_are_checked() {
        let mut c = Config::default();
        c.runner.backend = "vm".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("unknown backend \"vm\""), "{err}");
        let mut c = Config::default();
        c.runner.journal_mode = "memory".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("runner.journal_mode"), "{err}");
        let mut c = Config::default();
        c.runner.max_rows_per_batch = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("runner.max_rows_per_batch"), "{err}");
    }

    #[test]
    fn several_runners_need_an_id_postgres_and_a_reachable_url() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let mut c = Config::default();
        c.apply_env(env(&[("FERROCLAW_RUNNER_ID", "runner-2")]))
            .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("runner.id") && err.contains("PostgreSQL"),
            "{err}"
        );

        let mut c = Config::default();
        c.apply_env(env(&[
            ("FERROCLAW_RUNNER_ID", "runner-2"),
            ("FERROCLAW_RUNNER_DATABASE_URL", "postgres://db/ferroclaw"),
            ("FERROCLAW_RUNNER_SHARED_STORAGE", "true"),
        ]))
        .unwrap();
        c.validate().unwrap();
        assert!(c.runner.shared_storage);
        assert_eq!(
            c.runner.own_url("127.0.0.1:7000".parse().unwrap()).unwrap(),
            "http://127.0.0.1:7000"
        );
        let err = c
            .runner
            .own_url("0.0.0.0:50051".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("advertise_url"), "{err}");
        c.runner.advertise_url = Some("http://runner-2:50051".into());
        assert_eq!(
            c.runner.own_url("0.0.0.0:50051".parse().unwrap()).unwrap(),
            "http://runner-2:50051"
        );

        for bad in ["", "a b", "../x", &"x".repeat(65)] {
            let mut c = Config::default();
            c.runner.id = Some(bad.to_string());
            c.runner.database_url = Some("postgres://db/f".into());
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("runner.id"), "{bad:?}: {err}");
        }
    }
}
