//! The scheduler: scheduled tasks (cron, interval, once) that fire into sessions.
//! This holds the service, its database and `ListTasks`; creating and firing tasks come with
//! the scheduler issue.

pub mod error;
mod service;
pub mod store;

use ferroclaw_common::{Config, grpc};
use ferroclaw_proto::v1::scheduler_server::SchedulerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{Result, SchedulerError};

use crate::service::SchedulerService;
use crate::store::TaskStore;

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| SchedulerError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = TaskStore::open(&config.data_dir.join("scheduler.db")).await?;
    let (router, _health) = grpc::server_for::<SchedulerServer<SchedulerService>>().await?;
    let router = router.add_service(SchedulerServer::new(SchedulerService {
        store: store.clone(),
    }));
    tracing::info!(addr = ?listener.local_addr().ok(), "scheduler listening");
    grpc::serve(router, listener, shutdown).await?;
    store.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}
