//! Who fires. Schedulers sharing one task store (a PostgreSQL database, or one data
//! directory) elect one active instance, which runs the firing loop; the others serve the
//! API as well and stand by, trying to take over every second, so one does within about a
//! second of the active one's death. A run fired by both around a handover is harmless: the
//! same idempotency key, and only the first record stands (see `firing` and `store`).
//!
//! The active one holds the schedulers' [`ServiceLock`]: on PostgreSQL a session-level advisory
//! lock, on SQLite an exclusive `flock` on a file beside the database (see
//! [`ferroclaw_common::service_lock`] for how it works and what it needs). The active one
//! checks its lock before each firing round and every second, and stands by when it is lost.

use std::sync::Arc;
use std::time::Duration;

use ferroclaw_common::service_db::Location;
use ferroclaw_common::service_lock::ServiceLock;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::store::TaskStore;

/// How often a standby tries to take over, and the active one checks it still holds the lock.
pub const RETRY: Duration = Duration::from_secs(1);
/// The lock's name, the same in every ferroclaw scheduler.
const LOCK_NAME: &str = "ferroclaw-scheduler";

/// This instance's claim to be the active scheduler.
pub struct Leadership {
    lock: Mutex<ServiceLock>,
    active: watch::Sender<bool>,
}

impl Leadership {
    /// Standing by, among the schedulers on the task store at `at` (opened as `store`).
    pub fn new(store: &TaskStore, at: &Location) -> Self {
        let lock = ServiceLock::new(LOCK_NAME, at, store.pool());
        crate::metrics::active(false);
        Self {
            lock: Mutex::new(lock),
            active: watch::channel(false).0,
        }
    }

    /// Whether this instance was the active one at the last check.
    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Follows [`Self::is_active`].
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// Whether this instance may fire now. The active one checks its lock first, so that no
    /// round starts on a lock lost since the last check.
    pub async fn confirm(&self) -> bool {
        self.is_active() && self.step().await
    }

    /// One round: a standby tries to take the lock, the active one checks it still holds it.
    /// Returns whether this instance is the active one.
    pub async fn step(&self) -> bool {
        let held = self.lock.lock().await.hold().await;
        let active = match held {
            Ok(active) => active,
            Err(e) if self.is_active() => {
                tracing::warn!(error = %e, "scheduler lock connection lost");
                false
            }
            Err(e) => {
                // A standby keeps trying; the firing loop reports an unreachable store.
                tracing::debug!(error = %e, "cannot try the scheduler lock");
                false
            }
        };
        if self.active.send_replace(active) != active {
            crate::metrics::active(active);
            if active {
                tracing::info!("scheduler is active: this instance fires the runs");
            } else {
                tracing::warn!("scheduler is standby: it lost its lock and fires nothing");
            }
        }
        active
    }

    /// Tries to take over every [`RETRY`] while standing by, and checks the lock as often
    /// while active, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.step().await {
            tracing::info!("scheduler is standby: another instance fires the runs");
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.cancelled() => return,
            }
            self.step().await;
        }
    }

    /// Gives the lock up (once firing has stopped), so a standby takes over at its next try.
    pub async fn release(&self) {
        self.active.send_replace(false);
        crate::metrics::active(false);
        self.lock.lock().await.release().await;
    }
}

#[cfg(test)]
mod tests {
    use ferroclaw_common::service_lock::key_of;
    use sqlx::Connection;

    use super::*;

    /// The advisory lock's key is the one every scheduler has used: schedulers of different
    /// versions on one database, as during a rolling upgrade, contend for the same lock.
    #[test]
    fn the_lock_key_is_unchanged() {
        assert_eq!(key_of(LOCK_NAME), -7_832_652_187_230_931_110);
    }

    /// Two schedulers on one store: one active, the other standing by; when the active one
    /// goes, the other takes over at its next try.
    #[tokio::test]
    async fn one_of_two_is_active_and_the_other_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        for at in ferroclaw_common::test_postgres::locations(dir.path(), "leadership").await {
            let (one_store, two_store) = (
                TaskStore::open(&at).await.unwrap(),
                TaskStore::open(&at).await.unwrap(),
            );
            let one = Leadership::new(&one_store, &at);
            let two = Leadership::new(&two_store, &at);
            assert!(!one.is_active(), "{at:?}: everyone starts standing by");
            assert!(one.step().await, "{at:?}: the first to try takes the lock");
            assert!(!two.step().await, "{at:?}: the second stands by");
            assert!(one.confirm().await && one.step().await, "{at:?}: and stays");
            assert!(!two.confirm().await, "{at:?}: a standby never confirms");
            one.release().await;
            assert!(!one.is_active());
            assert!(two.step().await, "{at:?}: the standby takes over");
            assert!(!one.step().await, "{at:?}: and the first now stands by");
            two.release().await;
            for store in [one_store, two_store] {
                store.close().await;
            }
        }
    }

    /// On PostgreSQL the lock goes with its connection: the holder notices the loss at its
    /// next check and stands by, and the standby takes over.
    #[tokio::test]
    async fn a_lost_lock_connection_hands_over() {
        let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
            return;
        };
        let url = postgres.create_database("lost_lock").await.unwrap();
        let at = Location::Postgres(url.clone());
        let (one_store, two_store) = (
            TaskStore::open(&at).await.unwrap(),
            TaskStore::open(&at).await.unwrap(),
        );
        let one = Leadership::new(&one_store, &at);
        let two = Leadership::new(&two_store, &at);
        assert!(one.step().await);
        assert!(!two.step().await);
        // The server ends the holder's session, as when its process dies.
        let mut admin = sqlx::postgres::PgConnection::connect(&url).await.unwrap();
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(ended, [true], "one session held the lock");
        assert!(!one.confirm().await, "the holder notices before firing");
        assert!(!one.is_active());
        // The ended session lets its lock go as it exits: a moment later.
        let mut tries = 0;
        while !two.step().await {
            tries += 1;
            assert!(tries < 50, "the standby never took over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!one.step().await, "the first tries again and stands by");
        two.release().await;
        one.release().await;
        admin.close().await.unwrap();
        for store in [one_store, two_store] {
            store.close().await;
        }
    }
}
