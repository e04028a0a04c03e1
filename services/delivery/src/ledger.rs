//! Delivery's own database: the ledger of every outbound row it has seen (keyed by session
//! and out seq, so a row is sent at most once) and the messages of API conversations.

use std::path::Path;
use std::time::Duration;

use ferroclaw_proto::v1::OutboundMessage;
use sqlx::{Row, SqlitePool};
use tokio::sync::broadcast;

use crate::error::Result;

const DDL: &str = "
CREATE TABLE IF NOT EXISTS ledger (
    session_id          TEXT NOT NULL,
    out_seq             INTEGER NOT NULL,
    state               TEXT NOT NULL,      -- pending | delivered | failed
    attempts            INTEGER NOT NULL,
    kind                TEXT NOT NULL,
    destination         TEXT NOT NULL,
    platform_message_id TEXT,
    detail              TEXT,
    updated_at          INTEGER NOT NULL,
    PRIMARY KEY (session_id, out_seq)
);
CREATE TABLE IF NOT EXISTS conversation_messages (
    cursor       INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    out_seq      INTEGER NOT NULL,
    in_reply_to  INTEGER,
    kind         TEXT NOT NULL,
    text         TEXT NOT NULL,
    content      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (session_id, out_seq)
);
CREATE INDEX IF NOT EXISTS conversation_messages_by_conversation
    ON conversation_messages (conversation, cursor);
";

/// Final state of a ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Delivered { platform_message_id: String },
    Failed { detail: String },
}

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub session_id: String,
    pub out_seq: i64,
    pub state: String,
    pub attempts: i64,
    pub destination: String,
    pub platform_message_id: Option<String>,
    pub detail: Option<String>,
    pub updated_at: i64,
}

/// A message of an API conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationMessage {
    pub cursor: i64,
    pub conversation: String,
    pub session_id: String,
    pub out_seq: i64,
    pub in_reply_to: Option<i64>,
    pub kind: String,
    pub text: String,
    pub content: String,
    pub created_at: i64,
}

/// What to store for an API conversation.
pub struct NewConversationMessage<'a> {
    pub conversation: &'a str,
    pub in_reply_to: Option<i64>,
    pub kind: &'a str,
    pub text: &'a str,
    pub content: &'a str,
}

#[derive(Clone)]
pub struct Ledger {
    pool: SqlitePool,
    /// The conversation of every stored message: wakes that conversation's long-polls only.
    appended: broadcast::Sender<String>,
}

impl Ledger {
    pub async fn open(path: &Path) -> Result<Self> {
        let pool = ferroclaw_common::service_db::open(path, 4, DDL).await?;
        Ok(Self {
            pool,
            appended: broadcast::channel(1024).0,
        })
    }

    /// The final outcome of a row already handled, if any.
    pub async fn outcome(&self, session_id: &str, out_seq: i64) -> Result<Option<Settled>> {
        let row: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT state, platform_message_id, detail FROM ledger
             WHERE session_id = $1 AND out_seq = $2",
        )
        .bind(session_id)
        .bind(out_seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((state, pmid, _)) if state == "delivered" => Some(Settled::Delivered {
                platform_message_id: pmid.unwrap_or_default(),
            }),
            Some((state, _, detail)) if state == "failed" => Some(Settled::Failed {
                detail: detail.unwrap_or_default(),
            }),
            _ => None,
        })
    }

    /// Records an attempt at a row (creating its entry); returns the attempt number.
    pub async fn attempt(
        &self,
        session_id: &str,
        out_seq: i64,
        kind: &str,
        destination: &str,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO ledger (session_id, out_seq, state, attempts, kind, destination, updated_at)
             VALUES ($1, $2, 'pending', 1, $3, $4, $5)
             ON CONFLICT (session_id, out_seq) DO UPDATE
               SET attempts = ledger.attempts + 1, updated_at = $5
             RETURNING attempts",
        )
        .bind(session_id)
        .bind(out_seq)
        .bind(kind)
        .bind(destination)
        .bind(ferroclaw_mailbox::now_ms())
        .fetch_one(&self.pool)
        .await?)
    }

    /// Stores an API-conversation message and marks the row delivered in ONE transaction,
    /// so a crash cannot leave a stored message that the ledger calls undelivered.
    pub async fn deliver_to_conversation(
        &self,
        row: &OutboundMessage,
        message: NewConversationMessage<'_>,
    ) -> Result<String> {
        let now = ferroclaw_mailbox::now_ms();
        let mut tx = self.pool.begin().await?;
        let cursor: i64 = sqlx::query_scalar(
            "INSERT INTO conversation_messages
               (conversation, session_id, out_seq, in_reply_to, kind, text, content, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (session_id, out_seq) DO UPDATE SET conversation = conversation
             RETURNING cursor",
        )
        .bind(message.conversation)
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(message.in_reply_to)
        .bind(message.kind)
        .bind(message.text)
        .bind(message.content)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let platform_message_id = format!("conversation:{}:{cursor}", message.conversation);
        sqlx::query(
            "INSERT INTO ledger (session_id, out_seq, state, attempts, kind, destination,
                platform_message_id, updated_at)
             VALUES ($1, $2, 'delivered', 1, $3, $4, $5, $6)
             ON CONFLICT (session_id, out_seq) DO UPDATE
               SET state = 'delivered', attempts = ledger.attempts + 1,
                   platform_message_id = $5, updated_at = $6",
        )
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(&row.kind)
        .bind(&row.destination_json)
        .bind(&platform_message_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let _ = self.appended.send(message.conversation.to_string());
        Ok(platform_message_id)
    }

    /// Marks a row failed for good.
    pub async fn fail(&self, row: &OutboundMessage, detail: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger (session_id, out_seq, state, attempts, kind, destination, detail,
                updated_at)
             VALUES ($1, $2, 'failed', 1, $3, $4, $5, $6)
             ON CONFLICT (session_id, out_seq) DO UPDATE
               SET state = 'failed', detail = $5, updated_at = $6",
        )
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(&row.kind)
        .bind(&row.destination_json)
        .bind(detail)
        .bind(ferroclaw_mailbox::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Messages of `conversation` after `after`, oldest first.
    pub async fn conversation_messages(
        &self,
        conversation: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ConversationMessage>> {
        let rows = sqlx::query(
            "SELECT cursor, conversation, session_id, out_seq, in_reply_to, kind, text, content, created_at
             FROM conversation_messages WHERE conversation = $1 AND cursor > $2
             ORDER BY cursor LIMIT $3",
        )
        .bind(conversation)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ConversationMessage {
                    cursor: r.try_get("cursor")?,
                    conversation: r.try_get("conversation")?,
                    session_id: r.try_get("session_id")?,
                    out_seq: r.try_get("out_seq")?,
                    in_reply_to: r.try_get("in_reply_to")?,
                    kind: r.try_get("kind")?,
                    text: r.try_get("text")?,
                    content: r.try_get("content")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Like [`Self::conversation_messages`], but waits up to `wait` for a first message.
    pub async fn wait_conversation_messages(
        &self,
        conversation: &str,
        after: i64,
        limit: u32,
        wait: Duration,
    ) -> Result<Vec<ConversationMessage>> {
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribe before the first query, so an append between the two still wakes us.
        let mut appended = self.appended.subscribe();
        loop {
            let messages = self
                .conversation_messages(conversation, after, limit)
                .await?;
            if !messages.is_empty() {
                return Ok(messages);
            }
            // Appends to other conversations wake no query.
            loop {
                match tokio::time::timeout_at(deadline, appended.recv()).await {
                    Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(messages),
                    Ok(Ok(c)) if c != conversation => continue,
                    Ok(_) => break,
                }
            }
        }
    }

    pub async fn list(&self, limit: u32) -> Result<Vec<Entry>> {
        let rows = sqlx::query(
            "SELECT session_id, out_seq, state, attempts, destination, platform_message_id, detail, updated_at
             FROM ledger ORDER BY updated_at DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Entry {
                    session_id: r.try_get("session_id")?,
                    out_seq: r.try_get("out_seq")?,
                    state: r.try_get("state")?,
                    attempts: r.try_get("attempts")?,
                    destination: r.try_get("destination")?,
                    platform_message_id: r.try_get("platform_message_id")?,
                    detail: r.try_get("detail")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64) -> OutboundMessage {
        OutboundMessage {
            session_id: "s".into(),
            seq,
            kind: "chat".into(),
            destination_json: "{}".into(),
            ..Default::default()
        }
    }

    fn msg<'a>(conversation: &'a str, text: &'a str) -> NewConversationMessage<'a> {
        NewConversationMessage {
            conversation,
            in_reply_to: Some(2),
            kind: "chat",
            text,
            content: "{}",
        }
    }

    #[tokio::test]
    async fn a_row_is_stored_once_and_long_poll_wakes() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("delivery.db")).await.unwrap();
        assert_eq!(ledger.attempt("s", 1, "chat", "{}").await.unwrap(), 1);
        assert_eq!(ledger.attempt("s", 1, "chat", "{}").await.unwrap(), 2);
        let waiter = {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                ledger
                    .wait_conversation_messages("c", 0, 10, Duration::from_secs(10))
                    .await
                    .unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = ledger
            .deliver_to_conversation(&row(1), msg("c", "hi"))
            .await
            .unwrap();
        let again = ledger
            .deliver_to_conversation(&row(1), msg("c", "hi"))
            .await
            .unwrap();
        assert_eq!(first, again);
        let got = waiter.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text, "hi");
        assert_eq!(
            ledger
                .conversation_messages("c", 0, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(matches!(
            ledger.outcome("s", 1).await.unwrap(),
            Some(Settled::Delivered { .. })
        ));
        let none = ledger
            .wait_conversation_messages("c", got[0].cursor, 10, Duration::from_millis(50))
            .await
            .unwrap();
        assert!(none.is_empty());
    }
}
