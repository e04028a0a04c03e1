//! Delivery's own database: the ledger of every outbound row it has seen (keyed by session
//! and out seq, so a row is sent at most once) and the messages of API conversations.

use std::sync::Arc;
use std::time::Duration;

use ferroclaw_common::service_db::{Engine, LegacyColumn, Location, Schema, Step};
use ferroclaw_proto::v1::OutboundMessage;
use sqlx::{AnyPool, Row};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// The ledger's migrations (services/delivery/migrations/<engine>/).
static SCHEMA: Schema = Schema {
    service: "delivery",
    sqlite: &[
        Step::new(
            1,
            "init",
            include_str!("../migrations/sqlite/0001_init.sql"),
        ),
        Step::new(
            2,
            "lane leases",
            include_str!("../migrations/sqlite/0002_lane_leases.sql"),
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
            "lane leases",
            include_str!("../migrations/postgres/0002_lane_leases.sql"),
        ),
    ],
    // Files from before questions had an agent, and before rate-limit waits and retries.
    sqlite_legacy_columns: &[
        LegacyColumn {
            table: "questions",
            column: "agent",
            add: "ALTER TABLE questions ADD COLUMN agent TEXT",
        },
        LegacyColumn {
            table: "ledger",
            column: "reason",
            add: "ALTER TABLE ledger ADD COLUMN reason TEXT",
        },
        LegacyColumn {
            table: "ledger",
            column: "waits",
            add: "ALTER TABLE ledger ADD COLUMN waits INTEGER NOT NULL DEFAULT 0",
        },
        LegacyColumn {
            table: "ledger",
            column: "waiting_until",
            add: "ALTER TABLE ledger ADD COLUMN waiting_until INTEGER",
        },
        // Rows failed before retries existed are not retryable: why they failed is not
        // known.
        LegacyColumn {
            table: "ledger",
            column: "retryable",
            add: "ALTER TABLE ledger ADD COLUMN retryable INTEGER NOT NULL DEFAULT 0",
        },
        LegacyColumn {
            table: "ledger",
            column: "retried_at",
            add: "ALTER TABLE ledger ADD COLUMN retried_at INTEGER",
        },
    ],
};

/// A Discord question's `conversation`: the channel, marked so answers go back there.
pub const DISCORD_PREFIX: &str = "discord:";

/// A question an agent asked in an API conversation.
#[derive(Debug, Clone)]
pub struct NewQuestion {
    pub question_id: String,
    pub options_json: String,
    pub expires_at: i64,
}

/// Why an answer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerRefused {
    #[error("no question {0:?}")]
    Unknown(String),
    #[error("already answered ({option} by {by})")]
    Answered { option: String, by: String },
    #[error("the question expired")]
    Expired,
    #[error("{0:?} is not one of the options")]
    NoSuchOption(String),
    #[error("only admins may answer this question, and {0:?} is not one")]
    NotAllowed(String),
}

/// A claimed answer: what the agent is to be told, and where replies go.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub session_id: String,
    pub conversation: String,
    pub label: String,
    /// The option's id (an answer may name it by index, `#n`).
    pub option: String,
}

impl Claimed {
    /// Where the agent's replies to the answer go: the question's channel or conversation.
    pub fn reply_to(&self) -> ferroclaw_content::Destination {
        match self.conversation.strip_prefix(DISCORD_PREFIX) {
            Some(channel) => ferroclaw_content::Destination::Discord {
                channel_id: channel.to_string(),
            },
            None => ferroclaw_content::Destination::Api {
                conversation: self.conversation.clone(),
            },
        }
    }
}

/// Final state of a ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Delivered {
        platform_message_id: String,
    },
    Failed {
        detail: String,
        /// The failure in one plain sentence, for the agent and the user.
        reason: String,
    },
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
    pub reason: Option<String>,
    pub waits: i64,
    /// Set while the row waits out a rate limit.
    pub waiting_until: Option<i64>,
    /// A failed row whose failure was transient: it may be sent again.
    pub retryable: bool,
    /// When an operator last sent it again.
    pub retried_at: Option<i64>,
}

/// What the ledger knows of a row before it is (re)sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowState {
    /// Its final outcome, once it has one.
    pub settled: Option<Settled>,
    /// When an operator last sent it again: its maximum age counts from then.
    pub retried_at: Option<i64>,
}

/// Why a row cannot be sent again, in a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryRefused {
    #[error("delivery has no record of message {1} of session {0}")]
    Unknown(String, i64),
    #[error("message {1} of session {0} was delivered; there is nothing to send again")]
    Delivered(String, i64),
    #[error("message {1} of session {0} is still being delivered")]
    Pending(String, i64),
    #[error(
        "message {1} of session {0} was refused by the destination; sending it again would \
         fail the same way"
    )]
    Refused(String, i64),
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

/// A message was stored in an API conversation: a doorbell for that conversation's readers
/// (long-polls, watchers), who then read the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub conversation: Arc<str>,
    pub cursor: i64,
}

/// Notifications a slow reader may fall behind by before it lags (and re-reads the store).
const APPENDED_CAPACITY: usize = 1024;

#[derive(Clone)]
pub struct Ledger {
    pool: AnyPool,
    engine: Engine,
    /// Every stored conversation message, sent after its commit (by this delivery, and on
    /// PostgreSQL by its peers too: see `peer_appends`).
    appended: broadcast::Sender<Appended>,
    /// Stops listening for peers' doorbells.
    listening: CancellationToken,
}

impl Ledger {
    /// Opens the ledger at `at` (a SQLite file by default, or PostgreSQL).
    pub async fn open(at: impl Into<Location>) -> Result<Self> {
        let at = at.into();
        let db = ferroclaw_common::service_db::open(&at, 4, &SCHEMA).await?;
        let ledger = Self {
            pool: db.pool,
            engine: db.engine,
            appended: broadcast::channel(APPENDED_CAPACITY).0,
            listening: CancellationToken::new(),
        };
        if let Location::Postgres(url) = &at {
            tokio::spawn(crate::peer_appends::listen(
                url.clone(),
                ledger.appended.clone(),
                ledger.listening.clone(),
            ));
        }
        Ok(ledger)
    }

    /// Whether other deliveries may share this ledger (PostgreSQL), so that lanes are
    /// taken with leases.
    pub fn shared(&self) -> bool {
        self.engine == Engine::Postgres
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Notifications of conversation messages stored from now on. Subscribe BEFORE reading
    /// the store, so a message stored in between is announced rather than missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Appended> {
        self.appended.subscribe()
    }

    /// The same ledger with room for only `capacity` notifications, so tests can make a
    /// reader lag.
    #[cfg(test)]
    pub(crate) fn with_appended_capacity(mut self, capacity: usize) -> Self {
        self.appended = broadcast::channel(capacity).0;
        self
    }

    /// The final outcome of a row already handled, if any.
    pub async fn outcome(&self, session_id: &str, out_seq: i64) -> Result<Option<Settled>> {
        Ok(self.row_state(session_id, out_seq).await?.settled)
    }

    /// The row's final outcome, if any (a row marked for retry has none), and when it was
    /// last retried.
    pub async fn row_state(&self, session_id: &str, out_seq: i64) -> Result<RowState> {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT state, platform_message_id, detail, reason, retried_at FROM ledger
             WHERE session_id = $1 AND out_seq = $2",
        )
        .bind(session_id)
        .bind(out_seq)
        .fetch_optional(&self.pool)
        .await?;
        let Some((state, pmid, detail, reason, retried_at)) = row else {
            return Ok(RowState::default());
        };
        let settled = match state.as_str() {
            "delivered" => Some(Settled::Delivered {
                platform_message_id: pmid.unwrap_or_default(),
            }),
            "failed" => {
                let detail = detail.unwrap_or_default();
                Some(Settled::Failed {
                    // Rows failed before reasons were kept say what they said then.
                    reason: reason.unwrap_or_else(|| detail.clone()),
                    detail,
                })
            }
            _ => None,
        };
        Ok(RowState {
            settled,
            retried_at,
        })
    }

    /// Marks a failed row for sending again: `pending` (so [`Self::outcome`] has none and
    /// the row goes out when it comes back), attempts kept, `retried_at` = `now`. Only a
    /// row whose failure was transient. A row already marked and not settled since (its
    /// retry was cut short before the runner reopened it) is marked again with `now`.
    pub async fn mark_for_retry(
        &self,
        session_id: &str,
        out_seq: i64,
        now: i64,
    ) -> Result<std::result::Result<(), RetryRefused>> {
        let marked = sqlx::query(
            "UPDATE ledger SET state = 'pending', retried_at = $3, waiting_until = NULL,
                updated_at = $3
             WHERE session_id = $1 AND out_seq = $2
               AND ((state = 'failed' AND retryable = 1)
                    OR (state = 'pending' AND retried_at IS NOT NULL))",
        )
        .bind(session_id)
        .bind(out_seq)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if marked.rows_affected() == 1 {
            return Ok(Ok(()));
        }
        // Nothing else changes the entry while its retry holds the row, so what refused
        // the mark still does.
        let refused = self.retry_refusal(session_id, out_seq).await?;
        Ok(Err(refused.unwrap_or_else(|| {
            RetryRefused::Pending(session_id.to_string(), out_seq)
        })))
    }

    /// Why the row may not be marked for retry; `None` when it may (failed after transient
    /// errors, or marked before and not settled since).
    pub async fn retry_refusal(
        &self,
        session_id: &str,
        out_seq: i64,
    ) -> Result<Option<RetryRefused>> {
        let found: Option<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT state, retryable, retried_at FROM ledger WHERE session_id = $1 AND out_seq = $2",
        )
        .bind(session_id)
        .bind(out_seq)
        .fetch_optional(&self.pool)
        .await?;
        let (session, seq) = (session_id.to_string(), out_seq);
        let found = found.map(|(state, retryable, retried_at)| (state, retryable != 0, retried_at));
        Ok(match found {
            None => Some(RetryRefused::Unknown(session, seq)),
            Some((state, _, _)) if state == "delivered" => {
                Some(RetryRefused::Delivered(session, seq))
            }
            Some((state, false, _)) if state == "failed" => {
                Some(RetryRefused::Refused(session, seq))
            }
            Some((state, true, _)) if state == "failed" => None,
            Some((_, _, Some(_))) => None,
            Some(_) => Some(RetryRefused::Pending(session, seq)),
        })
    }

    /// Undoes [`Self::mark_for_retry`] of `retried_at` when the row cannot be sent again
    /// after all (the runner no longer has it): failed, as before.
    pub async fn unmark_retry(
        &self,
        session_id: &str,
        out_seq: i64,
        retried_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE ledger SET state = 'failed', updated_at = $4
             WHERE session_id = $1 AND out_seq = $2 AND state = 'pending' AND retried_at = $3",
        )
        .bind(session_id)
        .bind(out_seq)
        .bind(retried_at)
        .bind(ferroclaw_content::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
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
               SET attempts = ledger.attempts + 1, waiting_until = NULL, updated_at = $5
             RETURNING attempts",
        )
        .bind(session_id)
        .bind(out_seq)
        .bind(kind)
        .bind(destination)
        .bind(ferroclaw_content::now_ms())
        .fetch_one(&self.pool)
        .await?)
    }

    /// Records a question posted to a Discord channel (before it is posted: a retried post
    /// finds it there).
    pub async fn record_discord_question(
        &self,
        row: &OutboundMessage,
        channel_id: &str,
        question: &NewQuestion,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO questions (question_id, session_id, out_seq, conversation, options,
                expires_at, agent)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (question_id) DO NOTHING",
        )
        .bind(&question.question_id)
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(format!("{DISCORD_PREFIX}{channel_id}"))
        .bind(&question.options_json)
        .bind(question.expires_at)
        .bind(&row.agent)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores an API-conversation message and marks the row delivered in ONE transaction,
    /// so a crash cannot leave a stored message that the ledger calls undelivered.
    pub async fn deliver_to_conversation(
        &self,
        row: &OutboundMessage,
        message: NewConversationMessage<'_>,
        question: Option<&NewQuestion>,
    ) -> Result<String> {
        let now = ferroclaw_content::now_ms();
        let mut tx = self.pool.begin().await?;
        if let Some(q) = question {
            sqlx::query(
                "INSERT INTO questions (question_id, session_id, out_seq, conversation, options, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (question_id) DO NOTHING",
            )
            .bind(&q.question_id)
            .bind(&row.session_id)
            .bind(row.seq)
            .bind(message.conversation)
            .bind(&q.options_json)
            .bind(q.expires_at)
            .execute(&mut *tx)
            .await?;
        }
        let cursor: i64 = sqlx::query_scalar(
            "INSERT INTO conversation_messages
               (conversation, session_id, out_seq, in_reply_to, kind, text, content, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (session_id, out_seq)
               DO UPDATE SET conversation = conversation_messages.conversation
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
                   platform_message_id = $5, retryable = 0, updated_at = $6",
        )
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(&row.kind)
        .bind(&row.destination_json)
        .bind(&platform_message_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let doorbell = crate::peer_appends::payload(message.conversation, cursor);
        // PostgreSQL refuses payloads of 8,000 bytes and more; such a conversation's
        // readers on peers are woken by their deadline instead.
        if self.engine == Engine::Postgres && doorbell.len() < crate::peer_appends::MAX_PAYLOAD {
            // Rung at commit, to the readers of every delivery sharing the database.
            // (Wrapped: the `any` driver cannot read pg_notify's `void` result.)
            sqlx::query("SELECT count(*) FROM (SELECT pg_notify($1, $2)) AS rung")
                .bind(crate::peer_appends::CHANNEL)
                .bind(&doorbell)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // After the commit: whoever is woken finds the message in the store.
        let _ = self.appended.send(Appended {
            conversation: message.conversation.into(),
            cursor,
        });
        Ok(platform_message_id)
    }

    /// Claims the answer to a question: the first valid answer before expiry wins.
    pub async fn claim_answer(
        &self,
        question_id: &str,
        option: &str,
        user: &str,
        now: i64,
        may_answer: &(dyn Fn(&str, Option<&str>) -> bool + Sync),
    ) -> Result<std::result::Result<Claimed, AnswerRefused>> {
        let row = sqlx::query(
            "SELECT session_id, conversation, options, expires_at, answer, answered_by, agent
             FROM questions WHERE question_id = $1",
        )
        .bind(question_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Err(AnswerRefused::Unknown(question_id.into())));
        };
        let session_id: String = row.try_get("session_id")?;
        let conversation: String = row.try_get("conversation")?;
        let options: String = row.try_get("options")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        let answer: Option<String> = row.try_get("answer")?;
        let by: Option<String> = row.try_get("answered_by")?;
        let agent: Option<String> = row.try_get("agent")?;
        if let Some(answer) = answer {
            let by = by.unwrap_or_default();
            return Ok(Err(AnswerRefused::Answered {
                option: answer,
                // On Discord a person is named by a mention, which shows their name.
                by: if conversation.starts_with(DISCORD_PREFIX) {
                    format!("<@{by}>")
                } else {
                    by
                },
            }));
        }
        if now > expires_at {
            return Ok(Err(AnswerRefused::Expired));
        }
        if !may_answer(&conversation, agent.as_deref()) {
            return Ok(Err(AnswerRefused::NotAllowed(user.into())));
        }
        let options: Vec<ferroclaw_content::CardOption> =
            serde_json::from_str(&options).unwrap_or_default();
        // `#n` names the n-th option (Discord buttons carry the index).
        let by_index = option
            .strip_prefix('#')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| options.get(n));
        let Some(chosen) = by_index.or_else(|| options.iter().find(|o| o.id == option)) else {
            return Ok(Err(AnswerRefused::NoSuchOption(option.into())));
        };
        let label = chosen.label.clone();
        let option = chosen.id.as_str();
        let taken = sqlx::query(
            "UPDATE questions SET answer = $2, answered_by = $3, answered_at = $4
             WHERE question_id = $1 AND answer IS NULL",
        )
        .bind(question_id)
        .bind(option)
        .bind(user)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 0 {
            // Another answer won the race just now.
            return Box::pin(self.claim_answer(question_id, option, user, now, may_answer)).await;
        }
        Ok(Ok(Claimed {
            session_id,
            conversation,
            label,
            option: option.to_string(),
        }))
    }

    /// Gives a claimed answer back (the agent could not be told): it can be answered again.
    pub async fn release_answer(&self, question_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE questions SET answer = NULL, answered_by = NULL, answered_at = NULL
             WHERE question_id = $1",
        )
        .bind(question_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a row failed: `detail` for operators, `reason` in a plain sentence.
    /// `retryable`: the failure was transient (given up after server errors or rate
    /// limits), so an operator may send it again; a refusal is not.
    pub async fn fail(
        &self,
        row: &OutboundMessage,
        detail: &str,
        reason: &str,
        retryable: bool,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger (session_id, out_seq, state, attempts, kind, destination, detail,
                reason, updated_at, retryable)
             VALUES ($1, $2, 'failed', 1, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (session_id, out_seq) DO UPDATE
               SET state = 'failed', detail = $5, reason = $6, waiting_until = NULL,
                   updated_at = $7, retryable = $8",
        )
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(&row.kind)
        .bind(&row.destination_json)
        .bind(detail)
        .bind(reason)
        .bind(ferroclaw_content::now_ms())
        .bind(i64::from(retryable))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a row delivered (a Discord post, a callback, an action), so a resend of it
    /// is answered from here.
    pub async fn delivered(&self, row: &OutboundMessage, platform_message_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger (session_id, out_seq, state, attempts, kind, destination,
                platform_message_id, updated_at)
             VALUES ($1, $2, 'delivered', 1, $3, $4, $5, $6)
             ON CONFLICT (session_id, out_seq) DO UPDATE
               SET state = 'delivered', platform_message_id = $5, waiting_until = NULL,
                   retryable = 0, updated_at = $6",
        )
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(&row.kind)
        .bind(&row.destination_json)
        .bind(platform_message_id)
        .bind(ferroclaw_content::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that the row's last try was a rate limit: a wait until `until_ms`, which
    /// does not count as an attempt.
    pub async fn waiting(&self, row: &OutboundMessage, until_ms: i64, detail: &str) -> Result<()> {
        sqlx::query(
            "UPDATE ledger SET attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                waits = waits + 1,
                waiting_until = $3, detail = $4, updated_at = $5
             WHERE session_id = $1 AND out_seq = $2 AND state = 'pending'",
        )
        .bind(&row.session_id)
        .bind(row.seq)
        .bind(until_ms)
        .bind(detail)
        .bind(ferroclaw_content::now_ms())
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
                    Ok(Ok(a)) if &*a.conversation != conversation => continue,
                    Ok(_) => break,
                }
            }
        }
    }

    pub async fn list(&self, limit: u32) -> Result<Vec<Entry>> {
        let rows = sqlx::query(
            "SELECT session_id, out_seq, state, attempts, destination, platform_message_id, detail,
                updated_at, reason, waits, waiting_until,
                CASE WHEN state = 'failed' AND retryable = 1 THEN 1 ELSE 0 END AS retryable,
                retried_at
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
                    reason: r.try_get("reason")?,
                    waits: r.try_get("waits")?,
                    waiting_until: r.try_get("waiting_until")?,
                    retryable: r.try_get::<i64, _>("retryable")? != 0,
                    retried_at: r.try_get("retried_at")?,
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.listening.cancel();
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh ledger on each engine: SQLite, and PostgreSQL when available.
    async fn ledgers(dir: &std::path::Path) -> Vec<Ledger> {
        let mut ledgers = Vec::new();
        for at in ferroclaw_common::test_postgres::locations(dir, "delivery").await {
            ledgers.push(Ledger::open(&at).await.unwrap());
        }
        ledgers
    }

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
        for ledger in ledgers(dir.path()).await {
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
                .deliver_to_conversation(&row(1), msg("c", "hi"), None)
                .await
                .unwrap();
            let again = ledger
                .deliver_to_conversation(&row(1), msg("c", "hi"), None)
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
    /// Two deliveries on one PostgreSQL ledger: a long-poll waiting on one is woken by a
    /// message the other stores (PostgreSQL's NOTIFY), not only when its wait ends.
    #[tokio::test]
    async fn a_long_poll_is_woken_by_a_message_a_peer_delivery_stores() {
        let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
            return;
        };
        let url = postgres.create_database("peer_doorbell").await.unwrap();
        let here = Ledger::open(Location::Postgres(url.clone())).await.unwrap();
        let peer = Ledger::open(Location::Postgres(url)).await.unwrap();
        assert!(here.shared() && peer.shared());
        let waiter = {
            let here = here.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let got = here
                    .wait_conversation_messages("c", 0, 10, Duration::from_secs(20))
                    .await
                    .unwrap();
                (got, started.elapsed())
            })
        };
        // The listener connects in the background; a doorbell before it listens is missed
        // (the wait would then end only at its deadline), so give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        peer.deliver_to_conversation(&row(1), msg("c", "from the peer"), None)
            .await
            .unwrap();
        let (got, took) = waiter.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text, "from the peer");
        assert!(
            took < Duration::from_secs(10),
            "woken by the doorbell, not the deadline: {took:?}"
        );
        here.close().await;
        peer.close().await;
    }

    async fn entry(ledger: &Ledger, seq: i64) -> Entry {
        ledger
            .list(100)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.out_seq == seq)
            .unwrap()
    }

    #[tokio::test]
    async fn a_failure_records_whether_it_was_transient() {
        let dir = tempfile::tempdir().unwrap();
        for ledger in ledgers(dir.path()).await {
            ledger.attempt("s", 1, "chat", "{}").await.unwrap();
            ledger
                .fail(&row(1), "given up: 502", "Discord kept failing.", true)
                .await
                .unwrap();
            ledger.attempt("s", 3, "chat", "{}").await.unwrap();
            ledger
                .fail(&row(3), "403", "Discord refused it.", false)
                .await
                .unwrap();
            ledger.attempt("s", 5, "chat", "{}").await.unwrap();
            ledger.delivered(&row(5), "pm").await.unwrap();

            let given_up = entry(&ledger, 1).await;
            assert_eq!(
                (given_up.state.as_str(), given_up.retryable),
                ("failed", true)
            );
            assert_eq!(given_up.reason.as_deref(), Some("Discord kept failing."));
            assert!(
                !entry(&ledger, 3).await.retryable,
                "a refusal is not retryable"
            );
            assert!(!entry(&ledger, 5).await.retryable);
        }
    }

    #[tokio::test]
    async fn a_retry_makes_a_transient_failure_pending_again_once() {
        let dir = tempfile::tempdir().unwrap();
        for ledger in ledgers(dir.path()).await {
            ledger.attempt("s", 1, "chat", "{}").await.unwrap();
            ledger.attempt("s", 1, "chat", "{}").await.unwrap();
            ledger
                .fail(&row(1), "given up", "It kept failing.", true)
                .await
                .unwrap();
            assert!(ledger.outcome("s", 1).await.unwrap().is_some());

            assert_eq!(ledger.mark_for_retry("s", 1, 1_000).await.unwrap(), Ok(()));
            let state = ledger.row_state("s", 1).await.unwrap();
            assert_eq!(
                state.settled, None,
                "no outcome: the row goes out when it comes back"
            );
            assert_eq!(state.retried_at, Some(1_000));
            let marked = entry(&ledger, 1).await;
            assert_eq!(
                (marked.state.as_str(), marked.attempts),
                ("pending", 2),
                "attempts kept"
            );
            assert!(!marked.retryable, "a pending row is not retryable");

            // A retry cut short before the runner reopened the row may be done again; it
            // counts from the new time.
            assert_eq!(ledger.retry_refusal("s", 1).await.unwrap(), None);
            assert_eq!(ledger.mark_for_retry("s", 1, 2_000).await.unwrap(), Ok(()));
            assert_eq!(
                ledger.row_state("s", 1).await.unwrap().retried_at,
                Some(2_000)
            );

            // The runner could not take it back: failed again, as before.
            ledger.unmark_retry("s", 1, 1_000).await.unwrap();
            assert_eq!(entry(&ledger, 1).await.state, "pending", "not our mark");
            ledger.unmark_retry("s", 1, 2_000).await.unwrap();
            let failed = entry(&ledger, 1).await;
            assert_eq!((failed.state.as_str(), failed.retryable), ("failed", true));

            // Sent again and delivered: nothing more to retry.
            assert_eq!(ledger.mark_for_retry("s", 1, 3_000).await.unwrap(), Ok(()));
            assert_eq!(ledger.attempt("s", 1, "chat", "{}").await.unwrap(), 3);
            ledger.delivered(&row(1), "pm").await.unwrap();
            assert_eq!(
                ledger.mark_for_retry("s", 1, 4_000).await.unwrap(),
                Err(RetryRefused::Delivered("s".into(), 1))
            );
            assert!(matches!(
                ledger.outcome("s", 1).await.unwrap(),
                Some(Settled::Delivered { .. })
            ));
        }
    }

    #[tokio::test]
    async fn a_refused_pending_or_unknown_row_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        for ledger in ledgers(dir.path()).await {
            ledger.attempt("s", 1, "chat", "{}").await.unwrap();
            ledger
                .fail(&row(1), "403", "Discord refused it.", false)
                .await
                .unwrap();
            ledger.attempt("s", 3, "chat", "{}").await.unwrap();

            let refused = ledger.mark_for_retry("s", 1, 1_000).await.unwrap();
            assert_eq!(refused, Err(RetryRefused::Refused("s".into(), 1)));
            assert!(refused.unwrap_err().to_string().contains(
                "was refused by the destination; sending it again would fail the same way"
            ));
            assert_eq!(
                ledger.mark_for_retry("s", 3, 1_000).await.unwrap(),
                Err(RetryRefused::Pending("s".into(), 3)),
                "still being delivered for the first time"
            );
            assert_eq!(
                ledger.mark_for_retry("s", 9, 1_000).await.unwrap(),
                Err(RetryRefused::Unknown("s".into(), 9))
            );
            assert!(matches!(
                ledger.outcome("s", 1).await.unwrap(),
                Some(Settled::Failed { .. })
            ));
        }
    }

    #[tokio::test]
    async fn a_ledger_from_before_retries_gets_the_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.db");
        {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            // The first ledger's layout: no reasons, waits or retries.
            sqlx::query(
                "CREATE TABLE ledger (
                    session_id TEXT NOT NULL, out_seq INTEGER NOT NULL, state TEXT NOT NULL,
                    attempts INTEGER NOT NULL, kind TEXT NOT NULL, destination TEXT NOT NULL,
                    platform_message_id TEXT, detail TEXT, updated_at INTEGER NOT NULL,
                    PRIMARY KEY (session_id, out_seq))",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO ledger VALUES ('s', 1, 'failed', 3, 'chat', '{}', NULL, '502', 5)",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let ledger = Ledger::open(&path).await.unwrap();
        let old = entry(&ledger, 1).await;
        assert_eq!((old.state.as_str(), old.attempts), ("failed", 3));
        assert!(!old.retryable, "why an old row failed is not known");
        assert_eq!(old.retried_at, None);
        assert_eq!(
            ledger.mark_for_retry("s", 1, 1_000).await.unwrap(),
            Err(RetryRefused::Refused("s".into(), 1))
        );
        ledger.attempt("s", 3, "chat", "{}").await.unwrap();
        ledger
            .fail(&row(3), "given up", "It kept failing.", true)
            .await
            .unwrap();
        assert!(entry(&ledger, 3).await.retryable);
        assert_eq!(ledger.mark_for_retry("s", 3, 1_000).await.unwrap(), Ok(()));
        ledger.close().await;
        // Opening it again finds every column in place.
        let again = Ledger::open(&path).await.unwrap();
        assert_eq!(
            again.row_state("s", 3).await.unwrap().retried_at,
            Some(1_000)
        );
    }

    #[tokio::test]
    async fn a_rate_limit_wait_is_not_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        for ledger in ledgers(dir.path()).await {
            ledger.attempt("s", 1, "chat", "{}").await.unwrap();
            ledger.waiting(&row(1), 5_000, "429").await.unwrap();
            let waiting = entry(&ledger, 1).await;
            assert_eq!(
                (waiting.attempts, waiting.waits, waiting.waiting_until),
                (0, 1, Some(5_000))
            );
            assert_eq!(waiting.detail.as_deref(), Some("429"));
            // The next try is attempt 1 again, and no longer waiting.
            assert_eq!(ledger.attempt("s", 1, "chat", "{}").await.unwrap(), 1);
            assert_eq!(entry(&ledger, 1).await.waiting_until, None);
        }
    }

    #[tokio::test]
    async fn a_question_is_answered_once_and_may_be_given_back() {
        let dir = tempfile::tempdir().unwrap();
        for ledger in ledgers(dir.path()).await {
            let options = r#"[{"id":"yes","label":"Yes"},{"id":"no","label":"No"}]"#;
            let question = |id: &str| NewQuestion {
                question_id: id.into(),
                options_json: options.into(),
                expires_at: 10_000,
            };
            let mut asking = row(1);
            asking.agent = "main".into();
            ledger
                .record_discord_question(&asking, "chan", &question("q1"))
                .await
                .unwrap();
            ledger
                .deliver_to_conversation(&row(2), msg("c", "?"), Some(&question("q2")))
                .await
                .unwrap();
            let anyone = |_: &str, _: Option<&str>| true;
            let claimed = ledger
                .claim_answer("q1", "#1", "u1", 1_000, &anyone)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (claimed.label.as_str(), claimed.option.as_str()),
                ("No", "no")
            );
            assert_eq!(
                claimed.reply_to(),
                ferroclaw_content::Destination::Discord {
                    channel_id: "chan".into()
                }
            );
            assert_eq!(
                ledger
                    .claim_answer("q1", "yes", "u2", 1_000, &anyone)
                    .await
                    .unwrap()
                    .unwrap_err(),
                AnswerRefused::Answered {
                    option: "no".into(),
                    by: "<@u1>".into()
                }
            );
            ledger.release_answer("q1").await.unwrap();
            let again = ledger.claim_answer("q1", "yes", "u2", 1_000, &anyone).await;
            assert_eq!(again.unwrap().unwrap().option, "yes");

            let claim = |id: &'static str, option: &'static str, now| {
                let ledger = ledger.clone();
                async move {
                    ledger
                        .claim_answer(id, option, "u", now, &|c: &str, agent: Option<&str>| {
                            c == "c" && agent.is_none()
                        })
                        .await
                        .unwrap()
                }
            };
            assert_eq!(claim("q2", "maybe", 1).await.unwrap_err(), {
                AnswerRefused::NoSuchOption("maybe".into())
            });
            assert_eq!(claim("q2", "yes", 20_000).await.unwrap_err(), {
                AnswerRefused::Expired
            });
            assert_eq!(claim("q9", "yes", 1).await.unwrap_err(), {
                AnswerRefused::Unknown("q9".into())
            });
            assert_eq!(claim("q2", "yes", 1).await.unwrap().conversation, "c");
        }
    }

    #[tokio::test]
    async fn a_fresh_ledger_gets_every_migration_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "delivery").await {
            let ledger = Ledger::open(&at).await.unwrap();
            ferroclaw_common::test_postgres::check_migrations_then_add_a_future_one(
                &ledger.pool,
                &SCHEMA,
                &at,
            )
            .await;
            ledger.close().await;
            let Err(err) = Ledger::open(&at).await else {
                panic!("{at:?}: a database newer than the binary was opened");
            };
            let message = err.to_string();
            assert!(
                message.contains("delivery database") && message.contains("[9999]"),
                "{message}"
            );
        }
    }
}
