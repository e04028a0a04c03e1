//! The agent's side of a session directory: reads `inbound.db`, writes `outbound.db`.

use std::collections::HashSet;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::content::{InboundContent, Origin};
use crate::db::{Db, JournalMode};
use crate::error::{Error, Result, io_at};
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
    inbound: Db,
    outbound: Db,
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
        let outbound = Db::open_writer(&paths.outbound_db(), mode)?;
        schema::init_outbound(&outbound)?;

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
        let inbound = Db::open_reader(&in_path)?;
        // Version 0: the runner has created the file but not yet its tables (it is opening
        // it right now). That is "not there yet", not a release mismatch.
        if !schema::check_version(&inbound, schema::INBOUND_VERSION)? {
            inbound.close();
            return Err(not_ready(in_path));
        }
        let done = outbound.read(|conn| {
            conn.prepare_cached(
                "SELECT in_seq FROM processing WHERE status IN ('completed', 'failed')",
            )?
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<HashSet<i64>>>()
        })?;
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
        let rows = self.inbound.read(|conn| {
            conn.prepare_cached(
                "SELECT seq, id, kind, created_at, process_after, state, origin, content, trace
                 FROM messages_in WHERE seq > ?1 ORDER BY seq",
            )?
            .query_map([self.floor], |row| {
                Ok(Unread {
                    seq: row.get("seq")?,
                    id: row.get("id")?,
                    kind: row.get("kind")?,
                    created_at: row.get("created_at")?,
                    process_after: row.get("process_after")?,
                    state: row.get("state")?,
                    origin: row.get("origin")?,
                    content: row.get("content")?,
                    trace: row.get("trace")?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let mut batch = Batch::default();
        let mut floor_moves = true;
        for row in rows {
            let seq = row.seq;
            if row.state != "active" || self.done.contains(&seq) {
                if floor_moves {
                    self.floor = seq;
                }
                continue;
            }
            floor_moves = false;
            if let Some(at) = row.process_after.filter(|at| *at > now) {
                batch.next_due = Some(batch.next_due.map_or(at, |d: i64| d.min(at)));
                continue;
            }
            let origin: Origin = match serde_json::from_str(&row.origin) {
                Ok(o) => o,
                Err(e) => {
                    // Without an origin there is nowhere to say so; fail it quietly but loudly in logs.
                    tracing::error!(seq, error = %e, "inbound row has an unreadable origin");
                    self.finish(&[seq], &[], BatchStatus::Failed).await?;
                    continue;
                }
            };
            match InboundContent::parse(&row.kind, &row.content) {
                Ok(content) => batch.rows.push(InboundRow {
                    seq,
                    id: row.id,
                    created_at: row.created_at,
                    process_after: row.process_after,
                    origin,
                    content,
                    trace: row.trace,
                }),
                Err(e) => batch.unreadable.push((seq, origin, e.to_string())),
            }
        }
        Ok(batch)
    }

    /// Marks `seqs` as being processed; returns each one's attempt number, in order (1 the
    /// first time, more when a previous agent died holding it).
    pub async fn claim(&mut self, seqs: &[i64]) -> Result<Vec<i64>> {
        let now = crate::now_ms();
        let attempts = self.outbound.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut attempts = Vec::with_capacity(seqs.len());
            {
                let mut claim = tx.prepare_cached(
                    "INSERT INTO processing (in_seq, status, attempt, changed_at)
                     VALUES (?1, 'processing', 1, ?2)
                     ON CONFLICT (in_seq) DO UPDATE
                       SET status = 'processing', attempt = processing.attempt + 1, changed_at = ?2
                     RETURNING attempt",
                )?;
                for seq in seqs {
                    attempts.push(claim.query_row(params![seq, now], |r| r.get::<_, i64>(0))?);
                }
            }
            tx.commit()?;
            Ok(attempts)
        })?;
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
        let now = crate::now_ms();
        let status_text = match status {
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
        };
        let max_in = self.max_in_seq()?;
        let replies = encode(replies);
        let written = self.outbound.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let written = insert_replies(&tx, max_in, &replies, now)?;
            {
                let mut mark = tx.prepare_cached(
                    "INSERT INTO processing (in_seq, status, attempt, changed_at)
                     VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (in_seq) DO UPDATE SET status = ?2, changed_at = ?3",
                )?;
                for seq in seqs {
                    mark.execute(params![seq, status_text, now])?;
                }
            }
            tx.commit()?;
            Ok(written)
        })?;
        crate::paths::ring(&self.paths.outbound_bell());
        self.done.extend(seqs.iter().copied());
        Ok(written)
    }

    /// Writes one message at once, outside any batch: a question must reach the user while
    /// the turn that asks it waits for the answer.
    pub async fn send_now(&self, reply: &NewOutbound) -> Result<i64> {
        let max_in = self.max_in_seq()?;
        let replies = encode(std::slice::from_ref(reply));
        let written = self.outbound.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let written = insert_replies(&tx, max_in, &replies, crate::now_ms())?;
            tx.commit()?;
            Ok(written)
        })?;
        crate::paths::ring(&self.paths.outbound_bell());
        Ok(written[0])
    }

    /// The answer to a question (a `question_response` system message), if it has arrived:
    /// its seq and content.
    pub async fn question_answer(
        &self,
        question_id: &str,
    ) -> Result<Option<(i64, InboundContent)>> {
        let found: Option<(i64, String)> = self.inbound.read(|conn| {
            conn.prepare_cached(
                "SELECT seq, content FROM messages_in
                 WHERE kind = 'system' AND state = 'active'
                   AND json_extract(content, '$.event') = 'question_response'
                   AND json_extract(content, '$.data.question_id') = ?1
                 ORDER BY seq LIMIT 1",
            )?
            .query_row([question_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })?;
        match found {
            Some((seq, content)) => Ok(Some((seq, InboundContent::parse("system", &content)?))),
            None => Ok(None),
        }
    }

    /// The largest seq the runner has written: the agent's next seq is above it.
    fn max_in_seq(&self) -> Result<i64> {
        let max: Option<i64> = self.inbound.read(|conn| {
            conn.prepare_cached("SELECT max(seq) FROM messages_in")?
                .query_row([], |r| r.get(0))
        })?;
        Ok(max.unwrap_or(0))
    }

    /// The outcome delivery recorded for one of this agent's messages, if any.
    pub async fn delivery_outcome(&self, out_seq: i64) -> Result<Option<(String, Option<String>)>> {
        self.inbound.read(|conn| {
            conn.prepare_cached("SELECT outcome, detail FROM delivered WHERE out_seq = ?1")?
                .query_row([out_seq], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
    }

    /// The session's scheduled tasks as mirrored by the runner: (id, JSON spec), by id.
    pub async fn tasks(&self) -> Result<Vec<(String, String)>> {
        self.inbound.read(|conn| {
            conn.prepare_cached("SELECT id, spec FROM tasks ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
    }

    /// A session fact written by the runner (`meta` table).
    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        self.inbound.read(|conn| {
            conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()
        })
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
        self.outbound.close();
        self.inbound.close();
    }
}

/// One inbound row as stored, before its JSON is decoded.
struct Unread {
    seq: i64,
    id: String,
    kind: String,
    created_at: i64,
    process_after: Option<i64>,
    state: String,
    origin: String,
    content: String,
    trace: Option<String>,
}

/// A reply's columns, encoded before the transaction that writes it.
struct EncodedReply<'a> {
    in_reply_to: Option<i64>,
    kind: &'static str,
    destination: String,
    content: String,
    trace: Option<&'a str>,
}

fn encode(replies: &[NewOutbound]) -> Vec<EncodedReply<'_>> {
    replies
        .iter()
        .map(|reply| EncodedReply {
            in_reply_to: reply.in_reply_to,
            kind: reply.content.kind(),
            destination: serde_json::to_string(&reply.destination).unwrap_or_else(|_| "{}".into()),
            content: reply.content.to_json(),
            trace: reply.trace.as_deref(),
        })
        .collect()
}

/// Inserts replies at the next agent seqs (above `max_in`, the runner's largest, and every
/// seq already in `messages_out`) inside `tx`.
fn insert_replies(
    tx: &rusqlite::Transaction<'_>,
    max_in: i64,
    replies: &[EncodedReply<'_>],
    now: i64,
) -> rusqlite::Result<Vec<i64>> {
    let max_out: Option<i64> = tx
        .prepare_cached("SELECT max(seq) FROM messages_out")?
        .query_row([], |r| r.get(0))?;
    let mut next = seq::next_agent(max_out.unwrap_or(0).max(max_in));
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages_out (seq, in_reply_to, created_at, kind, destination, content, trace)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut written = Vec::with_capacity(replies.len());
    for reply in replies {
        insert.execute(params![
            next,
            reply.in_reply_to,
            now,
            reply.kind,
            reply.destination,
            reply.content,
            reply.trace
        ])?;
        written.push(next);
        next += 2;
    }
    Ok(written)
}
