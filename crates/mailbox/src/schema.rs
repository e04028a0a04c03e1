//! Table definitions and the schema version kept in each file's `user_version`.

use std::path::Path;

use sqlx::SqlitePool;

use crate::error::{Error, Result, SqliteContext};

/// Bumped whenever either file's layout changes; agent and runner must agree.
pub const INBOUND_VERSION: i64 = 1;
pub const OUTBOUND_VERSION: i64 = 1;

const INBOUND_DDL: &str = "
CREATE TABLE IF NOT EXISTS messages_in (
    seq           INTEGER PRIMARY KEY,  -- even
    id            TEXT NOT NULL UNIQUE, -- idempotency id
    kind          TEXT NOT NULL,
    created_at    INTEGER NOT NULL,     -- unix ms
    process_after INTEGER,
    state         TEXT NOT NULL DEFAULT 'active', -- active | cancelled
    origin        TEXT NOT NULL,        -- JSON
    content       TEXT NOT NULL,        -- JSON
    trace         TEXT
);
CREATE TABLE IF NOT EXISTS delivered (
    out_seq             INTEGER PRIMARY KEY,
    outcome             TEXT NOT NULL,  -- delivered | failed
    platform_message_id TEXT,
    detail              TEXT,
    at                  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id         TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,           -- JSON
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const OUTBOUND_DDL: &str = "
CREATE TABLE IF NOT EXISTS messages_out (
    seq         INTEGER PRIMARY KEY,    -- odd
    in_reply_to INTEGER,
    created_at  INTEGER NOT NULL,
    kind        TEXT NOT NULL,          -- chat | card | file | edit | reaction | action
    destination TEXT NOT NULL,          -- JSON
    content     TEXT NOT NULL,          -- JSON
    trace       TEXT
);
CREATE TABLE IF NOT EXISTS processing (
    in_seq     INTEGER PRIMARY KEY,
    status     TEXT NOT NULL,           -- processing | completed | failed
    attempt    INTEGER NOT NULL,
    changed_at INTEGER NOT NULL
);
";

pub(crate) async fn init_inbound(pool: &SqlitePool, path: &Path) -> Result<()> {
    init(pool, path, INBOUND_DDL, INBOUND_VERSION).await
}

pub(crate) async fn init_outbound(pool: &SqlitePool, path: &Path) -> Result<()> {
    init(pool, path, OUTBOUND_DDL, OUTBOUND_VERSION).await
}

/// Creates the tables of a new file and stamps its version in the same transaction, or
/// checks the version of an existing one.
async fn init(pool: &SqlitePool, path: &Path, ddl: &str, expected: i64) -> Result<()> {
    let mut tx = pool.begin().await.at(path)?;
    let found: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await
        .at(path)?;
    if found == 0 {
        // `query` runs every statement of the script on SQLite (`raw_sql` futures are not Send).
        sqlx::query(ddl).execute(&mut *tx).await.at(path)?;
        let stamp = format!("PRAGMA user_version = {expected}");
        sqlx::query(&stamp).execute(&mut *tx).await.at(path)?;
    } else if found != expected {
        return Err(Error::SchemaMismatch {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    tx.commit().await.at(path)
}

/// Checks the version of a file opened read-only. `Ok(false)`: not initialised yet.
pub(crate) async fn check_version(pool: &SqlitePool, path: &Path, expected: i64) -> Result<bool> {
    let found: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await
        .at(path)?;
    match found {
        0 => Ok(false),
        v if v == expected => Ok(true),
        v => Err(Error::SchemaMismatch {
            path: path.to_path_buf(),
            found: v,
            expected,
        }),
    }
}
