//! `ListSessionMessages`: a session's latest messages both ways, oldest first, as a chat
//! reads. Read through a short-lived read-only view ([`crate::mailbox_view`]) with a
//! LIMIT on each table; content is bounded per row there, and in total here, because the
//! agent writes the outbound rows and must never make the runner send megabytes.

use ferroclaw_proto::v1::{
    ListSessionMessagesRequest, ListSessionMessagesResponse, SessionMessage,
};

use crate::error::{Result, RunnerError};
use crate::mailbox_view::{self, MailboxView};
use crate::service::RunnerService;

/// Messages returned when the request says 0.
const DEFAULT_LIMIT: u32 = 100;
/// The most messages one request may ask for.
pub const MAX_LIMIT: u32 = 500;
/// Content bytes one answer carries at most (under gRPC's usual 4 MiB message limit):
/// past it, older messages' content is replaced by a placeholder.
pub const MAX_TOTAL_CONTENT_BYTES: usize = 3 * 1024 * 1024;

/// The number of messages asked for, checked.
pub fn parse_limit(limit: u32) -> Result<usize> {
    match limit {
        0 => Ok(DEFAULT_LIMIT as usize),
        1..=MAX_LIMIT => Ok(limit as usize),
        _ => Err(RunnerError::InvalidArgument(format!(
            "limit {limit} is too large: at most {MAX_LIMIT} messages (0 for {DEFAULT_LIMIT})"
        ))),
    }
}

/// The latest `limit` of both directions together, oldest first: by creation time, an
/// inbound message before an outbound one created in the same millisecond (a reply comes
/// after what it answers), then by seq.
pub fn merge_latest(
    inbound: Vec<SessionMessage>,
    outbound: Vec<SessionMessage>,
    limit: usize,
) -> Vec<SessionMessage> {
    let mut all: Vec<SessionMessage> = inbound.into_iter().chain(outbound).collect();
    all.sort_by_key(|m| (m.created_at_ms, m.direction != "in", m.seq));
    let older = all.len().saturating_sub(limit);
    all.drain(..older);
    all
}

/// Keeps the content of the newest messages up to `budget` bytes in all; older ones past
/// it carry a placeholder instead.
pub fn bound_total(messages: &mut [SessionMessage], budget: usize) {
    let mut used = 0usize;
    for m in messages.iter_mut().rev() {
        let len = m.content_json.len();
        if used.saturating_add(len) > budget {
            m.content_json = mailbox_view::too_long(i64::try_from(len).unwrap_or(i64::MAX));
        } else {
            used += len;
        }
    }
}

impl RunnerService {
    pub(crate) async fn session_messages(
        &self,
        req: ListSessionMessagesRequest,
    ) -> Result<ListSessionMessagesResponse> {
        let limit = parse_limit(req.limit)?;
        let session = self
            .registry
            .get(&req.session_id)
            .await?
            .ok_or_else(|| RunnerError::NotFound(format!("no session {:?}", req.session_id)))?;
        let paths = self.mailboxes.paths(&session);
        let Some(mut view) = MailboxView::open(&paths).await? else {
            return Ok(ListSessionMessagesResponse::default());
        };
        let inbound = view.latest_inbound(limit).await;
        // What the session received still shows when the agent's file cannot be read.
        let outbound = view.latest_outbound(limit).await.unwrap_or_else(|e| {
            tracing::warn!(session = %session.id, error = %e, "the agent's messages cannot be read");
            Vec::new()
        });
        view.close().await;
        let mut messages = merge_latest(inbound?, outbound, limit);
        bound_total(&mut messages, MAX_TOTAL_CONTENT_BYTES);
        Ok(ListSessionMessagesResponse { messages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(direction: &str, seq: i64, created_at_ms: i64) -> SessionMessage {
        SessionMessage {
            direction: direction.into(),
            seq,
            created_at_ms,
            content_json: format!("{{\"seq\":{seq}}}"),
            ..Default::default()
        }
    }

    fn order(messages: &[SessionMessage]) -> Vec<(String, i64)> {
        messages
            .iter()
            .map(|m| (m.direction.clone(), m.seq))
            .collect()
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(parse_limit(0).unwrap(), 100);
        assert_eq!(parse_limit(1).unwrap(), 1);
        assert_eq!(parse_limit(500).unwrap(), 500);
        assert!(matches!(
            parse_limit(501),
            Err(RunnerError::InvalidArgument(m)) if m.contains("at most 500")
        ));
    }

    #[test]
    fn both_directions_merge_oldest_first_and_keep_the_latest() {
        // Newest first, as the view reads them.
        let inbound = vec![
            message("in", 6, 300),
            message("in", 4, 200),
            message("in", 2, 100),
        ];
        let outbound = vec![message("out", 5, 200), message("out", 3, 150)];
        let all = merge_latest(inbound.clone(), outbound.clone(), 10);
        let expected: Vec<(String, i64)> =
            [("in", 2), ("out", 3), ("in", 4), ("out", 5), ("in", 6)]
                .into_iter()
                .map(|(d, s)| (d.to_string(), s))
                .collect();
        // The tie at 200 ms: inbound first.
        assert_eq!(order(&all), expected);
        let latest = merge_latest(inbound, outbound, 2);
        assert_eq!(order(&latest), expected[3..].to_vec());
        assert!(merge_latest(Vec::new(), Vec::new(), 5).is_empty());
    }

    #[test]
    fn the_total_keeps_the_newest_content() {
        let mut messages: Vec<SessionMessage> =
            (1..=4).map(|i| message("out", i, i * 10)).collect();
        let each = messages[0].content_json.len();
        bound_total(&mut messages, each * 2 + 1);
        assert!(messages[0].content_json.contains("too_long"));
        assert!(messages[1].content_json.contains("too_long"));
        assert_eq!(messages[2].content_json, "{\"seq\":3}");
        assert_eq!(messages[3].content_json, "{\"seq\":4}");
    }
}
