//! Consumes the runner's outbound stream: each row is delivered at most once (the ledger
//! remembers), then settled back to the runner. Reconnects with backoff when the runner
//! goes away; the runner resends every unsettled row on the new stream.

use std::time::Duration;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_content::SystemIn;
use ferroclaw_content::{Destination, InboundContent, OutboundContent};
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_proto::v1::{
    EnqueueRequest, Origin, OutboundMessage, Outcome, SettleRequest, WatchOutboundRequest,
};
use tokio_util::sync::CancellationToken;

use crate::actions::{self, ActionError};
use crate::error::Result;
use crate::ledger::{Ledger, NewConversationMessage, NewQuestion, Settled};

/// Attempts at a transient failure before the row is recorded as failed.
const MAX_ATTEMPTS: i64 = 5;

pub struct Consumer {
    config: std::sync::Arc<ferroclaw_common::Config>,
    http: reqwest::Client,
    runner: RunnerClient<GrpcChannel>,
    scheduler: SchedulerClient<GrpcChannel>,
    ledger: Ledger,
    name: String,
    discord: Option<crate::discord::DiscordOut>,
    /// Failure notices this consumer enqueued, by (session, inbound seq): a reply to one that
    /// fails too is not reported again, so a channel that refuses everything cannot loop.
    notices: std::collections::HashSet<(String, i64)>,
}

/// Why one delivery attempt did not succeed.
#[derive(Debug)]
enum SendError {
    /// Worth retrying (a database hiccup, a peer briefly down).
    Transient(String),
    /// Will never work (unknown destination, unsupported kind).
    Permanent(String),
}

impl Consumer {
    pub fn new(
        config: std::sync::Arc<ferroclaw_common::Config>,
        runner: GrpcChannel,
        scheduler: GrpcChannel,
        ledger: Ledger,
        name: String,
    ) -> Self {
        Self {
            http: reqwest::Client::new(),
            // Outbox files arrive in one message.
            runner: RunnerClient::new(runner).max_decoding_message_size(27 * 1024 * 1024),
            scheduler: SchedulerClient::new(scheduler),
            discord: crate::discord::DiscordOut::from_config(&config.discord),
            notices: std::collections::HashSet::new(),
            config,
            ledger,
            name,
        }
    }

    /// Runs until shutdown, reconnecting to the runner as needed.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbound stream interrupted");
                }
            }
            let delay = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    async fn consume(&mut self, shutdown: &CancellationToken) -> Result<(), tonic::Status> {
        let request = WatchOutboundRequest {
            consumer: self.name.clone(),
        };
        let mut stream = self.runner.watch_outbound(request).await?.into_inner();
        tracing::info!("watching the runner's outbound stream");
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                _ = shutdown.cancelled() => return Ok(()),
            };
            let Some(message) = message else {
                return Ok(());
            };
            // Finish the row in hand even when shutdown arrives meanwhile: it is either
            // settled or resent by the runner later, never half-done.
            self.handle(message).await?;
        }
    }

    /// Delivers and settles one row. An error ends the stream: the runner resends every
    /// unsettled row on the next one, and the ledger keeps a resent row from going out twice.
    #[tracing::instrument(skip_all, fields(session = %message.session_id, seq = message.seq))]
    async fn handle(&mut self, message: OutboundMessage) -> Result<(), tonic::Status> {
        let settled = self.deliver(&message).await.map_err(|e| {
            tracing::error!(error = %e, "delivery ledger unavailable");
            tonic::Status::unavailable(e.to_string())
        })?;
        let answers_a_notice = self
            .notices
            .contains(&(message.session_id.clone(), message.in_reply_to));
        if let Settled::Failed { detail } = &settled
            && (message.kind == "action" || to_discord(&message))
            && !answers_a_notice
        {
            self.tell_agent_it_failed(&message, detail).await?;
        }
        self.settle(&message, &settled).await
    }

    /// A rejected action, or a message Discord refused, comes back to its agent as a system
    /// message saying why. The key makes it one message however often this row is handled.
    async fn tell_agent_it_failed(
        &mut self,
        message: &OutboundMessage,
        detail: &str,
    ) -> Result<(), tonic::Status> {
        let action = match OutboundContent::parse(&message.kind, &message.content_json) {
            Ok(OutboundContent::Action(a)) => a,
            _ => ferroclaw_content::ActionOut {
                action: "unknown".into(),
                params: serde_json::Value::Null,
            },
        };
        let content = if message.kind == "action" {
            InboundContent::System(SystemIn {
                event: "action_failed".into(),
                text: format!(
                    "Your {} action was not carried out: {detail}",
                    action.action
                ),
                data: serde_json::json!({
                    "action": action.action,
                    "params": action.params,
                    "out_seq": message.seq,
                }),
            })
        } else {
            InboundContent::System(SystemIn {
                event: "delivery_failed".into(),
                text: format!("Your message did not arrive: {detail}"),
                data: serde_json::json!({"out_seq": message.seq, "kind": message.kind}),
            })
        };
        let request = EnqueueRequest {
            session_id: message.session_id.clone(),
            kind: content.kind().into(),
            content_json: content.to_json(),
            origin: Some(Origin {
                channel: "system".into(),
                conversation: String::new(),
                sender: "ferroclaw".into(),
                reply_to_json: message.destination_json.clone(),
            }),
            idempotency_key: format!("failed:{}", message.seq),
            ..Default::default()
        };
        match self.runner.enqueue(request).await {
            Ok(response) => {
                let seq = response.into_inner().seq;
                self.notices.insert((message.session_id.clone(), seq));
                Ok(())
            }
            // The session is gone, refuses the notice, or takes no work (over its disk
            // quota, tampered with): nothing to retry.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                ) =>
            {
                tracing::error!(%status, "cannot tell the agent its action failed");
                Ok(())
            }
            Err(status) => Err(status),
        }
    }

    /// Delivers unless the ledger says it already was; returns the final outcome.
    async fn deliver(&self, message: &OutboundMessage) -> Result<Settled> {
        if let Some(done) = self
            .ledger
            .outcome(&message.session_id, message.seq)
            .await?
        {
            return Ok(done);
        }
        let mut attempt = 0;
        loop {
            attempt = if acts_elsewhere(message) {
                self.ledger
                    .attempt(
                        &message.session_id,
                        message.seq,
                        &message.kind,
                        &message.destination_json,
                    )
                    .await?
            } else {
                // Conversation messages are stored in the same transaction that marks them
                // delivered, so there is nothing to record before.
                attempt + 1
            };
            match self.send(message).await {
                Ok(platform_message_id) => {
                    return Ok(Settled::Delivered {
                        platform_message_id,
                    });
                }
                Err(SendError::Permanent(detail)) => {
                    tracing::warn!(%detail, "delivery failed permanently");
                    self.ledger.fail(message, &detail).await?;
                    return Ok(Settled::Failed { detail });
                }
                Err(SendError::Transient(detail)) if attempt >= MAX_ATTEMPTS => {
                    let detail = format!("gave up after {attempt} attempts: {detail}");
                    tracing::warn!(%detail, "delivery failed");
                    self.ledger.fail(message, &detail).await?;
                    return Ok(Settled::Failed { detail });
                }
                Err(SendError::Transient(detail)) => {
                    let delay = Duration::from_millis(200 << attempt.min(6));
                    tracing::info!(%detail, attempt, ?delay, "retrying delivery");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One attempt at sending the row where its destination says.
    async fn send(&self, message: &OutboundMessage) -> Result<String, SendError> {
        let destination: Destination =
            serde_json::from_str(&message.destination_json).map_err(|e| {
                SendError::Permanent(format!(
                    "unknown destination {}: {e}",
                    message.destination_json
                ))
            })?;
        let content = OutboundContent::parse(&message.kind, &message.content_json)
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        if let OutboundContent::Action(action) = &content {
            return match actions::perform(&mut self.scheduler.clone(), message, action).await {
                Ok(task_id) => Ok(format!("task:{task_id}")),
                Err(ActionError::Rejected(why)) => Err(SendError::Permanent(why)),
                Err(ActionError::Unavailable(why)) => Err(SendError::Transient(why)),
            };
        }
        match destination {
            Destination::Discord { channel_id } => {
                let discord = self.discord.as_ref().ok_or_else(|| {
                    SendError::Permanent(format!(
                        "no Discord bot token ({} is not set)",
                        self.config.discord.token_env
                    ))
                })?;
                let file = match &content {
                    OutboundContent::File(f) => Some(self.outbox_file(message, &f.path).await?),
                    _ => None,
                };
                if let OutboundContent::Card(card) = &content {
                    self.ledger
                        .record_discord_question(message, &channel_id, &question_of(card))
                        .await
                        .map_err(|e| SendError::Transient(e.to_string()))?;
                }
                discord
                    .send(&channel_id, message, &content, file)
                    .await
                    .map_err(|e| match e {
                        crate::discord::DiscordError::Permanent(m) => SendError::Permanent(m),
                        crate::discord::DiscordError::Transient(m) => SendError::Transient(m),
                    })
            }
            Destination::Callback { source } => {
                let route = self.config.webhook_route(&source).ok_or_else(|| {
                    SendError::Permanent(format!(
                        "webhook source {source:?} is not configured any more"
                    ))
                })?;
                crate::callback::post(&self.http, route, message, &content)
                    .await
                    .map_err(|e| match e {
                        crate::callback::CallbackError::Permanent(m) => SendError::Permanent(m),
                        crate::callback::CallbackError::Transient(m) => SendError::Transient(m),
                    })
            }
            Destination::Api { conversation } => {
                let question = match &content {
                    OutboundContent::Card(card) => Some(question_of(card)),
                    _ => None,
                };
                self.ledger
                    .deliver_to_conversation(
                        message,
                        NewConversationMessage {
                            conversation: &conversation,
                            in_reply_to: (message.in_reply_to > 0).then_some(message.in_reply_to),
                            kind: &message.kind,
                            text: content.text(),
                            content: &message.content_json,
                        },
                        question.as_ref(),
                    )
                    .await
                    .map_err(|e| SendError::Transient(e.to_string()))
            }
        }
    }

    /// A file of the session's outbox, read through the runner.
    async fn outbox_file(
        &self,
        message: &OutboundMessage,
        path: &str,
    ) -> Result<crate::discord::FileBytes, SendError> {
        let read = self
            .runner
            .clone()
            .read_outbox_file(ferroclaw_proto::v1::ReadOutboxFileRequest {
                session_id: message.session_id.clone(),
                path: path.to_string(),
            })
            .await;
        match read {
            Ok(r) => {
                let r = r.into_inner();
                Ok(crate::discord::FileBytes {
                    name: r.name,
                    data: r.data,
                })
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::InvalidArgument
                ) =>
            {
                Err(SendError::Permanent(format!(
                    "outbox file {path}: {}",
                    s.message()
                )))
            }
            Err(s) => Err(SendError::Transient(format!(
                "reading {path}: {}",
                s.message()
            ))),
        }
    }

    /// Tells the runner the outcome. On failure the row stays unsettled there and comes
    /// back on the next stream, where the ledger answers without sending again.
    async fn settle(
        &mut self,
        message: &OutboundMessage,
        settled: &Settled,
    ) -> Result<(), tonic::Status> {
        let (outcome, platform_message_id, detail) = match settled {
            Settled::Delivered {
                platform_message_id,
            } => (
                Outcome::Delivered,
                platform_message_id.clone(),
                String::new(),
            ),
            Settled::Failed { detail } => (Outcome::Failed, String::new(), detail.clone()),
        };
        let request = SettleRequest {
            session_id: message.session_id.clone(),
            out_seq: message.seq,
            outcome: outcome as i32,
            platform_message_id,
            detail,
        };
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            match self.runner.settle(request.clone()).await {
                Ok(_) => return Ok(()),
                Err(status) if attempt >= 3 => return Err(status),
                Err(status) => {
                    tracing::warn!(%status, attempt, "settle failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
            }
        }
    }
}

/// The pending question a card asks (expiring after an hour unless it says otherwise).
fn question_of(card: &ferroclaw_content::CardOut) -> NewQuestion {
    let secs = if card.expires_in_secs == 0 {
        3600
    } else {
        card.expires_in_secs as i64
    };
    NewQuestion {
        question_id: card.question_id.clone(),
        options_json: serde_json::to_string(&card.options).unwrap_or_default(),
        expires_at: ferroclaw_content::now_ms() + 1000 * secs,
    }
}

/// Rows whose sending acts outside delivery's database (an action on the scheduler, a
/// callback POST): their attempt is on record before it is made.
fn acts_elsewhere(message: &OutboundMessage) -> bool {
    message.kind == "action"
        || to_discord(message)
        || matches!(
            serde_json::from_str::<Destination>(&message.destination_json),
            Ok(Destination::Callback { .. })
        )
}

fn to_discord(message: &OutboundMessage) -> bool {
    matches!(
        serde_json::from_str::<Destination>(&message.destination_json),
        Ok(Destination::Discord { .. })
    )
}
