//! Discord's rate limits, as Discord announces them: per route and channel (the
//! `X-RateLimit-Bucket`, `-Remaining` and `-Reset-After` headers of every answer) and
//! global (a 429 with `"global": true` or `X-RateLimit-Global`). A send asks first how long
//! to wait; a 429 says how long in its body (`retry_after`) or its `Retry-After` header.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;

/// Used when a 429 names no wait at all.
const DEFAULT_WAIT: Duration = Duration::from_secs(1);
/// No announced wait is taken as longer than this (a broken header is not a day's pause).
const LONGEST_WAIT: Duration = Duration::from_secs(3600);
/// Blocked buckets remembered before the expired ones are dropped.
const PRUNE_AT: usize = 10_000;

/// What a 429 asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimited {
    pub wait: Duration,
    /// Every route of the bot waits, not only this channel's.
    pub global: bool,
}

/// The limits learnt from Discord's answers, shared by every lane.
#[derive(Default)]
pub struct RateLimits {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    global_until: Option<Instant>,
    /// The bucket Discord named for a route ("messages", "typing").
    buckets: HashMap<&'static str, String>,
    /// (bucket, channel) → no requests before this instant.
    blocked: HashMap<(String, String), Instant>,
}

impl RateLimits {
    /// How long a request on `route` in `channel` must wait before it is sent (zero when
    /// it may go now).
    pub fn delay(&self, route: &'static str, channel: &str) -> Duration {
        let now = Instant::now();
        let Ok(state) = self.state.lock() else {
            return Duration::ZERO;
        };
        let global = state.global_until.map(|u| u.saturating_duration_since(now));
        let bucket = state.bucket(route).to_string();
        let local = state
            .blocked
            .get(&(bucket, channel.to_string()))
            .map(|u| u.saturating_duration_since(now));
        global.unwrap_or_default().max(local.unwrap_or_default())
    }

    /// Learns from an answer's headers (any status): a bucket with nothing remaining is
    /// blocked until it resets.
    pub fn observe(&self, route: &'static str, channel: &str, headers: &HeaderMap) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(bucket) = header("x-ratelimit-bucket") {
            state.buckets.insert(route, bucket.to_string());
        }
        let remaining = header("x-ratelimit-remaining").and_then(|v| v.parse::<u64>().ok());
        let reset_after = header("x-ratelimit-reset-after").and_then(seconds);
        if let (Some(0), Some(after)) = (remaining, reset_after) {
            let key = (state.bucket(route).to_string(), channel.to_string());
            state.block(key, after);
        }
    }

    /// Records a 429 and says how long to wait.
    pub fn limited(
        &self,
        route: &'static str,
        channel: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> RateLimited {
        self.observe(route, channel, headers);
        let limited = parse_429(headers, body);
        if let Ok(mut state) = self.state.lock() {
            if limited.global {
                let until = Instant::now() + limited.wait;
                state.global_until = Some(state.global_until.map_or(until, |u| u.max(until)));
            } else {
                let key = (state.bucket(route).to_string(), channel.to_string());
                state.block(key, limited.wait);
            }
        }
        limited
    }
}

impl State {
    /// The bucket of a route; until Discord names one, the route itself.
    fn bucket(&self, route: &'static str) -> &str {
        self.buckets.get(route).map_or(route, String::as_str)
    }

    fn block(&mut self, key: (String, String), wait: Duration) {
        let now = Instant::now();
        if self.blocked.len() >= PRUNE_AT {
            self.blocked.retain(|_, until| *until > now);
        }
        let until = now + wait;
        let at = self.blocked.entry(key).or_insert(until);
        *at = (*at).max(until);
    }
}

/// A 429's wait: the body's `retry_after` (seconds, fractional), else the
/// `X-RateLimit-Reset-After` or `Retry-After` header; global when the body or the
/// `X-RateLimit-Global`/`X-RateLimit-Scope` headers say so.
pub fn parse_429(headers: &HeaderMap, body: &[u8]) -> RateLimited {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let wait = body["retry_after"]
        .as_f64()
        .and_then(|s| seconds(&s.to_string()))
        .or_else(|| header("x-ratelimit-reset-after").and_then(seconds))
        .or_else(|| header("retry-after").and_then(seconds))
        .unwrap_or(DEFAULT_WAIT);
    let global = body["global"].as_bool() == Some(true)
        || header("x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || header("x-ratelimit-scope") == Some("global");
    RateLimited { wait, global }
}

/// Seconds as Discord writes them ("7", "0.25"), capped; `None` when not a number.
fn seconds(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(secs).min(LONGEST_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).expect("header"),
            );
        }
        map
    }

    #[test]
    fn the_body_wait_wins_and_global_is_read_from_body_or_headers() {
        let body =
            br#"{"message": "You are being rate limited.", "retry_after": 7.5, "global": false}"#;
        let limited = parse_429(&headers(&[("retry-after", "8")]), body);
        assert_eq!(limited.wait, Duration::from_millis(7500));
        assert!(!limited.global);

        let limited = parse_429(
            &headers(&[("retry-after", "3"), ("x-ratelimit-global", "true")]),
            b"",
        );
        assert_eq!(limited.wait, Duration::from_secs(3));
        assert!(limited.global);

        let limited = parse_429(
            &headers(&[
                ("x-ratelimit-reset-after", "0.25"),
                ("x-ratelimit-scope", "global"),
            ]),
            b"not json",
        );
        assert_eq!(limited.wait, Duration::from_millis(250));
        assert!(limited.global);

        let limited = parse_429(&HeaderMap::new(), br#"{"retry_after": -4}"#);
        assert_eq!(limited.wait, DEFAULT_WAIT, "a nonsense wait falls back");
        let limited = parse_429(&HeaderMap::new(), br#"{"retry_after": 1e12}"#);
        assert_eq!(limited.wait, LONGEST_WAIT);
    }

    #[test]
    fn a_limited_channel_waits_and_others_do_not() {
        let limits = RateLimits::default();
        let body = br#"{"retry_after": 5, "global": false}"#;
        limits.limited(
            "messages",
            "a",
            &headers(&[("x-ratelimit-bucket", "b1")]),
            body,
        );
        assert!(limits.delay("messages", "a") > Duration::from_secs(4));
        assert_eq!(limits.delay("messages", "b"), Duration::ZERO);
        assert_eq!(limits.delay("typing", "a"), Duration::ZERO);
    }

    #[test]
    fn an_exhausted_bucket_blocks_until_its_reset() {
        let limits = RateLimits::default();
        limits.observe(
            "messages",
            "a",
            &headers(&[
                ("x-ratelimit-bucket", "b1"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset-after", "2"),
            ]),
        );
        let delay = limits.delay("messages", "a");
        assert!(delay > Duration::from_secs(1) && delay <= Duration::from_secs(2));
        limits.observe(
            "messages",
            "c",
            &headers(&[
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset-after", "2"),
            ]),
        );
        assert_eq!(limits.delay("messages", "c"), Duration::ZERO);
    }

    #[test]
    fn a_global_limit_holds_every_channel() {
        let limits = RateLimits::default();
        limits.limited(
            "messages",
            "a",
            &HeaderMap::new(),
            br#"{"retry_after": 3, "global": true}"#,
        );
        assert!(limits.delay("messages", "zzz") > Duration::from_secs(2));
        assert!(limits.delay("typing", "a") > Duration::from_secs(2));
    }
}
