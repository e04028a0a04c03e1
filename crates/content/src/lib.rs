//! The message schema: typed JSON content of mailbox rows (what came in, where it came from,
//! where replies go, what goes out). Shared by the services, which never touch session
//! files, and by the mailbox crate and the agent, which do.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Content that does not parse as its kind says.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} content: {message}")]
    InvalidContent { what: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch: the time unit of every message column.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where replies go. Delivery dispatches on `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    /// An API conversation, read back with `GET /v1/conversations/{id}/messages`.
    Api { conversation: String },
    /// The callback URL of a webhook source (looked up by delivery, so neither the URL's
    /// secret nor the URL itself travels through the agent's files).
    Callback { source: String },
    /// A Discord channel (a guild channel, a thread or a DM channel).
    Discord { channel_id: String },
}

/// Where an inbound message came from (the `origin` column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// "api", "webhook", "discord", "task" or "system".
    pub channel: String,
    /// The channel's conversation id (API conversation, webhook source, …).
    pub conversation: String,
    #[serde(default)]
    pub sender: String,
    pub reply_to: Destination,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Path as the agent sees it, under the session's `in/inbox/`.
    pub path: String,
    pub name: String,
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatIn {
    pub text: String,
    #[serde(default)]
    pub sender: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookIn {
    pub source: String,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskIn {
    pub task_id: String,
    #[serde(default)]
    pub name: String,
    pub prompt: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemIn {
    /// What happened, e.g. "delivery_failed" or "question_response".
    pub event: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

/// Content of a `messages_in` row; the variant is the row's `kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum InboundContent {
    Chat(ChatIn),
    Webhook(WebhookIn),
    Task(TaskIn),
    System(SystemIn),
}

impl InboundContent {
    pub const KINDS: &[&str] = &["chat", "webhook", "task", "system"];

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Chat(_) => "chat",
            Self::Webhook(_) => "webhook",
            Self::Task(_) => "task",
            Self::System(_) => "system",
        }
    }

    /// Parses the JSON of a row of `kind`; unknown kinds and malformed JSON are errors.
    pub fn parse(kind: &str, json: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::InvalidContent {
            what: format!("inbound {kind}"),
            message: e.to_string(),
        };
        Ok(match kind {
            "chat" => Self::Chat(serde_json::from_str(json).map_err(bad)?),
            "webhook" => Self::Webhook(serde_json::from_str(json).map_err(bad)?),
            "task" => Self::Task(serde_json::from_str(json).map_err(bad)?),
            "system" => Self::System(serde_json::from_str(json).map_err(bad)?),
            other => {
                return Err(Error::InvalidContent {
                    what: "inbound".into(),
                    message: format!("unknown kind {other:?} (expected one of {:?})", Self::KINDS),
                });
            }
        })
    }

    pub fn to_json(&self) -> String {
        let value = match self {
            Self::Chat(c) => serde_json::to_string(c),
            Self::Webhook(c) => serde_json::to_string(c),
            Self::Task(c) => serde_json::to_string(c),
            Self::System(c) => serde_json::to_string(c),
        };
        // These types hold only strings, numbers and JSON values: serialising cannot fail.
        value.unwrap_or_else(|_| "{}".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatOut {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardOption {
    pub id: String,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardOut {
    pub question_id: String,
    pub text: String,
    pub options: Vec<CardOption>,
    /// How long the question may be answered; 0 = one hour.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires_in_secs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOut {
    /// Path relative to the session's `out/outbox/`.
    pub path: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caption: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionOut {
    /// e.g. "schedule_task".
    pub action: String,
    #[serde(default)]
    pub params: Value,
}

/// Content of a `messages_out` row; the variant is the row's `kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum OutboundContent {
    Chat(ChatOut),
    Card(CardOut),
    File(FileOut),
    Action(ActionOut),
}

impl OutboundContent {
    pub const KINDS: &[&str] = &["chat", "card", "file", "action"];

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Chat(_) => "chat",
            Self::Card(_) => "card",
            Self::File(_) => "file",
            Self::Action(_) => "action",
        }
    }

    pub fn parse(kind: &str, json: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::InvalidContent {
            what: format!("outbound {kind}"),
            message: e.to_string(),
        };
        Ok(match kind {
            "chat" => Self::Chat(serde_json::from_str(json).map_err(bad)?),
            "card" => Self::Card(serde_json::from_str(json).map_err(bad)?),
            "file" => Self::File(serde_json::from_str(json).map_err(bad)?),
            "action" => Self::Action(serde_json::from_str(json).map_err(bad)?),
            other => {
                return Err(Error::InvalidContent {
                    what: "outbound".into(),
                    message: format!("unknown kind {other:?} (expected one of {:?})", Self::KINDS),
                });
            }
        })
    }

    pub fn to_json(&self) -> String {
        let value = match self {
            Self::Chat(c) => serde_json::to_string(c),
            Self::Card(c) => serde_json::to_string(c),
            Self::File(c) => serde_json::to_string(c),
            Self::Action(c) => serde_json::to_string(c),
        };
        value.unwrap_or_else(|_| "{}".into())
    }

    /// The human-readable text of the message, where it has one.
    pub fn text(&self) -> &str {
        match self {
            Self::Chat(c) => &c.text,
            Self::Card(c) => &c.text,
            Self::File(c) => &c.caption,
            Self::Action(_) => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_round_trip_and_errors() {
        let chat = InboundContent::Chat(ChatIn {
            text: "hi <there>".into(),
            sender: "ann".into(),
            attachments: vec![],
        });
        let json = chat.to_json();
        assert_eq!(InboundContent::parse("chat", &json).unwrap(), chat);
        let err = InboundContent::parse("bogus", "{}").unwrap_err();
        assert!(err.to_string().contains("unknown kind \"bogus\""), "{err}");
        let err = InboundContent::parse("chat", "{\"nope\":1}").unwrap_err();
        assert!(err.to_string().contains("missing field `text`"), "{err}");
    }

    #[test]
    fn destination_is_tagged() {
        let d = Destination::Api {
            conversation: "c1".into(),
        };
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, r#"{"kind":"api","conversation":"c1"}"#);
        assert!(serde_json::from_str::<Destination>(r#"{"kind":"fax"}"#).is_err());
    }
}
