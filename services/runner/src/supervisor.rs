//! Agent lifecycle: at most one agent per session, started when a session has work,
//! restarted with backoff after a crash, gone when it has exited with nothing pending.
//!
//! States of a session's slot: absent (idle) → running → (exit) → absent, or → backoff →
//! running. A slot is only removed while holding the slot lock *after* reading that nothing
//! is pending, and `ensure` takes the same lock after its message is written, so a message
//! can never slip between an agent's exit and the decision not to restart it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferroclaw_common::config::AgentConfig;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::{Backend, Exit};
use crate::error::Result;
use crate::mailboxes::Mailboxes;
use crate::registry::{Registry, SessionRecord};

/// How long a stopping agent may take to finish its batch before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Running,
    Backoff,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Backoff => "backoff",
        }
    }
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    mailboxes: Arc<Mailboxes>,
    agents: HashMap<String, AgentConfig>,
    slots: Mutex<HashMap<String, AgentState>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Supervisor {
    pub fn new(
        backend: Backend,
        mailboxes: Arc<Mailboxes>,
        agents: &[AgentConfig],
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                mailboxes,
                agents: agents.iter().map(|a| (a.name.clone(), a.clone())).collect(),
                slots: Mutex::new(HashMap::new()),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Makes sure the session's agent runs (single-flight: a running agent picks up new
    /// messages itself through its file watch).
    pub async fn ensure(&self, session: &SessionRecord) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        let mut slots = self.inner.slots.lock().await;
        if slots.contains_key(&session.id) {
            return;
        }
        slots.insert(session.id.clone(), AgentState::Running);
        drop(slots);
        let inner = self.inner.clone();
        let session = session.clone();
        let span = tracing::info_span!("agent", session = %session.id, agent = %session.agent);
        self.inner
            .tasks
            .spawn(async move { inner.supervise(session).await }.instrument(span));
    }

    pub async fn state(&self, session_id: &str) -> Option<AgentState> {
        self.inner.slots.lock().await.get(session_id).copied()
    }

    pub async fn running_count(&self) -> usize {
        self.inner.slots.lock().await.len()
    }

    /// After a (re)start: adopts agents still running from before, and starts agents for
    /// every session that still has work.
    pub async fn recover(&self, registry: &Registry) -> Result<()> {
        for session in self.inner.backend.leftovers(registry).await? {
            self.ensure(&session).await;
        }
        for session in registry.list(None).await? {
            let mailbox = self.inner.mailboxes.get(&session).await?;
            let pending = mailbox.pending().await?;
            if let Some(due) = pending.next_due {
                self.start_at(session, due);
            }
        }
        Ok(())
    }

    /// Ensures the agent at `due_ms` (now if it has passed).
    fn start_at(&self, session: SessionRecord, due_ms: i64) {
        let wait = due_ms - ferroclaw_mailbox::now_ms();
        let this = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            this.ensure(&session).await;
        });
    }

    /// Waits for every agent to stop after shutdown was requested.
    pub async fn wait_stopped(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Inner {
    async fn supervise(self: Arc<Self>, session: SessionRecord) {
        let mut failures: u32 = 0;
        loop {
            let crashed = match self.run_once(&session).await {
                Ok((true, _)) => false,
                Ok((false, status)) => {
                    tracing::warn!(%status, "agent exited abnormally");
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "agent could not be started");
                    true
                }
            };
            let mut slots = self.slots.lock().await;
            if self.shutdown.is_cancelled() {
                slots.remove(&session.id);
                return;
            }
            let pending = match self.mailboxes.get(&session).await {
                Ok(mailbox) => mailbox.pending().await.map_err(Into::into),
                Err(e) => Err(e),
            };
            let next_due = match pending {
                Ok(p) => p.next_due,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read pending work; restarting the agent");
                    Some(0)
                }
            };
            let Some(due) = next_due else {
                slots.remove(&session.id);
                tracing::info!("agent stopped; nothing pending");
                return;
            };
            if !crashed && due > ferroclaw_mailbox::now_ms() {
                // Only deferred work is left: come back when it is due.
                slots.remove(&session.id);
                drop(slots);
                Supervisor {
                    inner: self.clone(),
                }
                .start_at(session, due);
                return;
            }
            if !crashed {
                failures = 0;
                continue;
            }
            failures += 1;
            slots.insert(session.id.clone(), AgentState::Backoff);
            drop(slots);
            let delay = backoff(failures);
            tracing::info!(failures, ?delay, "restarting the agent after a backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => {
                    self.slots.lock().await.remove(&session.id);
                    return;
                }
            }
            self.slots
                .lock()
                .await
                .insert(session.id.clone(), AgentState::Running);
        }
    }

    /// Runs the agent once, until it exits or shutdown stops it.
    async fn run_once(&self, session: &SessionRecord) -> Result<Exit> {
        let agent = self.agents.get(&session.agent).ok_or_else(|| {
            crate::error::RunnerError::Config(format!(
                "agent {:?} is not configured any more",
                session.agent
            ))
        })?;
        let paths = self.mailboxes.paths(session);
        let mut run = self.backend.start(session, &paths, agent).await?;
        tracing::info!(agent = %run.describe(), "agent started");
        let exited = tokio::select! {
            exit = run.wait() => Some(exit),
            _ = self.shutdown.cancelled() => None,
        };
        match exited {
            Some(exit) => exit,
            None => run.stop(STOP_GRACE).await,
        }
    }
}

/// 200 ms doubling per consecutive failure, at most 30 s.
fn backoff(failures: u32) -> Duration {
    let ms = 200u64.saturating_mul(1 << failures.saturating_sub(1).min(8));
    Duration::from_millis(ms.min(30_000))
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(30), Duration::from_millis(30_000));
    }
}
