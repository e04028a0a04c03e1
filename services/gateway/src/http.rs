//! The REST API (ARCHITECTURE.md §9): webhooks, API conversations, sessions, health.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferroclaw_common::Config;
use ferroclaw_common::grpc::is_serving;
use ferroclaw_common::grpc_auth::{self, GrpcChannel};
use ferroclaw_common::signing;
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{
    GetSessionRequest, ListConversationMessagesRequest, ListSessionsRequest, Session,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::conversation_message::message_json;
use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, ErrorCause, ErrorCode, Result};
use crate::ingress::{Accepted, Ingress, check_conversation};
use crate::{openapi, operator_api, tasks_api};

/// Longest request target (path and query) the API reads; longer ones get a JSON 414.
/// hyper itself refuses only from 64 KiB on, with a bare status line.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest header block the API reads; larger ones get a JSON 431. hyper itself refuses
/// only beyond about 400 KiB or 100 headers, with a bare status line.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    /// Ends waiting long-polls when the gateway stops, so shutdown is not held up.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub ingress: Ingress,
    pub runner: GrpcChannel,
    pub delivery: GrpcChannel,
    pub scheduler: GrpcChannel,
}

pub fn router(state: AppState) -> Router {
    let limit = state.config.gateway.max_body_bytes;
    let api = Router::new()
        .route("/v1/hooks/{source}", post(post_hook))
        .route("/v1/messages", post(post_message))
        .route(
            "/v1/conversations/{id}/messages",
            get(get_conversation_messages),
        )
        .route(
            "/v1/conversations/{id}/events",
            get(crate::conversation_events::sse),
        )
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/sessions/{id}/files/{*path}", get(get_outbox_file))
        .route("/v1/questions/{id}/answer", post(answer_question))
        .route("/v1/tasks", get(tasks_api::list_tasks))
        .route("/v1/tasks/{id}/runs", get(tasks_api::list_runs))
        .route("/v1/tasks/{id}/{action}", post(tasks_api::task_action))
        .route("/v1/status", get(operator_api::status))
        .route("/v1/agents", get(operator_api::list_agents))
        .route("/v1/deliveries", get(operator_api::list_deliveries))
        .route(
            "/v1/deliveries/{session_id}/{out_seq}/retry",
            post(operator_api::retry_delivery),
        )
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(crate::http_metrics::scrape))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(request_limits))
        .layer(middleware::from_fn(json_errors))
        // The console answers in HTML and plain text: merged after the JSON error layer, so
        // that layer does not wrap it (it brings its own security headers and body limit).
        .merge(crate::console::router(state.clone()))
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn(crate::http_trace::trace))
        .layer(middleware::from_fn(crate::http_metrics::record))
        .with_state(state)
}

/// Logs every request at debug, and a server-side failure (a service down, a call cut off)
/// at warn with its cause, so an operator sees it without turning on debug.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed_us = started.elapsed().as_micros() as u64;
    if response.status().is_server_error() {
        let cause = response
            .extensions()
            .get::<ErrorCause>()
            .map(|c| c.0.as_str());
        tracing::warn!(%method, %path, status, elapsed_us, cause = cause.unwrap_or("unknown"), "http request failed");
    } else {
        tracing::debug!(%method, %path, status, elapsed_us, "http request");
    }
    response
}

/// Turns every 4xx and 5xx that is not yet the JSON error body (axum's 405, a rejection
/// made below the handlers) into it, keeping its headers (`Allow`, `Retry-After`).
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Small plain-text reasons (axum's rejections) are kept as the message.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let message = text.unwrap_or_else(|| match status {
        // axum adds `Allow` further out, after this layer has run.
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed here; see the Allow header".into(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    });
    let body = ErrorBody::new(ErrorCode::for_status(status), message.clone());
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.extensions.insert(ErrorCause(message));
    Response::from_parts(parts, Body::from(bytes))
}

/// The parser limits the API enforces itself, below hyper's own, so a client gets them
/// as the JSON error body (hyper answers its own with a bare status line).
async fn request_limits(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return ApiError::UriTooLong(format!(
            "the request target is {target} bytes; at most {MAX_URI_BYTES} are read"
        ))
        .into_response();
    }
    // As on the wire: "name: value\r\n" per header.
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(format!(
            "the request headers are {headers} bytes; at most {MAX_HEADER_BYTES} are read"
        ))
        .into_response();
    }
    next.run(request).await
}

/// What `/healthz` answers.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct Health {
    /// Always `ok`: the process serves HTTP.
    status: String,
}

/// Liveness: the gateway process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The gateway is alive", body = Health))
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// This document: the REST API as OpenAPI 3.1.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Value))
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document_json(),
    )
        .into_response()
}

/// `Authorization: Bearer <token>` on every `/v1` route when a token is configured.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.config.gateway.api_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_auth::bearer_token);
        if !given.is_some_and(|g| grpc_auth::same_secret(g, expected)) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// The body, or a JSON error: 413 over the limit, 400 otherwise.
fn body(body: std::result::Result<Bytes, BytesRejection>) -> Result<Bytes> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("request body is larger than the limit".into())
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>> {
    headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key must be ASCII".into()))
        })
        .transpose()
}

/// What accepting a message or webhook answers.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"session_id": "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10", "message_id": "0b8e5c1a-7d2f-4e3b-9c6a-5f1d2e3c4b5a", "duplicate": false}))]
pub struct AcceptedBody {
    /// The session the message was queued for (empty when a command was answered at once).
    session_id: String,
    /// The queued message's id (empty when a command was answered at once).
    message_id: String,
    /// The same `Idempotency-Key` was accepted before: nothing new was queued.
    duplicate: bool,
    /// A command the gateway answered itself (`200`): nothing was queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<String>,
}

impl From<Accepted> for AcceptedBody {
    fn from(a: Accepted) -> Self {
        Self {
            session_id: a.session_id,
            message_id: a.message_id,
            duplicate: a.duplicate,
            answer: a.answer,
        }
    }
}

/// Injects a webhook: the body (any JSON document) goes to the agent the source routes to.
///
/// A source with a secret requires a signature: `X-Ferroclaw-Timestamp` and
/// `X-Ferroclaw-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, or GitHub's
/// `X-Hub-Signature-256` for sources configured with `signature = "github"`. The
/// idempotency header is `Idempotency-Key` unless the source names another (GitHub's
/// `X-GitHub-Delivery` for GitHub sources).
#[utoipa::path(
    post,
    path = "/v1/hooks/{source}",
    tag = "messages",
    params(
        ("source" = String, Path, description = "The webhook source, as configured in `[[webhooks]]`", example = "default"),
        ("Idempotency-Key" = Option<String>, Header, description = "Accepting the same key twice queues the message once"),
        ("X-Ferroclaw-Timestamp" = Option<String>, Header, description = "Unix seconds the signature was made at"),
        ("X-Ferroclaw-Signature" = Option<String>, Header, description = "`sha256=<hex>`: required when the source has a secret"),
        ("X-Hub-Signature-256" = Option<String>, Header, description = "GitHub's signature, for sources with `signature = \"github\"`"),
    ),
    request_body(content = Value, description = "Any JSON document", content_type = "application/json", example = json!({"event": "build.finished", "status": "green"})),
    responses(
        (status = 202, description = "Queued for the source's agent", body = AcceptedBody),
        (status = 401, description = "Missing or wrong bearer token, or the signature was rejected", body = ErrorBody),
        (status = 404, description = "No route for this source", body = ErrorBody),
        (status = 413, description = "The body is larger than the gateway or the source accepts", body = ErrorBody),
    ),
)]
pub(crate) async fn post_hook(
    State(state): State<AppState>,
    ApiPath(source): ApiPath<String>,
    headers: HeaderMap,
    bytes: std::result::Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedBody>)> {
    let bytes = body(bytes)?;
    let route = state
        .config
        .webhook_route(&source)
        .ok_or_else(|| ApiError::NotFound(format!("no route for webhook source {source:?}")))?;
    if let Some(max) = route.max_body_bytes
        && bytes.len() > max
    {
        return Err(ApiError::PayloadTooLarge(format!(
            "body is larger than the {max} bytes source {source:?} accepts"
        )));
    }
    if let Some(secret) = route.secret() {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let checked = match route.signature.as_str() {
            "github" => signing::verify_github(
                secret.as_bytes(),
                header(signing::GITHUB_SIGNATURE_HEADER),
                &bytes,
            ),
            _ => signing::verify(
                secret.as_bytes(),
                header(signing::TIMESTAMP_HEADER),
                header(signing::SIGNATURE_HEADER),
                &bytes,
                ferroclaw_content::now_ms() / 1000,
                route.tolerance_secs,
            ),
        };
        checked.map_err(|e| ApiError::BadSignature(e.to_string()))?;
    }
    let payload: Value = parse_json(&bytes)?;
    let delivery_id = headers
        .get(route.delivery_id_header().as_str())
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest("the delivery id header must be ASCII".into()))
        })
        .transpose()?;
    let accepted = state.ingress.webhook(&source, payload, delivery_id).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted.into())))
}

/// A chat message into an API conversation.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"conversation": "support-42", "text": "What changed in the last deploy?", "sender": "alice"}))]
pub struct PostMessage {
    /// The API conversation (1 to 256 printable bytes); replies are read from it.
    conversation: String,
    /// The message; must not be blank.
    text: String,
    /// Who is speaking, for the agent and for command permissions.
    #[serde(default)]
    sender: String,
}

/// Sends a chat message to the agent of an API conversation.
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Accepting the same key twice queues the message once"),
    ),
    request_body(content = PostMessage, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued for the conversation's agent", body = AcceptedBody),
        (status = 200, description = "A command the gateway answered itself (`answer`); nothing was queued", body = AcceptedBody,
            example = json!({"session_id": "", "message_id": "", "duplicate": false, "answer": "commands: /help, /status"})),
        (status = 403, description = "A command the sender may not use", body = ErrorBody),
        (status = 404, description = "No route for this conversation", body = ErrorBody),
        (status = 409, description = "The session cannot take messages now", body = ErrorBody),
        (status = 413, description = "The body is larger than the gateway accepts", body = ErrorBody),
    ),
)]
pub(crate) async fn post_message(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: std::result::Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedBody>)> {
    let bytes = body(bytes)?;
    let message: PostMessage = parse_json(&bytes)?;
    let accepted = state
        .ingress
        .message(
            &message.conversation,
            message.text,
            message.sender,
            idempotency_key(&headers)?,
        )
        .await?;
    // A command the gateway answered itself was handled, not queued.
    let status = if accepted.answer.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(accepted.into())))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// Only messages after this cursor (the `next_cursor` of the previous page; 0: all).
    #[serde(default)]
    #[param(example = 0)]
    after: i64,
    /// Seconds to wait for a first message when there is none yet (long-poll); capped by
    /// the gateway's `max_wait_secs`.
    #[serde(default)]
    #[param(minimum = 0, example = 25)]
    wait: f64,
    /// Most messages to return (0: the server's default).
    #[serde(default)]
    limit: u32,
}

/// The assistant's messages in an API conversation, oldest first; long-polls with `wait`.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/messages",
    tag = "messages",
    params(
        ("id" = String, Path, description = "The API conversation", example = "support-42"),
        MessagesQuery,
    ),
    responses(
        (status = 200, description = "Messages after the cursor (empty when none came in time)", body = openapi::MessagesPage),
        (status = 404, description = "No route for this conversation", body = ErrorBody),
    ),
)]
pub(crate) async fn get_conversation_messages(
    State(state): State<AppState>,
    ApiPath(conversation): ApiPath<String>,
    ApiQuery(query): ApiQuery<MessagesQuery>,
) -> Result<Json<Value>> {
    check_conversation(&conversation)?;
    state.ingress.conversation_agent(&conversation)?;
    if !query.wait.is_finite() || query.wait < 0.0 {
        return Err(ApiError::BadRequest(
            "wait must be a number of seconds ≥ 0".into(),
        ));
    }
    let max_wait = state.config.gateway.max_wait_secs as f64;
    let wait = Duration::from_secs_f64(query.wait.min(max_wait));
    let request = ListConversationMessagesRequest {
        conversation,
        after: query.after,
        wait_ms: wait.as_millis() as i64,
        limit: query.limit,
    };
    let after = request.after;
    let mut delivery = DeliveryClient::new(state.delivery.clone());
    // The long-poll's own deadline: the wait plus time for the answer (the channel gives
    // long-polls no default timeout).
    let mut request = tonic::Request::new(request);
    request.set_timeout(wait + Duration::from_secs(10));
    let response = tokio::select! {
        response = delivery.list_conversation_messages(request) => response?.into_inner(),
        _ = state.shutdown.cancelled() => ferroclaw_proto::v1::ListConversationMessagesResponse {
            messages: Vec::new(),
            next_cursor: after,
        },
    };
    let messages: Vec<Value> = response.messages.iter().map(message_json).collect();
    Ok(Json(
        json!({"messages": messages, "next_cursor": response.next_cursor}),
    ))
}

/// The option chosen for a question.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"option": "yes", "user": "alice"}))]
pub struct Answer {
    /// One of the question's option ids.
    option: String,
    /// Who answers (checked when the question names who may).
    #[serde(default)]
    user: String,
}

/// The recorded answer.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"question_id": "q-7c1e", "option": "yes", "label": "Yes, deploy"}))]
pub struct AnswerBody {
    question_id: String,
    option: String,
    /// The option's label as the question showed it.
    label: String,
}

/// Answers a question an agent asked in an API conversation (a `card` message).
#[utoipa::path(
    post,
    path = "/v1/questions/{id}/answer",
    tag = "messages",
    params(("id" = String, Path, description = "The question's id, from the card message", example = "q-7c1e")),
    request_body(content = Answer, content_type = "application/json"),
    responses(
        (status = 200, description = "The answer was recorded and passed to the agent", body = AnswerBody),
        (status = 403, description = "This user may not answer the question", body = ErrorBody),
        (status = 404, description = "No such question", body = ErrorBody),
        (status = 409, description = "Already answered, or no longer open", body = ErrorBody),
        (status = 413, description = "The body is larger than the gateway accepts", body = ErrorBody),
    ),
)]
pub(crate) async fn answer_question(
    State(state): State<AppState>,
    ApiPath(question_id): ApiPath<String>,
    bytes: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<AnswerBody>> {
    let bytes = body(bytes)?;
    let answer: Answer = parse_json(&bytes)?;
    let response = DeliveryClient::new(state.delivery.clone())
        .answer_question(ferroclaw_proto::v1::AnswerQuestionRequest {
            question_id,
            option: answer.option,
            user: answer.user,
        })
        .await?
        .into_inner();
    Ok(Json(AnswerBody {
        question_id: response.question_id,
        option: response.option,
        label: response.label,
    }))
}

/// A file the agent sent (from its outbox), as linked by a `file` message's `download`.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files/{path}",
    tag = "sessions",
    params(
        ("id" = String, Path, description = "The session", example = "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10"),
        ("path" = String, Path, description = "The file's path in the outbox (may contain `/`)", example = "report.pdf"),
    ),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>,
            headers(("Content-Disposition" = String, description = "`attachment` with the file's name"))),
        (status = 404, description = "No such session or file", body = ErrorBody),
    ),
)]
pub(crate) async fn get_outbox_file(
    State(state): State<AppState>,
    ApiPath((session_id, path)): ApiPath<(String, String)>,
) -> Result<Response> {
    let file = RunnerClient::new(state.runner.clone())
        // Outbox files arrive in one message (up to 25 MiB).
        .max_decoding_message_size(27 * 1024 * 1024)
        .read_outbox_file(ferroclaw_proto::v1::ReadOutboxFileRequest { session_id, path })
        .await?
        .into_inner();
    let name: String = file
        .name
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        file.data,
    )
        .into_response())
}

/// A session: one conversation with one agent.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"id": "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10", "agent": "main", "conversation_key": "api:support-42",
    "created_at": 1767225600000i64, "last_activity": 1767225660000i64, "agent_state": "idle", "pending": 0, "agent_starts": 1,
    "messages_in": 12, "messages_out": 14, "model_requests": 12, "input_tokens": 48210, "output_tokens": 3120, "cost_usd": 0.19}))]
pub struct SessionBody {
    id: String,
    agent: String,
    /// Where the session's messages come from, e.g. `api:<conversation>`, `webhook:<source>`.
    conversation_key: String,
    /// Unix milliseconds.
    created_at: i64,
    /// Unix milliseconds.
    last_activity: i64,
    /// `idle`, `queued`, `running`, `backoff` or `unavailable`.
    agent_state: String,
    /// Inbound messages the agent has not processed yet.
    pending: i64,
    /// Agents started for this session since the runner started.
    agent_starts: u64,
    /// Messages the session received. Counted from its mailbox: given for one session and
    /// for a list with a `limit`, null in a list without one.
    messages_in: Option<i64>,
    /// Messages its agent wrote (same rule as `messages_in`).
    messages_out: Option<i64>,
    /// Model requests and tokens through the credential proxy, all time.
    model_requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    /// Dollars at the agent's `price_per_mtok`; null when the agent has no price.
    cost_usd: Option<f64>,
    /// Several runners: the runner serving the session. While that runner is missing,
    /// `agent_state` is `unavailable` and its messages wait for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    runner: Option<String>,
}

impl SessionBody {
    fn new(s: Session, config: &Config) -> Self {
        let price = config.agent(&s.agent).and_then(|a| a.price_per_mtok);
        Self {
            cost_usd: ferroclaw_common::spend::cost_usd(price, s.input_tokens, s.output_tokens),
            id: s.id,
            agent: s.agent,
            conversation_key: s.conversation_key,
            created_at: s.created_at_ms,
            last_activity: s.last_activity_ms,
            agent_state: s.agent_state,
            pending: s.pending,
            agent_starts: s.agent_starts,
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            model_requests: s.model_requests,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            runner: (!s.runner.is_empty()).then_some(s.runner),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    sessions: Vec<SessionBody>,
    /// Agents started (processes or containers) for all sessions since the runner started.
    agent_starts_total: u64,
    /// Sessions matching the filter (before `offset` and `limit`).
    matched: u64,
    /// Every session, whatever the filter.
    total: u64,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionsQuery {
    /// Only this agent's sessions.
    #[serde(default)]
    agent: String,
    /// Only sessions whose agent is in this state (`idle`, `queued`, `running`, `backoff`,
    /// `unavailable`).
    #[serde(default)]
    state: String,
    /// `recent` (latest activity first), `oldest` (least recent first) or `created` (the
    /// default: in the order the sessions were created).
    #[serde(default)]
    sort: String,
    /// Sessions to skip (after filtering and sorting).
    #[serde(default)]
    offset: u32,
    /// At most this many (1–500; with a limit, message counts are included). 0 or absent:
    /// every session, without message counts.
    #[serde(default)]
    #[param(maximum = 500)]
    limit: u32,
}

/// Sessions with their agent's state, filtered, sorted and paginated.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(SessionsQuery),
    responses(
        (status = 200, description = "The sessions", body = SessionList),
        (status = 400, description = "A bad filter, sort or limit", body = ErrorBody),
    ),
)]
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SessionsQuery>,
) -> Result<Json<SessionList>> {
    if !matches!(query.sort.as_str(), "" | "recent" | "oldest" | "created") {
        return Err(ApiError::BadRequest(format!(
            "sort must be recent, oldest or created, not {:?}",
            query.sort
        )));
    }
    let sort = if query.sort.is_empty() {
        "created".to_string()
    } else {
        query.sort
    };
    let response = RunnerClient::new(state.runner.clone())
        .list_sessions(ListSessionsRequest {
            agent: query.agent,
            state: query.state,
            sort,
            offset: query.offset,
            limit: query.limit,
        })
        .await?
        .into_inner();
    let config = &state.config;
    Ok(Json(SessionList {
        sessions: response
            .sessions
            .into_iter()
            .map(|s| SessionBody::new(s, config))
            .collect(),
        agent_starts_total: response.agent_starts_total,
        matched: response.matched,
        total: response.total,
    }))
}

/// One session.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "The session", example = "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10")),
    responses(
        (status = 200, description = "The session", body = SessionBody),
        (status = 404, description = "No such session", body = ErrorBody),
    ),
)]
pub(crate) async fn get_session(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionBody>> {
    let session = RunnerClient::new(state.runner.clone())
        .get_session(GetSessionRequest { session_id: id })
        .await?
        .into_inner();
    Ok(Json(SessionBody::new(session, &state.config)))
}

/// Several runners: those registered whose lease ran out (none when the runner does not
/// answer in time, which the health check reports).
async fn missing_runners(state: &AppState) -> Vec<String> {
    let mut runner = RunnerClient::new(state.runner.clone());
    let asked = runner
        .get_runner_status(ferroclaw_proto::v1::GetRunnerStatusRequest { runners_only: true });
    match tokio::time::timeout(std::time::Duration::from_secs(2), asked).await {
        Ok(Ok(status)) => status
            .into_inner()
            .runners
            .into_iter()
            .filter(|r| !r.live)
            .map(|r| r.id)
            .collect(),
        _ => Vec::new(),
    }
}

/// What `/readyz` answers: each peer's reachability, and the error body when one is not.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"runner": "ok", "delivery": "ok", "scheduler": "ok"}))]
pub struct Readiness {
    runner: PeerState,
    delivery: PeerState,
    scheduler: PeerState,
    /// Several runners: those whose lease ran out. Their sessions' messages are accepted
    /// and wait for them (the installation is ready, but not all of it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing_runners: Vec<String>,
    /// Present with `503`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<crate::error::ErrorDetail>,
}

#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    Ok,
    Unreachable,
}

/// Readiness: whether the gRPC services the API needs answer their health checks.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Every peer answers", body = Readiness),
        (status = 503, description = "A peer does not answer", body = Readiness,
            headers(("Retry-After" = u64, description = "Seconds to wait before asking again")),
            example = json!({"runner": "unreachable", "delivery": "ok", "scheduler": "ok",
                "error": {"code": "unavailable", "message": "not ready: runner unreachable"}})),
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let (runner, delivery, scheduler, missing_runners) = tokio::join!(
        is_serving(state.runner.clone(), ""),
        is_serving(state.delivery.clone(), ""),
        is_serving(state.scheduler.clone(), ""),
        missing_runners(&state)
    );
    let word = |ok: bool| {
        if ok {
            PeerState::Ok
        } else {
            PeerState::Unreachable
        }
    };
    let down: Vec<&str> = [
        ("runner", runner),
        ("delivery", delivery),
        ("scheduler", scheduler),
    ]
    .into_iter()
    .filter_map(|(name, ok)| (!ok).then_some(name))
    .collect();
    let mut body = Readiness {
        runner: word(runner),
        delivery: word(delivery),
        scheduler: word(scheduler),
        missing_runners,
        error: None,
    };
    if down.is_empty() {
        return Json(body).into_response();
    }
    let message = format!("not ready: {} unreachable", down.join(", "));
    body.error = Some(crate::error::ErrorDetail {
        code: ErrorCode::Unavailable,
        message: message.clone(),
    });
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        [(
            header::RETRY_AFTER,
            crate::error::RETRY_AFTER_SECS.to_string(),
        )],
        Json(body),
    )
        .into_response();
    response.extensions_mut().insert(ErrorCause(message));
    response
}
