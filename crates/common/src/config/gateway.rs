//! `[gateway]`: the REST API and the public gRPC ingress.

use std::net::SocketAddr;

use serde::Deserialize;

use super::env::{Get, parse};
use super::service_addr::ServiceAddr;
use super::{ConfigError, invalid};

/// Longest SSE heartbeat accepted: a proxy closes a stream silent for much less.
const MAX_SSE_HEARTBEAT_SECS: f64 = 3600.0;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub http_addr: SocketAddr,
    pub grpc: ServiceAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Bearer token for the REST API (prefer `FERROCLAW_API_TOKEN`). Without one the
    /// gateway refuses to listen on anything but loopback.
    pub api_token: Option<String>,
    /// Longest long-poll a client may ask for, in seconds.
    pub max_wait_secs: u64,
    /// Seconds between the `: keep-alive` comments of an idle live stream
    /// (`/v1/conversations/{id}/events`), so proxies keep it open; fractions allowed (tests
    /// use a short one). Above 0, at most 3600.
    pub sse_heartbeat_secs: f64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc: ServiceAddr::on(50054),
            max_body_bytes: 1024 * 1024,
            api_token: None,
            max_wait_secs: 60,
            sse_heartbeat_secs: 15.0,
        }
    }
}

impl GatewayConfig {
    pub(super) fn apply_env(&mut self, get: Get<'_>) -> Result<(), ConfigError> {
        if let Some(v) = get("FERROCLAW_HTTP_ADDR") {
            self.http_addr = parse("FERROCLAW_HTTP_ADDR", &v)?;
        }
        if let Some(v) = get("FERROCLAW_API_TOKEN").filter(|v| !v.is_empty()) {
            self.api_token = Some(v);
        }
        if let Some(v) = get("FERROCLAW_MAX_BODY_BYTES") {
            self.max_body_bytes = parse("FERROCLAW_MAX_BODY_BYTES", &v)?;
        }
        self.grpc.apply_env("FERROCLAW_GATEWAY_GRPC", get)?;
        if let Some(v) = get("FERROCLAW_SSE_HEARTBEAT_SECS") {
            self.sse_heartbeat_secs = parse("FERROCLAW_SSE_HEARTBEAT_SECS", &v)?;
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.api_token.is_none() && !self.http_addr.ip().is_loopback() {
            return Err(invalid(
                "gateway.http_addr",
                format!(
                    "{} is not a loopback address: set FERROCLAW_API_TOKEN before exposing the API",
                    self.http_addr
                ),
            ));
        }
        // The public gRPC ingress takes the same token: open only on loopback without one.
        if self.api_token.is_none() && !self.grpc.listen.ip().is_loopback() {
            return Err(invalid(
                "gateway.grpc",
                format!(
                    "{} is not a loopback address: set FERROCLAW_API_TOKEN before exposing the gRPC API",
                    self.grpc.listen
                ),
            ));
        }
        // Written so NaN fails too.
        let heartbeat = self.sse_heartbeat_secs;
        if !(heartbeat > 0.0 && heartbeat <= MAX_SSE_HEARTBEAT_SECS) {
            return Err(invalid(
                "gateway.sse_heartbeat_secs",
                format!(
                    "{heartbeat}: must be a number of seconds above 0 and at most {MAX_SSE_HEARTBEAT_SECS}"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn public_address_needs_a_token() {
        let mut c = Config::default();
        c.gateway.http_addr = "0.0.0.0:8080".parse().unwrap();
        assert!(c.validate().is_err());
        c.gateway.api_token = Some("t".into());
        c.validate().unwrap();
    }

    #[test]
    fn sse_heartbeat_is_a_bounded_number_of_seconds() {
        let c = Config::default();
        assert_eq!(c.gateway.sse_heartbeat_secs, 15.0);
        let c = Config::parse("[gateway]\nsse_heartbeat_secs = 2.5\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.gateway.sse_heartbeat_secs, 2.5);
        // Whole seconds may be written as an integer.
        let c = Config::parse("[gateway]\nsse_heartbeat_secs = 20\n").unwrap();
        assert_eq!(c.gateway.sse_heartbeat_secs, 20.0);

        let mut c = Config::default();
        c.apply_env(|k| (k == "FERROCLAW_SSE_HEARTBEAT_SECS").then(|| "0.3".to_string()))
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.gateway.sse_heartbeat_secs, 0.3);

        let err = Config::default()
            .apply_env(|k| (k == "FERROCLAW_SSE_HEARTBEAT_SECS").then(|| "soon".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FERROCLAW_SSE_HEARTBEAT_SECS"), "{err}");

        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 3600.5] {
            let mut c = Config::default();
            c.gateway.sse_heartbeat_secs = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("gateway.sse_heartbeat_secs"), "{bad}: {err}");
        }
        let mut c = Config::default();
        c.gateway.sse_heartbeat_secs = 3600.0;
        c.validate().unwrap();
    }
}
