//! The readiness line: once a service is ready (its database open, its migrations done, its
//! addresses bound), it prints one JSON line on stdout naming its addresses. Whoever started
//! it (`ferroclaw up`, tests) reads it instead of guessing ports, so services can listen on
//! port 0 without races.

use std::io::Write;
use std::net::SocketAddr;

use serde_json::json;

/// Prints `{"ready": service, "grpc": addr, "http": addr, "metrics": addr}` on stdout.
pub fn announce(
    service: &str,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) {
    let line = json!({
        "ready": service,
        "grpc": grpc.map(|a| a.to_string()),
        "http": http.map(|a| a.to_string()),
        "metrics": metrics.map(|a| a.to_string()),
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A readiness line not printed yet: startup binds the addresses and makes one, the
/// service's `run` prints it once it can serve (after opening its database).
#[derive(Debug)]
#[must_use = "a service announces its readiness once it can serve"]
pub struct Ready {
    service: String,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

impl Ready {
    pub fn new(service: &str, grpc: Option<SocketAddr>, http: Option<SocketAddr>) -> Self {
        Self {
            service: service.to_string(),
            grpc,
            http,
            metrics: None,
        }
    }

    /// Names the address of the service's `GET /metrics` (see [`crate::metrics::serve`]).
    pub fn with_metrics(mut self, metrics: Option<SocketAddr>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Prints the line (see [`announce`]).
    pub fn announce(self) {
        announce(&self.service, self.grpc, self.http, self.metrics);
    }
}
