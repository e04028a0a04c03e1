//! What a runner among several does every [`RENEW_EVERY`]: renews its lease, reads the
//! others', moves the messages kept for it while it was missing into their mailboxes, and,
//! with shared storage, takes over the sessions of runners that went missing.
//!
//! A runner that cannot renew before its lease runs out stops (`shutdown` is cancelled and
//! [`keep_placed`] says so): by then another runner may serve its sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::placement::{Placement, RENEW_EVERY, rendezvous};
use crate::registry::SessionRecord;
use crate::service::RunnerService;

/// Runs until shutdown; `false` when it stopped the runner because the lease was lost.
pub async fn keep_placed(
    service: Arc<RunnerService>,
    placement: Arc<Placement>,
    shutdown: CancellationToken,
) -> bool {
    crate::metrics::METRICS
        .active
        .with_label_values(&[] as &[&str])
        .set(1);
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = shutdown.cancelled() => return true,
            }
        }
        first = false;
        match placement.renew().await {
            Ok(true) => {}
            Ok(false) => return lost(&shutdown, "the lease ran out before it was renewed"),
            Err(e) if placement.lease_left() > RENEW_EVERY => {
                tracing::warn!(error = %e, left = ?placement.lease_left(),
                    "cannot renew the runner lease; trying again");
                continue;
            }
            Err(e) => return lost(&shutdown, &format!("the database did not answer: {e}")),
        }
        if let Err(e) = placement.read_peers().await {
            tracing::warn!(error = %e, "cannot read the other runners");
            continue;
        }
        match service.move_waiting().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                moved = n,
                "messages kept while this runner was missing are in their mailboxes"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot move kept messages yet"),
        }
        if placement.shared_storage() {
            match take_over(&service, &placement).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "took over the sessions of a missing runner"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take over a missing runner's sessions")
                }
            }
        }
    }
}

fn lost(shutdown: &CancellationToken, why: &str) -> bool {
    tracing::error!(
        why,
        "the runner lost its lease: stopping, so that no two runners serve a session"
    );
    crate::metrics::METRICS
        .active
        .with_label_values(&[] as &[&str])
        .set(0);
    shutdown.cancel();
    false
}

/// Shared storage: places on this runner its share of the sessions of missing runners
/// (those that share the storage too), spread over the live ones like new sessions. Each
/// move takes a new fencing token, written into the session's mailbox before anything
/// else, so the missing runner, should it come back, can write nothing there. Then agents
/// start for the sessions with work. How many sessions moved here.
pub async fn take_over(service: &RunnerService, placement: &Placement) -> Result<usize> {
    let peers = placement.peers();
    let mut shares: Vec<(&str, i64)> = peers
        .iter()
        .filter(|p| p.live && p.shared_storage && p.id != placement.id())
        .map(|p| (p.id.as_str(), p.capacity))
        .collect();
    let me = peers
        .iter()
        .find(|p| p.id == placement.id())
        .map_or(1, |p| p.capacity);
    shares.push((placement.id(), me));
    let mut taken: Vec<SessionRecord> = Vec::new();
    for missing in peers
        .iter()
        .filter(|p| !p.live && p.shared_storage && p.id != placement.id())
    {
        for session in service.registry.placed_on(Some(&missing.id)).await? {
            let key = format!("{}\n{}", session.agent, session.conversation_key);
            if rendezvous(&shares, &key) != Some(placement.id()) {
                continue;
            }
            // Direct enqueues look for kept messages first from before the move commits:
            // one that sees the session here before it was noted would go ahead of them.
            service.note_taken(std::slice::from_ref(&session));
            let Some(placed) = service
                .registry
                .place(&session.id, Some(&missing.id), placement.id())
                .await?
            else {
                continue;
            };
            // The token goes into the mailbox now, before the missing runner could return.
            let held = tokio::time::timeout(Duration::from_secs(5), service.mailboxes.get(&placed));
            match held.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(session = %placed.id, error = %e, "took over a session whose mailbox cannot be opened");
                }
                Err(_) => {
                    tracing::warn!(session = %placed.id, "took over a session whose mailbox did not answer in time");
                }
            }
            tracing::info!(session = %placed.id, from = %missing.id, fence = placed.fence,
                "session taken over");
            // Rows its agent wrote and nobody settled go out on this runner's stream.
            service.feed.note_active(&placed);
            service.feed.poke(&placed.id);
            taken.push(placed);
        }
    }
    let n = taken.len();
    if n > 0 {
        // Messages kept for them while their runner was missing go in first, then their
        // agents start.
        service.move_waiting().await?;
        service.supervisor.recover_sessions(taken).await;
    }
    Ok(n)
}

/// At start: places on this runner every session never placed whose files are here (a
/// single runner's sessions, when an installation turns to several). Sessions without
/// files anywhere are placed on first use instead.
pub async fn claim_unplaced(
    registry: &crate::registry::Registry,
    mailboxes: &crate::mailboxes::Mailboxes,
    placement: &Placement,
) -> Result<usize> {
    let mut claimed = 0;
    for session in registry.placed_on(None).await? {
        if !mailboxes.paths(&session).inbound_db().exists() {
            continue;
        }
        if registry
            .place(&session.id, None, placement.id())
            .await?
            .is_some()
        {
            claimed += 1;
        }
    }
    if claimed > 0 {
        tracing::info!(
            sessions = claimed,
            "placed the sessions whose files are here on this runner"
        );
    }
    Ok(claimed)
}
