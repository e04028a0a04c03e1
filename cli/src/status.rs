//! `ferroclaw status` and `ferroclaw sessions`: what the operator console shows, as
//! aligned tables in the terminal (read from `GET /v1/status` and `GET /v1/sessions`).

use ferroclaw_common::spend::{count as grouped, dollars};
use serde_json::Value;

use crate::api::{ApiArgs, call, encode};
use crate::table::{Table, Tone, ago, colour_on};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// Prints the status; fails (exit 1) when a service does not answer, so scripts can use it.
pub async fn status(api: &ApiArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let body = call(api.request(&client, reqwest::Method::GET, "/v1/status")).await?;
    let (report, all_up) = render_status(&body, now_ms(), colour_on());
    print!("{report}");
    if !all_up {
        anyhow::bail!("a service does not answer");
    }
    Ok(())
}

/// The status as text, and whether every service answers.
pub fn render_status(body: &Value, now: i64, colour: bool) -> (String, bool) {
    let mut out = format!("ferroclaw {}\n\n", text(&body["version"]));
    let mut services = Table::new(vec!["SERVICE", "STATE"]);
    let mut all_up = true;
    for name in ["gateway", "runner", "delivery", "scheduler"] {
        let up = body["services"][name].as_bool().unwrap_or(false);
        all_up &= up;
        services.row(vec![
            (name.into(), Tone::Plain),
            if up {
                ("ready".into(), Tone::Good)
            } else {
                ("unreachable".into(), Tone::Bad)
            },
        ]);
    }
    out.push_str(&services.render(0, colour));
    let agents = &body["agents"];
    out.push('\n');
    if agents.is_null() {
        out.push_str("Agents: unknown while the runner does not answer.\n");
    } else {
        let running = agents["running"].as_u64().unwrap_or(0);
        let cap = agents["max_running_agents"].as_u64().unwrap_or(0);
        let mut table = Table::new(vec!["AGENTS", ""]);
        let backend = text(&agents["backend"]);
        table.row(vec![
            ("backend".into(), Tone::Plain),
            (backend.clone(), Tone::Plain),
        ]);
        if backend == "docker" {
            let ok = agents["engine_ok"].as_bool().unwrap_or(false);
            table.row(vec![
                ("docker engine".into(), Tone::Plain),
                (
                    text(&agents["engine"]),
                    if ok { Tone::Good } else { Tone::Bad },
                ),
            ]);
        }
        table.row(vec![
            ("running".into(), Tone::Plain),
            (
                format!("{running} of {cap}"),
                if cap > 0 && running >= cap {
                    Tone::Warn
                } else {
                    Tone::Plain
                },
            ),
        ]);
        let queued = agents["queued"].as_u64().unwrap_or(0);
        table.row(vec![
            ("queued".into(), Tone::Plain),
            (
                queued.to_string(),
                if queued > 0 { Tone::Warn } else { Tone::Plain },
            ),
        ]);
        table.row(vec![
            ("sessions".into(), Tone::Plain),
            (text(&agents["sessions"]), Tone::Plain),
        ]);
        table.row(vec![
            ("agent starts".into(), Tone::Plain),
            (text(&agents["agent_starts_total"]), Tone::Plain),
        ]);
        out.push_str(&table.render(0, colour));
    }
    let deliveries = &body["deliveries"];
    out.push('\n');
    if deliveries.is_null() {
        out.push_str("Deliveries: unknown while delivery does not answer.\n");
        return (out, all_up);
    }
    let failed = deliveries["failed"].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "Deliveries (the {} most recent): {} delivered, {} pending, {} failed\n",
        text(&deliveries["recent"]),
        text(&deliveries["delivered"]),
        text(&deliveries["pending"]),
        failed,
    ));
    let failures = deliveries["failures"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !failures.is_empty() {
        let mut table =
            Table::new(vec!["WHEN", "SESSION", "SEQ", "TO", "REASON", "RETRY"]).right(&[2]);
        for f in &failures {
            let to = &f["destination"];
            let target = ["conversation", "channel_id", "source"]
                .iter()
                .find_map(|k| to[*k].as_str())
                .unwrap_or("");
            table.row(vec![
                (ago(f["updated_at"].as_i64().unwrap_or(0), now), Tone::Dim),
                (text(&f["session_id"]), Tone::Plain),
                (text(&f["out_seq"]), Tone::Plain),
                (
                    format!("{} {target}", text(&to["kind"])).trim().to_string(),
                    Tone::Plain,
                ),
                (text(&f["reason"]), Tone::Bad),
                if f["retryable"].as_bool().unwrap_or(false) {
                    ("yes".into(), Tone::Warn)
                } else {
                    ("no".into(), Tone::Dim)
                },
            ]);
        }
        out.push_str(&table.render(2, colour));
    }
    (out, all_up)
}

#[derive(clap::Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Only this agent's sessions.
    #[arg(long)]
    agent: Option<String>,
    /// Only sessions in this state: idle, queued, running, backoff or unavailable.
    #[arg(long)]
    state: Option<String>,
    /// recent (latest activity first), oldest or created.
    #[arg(long, default_value = "recent")]
    sort: String,
    /// Rows to show (1–500).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Rows to skip.
    #[arg(long, default_value_t = 0)]
    offset: u32,
}

pub async fn sessions(args: &SessionsArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut path = format!(
        "/v1/sessions?sort={}&limit={}&offset={}",
        encode(&args.sort),
        args.limit,
        args.offset
    );
    for (key, value) in [("agent", &args.agent), ("state", &args.state)] {
        if let Some(value) = value {
            path.push_str(&format!("&{key}={}", encode(value)));
        }
    }
    let body = call(args.api.request(&client, reqwest::Method::GET, &path)).await?;
    print!(
        "{}",
        render_sessions(&body, args.offset, now_ms(), colour_on())
    );
    Ok(())
}

pub fn render_sessions(body: &Value, offset: u32, now: i64, colour: bool) -> String {
    let sessions = body["sessions"].as_array().cloned().unwrap_or_default();
    let mut table = Table::new(vec![
        "SESSION",
        "AGENT",
        "CHANNEL",
        "STATE",
        "LAST ACTIVITY",
        "IN",
        "OUT",
        "PENDING",
        "TOKENS",
        "COST",
    ])
    .right(&[5, 6, 7, 8, 9]);
    for s in &sessions {
        let state = text(&s["agent_state"]);
        let tone = match state.as_str() {
            "running" => Tone::Good,
            "queued" | "backoff" => Tone::Warn,
            "unavailable" => Tone::Bad,
            _ => Tone::Plain,
        };
        let tokens =
            s["input_tokens"].as_i64().unwrap_or(0) + s["output_tokens"].as_i64().unwrap_or(0);
        let count = |v: &Value| v.as_i64().map_or_else(|| "—".into(), grouped);
        table.row(vec![
            (text(&s["id"]), Tone::Plain),
            (text(&s["agent"]), Tone::Plain),
            (text(&s["conversation_key"]), Tone::Plain),
            (state, tone),
            (
                ago(s["last_activity"].as_i64().unwrap_or(0), now),
                Tone::Dim,
            ),
            (count(&s["messages_in"]), Tone::Plain),
            (count(&s["messages_out"]), Tone::Plain),
            (count(&s["pending"]), Tone::Plain),
            (grouped(tokens), Tone::Plain),
            (dollars(s["cost_usd"].as_f64()), Tone::Plain),
        ]);
    }
    let matched = body["matched"].as_u64().unwrap_or(sessions.len() as u64);
    let mut out = if table.is_empty() {
        "No sessions.\n".to_string()
    } else {
        table.render(0, colour)
    };
    let shown_to = u64::from(offset) + sessions.len() as u64;
    out.push_str(&format!(
        "\n{} of {matched} sessions{}\n",
        sessions.len(),
        if shown_to < matched {
            format!(" (next: --offset {shown_to})")
        } else {
            String::new()
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_lists_services_agents_and_failures() {
        let body = json!({
            "version": "0.1.0",
            "services": {"gateway": true, "runner": true, "delivery": true, "scheduler": false},
            "agents": {"backend": "docker", "engine_ok": true, "engine": "Docker 20.10.24, API 1.41",
                "max_running_agents": 8, "running": 8, "queued": 2, "sessions": 41, "agent_starts_total": 17},
            "deliveries": {"recent": 3, "pending": 0, "delivered": 2, "failed": 1, "failures": [
                {"session_id": "ses-1", "out_seq": 4, "destination": {"kind": "discord", "channel_id": "42"},
                 "reason": "Discord could not be reached.", "retryable": true, "updated_at": 1000}]}
        });
        let (text, all_up) = render_status(&body, 61_000, false);
        assert!(!all_up);
        assert!(text.contains("scheduler  unreachable"), "{text}");
        assert!(text.contains("running        8 of 8"), "{text}");
        assert!(text.contains("docker engine  Docker 20.10.24, API 1.41"));
        assert!(text.contains("2 delivered, 0 pending, 1 failed"));
        assert!(
            text.contains(
                "1 min ago  ses-1      4  discord 42  Discord could not be reached.  yes"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_runner_that_does_not_answer_is_said_plainly() {
        let body = json!({"version": "0.1.0",
            "services": {"gateway": true, "runner": false, "delivery": false, "scheduler": true},
            "agents": null, "deliveries": null});
        let (text, _) = render_status(&body, 0, false);
        assert!(text.contains("Agents: unknown while the runner does not answer."));
        assert!(text.contains("Deliveries: unknown while delivery does not answer."));
    }

    #[test]
    fn sessions_print_as_aligned_rows_with_a_pointer_to_the_next_page() {
        let body = json!({"matched": 3, "total": 3, "sessions": [
            {"id": "ses-a", "agent": "main", "conversation_key": "api:c1", "agent_state": "running",
             "last_activity": 1000, "messages_in": 12, "messages_out": 1400, "pending": 0,
             "input_tokens": 1000, "output_tokens": 234, "cost_usd": 0.0123},
            {"id": "ses-b", "agent": "ops", "conversation_key": "discord:9", "agent_state": "idle",
             "last_activity": 0, "messages_in": null, "messages_out": null, "pending": 0,
             "input_tokens": 0, "output_tokens": 0, "cost_usd": null}]});
        let text = render_sessions(&body, 0, 5_000, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("SESSION  AGENT  CHANNEL    STATE"),
            "{text}"
        );
        assert!(
            lines[1].contains("running")
                && lines[1].contains("1,400")
                && lines[1].contains("$0.012")
        );
        assert!(lines[2].contains("never") && lines[2].contains("—"));
        // Every row is as wide as the header's columns make it.
        assert_eq!(lines[1].find("main"), lines[0].find("AGENT"));
        assert!(
            text.contains("2 of 3 sessions (next: --offset 2)"),
            "{text}"
        );
    }
}
