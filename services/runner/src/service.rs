//! The `Runner` gRPC service.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use ferroclaw_common::config::AgentConfig;
use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_mailbox::{
    Destination, HostMailbox, NewInbound, Origin, Outcome as MailOutcome, Settlement,
};
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::runner_server::Runner;
use ferroclaw_proto::v1::{
    EnqueueRequest, EnqueueResponse, GetSessionRequest, ListSessionsRequest, ListSessionsResponse,
    OutboundMessage, Outcome, PutInboxFileRequest, PutInboxFileResponse, ReadOutboxFileRequest,
    ReadOutboxFileResponse, Session, SettleBatchRequest, SettleBatchResponse, SettleRequest,
    SettleResponse, SettleResult, SyncTasksRequest, SyncTasksResponse, WatchOutboundRequest,
};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::count_cache::CountCache;
use crate::error::{Result, RunnerError};
use crate::mailboxes::Mailboxes;
use crate::outbound_feed::OutboundFeed;
use crate::placement::{Placement, Route, was_forwarded};
use crate::registry::{Registry, SessionRecord};
use crate::session_files;
use crate::supervisor::Supervisor;

pub struct RunnerService {
    pub(crate) registry: Registry,
    pub(crate) mailboxes: Arc<Mailboxes>,
    pub(crate) supervisor: Supervisor,
    pub(crate) feed: Arc<OutboundFeed>,
    pub(crate) agents: HashMap<String, AgentConfig>,
    pub(crate) shutdown: CancellationToken,
    /// Message counts of sessions whose files did not change (the console's pages).
    pub(crate) counts: CountCache,
    /// Several runners: where sessions are placed (`None`: this runner serves all).
    pub(crate) placement: Option<Arc<Placement>>,
    /// Held while kept messages are moved into mailboxes (`routing::move_waiting`).
    pub(crate) moving: tokio::sync::Mutex<()>,
    /// Sessions this runner took over lately, and when (`routing::may_have_waiting`).
    pub(crate) taken: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl RunnerService {
    /// Validates everything before anything is written: a rejected request leaves no trace.
    pub(crate) fn parse_enqueue(&self, req: &EnqueueRequest) -> Result<NewInbound> {
        // With a session id, the session names its agent and conversation.
        let by_session = !req.session_id.is_empty();
        if !by_session && !self.agents.contains_key(&req.agent) {
            return Err(RunnerError::NotFound(format!(
                "no agent named {:?}",
                req.agent
            )));
        }
        if !by_session && req.conversation_key.is_empty() {
            return Err(RunnerError::InvalidArgument(
                "conversation_key must not be empty".into(),
            ));
        }
        let content = HostMailbox::validate(&req.kind, &req.content_json)
            .map_err(|e| RunnerError::InvalidArgument(e.to_string()))?;
        let origin = req
            .origin
            .as_ref()
            .ok_or_else(|| RunnerError::InvalidArgument("origin is required".into()))?;
        let reply_to: Destination = serde_json::from_str(&origin.reply_to_json).map_err(|e| {
            RunnerError::InvalidArgument(format!("origin.reply_to_json is not a destination: {e}"))
        })?;
        let id = if req.idempotency_key.is_empty() {
            ferroclaw_common::ids::new_id("msg")
        } else if req.idempotency_key.len() > 256 {
            return Err(RunnerError::InvalidArgument(
                "idempotency_key is longer than 256 bytes".into(),
            ));
        } else {
            req.idempotency_key.clone()
        };
        Ok(NewInbound {
            id,
            content,
            origin: Origin {
                channel: origin.channel.clone(),
                conversation: origin.conversation.clone(),
                sender: origin.sender.clone(),
                reply_to,
            },
            process_after: (req.process_after_ms > 0).then_some(req.process_after_ms),
            // The runner's own span when it exports (a child of the caller's), else what the
            // caller sent: the agent's spans continue from it.
            trace: Some(ferroclaw_common::telemetry::current_traceparent())
                .filter(|t| !t.is_empty())
                .or_else(|| (!req.trace.is_empty()).then(|| req.trace.clone())),
        })
    }

    async fn session(&self, id: &str) -> Result<SessionRecord> {
        self.registry
            .get(id)
            .await?
            .ok_or_else(|| RunnerError::NotFound(format!("no session {id:?}")))
    }

    /// The session of (agent, conversation key), a new one placed where it belongs.
    async fn session_of(&self, agent: &str, conversation_key: &str) -> Result<SessionRecord> {
        let runner = self
            .placement
            .as_ref()
            .map(|p| p.choose(agent, conversation_key));
        self.registry
            .get_or_create(agent, conversation_key, runner.as_deref())
            .await
    }

    /// Several runners: each registered one, with its sessions when `counted` (empty for a
    /// single one).
    async fn runner_instances(
        &self,
        counted: bool,
    ) -> Result<Vec<ferroclaw_proto::v1::RunnerInstance>> {
        let Some(placement) = &self.placement else {
            return Ok(Vec::new());
        };
        let peers = placement.read_peers().await?;
        let placed = if counted {
            self.registry.placed_counts().await?
        } else {
            HashMap::new()
        };
        Ok(peers
            .into_iter()
            .map(|p| ferroclaw_proto::v1::RunnerInstance {
                sessions: placed.get(&p.id).copied().unwrap_or(0),
                id: p.id,
                url: p.url,
                docker_host: p.docker_host,
                capacity: p.capacity,
                shared_storage: p.shared_storage,
                live: p.live,
            })
            .collect())
    }

    /// `message` as a call forwarded to the session's runner.
    fn onward<T>(&self, message: T) -> Result<Request<T>, Status> {
        self.placement
            .as_ref()
            .map(|p| p.forwarded(message))
            .ok_or_else(|| Status::internal("forwarding without several runners"))
    }

    /// Session `id` and where its calls go.
    async fn routed(&self, id: &str, forwarded: bool) -> Result<(SessionRecord, Route)> {
        let session = self.session(id).await?;
        self.route_of(session, forwarded).await
    }

    /// Appends `message` to the mailbox of `session`, served here.
    pub(crate) async fn enqueue_here(
        &self,
        session: &SessionRecord,
        message: &NewInbound,
    ) -> Result<EnqueueResponse, Status> {
        if let Some(why) = self.supervisor.over_quota(session).await {
            return Err(Status::failed_precondition(why));
        }
        if self.may_have_waiting(&session.id)
            && let Some(p) = &self.placement
            && crate::handoff::any_for(p.pool(), &session.id).await?
        {
            // Messages kept while this runner was missing go first.
            self.move_waiting().await?;
        }
        self.append(session, message).await
    }

    /// [`RunnerService::enqueue_here`] without looking for kept messages first.
    pub(crate) async fn append(
        &self,
        session: &SessionRecord,
        message: &NewInbound,
    ) -> Result<EnqueueResponse, Status> {
        let mailbox = self.mailboxes.get(session).await?;
        let enqueued = mailbox.enqueue(message).await.map_err(RunnerError::from)?;
        // Its agent may write rows from now on.
        self.feed.note_active(session);
        crate::metrics::METRICS
            .enqueued
            .with_label_values(&[
                session.agent.as_str(),
                if enqueued.duplicate { "true" } else { "false" },
            ])
            .inc();
        if !enqueued.duplicate {
            self.feed.pending_replies.enqueued(
                &session.id,
                enqueued.seq,
                ferroclaw_mailbox::now_ms(),
            );
            self.registry.touch(&session.id).await?;
            self.supervisor.ensure(session).await;
        }
        tracing::debug!(session = %session.id, seq = enqueued.seq, duplicate = enqueued.duplicate, "enqueued");
        Ok(EnqueueResponse {
            session_id: session.id.clone(),
            seq: enqueued.seq,
            message_id: enqueued.id,
            duplicate: enqueued.duplicate,
            waiting_for_runner: String::new(),
        })
    }
}

/// A task as the agent reads it from its mailbox (`tasks.spec`).
fn task_spec(t: &ferroclaw_proto::v1::Task) -> serde_json::Value {
    let schedule = t.schedule.clone().unwrap_or_default();
    serde_json::json!({
        "id": t.id,
        "name": t.name,
        "prompt": t.prompt,
        "state": t.state,
        "schedule": {
            "kind": schedule.kind,
            "cron": schedule.cron,
            "interval_secs": schedule.interval_secs,
            "at": schedule.at,
            "timezone": schedule.timezone,
        },
        "catch_up": t.catch_up,
        "next_run_ms": t.next_run_ms,
        "last_run_ms": t.last_run_ms,
    })
}

/// Goes on when `route` is here; else returns the answer of the session's runner to the
/// call forwarded there, or the refusal for a missing runner.
macro_rules! serve_here_or_return {
    ($service:ident, $session:expr, $route:expr, $req:expr, $call:ident) => {
        match $route {
            Route::Here => {}
            Route::There { mut client, .. } => {
                return client.$call($service.onward($req)?).await;
            }
            Route::Missing { runner } => {
                return Err(Self::missing(&$session, &runner).into());
            }
        }
    };
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<OutboundMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Runner for RunnerService {
    #[tracing::instrument(skip_all, fields(agent = %request.get_ref().agent, kind = %request.get_ref().kind))]
    async fn enqueue(
        &self,
        request: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let message = self.parse_enqueue(&req)?;
        let session = if req.session_id.is_empty() {
            self.session_of(&req.agent, &req.conversation_key).await?
        } else {
            self.session(&req.session_id).await?
        };
        let (session, route) = self.route_of(session, forwarded).await?;
        // Elsewhere the message goes under its id: a repeat through any runner is one.
        let onward = || EnqueueRequest {
            session_id: session.id.clone(),
            idempotency_key: message.id.clone(),
            ..req.clone()
        };
        match route {
            Route::Here => Ok(Response::new(self.enqueue_here(&session, &message).await?)),
            Route::There { runner, mut client } => {
                let placement = self
                    .placement
                    .as_ref()
                    .ok_or(Status::internal("no placement"))?;
                tracing::debug!(session = %session.id, %runner, "enqueue forwarded");
                client
                    .enqueue(placement.forwarded(onward()))
                    .await
                    .inspect_err(|_| {
                        self.registry.forget(&session.id);
                    })
            }
            Route::Missing { runner } => {
                let placement = self
                    .placement
                    .as_ref()
                    .ok_or(Status::internal("no placement"))?;
                let kept = crate::handoff::keep(placement.pool(), &session.id, &onward()).await?;
                tracing::info!(session = %session.id, %runner, duplicate = !kept,
                    "enqueue kept until the session's runner is back");
                Ok(Response::new(EnqueueResponse {
                    session_id: session.id.clone(),
                    seq: 0,
                    message_id: message.id,
                    duplicate: !kept,
                    waiting_for_runner: runner,
                }))
            }
        }
    }

    type WatchOutboundStream = OutboundStream;

    async fn watch_outbound(
        &self,
        request: Request<WatchOutboundRequest>,
    ) -> Result<Response<Self::WatchOutboundStream>, Status> {
        let consumer = request.into_inner().consumer;
        let rx = self.feed.subscribe(consumer, self.shutdown.clone());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(session = %request.get_ref().session_id, seq = request.get_ref().out_seq))]
    async fn settle(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let outcome = settlement_outcome(&req)?;
        let (session, route) = self.routed(&req.session_id, forwarded).await?;
        serve_here_or_return!(self, session, route, req, settle);
        let mailbox = self.mailboxes.get(&session).await?;
        let none_if_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let recorded = mailbox
            .settle(
                req.out_seq,
                outcome,
                none_if_empty(&req.platform_message_id).as_deref(),
                none_if_empty(&req.detail).as_deref(),
            )
            .await
            .map_err(RunnerError::from)?;
        Ok(Response::new(SettleResponse { recorded }))
    }

    async fn settle_batch(
        &self,
        request: Request<SettleBatchRequest>,
    ) -> Result<Response<SettleBatchResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let settlements = request.into_inner().settlements;
        if settlements.len() > MAX_SETTLE_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} settlements in one call; at most {MAX_SETTLE_BATCH}",
                settlements.len()
            )));
        }
        let mut results: Vec<SettleResult> = settlements
            .iter()
            .map(|_| SettleResult::default())
            .collect();
        // Valid settlements by session, in order, each with its place in the answer.
        let mut by_session: Vec<(String, Vec<(usize, MailOutcome)>)> = Vec::new();
        for (i, s) in settlements.iter().enumerate() {
            match settlement_outcome(s) {
                Ok(outcome) => match by_session.iter_mut().find(|(id, _)| *id == s.session_id) {
                    Some((_, items)) => items.push((i, outcome)),
                    None => by_session.push((s.session_id.clone(), vec![(i, outcome)])),
                },
                Err(status) => results[i].refused = status.message().to_string(),
            }
        }
        // Several runners: settlements of sessions served elsewhere, by runner.
        let mut elsewhere: HashMap<String, (RunnerClient<GrpcChannel>, Vec<usize>)> =
            HashMap::new();
        for (session_id, items) in by_session {
            let session = match self.routed(&session_id, forwarded).await {
                Ok((session, Route::Here)) => session,
                Ok((_, Route::There { runner, client })) => {
                    let (_, indices) = elsewhere.entry(runner).or_insert((*client, Vec::new()));
                    indices.extend(items.iter().map(|(i, _)| *i));
                    continue;
                }
                Ok((_, Route::Missing { runner })) => {
                    // Its row comes again on that runner's stream once it is back, and the
                    // ledger settles it then without sending it again.
                    for (i, _) in &items {
                        results[*i].waiting_for_runner = runner.clone();
                    }
                    continue;
                }
                Err(RunnerError::NotFound(why)) => {
                    for (i, _) in &items {
                        results[*i].refused = why.clone();
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mailbox = self.mailboxes.get(&session).await?;
            let batch: Vec<Settlement> = items
                .iter()
                .map(|(i, outcome)| Settlement {
                    out_seq: settlements[*i].out_seq,
                    outcome: *outcome,
                    platform_message_id: non_empty(&settlements[*i].platform_message_id),
                    detail: non_empty(&settlements[*i].detail),
                })
                .collect();
            // One commit for the session's settlements.
            let recorded = mailbox
                .settle_many(&batch)
                .await
                .map_err(RunnerError::from)?;
            for ((i, _), recorded) in items.iter().zip(recorded) {
                results[*i].recorded = recorded;
            }
        }
        for (runner, (mut client, indices)) in elsewhere {
            let request = SettleBatchRequest {
                settlements: indices.iter().map(|i| settlements[*i].clone()).collect(),
            };
            // A failure fails the whole call: the caller sends it again, and what was
            // recorded already is recorded once.
            let answer = client
                .settle_batch(self.onward(request)?)
                .await
                .map_err(|e| {
                    Status::unavailable(format!("settling on runner {runner}: {}", e.message()))
                })?;
            for (i, result) in indices.iter().zip(answer.into_inner().results) {
                results[*i] = result;
            }
        }
        Ok(Response::new(SettleBatchResponse { results }))
    }

    async fn sync_tasks(
        &self,
        request: Request<SyncTasksRequest>,
    ) -> Result<Response<SyncTasksResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let (session, route) = self.routed(&req.session_id, forwarded).await?;
        serve_here_or_return!(self, session, route, req, sync_tasks);
        let tasks: Vec<(String, String)> = req
            .tasks
            .iter()
            .map(|t| (t.id.clone(), task_spec(t).to_string()))
            .collect();
        self.mailboxes
            .get(&session)
            .await?
            .replace_tasks(&tasks)
            .await
            .map_err(RunnerError::from)?;
        Ok(Response::new(SyncTasksResponse {}))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        // See `session_list`: only the page's sessions' files are looked at.
        let everywhere = !was_forwarded(&request);
        Ok(Response::new(
            self.list_sessions_page(request.into_inner(), everywhere)
                .await?,
        ))
    }

    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let (session, route) = self.routed(&req.session_id, forwarded).await?;
        match route {
            Route::Here => Ok(Response::new(self.describe_session(session).await?)),
            Route::There { mut client, .. } => client.get_session(self.onward(req)?).await,
            Route::Missing { runner } => Ok(Response::new(
                self.describe_unavailable(session, &runner).await?,
            )),
        }
    }

    async fn put_inbox_file(
        &self,
        request: Request<PutInboxFileRequest>,
    ) -> Result<Response<PutInboxFileResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let session = if req.session_id.is_empty() {
            if !self.agents.contains_key(&req.agent) {
                return Err(Status::invalid_argument(format!(
                    "unknown agent {:?}",
                    req.agent
                )));
            }
            self.session_of(&req.agent, &req.conversation_key).await?
        } else {
            self.session(&req.session_id).await?
        };
        let (session, route) = self.route_of(session, forwarded).await?;
        match route {
            Route::Here => {}
            Route::There { mut client, .. } => {
                let req = PutInboxFileRequest {
                    session_id: session.id.clone(),
                    ..req
                };
                return client.put_inbox_file(self.onward(req)?).await;
            }
            Route::Missing { runner } => return Err(Self::missing(&session, &runner).into()),
        }
        // The mailbox makes the session directory (and its in/) exist.
        self.mailboxes.get(&session).await?;
        let paths = self.mailboxes.paths(&session);
        let (message_id, name, data) = (req.message_id, req.name, req.data);
        let size = data.len() as u64;
        let path = tokio::task::spawn_blocking(move || {
            session_files::put_inbox_file(&paths, &message_id, &name, &data)
        })
        .await
        .map_err(|e| Status::internal(format!("inbox write: {e}")))??;
        Ok(Response::new(PutInboxFileResponse {
            session_id: session.id,
            path,
            size,
        }))
    }

    type WatchActivityStream =
        Pin<Box<dyn Stream<Item = Result<ferroclaw_proto::v1::Activity, Status>> + Send>>;

    async fn watch_activity(
        &self,
        _request: Request<ferroclaw_proto::v1::WatchActivityRequest>,
    ) -> Result<Response<Self::WatchActivityStream>, Status> {
        let rx = crate::activity::subscribe(
            &self.feed,
            self.registry.clone(),
            self.mailboxes.clone(),
            self.shutdown.clone(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn read_outbox_file(
        &self,
        request: Request<ReadOutboxFileRequest>,
    ) -> Result<Response<ReadOutboxFileResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let (session, route) = self.routed(&req.session_id, forwarded).await?;
        serve_here_or_return!(self, session, route, req, read_outbox_file);
        let paths = self.mailboxes.paths(&session);
        let (data, name) =
            tokio::task::spawn_blocking(move || session_files::read_outbox_file(&paths, &req.path))
                .await
                .map_err(|e| Status::internal(format!("outbox read: {e}")))??;
        Ok(Response::new(ReadOutboxFileResponse { data, name }))
    }

    async fn get_runner_status(
        &self,
        request: Request<ferroclaw_proto::v1::GetRunnerStatusRequest>,
    ) -> Result<Response<ferroclaw_proto::v1::RunnerStatus>, Status> {
        if request.get_ref().runners_only {
            return Ok(Response::new(ferroclaw_proto::v1::RunnerStatus {
                runner_id: self
                    .placement
                    .as_ref()
                    .map(|p| p.id().to_string())
                    .unwrap_or_default(),
                runners: self.runner_instances(false).await?,
                ..Default::default()
            }));
        }
        // The engine probe is bounded (2 s): a stuck engine shows as not answering.
        let (engine_ok, engine) = self.supervisor.describe_engine().await;
        let states = self.supervisor.state_counts().await;
        let count = |state| {
            states
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| u32::try_from(*n).unwrap_or(u32::MAX))
        };
        Ok(Response::new(ferroclaw_proto::v1::RunnerStatus {
            backend: self.supervisor.backend_name().to_string(),
            engine_ok,
            engine,
            max_running_agents: u32::try_from(self.supervisor.max_running_agents())
                .unwrap_or(u32::MAX),
            running: count(crate::supervisor::AgentState::Running),
            queued: count(crate::supervisor::AgentState::Queued),
            sessions: u64::try_from(self.registry.count().await?).unwrap_or(0),
            agent_starts_total: self.supervisor.agent_starts_total(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            runner_id: self
                .placement
                .as_ref()
                .map(|p| p.id().to_string())
                .unwrap_or_default(),
            runners: self.runner_instances(true).await?,
        }))
    }

    async fn list_agent_usage(
        &self,
        request: Request<ferroclaw_proto::v1::ListAgentUsageRequest>,
    ) -> Result<Response<ferroclaw_proto::v1::ListAgentUsageResponse>, Status> {
        Ok(Response::new(
            self.agent_usage(request.into_inner().days).await?,
        ))
    }

    async fn list_session_messages(
        &self,
        request: Request<ferroclaw_proto::v1::ListSessionMessagesRequest>,
    ) -> Result<Response<ferroclaw_proto::v1::ListSessionMessagesResponse>, Status> {
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        let (session, route) = self.routed(&req.session_id, forwarded).await?;
        match route {
            Route::Here => Ok(Response::new(self.session_messages(req).await?)),
            Route::There { mut client, .. } => {
                client.list_session_messages(self.onward(req)?).await
            }
            Route::Missing { runner } => Err(Self::missing(&session, &runner).into()),
        }
    }

    /// An operator's retry (through delivery): a row settled FAILED becomes unsettled and
    /// every outbound stream sends it again. Idempotent: a row already unsettled answers
    /// `reopened = false` and changes nothing. A delivered row is refused
    /// (FAILED_PRECONDITION): its outcome stands. Only callers with the internal secret
    /// get here, never an agent.
    #[tracing::instrument(skip_all, fields(session = %request.get_ref().session_id, seq = request.get_ref().out_seq))]
    async fn reopen_outbound(
        &self,
        request: Request<ferroclaw_proto::v1::ReopenOutboundRequest>,
    ) -> Result<Response<ferroclaw_proto::v1::ReopenOutboundResponse>, Status> {
        use ferroclaw_mailbox::Reopen;
        let forwarded = was_forwarded(&request);
        let req = request.into_inner();
        if !ferroclaw_mailbox::seq::is_agent(req.out_seq) {
            return Err(Status::invalid_argument(format!(
                "out_seq {} is not an agent (odd) seq",
                req.out_seq
            )));
        }
        let (session, route) = self.routed(&req.session_id, forwarded).await?;
        serve_here_or_return!(self, session, route, req, reopen_outbound);
        let mailbox = self.mailboxes.get(&session).await?;
        let reopened = match mailbox
            .reopen_failed(req.out_seq)
            .await
            .map_err(RunnerError::from)?
        {
            Reopen::Reopened => true,
            Reopen::Unsettled => false,
            Reopen::Delivered => {
                return Err(Status::failed_precondition(format!(
                    "message {} of session {} was delivered; its outcome stands",
                    req.out_seq, session.id
                )));
            }
            Reopen::Unknown => {
                return Err(Status::not_found(format!(
                    "session {} has no message {}",
                    session.id, req.out_seq
                )));
            }
        };
        if reopened {
            // After the commit: the streams find the row unsettled.
            self.feed.reopened(&session.id, req.out_seq);
            tracing::info!("outbound row reopened");
        }
        Ok(Response::new(ferroclaw_proto::v1::ReopenOutboundResponse {
            reopened,
        }))
    }
}

/// Settlements one `SettleBatch` may carry.
const MAX_SETTLE_BATCH: usize = 512;

/// The outcome a settlement records, or why it cannot be taken.
fn settlement_outcome(req: &SettleRequest) -> std::result::Result<MailOutcome, Status> {
    let outcome = match Outcome::try_from(req.outcome) {
        Ok(Outcome::Delivered) => MailOutcome::Delivered,
        Ok(Outcome::Failed) => MailOutcome::Failed,
        _ => {
            return Err(Status::invalid_argument(
                "outcome must be DELIVERED or FAILED",
            ));
        }
    };
    if !ferroclaw_mailbox::seq::is_agent(req.out_seq) {
        return Err(Status::invalid_argument(format!(
            "out_seq {} is not an agent (odd) seq",
            req.out_seq
        )));
    }
    Ok(outcome)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}
