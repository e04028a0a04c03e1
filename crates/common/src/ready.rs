//! The readiness line: once a service listens, it prints one JSON line on stdout naming its
//! addresses. Whoever started it (`ferroclaw up`, tests) reads it instead of guessing ports,
//! so services can listen on port 0 without races.

use std::io::Write;
use std::net::SocketAddr;

use serde_json::json;

/// Prints `{"ready": service, "grpc": addr, "http": addr}` on stdout.
pub fn announce(service: &str, grpc: Option<SocketAddr>, http: Option<SocketAddr>) {
    let line = json!({
        "ready": service,
        "grpc": grpc.map(|a| a.to_string()),
        "http": http.map(|a| a.to_string()),
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
