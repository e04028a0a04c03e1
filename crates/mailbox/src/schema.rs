//! Table definitions and the schema version kept in each file's `user_version`.

use rusqlite::TransactionBehavior;

use crate::db::Db;
use crate::error::{Error, Result};

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

pub(crate) fn init_inbound(db: &Db) -> Result<()> {
    init(db, INBOUND_DDL, INBOUND_VERSION)
}

pub(crate) fn init_outbound(db: &Db) -> Result<()> {
    init(db, OUTBOUND_DDL, OUTBOUND_VERSION)
}

/// Creates the tables of a new file and stamps its version in the same transaction, or
/// checks the version of an existing one.
fn init(db: &Db, ddl: &str, expected: i64) -> Result<()> {
    let found = db.write(|conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found == 0 {
            tx.execute_batch(ddl)?;
            tx.execute_batch(&format!("PRAGMA user_version = {expected}"))?;
            tx.commit()?;
        }
        Ok(found)
    })?;
    match found {
        0 => Ok(()),
        v if v == expected => Ok(()),
        v => Err(Error::SchemaMismatch {
            path: db.path().to_path_buf(),
            found: v,
            expected,
        }),
    }
}

/// Checks the version of a file opened read-only. `Ok(false)`: not initialised yet.
pub(crate) fn check_version(db: &Db, expected: i64) -> Result<bool> {
    let found: i64 = db.read(|conn| conn.query_row("PRAGMA user_version", [], |r| r.get(0)))?;
    match found {
        0 => Ok(false),
        v if v == expected => Ok(true),
        v => Err(Error::SchemaMismatch {
            path: db.path().to_path_buf(),
            found: v,
            expected,
        }),
    }
}
