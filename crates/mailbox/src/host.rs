//! The runner's side of a session directory: writes `inbound.db`, reads `outbound.db`.

use std::collections::HashSet;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::agent_file::AgentFile;
use crate::content::InboundContent;
use crate::db::{Db, JournalMode};
use crate::error::Result;
use crate::paths::SessionPaths;
use crate::rows::{NewInbound, OutboundRow, Outcome};
use crate::schema;

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
    inbound: Db,
    /// The agent's `outbound.db`, read through its guards.
    outbound: AgentFile,
    /// The fencing token this runner holds on the session (0: none, a single runner).
    fence: AtomicI64,
    /// Every inbound seq up to this one was finished by the agent, by the host's last look
    /// (0: none known yet). Reads of unfinished work look above it: they cost what is new,
    /// not the session's whole history.
    finished_up_to: AtomicI64,
}

/// A write's guard: true unless the session's fencing token (meta `fence`) is greater than
/// the one bound to `?F` (0: not fencing). Checked in the writing statement itself, so a
/// takeover that commits first wins, whatever the order the two runners started in.
fn fence_ok(param: u8) -> String {
    format!(
        "(?{param} = 0 OR coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fence'), 0) <= ?{param})"
    )
}

/// One statement, one commit: the seq (the smallest even number above every seq of both
/// files, see `seq::next_host`) is taken inside the insert, and a repeated id inserts
/// nothing. The runner is the only writer of this file.
static ENQUEUE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO messages_in (seq, id, kind, created_at, process_after, state, origin, content, trace)
         SELECT (max(coalesce((SELECT max(seq) FROM messages_in), 0), ?1, 0) + 2) / 2 * 2,
                ?2, ?3, ?4, ?5, 'active', ?6, ?7, ?8
         WHERE {}
         ON CONFLICT (id) DO NOTHING
         RETURNING seq",
        fence_ok(9)
    )
});

static SETTLE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO delivered (out_seq, outcome, platform_message_id, detail, at)
         SELECT ?1, ?2, ?3, ?4, ?5 WHERE {} ON CONFLICT (out_seq) DO NOTHING",
        fence_ok(6)
    )
});

static REOPEN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "DELETE FROM delivered WHERE out_seq = ?1 AND outcome = 'failed' AND {}",
        fence_ok(2)
    )
});

static SET_META: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO meta (key, value) SELECT ?1, ?2 WHERE {}
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        fence_ok(3)
    )
});

/// The fencing token recorded in the session's `inbound.db`, if any.
fn recorded_fence(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fence'")?
        .query_row([], |r| r.get(0))
        .optional()
}

/// Collects the first column of every row of `sql` bound to `params`.
fn column<T: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<T>> {
    conn.prepare_cached(sql)?
        .query_map(params, |r| r.get(0))?
        .collect()
}

impl HostMailbox {
    /// Creates the session directory and `inbound.db` if needed, and checks its version.
    pub async fn open(paths: SessionPaths, mode: JournalMode) -> Result<Self> {
        paths.create()?;
        let inbound = Db::open_writer(&paths.inbound_db(), mode)?;
        schema::init_inbound(&inbound)?;
        Ok(Self {
            outbound: AgentFile::new(paths.clone()),
            paths,
            inbound,
            fence: AtomicI64::new(0),
            finished_up_to: AtomicI64::new(0),
        })
    }

    /// Takes the session with fencing token `fence` (several runners): recorded in the
    /// mailbox unless a greater one is there, and checked by every write from now on.
    /// Fails with [`Error::Fenced`] when another runner holds a greater one.
    ///
    /// [`Error::Fenced`]: crate::Error::Fenced
    pub async fn hold_fence(&self, fence: i64) -> Result<()> {
        self.inbound.write(|conn| {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('fence', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value
                 WHERE CAST(meta.value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                [fence.to_string()],
            )
        })?;
        self.fence.store(fence, Ordering::SeqCst);
        self.check_fence()
    }

    /// [`Error::Fenced`] when a greater fencing token than this runner's is recorded.
    ///
    /// [`Error::Fenced`]: crate::Error::Fenced
    fn check_fence(&self) -> Result<()> {
        if self.held_fence() == 0 {
            return Ok(());
        }
        let current = self.inbound.read(|conn| recorded_fence(conn))?;
        self.fenced(current)
    }

    /// [`Error::Fenced`] when `current`, the recorded token, is greater than this runner's.
    ///
    /// [`Error::Fenced`]: crate::Error::Fenced
    fn fenced(&self, current: Option<i64>) -> Result<()> {
        let held = self.held_fence();
        match current {
            Some(current) if held != 0 && current > held => Err(crate::Error::Fenced {
                path: self.paths.inbound_db(),
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

    /// Whether a read of the session's `outbound.db` has not returned for longer than a
    /// caller waits (see [`Error::Stuck`]): whoever else would read that file, skip it.
    ///
    /// [`Error::Stuck`]: crate::Error::Stuck
    pub fn agent_file_stuck(paths: &SessionPaths) -> bool {
        crate::agent_file::is_stuck(paths)
    }

    /// The real path of the session's `outbound.db` once it is a regular file in its place
    /// in `out/`, checked as the mailbox checks it before it opens the file; `None` while
    /// it is not there. A link or FIFO there is refused ([`Error::File`]).
    ///
    /// [`Error::File`]: crate::Error::File
    pub fn agent_file_in_place(paths: &SessionPaths) -> Result<Option<std::path::PathBuf>> {
        crate::agent_file::outbound_db_in_place(paths)
    }

    async fn max_out_seq(&self) -> Result<i64> {
        let max = self
            .outbound
            .read(|conn| {
                conn.prepare_cached("SELECT max(seq) FROM messages_out")?
                    .query_row([], |r| r.get::<_, Option<i64>>(0))
            })
            .await?;
        Ok(max.flatten().unwrap_or(0))
    }

    /// Appends a message, or returns the existing row when its id is already there.
    pub async fn enqueue(&self, msg: &NewInbound) -> Result<Enqueued> {
        let max_out = self.max_out_seq().await?;
        let origin = serde_json::to_string(&msg.origin).unwrap_or_else(|_| "{}".into());
        let content = msg.content.to_json();
        let held = self.held_fence();
        let inserted = self.inbound.write(|conn| {
            conn.prepare_cached(&ENQUEUE)?
                .query_row(
                    params![
                        max_out,
                        msg.id,
                        msg.content.kind(),
                        crate::now_ms(),
                        msg.process_after,
                        origin,
                        content,
                        msg.trace,
                        held
                    ],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
        })?;
        let Some(seq) = inserted else {
            self.check_fence()?;
            let seq = self.inbound.read(|conn| {
                conn.prepare_cached("SELECT seq FROM messages_in WHERE id = ?1")?
                    .query_row([&msg.id], |r| r.get(0))
            })?;
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
        let max_row_bytes = i64::try_from(max_row_bytes).unwrap_or(i64::MAX);
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let read = self.outbound.read(move |conn| {
            conn.prepare_cached(
                "SELECT seq, in_reply_to, created_at, size,
                        CASE WHEN size > ?2 THEN '' ELSE kind END AS kind,
                        CASE WHEN size > ?2 THEN NULL ELSE trace END AS trace,
                        CASE WHEN size > ?2 THEN '' ELSE destination END AS destination,
                        CASE WHEN size > ?2 THEN '' ELSE content END AS content
                 FROM (SELECT *, length(CAST(content AS BLOB))
                                 + length(CAST(destination AS BLOB))
                                 + ifnull(length(CAST(trace AS BLOB)), 0)
                                 + length(CAST(kind AS BLOB)) AS size
                       FROM messages_out WHERE seq > ?1 ORDER BY seq LIMIT ?3)
                 ORDER BY seq",
            )?
            .query_map(params![after, max_row_bytes, limit_sql], |row| {
                Ok(OutboundRow {
                    seq: row.get("seq")?,
                    in_reply_to: row.get("in_reply_to")?,
                    created_at: row.get("created_at")?,
                    kind: row.get("kind")?,
                    destination: row.get("destination")?,
                    content: row.get("content")?,
                    row_bytes: row.get("size")?,
                    trace: row.get("trace")?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        });
        let rows = read.await?.unwrap_or_default();
        let Some(last) = rows.last() else {
            return Ok(OutboundPage::default());
        };
        let full = rows.len() >= limit;
        let scanned_up_to = last.seq;
        let settled: HashSet<i64> = self
            .inbound
            .read(|conn| {
                column::<i64>(
                    conn,
                    "SELECT out_seq FROM delivered WHERE out_seq > ?1",
                    [after],
                )
            })?
            .into_iter()
            .collect();
        Ok(OutboundPage {
            rows: rows
                .into_iter()
                .filter(|row| !settled.contains(&row.seq))
                .collect(),
            more_after: full.then_some(scanned_up_to),
        })
    }

    /// Where the host said this session's replies go: the distinct `reply_to` destinations
    /// (JSON) of its inbound rows, each written by the host, never by the agent.
    pub async fn reply_destinations(&self) -> Result<Vec<String>> {
        let found = self.inbound.read(|conn| {
            column::<Option<String>>(
                conn,
                "SELECT DISTINCT json_extract(origin, '$.reply_to') FROM messages_in",
                [],
            )
        })?;
        Ok(found.into_iter().flatten().collect())
    }

    /// The seqs of inbound messages above `after`, in order.
    pub async fn inbound_seqs_after(&self, after: i64) -> Result<Vec<i64>> {
        self.inbound.read(|conn| {
            column(
                conn,
                "SELECT seq FROM messages_in WHERE seq > ?1 ORDER BY seq",
                [after],
            )
        })
    }

    /// The `reply_to` (JSON) of the session's first inbound message: where it lives.
    pub async fn home_destination(&self) -> Result<Option<String>> {
        let found = self.inbound.read(|conn| {
            conn.prepare_cached(
                "SELECT json_extract(origin, '$.reply_to') FROM messages_in ORDER BY seq LIMIT 1",
            )?
            .query_row([], |r| r.get::<_, Option<String>>(0))
            .optional()
        })?;
        Ok(found.flatten())
    }

    /// Records the outcome of an outbound row. `false`: it was settled before (first wins).
    pub async fn settle(
        &self,
        out_seq: i64,
        outcome: Outcome,
        platform_message_id: Option<&str>,
        detail: Option<&str>,
    ) -> Result<bool> {
        let held = self.held_fence();
        let inserted = self.inbound.write(|conn| {
            conn.prepare_cached(&SETTLE)?.execute(params![
                out_seq,
                outcome.as_str(),
                platform_message_id,
                detail,
                crate::now_ms(),
                held
            ])
        })?;
        if inserted == 0 {
            self.check_fence()?;
        }
        // No doorbell: an outcome is nothing for the agent to act on, and ringing woke it
        // for every reply it wrote.
        Ok(inserted == 1)
    }

    /// Makes a row settled as failed unsettled again (an operator's retry), so the outbound
    /// stream sends it again. The settlement lives in `inbound.db`, which only the host
    /// writes: the agent cannot reopen anything. Idempotent: a second call finds the row
    /// unsettled and changes nothing.
    pub async fn reopen_failed(&self, out_seq: i64) -> Result<Reopen> {
        let exists = self
            .outbound
            .read(move |conn| {
                conn.prepare_cached("SELECT 1 FROM messages_out WHERE seq = ?1")?
                    .query_row([out_seq], |_| Ok(()))
                    .optional()
            })
            .await?
            .flatten()
            .is_some();
        if !exists {
            return Ok(Reopen::Unknown);
        }
        let held = self.held_fence();
        let removed = self.inbound.write(|conn| {
            conn.prepare_cached(&REOPEN)?
                .execute(params![out_seq, held])
        })?;
        if removed == 1 {
            return Ok(Reopen::Reopened);
        }
        self.check_fence()?;
        Ok(match self.outcome(out_seq).await?.as_deref() {
            None => Reopen::Unsettled,
            Some(_) => Reopen::Delivered,
        })
    }

    /// Records several outcomes in one transaction (one commit instead of one each); for
    /// each, whether it was recorded (false: the row was already settled).
    pub async fn settle_many(&self, settlements: &[Settlement<'_>]) -> Result<Vec<bool>> {
        let now = crate::now_ms();
        self.write_fenced(|tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO delivered (out_seq, outcome, platform_message_id, detail, at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (out_seq) DO NOTHING",
            )?;
            let mut recorded = Vec::with_capacity(settlements.len());
            for s in settlements {
                let done = insert.execute(params![
                    s.out_seq,
                    s.outcome.as_str(),
                    s.platform_message_id,
                    s.detail,
                    now
                ])?;
                recorded.push(done == 1);
            }
            Ok(recorded)
        })
    }

    /// Runs `work` in one transaction on `inbound.db` and commits it, unless another
    /// runner's greater fencing token is recorded ([`Error::Fenced`]: nothing is written).
    /// IMMEDIATE: the write lock is taken first, so the token read holds until the commit
    /// (a takeover cannot commit in between).
    ///
    /// [`Error::Fenced`]: crate::Error::Fenced
    fn write_fenced<T>(
        &self,
        mut work: impl FnMut(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.inbound.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Err(fenced) = self.fenced(recorded_fence(&tx)?) {
                return Ok(Err(fenced));
            }
            let done = work(&tx)?;
            tx.commit()?;
            Ok(Ok(done))
        })?
    }

    /// The outcome recorded for `out_seq`, if any.
    pub async fn outcome(&self, out_seq: i64) -> Result<Option<String>> {
        self.inbound.read(|conn| {
            conn.prepare_cached("SELECT outcome FROM delivered WHERE out_seq = ?1")?
                .query_row([out_seq], |r| r.get(0))
                .optional()
        })
    }

    /// The inbound seqs above `after` the agent marked completed or failed.
    async fn finished_after(&self, after: i64) -> Result<HashSet<i64>> {
        let seqs = self
            .outbound
            .read(move |conn| {
                column::<i64>(
                    conn,
                    "SELECT in_seq FROM processing
                     WHERE status IN ('completed', 'failed') AND in_seq > ?1",
                    [after],
                )
            })
            .await?;
        Ok(seqs.unwrap_or_default().into_iter().collect())
    }

    /// Inbound work the agent has not completed yet.
    pub async fn pending(&self) -> Result<Pending> {
        let floor = self.finished_up_to.load(Ordering::SeqCst);
        let inbound = self.inbound.read(|conn| {
            conn.prepare_cached(
                "SELECT seq, process_after, created_at FROM messages_in
                 WHERE state = 'active' AND seq > ?1 ORDER BY seq",
            )?
            .query_map([floor], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let done = self.finished_after(floor).await?;
        let mut pending = Pending::default();
        // The finished rows before the first unfinished one move the floor up.
        let mut finished_up_to = floor;
        for (seq, process_after, created_at) in inbound {
            if done.contains(&seq) {
                if pending.count == 0 {
                    finished_up_to = seq;
                }
                continue;
            }
            pending.count += 1;
            let due = process_after.unwrap_or(created_at);
            pending.next_due = Some(pending.next_due.map_or(due, |d: i64| d.min(due)));
        }
        self.finished_up_to
            .fetch_max(finished_up_to, Ordering::SeqCst);
        Ok(pending)
    }

    /// The inbound seqs that are due (now, unix ms) and that the agent has not finished,
    /// by the host's reading: what an agent that makes progress will not hold for long.
    pub async fn due_unfinished(&self, now: i64) -> Result<Vec<i64>> {
        let floor = self.finished_up_to.load(Ordering::SeqCst);
        let due: Vec<i64> = self.inbound.read(|conn| {
            column(
                conn,
                "SELECT seq FROM messages_in WHERE state = 'active' AND seq > ?2
                   AND ifnull(process_after, created_at) <= ?1 ORDER BY seq",
                [now, floor],
            )
        })?;
        if due.is_empty() {
            return Ok(due);
        }
        let done = self.finished_after(floor).await?;
        Ok(due.into_iter().filter(|s| !done.contains(s)).collect())
    }

    /// The inbound seqs the agent has claimed and not finished.
    pub async fn claimed(&self) -> Result<Vec<i64>> {
        let claimed = self
            .outbound
            .read(|conn| {
                column(
                    conn,
                    "SELECT in_seq FROM processing WHERE status = 'processing'",
                    [],
                )
            })
            .await?;
        Ok(claimed.unwrap_or_default())
    }

    /// The reply destinations (JSON) of the inbound messages the agent is working on now.
    pub async fn working_destinations(&self) -> Result<Vec<String>> {
        let seqs = self.claimed().await?;
        let mut destinations = Vec::new();
        for seq in seqs {
            let found: Option<Option<String>> = self.inbound.read(|conn| {
                conn.prepare_cached(
                    "SELECT json_extract(origin, '$.reply_to') FROM messages_in WHERE seq = ?1",
                )?
                .query_row([seq], |r| r.get(0))
                .optional()
            })?;
            if let Some(d) = found.flatten()
                && !destinations.contains(&d)
            {
                destinations.push(d);
            }
        }
        Ok(destinations)
    }

    /// Sets a session fact (`meta` table): agent name, time zone, default reply origin.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let held = self.held_fence();
        let set = self.inbound.write(|conn| {
            conn.prepare_cached(&SET_META)?
                .execute(params![key, value, held])
        })?;
        if set == 0 {
            self.check_fence()?;
        }
        Ok(())
    }

    /// Replaces the session's task mirror (`tasks` table) with `tasks` as (id, JSON spec),
    /// in one transaction so the agent never sees half of it.
    pub async fn replace_tasks(&self, tasks: &[(String, String)]) -> Result<()> {
        let now = crate::now_ms();
        self.write_fenced(|tx| {
            tx.execute("DELETE FROM tasks", [])?;
            let mut insert =
                tx.prepare_cached("INSERT INTO tasks (id, spec, updated_at) VALUES (?1, ?2, ?3)")?;
            for (id, spec) in tasks {
                insert.execute(params![id, spec, now])?;
            }
            Ok(())
        })?;
        crate::paths::ring(&self.paths.inbound_bell());
        Ok(())
    }

    /// Checks that `content_json` is valid content of `kind`, before anything is written.
    pub fn validate(kind: &str, content_json: &str) -> Result<InboundContent> {
        Ok(InboundContent::parse(kind, content_json)?)
    }

    pub async fn close(&self) {
        self.inbound.close();
        self.outbound.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::sync::Arc;

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

    /// The agent's chat reply `text` to API conversation "c".
    fn reply(text: &str) -> crate::NewOutbound {
        crate::NewOutbound {
            in_reply_to: None,
            destination: crate::Destination::Api {
                conversation: "c".into(),
            },
            content: crate::OutboundContent::Chat(crate::content::ChatOut { text: text.into() }),
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
        let ids: Vec<String> = new
            .inbound
            .read(|conn| column(conn, "SELECT id FROM messages_in ORDER BY seq", []))
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

    /// An agent swaps its `messages_out` table for a view of an endless recursive query,
    /// after the host has read it once (its statements prepared): the host's reads fail
    /// at once instead of running forever on the runner's threads.
    #[test]
    fn a_view_an_agent_puts_in_place_of_a_table_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SessionPaths::new(dir.path());
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            let outcome = runtime.block_on(async {
                let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
                    .await
                    .expect("open");
                let agent = crate::AgentMailbox::open(paths.clone(), JournalMode::Wal)
                    .await
                    .expect("agent open");
                agent.send_now(&reply("hi")).await.expect("write");
                let before = host.unsettled_after(0, usize::MAX).await.expect("read");
                assert_eq!(before.len(), 1);
                let hostile = rusqlite::Connection::open(paths.outbound_db()).expect("open");
                hostile
                    .execute_batch(
                        "DROP TABLE messages_out;
                         CREATE VIEW messages_out AS
                           WITH RECURSIVE r(seq) AS (SELECT 1 UNION ALL SELECT seq + 1 FROM r)
                           SELECT seq, NULL AS in_reply_to, 0 AS created_at, 'chat' AS kind,
                                  '{}' AS destination, '{}' AS content, NULL AS trace
                           FROM r WHERE seq < 0;",
                    )
                    .expect("swap in a view");
                let read = host.unsettled_after(0, usize::MAX).await.map(|r| r.len());
                let enqueue = host.enqueue(&chat("a")).await.map(|e| e.seq);
                (read, enqueue)
            });
            let _ = done.send(outcome);
        });
        let (read, enqueue) = finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the host's reads came back");
        for (what, result) in [("read", read.map(drop)), ("enqueue", enqueue.map(drop))] {
            let text = format!("{:?}", result.expect_err(what));
            assert!(text.contains("not authorized"), "{what}: {text}");
        }
    }

    /// The host's look at unfinished work starts above the rows finished before the first
    /// unfinished one: a finished row stays finished for it, even if the agent's own record
    /// of it is gone later, and a row finished out of order moves nothing until the rows
    /// before it are finished too.
    #[tokio::test]
    async fn pending_work_is_read_above_what_was_finished_in_order() {
        use crate::agent::BatchStatus;
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SessionPaths::new(dir.path());
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .expect("open");
        let mut agent = crate::AgentMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .expect("agent open");
        let mut seqs = Vec::new();
        for id in ["m1", "m2", "m3", "m4"] {
            seqs.push(host.enqueue(&chat(id)).await.expect("enqueue").seq);
        }
        let finish = async |agent: &mut crate::AgentMailbox, seqs: &[i64]| {
            agent
                .finish(seqs, &[], BatchStatus::Completed)
                .await
                .expect("finish");
        };
        finish(&mut agent, &[seqs[0], seqs[2]]).await;
        let pending = host.pending().await.expect("pending");
        assert_eq!(pending.count, 2);
        assert_eq!(host.finished_up_to.load(Ordering::SeqCst), seqs[0]);
        assert_eq!(
            host.due_unfinished(i64::MAX).await.expect("due"),
            vec![seqs[1], seqs[3]]
        );

        finish(&mut agent, &[seqs[1]]).await;
        assert_eq!(host.pending().await.expect("pending").count, 1);
        assert_eq!(host.finished_up_to.load(Ordering::SeqCst), seqs[2]);

        // The agent's record of its first three rows is gone: the host does not look there
        // again, so they are not work again.
        let tamper = rusqlite::Connection::open(paths.outbound_db()).expect("open");
        tamper
            .execute("DELETE FROM processing WHERE in_seq <= ?1", [seqs[2]])
            .expect("delete");
        assert_eq!(host.pending().await.expect("pending").count, 1);
        assert_eq!(
            host.due_unfinished(i64::MAX).await.expect("due"),
            vec![seqs[3]]
        );
        finish(&mut agent, &[seqs[3]]).await;
        assert_eq!(host.pending().await.expect("pending"), Pending::default());
        assert_eq!(host.finished_up_to.load(Ordering::SeqCst), seqs[3]);
        agent.close().await;
    }

    /// An agent plants a FIFO where SQLite looks for `outbound.db`'s journal (DELETE mode):
    /// the host's read waits in the FIFO's `open`, which nothing inside SQLite can
    /// interrupt. That read holds one blocking thread and the session's turn; its caller
    /// gets `Stuck` after `CALL_WAIT` and the runtime's other tasks run meanwhile. Later
    /// calls on the session get `Stuck` at once instead of piling up threads behind it, and
    /// once the agent lets go, reads work again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_fifo_an_agent_plants_stalls_only_its_own_session() {
        use crate::agent_file::CALL_WAIT;
        use std::time::Instant;

        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SessionPaths::new(dir.path());
        let host = Arc::new(
            HostMailbox::open(paths.clone(), JournalMode::Delete)
                .await
                .expect("open"),
        );
        let agent = crate::AgentMailbox::open(paths.clone(), JournalMode::Delete)
            .await
            .expect("agent open");
        agent.send_now(&reply("hi")).await.expect("write");
        assert_eq!(
            host.unsettled_after(0, usize::MAX)
                .await
                .expect("read")
                .len(),
            1
        );
        let fifo = paths.out_dir().join("outbound.db-journal");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());

        let (ticks, ticker) = crate::db::ticker();
        let started = Instant::now();
        let stuck = host.unsettled_after(0, usize::MAX).await;
        assert!(
            matches!(stuck, Err(Error::Stuck { .. })),
            "the read gives up: {stuck:?}"
        );
        assert!(started.elapsed() >= CALL_WAIT);
        let ticked = ticks.load(Ordering::SeqCst);
        assert!(
            ticked >= 50,
            "the other task ran {ticked} times while the read waited"
        );

        // The stuck call still holds the session's turn: the next calls, a read and an
        // enqueue (which reads the agent's highest seq), fail without waiting for it.
        let started = Instant::now();
        let again = host.unsettled_after(0, usize::MAX).await;
        assert!(matches!(again, Err(Error::Stuck { .. })), "{again:?}");
        let enqueued = host.enqueue(&chat("m1")).await;
        assert!(matches!(enqueued, Err(Error::Stuck { .. })), "{enqueued:?}");
        // So does a mailbox for the session opened anew (the runner closes idle ones): the
        // turn belongs to the file.
        host.close().await;
        let reopened = HostMailbox::open(paths.clone(), JournalMode::Delete)
            .await
            .expect("open again");
        let again = reopened.unsettled_after(0, usize::MAX).await;
        assert!(matches!(again, Err(Error::Stuck { .. })), "{again:?}");
        assert!(
            started.elapsed() < CALL_WAIT / 2,
            "they did not wait for the stuck call: {:?}",
            started.elapsed()
        );
        let host = reopened;

        // The agent lets go (a writer opens the FIFO, which it then removes): the stuck
        // call returns, and the session's reads and enqueues work again.
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the FIFO for writing");
        drop(writer);
        std::fs::remove_file(&fifo).expect("remove the FIFO");
        let mut read = host.unsettled_after(0, usize::MAX).await;
        for _ in 0..100 {
            if !matches!(read, Err(Error::Stuck { .. })) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            read = host.unsettled_after(0, usize::MAX).await;
        }
        assert_eq!(read.expect("read after the agent let go").len(), 1);
        host.enqueue(&chat("m1")).await.expect("enqueue");
        ticker.abort();
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
