//! Files crossing the session directory: inbound attachments written to `in/inbox/` (the
//! agent reads them there) and outbox files the agent wrote under `out/outbox/` (delivery
//! reads them to send). Every access goes through `ferroclaw_mailbox::session_fs`, which
//! never follows a link and reads through the descriptor it checked.

use std::path::Path;

use ferroclaw_mailbox::SessionPaths;
use ferroclaw_mailbox::session_fs::{self, Dir, FsError};

use crate::error::{Result, RunnerError};

/// Largest file either way (Discord's default upload limit).
pub const MAX_FILE_BYTES: usize = 25 * 1024 * 1024;

/// A base name safe to create: no separators, not `.`/`..`, no control characters.
fn check_name(name: &str, what: &str) -> Result<()> {
    session_fs::check_name(name)
        .map_err(|why| RunnerError::InvalidArgument(format!("{what} {name:?} {why}")))
}

/// Writes an attachment atomically; returns its path relative to the session directory.
pub fn put_inbox_file(
    paths: &SessionPaths,
    message_id: &str,
    name: &str,
    data: &[u8],
) -> Result<String> {
    check_name(message_id, "message_id")?;
    check_name(name, "name")?;
    if data.len() > MAX_FILE_BYTES {
        return Err(RunnerError::InvalidArgument(format!(
            "{name} is {} bytes; attachments up to {MAX_FILE_BYTES} bytes are taken",
            data.len()
        )));
    }
    let inbox = Dir::open(&paths.in_dir())
        .and_then(|dir| dir.create_dir_all(Path::new("inbox").join(message_id), 0o755))
        .map_err(|e| refused(paths, e))?;
    inbox
        .write_atomic(name, data, 0o644)
        .map_err(|e| refused(paths, e))?;
    Ok(format!("in/inbox/{message_id}/{name}"))
}

/// Reads a file of the session's outbox: `path` is relative to `out/` and under `outbox/`.
pub fn read_outbox_file(paths: &SessionPaths, path: &str) -> Result<(Vec<u8>, String)> {
    let relative = Path::new(path);
    if !relative.starts_with("outbox") || relative.components().count() < 2 {
        return Err(RunnerError::InvalidArgument(format!(
            "{path:?} is not a path under outbox/"
        )));
    }
    let data = Dir::open(&paths.out_dir())
        .and_then(|out| out.read_file(relative, MAX_FILE_BYTES as u64))
        .map_err(|e| refused(paths, e))?;
    let name = relative
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((data, name))
}

/// The caller's error for a refused session file; tampering is logged with the session.
fn refused(paths: &SessionPaths, e: FsError) -> RunnerError {
    let session = paths.root().display();
    match e {
        FsError::NotFound { path } => {
            let shown = shown_path(paths, &path);
            RunnerError::NotFound(format!("no file {shown:?} in the session"))
        }
        FsError::TooLarge { path, size, max } => RunnerError::InvalidArgument(format!(
            "{:?} is {size} bytes; files up to {max} bytes are sent",
            shown_path(paths, &path)
        )),
        FsError::BadPath { path, reason } => {
            RunnerError::InvalidArgument(format!("{:?} {reason}", shown_path(paths, &path)))
        }
        e @ (FsError::Link { .. } | FsError::NotRegular { .. }) => {
            tracing::warn!(%session, error = %e, "session file tampered with: refused");
            let path = match &e {
                FsError::Link { path } | FsError::NotRegular { path, .. } => path.clone(),
                _ => Default::default(),
            };
            RunnerError::InvalidArgument(format!(
                "{:?} is not a regular file in the session (links, FIFOs and devices are refused)",
                shown_path(paths, &path)
            ))
        }
        FsError::Io { path, source } => RunnerError::Io { path, source },
    }
}

/// A path as the caller named it: relative to the session directory, never the host's.
fn shown_path(paths: &SessionPaths, path: &Path) -> String {
    path.strip_prefix(paths.root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_land_in_the_inbox_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path());
        paths.create().unwrap();
        let rel = put_inbox_file(&paths, "123", "photo.png", b"png").unwrap();
        assert_eq!(rel, "in/inbox/123/photo.png");
        assert_eq!(std::fs::read(dir.path().join(&rel)).unwrap(), b"png");
        for (id, name) in [("123", "../x"), ("..", "a"), ("1", ""), ("1", "a/b")] {
            assert!(
                put_inbox_file(&paths, id, name, b"").is_err(),
                "{id} {name}"
            );
        }
    }

    #[test]
    fn only_regular_files_under_the_outbox_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path());
        let outbox = paths.out_dir().join("outbox/f1");
        std::fs::create_dir_all(&outbox).unwrap();
        std::fs::write(outbox.join("report.txt"), b"hi").unwrap();
        let (data, name) = read_outbox_file(&paths, "outbox/f1/report.txt").unwrap();
        assert_eq!((data.as_slice(), name.as_str()), (&b"hi"[..], "report.txt"));
        std::os::unix::fs::symlink("/etc/passwd", outbox.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", paths.out_dir().join("outbox/etc")).unwrap();
        for bad in [
            "outbox/f1/link",
            "outbox/etc/passwd",
            "../in/inbound.db",
            "/etc/passwd",
            "state/x",
            "outbox/../state",
            "outbox",
        ] {
            assert!(read_outbox_file(&paths, bad).is_err(), "{bad}");
        }
        assert!(matches!(
            read_outbox_file(&paths, "outbox/f1/none"),
            Err(RunnerError::NotFound(_))
        ));
    }
}
