//! Turning an outside message into a runner enqueue: route lookup, validation, origin.
//! Shared by the REST API and the gRPC `Gateway` service, so both accept the same things.

use ferroclaw_common::Config;
use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_content::{Attachment, ChatIn, WebhookIn};
use ferroclaw_content::{Destination, InboundContent};
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{EnqueueRequest, Origin, PutInboxFileRequest};
use serde::Serialize;

use crate::command_gate::{self, Gate};
use crate::error::{ApiError, Result};

const MAX_KEY_BYTES: usize = 256;
const MAX_CONVERSATION_BYTES: usize = 256;

/// What an accepted message answers with (`202`).
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub session_id: String,
    pub message_id: String,
    pub duplicate: bool,
    /// A command the gateway answered itself (nothing was enqueued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

#[derive(Clone)]
pub struct Ingress {
    config: std::sync::Arc<Config>,
    runner: RunnerClient<GrpcChannel>,
}

impl Ingress {
    pub fn new(config: std::sync::Arc<Config>, runner: GrpcChannel) -> Self {
        Self {
            config,
            runner: RunnerClient::new(runner),
        }
    }

    /// A webhook from `source` carrying any JSON document.
    pub async fn webhook(
        &self,
        source: &str,
        payload: serde_json::Value,
        idempotency_key: Option<&str>,
    ) -> Result<Accepted> {
        let route = self
            .config
            .webhook_route(source)
            .ok_or_else(|| ApiError::NotFound(format!("no route for webhook source {source:?}")))?;
        let key = check_key(idempotency_key)?;
        let reply_to = match (&route.callback_url, &route.reply_discord_channel) {
            (Some(_), _) => Destination::Callback {
                source: source.to_string(),
            },
            (None, Some(channel)) => Destination::Discord {
                channel_id: channel.clone(),
            },
            (None, None) => Destination::Api {
                conversation: route.reply_conversation(),
            },
        };
        let content = InboundContent::Webhook(WebhookIn {
            source: source.to_string(),
            payload,
        });
        self.enqueue(
            &route.agent,
            format!("webhook:{source}"),
            content,
            Origin {
                channel: "webhook".into(),
                conversation: source.to_string(),
                sender: source.to_string(),
                reply_to_json: json(&reply_to),
            },
            key,
        )
        .await
    }

    /// A chat message in API conversation `conversation`.
    pub async fn message(
        &self,
        conversation: &str,
        text: String,
        sender: String,
        idempotency_key: Option<&str>,
    ) -> Result<Accepted> {
        self.message_with_files(conversation, text, sender, idempotency_key, Vec::new())
            .await
    }

    /// A chat message with files already in the session's inbox ([`Self::put_inbox_file`]);
    /// with files, the text may be empty.
    pub async fn message_with_files(
        &self,
        conversation: &str,
        text: String,
        sender: String,
        idempotency_key: Option<&str>,
        attachments: Vec<Attachment>,
    ) -> Result<Accepted> {
        check_conversation(conversation)?;
        let route = self.conversation_agent(conversation)?;
        let key = check_key(idempotency_key)?;
        if text.trim().is_empty() && attachments.is_empty() {
            return Err(ApiError::BadRequest("text must not be empty".into()));
        }
        match command_gate::check(&self.config, &route, &sender, &text) {
            Gate::Pass => {}
            Gate::Answer(answer) => {
                return Ok(Accepted {
                    session_id: String::new(),
                    message_id: String::new(),
                    duplicate: false,
                    answer: Some(answer),
                });
            }
            Gate::Deny(why) => return Err(ApiError::Forbidden(why)),
        }
        let reply_to = Destination::Api {
            conversation: conversation.to_string(),
        };
        let content = InboundContent::Chat(ChatIn {
            text,
            sender: sender.clone(),
            attachments,
        });
        self.enqueue(
            &route,
            format!("api:{conversation}"),
            content,
            Origin {
                channel: "api".into(),
                conversation: conversation.to_string(),
                sender,
                reply_to_json: json(&reply_to),
            },
            key,
        )
        .await
    }

    /// A Discord message in a routed channel. The Discord message id is the idempotency
    /// key; replies go back to the channel.
    #[allow(clippy::too_many_arguments)]
    pub async fn discord_message(
        &self,
        agent: &str,
        conversation: &str,
        channel_id: &str,
        message_id: &str,
        sender: &str,
        text: String,
        attachments: Vec<Attachment>,
    ) -> Result<Accepted> {
        let reply_to = Destination::Discord {
            channel_id: channel_id.to_string(),
        };
        let content = InboundContent::Chat(ChatIn {
            text,
            sender: sender.to_string(),
            attachments,
        });
        self.enqueue(
            agent,
            format!("discord:{conversation}"),
            content,
            Origin {
                channel: "discord".into(),
                conversation: conversation.to_string(),
                sender: sender.to_string(),
                reply_to_json: json(&reply_to),
            },
            format!("discord:{message_id}"),
        )
        .await
    }

    /// Hands an attachment to the runner for the session of (agent, conversation key).
    pub async fn put_inbox_file(
        &self,
        agent: &str,
        conversation_key: String,
        message_id: &str,
        name: &str,
        data: Vec<u8>,
    ) -> Result<Attachment> {
        let response = self
            .runner
            .clone()
            .put_inbox_file(PutInboxFileRequest {
                agent: agent.to_string(),
                conversation_key,
                message_id: message_id.to_string(),
                name: name.to_string(),
                data,
                session_id: String::new(),
            })
            .await?
            .into_inner();
        Ok(Attachment {
            path: response.path,
            name: name.to_string(),
            size: response.size,
        })
    }

    /// The agent an API conversation routes to, or 404.
    pub fn conversation_agent(&self, conversation: &str) -> Result<String> {
        self.config
            .conversation_route(conversation)
            .map(|r| r.agent.clone())
            .ok_or_else(|| {
                ApiError::NotFound(format!("no route for conversation {conversation:?}"))
            })
    }

    async fn enqueue(
        &self,
        agent: &str,
        conversation_key: String,
        content: InboundContent,
        origin: Origin,
        idempotency_key: String,
    ) -> Result<Accepted> {
        let request = EnqueueRequest {
            agent: agent.to_string(),
            conversation_key,
            kind: content.kind().to_string(),
            content_json: content.to_json(),
            origin: Some(origin),
            idempotency_key,
            process_after_ms: 0,
            // The agent's spans join this message's trace (empty when nothing is exported).
            trace: ferroclaw_common::telemetry::current_traceparent(),
            session_id: String::new(),
        };
        let response = self.runner.clone().enqueue(request).await?.into_inner();
        Ok(Accepted {
            session_id: response.session_id,
            message_id: response.message_id,
            duplicate: response.duplicate,
            answer: None,
        })
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn check_key(key: Option<&str>) -> Result<String> {
    match key {
        None => Ok(String::new()),
        Some(k) if k.is_empty() || k.len() > MAX_KEY_BYTES || k.chars().any(char::is_control) => {
            Err(ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_BYTES} printable bytes"
            )))
        }
        Some(k) => Ok(k.to_string()),
    }
}

pub fn check_conversation(conversation: &str) -> Result<()> {
    if conversation.is_empty()
        || conversation.len() > MAX_CONVERSATION_BYTES
        || conversation.chars().any(char::is_control)
    {
        return Err(ApiError::BadRequest(format!(
            "conversation must be 1 to {MAX_CONVERSATION_BYTES} printable bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_conversations_are_checked() {
        assert_eq!(check_key(None).unwrap(), "");
        assert_eq!(check_key(Some("abc")).unwrap(), "abc");
        assert!(check_key(Some("")).is_err());
        assert!(check_key(Some(&"x".repeat(300))).is_err());
        assert!(check_conversation("c-1").is_ok());
        assert!(check_conversation("a\nb").is_err());
    }
}
