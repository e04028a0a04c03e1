//! `WatchActivity`: when an agent starts and finishes work on a batch, per reply
//! destination, so delivery can show a typing indicator. Work is a claimed batch in the
//! agent's `processing` table; it is re-read whenever the session's `out/` changes, and
//! sessions at work are re-read on a short timer in case a notification was missed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferroclaw_proto::v1::Activity;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::mailboxes::Mailboxes;
use crate::outbound_feed::OutboundFeed;
use crate::registry::{Registry, SessionRecord};

const RECHECK: Duration = Duration::from_secs(2);

type Sender = mpsc::Sender<Result<Activity, tonic::Status>>;

/// Streams activity to one subscriber until it goes away or the runner stops.
pub fn subscribe(
    feed: &OutboundFeed,
    registry: Registry,
    mailboxes: Arc<Mailboxes>,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<Activity, tonic::Status>> {
    let (tx, rx) = mpsc::channel(256);
    let changes = feed.changes();
    tokio::spawn(async move {
        let mut watcher = Watcher {
            registry,
            mailboxes,
            tx,
            working: HashMap::new(),
            sessions: HashMap::new(),
        };
        if let Err(e) = watcher.run(changes, shutdown).await {
            tracing::debug!(error = %e, "activity stream ended");
        }
    });
    rx
}

struct Watcher {
    registry: Registry,
    mailboxes: Arc<Mailboxes>,
    tx: Sender,
    /// Session → destinations it is working for, as last told.
    working: HashMap<String, HashSet<String>>,
    /// Sessions looked up once: every reply commit wakes this watcher.
    sessions: HashMap<String, SessionRecord>,
}

impl Watcher {
    async fn run(
        &mut self,
        mut changes: broadcast::Receiver<String>,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        self.check_all().await?;
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(session) => self.check(&session).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.check_all().await?,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = tokio::time::sleep(RECHECK), if !self.working.is_empty() => {
                    let busy: Vec<String> = self.working.keys().cloned().collect();
                    for session in busy {
                        self.check(&session).await?;
                    }
                }
                _ = self.tx.closed() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn check_all(&mut self) -> Result<(), String> {
        let sessions = self.registry.list_here().await.map_err(|e| e.to_string())?;
        for session in sessions {
            let id = session.id.clone();
            self.sessions.insert(id.clone(), session);
            self.check(&id).await?;
        }
        Ok(())
    }

    /// Compares a session's work with what was told and sends the differences.
    async fn check(&mut self, session_id: &str) -> Result<(), String> {
        let session = match self.sessions.get(session_id) {
            Some(s) => s.clone(),
            None => match self
                .registry
                .get(session_id)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(s) => {
                    self.sessions.insert(s.id.clone(), s.clone());
                    s
                }
                None => return Ok(()),
            },
        };
        let now: HashSet<String> = match self.mailboxes.get(&session).await {
            Ok(mailbox) => mailbox
                .working_destinations()
                .await
                .unwrap_or_default()
                .into_iter()
                .collect(),
            Err(_) => HashSet::new(),
        };
        let before = self.working.remove(session_id).unwrap_or_default();
        for (destination, working) in now
            .difference(&before)
            .map(|d| (d, true))
            .chain(before.difference(&now).map(|d| (d, false)))
        {
            let activity = Activity {
                session_id: session_id.to_string(),
                destination_json: destination.clone(),
                working,
            };
            self.tx
                .send(Ok(activity))
                .await
                .map_err(|_| "subscriber gone".to_string())?;
        }
        if !now.is_empty() {
            self.working.insert(session_id.to_string(), now);
        }
        Ok(())
    }
}
