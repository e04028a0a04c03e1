//! The runner's side of a session directory: writes `inbound.db`, reads `outbound.db`.

use std::collections::HashSet;

use std::sync::atomic::{AtomicI64, Ordering};

use sqlx::{Row, SqlitePool};
use tokio::sync::Mutex;

use crate::content::InboundContent;
use crate::db::{self, JournalMode};
use crate::error::{Result, SqliteContext, io_at};
use crate::paths::SessionPaths;
use crate::rows::{NewInbound, OutboundRow, Outcome};
use crate::schema;
use crate::session_fs::{self, FileType};

/// Result of an enqueue: the row's seq and id, and whether it was already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub seq: i64,
    pub id: String,
    pub duplicate: bool,
}

/// One page of unsettled outbound rows.
#[derive(Debug, Default)]
pub struct OutboundPage {
    pub rows: Vec<OutboundRow>,
    /// When the page was full: the last seq looked at, where the next page starts (rows up
    /// to it that are not in `rows` were settled already).
    pub more_after: Option<i64>,
}

/// Inbound work the agent has not finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Active inbound rows not yet completed or failed.
    pub count: i64,
    /// The earliest time one of them may be processed (unix ms); `None` when none is pending.
    pub next_due: Option<i64>,
}

/// The agent's database, directly in `out/`.
const OUTBOUND_DB: &str = "outbound.db";

/// What happened to one outbound row, for [`HostMailbox::settle_many`].
#[derive(Debug, Clone, Copy)]
pub struct Settlement<'a> {
    pub out_seq: i64,
    pub outcome: Outcome,
    pub platform_message_id: Option<&'a str>,
    pub detail: Option<&'a str>,
}

/// What [`HostMailbox::reopen_failed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// Its failed settlement was removed: the row is unsettled again.
    Reopened,
    /// It had no settlement (reopened before, or not settled yet): nothing changed.
    Unsettled,
    /// It was delivered: that outcome stands.
    Delivered,
    /// The agent wrote no such row.
    Unknown,
}

pub struct HostMailbox {
    paths: SessionPaths,
    inbound: SqlitePool,
    /// Opened once the agent has created and initialised `outbound.db`.
    outbound: Mutex<Option<SqlitePool>>,
    /// The fencing token this runner holds on the session (0: none, a single runner).
    fence: AtomicI64,
}

/// A write's guard: true unless the session's fencing token (meta `fence`) is greater than
/// the one bound to `$F` (0: not fencing). Checked in the writing statement itself, so a
/// takeover that commits first wins, whatever the order the two runners started in.
fn fence_ok(param: u8) -> String {
    format!(
        "(${param} = 0 OR coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fence'), 0) <= ${param})"
    )
}

impl HostMailbox {
    /// Creates the session directory and `inbound.db` if needed, and checks its version.
    pub async fn open(paths: SessionPaths, mode: JournalMode) -> Result<Self> {
        paths.create()?;
        let path = paths.inbound_db();
        let inbound = db::open_writer(&path, mode).await?;
        schema::init_inbound(&inbound, &path).await?;
        Ok(Self {
            paths,
            inbound,
            outbound: Mutex::new(None),
            fence: AtomicI64::new(0),
        })
    }

    /// Takes the session with fencing token `fence` (several runners): recorded in the
    /// mailbox unless a greater one is there, and checked by every write from now on.
    /// Fails with [`Error::Fenced`] when another runner holds a greater one.
    pub async fn hold_fence(&self, fence: i64) -> Result<()> {
        let path = self.paths.inbound_db();
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('fence', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value
             WHERE CAST(meta.value AS INTEGER) < CAST(excluded.value AS INTEGER)",
        )
        .bind(fence.to_string())
        .execute(&self.inbound)
        .await
        .at(&path)?;
        self.fence.store(fence, Ordering::SeqCst);
        self.check_fence().await
    }

    /// [`Error::Fenced`] when a greater fencing token than this runner's is recorded.
    async fn check_fence(&self) -> Result<()> {
        if self.held_fence() == 0 {
            return Ok(());
        }
        let path = self.paths.inbound_db();
        let mut conn = self.inbound.acquire().await.at(&path)?;
        self.check_fence_in(&mut conn).await
    }

    /// [`HostMailbox::check_fence`] as the first read of a transaction: a takeover that
    /// commits after it makes the transaction's first write fail (SQLite will not let a
    /// reader whose snapshot is stale write), so the check holds until the commit.
    async fn check_fence_in(&self, tx: &mut sqlx::SqliteConnection) -> Result<()> {
        let held = self.held_fence();
        if held == 0 {
            return Ok(());
        }
        let path = self.paths.inbound_db();
        let current: Option<i64> =
            sqlx::query_scalar("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fence'")
                .fetch_optional(&mut *tx)
                .await
                .at(&path)?;
        match current {
            Some(current) if current > held => Err(crate::Error::Fenced {
                path,
                held,
                current,
            }),
            _ => Ok(()),
        }
    }

    /// The fencing token this runner holds on the session (0: none).
    pub fn fence(&self) -> i64 {
        self.held_fence()
    }

    fn held_fence(&self) -> i64 {
        self.fence.load(Ordering::SeqCst)
    }

    pub fn paths(&self) -> &SessionPaths {
        &self.paths
    }

    /// The reader of `outbound.db`, or `None` while the agent has not created it.
    async fn outbound(&self) -> Result<Option<SqlitePool>> {
        let mut slot = self.outbound.lock().await;
        if let Some(pool) = slot.as_ref() {
            return Ok(Some(pool.clone()));
        }
        let path = self.paths.outbound_db();
        // The agent owns out/: outbound.db must be a regular file in its place, never a
        // link to another session's file or a host file, nor a FIFO that would stall us.
        let out = session_fs::Dir::open(&self.paths.out_dir())?;
        match out.entry(OUTBOUND_DB)? {
            None => return Ok(None),
            Some(entry) if entry.kind != FileType::RegularFile => {
                return Err(session_fs::FsError::NotRegular {
                    path,
                    kind: session_fs::kind_name(entry.kind),
                }
                .into());
            }
            Some(_) => {}
        }
        let real = std::fs::canonicalize(out.path())
            .map_err(io_at(out.path()))?
            .join(OUTBOUND_DB);
        let pool = db::open_reader(&path, Some(real)).await?;
        if !schema::check_version(&pool, &path, schema::OUTBOUND_VERSION).await? {
            pool.close().await;
            return Ok(None);
        }
        *slot = Some(pool.clone());
        Ok(Some(pool))
    }

    async fn max_out_seq(&self) -> Result<i64> {
        let Some(pool) = self.outbound().await? else {
            return Ok(0);
        };
        sqlx::query_scalar::<_, Option<i64>>("SELECT max(seq) FROM messages_out")
            .fetch_one(&pool)
            .await
            .map(|v| v.unwrap_or(0))
            .at(&self.paths.outbound_db())
    }

    /// Appends a message, or returns the existing row when its id is already there.
    pub async fn enqueue(&self, msg: &NewInbound) -> Result<Enqueued> {
        let path = self.paths.inbound_db();
        let max_out = self.max_out_seq().await?;
        let origin = serde_json::to_string(&msg.origin).unwrap_or_else(|_| "{}".into());
        // One statement, one commit: the seq (the smallest even number above every seq of
        // both files, see `seq::next_host`) is taken inside the insert, and a repeated id
        // inserts nothing. The runner is the only writer of this file.
        let insert = format!(
            "INSERT INTO messages_in (seq, id, kind, created_at, process_after, state, origin, content, trace)
             SELECT (max(coalesce((SELECT max(seq) FROM messages_in), 0), $1, 0) + 2) / 2 * 2,
                    $2, $3, $4, $5, 'active', $6, $7, $8
             WHERE {}
             ON CONFLICT (id) DO NOTHING
             RETURNING seq",
            fence_ok(9)
        );
        let inserted: Option<i64> = sqlx::query_scalar(&insert)
            .bind(max_out)
            .bind(&msg.id)
            .bind(msg.content.kind())
            .bind(crate::now_ms())
            .bind(msg.process_after)
            .bind(origin)
            .bind(msg.content.to_json())
            .bind(&msg.trace)
            .bind(self.held_fence())
            .fetch_optional(&self.inbound)
            .await
            .at(&path)?;
        let Some(seq) = inserted else {
            self.check_fence().await?;
            let seq: i64 = sqlx::query_scalar("SELECT seq FROM messages_in WHERE id = $1")
                .bind(&msg.id)
                .fetch_one(&self.inbound)
                .await
                .at(&path)?;
            return Ok(Enqueued {
                seq,
                id: msg.id.clone(),
                duplicate: true,
            });
        };
        crate::paths::ring(&self.paths.inbound_bell());
        Ok(Enqueued {
            seq,
            id: msg.id.clone(),
            duplicate: false,
        })
    }

    /// Outbound rows above `after` that have no `delivered` entry yet, oldest first. A row
    /// whose columns together pass `max_row_bytes` comes without them (its `row_bytes`
    /// says how big it is), so an agent cannot make the host load a huge row.
    pub async fn unsettled_after(
        &self,
        after: i64,
        max_row_bytes: usize,
    ) -> Result<Vec<OutboundRow>> {
        Ok(self
            .unsettled_page(after, max_row_bytes, usize::MAX)
            .await?
            .rows)
    }

    /// Like [`Self::unsettled_after`], looking at no more than `limit` rows above `after`.
    pub async fn unsettled_page(
        &self,
        after: i64,
        max_row_bytes: usize,
        limit: usize,
    ) -> Result<OutboundPage> {
        let Some(out) = self.outbound().await? else {
            return Ok(OutboundPage::default());
        };
        let out_path = self.paths.outbound_db();
        let rows = sqlx::query(
            "SELECT seq, in_reply_to, created_at, size,
                    CASE WHEN size > $2 THEN '' ELSE kind END AS kind,
                    CASE WHEN size > $2 THEN NULL ELSE trace END AS trace,
                    CASE WHEN size > $2 THEN '' ELSE destination END AS destination,
                    CASE WHEN size > $2 THEN '' ELSE content END AS content
             FROM (SELECT *, length(CAST(content AS BLOB))
                             + length(CAST(destination AS BLOB))
                             + ifnull(length(CAST(trace AS BLOB)), 0)
                             + length(CAST(kind AS BLOB)) AS size
                   FROM messages_out WHERE seq > $1 ORDER BY seq LIMIT $3)
             ORDER BY seq",
        )
        .bind(after)
        .bind(i64::try_from(max_row_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&out)
        .await
        .at(&out_path)?;
        let Some(last) = rows.last() else {
            return Ok(OutboundPage::default());
        };
        let full = rows.len() >= limit;
        let scanned_up_to: i64 = last.try_get("seq").at(&out_path)?;
        let settled: HashSet<i64> =
            sqlx::query_scalar::<_, i64>("SELECT out_seq FROM delivered WHERE out_seq > $1")
                .bind(after)
                .fetch_all(&self.inbound)
                .await
                .at(&self.paths.inbound_db())?
                .into_iter()
                .collect();
        let mut result = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get("seq").at(&out_path)?;
            if settled.contains(&seq) {
                continue;
            }
            result.push(OutboundRow {
                seq,
                in_reply_to: row.try_get("in_reply_to").at(&out_path)?,
                created_at: row.try_get("created_at").at(&out_path)?,
                kind: row.try_get("kind").at(&out_path)?,
                destination: row.try_get("destination").at(&out_path)?,
                content: row.try_get("content").at(&out_path)?,
                row_bytes: row.try_get("size").at(&out_path)?,
                trace: row.try_get("trace").at(&out_path)?,
            });
        }
        Ok(OutboundPage {
            rows: result,
            more_after: full.then_some(scanned_up_to),
        })
    }

    /// Where the host said this session's replies go: the distinct `reply_to` destinations
    /// (JSON) of its inbound rows, each written by the host, never by the agent.
    pub async fn reply_destinations(&self) -> Result<Vec<String>> {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT DISTINCT json_extract(origin, '$.reply_to') FROM messages_in",
        )
        .fetch_all(&self.inbound)
        .await
        .at(&self.paths.inbound_db())
        .map(|found| found.into_iter().flatten().collect())
    }

    /// The seqs of inbound messages above `after`, in order.
    pub async fn inbound_seqs_after(&self, after: i64) -> Result<Vec<i64>> {
        sqlx::query_scalar("SELECT seq FROM messages_in WHERE seq > $1 ORDER BY seq")
            .bind(after)
            .fetch_all(&self.inbound)
            .await
            .at(&self.paths.inbound_db())
    }

    /// The `reply_to` (JSON) of the session's first inbound message: where it lives.
    pub async fn home_destination(&self) -> Result<Option<String>> {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT json_extract(origin, '$.reply_to') FROM messages_in ORDER BY seq LIMIT 1",
        )
        .fetch_optional(&self.inbound)
        .await
        .at(&self.paths.inbound_db())
        .map(Option::flatten)
    }

    /// Records the outcome of an outbound row. `false`: it was settled before (first wins).
    pub async fn settle(
        &self,
        out_seq: i64,
        outcome: Outcome,
        platform_message_id: Option<&str>,
        detail: Option<&str>,
    ) -> Result<bool> {
        let insert = format!(
            "INSERT INTO delivered (out_seq, outcome, platform_message_id, detail, at)
             SELECT $1, $2, $3, $4, $5 WHERE {} ON CONFLICT (out_seq) DO NOTHING",
            fence_ok(6)
        );
        let done = sqlx::query(&insert)
            .bind(out_seq)
            .bind(outcome.as_str())
            .bind(platform_message_id)
            .bind(detail)
            .bind(crate::now_ms())
            .bind(self.held_fence())
            .execute(&self.inbound)
            .await
            .at(&self.paths.inbound_db())?;
        if done.rows_affected() == 0 {
            self.check_fence().await?;
        }
        // No doorbell: an outcome is nothing for the agent to act on, and ringing woke it
        // for every reply it wrote.
        Ok(done.rows_affected() == 1)
    }

    /// Makes a row settled as failed unsettled again (an operator's retry), so the outbound
    /// stream sends it again. The settlement lives in `inbound.db`, which only the host
    /// writes: the agent cannot reopen anything. Idempotent: a second call finds the row
    /// unsettled and changes nothing.
    pub async fn reopen_failed(&self, out_seq: i64) -> Result<Reopen> {
        let exists = match self.outbound().await? {
            Some(out) => sqlx::query_scalar::<_, i64>("SELECT 1 FROM messages_out WHERE seq = $1")
                .bind(out_seq)
                .fetch_optional(&out)
                .await
                .at(&self.paths.outbound_db())?
                .is_some(),
            None => false,
        };
        if !exists {
            return Ok(Reopen::Unknown);
        }
        let path = self.paths.inbound_db();
        let delete = format!(
            "DELETE FROM delivered WHERE out_seq = $1 AND outcome = 'failed' AND {}",
            fence_ok(2)
        );
        let removed = sqlx::query(&delete)
            .bind(out_seq)
            .bind(self.held_fence())
            .execute(&self.inbound)
            .await
            .at(&path)?;
        if removed.rows_affected() == 1 {
            return Ok(Reopen::Reopened);
        }
        self.check_fence().await?;
        Ok(match self.outcome(out_seq).await?.as_deref() {
            None => Reopen::Unsettled,
            Some(_) => Reopen::Delivered,
        })
    }

    /// Records several outcomes in one transaction (one commit instead of one each); for
    /// each, whether it was recorded (false: the row was already settled).
    pub async fn settle_many(&self, settlements: &[Settlement<'_>]) -> Result<Vec<bool>> {
        let path = self.paths.inbound_db();
        let mut tx = self.inbound.begin().await.at(&path)?;
        self.check_fence_in(&mut tx).await?;
        let mut recorded = Vec::with_capacity(settlements.len());
        let now = crate::now_ms();
        for s in settlements {
            let done = sqlx::query(
                "INSERT INTO delivered (out_seq, outcome, platform_message_id, detail, at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (out_seq) DO NOTHING",
            )
            .bind(s.out_seq)
            .bind(s.outcome.as_str())
            .bind(s.platform_message_id)
            .bind(s.detail)
            .bind(now)
            .execute(&mut *tx)
            .await
            .at(&path)?;
            recorded.push(done.rows_affected() == 1);
        }
        tx.commit().await.at(&path)?;
        Ok(recorded)
    }

    /// The outcome recorded for `out_seq`, if any.
    pub async fn outcome(&self, out_seq: i64) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT outcome FROM delivered WHERE out_seq = $1")
            .bind(out_seq)
            .fetch_optional(&self.inbound)
            .await
            .at(&self.paths.inbound_db())
    }

    /// The inbound seqs the agent marked completed or failed.
    async fn finished(&self) -> Result<HashSet<i64>> {
        let Some(out) = self.outbound().await? else {
            return Ok(HashSet::new());
        };
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT in_seq FROM processing WHERE status IN ('completed', 'failed')",
        )
        .fetch_all(&out)
        .await
        .at(&self.paths.outbound_db())?
        .into_iter()
        .collect())
    }

    /// Inbound work the agent has not completed yet.
    pub async fn pending(&self) -> Result<Pending> {
        let inbound: Vec<(i64, Option<i64>, i64)> = sqlx::query_as(
            "SELECT seq, process_after, created_at FROM messages_in WHERE state = 'active'",
        )
        .fetch_all(&self.inbound)
        .await
        .at(&self.paths.inbound_db())?;
        let done = self.finished().await?;
        let mut pending = Pending::default();
        for (seq, process_after, created_at) in inbound {
            if done.contains(&seq) {
                continue;
            }
            pending.count += 1;
            let due = process_after.unwrap_or(created_at);
            pending.next_due = Some(pending.next_due.map_or(due, |d: i64| d.min(due)));
        }
        Ok(pending)
    }

    /// The inbound seqs that are due (now, unix ms) and that the agent has not finished,
    /// by the host's reading: what an agent that makes progress will not hold for long.
    pub async fn due_unfinished(&self, now: i64) -> Result<Vec<i64>> {
        let due: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM messages_in WHERE state = 'active'
               AND ifnull(process_after, created_at) <= $1 ORDER BY seq",
        )
        .bind(now)
        .fetch_all(&self.inbound)
        .await
        .at(&self.paths.inbound_db())?;
        if due.is_empty() {
            return Ok(due);
        }
        let done = self.finished().await?;
        Ok(due.into_iter().filter(|s| !done.contains(s)).collect())
    }

    /// The inbound seqs the agent has claimed and not finished.
    pub async fn claimed(&self) -> Result<Vec<i64>> {
        let Some(out) = self.outbound().await? else {
            return Ok(Vec::new());
        };
        sqlx::query_scalar("SELECT in_seq FROM processing WHERE status = 'processing'")
            .fetch_all(&out)
            .await
            .at(&self.paths.outbound_db())
    }

    /// The reply destinations (JSON) of the inbound messages the agent is working on now.
    pub async fn working_destinations(&self) -> Result<Vec<String>> {
        let Some(out) = self.outbound().await? else {
            return Ok(Vec::new());
        };
        let seqs: Vec<i64> =
            sqlx::query_scalar("SELECT in_seq FROM processing WHERE status = 'processing'")
                .fetch_all(&out)
                .await
                .at(&self.paths.outbound_db())?;
        let mut destinations = Vec::new();
        for seq in seqs {
            let found: Option<String> = sqlx::query_scalar(
                "SELECT json_extract(origin, '$.reply_to') FROM messages_in WHERE seq = $1",
            )
            .bind(seq)
            .fetch_optional(&self.inbound)
            .await
            .at(&self.paths.inbound_db())?;
            if let Some(d) = found
                && !destinations.contains(&d)
            {
                destinations.push(d);
            }
        }
        Ok(destinations)
    }

    /// Sets a session fact (`meta` table): agent name, time zone, default reply origin.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let upsert = format!(
            "INSERT INTO meta (key, value) SELECT $1, $2 WHERE {}
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            fence_ok(3)
        );
        let set = sqlx::query(&upsert)
            .bind(key)
            .bind(value)
            .bind(self.held_fence())
            .execute(&self.inbound)
            .await
            .at(&self.paths.inbound_db())?;
        if set.rows_affected() == 0 {
            self.check_fence().await?;
        }
        Ok(())
    }

    /// Replaces the session's task mirror (`tasks` table) with `tasks` as (id, JSON spec),
    /// in one transaction so the agent never sees half of it.
    pub async fn replace_tasks(&self, tasks: &[(String, String)]) -> Result<()> {
        let path = self.paths.inbound_db();
        let now = crate::now_ms();
        let mut tx = self.inbound.begin().await.at(&path)?;
        self.check_fence_in(&mut tx).await?;
        sqlx::query("DELETE FROM tasks")
            .execute(&mut *tx)
            .await
            .at(&path)?;
        for (id, spec) in tasks {
            sqlx::query("INSERT INTO tasks (id, spec, updated_at) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(spec)
                .bind(now)
                .execute(&mut *tx)
                .await
                .at(&path)?;
        }
        tx.commit().await.at(&path)?;
        crate::paths::ring(&self.paths.inbound_bell());
        Ok(())
    }

    /// Checks that `content_json` is valid content of `kind`, before anything is written.
    pub fn validate(kind: &str, content_json: &str) -> Result<InboundContent> {
        Ok(InboundContent::parse(kind, content_json)?)
    }

    pub async fn close(&self) {
        self.inbound.close().await;
        if let Some(out) = self.outbound.lock().await.take() {
            out.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat message with id `id`, its text the id too, in API conversation "c".
    fn chat(id: &str) -> NewInbound {
        NewInbound {
            id: id.into(),
            content: InboundContent::Chat(crate::content::ChatIn {
                text: id.into(),
                sender: String::new(),
                attachments: Vec::new(),
            }),
            origin: crate::Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: String::new(),
                reply_to: crate::Destination::Api {
                    conversation: "c".into(),
                },
            },
            process_after: None,
            trace: None,
        }
    }

    #[tokio::test]
    async fn enqueue_takes_the_next_even_seq_and_repeats_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostMailbox::open(SessionPaths::new(dir.path()), JournalMode::Wal)
            .await
            .expect("open");
        let first = host.enqueue(&chat("a")).await.expect("enqueue");
        let second = host.enqueue(&chat("b")).await.expect("enqueue");
        let again = host.enqueue(&chat("a")).await.expect("enqueue");
        assert_eq!((first.seq, first.duplicate), (2, false));
        assert_eq!((second.seq, second.duplicate), (4, false));
        assert_eq!((again.seq, again.duplicate), (2, true));
    }

    #[tokio::test]
    async fn a_runner_whose_fence_was_passed_writes_nothing_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SessionPaths::new(dir.path());
        // Two runners on one session's files (shared storage): the old one holds fence 3.
        let old = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .expect("open");
        old.hold_fence(3).await.expect("fence 3");
        assert!(
            !old.enqueue(&chat("before"))
                .await
                .expect("enqueue")
                .duplicate
        );

        // The session is taken over with fence 7.
        let new = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .expect("open");
        new.hold_fence(7).await.expect("fence 7");
        let fenced = |r: Result<()>| {
            matches!(
                r,
                Err(crate::Error::Fenced {
                    held: 3,
                    current: 7,
                    ..
                })
            )
        };
        assert!(
            fenced(old.enqueue(&chat("late")).await.map(drop)),
            "enqueue"
        );
        assert!(
            fenced(old.enqueue(&chat("before")).await.map(drop)),
            "even a repeat"
        );
        assert!(fenced(
            old.settle(1, Outcome::Delivered, None, None)
                .await
                .map(drop)
        ));
        let batch = [Settlement {
            out_seq: 1,
            outcome: Outcome::Delivered,
            platform_message_id: None,
            detail: None,
        }];
        assert!(fenced(old.settle_many(&batch).await.map(drop)));
        assert!(fenced(old.replace_tasks(&[]).await));
        assert!(fenced(old.set_meta("agent", "x").await));
        assert!(
            fenced(old.hold_fence(3).await),
            "nor can it take the session back"
        );
        assert!(!new.enqueue(&chat("late")).await.expect("enqueue").duplicate);
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages_in ORDER BY seq")
            .fetch_all(&new.inbound)
            .await
            .expect("read");
        assert_eq!(
            ids,
            ["before", "late"],
            "only the new holder's write landed"
        );
        // A single runner (fence 0) is never fenced.
        let plain = HostMailbox::open(
            SessionPaths::new(dir.path().join("other")),
            JournalMode::Wal,
        )
        .await
        .expect("open");
        plain.enqueue(&chat("x")).await.expect("enqueue");
    }

    #[tokio::test]
    async fn only_a_failed_row_is_reopened_and_reopening_twice_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SessionPaths::new(dir.path());
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .expect("open");
        assert_eq!(
            host.reopen_failed(1).await.expect("reopen"),
            Reopen::Unknown
        );
        let agent = crate::AgentMailbox::open(paths, JournalMode::Wal)
            .await
            .expect("agent open");
        let reply = |text: &str| crate::NewOutbound {
            in_reply_to: None,
            destination: crate::Destination::Api {
                conversation: "c".into(),
            },
            content: crate::OutboundContent::Chat(crate::content::ChatOut { text: text.into() }),
            trace: None,
        };
        let failed = agent.send_now(&reply("lost")).await.expect("write");
        let delivered = agent.send_now(&reply("sent")).await.expect("write");
        let later = agent.send_now(&reply("later")).await.expect("write");
        assert!(failed < delivered && delivered < later);
        host.settle(failed, Outcome::Failed, None, Some("given up"))
            .await
            .expect("settle");
        host.settle(delivered, Outcome::Delivered, Some("pm"), None)
            .await
            .expect("settle");
        let host = &host;
        let unsettled = |after| async move {
            host.unsettled_after(after, usize::MAX)
                .await
                .expect("unsettled")
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(unsettled(0).await, [later]);

        assert_eq!(
            host.reopen_failed(failed).await.expect("reopen"),
            Reopen::Reopened
        );
        assert_eq!(unsettled(0).await, [failed, later], "streamed again");
        assert_eq!(host.outcome(failed).await.expect("outcome"), None);
        assert_eq!(
            host.reopen_failed(failed).await.expect("reopen"),
            Reopen::Unsettled,
            "a repeated reopen changes nothing"
        );
        assert_eq!(
            host.reopen_failed(delivered).await.expect("reopen"),
            Reopen::Delivered
        );
        assert_eq!(
            host.outcome(delivered).await.expect("outcome").as_deref(),
            Some("delivered"),
            "a delivered row's outcome stands"
        );
        assert_eq!(
            host.reopen_failed(later).await.expect("reopen"),
            Reopen::Unsettled
        );
        assert_eq!(
            host.reopen_failed(later + 2).await.expect("reopen"),
            Reopen::Unknown
        );
        // Settled again after its retry: the new outcome is recorded.
        assert!(
            host.settle(failed, Outcome::Delivered, Some("pm2"), None)
                .await
                .expect("settle")
        );
        agent.close().await;
    }

    #[tokio::test]
    async fn settling_many_commits_once_and_the_first_outcome_stands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostMailbox::open(SessionPaths::new(dir.path()), JournalMode::Wal)
            .await
            .expect("open");
        let settled = |out_seq, outcome| Settlement {
            out_seq,
            outcome,
            platform_message_id: Some("pm"),
            detail: None,
        };
        let recorded = host
            .settle_many(&[
                settled(1, Outcome::Delivered),
                settled(3, Outcome::Failed),
                settled(1, Outcome::Failed),
            ])
            .await
            .expect("settle_many");
        assert_eq!(recorded, vec![true, true, false]);
        assert_eq!(
            host.outcome(1).await.expect("outcome").as_deref(),
            Some("delivered")
        );
        assert_eq!(
            host.outcome(3).await.expect("outcome").as_deref(),
            Some("failed")
        );
        assert!(
            !host
                .settle(3, Outcome::Delivered, None, None)
                .await
                .expect("settle")
        );
    }
}
