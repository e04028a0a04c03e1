//! The host's reader of the agent's `out/outbound.db`: a file a hostile agent may have
//! shaped, read by a service that serves every other session too.
//!
//! SQLite opens a database's journal, WAL and shm by name, and the agent owns `out/`: a FIFO
//! planted as `outbound.db-journal` makes SQLite's `open` wait for a writer that never
//! comes, and no budget inside SQLite can interrupt that. So every call here runs on a
//! blocking thread, one call per session at a time (the turn), and its caller waits for it
//! at most [`CALL_WAIT`] and then gets [`Error::Stuck`]. A call stuck that way holds one
//! blocking thread and the session's turn until it returns; later callers get
//! [`Error::Stuck`] at once instead of piling up threads behind it. The turn belongs to the
//! file, not to one `AgentFile`: a mailbox closed and opened again while a call is stuck
//! (the runner closes idle mailboxes) finds the turn still taken. Calls that only run long
//! inside SQLite are interrupted by the connection's own budget ([`UNTRUSTED_CALL_BUDGET`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::db::{Db, UNTRUSTED_CALL_BUDGET};
use crate::error::{Error, Result, io_at};
use crate::paths::SessionPaths;
use crate::schema;
use crate::session_fs::{self, FileType};

/// The agent's database, directly in `out/`.
pub(crate) const OUTBOUND_DB: &str = "outbound.db";

/// The longest a caller waits for its turn, and then for its call: the connection's own
/// budget, and a second for SQLite to report the interrupt.
pub(crate) const CALL_WAIT: Duration = UNTRUSTED_CALL_BUDGET.saturating_add(Duration::from_secs(1));

/// `busy_since` when no call runs.
const IDLE: u64 = u64::MAX;

/// Milliseconds on one clock for the whole process.
fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(IDLE - 1)
}

pub(crate) struct AgentFile {
    paths: SessionPaths,
    /// The connection, once the agent has created and initialised the file. Holding this
    /// lock is a call's turn.
    turn: Arc<Mutex<Option<Db>>>,
    /// When the running call took its turn (ms on [`now_ms`]), or [`IDLE`].
    busy_since: Arc<AtomicU64>,
}

/// The turn of each agent file some `AgentFile` or running call still holds, by path.
type Turns = HashMap<PathBuf, (Weak<Mutex<Option<Db>>>, Arc<AtomicU64>)>;
static TURNS: LazyLock<std::sync::Mutex<Turns>> = LazyLock::new(Default::default);

impl AgentFile {
    pub(crate) fn new(paths: SessionPaths) -> Self {
        let path = paths.outbound_db();
        let mut turns = TURNS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((turn, busy_since)) = turns.get(&path)
            && let Some(turn) = turn.upgrade()
        {
            let busy_since = busy_since.clone();
            return Self {
                paths,
                turn,
                busy_since,
            };
        }
        // Forget the files nobody holds any more, now and then, not on every open.
        if turns.len() >= 64 && turns.len().is_power_of_two() {
            turns.retain(|_, (turn, _)| turn.strong_count() > 0);
        }
        let turn = Arc::new(Mutex::new(None));
        let busy_since = Arc::new(AtomicU64::new(IDLE));
        turns.insert(path, (Arc::downgrade(&turn), busy_since.clone()));
        Self {
            paths,
            turn,
            busy_since,
        }
    }

    /// Runs `read` on the agent's file; `None` while the agent has not created it.
    pub(crate) async fn read<T, F>(&self, read: F) -> Result<Option<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let turn = self.take_turn().await?;
        let busy_since = self.busy_since.clone();
        busy_since.store(now_ms(), Ordering::SeqCst);
        let paths = self.paths.clone();
        let call = tokio::task::spawn_blocking(move || {
            let mut turn = turn;
            let result = match open(&paths, &mut turn) {
                Ok(Some(db)) => db.read(read).map(Some),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            // Idle before the turn is given back, so the next caller never sees a
            // finished call as stuck.
            busy_since.store(IDLE, Ordering::SeqCst);
            drop(turn);
            result
        });
        match tokio::time::timeout(CALL_WAIT, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(joined)) if joined.is_panic() => std::panic::resume_unwind(joined.into_panic()),
            // Cancelled: the runtime is shutting down.
            Ok(Err(_)) | Err(_) => Err(self.stuck()),
        }
    }

    /// The turn, as soon as the running call (if any) gives it back; [`Error::Stuck`] at
    /// once when that call has run past [`CALL_WAIT`], or when it does while we wait.
    async fn take_turn(&self) -> Result<OwnedMutexGuard<Option<Db>>> {
        if let Ok(turn) = self.turn.clone().try_lock_owned() {
            return Ok(turn);
        }
        let running = running_for(&self.busy_since).unwrap_or_default();
        if running >= CALL_WAIT {
            return Err(self.stuck());
        }
        tokio::time::timeout(
            CALL_WAIT.saturating_sub(running),
            self.turn.clone().lock_owned(),
        )
        .await
        .map_err(|_| self.stuck())
    }

    fn stuck(&self) -> Error {
        Error::Stuck {
            path: self.paths.outbound_db(),
            waited: CALL_WAIT,
        }
    }

    /// Closes the connection, unless a call holds it now: that call's turn then keeps it
    /// until it returns, and it is closed when the last of them lets go.
    pub(crate) fn close(&self) {
        if let Ok(mut slot) = self.turn.try_lock()
            && let Some(db) = slot.take()
        {
            db.close();
        }
    }
}

impl Drop for AgentFile {
    /// Forgets the file's turn when nothing else holds it (no other `AgentFile`, no call
    /// still running), so a quiet runner keeps no entry per session it ever read.
    fn drop(&mut self) {
        let mut turns = TURNS.lock().unwrap_or_else(|p| p.into_inner());
        // Under the map's lock nobody can take a new hold of this turn meanwhile.
        if Arc::strong_count(&self.turn) == 1 {
            turns.remove(&self.paths.outbound_db());
        }
    }
}

/// How long the call that holds the turn has been running; `None` when none runs.
fn running_for(busy_since: &AtomicU64) -> Option<Duration> {
    let since = busy_since.load(Ordering::SeqCst);
    (since != IDLE).then(|| Duration::from_millis(now_ms().saturating_sub(since)))
}

/// Whether a call on the agent file at `paths` has run past [`CALL_WAIT`] and still holds
/// its turn: other readers of that file (the console's view) should not try it either.
pub(crate) fn is_stuck(paths: &SessionPaths) -> bool {
    let turns = TURNS.lock().unwrap_or_else(|p| p.into_inner());
    turns
        .get(&paths.outbound_db())
        .is_some_and(|(turn, busy_since)| {
            turn.strong_count() > 0 && running_for(busy_since).is_some_and(|r| r >= CALL_WAIT)
        })
}

/// The connection in `slot`, opened first if needed; `None` while the agent has not
/// created and initialised `outbound.db`. Runs on a blocking thread.
fn open<'a>(paths: &SessionPaths, slot: &'a mut Option<Db>) -> Result<Option<&'a Db>> {
    if slot.is_none() {
        *slot = open_checked(paths)?;
    }
    Ok(slot.as_ref())
}

/// Opens `outbound.db` if it is a regular file in `out/` with the current schema.
fn open_checked(paths: &SessionPaths) -> Result<Option<Db>> {
    let Some(real) = outbound_db_in_place(paths)? else {
        return Ok(None);
    };
    let db = Db::open_untrusted(&paths.outbound_db(), &real)?;
    if !schema::check_version(&db, schema::OUTBOUND_VERSION)? {
        db.close();
        return Ok(None);
    }
    Ok(Some(db))
}

/// The real path of the agent's `outbound.db` (the directories above it resolved), once
/// it is a regular file in its place; `None` while `out/` or the file is not there. The
/// agent owns `out/`: a link there (to another session's file or a host file) or a FIFO
/// (whose open would stall the reader) is refused. What SQLite then opens by this name is
/// compared with it after the open, which catches a link swapped in between.
pub(crate) fn outbound_db_in_place(paths: &SessionPaths) -> Result<Option<PathBuf>> {
    let out = match session_fs::Dir::open(&paths.out_dir()) {
        Ok(out) => out,
        Err(session_fs::FsError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match out.entry(OUTBOUND_DB)? {
        None => return Ok(None),
        Some(entry) if entry.kind != FileType::RegularFile => {
            return Err(session_fs::FsError::NotRegular {
                path: paths.outbound_db(),
                kind: session_fs::kind_name(entry.kind),
            }
            .into());
        }
        Some(_) => {}
    }
    let real = std::fs::canonicalize(out.path()).map_err(io_at(out.path()))?;
    Ok(Some(real.join(OUTBOUND_DB)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(paths: &SessionPaths) -> bool {
        TURNS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&paths.outbound_db())
    }

    /// The map of turns holds a file while an `AgentFile` for it lives, and forgets it
    /// with the last one.
    #[test]
    fn a_files_turn_is_forgotten_with_its_last_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SessionPaths::new(dir.path());
        let first = AgentFile::new(paths.clone());
        let second = AgentFile::new(paths.clone());
        assert!(Arc::ptr_eq(&first.turn, &second.turn), "one turn per file");
        drop(first);
        assert!(known(&paths));
        drop(second);
        assert!(!known(&paths));
    }
}
