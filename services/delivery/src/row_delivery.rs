//! One outbound row, start to end: delivered at most once (the ledger remembers), retried
//! through waits and transient failures until it goes out, is refused, or is older than
//! the maximum age (counted from an operator's retry, if there was one); a failure is told
//! to the agent in a plain sentence; the outcome is settled back to the runner.

use crate::metrics;
use crate::settler::Settler;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_content::{Destination, InboundContent, OutboundContent, SystemIn};
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_proto::v1::{EnqueueRequest, Origin, OutboundMessage, Outcome, SettleRequest};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::actions::{self, ActionError};
use crate::discord::{DiscordOut, Progress};
use crate::error::Result;
use crate::ledger::{Ledger, NewConversationMessage, NewQuestion, Settled};
use crate::send_error::{SendError, in_words};

/// The longest pause between tries after a transient failure.
const LONGEST_BACKOFF: Duration = Duration::from_secs(30);
/// Notices remembered (see `RowDelivery::notices`).
const REMEMBERED_NOTICES: usize = 100_000;

pub struct RowDelivery {
    config: Arc<ferroclaw_common::Config>,
    http: reqwest::Client,
    runner: RunnerClient<GrpcChannel>,
    scheduler: SchedulerClient<GrpcChannel>,
    ledger: Ledger,
    discord: Option<DiscordOut>,
    /// Bounds the sends in flight; a row waiting out a rate limit or a backoff holds none.
    sending: Semaphore,
    /// Failure notices enqueued, by (session, inbound seq): a reply to one that fails too
    /// is not reported again, so a channel that refuses everything cannot loop.
    notices: Mutex<HashSet<(String, i64)>>,
    settler: Settler,
}

impl RowDelivery {
    pub fn new(
        config: Arc<ferroclaw_common::Config>,
        runner: GrpcChannel,
        scheduler: GrpcChannel,
        ledger: Ledger,
        discord: Option<DiscordOut>,
        settler: Settler,
    ) -> Self {
        Self {
            settler,
            http: reqwest::Client::new(),
            // Outbox files arrive in one message.
            runner: RunnerClient::new(runner).max_decoding_message_size(27 * 1024 * 1024),
            scheduler: SchedulerClient::new(scheduler),
            sending: Semaphore::new(config.delivery.max_concurrent_sends.max(1)),
            discord,
            notices: Mutex::default(),
            config,
            ledger,
        }
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.config.delivery.max_reply_age_secs)
    }

    /// Delivers, reports and settles one row. Returns `false` when shutdown came first:
    /// the row stays unsettled and pending, and the next start goes on with it.
    pub async fn handle(&self, message: &OutboundMessage, shutdown: &CancellationToken) -> bool {
        let destination = metrics::destination_kind(message);
        let span = tracing::info_span!(
            "delivery",
            otel.name = %format!("deliver {destination}"),
            destination,
            session = %message.session_id,
            seq = message.seq,
        );
        // The message's trace ends here: the agent's batch is the parent.
        ferroclaw_common::telemetry::continue_trace(&span, &message.trace);
        self.handle_row(message, shutdown).instrument(span).await
    }

    async fn handle_row(&self, message: &OutboundMessage, shutdown: &CancellationToken) -> bool {
        let settled = loop {
            match self.deliver(message, shutdown).await {
                Ok(Some(settled)) => break settled,
                Ok(None) => return false,
                Err(e) => {
                    tracing::error!(error = %e, "delivery ledger unavailable; retrying");
                    if !pause(Duration::from_secs(1), shutdown).await {
                        return false;
                    }
                }
            }
        };
        self.finish(message, &settled, shutdown).await
    }

    /// Finishes a row the ledger already has an outcome for (a peer delivery sent it) without
    /// sending anything: `None` when it has none yet (or the ledger cannot say), else what
    /// [`Self::handle`] would return.
    pub async fn finish_if_settled(
        &self,
        message: &OutboundMessage,
        shutdown: &CancellationToken,
    ) -> Option<bool> {
        let state = self
            .ledger
            .row_state(&message.session_id, message.seq)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "delivery ledger unavailable"))
            .ok()?;
        let settled = state.settled?;
        Some(self.finish(message, &settled, shutdown).await)
    }

    /// Tells the agent of a failure where that is due, then settles the row at the runner.
    async fn finish(
        &self,
        message: &OutboundMessage,
        settled: &Settled,
        shutdown: &CancellationToken,
    ) -> bool {
        if let Settled::Failed { reason, .. } = settled
            && (message.kind == "action" || to_discord(message))
            && !self.answers_a_notice(message)
            && !self.tell_agent_it_failed(message, reason, shutdown).await
        {
            return false;
        }
        self.settle(message, settled).await
    }

    fn answers_a_notice(&self, message: &OutboundMessage) -> bool {
        self.notices
            .lock()
            .is_ok_and(|n| n.contains(&(message.session_id.clone(), message.in_reply_to)))
    }

    /// Delivers unless the ledger says it already was; `None` when shutdown came first.
    #[tracing::instrument(skip_all, fields(session = %message.session_id, seq = message.seq))]
    async fn deliver(
        &self,
        message: &OutboundMessage,
        shutdown: &CancellationToken,
    ) -> Result<Option<Settled>> {
        let state = self
            .ledger
            .row_state(&message.session_id, message.seq)
            .await?;
        if let Some(done) = state.settled {
            return Ok(Some(done));
        }
        // A row an operator sent again gets a whole maximum age from the retry: counted
        // from its creation, it would be given up at once.
        let since = message
            .created_at_ms
            .max(state.retried_at.unwrap_or(i64::MIN));
        let age = ferroclaw_content::now_ms().saturating_sub(since);
        let left = self
            .max_age()
            .saturating_sub(Duration::from_millis(age.max(0) as u64));
        let deadline = tokio::time::Instant::now() + left;
        let mut progress = Progress::default();
        let mut failures: u32 = 0;
        loop {
            if acts_elsewhere(message) {
                self.ledger
                    .attempt(
                        &message.session_id,
                        message.seq,
                        &message.kind,
                        &message.destination_json,
                    )
                    .await?;
            }
            // Conversation messages are stored in the same transaction that marks them
            // delivered, so there is nothing to record before.
            let sent = {
                let _permit = self.sending.acquire().await;
                let span = tracing::info_span!(
                    "send",
                    otel.name = %format!("send {}", metrics::destination_kind(message)),
                    otel.kind = "client",
                );
                self.send(message, &mut progress).instrument(span).await
            };
            let (wait, plain, detail) = match sent {
                Ok(platform_message_id) => {
                    if acts_elsewhere(message) {
                        self.ledger.delivered(message, &platform_message_id).await?;
                    }
                    metrics::settled(message, "delivered");
                    return Ok(Some(Settled::Delivered {
                        platform_message_id,
                    }));
                }
                Err(SendError::Permanent(failure)) => {
                    tracing::warn!(detail = %failure.detail, "delivery refused");
                    metrics::settled(message, "refused");
                    return self
                        .fail(message, failure.detail, failure.plain, false)
                        .await;
                }
                Err(SendError::Wait {
                    wait,
                    plain,
                    detail,
                }) => {
                    let until = ferroclaw_content::now_ms() + wait.as_millis() as i64;
                    self.ledger.waiting(message, until, &detail).await?;
                    tracing::info!(%detail, ?wait, "waiting out a rate limit");
                    metrics::METRICS
                        .rate_limit_waits
                        .with_label_values(&[metrics::destination_kind(message)])
                        .inc();
                    (wait, plain, detail)
                }
                Err(SendError::Transient(failure)) => {
                    failures += 1;
                    let wait = (Duration::from_millis(200) * 2u32.pow(failures.min(8)))
                        .min(LONGEST_BACKOFF);
                    tracing::info!(detail = %failure.detail, failures, ?wait, "retrying delivery");
                    metrics::METRICS
                        .retries
                        .with_label_values(&[metrics::destination_kind(message)])
                        .inc();
                    (wait, failure.plain, failure.detail)
                }
            };
            if tokio::time::Instant::now() + wait > deadline {
                // Waiting past the maximum age is pointless: wait until it, then give up.
                if !pause(deadline - tokio::time::Instant::now(), shutdown).await {
                    return Ok(None);
                }
                let what = if message.kind == "action" {
                    "the action was not carried out"
                } else {
                    "the reply was not sent"
                };
                let max_age = in_words(self.max_age());
                let reason = format!("{plain} for {max_age}; {what}.");
                let detail = format!("given up after {max_age}: {detail}");
                tracing::warn!(%detail, "delivery given up");
                metrics::settled(message, "given_up");
                // Only transient failures got here: the destination may take it later.
                return self.fail(message, detail, reason, true).await;
            }
            if !pause(wait, shutdown).await {
                return Ok(None);
            }
        }
    }

    async fn fail(
        &self,
        message: &OutboundMessage,
        detail: String,
        reason: String,
        retryable: bool,
    ) -> Result<Option<Settled>> {
        self.ledger
            .fail(message, &detail, &reason, retryable)
            .await?;
        Ok(Some(Settled::Failed { detail, reason }))
    }

    /// One try at sending the row where its destination says.
    async fn send(
        &self,
        message: &OutboundMessage,
        progress: &mut Progress,
    ) -> Result<String, SendError> {
        let destination: Destination =
            serde_json::from_str(&message.destination_json).map_err(|e| {
                SendError::permanent(
                    "The message names a destination that does not exist.",
                    format!("unknown destination {}: {e}", message.destination_json),
                )
            })?;
        let content = OutboundContent::parse(&message.kind, &message.content_json)
            .map_err(|e| SendError::permanent("The message was malformed.", e.to_string()))?;
        if let OutboundContent::Action(action) = &content {
            return match actions::perform(&mut self.scheduler.clone(), message, action).await {
                Ok(task_id) => Ok(format!("task:{task_id}")),
                // The scheduler's refusals are ferroclaw's own sentences.
                Err(ActionError::Rejected(why)) => Err(SendError::permanent(why.clone(), why)),
                Err(ActionError::Unavailable(why)) => Err(SendError::transient(
                    "The scheduler could not be reached",
                    why,
                )),
            };
        }
        match destination {
            Destination::Discord { channel_id } => {
                let discord = self.discord.as_ref().ok_or_else(|| {
                    SendError::permanent(
                        "Discord is not set up here, so the message was not posted.",
                        format!(
                            "no Discord bot token ({} is not set)",
                            self.config.discord.token_env
                        ),
                    )
                })?;
                // A rate limit already announced is waited out before anything is read.
                let wait = discord.delay(&channel_id);
                if !wait.is_zero() {
                    return Err(SendError::Wait {
                        wait,
                        plain: "Discord kept rate-limiting this channel".into(),
                        detail: "Discord rate limit announced earlier".into(),
                    });
                }
                let file = match &content {
                    OutboundContent::File(f) => Some(self.outbox_file(message, &f.path).await?),
                    _ => None,
                };
                if let OutboundContent::Card(card) = &content {
                    self.ledger
                        .record_discord_question(message, &channel_id, &question_of(card))
                        .await
                        .map_err(|e| {
                            SendError::transient("Delivery's database failed", e.to_string())
                        })?;
                }
                discord
                    .send(&channel_id, message, &content, file, progress)
                    .await
            }
            Destination::Callback { source } => {
                let route = self.config.webhook_route(&source).ok_or_else(|| {
                    SendError::permanent(
                        "The webhook source is not configured any more.",
                        format!("webhook source {source:?} is not configured"),
                    )
                })?;
                crate::callback::post(&self.http, route, message, &content).await
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
                    .map_err(|e| SendError::transient("Delivery's database failed", e.to_string()))
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
                // The runner's refusals are its own plain sentences (no upstream text).
                Err(SendError::permanent(
                    format!("The file {path} could not be sent: {}", s.message()),
                    format!("outbox file {path}: {}", s.message()),
                ))
            }
            Err(s) => Err(SendError::transient(
                "The session's files could not be read",
                format!("reading {path}: {}", s.message()),
            )),
        }
    }

    /// A rejected action, or a message Discord refused, comes back to its agent as a system
    /// message saying why, in a plain sentence. The key makes it one message however often
    /// this row is handled. `false` when shutdown came first.
    async fn tell_agent_it_failed(
        &self,
        message: &OutboundMessage,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
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
                    "Your {} action was not carried out: {reason}",
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
                text: format!("Your message did not arrive. {reason}"),
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
        let mut failures: u32 = 0;
        loop {
            match self.runner.clone().enqueue(request.clone()).await {
                Ok(response) => {
                    let seq = response.into_inner().seq;
                    if let Ok(mut notices) = self.notices.lock() {
                        // Bounded: forgetting costs at most one more notice, never a loop.
                        if notices.len() >= REMEMBERED_NOTICES {
                            notices.clear();
                        }
                        notices.insert((message.session_id.clone(), seq));
                    }
                    return true;
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
                    tracing::error!(%status, "cannot tell the agent its message failed");
                    return true;
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(%status, failures, "cannot reach the runner to tell the agent; retrying");
                    if !pause(backoff(failures), shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Tells the runner the outcome, retrying while it is unreachable. A row that cannot be
    /// settled stays unsettled there and comes back on the next stream, where the ledger
    /// answers without sending again. `false` when shutdown came first.
    async fn settle(&self, message: &OutboundMessage, settled: &Settled) -> bool {
        let (outcome, platform_message_id, detail) = match settled {
            Settled::Delivered {
                platform_message_id,
            } => (
                Outcome::Delivered,
                platform_message_id.clone(),
                String::new(),
            ),
            Settled::Failed { detail, .. } => (Outcome::Failed, String::new(), detail.clone()),
        };
        let request = SettleRequest {
            session_id: message.session_id.clone(),
            out_seq: message.seq,
            outcome: outcome as i32,
            platform_message_id,
            detail,
        };
        // Shared with other lanes' settlements: one call and one commit for all that queue up.
        self.settler.settle(request).await
    }
}

/// Sleeps `wait` unless shutdown comes first (then `false`).
async fn pause(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.cancelled() => false,
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(6)).min(5_000))
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
/// callback POST, a Discord post): their attempt is on record before it is made.
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
