//! The scheduler's Prometheus metrics: runs by outcome, how late each fired, and whether
//! this instance is the one that fires.

use std::sync::LazyLock;

use ferroclaw_common::metrics::{
    HistogramVec, IntCounterVec, IntGaugeVec, counter_vec, gauge_vec, histogram_vec,
    seconds_between_ms,
};

pub struct SchedulerMetrics {
    pub runs: IntCounterVec,
    pub lag: HistogramVec,
    pub active: IntGaugeVec,
}

/// Lateness buckets: a run fires within milliseconds; a restart or a missed round is seconds.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0,
];

pub static METRICS: LazyLock<SchedulerMetrics> = LazyLock::new(|| SchedulerMetrics {
    runs: counter_vec(
        "ferroclaw_scheduler_runs_total",
        "Task runs, by outcome: enqueued, skipped (missed while down) or failed.",
        &["outcome"],
    ),
    lag: histogram_vec(
        "ferroclaw_scheduler_lag_seconds",
        "How late an enqueued run fired: the time it was enqueued minus the time it was scheduled for.",
        &[],
        LAG_BUCKETS,
    ),
    active: gauge_vec(
        "ferroclaw_scheduler_active",
        "1 when this scheduler is the active one (it fires runs), 0 when it stands by.",
        &[],
    ),
});

/// Whether this instance is the active scheduler.
pub fn active(active: bool) {
    METRICS
        .active
        .with_label_values(&[] as &[&str])
        .set(i64::from(active));
}

/// Counts one run; an enqueued one also records its lateness.
pub fn run(outcome: &str, scheduled_at_ms: i64, fired_at_ms: i64) {
    let outcome = match outcome {
        "enqueued" => "enqueued",
        "skipped" => "skipped",
        _ => "failed",
    };
    METRICS.runs.with_label_values(&[outcome]).inc();
    if outcome == "enqueued" {
        METRICS
            .lag
            .with_label_values(&[] as &[&str])
            .observe(seconds_between_ms(scheduled_at_ms, fired_at_ms));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_moves_the_counter_and_the_histogram() {
        super::run("enqueued", 1_000, 1_020);
        let text = ferroclaw_common::metrics::render();
        assert!(
            text.contains("ferroclaw_scheduler_runs_total{outcome=\"enqueued\"}"),
            "{text}"
        );
        assert!(
            text.contains("ferroclaw_scheduler_lag_seconds_bucket{le=\"0.025\"} 1"),
            "{text}"
        );
        // Other tests of this process move the gauge too: only its presence is certain.
        super::active(true);
        let text = ferroclaw_common::metrics::render();
        assert!(text.contains("\nferroclaw_scheduler_active "), "{text}");
    }
}
