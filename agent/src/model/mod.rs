//! Model APIs: one neutral conversation shape (messages of text, tool calls and tool
//! results) spoken to Anthropic's Messages API or any OpenAI-compatible chat-completions
//! server, with retries on the errors that pass.

mod anthropic;
mod openai;
mod retry;
mod sse;

use std::time::Duration;

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
    Transient(String),
    /// Will not get better by retrying: a bad request, a refused key, a spent budget.
    #[error("{0}")]
    Permanent(String),
    /// The model API kept failing.
    #[error("the model API failed {attempts} times; last error: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("model configuration: {0}")]
    Config(String),
}

/// Where and how an agent reaches its model (through the runner's credential proxy).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub base_url: String,
    /// The session's proxy token, never a real API key.
    pub token: String,
    pub model: String,
    pub max_tokens: u32,
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
        Ok(Self {
            base_url: var("FERROCLAW_MODEL_URL")?
                .trim_end_matches('/')
                .to_string(),
            token: var("FERROCLAW_MODEL_TOKEN")?,
            model: var("FERROCLAW_MODEL")?,
            max_tokens,
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

    /// Sends one request, retrying transient failures with backoff.
    pub async fn complete(&self, request: &Request<'_>) -> Result<Completion, ModelError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.api {
                Api::Anthropic => anthropic::complete(&self.http, &self.endpoint, request).await,
                Api::OpenAi => openai::complete(&self.http, &self.endpoint, request).await,
            };
            match result {
                Ok(done) => return Ok(done),
                Err((ModelError::Transient(message), retry_after)) => {
                    if attempt >= self.retry.max_attempts {
                        return Err(ModelError::GaveUp {
                            attempts: attempt,
                            last: message,
                        });
                    }
                    let wait = retry_after.unwrap_or_else(|| self.retry.backoff(attempt));
                    tracing::warn!(attempt, error = %message, wait_ms = wait.as_millis() as u64, "model API failed; retrying");
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

/// Reads `retry-after` (seconds) from a response, capped so a wild value cannot stall us.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(secs.clamp(0.0, 60.0)))
}

/// Turns a failed HTTP response into an error (its body's message when it has one).
async fn error_of(response: reqwest::Response) -> (ModelError, Option<Duration>) {
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(300).collect());
    let text = format!("HTTP {status}: {message}");
    if is_transient_status(status) {
        (ModelError::Transient(text), wait)
    } else {
        (ModelError::Permanent(text), None)
    }
}

/// A transport failure (connection refused, reset, timeout) passes with time.
fn transport_error(e: reqwest::Error) -> (ModelError, Option<Duration>) {
    (
        ModelError::Transient(format!("model API unreachable: {e}")),
        None,
    )
}
