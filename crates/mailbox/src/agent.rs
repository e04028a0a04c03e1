//! The agent's side of a session directory: reads `inbound.db`, writes `outbound.db`.

use std::collections::HashSet;

use sqlx::{Row, SqlitePool};

use crate::content::{InboundContent, Origin};
use crate::db::{self, JournalMode};
use crate::error::{Error, Result, SqliteContext, io_at};
use crate::paths::SessionPaths;
use crate::rows::{InboundRow, NewOutbound};
use crate::schema;
use crate::seq;

/// Everything due now, plus when the next deferred message becomes due.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<InboundRow>,
    /// Earliest `process_after` (unix ms) of a pending message not yet due.
    pub next_due: Option<i64>,
    /// Rows whose content could not be parsed; the caller fails them with a notice.
    pub unreadable: Vec<(i64, Origin, String)>,
}

pub struct AgentMailbox {
    paths: SessionPaths,
    inbound: SqlitePool,
    outbound: SqlitePool,
    /// Inbound seqs completed or failed. The agent is the only writer of `processing`, so
    /// this copy stays exact after it is loaded once.
    done: HashSet<i64>,
    /// Every inbound row at or below this seq is done or cancelled: later scans skip them.
    floor: i64,
}

/// Final status of a processed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    Completed,
    Failed,
}

impl AgentMailbox {
    /// Opens (creating if needed) `outbound.db` and opens `inbound.db` read-only.
    pub async fn open(paths: SessionPaths, mode: JournalMode) -> Result<Self> {
        for dir in [paths.outbox(), paths.state_dir()] {
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        let out_path = paths.outbound_db();
        let outbound = db::open_writer(&out_path, mode).await?;
        schema::init_outbound(&outbound, &out_path).await?;

        let in_path = paths.inbound_db();
        let not_ready = |path: std::path::PathBuf| Error::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the runner has not created this session's inbound.db",
            ),
        };
        if !in_path.exists() {
            return Err(not_ready(in_path));
        }
        let inbound = db::open_reader(&in_path, None).await?;
        // Version 0: the runner has created the file but not yet its tables (it is opening
        // it right now). That is "not there yet", not a release mismatch.
        if !schema::check_version(&inbound, &in_path, schema::INBOUND_VERSION).await? {
            inbound.close().await;
            return Err(not_ready(in_path));
        }
        let done = sqlx::query_scalar::<_, i64>(
            "SELECT in_seq FROM processing WHERE status IN ('completed', 'failed')",
        )
        .fetch_all(&outbound)
        .await
        .at(&out_path)?
        .into_iter()
        .collect();
        Ok(Self {
            paths,
            inbound,
            outbound,
            done,
            floor: 0,
        })
    }

    pub fn paths(&self) -> &SessionPaths {
        &self.paths
    }

    /// Every active, not yet done inbound message whose time has come, oldest first.
    pub async fn due(&mut self, now: i64) -> Result<Batch> {
        let path = self.paths.inbound_db();
        let rows = sqlx::query(
            "SELECT seq, id, kind, created_at, process_after, state, origin, content, trace
             FROM messages_in WHERE seq > $1 ORDER BY seq",
        )
        .bind(self.floor)
        .fetch_all(&self.inbound)
        .await
        .at(&path)?;
        let mut batch = Batch::default();
        let mut floor_moves = true;
        for row in rows {
            let seq: i64 = row.try_get("seq").at(&path)?;
            let state: String = row.try_get("state").at(&path)?;
            if state != "active" || self.done.contains(&seq) {
                if floor_moves {
                    self.floor = seq;
                }
                continue;
            }
            floor_moves = false;
            let process_after: Option<i64> = row.try_get("process_after").at(&path)?;
            if let Some(at) = process_after.filter(|at| *at > now) {
                batch.next_due = Some(batch.next_due.map_or(at, |d: i64| d.min(at)));
                continue;
            }
            let kind: String = row.try_get("kind").at(&path)?;
            let content: String = row.try_get("content").at(&path)?;
            let origin: String = row.try_get("origin").at(&path)?;
            let origin: Origin = match serde_json::from_str(&origin) {
                Ok(o) => o,
                Err(e) => {
                    // Without an origin there is nowhere to say so; fail it quietly but loudly in logs.
                    tracing::error!(seq, error = %e, "inbound row has an unreadable origin");
                    self.finish(&[seq], &[], BatchStatus::Failed).await?;
                    continue;
                }
            };
            match InboundContent::parse(&kind, &content) {
                Ok(content) => batch.rows.push(InboundRow {
                    seq,
                    id: row.try_get("id").at(&path)?,
                    created_at: row.try_get("created_at").at(&path)?,
                    process_after,
                    origin,
                    content,
                    trace: row.try_get("trace").at(&path)?,
                }),
                Err(e) => batch.unreadable.push((seq, origin, e.to_string())),
            }
        }
        Ok(batch)
    }

    /// Marks `seqs` as being processed; returns each one's attempt number, in order (1 the
    /// first time, more when a previous agent died holding it).
    pub async fn claim(&mut self, seqs: &[i64]) -> Result<Vec<i64>> {
        let path = self.paths.outbound_db();
        let now = crate::now_ms();
        let mut tx = self.outbound.begin().await.at(&path)?;
        let mut attempts = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let attempt: i64 = sqlx::query_scalar(
                "INSERT INTO processing (in_seq, status, attempt, changed_at)
                 VALUES ($1, 'processing', 1, $2)
                 ON CONFLICT (in_seq) DO UPDATE
                   SET status = 'processing', attempt = processing.attempt + 1, changed_at = $2
                 RETURNING attempt",
            )
            .bind(seq)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .at(&path)?;
            attempts.push(attempt);
        }
        tx.commit().await.at(&path)?;
        crate::paths::ring(&self.paths.outbound_bell());
        Ok(attempts)
    }

    /// Writes the replies and marks the batch done in ONE transaction: a crash loses both
    /// (the batch is redone) or neither (no duplicate reply). Returns the replies' seqs.
    pub async fn finish(
        &mut self,
        seqs: &[i64],
        replies: &[NewOutbound],
        status: BatchStatus,
    ) -> Result<Vec<i64>> {
        let path = self.paths.outbound_db();
        let now = crate::now_ms();
        let mut tx = self.outbound.begin().await.at(&path)?;
        let written = self.insert_replies(&mut tx, replies, now).await?;
        let status_text = match status {
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
        };
        for seq in seqs {
            sqlx::query(
                "INSERT INTO processing (in_seq, status, attempt, changed_at)
                 VALUES ($1, $2, 1, $3)
                 ON CONFLICT (in_seq) DO UPDATE SET status = $2, changed_at = $3",
            )
            .bind(seq)
            .bind(status_text)
            .bind(now)
            .execute(&mut *tx)
            .await
            .at(&path)?;
        }
        tx.commit().await.at(&path)?;
        crate::paths::ring(&self.paths.outbound_bell());
        self.done.extend(seqs.iter().copied());
        Ok(written)
    }

    /// Writes one message at once, outside any batch: a question must reach the user while
    /// the turn that asks it waits for the answer.
    pub async fn send_now(&self, reply: &NewOutbound) -> Result<i64> {
        let path = self.paths.outbound_db();
        let mut tx = self.outbound.begin().await.at(&path)?;
        let written = self
            .insert_replies(&mut tx, std::slice::from_ref(reply), crate::now_ms())
            .await?;
        tx.commit().await.at(&path)?;
        crate::paths::ring(&self.paths.outbound_bell());
        Ok(written[0])
    }

    /// The answer to a question (a `question_response` system message), if it has arrived:
    /// its seq and content.
    pub async fn question_answer(
        &self,
        question_id: &str,
    ) -> Result<Option<(i64, InboundContent)>> {
        let path = self.paths.inbound_db();
        let found: Option<(i64, String)> = sqlx::query_as(
            "SELECT seq, content FROM messages_in
             WHERE kind = 'system' AND state = 'active'
               AND json_extract(content, '$.event') = 'question_response'
               AND json_extract(content, '$.data.question_id') = $1
             ORDER BY seq LIMIT 1",
        )
        .bind(question_id)
        .fetch_optional(&self.inbound)
        .await
        .at(&path)?;
        match found {
            Some((seq, content)) => Ok(Some((seq, InboundContent::parse("system", &content)?))),
            None => Ok(None),
        }
    }

    /// Inserts replies at the next agent seqs inside `tx`.
    async fn insert_replies(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        replies: &[NewOutbound],
        now: i64,
    ) -> Result<Vec<i64>> {
        let path = self.paths.outbound_db();
        let max_out: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM messages_out")
            .fetch_one(&mut **tx)
            .await
            .at(&path)?;
        let max_in: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM messages_in")
            .fetch_one(&self.inbound)
            .await
            .at(&self.paths.inbound_db())?;
        let mut next = seq::next_agent(max_out.unwrap_or(0).max(max_in.unwrap_or(0)));
        let mut written = Vec::with_capacity(replies.len());
        for reply in replies {
            let destination =
                serde_json::to_string(&reply.destination).unwrap_or_else(|_| "{}".into());
            sqlx::query(
                "INSERT INTO messages_out (seq, in_reply_to, created_at, kind, destination, content, trace)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(next)
            .bind(reply.in_reply_to)
            .bind(now)
            .bind(reply.content.kind())
            .bind(destination)
            .bind(reply.content.to_json())
            .bind(&reply.trace)
            .execute(&mut **tx)
            .await
            .at(&path)?;
            written.push(next);
            next += 2;
        }
        Ok(written)
    }

    /// The outcome delivery recorded for one of this agent's messages, if any.
    pub async fn delivery_outcome(&self, out_seq: i64) -> Result<Option<(String, Option<String>)>> {
        sqlx::query_as("SELECT outcome, detail FROM delivered WHERE out_seq = $1")
            .bind(out_seq)
            .fetch_optional(&self.inbound)
            .await
            .at(&self.paths.inbound_db())
    }

    /// The session's scheduled tasks as mirrored by the runner: (id, JSON spec), by id.
    pub async fn tasks(&self) -> Result<Vec<(String, String)>> {
        sqlx::query_as("SELECT id, spec FROM tasks ORDER BY id")
            .fetch_all(&self.inbound)
            .await
            .at(&self.paths.inbound_db())
    }

    /// A session fact written by the runner (`meta` table).
    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.inbound)
            .await
            .at(&self.paths.inbound_db())
    }

    /// Touches `out/heartbeat` so the runner can tell a working agent from a stuck one.
    pub fn touch_heartbeat(&self) -> Result<()> {
        let path = self.paths.heartbeat();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        file.set_modified(std::time::SystemTime::now())
            .map_err(io_at(&path))
    }

    pub async fn close(&self) {
        self.outbound.close().await;
        self.inbound.close().await;
    }
}
