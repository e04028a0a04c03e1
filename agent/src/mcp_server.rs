//! ferroclaw's tools as an MCP server on stdio (JSON-RPC 2.0, one message a line), for the
//! Claude Code CLI. `ferroclaw-agent mcp-server` runs it; Claude Code starts it per turn.
//!
//! What the tools produce (messages, actions, answers used up) is not written to the
//! outbox directly: it goes to a spool file the agent reads when the turn ends, so it is
//! written with the batch's completion in one transaction, as with the native providers.

use std::path::{Path, PathBuf};

use ferroclaw_mailbox::{AgentMailbox, Destination, JournalMode, OutboundContent, SessionPaths};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::provider::Reply;
use crate::tools::{self, ToolContext, ToolLimits};

/// The MCP protocol version we speak (and accept any the client names).
const PROTOCOL_VERSION: &str = "2024-11-05";

/// Tools offered over MCP: Claude Code has its own workspace tools.
const OFFERED: &[&str] = &[
    "send_message",
    "send_file",
    "ask_user_question",
    "schedule_task",
    "list_tasks",
    "update_task",
    "pause_task",
    "resume_task",
    "cancel_task",
];

/// The spool of one session's turn.
pub fn spool_path(state_dir: &Path) -> PathBuf {
    state_dir.join("mcp-spool.jsonl")
}

/// One spooled entry: a reply, or an inbound seq used up.
fn spool_line(reply: Option<&Reply>, consumed: Option<i64>) -> String {
    let value = match (reply, consumed) {
        (Some(r), _) => json!({
            "destination": r.destination,
            "in_reply_to": r.in_reply_to,
            "kind": r.content.kind(),
            "content": r.content.to_json(),
        }),
        (None, seq) => json!({"consumed": seq}),
    };
    format!("{value}\n")
}

/// Reads and empties the spool: the replies and used-up seqs of the turn.
pub fn drain_spool(path: &Path) -> (Vec<Reply>, Vec<i64>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    let mut replies = Vec::new();
    let mut consumed = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            tracing::error!(line, "unreadable spool line");
            continue;
        };
        if let Some(seq) = v["consumed"].as_i64() {
            consumed.push(seq);
            continue;
        }
        let destination = serde_json::from_value::<Destination>(v["destination"].clone());
        let content = OutboundContent::parse(
            v["kind"].as_str().unwrap_or(""),
            v["content"].as_str().unwrap_or(""),
        );
        match (destination, content) {
            (Ok(destination), Ok(content)) => replies.push(Reply {
                destination,
                in_reply_to: v["in_reply_to"].as_i64().unwrap_or(0),
                content,
            }),
            _ => tracing::error!(line, "unreadable spool entry"),
        }
    }
    (replies, consumed)
}

/// What the server needs to know about the turn it serves.
pub struct McpTurn {
    pub session_dir: PathBuf,
    pub workspace_dir: PathBuf,
    pub destination: Destination,
    pub in_reply_to: i64,
    pub journal_mode: JournalMode,
}

/// Serves MCP on stdin/stdout until stdin closes.
pub async fn serve(turn: McpTurn) -> anyhow::Result<()> {
    let paths = SessionPaths::new(&turn.session_dir);
    let mailbox = AgentMailbox::open(paths.clone(), turn.journal_mode).await?;
    let spool = spool_path(&paths.state_dir());
    let specs: Vec<Value> = tools::specs()
        .into_iter()
        .filter(|s| OFFERED.contains(&s.name))
        .map(|s| json!({"name": s.name, "description": s.description, "inputSchema": s.schema}))
        .collect();
    let http = reqwest::Client::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let request: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let error = json!({"jsonrpc": "2.0", "id": null,
                    "error": {"code": -32700, "message": format!("parse error: {e}")}});
                write(&mut stdout, &error).await?;
                continue;
            }
        };
        let Some(id) = request.get("id").cloned() else {
            continue; // a notification (notifications/initialized, …): no answer
        };
        let method = request["method"].as_str().unwrap_or("");
        let result = match method {
            "initialize" => Ok(json!({
                "protocolVersion": request["params"]["protocolVersion"].as_str().unwrap_or(PROTOCOL_VERSION),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "ferroclaw", "version": env!("CARGO_PKG_VERSION")},
            })),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({"tools": specs})),
            "tools/call" => {
                let name = request["params"]["name"].as_str().unwrap_or("");
                let arguments = request["params"]["arguments"].clone();
                let arguments = if arguments.is_null() {
                    json!({})
                } else {
                    arguments
                };
                if OFFERED.contains(&name) {
                    let mut ctx = ToolContext {
                        mailbox: &mailbox,
                        workspace: turn.workspace_dir.clone(),
                        destination: turn.destination.clone(),
                        in_reply_to: turn.in_reply_to,
                        limits: ToolLimits::from_env(),
                        replies: Vec::new(),
                        consumed: Vec::new(),
                        http: http.clone(),
                        send_to: tools::send_to_from_env(),
                    };
                    let outcome = tools::run(name, &arguments, &mut ctx).await;
                    append_spool(&spool, &ctx.replies, &ctx.consumed)?;
                    let (text, is_error) = match outcome {
                        Ok(t) => (t, false),
                        Err(t) => (t, true),
                    };
                    Ok(json!({"content": [{"type": "text", "text": text}], "isError": is_error}))
                } else {
                    Err((-32602, format!("unknown tool {name:?}")))
                }
            }
            other => Err((-32601, format!("method not found: {other}"))),
        };
        let answer = match result {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        };
        write(&mut stdout, &answer).await?;
    }
    mailbox.close().await;
    Ok(())
}

fn append_spool(path: &Path, replies: &[Reply], consumed: &[i64]) -> std::io::Result<()> {
    use std::io::Write;
    let mut text = String::new();
    for r in replies {
        text.push_str(&spool_line(Some(r), None));
    }
    for seq in consumed {
        text.push_str(&spool_line(None, Some(*seq)));
    }
    if text.is_empty() {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

async fn write(stdout: &mut tokio::io::Stdout, message: &Value) -> std::io::Result<()> {
    stdout.write_all(format!("{message}\n").as_bytes()).await?;
    stdout.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclaw_mailbox::content::ChatOut;

    #[test]
    fn the_spool_round_trips_and_empties() {
        let dir = tempfile::tempdir().unwrap();
        let path = spool_path(dir.path());
        let reply = Reply {
            destination: Destination::Api {
                conversation: "c".into(),
            },
            in_reply_to: 4,
            content: OutboundContent::Chat(ChatOut { text: "hi".into() }),
        };
        append_spool(&path, std::slice::from_ref(&reply), &[6]).unwrap();
        append_spool(&path, std::slice::from_ref(&reply), &[]).unwrap();
        let (replies, consumed) = drain_spool(&path);
        assert_eq!(replies, vec![reply.clone(), reply]);
        assert_eq!(consumed, vec![6]);
        assert_eq!(drain_spool(&path), (vec![], vec![]));
    }
}
