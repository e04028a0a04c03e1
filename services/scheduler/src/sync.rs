//! Mirrors each session's tasks into its mailbox (`Runner.SyncTasks`), so the agent can list
//! them from its own files. Changes are coalesced per session and retried until the runner
//! takes them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_proto::v1::SyncTasksRequest;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::TaskStore;

/// Retry pace while the runner does not take a mirror.
const RETRY: Duration = Duration::from_secs(2);
/// How long marks are gathered before mirroring.
const COALESCE: Duration = Duration::from_millis(100);

#[derive(Clone, Default)]
pub struct Syncer {
    dirty: Arc<Mutex<HashSet<String>>>,
    wake: Arc<Notify>,
}

impl Syncer {
    /// Schedules a mirror of `session_id`'s tasks.
    pub fn mark(&self, session_id: &str) {
        if let Ok(mut dirty) = self.dirty.lock() {
            dirty.insert(session_id.to_string());
        }
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<String> {
        self.dirty
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default()
    }

    pub async fn run(self, store: TaskStore, runner: GrpcChannel, shutdown: CancellationToken) {
        let mut runner = RunnerClient::new(runner);
        loop {
            // Gather the marks of a burst (many runs firing together) into one mirror each.
            tokio::time::sleep(COALESCE).await;
            let mut failed = false;
            for session_id in self.take() {
                let tasks = match store.list(Some(&session_id)).await {
                    Ok(tasks) => tasks.iter().map(|t| t.to_proto()).collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read tasks to mirror");
                        self.mark(&session_id);
                        failed = true;
                        continue;
                    }
                };
                let request = SyncTasksRequest {
                    session_id: session_id.clone(),
                    tasks,
                };
                match runner.sync_tasks(request).await {
                    Ok(_) => {}
                    // No such session on the runner: there is no mailbox to mirror into.
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        tracing::warn!(session = %session_id, "task mirror dropped: {}", status.message());
                    }
                    Err(status) => {
                        tracing::warn!(%status, session = %session_id, "task mirror not taken; will retry");
                        self.mark(&session_id);
                        failed = true;
                    }
                }
            }
            let pause = if failed { RETRY } else { Duration::MAX };
            tokio::select! {
                _ = self.wake.notified(), if !failed => {}
                _ = tokio::time::sleep(pause), if failed => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
