//! Message counts of quiet sessions, remembered against a stamp of their files.
//!
//! Counting a session's messages opens a read-only view of its files (a connection, its
//! thread, the checks on the agent's file): far more than the rest of a console page. A
//! quiet session's files do not change, so its counts are kept under a stamp of them
//! (`lstat` of each: device, inode, type, size, modification and change times) and reused
//! while the stamp is the same. Only counts read through a view — with every check it
//! makes — are kept, and only complete ones: a session whose files could not be read (a
//! link planted in `out/`, a view where a table belongs, a timeout) is looked at again
//! every time.
//!
//! A change to a file shows in its stamp: a write moves its times (the change time cannot
//! be set back by its owner; a WAL's is left out, see [`FileStamp::of`]), a replaced file
//! has another inode. Times are as coarse as the filesystem keeps them, so two writes may
//! share one; counts are kept only for files left alone for [`SETTLE`], after which any
//! write is stamped with a later time.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferroclaw_mailbox::SessionPaths;

use crate::mailbox_view::Counts;

/// Files changed less than this long ago are not stamped: a later write could carry the
/// same (coarse) time.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Sessions remembered per generation; at most twice as many are kept (see [`Generations`]).
const GENERATION: usize = 2048;

/// What `lstat` found at one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileStamp {
    /// Nothing there, or a WAL without frames: a view creates one, empty, when it opens
    /// its database, and a write to it makes it grow.
    Nothing,
    /// `out/` itself: which directory it is. Its times move when a view creates a WAL in
    /// it; a file swapped in there shows in that file's own stamp.
    Dir { dev: u64, ino: u64 },
    File {
        dev: u64,
        ino: u64,
        mode: u32,
        size: u64,
        mtime_ns: i128,
        ctime_ns: i128,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Db,
    Wal,
    Dir,
}

impl FileStamp {
    fn of(meta: &Metadata, kind: Kind) -> Self {
        let file_type = meta.mode() & libc::S_IFMT;
        if kind == Kind::Wal && file_type == libc::S_IFREG && meta.size() == 0 {
            return Self::Nothing;
        }
        if kind == Kind::Dir && file_type == libc::S_IFDIR {
            return Self::Dir {
                dev: meta.dev(),
                ino: meta.ino(),
            };
        }
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let mtime_ns = ns(meta.mtime(), meta.mtime_nsec());
        Self::File {
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode(),
            size: meta.size(),
            mtime_ns,
            // SQLite running as root gives a WAL its database's owner each time it opens
            // it, reader or writer, and that moves the change time: a WAL's is left out.
            ctime_ns: match kind {
                Kind::Wal => mtime_ns,
                Kind::Db | Kind::Dir => ns(meta.ctime(), meta.ctime_nsec()),
            },
        }
    }

    /// When it last changed, for a file.
    fn changed_ns(&self) -> Option<i128> {
        match self {
            Self::File {
                mtime_ns, ctime_ns, ..
            } => Some(*mtime_ns.max(ctime_ns)),
            Self::Nothing | Self::Dir { .. } => None,
        }
    }
}

/// The stamp of a session's files: the runner's `inbound.db` and its WAL, the agent's
/// `out/` and its `outbound.db` with its WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp([FileStamp; 5]);

impl Stamp {
    /// The session's files as they are now; `None` when they cannot all be stamped, or one
    /// changed less than `settle` before `now` (or after it: a clock set back).
    pub fn of(paths: &SessionPaths, now: SystemTime, settle: Duration) -> Option<Self> {
        let inbound = paths.inbound_db();
        let out_dir = paths.out_dir();
        let out = lstat(&out_dir, Kind::Dir)?;
        // Nothing is stamped through an out/ that is no directory (a link the agent put
        // there): the view refuses it, and its own stamp shows when it is replaced.
        let (outbound, outbound_wal) = match out {
            FileStamp::Dir { .. } => {
                let outbound = paths.outbound_db();
                (
                    lstat(&outbound, Kind::Db)?,
                    lstat(&wal_of(&outbound), Kind::Wal)?,
                )
            }
            _ => (FileStamp::Nothing, FileStamp::Nothing),
        };
        let stamp = Self([
            lstat(&inbound, Kind::Db)?,
            lstat(&wal_of(&inbound), Kind::Wal)?,
            out,
            outbound,
            outbound_wal,
        ]);
        let settled_before = now.checked_sub(settle)?.duration_since(UNIX_EPOCH).ok()?;
        let settled_before = i128::try_from(settled_before.as_nanos()).ok()?;
        let settled = stamp
            .0
            .iter()
            .filter_map(FileStamp::changed_ns)
            .all(|changed| changed <= settled_before);
        settled.then_some(stamp)
    }
}

fn wal_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// What is at `path`, never following a link there; `None` when it cannot be looked at.
fn lstat(path: &Path, kind: Kind) -> Option<FileStamp> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => Some(FileStamp::of(&meta, kind)),
        Err(e) if e.kind() == ErrorKind::NotFound => Some(FileStamp::Nothing),
        Err(_) => None,
    }
}

/// Stamps of each session's files (a few `lstat`s each, no file opened), for
/// [`CountCache::get`] and [`CountCache::keep`]. Blocking: call it off the async threads.
pub fn stamps(paths: &[SessionPaths], settle: Duration) -> Vec<Option<Stamp>> {
    let now = SystemTime::now();
    paths.iter().map(|p| Stamp::of(p, now, settle)).collect()
}

/// Complete counts of sessions, by session directory, each with the stamp it was read
/// under.
pub struct CountCache {
    settle: Duration,
    kept: Mutex<Generations>,
}

/// A bounded map that forgets the least used: when `current` is full it becomes
/// `previous` (the older `previous` is dropped), and a session found in `previous` moves
/// back to `current`.
#[derive(Default)]
struct Generations {
    current: HashMap<PathBuf, (Stamp, Counts)>,
    previous: HashMap<PathBuf, (Stamp, Counts)>,
}

impl Generations {
    fn insert(&mut self, root: PathBuf, entry: (Stamp, Counts)) {
        if self.current.len() >= GENERATION && !self.current.contains_key(&root) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(root, entry);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

impl Default for CountCache {
    fn default() -> Self {
        Self::new(SETTLE)
    }
}

impl CountCache {
    pub fn new(settle: Duration) -> Self {
        Self {
            settle,
            kept: Mutex::new(Generations::default()),
        }
    }

    /// How long files must be left alone before their counts are kept.
    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// The counts kept for the session's files under exactly `stamp`.
    pub fn get(&self, paths: &SessionPaths, stamp: &Stamp) -> Option<Counts> {
        let mut kept = self.kept.lock().ok()?;
        let root = paths.root();
        if let Some((kept_stamp, counts)) = kept.current.get(root) {
            return (kept_stamp == stamp).then_some(*counts);
        }
        let (kept_stamp, counts) = kept.previous.remove(root)?;
        if kept_stamp != *stamp {
            return None;
        }
        kept.insert(root.to_path_buf(), (kept_stamp, counts));
        Some(counts)
    }

    /// Keeps counts read through a view after `stamp` was taken; incomplete ones are not
    /// kept (what could not be read is tried again next time).
    pub fn keep(&self, paths: &SessionPaths, stamp: Stamp, counts: Counts) {
        let complete = counts.pending.is_some()
            && counts.messages_in.is_some()
            && counts.messages_out.is_some();
        if !complete {
            return;
        }
        if let Ok(mut kept) = self.kept.lock() {
            kept.insert(paths.root().to_path_buf(), (stamp, counts));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().map_or(0, |k| k.len())
    }
}

#[cfg(test)]
mod tests {
    use ferroclaw_mailbox::agent::BatchStatus;
    use ferroclaw_mailbox::{AgentMailbox, HostMailbox, JournalMode};

    use super::*;
    use crate::mailbox_view::tests::{chat_in, chat_out};
    use crate::session_list::read_counts;

    /// A session with one message answered, its files closed.
    async fn session(root: &Path) -> SessionPaths {
        let paths = SessionPaths::new(root);
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        let seq = host.enqueue(&chat_in("a", "hi", "ann")).await.unwrap().seq;
        let mut agent = AgentMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        agent
            .finish(&[seq], &[chat_out("hello")], BatchStatus::Completed)
            .await
            .unwrap();
        agent.close().await;
        host.close().await;
        paths
    }

    fn counts(pending: i64, messages_in: i64, messages_out: i64) -> Counts {
        Counts {
            pending: Some(pending),
            messages_in: Some(messages_in),
            messages_out: Some(messages_out),
        }
    }

    fn stamp_of(cache: &CountCache, paths: &SessionPaths) -> Stamp {
        stamps(std::slice::from_ref(paths), cache.settle())[0]
            .clone()
            .unwrap()
    }

    #[tokio::test]
    async fn counts_are_kept_until_a_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = session(&dir.path().join("s")).await;
        // Files just written are not stamped: a write in the same tick could look alike.
        assert!(stamps(std::slice::from_ref(&paths), SETTLE)[0].is_none());

        let cache = CountCache::new(Duration::ZERO);
        let read = read_counts(vec![paths.clone()], true, &cache).await;
        assert_eq!(read, vec![counts(0, 1, 1)]);
        assert_eq!(cache.len(), 1);
        // The view's own empty WALs leave the stamp as it was: the next look is a hit.
        let stamp = stamp_of(&cache, &paths);
        assert_eq!(cache.get(&paths, &stamp), Some(counts(0, 1, 1)));

        // Kept counts are what is returned while the files stay as they were (shown by
        // keeping counts no view would read).
        cache.keep(&paths, stamp.clone(), counts(7, 7, 7));
        let read = read_counts(vec![paths.clone()], true, &cache).await;
        assert_eq!(read, vec![counts(7, 7, 7)]);
        // The whole list asks for pending only.
        let read = read_counts(vec![paths.clone()], false, &cache).await;
        assert_eq!(read[0].pending, Some(7));
        assert_eq!(read[0].messages_in, None);

        // A new message: the runner's files change, and the next look reads them again.
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        host.enqueue(&chat_in("b", "again", "ann")).await.unwrap();
        host.close().await;
        assert_ne!(stamp_of(&cache, &paths), stamp);
        assert_eq!(cache.get(&paths, &stamp_of(&cache, &paths)), None);
        let read = read_counts(vec![paths.clone()], true, &cache).await;
        assert_eq!(read, vec![counts(1, 2, 1)]);

        // The agent writes: its files change too.
        let kept = stamp_of(&cache, &paths);
        cache.keep(&paths, kept.clone(), counts(7, 7, 7));
        let agent = AgentMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        agent.send_now(&chat_out("more")).await.unwrap();
        agent.close().await;
        assert_ne!(stamp_of(&cache, &paths), kept);
        let read = read_counts(vec![paths.clone()], true, &cache).await;
        assert_eq!(read, vec![counts(1, 2, 2)]);

        // Rows in a WAL (its writer still open) are read the usual way, which as root
        // chowns the WAL: its counts are kept all the same.
        let agent = AgentMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        agent.send_now(&chat_out("and more")).await.unwrap();
        let read = read_counts(vec![paths.clone()], true, &cache).await;
        assert_eq!(read, vec![counts(1, 2, 3)]);
        assert_eq!(
            cache.get(&paths, &stamp_of(&cache, &paths)),
            Some(counts(1, 2, 3))
        );
        agent.close().await;
    }

    #[tokio::test]
    async fn a_link_in_out_is_refused_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let paths = session(&dir.path().join("s")).await;
        let other = session(&dir.path().join("other")).await;
        let cache = CountCache::new(Duration::ZERO);
        assert_eq!(
            read_counts(vec![paths.clone()], true, &cache).await,
            vec![counts(0, 1, 1)]
        );
        // The agent swaps its file for a link to another session's: the stamp changes, and
        // the view refuses the link (not kept, so refused again next time).
        let out = paths.outbound_db();
        std::fs::remove_file(&out).unwrap();
        let _ = std::fs::remove_file(wal_of(&out));
        std::os::unix::fs::symlink(other.outbound_db(), &out).unwrap();
        for _ in 0..2 {
            let read = read_counts(vec![paths.clone()], true, &cache).await;
            assert_eq!(read[0].messages_out, None);
            assert_eq!(read[0].messages_in, Some(1));
        }
        assert_eq!(cache.get(&paths, &stamp_of(&cache, &paths)), None);

        // The whole out/ a link: nothing is stamped through it, and it is refused too.
        std::fs::remove_file(&out).unwrap();
        let out_dir = paths.out_dir();
        std::fs::remove_dir_all(&out_dir).unwrap();
        std::os::unix::fs::symlink(other.out_dir(), &out_dir).unwrap();
        let stamp = stamp_of(&cache, &paths);
        assert_eq!(stamp.0[3..], [FileStamp::Nothing, FileStamp::Nothing]);
        let read = read_counts(vec![paths.clone()], true, &cache).await;
        assert_eq!(read[0].messages_out, None);
        assert_eq!(cache.get(&paths, &stamp), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = CountCache::new(Duration::ZERO);
        let stamp = Stamp([FileStamp::Nothing; 5]);
        for i in 0..GENERATION * 3 {
            let paths = SessionPaths::new(format!("/s/{i}"));
            cache.keep(&paths, stamp.clone(), counts(0, 0, 0));
        }
        assert!(cache.len() <= 2 * GENERATION);
        // The latest are still there.
        let last = SessionPaths::new(format!("/s/{}", GENERATION * 3 - 1));
        assert_eq!(cache.get(&last, &stamp), Some(counts(0, 0, 0)));
        // Incomplete counts are never kept.
        let paths = SessionPaths::new("/s/incomplete");
        cache.keep(&paths, stamp.clone(), Counts::default());
        assert_eq!(cache.get(&paths, &stamp), None);
    }
}
