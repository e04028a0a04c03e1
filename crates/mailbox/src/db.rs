//! Opening the mailbox databases: journal mode, busy timeout, one writer connection.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::{Result, SqliteContext};

/// How long a connection waits for a lock held by the other side before it reports busy.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A single-connection pool that may write. One writer per file: the owner opens it.
pub(crate) async fn open_writer(path: &Path, mode: JournalMode) -> Result<SqlitePool> {
    // DELETE needs FULL to survive power loss uncorrupted; WAL is safe with NORMAL, which
    // skips the fsync per commit (a power cut may lose the last commits, never consistency;
    // a process crash loses nothing either way).
    let (journal, synchronous) = match mode {
        JournalMode::Delete => (SqliteJournalMode::Delete, SqliteSynchronous::Full),
        JournalMode::Wal => (SqliteJournalMode::Wal, SqliteSynchronous::Normal),
    };
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(journal)
        .synchronous(synchronous)
        .busy_timeout(BUSY_TIMEOUT);
    pool(options, path).await
}

/// A read-only connection to the file the other side writes.
///
/// `expected`, where given, is the file's real path (the directories above it resolved): the
/// host passes it for the agent's `outbound.db`. SQLite resolves
/// every link in a name before it opens it, then opens with `O_NOFOLLOW`; so checking the
/// name it reports against `expected` after each connect catches a link swapped in between
/// the caller's check and the open, without a race.
pub(crate) async fn open_reader(path: &Path, expected: Option<PathBuf>) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(BUSY_TIMEOUT);
    let Some(expected) = expected else {
        return pool(options, path).await;
    };
    let expected = Arc::new(expected);
    let checked = pool_options().after_connect(move |conn, _| {
        let expected = expected.clone();
        Box::pin(async move {
            let opened: String =
                sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                    .fetch_one(&mut *conn)
                    .await?;
            if Path::new(&opened) == expected.as_path() {
                Ok(())
            } else {
                Err(sqlx::Error::Protocol(format!(
                    "{} led to {opened}: a link was planted in its place",
                    expected.display()
                )))
            }
        })
    });
    checked.connect_with(options).await.at(path)
}

async fn pool(options: SqliteConnectOptions, path: &Path) -> Result<SqlitePool> {
    pool_options().connect_with(options).await.at(path)
}

fn pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(60))
}
