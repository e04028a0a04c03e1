//! `ListAgentUsage`: model tokens per agent, all time and per UTC day of a window.

use ferroclaw_proto::v1::{AgentUsage, DailyUsage as DailyProto, ListAgentUsageResponse};

use crate::error::{Result, RunnerError};
use crate::registry::{DailyUsage, Usage};
use crate::service::RunnerService;
use crate::utc_day::{DAY_MS, utc_day};

/// Days in the window when the request says 0.
const DEFAULT_DAYS: u32 = 30;
/// The longest window (a leap year).
pub const MAX_DAYS: u32 = 366;

/// The first UTC day ("YYYY-MM-DD") of the last `days` days up to `now_ms`, today
/// included; `days` 0 means [`DEFAULT_DAYS`].
pub fn window_start(days: u32, now_ms: i64) -> Result<String> {
    let days = match days {
        0 => DEFAULT_DAYS,
        1..=MAX_DAYS => days,
        _ => {
            return Err(RunnerError::InvalidArgument(format!(
                "days {days} is out of range: 1 to {MAX_DAYS} (0 for {DEFAULT_DAYS})"
            )));
        }
    };
    Ok(utc_day(now_ms - i64::from(days - 1) * DAY_MS))
}

/// Every agent with usage, by name: its all-time totals and its days (oldest first).
/// `totals` and `days` come sorted by agent (and day).
pub fn assemble(totals: Vec<(String, Usage)>, days: Vec<DailyUsage>) -> Vec<AgentUsage> {
    let mut agents: Vec<AgentUsage> = totals
        .into_iter()
        .map(|(agent, u)| AgentUsage {
            agent,
            requests: u.requests,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            days: Vec::new(),
        })
        .collect();
    for d in days {
        let at = match agents.binary_search_by(|a| a.agent.as_str().cmp(&d.agent)) {
            Ok(at) => at,
            // Days but no total: not written together (cannot happen), still shown.
            Err(at) => {
                agents.insert(
                    at,
                    AgentUsage {
                        agent: d.agent.clone(),
                        ..Default::default()
                    },
                );
                at
            }
        };
        agents[at].days.push(DailyProto {
            day: d.day,
            requests: d.usage.requests,
            input_tokens: d.usage.input_tokens,
            output_tokens: d.usage.output_tokens,
        });
    }
    agents
}

impl RunnerService {
    pub(crate) async fn agent_usage(&self, days: u32) -> Result<ListAgentUsageResponse> {
        let since = window_start(days, ferroclaw_mailbox::now_ms())?;
        let totals = self.registry.usage_by_agent().await?;
        let days = self.registry.daily_usage(&since).await?;
        Ok(ListAgentUsageResponse {
            agents: assemble(totals, days),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEC_1_2026: i64 = 1_796_083_200_000;

    fn usage(requests: i64) -> Usage {
        Usage {
            requests,
            input_tokens: requests * 10,
            output_tokens: requests,
        }
    }

    fn day(agent: &str, day: &str, requests: i64) -> DailyUsage {
        DailyUsage {
            agent: agent.into(),
            day: day.into(),
            usage: usage(requests),
        }
    }

    #[test]
    fn the_window_ends_today() {
        assert_eq!(window_start(1, DEC_1_2026 + 5).unwrap(), "2026-12-01");
        assert_eq!(window_start(2, DEC_1_2026).unwrap(), "2026-11-30");
        assert_eq!(window_start(0, DEC_1_2026).unwrap(), "2026-11-02");
        assert_eq!(window_start(366, DEC_1_2026).unwrap(), "2025-12-01");
        assert!(matches!(
            window_start(367, DEC_1_2026),
            Err(RunnerError::InvalidArgument(m)) if m.contains("1 to 366")
        ));
    }

    #[test]
    fn agents_carry_their_totals_and_days() {
        let agents = assemble(
            vec![("a".into(), usage(5)), ("c".into(), usage(1))],
            vec![
                day("a", "2026-11-30", 1),
                day("a", "2026-12-01", 2),
                day("b", "2026-12-01", 3),
            ],
        );
        let names: Vec<&str> = agents.iter().map(|a| a.agent.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            (
                agents[0].requests,
                agents[0].input_tokens,
                agents[0].output_tokens
            ),
            (5, 50, 5)
        );
        let days: Vec<(&str, i64)> = agents[0]
            .days
            .iter()
            .map(|d| (d.day.as_str(), d.requests))
            .collect();
        assert_eq!(days, [("2026-11-30", 1), ("2026-12-01", 2)]);
        assert_eq!(agents[1].days.len(), 1);
        assert!(agents[2].days.is_empty(), "no usage in the window");
    }
}
