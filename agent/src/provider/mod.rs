//! Model providers: given a formatted batch, produce the agent's replies.

mod echo;

use std::time::Duration;

use ferroclaw_mailbox::{Destination, InboundRow, OutboundContent};

pub use echo::Echo;

/// What the provider is asked to answer.
pub struct Prompt<'a> {
    /// The batch as the model reads it (see `formatter`).
    pub text: &'a str,
    pub rows: &'a [InboundRow],
}

/// One message the provider wants sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub destination: Destination,
    pub in_reply_to: i64,
    pub content: OutboundContent,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("unknown provider {0:?} (available: echo)")]
    Unknown(String),
}

/// The configured provider of this agent.
pub enum Provider {
    Echo(Echo),
}

impl Provider {
    /// Builds the provider named in the agent's config.
    pub fn from_name(name: &str) -> Result<Self, ProviderError> {
        match name {
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

    pub async fn respond(&mut self, prompt: &Prompt<'_>) -> Result<Vec<Reply>, ProviderError> {
        match self {
            Self::Echo(echo) => Ok(echo.respond(prompt).await),
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
