//! `[metrics]`: where the services without an HTTP API serve Prometheus metrics.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;
use super::env::{Get, listen_addr};

/// Where the services without an HTTP API serve Prometheus' `GET /metrics` (the gateway
/// serves it on its HTTP address). Each is named in the service's readiness line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub runner: SocketAddr,
    pub delivery: SocketAddr,
    pub scheduler: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        let on = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            runner: on(9461),
            delivery: on(9462),
            scheduler: on(9463),
        }
    }
}

impl MetricsConfig {
    /// `FERROCLAW_<SERVICE>_METRICS_ADDR`.
    pub(super) fn apply_env(&mut self, get: Get<'_>) -> Result<(), ConfigError> {
        for (var, addr) in [
            ("FERROCLAW_RUNNER_METRICS_ADDR", &mut self.runner),
            ("FERROCLAW_DELIVERY_METRICS_ADDR", &mut self.delivery),
            ("FERROCLAW_SCHEDULER_METRICS_ADDR", &mut self.scheduler),
        ] {
            if let Some(v) = get(var) {
                *addr = listen_addr(var, &v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn metrics_addresses_come_from_the_metrics_section_and_env() {
        let c = Config::parse("[metrics]\nrunner = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(c.metrics.runner.port(), 1);
        assert_eq!(c.metrics.delivery.port(), 9462);
        let mut c = Config::default();
        c.apply_env(|k| (k == "FERROCLAW_DELIVERY_METRICS_ADDR").then(|| "127.0.0.1:2".into()))
            .unwrap();
        assert_eq!(c.metrics.delivery.port(), 2);
        let err = c
            .apply_env(|k| (k == "FERROCLAW_RUNNER_METRICS_ADDR").then(|| "nope".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FERROCLAW_RUNNER_METRICS_ADDR"), "{err}");
    }
}
