//! Files crossing the session directory: inbound attachments written to `in/inbox/` (the
//! agent reads them there) and outbox files the agent wrote under `out/outbox/` (delivery
//! reads them to send). Names and paths from outside are checked before any file is touched.

use std::path::{Component, Path, PathBuf};

use ferroclaw_mailbox::SessionPaths;

use crate::error::{Result, RunnerError};

/// Largest file either way (Discord's default upload limit).
pub const MAX_FILE_BYTES: usize = 25 * 1024 * 1024;

/// A base name safe to create: no separators, not `.`/`..`, no control characters.
fn check_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(RunnerError::InvalidArgument(format!(
            "{what} {name:?} is not a plain file name"
        )))
    }
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
    let dir = paths.inbox().join(message_id);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunnerError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let target = dir.join(name);
    ferroclaw_common::atomic_file::write(&target, data).map_err(io(&target))?;
    Ok(format!("in/inbox/{message_id}/{name}"))
}

/// Reads a file of the session's outbox: `path` is relative to `out/` and under `outbox/`.
pub fn read_outbox_file(paths: &SessionPaths, path: &str) -> Result<(Vec<u8>, String)> {
    let relative = Path::new(path);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !plain || !relative.starts_with("outbox") || relative.components().count() < 2 {
        return Err(RunnerError::InvalidArgument(format!(
            "{path:?} is not a path under outbox/"
        )));
    }
    let full: PathBuf = paths.out_dir().join(relative);
    // The agent owns out/: a symlink there must not lead delivery elsewhere.
    let meta = std::fs::symlink_metadata(&full)
        .map_err(|_| RunnerError::NotFound(format!("no outbox file {path:?}")))?;
    if !meta.is_file() {
        return Err(RunnerError::InvalidArgument(format!(
            "{path:?} is not a regular file"
        )));
    }
    if meta.len() as usize > MAX_FILE_BYTES {
        return Err(RunnerError::InvalidArgument(format!(
            "{path:?} is {} bytes; files up to {MAX_FILE_BYTES} bytes are sent",
            meta.len()
        )));
    }
    let data = std::fs::read(&full).map_err(|source| RunnerError::Io {
        path: full.clone(),
        source,
    })?;
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((data, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_land_in_the_inbox_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path());
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
        for bad in [
            "outbox/f1/link",
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
