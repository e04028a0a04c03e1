//! send_message, send_file and ask_user_question.

use std::sync::Arc;

use ferroclaw_mailbox::content::{CardOption, CardOut, ChatOut, FileOut};
use ferroclaw_mailbox::wake::DirWatch;
use ferroclaw_mailbox::{Destination, InboundContent, NewOutbound, OutboundContent};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{ToolContext, ToolResult, object_schema, text};
use crate::model::ToolSpec;
use crate::provider::Reply;

pub fn specs() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "send_message",
            description: "Send a message to the conversation you are answering, in addition to your final answer (use it for progress updates during long work), or to another conversation your configuration allows.",
            schema: object_schema(
                json!({
                    "text": {"type": "string"},
                    "to": {"type": "string", "description": "another conversation id (only those allowed to you); default: this one"},
                }),
                &["text"],
            ),
        },
        ToolSpec {
            name: "send_file",
            description: "Send a file from your workspace to the conversation as an attachment.",
            schema: object_schema(
                json!({
                    "path": {"type": "string", "description": "relative to your workspace, or absolute"},
                    "caption": {"type": "string"},
                }),
                &["path"],
            ),
        },
        ToolSpec {
            name: "ask_user_question",
            description: "Ask the user a question with fixed answers (shown as buttons) and wait for the answer.",
            schema: object_schema(
                json!({
                    "question": {"type": "string"},
                    "options": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 25},
                    "timeout_secs": {"type": "integer", "description": "how long to wait (default 600)"},
                }),
                &["question", "options"],
            ),
        },
    ]
}

fn reply(ctx: &ToolContext<'_>, content: OutboundContent) -> Reply {
    Reply {
        destination: ctx.destination.clone(),
        in_reply_to: ctx.in_reply_to,
        content,
    }
}

pub fn send_message(input: &Value, ctx: &mut ToolContext<'_>) -> ToolResult {
    let message = text(input, "text")?;
    if message.trim().is_empty() {
        return Err("text is empty".into());
    }
    let mut out = reply(
        ctx,
        OutboundContent::Chat(ChatOut {
            text: message.into(),
        }),
    );
    if let Some(to) = input["to"].as_str().filter(|t| !t.is_empty()) {
        if !ctx.send_to.iter().any(|c| c == to) {
            return Err(if ctx.send_to.is_empty() {
                format!("you may not send to {to:?}: only to the conversation you are answering")
            } else {
                format!(
                    "you may not send to {to:?}; allowed: {}",
                    ctx.send_to.join(", ")
                )
            });
        }
        out.destination = Destination::Api {
            conversation: to.to_string(),
        };
    }
    ctx.replies.push(out);
    Ok("sent".into())
}

pub fn send_file(input: &Value, ctx: &mut ToolContext<'_>) -> ToolResult {
    let source = super::workspace::resolve(&ctx.workspace, text(input, "path")?);
    let meta = std::fs::metadata(&source).map_err(|e| format!("{}: {e}", source.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", source.display()));
    }
    if meta.len() > ctx.limits.max_file_bytes {
        return Err(format!(
            "{} is {} bytes; files up to {} bytes can be sent",
            source.display(),
            meta.len(),
            ctx.limits.max_file_bytes
        ));
    }
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} has no file name", source.display()))?;
    // The outbox is the only place delivery reads files from.
    let folder = ferroclaw_common::ids::new_id("file");
    let dir = ctx.mailbox.paths().outbox().join(&folder);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::copy(&source, dir.join(&name)).map_err(|e| format!("copying the file: {e}"))?;
    let caption = input["caption"].as_str().unwrap_or("").to_string();
    let out = reply(
        ctx,
        OutboundContent::File(FileOut {
            path: format!("outbox/{folder}/{name}"),
            name: name.clone(),
            caption,
        }),
    );
    ctx.replies.push(out);
    Ok(format!("{name} sent"))
}

pub async fn ask_user_question(input: &Value, ctx: &mut ToolContext<'_>) -> ToolResult {
    let question = text(input, "question")?;
    let options: Vec<String> = input["options"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if options.is_empty() || options.len() > 25 {
        return Err("options must be a list of 1 to 25 strings".into());
    }
    let timeout = input["timeout_secs"]
        .as_u64()
        .map(std::time::Duration::from_secs)
        .unwrap_or(ctx.limits.question_timeout);
    let question_id = ferroclaw_common::ids::new_id("q");
    let card = CardOut {
        question_id: question_id.clone(),
        text: question.into(),
        options: options
            .iter()
            .enumerate()
            .map(|(i, label)| CardOption {
                id: i.to_string(),
                label: label.clone(),
            })
            .collect(),
        expires_in_secs: timeout.as_secs().max(1),
    };
    // The card goes out now, not with the batch: the user must see it to answer.
    let row = NewOutbound {
        in_reply_to: Some(ctx.in_reply_to),
        destination: ctx.destination.clone(),
        content: OutboundContent::Card(card),
        trace: None,
    };
    ctx.mailbox
        .send_now(&row)
        .await
        .map_err(|e| format!("the question could not be sent: {e}"))?;
    let wake = Arc::new(Notify::new());
    let in_dir = ctx.mailbox.paths().in_dir();
    let _watch = DirWatch::notifying(&in_dir, "inbound.bell", wake.clone())
        .map_err(|e| format!("cannot watch for the answer: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let found = ctx
            .mailbox
            .question_answer(&question_id)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if let Some((seq, InboundContent::System(answer))) = found {
            ctx.consumed.push(seq);
            let label = answer.data["label"].as_str().unwrap_or("");
            let user = answer.data["user"].as_str().unwrap_or("");
            return Ok(format!("{user} answered: {label}"));
        }
        tokio::select! {
            _ = wake.notified() => {}
            // A missed file event costs at most a second.
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("no answer within {} s; the question has expired", timeout.as_secs()));
            }
        }
    }
}
