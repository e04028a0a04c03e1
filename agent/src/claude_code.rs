//! The `claude-code` provider: each turn runs the Claude Code CLI
//! (`claude -p … --output-format stream-json`) in the agent's folder, with ferroclaw's own
//! tools offered by `ferroclaw-agent mcp-server`. Claude Code keeps its session in
//! `out/state/claude-home`, and the session id is kept beside it, so a restarted container
//! resumes the same conversation. It reaches the model API through the runner's proxy.

use std::path::PathBuf;
use std::process::Stdio;

use ferroclaw_mailbox::{Destination, InboundRow, JournalMode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::commands::{Command, Segment, segments};
use crate::formatter;
use crate::mcp_server;
use crate::provider::{Folders, Prompt, Reply, by_destination};

/// What survives restarts: Claude Code's session id and the running totals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ClaudeState {
    session_id: Option<String>,
    turns: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
    /// Prompt tokens of the latest turn (for `/context`).
    context_tokens: u64,
}

pub struct ClaudeCode {
    binary: PathBuf,
    model: Option<String>,
    folders: Folders,
    session_dir: PathBuf,
    journal_mode: JournalMode,
    /// The proxy's URL and this session's token (none: Claude Code uses its own login).
    proxy: Option<(String, String)>,
    state: ClaudeState,
}

/// How a turn of the CLI ended.
#[derive(Debug, Default)]
struct Outcome {
    session_id: Option<String>,
    result: Option<String>,
    /// The result's subtype: "success", "error_max_turns", …
    subtype: Option<String>,
    is_error: bool,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

impl ClaudeCode {
    pub fn new(folders: &Folders, session_dir: PathBuf, journal_mode: JournalMode) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let proxy = env("FERROCLAW_MODEL_URL").zip(env("FERROCLAW_MODEL_TOKEN"));
        let state = std::fs::read(folders.state_dir.join("claude-code.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            binary: env("FERROCLAW_CLAUDE_BIN")
                .map_or_else(|| PathBuf::from("claude"), PathBuf::from),
            model: env("FERROCLAW_MODEL"),
            folders: folders.clone(),
            session_dir,
            journal_mode,
            proxy,
            state,
        }
    }

    fn save(&self) {
        let path = self.folders.state_dir.join("claude-code.json");
        let written = serde_json::to_vec(&self.state)
            .map_err(std::io::Error::other)
            .and_then(|json| ferroclaw_common::atomic_file::write(&path, &json));
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot save the Claude Code state");
        }
    }

    pub async fn respond(&mut self, prompt: &Prompt<'_>) -> (Vec<Reply>, Vec<i64>) {
        let mut replies = Vec::new();
        let mut consumed = Vec::new();
        for (destination, rows) in by_destination(prompt.rows) {
            for segment in segments(&rows) {
                match segment {
                    Segment::Turn(turn) => {
                        let text = formatter::format_batch(
                            &turn
                                .iter()
                                .map(|r| (*r).clone())
                                .collect::<Vec<InboundRow>>(),
                            prompt.tz,
                            ferroclaw_mailbox::now_ms(),
                        );
                        let last = turn.last().map_or(0, |r| r.seq);
                        let (r, c) = self.turn(&destination, last, &text).await;
                        replies.extend(r);
                        consumed.extend(c);
                    }
                    Segment::Command(Command::Compact, row) => {
                        // Claude Code compacts its own session.
                        let (r, c) = self.turn(&destination, row.seq, "/compact").await;
                        replies.extend(r);
                        consumed.extend(c);
                    }
                    Segment::Command(command, row) => {
                        let text = self.command(command);
                        replies.push(Reply::chat(&destination, row.seq, text));
                    }
                }
            }
        }
        (replies, consumed)
    }

    fn command(&mut self, command: Command) -> String {
        let s = &self.state;
        match command {
            Command::Clear => {
                self.state.session_id = None;
                self.state.context_tokens = 0;
                self.save();
                "Started a fresh conversation.".into()
            }
            Command::Cost => format!(
                "Tokens so far: {} input, {} output, in {} turns. Cost: about ${:.4} (as Claude Code reports it).",
                s.input_tokens, s.output_tokens, s.turns, s.cost_usd
            ),
            Command::Context => format!(
                "Context: about {} tokens in the latest turn (Claude Code compacts on its own; /compact forces it).",
                s.context_tokens
            ),
            Command::Files => crate::commands::list_files(&self.folders.workspace_dir),
            // Sent to Claude Code as a turn by `respond`; never answered here.
            Command::Compact => "/compact runs as a Claude Code turn.".into(),
        }
    }

    /// Runs the CLI for one turn; its tool messages come from the MCP spool.
    async fn turn(
        &mut self,
        destination: &Destination,
        in_reply_to: i64,
        text: &str,
    ) -> (Vec<Reply>, Vec<i64>) {
        let spool = mcp_server::spool_path(&self.folders.state_dir);
        // Left over from an attempt that died: that attempt's messages were never sent.
        let _ = mcp_server::drain_spool(&spool);
        let outcome = self.run_cli(destination, in_reply_to, text).await;
        let (mut replies, consumed) = mcp_server::drain_spool(&spool);
        match outcome {
            Ok(outcome) => {
                self.state.turns += 1;
                self.state.input_tokens += outcome.input_tokens;
                self.state.output_tokens += outcome.output_tokens;
                self.state.cost_usd += outcome.cost_usd;
                self.state.context_tokens = outcome.input_tokens;
                if outcome.session_id.is_some() {
                    self.state.session_id = outcome.session_id;
                }
                self.save();
                let answer = outcome.result.unwrap_or_default();
                if outcome.is_error {
                    tracing::error!(result = %answer, subtype = ?outcome.subtype, "claude-code turn ended in an error");
                    replies.push(Reply::chat(
                        destination,
                        in_reply_to,
                        failure_text(&answer, outcome.subtype.as_deref()),
                    ));
                } else if !answer.trim().is_empty() {
                    replies.push(Reply::chat(destination, in_reply_to, answer));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "claude-code turn failed");
                replies.push(Reply::chat(
                    destination,
                    in_reply_to,
                    "Sorry, Claude Code could not run; an operator can find the details in the agent's log.".into(),
                ));
            }
        }
        (replies, consumed)
    }

    async fn run_cli(
        &self,
        destination: &Destination,
        in_reply_to: i64,
        text: &str,
    ) -> Result<Outcome, String> {
        let me = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mcp = json!({"mcpServers": {"ferroclaw": {
            "command": me.display().to_string(),
            "args": [
                "mcp-server",
                "--session-dir", self.session_dir.display().to_string(),
                "--workspace-dir", self.folders.workspace_dir.display().to_string(),
                "--destination", serde_json::to_string(destination).unwrap_or_default(),
                "--in-reply-to", in_reply_to.to_string(),
                "--journal-mode", self.journal_mode.to_string(),
            ],
        }}});
        let home = self.folders.state_dir.join("claude-home");
        std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
        let system = crate::memory::system_prompt(&self.folders);
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .arg("-p")
            .arg(text)
            .args(["--output-format", "stream-json", "--verbose"])
            .arg("--mcp-config")
            .arg(mcp.to_string())
            .args(["--allowedTools", "mcp__ferroclaw"])
            .arg("--append-system-prompt")
            .arg(system)
            // The container is the sandbox.
            .arg("--dangerously-skip-permissions")
            .current_dir(&self.folders.workspace_dir)
            .env("HOME", &home)
            .env_remove("FERROCLAW_MODEL_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(model) = &self.model {
            command.args(["--model", model]);
        }
        if let Some(id) = &self.state.session_id {
            command.args(["--resume", id]);
        }
        if let Some((url, token)) = &self.proxy {
            command
                .env("ANTHROPIC_BASE_URL", url)
                .env("ANTHROPIC_API_KEY", token);
        }
        std::fs::create_dir_all(&self.folders.workspace_dir).map_err(|e| e.to_string())?;
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut stderr = child.stderr.take().ok_or("no stderr")?;
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut outcome = Outcome::default();
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue; // not an event (a stray log line)
            };
            read_event(&event, &mut outcome);
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        let stderr = errors.await.unwrap_or_default();
        if outcome.result.is_none() {
            let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
            return Err(format!(
                "{} ended ({status}) without a result: {tail}",
                self.binary.display()
            ));
        }
        Ok(outcome)
    }
}

/// What the user reads when a turn ended in an error: one plain sentence; Claude Code's own
/// text (which quotes the model API's raw answer) goes to the log only.
fn failure_text(result: &str, subtype: Option<&str>) -> String {
    let status = result.find("API Error: ").and_then(|at| {
        let digits: String = result[at + "API Error: ".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .parse::<u16>()
            .ok()
            .filter(|s| (100..600).contains(s))
    });
    match (status, subtype) {
        (Some(status), _) => format!(
            "Sorry, Claude Code could not answer: {}.",
            crate::model::plain_for_status(status)
        ),
        (None, Some("error_max_turns")) => {
            "Sorry, Claude Code stopped at its turn limit before finishing; tell me how to go on."
                .into()
        }
        _ => {
            "Sorry, Claude Code failed; an operator can find the details in the agent's log.".into()
        }
    }
}

/// Takes what matters from one stream-json event.
fn read_event(event: &Value, outcome: &mut Outcome) {
    if let Some(id) = event["session_id"].as_str() {
        outcome.session_id = Some(id.to_string());
    }
    if event["type"] == "result" {
        outcome.result = Some(event["result"].as_str().unwrap_or("").to_string());
        outcome.subtype = event["subtype"].as_str().map(str::to_string);
        outcome.is_error = event["is_error"].as_bool().unwrap_or(false)
            || event["subtype"].as_str().is_some_and(|s| s != "success");
        let usage = &event["usage"];
        let n = |k: &str| usage[k].as_u64().unwrap_or(0);
        outcome.input_tokens =
            n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens");
        outcome.output_tokens = n("output_tokens");
        outcome.cost_usd = event["total_cost_usd"].as_f64().unwrap_or(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_events_give_the_answer_usage_and_session() {
        let mut o = Outcome::default();
        read_event(
            &json!({"type": "system", "subtype": "init", "session_id": "s1"}),
            &mut o,
        );
        read_event(
            &json!({"type": "assistant", "message": {"content": []}, "session_id": "s1"}),
            &mut o,
        );
        assert!(o.result.is_none());
        read_event(
            &json!({"type": "result", "subtype": "success", "is_error": false, "result": "done",
                    "session_id": "s1", "total_cost_usd": 0.25,
                    "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 3}}),
            &mut o,
        );
        assert_eq!(o.result.as_deref(), Some("done"));
        assert_eq!((o.input_tokens, o.output_tokens), (15, 3));
        assert_eq!(o.session_id.as_deref(), Some("s1"));
        assert!(!o.is_error);
        read_event(
            &json!({"type": "result", "subtype": "error_max_turns", "result": ""}),
            &mut o,
        );
        assert!(o.is_error);
        assert_eq!(o.subtype.as_deref(), Some("error_max_turns"));
    }

    #[test]
    fn api_errors_reach_the_user_as_a_status_and_a_reason() {
        let raw = r#"API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_011"}"#;
        let text = failure_text(raw, Some("success"));
        assert_eq!(
            text,
            "Sorry, Claude Code could not answer: the model provider answered 529 (overloaded); try again later."
        );
        let text = failure_text("Invalid API key · Please run /login", None);
        assert!(!text.contains("login"), "{text}");
        assert!(failure_text("", Some("error_max_turns")).contains("turn limit"));
    }
}
