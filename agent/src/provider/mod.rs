//! Model providers: given a formatted batch, produce the agent's replies.

mod echo;

use std::path::PathBuf;
use std::time::Duration;

use chrono_tz::Tz;
use ferroclaw_mailbox::{AgentMailbox, Destination, InboundRow, OutboundContent};

pub use echo::Echo;

use crate::claude_code::ClaudeCode;
use crate::conversation::{ModelAgent, ModelAgentOptions};
use crate::model::{Endpoint, Model, ModelError, RetryPolicy};

/// What the provider is asked to answer.
pub struct Prompt<'a> {
    /// The batch as the model reads it (see `formatter`).
    pub text: &'a str,
    pub rows: &'a [InboundRow],
    pub tz: Tz,
    /// For tools that read the session (tasks, answers) or must send at once (questions).
    pub mailbox: &'a AgentMailbox,
}

/// What a provider produced for a batch.
#[derive(Debug, Default)]
pub struct Answer {
    pub replies: Vec<Reply>,
    /// Further inbound seqs the batch used up (answers to its questions): completed with it.
    pub consumed: Vec<i64>,
}

/// One message the provider wants sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub destination: Destination,
    pub in_reply_to: i64,
    pub content: OutboundContent,
}

impl Reply {
    pub fn chat(destination: &Destination, in_reply_to: i64, text: String) -> Self {
        Self {
            destination: destination.clone(),
            in_reply_to,
            content: OutboundContent::Chat(ferroclaw_mailbox::content::ChatOut { text }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("unknown provider {0:?} (available: echo, anthropic, openai, claude-code)")]
    Unknown(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Where a model agent keeps its memory and state.
#[derive(Debug, Clone)]
pub struct Folders {
    pub session_dir: PathBuf,
    pub journal_mode: ferroclaw_mailbox::JournalMode,
    pub agent_dir: PathBuf,
    pub global_dir: PathBuf,
    /// The session's workspace: tools' working directory, writable.
    pub workspace_dir: PathBuf,
    pub memory_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
}

/// The configured provider of this agent.
pub enum Provider {
    Echo(Echo),
    Model(Box<ModelAgent>),
    ClaudeCode(Box<ClaudeCode>),
}

impl Provider {
    /// Builds the provider named in the agent's config (model settings come from the
    /// environment the runner sets).
    pub fn from_name(name: &str, folders: &Folders) -> Result<Self, ProviderError> {
        match name {
            "claude-code" => Ok(Self::ClaudeCode(Box::new(ClaudeCode::new(
                folders,
                folders.session_dir.clone(),
                folders.journal_mode,
            )))),
            "anthropic" | "openai" => {
                let endpoint = Endpoint::from_env()?;
                let max_tokens = u64::from(endpoint.max_tokens);
                let model = Model::new(name, endpoint, RetryPolicy::from_env())?;
                let env_number = |var: &str| std::env::var(var).ok().and_then(|v| v.parse().ok());
                let prices = std::env::var("FERROCLAW_PRICE_PER_MTOK")
                    .ok()
                    .and_then(|v| {
                        let (input, output) = v.split_once(',')?;
                        Some((input.trim().parse().ok()?, output.trim().parse().ok()?))
                    });
                let agent = ModelAgent::new(
                    model,
                    ModelAgentOptions {
                        folders: folders.clone(),
                        context_window: env_number("FERROCLAW_CONTEXT_WINDOW").unwrap_or(200_000),
                        max_tokens,
                        prices,
                    },
                )?;
                Ok(Self::Model(Box::new(agent)))
            }
            "echo" => {
                // A pause before replying, so tests can catch an agent mid-batch.
                let delay = std::env::var("FERROCLAW_ECHO_DELAY_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
                    .unwrap_or_default();
                // A hang that blocks the agent's only thread, heartbeat included: what a
                // stuck agent looks like to the runner.
                let hang = std::env::var("FERROCLAW_ECHO_HANG_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
                    .unwrap_or_default();
                Ok(Self::Echo(Echo { delay, hang }))
            }
            other => Err(ProviderError::Unknown(other.to_string())),
        }
    }

    pub async fn respond(&mut self, prompt: &Prompt<'_>) -> Answer {
        match self {
            Self::Echo(echo) => Answer {
                replies: echo.respond(prompt.rows).await,
                consumed: Vec::new(),
            },
            Self::Model(agent) => {
                let (replies, consumed) = agent.respond(prompt).await;
                Answer { replies, consumed }
            }
            Self::ClaudeCode(agent) => {
                let (replies, consumed) = agent.respond(prompt).await;
                Answer { replies, consumed }
            }
        }
    }
}

/// Groups a batch by reply destination, keeping first-seen order: one reply per place.
pub fn by_destination(rows: &[InboundRow]) -> Vec<(Destination, Vec<&InboundRow>)> {
    let mut groups: Vec<(Destination, Vec<&InboundRow>)> = Vec::new();
    for row in rows {
        match groups.iter_mut().find(|(d, _)| *d == row.origin.reply_to) {
            Some((_, members)) => members.push(row),
            None => groups.push((row.origin.reply_to.clone(), vec![row])),
        }
    }
    groups
}
