//! What an operator watches, over REST: one status summary (services, agents against the
//! cap, recent delivery failures), the agents with their tokens, cost and budget, and the
//! delivery ledger with a retry for transient failures. `ferroclaw status` reads these.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ferroclaw_common::grpc::is_serving;
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{
    DeliveryRecord, GetRunnerStatusRequest, ListAgentUsageRequest, ListDeliveriesRequest,
    RetryDeliveryRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, Result};
use crate::http::AppState;
use ferroclaw_common::spend;

/// Deliveries the status summary looks at (the most recent).
const RECENT_DELIVERIES: u32 = 200;
/// Failures the status summary lists.
const FAILURES_LISTED: usize = 5;

/// The whole installation at a glance.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"version": "0.1.0", "services": {"gateway": true, "runner": true, "delivery": true, "scheduler": true},
    "agents": {"backend": "docker", "engine_ok": true, "engine": "Docker 20.10.24, API 1.41", "max_running_agents": 8,
        "running": 2, "queued": 0, "sessions": 41, "agent_starts_total": 17},
    "deliveries": {"recent": 200, "pending": 1, "delivered": 197, "failed": 2, "failures": []},
    "instances": [{"service": "delivery", "url": "http://delivery-a:50052", "serving": true},
        {"service": "delivery", "url": "http://delivery-b:50052", "serving": false}]}))]
pub struct Status {
    /// The gateway's version.
    version: String,
    services: Services,
    /// Null while the runner does not answer.
    agents: Option<AgentsStatus>,
    /// Null while delivery does not answer.
    deliveries: Option<DeliveriesStatus>,
    /// Each instance of the services the gateway was given several of (a comma-separated
    /// URL), and whether it served at the last probe; empty with one of each.
    instances: Vec<InstanceStatus>,
}

/// One instance of a service given as several.
#[derive(Serialize, ToSchema)]
pub struct InstanceStatus {
    /// `runner`, `delivery` or `scheduler`.
    pub(crate) service: String,
    pub(crate) url: String,
    /// Whether it answered its health check as SERVING (a standby runner does not).
    pub(crate) serving: bool,
}

/// The instances of every peer listed with more than one URL (also on the console's
/// health page).
pub(crate) fn instances(state: &AppState) -> Vec<InstanceStatus> {
    let peers = [
        ("runner", state.config.runner.addr().url()),
        ("delivery", state.config.delivery.url()),
        ("scheduler", state.config.scheduler.url()),
    ];
    peers
        .iter()
        .flat_map(|(service, list)| {
            let urls = ferroclaw_common::grpc_instances::instances(list);
            let several = urls.len() > 1;
            urls.into_iter()
                .filter(move |_| several)
                .map(move |url| InstanceStatus {
                    service: service.to_string(),
                    url: url.to_string(),
                    serving: ferroclaw_common::grpc_instances::serving(url).unwrap_or(false),
                })
        })
        .collect()
}

/// Whether each service answers.
#[derive(Serialize, ToSchema)]
pub struct Services {
    gateway: bool,
    runner: bool,
    delivery: bool,
    scheduler: bool,
}

#[derive(Serialize, ToSchema)]
pub struct AgentsStatus {
    /// `process` or `docker`.
    backend: String,
    /// Whether the Docker engine answers (always true for the process backend).
    engine_ok: bool,
    /// The engine's version, or why it does not answer; empty for the process backend.
    engine: String,
    max_running_agents: u32,
    running: u32,
    /// Sessions waiting for a slot.
    queued: u32,
    sessions: u64,
    /// Agents started since the runner started.
    agent_starts_total: u64,
    /// Several runners: each one registered (the figures above are the answering one's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    runners: Vec<RunnerStatusBody>,
}

/// One runner among several.
#[derive(Serialize, ToSchema)]
pub struct RunnerStatusBody {
    id: String,
    /// Where the other runners call it.
    url: String,
    /// The Docker engine its agents run on.
    docker_host: String,
    /// Its `max_running_agents`: its share of new sessions follows it.
    capacity: i64,
    shared_storage: bool,
    /// False once its lease ran out: it is missing, and its sessions wait (or move to
    /// another runner, with shared storage).
    live: bool,
    /// Sessions placed on it.
    sessions: u64,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveriesStatus {
    /// Deliveries counted (the most recent).
    recent: usize,
    pending: usize,
    delivered: usize,
    failed: usize,
    /// The latest failures, newest first.
    failures: Vec<DeliveryBody>,
}

/// The services, the agents against the cap, and recent delivery failures. Answers `200`
/// even when a service is down (that is what it reports); `/readyz` is the probe.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "operations",
    responses((status = 200, description = "The status", body = Status)),
)]
pub(crate) async fn status(State(state): State<AppState>) -> Json<Status> {
    let (runner, delivery, scheduler) = tokio::join!(
        is_serving(state.runner.clone(), ""),
        is_serving(state.delivery.clone(), ""),
        is_serving(state.scheduler.clone(), "")
    );
    let agents = if runner {
        RunnerClient::new(state.runner.clone())
            .get_runner_status(GetRunnerStatusRequest::default())
            .await
            .ok()
            .map(|r| {
                let r = r.into_inner();
                AgentsStatus {
                    backend: r.backend,
                    engine_ok: r.engine_ok,
                    engine: r.engine,
                    max_running_agents: r.max_running_agents,
                    running: r.running,
                    queued: r.queued,
                    sessions: r.sessions,
                    agent_starts_total: r.agent_starts_total,
                    runners: r
                        .runners
                        .into_iter()
                        .map(|i| RunnerStatusBody {
                            id: i.id,
                            url: i.url,
                            docker_host: i.docker_host,
                            capacity: i.capacity,
                            shared_storage: i.shared_storage,
                            live: i.live,
                            sessions: i.sessions,
                        })
                        .collect(),
                }
            })
    } else {
        None
    };
    let deliveries = if delivery {
        DeliveryClient::new(state.delivery.clone())
            .list_deliveries(ListDeliveriesRequest {
                limit: RECENT_DELIVERIES,
            })
            .await
            .ok()
            .map(|r| summarize(r.into_inner().deliveries))
    } else {
        None
    };
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        services: Services {
            gateway: true,
            runner,
            delivery,
            scheduler,
        },
        agents,
        deliveries,
        instances: instances(&state),
    })
}

/// Counts by outcome and the latest failures (the ledger lists newest first).
fn summarize(records: Vec<DeliveryRecord>) -> DeliveriesStatus {
    let count = |state: &str| records.iter().filter(|r| r.state == state).count();
    DeliveriesStatus {
        recent: records.len(),
        pending: count("pending"),
        delivered: count("delivered"),
        failed: count("failed"),
        failures: records
            .iter()
            .filter(|r| r.state == "failed")
            .take(FAILURES_LISTED)
            .cloned()
            .map(DeliveryBody::from)
            .collect(),
    }
}

/// One agent: what it runs and what it has used.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"name": "main", "provider": "anthropic", "model": "claude-sonnet-4-5", "requests": 120,
    "input_tokens": 480000, "output_tokens": 31000, "cost_usd": 1.905, "token_budget": 5000000, "budget_left": 4489000,
    "days": [{"day": "2026-12-01", "requests": 12, "input_tokens": 48000, "output_tokens": 3100, "cost_usd": 0.19}]}))]
pub struct AgentBody {
    name: String,
    provider: String,
    model: Option<String>,
    /// All time.
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    /// Dollars at `price_per_mtok`; null without a price.
    cost_usd: Option<f64>,
    /// Tokens its sessions may use in all; null: no limit.
    token_budget: Option<u64>,
    /// Tokens left of the budget (0 when spent); null: no limit.
    budget_left: Option<i64>,
    /// Days (UTC) with use in the window, oldest first.
    days: Vec<DayBody>,
}

#[derive(Serialize, ToSchema)]
pub struct DayBody {
    /// `2026-12-01`.
    day: String,
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_usd: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct AgentList {
    agents: Vec<AgentBody>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentsQuery {
    /// Days of daily use to include, today (UTC) among them: 1–366; absent: 30.
    #[serde(default)]
    #[param(minimum = 1, maximum = 366)]
    days: Option<u32>,
}

/// The configured agents with their provider, model, tokens and cost (all time and per
/// day) and what is left of their token budget.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "operations",
    params(AgentsQuery),
    responses(
        (status = 200, description = "The agents", body = AgentList),
        (status = 400, description = "days out of range", body = ErrorBody),
    ),
)]
pub(crate) async fn list_agents(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AgentsQuery>,
) -> Result<Json<AgentList>> {
    let days = query.days.unwrap_or(30);
    if !(1..=366).contains(&days) {
        return Err(ApiError::BadRequest(format!(
            "days must be 1 to 366, not {days}"
        )));
    }
    let usage = RunnerClient::new(state.runner.clone())
        .list_agent_usage(ListAgentUsageRequest { days })
        .await?
        .into_inner()
        .agents;
    let agents = state
        .config
        .agents
        .iter()
        .map(|agent| {
            let used = usage.iter().find(|u| u.agent == agent.name);
            let price = agent.price_per_mtok;
            let (requests, input, output) =
                used.map_or((0, 0, 0), |u| (u.requests, u.input_tokens, u.output_tokens));
            AgentBody {
                name: agent.name.clone(),
                provider: agent.provider.clone(),
                model: agent.model.clone(),
                requests,
                input_tokens: input,
                output_tokens: output,
                cost_usd: spend::cost_usd(price, input, output),
                token_budget: agent.token_budget,
                budget_left: agent.token_budget.map(|b| {
                    i64::try_from(b)
                        .unwrap_or(i64::MAX)
                        .saturating_sub(input + output)
                        .max(0)
                }),
                days: used
                    .map(|u| {
                        u.days
                            .iter()
                            .map(|d| DayBody {
                                day: d.day.clone(),
                                requests: d.requests,
                                input_tokens: d.input_tokens,
                                output_tokens: d.output_tokens,
                                cost_usd: spend::cost_usd(price, d.input_tokens, d.output_tokens),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    Ok(Json(AgentList { agents }))
}

/// One row of the delivery ledger.
#[derive(Serialize, ToSchema, Clone)]
#[schema(example = json!({"session_id": "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10", "out_seq": 7, "state": "failed", "attempts": 9,
    "destination": {"kind": "discord", "channel_id": "1234"}, "platform_message_id": null,
    "reason": "Discord could not be reached for 15 minutes; the reply was not sent.", "detail": "given up after 15 minutes: 502 Bad Gateway",
    "retryable": true, "rate_limit_waits": 0, "waiting_until": null, "updated_at": 1767225660000i64}))]
pub struct DeliveryBody {
    session_id: String,
    out_seq: i64,
    /// `pending`, `delivered` or `failed`.
    state: String,
    attempts: i64,
    /// Where it goes (`kind` plus the destination's id).
    destination: Value,
    platform_message_id: Option<String>,
    /// A failure in one plain sentence.
    reason: Option<String>,
    /// What went wrong, for operators (statuses, upstream text).
    detail: Option<String>,
    /// A failed row whose failure was transient: `POST …/retry` sends it again.
    retryable: bool,
    rate_limit_waits: i64,
    /// While a rate-limit wait is in progress: when it ends (Unix milliseconds).
    waiting_until: Option<i64>,
    /// Unix milliseconds.
    updated_at: i64,
}

fn some(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

impl From<DeliveryRecord> for DeliveryBody {
    fn from(r: DeliveryRecord) -> Self {
        Self {
            destination: serde_json::from_str(&r.destination_json).unwrap_or(Value::Null),
            session_id: r.session_id,
            out_seq: r.out_seq,
            state: r.state,
            attempts: r.attempts,
            platform_message_id: some(r.platform_message_id),
            reason: some(r.reason),
            detail: some(r.detail),
            retryable: r.retryable,
            rate_limit_waits: r.rate_limit_waits,
            waiting_until: (r.waiting_until_ms > 0).then_some(r.waiting_until_ms),
            updated_at: r.updated_at_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    deliveries: Vec<DeliveryBody>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Most rows to return, newest first (1–1000; absent: 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only rows in this state: `pending`, `delivered` or `failed`.
    #[serde(default)]
    state: Option<String>,
}

/// The delivery ledger, newest first.
#[utoipa::path(
    get,
    path = "/v1/deliveries",
    tag = "operations",
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "The deliveries", body = DeliveryList),
        (status = 400, description = "A bad limit or state", body = ErrorBody),
    ),
)]
pub(crate) async fn list_deliveries(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Result<Json<DeliveryList>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to 1000, not {limit}"
        )));
    }
    if let Some(wanted) = &query.state
        && !matches!(wanted.as_str(), "pending" | "delivered" | "failed")
    {
        return Err(ApiError::BadRequest(format!(
            "state must be pending, delivered or failed, not {wanted:?}"
        )));
    }
    let records = DeliveryClient::new(state.delivery.clone())
        .list_deliveries(ListDeliveriesRequest { limit })
        .await?
        .into_inner()
        .deliveries;
    Ok(Json(DeliveryList {
        deliveries: records
            .into_iter()
            .filter(|r| query.state.as_ref().is_none_or(|s| *s == r.state))
            .map(Into::into)
            .collect(),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Retried {
    /// `pending`: it will be sent again.
    state: String,
}

/// Sends a failed delivery again, when its failure was transient (the destination was down
/// or kept failing until the row was given up). `409` for a row that was delivered, is
/// pending, or was refused by the destination.
#[utoipa::path(
    post,
    path = "/v1/deliveries/{session_id}/{out_seq}/retry",
    tag = "operations",
    params(
        ("session_id" = String, Path, description = "The session", example = "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10"),
        ("out_seq" = i64, Path, description = "The row's sequence number in the session's outbox", example = 7),
    ),
    responses(
        (status = 202, description = "It will be sent again", body = Retried),
        (status = 404, description = "No such delivery", body = ErrorBody),
        (status = 409, description = "Not a transient failure", body = ErrorBody),
    ),
)]
pub(crate) async fn retry_delivery(
    State(state): State<AppState>,
    ApiPath((session_id, out_seq)): ApiPath<(String, i64)>,
) -> Result<(StatusCode, Json<Retried>)> {
    let response = DeliveryClient::new(state.delivery.clone())
        .retry_delivery(RetryDeliveryRequest {
            session_id,
            out_seq,
        })
        .await?
        .into_inner();
    Ok((
        StatusCode::ACCEPTED,
        Json(Retried {
            state: response.state,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, state: &str) -> DeliveryRecord {
        DeliveryRecord {
            session_id: "ses-1".into(),
            out_seq: seq,
            state: state.into(),
            destination_json: r#"{"kind":"api","conversation":"c"}"#.into(),
            reason: if state == "failed" {
                "Discord could not be reached.".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_summary_counts_outcomes_and_lists_the_latest_failures() {
        let mut records: Vec<DeliveryRecord> = (0..10).map(|i| record(i, "failed")).collect();
        records.push(record(10, "delivered"));
        records.push(record(11, "pending"));
        let summary = summarize(records);
        assert_eq!(
            (
                summary.recent,
                summary.failed,
                summary.delivered,
                summary.pending
            ),
            (12, 10, 1, 1)
        );
        assert_eq!(summary.failures.len(), FAILURES_LISTED);
        assert_eq!(summary.failures[0].out_seq, 0, "newest first, as listed");
        assert_eq!(
            summary.failures[0].reason.as_deref(),
            Some("Discord could not be reached.")
        );
        assert_eq!(summary.failures[0].destination["kind"], "api");
    }
}
