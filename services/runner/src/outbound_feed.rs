//! `WatchOutbound`: every unsettled outbound row of every session, oldest first, then new
//! rows as agents write them. Woken by file-change notifications on `out/outbound.db`. A
//! missed notification is caught by a slow rescan of the sessions that may be writing (those
//! with an agent, or enqueued to or written by in the last [`RECENT`]), never of every
//! session: idle sessions cost nothing.
//!
//! Every row passes the host's [`OutboundPolicy`] first: a refused row (a destination the
//! session may not use, too big, too many) is settled as failed here, its agent is told
//! why, and it never enters the stream.

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

    /// Starts streaming to one consumer; the stream ends when the receiver is dropped or the
    /// runner shuts down.
    pub fn subscribe(
        self: &Arc<Self>,
        consumer: String,
        shutdown: CancellationToken,
    ) -> mpsc::Receiver<Result<OutboundMessage, tonic::Status>> {
        let (tx, rx) = mpsc::channel(256);
        let changes = self.changes.subscribe();
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
            match stream.run(changes, shutdown).await {
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
                _ = rescan.tick() => {
                    for session in self.feed.active_sessions().await {
                        self.scan_session(&session).await?;
                    }
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
            .list(None)
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
                if tampered {
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

    /// Moves a session's position forward (never back: a resend must not repeat rows).
    fn advance(&mut self, session_id: &str, seq: i64) {
        let at = self.sent_up_to.entry(session_id.to_string()).or_insert(0);
        *at = (*at).max(seq);
    }
}
