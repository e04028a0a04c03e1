//! Host-side mailboxes, opened on demand and closed again when their session goes quiet.
//!
//! Every open mailbox holds SQLite connections, each with its own worker thread and file
//! descriptors. A session that is not in use costs nothing: a mailbox unused for
//! `runner.mailbox_idle_secs` is closed by [`Mailboxes::close_idle`], and at most
//! [`MAX_OPEN`] stay open at once (the least recently used go first). One still in use
//! elsewhere is never closed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroclaw_mailbox::{HostMailbox, JournalMode, SessionPaths};
use tokio::sync::Mutex;

use crate::error::Result;
use crate::registry::SessionRecord;

/// Mailboxes kept open at most (beyond that the least recently used are closed).
pub const MAX_OPEN: usize = 128;

pub struct Mailboxes {
    data_dir: PathBuf,
    mode: JournalMode,
    open: Mutex<HashMap<String, Open>>,
    /// Session facts written into each mailbox's `meta` table when it is opened.
    meta: HashMap<String, Vec<(String, String)>>,
}

struct Open {
    mailbox: Arc<HostMailbox>,
    last_used: Instant,
}

impl Mailboxes {
    pub fn new(
        data_dir: PathBuf,
        mode: JournalMode,
        meta: HashMap<String, Vec<(String, String)>>,
    ) -> Self {
        Self {
            data_dir,
            mode,
            open: Mutex::new(HashMap::new()),
            meta,
        }
    }

    pub fn paths(&self, session: &SessionRecord) -> SessionPaths {
        SessionPaths::under(&self.data_dir, &session.agent, &session.id)
    }

    /// The session's mailbox, opening it (and creating its directory and `inbound.db` on
    /// first use) when it is not open.
    pub async fn get(&self, session: &SessionRecord) -> Result<Arc<HostMailbox>> {
        let mut open = self.open.lock().await;
        if let Some(entry) = open.get_mut(&session.id) {
            entry.last_used = Instant::now();
            let mailbox = entry.mailbox.clone();
            if session.fence > mailbox.fence() {
                // Placed here again since it was opened (a takeover): the new token holds.
                mailbox.hold_fence(session.fence).await?;
            }
            return Ok(mailbox);
        }
        let mailbox = HostMailbox::open(self.paths(session), self.mode).await?;
        if session.fence > 0 {
            // Several runners: every write from now on checks this runner still holds it.
            if let Err(e) = mailbox.hold_fence(session.fence).await {
                mailbox.close().await;
                return Err(e.into());
            }
        }
        mailbox.set_meta("session_id", &session.id).await?;
        mailbox.set_meta("agent", &session.agent).await?;
        for (key, value) in self.meta.get(&session.agent).into_iter().flatten() {
            mailbox.set_meta(key, value).await?;
        }
        let mailbox = Arc::new(mailbox);
        open.insert(
            session.id.clone(),
            Open {
                mailbox: mailbox.clone(),
                last_used: Instant::now(),
            },
        );
        let over = open.len().saturating_sub(MAX_OPEN);
        let evicted = if over > 0 {
            take_unused(&mut open, over, None)
        } else {
            Vec::new()
        };
        drop(open);
        close(evicted).await;
        Ok(mailbox)
    }

    /// Closes the mailboxes unused for `idle` that nobody holds; returns how many.
    pub async fn close_idle(&self, idle: Duration) -> usize {
        let closed = {
            let mut open = self.open.lock().await;
            take_unused(&mut open, usize::MAX, Some(idle))
        };
        let n = closed.len();
        // Waited for here (the sweeper has nothing else to do): their memory is given back
        // once this returns.
        for mailbox in closed {
            mailbox.close().await;
        }
        n
    }

    /// Mailboxes open right now.
    pub async fn open_count(&self) -> usize {
        self.open.lock().await.len()
    }

    pub async fn close_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().await);
        close(open.into_values().map(|o| o.mailbox).collect()).await;
    }
}

/// Removes up to `n` mailboxes nobody else holds, least recently used first; with `idle`,
/// only those unused at least that long.
fn take_unused(
    open: &mut HashMap<String, Open>,
    n: usize,
    idle: Option<Duration>,
) -> Vec<Arc<HostMailbox>> {
    let now = Instant::now();
    let mut candidates: Vec<(Instant, String)> = open
        .iter()
        .filter(|(_, o)| Arc::strong_count(&o.mailbox) == 1)
        .filter(|(_, o)| idle.is_none_or(|idle| now.duration_since(o.last_used) >= idle))
        .map(|(id, o)| (o.last_used, id.clone()))
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .take(n)
        .filter_map(|(_, id)| open.remove(&id).map(|o| o.mailbox))
        .collect()
}

/// Closes mailboxes in the background: a close waits for its connections, and nothing
/// else should wait for that.
async fn close(mailboxes: Vec<Arc<HostMailbox>>) {
    for mailbox in mailboxes {
        tokio::spawn(async move {
            let started = Instant::now();
            mailbox.close().await;
            tracing::debug!(took = ?started.elapsed(), "mailbox closed");
        });
    }
}
