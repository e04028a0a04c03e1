//! What a session may send, decided by the host for every outbound row before it enters
//! the outbound stream. The agent's own checks (`send_to` in its tools) are a convenience:
//! an agent a prompt injection took over writes `outbound.db` itself, so the row's
//! destination, size and rate are attacker input here.
//!
//! A session may send to:
//! - every destination the host named as `reply_to` of one of its inbound rows: its own API
//!   conversation, Discord channel, thread or DM, the reply target of the webhook source that
//!   started it, the conversation a scheduled task of its answers in;
//! - the API conversations in its agent's `send_to`;
//! - the Discord channels routed to its agent.
//!
//! Limits: a row's content and destination at most `runner.max_row_bytes`; at most
//! `runner.max_rows_per_batch` rows answering one inbound message; at most
//! `runner.max_rows_per_minute` rows per session in any minute of the runner's clock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferroclaw_common::Config;
use ferroclaw_mailbox::{Destination, HostMailbox, OutboundContent, OutboundRow};

use crate::error::Result;
use crate::registry::SessionRecord;

/// Refusal reasons kept per session before the oldest are forgotten (they are settled, so
/// a forgotten one is never streamed again anyway).
const REMEMBERED_REFUSALS: usize = 10_000;
/// Batches whose row counts are kept per session; older batches are long finished.
const REMEMBERED_BATCHES: usize = 1_000;
/// Rows counted per session that are remembered as counted (so a resend counts nothing).
const REMEMBERED_COUNTED: usize = 20_000;
/// The batch of rows that answer no inbound message of the session (the agent names
/// `in_reply_to` itself, so a made-up one must not open a fresh batch).
const UNANCHORED: i64 = -1;

/// The host's verdict on one outbound row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Refused, with the reason the agent and the log are given.
    Refuse(String),
}

pub struct OutboundPolicy {
    max_row_bytes: usize,
    max_rows_per_batch: usize,
    max_rows_per_minute: usize,
    /// Per agent: the destinations its config allows beyond its sessions' own.
    configured: HashMap<String, HashSet<Destination>>,
    sessions: Mutex<HashMap<String, SessionGuard>>,
}

/// What the policy remembers of one session while the runner lives.
#[derive(Default)]
struct SessionGuard {
    /// Destinations named by the host in the session's inbound rows.
    replies_to: HashSet<Destination>,
    /// Rows already counted against the limits (a resend, or a second consumer, counts
    /// nothing again), and the limit refusals given, by seq.
    counted: std::collections::BTreeSet<i64>,
    refused: HashMap<i64, String>,
    /// The session's inbound seqs known so far (host-written): what `in_reply_to` may name.
    inbound: std::collections::BTreeSet<i64>,
    /// Rows sent per inbound message they answer.
    per_batch: HashMap<i64, usize>,
    /// When the rows of the last minute were first judged.
    recent: VecDeque<Instant>,
}

impl OutboundPolicy {
    pub fn new(config: &Config) -> Self {
        let mut configured: HashMap<String, HashSet<Destination>> = HashMap::new();
        for agent in &config.agents {
            let allowed = configured.entry(agent.name.clone()).or_default();
            allowed.extend(agent.send_to.iter().map(|c| Destination::Api {
                conversation: c.clone(),
            }));
        }
        for route in &config.discord.routes {
            if route.channel != "dm" {
                configured
                    .entry(route.agent.clone())
                    .or_default()
                    .insert(Destination::Discord {
                        channel_id: route.channel.clone(),
                    });
            }
        }
        Self {
            max_row_bytes: config.runner.max_row_bytes,
            max_rows_per_batch: config.runner.max_rows_per_batch,
            max_rows_per_minute: config.runner.max_rows_per_minute,
            configured,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets the sessions that sent no row in the last minute: a quiet session costs no
    /// memory. What is forgotten is read again from its mailbox when it writes (the
    /// destinations it may use, its inbound seqs); its rate window was empty anyway, and
    /// its rows were all judged over a minute ago (settled since, or streamed again and
    /// counted again, which only errs towards the limits). How many were forgotten.
    pub fn forget_quiet(&self) -> usize {
        let Ok(mut sessions) = self.sessions.lock() else {
            return 0;
        };
        let before = sessions.len();
        let now = Instant::now();
        sessions.retain(|_, guard| {
            guard
                .recent
                .back()
                .is_some_and(|t| now.duration_since(*t) <= Duration::from_secs(60))
        });
        sessions.shrink_to_fit();
        before - sessions.len()
    }

    /// Rows larger than this come from the mailbox without their content.
    pub fn max_row_bytes(&self) -> usize {
        self.max_row_bytes
    }

    /// Judges `row` of `session`. Its shape and destination are checked every time it is
    /// streamed (the agent can edit a row that is not settled yet); it is counted against
    /// the limits once, and a limit refusal stays.
    pub async fn judge(
        &self,
        session: &SessionRecord,
        mailbox: &HostMailbox,
        row: &OutboundRow,
    ) -> Result<Verdict> {
        let destination = match self.check_shape(row) {
            Ok(destination) => destination,
            Err(reason) => return Ok(Verdict::Refuse(reason)),
        };
        if !self.may_send_to(session, &destination) {
            // The host may have named a new destination since (a new thread, a task's).
            let known = mailbox.reply_destinations().await?;
            self.learn(&session.id, &known);
            if !self.may_send_to(session, &destination) {
                let reason = format!(
                    "this conversation may not send to {}: a session sends to its own \
                     conversation, its agent's send_to and the Discord channels routed to it",
                    describe(&destination)
                );
                return Ok(Verdict::Refuse(reason));
            }
        }
        let batch = self.batch_of(&session.id, mailbox, row.in_reply_to).await?;
        Ok(self.count(&session.id, row.seq, batch))
    }

    /// The inbound message a row answers, when it names a real one of its session.
    async fn batch_of(
        &self,
        session_id: &str,
        mailbox: &HostMailbox,
        in_reply_to: Option<i64>,
    ) -> Result<i64> {
        let Some(seq) = in_reply_to.filter(|s| *s > 0) else {
            return Ok(UNANCHORED);
        };
        let known_up_to = {
            let sessions = self.sessions.lock().ok();
            let guard = sessions.as_ref().and_then(|s| s.get(session_id));
            if guard.is_some_and(|g| g.inbound.contains(&seq)) {
                return Ok(seq);
            }
            guard.and_then(|g| g.inbound.last().copied()).unwrap_or(0)
        };
        if seq <= known_up_to {
            return Ok(UNANCHORED);
        }
        let newer = mailbox.inbound_seqs_after(known_up_to).await?;
        let found = newer.contains(&seq);
        if let Ok(mut sessions) = self.sessions.lock() {
            let guard = sessions.entry(session_id.to_string()).or_default();
            guard.inbound.extend(newer);
            while guard.inbound.len() > REMEMBERED_COUNTED {
                guard.inbound.pop_first();
            }
        }
        Ok(if found { seq } else { UNANCHORED })
    }

    /// The row's size and destination, before anything about the session is looked at.
    fn check_shape(&self, row: &OutboundRow) -> Result<Destination, String> {
        if usize::try_from(row.row_bytes).unwrap_or(usize::MAX) > self.max_row_bytes {
            return Err(format!(
                "the message is {} bytes; at most {} are sent (runner.max_row_bytes). \
                 Send long text as a file",
                row.row_bytes, self.max_row_bytes
            ));
        }
        // A row type of the agent's invention, or content that is not what its type says,
        // never reaches a sender that would have to guess.
        OutboundContent::parse(&row.kind, &row.content).map_err(|e| {
            let kind: String = row.kind.chars().take(40).collect();
            format!("a message of type {kind:?} was refused: {e}")
        })?;
        serde_json::from_str(&row.destination).map_err(|e| {
            format!(
                "the destination {:?} is not one ferroclaw knows: {e}",
                row.destination
            )
        })
    }

    fn may_send_to(&self, session: &SessionRecord, destination: &Destination) -> bool {
        let configured = self
            .configured
            .get(&session.agent)
            .is_some_and(|allowed| allowed.contains(destination));
        configured
            || self.sessions.lock().is_ok_and(|sessions| {
                sessions
                    .get(&session.id)
                    .is_some_and(|g| g.replies_to.contains(destination))
            })
    }

    fn learn(&self, session_id: &str, known: &[String]) {
        if let Ok(mut sessions) = self.sessions.lock() {
            let guard = sessions.entry(session_id.to_string()).or_default();
            guard
                .replies_to
                .extend(known.iter().filter_map(|d| serde_json::from_str(d).ok()));
        }
    }

    /// Counts an allowed row against its batch and the session's minute, once, under one
    /// lock: a row two streams judge at once, or one streamed again, is counted once and
    /// keeps its verdict.
    fn count(&self, session_id: &str, seq: i64, batch: i64) -> Verdict {
        let Ok(mut sessions) = self.sessions.lock() else {
            return Verdict::Send;
        };
        let guard = sessions.entry(session_id.to_string()).or_default();
        if let Some(reason) = guard.refused.get(&seq) {
            return Verdict::Refuse(reason.clone());
        }
        if guard.counted.contains(&seq) {
            return Verdict::Send;
        }
        let verdict = self.limit(guard, batch);
        guard.remember(seq, &verdict);
        verdict
    }

    fn limit(&self, guard: &mut SessionGuard, batch: i64) -> Verdict {
        let in_batch = guard.per_batch.get(&batch).copied().unwrap_or(0);
        if in_batch >= self.max_rows_per_batch {
            return Verdict::Refuse(format!(
                "one message may be answered with at most {} messages (runner.max_rows_per_batch)",
                self.max_rows_per_batch
            ));
        }
        let now = Instant::now();
        while guard
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            guard.recent.pop_front();
        }
        if guard.recent.len() >= self.max_rows_per_minute {
            return Verdict::Refuse(format!(
                "this conversation sent {} messages in the last minute, the most allowed \
                 (runner.max_rows_per_minute)",
                self.max_rows_per_minute
            ));
        }
        guard.recent.push_back(now);
        if !guard.per_batch.contains_key(&batch)
            && guard.per_batch.len() >= REMEMBERED_BATCHES
            && let Some(oldest) = guard.per_batch.keys().min().copied()
        {
            guard.per_batch.remove(&oldest);
        }
        *guard.per_batch.entry(batch).or_default() += 1;
        Verdict::Send
    }
}

impl SessionGuard {
    fn remember(&mut self, seq: i64, verdict: &Verdict) {
        self.counted.insert(seq);
        while self.counted.len() > REMEMBERED_COUNTED {
            self.counted.pop_first();
        }
        if let Verdict::Refuse(reason) = verdict {
            if self.refused.len() >= REMEMBERED_REFUSALS
                && let Some(oldest) = self.refused.keys().min().copied()
            {
                self.refused.remove(&oldest);
            }
            self.refused.insert(seq, reason.clone());
        }
    }
}

/// A destination as a person reads it.
pub fn describe(destination: &Destination) -> String {
    match destination {
        Destination::Api { conversation } => format!("the API conversation {conversation:?}"),
        Destination::Callback { source } => format!("the callback of webhook source {source:?}"),
        Destination::Discord { channel_id } => format!("the Discord channel {channel_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, in_reply_to: i64, destination: &str, bytes: i64) -> OutboundRow {
        OutboundRow {
            seq,
            in_reply_to: Some(in_reply_to),
            created_at: 0,
            kind: "chat".into(),
            destination: destination.into(),
            content: r#"{"text":"hi"}"#.into(),
            row_bytes: bytes,
            trace: None,
        }
    }

    fn session() -> SessionRecord {
        SessionRecord {
            id: "ses_a".into(),
            agent: "main".into(),
            conversation_key: "api:mine".into(),
            created_at: 0,
            last_activity: 0,
            runner: None,
            fence: 0,
        }
    }

    #[test]
    fn sessions_quiet_for_a_minute_are_forgotten() {
        let policy = policy("");
        let now = Instant::now();
        let ago = |secs| now.checked_sub(Duration::from_secs(secs)).unwrap_or(now);
        {
            let mut sessions = policy.sessions.lock().unwrap();
            for (id, last) in [("busy", ago(5)), ("quiet", ago(61)), ("never", now)] {
                let guard = sessions.entry(id.to_string()).or_default();
                if id != "never" {
                    guard.recent.push_back(last);
                }
            }
        }
        // (and ses_a, whose destinations the fixture taught it, but which sent nothing)
        assert_eq!(policy.forget_quiet(), 3);
        let left: Vec<String> = policy.sessions.lock().unwrap().keys().cloned().collect();
        assert_eq!(left, ["busy"]);
    }

    fn policy(toml: &str) -> OutboundPolicy {
        let config = Config::parse(toml).unwrap();
        let policy = OutboundPolicy::new(&config);
        policy.learn("ses_a", &[r#"{"kind":"api","conversation":"mine"}"#.into()]);
        policy
    }

    /// `judge` without a mailbox: `in_reply_to` is taken as a real inbound message.
    fn judge(policy: &OutboundPolicy, row: &OutboundRow) -> Verdict {
        match policy.check_shape(row) {
            Err(reason) => Verdict::Refuse(reason),
            Ok(d) if !policy.may_send_to(&session(), &d) => Verdict::Refuse("not allowed".into()),
            Ok(_) => policy.count("ses_a", row.seq, row.in_reply_to.unwrap_or(UNANCHORED)),
        }
    }

    #[test]
    fn only_the_session_s_own_and_configured_destinations_pass() {
        let policy = policy(
            "[[agents]]\nname = \"main\"\nsend_to = [\"alerts\"]\n\n[[discord.routes]]\nchannel = \"42\"\nagent = \"main\"\n\n[[discord.routes]]\nchannel = \"43\"\nagent = \"other\"\n\n[[agents]]\nname = \"other\"\n",
        );
        let ok = [
            r#"{"kind":"api","conversation":"mine"}"#,
            r#"{"conversation":"alerts","kind":"api"}"#,
            r#"{"kind":"discord","channel_id":"42"}"#,
        ];
        for (i, d) in ok.iter().enumerate() {
            assert_eq!(
                judge(&policy, &row(2 * i as i64 + 1, 2, d, 10)),
                Verdict::Send,
                "{d}"
            );
        }
        let refused = [
            r#"{"kind":"api","conversation":"someone-else"}"#,
            r#"{"kind":"discord","channel_id":"43"}"#,
            r#"{"kind":"callback","source":"ci"}"#,
            r#"{"kind":"email","to":"x"}"#,
            "not json",
        ];
        for (i, d) in refused.iter().enumerate() {
            let verdict = judge(&policy, &row(101 + 2 * i as i64, 2, d, 10));
            assert!(matches!(verdict, Verdict::Refuse(_)), "{d}");
        }
        // Its own conversation, but a row type of its own invention or mismatched content.
        let mut forged = row(201, 2, ok[0], 10);
        forged.kind = "exec".into();
        assert!(matches!(judge(&policy, &forged), Verdict::Refuse(r) if r.contains("\"exec\"")));
        let mut mismatched = row(203, 2, ok[0], 10);
        mismatched.kind = "card".into();
        assert!(matches!(judge(&policy, &mismatched), Verdict::Refuse(_)));
    }

    #[test]
    fn size_batch_and_minute_limits_refuse_per_row_and_verdicts_are_stable() {
        let mut policy = policy("[runner]\nmax_rows_per_batch = 3\nmax_rows_per_minute = 5\n");
        let mine = r#"{"kind":"api","conversation":"mine"}"#;
        let big = judge(&policy, &row(1, 2, mine, 64 * 1024 + 1));
        assert!(
            matches!(&big, Verdict::Refuse(r) if r.contains("max_row_bytes")),
            "{big:?}"
        );
        let verdicts: Vec<Verdict> = (0..5)
            .map(|i| judge(&policy, &row(3 + 2 * i, 2, mine, 10)))
            .collect();
        assert_eq!(verdicts[..3], [Verdict::Send, Verdict::Send, Verdict::Send]);
        assert!(matches!(&verdicts[3], Verdict::Refuse(r) if r.contains("max_rows_per_batch")));
        // The same rows again (a resend) keep their verdicts and count nothing, in any order.
        assert!(matches!(
            judge(&policy, &row(9, 2, mine, 10)),
            Verdict::Refuse(_)
        ));
        assert_eq!(judge(&policy, &row(3, 2, mine, 10)), Verdict::Send);
        // A row never seen, below rows already judged, is judged on its own.
        let lower = judge(&policy, &row(2 + 1000, 2, mine, 10));
        assert!(matches!(lower, Verdict::Refuse(r) if r.contains("max_rows_per_batch")));
        // Its destination is checked again on every judgement.
        assert!(matches!(
            judge(
                &policy,
                &row(3, 2, r#"{"kind":"api","conversation":"other"}"#, 10)
            ),
            Verdict::Refuse(_)
        ));
        // Other batches: two more fit in the minute, then the minute is full.
        assert_eq!(judge(&policy, &row(21, 4, mine, 10)), Verdict::Send);
        assert_eq!(judge(&policy, &row(23, 6, mine, 10)), Verdict::Send);
        let full = judge(&policy, &row(25, 8, mine, 10));
        assert!(
            matches!(&full, Verdict::Refuse(r) if r.contains("max_rows_per_minute")),
            "{full:?}"
        );
        policy.max_rows_per_minute = 100;
        assert_eq!(judge(&policy, &row(27, 8, mine, 10)), Verdict::Send);
    }
}
