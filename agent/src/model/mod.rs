//! Model APIs: one neutral conversation shape (messages of text, tool calls and tool
//! results) spoken to Anthropic's Messages API or any OpenAI-compatible chat-completions
//! server, with retries on the errors that pass.

mod anthropic;
mod openai;
mod retry;
mod sse;

use std::time::Duration;
use tracing::Instrument;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use retry::RetryPolicy;

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Block>,
}

impl Message {
    pub fn user_text(text: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: vec![Block::Text { text: text.into() }],
        }
    }

    /// The text blocks joined.
    pub fn text(&self) -> String {
        let texts: Vec<&str> = self
            .content
            .iter()
            .filter_map(|b| match b {
                Block::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        texts.join("\n")
    }
}

/// A tool the model may call.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON schema of the input object.
    pub schema: Value,
}

/// Tokens of one response (or a running total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_read_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
    }

    /// Tokens the request's prompt filled: what counts against the context window.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cache_read_tokens + self.cache_write_tokens
    }
}

/// What one request asks.
pub struct Request<'a> {
    pub system: &'a str,
    pub messages: &'a [Message],
    pub tools: &'a [ToolSpec],
}

/// The model's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: Vec<Block>,
    /// "end_turn", "tool_use", "max_tokens", … (OpenAI's reasons are mapped to these).
    pub stop_reason: String,
    pub usage: Usage,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    /// Worth trying again: rate limits, overload, a dropped connection.
    #[error("{0}")]
    Transient(Fault),
    /// Will not get better by retrying: a bad request, a refused key, a spent budget.
    #[error("{0}")]
    Permanent(Fault),
    /// The model API kept failing.
    #[error("the model API failed {attempts} times; last error: {last}")]
    GaveUp { attempts: u32, last: Fault },
    #[error("model configuration: {0}")]
    Config(String),
}

/// One failed model call: a short reason anyone may read, and the details (the provider's
/// raw body, library error text) that only the log gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The HTTP status the provider answered with, when it answered.
    pub status: Option<u16>,
    /// A few plain words: "rate limited", "could not be reached", …
    pub reason: String,
    /// Everything known, for the log only.
    pub detail: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The reason the runner's proxy gives when the agent's token budget is spent.
const BUDGET_SPENT: &str = "token budget spent";

impl Fault {
    /// A failure without an HTTP status (the connection, the stream, the answer's shape).
    pub fn new(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status: None,
            reason: reason.into(),
            detail: detail.into(),
        }
    }

    /// What happened, in plain words: "the model provider answered 429 (rate limited)".
    fn what(&self) -> String {
        match self.status {
            Some(status) => format!("the model provider answered {status} ({})", self.reason),
            None => format!("the model provider {}", self.reason),
        }
    }
}

impl ModelError {
    /// The failure as a user (or the agent) may read it: one clause with the status and a
    /// short reason, never the provider's body or library error text. Callers wrap it in
    /// their sentence ("Sorry, I could not answer: …").
    pub fn plain(&self) -> String {
        match self {
            Self::Permanent(fault) if fault.reason == BUDGET_SPENT => {
                "this agent's token budget is spent; an operator can raise agents.token_budget"
                    .into()
            }
            Self::Transient(fault) => format!("{}; try again later", fault.what()),
            Self::Permanent(fault) => format!(
                "{}; an operator can find the details in the agent's log",
                fault.what()
            ),
            Self::GaveUp { attempts, last } => format!(
                "{}, and I gave up after {attempts} tries; try again later",
                last.what()
            ),
            Self::Config(_) => {
                "the agent's model settings are incomplete; an operator can find the details in the agent's log".into()
            }
        }
    }
}

/// Where and how an agent reaches its model (through the runner's credential proxy).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub base_url: String,
    /// The session's proxy token, never a real API key.
    pub token: String,
    pub model: String,
    pub max_tokens: u32,
    /// The field OpenAI-compatible requests carry `max_tokens` in.
    pub max_tokens_field: MaxTokensField,
}

/// Which field an OpenAI-compatible request limits the answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensField {
    /// `max_tokens`: what most servers (Ollama, vLLM, LiteLLM) know.
    MaxTokens,
    /// `max_completion_tokens`: what OpenAI's own API wants (reasoning models refuse
    /// `max_tokens`).
    MaxCompletionTokens,
}

impl MaxTokensField {
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
        }
    }

    /// The field to send: `configured` when given (the runner passes the agent's
    /// `max_tokens_field`, resolved against its upstream), else the one the server at
    /// `base_url` wants.
    pub fn resolve(configured: Option<&str>, base_url: &str) -> Result<Self, ModelError> {
        let name = match configured.map(str::trim).filter(|v| !v.is_empty()) {
            Some(name) => name,
            None => ferroclaw_common::config::default_max_tokens_field(base_url),
        };
        match name {
            "max_tokens" => Ok(Self::MaxTokens),
            "max_completion_tokens" => Ok(Self::MaxCompletionTokens),
            other => Err(ModelError::Config(format!(
                "max_tokens_field {other:?}: expected max_tokens or max_completion_tokens"
            ))),
        }
    }
}

impl Endpoint {
    /// From the environment the runner gives a model agent.
    pub fn from_env() -> Result<Self, ModelError> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    ModelError::Config(format!("{name} is not set (the runner sets it)"))
                })
        };
        let max_tokens = var("FERROCLAW_MAX_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096);
        let base_url = var("FERROCLAW_MODEL_URL")?
            .trim_end_matches('/')
            .to_string();
        let max_tokens_field =
            MaxTokensField::resolve(var("FERROCLAW_MAX_TOKENS_FIELD").ok().as_deref(), &base_url)?;
        Ok(Self {
            base_url,
            token: var("FERROCLAW_MODEL_TOKEN")?,
            model: var("FERROCLAW_MODEL")?,
            max_tokens,
            max_tokens_field,
        })
    }
}

/// A model API client of either wire format.
pub struct Model {
    api: Api,
    endpoint: Endpoint,
    http: reqwest::Client,
    retry: RetryPolicy,
}

enum Api {
    Anthropic,
    OpenAi,
}

impl Model {
    pub fn new(provider: &str, endpoint: Endpoint, retry: RetryPolicy) -> Result<Self, ModelError> {
        let api = match provider {
            "anthropic" => Api::Anthropic,
            "openai" => Api::OpenAi,
            other => return Err(ModelError::Config(format!("no model API {other:?}"))),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A whole streamed answer; long, because tool-heavy answers can be.
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| ModelError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            api,
            endpoint,
            http,
            retry,
        })
    }

    /// Sends one request, retrying transient failures with backoff, in a span with the
    /// OpenTelemetry GenAI attributes (the model, the tokens in and out).
    pub async fn complete(&self, request: &Request<'_>) -> Result<Completion, ModelError> {
        let provider = match self.api {
            Api::Anthropic => "anthropic",
            Api::OpenAi => "openai",
        };
        let span = tracing::info_span!(
            "chat",
            otel.name = %format!("chat {}", self.endpoint.model),
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = provider,
            gen_ai.system = provider,
            gen_ai.request.model = %self.endpoint.model,
            gen_ai.request.max_tokens = self.endpoint.max_tokens,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let result = self
            .complete_with_retries(request)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(done) => {
                span.record("gen_ai.usage.input_tokens", done.usage.prompt_tokens());
                span.record("gen_ai.usage.output_tokens", done.usage.output_tokens);
                span.record("gen_ai.response.finish_reasons", done.stop_reason.as_str());
            }
            Err(e) => {
                span.record("error.type", e.to_string().as_str());
            }
        }
        result
    }

    async fn complete_with_retries(&self, request: &Request<'_>) -> Result<Completion, ModelError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.api {
                Api::Anthropic => anthropic::complete(&self.http, &self.endpoint, request).await,
                Api::OpenAi => openai::complete(&self.http, &self.endpoint, request).await,
            };
            match result {
                Ok(done) => return Ok(done),
                Err((ModelError::Transient(fault), retry_after)) => {
                    if attempt >= self.retry.max_attempts {
                        return Err(ModelError::GaveUp {
                            attempts: attempt,
                            last: fault,
                        });
                    }
                    let wait = retry_after.unwrap_or_else(|| self.retry.backoff(attempt));
                    tracing::warn!(attempt, error = %fault, wait_ms = wait.as_millis() as u64, "model API failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err((other, _)) => return Err(other),
            }
        }
    }
}

/// Classifies an HTTP error status: 408, 409, 429, 5xx and Anthropic's 529 pass with time.
fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429 | 500..=599)
}

/// The longest wait a server's hint may impose, so a wild value cannot stall us.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Reads how long the server asks us to wait: `retry-after-ms` (milliseconds, sent by
/// OpenAI and Anthropic) before `retry-after` (seconds), capped.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        value.is_finite().then_some(value.max(0.0))
    };
    let wait = match number("retry-after-ms") {
        Some(ms) => Duration::from_secs_f64((ms / 1000.0).min(MAX_RETRY_AFTER.as_secs_f64())),
        None => Duration::from_secs_f64(number("retry-after")?.min(MAX_RETRY_AFTER.as_secs_f64())),
    };
    Some(wait)
}

/// A few plain words for an HTTP status of a model API.
fn status_reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        401 => "API key refused",
        402 => "payment required",
        403 => "request refused",
        404 => "model or endpoint not found",
        408 | 504 => "timed out",
        409 => "conflict",
        413 => "request too large",
        422 => "request not understood",
        429 => "rate limited",
        502 => "bad gateway",
        503 => "unavailable",
        529 => "overloaded",
        500..=599 => "server error",
        _ => "request refused",
    }
}

/// Classifies a failed answer: the raw body goes into the fault's detail (for the log), the
/// status and a short reason into what users read.
fn fault_of(status: u16, body: &str) -> Fault {
    let parsed = serde_json::from_str::<Value>(body).ok();
    let kind = parsed
        .as_ref()
        .and_then(|v| v["error"]["type"].as_str().map(str::to_string));
    let reason = match (status, kind.as_deref()) {
        (402, Some("budget_exceeded")) => BUDGET_SPENT,
        _ => status_reason(status),
    };
    let raw: String = body.chars().take(2000).collect();
    Fault {
        status: Some(status),
        reason: reason.into(),
        detail: format!("HTTP {status}: {raw}"),
    }
}

/// The plain clause for a model API that answered `status`, for callers that see only the
/// status (Claude Code's "API Error: 429 …").
pub fn plain_for_status(status: u16) -> String {
    let fault = fault_of(status, "");
    let error = if is_transient_status(status) {
        ModelError::Transient(fault)
    } else {
        ModelError::Permanent(fault)
    };
    error.plain()
}

/// Turns a failed HTTP response into an error; its body is logged, never shown.
async fn error_of(response: reqwest::Response) -> (ModelError, Option<Duration>) {
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let body = response.text().await.unwrap_or_default();
    // The body stays in the fault's detail: callers log it (`error = %e`), users never see it.
    let fault = fault_of(status, &body);
    if is_transient_status(status) {
        (ModelError::Transient(fault), wait)
    } else {
        (ModelError::Permanent(fault), None)
    }
}

/// A transport failure (connection refused, reset, timeout) passes with time.
fn transport_error(e: reqwest::Error) -> (ModelError, Option<Duration>) {
    (
        ModelError::Transient(Fault::new(
            "could not be reached",
            format!("model API unreachable: {e}"),
        )),
        None,
    )
}

/// An answer that arrived but cannot be used (unreadable JSON, a cut stream).
fn unreadable(detail: impl Into<String>) -> (ModelError, Option<Duration>) {
    (
        ModelError::Transient(Fault::new("sent an answer that could not be read", detail)),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn retry_after_ms_is_read_before_retry_after() {
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500")])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250"), ("retry-after", "3")])),
            Some(Duration::from_millis(250)),
            "the finer hint wins"
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after-ms", "soon"),
                ("retry-after", "1")
            ])),
            Some(Duration::from_secs(1)),
            "an unreadable retry-after-ms falls back to retry-after"
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "99999999")])),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers(&[])), None);
    }

    #[test]
    fn users_read_the_status_and_a_reason_never_the_body() {
        let body = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc123 on tokens per min","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let fault = fault_of(429, body);
        assert!(
            fault.detail.contains("org-abc123"),
            "the log keeps the body"
        );
        let error = ModelError::Transient(fault.clone());
        assert_eq!(
            error.plain(),
            "the model provider answered 429 (rate limited); try again later"
        );
        let gave_up = ModelError::GaveUp {
            attempts: 6,
            last: fault,
        };
        let text = gave_up.plain();
        assert_eq!(
            text,
            "the model provider answered 429 (rate limited), and I gave up after 6 tries; try again later"
        );
        for leak in ["org-abc123", "rate_limit_exceeded", "{", "HTTP"] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }

        let html = fault_of(502, "<html><body>nginx upstream error</body></html>");
        let text = ModelError::Transient(html).plain();
        assert_eq!(
            text,
            "the model provider answered 502 (bad gateway); try again later"
        );

        let bad = ModelError::Permanent(fault_of(
            400,
            r#"{"error":{"message":"Unsupported parameter: 'max_tokens'","type":"invalid_request_error"}}"#,
        ));
        let text = bad.plain();
        assert!(
            text.starts_with("the model provider answered 400 (bad request)"),
            "{text}"
        );
        assert!(!text.contains("max_tokens"), "{text}");

        let budget = ModelError::Permanent(fault_of(
            402,
            r#"{"type":"error","error":{"type":"budget_exceeded","message":"the token budget of agent \"main\" is spent"}}"#,
        ));
        assert_eq!(
            budget.plain(),
            "this agent's token budget is spent; an operator can raise agents.token_budget"
        );
    }
}
