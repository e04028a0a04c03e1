//! A fake model API on loopback that speaks the real wire formats: Anthropic's Messages API
//! (server-sent events with text and tool-use blocks, error events inside the stream) and
//! OpenAI's chat completions (tool calls). Each request takes the next scripted step; every
//! request is recorded with its headers so tests can check what reached the API.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub enum Step {
    /// A final answer.
    Text(String),
    /// Tool calls (name, input), optionally after some text.
    Tools(Vec<(String, Value)>),
    /// Anthropic only: the stream starts, then an `overloaded_error` event ends it.
    OverloadMidStream,
    /// An HTTP error status with an error body.
    Status(u16),
    /// An HTTP error with exactly this body and these headers, as a real provider sends
    /// them (raw JSON with account details, `retry-after-ms`, …).
    Error {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// `x-api-key` (Anthropic) or the bearer token (OpenAI).
    pub key: Option<String>,
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Script {
    steps: VecDeque<Step>,
    received: Vec<Received>,
}

#[derive(Clone)]
struct Fake {
    script: Arc<Mutex<Script>>,
    key: String,
}

/// A running fake model API.
pub struct FakeModel {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl FakeModel {
    /// Serves on a free loopback port; requests must carry `key` (the real API key, which
    /// only the runner's proxy knows).
    pub async fn start(key: &str) -> anyhow::Result<Self> {
        let script = Arc::new(Mutex::new(Script::default()));
        let fake = Fake {
            script: script.clone(),
            key: key.to_string(),
        };
        let app = axum::Router::new()
            .route("/v1/messages", post(anthropic))
            .route("/v1/chat/completions", post(openai))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, script })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues steps for the coming requests (after the queue: echo the last user text).
    pub fn push(&self, steps: impl IntoIterator<Item = Step>) {
        if let Ok(mut s) = self.script.lock() {
            s.steps.extend(steps);
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.script
            .lock()
            .map(|s| s.received.clone())
            .unwrap_or_default()
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) -> anyhow::Result<Vec<Received>> {
        for _ in 0..600 {
            let got = self.received();
            if got.len() >= n {
                return Ok(got);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "the fake model got {} requests, expected {n}",
            self.received().len()
        )
    }
}

impl Fake {
    /// Records the request and picks the step; `None` when the key is wrong.
    fn take(&self, path: &str, key: Option<String>, body: Value) -> Option<Step> {
        let ok = key.as_deref() == Some(self.key.as_str());
        let mut script = self.script.lock().ok()?;
        script.received.push(Received {
            path: path.into(),
            key,
            body: body.clone(),
            at: std::time::Instant::now(),
        });
        if !ok {
            return None;
        }
        Some(
            script
                .steps
                .pop_front()
                .unwrap_or_else(|| Step::Text(format!("model: {}", last_user_text(&body)))),
        )
    }
}

fn unauthorized() -> Response {
    let error = json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}});
    (StatusCode::UNAUTHORIZED, Json(error)).into_response()
}

/// The text of the last user message (either wire format), for the default echo answer.
pub fn last_user_text(body: &Value) -> String {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let Some(last) = messages.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn error_status(status: u16, kind: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body =
        json!({"type": "error", "error": {"type": kind, "message": format!("fake {status}")}});
    (code, Json(body)).into_response()
}

/// A scripted error answer: the status, the raw body and the headers as given.
fn raw_error(status: u16, body: String, headers: Vec<(String, String)>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::builder()
        .status(code)
        .header("content-type", "application/json");
    for (name, value) in headers {
        response = response.header(name, value);
    }
    response
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn anthropic(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(step) = fake.take("/v1/messages", key, body.clone()) else {
        return unauthorized();
    };
    let input_tokens = (body.to_string().len() / 4) as u64;
    let mut events = vec![sse(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "content": [],
            "model": body["model"], "stop_reason": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }}),
    )];
    let mut output_tokens = 0;
    let stop_reason = match step {
        Step::Status(code) => return error_status(code, "overloaded_error"),
        Step::Error {
            status,
            body,
            headers,
        } => return raw_error(status, body, headers),
        Step::OverloadMidStream => {
            events.push(text_block(0, "partial answer that will be lost"));
            events.push(sse(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ));
            return stream_response(events);
        }
        Step::Text(text) => {
            output_tokens += text.len() as u64 / 4 + 1;
            events.push(text_block(0, &text));
            "end_turn"
        }
        Step::Tools(calls) => {
            for (i, (name, input)) in calls.iter().enumerate() {
                output_tokens += 10;
                let json = input.to_string();
                let (a, b) = json.split_at(json.len() / 2);
                events.push(sse(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {
                        "type": "tool_use", "id": format!("toolu_{}_{i}", body["messages"].as_array().map_or(0, Vec::len)),
                        "name": name, "input": {}}}),
                ));
                for part in [a, b] {
                    events.push(sse(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": part}}),
                    ));
                }
                events.push(sse(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": i}),
                ));
            }
            "tool_use"
        }
    };
    events.push(sse(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": output_tokens}}),
    ));
    events.push(sse("message_stop", json!({"type": "message_stop"})));
    stream_response(events)
}

fn sse(event: &str, data: Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn text_block(index: usize, text: &str) -> String {
    let (a, b) = text.split_at(
        text.char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i),
    );
    let mut out = sse(
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
    );
    out.push_str(&sse("ping", json!({"type": "ping"})));
    for part in [a, b] {
        out.push_str(&sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": part}}),
        ));
    }
    out.push_str(&sse(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    ));
    out
}

/// Sends the events as separate chunks, as a real stream arrives.
fn stream_response(events: Vec<String>) -> Response {
    let chunks = events
        .into_iter()
        .map(|e| Ok::<_, std::io::Error>(axum::body::Bytes::from(e)));
    let stream = tokio_stream::iter(chunks);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn openai(State(fake): State<Fake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(step) = fake.take("/v1/chat/completions", key, body.clone()) else {
        return unauthorized();
    };
    let prompt_tokens = (body.to_string().len() / 4) as u64;
    let (message, finish) = match step {
        Step::Status(code) => return error_status(code, "server_error"),
        Step::Error {
            status,
            body,
            headers,
        } => return raw_error(status, body, headers),
        Step::OverloadMidStream => return error_status(503, "server_error"),
        Step::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
        Step::Tools(calls) => {
            let n = body["messages"].as_array().map_or(0, Vec::len);
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, input))| {
                    json!({"id": format!("call_{n}_{i}"), "type": "function",
                           "function": {"name": name, "arguments": input.to_string()}})
                })
                .collect();
            (
                json!({"role": "assistant", "content": null, "tool_calls": calls}),
                "tool_calls",
            )
        }
    };
    Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7},
    }))
    .into_response()
}
