//! Starting ferroclaw service binaries as child processes and reading their readiness line
//! (see [`crate::ready`]). Used by `ferroclaw up` and by the end-to-end tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited before it was ready ({status})")]
    Exited { name: String, status: String },
    #[error("{name} was not ready within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
    #[error("{name} printed an unreadable readiness line {line:?}")]
    BadReadyLine { name: String, line: String },
}

/// A running service process and the addresses it announced.
pub struct ServiceProcess {
    pub name: String,
    pub child: Child,
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// Where it serves Prometheus' `GET /metrics`, when not on its HTTP address.
    pub metrics: Option<SocketAddr>,
}

/// The executable `name` in the same directory as the current one (where cargo and the
/// release archives put all ferroclaw binaries).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test binaries live one level down, in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Starts `binary` with `envs` (added to the inherited environment) and waits for its
/// readiness line on stdout.
pub async fn launch(
    name: &str,
    binary: &Path,
    envs: &[(&str, String)],
    timeout: Duration,
) -> Result<ServiceProcess, LaunchError> {
    let mut command = Command::new(binary);
    command
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| LaunchError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    let stdout = child.stdout.take().ok_or_else(|| LaunchError::Exited {
        name: name.into(),
        status: "no stdout".into(),
    })?;
    let mut lines = BufReader::new(stdout).lines();
    let line = match tokio::time::timeout(timeout, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Ok(_) => {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            return Err(LaunchError::Exited {
                name: name.into(),
                status,
            });
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(LaunchError::Timeout {
                name: name.into(),
                timeout,
            });
        }
    };
    let bad = || LaunchError::BadReadyLine {
        name: name.into(),
        line: line.clone(),
    };
    let ready: serde_json::Value = serde_json::from_str(&line).map_err(|_| bad())?;
    let addr = |key: &str| -> Result<Option<SocketAddr>, LaunchError> {
        match ready.get(key).and_then(|v| v.as_str()) {
            None => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| bad()),
        }
    };
    let (grpc, http, metrics) = (addr("grpc")?, addr("http")?, addr("metrics")?);
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(ServiceProcess {
        name: name.into(),
        child,
        grpc,
        http,
        metrics,
    })
}

impl ServiceProcess {
    pub fn grpc_url(&self) -> String {
        self.grpc.map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid with a valid signal has no memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        self.terminate();
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(service = %self.name, "did not stop in time; killing it");
                self.child.kill().await?;
                self.child.wait().await
            }
        }
    }
}
