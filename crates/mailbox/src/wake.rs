//! Wake-ups on file changes (inotify through `notify`), so nothing in the message path polls
//! on a fixed interval. Callers still keep a slow fallback poll in case an event is missed
//! (e.g. on file systems that do not report changes).

use std::path::Path;
use std::sync::Arc;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::error::Result;

/// Keeps a directory watch alive; dropping it stops the watch.
pub struct DirWatch {
    _watcher: RecommendedWatcher,
}

impl DirWatch {
    /// Calls `on_change` (on the watcher's own thread) with the path of every created,
    /// modified or removed file under `dir`.
    pub fn new(
        dir: &Path,
        recursive: bool,
        on_change: impl Fn(&Path) + Send + 'static,
    ) -> Result<Self> {
        let mut watcher = watcher(on_change)?;
        let mode = if recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        watcher.watch(dir, mode)?;
        Ok(Self { _watcher: watcher })
    }

    /// Wakes `notify` whenever a file under `dir` whose name starts with `prefix` changes.
    pub fn notifying(dir: &Path, prefix: &str, notify: Arc<Notify>) -> Result<Self> {
        let prefix = prefix.to_string();
        Self::new(dir, false, move |path| {
            if file_name_starts_with(path, &prefix) {
                notify.notify_one();
            }
        })
    }
}

/// One watch over a changing set of directories, each watched on its own (not recursively):
/// the runner watches a session's `out/` only while its agent may write there, so idle
/// sessions hold no watches, and nothing an agent creates below `out/` adds any.
pub struct DirsWatch {
    watcher: std::sync::Mutex<RecommendedWatcher>,
}

impl DirsWatch {
    /// Calls `on_change` (on the watcher's own thread) with the path of every created,
    /// modified or removed file in a watched directory.
    pub fn new(on_change: impl Fn(&Path) + Send + 'static) -> Result<Self> {
        Ok(Self {
            watcher: std::sync::Mutex::new(watcher(on_change)?),
        })
    }

    /// Starts watching `dir` (watching it twice is harmless).
    pub fn add(&self, dir: &Path) -> Result<()> {
        let mut watcher = self
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(())
    }

    /// Stops watching `dir` (one not watched, or gone, is fine).
    pub fn remove(&self, dir: &Path) {
        let mut watcher = self
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = watcher.unwatch(dir);
    }
}

/// A watcher that calls `on_change` with the path of every created, modified or removed
/// file (not mere reads).
fn watcher(on_change: impl Fn(&Path) + Send + 'static) -> Result<RecommendedWatcher> {
    // Agents can plant links under a watched directory: a watch must not follow them out
    // of it.
    let config = notify::Config::default().with_follow_symlinks(false);
    Ok(RecommendedWatcher::new(
        move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for path in &event.paths {
                on_change(path);
            }
        },
        config,
    )?)
}

/// True when the last component of `path` starts with `prefix` (so `inbound.db` also matches
/// its `inbound.db-journal`).
pub fn file_name_starts_with(path: &Path, prefix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// The session directory (`<data>/sessions/<agent>/<id>`) a path inside it belongs to.
pub fn session_of(sessions_root: &Path, path: &Path) -> Option<(String, String)> {
    let rel = path.strip_prefix(sessions_root).ok()?;
    let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy());
    let agent = parts.next()?.into_owned();
    let session = parts.next()?.into_owned();
    Some((agent, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_directory_reports_changes_until_it_is_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (tx, rx) = std::sync::mpsc::channel();
        let watch = DirsWatch::new(move |path| {
            let _ = tx.send(path.to_path_buf());
        })
        .expect("watch");
        watch.add(dir.path()).expect("add");
        std::fs::write(dir.path().join("outbound.bell"), b"\n").expect("write");
        let seen = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("an event");
        assert_eq!(seen.file_name(), Some("outbound.bell".as_ref()));
        watch.remove(dir.path());
        while rx.try_recv().is_ok() {}
        std::fs::write(dir.path().join("outbound.bell"), b"\n").expect("write");
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "no events once removed"
        );
    }

    #[test]
    fn session_of_paths() {
        let root = Path::new("/d/sessions");
        assert_eq!(
            session_of(root, Path::new("/d/sessions/main/s1/out/outbound.db")),
            Some(("main".into(), "s1".into()))
        );
        assert_eq!(session_of(root, Path::new("/d/sessions/main")), None);
        assert_eq!(session_of(root, Path::new("/elsewhere/x/y")), None);
        assert!(file_name_starts_with(
            Path::new("/a/inbound.db-journal"),
            "inbound.db"
        ));
    }
}
