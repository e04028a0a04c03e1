//! Live conversation streams: `GET /v1/conversations/{id}/events` (server-sent events) and
//! the relay behind `Gateway.WatchConversation`. Both stand on delivery's
//! `WatchConversation`, which sends every message after a cursor, in cursor order, none
//! skipped and none twice; a client resumes a broken stream from the last cursor it received
//! (`Last-Event-ID` for SSE, `after_cursor` for gRPC).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferroclaw_common::config::GatewayConfig;
use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use ferroclaw_proto::v1::{ConversationMessage, WatchConversationRequest};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::conversation_message::message_json;
use crate::error::{ApiError, Result};
use crate::http::AppState;
use crate::ingress::{Ingress, check_conversation};

/// Messages relayed toward one client before the relay waits for it (and delivery for us).
const RELAY_BUFFER: usize = 16;
/// How long delivery may take to start a stream (streams get no call timeout of their own).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A conversation's messages as they arrive; an error ends it (the client may resume).
pub type Relay = ReceiverStream<Result<ConversationMessage, Status>>;

/// Opens delivery's stream of `conversation` after `after`, checked like every conversation
/// endpoint. Fails before anything is streamed when delivery cannot serve it (503).
pub async fn open(
    ingress: &Ingress,
    delivery: &GrpcChannel,
    shutdown: &CancellationToken,
    conversation: String,
    after: i64,
) -> Result<Relay> {
    check_conversation(&conversation)?;
    ingress.conversation_agent(&conversation)?;
    let request = WatchConversationRequest {
        conversation_id: conversation,
        after_cursor: after.max(0),
    };
    let mut client = DeliveryClient::new(delivery.clone());
    let opening = tokio::time::timeout(OPEN_TIMEOUT, client.watch_conversation(request));
    let upstream = tokio::select! {
        response = opening => match response {
            Ok(response) => response.map_err(upstream_error)?.into_inner(),
            Err(_) => return Err(ApiError::Unavailable("delivery did not start the stream in time".into())),
        },
        _ = shutdown.cancelled() => return Err(shutting_down()),
    };
    let (tx, rx) = mpsc::channel(RELAY_BUFFER);
    tokio::spawn(relay(upstream, tx, shutdown.clone()));
    Ok(ReceiverStream::new(rx))
}

/// Copies delivery's stream to the client until either side ends or the gateway stops.
async fn relay(
    mut upstream: tonic::Streaming<ConversationMessage>,
    tx: mpsc::Sender<Result<ConversationMessage, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        let item = tokio::select! {
            item = upstream.message() => item,
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = tx.try_send(Err(shutting_down().into()));
                return;
            }
        };
        let item = match item {
            Ok(Some(message)) => Ok(message),
            Ok(None) => return,
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "conversation stream from delivery ended");
                Err(upstream_error(status).into())
            }
        };
        let last = item.is_err();
        tokio::select! {
            sent = tx.send(item) => if sent.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        if last {
            return;
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::Unavailable("the gateway is shutting down; resume from the last cursor".into())
}

/// Delivery's status as the client sees it; too many open streams is a retry-later too.
fn upstream_error(status: Status) -> ApiError {
    match status.code() {
        tonic::Code::ResourceExhausted => ApiError::Unavailable(status.message().to_string()),
        _ => ApiError::from(status),
    }
}

#[derive(Deserialize)]
pub struct EventsQuery {
    /// Cursor to start after, as for `/messages` (`Last-Event-ID` wins when both are given).
    #[serde(default)]
    after: i64,
}

/// `GET /v1/conversations/{id}/events`: one `message` event per message, `id:` its cursor,
/// `data:` the message as `/messages` shows it.
pub async fn sse(
    State(state): State<AppState>,
    Path(conversation): Path<String>,
    headers: HeaderMap,
    query: std::result::Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = last_event_id(&headers)?.unwrap_or(query.after);
    let relay = open(
        &state.ingress,
        &state.delivery,
        &state.shutdown,
        conversation,
        after,
    )
    .await?;
    // An error from delivery ends the stream: SSE has no error frame, and the client
    // reconnects with Last-Event-ID.
    let events = relay.map_while(|item| item.ok().map(|m| Ok::<_, Infallible>(event(&m))));
    // Idle streams carry `: keep-alive` comments, so proxies keep them open.
    let heartbeat = heartbeat(state.config.gateway.sse_heartbeat_secs);
    let sse = Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("keep-alive"));
    // nginx buffers responses unless told otherwise.
    let no_buffering = (
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(([no_buffering], sse).into_response())
}

/// The `Last-Event-ID` a reconnecting client sends: the last cursor it received.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let bad =
        || ApiError::BadRequest("Last-Event-ID must be a message cursor (an integer ≥ 0)".into());
    let value = value.to_str().map_err(|_| bad())?.trim();
    // An empty id is how a client says it has none.
    if value.is_empty() {
        return Ok(None);
    }
    match value.parse::<i64>() {
        Ok(cursor) if cursor >= 0 => Ok(Some(cursor)),
        _ => Err(bad()),
    }
}

fn event(m: &ConversationMessage) -> Event {
    Event::default()
        .event("message")
        .id(m.cursor.to_string())
        .data(message_json(m).to_string())
}

/// The heartbeat interval `[gateway] sse_heartbeat_secs` sets (validated at start; a value
/// that slipped past, from a config built in code, falls back to its default).
fn heartbeat(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .unwrap_or_else(|| Duration::from_secs_f64(GatewayConfig::default().sse_heartbeat_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn last_event_id_is_a_cursor() {
        assert_eq!(last_event_id(&HeaderMap::new()).unwrap(), None);
        assert_eq!(last_event_id(&with_id("")).unwrap(), None);
        assert_eq!(last_event_id(&with_id("42")).unwrap(), Some(42));
        assert_eq!(last_event_id(&with_id(" 7 ")).unwrap(), Some(7));
        for bad in ["-1", "abc", "1.5", "99999999999999999999"] {
            assert!(last_event_id(&with_id(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn heartbeat_comes_from_the_config() {
        assert_eq!(heartbeat(0.25), Duration::from_millis(250));
        let default = Duration::from_secs(15);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(heartbeat(bad), default, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_message_is_one_event_with_its_cursor_as_id() {
        let message = ConversationMessage {
            cursor: 12,
            conversation: "c".into(),
            session_id: "ses_1".into(),
            out_seq: 3,
            kind: "file".into(),
            text: "two\nlines".into(),
            content_json: r#"{"path":"a.txt"}"#.into(),
            created_at_ms: 5,
            in_reply_to: 2,
        };
        // The text's newline stays escaped inside the JSON: one `data:` line.
        let data = message_json(&message).to_string();
        assert!(!data.contains('\n'), "one data line");
        // The wire form, as axum writes it.
        let response =
            Sse::new(tokio_stream::iter([Ok::<_, Infallible>(event(&message))])).into_response();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            format!("event: message\nid: 12\ndata: {data}\n\n")
        );
    }
}
