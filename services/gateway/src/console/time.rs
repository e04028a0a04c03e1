//! Times as the console shows them: UTC, to the second, plus how long ago.

use chrono::{DateTime, Utc};

/// `2026-01-01 09:00:00 UTC`, or `—` for none (0 or negative).
pub fn utc(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "—".into())
}

/// `5 s ago`, `3 min ago`, `2 h ago`, `4 d ago`; `in 3 min` for the future.
pub fn ago(ms: i64, now_ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let delta = (now_ms - ms) / 1000;
    let (n, future) = (delta.unsigned_abs(), delta < 0);
    let amount = match n {
        0..60 => format!("{n} s"),
        60..3600 => format!("{} min", n / 60),
        3600..86_400 => format!("{} h", n / 3600),
        _ => format!("{} d", n / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_plainly() {
        assert_eq!(utc(1_767_258_000_000), "2026-01-01 09:00:00 UTC");
        assert_eq!(utc(0), "—");
        let now = 1_767_258_000_000;
        assert_eq!(ago(now - 5_000, now), "5 s ago");
        assert_eq!(ago(now - 180_000, now), "3 min ago");
        assert_eq!(ago(now - 7_200_000, now), "2 h ago");
        assert_eq!(ago(now - 4 * 86_400_000, now), "4 d ago");
        assert_eq!(ago(now + 180_000, now), "in 3 min");
        assert_eq!(ago(0, now), "never");
    }
}
