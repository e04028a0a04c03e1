//! `WatchOutbound`: every unsettled outbound row of every session, oldest first, then new
//! rows as agents write them. Woken by file-change notifications on `out/outbound.db`, with
//! a slow fallback rescan in case a notification is missed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferroclaw_mailbox::OutboundRow;
use ferroclaw_mailbox::wake::{DirWatch, file_name_starts_with, session_of};
use ferroclaw_proto::v1::OutboundMessage;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::{Result, RunnerError};
use crate::mailboxes::Mailboxes;
use crate::registry::{Registry, SessionRecord};

/// Rescan of every session when no notification came for this long.
const FALLBACK_RESCAN: Duration = Duration::from_secs(5);

pub struct OutboundFeed {
    registry: Registry,
    mailboxes: Arc<Mailboxes>,
    /// Session ids whose `outbound.db` changed.
    changes: broadcast::Sender<String>,
    _watch: DirWatch,
}

impl OutboundFeed {
    pub fn start(
        sessions_root: PathBuf,
        registry: Registry,
        mailboxes: Arc<Mailboxes>,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&sessions_root).map_err(|source| RunnerError::Io {
            path: sessions_root.clone(),
            source,
        })?;
        let (changes, _) = broadcast::channel(4096);
        let sender = changes.clone();
        let root = sessions_root.clone();
        let watch = DirWatch::new(&sessions_root, true, move |path: &Path| {
            // outbound.db, its journal or WAL, and the doorbell rung after each commit.
            if file_name_starts_with(path, "outbound.")
                && let Some((_, session)) = session_of(&root, path)
            {
                let _ = sender.send(session);
            }
        })?;
        Ok(Arc::new(Self {
            registry,
            mailboxes,
            changes,
            _watch: watch,
        }))
    }

    /// Session ids whose `out/` changed, from now on.
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
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
                _ = tokio::time::sleep(FALLBACK_RESCAN) => self.scan_all().await?,
                _ = self.tx.closed() => return Err(StreamEnd::Disconnected),
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Sends the unsettled rows of every session, oldest first across sessions.
    async fn scan_all(&mut self) -> Result<(), StreamEnd> {
        let sessions = self
            .feed
            .registry
            .list(None)
            .await
            .map_err(StreamEnd::Runner)?;
        let mut rows: Vec<(SessionRecord, OutboundRow)> = Vec::new();
        for session in sessions {
            for row in self.unsent(&session).await? {
                rows.push((session.clone(), row));
            }
            self.sessions.insert(session.id.clone(), session);
        }
        rows.sort_by_key(|(_, row)| row.created_at);
        for (session, row) in rows {
            self.send(&session, row).await?;
        }
        Ok(())
    }

    async fn scan_session(&mut self, session_id: &str) -> Result<(), StreamEnd> {
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
        for row in self.unsent(&session).await? {
            self.send(&session, row).await?;
        }
        Ok(())
    }

    /// The rows of one session not yet sent. A session whose files cannot be read (a link
    /// planted in place of `outbound.db`, a broken file) is logged and left out: one
    /// session never ends the stream that carries every other session's replies.
    async fn unsent(&self, session: &SessionRecord) -> Result<Vec<OutboundRow>, StreamEnd> {
        let after = self.sent_up_to.get(&session.id).copied().unwrap_or(0);
        let rows = match self.feed.mailboxes.get(session).await {
            Ok(mailbox) => mailbox
                .unsettled_after(after)
                .await
                .map_err(RunnerError::from),
            Err(e) => Err(e),
        };
        match rows {
            Ok(rows) => Ok(rows),
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
                Ok(Vec::new())
            }
        }
    }

    async fn send(&mut self, session: &SessionRecord, row: OutboundRow) -> Result<(), StreamEnd> {
        let seq = row.seq;
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
        self.sent_up_to.insert(session.id.clone(), seq);
        Ok(())
    }
}
