//! A task's schedule in words ("every weekday at 09:00 Europe/Berlin") for the common
//! shapes; anything else shows the cron expression itself, which is never wrong.

use ferroclaw_proto::v1::Schedule;

/// The schedule in words.
pub fn describe(schedule: &Schedule) -> String {
    let zone = if schedule.timezone.is_empty() {
        String::new()
    } else {
        format!(" {}", schedule.timezone)
    };
    match schedule.kind.as_str() {
        "interval" => interval(schedule.interval_secs),
        "once" => format!("once at {}{zone}", schedule.at),
        "cron" => match cron(&schedule.cron) {
            Some((words, true)) => format!("{words}{zone}"),
            Some((words, false)) => words,
            None => format!("cron “{}”{zone}", schedule.cron),
        },
        other => format!("{other} schedule"),
    }
}

fn interval(secs: i64) -> String {
    let units = [
        (86_400, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    for (size, unit) in units {
        if secs >= size && secs % size == 0 {
            return match secs / size {
                1 => format!("every {unit}"),
                n => format!("every {n} {unit}s"),
            };
        }
    }
    format!("every {secs} seconds")
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Five-field cron in words, for fixed times on all days, weekdays, weekends or one day,
/// and for `*/n` minutes or hours; `None` for anything else. The flag: whether the words
/// name a time of day (then the time zone matters and is shown).
fn cron(expr: &str) -> Option<(String, bool)> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = fields[..] else {
        return None;
    };
    if dom != "*" || month != "*" {
        return None;
    }
    let number = |f: &str, max: u32| f.parse::<u32>().ok().filter(|n| *n <= max);
    let step = |f: &str| f.strip_prefix("*/").and_then(|n| n.parse::<u32>().ok());
    if dow == "*" {
        match (minute, hour) {
            ("*", "*") => return Some(("every minute".into(), false)),
            (m, "*") if step(m).is_some() => {
                return step(m).map(|n| (format!("every {n} minutes"), false));
            }
            (m, "*") => {
                return number(m, 59).map(|m| (format!("every hour at :{m:02}"), false));
            }
            (m, h) if step(h).is_some() => {
                let m = number(m, 59)?;
                return step(h).map(|n| (format!("every {n} hours at :{m:02}"), false));
            }
            _ => {}
        }
    }
    let (h, m) = (number(hour, 23)?, number(minute, 59)?);
    let days = match dow {
        "*" => "every day".to_string(),
        "1-5" | "MON-FRI" | "mon-fri" => "every weekday".into(),
        "0,6" | "6,0" | "6,7" | "SAT,SUN" | "sat,sun" => "every weekend day".into(),
        d => format!("every {}", DAYS[number(d, 7)? as usize % 7]),
    };
    Some((format!("{days} at {h:02}:{m:02}"), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron_in(expr: &str, tz: &str) -> String {
        describe(&Schedule {
            kind: "cron".into(),
            cron: expr.into(),
            timezone: tz.into(),
            ..Default::default()
        })
    }

    #[test]
    fn common_crons_read_as_words() {
        let tz = "Europe/Berlin";
        assert_eq!(
            cron_in("0 9 * * 1-5", tz),
            "every weekday at 09:00 Europe/Berlin"
        );
        assert_eq!(cron_in("30 7 * * *", "UTC"), "every day at 07:30 UTC");
        assert_eq!(cron_in("0 18 * * 5", ""), "every Friday at 18:00");
        assert_eq!(cron_in("0 10 * * 0", ""), "every Sunday at 10:00");
        assert_eq!(cron_in("0 10 * * 7", ""), "every Sunday at 10:00");
        assert_eq!(cron_in("0 10 * * 6,0", ""), "every weekend day at 10:00");
        assert_eq!(cron_in("*/15 * * * *", tz), "every 15 minutes");
        assert_eq!(cron_in("5 * * * *", tz), "every hour at :05");
        assert_eq!(cron_in("0 */2 * * *", tz), "every 2 hours at :00");
        assert_eq!(cron_in("* * * * *", tz), "every minute");
    }

    #[test]
    fn other_crons_show_the_expression() {
        for expr in [
            "0 9 1 * *",
            "0 9 * * 1,3",
            "61 9 * * *",
            "0 24 * * *",
            "bad",
            "",
        ] {
            assert_eq!(cron_in(expr, "UTC"), format!("cron “{expr}” UTC"), "{expr}");
        }
    }

    #[test]
    fn intervals_and_one_offs() {
        let every = |secs| {
            describe(&Schedule {
                kind: "interval".into(),
                interval_secs: secs,
                ..Default::default()
            })
        };
        assert_eq!(every(1), "every second");
        assert_eq!(every(90), "every 90 seconds");
        assert_eq!(every(3600), "every hour");
        assert_eq!(every(7200), "every 2 hours");
        assert_eq!(every(86_400), "every day");
        assert_eq!(every(120), "every 2 minutes");
        let once = describe(&Schedule {
            kind: "once".into(),
            at: "2026-01-01T09:00:00+01:00".into(),
            timezone: "Europe/Berlin".into(),
            ..Default::default()
        });
        assert_eq!(once, "once at 2026-01-01T09:00:00+01:00 Europe/Berlin");
    }
}
