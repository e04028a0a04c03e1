//! When a task runs: cron in an IANA time zone, a fixed interval, or one moment.
//!
//! Runs are computed from the previous *scheduled* time, never from "now", so a late firing
//! does not shift the series. Daylight-saving changes follow the usual cron rules (croner's,
//! after the Open Cron Pattern Specification): a fixed-time job whose time falls in the hour
//! skipped in spring runs right after the change; one whose time falls in the hour repeated
//! in autumn runs once, at the first occurrence.

use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use ferroclaw_proto::v1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule kind must be cron, interval or once, not {0:?}")]
    Kind(String),
    #[error("invalid cron expression {expr:?}: {message}")]
    Cron { expr: String, message: String },
    #[error("unknown time zone {0:?} (use an IANA name such as Europe/Berlin)")]
    Zone(String),
    #[error("interval must be at least 1 second, not {0}")]
    Interval(i64),
    #[error(
        "invalid moment {0:?}: use RFC 3339 (2026-12-01T09:00:00+01:00) or \"YYYY-MM-DD HH:MM\" in the task's time zone"
    )]
    Moment(String),
    #[error("{0:?} does not exist in {1} (it falls in a daylight-saving gap)")]
    Nonexistent(String, String),
    #[error("the cron expression {0:?} never matches")]
    NeverMatches(String),
}

#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        expr: String,
        cron: Box<Cron>,
        tz: Tz,
    },
    Interval {
        secs: i64,
    },
    Once {
        at_ms: i64,
        text: String,
        tz: Tz,
    },
}

impl Schedule {
    pub fn parse(p: &v1::Schedule) -> Result<Self, ScheduleError> {
        let zone = if p.timezone.is_empty() {
            "UTC"
        } else {
            p.timezone.as_str()
        };
        let tz: Tz = zone
            .parse()
            .map_err(|_| ScheduleError::Zone(p.timezone.clone()))?;
        match p.kind.as_str() {
            "cron" => {
                let expr = p.cron.trim().to_string();
                if expr.split_whitespace().count() != 5 {
                    return Err(ScheduleError::Cron {
                        expr,
                        message: "expected five fields: minute hour day-of-month month day-of-week"
                            .into(),
                    });
                }
                let cron = Cron::from_str(&expr).map_err(|e| ScheduleError::Cron {
                    expr: expr.clone(),
                    message: e.to_string(),
                })?;
                let schedule = Self::Cron {
                    expr: expr.clone(),
                    cron: Box::new(cron),
                    tz,
                };
                // A pattern like "0 0 30 2 *" parses but never runs.
                if schedule.next_after(Utc::now().timestamp_millis()).is_none() {
                    return Err(ScheduleError::NeverMatches(expr));
                }
                Ok(schedule)
            }
            "interval" => {
                if p.interval_secs < 1 {
                    return Err(ScheduleError::Interval(p.interval_secs));
                }
                Ok(Self::Interval {
                    secs: p.interval_secs,
                })
            }
            "once" => Ok(Self::Once {
                at_ms: parse_moment(&p.at, tz)?,
                text: p.at.clone(),
                tz,
            }),
            other => Err(ScheduleError::Kind(other.to_string())),
        }
    }

    pub fn to_proto(&self) -> v1::Schedule {
        match self {
            Self::Cron { expr, tz, .. } => v1::Schedule {
                kind: "cron".into(),
                cron: expr.clone(),
                timezone: tz.name().into(),
                ..Default::default()
            },
            Self::Interval { secs } => v1::Schedule {
                kind: "interval".into(),
                interval_secs: *secs,
                timezone: "UTC".into(),
                ..Default::default()
            },
            Self::Once { text, tz, .. } => v1::Schedule {
                kind: "once".into(),
                at: text.clone(),
                timezone: tz.name().into(),
                ..Default::default()
            },
        }
    }

    /// The first run of a new (or resumed) task, at or after `now_ms`.
    pub fn first(&self, now_ms: i64) -> Option<i64> {
        match self {
            Self::Once { at_ms, .. } => Some(*at_ms),
            Self::Interval { secs } => Some(now_ms + secs * 1000),
            Self::Cron { .. } => self.next_after(now_ms - 1),
        }
    }

    /// The run after the one scheduled at `scheduled_ms` (`None`: the series is over).
    pub fn next_after(&self, scheduled_ms: i64) -> Option<i64> {
        match self {
            Self::Once { .. } => None,
            Self::Interval { secs } => Some(scheduled_ms + secs * 1000),
            Self::Cron { cron, tz, .. } => {
                let after = tz.timestamp_millis_opt(scheduled_ms).single()?;
                cron.find_next_occurrence(&after, false)
                    .ok()
                    .map(|next| next.timestamp_millis())
            }
        }
    }
}

/// RFC 3339, or a local "YYYY-MM-DD HH:MM[:SS]" (also with a `T`) read in `tz`.
fn parse_moment(text: &str, tz: Tz) -> Result<i64, ScheduleError> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.timestamp_millis());
    }
    let naive = [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
    .ok_or_else(|| ScheduleError::Moment(text.to_string()))?;
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(at) => Ok(at.timestamp_millis()),
        // The earlier of a repeated hour, as a person reading the clock would mean first.
        chrono::LocalResult::Ambiguous(early, _) => Ok(early.timestamp_millis()),
        chrono::LocalResult::None => Err(ScheduleError::Nonexistent(
            text.to_string(),
            tz.name().to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(&v1::Schedule {
            kind: "cron".into(),
            cron: expr.into(),
            timezone: tz.into(),
            ..Default::default()
        })
        .unwrap()
    }

    /// Unix ms of a local wall-clock time (the earlier one when ambiguous).
    fn local(tz: &str, text: &str) -> i64 {
        parse_moment(text, tz.parse().unwrap()).unwrap()
    }

    fn show(ms: i64, tz: &str) -> String {
        let tz: Tz = tz.parse().unwrap();
        tz.timestamp_millis_opt(ms)
            .unwrap()
            .format("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    fn runs(schedule: &Schedule, from: i64, n: usize, tz: &str) -> Vec<String> {
        let mut at = from;
        let mut out = Vec::new();
        for _ in 0..n {
            at = schedule.next_after(at).unwrap();
            out.push(show(at, tz));
        }
        out
    }

    #[test]
    fn daily_cron_across_both_dst_changes_in_berlin() {
        let tz = "Europe/Berlin";
        let s = cron("30 2 * * *", tz);
        // Spring: 02:00 → 03:00 on 2026-03-29; the 02:30 run happens right after the change.
        assert_eq!(
            runs(&s, local(tz, "2026-03-27 12:00"), 3, tz),
            [
                "2026-03-28 02:30 CET",
                "2026-03-29 03:00 CEST",
                "2026-03-30 02:30 CEST"
            ]
        );
        // Autumn: 03:00 → 02:00 on 2026-10-25; 02:30 happens twice, the job runs once.
        assert_eq!(
            runs(&s, local(tz, "2026-10-23 12:00"), 3, tz),
            [
                "2026-10-24 02:30 CEST",
                "2026-10-25 02:30 CEST",
                "2026-10-26 02:30 CET"
            ]
        );
        // A job away from the switch keeps its wall-clock time on both sides.
        let nine = cron("0 9 * * *", tz);
        assert_eq!(
            runs(&nine, local(tz, "2026-03-28 12:00"), 2, tz),
            ["2026-03-29 09:00 CEST", "2026-03-30 09:00 CEST"]
        );
    }

    #[test]
    fn weekday_cron_across_both_dst_changes_in_new_york() {
        let tz = "America/New_York";
        // Every weekday at 9: DST starts 2026-03-08, ends 2026-11-01 (both Sundays).
        let s = cron("0 9 * * 1-5", tz);
        assert_eq!(
            runs(&s, local(tz, "2026-03-06 10:00"), 2, tz),
            ["2026-03-09 09:00 EDT", "2026-03-10 09:00 EDT"]
        );
        assert_eq!(
            runs(&s, local(tz, "2026-10-30 10:00"), 2, tz),
            ["2026-11-02 09:00 EST", "2026-11-03 09:00 EST"]
        );
        // 1:30 AM on the autumn Sunday happens twice; it runs once.
        let s = cron("30 1 * * *", tz);
        assert_eq!(
            runs(&s, local(tz, "2026-10-31 12:00"), 2, tz),
            ["2026-11-01 01:30 EDT", "2026-11-02 01:30 EST"]
        );
    }

    #[test]
    fn next_run_counts_from_the_scheduled_time_not_now() {
        let s = cron("0 * * * *", "UTC");
        let scheduled = local("UTC", "2026-01-01 10:00");
        assert_eq!(
            s.next_after(scheduled),
            Some(local("UTC", "2026-01-01 11:00"))
        );
        let every = Schedule::parse(&v1::Schedule {
            kind: "interval".into(),
            interval_secs: 90,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(every.next_after(1_000), Some(91_000));
        assert_eq!(every.first(5_000), Some(95_000));
    }

    #[test]
    fn once_in_a_zone_and_rfc3339() {
        let s = Schedule::parse(&v1::Schedule {
            kind: "once".into(),
            at: "2026-12-01 09:00".into(),
            timezone: "Europe/Berlin".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.first(0), Some(local("UTC", "2026-12-01 08:00")));
        assert_eq!(s.next_after(0), None);
        let s = Schedule::parse(&v1::Schedule {
            kind: "once".into(),
            at: "2026-12-01T09:00:00+01:00".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.first(0), Some(local("UTC", "2026-12-01 08:00")));
    }

    #[test]
    fn bad_schedules_say_why() {
        let parse = |kind: &str, cron: &str, secs: i64, at: &str, tz: &str| {
            Schedule::parse(&v1::Schedule {
                kind: kind.into(),
                cron: cron.into(),
                interval_secs: secs,
                at: at.into(),
                timezone: tz.into(),
            })
            .unwrap_err()
            .to_string()
        };
        assert!(parse("cron", "61 * * * *", 0, "", "").contains("invalid cron expression"));
        assert!(parse("cron", "* * *", 0, "", "").contains("five fields"));
        assert!(parse("cron", "0 0 30 2 *", 0, "", "").contains("never matches"));
        assert!(parse("cron", "0 9 * * *", 0, "", "Mars/Olympus").contains("unknown time zone"));
        assert!(parse("interval", "", 0, "", "").contains("at least 1 second"));
        assert!(parse("once", "", 0, "tomorrow", "").contains("invalid moment"));
        assert!(
            parse("once", "", 0, "2026-03-29 02:30", "Europe/Berlin")
                .contains("daylight-saving gap")
        );
        assert!(parse("hourly", "", 0, "", "").contains("cron, interval or once"));
    }
}
