//! The scheduler's own database: tasks and their run history.

use std::path::Path;

use ferroclaw_proto::v1;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

use crate::error::Result;

const DDL: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id            TEXT PRIMARY KEY,
    series_id     TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    agent         TEXT NOT NULL,
    name          TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    schedule_kind TEXT NOT NULL,          -- cron | interval | once
    cron          TEXT NOT NULL DEFAULT '',
    interval_secs INTEGER NOT NULL DEFAULT 0,
    at            TEXT NOT NULL DEFAULT '',
    timezone      TEXT NOT NULL,
    catch_up      TEXT NOT NULL,          -- catch_up | skip
    reply_to      TEXT NOT NULL,          -- destination JSON
    state         TEXT NOT NULL,          -- active | paused | cancelled | completed
    next_run      INTEGER,
    last_run      INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_session ON tasks (session_id);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (next_run) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS runs (
    task_id      TEXT NOT NULL,
    series_id    TEXT NOT NULL,
    scheduled_at INTEGER NOT NULL,
    fired_at     INTEGER NOT NULL,
    outcome      TEXT NOT NULL,           -- enqueued | skipped | failed
    detail       TEXT,
    message_id   TEXT,
    PRIMARY KEY (task_id, series_id, scheduled_at)
);
";

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    pub series_id: String,
    pub session_id: String,
    pub agent: String,
    pub name: String,
    pub prompt: String,
    pub schedule: v1::Schedule,
    pub catch_up: String,
    pub reply_to: String,
    pub state: String,
    pub next_run: Option<i64>,
    pub last_run: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl TaskRow {
    pub fn to_proto(&self) -> v1::Task {
        v1::Task {
            id: self.id.clone(),
            series_id: self.series_id.clone(),
            session_id: self.session_id.clone(),
            agent: self.agent.clone(),
            name: self.name.clone(),
            prompt: self.prompt.clone(),
            schedule: Some(self.schedule.clone()),
            catch_up: self.catch_up.clone(),
            state: self.state.clone(),
            next_run_ms: self.next_run.unwrap_or(0),
            created_at_ms: self.created_at,
            updated_at_ms: self.updated_at,
            last_run_ms: self.last_run.unwrap_or(0),
        }
    }

    fn from_row(r: &SqliteRow) -> Result<Self> {
        Ok(Self {
            id: r.try_get("id")?,
            series_id: r.try_get("series_id")?,
            session_id: r.try_get("session_id")?,
            agent: r.try_get("agent")?,
            name: r.try_get("name")?,
            prompt: r.try_get("prompt")?,
            schedule: v1::Schedule {
                kind: r.try_get("schedule_kind")?,
                cron: r.try_get("cron")?,
                interval_secs: r.try_get("interval_secs")?,
                at: r.try_get("at")?,
                timezone: r.try_get("timezone")?,
            },
            catch_up: r.try_get("catch_up")?,
            reply_to: r.try_get("reply_to")?,
            state: r.try_get("state")?,
            next_run: r.try_get("next_run")?,
            last_run: r.try_get("last_run")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub scheduled_at: i64,
    pub fired_at: i64,
    pub outcome: String,
    pub detail: Option<String>,
    pub message_id: Option<String>,
}

#[derive(Clone)]
pub struct TaskStore {
    pool: SqlitePool,
}

impl TaskStore {
    pub async fn open(path: &Path) -> Result<Self> {
        let pool = ferroclaw_common::service_db::open(path, 2, DDL).await?;
        Ok(Self { pool })
    }

    /// Inserts a new task; `false` when its id exists already.
    pub async fn insert(&self, t: &TaskRow) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO tasks (id, series_id, session_id, agent, name, prompt, schedule_kind, cron,
                interval_secs, at, timezone, catch_up, reply_to, state, next_run, last_run,
                created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&t.id)
        .bind(&t.series_id)
        .bind(&t.session_id)
        .bind(&t.agent)
        .bind(&t.name)
        .bind(&t.prompt)
        .bind(&t.schedule.kind)
        .bind(&t.schedule.cron)
        .bind(t.schedule.interval_secs)
        .bind(&t.schedule.at)
        .bind(&t.schedule.timezone)
        .bind(&t.catch_up)
        .bind(&t.reply_to)
        .bind(&t.state)
        .bind(t.next_run)
        .bind(t.last_run)
        .bind(t.created_at)
        .bind(t.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Writes every mutable field of a task back.
    pub async fn update(&self, t: &TaskRow) -> Result<()> {
        sqlx::query(
            "UPDATE tasks SET series_id = $2, name = $3, prompt = $4, schedule_kind = $5, cron = $6,
                interval_secs = $7, at = $8, timezone = $9, catch_up = $10, state = $11,
                next_run = $12, last_run = $13, updated_at = $14
             WHERE id = $1",
        )
        .bind(&t.id)
        .bind(&t.series_id)
        .bind(&t.name)
        .bind(&t.prompt)
        .bind(&t.schedule.kind)
        .bind(&t.schedule.cron)
        .bind(t.schedule.interval_secs)
        .bind(&t.schedule.at)
        .bind(&t.schedule.timezone)
        .bind(&t.catch_up)
        .bind(&t.state)
        .bind(t.next_run)
        .bind(t.last_run)
        .bind(t.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<TaskRow>> {
        let row = sqlx::query("SELECT * FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(TaskRow::from_row).transpose()
    }

    /// Tasks of one session, or of all sessions when `session_id` is `None`.
    pub async fn list(&self, session_id: Option<&str>) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(
            "SELECT * FROM tasks WHERE $1 IS NULL OR session_id = $1 ORDER BY created_at, id",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TaskRow::from_row).collect()
    }

    /// Active tasks due at `now`, earliest first.
    pub async fn due(&self, now: i64, limit: u32) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(
            "SELECT * FROM tasks WHERE state = 'active' AND next_run <= $1
             ORDER BY next_run LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TaskRow::from_row).collect()
    }

    /// The earliest next run of any active task (an index lookup).
    pub async fn earliest_next_run(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(next_run) FROM tasks WHERE state = 'active' AND next_run IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Records a run and the task's state after it in one transaction, so a restart sees
    /// either both or neither (and then fires again under the same idempotency key).
    pub async fn record_run(&self, task: &TaskRow, run: &RunRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO runs (task_id, series_id, scheduled_at, fired_at, outcome, detail, message_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (task_id, series_id, scheduled_at) DO UPDATE
               SET fired_at = $4, outcome = $5, detail = $6, message_id = $7",
        )
        .bind(&task.id)
        .bind(&task.series_id)
        .bind(run.scheduled_at)
        .bind(run.fired_at)
        .bind(&run.outcome)
        .bind(&run.detail)
        .bind(&run.message_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE tasks SET state = $2, next_run = $3, last_run = $4, updated_at = $5 WHERE id = $1",
        )
        .bind(&task.id)
        .bind(&task.state)
        .bind(task.next_run)
        .bind(task.last_run)
        .bind(task.updated_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A task's runs, newest first.
    pub async fn runs(&self, task_id: &str, limit: u32) -> Result<Vec<(String, RunRecord)>> {
        let rows = sqlx::query(
            "SELECT series_id, scheduled_at, fired_at, outcome, detail, message_id FROM runs
             WHERE task_id = $1 ORDER BY fired_at DESC, scheduled_at DESC LIMIT $2",
        )
        .bind(task_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("series_id")?,
                    RunRecord {
                        scheduled_at: r.try_get("scheduled_at")?,
                        fired_at: r.try_get("fired_at")?,
                        outcome: r.try_get("outcome")?,
                        detail: r.try_get("detail")?,
                        message_id: r.try_get("message_id")?,
                    },
                ))
            })
            .collect()
    }

    /// Session ids that have tasks (to mirror them after a restart).
    pub async fn sessions(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT DISTINCT session_id FROM tasks")
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
