//! Opening the mailbox databases and running statements on them.
//!
//! Statements on a side's own file run on the caller's thread. A mailbox statement on a WAL
//! file takes microseconds and never waits for the other side (readers and the one writer
//! do not block each other), so a hop to another thread and back, once per statement, cost
//! more than the statement: that hop was most of the runner's CPU per message. What may
//! wait runs where blocking is allowed (`tokio::task::block_in_place` on a multi-threaded
//! runtime), so it never stalls the other tasks of a service:
//! - a statement that finds the file locked by the other side (`SQLITE_BUSY`, which a WAL
//!   file gives only while it is recovered, and a DELETE-journal file whenever the sides
//!   meet) is tried again there, waiting up to [`BUSY_TIMEOUT`];
//! - a commit to a DELETE-journal file, which syncs the file to disk (`synchronous = FULL`).
//!
//! A file a hostile agent may have shaped ([`Db::open_untrusted`]) is the exception: its
//! calls run under a time budget and refuse views and recursive queries, and its only user
//! (`agent_file`) runs them on a blocking thread of their own, which its callers do not
//! wait on for ever.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
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
    /// Set on a file a hostile agent may have shaped: how long each call may run.
    budget: Option<Arc<CallBudget>>,
}

/// How long one call on a file an agent wrote may run before it is interrupted. The host's
/// reads there take microseconds to milliseconds; the longest, the finished inbound seqs
/// (every one the agent finished), took 0.6 s over a million rows here.
pub(crate) const UNTRUSTED_CALL_BUDGET: Duration = Duration::from_secs(5);

/// SQLite virtual-machine steps between two looks at the clock.
const PROGRESS_EVERY: i32 = 10_000;

/// The running call's deadline, which the progress handler reads.
struct CallBudget {
    base: Instant,
    /// Milliseconds after `base` when the running call must stop (`u64::MAX`: none runs).
    until_ms: AtomicU64,
}

impl Default for CallBudget {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl CallBudget {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn start(&self) {
        let until = self.now_ms() + UNTRUSTED_CALL_BUDGET.as_millis() as u64;
        self.until_ms.store(until, Ordering::Relaxed);
    }

    fn end(&self) {
        self.until_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// Whether the running call is past its deadline (the progress handler's answer: true
    /// interrupts the statement).
    fn spent(&self) -> bool {
        self.now_ms() > self.until_ms.load(Ordering::Relaxed)
    }
}

impl Db {
    /// The one connection that may write the file. One writer per file: its owner opens it.
    pub(crate) fn open_writer(path: &Path, mode: JournalMode) -> Result<Self> {
        // DELETE needs FULL to survive power loss uncorrupted; WAL is safe with NORMAL, which
        // skips the fsync per commit (a power cut may lose the last commits, never
        // consistency; a process crash loses nothing either way).
        let (journal, synchronous) = match mode {
            JournalMode::Delete => ("delete", "full"),
            JournalMode::Wal => ("wal", "normal"),
        };
        let conn = may_block(|| {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.query_row(&format!("PRAGMA journal_mode = {journal}"), [], |_| Ok(()))?;
            conn.execute_batch(&format!("PRAGMA synchronous = {synchronous}"))?;
            Ok(conn)
        })
        .at(path)?;
        Self::ready(conn, path, mode == JournalMode::Delete)
    }

    /// A read-only connection to the file the other side writes (the agent's look at
    /// `inbound.db`, which only the runner writes).
    pub(crate) fn open_reader(path: &Path) -> Result<Self> {
        let conn = Self::connect_reader(path, None)?;
        Self::ready(conn, path, false)
    }

    /// A read-only connection to a file a hostile agent may have shaped (the host's look
    /// at `outbound.db`), as [`Db::open_reader`] with the link check, and with two guards,
    /// since its statements run on the service's own threads: the agent must not be able
    /// to make one run for long.
    /// - No statement reads through a view or a trigger (the agent could put a view of an
    ///   endless recursive query where a table belongs), nor recursive queries at all: the
    ///   authorizer refuses them when a statement is prepared, or prepared again after the
    ///   agent changed the schema.
    /// - A call that still runs past [`UNTRUSTED_CALL_BUDGET`] (a huge table where the
    ///   host expects a few rows) is interrupted and fails.
    ///
    /// What no budget inside SQLite can interrupt (an `open` of a FIFO the agent planted as
    /// the journal) is why its calls run on a blocking thread: see `agent_file`.
    pub(crate) fn open_untrusted(path: &Path, expected: &Path) -> Result<Self> {
        let conn = Self::connect_reader(path, Some(expected))?;
        conn.authorizer(Some(|ctx: AuthContext<'_>| {
            if ctx.accessor.is_some() || matches!(ctx.action, AuthAction::Recursive) {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }));
        let budget = Arc::new(CallBudget::default());
        let watch = budget.clone();
        conn.progress_handler(PROGRESS_EVERY, Some(move || watch.spent()));
        let mut db = Self::ready(conn, path, false)?;
        db.budget = Some(budget);
        Ok(db)
    }

    /// Opens `path` read-only. `expected`, where given, is the file's real path (the
    /// directories above it resolved). SQLite resolves every link in a name before it opens
    /// it, then opens with `O_NOFOLLOW`; so checking the name it reports against `expected`
    /// after the open catches a link swapped in between the caller's check and the open,
    /// without a race.
    fn connect_reader(path: &Path, expected: Option<&Path>) -> Result<Connection> {
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
        Ok(conn)
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
            budget: None,
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
                match self.within_budget(|| work(conn)) {
                    Err(e) if is_busy(&e) => {}
                    done => return done.at(&self.path),
                }
            }
        }
        may_block(|| {
            let mut guard = lock(&self.conn);
            let conn = self.open_conn(&mut guard)?;
            // The agent may hold its own file locked for ever: wait no longer than a call
            // there may run.
            let patience = match self.budget {
                Some(_) => UNTRUSTED_CALL_BUDGET,
                None => BUSY_TIMEOUT,
            };
            conn.busy_timeout(patience).at(&self.path)?;
            let result = self.within_budget(|| work(conn));
            conn.busy_timeout(Duration::ZERO).at(&self.path)?;
            result.at(&self.path)
        })
    }

    /// Runs one call under the connection's budget, if it has one.
    fn within_budget<T>(&self, call: impl FnOnce() -> T) -> T {
        let Some(budget) = &self.budget else {
            return call();
        };
        budget.start();
        let result = call();
        budget.end();
        result
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

/// A task that counts every 10 ms it gets to run: whether the runtime's workers are free.
#[cfg(test)]
pub(crate) fn ticker() -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let ticks = Arc::new(AtomicU64::new(0));
    let counting = ticks.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            counting.fetch_add(1, Ordering::SeqCst);
        }
    });
    (ticks, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x.db` in `dir`, its writer open, after the writer ran `sql`.
    fn file_with(dir: &Path, mode: JournalMode, sql: &str) -> (PathBuf, Db) {
        let path = dir.join("x.db");
        let writer = Db::open_writer(&path, mode).expect("writer");
        writer.write(|c| c.execute_batch(sql)).expect("set up");
        (path, writer)
    }

    /// Another connection runs `sql` (which takes a lock), holds it for `ms`, and commits;
    /// returns once the lock is held.
    fn hold(path: &Path, sql: &'static str, ms: u64) -> std::thread::JoinHandle<()> {
        let (held, release) = std::sync::mpsc::channel::<()>();
        let path = path.to_path_buf();
        let holder = std::thread::spawn(move || {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(sql).expect("lock");
            held.send(()).expect("send");
            std::thread::sleep(Duration::from_millis(ms));
            conn.execute_batch("COMMIT").expect("commit");
        });
        release.recv().expect("held");
        holder
    }

    #[test]
    fn a_locked_file_is_waited_for_not_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, writer) = file_with(
            dir.path(),
            JournalMode::Delete,
            "CREATE TABLE t (v INTEGER)",
        );
        let reader = Db::open_reader(&path).expect("reader");
        // A reader holds a read transaction (DELETE journal: a shared lock) for 200 ms.
        let holder = hold(&path, "BEGIN; SELECT count(*) FROM t;", 200);
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
        let (path, _writer) = file_with(
            dir.path(),
            JournalMode::Delete,
            "CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);",
        );
        let reader = std::sync::Arc::new(Db::open_reader(&path).expect("reader"));
        // Another process's writer holds the file exclusively for 300 ms.
        let holder = hold(&path, "BEGIN EXCLUSIVE; INSERT INTO t VALUES (2);", 300);
        let (ticks, ticker) = ticker();
        // On the runtime's one worker, as a service's calls are.
        let n: i64 = tokio::spawn(async move {
            reader.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
        })
        .await
        .expect("join")
        .expect("the read waits for the lock instead of failing");
        let ticked = ticks.load(Ordering::SeqCst);
        ticker.abort();
        holder.join().expect("holder");
        assert_eq!(n, 2, "it read after the other side's commit");
        assert!(
            ticked >= 3,
            "the other task ran {ticked} times while the read waited"
        );
    }

    /// A call on a file an agent shaped that runs past its budget is interrupted: here a
    /// plain table, large enough that the query would run for hours.
    #[test]
    fn a_long_call_on_an_agents_file_is_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _writer) = file_with(
            dir.path(),
            JournalMode::Wal,
            "CREATE TABLE t (v INTEGER);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
             INSERT INTO t SELECT i FROM n;",
        );
        let real = std::fs::canonicalize(&path).expect("real path");
        let reader = Db::open_untrusted(&path, &real).expect("reader");
        let started = Instant::now();
        let endless = reader.read(|c| {
            c.query_row("SELECT count(*) FROM t a, t b, t c", [], |r| {
                r.get::<_, i64>(0)
            })
        });
        assert!(
            matches!(&endless, Err(Error::Sqlite { source, .. })
                if source.sqlite_error_code() == Some(ErrorCode::OperationInterrupted)),
            "{endless:?}"
        );
        assert!(started.elapsed() >= UNTRUSTED_CALL_BUDGET);
        // The next call has a budget of its own.
        let n: i64 = reader
            .read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .expect("a short call");
        assert_eq!(n, 3000);
    }
}
