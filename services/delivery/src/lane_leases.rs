//! Lane leases: deliveries sharing one PostgreSQL ledger split the work by lane. Every
//! delivery receives every row (each consumes the runner's stream), but only the holder of
//! a lane's lease sends its rows, so a lane keeps its order and no row is sent by two
//! deliveries at once. The holder renews the lease while the lane has rows and gives it up
//! when the lane empties; a delivery that dies simply stops renewing, and a peer takes its
//! lanes once the lease expires, going on from the ledger as after a restart.
//!
//! Leases are timed on the database's clock, so the deliveries' clocks need not agree. A
//! sole delivery (SQLite) holds every lane without asking.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// How long a lease lasts unless renewed: how soon a peer takes over a dead delivery's lanes.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a holder renews (a few renewals fit in one lease).
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How soon a delivery asks again for a lane a peer holds; it asks less often (down to
/// [`ASK_AGAIN_AT_MOST`]) while the peer keeps it.
pub const ASK_AGAIN: Duration = Duration::from_millis(250);
pub const ASK_AGAIN_AT_MOST: Duration = Duration::from_secs(4);

/// This delivery's side of the leases.
#[derive(Clone)]
pub struct LaneLeases {
    /// `None`: the sole delivery, which needs no lease.
    shared: Option<Shared>,
}

#[derive(Clone)]
struct Shared {
    pool: AnyPool,
    /// Who holds a lease: this process ("host:pid:random"), unique across restarts.
    holder: Arc<str>,
}

/// A lane's lease, renewed in the background while held. [`Held::release`] gives it up;
/// merely dropped, it stops being renewed and expires, so that a release never runs late,
/// after the lane was taken again.
pub struct Held {
    lost: Arc<AtomicBool>,
    /// `None` for the sole delivery.
    shared: Option<(Shared, String, CancellationToken)>,
}

impl Held {
    /// Whether a renewal found the lease gone (it had expired, and a peer may hold the
    /// lane): the lane must be taken again before its next row.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Stops renewing and gives the lane up, so a peer may take it at once.
    pub async fn release(mut self) {
        if let Some((shared, lane, renewing)) = self.shared.take() {
            renewing.cancel();
            if let Err(e) = shared.release(&lane).await {
                // It expires by itself.
                tracing::warn!(%lane, error = %e, "cannot give a lane's lease up");
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((_, _, renewing)) = &self.shared {
            renewing.cancel();
        }
    }
}

impl LaneLeases {
    /// The only delivery: every lane is its own.
    pub fn sole() -> Self {
        Self { shared: None }
    }

    /// One of the deliveries sharing the ledger's database.
    pub fn shared(pool: AnyPool) -> Self {
        Self {
            shared: Some(Shared {
                pool,
                holder: holder_id().into(),
            }),
        }
    }

    /// Takes `lane` if it is free, expired or already this delivery's; `None` while a peer
    /// holds it. The lease is renewed until the returned guard is dropped, then released.
    pub async fn take(&self, lane: &str) -> Result<Option<Held>> {
        let Some(shared) = &self.shared else {
            return Ok(Some(Held {
                lost: Arc::default(),
                shared: None,
            }));
        };
        if !shared.take(lane).await? {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewing = CancellationToken::new();
        tokio::spawn(
            shared
                .clone()
                .renew(lane.to_string(), lost.clone(), renewing.clone()),
        );
        Ok(Some(Held {
            lost,
            shared: Some((shared.clone(), lane.to_string(), renewing)),
        }))
    }
}

impl Shared {
    /// One atomic statement: insert the lease, or take it over when it is this holder's or
    /// has expired. A row comes back exactly when this holder has it.
    async fn take(&self, lane: &str) -> Result<bool> {
        let taken: Option<String> = sqlx::query_scalar(
            "INSERT INTO lane_leases (lane, holder, expires_at)
             VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3)
             ON CONFLICT (lane) DO UPDATE
               SET holder = excluded.holder, expires_at = excluded.expires_at
               WHERE lane_leases.holder = excluded.holder
                  OR lane_leases.expires_at < (extract(epoch FROM clock_timestamp()) * 1000)::bigint
             RETURNING holder",
        )
        .bind(lane)
        .bind(&*self.holder)
        .bind(LEASE.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(taken.is_some())
    }

    /// Extends this holder's lease; `false` when it has none any more (never creates one:
    /// a renewal racing a release must not bring the lease back).
    async fn renew_once(&self, lane: &str) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE lane_leases
             SET expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3
             WHERE lane = $1 AND holder = $2",
        )
        .bind(lane)
        .bind(&*self.holder)
        .bind(LEASE.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release(&self, lane: &str) -> Result<()> {
        sqlx::query("DELETE FROM lane_leases WHERE lane = $1 AND holder = $2")
            .bind(lane)
            .bind(&*self.holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Renews `lane` every [`RENEW_EVERY`] until `stop`. A renewal that finds the lease
    /// gone marks it `lost`; one that fails (the database is away) is tried again, since
    /// the peers cannot take the lane from an absent database either.
    async fn renew(self, lane: String, lost: Arc<AtomicBool>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = stop.cancelled() => return,
            }
            match self.renew_once(&lane).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(%lane, "this lane's lease expired; a peer may hold it");
                    lost.store(true, Ordering::Release);
                    return;
                }
                Err(e) => tracing::warn!(%lane, error = %e, "cannot renew a lane's lease"),
            }
        }
    }
}

/// "host:pid:random": readable in the table, and never reused by a restarted process.
fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    // std's hasher keys are random per process: enough to tell restarts apart.
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{host}:{}:{:08x}", std::process::id(), random as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use ferroclaw_common::service_db::Location;

    async fn holds(leases: &LaneLeases, lane: &str) -> Option<Held> {
        leases.take(lane).await.unwrap()
    }

    #[tokio::test]
    async fn a_sole_delivery_holds_every_lane() {
        let leases = LaneLeases::sole();
        let a = holds(&leases, "api:c").await.expect("no peer to ask");
        assert!(holds(&leases, "api:c").await.is_some());
        assert!(!a.lost());
    }

    /// Two deliveries on one PostgreSQL ledger: one holder per lane, given up when dropped,
    /// taken over once expired, and the old holder learns it lost the lane.
    #[tokio::test]
    async fn one_delivery_holds_a_lane_until_it_gives_it_up_or_its_lease_expires() {
        let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
            return;
        };
        let url = postgres.create_database("lane_leases").await.unwrap();
        let ledger = Ledger::open(Location::Postgres(url)).await.unwrap();
        let a = LaneLeases::shared(ledger.pool().clone());
        let b = LaneLeases::shared(ledger.pool().clone());

        let held = holds(&a, "api:c").await.expect("a free lane");
        assert!(holds(&b, "api:c").await.is_none(), "a peer holds it");
        assert!(
            holds(&b, "api:other").await.is_some(),
            "other lanes are free"
        );
        // A holder whose lane task ended without releasing takes its lane again at once.
        drop(held);
        let held = holds(&a, "api:c").await.expect("its own lease");
        assert!(holds(&b, "api:c").await.is_none());

        // Released: the peer gets it.
        held.release().await;
        let held_by_b = holds(&b, "api:c").await.expect("a released lane");

        // A holder that stops renewing (it died) loses the lane once the lease expires.
        sqlx::query("UPDATE lane_leases SET expires_at = 0 WHERE lane = 'api:c'")
            .execute(ledger.pool())
            .await
            .unwrap();
        let _taken = holds(&a, "api:c")
            .await
            .expect("an expired lease is taken over");
        let deadline = std::time::Instant::now() + RENEW_EVERY * 3;
        while !held_by_b.lost() {
            assert!(
                std::time::Instant::now() < deadline,
                "the old holder's renewal never noticed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(holds(&b, "api:c").await.is_none());
        ledger.close().await;
    }
}
