//! Agent lifecycle: at most one agent per session, started when a session has work,
//! restarted with backoff after a crash, gone when it has exited with nothing pending.
//!
//! States of a session's slot: absent (idle) → running → (exit) → absent, or → backoff →
//! running. A slot is only removed while holding the slot lock *after* reading that nothing
//! is pending, and `ensure` takes the same lock after its message is written, so a message
//! can never slip between an agent's exit and the decision not to restart it.
//!
//! Slots under `max_running_agents` follow `slot_policy` (first come, first served; one
//! agent asked to give its slot back per waiting session, the longest idle first and only
//! after a minimum idle age, or one whose turn is over); this module carries the
//! decisions out: it looks at running agents' mailboxes while sessions wait, and stops the
//! agents chosen (each finishes its batch first).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferroclaw_common::config::AgentConfig;
use tokio::sync::{Mutex, Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::{Backend, Exit};
use crate::disk_quota::{self, DiskQuota};
use crate::error::Result;
use crate::mailboxes::Mailboxes;
use crate::registry::{Registry, SessionRecord};
use crate::slot_policy::SlotBook;

/// How long a stopping agent may take to finish its batch before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest a read of one session's mailbox may hold up work that spans sessions.
const MAILBOX_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// While sessions wait for a slot, a running agent is looked at when it writes (the
/// outbound feed's notice: it may have finished its work), and every agent at least this
/// often, in case a notice was missed or deferred work came due.
const SLOT_RECHECK: Duration = Duration::from_secs(1);
/// The longest one look at a running agent's mailbox may take before it counts as busy.
const SLOT_READ_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// The `max_running_agents` slots: who holds one, who waits (see `slot_policy`).
    agent_slots: Arc<Slots>,
    max_running_agents: usize,
    /// Agents started, per session and in all, since this runner started.
    starts: std::sync::Mutex<HashMap<String, u64>>,
    starts_total: AtomicU64,
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
        // An idle agent keeps its slot for about what the cold start it may cost later is
        // worth (see `slot_policy`).
        let min_idle = match backend {
            Backend::Docker(_) => crate::slot_policy::MIN_IDLE_CONTAINER,
            Backend::Process(_) => crate::slot_policy::MIN_IDLE,
        };
        let this = Self {
            inner: Arc::new(Inner {
                backend,
                mailboxes,
                agents: agents.iter().map(|a| (a.name.clone(), a.clone())).collect(),
                slots: Mutex::new(HashMap::new()),
                agent_slots: Arc::new(Slots::new(limits.max_running_agents, min_idle)),
                max_running_agents: limits.max_running_agents,
                starts: Default::default(),
                starts_total: AtomicU64::new(0),
                stuck_after: limits.stuck_after,
                max_batch: limits.max_batch,
                disk: limits.disk,
                over_quota: Default::default(),
                tampered: Default::default(),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        };
        let inner = this.inner.clone();
        this.inner
            .tasks
            .spawn(async move { inner.schedule_slots().await });
        this
    }

    /// Follows what agents write (the outbound feed's change notices), so an agent's idle
    /// time counts from its last reply.
    pub fn watch_output(&self, mut changes: broadcast::Receiver<String>) {
        let slots = self.inner.agent_slots.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(session) => slots.note_output(Some(&session)),
                        // Missed notices: count every agent as just active (the cautious
                        // reading: none is yielded sooner for it).
                        Err(broadcast::error::RecvError::Lagged(_)) => slots.note_output(None),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Agents started for the session since this runner started.
    pub fn agent_starts(&self, session_id: &str) -> u64 {
        self.inner
            .starts
            .lock()
            .ok()
            .and_then(|m| m.get(session_id).copied())
            .unwrap_or(0)
    }

    /// Agents started for all sessions since this runner started.
    pub fn agent_starts_total(&self) -> u64 {
        self.inner.starts_total.load(Ordering::Relaxed)
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
        // New work: a running agent is busy now and is not asked to give its slot up.
        self.inner.agent_slots.note_work(&session.id);
        let mut slots = self.inner.slots.lock().await;
        if slots.contains_key(&session.id) {
            return;
        }
        slots.insert(session.id.clone(), AgentState::Running);
        drop(slots);
        let inner = self.inner.clone();
        let session = session.clone();
        // A root, not a child of the call that started it: the agent outlives that call, and
        // a child would hold the call's span (and its trace) open for the agent's lifetime.
        let span = tracing::info_span!(parent: None, "agent", session = %session.id, agent = %session.agent);
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

    /// How many agents are in each state.
    pub async fn state_counts(&self) -> [(AgentState, usize); 3] {
        let slots = self.inner.slots.lock().await;
        let count = |state| slots.values().filter(|s| **s == state).count();
        [
            (AgentState::Running, count(AgentState::Running)),
            (AgentState::Queued, count(AgentState::Queued)),
            (AgentState::Backoff, count(AgentState::Backoff)),
        ]
    }

    /// The state of every session that has an agent; the others are idle. A copy: one
    /// entry per agent, so it stays small however many sessions there are.
    pub async fn states(&self) -> HashMap<String, AgentState> {
        self.inner.slots.lock().await.clone()
    }

    /// Puts a session in a state without an agent behind it (for lists in tests).
    #[cfg(test)]
    pub(crate) async fn pretend(&self, session_id: &str, state: AgentState) {
        let mut slots = self.inner.slots.lock().await;
        slots.insert(session_id.to_string(), state);
    }

    /// The cap on agents running at once.
    pub fn max_running_agents(&self) -> usize {
        self.inner.max_running_agents
    }

    /// "process" or "docker".
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// Whether the backend's engine answers, and what it is (see [`Backend::describe_engine`]).
    pub async fn describe_engine(&self) -> (bool, String) {
        self.inner.backend.describe_engine().await
    }

    /// The sessions that have an agent (queued, running or in backoff).
    pub async fn sessions_with_agents(&self) -> Vec<String> {
        self.inner.slots.lock().await.keys().cloned().collect()
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
        self.recover_sessions(registry.list_here().await?).await;
        Ok(())
    }

    /// Starts agents for those of `sessions` that have work (now, or when it is due).
    pub async fn recover_sessions(&self, sessions: Vec<SessionRecord>) {
        for session in sessions {
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

    /// Waits for a slot under the cap (first come, first served). While sessions wait,
    /// the slot scheduler asks running agents to give theirs back (see `slot_policy`).
    async fn acquire_slot(&self, session: &SessionRecord) -> Option<SlotGuard> {
        let guard = |token| SlotGuard {
            slots: self.agent_slots.clone(),
            session: session.id.clone(),
            token,
        };
        let granted = match self.agent_slots.request(session) {
            Ok(token) => return Some(guard(token)),
            Err(granted) => granted,
        };
        self.slots
            .lock()
            .await
            .insert(session.id.clone(), AgentState::Queued);
        tracing::info!("all agent slots are taken; queued");
        tokio::select! {
            token = granted => {
                let token = token.ok()?;
                self.slots.lock().await.insert(session.id.clone(), AgentState::Running);
                Some(guard(token))
            }
            _ = self.shutdown.cancelled() => {
                self.agent_slots.cancel(&session.id);
                None
            }
        }
    }

    /// While sessions wait for a slot: looks at the running agents (has each anything
    /// due?) and asks those the policy picks to give their slot back.
    async fn schedule_slots(self: Arc<Self>) {
        let mut last_full = Instant::now();
        loop {
            if self.agent_slots.waiting() == 0 {
                tokio::select! {
                    _ = self.agent_slots.wake.notified() => {}
                    _ = self.shutdown.cancelled() => return,
                }
                continue;
            }
            let full = last_full.elapsed() >= SLOT_RECHECK;
            if full {
                last_full = Instant::now();
            }
            for (session, epoch) in self.agent_slots.to_observe(full) {
                let read = async {
                    match self.mailboxes.get(&session).await {
                        Ok(mailbox) => mailbox
                            .due_unfinished(ferroclaw_mailbox::now_ms())
                            .await
                            .map(|due| due.is_empty())
                            .unwrap_or(false),
                        Err(_) => false,
                    }
                };
                // A mailbox that does not answer in time counts as busy.
                let idle = tokio::time::timeout(SLOT_READ_TIMEOUT, read)
                    .await
                    .unwrap_or(false);
                self.agent_slots.observed(&session.id, epoch, idle);
            }
            for (session, token) in self.agent_slots.to_yield() {
                tracing::info!(%session, "agent gives its slot to a waiting session");
                token.cancel();
            }
            // Until the next agent may be chosen, something changes, or the recheck.
            let recheck = last_full + SLOT_RECHECK;
            let until = self
                .agent_slots
                .next_deadline()
                .map_or(recheck, |d| d.min(recheck));
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = self.agent_slots.wake.notified() => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    fn count_start(&self, session_id: &str) {
        self.starts_total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut starts) = self.starts.lock() {
            *starts.entry(session_id.to_string()).or_default() += 1;
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
        let Some(slot) = self.acquire_slot(session).await else {
            return Ok((true, "shut down while queued".into()));
        };
        let paths = self.mailboxes.paths(session);
        if let Some(why) = self.disk.exceeded(&paths, agent).await {
            self.note_over_quota(session, why);
            return Ok((true, "over its disk quota; not started".into()));
        }
        let mut run = self.backend.start(session, &paths, agent).await?;
        self.count_start(&session.id);
        crate::metrics::METRICS
            .agent_starts
            .with_label_values(&[&session.agent])
            .inc();
        tracing::info!(agent = %run.describe(), "agent started");
        enum Ended {
            Exited(Result<Exit>),
            Stop,
            Stuck(Stuck),
            OverQuota(String),
        }
        let stuck = self.stuck(session);
        tokio::pin!(stuck);
        let quota = self.watch_quota(&paths, agent);
        tokio::pin!(quota);
        let mut yield_token = slot.token.clone();
        let ended = loop {
            tokio::select! {
                exit = run.wait() => break Ended::Exited(exit),
                _ = self.shutdown.cancelled() => break Ended::Stop,
                _ = yield_token.cancelled() => match self.agent_slots.confirm_yield(&session.id) {
                    None => break Ended::Stop,
                    Some(token) => {
                        tracing::info!("new work arrived as it was asked to yield; the agent keeps its slot");
                        yield_token = token;
                    }
                },
                stale = &mut stuck => break Ended::Stuck(stale),
                why = &mut quota => break Ended::OverQuota(why),
            }
        };
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

/// The slot book (`slot_policy`, the decisions) with what carries them out: the channels
/// that tell waiting sessions their slot is there, and the tokens that ask agents to go.
struct Slots {
    state: std::sync::Mutex<SlotState>,
    /// Wakes the slot scheduler: a session starts waiting, or an agent wrote something.
    wake: Notify,
}

struct SlotState {
    book: SlotBook,
    /// Waiting sessions, and how to hand each its slot (with its yield token).
    waiting: HashMap<String, (SessionRecord, oneshot::Sender<CancellationToken>)>,
    /// Slot holders, and the token that asks each one's agent to give its slot back.
    holders: HashMap<String, (SessionRecord, CancellationToken)>,
    /// Holders to look at: new ones, and those whose agent wrote since last looked at.
    dirty: HashSet<String>,
}

impl Slots {
    fn new(capacity: usize, min_idle: Duration) -> Self {
        Self {
            state: std::sync::Mutex::new(SlotState {
                book: SlotBook::with_min_idle(capacity, min_idle),
                waiting: HashMap::new(),
                holders: HashMap::new(),
                dirty: HashSet::new(),
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // The state is consistent after every call: a panic elsewhere leaves nothing half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot now (its yield token), or a receiver that gets the token when the
    /// session's turn comes.
    fn request(
        &self,
        session: &SessionRecord,
    ) -> std::result::Result<CancellationToken, oneshot::Receiver<CancellationToken>> {
        let mut state = self.lock();
        if state.book.request(&session.id, Instant::now()) {
            let token = CancellationToken::new();
            state
                .holders
                .insert(session.id.clone(), (session.clone(), token.clone()));
            state.dirty.insert(session.id.clone());
            return Ok(token);
        }
        let (tx, rx) = oneshot::channel();
        state
            .waiting
            .insert(session.id.clone(), (session.clone(), tx));
        drop(state);
        self.wake.notify_one();
        Err(rx)
    }

    /// Gives a held slot back (the agent is gone), to the next waiting session.
    fn release(&self, session_id: &str) {
        let mut state = self.lock();
        state.holders.remove(session_id);
        state.dirty.remove(session_id);
        let next = state.book.release(session_id, Instant::now());
        Self::hand_over(&mut state, next);
    }

    /// A waiting session gives up (shutdown); a slot it was handed meanwhile goes on.
    fn cancel(&self, session_id: &str) {
        let mut state = self.lock();
        state.waiting.remove(session_id);
        state.holders.remove(session_id);
        state.dirty.remove(session_id);
        let next = state.book.cancel(session_id, Instant::now());
        Self::hand_over(&mut state, next);
    }

    /// Tells the session the book gave a slot to; if it is gone, the slot goes on.
    fn hand_over(state: &mut SlotState, mut next: Option<String>) {
        while let Some(id) = next.take() {
            let token = CancellationToken::new();
            let told = match state.waiting.remove(&id) {
                Some((session, tx)) => tx.send(token.clone()).is_ok().then_some(session),
                None => None,
            };
            match told {
                Some(session) => {
                    state.dirty.insert(id.clone());
                    state.holders.insert(id, (session, token));
                }
                None => next = state.book.release(&id, Instant::now()),
            }
        }
    }

    fn note_work(&self, session_id: &str) {
        self.lock().book.note_work(session_id, Instant::now());
    }

    /// An agent wrote something; `None`: perhaps any of them (notices were missed).
    fn note_output(&self, session_id: Option<&str>) {
        let now = Instant::now();
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            match session_id {
                Some(id) if state.holders.contains_key(id) => {
                    state.book.note_output(id, now);
                    state.dirty.insert(id.to_string());
                }
                Some(_) => return,
                None => {
                    for id in state.holders.keys() {
                        state.book.note_output(id, now);
                        state.dirty.insert(id.clone());
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    fn waiting(&self) -> usize {
        self.lock().book.waiting()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().book.next_deadline()
    }

    /// Holders to look at (`all`, or those marked), each with the epoch its observation
    /// starts at.
    fn to_observe(&self, all: bool) -> Vec<(SessionRecord, u64)> {
        let mut state = self.lock();
        let dirty = std::mem::take(&mut state.dirty);
        state
            .book
            .unasked()
            .into_iter()
            .filter(|id| all || dirty.contains(id))
            .filter_map(|id| {
                let epoch = state.book.epoch(&id)?;
                let (session, _) = state.holders.get(&id)?;
                Some((session.clone(), epoch))
            })
            .collect()
    }

    fn observed(&self, session_id: &str, epoch: u64, idle: bool) {
        let mut state = self.lock();
        if idle {
            state.book.note_idle(session_id, epoch);
        } else {
            state.book.note_busy(session_id);
        }
    }

    /// The agents to ask to give their slot back now, with their tokens.
    fn to_yield(&self) -> Vec<(String, CancellationToken)> {
        let mut state = self.lock();
        let chosen = state.book.to_yield(Instant::now());
        chosen
            .into_iter()
            .filter_map(|id| {
                let token = state.holders.get(&id)?.1.clone();
                Some((id, token))
            })
            .collect()
    }

    /// `None`: the agent gives its slot back now. `Some(token)`: new work arrived since
    /// it was asked, so it keeps its slot, with a fresh token.
    fn confirm_yield(&self, session_id: &str) -> Option<CancellationToken> {
        let mut state = self.lock();
        if state.book.confirm_yield(session_id, Instant::now()) {
            return None;
        }
        let token = CancellationToken::new();
        let holder = state.holders.get_mut(session_id)?;
        holder.1 = token.clone();
        Some(token)
    }
}

/// A held slot, given back when dropped (after the agent is gone).
struct SlotGuard {
    slots: Arc<Slots>,
    session: String,
    /// Cancelled when the agent is asked to give the slot back.
    token: CancellationToken,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(&self.session);
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
