//! Several runners serving different sessions (`runner.id` set, PostgreSQL only).
//!
//! Each runner has a row in `runners`: where the others call it, its Docker host, its
//! capacity, and a lease it renews every [`RENEW_EVERY`] on the database's clock. A new
//! session is placed on a live runner by rendezvous hashing, weighted by capacity (each
//! runner's share of new sessions follows its `max_running_agents`), and the placement is
//! recorded in the session's row with a fencing token from a sequence.
//!
//! Any runner takes any call. One for a session placed elsewhere is forwarded to its
//! runner (once: a forwarded call is never forwarded again). When that runner's lease ran
//! out it is *missing*: messages for its sessions wait in the `handoff` table
//! ([`crate::handoff`]) until it returns, or, with shared storage, a live runner takes
//! its sessions over ([`crate::takeover`]).
//!
//! A runner that cannot renew its lease before it runs out stops serving at once, as a
//! runner that lost the single-runner lock does: its sessions may already be another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferroclaw_common::grpc_auth::{AttachToken, GrpcChannel};
use ferroclaw_proto::v1::runner_client::RunnerClient;
use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, RunnerError};
use crate::registry::SessionRecord;

/// How long a runner's lease lasts without renewal: the longest a dead runner's sessions
/// wait before they are known to be without it.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a runner renews its lease and reads the others'.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// The metadata a forwarded call carries (the forwarding runner's id): it is never
/// forwarded again.
pub const FORWARDED: &str = "x-ferroclaw-forwarded-by";

/// A runner as the `runners` table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub url: String,
    pub docker_host: String,
    pub capacity: i64,
    pub shared_storage: bool,
    /// Its lease has not run out.
    pub live: bool,
}

/// Where a call for a session goes.
pub enum Route {
    /// This runner serves the session.
    Here,
    /// Runner `runner` serves it: forward the call.
    There {
        runner: String,
        client: Box<RunnerClient<GrpcChannel>>,
    },
    /// Its runner is missing (its lease ran out).
    Missing { runner: String },
}

/// What this runner says of itself in its row.
pub struct Registration {
    pub id: String,
    /// The host it runs on. The caller holds the id's lock file on this host, so no other
    /// process with the id runs here: a row this host left is a dead process's, taken at once.
    pub host: String,
    pub url: String,
    pub docker_host: String,
    pub capacity: i64,
    pub shared_storage: bool,
}

pub struct Placement {
    me: Registration,
    /// This process's token in its row: a second process with the same id waits.
    instance: String,
    pool: AnyPool,
    auth: AttachToken,
    /// The `runners` table as last read.
    peers: RwLock<Vec<Peer>>,
    /// Clients of the other runners, by URL.
    clients: Mutex<HashMap<String, RunnerClient<GrpcChannel>>>,
    /// When the lease was last renewed (or taken).
    renewed: Mutex<Instant>,
    /// When this runner took its lease: the others may see it missing for a moment after.
    pub registered: Instant,
}

impl Placement {
    /// Takes this runner's row, waiting while another live process holds the same id: a
    /// runner restarted on another host waits for its old lease to run out; restarted on
    /// the same host (holding the id's lock file there), it takes the row at once. `None`
    /// when shutdown came first.
    pub async fn register(
        pool: AnyPool,
        me: Registration,
        auth: AttachToken,
        shutdown: &CancellationToken,
    ) -> Result<Option<Arc<Self>>> {
        let instance = ferroclaw_common::ids::new_id("run");
        let mut waited = false;
        loop {
            let taken = sqlx::query(
                "INSERT INTO runners
                     (id, url, docker_host, capacity, shared_storage, instance, host, started_at, lease_until)
                 VALUES ($1, $2, $3, $4, $5, $6, $9, $7, clock_timestamp() + $8 * interval '1 millisecond')
                 ON CONFLICT (id) DO UPDATE SET
                     url = excluded.url, docker_host = excluded.docker_host,
                     capacity = excluded.capacity, shared_storage = excluded.shared_storage,
                     instance = excluded.instance, host = excluded.host,
                     started_at = excluded.started_at, lease_until = excluded.lease_until
                 WHERE runners.lease_until < clock_timestamp()
                    OR runners.instance = excluded.instance
                    OR runners.host = excluded.host",
            )
            .bind(&me.id)
            .bind(&me.url)
            .bind(&me.docker_host)
            .bind(me.capacity)
            .bind(me.shared_storage)
            .bind(&instance)
            .bind(ferroclaw_mailbox::now_ms())
            .bind(LEASE.as_millis() as i64)
            .bind(&me.host)
            .execute(&pool)
            .await?;
            if taken.rows_affected() == 1 {
                break;
            }
            if !waited {
                tracing::warn!(runner = %me.id,
                    "another process holds this runner id's lease (a crashed one's runs out within {LEASE:?}); waiting");
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
        }
        tracing::info!(runner = %me.id, url = %me.url, shared_storage = me.shared_storage,
            "runner registered; it serves the sessions placed on it");
        let placement = Arc::new(Self {
            me,
            instance,
            pool,
            auth,
            peers: RwLock::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            renewed: Mutex::new(Instant::now()),
            registered: Instant::now(),
        });
        placement.read_peers().await?;
        Ok(Some(placement))
    }

    pub fn id(&self) -> &str {
        &self.me.id
    }

    pub fn shared_storage(&self) -> bool {
        self.me.shared_storage
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Renews the lease; `Ok(false)` when it is gone (it ran out, and another process may
    /// hold the id now). Errors while the lease may still stand are the caller's to judge
    /// with [`Placement::lease_left`].
    pub async fn renew(&self) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE runners SET lease_until = clock_timestamp() + $3 * interval '1 millisecond'
             WHERE id = $1 AND instance = $2 AND lease_until > clock_timestamp()",
        )
        .bind(&self.me.id)
        .bind(&self.instance)
        .bind(LEASE.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        let held = renewed.rows_affected() == 1;
        if held && let Ok(mut at) = self.renewed.lock() {
            *at = Instant::now();
        }
        Ok(held)
    }

    /// How long the lease surely stands without another renewal (on this host's clock,
    /// counted from before the last renewal's answer, so never longer than the truth).
    pub fn lease_left(&self) -> Duration {
        let since = self.renewed.lock().map_or(LEASE, |at| at.elapsed());
        LEASE.saturating_sub(since)
    }

    /// Gives the lease up at an orderly stop: the others see this runner missing at once.
    pub async fn release(&self) {
        let released = sqlx::query(
            "UPDATE runners SET lease_until = clock_timestamp() WHERE id = $1 AND instance = $2",
        )
        .bind(&self.me.id)
        .bind(&self.instance)
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "cannot give the runner lease up; it runs out by itself");
        }
    }

    /// Reads every runner's row and lease.
    pub async fn read_peers(&self) -> Result<Vec<Peer>> {
        type Row = (String, String, String, i64, bool, bool);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, url, docker_host, capacity, shared_storage,
                    lease_until > clock_timestamp()
             FROM runners ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let peers: Vec<Peer> = rows
            .into_iter()
            .map(
                |(id, url, docker_host, capacity, shared_storage, live)| Peer {
                    id,
                    url,
                    docker_host,
                    capacity,
                    shared_storage,
                    live,
                },
            )
            .collect();
        if let Ok(mut known) = self.peers.write() {
            *known = peers.clone();
        }
        Ok(peers)
    }

    /// The runners as last read.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Whether runner `id` was live when last read (this runner always is).
    pub fn is_live(&self, id: &str) -> bool {
        id == self.me.id
            || self
                .peers
                .read()
                .is_ok_and(|p| p.iter().any(|peer| peer.id == id && peer.live))
    }

    /// The live runner a new session of (agent, conversation key) goes to.
    pub fn choose(&self, agent: &str, conversation_key: &str) -> String {
        let peers = self.peers();
        let mut candidates: Vec<(&str, i64)> = peers
            .iter()
            .filter(|p| p.live && p.id != self.me.id)
            .map(|p| (p.id.as_str(), p.capacity))
            .collect();
        candidates.push((self.me.id.as_str(), self.me.capacity));
        rendezvous(&candidates, &format!("{agent}\n{conversation_key}"))
            .unwrap_or(&self.me.id)
            .to_string()
    }

    /// Where calls for `session` go now.
    pub fn route(&self, session: &SessionRecord) -> Result<Route> {
        let Some(runner) = session.runner.as_deref() else {
            // Never placed: a single runner's session from before (see `claim_unplaced`).
            return Ok(Route::Missing {
                runner: "(not placed)".into(),
            });
        };
        if runner == self.me.id {
            return Ok(Route::Here);
        }
        let peer = self
            .peers
            .read()
            .ok()
            .and_then(|p| p.iter().find(|peer| peer.id == runner).cloned());
        match peer {
            Some(peer) if peer.live => Ok(Route::There {
                runner: peer.id.clone(),
                client: Box::new(self.client_of(&peer.url)?),
            }),
            _ => Ok(Route::Missing {
                runner: runner.to_string(),
            }),
        }
    }

    /// A client of the runner at `url`, made once.
    pub fn client_of(&self, url: &str) -> Result<RunnerClient<GrpcChannel>> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(url) {
            return Ok(client.clone());
        }
        let channel = ferroclaw_common::grpc::channel(url, self.auth.clone())
            .map_err(|e| RunnerError::Config(format!("runner URL {url:?}: {e}")))?;
        let room = crate::session_files::MAX_FILE_BYTES + 1024 * 1024;
        let client = RunnerClient::new(channel)
            .max_decoding_message_size(room)
            .max_encoding_message_size(room);
        clients.insert(url.to_string(), client.clone());
        Ok(client)
    }

    /// `message` as a call forwarded by this runner.
    pub fn forwarded<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = self.me.id.parse() {
            request.metadata_mut().insert(FORWARDED, value);
        }
        request
    }
}

/// The live runners with an id on the registry at `at`, named, or `None` (always on
/// SQLite, where runners have no ids).
pub async fn live_placed_runners(
    pool: &AnyPool,
    at: &ferroclaw_common::service_db::Location,
) -> Result<Option<String>> {
    if !matches!(at, ferroclaw_common::service_db::Location::Postgres(_)) {
        return Ok(None);
    }
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM runners WHERE lease_until > clock_timestamp() ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok((!live.is_empty()).then(|| live.join(", ")))
}

/// Whether `request` was forwarded by another runner (then it is never forwarded again).
pub fn was_forwarded<T>(request: &tonic::Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

/// Weighted rendezvous hashing: the candidate (id, weight) with the highest score for
/// `key`. Every runner computes the same answer from the same list, a runner joining
/// takes new sessions only (placements are recorded, never recomputed), and a weight twice
/// another's wins twice as often.
pub fn rendezvous<'a>(candidates: &[(&'a str, i64)], key: &str) -> Option<&'a str> {
    candidates
        .iter()
        .map(|(id, weight)| {
            // A uniform draw in (0, 1) from the pair's hash; score = -weight / ln(draw).
            let h = fnv1a(id.as_bytes(), fnv1a(key.as_bytes(), 0xcbf2_9ce4_8422_2325));
            let draw = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -((*weight).max(1) as f64) / draw.ln();
            (score, *id)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, id)| id)
}

/// FNV-1a, then a final mix (splitmix64's) so that close inputs draw far apart.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_spreads_by_weight() {
        let two = [("runner-a", 8), ("runner-b", 8)];
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for i in 0..10_000 {
            let key = format!("main\napi:c{i}");
            let chosen = rendezvous(&two, &key).unwrap();
            assert_eq!(
                rendezvous(&two, &key),
                Some(chosen),
                "the same answer twice"
            );
            *counts.entry(chosen).or_default() += 1;
        }
        let a = counts["runner-a"];
        assert!((4_500..=5_500).contains(&a), "an even spread: {counts:?}");

        // Twice the capacity, about twice the sessions.
        let weighted = [("runner-a", 16), ("runner-b", 8)];
        let a = (0..10_000)
            .filter(|i| rendezvous(&weighted, &format!("k{i}")) == Some("runner-a"))
            .count();
        assert!((6_200..=7_100).contains(&a), "2:1 by weight: {a}");

        // A third runner takes about a third, and only from the others: no session moves
        // between the two that were there.
        let three = [("runner-a", 8), ("runner-b", 8), ("runner-c", 8)];
        let mut moved_between_old = 0;
        let mut to_new = 0;
        for i in 0..10_000 {
            let key = format!("k{i}");
            let before = rendezvous(&two, &key).unwrap();
            let after = rendezvous(&three, &key).unwrap();
            if after == "runner-c" {
                to_new += 1;
            } else if after != before {
                moved_between_old += 1;
            }
        }
        assert_eq!(moved_between_old, 0);
        assert!((2_900..=3_800).contains(&to_new), "{to_new}");
        assert_eq!(rendezvous(&[], "k"), None);
    }
}
