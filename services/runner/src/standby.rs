//! One active runner per session store: runners sharing one (the data directory on shared
//! storage, and one PostgreSQL database) take the runner lock (`ferroclaw_common::
//! service_lock`), and the ones without it stand by. A standby answers only gRPC health, as
//! NOT_SERVING, so callers that list every runner (`FERROCLAW_RUNNER_URL=http://a,http://b`)
//! send it nothing; it tries for the lock every second. When the active runner dies its lock
//! goes with it, and a standby takes over: it recovers the sessions' agents from their
//! mailboxes, as a restarted runner does, and serves.
//!
//! An active runner that loses its lock (its PostgreSQL session ended) stops at once, so
//! two never serve together: the lock is the fencing. It exits with an error and, restarted,
//! stands by.

use std::net::SocketAddr;
use std::time::Duration;

use ferroclaw_common::ready::Ready;
use ferroclaw_common::service_lock::ServiceLock;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::error::{Result, RunnerError};

/// How often a standby tries for the lock, and the active runner checks it still holds it.
pub const RETRY: Duration = Duration::from_secs(1);
/// The lock's name: the same in every ferroclaw runner.
pub const LOCK: &str = "ferroclaw-runner";

/// What a runner that holds the lock goes on with.
pub struct Active {
    pub listener: TcpListener,
    /// Still to be announced: `None` when the standby announced its addresses already.
    pub ready: Option<Ready>,
}

/// Takes the lock, standing by (health only, NOT_SERVING) while another runner holds it.
/// `None` when shutdown came first.
pub async fn take_lock(
    lock: &mut ServiceLock,
    listener: TcpListener,
    ready: Ready,
    shutdown: &CancellationToken,
) -> Result<Option<Active>> {
    if lock.hold().await? {
        return Ok(Some(Active {
            listener,
            ready: Some(ready),
        }));
    }
    let addr = listener.local_addr().map_err(|source| RunnerError::Io {
        path: "runner gRPC listener".into(),
        source,
    })?;
    tracing::info!("runner is standby: another runner holds the session store");
    crate::metrics::METRICS
        .active
        .with_label_values(&[] as &[&str])
        .set(0);
    let stop = CancellationToken::new();
    let serving = tokio::spawn(serve_health_only(listener, stop.clone()));
    // Callers learn the addresses now; the health check tells them not to call yet.
    ready.announce();
    let taken = loop {
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.cancelled() => break false,
        }
        match lock.hold().await {
            Ok(true) => break true,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot try the runner lock"),
        }
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    if !taken {
        return Ok(None);
    }
    tracing::info!("runner is active: it took the session store over");
    Ok(Some(Active {
        listener: rebind(addr).await?,
        ready: None,
    }))
}

/// Checks every [`RETRY`] that the lock is still held; when it is not, cancels `shutdown`
/// (the runner stops its agents and serves no more) and returns `None`. At an ordinary
/// shutdown it hands the lock back, for the runner to give up once its agents stopped.
pub async fn keep_lock(mut lock: ServiceLock, shutdown: CancellationToken) -> Option<ServiceLock> {
    crate::metrics::METRICS
        .active
        .with_label_values(&[] as &[&str])
        .set(1);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.cancelled() => return Some(lock),
        }
        let held = lock.hold().await;
        if matches!(held, Ok(true)) {
            continue;
        }
        tracing::error!(error = ?held.err().map(|e| e.to_string()),
            "the runner lost its lock: stopping, so that no two runners serve the sessions");
        crate::metrics::METRICS
            .active
            .with_label_values(&[] as &[&str])
            .set(0);
        shutdown.cancel();
        return None;
    }
}

/// gRPC health alone, reporting NOT_SERVING, until `stop`.
async fn serve_health_only(listener: TcpListener, stop: CancellationToken) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status("ferroclaw.v1.Runner", ServingStatus::NotServing)
        .await;
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the standby's health server failed");
    }
}

/// The gRPC address again, once the standby's server let it go.
async fn rebind(addr: SocketAddr) -> Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!(error = %e, "the gRPC address is not free yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => {
                return Err(RunnerError::Io {
                    path: format!("gRPC address {addr}").into(),
                    source,
                });
            }
        }
    }
}
