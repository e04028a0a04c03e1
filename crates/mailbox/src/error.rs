use std::path::PathBuf;

/// Everything that can go wrong reading or writing a session mailbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite error on {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A session file SQLite opened is not the one asked for.
    #[error("{path} refused: {why}")]
    Refused { path: PathBuf, why: String },
    /// A call on the agent's file did not return in time: something the agent put in
    /// `out/` holds it (a FIFO where SQLite opens the journal). The session's replies are
    /// not read until it returns; no other session waits for it.
    #[error(
        "{path}: a call on the agent's file did not return within {waited:?}; something in \
         out/ holds it, and the session's replies wait until it returns"
    )]
    Stuck {
        path: PathBuf,
        waited: std::time::Duration,
    },
    /// The mailbox was closed (evicted from the cache, or the session stopped) while a
    /// call still held it.
    #[error("{path} is closed")]
    Closed { path: PathBuf },
    #[error(
        "{path} has mailbox schema version {found}, but this build speaks version {expected}: \
         run an agent and a runner of the same ferroclaw release"
    )]
    SchemaMismatch {
        path: PathBuf,
        found: i64,
        expected: i64,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Content(#[from] ferroclaw_content::Error),
    /// A session file is not what belongs there (a link, a FIFO, a swapped file): the
    /// session was tampered with and is not served.
    #[error("session file refused: {0}")]
    File(#[from] crate::session_fs::FsError),
    #[error("file watch failed: {0}")]
    Watch(#[from] notify::Error),
    /// Another runner took the session over (several runners on shared storage): this
    /// one's placement is stale, and it writes nothing more there.
    #[error(
        "{path}: the session was taken over by another runner (fencing token {current}, this \
         runner holds {held}); nothing was written"
    )]
    Fenced {
        path: PathBuf,
        held: i64,
        current: i64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the database path to SQLite errors.
pub(crate) trait SqliteContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> SqliteContext<T> for std::result::Result<T, rusqlite::Error> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}

pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
