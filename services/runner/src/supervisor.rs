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
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::{Backend, Exit};
use crate::disk_quota::{self, DiskQuota};
use crate::error::Result;
use crate::mailboxes::Mailboxes;
use crate::registry::{Registry, SessionRecord};

/// How long a stopping agent may take to finish its batch before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest a read of one session's mailbox may hold up work that spans sessions.
const MAILBOX_READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Waiting for a free slot under `max_running_agents` (a fair, first-come queue).
    Queued,
    Running,
    Backoff,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
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
    /// One permit per agent allowed to run at once; tokio's semaphore serves waiters in order.
    permits: Arc<Semaphore>,
    /// Running agents, each with a token that asks it to give its slot back.
    yielders: std::sync::Mutex<HashMap<String, (SessionRecord, CancellationToken)>>,
    /// A claimed batch with a heartbeat older than this means a stuck agent.
    stuck_after: Duration,
    /// A batch claimed for longer than this means a stuck agent, heartbeat or not.
    max_batch: Duration,
    disk: DiskQuota,
    /// Sessions over their disk quota, with why: stopped, and taking no new work until
    /// they are under it again.
    over_quota: std::sync::Mutex<HashMap<String, String>>,
    /// Sessions whose files were tampered with (a link or FIFO in place of `outbound.db`):
    /// their agents are stopped and not started again until the runner restarts.
    tampered: std::sync::Mutex<std::collections::HashSet<String>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Limits of the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorLimits {
    pub max_running_agents: usize,
    pub stuck_after: Duration,
    pub max_batch: Duration,
    pub disk: DiskQuota,
}

impl Supervisor {
    pub fn new(
        backend: Backend,
        mailboxes: Arc<Mailboxes>,
        agents: &[AgentConfig],
        limits: SupervisorLimits,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                mailboxes,
                agents: agents.iter().map(|a| (a.name.clone(), a.clone())).collect(),
                slots: Mutex::new(HashMap::new()),
                permits: Arc::new(Semaphore::new(limits.max_running_agents.max(1))),
                yielders: std::sync::Mutex::new(HashMap::new()),
                stuck_after: limits.stuck_after,
                max_batch: limits.max_batch,
                disk: limits.disk,
                over_quota: Default::default(),
                tampered: Default::default(),
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
        if self.inner.is_tampered(&session.id) {
            tracing::warn!(session = %session.id, "not starting the agent of a tampered session");
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

    /// Why the session takes no new work now, if it does not: it was over its disk quota
    /// and still is (measured again here, so removed files or a raised limit count at once).
    pub async fn over_quota(&self, session: &SessionRecord) -> Option<String> {
        let was = self
            .inner
            .over_quota
            .lock()
            .ok()
            .and_then(|m| m.get(&session.id).cloned())?;
        let agent = self.inner.agents.get(&session.agent)?;
        let paths = self.inner.mailboxes.paths(session);
        match self.inner.disk.exceeded(&paths, agent).await {
            Some(why) => Some(why),
            None => {
                tracing::info!(session = %session.id, %was, "session is under its disk quota again");
                if let Ok(mut m) = self.inner.over_quota.lock() {
                    m.remove(&session.id);
                }
                None
            }
        }
    }

    pub async fn state(&self, session_id: &str) -> Option<AgentState> {
        self.inner.slots.lock().await.get(session_id).copied()
    }

    /// Whether the backend can start agents (see [`Backend::ready`]).
    pub async fn backend_ready(&self) -> Result<()> {
        self.inner.backend.ready().await
    }

    /// After a (re)start: adopts agents still running from before, and starts agents for
    /// every session that still has work.
    pub async fn recover(&self, registry: &Registry) -> Result<()> {
        for session in self.inner.backend.leftovers(registry).await? {
            self.ensure(&session).await;
        }
        for session in registry.list(None).await? {
            // One session's broken, tampered or locked files never keep the others from
            // starting.
            let read = async {
                match self.inner.mailboxes.get(&session).await {
                    Ok(mailbox) => mailbox.pending().await.map_err(Into::into),
                    Err(e) => Err(e),
                }
            };
            let Ok(pending) = tokio::time::timeout(MAILBOX_READ_TIMEOUT, read).await else {
                tracing::warn!(session = %session.id, "its mailbox did not answer in time; recovered later");
                self.start_at(session, ferroclaw_mailbox::now_ms() + 30_000);
                continue;
            };
            match pending {
                Ok(pending) => {
                    if let Some(due) = pending.next_due {
                        self.start_at(session, due);
                    }
                }
                Err(e) => self.inner.note_unreadable(&session, &e),
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

/// Whether an error means a session's files are not what belongs there.
fn is_tampering(e: &crate::error::RunnerError) -> bool {
    matches!(
        e,
        crate::error::RunnerError::Mailbox(ferroclaw_mailbox::Error::File(f)) if f.is_tampering()
    )
}

impl Inner {
    fn is_tampered(&self, session_id: &str) -> bool {
        self.tampered
            .lock()
            .is_ok_and(|set| set.contains(session_id))
    }

    /// Resolves when the session's usage passes its quota; never otherwise.
    async fn watch_quota(
        &self,
        paths: &ferroclaw_mailbox::SessionPaths,
        agent: &AgentConfig,
    ) -> String {
        loop {
            tokio::time::sleep(disk_quota::CHECK_EVERY).await;
            if let Some(why) = self.disk.exceeded(paths, agent).await {
                return why;
            }
        }
    }

    fn note_over_quota(&self, session: &SessionRecord, why: String) {
        tracing::error!(session = %session.id, agent = %session.agent, %why,
            "session over its disk quota: its agent is stopped and new messages are refused");
        if let Ok(mut m) = self.over_quota.lock() {
            m.insert(session.id.clone(), why);
        }
    }

    /// Reports a session whose mailbox cannot be read; a tampered one is stopped for good.
    fn note_unreadable(&self, session: &SessionRecord, e: &crate::error::RunnerError) {
        if is_tampering(e) {
            tracing::error!(session = %session.id, agent = %session.agent, error = %e,
                "session files tampered with: its agent is stopped and the session is not served");
            if let Ok(mut set) = self.tampered.lock() {
                set.insert(session.id.clone());
            }
        } else {
            tracing::error!(session = %session.id, error = %e, "cannot read the session's mailbox");
        }
    }

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
            if self
                .over_quota
                .lock()
                .is_ok_and(|m| m.contains_key(&session.id))
            {
                slots.remove(&session.id);
                return;
            }
            let pending = match self.mailboxes.get(&session).await {
                Ok(mailbox) => mailbox.pending().await.map_err(Into::into),
                Err(e) => Err(e),
            };
            let next_due = match pending {
                Ok(p) => p.next_due,
                Err(e) if is_tampering(&e) => {
                    self.note_unreadable(&session, &e);
                    slots.remove(&session.id);
                    return;
                }
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

    /// Waits for a slot under the cap. While it waits, running agents with nothing to do
    /// are asked to give theirs back, so every session gets its turn.
    async fn acquire_slot(&self, session: &SessionRecord) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        self.slots
            .lock()
            .await
            .insert(session.id.clone(), AgentState::Queued);
        tracing::info!("all agent slots are taken; queued");
        // One acquire future for the whole wait: dropping it would lose the queue position.
        let acquire = self.permits.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            self.ask_idle_agents_to_yield().await;
            tokio::select! {
                permit = &mut acquire => {
                    self.slots.lock().await.insert(session.id.clone(), AgentState::Running);
                    return permit.ok();
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    async fn ask_idle_agents_to_yield(&self) {
        let running: Vec<(SessionRecord, CancellationToken)> = match self.yielders.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(_) => return,
        };
        for (session, token) in running {
            if token.is_cancelled() {
                continue;
            }
            let read = async {
                match self.mailboxes.get(&session).await {
                    Ok(mailbox) => mailbox.pending().await.is_ok_and(|p| p.count == 0),
                    Err(_) => false,
                }
            };
            // A mailbox that does not answer in time counts as busy; the waiting session
            // is not held up by it.
            let idle = tokio::time::timeout(MAILBOX_READ_TIMEOUT, read)
                .await
                .unwrap_or(false);
            if idle {
                tracing::info!(session = %session.id, "idle agent gives its slot to a queued session");
                token.cancel();
            }
        }
    }

    /// Runs the agent once, until it exits, is stuck, is asked to yield, or shutdown.
    async fn run_once(&self, session: &SessionRecord) -> Result<Exit> {
        let agent = self.agents.get(&session.agent).ok_or_else(|| {
            crate::error::RunnerError::Config(format!(
                "agent {:?} is not configured any more",
                session.agent
            ))
        })?;
        let Some(_permit) = self.acquire_slot(session).await else {
            return Ok((true, "shut down while queued".into()));
        };
        let paths = self.mailboxes.paths(session);
        if let Some(why) = self.disk.exceeded(&paths, agent).await {
            self.note_over_quota(session, why);
            return Ok((true, "over its disk quota; not started".into()));
        }
        let mut run = self.backend.start(session, &paths, agent).await?;
        tracing::info!(agent = %run.describe(), "agent started");
        let yield_token = CancellationToken::new();
        if let Ok(mut map) = self.yielders.lock() {
            map.insert(session.id.clone(), (session.clone(), yield_token.clone()));
        }
        enum Ended {
            Exited(Result<Exit>),
            Stop,
            Stuck(Stuck),
            OverQuota(String),
        }
        let ended = tokio::select! {
            exit = run.wait() => Ended::Exited(exit),
            _ = self.shutdown.cancelled() => Ended::Stop,
            _ = yield_token.cancelled() => Ended::Stop,
            stale = self.stuck(session) => Ended::Stuck(stale),
            why = self.watch_quota(&paths, agent) => Ended::OverQuota(why),
        };
        if let Ok(mut map) = self.yielders.lock() {
            map.remove(&session.id);
        }
        match ended {
            Ended::Exited(exit) => exit,
            Ended::Stop => run.stop(STOP_GRACE).await,
            Ended::OverQuota(why) => {
                self.note_over_quota(session, why);
                run.stop(STOP_GRACE).await?;
                Ok((true, "stopped: over its disk quota".into()))
            }
            Ended::Stuck(stuck) => {
                let why = match stuck {
                    Stuck::Silent(stale) => format!("no heartbeat for {}s", stale.as_secs()),
                    Stuck::TooLong(held) => format!(
                        "a message unfinished for {}s, past runner.max_batch_secs",
                        held.as_secs()
                    ),
                };
                tracing::warn!(%why, "agent is stuck; killing it");
                run.stop(Duration::ZERO).await?;
                Ok((false, format!("stuck: {why}")))
            }
        }
    }

    /// Resolves when the agent holds a claimed batch and its heartbeat is older than
    /// `stuck_after`, or when a due message has stayed unfinished for longer than
    /// `max_batch` by the runner's clock while the agent runs, whatever the agent says
    /// about it (its heartbeat, claiming or releasing it); never otherwise.
    async fn stuck(&self, session: &SessionRecord) -> Stuck {
        let paths = self.mailboxes.paths(session);
        let every = (self.stuck_after.min(self.max_batch) / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(10));
        // When this runner first saw each due message unfinished.
        let mut waiting_since: HashMap<i64, std::time::Instant> = HashMap::new();
        loop {
            tokio::time::sleep(every).await;
            let (claimed, unfinished) = match self.mailboxes.get(session).await {
                Ok(mailbox) => (
                    mailbox.claimed().await.unwrap_or_default(),
                    mailbox
                        .due_unfinished(ferroclaw_mailbox::now_ms())
                        .await
                        .unwrap_or_default(),
                ),
                Err(_) => (Vec::new(), Vec::new()),
            };
            let now = std::time::Instant::now();
            waiting_since.retain(|seq, _| unfinished.contains(seq));
            for seq in &unfinished {
                waiting_since.entry(*seq).or_insert(now);
            }
            if let Some(held) = waiting_since.values().map(|t| now - *t).max()
                && held > self.max_batch
            {
                return Stuck::TooLong(held);
            }
            // The agent owns out/: look at the heartbeat itself, never through a link.
            let stale = ferroclaw_mailbox::session_fs::Dir::open(&paths.out_dir())
                .and_then(|out| out.entry("heartbeat"))
                .ok()
                .flatten()
                .and_then(|entry| entry.modified.elapsed().ok());
            let Some(stale) = stale.filter(|s| *s > self.stuck_after) else {
                continue;
            };
            if !claimed.is_empty() {
                return Stuck::Silent(stale);
            }
        }
    }
}

/// Why an agent counts as stuck.
enum Stuck {
    /// A claimed batch and no heartbeat for this long.
    Silent(Duration),
    /// A due message unfinished for this long, heartbeat or not.
    TooLong(Duration),
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
