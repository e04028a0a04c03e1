//! `echo`: a deterministic provider for tests and demos. It quotes what it received, one
//! line per message, in one reply per destination.

use std::time::Duration;

use ferroclaw_mailbox::content::InboundContent;

use super::{Prompt, Reply, by_destination};

pub struct Echo {
    pub delay: Duration,
}

impl Echo {
    pub async fn respond(&self, prompt: &Prompt<'_>) -> Vec<Reply> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        by_destination(prompt.rows)
            .into_iter()
            .map(|(destination, rows)| Reply {
                destination,
                in_reply_to: rows.last().map_or(0, |r| r.seq),
                text: rows
                    .iter()
                    .map(|r| quote(&r.content))
                    .collect::<Vec<_>>()
                    .join("\n"),
            })
            .collect()
    }
}

/// `echo: <what came in>` for one message.
pub fn quote(content: &InboundContent) -> String {
    match content {
        InboundContent::Chat(c) => format!("echo: {}", c.text),
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

    #[tokio::test]
    async fn one_reply_per_destination_quoting_each_message() {
        let rows = vec![
            chat(2, "a", "one"),
            chat(4, "b", "two"),
            chat(6, "a", "three"),
        ];
        let echo = Echo {
            delay: Duration::ZERO,
        };
        let replies = echo
            .respond(&Prompt {
                text: "",
                rows: &rows,
            })
            .await;
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].text, "echo: one\necho: three");
        assert_eq!(replies[0].in_reply_to, 6);
        assert_eq!(replies[1].text, "echo: two");
    }
}
