use std::path::{Path, PathBuf};

use crate::error::{Result, io_at};

/// The files of one session directory: `<data>/sessions/<agent>/<session_id>/`.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    root: PathBuf,
}

impl SessionPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory of `session_id` of `agent` under the data directory.
    pub fn under(data_dir: &Path, agent: &str, session_id: &str) -> Self {
        Self::new(data_dir.join("sessions").join(agent).join(session_id))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Written by the runner only; read-only for the agent.
    pub fn in_dir(&self) -> PathBuf {
        self.root.join("in")
    }
    /// Written by the agent only.
    pub fn out_dir(&self) -> PathBuf {
        self.root.join("out")
    }
    pub fn inbound_db(&self) -> PathBuf {
        self.in_dir().join("inbound.db")
    }
    pub fn outbound_db(&self) -> PathBuf {
        self.out_dir().join("outbound.db")
    }
    pub fn inbox(&self) -> PathBuf {
        self.in_dir().join("inbox")
    }
    pub fn outbox(&self) -> PathBuf {
        self.out_dir().join("outbox")
    }
    /// Its mtime is touched while the agent works.
    pub fn heartbeat(&self) -> PathBuf {
        self.out_dir().join("heartbeat")
    }
    /// Agent-private state: transcript, provider state.
    pub fn state_dir(&self) -> PathBuf {
        self.out_dir().join("state")
    }
    /// Rewritten by the runner after each commit to `inbound.db` (see [`ring`]).
    pub fn inbound_bell(&self) -> PathBuf {
        self.in_dir().join("inbound.bell")
    }
    /// Rewritten by the agent after each commit to `outbound.db`.
    pub fn outbound_bell(&self) -> PathBuf {
        self.out_dir().join("outbound.bell")
    }
    /// Held (flock) by the one agent serving this session.
    pub fn agent_lock(&self) -> PathBuf {
        self.out_dir().join("agent.lock")
    }

    /// Creates `in/` and `out/` (host side; idempotent).
    pub fn create(&self) -> Result<()> {
        for dir in [self.inbox(), self.out_dir()] {
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(())
    }
}

/// Rings a doorbell file after a commit, so the other side's file watch wakes up. The
/// database file alone is not enough: in WAL mode a commit's last step updates the
/// shared-memory index, which raises no file event, so a reader woken by the WAL write may
/// look before the commit is visible. A failed ring only delays the reader until its
/// fallback poll.
pub fn ring(bell: &Path) {
    if let Err(e) = std::fs::write(bell, b"\n") {
        tracing::debug!(bell = %bell.display(), error = %e, "cannot ring the doorbell");
    }
}
