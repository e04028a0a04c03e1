//! Delivery's Prometheus metrics: deliveries by outcome and destination kind, rate-limit
//! waits and retries, and the reply-written → delivered stage of a message's path.

use std::sync::LazyLock;

use ferroclaw_common::metrics::{
    HistogramVec, IntCounterVec, LATENCY_BUCKETS, counter_vec, histogram_vec, seconds_between_ms,
};
use ferroclaw_content::Destination;
use ferroclaw_proto::v1::OutboundMessage;

pub struct DeliveryMetrics {
    pub deliveries: IntCounterVec,
    pub rate_limit_waits: IntCounterVec,
    pub retries: IntCounterVec,
    pub pipeline_stage: HistogramVec,
}

pub static METRICS: LazyLock<DeliveryMetrics> = LazyLock::new(|| DeliveryMetrics {
    deliveries: counter_vec(
        "ferroclaw_deliveries_total",
        "Outbound rows settled, by outcome (delivered, refused, given_up) and destination kind (discord, api, callback, action).",
        &["outcome", "destination"],
    ),
    rate_limit_waits: counter_vec(
        "ferroclaw_delivery_rate_limit_waits_total",
        "Waits for a destination's rate limit (Discord's 429 and buckets, a callback's Retry-After).",
        &["destination"],
    ),
    retries: counter_vec(
        "ferroclaw_delivery_retries_total",
        "Sends retried after a transient failure (5xx, network).",
        &["destination"],
    ),
    pipeline_stage: histogram_vec(
        "ferroclaw_pipeline_stage_seconds",
        "Time a message spends in each stage of its path: enqueue_to_reply_written (runner), reply_written_to_delivered (delivery).",
        &["stage"],
        LATENCY_BUCKETS,
    ),
});

/// The destination kind of a row, a closed set.
pub fn destination_kind(message: &OutboundMessage) -> &'static str {
    if message.kind == "action" {
        return "action";
    }
    match serde_json::from_str::<Destination>(&message.destination_json) {
        Ok(Destination::Discord { .. }) => "discord",
        Ok(Destination::Api { .. }) => "api",
        Ok(Destination::Callback { .. }) => "callback",
        Err(_) => "unreadable",
    }
}

/// Counts a settled row; a delivered one also closes its stage.
pub fn settled(message: &OutboundMessage, outcome: &'static str) {
    let destination = destination_kind(message);
    METRICS
        .deliveries
        .with_label_values(&[outcome, destination])
        .inc();
    if outcome == "delivered" {
        METRICS
            .pipeline_stage
            .with_label_values(&["reply_written_to_delivered"])
            .observe(seconds_between_ms(
                message.created_at_ms,
                ferroclaw_content::now_ms(),
            ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_a_closed_set() {
        let mut message = OutboundMessage {
            destination_json: r#"{"kind":"discord","channel_id":"1"}"#.into(),
            kind: "chat".into(),
            ..Default::default()
        };
        assert_eq!(destination_kind(&message), "discord");
        message.destination_json = "not json".into();
        assert_eq!(destination_kind(&message), "unreadable");
        message.kind = "action".into();
        assert_eq!(destination_kind(&message), "action");
        settled(&message, "delivered");
        let text = ferroclaw_common::metrics::render();
        assert!(
            text.contains(
                r#"ferroclaw_deliveries_total{destination="action",outcome="delivered"} "#
            ),
            "{text}"
        );
    }
}
