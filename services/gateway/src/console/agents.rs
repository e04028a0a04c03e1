//! The agents and spend page: each agent's provider and model, its tokens and cost per
//! UTC day over the last [`DAYS`] days as a small bar chart (inline SVG, no chart
//! library, no script), and what is left of its token budget.

use std::collections::HashMap;

use axum::extract::State;
use axum::response::Response;
use chrono::{Duration, Utc};
use ferroclaw_common::config::AgentConfig;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{AgentUsage, DailyUsage, ListAgentUsageRequest};
use maud::{Markup, html};

use ferroclaw_common::spend;

use super::layout::{self, respond};
use super::{Console, ConsoleError, Operator};

/// Days the chart covers, today included.
pub const DAYS: u32 = 30;
/// The chart's drawing size (SVG user units; it scales to the page's width).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;

/// `GET /ui/agents`.
pub async fn page(State(state): Console, operator: Operator) -> Result<Response, ConsoleError> {
    let usage = RunnerClient::new(state.app.runner.clone())
        .list_agent_usage(ListAgentUsageRequest { days: DAYS })
        .await?
        .into_inner()
        .agents;
    let by_agent: HashMap<&str, &AgentUsage> =
        usage.iter().map(|u| (u.agent.as_str(), u)).collect();
    let days = last_days(Utc::now().date_naive(), DAYS);
    let body = html! {
        h1 { "Agents and spend" }
        @for agent in &state.app.config.agents {
            (agent_section(agent, by_agent.get(agent.name.as_str()).copied(), &days))
        }
        // Usage recorded for agents no longer configured still counts.
        @for u in usage.iter().filter(|u| state.app.config.agent(&u.agent).is_none()) {
            section.agent {
                h2 { (u.agent) " " span.note { "(no longer configured)" } }
                p { (spend::count(u.input_tokens + u.output_tokens)) " tokens in all." }
            }
        }
        p.note { "Tokens are counted by the runner's credential proxy from each model answer. Costs use each agent's "
            code { "price_per_mtok" } " (dollars per million input and output tokens); days are UTC." }
    };
    Ok(respond(layout::page(
        "Agents",
        "/ui/agents",
        Some(&operator),
        body,
    )))
}

/// The `count` UTC days up to `today`, oldest first, as the runner names them.
fn last_days(today: chrono::NaiveDate, count: u32) -> Vec<String> {
    (0..count)
        .rev()
        .map(|back| {
            (today - Duration::days(i64::from(back)))
                .format("%Y-%m-%d")
                .to_string()
        })
        .collect()
}

fn agent_section(agent: &AgentConfig, usage: Option<&AgentUsage>, days: &[String]) -> Markup {
    let (input, output, requests) =
        usage.map_or((0, 0, 0), |u| (u.input_tokens, u.output_tokens, u.requests));
    let price = agent.price_per_mtok;
    let window: Vec<(String, Option<&DailyUsage>)> = days
        .iter()
        .map(|d| {
            let found = usage.and_then(|u| u.days.iter().find(|x| &x.day == d));
            (d.clone(), found)
        })
        .collect();
    let in_window: i64 = window
        .iter()
        .filter_map(|(_, d)| d.map(|d| d.input_tokens + d.output_tokens))
        .sum();
    html! {
        section.agent data-agent=(agent.name) {
            h2 { (agent.name) }
            ul.facts {
                li { "Provider: " (agent.provider) }
                li { "Model: " (agent.model.as_deref().unwrap_or("—")) }
                li { "Tokens in all: " (spend::count(input + output)) " (" (spend::count(input)) " in, " (spend::count(output)) " out, " (spend::count(requests)) " requests)" }
                li { "Cost in all: " (spend::dollars(spend::cost_usd(price, input, output))) }
                li.budget { "Budget: " (budget(agent.token_budget, input + output)) }
            }
            @if in_window > 0 {
                (chart(&window, price))
            } @else {
                p.note { "No model use in the last " (days.len()) " days." }
            }
        }
    }
}

/// "1,200 of 5,000,000 tokens used, 4,998,800 left", or "no limit".
fn budget(limit: Option<u64>, used: i64) -> String {
    match limit {
        None => "no limit".into(),
        Some(limit) => {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let left = limit.saturating_sub(used).max(0);
            let spent = if left == 0 { " — spent" } else { "" };
            format!(
                "{} of {} tokens used, {} left{spent}",
                spend::count(used),
                spend::count(limit),
                spend::count(left)
            )
        }
    }
}

/// Tokens per day as bars, each with a tooltip (day, tokens, cost); the last bar is today.
fn chart(window: &[(String, Option<&DailyUsage>)], price: Option<(f64, f64)>) -> Markup {
    let totals: Vec<i64> = window
        .iter()
        .map(|(_, d)| d.map_or(0, |d| d.input_tokens + d.output_tokens))
        .collect();
    let highest = totals.iter().copied().max().unwrap_or(0).max(1) as f64;
    let slot = WIDTH / window.len().max(1) as f64;
    let first = window.first().map(|(d, _)| d.as_str()).unwrap_or_default();
    let last = window.last().map(|(d, _)| d.as_str()).unwrap_or_default();
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {WIDTH} {}", HEIGHT + 16.0)) role="img"
                aria-label=(format!("tokens per day from {first} to {last}; highest {}", spend::count(highest as i64))) {
                line.axis x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
                @for (i, ((day, d), total)) in window.iter().zip(&totals).enumerate() {
                    @let i = i as f64;
                    @let h = if *total > 0 { (*total as f64 / highest * HEIGHT).max(1.0) } else { 0.0 };
                    @let cost = d.map(|d| spend::cost_usd(price, d.input_tokens, d.output_tokens)).unwrap_or(None);
                    rect.bar x=(format!("{:.1}", i * slot + 1.0)) y=(format!("{:.1}", HEIGHT - h))
                        width=(format!("{:.1}", (slot - 2.0).max(1.0))) height=(format!("{h:.1}")) {
                        title { (day) ": " (spend::count(*total)) " tokens, " (spend::dollars(cost)) }
                    }
                }
                text x="0" y=(HEIGHT + 13.0) { (first) }
                text x=(WIDTH) y=(HEIGHT + 13.0) text-anchor="end" { (last) }
            }
            figcaption { "Tokens per day (UTC), highest " (spend::count(highest as i64)) "." }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(day: &str, input: i64, output: i64) -> DailyUsage {
        DailyUsage {
            day: day.into(),
            requests: 1,
            input_tokens: input,
            output_tokens: output,
        }
    }

    #[test]
    fn the_window_ends_today_oldest_first() {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
        assert_eq!(
            last_days(today, 3),
            ["2026-02-28", "2026-03-01", "2026-03-02"]
        );
    }

    #[test]
    fn a_section_draws_one_bar_per_day_and_says_the_budget_left() {
        let mut agent = AgentConfig::echo("main");
        agent.token_budget = Some(10_000);
        agent.price_per_mtok = Some((3.0, 15.0));
        let usage = AgentUsage {
            agent: "main".into(),
            requests: 4,
            input_tokens: 3_000,
            output_tokens: 1_000,
            days: vec![day("2026-03-01", 1_000, 500), day("2026-03-02", 2_000, 500)],
        };
        let days = last_days(chrono::NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(), 30);
        let html = agent_section(&agent, Some(&usage), &days).into_string();
        assert_eq!(html.matches("<rect").count(), 30);
        assert!(
            html.contains("4,000 of 10,000 tokens used, 6,000 left"),
            "{html}"
        );
        assert!(html.contains("2026-03-02: 2,500 tokens, $0.013"), "{html}");
        // The highest bar fills the chart; a day without use has no height.
        assert!(html.contains(r#"y="0.0""#) && html.contains(r#"height="120.0""#));
        assert!(html.contains(r#"height="0.0""#));
    }

    #[test]
    fn budgets_read_plainly() {
        assert_eq!(budget(None, 5), "no limit");
        assert_eq!(
            budget(Some(100), 150),
            "150 of 100 tokens used, 0 left — spent"
        );
    }

    #[test]
    fn an_agent_without_use_says_so() {
        let days = last_days(chrono::NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(), 30);
        let html = agent_section(&AgentConfig::echo("main"), None, &days).into_string();
        assert!(html.contains("No model use in the last 30 days."));
        assert!(!html.contains("<svg"));
    }
}
