//! `[scheduler]`: where the scheduler listens and where it keeps its tasks.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;
use super::env::Get;
use super::service_addr::ServiceAddr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub listen: SocketAddr,
    /// Defaults to `http://<listen>`.
    pub url: Option<String>,
    /// Tasks and runs: `postgres://…` or `sqlite:…`; unset, `<data_dir>/scheduler.db`.
    pub database_url: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            listen: ServiceAddr::on(50053).listen,
            url: None,
            database_url: None,
        }
    }
}

impl SchedulerConfig {
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
        addr.apply_env("FERROCLAW_SCHEDULER", get)?;
        (self.listen, self.url) = (addr.listen, addr.url);
        if let Some(url) = super::database::from_env(get, "scheduler") {
            self.database_url = Some(url);
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        super::database::validate("scheduler", self.database_url.as_deref())
    }
}
