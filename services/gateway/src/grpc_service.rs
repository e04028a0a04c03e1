//! The `Gateway` gRPC service: the same ingress as the REST API, for programs.

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_proto::v1::gateway_server::Gateway;
use ferroclaw_proto::v1::inject_message_request::Target;
use ferroclaw_proto::v1::{InjectMessageRequest, InjectMessageResponse, WatchConversationRequest};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::conversation_events;
use crate::error::ApiError;
use crate::ingress::{Accepted, Ingress};

pub struct GatewayService {
    pub(crate) ingress: Ingress,
    /// Serves `WatchConversation` (its conversation store).
    pub(crate) delivery: GrpcChannel,
    /// Ends open streams when the gateway stops, so shutdown is not held up.
    pub(crate) shutdown: CancellationToken,
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
    type WatchConversationStream = conversation_events::Relay;

    async fn watch_conversation(
        &self,
        request: Request<WatchConversationRequest>,
    ) -> Result<Response<Self::WatchConversationStream>, Status> {
        let req = request.into_inner();
        let relay = conversation_events::open(
            &self.ingress,
            &self.delivery,
            &self.shutdown,
            req.conversation_id,
            req.after_cursor,
        )
        .await?;
        Ok(Response::new(relay))
    }

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
