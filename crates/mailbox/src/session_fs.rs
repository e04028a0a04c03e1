//! The host's one way to touch files an agent can write (`out/`, `state/`, the outbox, the
//! agent folder, and for the process backend everything else too).
//!
//! The agent is untrusted: it can plant symbolic links, FIFOs or directories anywhere it
//! writes, and swap them while the host looks. So every access here starts from a directory
//! the host opened itself, resolves the rest of the path beneath it without following any
//! link (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or, where the kernel lacks
//! it or a seccomp filter refuses it, `O_NOFOLLOW | O_DIRECTORY` opens component by
//! component), checks the object it got, and then reads or writes through that descriptor,
//! never by path again, so there is no gap between the check and the use.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

pub use rustix::fs::FileType;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// Why a session path was refused or could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {reason}")]
    BadPath { path: PathBuf, reason: &'static str },
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    #[error(
        "{path} is a symbolic link (or passes through one); links in session files are never followed"
    )]
    Link { path: PathBuf },
    #[error("{path} is not a regular file (it is a {kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is {size} bytes; at most {max} are read")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    /// True when the error means someone put something other than what belongs there:
    /// a link, a FIFO, a device, a directory where a file belongs.
    pub fn is_tampering(&self) -> bool {
        matches!(self, Self::Link { .. } | Self::NotRegular { .. })
    }

    fn from_errno(path: PathBuf, errno: Errno) -> Self {
        match errno {
            Errno::NOENT => Self::NotFound { path },
            // O_NOFOLLOW on a link, or RESOLVE_NO_SYMLINKS meeting one on the way.
            Errno::LOOP => Self::Link { path },
            Errno::NOTDIR => Self::NotRegular {
                path,
                kind: "path through something that is not a directory",
            },
            Errno::XDEV => Self::BadPath {
                path,
                reason: "leaves the directory it must stay beneath",
            },
            other => Self::Io {
                path,
                source: other.into(),
            },
        }
    }
}

pub type FsResult<T> = std::result::Result<T, FsError>;

/// Deepest directory nesting [`Dir::disk_usage`] walks.
pub const MAX_WALK_DEPTH: usize = 128;

/// Set once `openat2` turned out to be unavailable (old kernel, or a seccomp filter).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory the host opened; everything below it is reached through this descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What a `stat` of an entry found, without following a link.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub kind: FileType,
    pub len: u64,
    pub modified: SystemTime,
}

impl Dir {
    /// Opens a directory the host made itself (the data dir, a session's `in/` or `out/`).
    /// Only the last component must not be a link: the path above it is the host's own.
    pub fn open(path: &Path) -> FsResult<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::from_errno(path.to_path_buf(), e))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A directory beneath this one, reached without following any link.
    pub fn open_dir(&self, rel: impl AsRef<Path>) -> FsResult<Dir> {
        let rel = rel.as_ref();
        let fd = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(Dir {
            fd,
            path: self.path.join(rel),
        })
    }

    /// Creates the directories of `rel` that are missing (mode 0700 | `mode`) and opens the
    /// last one, never following a link on the way.
    pub fn create_dir_all(&self, rel: impl AsRef<Path>, mode: u32) -> FsResult<Dir> {
        let rel = rel.as_ref();
        let parts = plain_components(rel).map_err(|reason| FsError::BadPath {
            path: self.path.join(rel),
            reason,
        })?;
        let mut current = Dir {
            fd: self.dup()?,
            path: self.path.clone(),
        };
        for part in parts {
            match rustix::fs::mkdirat(&current.fd, part, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(FsError::from_errno(current.path.join(part), e)),
            }
            current = current.open_dir(part)?;
        }
        Ok(current)
    }

    /// Opens a regular file beneath this directory for reading. Links, FIFOs, devices and
    /// directories are refused (a FIFO is opened non-blocking, so it cannot stall the host).
    pub fn open_file(&self, rel: impl AsRef<Path>) -> FsResult<(File, u64)> {
        let rel = rel.as_ref();
        let fd = self.resolve(rel, OFlags::RDONLY | OFlags::NONBLOCK)?;
        let stat =
            rustix::fs::fstat(&fd).map_err(|e| FsError::from_errno(self.path.join(rel), e))?;
        check_regular(&stat, &self.path.join(rel))?;
        Ok((File::from(fd), stat.st_size as u64))
    }

    /// Reads a regular file beneath this directory, at most `max` bytes (a bigger file, or
    /// one that grows past `max` while it is read, is refused).
    pub fn read_file(&self, rel: impl AsRef<Path>, max: u64) -> FsResult<Vec<u8>> {
        let rel = rel.as_ref();
        let path = self.path.join(rel);
        let (file, size) = self.open_file(rel)?;
        if size > max {
            return Err(FsError::TooLarge { path, size, max });
        }
        let mut data = Vec::with_capacity(size as usize);
        file.take(max + 1)
            .read_to_end(&mut data)
            .map_err(|source| FsError::Io {
                path: path.clone(),
                source,
            })?;
        if data.len() as u64 > max {
            return Err(FsError::TooLarge {
                path,
                size: data.len() as u64,
                max,
            });
        }
        Ok(data)
    }

    /// What is at `rel` (not following a link there), or `None` when nothing is.
    pub fn entry(&self, rel: impl AsRef<Path>) -> FsResult<Option<Entry>> {
        let rel = rel.as_ref();
        let path = self.path.join(rel);
        let (parent, name) = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => (Some(self.open_dir(parent)?), last_name(rel, &path)?),
            None => (None, last_name(rel, &path)?),
        };
        let dir = parent.as_ref().map_or(&self.fd, |d| &d.fd);
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Entry {
                kind: FileType::from_raw_mode(stat.st_mode),
                len: stat.st_size as u64,
                modified: SystemTime::UNIX_EPOCH
                    + std::time::Duration::new(
                        stat.st_mtime.max(0) as u64,
                        stat.st_mtime_nsec.clamp(0, 999_999_999) as u32,
                    ),
            })),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(FsError::from_errno(path, e)),
        }
    }

    /// Writes `name` in this directory atomically (a temporary file beside it, fsync,
    /// rename), with `mode` permissions. The temporary file is created exclusively, so a
    /// link planted under its name is never written through.
    pub fn write_atomic(&self, name: &str, data: &[u8], mode: u32) -> FsResult<()> {
        let path = self.path.join(name);
        check_name(name).map_err(|reason| FsError::BadPath {
            path: path.clone(),
            reason,
        })?;
        let temp = format!(".{name}.{}.tmp", uuid_suffix());
        let fd = rustix::fs::openat(
            &self.fd,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| FsError::from_errno(self.path.join(&temp), e))?;
        let io = |source| FsError::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::from(fd);
        let written = file.write_all(data).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
            return Err(io(e));
        }
        rustix::fs::renameat(&self.fd, temp.as_str(), &self.fd, name)
            .map_err(|e| FsError::from_errno(path.clone(), e))
    }

    /// Bytes this directory's tree takes on disk (allocated blocks), walking it through
    /// descriptors without following any link. Counts at most `max_entries` entries and
    /// goes at most [`MAX_WALK_DEPTH`] directories deep: `None` beyond either (a tree like
    /// that is over any sane quota anyway). Only the directories on the current path are
    /// open, so a wide tree cannot use up the process's descriptors.
    pub fn disk_usage(&self, max_entries: usize) -> FsResult<Option<u64>> {
        let io = |e: Errno| FsError::from_errno(self.path.clone(), e);
        let mut total: u64 = 0;
        let mut entries = 0usize;
        let mut path: Vec<rustix::fs::Dir> =
            vec![rustix::fs::Dir::read_from(&self.fd).map_err(io)?];
        while let Some(listing) = path.last_mut() {
            let Some(entry) = listing.next() else {
                path.pop();
                continue;
            };
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_owned();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            entries += 1;
            if entries > max_entries {
                return Ok(None);
            }
            let Some(listing) = path.last() else { break };
            let dir = listing.fd().map_err(io)?;
            let stat = match rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue, // removed meanwhile
                Err(e) => return Err(io(e)),
            };
            total = total.saturating_add((stat.st_blocks as u64).saturating_mul(512));
            if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
                continue;
            }
            if path.len() >= MAX_WALK_DEPTH {
                return Ok(None);
            }
            match rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(sub) => path.push(rustix::fs::Dir::new(sub).map_err(io)?),
                // Removed, or swapped for a link, meanwhile: not counted, never followed.
                Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(Some(total))
    }

    /// Gives this directory itself to `uid:gid` (through its descriptor: no path, no link).
    pub fn chown(&self, uid: u32, gid: u32) -> FsResult<()> {
        rustix::fs::fchown(
            &self.fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| FsError::from_errno(self.path.clone(), e))
    }

    fn dup(&self) -> FsResult<OwnedFd> {
        self.fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| FsError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Opens `rel` beneath this directory with `flags`, following no link at all.
    fn resolve(&self, rel: &Path, flags: OFlags) -> FsResult<OwnedFd> {
        resolve(
            &self.fd,
            &self.path,
            rel,
            flags,
            !NO_OPENAT2.load(Ordering::Relaxed),
        )
    }
}

fn resolve(
    base: &OwnedFd,
    base_path: &Path,
    rel: &Path,
    flags: OFlags,
    try_openat2: bool,
) -> FsResult<OwnedFd> {
    let path = base_path.join(rel);
    let parts = plain_components(rel).map_err(|reason| FsError::BadPath {
        path: path.clone(),
        reason,
    })?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if try_openat2 {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(base, rel, flags, Mode::empty(), how) {
            Ok(fd) => return Ok(fd),
            // No openat2 here (kernel before 5.6, or a seccomp profile that refuses it).
            Err(Errno::NOSYS | Errno::PERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // EAGAIN: a concurrent rename raced the lookup. ENOTDIR: something on the way
            // is not a directory; the walk below tells a link from the rest.
            Err(Errno::AGAIN | Errno::NOTDIR) => {}
            Err(e) => return Err(FsError::from_errno(path, e)),
        }
    }
    // Component by component: each directory opened with O_NOFOLLOW | O_DIRECTORY from the
    // descriptor of the one above, the last with O_NOFOLLOW.
    let (last, dirs) = parts.split_last().ok_or_else(|| FsError::BadPath {
        path: path.clone(),
        reason: "is empty",
    })?;
    let mut current: Option<OwnedFd> = None;
    for part in dirs {
        let at = current.as_ref().unwrap_or(base);
        let next = rustix::fs::openat(
            at,
            *part,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| walk_error(at, part, path.clone(), e))?;
        current = Some(next);
    }
    let at = current.as_ref().unwrap_or(base);
    rustix::fs::openat(at, *last, flags, Mode::empty()).map_err(|e| walk_error(at, last, path, e))
}

/// `O_NOFOLLOW | O_DIRECTORY` on a link fails with ENOTDIR: name it a link when it is one.
fn walk_error(at: &OwnedFd, part: &std::ffi::OsStr, path: PathBuf, errno: Errno) -> FsError {
    if errno == Errno::NOTDIR
        && let Ok(stat) = rustix::fs::statat(at, part, AtFlags::SYMLINK_NOFOLLOW)
    {
        let kind = FileType::from_raw_mode(stat.st_mode);
        return if kind == FileType::Symlink {
            FsError::Link { path }
        } else {
            FsError::NotRegular {
                path,
                kind: kind_name(kind),
            }
        };
    }
    FsError::from_errno(path, errno)
}

/// The components of a relative path, each a plain name: no `..`, no root, no `.`.
fn plain_components(rel: &Path) -> Result<Vec<&std::ffi::OsStr>, &'static str> {
    if rel.as_os_str().is_empty() {
        return Err("is empty");
    }
    rel.components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            Component::ParentDir => Err("contains '..'"),
            Component::RootDir | Component::Prefix(_) => Err("is absolute"),
            Component::CurDir => Err("contains '.'"),
        })
        .collect()
}

fn last_name<'p>(rel: &'p Path, path: &Path) -> FsResult<&'p std::ffi::OsStr> {
    plain_components(rel)
        .map_err(|reason| FsError::BadPath {
            path: path.to_path_buf(),
            reason,
        })?
        .last()
        .copied()
        .ok_or_else(|| FsError::BadPath {
            path: path.to_path_buf(),
            reason: "is empty",
        })
}

/// A base name safe to create: no separators, not `.`/`..`, no control characters.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 200 {
        Err("is empty or longer than 200 bytes")
    } else if name == "." || name == ".." || name.contains(['/', '\\']) {
        Err("is not a plain file name")
    } else if name.chars().any(char::is_control) {
        Err("contains control characters")
    } else {
        Ok(())
    }
}

fn check_regular(stat: &Stat, path: &Path) -> FsResult<()> {
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind == FileType::RegularFile {
        Ok(())
    } else {
        Err(FsError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_name(kind),
        })
    }
}

pub fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "special file",
    }
}

fn uuid_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Runs `check` once through openat2 and once through the component walk.
    fn both_ways(check: impl Fn(&dyn Fn(&Dir, &str) -> FsResult<OwnedFd>)) {
        for try_openat2 in [true, false] {
            check(&|dir: &Dir, rel: &str| {
                resolve(
                    &dir.fd,
                    &dir.path,
                    Path::new(rel),
                    OFlags::RDONLY,
                    try_openat2,
                )
            });
        }
    }

    fn tree() -> (tempfile::TempDir, Dir) {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        std::fs::create_dir_all(out.join("outbox/1")).unwrap();
        std::fs::write(out.join("outbox/1/a.txt"), b"a").unwrap();
        std::fs::write(root.path().join("secret"), b"host").unwrap();
        let dir = Dir::open(&out).unwrap();
        (root, dir)
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let (_root, out) = tree();
        both_ways(|open| {
            for bad in [
                "../secret",
                "outbox/../../secret",
                "/etc/passwd",
                "",
                "./outbox/1/a.txt",
            ] {
                assert!(
                    matches!(open(&out, bad), Err(FsError::BadPath { .. })),
                    "{bad}"
                );
            }
            assert!(open(&out, "outbox/1/a.txt").is_ok());
        });
    }

    #[test]
    fn a_link_at_the_end_is_refused() {
        let (root, out) = tree();
        symlink(root.path().join("secret"), out.path().join("outbox/1/l")).unwrap();
        symlink("a.txt", out.path().join("outbox/1/rel")).unwrap();
        both_ways(|open| {
            for bad in ["outbox/1/l", "outbox/1/rel"] {
                let got = open(&out, bad);
                assert!(matches!(got, Err(FsError::Link { .. })), "{bad}: {got:?}");
            }
        });
    }

    #[test]
    fn a_link_in_the_middle_is_refused() {
        let (root, out) = tree();
        symlink(root.path(), out.path().join("outbox/up")).unwrap();
        symlink("1", out.path().join("outbox/same")).unwrap();
        symlink("/proc/self", out.path().join("outbox/proc")).unwrap();
        both_ways(|open| {
            for bad in [
                "outbox/up/secret",
                "outbox/same/a.txt",
                "outbox/proc/environ",
            ] {
                let got = open(&out, bad);
                assert!(matches!(got, Err(FsError::Link { .. })), "{bad}: {got:?}");
            }
        });
        // The whole outbox swapped for a link.
        std::fs::rename(out.path().join("outbox"), out.path().join("old")).unwrap();
        symlink(out.path().join("old"), out.path().join("outbox")).unwrap();
        both_ways(|open| {
            assert!(matches!(
                open(&out, "outbox/1/a.txt"),
                Err(FsError::Link { .. })
            ));
        });
    }

    #[test]
    fn a_file_swapped_for_a_link_after_open_is_still_the_file_opened() {
        let (root, out) = tree();
        let (mut file, _) = out.open_file("outbox/1/a.txt").unwrap();
        let a = out.path().join("outbox/1/a.txt");
        std::fs::remove_file(&a).unwrap();
        symlink(root.path().join("secret"), &a).unwrap();
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "a", "reads go through the descriptor, never the path");
        assert!(matches!(
            out.read_file("outbox/1/a.txt", 10),
            Err(FsError::Link { .. })
        ));
    }

    #[test]
    fn only_regular_files_are_read_and_within_the_cap() {
        let (_root, out) = tree();
        let fifo = out.path().join("outbox/1/fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = out.read_file("outbox/1/fifo", 10).unwrap_err();
        assert!(
            matches!(err, FsError::NotRegular { kind: "FIFO", .. }),
            "{err}"
        );
        assert!(err.is_tampering());
        let err = out.read_file("outbox/1", 10).unwrap_err();
        assert!(
            matches!(
                err,
                FsError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            out.read_file("outbox/1/none", 10),
            Err(FsError::NotFound { .. })
        ));
        assert_eq!(out.read_file("outbox/1/a.txt", 1).unwrap(), b"a");
        assert!(matches!(
            out.read_file("outbox/1/a.txt", 0),
            Err(FsError::TooLarge { .. })
        ));
    }

    #[test]
    fn entries_are_looked_at_without_following_links() {
        let (root, out) = tree();
        symlink(root.path().join("secret"), out.path().join("heartbeat")).unwrap();
        let entry = out.entry("heartbeat").unwrap().unwrap();
        assert_eq!(entry.kind, FileType::Symlink);
        assert!(out.entry("missing").unwrap().is_none());
        assert_eq!(out.entry("outbox/1/a.txt").unwrap().unwrap().len, 1);
    }

    #[test]
    fn disk_usage_counts_the_tree_but_no_link_target() {
        let (root, out) = tree();
        std::fs::write(out.path().join("outbox/1/big"), vec![1u8; 256 * 1024]).unwrap();
        // A link to a big file elsewhere is not counted.
        std::fs::write(root.path().join("huge"), vec![1u8; 4 * 1024 * 1024]).unwrap();
        symlink(root.path(), out.path().join("up")).unwrap();
        let used = out.disk_usage(1000).unwrap().unwrap();
        assert!((256 * 1024..1024 * 1024).contains(&used), "{used}");
        assert_eq!(
            out.disk_usage(2).unwrap(),
            None,
            "more entries than allowed"
        );
    }

    #[test]
    fn writes_and_directories_never_pass_through_links() {
        let (root, out) = tree();
        symlink(root.path(), out.path().join("esc")).unwrap();
        assert!(matches!(
            out.create_dir_all("esc/new", 0o755),
            Err(FsError::Link { .. })
        ));
        assert!(!root.path().join("new").exists());
        let inbox = out.create_dir_all("inbox/42", 0o755).unwrap();
        inbox.write_atomic("photo.png", b"png", 0o644).unwrap();
        assert_eq!(
            std::fs::read(out.path().join("inbox/42/photo.png")).unwrap(),
            b"png"
        );
        // A link planted under the target name is replaced, not written through.
        symlink(root.path().join("secret"), out.path().join("inbox/42/x")).unwrap();
        inbox.write_atomic("x", b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(root.path().join("secret")).unwrap(), b"host");
        assert!(inbox.write_atomic("../x", b"", 0o644).is_err());
    }
}
