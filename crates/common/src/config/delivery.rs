//! `[delivery]`: where delivery listens, and how long it keeps trying to deliver a reply.

use std::net::SocketAddr;

use serde::Deserialize;

use super::env::{Get, parse};
use super::service_addr::ServiceAddr;
use super::{ConfigError, invalid};

/// Delivery: where it listens, and how long it keeps trying to deliver a reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub listen: SocketAddr,
    pub url: Option<String>,
    /// A reply that cannot be delivered (rate limits, a destination down) is given up on
    /// this long after its agent wrote it; a permanent refusal ends it at once.
    pub max_reply_age_secs: u64,
    /// Sends in flight at once across all destinations (waiting lanes hold none).
    pub max_concurrent_sends: usize,
    /// The ledger and API conversations: `postgres://…` or `sqlite:…`; unset,
    /// `<data_dir>/delivery.db`.
    pub database_url: Option<String>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            listen: ServiceAddr::on(50052).listen,
            url: None,
            max_reply_age_secs: 15 * 60,
            max_concurrent_sends: 32,
            database_url: None,
        }
    }
}

impl DeliveryConfig {
    pub fn addr(&self) -> ServiceAddr {
        ServiceAddr {
            listen: self.listen,
            url: self.url.clone(),
        }
    }

    pub fn url(&self) -> String {
        self.addr().url()
    }

    pub(super) fn apply_env(&mut self, get: Get<'_>) -> Result<(), ConfigError> {
        let mut addr = self.addr();
        addr.apply_env("FERROCLAW_DELIVERY", get)?;
        (self.listen, self.url) = (addr.listen, addr.url);
        if let Some(v) = get("FERROCLAW_MAX_REPLY_AGE_SECS") {
            self.max_reply_age_secs = parse("FERROCLAW_MAX_REPLY_AGE_SECS", &v)?;
        }
        if let Some(url) = super::database::from_env(get, "delivery") {
            self.database_url = Some(url);
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_sends == 0 {
            return Err(invalid(
                "delivery.max_concurrent_sends",
                "must be at least 1",
            ));
        }
        super::database::validate("delivery", self.database_url.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn delivery_needs_a_send_slot_and_takes_its_overrides() {
        let mut c = Config::default();
        assert_eq!(c.delivery.url(), "http://127.0.0.1:50052");
        c.apply_env(|k| (k == "FERROCLAW_DELIVERY_URL").then(|| "http://delivery:1".into()))
            .unwrap();
        assert_eq!(c.delivery.url(), "http://delivery:1");
        c.delivery.max_concurrent_sends = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("delivery.max_concurrent_sends"), "{err}");
    }
}
