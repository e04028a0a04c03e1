//! Row types of the two mailbox files.

use crate::content::{Destination, InboundContent, Origin, OutboundContent};

/// A message to append to `messages_in`.
#[derive(Debug, Clone)]
pub struct NewInbound {
    /// Idempotency id: a second enqueue with the same id returns the first row.
    pub id: String,
    pub content: InboundContent,
    pub origin: Origin,
    pub process_after: Option<i64>,
    pub trace: Option<String>,
}

/// A row of `messages_in`, as the agent reads it.
#[derive(Debug, Clone)]
pub struct InboundRow {
    pub seq: i64,
    pub id: String,
    pub created_at: i64,
    pub process_after: Option<i64>,
    pub origin: Origin,
    pub content: InboundContent,
    pub trace: Option<String>,
}

/// A message the agent writes to `messages_out`.
#[derive(Debug, Clone)]
pub struct NewOutbound {
    pub in_reply_to: Option<i64>,
    pub destination: Destination,
    pub content: OutboundContent,
    pub trace: Option<String>,
}

/// A row of `messages_out` as the host streams it: JSON kept as written, so a row this
/// build cannot parse still travels to delivery and is settled there, never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRow {
    pub seq: i64,
    pub in_reply_to: Option<i64>,
    pub created_at: i64,
    pub kind: String,
    pub destination: String,
    /// Empty when the row is larger than the reader's limit (see `content_bytes`): an
    /// oversized row is never loaded whole.
    pub content: String,
    /// The size of the content and destination columns as written, in bytes.
    pub row_bytes: i64,
    pub trace: Option<String>,
}

/// What happened to an outbound row (the `delivered` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}
