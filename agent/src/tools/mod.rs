//! The tools a model agent offers its model. A tool never crashes the agent: whatever goes
//! wrong comes back to the model as an error result it can read and act on.

mod messaging;
mod tasks;
mod web_fetch;
mod workspace;

use std::path::PathBuf;
use std::time::Duration;

use ferroclaw_mailbox::{AgentMailbox, Destination};
use serde_json::{Value, json};

use crate::model::ToolSpec;
use crate::provider::Reply;

/// Limits of the tools, from the environment where tests shorten them.
#[derive(Debug, Clone)]
pub struct ToolLimits {
    pub bash_timeout: Duration,
    /// Characters of tool output the model gets back (the middle of longer output is cut).
    pub output_cap: usize,
    pub question_timeout: Duration,
    pub max_file_bytes: u64,
    /// Hosts `web_fetch` may reach although they resolve to a private or local address
    /// (`agents.web_fetch_allow`, passed as `FERROCLAW_WEB_FETCH_ALLOW`).
    pub web_fetch_allow: Vec<String>,
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self {
            bash_timeout: Duration::from_secs(120),
            output_cap: 30_000,
            question_timeout: Duration::from_secs(600),
            max_file_bytes: 25 * 1024 * 1024,
            web_fetch_allow: Vec::new(),
        }
    }
}

impl ToolLimits {
    pub fn from_env() -> Self {
        let secs = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| *s > 0.0)
                .map(Duration::from_secs_f64)
        };
        let mut limits = Self::default();
        if let Some(d) = secs("FERROCLAW_BASH_TIMEOUT_SECS") {
            limits.bash_timeout = d;
        }
        if let Some(d) = secs("FERROCLAW_QUESTION_TIMEOUT_SECS") {
            limits.question_timeout = d;
        }
        if let Ok(allow) = std::env::var("FERROCLAW_WEB_FETCH_ALLOW") {
            limits.web_fetch_allow = allow
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
        }
        limits
    }
}

/// What one turn's tools work with and what they leave behind.
pub struct ToolContext<'a> {
    pub mailbox: &'a AgentMailbox,
    /// The agent's folder: the working directory of bash and of relative paths.
    pub workspace: PathBuf,
    /// Where this turn's messages came from and its replies go.
    pub destination: Destination,
    pub in_reply_to: i64,
    pub limits: ToolLimits,
    /// Messages and actions the tools produced, written with the batch's completion.
    pub replies: Vec<Reply>,
    /// Inbound seqs the turn consumed (answers to its questions), completed with the batch.
    pub consumed: Vec<i64>,
    pub http: reqwest::Client,
    /// API conversations `send_message` may also send to (the agent's `send_to`).
    pub send_to: Vec<String>,
}

/// The agent's `send_to` list, as the runner passes it.
pub fn send_to_from_env() -> Vec<String> {
    std::env::var("FERROCLAW_SEND_TO")
        .unwrap_or_default()
        .split(',')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// A tool's result: text for the model, or an error message it can act on.
pub type ToolResult = Result<String, String>;

/// Every tool, as the model sees it.
pub fn specs() -> Vec<ToolSpec> {
    let mut specs = messaging::specs();
    specs.extend(tasks::specs());
    specs.extend(workspace::specs());
    specs
}

/// Runs one tool call.
pub async fn run(name: &str, input: &Value, ctx: &mut ToolContext<'_>) -> ToolResult {
    if !input.is_object() {
        return Err(format!("{name}: the input must be a JSON object"));
    }
    match name {
        "send_message" => messaging::send_message(input, ctx),
        "send_file" => messaging::send_file(input, ctx),
        "ask_user_question" => messaging::ask_user_question(input, ctx).await,
        "list_tasks" => tasks::list_tasks(ctx).await,
        "schedule_task" | "update_task" | "pause_task" | "resume_task" | "cancel_task" => {
            tasks::task_action(name, input, ctx)
        }
        "bash" => workspace::bash(input, &ctx.workspace, &ctx.limits).await,
        "read_file" => workspace::read_file(input, &ctx.workspace, &ctx.limits),
        "write_file" => workspace::write_file(input, &ctx.workspace),
        "edit_file" => workspace::edit_file(input, &ctx.workspace),
        "glob" => workspace::glob(input, &ctx.workspace),
        "grep" => workspace::grep(input, &ctx.workspace, &ctx.limits),
        "web_fetch" => web_fetch::web_fetch(input, &ctx.limits).await,
        other => Err(format!("there is no tool named {other:?}")),
    }
}

/// Every file of the workspace (for `/files`).
pub fn list_workspace(workspace: &std::path::Path) -> ToolResult {
    workspace::glob(&json!({"pattern": "**"}), workspace)
}

/// A required string field.
fn text<'v>(input: &'v Value, field: &str) -> Result<&'v str, String> {
    input[field]
        .as_str()
        .ok_or_else(|| format!("{field} (a string) is required"))
}

/// Keeps the head and tail of long output, saying how much was cut.
pub fn cap(output: &str, max: usize) -> String {
    let chars = output.chars().count();
    if chars <= max {
        return output.to_string();
    }
    let head: String = output.chars().take(max / 2).collect();
    let tail: String = output.chars().skip(chars - max / 2).collect();
    format!(
        "{head}\n[… {} characters cut …]\n{tail}",
        chars - 2 * (max / 2)
    )
}

fn object_schema(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_keeps_head_and_tail() {
        assert_eq!(cap("short", 10), "short");
        let long = "a".repeat(50) + &"b".repeat(50);
        let capped = cap(&long, 20);
        assert!(capped.starts_with("aaaaaaaaaa\n[… 80 characters cut …]\n"));
        assert!(capped.ends_with("bbbbbbbbbb"));
    }

    #[test]
    fn every_spec_has_an_object_schema_and_a_unique_name() {
        let specs = specs();
        let mut names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), specs.len());
        assert!(specs.iter().all(|s| s.schema["type"] == "object"));
        for expected in [
            "send_message",
            "send_file",
            "ask_user_question",
            "schedule_task",
            "list_tasks",
            "update_task",
            "pause_task",
            "resume_task",
            "cancel_task",
            "bash",
            "read_file",
            "write_file",
            "edit_file",
            "glob",
            "grep",
            "web_fetch",
        ] {
            assert!(names.contains(&expected), "{expected}");
        }
    }
}
