//! The `process` backend: each session's agent is a local child process.
//!
//! Not a security boundary: the agent runs as the runner's user and can read what the runner
//! can. It exists for local mode (`ferroclaw up`), tests and machines without Docker.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use ferroclaw_common::config::AgentConfig;
use ferroclaw_mailbox::SessionPaths;
use tokio::process::{Child, Command};

use crate::credential_proxy::ModelAccess;
use crate::error::{Result, RunnerError};

pub struct ProcessBackend {
    binary: PathBuf,
    data_dir: PathBuf,
    idle_timeout_secs: u64,
    journal_mode: String,
    max_attempts: u32,
    model_access: ModelAccess,
    /// `OTEL_*` for agents that export spans (see [`crate::backend::telemetry_env`]).
    telemetry_env: Vec<(String, String)>,
}

impl ProcessBackend {
    pub fn new(
        binary: PathBuf,
        data_dir: PathBuf,
        idle_timeout_secs: u64,
        journal_mode: String,
        max_attempts: u32,
        model_access: ModelAccess,
    ) -> Result<Self> {
        if !binary.is_file() {
            return Err(RunnerError::Config(format!(
                "agent binary {} not found: build it (cargo build) or set runner.agent_binary / FERROCLAW_AGENT_BINARY",
                binary.display()
            )));
        }
        Ok(Self {
            binary,
            data_dir,
            idle_timeout_secs,
            journal_mode,
            max_attempts,
            model_access,
            telemetry_env: Vec::new(),
        })
    }

    /// Agents export their spans with this environment.
    pub fn with_telemetry_env(mut self, env: Vec<(String, String)>) -> Self {
        self.telemetry_env = env;
        self
    }

    /// `ferroclaw-agent` beside the current executable.
    pub fn default_binary() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .unwrap_or_default()
            .join("ferroclaw-agent")
    }

    /// Starts the agent of one session. It exits by itself after the idle timeout, and when
    /// the runner dies (`--exit-with-parent`), so no orphan keeps writing.
    pub fn spawn(
        &self,
        session_id: &str,
        paths: &SessionPaths,
        agent: &AgentConfig,
    ) -> Result<Child> {
        let agent_dir = self.data_dir.join("agents").join(&agent.name);
        let global_dir = self.data_dir.join("global");
        let memory_dir = agent.shared_memory_dir(&self.data_dir);
        for dir in [&agent_dir, &global_dir]
            .into_iter()
            .chain(memory_dir.as_ref())
        {
            std::fs::create_dir_all(dir).map_err(|source| RunnerError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let mut command = Command::new(&self.binary);
        if let Some(memory) = &memory_dir {
            command.arg("--memory-dir").arg(memory);
        }
        command
            .arg("--session-dir")
            .arg(paths.root())
            .arg("--agent-dir")
            .arg(&agent_dir)
            .arg("--global-dir")
            .arg(&global_dir)
            .arg("--provider")
            .arg(&agent.provider)
            .arg("--timezone")
            .arg(&agent.timezone)
            .arg("--idle-timeout-secs")
            .arg(self.idle_timeout_secs.to_string())
            .arg("--journal-mode")
            .arg(&self.journal_mode)
            .arg("--max-attempts")
            .arg(self.max_attempts.to_string())
            .arg("--exit-with-parent")
            .env_clear()
            .envs(crate::backend::passthrough_env(true))
            .envs(self.telemetry_env.iter().cloned())
            .envs(
                self.model_access
                    .agent_env(session_id, agent, &self.model_access.local_url()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| RunnerError::Io {
                path: self.binary.clone(),
                source,
            })
    }
}

/// Asks a child to stop (SIGTERM) so it can finish its batch.
pub fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}
