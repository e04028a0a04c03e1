//! The runner's Prometheus metrics: messages in, the enqueue → reply-written stage, agents by
//! state and their starts, sessions on disk, and model tokens and cost per agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use ferroclaw_common::metrics::{
    CounterVec, HistogramVec, IntCounterVec, IntGaugeVec, LATENCY_BUCKETS, counter_vec,
    float_counter_vec, gauge_vec, histogram_vec, seconds_between_ms,
};

pub struct RunnerMetrics {
    pub enqueued: IntCounterVec,
    /// Shared with delivery: `stage` tells who measured which part of a message's path.
    pub pipeline_stage: HistogramVec,
    pub agents: IntGaugeVec,
    pub agent_starts: IntCounterVec,
    pub sessions: IntGaugeVec,
    pub model_tokens: IntCounterVec,
    pub model_cost: CounterVec,
    pub rows_refused: IntCounterVec,
    pub active: IntGaugeVec,
}

pub static METRICS: LazyLock<RunnerMetrics> = LazyLock::new(|| RunnerMetrics {
    enqueued: counter_vec(
        "ferroclaw_runner_messages_enqueued_total",
        "Inbound messages written to a session's mailbox (duplicates = an idempotency key seen again).",
        &["agent", "duplicate"],
    ),
    pipeline_stage: histogram_vec(
        "ferroclaw_pipeline_stage_seconds",
        "Time a message spends in each stage of its path: enqueue_to_reply_written (runner), reply_written_to_delivered (delivery).",
        &["stage"],
        LATENCY_BUCKETS,
    ),
    agents: gauge_vec(
        "ferroclaw_runner_agents",
        "Agents by state: running (holding a slot), queued (waiting for a slot), backoff (restarting after a crash).",
        &["state"],
    ),
    agent_starts: counter_vec(
        "ferroclaw_runner_agent_starts_total",
        "Agents started (cold starts), by agent.",
        &["agent"],
    ),
    sessions: gauge_vec(
        "ferroclaw_runner_sessions",
        "Sessions by state: with_agent (queued, running or in backoff) and idle (on disk, no agent).",
        &["state"],
    ),
    model_tokens: counter_vec(
        "ferroclaw_model_tokens_total",
        "Model tokens used through the credential proxy, by agent and direction (input, output).",
        &["agent", "direction"],
    ),
    model_cost: float_counter_vec(
        "ferroclaw_model_cost_dollars_total",
        "Model spend in US dollars, by agent (from agents.price_per_mtok; 0 without a price).",
        &["agent"],
    ),
    rows_refused: counter_vec(
        "ferroclaw_runner_outbound_rows_refused_total",
        "Outbound rows an agent wrote that the runner refused (destination, size or rate).",
        &["agent"],
    ),
    active: gauge_vec(
        "ferroclaw_runner_active",
        "1 when this runner holds the session store (it serves), 0 when it stands by.",
        &[],
    ),
});

/// Messages enqueued and not answered yet, with their enqueue time: a reply row closes the
/// `enqueue_to_reply_written` stage of every message of its session up to the one it
/// answers (an agent answers a batch with one reply to its last message). Bounded: past
/// [`MAX_PENDING`] messages never answered, the record starts over.
#[derive(Default)]
pub struct PendingReplies {
    inner: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    by_session: HashMap<String, BTreeMap<i64, i64>>,
    len: usize,
}

const MAX_PENDING: usize = 100_000;

impl PendingReplies {
    pub fn enqueued(&self, session: &str, seq: i64, at_ms: i64) {
        let Ok(mut pending) = self.inner.lock() else {
            return;
        };
        if pending.len >= MAX_PENDING {
            *pending = Pending::default();
        }
        let added = pending
            .by_session
            .entry(session.to_string())
            .or_default()
            .insert(seq, at_ms)
            .is_none();
        if added {
            pending.len += 1;
        }
    }

    /// The stage's seconds for each message a reply to `in_reply_to` closes.
    pub fn replied(&self, session: &str, in_reply_to: i64, reply_at_ms: i64) -> Vec<f64> {
        let Ok(mut pending) = self.inner.lock() else {
            return Vec::new();
        };
        let Some(waiting) = pending.by_session.get_mut(session) else {
            return Vec::new();
        };
        let later = waiting.split_off(&(in_reply_to + 1));
        let answered = std::mem::replace(waiting, later);
        if waiting.is_empty() {
            pending.by_session.remove(session);
        }
        pending.len -= answered.len();
        answered
            .into_values()
            .map(|at| seconds_between_ms(at, reply_at_ms))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_closes_the_stage_of_every_message_it_answers_once() {
        let pending = PendingReplies::default();
        pending.enqueued("s", 2, 1_000);
        pending.enqueued("s", 4, 1_100);
        pending.enqueued("s", 6, 1_200);
        // One reply to a batch of 2 and 4 (agents answer a batch's last message).
        assert_eq!(pending.replied("s", 4, 1_250), vec![0.25, 0.15]);
        assert!(pending.replied("s", 4, 1_300).is_empty());
        assert!(pending.replied("other", 6, 1_300).is_empty());
        assert_eq!(pending.replied("s", 6, 1_300), vec![0.1]);
        assert_eq!(pending.inner.lock().expect("lock").len, 0);
    }

    #[test]
    fn the_record_is_bounded() {
        let pending = PendingReplies::default();
        for seq in 0..(MAX_PENDING as i64 + 10) {
            pending.enqueued("s", seq, 0);
        }
        assert!(pending.inner.lock().expect("lock").len <= MAX_PENDING);
        assert!(pending.replied("s", 0, 10).is_empty());
        assert_eq!(pending.replied("s", MAX_PENDING as i64 + 9, 10).len(), 10);
    }

    #[test]
    fn the_families_are_valid() {
        METRICS.enqueued.with_label_values(&["main", "false"]).inc();
        METRICS
            .pipeline_stage
            .with_label_values(&["enqueue_to_reply_written"])
            .observe(0.01);
        let text = ferroclaw_common::metrics::render();
        assert!(text.contains("ferroclaw_runner_messages_enqueued_total"));
        assert!(text.contains("ferroclaw_pipeline_stage_seconds_bucket"));
    }
}
