//! The `Delivery` gRPC service.

use std::time::Duration;

use ferroclaw_proto::v1::delivery_server::Delivery;
use ferroclaw_proto::v1::{
    AnswerQuestionRequest, AnswerQuestionResponse, DeliveryRecord, EnqueueRequest,
    ListConversationMessagesRequest, ListConversationMessagesResponse, ListDeliveriesRequest,
    ListDeliveriesResponse, Origin, ReopenOutboundRequest, RetryDeliveryRequest,
    RetryDeliveryResponse, WatchConversationRequest,
};
use tonic::{Request, Response, Status};

use crate::conversation_watch::{self, Watchers};
use crate::lanes::Lanes;
use crate::ledger::{AnswerRefused, Ledger, RetryRefused};

/// Longest long-poll a caller may ask for.
const MAX_WAIT: Duration = Duration::from_secs(120);
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

pub struct DeliveryService {
    pub(crate) ledger: Ledger,
    /// Who may answer questions (roles, agents' `answerers`).
    pub(crate) config: std::sync::Arc<ferroclaw_common::Config>,
    /// Hands answers to the asking agent.
    pub(crate) runner:
        ferroclaw_proto::v1::runner_client::RunnerClient<ferroclaw_common::grpc_auth::GrpcChannel>,
    /// Ends waiting long-polls when the service stops, so shutdown is not held up.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    /// Live conversation streams (they end on the same shutdown).
    pub(crate) watchers: Watchers,
    /// The lanes rows are delivered in: a retry claims its row there.
    pub(crate) lanes: Lanes,
}

/// Whether `user` may answer a question asked in `conversation`: anyone, unless the
/// conversation's agent has `answerers = "admins"`.
fn may_answer(
    config: &ferroclaw_common::Config,
    conversation: &str,
    agent: Option<&str>,
    user: &str,
) -> bool {
    let agent = agent
        .or_else(|| {
            config
                .conversation_route(conversation)
                .map(|r| r.agent.as_str())
        })
        .and_then(|name| config.agents.iter().find(|a| a.name == name));
    match agent {
        Some(agent) if agent.answerers == "admins" => config.is_admin(&agent.name, user),
        _ => true,
    }
}

fn retry_refused(refused: RetryRefused) -> Status {
    let message = refused.to_string();
    match refused {
        RetryRefused::Unknown(..) => Status::not_found(message),
        RetryRefused::Delivered(..) | RetryRefused::Pending(..) | RetryRefused::Refused(..) => {
            Status::failed_precondition(message)
        }
    }
}

fn limit(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}

#[tonic::async_trait]
impl Delivery for DeliveryService {
    async fn list_conversation_messages(
        &self,
        request: Request<ListConversationMessagesRequest>,
    ) -> Result<Response<ListConversationMessagesResponse>, Status> {
        let req = request.into_inner();
        if req.conversation.is_empty() {
            return Err(Status::invalid_argument("conversation must not be empty"));
        }
        let mut wait = Duration::from_millis(req.wait_ms.max(0) as u64).min(MAX_WAIT);
        if self.shutdown.is_cancelled() {
            wait = Duration::ZERO;
        }
        let waiting = self.ledger.wait_conversation_messages(
            &req.conversation,
            req.after,
            limit(req.limit),
            wait,
        );
        let messages = tokio::select! {
            messages = waiting => messages?,
            _ = self.shutdown.cancelled() => Vec::new(),
        };
        let next_cursor = messages.last().map_or(req.after, |m| m.cursor);
        let messages = messages
            .into_iter()
            .map(conversation_watch::to_proto)
            .collect();
        Ok(Response::new(ListConversationMessagesResponse {
            messages,
            next_cursor,
        }))
    }

    type WatchConversationStream = conversation_watch::WatchStream;

    async fn watch_conversation(
        &self,
        request: Request<WatchConversationRequest>,
    ) -> Result<Response<Self::WatchConversationStream>, Status> {
        let req = request.into_inner();
        let stream = self.watchers.watch(req.conversation_id, req.after_cursor)?;
        Ok(Response::new(stream))
    }

    async fn answer_question(
        &self,
        request: Request<AnswerQuestionRequest>,
    ) -> Result<Response<AnswerQuestionResponse>, Status> {
        let req = request.into_inner();
        if req.question_id.is_empty() || req.option.is_empty() {
            return Err(Status::invalid_argument(
                "question_id and option are required",
            ));
        }
        let now = ferroclaw_content::now_ms();
        let claimed = match self
            .ledger
            .claim_answer(
                &req.question_id,
                &req.option,
                &req.user,
                now,
                &|conversation, agent| may_answer(&self.config, conversation, agent, &req.user),
            )
            .await?
        {
            Ok(claimed) => claimed,
            Err(refused) => {
                let message = refused.to_string();
                return Err(match refused {
                    AnswerRefused::Unknown(_) => Status::not_found(message),
                    AnswerRefused::NotAllowed(_) => Status::permission_denied(message),
                    AnswerRefused::NoSuchOption(_) => Status::invalid_argument(message),
                    AnswerRefused::Answered { .. } | AnswerRefused::Expired => {
                        Status::failed_precondition(message)
                    }
                });
            }
        };
        // On Discord a person is named by a mention, which shows their name.
        let user = match (req.user.as_str(), &claimed.reply_to()) {
            ("", _) => "someone".to_string(),
            (id, ferroclaw_content::Destination::Discord { .. }) => format!("<@{id}>"),
            (id, _) => id.to_string(),
        };
        let content = ferroclaw_content::InboundContent::System(ferroclaw_content::SystemIn {
            event: "question_response".into(),
            text: format!("{user} answered {:?}", claimed.label),
            data: serde_json::json!({
                "question_id": req.question_id,
                "option": claimed.option,
                "label": claimed.label,
                "user": req.user,
            }),
        });
        let reply_to = claimed.reply_to();
        let enqueue = EnqueueRequest {
            session_id: claimed.session_id.clone(),
            kind: content.kind().into(),
            content_json: content.to_json(),
            origin: Some(Origin {
                channel: if claimed
                    .conversation
                    .starts_with(crate::ledger::DISCORD_PREFIX)
                {
                    "discord".into()
                } else {
                    "api".into()
                },
                conversation: claimed.conversation.clone(),
                sender: req.user.clone(),
                reply_to_json: serde_json::to_string(&reply_to).unwrap_or_default(),
            }),
            idempotency_key: format!("answer:{}", req.question_id),
            ..Default::default()
        };
        if let Err(status) = self.runner.clone().enqueue(enqueue).await {
            // The agent was not told: the question stays open for another try.
            self.ledger.release_answer(&req.question_id).await?;
            return Err(status);
        }
        Ok(Response::new(AnswerQuestionResponse {
            question_id: req.question_id,
            option: claimed.option,
            label: claimed.label,
        }))
    }

    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let entries = self.ledger.list(limit(request.into_inner().limit)).await?;
        let deliveries = entries
            .into_iter()
            .map(|e| DeliveryRecord {
                session_id: e.session_id,
                out_seq: e.out_seq,
                state: e.state,
                attempts: e.attempts,
                destination_json: e.destination,
                platform_message_id: e.platform_message_id.unwrap_or_default(),
                detail: e.detail.unwrap_or_default(),
                updated_at_ms: e.updated_at,
                reason: e.reason.unwrap_or_default(),
                rate_limit_waits: e.waits,
                waiting_until_ms: e.waiting_until.unwrap_or(0),
                retryable: e.retryable,
            })
            .collect();
        Ok(Response::new(ListDeliveriesResponse { deliveries }))
    }

    /// Sends a failed row again when its failure was transient. Two steps, with the row
    /// claimed from the lanes throughout: the ledger entry goes back to `pending` (attempts
    /// kept, `retried_at` now, from which its maximum age counts), then the runner reopens
    /// the outbound row, so its stream sends it again and the ledger lets it out once.
    ///
    /// A crash between the steps leaves the entry pending and the row settled failed at the
    /// runner, so nothing sends it; calling again marks it again and reopens it. A call for
    /// a row already marked (its retry under way) is a harmless no-op that answers
    /// "pending": the runner reopens only a row settled failed, so nothing goes out twice.
    /// Refused (FAILED_PRECONDITION) for a row that was delivered, is being delivered for
    /// the first time, or was refused by its destination; NOT_FOUND for a row delivery has
    /// no record of.
    async fn retry_delivery(
        &self,
        request: Request<RetryDeliveryRequest>,
    ) -> Result<Response<RetryDeliveryResponse>, Status> {
        let req = request.into_inner();
        if req.session_id.is_empty() {
            return Err(Status::invalid_argument("session_id must not be empty"));
        }
        let (session_id, out_seq) = (req.session_id.as_str(), req.out_seq);
        let pending = || {
            Ok(Response::new(RetryDeliveryResponse {
                state: "pending".into(),
            }))
        };
        let Some(claim) = self.lanes.claim(session_id, out_seq) else {
            // A lane (or another retry) has the row in hand right now.
            if let Some(refused) = self.ledger.retry_refusal(session_id, out_seq).await? {
                return Err(retry_refused(refused));
            }
            let state = self.ledger.row_state(session_id, out_seq).await?;
            if state.settled.is_none() {
                // Its retry is under way.
                return pending();
            }
            return Err(Status::failed_precondition(format!(
                "message {out_seq} of session {session_id} is being handled right now; try \
                 again in a moment"
            )));
        };
        let now = ferroclaw_content::now_ms();
        if let Err(refused) = self.ledger.mark_for_retry(session_id, out_seq, now).await? {
            return Err(retry_refused(refused));
        }
        let reopened = self
            .runner
            .clone()
            .reopen_outbound(ReopenOutboundRequest {
                session_id: session_id.to_string(),
                out_seq,
            })
            .await;
        match reopened {
            Ok(answer) => {
                tracing::info!(session = %session_id, seq = out_seq,
                    reopened = answer.into_inner().reopened, "delivery retried by an operator");
            }
            // The runner will never send it (the session or row is gone, or it holds
            // another outcome): the entry is failed again, as it was.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                ) =>
            {
                self.ledger.unmark_retry(session_id, out_seq, now).await?;
                return Err(status);
            }
            // Marked but not reopened: calling again finishes the retry.
            Err(status) => {
                return Err(Status::unavailable(format!(
                    "the runner could not be reached ({}); try again",
                    status.message()
                )));
            }
        }
        drop(claim);
        pending()
    }
}
