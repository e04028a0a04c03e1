//! Settling: telling the runner what happened to each outbound row. Lanes hand their
//! settlements to one settler task, which sends what has queued up in one `SettleBatch`
//! call (one commit per session on the runner's side) while the previous call is in flight:
//! no wait is added when rows are few, and calls and commits are shared when they are many.

use std::time::Duration;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{SettleBatchRequest, SettleRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Settlements in one call (the runner takes at most 512).
const MAX_BATCH: usize = 256;
/// Settlements waiting for the settler; a lane waits for room beyond.
const QUEUE: usize = 4096;
/// The longest pause between retries while the runner is unreachable.
const LONGEST_BACKOFF: Duration = Duration::from_secs(5);

/// One settlement and who waits for it to be taken.
struct Pending {
    request: SettleRequest,
    /// `true` once the runner took it (or refused it for good); dropped on shutdown.
    done: oneshot::Sender<bool>,
}

#[derive(Clone)]
pub struct Settler {
    queue: mpsc::Sender<Pending>,
}

impl Settler {
    /// Starts the settler task; it ends at shutdown, leaving what it holds unsettled (the
    /// rows are sent again on the next stream and settled then).
    pub fn start(runner: GrpcChannel, shutdown: CancellationToken) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(run(RunnerClient::new(runner), pending, shutdown));
        Self { queue }
    }

    /// Settles one row: `true` once the runner has it, `false` when shutdown came first.
    pub async fn settle(&self, request: SettleRequest) -> bool {
        let (done, taken) = oneshot::channel();
        if self.queue.send(Pending { request, done }).await.is_err() {
            return false;
        }
        taken.await.unwrap_or(false)
    }
}

async fn run(
    mut runner: RunnerClient<GrpcChannel>,
    mut pending: mpsc::Receiver<Pending>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            first = pending.recv() => first,
            _ = shutdown.cancelled() => return,
        };
        let Some(first) = first else { return };
        batch.push(first);
        // Whatever queued up meanwhile goes in the same call.
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        if !send(&mut runner, &mut batch, &shutdown).await {
            return;
        }
    }
}

/// Sends `batch` until the runner answers, then tells each waiter; `false` on shutdown.
async fn send(
    runner: &mut RunnerClient<GrpcChannel>,
    batch: &mut Vec<Pending>,
    shutdown: &CancellationToken,
) -> bool {
    let request = SettleBatchRequest {
        settlements: batch.iter().map(|p| p.request.clone()).collect(),
    };
    let mut failures: u32 = 0;
    let results = loop {
        match runner.settle_batch(request.clone()).await {
            Ok(answer) => break answer.into_inner().results,
            Err(status) => {
                failures += 1;
                tracing::warn!(%status, failures, settlements = batch.len(), "settle failed; retrying");
                let wait =
                    (Duration::from_millis(100) * 2u32.pow(failures.min(6))).min(LONGEST_BACKOFF);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return false,
                }
            }
        }
    };
    for (i, waiting) in batch.drain(..).enumerate() {
        if let Some(runner) = results
            .get(i)
            .map(|r| &r.waiting_for_runner)
            .filter(|r| !r.is_empty())
        {
            tracing::info!(
                session = %waiting.request.session_id,
                seq = waiting.request.out_seq,
                %runner,
                "settlement waits: the session's runner is missing (the row comes again when it is back)"
            );
        } else if let Some(refused) = results.get(i).map(|r| &r.refused).filter(|r| !r.is_empty()) {
            tracing::error!(
                session = %waiting.request.session_id,
                seq = waiting.request.out_seq,
                %refused,
                "the runner will not take this settlement"
            );
        }
        // A waiter that went away (its lane stopped) has nothing to be told.
        let _ = waiting.done.send(true);
    }
    true
}
