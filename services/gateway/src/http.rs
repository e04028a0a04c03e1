//! The REST API (ARCHITECTURE.md §9): webhooks, API conversations, sessions, health.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
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
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, Result};
use crate::ingress::{Ingress, check_conversation};
use crate::tasks_api;

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
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/sessions/{id}/files/{*path}", get(get_outbox_file))
        .route("/v1/questions/{id}/answer", post(answer_question))
        .route("/v1/tasks", get(tasks_api::list_tasks))
        .route("/v1/tasks/{id}/runs", get(tasks_api::list_runs))
        .route("/v1/tasks/{id}/{action}", post(tasks_api::task_action))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "http request");
    response
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

async fn post_hook(
    State(state): State<AppState>,
    Path(source): Path<String>,
    headers: HeaderMap,
    bytes: std::result::Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>)> {
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
    Ok((StatusCode::ACCEPTED, Json(json!(accepted))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    conversation: String,
    text: String,
    #[serde(default)]
    sender: String,
}

async fn post_message(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: std::result::Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>)> {
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
    Ok((status, Json(json!(accepted))))
}

#[derive(Deserialize)]
struct MessagesQuery {
    #[serde(default)]
    after: i64,
    /// Seconds to wait for a first message (long-poll).
    #[serde(default)]
    wait: f64,
    #[serde(default)]
    limit: u32,
}

async fn get_conversation_messages(
    State(state): State<AppState>,
    Path(conversation): Path<String>,
    query: std::result::Result<Query<MessagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
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
    let response = tokio::select! {
        response = delivery.list_conversation_messages(request) => response?.into_inner(),
        _ = state.shutdown.cancelled() => ferroclaw_proto::v1::ListConversationMessagesResponse {
            messages: Vec::new(),
            next_cursor: after,
        },
    };
    let messages: Vec<Value> = response
        .messages
        .into_iter()
        .map(|m| {
            json!({
                "cursor": m.cursor,
                "kind": m.kind,
                "text": m.text,
                "content": serde_json::from_str::<Value>(&m.content_json).unwrap_or(Value::Null),
                "download": file_link(&m.kind, &m.session_id, &m.content_json),
                "session_id": m.session_id,
                "in_reply_to": (m.in_reply_to > 0).then_some(m.in_reply_to),
                "created_at": m.created_at_ms,
            })
        })
        .collect();
    Ok(Json(
        json!({"messages": messages, "next_cursor": response.next_cursor}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    option: String,
    #[serde(default)]
    user: String,
}

/// `POST /v1/questions/{id}/answer`: answers a question an agent asked in an API conversation.
async fn answer_question(
    State(state): State<AppState>,
    Path(question_id): Path<String>,
    bytes: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
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
    Ok(Json(json!({
        "question_id": response.question_id,
        "option": response.option,
        "label": response.label,
    })))
}

/// Where a file message's bytes can be fetched (`null` for other kinds).
fn file_link(kind: &str, session_id: &str, content_json: &str) -> Value {
    if kind != "file" {
        return Value::Null;
    }
    let content: Value = serde_json::from_str(content_json).unwrap_or_default();
    match content["path"].as_str() {
        Some(path) => json!(format!("/v1/sessions/{session_id}/files/{path}")),
        None => Value::Null,
    }
}

/// `GET /v1/sessions/{id}/files/{path}`: a file the agent sent (from its outbox).
async fn get_outbox_file(
    State(state): State<AppState>,
    Path((session_id, path)): Path<(String, String)>,
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

fn session_json(s: Session) -> Value {
    json!({
        "id": s.id,
        "agent": s.agent,
        "conversation_key": s.conversation_key,
        "created_at": s.created_at_ms,
        "last_activity": s.last_activity_ms,
        "agent_state": s.agent_state,
        "pending": s.pending,
        "agent_starts": s.agent_starts,
    })
}

async fn list_sessions(State(state): State<AppState>) -> Result<Json<Value>> {
    let response = RunnerClient::new(state.runner.clone())
        .list_sessions(ListSessionsRequest::default())
        .await?
        .into_inner();
    let sessions: Vec<Value> = response.sessions.into_iter().map(session_json).collect();
    Ok(Json(json!({
        "sessions": sessions,
        "agent_starts_total": response.agent_starts_total,
    })))
}

async fn get_session(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    let session = RunnerClient::new(state.runner.clone())
        .get_session(GetSessionRequest { session_id: id })
        .await?
        .into_inner();
    Ok(Json(session_json(session)))
}

/// Ready when the gRPC peers the API needs answer their health checks.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (runner, delivery, scheduler) = tokio::join!(
        is_serving(state.runner.clone(), ""),
        is_serving(state.delivery.clone(), ""),
        is_serving(state.scheduler.clone(), "")
    );
    let status = if runner && delivery && scheduler {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        Json(json!({
            "runner": word(runner),
            "delivery": word(delivery),
            "scheduler": word(scheduler),
        })),
    )
}
