//! Turns a batch of inbound messages into the text the model reads: one XML-like block per
//! message, after a context line with the session's time zone and the current time.

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use ferroclaw_mailbox::InboundRow;
use ferroclaw_mailbox::content::InboundContent;

/// Escapes text for use inside an element or a double-quoted attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A unix-ms time shown in the session's zone, e.g. `2026-11-25 09:30:00 CET`.
pub fn local_time(ms: i64, tz: Tz) -> String {
    let utc: DateTime<Utc> = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
    utc.with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// The whole prompt for a batch.
pub fn format_batch(rows: &[InboundRow], tz: Tz, now_ms: i64) -> String {
    let mut out = format!(
        "<context timezone=\"{}\" now=\"{}\" />\n",
        escape(tz.name()),
        escape(&local_time(now_ms, tz))
    );
    for row in rows {
        out.push_str(&format_row(row, tz));
        out.push('\n');
    }
    out
}

pub fn format_row(row: &InboundRow, tz: Tz) -> String {
    let id = escape(&row.id);
    let time = escape(&local_time(row.created_at, tz));
    match &row.content {
        InboundContent::Chat(chat) => {
            let sender = if chat.sender.is_empty() {
                &row.origin.sender
            } else {
                &chat.sender
            };
            let mut body = escape(&chat.text);
            for a in &chat.attachments {
                body.push_str(&format!(
                    "\n<attachment path=\"{}\" name=\"{}\" size=\"{}\" />",
                    escape(&a.path),
                    escape(&a.name),
                    a.size
                ));
            }
            format!(
                "<message id=\"{id}\" sender=\"{}\" time=\"{time}\">{body}</message>",
                escape(sender)
            )
        }
        InboundContent::Webhook(hook) => format!(
            "<webhook id=\"{id}\" source=\"{}\" time=\"{time}\">{}</webhook>",
            escape(&hook.source),
            escape(&hook.payload.to_string())
        ),
        InboundContent::Task(task) => format!(
            "<task id=\"{id}\" task_id=\"{}\" name=\"{}\" time=\"{time}\">{}</task>",
            escape(&task.task_id),
            escape(&task.name),
            escape(&task.prompt)
        ),
        InboundContent::System(system) => format!(
            "<system id=\"{id}\" event=\"{}\" time=\"{time}\">{}</system>",
            escape(&system.event),
            escape(&system.text)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclaw_mailbox::content::{ChatIn, SystemIn, WebhookIn};
    use ferroclaw_mailbox::{Destination, Origin};

    fn row(seq: i64, content: InboundContent) -> InboundRow {
        InboundRow {
            seq,
            id: format!("m{seq}"),
            created_at: 1_764_063_000_000, // 2025-11-25 09:30:00 UTC
            process_after: None,
            origin: Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: "origin-sender".into(),
                reply_to: Destination::Api {
                    conversation: "c".into(),
                },
            },
            content,
            trace: None,
        }
    }

    #[test]
    fn messages_are_escaped_and_timed_in_the_zone() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let rows = vec![
            row(
                2,
                InboundContent::Chat(ChatIn {
                    text: "a <b> & \"c\"".into(),
                    sender: "Ann \"A\"".into(),
                    attachments: vec![],
                }),
            ),
            row(
                4,
                InboundContent::Webhook(WebhookIn {
                    source: "gh".into(),
                    payload: serde_json::json!({"x": "<y>"}),
                }),
            ),
            row(
                6,
                InboundContent::System(SystemIn {
                    event: "delivery_failed".into(),
                    text: "nope".into(),
                    data: serde_json::Value::Null,
                }),
            ),
        ];
        let text = format_batch(&rows, tz, 1_764_063_000_000);
        let expected = "<context timezone=\"Europe/Berlin\" now=\"2025-11-25 10:30:00 CET\" />\n\
<message id=\"m2\" sender=\"Ann &quot;A&quot;\" time=\"2025-11-25 10:30:00 CET\">a &lt;b&gt; &amp; &quot;c&quot;</message>\n\
<webhook id=\"m4\" source=\"gh\" time=\"2025-11-25 10:30:00 CET\">{&quot;x&quot;:&quot;&lt;y&gt;&quot;}</webhook>\n\
<system id=\"m6\" event=\"delivery_failed\" time=\"2025-11-25 10:30:00 CET\">nope</system>\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn sender_falls_back_to_origin() {
        let r = row(
            2,
            InboundContent::Chat(ChatIn {
                text: "hi".into(),
                sender: String::new(),
                attachments: vec![],
            }),
        );
        assert!(format_row(&r, Tz::UTC).contains("sender=\"origin-sender\""));
    }
}
