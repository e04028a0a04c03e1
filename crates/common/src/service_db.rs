//! A service's own SQLite database (runner registry, delivery ledger, scheduler tasks).

use std::path::Path;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Opens (creating) the database at `path` with WAL and NORMAL sync — one process owns it,
/// on a local disk — and runs the schema script `ddl` (idempotent `CREATE … IF NOT EXISTS`).
pub async fn open(path: &Path, max_connections: u32, ddl: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await?;
    // `query` runs every statement of the script on SQLite (`raw_sql` futures are not Send).
    sqlx::query(ddl).execute(&pool).await?;
    Ok(pool)
}
