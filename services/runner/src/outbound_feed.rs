//! `WatchOutbound`: every unsettled outbound row of every session, oldest first, then new
//! rows as agents write them. Woken by file-change notifications on `out/outbound.db`. A
//! missed notification is caught by a slow rescan of the sessions that may be writing (those
//! with an agent, or enqueued to or written by in the last [`RECENT`]), never of every
//! session: idle sessions cost nothing.
//!
//! Every row passes the host's [`OutboundPolicy`] first: a refused row (a destination the
//! session may not use, too big, too many) is settled as failed here, its agent is told
//! why, and it never enters the stream.
//!
//! Each stream keeps, per session, the highest seq it has sent, and reads only above it. A
//! row an operator reopens ([`OutboundFeed::reopened`]) lies below that mark, so a reopen
//! moves the mark of every stream back to just below the row: the row is sent again, and
//! so are the session's later rows still unsettled (in flight at delivery, whose ledger
//! and lanes keep them from going out twice, as after a reconnect).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferroclaw_mailbox::content::SystemIn;
use ferroclaw_mailbox::host::OutboundPage;
use ferroclaw_mailbox::wake::{DirsWatch, session_of};
use ferroclaw_mailbox::{HostMailbox, InboundContent, NewInbound, Origin, OutboundRow, Outcome};
use ferroclaw_proto::v1::OutboundMessage;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::{Result, RunnerError};
use crate::mailboxes::Mailboxes;
use crate::outbound_policy::{OutboundPolicy, Verdict};
use crate::registry::{Registry, SessionRecord};
use crate::supervisor::Supervisor;

/// Rescan of the active sessions when no notification came for this long.
const FALLBACK_RESCAN: Duration = Duration::from_secs(5);
/// A session without an agent counts as active (may write rows) this long after its last
/// enqueue or write: its agent may be about to start, or have just exited.
pub const RECENT: Duration = Duration::from_secs(30);
/// Refusal notices remembered (see `OutboundFeed::notices`).
const REMEMBERED_NOTICES: usize = 100_000;
/// Reopen notices a stream may fall behind by before it rereads every session from the
/// start (as a new stream would).
const REOPENS: usize = 256;
/// Rows read from one session at a time: an agent that wrote a million rows costs a page
/// of memory, not all of them.
const PAGE: usize = 500;
/// The longest one session's mailbox may take to read: an agent that holds its database
/// locked (or worse) is skipped for this scan, never waited on by every other session.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct OutboundFeed {
    registry: Registry,
    mailboxes: Arc<Mailboxes>,
    policy: OutboundPolicy,
    /// Wakes an agent that was sent a notice.
    supervisor: Supervisor,
    /// Notices of refused rows, by (session, inbound seq): rows answering one are refused
    /// without another notice, so an agent cannot loop on them.
    notices: std::sync::Mutex<std::collections::HashSet<(String, i64)>>,
    /// Session ids whose `outbound.db` changed.
    changes: broadcast::Sender<String>,
    /// Rows made unsettled again (session id, seq), to be sent again.
    reopens: broadcast::Sender<(String, i64)>,
    /// Sessions that may be writing rows: their `out/` is watched while they are here.
    active: Arc<std::sync::Mutex<HashMap<String, Active>>>,
    watch: DirsWatch,
    /// How often active sessions are read without a doorbell: [`FALLBACK_RESCAN`], or the
    /// polling baseline's interval, when doorbells are ignored.
    rescan: Duration,
    /// The polling baseline (`runner.outbound_poll_ms`): no `out/` is watched.
    polling: bool,
    /// Messages waiting for their first reply (the pipeline-stage metric).
    pub pending_replies: crate::metrics::PendingReplies,
}

/// A session that may be writing rows.
struct Active {
    /// When it last showed it (an enqueue, a doorbell).
    at: std::time::Instant,
    out_dir: PathBuf,
}

impl OutboundFeed {
    pub fn start(
        sessions_root: PathBuf,
        registry: Registry,
        mailboxes: Arc<Mailboxes>,
        policy: OutboundPolicy,
        supervisor: Supervisor,
        poll: Option<Duration>,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&sessions_root).map_err(|source| RunnerError::Io {
            path: sessions_root.clone(),
            source,
        })?;
        let (changes, _) = broadcast::channel(4096);
        let sender = changes.clone();
        let root = sessions_root.clone();
        let active: Arc<std::sync::Mutex<HashMap<String, Active>>> = Arc::default();
        let writing = active.clone();
        let watch = DirsWatch::new(move |path: &Path| {
            // The doorbell the agent rings after each commit. Not the database's own files:
            // the runner's reads create and remove its `-wal` and `-shm` too, and reacting to
            // them had every read wake another. An agent that never rings is still read by
            // the rescan of active sessions.
            if path.file_name().is_some_and(|n| n == "outbound.bell")
                && let Some((_, session)) = session_of(&root, path)
            {
                if let Ok(mut active) = writing.lock()
                    && let Some(entry) = active.get_mut(&session)
                {
                    entry.at = std::time::Instant::now();
                }
                let _ = sender.send(session);
            }
        })?;
        Ok(Arc::new(Self {
            registry,
            mailboxes,
            policy,
            supervisor,
            notices: Default::default(),
            changes,
            reopens: broadcast::channel(REOPENS).0,
            active,
            watch,
            rescan: poll.unwrap_or(FALLBACK_RESCAN),
            polling: poll.is_some(),
            pending_replies: Default::default(),
        }))
    }

    /// Notes that a session has work, so its agent may write rows: its `out/` is watched,
    /// and it is rescanned now and then in case a notification is missed, while it has an
    /// agent.
    pub fn note_active(&self, session: &SessionRecord) {
        let out_dir = self.mailboxes.paths(session).out_dir();
        let added = match self.active.lock() {
            Ok(mut active) => {
                let now = std::time::Instant::now();
                match active.get_mut(&session.id) {
                    Some(entry) => {
                        entry.at = now;
                        false
                    }
                    None => {
                        active.insert(
                            session.id.clone(),
                            Active {
                                at: now,
                                out_dir: out_dir.clone(),
                            },
                        );
                        true
                    }
                }
            }
            Err(_) => false,
        };
        if added
            && !self.polling
            && let Err(e) = self.watch.add(&out_dir)
        {
            // Its rows are still found by the rescan of active sessions.
            tracing::warn!(session = %session.id, error = %e, "cannot watch the session's out/");
        }
    }

    /// The sessions that may be writing rows: those with an agent, and those marked in the
    /// last [`RECENT`]. The others are forgotten until they are marked again.
    async fn active_sessions(&self) -> Vec<String> {
        // Agents started without an enqueue (recovery after a restart, the engine back)
        // are noted here.
        for session in self.supervisor.sessions_with_agents().await {
            let known = self
                .active
                .lock()
                .is_ok_and(|active| active.contains_key(&session));
            if !known && let Ok(Some(record)) = self.registry.get(&session).await {
                self.note_active(&record);
            }
        }
        let now = std::time::Instant::now();
        let marked: Vec<(String, std::time::Instant)> = match self.active.lock() {
            Ok(active) => active.iter().map(|(k, v)| (k.clone(), v.at)).collect(),
            Err(_) => return Vec::new(),
        };
        let mut live = Vec::with_capacity(marked.len());
        for (session, at) in marked {
            if now.duration_since(at) < RECENT || self.supervisor.state(&session).await.is_some() {
                live.push(session);
                continue;
            }
            let forgotten = match self.active.lock() {
                Ok(mut active) if active.get(&session).is_some_and(|a| a.at == at) => {
                    active.remove(&session)
                }
                _ => None,
            };
            if let Some(gone) = forgotten {
                self.watch.remove(&gone.out_dir);
            }
        }
        live
    }

    /// Forgets what the outbound policy keeps of sessions quiet for a minute (see
    /// [`OutboundPolicy::forget_quiet`]); how many.
    pub fn forget_quiet(&self) -> usize {
        self.policy.forget_quiet()
    }

    /// Session ids whose `out/` changed, from now on.
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Judges a row: `true` when it may be streamed. A refused row is settled as failed
    /// and its agent told why (once per batch).
    async fn admit(&self, session: &SessionRecord, row: &OutboundRow) -> Result<bool> {
        let mailbox = self.mailboxes.get(session).await?;
        let reason = match self.policy.judge(session, &mailbox, row).await? {
            Verdict::Send => return Ok(true),
            Verdict::Refuse(reason) => reason,
        };
        let first_time = mailbox
            .settle(row.seq, Outcome::Failed, None, Some(&reason))
            .await?;
        let told = first_time && self.tell_agent(session, &mailbox, row, &reason).await?;
        // One warning per notice: an agent writing thousands of bad rows floods no log.
        let shown: String = row.destination.chars().take(200).collect();
        if told {
            tracing::warn!(session = %session.id, agent = %session.agent, seq = row.seq,
                destination = %shown, %reason, "outbound row refused (further refusals of this batch are logged at debug)");
        } else {
            tracing::debug!(session = %session.id, seq = row.seq, destination = %shown, %reason,
                "outbound row refused");
        }
        Ok(false)
    }

    /// A system message to the agent: what was refused and why. `true` when a new notice
    /// was written (the first refusal of a batch).
    async fn tell_agent(
        &self,
        session: &SessionRecord,
        mailbox: &HostMailbox,
        row: &OutboundRow,
        reason: &str,
    ) -> Result<bool> {
        let batch = row.in_reply_to.unwrap_or(0);
        let answers_a_notice = self
            .notices
            .lock()
            .is_ok_and(|n| n.contains(&(session.id.clone(), batch)));
        if answers_a_notice {
            return Ok(false);
        }
        let Some(home) = mailbox.home_destination().await? else {
            return Ok(false);
        };
        let Ok(reply_to) = serde_json::from_str(&home) else {
            return Ok(false);
        };
        let notice = NewInbound {
            // One notice per batch, however many of its rows were refused.
            id: format!("refused:{batch}"),
            content: InboundContent::System(SystemIn {
                event: "delivery_refused".into(),
                text: format!("Your message was not sent: {reason}"),
                data: serde_json::json!({"out_seq": row.seq, "kind": row.kind}),
            }),
            origin: Origin {
                channel: "system".into(),
                conversation: String::new(),
                sender: "ferroclaw".into(),
                reply_to,
            },
            process_after: None,
            trace: None,
        };
        let enqueued = mailbox.enqueue(&notice).await?;
        if let Ok(mut notices) = self.notices.lock() {
            // Bounded: forgetting old notices costs at most one more notice, never a loop.
            if notices.len() >= REMEMBERED_NOTICES {
                notices.clear();
            }
            notices.insert((session.id.clone(), enqueued.seq));
        }
        if !enqueued.duplicate {
            self.note_active(session);
            self.registry.touch(&session.id).await?;
            self.supervisor.ensure(session).await;
        }
        Ok(!enqueued.duplicate)
    }

    /// Tells live streams that a session's outbound rows may have changed (used where the
    /// runner knows before the file watch does).
    pub fn poke(&self, session_id: &str) {
        let _ = self.changes.send(session_id.to_string());
    }

    /// Tells live streams that a row below their marks was made unsettled again (after
    /// the commit that reopened it): each sends it again.
    pub fn reopened(&self, session_id: &str, out_seq: i64) {
        let _ = self.reopens.send((session_id.to_string(), out_seq));
    }

    /// Starts streaming to one consumer; the stream ends when the receiver is dropped or the
    /// runner shuts down.
    pub fn subscribe(
        self: &Arc<Self>,
        consumer: String,
        shutdown: CancellationToken,
    ) -> mpsc::Receiver<Result<OutboundMessage, tonic::Status>> {
        let (tx, rx) = mpsc::channel(256);
        let changes = self.changes.subscribe();
        // Before the first scan, like `changes`: a reopen during it is not missed.
        let reopens = self.reopens.subscribe();
        let feed = self.clone();
        tokio::spawn(async move {
            tracing::info!(%consumer, "outbound consumer connected");
            let mut stream = Stream {
                feed,
                tx,
                sent_up_to: HashMap::new(),
                sessions: HashMap::new(),
                held: Default::default(),
            };
            match stream.run(changes, reopens, shutdown).await {
                Ok(()) | Err(StreamEnd::Disconnected) => {}
                Err(e) => tracing::warn!(%consumer, error = %e, "outbound stream ended"),
            }
            tracing::info!(%consumer, "outbound consumer gone");
        });
        rx
    }
}

/// One consumer's position: what has been sent to it, per session.
struct Stream {
    feed: Arc<OutboundFeed>,
    tx: mpsc::Sender<Result<OutboundMessage, tonic::Status>>,
    sent_up_to: HashMap<String, i64>,
    sessions: HashMap<String, SessionRecord>,
    /// Sessions whose next row could not be judged in this scan: the rest of their rows
    /// wait for the next scan, so their order holds.
    held: std::collections::HashSet<String>,
}

/// Why a stream stopped.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("consumer disconnected")]
    Disconnected,
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

impl Stream {
    async fn run(
        &mut self,
        mut changes: broadcast::Receiver<String>,
        mut reopens: broadcast::Receiver<(String, i64)>,
        shutdown: CancellationToken,
    ) -> Result<(), StreamEnd> {
        self.scan_all().await?;
        // Watches the sessions whose agents run already (recovered at start).
        self.feed.active_sessions().await;
        let mut rescan = tokio::time::interval(self.feed.rescan);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(session) => {
                        let mut dirty = vec![session];
                        // Coalesce the burst of events one SQLite commit produces.
                        while let Ok(more) = changes.try_recv() {
                            if !dirty.contains(&more) {
                                dirty.push(more);
                            }
                        }
                        for session in dirty {
                            self.scan_session(&session).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => self.scan_all().await?,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                reopen = reopens.recv() => match reopen {
                    Ok((session, seq)) => {
                        self.rewind(&session, seq);
                        self.scan_session(&session).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Which rows were reopened is lost: every unsettled row again.
                        self.sent_up_to.clear();
                        self.scan_all().await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = rescan.tick() => {
                    let live = self.feed.active_sessions().await;
                    for session in &live {
                        self.scan_session(session).await?;
                    }
                    self.forget_quiet(&live);
                }
                _ = self.tx.closed() => return Err(StreamEnd::Disconnected),
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Sends the unsettled rows of every session, oldest first across sessions.
    async fn scan_all(&mut self) -> Result<(), StreamEnd> {
        self.held.clear();
        let sessions = self
            .feed
            .registry
            .list_here()
            .await
            .map_err(StreamEnd::Runner)?;
        // Oldest first across sessions by the time the agent claims, but never out of seq
        // order within a session: each row sorts no earlier than the rows before it.
        let mut rows: Vec<(i64, SessionRecord, OutboundRow)> = Vec::new();
        let mut more = Vec::new();
        for session in sessions {
            let page = self.unsent(&session).await?;
            if let Some(after) = page.more_after {
                more.push((session.id.clone(), after));
            }
            let mut key = i64::MIN;
            for row in page.rows {
                key = key.max(row.created_at);
                rows.push((key, session.clone(), row));
            }
            self.sessions.insert(session.id.clone(), session);
        }
        rows.sort_by_key(|(key, _, _)| *key);
        for (_, session, row) in rows {
            self.send(&session, row).await?;
        }
        for (session, after) in more {
            if !self.held.contains(&session) {
                self.advance(&session, after);
                self.scan_session(&session).await?;
            }
        }
        Ok(())
    }

    async fn scan_session(&mut self, session_id: &str) -> Result<(), StreamEnd> {
        self.held.remove(session_id);
        let session = match self.sessions.get(session_id) {
            Some(s) => s.clone(),
            None => match self
                .feed
                .registry
                .get(session_id)
                .await
                .map_err(StreamEnd::Runner)?
            {
                Some(s) => {
                    self.sessions.insert(s.id.clone(), s.clone());
                    s
                }
                None => return Ok(()),
            },
        };
        loop {
            let page = self.unsent(&session).await?;
            for row in page.rows {
                self.send(&session, row).await?;
            }
            match page.more_after {
                Some(after) if !self.held.contains(&session.id) => self.advance(&session.id, after),
                _ => return Ok(()),
            }
        }
    }

    /// The rows of one session not yet sent. A session whose files cannot be read (a link
    /// planted in place of `outbound.db`, a broken file) is logged and left out: one
    /// session never ends the stream that carries every other session's replies.
    async fn unsent(&self, session: &SessionRecord) -> Result<OutboundPage, StreamEnd> {
        let after = self.sent_up_to.get(&session.id).copied().unwrap_or(0);
        let limit = self.feed.policy.max_row_bytes();
        let read = async {
            match self.feed.mailboxes.get(session).await {
                Ok(mailbox) => mailbox
                    .unsettled_page(after, limit, PAGE)
                    .await
                    .map_err(RunnerError::from),
                Err(e) => Err(e),
            }
        };
        let Ok(rows) = tokio::time::timeout(READ_TIMEOUT, read).await else {
            tracing::warn!(session = %session.id, "the session's outbound.db did not answer in time; skipped for now");
            return Ok(OutboundPage::default());
        };
        match rows {
            Ok(page) => Ok(page),
            Err(e) => {
                let tampered = matches!(
                    &e,
                    RunnerError::Mailbox(ferroclaw_mailbox::Error::File(f)) if f.is_tampering()
                );
                // Said once already, when the read first did not answer in time; the
                // agent may ring for more as often as it likes.
                let stuck = matches!(
                    &e,
                    RunnerError::Mailbox(ferroclaw_mailbox::Error::Stuck { .. })
                );
                if stuck {
                    tracing::debug!(session = %session.id, error = %e, "the session's replies wait");
                } else if tampered {
                    tracing::error!(session = %session.id, agent = %session.agent, error = %e,
                        "session files tampered with: its replies are not served");
                } else {
                    tracing::warn!(session = %session.id, error = %e, "cannot read the session's replies");
                }
                Ok(OutboundPage::default())
            }
        }
    }

    async fn send(&mut self, session: &SessionRecord, row: OutboundRow) -> Result<(), StreamEnd> {
        let seq = row.seq;
        if self.held.contains(&session.id) {
            return Ok(());
        }
        match self.feed.admit(session, &row).await {
            Ok(true) => {}
            Ok(false) => {
                crate::metrics::METRICS
                    .rows_refused
                    .with_label_values(&[&session.agent])
                    .inc();
                self.advance(&session.id, seq);
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(session = %session.id, seq, error = %e, "cannot judge an outbound row yet");
                self.held.insert(session.id.clone());
                return Ok(());
            }
        }
        if let Some(in_reply_to) = row.in_reply_to {
            let stage = crate::metrics::METRICS
                .pipeline_stage
                .with_label_values(&["enqueue_to_reply_written"]);
            for seconds in
                self.feed
                    .pending_replies
                    .replied(&session.id, in_reply_to, row.created_at)
            {
                stage.observe(seconds);
            }
        }
        let message = OutboundMessage {
            session_id: session.id.clone(),
            agent: session.agent.clone(),
            seq: row.seq,
            in_reply_to: row.in_reply_to.unwrap_or(0),
            created_at_ms: row.created_at,
            kind: row.kind,
            destination_json: row.destination,
            content_json: row.content,
            trace: row.trace.unwrap_or_default(),
        };
        self.tx
            .send(Ok(message))
            .await
            .map_err(|_| StreamEnd::Disconnected)?;
        self.advance(&session.id, seq);
        Ok(())
    }

    /// Drops the positions of the sessions that are no longer active: a quiet session
    /// costs the stream no memory. Its rows were read; should it write again, it is read
    /// from its first unsettled row, and a row in flight at delivery that is sent again is
    /// kept from going out twice there, as after a reconnect.
    fn forget_quiet(&mut self, live: &[String]) {
        let keep: std::collections::HashSet<&str> = live
            .iter()
            .map(String::as_str)
            .chain(self.held.iter().map(String::as_str))
            .collect();
        if self.sent_up_to.len() + self.sessions.len() <= keep.len() * 2 {
            return;
        }
        self.sent_up_to.retain(|id, _| keep.contains(id.as_str()));
        self.sessions.retain(|id, _| keep.contains(id.as_str()));
        self.sent_up_to.shrink_to_fit();
        self.sessions.shrink_to_fit();
    }

    /// Moves a session's position forward (never back: a resend must not repeat rows).
    fn advance(&mut self, session_id: &str, seq: i64) {
        let at = self.sent_up_to.entry(session_id.to_string()).or_insert(0);
        *at = (*at).max(seq);
    }

    /// Moves a session's position back to just below a reopened row, so the next read of
    /// the session starts with it.
    fn rewind(&mut self, session_id: &str, seq: i64) {
        if let Some(at) = self.sent_up_to.get_mut(session_id) {
            *at = (*at).min(seq.saturating_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclaw_mailbox::content::ChatOut;
    use ferroclaw_mailbox::{
        AgentMailbox, Destination, JournalMode, NewOutbound, OutboundContent, Reopen,
    };

    /// A feed over one session (no agent is ever started), its stream, and the agent's
    /// side of the session's mailbox.
    struct Fixture {
        feed: Arc<OutboundFeed>,
        session: SessionRecord,
        mailbox: Arc<HostMailbox>,
        agent: AgentMailbox,
        rx: mpsc::Receiver<Result<OutboundMessage, tonic::Status>>,
        shutdown: CancellationToken,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().to_path_buf();
        let shutdown = CancellationToken::new();
        let registry = Registry::open(&data.join("runner.db"))
            .await
            .expect("registry");
        let session = registry
            .get_or_create("main", "c", None)
            .await
            .expect("session");
        let mailboxes = Arc::new(Mailboxes::new(
            data.clone(),
            JournalMode::Wal,
            HashMap::new(),
        ));
        let mailbox = mailboxes.get(&session).await.expect("mailbox");
        // The host names the conversation as where replies go: the policy lets rows there.
        let home = NewInbound {
            id: "m1".into(),
            content: InboundContent::System(SystemIn {
                event: "test".into(),
                text: "hi".into(),
                data: serde_json::Value::Null,
            }),
            origin: Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: String::new(),
                reply_to: Destination::Api {
                    conversation: "c".into(),
                },
            },
            process_after: None,
            trace: None,
        };
        mailbox.enqueue(&home).await.expect("enqueue");
        let agent = AgentMailbox::open(mailboxes.paths(&session), JournalMode::Wal)
            .await
            .expect("agent mailbox");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let access = crate::credential_proxy::start(
            listener,
            None,
            &data,
            registry.clone(),
            &[],
            shutdown.clone(),
        )
        .await
        .expect("proxy");
        // Never started: no message asks for an agent.
        let binary = std::env::current_exe().expect("test binary");
        let backend = crate::backend::Backend::Process(
            crate::process_backend::ProcessBackend::new(
                binary,
                data.clone(),
                60,
                "wal".into(),
                1,
                access,
            )
            .expect("backend"),
        );
        let supervisor = Supervisor::new(
            backend,
            mailboxes.clone(),
            &[],
            crate::supervisor::SupervisorLimits {
                max_running_agents: 1,
                stuck_after: Duration::from_secs(60),
                max_batch: Duration::from_secs(60),
                disk: crate::disk_quota::DiskQuota {
                    session_bytes: 0,
                    agent_bytes: 0,
                    data_dir: data.clone(),
                },
            },
            shutdown.clone(),
        );
        let feed = OutboundFeed::start(
            data.join("sessions"),
            registry,
            mailboxes,
            OutboundPolicy::new(&ferroclaw_common::Config::default()),
            supervisor,
            Some(Duration::from_millis(100)),
        )
        .expect("feed");
        // Its agent has work, as when rows are written: the streams keep its position.
        feed.note_active(&session);
        let rx = feed.subscribe("test".into(), shutdown.clone());
        Fixture {
            feed,
            session,
            mailbox,
            agent,
            rx,
            shutdown,
            _dir: dir,
        }
    }

    impl Fixture {
        async fn write(&self, text: &str) -> i64 {
            let reply = NewOutbound {
                in_reply_to: None,
                destination: Destination::Api {
                    conversation: "c".into(),
                },
                content: OutboundContent::Chat(ChatOut { text: text.into() }),
                trace: None,
            };
            let seq = self.agent.send_now(&reply).await.expect("write");
            self.feed.poke(&self.session.id);
            seq
        }

        /// The seqs streamed within `wait`.
        async fn streamed(&mut self, wait: Duration) -> Vec<i64> {
            let mut seqs = Vec::new();
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(row)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
                seqs.push(row.expect("row").seq);
            }
            seqs
        }
    }

    #[tokio::test]
    async fn a_reopened_row_below_the_streams_mark_is_sent_again_once() {
        let mut f = fixture().await;
        let lost = f.write("lost in an outage").await;
        let delivered = f.write("delivered").await;
        assert_eq!(
            f.streamed(Duration::from_millis(500)).await,
            [lost, delivered]
        );
        f.mailbox
            .settle(lost, Outcome::Failed, None, Some("given up"))
            .await
            .expect("settle");
        f.mailbox
            .settle(delivered, Outcome::Delivered, Some("pm"), None)
            .await
            .expect("settle");
        let later = f.write("later").await;
        assert_eq!(f.streamed(Duration::from_millis(500)).await, [later]);

        // Unsettled again, but below what the stream has sent: a change notice alone does
        // not bring it back.
        assert_eq!(
            f.mailbox.reopen_failed(lost).await.expect("reopen"),
            Reopen::Reopened
        );
        f.feed.poke(&f.session.id);
        assert!(f.streamed(Duration::from_millis(300)).await.is_empty());

        // The reopen notice does; the later row, still unsettled (in flight at delivery),
        // comes along, and delivery's ledger keeps it from going out twice.
        f.feed.reopened(&f.session.id, lost);
        assert_eq!(f.streamed(Duration::from_millis(500)).await, [lost, later]);
        f.mailbox
            .settle(lost, Outcome::Delivered, Some("pm2"), None)
            .await
            .expect("settle");
        f.mailbox
            .settle(later, Outcome::Delivered, Some("pm3"), None)
            .await
            .expect("settle");
        // A repeated reopen changes nothing and sends nothing.
        assert_eq!(
            f.mailbox.reopen_failed(lost).await.expect("reopen"),
            Reopen::Delivered
        );
        f.feed.poke(&f.session.id);
        assert!(f.streamed(Duration::from_millis(300)).await.is_empty());

        // A stream that connects later finds reopened rows from the start.
        let lost_again = f.write("lost again").await;
        assert_eq!(f.streamed(Duration::from_millis(500)).await, [lost_again]);
        f.mailbox
            .settle(lost_again, Outcome::Failed, None, Some("given up"))
            .await
            .expect("settle");
        f.mailbox.reopen_failed(lost_again).await.expect("reopen");
        let mut late = f.feed.subscribe("late".into(), f.shutdown.clone());
        let first = tokio::time::timeout(Duration::from_secs(5), late.recv())
            .await
            .expect("a row")
            .expect("open")
            .expect("row");
        assert_eq!(first.seq, lost_again);
        f.shutdown.cancel();
        f.agent.close().await;
    }
}
