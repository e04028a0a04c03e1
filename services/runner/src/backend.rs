//! Where agents run: local child processes or Docker containers. The supervisor drives both
//! through this one interface.

use std::time::Duration;

use ferroclaw_common::config::AgentConfig;
use ferroclaw_mailbox::SessionPaths;
use tokio::process::Child;

use crate::docker_backend::{ContainerRun, DockerBackend};
use crate::error::{Result, RunnerError};
use crate::process_backend::{self, ProcessBackend};
use crate::registry::{Registry, SessionRecord};

pub enum Backend {
    Process(ProcessBackend),
    Docker(Box<DockerBackend>),
}

/// One running agent.
pub enum AgentRun {
    Process(Child),
    Container(ContainerRun),
}

/// The runner's environment variables an agent may see: logging, and the test knobs of the
/// echo provider and of the tools. Nothing else passes, API keys least of all.
pub fn passthrough_env(with_system: bool) -> Vec<(String, String)> {
    const TEST_KNOBS: &[&str] = &[
        "FERROCLAW_MODEL_RETRY_BASE_MS",
        "FERROCLAW_BASH_TIMEOUT_SECS",
        "FERROCLAW_QUESTION_TIMEOUT_SECS",
        // The polling baseline of `pipeline-bench --poll-baseline`.
        "FERROCLAW_AGENT_POLL_MS",
    ];
    std::env::vars()
        .filter(|(k, _)| {
            k == "RUST_LOG"
                || k.starts_with("FERROCLAW_ECHO_")
                || TEST_KNOBS.contains(&k.as_str())
                || (with_system && matches!(k.as_str(), "PATH" | "HOME" | "LANG" | "TMPDIR"))
        })
        .collect()
}

/// What an agent needs to export its spans: `endpoint`, the collector address the runner
/// allows it, and the runner's other `OTEL_*` settings (sampler, batch delays, timeout),
/// never its headers (a collector's API key stays with the services) nor its endpoints or
/// service name. Nothing without an endpoint.
pub fn telemetry_env(endpoint: Option<&str>) -> Vec<(String, String)> {
    let Some(endpoint) = endpoint.filter(|e| !e.is_empty()) else {
        return Vec::new();
    };
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("OTEL_")
                && !k.contains("HEADERS")
                && !k.contains("ENDPOINT")
                && k != "OTEL_SERVICE_NAME"
        })
        .collect();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.to_string()));
    env
}

/// How an agent ended: cleanly or not, and a description for the logs.
pub type Exit = (bool, String);

impl Backend {
    pub async fn start(
        &self,
        session: &SessionRecord,
        paths: &SessionPaths,
        agent: &AgentConfig,
    ) -> Result<AgentRun> {
        match self {
            Self::Process(p) => p.spawn(&session.id, paths, agent).map(AgentRun::Process),
            Self::Docker(d) => d
                .start(session, paths, agent)
                .await
                .map(AgentRun::Container),
        }
    }

    /// "process" or "docker", as `runner.backend` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Process(_) => "process",
            Self::Docker(_) => "docker",
        }
    }

    /// For the operator: whether the engine agents run on answers, and what it is
    /// ("Docker 20.10.24, API 1.41") or why not. Processes need no engine: `(true, "")`.
    pub async fn describe_engine(&self) -> (bool, String) {
        match self {
            Self::Process(_) => (true, String::new()),
            Self::Docker(d) => match d.engine_version().await {
                Ok(version) => (true, version),
                Err(why) => (false, format!("the Docker engine does not answer: {why}")),
            },
        }
    }

    /// Whether agents can be started now (the Docker engine answers); `Ok` for processes.
    pub async fn ready(&self) -> Result<()> {
        match self {
            Self::Process(_) => Ok(()),
            Self::Docker(d) => d.ping().await,
        }
    }

    /// After a runner restart: agent containers of known sessions are handed back (to be
    /// adopted by `start`), the others removed. Child processes need nothing: they exit with
    /// their parent.
    pub async fn leftovers(&self, registry: &Registry) -> Result<Vec<SessionRecord>> {
        let Self::Docker(docker) = self else {
            return Ok(Vec::new());
        };
        let mut adopt = Vec::new();
        for (name, session_id, running) in docker.managed().await? {
            match registry.get_fresh(&session_id).await? {
                // Another runner's agent on a shared engine: not ours to adopt or remove.
                Some(session) if !registry.is_here(&session) => {}
                Some(session) if running => adopt.push(session),
                _ => {
                    tracing::info!(container = %name, "removing a leftover agent container");
                    docker.remove(&name).await?;
                }
            }
        }
        Ok(adopt)
    }
}

impl AgentRun {
    pub fn describe(&self) -> String {
        match self {
            Self::Process(child) => format!("pid {}", child.id().unwrap_or(0)),
            Self::Container(c) => format!("container {}", c.name),
        }
    }

    pub async fn wait(&mut self) -> Result<Exit> {
        match self {
            Self::Process(child) => {
                let status = child.wait().await.map_err(|source| RunnerError::Io {
                    path: "agent process".into(),
                    source,
                })?;
                Ok((status.success(), status.to_string()))
            }
            Self::Container(c) => c.wait().await,
        }
    }

    /// Asks the agent to finish its batch and exit; kills it after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<Exit> {
        match self {
            Self::Process(child) => {
                process_backend::terminate(child);
                if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
                    return exit;
                }
                tracing::warn!("agent did not stop in time; killing it");
                if let Self::Process(child) = self {
                    let _ = child.kill().await;
                }
                self.wait().await
            }
            Self::Container(c) => {
                c.stop(grace).await;
                c.wait().await
            }
        }
    }
}
