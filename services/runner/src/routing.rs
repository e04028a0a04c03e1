//! Which runner a session's call is for, when several serve ([`crate::placement`]), and
//! the moves that follow from it: placing a session never placed, and moving the messages
//! kept for this runner while it was missing ([`crate::handoff`]) into their mailboxes.

use std::collections::HashSet;
use std::sync::Arc;

use crate::error::{Result, RunnerError};
use crate::handoff;
use crate::placement::{Placement, Route};
use crate::registry::SessionRecord;
use crate::service::RunnerService;

impl RunnerService {
    /// Where calls for `session` go, with the session as last recorded. A call that came
    /// forwarded is never forwarded again: when the session is not here (placements moved
    /// meanwhile), the caller is told to try again.
    pub(crate) async fn route_of(
        &self,
        session: SessionRecord,
        forwarded: bool,
    ) -> Result<(SessionRecord, Route)> {
        let Some(placement) = &self.placement else {
            return Ok((session, Route::Here));
        };
        let mut session = session;
        if session.runner.is_none() {
            session = self.place_unplaced(placement, session).await?;
        }
        let mut route = placement.route(&session)?;
        if !matches!(route, Route::Here) {
            // What is remembered may be stale (a takeover): decide on the row as it is.
            if let Some(fresh) = self.registry.get_fresh(&session.id).await?
                && fresh.runner != session.runner
            {
                session = fresh;
                route = placement.route(&session)?;
            }
        }
        if matches!(route, Route::Missing { .. }) {
            // The runners as last read may be a few seconds old: one that just returned
            // is not missing.
            placement.read_peers().await?;
            route = placement.route(&session)?;
        }
        if forwarded && !matches!(route, Route::Here) {
            return Err(RunnerError::Unavailable(format!(
                "session {} is not on runner {} (it is on {}); try again",
                session.id,
                placement.id(),
                session.runner.as_deref().unwrap_or("no runner")
            )));
        }
        Ok((session, route))
    }

    /// Places a session from before placement (a single runner's): on this runner when its
    /// files are here, else where a new session would go.
    async fn place_unplaced(
        &self,
        placement: &Arc<Placement>,
        session: SessionRecord,
    ) -> Result<SessionRecord> {
        let here = self.mailboxes.paths(&session).inbound_db().exists();
        let target = if here {
            placement.id().to_string()
        } else {
            placement.choose(&session.agent, &session.conversation_key)
        };
        match self.registry.place(&session.id, None, &target).await? {
            Some(placed) => Ok(placed),
            // Another runner placed it first.
            None => self
                .registry
                .get_fresh(&session.id)
                .await?
                .ok_or_else(|| RunnerError::NotFound(format!("no session {:?}", session.id))),
        }
    }

    /// The error for a call that needs a session whose runner is missing.
    pub(crate) fn missing(session: &SessionRecord, runner: &str) -> RunnerError {
        RunnerError::Unavailable(format!(
            "session {} waits for runner {runner}, which is missing (its lease ran out); \
             try again when it is back",
            session.id
        ))
    }

    /// Moves the messages kept for this runner's sessions while it was missing into their
    /// mailboxes, in the order they came; how many were moved. A session whose mailbox
    /// refuses one (its files broken, or over its disk quota) keeps its messages for the
    /// next round, and never holds up the other sessions'.
    pub(crate) async fn move_waiting(&self) -> Result<usize> {
        let Some(placement) = &self.placement else {
            return Ok(0);
        };
        // One mover at a time: two would not lose anything, but could reorder.
        let _moving = self.moving.lock().await;
        let mut moved = 0;
        let mut stuck: HashSet<String> = HashSet::new();
        let mut after = 0;
        loop {
            let waiting = handoff::waiting_for(placement.pool(), placement.id(), after).await?;
            if waiting.is_empty() {
                return Ok(moved);
            }
            for w in waiting {
                after = w.n;
                if stuck.contains(&w.session_id) {
                    continue;
                }
                match self.registry.get_fresh(&w.session_id).await? {
                    Some(session) if self.registry.is_here(&session) => {
                        match self.parse_enqueue(&w.request) {
                            Ok(message) => {
                                if let Err(status) = self.append(&session, &message).await {
                                    tracing::warn!(session = %session.id, %status,
                                        "kept messages cannot enter the session's mailbox yet");
                                    stuck.insert(w.session_id);
                                    continue;
                                }
                            }
                            Err(e) => {
                                // Checked when it was kept: only a changed config lands here.
                                tracing::error!(session = %session.id, error = %e,
                                    "a kept message is no longer valid; it is dropped");
                            }
                        }
                    }
                    // Moved elsewhere meanwhile: its new runner moves it.
                    Some(_) => continue,
                    None => {
                        tracing::warn!(session = %w.session_id, "a kept message's session is gone");
                    }
                }
                handoff::moved(placement.pool(), w.n).await?;
                moved += 1;
            }
        }
    }

    /// Whether messages for `session_id` may have been kept that are not in its mailbox
    /// yet: this runner registered a moment ago (the others see it live only once they
    /// read the runners again), or took the session over a moment ago (from a missing
    /// runner, whose messages were kept until then).
    pub(crate) fn may_have_waiting(&self, session_id: &str) -> bool {
        let window = crate::placement::RENEW_EVERY * 3;
        let Some(placement) = &self.placement else {
            return false;
        };
        placement.registered.elapsed() < window
            || self.taken.lock().is_ok_and(|taken| {
                taken
                    .get(session_id)
                    .is_some_and(|at| at.elapsed() < window)
            })
    }

    /// Notes that this runner just took `sessions` over (see `may_have_waiting`).
    pub(crate) fn note_taken(&self, sessions: &[SessionRecord]) {
        let window = crate::placement::RENEW_EVERY * 3;
        if let Ok(mut taken) = self.taken.lock() {
            taken.retain(|_, at| at.elapsed() < window);
            let now = std::time::Instant::now();
            for session in sessions {
                taken.insert(session.id.clone(), now);
            }
        }
    }
}
