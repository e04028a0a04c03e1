//! Where a gRPC service listens and where its peers reach it: the shape shared by the
//! gateway's gRPC ingress, the scheduler, the runner and delivery.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;
use super::env::{Get, listen_addr};

/// Where a gRPC service listens and where its peers reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAddr {
    pub listen: SocketAddr,
    /// Defaults to `http://<listen>` (with an unspecified IP replaced by loopback).
    #[serde(default)]
    pub url: Option<String>,
}

impl ServiceAddr {
    /// Listening on loopback `port`, reached there.
    pub(super) fn on(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            url: None,
        }
    }

    pub fn url(&self) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// `<prefix>_ADDR` and `<prefix>_URL`.
    pub(super) fn apply_env(&mut self, prefix: &str, get: Get<'_>) -> Result<(), ConfigError> {
        let var = format!("{prefix}_ADDR");
        if let Some(v) = get(&var) {
            self.listen = listen_addr(&var, &v)?;
        }
        if let Some(v) = get(&format!("{prefix}_URL")) {
            self.url = Some(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_defaults_to_the_listen_address_on_loopback() {
        let mut addr = ServiceAddr {
            listen: "0.0.0.0:7".parse().unwrap(),
            url: None,
        };
        assert_eq!(addr.url(), "http://127.0.0.1:7");
        addr.apply_env("X", &|k| (k == "X_URL").then(|| "http://x:8".to_string()))
            .unwrap();
        assert_eq!(addr.url(), "http://x:8");
    }
}
