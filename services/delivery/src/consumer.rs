//! Consumes the runner's outbound stream into the delivery lanes. Reconnects with backoff
//! when the runner goes away; the runner resends every unsettled row on the new stream, and
//! the lanes and the ledger keep a resent row from going out twice.

use std::time::Duration;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_proto::v1::WatchOutboundRequest;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use tokio_util::sync::CancellationToken;

use crate::lanes::Lanes;

pub struct Consumer {
    runner: RunnerClient<GrpcChannel>,
    lanes: Lanes,
    name: String,
}

impl Consumer {
    pub fn new(runner: GrpcChannel, lanes: Lanes, name: String) -> Self {
        Self {
            // Rows are at most the runner's max_row_bytes; leave room.
            runner: RunnerClient::new(runner).max_decoding_message_size(4 * 1024 * 1024),
            lanes,
            name,
        }
    }

    /// Runs until shutdown, reconnecting to the runner as needed; then waits for the lanes
    /// to finish the sends in hand.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // Once, not every retry: a standby runner refuses the stream for hours.
                    if failures == 1 {
                        tracing::warn!(error = %e, "outbound stream interrupted; reconnecting");
                    } else {
                        tracing::debug!(error = %e, failures, "outbound stream still down");
                    }
                }
            }
            // At most 2 s: a standby runner that took over is streamed from soon after.
            let delay = Duration::from_millis((100u64 << failures.min(6)).min(2_000));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        self.lanes.drained().await;
    }

    async fn consume(&mut self, shutdown: &CancellationToken) -> Result<(), tonic::Status> {
        let request = WatchOutboundRequest {
            consumer: self.name.clone(),
        };
        let mut stream = self.runner.watch_outbound(request).await?.into_inner();
        tracing::info!("watching the runner's outbound stream");
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                _ = shutdown.cancelled() => return Ok(()),
            };
            let Some(message) = message else {
                return Ok(());
            };
            tokio::select! {
                _ = self.lanes.push(message) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}
