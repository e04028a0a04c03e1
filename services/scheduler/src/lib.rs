//! The scheduler: tasks (cron with time zones, intervals, one-off moments) that fire into
//! sessions on time and never twice (ARCHITECTURE.md §6.4). Several may share a task store:
//! one fires, the others serve the API and stand by (`leadership`).

pub mod error;
pub mod firing;
pub mod leadership;
pub mod metrics;
pub mod schedule;
mod service;
pub mod store;
pub mod sync;

use std::sync::Arc;

use ferroclaw_common::ready::Ready;
use ferroclaw_common::service_db::Location;
use ferroclaw_common::{Config, grpc, grpc_auth};
use ferroclaw_proto::v1::scheduler_server::SchedulerServer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use error::{Result, SchedulerError};

use crate::firing::{Clock, Firer, SystemClock};
use crate::leadership::Leadership;
use crate::service::SchedulerService;
use crate::store::TaskStore;
use crate::sync::Syncer;

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<()> {
    run_with_clock(config, listener, shutdown, ready, Arc::new(SystemClock)).await
}

/// [`run`] with a chosen time source.
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    ready: Ready,
    clock: Arc<dyn Clock>,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| SchedulerError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    let at = Location::new(
        config.data_dir.join("scheduler.db"),
        config.scheduler.database_url.as_deref(),
    )?;
    let store = TaskStore::open(&at).await?;
    let leadership = Arc::new(Leadership::new(&store, &at));
    let (internal, required) =
        grpc_auth::internal_auth(&config.data_dir).map_err(grpc::GrpcError::from)?;
    let runner = grpc::channel(&config.runner.addr().url(), internal)?;
    let syncer = Syncer::default();
    // Mirrors may have been missed while the runner was away: send them all once.
    for session in store.sessions().await? {
        syncer.mark(&session);
    }
    let firer = Firer::new(store.clone(), runner.clone(), syncer.clone(), clock.clone());
    let changed = Arc::new(Notify::new());
    let leading = tokio::spawn(leadership.clone().run(shutdown.clone()));
    let firing = tokio::spawn(firer.clone().run(
        changed.clone(),
        leadership.clone(),
        shutdown.clone(),
    ));
    let syncing = tokio::spawn(syncer.clone().run(store.clone(), runner, shutdown.clone()));

    let (router, _health) = grpc::server_for::<SchedulerServer<SchedulerService>>(required).await?;
    let router = router.add_service(SchedulerServer::new(SchedulerService {
        store: store.clone(),
        firer,
        syncer,
        changed,
        clock,
    }));
    // Ready: the task store is open and migrated.
    let metrics_addr =
        ferroclaw_common::metrics::serve_on(config.metrics.scheduler, shutdown.clone()).await?;
    ready.with_metrics(metrics_addr).announce();
    tracing::info!(addr = ?listener.local_addr().ok(), "scheduler listening");
    grpc::serve(router, listener, shutdown).await?;
    let _ = tokio::join!(firing, syncing, leading);
    // Only once firing has stopped: a standby takes over from here.
    leadership.release().await;
    store.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// The scheduler as its binary runs it: the config read (`config`, else `$FERROCLAW_CONFIG`,
/// else `./ferroclaw.toml`), its addresses bound, then [`run`] until SIGTERM or Ctrl-C. Both
/// `ferroclaw-scheduler` and the one-binary services image start here.
pub async fn serve(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use ferroclaw_common::startup;
    let s = startup::grpc_service("scheduler", config, |c| c.scheduler.listen).await?;
    let result = run(s.config, s.listener, s.shutdown, s.ready).await;
    // The last spans go out before the process ends.
    ferroclaw_common::telemetry::shutdown().await;
    result.context("scheduler failed")
}
