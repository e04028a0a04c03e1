//! The scheduler's own database: tasks and their run history.

use ferroclaw_common::service_db::{Location, Schema, Step};
use ferroclaw_proto::v1;
use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::error::Result;

/// The task store's migrations (services/scheduler/migrations/<engine>/).
static SCHEMA: Schema = Schema {
    service: "scheduler",
    sqlite: &[Step::new(
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    )],
    postgres: &[Step::new(
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    )],
    sqlite_legacy_columns: &[],
};

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

    fn from_row(r: &AnyRow) -> Result<Self> {
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
    pool: AnyPool,
}

impl TaskStore {
    /// Opens the store at `at` (a SQLite file by default, or PostgreSQL).
    pub async fn open(at: impl Into<Location>) -> Result<Self> {
        let db = ferroclaw_common::service_db::open(&at.into(), 2, &SCHEMA).await?;
        Ok(Self { pool: db.pool })
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

    /// Records a fired run and its task's state after it in one transaction, so a restart
    /// sees either both or neither (and then fires again under the same idempotency key).
    ///
    /// `due_at` is the task's next run as the firing read it. Two schedulers may fire the
    /// same run around a handover (harmless: same key); the first record stands, and the task
    /// moves on only from the state the firing read, never back from where another scheduler,
    /// a pause or an edit has moved it meanwhile. Returns whether this call recorded the run.
    pub async fn record_run(&self, task: &TaskRow, due_at: i64, run: &RunRecord) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let recorded = insert_run(&mut tx, task, run).await?;
        sqlx::query(
            "UPDATE tasks SET state = $2, next_run = $3, last_run = $4, updated_at = $5
             WHERE id = $1 AND state = 'active' AND next_run = $6",
        )
        .bind(&task.id)
        .bind(&task.state)
        .bind(task.next_run)
        .bind(task.last_run)
        .bind(task.updated_at)
        .bind(due_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(recorded)
    }

    /// Records a run outside the schedule ("run now"); the task itself does not change.
    pub async fn add_run(&self, task: &TaskRow, run: &RunRecord) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let recorded = insert_run(&mut tx, task, run).await?;
        tx.commit().await?;
        Ok(recorded)
    }

    /// The store's pool, on which `leadership` opens its lock's connection.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
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

/// Inserts a run unless one with its key (task, series, scheduled time) is recorded already;
/// returns whether it was inserted.
async fn insert_run(
    tx: &mut Transaction<'_, Any>,
    task: &TaskRow,
    run: &RunRecord,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO runs (task_id, series_id, scheduled_at, fired_at, outcome, detail, message_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (task_id, series_id, scheduled_at) DO NOTHING",
    )
    .bind(&task.id)
    .bind(&task.series_id)
    .bind(run.scheduled_at)
    .bind(run.fired_at)
    .bind(&run.outcome)
    .bind(&run.detail)
    .bind(&run.message_id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, session: &str, next_run: Option<i64>, created_at: i64) -> TaskRow {
        TaskRow {
            id: id.into(),
            series_id: format!("{id}-s1"),
            session_id: session.into(),
            agent: "main".into(),
            name: format!("task {id}"),
            prompt: "p".into(),
            schedule: v1::Schedule {
                kind: "interval".into(),
                cron: String::new(),
                interval_secs: 60,
                at: String::new(),
                timezone: "UTC".into(),
            },
            catch_up: "skip".into(),
            reply_to: "{}".into(),
            state: "active".into(),
            next_run,
            last_run: None,
            created_at,
            updated_at: created_at,
        }
    }

    #[tokio::test]
    async fn tasks_and_runs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "scheduler").await {
            let store = TaskStore::open(&at).await.unwrap();
            let a = task("a", "s1", Some(2_000), 1);
            let b = task("b", "s2", Some(1_000), 2);
            let c = task("c", "s1", None, 3);
            for t in [&a, &b, &c] {
                assert!(store.insert(t).await.unwrap(), "{at:?}");
            }
            assert!(!store.insert(&a).await.unwrap(), "an id is inserted once");
            assert_eq!(store.get("a").await.unwrap(), Some(a.clone()), "{at:?}");
            assert_eq!(store.get("none").await.unwrap(), None);
            let ids = |rows: Vec<TaskRow>| rows.into_iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(ids(store.list(None).await.unwrap()), ["a", "b", "c"]);
            assert_eq!(ids(store.list(Some("s1")).await.unwrap()), ["a", "c"]);
            assert_eq!(ids(store.due(1_500, 10).await.unwrap()), ["b"]);
            assert_eq!(ids(store.due(5_000, 1).await.unwrap()), ["b"]);
            assert_eq!(store.earliest_next_run().await.unwrap(), Some(1_000));

            let mut paused = b.clone();
            paused.state = "paused".into();
            paused.name = "renamed".into();
            paused.updated_at = 9;
            store.update(&paused).await.unwrap();
            assert_eq!(store.get("b").await.unwrap(), Some(paused.clone()));
            assert_eq!(store.earliest_next_run().await.unwrap(), Some(2_000));

            let mut fired = a.clone();
            fired.next_run = Some(62_000);
            fired.last_run = Some(2_000);
            let run = |outcome: &str, fired_at| RunRecord {
                scheduled_at: 2_000,
                fired_at,
                outcome: outcome.into(),
                detail: None,
                message_id: Some("m1".into()),
            };
            assert!(
                store
                    .record_run(&fired, 2_000, &run("enqueued", 2_010))
                    .await
                    .unwrap()
            );
            // Another scheduler fired the same run from the task as it had read it (around a
            // handover): the first record stands, and the task is not moved again.
            let mut other = fired.clone();
            other.next_run = Some(99_000);
            assert!(
                !store
                    .record_run(&other, 2_000, &run("failed", 2_020))
                    .await
                    .unwrap(),
                "{at:?}"
            );
            assert_eq!(
                store.runs("a", 10).await.unwrap(),
                vec![("a-s1".to_string(), run("enqueued", 2_010))]
            );
            assert_eq!(store.get("a").await.unwrap(), Some(fired.clone()));
            // A run of a task paused while it fired is recorded; the task stays paused.
            let mut b_fired = paused.clone();
            b_fired.state = "active".into();
            b_fired.next_run = Some(61_000);
            assert!(
                store
                    .record_run(&b_fired, 1_000, &run("enqueued", 1_010))
                    .await
                    .unwrap()
            );
            assert_eq!(store.get("b").await.unwrap(), Some(paused));
            // "Run now" adds a run and leaves the task as it is.
            let manual = RunRecord {
                scheduled_at: 3_000,
                fired_at: 3_000,
                outcome: "enqueued".into(),
                detail: Some("run now".into()),
                message_id: Some("m2".into()),
            };
            assert!(store.add_run(&fired, &manual).await.unwrap());
            assert!(!store.add_run(&fired, &manual).await.unwrap());
            assert_eq!(store.runs("a", 10).await.unwrap().len(), 2);
            assert_eq!(store.get("a").await.unwrap(), Some(fired));
            let mut sessions = store.sessions().await.unwrap();
            sessions.sort();
            assert_eq!(sessions, ["s1", "s2"]);
            store.close().await;
        }
    }

    #[tokio::test]
    async fn two_schedulers_recording_one_run_at_once_record_it_once() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "scheduler").await {
            // Two stores on one database: two scheduler processes.
            let (one, two) = (
                TaskStore::open(&at).await.unwrap(),
                TaskStore::open(&at).await.unwrap(),
            );
            let due = task("d", "s", Some(5_000), 1);
            one.insert(&due).await.unwrap();
            let mut fired = due.clone();
            fired.next_run = Some(65_000);
            fired.last_run = Some(5_000);
            let run = |fired_at| RunRecord {
                scheduled_at: 5_000,
                fired_at,
                outcome: "enqueued".into(),
                detail: None,
                message_id: Some("m".into()),
            };
            let (first, second) = (run(5_010), run(5_020));
            let (a, b) = tokio::join!(
                one.record_run(&fired, 5_000, &first),
                two.record_run(&fired, 5_000, &second),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!(a ^ b, "{at:?}: exactly one records the run ({a}, {b})");
            let runs = one.runs("d", 10).await.unwrap();
            assert_eq!(runs.len(), 1, "{at:?}: {runs:?}");
            assert_eq!(one.get("d").await.unwrap(), Some(fired));
            one.close().await;
            two.close().await;
        }
    }

    #[tokio::test]
    async fn a_fresh_store_gets_every_migration_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "scheduler").await {
            let store = TaskStore::open(&at).await.unwrap();
            ferroclaw_common::test_postgres::check_migrations_then_add_a_future_one(
                &store.pool,
                &SCHEMA,
                &at,
            )
            .await;
            store.close().await;
            let Err(err) = TaskStore::open(&at).await else {
                panic!("{at:?}: a database newer than the binary was opened");
            };
            let message = err.to_string();
            assert!(
                message.contains("scheduler database") && message.contains("[9999]"),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn a_store_made_before_migrations_keeps_its_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        {
            use sqlx::{ConnectOptions, Executor};
            let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .connect()
                .await
                .unwrap();
            // The schema as the scheduler made it before migrations, with a task in it.
            conn.execute(include_str!("../migrations/sqlite/0001_init.sql"))
                .await
                .unwrap();
            conn.execute(
                "INSERT INTO tasks (id, series_id, session_id, agent, name, prompt,
                    schedule_kind, interval_secs, timezone, catch_up, reply_to, state,
                    next_run, created_at, updated_at)
                 VALUES ('old', 'old-s1', 's', 'main', 'n', 'p', 'interval', 60, 'UTC',
                    'skip', '{}', 'active', 5, 1, 1)",
            )
            .await
            .unwrap();
        }
        let store = TaskStore::open(&path).await.unwrap();
        let old = store.get("old").await.unwrap().unwrap();
        assert_eq!((old.next_run, old.schedule.interval_secs), (Some(5), 60));
        assert!(store.insert(&task("new", "s", Some(1), 2)).await.unwrap());
    }
}
