//! Opening the mailbox databases and running statements on them.
//!
//! Statements run on the caller's thread. A mailbox statement on a WAL file takes
//! microseconds and never waits for the other side (readers and the one writer do not block
//! each other), so a hop to another thread and back, once per statement, cost more than the
//! statement: that hop was most of the runner's CPU per message. Two things may wait, and
//! those run where blocking is allowed (`tokio::task::block_in_place` on a multi-threaded
//! runtime), so they never stall the other tasks of a service:
//! - a statement that finds the file locked by the other side (`SQLITE_BUSY`, which a WAL
//!   file gives only while it is recovered, and a DELETE-journal file whenever the sides
//!   meet) is tried again there, waiting up to [`BUSY_TIMEOUT`];
//! - a commit to a DELETE-journal file, which syncs the file to disk (`synchronous = FULL`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::error::{Error, Result, SqliteContext};

/// How long a connection waits for a lock held by the other side before it reports busy.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Prepared statements kept per connection (each mailbox side uses fewer than this).
const STATEMENT_CACHE: usize = 32;

/// Journal mode of the session databases.
///
/// DELETE is the default: WAL's shared-memory file is not safe across VM-backed mounts
/// (Docker Desktop). WAL may be chosen on Linux hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JournalMode {
    #[default]
    Delete,
    Wal,
}

impl std::fmt::Display for JournalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Delete => "delete",
            Self::Wal => "wal",
        })
    }
}

impl FromStr for JournalMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "delete" => Ok(Self::Delete),
            "wal" => Ok(Self::Wal),
            other => Err(format!(
                "unknown journal mode {other:?} (expected delete or wal)"
            )),
        }
    }
}

/// One SQLite connection to one mailbox file, shared by the tasks of its side.
pub(crate) struct Db {
    /// `None` once closed.
    conn: Mutex<Option<Connection>>,
    path: PathBuf,
    /// Its writes end in a sync to disk (DELETE journal): they run where blocking is allowed.
    syncs_on_commit: bool,
}

impl Db {
    /// The one connection that may write the file. One writer per file: its owner opens it.
    pub(crate) fn open_writer(path: &Path, mode: JournalMode) -> Result<Self> {
        let conn = may_block(|| {
            Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
        })
        .at(path)?;
        conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
        // DELETE needs FULL to survive power loss uncorrupted; WAL is safe with NORMAL, which
        // skips the fsync per commit (a power cut may lose the last commits, never
        // consistency; a process crash loses nothing either way).
        let (journal, synchronous) = match mode {
            JournalMode::Delete => ("delete", "full"),
            JournalMode::Wal => ("wal", "normal"),
        };
        may_block(|| {
            conn.query_row(&format!("PRAGMA journal_mode = {journal}"), [], |_| Ok(()))?;
            conn.execute_batch(&format!("PRAGMA synchronous = {synchronous}"))
        })
        .at(path)?;
        Self::ready(conn, path, mode == JournalMode::Delete)
    }

    /// A read-only connection to the file the other side writes.
    ///
    /// `expected`, where given, is the file's real path (the directories above it
    /// resolved): the host passes it for the agent's `outbound.db`. SQLite resolves every
    /// link in a name before it opens it, then opens with `O_NOFOLLOW`; so checking the name
    /// it reports against `expected` after the open catches a link swapped in between the
    /// caller's check and the open, without a race.
    pub(crate) fn open_reader(path: &Path, expected: Option<&Path>) -> Result<Self> {
        let conn = may_block(|| {
            Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
        })
        .at(path)?;
        conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
        if let Some(expected) = expected {
            let opened: String = conn
                .query_row(
                    "SELECT file FROM pragma_database_list WHERE name = 'main'",
                    [],
                    |row| row.get(0),
                )
                .at(path)?;
            if Path::new(&opened) != expected {
                return Err(Error::Refused {
                    path: path.to_path_buf(),
                    why: format!(
                        "{} led to {opened}: a link was planted in its place",
                        expected.display()
                    ),
                });
            }
        }
        Self::ready(conn, path, false)
    }

    /// An opened connection, set up for [`Db::run`]: it reports a lock at once (busy
    /// timeout 0) unless a call waits for it.
    fn ready(conn: Connection, path: &Path, syncs_on_commit: bool) -> Result<Self> {
        conn.busy_timeout(Duration::ZERO).at(path)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Self {
            conn: Mutex::new(Some(conn)),
            path: path.to_path_buf(),
            syncs_on_commit,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `read` (statements that write nothing) on the connection.
    pub(crate) fn read<T>(
        &self,
        read: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.run(false, read)
    }

    /// Runs `write` on the connection: statements that write, or a transaction that does.
    pub(crate) fn write<T>(
        &self,
        write: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.run(self.syncs_on_commit, write)
    }

    /// Runs `work` on the caller's thread unless it may wait; if the file was locked
    /// (`SQLITE_BUSY`), runs it again where blocking is allowed, waiting for the lock.
    /// `work` must be safe to run twice: a failed attempt has changed nothing (a
    /// transaction that meets a lock is rolled back when its handle drops).
    fn run<T>(
        &self,
        may_wait: bool,
        mut work: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        if !may_wait {
            let attempt = match self.conn.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                // Another task is using the connection: wait for it below.
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut guard) = attempt {
                let conn = self.open_conn(&mut guard)?;
                match work(conn) {
                    Err(e) if is_busy(&e) => {}
                    done => return done.at(&self.path),
                }
            }
        }
        may_block(|| {
            let mut guard = lock(&self.conn);
            let conn = self.open_conn(&mut guard)?;
            conn.busy_timeout(BUSY_TIMEOUT).at(&self.path)?;
            let result = work(conn);
            conn.busy_timeout(Duration::ZERO).at(&self.path)?;
            result.at(&self.path)
        })
    }

    fn open_conn<'a>(
        &self,
        guard: &'a mut MutexGuard<'_, Option<Connection>>,
    ) -> Result<&'a mut Connection> {
        guard.as_mut().ok_or_else(|| Error::Closed {
            path: self.path.clone(),
        })
    }

    /// Closes the connection; later calls fail with [`Error::Closed`].
    pub(crate) fn close(&self) {
        let conn = lock(&self.conn).take();
        if let Some(conn) = conn {
            // A close that fails (a statement still open) drops the connection anyway.
            if let Err((_, e)) = conn.close() {
                tracing::warn!(path = %self.path.display(), error = %e, "closing a mailbox file");
            }
        }
    }
}

fn lock(conn: &Mutex<Option<Connection>>) -> MutexGuard<'_, Option<Connection>> {
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether SQLite gave up on a lock the other side holds.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Runs `f`, which may block for a while, without stalling the runtime's other tasks: on a
/// multi-threaded runtime its worker hands its other tasks on first. On a current-thread
/// runtime (the agent's, and tests') or outside a runtime it simply runs.
pub(crate) fn may_block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_file_is_waited_for_not_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let writer = Db::open_writer(&path, JournalMode::Delete).expect("writer");
        writer
            .write(|c| c.execute_batch("CREATE TABLE t (v INTEGER)"))
            .expect("create");
        let reader = Db::open_reader(&path, None).expect("reader");
        // The reader holds a read transaction (DELETE journal: a shared lock) for 200 ms.
        let (held, release) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let path = path.clone();
            move || {
                let conn = Connection::open(&path).expect("open");
                conn.execute_batch("BEGIN; SELECT count(*) FROM t;")
                    .expect("begin");
                held.send(()).expect("send");
                std::thread::sleep(Duration::from_millis(200));
                conn.execute_batch("COMMIT").expect("commit");
            }
        });
        release.recv().expect("held");
        writer
            .write(|c| c.execute("INSERT INTO t VALUES (1)", []))
            .expect("the write waits for the lock instead of failing");
        holder.join().expect("holder");
        let n: i64 = reader
            .read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .expect("count");
        assert_eq!(n, 1);
        writer.close();
        assert!(matches!(
            writer.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))),
            Err(Error::Closed { .. })
        ));
    }

    /// A read that finds the file locked (the other side mid-commit) waits for it off the
    /// runtime's worker: another task on the same single worker keeps running meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_read_that_meets_a_lock_waits_without_stalling_other_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let writer = Db::open_writer(&path, JournalMode::Delete).expect("writer");
        writer
            .write(|c| c.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);"))
            .expect("create");
        let reader = std::sync::Arc::new(Db::open_reader(&path, None).expect("reader"));
        // Another process's writer holds the file exclusively for 300 ms.
        let (held, release) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let path = path.clone();
            move || {
                let conn = Connection::open(&path).expect("open");
                conn.execute_batch("BEGIN EXCLUSIVE; INSERT INTO t VALUES (2);")
                    .expect("lock");
                held.send(()).expect("send");
                std::thread::sleep(Duration::from_millis(300));
                conn.execute_batch("COMMIT").expect("commit");
            }
        });
        release.recv().expect("held");
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        // On the runtime's one worker, as a service's calls are.
        let n: i64 = tokio::spawn(async move {
            reader.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
        })
        .await
        .expect("join")
        .expect("the read waits for the lock instead of failing");
        let ticked = ticks.load(std::sync::atomic::Ordering::SeqCst);
        ticker.abort();
        holder.join().expect("holder");
        assert_eq!(n, 2, "it read after the other side's commit");
        assert!(
            ticked >= 3,
            "the other task ran {ticked} times while the read waited"
        );
    }
}
