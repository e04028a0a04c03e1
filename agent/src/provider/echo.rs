//! `echo`: a deterministic provider for tests and demos. It quotes what it received, one
//! line per message, in one reply per destination.
//!
//! A chat message `!action {"action": "...", "params": {...}}` makes it emit that action row
//! instead (as a model's tool call would: `schedule_task`, `pause_task`, …), and
//! `!card {"question_id", "text", "options": [{"id", "label"}]}` asks a question (as
//! `ask_user_question` would), so those paths can be driven end to end without a model.

use std::time::Duration;

use ferroclaw_mailbox::OutboundContent;
use ferroclaw_mailbox::content::{ActionOut, CardOut, ChatOut, InboundContent};

use ferroclaw_mailbox::InboundRow;

use super::{Reply, by_destination};

pub struct Echo {
    pub delay: Duration,
    /// Test aid: blocks the thread (no heartbeat) before replying.
    pub hang: Duration,
}

impl Echo {
    pub async fn respond(&self, rows: &[InboundRow]) -> Vec<Reply> {
        if !self.hang.is_zero() {
            std::thread::sleep(self.hang);
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut replies = Vec::new();
        for (destination, rows) in by_destination(rows) {
            let mut lines = Vec::new();
            let mut actions = Vec::new();
            for row in &rows {
                if let Some(card) = directive::<CardOut>(&row.content, "!card") {
                    match card {
                        Ok(card) => actions.push(Reply {
                            destination: destination.clone(),
                            in_reply_to: row.seq,
                            content: OutboundContent::Card(card),
                        }),
                        Err(e) => lines.push(format!("echo: invalid !card: {e}")),
                    }
                    continue;
                }
                match directive::<ActionOut>(&row.content, "!action") {
                    Some(Ok(action)) => actions.push(Reply {
                        destination: destination.clone(),
                        in_reply_to: row.seq,
                        content: OutboundContent::Action(action),
                    }),
                    Some(Err(e)) => lines.push(format!("echo: invalid !action: {e}")),
                    None => lines.push(quote(&row.content)),
                }
            }
            if !lines.is_empty() {
                replies.push(Reply {
                    destination: destination.clone(),
                    in_reply_to: rows.last().map_or(0, |r| r.seq),
                    content: OutboundContent::Chat(ChatOut {
                        text: lines.join("\n"),
                    }),
                });
            }
            replies.extend(actions);
        }
        replies
    }
}

/// The JSON a chat message `<directive> {json}` carries, parsed, if it is one.
fn directive<T: serde::de::DeserializeOwned>(
    content: &InboundContent,
    directive: &str,
) -> Option<Result<T, serde_json::Error>> {
    let InboundContent::Chat(chat) = content else {
        return None;
    };
    let json = chat.text.trim().strip_prefix(directive)?;
    Some(serde_json::from_str(json.trim()))
}

/// `echo: <what came in>` for one message.
pub fn quote(content: &InboundContent) -> String {
    match content {
        InboundContent::Chat(c) => {
            // Files are named, so a test sees they arrived.
            let files: String = c
                .attachments
                .iter()
                .map(|a| format!(" [file {}, {} bytes]", a.name, a.size))
                .collect();
            format!("echo: {}{files}", c.text)
        }
        InboundContent::Webhook(w) => format!("echo: webhook {}: {}", w.source, w.payload),
        InboundContent::Task(t) => format!("echo: task {}: {}", t.name, t.prompt),
        InboundContent::System(s) => format!("echo: system {}: {}", s.event, s.text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclaw_mailbox::content::ChatIn;
    use ferroclaw_mailbox::{Destination, InboundRow, Origin};

    fn chat(seq: i64, conversation: &str, text: &str) -> InboundRow {
        InboundRow {
            seq,
            id: format!("m{seq}"),
            created_at: 0,
            process_after: None,
            origin: Origin {
                channel: "api".into(),
                conversation: conversation.into(),
                sender: String::new(),
                reply_to: Destination::Api {
                    conversation: conversation.into(),
                },
            },
            content: InboundContent::Chat(ChatIn {
                text: text.into(),
                sender: String::new(),
                attachments: vec![],
            }),
            trace: None,
        }
    }

    async fn respond(rows: &[InboundRow]) -> Vec<Reply> {
        let echo = Echo {
            delay: Duration::ZERO,
            hang: Duration::ZERO,
        };
        echo.respond(rows).await
    }

    #[tokio::test]
    async fn one_reply_per_destination_quoting_each_message() {
        let rows = vec![
            chat(2, "a", "one"),
            chat(4, "b", "two"),
            chat(6, "a", "three"),
        ];
        let replies = respond(&rows).await;
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].content.text(), "echo: one\necho: three");
        assert_eq!(replies[0].in_reply_to, 6);
        assert_eq!(replies[1].content.text(), "echo: two");
    }

    #[tokio::test]
    async fn bang_action_becomes_an_action_row() {
        let rows = vec![
            chat(
                2,
                "a",
                r#"!action {"action": "pause_task", "params": {"task_id": "t1"}}"#,
            ),
            chat(4, "a", "!action {broken"),
        ];
        let replies = respond(&rows).await;
        assert_eq!(replies.len(), 2);
        assert!(
            replies[0]
                .content
                .text()
                .starts_with("echo: invalid !action")
        );
        match &replies[1].content {
            OutboundContent::Action(a) => {
                assert_eq!(a.action, "pause_task");
                assert_eq!(a.params["task_id"], "t1");
            }
            other => panic!("expected an action, got {other:?}"),
        }
        assert_eq!(replies[1].in_reply_to, 2);
    }
}
