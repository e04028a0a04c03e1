//! Open host-side mailboxes, one per session, kept for reuse.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ferroclaw_mailbox::{HostMailbox, JournalMode, SessionPaths};
use tokio::sync::Mutex;

use crate::error::Result;
use crate::registry::SessionRecord;

pub struct Mailboxes {
    data_dir: PathBuf,
    mode: JournalMode,
    open: Mutex<HashMap<String, Arc<HostMailbox>>>,
    /// Session facts written into each mailbox's `meta` table when it is first opened.
    meta: HashMap<String, Vec<(String, String)>>,
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

    /// The session's mailbox, creating its directory and `inbound.db` on first use.
    pub async fn get(&self, session: &SessionRecord) -> Result<Arc<HostMailbox>> {
        let mut open = self.open.lock().await;
        if let Some(mailbox) = open.get(&session.id) {
            return Ok(mailbox.clone());
        }
        let mailbox = HostMailbox::open(self.paths(session), self.mode).await?;
        mailbox.set_meta("session_id", &session.id).await?;
        mailbox.set_meta("agent", &session.agent).await?;
        for (key, value) in self.meta.get(&session.agent).into_iter().flatten() {
            mailbox.set_meta(key, value).await?;
        }
        let mailbox = Arc::new(mailbox);
        open.insert(session.id.clone(), mailbox.clone());
        Ok(mailbox)
    }

    pub async fn close_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().await);
        for mailbox in open.values() {
            mailbox.close().await;
        }
    }
}
