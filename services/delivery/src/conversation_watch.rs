//! Live streams of API conversations (`Delivery.WatchConversation`): the stored messages after
//! a cursor, then each new one as the ledger stores it.
//!
//! No gap, no repeat: a watcher subscribes to the ledger's notifications BEFORE its first read,
//! and only ever reads the store after the last cursor it sent. A notification is a doorbell,
//! not the message: the store commits messages in cursor order (SQLite has one writer, and the
//! cursor is taken inside the writing transaction), so "everything after the last cursor sent"
//! can skip nothing and repeat nothing, even when notifications arrive out of order or are
//! lost to lag (a lagging watcher simply reads again).
//!
//! Bounded: at most `max` watchers at once, and each queues at most [`BUFFER`] messages toward
//! a client that does not read; then it waits (its notifications lag, and it re-reads later).

use std::sync::Arc;

use ferroclaw_proto::v1 as proto;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::ledger::{Appended, ConversationMessage, Ledger};

/// Watchers one delivery serves at once (each holds a task and a gRPC stream).
pub const MAX_WATCHERS: usize = 256;
/// Messages queued toward one watcher's client before the watcher waits for it.
const BUFFER: usize = 16;
/// Messages read from the store at a time.
const PAGE: u32 = 100;

pub type WatchStream = ReceiverStream<Result<proto::ConversationMessage, Status>>;

/// Starts watchers and bounds how many run.
#[derive(Clone)]
pub struct Watchers {
    ledger: Ledger,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Watchers {
    pub fn new(ledger: Ledger, max: usize, shutdown: CancellationToken) -> Self {
        Self {
            ledger,
            slots: Arc::new(Semaphore::new(max)),
            shutdown,
        }
    }

    /// A stream of `conversation`'s messages after `after`: the backlog, then live ones.
    /// Ends with UNAVAILABLE when delivery stops, and by itself when the client goes away.
    pub fn watch(&self, conversation: String, after: i64) -> Result<WatchStream, Status> {
        if conversation.is_empty() {
            return Err(Status::invalid_argument(
                "conversation_id must not be empty",
            ));
        }
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("delivery is shutting down"));
        }
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many conversation streams are open; retry later")
        })?;
        // Subscribed before the task's first read of the store: nothing falls in between.
        let notifications = self.ledger.subscribe();
        let (tx, rx) = mpsc::channel(BUFFER);
        let watcher = Watcher {
            ledger: self.ledger.clone(),
            conversation,
            position: Position::after(after),
            notifications,
            tx,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(async move {
            watcher.run().await;
            drop(slot);
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// Where a watcher stands: the last cursor it sent. The merge rule of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    last: i64,
}

impl Position {
    fn after(cursor: i64) -> Self {
        Self {
            last: cursor.max(0),
        }
    }

    /// Whether `message` comes next: only cursors beyond the last one sent (never a repeat,
    /// never a step back). Advances past it when so.
    fn take(&mut self, cursor: i64) -> bool {
        if cursor > self.last {
            self.last = cursor;
            true
        } else {
            false
        }
    }

    /// Whether a notification calls for reading the store again: a message of this
    /// conversation not sent yet. Ones already read with the backlog are ignored.
    fn wakes(&self, appended: &Appended, conversation: &str) -> bool {
        &*appended.conversation == conversation && appended.cursor > self.last
    }
}

/// Why a watcher stopped.
enum End {
    /// The client went away: nobody to tell.
    ClientGone,
    /// Tell the client, which may resume from its last cursor.
    Status(Status),
}

struct Watcher {
    ledger: Ledger,
    conversation: String,
    position: Position,
    notifications: broadcast::Receiver<Appended>,
    tx: mpsc::Sender<Result<proto::ConversationMessage, Status>>,
    shutdown: CancellationToken,
}

impl Watcher {
    async fn run(mut self) {
        let end = loop {
            if let Err(end) = self.catch_up().await {
                break end;
            }
            if let Err(end) = self.wait_for_news().await {
                break end;
            }
        };
        if let End::Status(status) = end {
            // A full queue means a client that does not read: it sees the stream end anyway.
            let _ = self.tx.try_send(Err(status));
        }
    }

    /// Sends everything stored after the position, a page at a time.
    async fn catch_up(&mut self) -> Result<(), End> {
        loop {
            let page = tokio::select! {
                page = self.ledger.conversation_messages(&self.conversation, self.position.last, PAGE) => page,
                _ = self.shutdown.cancelled() => return Err(shutting_down()),
            };
            let page = page.map_err(|e| {
                tracing::error!(error = %e, "conversation stream cannot read the ledger");
                End::Status(Status::unavailable(format!(
                    "cannot read the conversation: {e}"
                )))
            })?;
            let full = page.len() >= PAGE as usize;
            for message in page {
                if !self.position.take(message.cursor) {
                    continue;
                }
                tokio::select! {
                    sent = self.tx.send(Ok(to_proto(message))) => {
                        sent.map_err(|_| End::ClientGone)?;
                    }
                    _ = self.shutdown.cancelled() => return Err(shutting_down()),
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Waits until the store may hold a message not sent yet.
    async fn wait_for_news(&mut self) -> Result<(), End> {
        loop {
            let notification = tokio::select! {
                n = self.notifications.recv() => n,
                _ = self.tx.closed() => return Err(End::ClientGone),
                _ = self.shutdown.cancelled() => return Err(shutting_down()),
            };
            match notification {
                Ok(appended) if self.position.wakes(&appended, &self.conversation) => {
                    return Ok(());
                }
                Ok(_) => continue,
                // Notifications were lost: the store has whatever they announced.
                Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => return Err(shutting_down()),
            }
        }
    }
}

fn shutting_down() -> End {
    End::Status(Status::unavailable("delivery is shutting down"))
}

pub fn to_proto(m: ConversationMessage) -> proto::ConversationMessage {
    proto::ConversationMessage {
        cursor: m.cursor,
        conversation: m.conversation,
        session_id: m.session_id,
        out_seq: m.out_seq,
        kind: m.kind,
        text: m.text,
        content_json: m.content,
        created_at_ms: m.created_at,
        in_reply_to: m.in_reply_to.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferroclaw_proto::v1::OutboundMessage;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::ledger::NewConversationMessage;

    fn appended(conversation: &str, cursor: i64) -> Appended {
        Appended {
            conversation: conversation.into(),
            cursor,
        }
    }

    #[test]
    fn position_takes_each_cursor_once_and_never_steps_back() {
        let mut p = Position::after(3);
        assert!(!p.take(2));
        assert!(!p.take(3));
        assert!(p.take(5));
        assert!(!p.take(5), "a repeat");
        assert!(!p.take(4), "a step back");
        assert!(p.take(9));
        assert_eq!(p.last, 9);
        assert_eq!(Position::after(-7).last, 0);
    }

    #[test]
    fn only_unsent_messages_of_the_conversation_wake() {
        let p = Position::after(10);
        assert!(p.wakes(&appended("c", 11), "c"));
        assert!(!p.wakes(&appended("c", 10), "c"), "read with the backlog");
        assert!(!p.wakes(&appended("other", 12), "c"));
    }

    async fn store(ledger: &Ledger, conversation: &str, seq: i64) -> i64 {
        let row = OutboundMessage {
            session_id: format!("s-{conversation}"),
            seq,
            kind: "chat".into(),
            destination_json: "{}".into(),
            ..Default::default()
        };
        let text = format!("m{seq}");
        let message = NewConversationMessage {
            conversation,
            in_reply_to: None,
            kind: "chat",
            text: &text,
            content: "{}",
        };
        let id = ledger
            .deliver_to_conversation(&row, message, None)
            .await
            .unwrap();
        id.rsplit(':').next().unwrap().parse().unwrap()
    }

    async fn next(stream: &mut WatchStream) -> proto::ConversationMessage {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("not an error")
    }

    #[tokio::test]
    async fn backlog_then_live_messages_in_order_without_gap_or_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("d.db")).await.unwrap();
        let first = store(&ledger, "c", 1).await;
        let second = store(&ledger, "c", 3).await;
        store(&ledger, "other", 1).await;
        let watchers = Watchers::new(ledger.clone(), 4, CancellationToken::new());
        let mut stream = watchers.watch("c".into(), first).unwrap();
        assert_eq!(next(&mut stream).await.cursor, second);
        // Stored concurrently with the watcher's reads: each arrives once, in order.
        let writer = {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let mut cursors = Vec::new();
                for seq in (5..45).step_by(2) {
                    cursors.push(store(&ledger, "c", seq).await);
                    store(&ledger, "other", seq).await;
                }
                cursors
            })
        };
        let mut got = Vec::new();
        for _ in 0..20 {
            got.push(next(&mut stream).await.cursor);
        }
        assert_eq!(got, writer.await.unwrap());
        // A message stored again (a redelivered row) is not sent again.
        store(&ledger, "c", 5).await;
        let live = store(&ledger, "c", 99).await;
        assert_eq!(next(&mut stream).await.cursor, live);
    }

    #[tokio::test]
    async fn a_lagging_watcher_rereads_the_store_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("d.db"))
            .await
            .unwrap()
            .with_appended_capacity(2);
        let watchers = Watchers::new(ledger.clone(), 4, CancellationToken::new());
        let mut stream = watchers.watch("c".into(), 0).unwrap();
        // The client does not read: the watcher fills its queue and waits to send one more.
        let mut stored = Vec::new();
        for seq in 0..=BUFFER as i64 {
            stored.push(store(&ledger, "c", 2 * seq + 1).await);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stream.as_ref().len() < BUFFER {
            assert!(tokio::time::Instant::now() < deadline, "queue never filled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Meanwhile more is stored than its notifications hold, the last ones elsewhere:
        // only re-reading on lag finds these.
        for seq in 100..105 {
            stored.push(store(&ledger, "c", seq).await);
        }
        for seq in 100..104 {
            store(&ledger, "other", seq).await;
        }
        let mut got = Vec::new();
        while got.len() < stored.len() {
            got.push(next(&mut stream).await.cursor);
        }
        assert_eq!(got, stored);
    }

    #[tokio::test]
    async fn watchers_are_bounded_and_end_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("d.db")).await.unwrap();
        let shutdown = CancellationToken::new();
        let watchers = Watchers::new(ledger.clone(), 1, shutdown.clone());
        assert_eq!(
            watchers.watch(String::new(), 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut stream = watchers.watch("c".into(), 0).unwrap();
        assert_eq!(
            watchers.watch("c".into(), 0).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        shutdown.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap();
        assert_eq!(
            end.unwrap().unwrap_err().code(),
            tonic::Code::Unavailable,
            "ends with a status the client can resume after"
        );
        assert!(stream.next().await.is_none());
        assert_eq!(
            watchers.watch("c".into(), 0).unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_away_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("d.db")).await.unwrap();
        let watchers = Watchers::new(ledger, 1, CancellationToken::new());
        drop(watchers.watch("c".into(), 0).unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while watchers.watch("c".into(), 0).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
