//! Short-lived, read-only looks into a session's mailbox files for the operator's lists:
//! message counts, pending work, the latest messages both ways.
//!
//! Not through [`crate::mailboxes::Mailboxes`]: that cache keeps at most `MAX_OPEN`
//! mailboxes, the least recently used closed first, and opens each one for writing
//! (creating its directory and files). A page of 500 sessions read through it would
//! close the mailboxes of the sessions busy right now, only to count rows. A view is one
//! read-only SQLite connection (`outbound.db` attached to it), opened for one look and
//! closed after: it creates nothing and leaves the cache as it was.
//!
//! `outbound.db` is the agent's: it is attached only after the checks `HostMailbox`
//! makes (a regular file in `out/`, and SQLite opened that very file, not one a link led
//! to), its tables must be tables (a view could make a count run forever), and what is
//! read from it is bounded and decoded leniently.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferroclaw_mailbox::{HostMailbox, SessionPaths};
use ferroclaw_proto::v1::SessionMessage;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection, Row};

use crate::error::{Result, RunnerError};

/// A view waits at most this long for a lock the writer (runner or agent) holds.
const BUSY_TIMEOUT: Duration = Duration::from_millis(500);
/// Content longer than this (bytes) is not loaded: a placeholder says how long it was.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Longest sender name returned (characters).
const MAX_SENDER_CHARS: i64 = 256;
/// Longest kind returned (characters); the agent writes outbound kinds.
const MAX_KIND_CHARS: i64 = 64;

/// What a view counted; `None` where that part could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Active inbound rows the agent has not marked completed or failed (all active rows
    /// when its `outbound.db` cannot be read: nothing says they were done).
    pub pending: Option<i64>,
    /// Inbound rows (every kind and state).
    pub messages_in: Option<i64>,
    /// Rows the agent wrote to `messages_out`.
    pub messages_out: Option<i64>,
}

pub struct MailboxView {
    conn: SqliteConnection,
    inbound_path: PathBuf,
    outbound_path: PathBuf,
    outbound: Outbound,
}

/// The state of the agent's file in a view.
enum Outbound {
    /// Not created (or not initialised) by the agent yet: no rows.
    Absent,
    /// Attached as `out`.
    Attached,
    /// There, but refused or unreadable: nothing is read from it.
    Unreadable,
}

fn sqlite_at(path: &Path) -> impl FnOnce(sqlx::Error) -> RunnerError + '_ {
    move |source| RunnerError::MailboxView {
        path: path.to_path_buf(),
        source,
    }
}

fn refused(path: &Path, why: String) -> RunnerError {
    sqlite_at(path)(sqlx::Error::Protocol(why))
}

impl MailboxView {
    /// A view of the session's files; `None` when its `inbound.db` does not exist (or has
    /// no tables) yet: a session nothing was enqueued to has no messages.
    pub async fn open(paths: &SessionPaths) -> Result<Option<Self>> {
        let inbound_path = paths.inbound_db();
        // in/ is the runner's own directory: no link can be planted there.
        if !inbound_path.is_file() {
            return Ok(None);
        }
        let mut conn = SqliteConnectOptions::new()
            .filename(&inbound_path)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT)
            // Views and triggers of an attached file may call only harmless functions.
            .pragma("trusted_schema", "OFF")
            .connect()
            .await
            .map_err(sqlite_at(&inbound_path))?;
        let version: i64 = sqlx::query_scalar("PRAGMA main.user_version")
            .fetch_one(&mut conn)
            .await
            .map_err(sqlite_at(&inbound_path))?;
        if version == 0 {
            // Created, its tables not yet: the runner is opening it right now.
            let _ = conn.close().await;
            return Ok(None);
        }
        let outbound_path = paths.outbound_db();
        let outbound = match attach_outbound(&mut conn, paths).await {
            Ok(true) => Outbound::Attached,
            Ok(false) => Outbound::Absent,
            Err(e) => {
                tracing::debug!(path = %outbound_path.display(), error = %e, "outbound.db not read");
                Outbound::Unreadable
            }
        };
        Ok(Some(Self {
            conn,
            inbound_path,
            outbound_path,
            outbound,
        }))
    }

    /// Pending work, and with `messages` the inbound and outbound row counts. A part that
    /// cannot be read is `None` (logged at debug), the others are still counted.
    pub async fn counts(&mut self, messages: bool) -> Counts {
        let mut counts = Counts::default();
        let active = "SELECT count(*) FROM main.messages_in WHERE state = 'active'";
        let unfinished = "SELECT count(*) FROM main.messages_in AS m WHERE m.state = 'active'
             AND NOT EXISTS (SELECT 1 FROM out.processing AS p
                             WHERE p.in_seq = m.seq AND p.status IN ('completed', 'failed'))";
        let mut pending = None;
        if matches!(self.outbound, Outbound::Attached) {
            pending = self.scalar(unfinished, "pending").await;
        }
        if pending.is_none() {
            pending = self.scalar(active, "active").await;
        }
        counts.pending = pending;
        if messages {
            counts.messages_in = self
                .scalar("SELECT count(*) FROM main.messages_in", "messages_in")
                .await;
            counts.messages_out = match self.outbound {
                Outbound::Absent => Some(0),
                Outbound::Attached => {
                    self.scalar("SELECT count(*) FROM out.messages_out", "messages_out")
                        .await
                }
                Outbound::Unreadable => None,
            };
        }
        counts
    }

    async fn scalar(&mut self, sql: &str, what: &str) -> Option<i64> {
        match sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut self.conn)
            .await
        {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::debug!(path = %self.inbound_path.display(), what, error = %e, "mailbox count not read");
                None
            }
        }
    }

    /// The latest `limit` inbound rows, newest first. A row's state is "processed" once
    /// the agent marked it completed or failed (or it is not active), else "pending".
    pub async fn latest_inbound(&mut self, limit: usize) -> Result<Vec<SessionMessage>> {
        let rows = sqlx::query(
            "SELECT seq, created_at, state, size,
                    CAST(substr(kind, 1, $3) AS BLOB) AS kind,
                    CAST(substr(sender, 1, $4) AS BLOB) AS sender,
                    CASE WHEN size > $2 THEN NULL ELSE CAST(content AS BLOB) END AS content
             FROM (SELECT seq, created_at, state, kind, content,
                          length(CAST(content AS BLOB)) AS size,
                          CASE WHEN json_valid(origin) THEN json_extract(origin, '$.sender')
                          END AS sender
                   FROM main.messages_in ORDER BY seq DESC LIMIT $1)",
        )
        .bind(sql_count(limit))
        .bind(sql_count(MAX_CONTENT_BYTES))
        .bind(MAX_KIND_CHARS)
        .bind(MAX_SENDER_CHARS)
        .fetch_all(&mut self.conn)
        .await
        .map_err(sqlite_at(&self.inbound_path))?;
        let path = self.inbound_path.clone();
        let mut messages = Vec::with_capacity(rows.len());
        let mut active = Vec::new();
        for row in rows {
            let seq: i64 = row.try_get("seq").map_err(sqlite_at(&path))?;
            let state: String = row.try_get("state").map_err(sqlite_at(&path))?;
            if state == "active" {
                active.push(seq);
            }
            messages.push(SessionMessage {
                direction: "in".into(),
                seq,
                kind: lossy(row.try_get("kind").map_err(sqlite_at(&path))?),
                content_json: content(&row, &path)?,
                created_at_ms: row.try_get("created_at").map_err(sqlite_at(&path))?,
                // Settled below.
                state: "processed".into(),
                sender: lossy(row.try_get("sender").map_err(sqlite_at(&path))?),
            });
        }
        let finished: HashSet<i64> = self.finished(&active).await.into_iter().collect();
        let is_active: HashSet<i64> = active.into_iter().collect();
        for m in &mut messages {
            if is_active.contains(&m.seq) && !finished.contains(&m.seq) {
                m.state = "pending".into();
            }
        }
        Ok(messages)
    }

    /// Which of `seqs` the agent marked completed or failed (none when its file cannot be
    /// read: nothing says they were done).
    async fn finished(&mut self, seqs: &[i64]) -> Vec<i64> {
        if seqs.is_empty() || !matches!(self.outbound, Outbound::Attached) {
            return Vec::new();
        }
        // One lookup per listed seq, never a scan of the agent's table.
        let found = sqlx::query_scalar::<_, i64>(
            "SELECT CAST(in_seq AS INTEGER) FROM out.processing
             WHERE status IN ('completed', 'failed')
               AND in_seq IN (SELECT value FROM json_each($1))",
        )
        .bind(json_list(seqs))
        .fetch_all(&mut self.conn)
        .await;
        found.unwrap_or_else(|e| {
            tracing::debug!(path = %self.outbound_path.display(), error = %e, "processing not read");
            Vec::new()
        })
    }

    /// The latest `limit` rows the agent wrote, newest first, each with its settlement:
    /// "delivered", "failed", or "pending" while unsettled.
    pub async fn latest_outbound(&mut self, limit: usize) -> Result<Vec<SessionMessage>> {
        match self.outbound {
            Outbound::Absent => return Ok(Vec::new()),
            Outbound::Unreadable => {
                return Err(refused(
                    &self.outbound_path,
                    "the agent's outbound.db cannot be read".into(),
                ));
            }
            Outbound::Attached => {}
        }
        // Every column is the agent's: cast to what is decoded, so a value of the wrong
        // type reads as something rather than failing the whole list.
        let rows = sqlx::query(
            "SELECT CAST(seq AS INTEGER) AS seq, CAST(created_at AS INTEGER) AS created_at,
                    size,
                    CAST(substr(kind, 1, $3) AS BLOB) AS kind,
                    CASE WHEN size > $2 THEN NULL ELSE CAST(ifnull(content, '') AS BLOB)
                    END AS content
             FROM (SELECT seq, created_at, kind, content,
                          length(CAST(content AS BLOB)) AS size
                   FROM out.messages_out ORDER BY seq DESC LIMIT $1)",
        )
        .bind(sql_count(limit))
        .bind(sql_count(MAX_CONTENT_BYTES))
        .bind(MAX_KIND_CHARS)
        .fetch_all(&mut self.conn)
        .await
        .map_err(sqlite_at(&self.outbound_path))?;
        let path = self.outbound_path.clone();
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows {
            // A row whose seq is no number cannot be told apart: skipped.
            let Some(seq) = row
                .try_get::<Option<i64>, _>("seq")
                .map_err(sqlite_at(&path))?
            else {
                continue;
            };
            messages.push(SessionMessage {
                direction: "out".into(),
                seq,
                kind: lossy(row.try_get("kind").map_err(sqlite_at(&path))?),
                content_json: content(&row, &path)?,
                created_at_ms: row
                    .try_get::<Option<i64>, _>("created_at")
                    .map_err(sqlite_at(&path))?
                    .unwrap_or(0),
                state: "pending".into(),
                sender: String::new(),
            });
        }
        let seqs: Vec<i64> = messages.iter().map(|m| m.seq).collect();
        if !seqs.is_empty() {
            let settled: Vec<(i64, String)> = sqlx::query_as(
                "SELECT out_seq, outcome FROM main.delivered
                 WHERE out_seq IN (SELECT value FROM json_each($1))",
            )
            .bind(json_list(&seqs))
            .fetch_all(&mut self.conn)
            .await
            .map_err(sqlite_at(&self.inbound_path))?;
            for m in &mut messages {
                if let Some((_, outcome)) = settled.iter().find(|(seq, _)| *seq == m.seq)
                    && matches!(outcome.as_str(), "delivered" | "failed")
                {
                    m.state = outcome.clone();
                }
            }
        }
        Ok(messages)
    }

    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// Attaches the agent's `outbound.db` as `out` once it passes the checks; `Ok(false)`
/// when the agent has not created (or initialised) it yet.
async fn attach_outbound(conn: &mut SqliteConnection, paths: &SessionPaths) -> Result<bool> {
    let path = paths.outbound_db();
    // The mailbox's own read of it is stuck (a FIFO the agent planted as its journal): an
    // attach would wait in the same open, for ever, on this connection's thread.
    if HostMailbox::agent_file_stuck(paths) {
        return Err(refused(&path, "a read of it has not returned".into()));
    }
    let Some(real) = HostMailbox::agent_file_in_place(paths)? else {
        return Ok(false);
    };
    let name = real
        .to_str()
        .ok_or_else(|| refused(&path, "the path is not UTF-8".into()))?;
    // The connection is read-only: an attached file is opened read-only too.
    sqlx::query("ATTACH DATABASE $1 AS out")
        .bind(name)
        .execute(&mut *conn)
        .await
        .map_err(sqlite_at(&path))?;
    let checked = check_attached(conn, &path, &real).await;
    if !matches!(checked, Ok(true)) {
        let _ = sqlx::query("DETACH DATABASE out").execute(&mut *conn).await;
    }
    checked
}

/// After the attach: SQLite resolves every link in a name before it opens it, so a link
/// swapped in after the checks shows here as another file. Then the agent's schema: its
/// version (0: not initialised yet) and real tables where tables belong.
async fn check_attached(conn: &mut SqliteConnection, path: &Path, real: &Path) -> Result<bool> {
    let opened: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'out'")
            .fetch_one(&mut *conn)
            .await
            .map_err(sqlite_at(path))?;
    if Path::new(&opened) != real {
        return Err(refused(
            path,
            format!("led to {opened}: a link was planted in its place"),
        ));
    }
    let version: i64 = sqlx::query_scalar("PRAGMA out.user_version")
        .fetch_one(&mut *conn)
        .await
        .map_err(sqlite_at(path))?;
    if version == 0 {
        return Ok(false);
    }
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM out.sqlite_master WHERE type = 'table'
           AND name IN ('messages_out', 'processing') AND sql LIKE 'CREATE TABLE%'",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(sqlite_at(path))?;
    if tables != 2 {
        return Err(refused(
            path,
            "messages_out or processing is not a plain table".into(),
        ));
    }
    Ok(true)
}

/// The row's content, or a placeholder when it was longer than [`MAX_CONTENT_BYTES`].
fn content(row: &sqlx::sqlite::SqliteRow, path: &Path) -> Result<String> {
    let bytes: Option<Vec<u8>> = row.try_get("content").map_err(sqlite_at(path))?;
    let size: Option<i64> = row.try_get("size").map_err(sqlite_at(path))?;
    Ok(match bytes {
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => too_long(size.unwrap_or(0)),
    })
}

/// What stands in for content too long to return.
pub fn too_long(bytes: i64) -> String {
    serde_json::json!({
        "too_long": true,
        "bytes": bytes,
        "max_bytes": MAX_CONTENT_BYTES,
    })
    .to_string()
}

fn lossy(bytes: Option<Vec<u8>>) -> String {
    bytes
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn json_list(seqs: &[i64]) -> String {
    serde_json::to_string(seqs).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use ferroclaw_mailbox::agent::BatchStatus;
    use ferroclaw_mailbox::content::{ChatIn, ChatOut, InboundContent, OutboundContent};
    use ferroclaw_mailbox::{
        AgentMailbox, Destination, HostMailbox, JournalMode, NewInbound, NewOutbound, Origin,
        Outcome,
    };

    use super::*;

    pub(crate) fn chat_in(id: &str, text: &str, sender: &str) -> NewInbound {
        NewInbound {
            id: id.into(),
            content: InboundContent::Chat(ChatIn {
                text: text.into(),
                sender: sender.into(),
                attachments: Vec::new(),
            }),
            origin: Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: sender.into(),
                reply_to: Destination::Api {
                    conversation: "c".into(),
                },
            },
            process_after: None,
            trace: None,
        }
    }

    pub(crate) fn chat_out(text: &str) -> NewOutbound {
        NewOutbound {
            in_reply_to: None,
            destination: Destination::Api {
                conversation: "c".into(),
            },
            content: OutboundContent::Chat(ChatOut { text: text.into() }),
            trace: None,
        }
    }

    #[tokio::test]
    async fn a_session_without_files_has_no_view() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path().join("s"));
        assert!(MailboxView::open(&paths).await.unwrap().is_none());
        assert!(!paths.root().exists(), "a view creates nothing");
    }

    #[tokio::test]
    async fn counts_and_latest_messages_both_ways() {
        for mode in [JournalMode::Wal, JournalMode::Delete] {
            let dir = tempfile::tempdir().unwrap();
            let paths = SessionPaths::new(dir.path().join("s"));
            let host = HostMailbox::open(paths.clone(), mode).await.unwrap();
            let first = host.enqueue(&chat_in("a", "one", "ann")).await.unwrap();
            host.enqueue(&chat_in("b", "two", "bob")).await.unwrap();
            // No outbound.db yet: nothing is done, nothing written.
            let mut view = MailboxView::open(&paths).await.unwrap().unwrap();
            let counts = view.counts(true).await;
            assert_eq!(
                counts,
                Counts {
                    pending: Some(2),
                    messages_in: Some(2),
                    messages_out: Some(0)
                }
            );
            view.close().await;

            let mut agent = AgentMailbox::open(paths.clone(), mode).await.unwrap();
            let written = agent
                .finish(
                    &[first.seq],
                    &[chat_out("hello"), chat_out("again")],
                    BatchStatus::Completed,
                )
                .await
                .unwrap();
            host.settle(written[0], Outcome::Delivered, None, None)
                .await
                .unwrap();
            let mut view = MailboxView::open(&paths).await.unwrap().unwrap();
            assert_eq!(
                view.counts(true).await,
                Counts {
                    pending: Some(1),
                    messages_in: Some(2),
                    messages_out: Some(2)
                }
            );
            assert_eq!(view.counts(false).await.messages_in, None);
            let inbound = view.latest_inbound(10).await.unwrap();
            let summary: Vec<(i64, &str, &str)> = inbound
                .iter()
                .map(|m| (m.seq, m.state.as_str(), m.sender.as_str()))
                .collect();
            assert_eq!(
                summary,
                vec![(4, "pending", "bob"), (2, "processed", "ann")]
            );
            assert!(inbound[1].content_json.contains("one"));
            assert_eq!(inbound[1].kind, "chat");
            let outbound = view.latest_outbound(1).await.unwrap();
            assert_eq!(outbound.len(), 1, "the latest only");
            assert_eq!(
                (outbound[0].seq, outbound[0].state.as_str()),
                (written[1], "pending")
            );
            let outbound = view.latest_outbound(10).await.unwrap();
            assert_eq!(outbound[1].state, "delivered");
            assert_eq!(outbound[1].direction, "out");
            // Neither file can be written through a view.
            for write in ["DELETE FROM main.messages_in", "DELETE FROM out.processing"] {
                assert!(sqlx::query(write).execute(&mut view.conn).await.is_err());
            }
            view.close().await;
            agent.close().await;
            host.close().await;
        }
    }

    #[tokio::test]
    async fn long_content_is_replaced_and_a_hostile_file_is_contained() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path().join("s"));
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        host.enqueue(&chat_in("a", "hi", "")).await.unwrap();
        let agent = AgentMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        agent.send_now(&chat_out("short")).await.unwrap();
        agent.close().await;
        // The agent writes what it likes: a huge row, a kind that is no kind, a created_at
        // that is no number.
        let mut raw = SqliteConnectOptions::new()
            .filename(paths.outbound_db())
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO messages_out (seq, created_at, kind, destination, content)
             VALUES (101, 'soon', $1, '{}', $2)",
        )
        .bind("k".repeat(1000))
        .bind(format!("\"{}\"", "x".repeat(MAX_CONTENT_BYTES + 1)))
        .execute(&mut raw)
        .await
        .unwrap();
        raw.close().await.unwrap();
        let mut view = MailboxView::open(&paths).await.unwrap().unwrap();
        let out = view.latest_outbound(10).await.unwrap();
        assert_eq!(out.len(), 2);
        let big: serde_json::Value = serde_json::from_str(&out[0].content_json).unwrap();
        assert_eq!(big["too_long"], true);
        assert_eq!(big["bytes"], MAX_CONTENT_BYTES as i64 + 3);
        assert_eq!(out[0].kind.len(), MAX_KIND_CHARS as usize);
        assert_eq!(out[0].created_at_ms, 0);
        assert!(out[1].content_json.contains("short"));
        view.close().await;

        // A view where a table belongs: refused, while inbound still counts.
        let mut raw = SqliteConnectOptions::new()
            .filename(paths.outbound_db())
            .connect()
            .await
            .unwrap();
        sqlx::query("DROP TABLE messages_out")
            .execute(&mut raw)
            .await
            .unwrap();
        sqlx::query(
            "CREATE VIEW messages_out AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n)
             SELECT x AS seq, 0 AS created_at, 'chat' AS kind, '{}' AS content FROM n",
        )
        .execute(&mut raw)
        .await
        .unwrap();
        raw.close().await.unwrap();
        let mut view = MailboxView::open(&paths).await.unwrap().unwrap();
        assert_eq!(
            view.counts(true).await,
            Counts {
                pending: Some(1),
                messages_in: Some(1),
                messages_out: None
            }
        );
        assert!(view.latest_outbound(10).await.is_err());
        assert_eq!(view.latest_inbound(10).await.unwrap()[0].state, "pending");
        view.close().await;
        host.close().await;
    }

    /// The agent jams its file (a FIFO as its journal) and the mailbox's read of it is
    /// stuck: a view does not try that file, so it answers instead of waiting for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_file_the_mailbox_found_stuck_is_not_attached() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path().join("s"));
        let host = HostMailbox::open(paths.clone(), JournalMode::Delete)
            .await
            .unwrap();
        host.enqueue(&chat_in("a", "hi", "")).await.unwrap();
        let agent = AgentMailbox::open(paths.clone(), JournalMode::Delete)
            .await
            .unwrap();
        agent.send_now(&chat_out("hello")).await.unwrap();
        let fifo = paths.out_dir().join("outbound.db-journal");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(!HostMailbox::agent_file_stuck(&paths));
        let stuck = host.unsettled_after(0, usize::MAX).await;
        assert!(
            matches!(stuck, Err(ferroclaw_mailbox::Error::Stuck { .. })),
            "{stuck:?}"
        );
        assert!(HostMailbox::agent_file_stuck(&paths));
        let mut view = tokio::time::timeout(Duration::from_secs(5), MailboxView::open(&paths))
            .await
            .expect("the view answers")
            .unwrap()
            .unwrap();
        assert_eq!(view.counts(true).await.messages_in, Some(1));
        assert_eq!(view.counts(true).await.messages_out, None);
        view.close().await;
        // Let the stuck read go (a writer opens the FIFO) before the test ends.
        drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
        std::fs::remove_file(&fifo).unwrap();
        agent.close().await;
    }

    #[tokio::test]
    async fn a_link_in_place_of_outbound_db_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path().join("s"));
        let other = SessionPaths::new(dir.path().join("other"));
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        host.enqueue(&chat_in("a", "hi", "")).await.unwrap();
        let _other_host = HostMailbox::open(other.clone(), JournalMode::Wal)
            .await
            .unwrap();
        let agent = AgentMailbox::open(other.clone(), JournalMode::Wal)
            .await
            .unwrap();
        agent.send_now(&chat_out("not yours")).await.unwrap();
        agent.close().await;
        std::os::unix::fs::symlink(other.outbound_db(), paths.outbound_db()).unwrap();
        let mut view = MailboxView::open(&paths).await.unwrap().unwrap();
        assert_eq!(view.counts(true).await.messages_out, None);
        assert!(view.latest_outbound(10).await.is_err());
        view.close().await;
        host.close().await;
    }
}
