//! The runner's own database: which sessions exist, for which agent and conversation.

use ferroclaw_common::service_db::{Engine, Location, Schema, Step};
use sqlx::AnyPool;

use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub agent: String,
    pub conversation_key: String,
    pub created_at: i64,
    pub last_activity: i64,
    /// The runner the session is placed on, when several serve (`None`: the only one).
    pub runner: Option<String>,
    /// The placement's fencing token (0 when never placed).
    pub fence: i64,
}

/// Sessions kept in memory at most (forgotten all at once past that: they are read again).
/// The busy ones are what it is for; every idle one kept costs memory that stays.
const KNOWN_SESSIONS: usize = 1024;
/// A session's `last_activity` is written at most this often.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Default)]
struct Known {
    by_id: std::collections::HashMap<String, SessionRecord>,
    /// (agent, conversation key) → id.
    by_key: std::collections::HashMap<(String, String), String>,
    /// When each session's `last_activity` was last written (ms).
    touched: std::collections::HashMap<String, i64>,
}

/// Column order of every `SELECT` below (sqlx's derive needs its macros, which we do not build).
type Columns = (String, String, String, i64, i64, Option<String>, i64);
const COLUMNS: &str = "id, agent, conversation_key, created_at, last_activity, runner, fence";

impl From<Columns> for SessionRecord {
    fn from(
        (id, agent, conversation_key, created_at, last_activity, runner, fence): Columns,
    ) -> Self {
        Self {
            id,
            agent,
            conversation_key,
            created_at,
            last_activity,
            runner,
            fence,
        }
    }
}

#[derive(Clone)]
pub struct Registry {
    pool: AnyPool,
    /// The few statements the engines spell differently branch on it.
    engine: Engine,
    /// Sessions looked up recently: a session's id, agent and key never change, so every
    /// message need not read them again.
    known: std::sync::Arc<std::sync::Mutex<Known>>,
    /// Session counts, per agent and in all (see [`Registry::count_of`]).
    counted: std::sync::Arc<std::sync::Mutex<Counted>>,
    /// This runner's id when several serve: [`Registry::list_here`] lists its sessions only.
    here: Option<String>,
}

/// How a page of sessions is ordered. Ties are broken by id, so consecutive pages never
/// overlap or skip a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Latest activity first.
    Recent,
    /// Least recent activity first.
    Oldest,
    /// By creation, as [`Registry::list`] lists them.
    Created,
}

impl Order {
    /// Each has its index (migration 2): a page is read in index order, never sorted.
    fn sql(self) -> &'static str {
        match self {
            Self::Recent => "last_activity DESC, id",
            Self::Oldest => "last_activity, id",
            Self::Created => "created_at, id",
        }
    }
}

/// A count is taken again after this long even without a session created here: rows
/// written behind the runner's back (a restored file, a hand edit) show within seconds.
const COUNT_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Session counts by agent (`None`: all), each valid while no session was created since.
#[derive(Default)]
struct Counted {
    /// Sessions this registry created; a count taken under another number is stale.
    created: u64,
    by_agent: std::collections::HashMap<Option<String>, (u64, std::time::Instant, i64)>,
}

/// The registry's migrations (services/runner/migrations/<engine>/).
static SCHEMA: Schema = Schema {
    service: "runner",
    sqlite: &[
        Step::new(
            1,
            "init",
            include_str!("../migrations/sqlite/0001_init.sql"),
        ),
        Step::new(
            2,
            "session_order",
            include_str!("../migrations/sqlite/0002_session_order.sql"),
        ),
        Step::new(
            3,
            "placement",
            include_str!("../migrations/sqlite/0003_placement.sql"),
        ),
    ],
    postgres: &[
        Step::new(
            1,
            "init",
            include_str!("../migrations/postgres/0001_init.sql"),
        ),
        Step::new(
            2,
            "session_order",
            include_str!("../migrations/postgres/0002_session_order.sql"),
        ),
        Step::new(
            3,
            "placement",
            include_str!("../migrations/postgres/0003_placement.sql"),
        ),
    ],
    sqlite_legacy_columns: &[],
};

/// Model tokens used through the credential proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// One agent's usage on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub agent: String,
    /// "YYYY-MM-DD".
    pub day: String,
    pub usage: Usage,
}

impl Usage {
    pub fn total_tokens(&self) -> i64 {
        self.input_tokens + self.output_tokens
    }
}

impl Registry {
    /// Opens the registry at `at` (a SQLite file by default, or PostgreSQL).
    /// The pool, for the runner lock's connection.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn open(at: impl Into<Location>) -> Result<Self> {
        let db = ferroclaw_common::service_db::open(&at.into(), 4, &SCHEMA).await?;
        Ok(Self {
            pool: db.pool,
            engine: db.engine,
            known: Default::default(),
            counted: Default::default(),
            here: None,
        })
    }

    /// The registry as runner `id` among several sees it (see [`Registry::list_here`]).
    pub fn placed_as(mut self, id: &str) -> Self {
        self.here = Some(id.to_string());
        self
    }

    /// The engine the registry is on.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The session of (agent, conversation key), created with a new id when absent. A new
    /// session is placed on `runner` (several runners) with a fresh fencing token.
    pub async fn get_or_create(
        &self,
        agent: &str,
        conversation_key: &str,
        runner: Option<&str>,
    ) -> Result<SessionRecord> {
        if let Some(found) = self.cached(|k| {
            k.by_key
                .get(&(agent.to_string(), conversation_key.to_string()))
                .and_then(|id| k.by_id.get(id))
                .cloned()
        }) {
            return Ok(found);
        }
        if let Some(found) = self.find(agent, conversation_key).await? {
            self.remember(&found);
            return Ok(found);
        }
        let now = ferroclaw_mailbox::now_ms();
        let insert = format!(
            "INSERT INTO sessions (id, agent, conversation_key, created_at, last_activity, runner, fence)
             VALUES ($1, $2, $3, $4, $4, $5, {}) ON CONFLICT (agent, conversation_key) DO NOTHING",
            self.new_fence(runner.is_some())
        );
        let inserted = sqlx::query(&insert)
            .bind(ferroclaw_common::ids::new_id("ses"))
            .bind(agent)
            .bind(conversation_key)
            .bind(now)
            .bind(runner)
            .execute(&self.pool)
            .await?;
        if inserted.rows_affected() > 0
            && let Ok(mut counted) = self.counted.lock()
        {
            counted.created += 1;
            counted.by_agent.clear();
        }
        // A concurrent enqueue may have won the insert: read back whichever row stands.
        let found = self
            .find(agent, conversation_key)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        self.remember(&found);
        Ok(found)
    }

    /// SQL for a new fencing token: the next of the sequence when placing on PostgreSQL.
    fn new_fence(&self, placing: bool) -> &'static str {
        match self.engine {
            Engine::Postgres if placing => "nextval('session_fences')",
            _ => "0",
        }
    }

    /// Forgets what is remembered of session `id`: its placement changed.
    pub fn forget(&self, id: &str) {
        if let Ok(mut known) = self.known.lock()
            && let Some(gone) = known.by_id.remove(id)
        {
            known.by_key.remove(&(gone.agent, gone.conversation_key));
        }
    }

    /// Session `id` read from the database, never from memory.
    pub async fn get_fresh(&self, id: &str) -> Result<Option<SessionRecord>> {
        self.forget(id);
        self.get(id).await
    }

    /// Places session `id` on `runner` with a new fencing token, if it is still where it
    /// was found (`from`; `None`: never placed). The new record, or `None` when another
    /// runner moved it first.
    pub async fn place(
        &self,
        id: &str,
        from: Option<&str>,
        runner: &str,
    ) -> Result<Option<SessionRecord>> {
        let sql = format!(
            "UPDATE sessions SET runner = $2, fence = {}
             WHERE id = $1 AND (runner = $3 OR ($3 IS NULL AND runner IS NULL))
             RETURNING {COLUMNS}",
            self.new_fence(true)
        );
        let row: Option<Columns> = sqlx::query_as(&sql)
            .bind(id)
            .bind(runner)
            .bind(from)
            .fetch_optional(&self.pool)
            .await?;
        self.forget(id);
        let placed: Option<SessionRecord> = row.map(Into::into);
        if let Some(session) = &placed {
            self.remember(session);
        }
        Ok(placed)
    }

    /// The sessions placed on `runner` (`None`: never placed), in creation order.
    pub async fn placed_on(&self, runner: Option<&str>) -> Result<Vec<SessionRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sessions
             WHERE runner = $1 OR ($1 IS NULL AND runner IS NULL) ORDER BY created_at, id"
        );
        let rows: Vec<Columns> = sqlx::query_as(&sql)
            .bind(runner)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Whether this runner serves `session`: the only runner serves all.
    pub fn is_here(&self, session: &SessionRecord) -> bool {
        self.here.is_none() || session.runner == self.here
    }

    /// This runner's id among several.
    pub fn here(&self) -> Option<&str> {
        self.here.as_deref()
    }

    /// Sessions placed on each runner.
    pub async fn placed_counts(&self) -> Result<std::collections::HashMap<String, u64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT runner, count(*) FROM sessions WHERE runner IS NOT NULL GROUP BY runner",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(runner, n)| (runner, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// The sessions this runner serves: all of them, or with several runners those placed
    /// on this one.
    pub async fn list_here(&self) -> Result<Vec<SessionRecord>> {
        match &self.here {
            None => self.list(None).await,
            Some(me) => self.placed_on(Some(me)).await,
        }
    }

    fn cached(&self, look: impl FnOnce(&Known) -> Option<SessionRecord>) -> Option<SessionRecord> {
        self.known.lock().ok().and_then(|k| look(&k))
    }

    fn remember(&self, session: &SessionRecord) {
        if let Ok(mut known) = self.known.lock() {
            if known.by_id.len() >= KNOWN_SESSIONS {
                *known = Known::default();
            }
            known.by_key.insert(
                (session.agent.clone(), session.conversation_key.clone()),
                session.id.clone(),
            );
            known.by_id.insert(session.id.clone(), session.clone());
        }
    }

    async fn find(&self, agent: &str, conversation_key: &str) -> Result<Option<SessionRecord>> {
        let sql =
            format!("SELECT {COLUMNS} FROM sessions WHERE agent = $1 AND conversation_key = $2");
        let row: Option<Columns> = sqlx::query_as(&sql)
            .bind(agent)
            .bind(conversation_key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Into::into))
    }

    /// A session by id. The record may come from memory: its `last_activity` is then as of
    /// when it was read (`list` reads them fresh).
    pub async fn get(&self, id: &str) -> Result<Option<SessionRecord>> {
        if let Some(found) = self.cached(|k| k.by_id.get(id).cloned()) {
            return Ok(Some(found));
        }
        let sql = format!("SELECT {COLUMNS} FROM sessions WHERE id = $1");
        let row: Option<Columns> = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let found: Option<SessionRecord> = row.map(Into::into);
        if let Some(session) = &found {
            self.remember(session);
        }
        Ok(found)
    }

    /// Sessions on disk.
    pub async fn count(&self) -> Result<i64> {
        self.count_of(None).await
    }

    /// Sessions of `agent` (`None`: of every agent). Remembered until this registry creates
    /// a session (or for [`COUNT_FRESH`]): every page of the console asks for it.
    pub async fn count_of(&self, agent: Option<&str>) -> Result<i64> {
        let key = agent.map(str::to_string);
        let created = match self.counted.lock() {
            Ok(counted) => {
                if let Some((at, when, n)) = counted.by_agent.get(&key)
                    && *at == counted.created
                    && when.elapsed() < COUNT_FRESH
                {
                    return Ok(*n);
                }
                Some(counted.created)
            }
            Err(_) => None,
        };
        let when = std::time::Instant::now();
        // Without a filter SQLite counts the smallest index's entries, never the rows.
        let n: i64 = match agent {
            None => sqlx::query_scalar("SELECT count(*) FROM sessions"),
            Some(agent) => {
                sqlx::query_scalar("SELECT count(*) FROM sessions WHERE agent = $1").bind(agent)
            }
        }
        .fetch_one(&self.pool)
        .await?;
        // Kept only if no session was created while it was counted.
        if let Some(at) = created
            && let Ok(mut counted) = self.counted.lock()
            && counted.created == at
        {
            counted.by_agent.insert(key, (at, when, n));
        }
        Ok(n)
    }

    /// `limit` sessions from `offset` in `order`: of `agent` only when given, and never one
    /// of `except` (the sessions whose agent runs, when the page is of idle ones).
    pub async fn page(
        &self,
        agent: Option<&str>,
        except: &[&str],
        order: Order,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<SessionRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sessions
             WHERE ($1 IS NULL OR agent = $1) AND id NOT IN {}
             ORDER BY {} LIMIT $3 OFFSET $4",
            self.ids_of_json(2),
            order.sql()
        );
        let rows: Vec<Columns> = sqlx::query_as(&sql)
            .bind(agent)
            .bind(serde_json::to_string(except).unwrap_or_else(|_| "[]".into()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// The sessions of `ids` that exist (of `agent` only, when given), in no given order.
    pub async fn get_many(&self, ids: &[&str], agent: Option<&str>) -> Result<Vec<SessionRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM sessions WHERE ($1 IS NULL OR agent = $1) AND id IN {}",
            self.ids_of_json(2)
        );
        let rows: Vec<Columns> = sqlx::query_as(&sql)
            .bind(agent)
            .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// A subquery of the ids in the JSON array bound to `$n`: one bind however many.
    fn ids_of_json(&self, n: u8) -> String {
        match self.engine {
            Engine::Sqlite => format!("(SELECT value FROM json_each(${n}))"),
            Engine::Postgres => format!("(SELECT json_array_elements_text(CAST(${n} AS json)))"),
        }
    }

    pub async fn list(&self, agent: Option<&str>) -> Result<Vec<SessionRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sessions WHERE $1 IS NULL OR agent = $1 ORDER BY created_at, id"
        );
        let rows: Vec<Columns> = sqlx::query_as(&sql)
            .bind(agent)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Adds one model request's tokens to its session's account and to its agent's day
    /// (UTC), in one transaction: the two never disagree. (The upserts name the table's
    /// columns: unqualified, PostgreSQL finds them ambiguous with `excluded`'s.)
    pub async fn record_usage(
        &self,
        session_id: &str,
        agent: &str,
        input_tokens: i64,
        output_tokens: i64,
    ) -> Result<()> {
        let now = ferroclaw_mailbox::now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO model_usage (session_id, agent, requests, input_tokens, output_tokens, updated_at)
             VALUES ($1, $2, 1, $3, $4, $5)
             ON CONFLICT (session_id) DO UPDATE SET requests = model_usage.requests + 1,
                 input_tokens = model_usage.input_tokens + $3,
                 output_tokens = model_usage.output_tokens + $4, updated_at = $5",
        )
        .bind(session_id)
        .bind(agent)
        .bind(input_tokens)
        .bind(output_tokens)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO model_usage_daily (agent, day, requests, input_tokens, output_tokens)
             VALUES ($1, $2, 1, $3, $4)
             ON CONFLICT (agent, day) DO UPDATE SET requests = model_usage_daily.requests + 1,
                 input_tokens = model_usage_daily.input_tokens + $3,
                 output_tokens = model_usage_daily.output_tokens + $4",
        )
        .bind(agent)
        .bind(crate::utc_day::utc_day(now))
        .bind(input_tokens)
        .bind(output_tokens)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// All-time usage of each session in `ids` that has any (one query for the lot).
    pub async fn usage_of_sessions(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, Usage>> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        // The ids travel as one JSON array: one bind however many there are.
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
        let sql = match self.engine {
            Engine::Sqlite => {
                "SELECT session_id, requests, input_tokens, output_tokens FROM model_usage
                 WHERE session_id IN (SELECT value FROM json_each($1))"
            }
            Engine::Postgres => {
                "SELECT session_id, requests, input_tokens, output_tokens FROM model_usage
                 WHERE session_id IN (SELECT json_array_elements_text(CAST($1 AS json)))"
            }
        };
        let rows: Vec<(String, i64, i64, i64)> =
            sqlx::query_as(sql).bind(ids).fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|(id, requests, input_tokens, output_tokens)| {
                let usage = Usage {
                    requests,
                    input_tokens,
                    output_tokens,
                };
                (id, usage)
            })
            .collect())
    }

    /// All-time usage of every agent that has any, by name.
    pub async fn usage_by_agent(&self) -> Result<Vec<(String, Usage)>> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            // PostgreSQL sums BIGINT as NUMERIC: cast back.
            "SELECT agent, CAST(sum(requests) AS BIGINT), CAST(sum(input_tokens) AS BIGINT),
                    CAST(sum(output_tokens) AS BIGINT)
             FROM model_usage GROUP BY agent ORDER BY agent",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(agent, requests, input_tokens, output_tokens)| {
                let usage = Usage {
                    requests,
                    input_tokens,
                    output_tokens,
                };
                (agent, usage)
            })
            .collect())
    }

    /// Usage per agent and UTC day from `since` ("YYYY-MM-DD") on, by agent then day.
    pub async fn daily_usage(&self, since: &str) -> Result<Vec<DailyUsage>> {
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT agent, day, requests, input_tokens, output_tokens FROM model_usage_daily
             WHERE day >= $1 ORDER BY agent, day",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(agent, day, requests, input_tokens, output_tokens)| DailyUsage {
                    agent,
                    day,
                    usage: Usage {
                        requests,
                        input_tokens,
                        output_tokens,
                    },
                },
            )
            .collect())
    }

    /// Tokens used by one session, or by every session of an agent.
    pub async fn usage(&self, session_id: Option<&str>, agent: Option<&str>) -> Result<Usage> {
        let (requests, input_tokens, output_tokens): (i64, i64, i64) = sqlx::query_as(
            "SELECT CAST(coalesce(sum(requests), 0) AS BIGINT),
                    CAST(coalesce(sum(input_tokens), 0) AS BIGINT),
                    CAST(coalesce(sum(output_tokens), 0) AS BIGINT)
             FROM model_usage WHERE ($1 IS NULL OR session_id = $1) AND ($2 IS NULL OR agent = $2)",
        )
        .bind(session_id)
        .bind(agent)
        .fetch_one(&self.pool)
        .await?;
        Ok(Usage {
            requests,
            input_tokens,
            output_tokens,
        })
    }

    /// Records activity. A session written less than [`TOUCH_EVERY`] ago is not written
    /// again: under load that is one write per session per second, not one per message.
    pub async fn touch(&self, id: &str) -> Result<()> {
        let now = ferroclaw_mailbox::now_ms();
        let recent = self.known.lock().is_ok_and(|mut k| {
            let last = k.touched.get(id).copied().unwrap_or(i64::MIN);
            if now.saturating_sub(last) < TOUCH_EVERY.as_millis() as i64 {
                return true;
            }
            if k.touched.len() >= KNOWN_SESSIONS {
                // Only the last second's writes matter.
                let every = TOUCH_EVERY.as_millis() as i64;
                k.touched.retain(|_, at| now.saturating_sub(*at) < every);
                k.touched.shrink_to_fit();
            }
            k.touched.insert(id.to_string(), now);
            false
        });
        if recent {
            return Ok(());
        }
        sqlx::query("UPDATE sessions SET last_activity = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_session_per_agent_and_key() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "runner").await {
            let reg = Registry::open(&at).await.unwrap();
            let a = reg.get_or_create("main", "api:c1", None).await.unwrap();
            let b = reg.get_or_create("main", "api:c1", None).await.unwrap();
            let c = reg.get_or_create("main", "api:c2", None).await.unwrap();
            assert_eq!(a, b);
            assert_ne!(a.id, c.id);
            assert_eq!(reg.list(Some("main")).await.unwrap().len(), 2);
            assert_eq!(reg.list(Some("other")).await.unwrap().len(), 0);
            assert_eq!(reg.get(&a.id).await.unwrap().unwrap().agent, "main");
            assert_eq!(reg.count().await.unwrap(), 2);
            reg.touch(&a.id).await.unwrap();
            let listed = reg.list(None).await.unwrap();
            assert!(listed[0].last_activity >= a.last_activity, "{at:?}");
        }
    }

    #[tokio::test]
    async fn placements_take_ever_greater_fencing_tokens_and_move_once() {
        // Several runners exist only on PostgreSQL.
        let Some(cluster) = ferroclaw_common::test_postgres::cluster() else {
            return;
        };
        let url = cluster.create_database("placement").await.unwrap();
        let reg = Registry::open(Location::Postgres(url))
            .await
            .unwrap()
            .placed_as("a");
        let first = reg.get_or_create("main", "k1", Some("a")).await.unwrap();
        let second = reg.get_or_create("main", "k2", Some("b")).await.unwrap();
        assert_eq!(first.runner.as_deref(), Some("a"));
        assert!(
            first.fence > 0 && second.fence > first.fence,
            "{first:?} {second:?}"
        );
        assert!(reg.is_here(&first) && !reg.is_here(&second));
        assert_eq!(reg.list_here().await.unwrap(), vec![first.clone()]);

        // b goes missing; a takes k2 over once, with a greater token.
        let moved = reg
            .place(&second.id, Some("b"), "a")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(moved.runner.as_deref(), Some("a"));
        assert!(moved.fence > second.fence);
        assert_eq!(reg.place(&second.id, Some("b"), "c").await.unwrap(), None);
        assert_eq!(reg.get(&second.id).await.unwrap(), Some(moved.clone()));
        assert_eq!(reg.placed_on(Some("b")).await.unwrap(), vec![]);
        let counts = reg.placed_counts().await.unwrap();
        assert_eq!(counts.get("a"), Some(&2));

        // A session from before placement is placed once, whoever asks first.
        let sqlite_era = reg.get_or_create("main", "old", None).await.unwrap();
        assert_eq!((sqlite_era.runner.as_deref(), sqlite_era.fence), (None, 0));
        assert_eq!(reg.placed_on(None).await.unwrap(), vec![sqlite_era.clone()]);
        let placed = reg.place(&sqlite_era.id, None, "a").await.unwrap().unwrap();
        assert!(placed.fence > moved.fence);
        assert_eq!(reg.place(&sqlite_era.id, None, "b").await.unwrap(), None);
    }

    #[tokio::test]
    async fn usage_adds_up_per_session_and_agent() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "runner").await {
            let reg = Registry::open(&at).await.unwrap();
            reg.record_usage("s1", "main", 100, 10).await.unwrap();
            reg.record_usage("s1", "main", 50, 5).await.unwrap();
            reg.record_usage("s2", "main", 1, 1).await.unwrap();
            reg.record_usage("s3", "other", 7, 7).await.unwrap();
            let s1 = reg.usage(Some("s1"), None).await.unwrap();
            assert_eq!(
                (s1.requests, s1.input_tokens, s1.output_tokens),
                (2, 150, 15)
            );
            assert_eq!(
                reg.usage(None, Some("main")).await.unwrap().total_tokens(),
                167
            );
            assert_eq!(
                reg.usage(None, Some("none")).await.unwrap(),
                Usage::default()
            );
        }
    }

    #[tokio::test]
    async fn usage_is_also_counted_per_agent_and_utc_day() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "runner").await {
            let reg = Registry::open(&at).await.unwrap();
            reg.record_usage("s1", "main", 100, 10).await.unwrap();
            reg.record_usage("s2", "main", 50, 5).await.unwrap();
            reg.record_usage("s3", "other", 7, 7).await.unwrap();
            let today = crate::utc_day::utc_day(ferroclaw_mailbox::now_ms());
            // A day from before the window, written as an older runner day would be.
            sqlx::query(
                "INSERT INTO model_usage_daily (agent, day, requests, input_tokens, output_tokens)
             VALUES ('main', '2000-01-01', 9, 9, 9)",
            )
            .execute(&reg.pool)
            .await
            .unwrap();
            let days = reg.daily_usage("2001-01-01").await.unwrap();
            let expected = |agent: &str, requests, input_tokens, output_tokens| DailyUsage {
                agent: agent.into(),
                day: today.clone(),
                usage: Usage {
                    requests,
                    input_tokens,
                    output_tokens,
                },
            };
            // The day in a day's window may have turned between the writes and `today`.
            if days.iter().all(|d| d.day == today) {
                assert_eq!(
                    days,
                    vec![expected("main", 2, 150, 15), expected("other", 1, 7, 7)]
                );
            }
            assert_eq!(reg.daily_usage("1999-01-01").await.unwrap().len(), 3);
            let agents = reg.usage_by_agent().await.unwrap();
            assert_eq!(
                agents,
                vec![
                    (
                        "main".to_string(),
                        Usage {
                            requests: 2,
                            input_tokens: 150,
                            output_tokens: 15
                        }
                    ),
                    (
                        "other".to_string(),
                        Usage {
                            requests: 1,
                            input_tokens: 7,
                            output_tokens: 7
                        }
                    ),
                ]
            );
            let of = reg.usage_of_sessions(&["s1", "s3", "none"]).await.unwrap();
            assert_eq!(of.len(), 2);
            assert_eq!(of["s1"].input_tokens, 100);
            assert_eq!(of["s3"].requests, 1);
            assert!(reg.usage_of_sessions(&[]).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn an_existing_registry_gains_the_daily_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runner.db");
        // A registry as an older runner left it: no model_usage_daily.
        {
            use sqlx::{ConnectOptions, Executor};
            let mut old = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .connect()
                .await
                .unwrap();
            old.execute(
                "CREATE TABLE sessions (id TEXT PRIMARY KEY, agent TEXT NOT NULL,
                     conversation_key TEXT NOT NULL, created_at INTEGER NOT NULL,
                     last_activity INTEGER NOT NULL, UNIQUE (agent, conversation_key));
                 CREATE TABLE model_usage (session_id TEXT PRIMARY KEY, agent TEXT NOT NULL,
                     requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
                     output_tokens INTEGER NOT NULL, updated_at INTEGER NOT NULL);
                 INSERT INTO sessions VALUES ('ses-old', 'main', 'api:c1', 1, 2);
                 INSERT INTO model_usage VALUES ('ses-old', 'main', 3, 30, 3, 2);",
            )
            .await
            .unwrap();
        }
        let reg = Registry::open(&path).await.unwrap();
        reg.record_usage("s1", "main", 1, 2).await.unwrap();
        assert_eq!(reg.daily_usage("2000-01-01").await.unwrap().len(), 1);
        // Its sessions and usage are kept.
        let old = reg.get_or_create("main", "api:c1", None).await.unwrap();
        assert_eq!((old.id.as_str(), old.created_at), ("ses-old", 1));
        assert_eq!(
            reg.usage(Some("ses-old"), None).await.unwrap().input_tokens,
            30
        );
    }

    #[tokio::test]
    async fn a_fresh_registry_gets_every_migration_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "runner").await {
            let reg = Registry::open(&at).await.unwrap();
            ferroclaw_common::test_postgres::check_migrations_then_add_a_future_one(
                &reg.pool, &SCHEMA, &at,
            )
            .await;
            reg.pool.close().await;
            let Err(err) = Registry::open(&at).await else {
                panic!("{at:?}: a database newer than the binary was opened");
            };
            let message = err.to_string();
            assert!(
                message.contains("runner database") && message.contains("[9999]"),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn pages_cover_every_session_once_in_order_with_ties() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "runner").await {
            let reg = Registry::open(&at).await.unwrap();
            for i in 0..23_i64 {
                let agent = if i % 3 == 0 { "other" } else { "main" };
                let s = reg
                    .get_or_create(agent, &format!("k{i}"), None)
                    .await
                    .unwrap();
                // Four activity times and five creation times for 23 sessions: ties everywhere.
                sqlx::query(
                    "UPDATE sessions SET last_activity = $1, created_at = $2 WHERE id = $3",
                )
                .bind(i % 4)
                .bind(i % 5)
                .bind(&s.id)
                .execute(&reg.pool)
                .await
                .unwrap();
            }
            let all = reg.list(None).await.unwrap();
            let ids = |rs: &[SessionRecord]| rs.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
            for order in [Order::Recent, Order::Oldest, Order::Created] {
                let mut sorted = all.clone();
                sorted.sort_by(|a, b| {
                    let by = match order {
                        Order::Recent => b.last_activity.cmp(&a.last_activity),
                        Order::Oldest => a.last_activity.cmp(&b.last_activity),
                        Order::Created => a.created_at.cmp(&b.created_at),
                    };
                    by.then_with(|| a.id.cmp(&b.id))
                });
                for agent in [None, Some("main")] {
                    let expected: Vec<SessionRecord> = sorted
                        .iter()
                        .filter(|r| agent.is_none_or(|a| r.agent == a))
                        .cloned()
                        .collect();
                    let mut paged = Vec::new();
                    for offset in (0..30).step_by(7) {
                        paged.extend(reg.page(agent, &[], order, offset, 7).await.unwrap());
                    }
                    assert_eq!(paged, expected, "{at:?} {order:?} {agent:?}");
                }
            }
            // The sessions whose agents run are left out of a page of idle ones.
            let running = [all[0].id.as_str(), all[5].id.as_str(), "ses_gone"];
            let idle = reg
                .page(None, &running, Order::Oldest, 0, 100)
                .await
                .unwrap();
            assert_eq!(idle.len(), 21, "{at:?}");
            assert!(idle.iter().all(|r| !running.contains(&r.id.as_str())));
            let mut found = ids(&reg.get_many(&running, None).await.unwrap());
            found.sort();
            let mut expected = vec![all[0].id.clone(), all[5].id.clone()];
            expected.sort();
            assert_eq!(found, expected, "{at:?}");
            let of_main = reg.get_many(&running, Some("main")).await.unwrap();
            assert!(of_main.iter().all(|r| r.agent == "main"));
            assert!(reg.get_many(&[], None).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn counts_are_remembered_until_a_session_is_created() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "runner").await {
            let reg = Registry::open(&at).await.unwrap();
            assert_eq!(reg.count_of(None).await.unwrap(), 0);
            reg.get_or_create("main", "a", None).await.unwrap();
            reg.get_or_create("main", "b", None).await.unwrap();
            reg.get_or_create("other", "a", None).await.unwrap();
            assert_eq!(reg.count().await.unwrap(), 3, "{at:?}");
            assert_eq!(reg.count_of(Some("main")).await.unwrap(), 2);
            assert_eq!(reg.count_of(Some("none")).await.unwrap(), 0);
            // Found again, not created: the counts stand.
            reg.get_or_create("main", "a", None).await.unwrap();
            assert_eq!(reg.count_of(Some("main")).await.unwrap(), 2);
            reg.get_or_create("main", "c", None).await.unwrap();
            assert_eq!(reg.count_of(Some("main")).await.unwrap(), 3, "{at:?}");
            assert_eq!(reg.count().await.unwrap(), 4);
        }
    }
}
