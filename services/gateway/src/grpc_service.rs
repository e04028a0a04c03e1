//! The `Gateway` gRPC service: the same ingress as the REST API, for programs.

use ferroclaw_proto::v1::gateway_server::Gateway;
use ferroclaw_proto::v1::inject_message_request::Target;
use ferroclaw_proto::v1::{InjectMessageRequest, InjectMessageResponse};
use serde::Deserialize;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::ingress::{Accepted, Ingress};

pub struct GatewayService {
    pub(crate) ingress: Ingress,
}

/// A conversation payload: `{"text": "...", "sender": "..."}` or a bare JSON string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChatPayload {
    Text(String),
    Full {
        text: String,
        #[serde(default)]
        sender: String,
    },
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn inject_message(
        &self,
        request: Request<InjectMessageRequest>,
    ) -> Result<Response<InjectMessageResponse>, Status> {
        let req = request.into_inner();
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key.as_str());
        let bad_json =
            |e: serde_json::Error| ApiError::BadRequest(format!("payload_json is not valid: {e}"));
        let accepted: Accepted = match req.target {
            Some(Target::Source(source)) => {
                let payload = serde_json::from_str(&req.payload_json).map_err(bad_json)?;
                self.ingress.webhook(&source, payload, key).await?
            }
            Some(Target::Conversation(conversation)) => {
                let (text, sender) =
                    match serde_json::from_str(&req.payload_json).map_err(bad_json)? {
                        ChatPayload::Text(text) => (text, String::new()),
                        ChatPayload::Full { text, sender } => (text, sender),
                    };
                self.ingress
                    .message(&conversation, text, sender, key)
                    .await?
            }
            None => {
                return Err(Status::invalid_argument(
                    "source or conversation is required",
                ));
            }
        };
        Ok(Response::new(InjectMessageResponse {
            session_id: accepted.session_id,
            message_id: accepted.message_id,
            duplicate: accepted.duplicate,
            answer: accepted.answer.unwrap_or_default(),
        }))
    }
}
