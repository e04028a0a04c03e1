//! Scheduled tasks: the model's calls become `action` rows that delivery carries out with
//! the scheduler for this session only; `list_tasks` reads the runner's mirror.

use ferroclaw_mailbox::OutboundContent;
use ferroclaw_mailbox::content::ActionOut;
use serde_json::{Value, json};

use super::{ToolContext, ToolResult, object_schema};
use crate::model::ToolSpec;
use crate::provider::Reply;

fn schedule_properties() -> Value {
    json!({
        "name": {"type": "string"},
        "prompt": {"type": "string", "description": "what you will be asked when it fires"},
        "cron": {"type": "string", "description": "five-field cron, e.g. \"0 9 * * 1-5\""},
        "interval_secs": {"type": "integer"},
        "at": {"type": "string", "description": "one run at this local time, e.g. 2026-12-01T09:00"},
        "timezone": {"type": "string", "description": "IANA zone (default: the conversation's)"},
    })
}

pub fn specs() -> Vec<ToolSpec> {
    let task_id = json!({"task_id": {"type": "string"}});
    let mut update = schedule_properties();
    update["task_id"] = json!({"type": "string"});
    vec![
        ToolSpec {
            name: "schedule_task",
            description: "Schedule a prompt to be run later: give exactly one of cron, interval_secs or at. The task is created when this turn ends.",
            schema: object_schema(schedule_properties(), &["prompt"]),
        },
        ToolSpec {
            name: "list_tasks",
            description: "List this conversation's scheduled tasks.",
            schema: object_schema(json!({}), &[]),
        },
        ToolSpec {
            name: "update_task",
            description: "Change a task's name, prompt or schedule.",
            schema: object_schema(update, &["task_id"]),
        },
        ToolSpec {
            name: "pause_task",
            description: "Pause a task.",
            schema: object_schema(task_id.clone(), &["task_id"]),
        },
        ToolSpec {
            name: "resume_task",
            description: "Resume a paused task.",
            schema: object_schema(task_id.clone(), &["task_id"]),
        },
        ToolSpec {
            name: "cancel_task",
            description: "Cancel a task for good.",
            schema: object_schema(task_id, &["task_id"]),
        },
    ]
}

/// One task action, written with the batch; delivery reports a refusal back to the session.
pub fn task_action(name: &str, input: &Value, ctx: &mut ToolContext<'_>) -> ToolResult {
    if name != "schedule_task" && input["task_id"].as_str().is_none_or(str::is_empty) {
        return Err("task_id is required".into());
    }
    if name == "schedule_task" {
        if input["prompt"].as_str().is_none_or(|p| p.trim().is_empty()) {
            return Err("prompt is required".into());
        }
        let kinds = ["cron", "interval_secs", "at"]
            .iter()
            .filter(|k| !input[**k].is_null())
            .count();
        if kinds != 1 {
            return Err("give exactly one of cron, interval_secs or at".into());
        }
    }
    ctx.replies.push(Reply {
        destination: ctx.destination.clone(),
        in_reply_to: ctx.in_reply_to,
        content: OutboundContent::Action(ActionOut {
            action: name.into(),
            params: input.clone(),
        }),
    });
    Ok(format!(
        "{name} accepted; it takes effect when this turn ends (a refusal will come back as a system message)"
    ))
}

pub async fn list_tasks(ctx: &mut ToolContext<'_>) -> ToolResult {
    let tasks = ctx
        .mailbox
        .tasks()
        .await
        .map_err(|e| format!("reading tasks: {e}"))?;
    if tasks.is_empty() {
        return Ok("no scheduled tasks".into());
    }
    let list: Vec<Value> = tasks
        .into_iter()
        .map(|(id, spec)| {
            let spec: Value = serde_json::from_str(&spec).unwrap_or(Value::String(spec));
            json!({"task_id": id, "spec": spec})
        })
        .collect();
    Ok(Value::Array(list).to_string())
}
