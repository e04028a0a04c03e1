//! Delivery: sends what agents write to where it belongs, exactly once (ARCHITECTURE.md §2).

mod actions;
mod callback;
mod consumer;
mod conversation_watch;
pub mod discord;
mod discord_limits;
pub mod error;
mod lane_leases;
mod lanes;
pub mod ledger;
pub mod metrics;
mod peer_appends;
mod row_delivery;
mod runner_streams;
mod send_error;
mod service;
pub mod settler;
mod typing;

use ferroclaw_common::{Config, grpc, grpc_auth};
use ferroclaw_proto::v1::delivery_server::DeliveryServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{DeliveryError, Result};

use crate::lanes::Lanes;
use crate::ledger::Ledger;
use crate::row_delivery::RowDelivery;
use crate::service::DeliveryService;

/// Runs delivery on `listener` until `shutdown`; the row being delivered is finished first.
/// Prints `ready` once the ledger is open and migrated.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    ready: ferroclaw_common::ready::Ready,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DeliveryError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    let at = ferroclaw_common::service_db::Location::new(
        config.data_dir.join("delivery.db"),
        config.delivery.database_url.as_deref(),
    )?;
    // Deliveries share a ledger only on PostgreSQL (by lane leases); two on one SQLite
    // file would both send every row.
    let _sole = match &at {
        ferroclaw_common::service_db::Location::Sqlite(path) => Some(sole_on(path)?),
        ferroclaw_common::service_db::Location::Postgres(_) => None,
    };
    let ledger = Ledger::open(at).await?;
    let (internal, required) =
        grpc_auth::internal_auth(&config.data_dir).map_err(grpc::GrpcError::from)?;
    let runner_url = config.runner.addr().url();
    let runner = grpc::channel(&runner_url, internal.clone())?;
    let runner_for_service = runner.clone();
    let scheduler = grpc::channel(&config.scheduler.url(), internal.clone())?;
    let discord = discord::DiscordOut::from_config(&config.discord);
    let rows = RowDelivery::new(
        std::sync::Arc::new(config.clone()),
        runner.clone(),
        scheduler,
        ledger.clone(),
        discord.clone(),
        settler::Settler::start(runner.clone(), shutdown.clone()),
    );
    // Deliveries sharing a PostgreSQL ledger split the lanes between them.
    let leases = if ledger.shared() {
        lane_leases::LaneLeases::shared(ledger.pool().clone())
    } else {
        lane_leases::LaneLeases::sole()
    };
    let lanes = Lanes::new(std::sync::Arc::new(rows), leases, shutdown.clone());
    let streams = runner_streams::RunnerStreams::start(
        &runner_url,
        lanes.clone(),
        discord,
        internal,
        shutdown.clone(),
    )?;
    let consuming = tokio::spawn(streams.run(runner.clone()));

    let (router, _health) = grpc::server_for::<DeliveryServer<DeliveryService>>(required).await?;
    let router = router.add_service(DeliveryServer::new(DeliveryService {
        runner: ferroclaw_proto::v1::runner_client::RunnerClient::new(runner_for_service),
        ledger: ledger.clone(),
        config: std::sync::Arc::new(config.clone()),
        shutdown: shutdown.clone(),
        watchers: conversation_watch::Watchers::new(
            ledger.clone(),
            conversation_watch::MAX_WATCHERS,
            shutdown.clone(),
        ),
        lanes,
    }));
    let metrics_addr =
        ferroclaw_common::metrics::serve_on(config.metrics.delivery, shutdown.clone()).await?;
    ready.with_metrics(metrics_addr).announce();
    tracing::info!(addr = ?listener.local_addr().ok(), "delivery listening");
    grpc::serve(router, listener, shutdown).await?;
    let _ = consuming.await;
    ledger.close().await;
    tracing::info!("delivery stopped");
    Ok(())
}

/// Locks `<ledger>.lock` beside a SQLite ledger for as long as the returned file is open;
/// refuses when another delivery holds it.
fn sole_on(ledger: &std::path::Path) -> Result<std::fs::File> {
    let path = ledger.with_extension("lock");
    ferroclaw_common::service_lock::try_lock_file(&path)?.ok_or_else(|| {
        DeliveryError::AlreadyRunning(format!(
            "another delivery is running on the ledger {} (it holds {}); deliveries share \
             work only on PostgreSQL: set database_url to run more than one",
            ledger.display(),
            path.display()
        ))
    })
}

/// The delivery as its binary runs it: the config read (`config`, else `$FERROCLAW_CONFIG`,
/// else `./ferroclaw.toml`), its addresses bound, then [`run`] until SIGTERM or Ctrl-C. Both
/// `ferroclaw-delivery` and the one-binary services image start here.
pub async fn serve(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use ferroclaw_common::startup;
    let s = startup::grpc_service("delivery", config, |c| c.delivery.listen).await?;
    let result = run(s.config, s.listener, s.shutdown, s.ready).await;
    // The last spans go out before the process ends.
    ferroclaw_common::telemetry::shutdown().await;
    result.context("delivery failed")
}
