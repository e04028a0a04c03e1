//! Doorbells from peers: deliveries sharing one PostgreSQL ledger each store conversation
//! messages, but a reader (a long-poll, a live stream) waits on the delivery it is connected
//! to. Every stored message therefore also rings a PostgreSQL `NOTIFY` in its transaction
//! (sent at commit), and each delivery `LISTEN`s and passes what its peers stored on to its
//! own readers. On SQLite there is one delivery, and nothing to listen to.
//!
//! A doorbell is only a hint to read the store again: one lost while the listening
//! connection reconnects delays a reader until its wait ends, and loses nothing.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::ledger::Appended;

/// The notification channel (PostgreSQL's, shared by every delivery on the database).
pub const CHANNEL: &str = "ferroclaw_conversation_appended";

/// Longest payload PostgreSQL carries (it refuses 8,000 bytes and more).
pub const MAX_PAYLOAD: usize = 7_999;

/// The payload of one doorbell: "<cursor> <conversation>".
pub fn payload(conversation: &str, cursor: i64) -> String {
    format!("{cursor} {conversation}")
}

/// Reads a doorbell's payload back; `None` for anything else on the channel.
pub fn parse(payload: &str) -> Option<Appended> {
    let (cursor, conversation) = payload.split_once(' ')?;
    Some(Appended {
        conversation: conversation.into(),
        cursor: cursor.parse().ok()?,
    })
}

/// Listens on `url` until `stop`, ringing `appended` for every message a delivery stored
/// (this one's too: a repeated doorbell costs a reader one read of the store).
pub async fn listen(url: String, appended: broadcast::Sender<Appended>, stop: CancellationToken) {
    let mut failures: u32 = 0;
    while !stop.is_cancelled() {
        let listened = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen(CHANNEL).await?;
            tracing::debug!("listening for conversation messages stored by peers");
            loop {
                // `try_recv` reconnects by itself and says so with `None`.
                match listener.try_recv().await? {
                    Some(n) => {
                        if let Some(a) = parse(n.payload()) {
                            let _ = appended.send(a);
                        }
                    }
                    None => tracing::warn!(
                        "the listening connection was lost; doorbells in between are missed"
                    ),
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listened => {
                if let Err(e) = result {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "cannot listen for peers' conversation messages");
                }
            }
            _ = stop.cancelled() => return,
        }
        let delay = Duration::from_millis((250u64 << failures.min(5)).min(5_000));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_others_are_ignored() {
        let a = parse(&payload("a conversation with spaces", 42)).unwrap();
        assert_eq!(&*a.conversation, "a conversation with spaces");
        assert_eq!(a.cursor, 42);
        assert_eq!(parse("nonsense"), None);
        assert_eq!(parse("x conv"), None);
    }
}
