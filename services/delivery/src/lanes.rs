//! Lanes: outbound rows are delivered through independent lanes, one per destination (a
//! Discord channel or thread, an API conversation, a callback source; a session's actions
//! share one). Order holds within a lane. A lane that waits (a rate limit, a backoff, a
//! dead callback) delays no other lane.
//!
//! A lane exists only while it has rows: its task takes them in order and ends with the
//! last one, so 10,000 quiet destinations cost nothing. The rows held across all lanes are
//! bounded ([`MAX_BUFFERED_ROWS`]); past that, reading the runner's stream pauses.
//!
//! With deliveries sharing a PostgreSQL ledger, a lane's rows are sent only while this
//! delivery holds the lane's lease ([`LaneLeases`]); meanwhile rows a peer finished are
//! settled here from the ledger, unsent.
//!
//! An operator's retry claims its row here while it marks it in the ledger and has the
//! runner reopen it ([`Lanes::claim`]): no lane reads the row's ledger entry meanwhile, so
//! the row is neither settled failed under the retry nor sent before it is marked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use ferroclaw_content::Destination;
use ferroclaw_proto::v1::OutboundMessage;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lane_leases::{self, Held, LaneLeases};
use crate::row_delivery::RowDelivery;

/// Rows held in lanes at once, across all of them.
pub const MAX_BUFFERED_ROWS: usize = 10_000;

/// The lane a row travels in.
pub fn lane_of(message: &OutboundMessage) -> String {
    if message.kind == "action" {
        return format!("actions:{}", message.session_id);
    }
    match serde_json::from_str::<Destination>(&message.destination_json) {
        Ok(Destination::Discord { channel_id }) => format!("discord:{channel_id}"),
        Ok(Destination::Api { conversation }) => format!("api:{conversation}"),
        Ok(Destination::Callback { source }) => format!("callback:{source}"),
        // Refused in its own lane, without holding anyone up.
        Err(_) => format!("unknown:{}", message.session_id),
    }
}

#[derive(Clone)]
pub struct Lanes {
    inner: Arc<Inner>,
}

struct Inner {
    delivery: Arc<RowDelivery>,
    leases: LaneLeases,
    state: Mutex<State>,
    buffered: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Lanes with rows; a lane's task runs exactly while it is here.
    lanes: HashMap<String, VecDeque<Queued>>,
    /// (session, seq) of every row in a lane: a row the runner sends again (on a new
    /// stream) while it is still here is not queued twice.
    held: HashSet<(String, i64)>,
    /// Rows claimed by a retry in progress, with the row if the runner sent it meanwhile:
    /// it is queued when the claim ends.
    claimed: HashMap<(String, i64), Option<OutboundMessage>>,
}

/// A row claimed by [`Lanes::claim`]; dropping it ends the claim and queues the row if the
/// runner sent it meanwhile (also when the retry's future is dropped half-way).
pub struct Claim {
    lanes: Lanes,
    key: (String, i64),
}

impl Drop for Claim {
    fn drop(&mut self) {
        let arrived = self.lanes.lock().claimed.remove(&self.key).flatten();
        if let Some(message) = arrived {
            let lanes = self.lanes.clone();
            self.lanes
                .inner
                .tasks
                .spawn(async move { lanes.push(message).await });
        }
    }
}

struct Queued {
    message: OutboundMessage,
    _slot: OwnedSemaphorePermit,
}

impl Lanes {
    pub fn new(
        delivery: Arc<RowDelivery>,
        leases: LaneLeases,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                delivery,
                leases,
                state: Mutex::default(),
                buffered: Arc::new(Semaphore::new(MAX_BUFFERED_ROWS)),
                tasks: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    /// Queues a row in its lane, starting the lane if it was idle. Waits while the lanes
    /// hold [`MAX_BUFFERED_ROWS`].
    pub async fn push(&self, message: OutboundMessage) {
        let key = (message.session_id.clone(), message.seq);
        {
            let mut state = self.lock();
            if state.held.contains(&key) {
                return;
            }
            if let Some(arrived) = state.claimed.get_mut(&key) {
                *arrived = Some(message);
                return;
            }
        }
        let Ok(slot) = self.inner.buffered.clone().acquire_owned().await else {
            return;
        };
        let lane = lane_of(&message);
        let mut state = self.lock();
        if state.held.contains(&key) {
            return;
        }
        if let Some(arrived) = state.claimed.get_mut(&key) {
            *arrived = Some(message);
            return;
        }
        state.held.insert(key);
        let queued = Queued {
            message,
            _slot: slot,
        };
        match state.lanes.get_mut(&lane) {
            Some(queue) => queue.push_back(queued),
            None => {
                state.lanes.insert(lane.clone(), VecDeque::from([queued]));
                let lanes = self.clone();
                self.inner.tasks.spawn(async move { lanes.run(lane).await });
            }
        }
    }

    /// Claims a row for a retry: `None` while a lane holds it (it is being sent, or its
    /// failure reported and settled) or another retry has claimed it.
    pub fn claim(&self, session_id: &str, out_seq: i64) -> Option<Claim> {
        let key = (session_id.to_string(), out_seq);
        let mut state = self.lock();
        if state.held.contains(&key) || state.claimed.contains_key(&key) {
            return None;
        }
        state.claimed.insert(key.clone(), None);
        Some(Claim {
            lanes: self.clone(),
            key,
        })
    }

    /// Waits for every lane's task to end (after shutdown: each finishes the send in hand).
    pub async fn drained(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One lane's task: its rows in order, then it ends (giving its lease up).
    async fn run(self, lane: String) {
        let mut lease: Option<Held> = None;
        let mut ask_again = lane_leases::ASK_AGAIN;
        loop {
            let next = self
                .lock()
                .lanes
                .get(&lane)
                .and_then(|q| q.front())
                .map(|q| q.message.clone());
            let Some(message) = next else {
                // Given up while the lane still stands (empty), so rows pushed meanwhile
                // join it and are seen on the next turn, which takes the lane again.
                if let Some(held) = lease.take() {
                    held.release().await;
                    continue;
                }
                self.lock().lanes.remove(&lane);
                return;
            };
            if lease.as_ref().is_some_and(Held::lost) {
                lease = None;
            }
            if lease.is_none() {
                lease = match self.inner.leases.take(&lane).await {
                    Ok(held) => held,
                    Err(e) => {
                        tracing::warn!(%lane, error = %e, "cannot take a lane's lease");
                        None
                    }
                };
            }
            let shutdown = &self.inner.shutdown;
            let done = if lease.is_some() {
                self.inner.delivery.handle(&message, shutdown).await
            } else if let Some(done) = self
                .inner
                .delivery
                .finish_if_settled(&message, shutdown)
                .await
            {
                done
            } else {
                // A peer sends this lane: ask again in a moment, less often the longer it
                // keeps it (a peer waiting out rate limits on many lanes costs few queries).
                let wait = ask_again;
                ask_again = (ask_again * 2).min(lane_leases::ASK_AGAIN_AT_MOST);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.cancelled() => false,
                }
            };
            ask_again = lane_leases::ASK_AGAIN;
            if !done {
                // Shutdown: the lane's rows stay unsettled at the runner and come back (to
                // this delivery's successor, or to a peer, which may take the lane at once).
                {
                    let mut state = self.lock();
                    if let Some(queue) = state.lanes.remove(&lane) {
                        for q in queue {
                            state.held.remove(&(q.message.session_id, q.message.seq));
                        }
                    }
                }
                if let Some(held) = lease.take() {
                    held.release().await;
                }
                return;
            }
            let mut state = self.lock();
            state
                .held
                .remove(&(message.session_id.clone(), message.seq));
            if let Some(queue) = state.lanes.get_mut(&lane) {
                queue.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, destination: &str) -> OutboundMessage {
        OutboundMessage {
            session_id: "ses_1".into(),
            seq: 1,
            kind: kind.into(),
            destination_json: destination.into(),
            ..Default::default()
        }
    }

    #[test]
    fn lanes_are_keyed_by_destination() {
        let a = lane_of(&row("chat", r#"{"kind":"discord","channel_id":"1"}"#));
        let b = lane_of(&row("chat", r#"{"kind":"discord","channel_id":"2"}"#));
        let a_card = lane_of(&row("card", r#"{"kind":"discord","channel_id":"1"}"#));
        assert_ne!(a, b);
        assert_eq!(a, a_card, "every kind of row to a channel keeps its order");
        assert_ne!(
            lane_of(&row("chat", r#"{"kind":"api","conversation":"1"}"#)),
            a,
            "an API conversation named like a channel is another lane"
        );
        assert_eq!(
            lane_of(&row("action", r#"{"kind":"discord","channel_id":"1"}"#)),
            "actions:ses_1"
        );
        assert_eq!(lane_of(&row("chat", "nonsense")), "unknown:ses_1");
    }

    /// Lanes whose runner never answers: a row's settlement waits until shutdown.
    async fn lanes_without_a_runner(
        dir: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> (Lanes, crate::ledger::Ledger) {
        let ledger = crate::ledger::Ledger::open(&dir.join("delivery.db"))
            .await
            .unwrap();
        let auth = ferroclaw_common::grpc_auth::AttachToken::new(None).unwrap();
        // Nothing listens on port 9 (discard): calls fail, and settling retries.
        let runner = ferroclaw_common::grpc::channel("http://127.0.0.1:9", auth).unwrap();
        let settler = crate::settler::Settler::start(runner.clone(), shutdown.clone());
        let delivery = RowDelivery::new(
            Arc::new(ferroclaw_common::Config::default()),
            runner.clone(),
            runner,
            ledger.clone(),
            None,
            settler,
        );
        (
            Lanes::new(Arc::new(delivery), LaneLeases::sole(), shutdown.clone()),
            ledger,
        )
    }

    #[tokio::test]
    async fn a_claimed_row_waits_for_its_claim_and_a_held_row_cannot_be_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (lanes, ledger) = lanes_without_a_runner(dir.path(), &shutdown).await;
        let mut message = row("chat", r#"{"kind":"api","conversation":"c"}"#);
        message.content_json = r#"{"text":"hi"}"#.into();

        let claim = lanes.claim("ses_1", 1).expect("nobody holds the row");
        assert!(lanes.claim("ses_1", 1).is_none(), "one retry at a time");
        // The runner sends the row while the retry holds it: no lane reads its ledger
        // entry until the claim ends.
        lanes.push(message.clone()).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(ledger.outcome("ses_1", 1).await.unwrap(), None);

        drop(claim);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.outcome("ses_1", 1).await.unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the row was never sent"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Its lane holds it until the runner takes the settlement (never, here).
        assert!(lanes.claim("ses_1", 1).is_none());
        lanes.push(message).await;
        assert_eq!(
            ledger
                .conversation_messages("c", 0, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        shutdown.cancel();
        lanes.drained().await;
    }
}
