//! One message of an API conversation as clients see it: the entries of
//! `GET /v1/conversations/{id}/messages` and the `data:` of each `/events` event, built in
//! one place so the two never differ (`openapi::ConversationMessageView` documents it).

use ferroclaw_proto::v1::ConversationMessage;
use serde_json::{Value, json};

/// A message as the conversation endpoints show it.
pub fn message_json(m: &ConversationMessage) -> Value {
    json!({
        "cursor": m.cursor,
        "kind": m.kind,
        "text": m.text,
        "content": serde_json::from_str::<Value>(&m.content_json).unwrap_or(Value::Null),
        "download": file_link(&m.kind, &m.session_id, &m.content_json),
        "session_id": m.session_id,
        "in_reply_to": (m.in_reply_to > 0).then_some(m.in_reply_to),
        "created_at": m.created_at_ms,
    })
}

/// Where a file message's bytes can be fetched (`null` for other kinds).
fn file_link(kind: &str, session_id: &str, content_json: &str) -> Value {
    if kind != "file" {
        return Value::Null;
    }
    let content: Value = serde_json::from_str(content_json).unwrap_or_default();
    match content["path"].as_str() {
        Some(path) => json!(format!("/v1/sessions/{session_id}/files/{path}")),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: &str, content_json: &str, in_reply_to: i64) -> ConversationMessage {
        ConversationMessage {
            cursor: 12,
            conversation: "c".into(),
            session_id: "ses_1".into(),
            out_seq: 3,
            kind: kind.into(),
            text: "two\nlines".into(),
            content_json: content_json.into(),
            created_at_ms: 5,
            in_reply_to,
        }
    }

    #[test]
    fn a_file_links_its_download_and_others_do_not() {
        let json = message_json(&message("file", r#"{"path":"a.txt"}"#, 2));
        assert_eq!(
            json,
            json!({
                "cursor": 12,
                "kind": "file",
                "text": "two\nlines",
                "content": {"path": "a.txt"},
                "download": "/v1/sessions/ses_1/files/a.txt",
                "session_id": "ses_1",
                "in_reply_to": 2,
                "created_at": 5,
            })
        );
        let json = message_json(&message("text", "not json", 0));
        assert_eq!(json["download"], Value::Null);
        assert_eq!(json["content"], Value::Null);
        assert_eq!(json["in_reply_to"], Value::Null);
        let pathless = message_json(&message("file", r#"{"name":"a.txt"}"#, 0));
        assert_eq!(pathless["download"], Value::Null);
    }
}
