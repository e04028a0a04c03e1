//! The scheduler's own database of tasks.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use ferroclaw_proto::v1::Task;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::error::Result;

const DDL: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id            TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL,
    agent         TEXT NOT NULL,
    name          TEXT NOT NULL,
    schedule_kind TEXT NOT NULL,   -- cron | interval | once
    schedule      TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    state         TEXT NOT NULL,   -- active | paused | cancelled
    next_run      INTEGER,
    created_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_session ON tasks (session_id);
";

type Columns = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    i64,
);

#[derive(Clone)]
pub struct TaskStore {
    pool: SqlitePool,
}

impl TaskStore {
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        sqlx::query(DDL).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Tasks of one session, or of all sessions when `session_id` is `None`.
    pub async fn list(&self, session_id: Option<&str>) -> Result<Vec<Task>> {
        let rows: Vec<Columns> = sqlx::query_as(
            "SELECT id, session_id, agent, name, schedule_kind, schedule, timezone, prompt, state,
                    next_run, created_at
             FROM tasks WHERE $1 IS NULL OR session_id = $1 ORDER BY created_at, id",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Task {
                id: r.0,
                session_id: r.1,
                agent: r.2,
                name: r.3,
                schedule_kind: r.4,
                schedule: r.5,
                timezone: r.6,
                prompt: r.7,
                state: r.8,
                next_run_ms: r.9.unwrap_or(0),
                created_at_ms: r.10,
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_stored_tasks_by_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("scheduler.db"))
            .await
            .unwrap();
        assert!(store.list(None).await.unwrap().is_empty());
        sqlx::query(
            "INSERT INTO tasks VALUES ('t1', 's1', 'main', 'n', 'once', '2026-01-01T00:00:00Z',
             'UTC', 'p', 'active', 5, 1)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        assert_eq!(store.list(Some("s1")).await.unwrap()[0].next_run_ms, 5);
        assert!(store.list(Some("s2")).await.unwrap().is_empty());
        assert_eq!(store.list(None).await.unwrap().len(), 1);
    }
}
