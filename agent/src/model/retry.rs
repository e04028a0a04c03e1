//! Backoff between attempts at a model request.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub base: Duration,
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The default policy, with the first wait from `FERROCLAW_MODEL_RETRY_BASE_MS` when
    /// set (tests shorten it).
    pub fn from_env() -> Self {
        let mut policy = Self::default();
        if let Some(ms) = std::env::var("FERROCLAW_MODEL_RETRY_BASE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            policy.base = Duration::from_millis(ms);
        }
        policy
    }

    /// Wait after failed attempt `attempt` (1-based), with ±25 % jitter so many agents
    /// hitting one limit do not retry in step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.max_wait);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = 0.75 + f64::from(nanos % 1000) / 2000.0;
        exp.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max_wait: Duration::from_millis(1000),
        };
        let within = |d: Duration, ms: u64| {
            d >= Duration::from_millis(ms * 3 / 4) && d <= Duration::from_millis(ms * 5 / 4)
        };
        assert!(within(p.backoff(1), 100));
        assert!(within(p.backoff(2), 200));
        assert!(within(p.backoff(3), 400));
        assert!(within(p.backoff(9), 1000));
    }
}
