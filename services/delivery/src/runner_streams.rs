//! One outbound stream per runner. Each runner streams the rows of the sessions it serves
//! (several runners), or of every session (a single one; its standbys refuse the stream
//! until they take over), so delivery follows each: the runners its configuration lists,
//! and every runner that registers later (several runners: asked of any runner every
//! [`DISCOVER_EVERY`]), so a runner added or moved to a new address is never left out.
//!
//! A runner listed under two URLs (a name and an address) is followed twice: its rows come
//! twice, and the lanes and the ledger keep each from going out twice, as after a
//! reconnect.

use std::collections::HashSet;
use std::time::Duration;

use ferroclaw_common::grpc;
use ferroclaw_common::grpc_auth::{AttachToken, GrpcChannel};
use ferroclaw_proto::v1::GetRunnerStatusRequest;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::consumer::Consumer;
use crate::discord::DiscordOut;
use crate::lanes::Lanes;

/// How often the runners are asked whether one registered that is not followed yet.
pub const DISCOVER_EVERY: Duration = Duration::from_secs(3);

pub struct RunnerStreams {
    lanes: Lanes,
    discord: Option<DiscordOut>,
    auth: AttachToken,
    shutdown: CancellationToken,
    followed: HashSet<String>,
    consumers: JoinSet<()>,
}

impl RunnerStreams {
    /// Follows each runner of `urls` (a peer URL list) from now on.
    pub fn start(
        urls: &str,
        lanes: Lanes,
        discord: Option<DiscordOut>,
        auth: AttachToken,
        shutdown: CancellationToken,
    ) -> Result<Self, grpc::GrpcError> {
        let mut streams = Self {
            lanes,
            discord,
            auth,
            shutdown,
            followed: HashSet::new(),
            consumers: JoinSet::new(),
        };
        for url in ferroclaw_common::grpc_instances::instances(urls) {
            streams.follow(url)?;
        }
        Ok(streams)
    }

    /// Starts the stream (and the typing indicators) of the runner at `url`, once.
    fn follow(&mut self, url: &str) -> Result<(), grpc::GrpcError> {
        let url = url.trim_end_matches('/');
        if !self.followed.insert(url.to_string()) {
            return Ok(());
        }
        let channel = grpc::channel(url, self.auth.clone())?;
        let consumer = Consumer::new(channel.clone(), self.lanes.clone(), "delivery".into());
        self.consumers.spawn(consumer.run(self.shutdown.clone()));
        if let Some(discord) = &self.discord {
            tokio::spawn(crate::typing::run(
                channel,
                discord.clone(),
                self.shutdown.clone(),
            ));
        }
        Ok(())
    }

    /// Until shutdown: follows every runner registered (asked through `any_runner`); then
    /// waits for the consumers to hand their rows over.
    pub async fn run(mut self, any_runner: GrpcChannel) {
        let mut runner = RunnerClient::new(any_runner);
        loop {
            let asked = runner.get_runner_status(GetRunnerStatusRequest { runners_only: true });
            if let Ok(Ok(status)) = tokio::time::timeout(DISCOVER_EVERY, asked).await {
                for found in status.into_inner().runners.iter().filter(|r| r.live) {
                    let new = !self.followed.contains(found.url.trim_end_matches('/'));
                    match self.follow(&found.url) {
                        Ok(()) if new => {
                            tracing::info!(runner = %found.id, url = %found.url, "following a runner's outbound stream");
                        }
                        Ok(()) => {}
                        Err(e) => {
                            tracing::warn!(runner = %found.id, error = %e, "cannot follow a runner");
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(DISCOVER_EVERY) => {}
                _ = self.shutdown.cancelled() => break,
            }
        }
        while self.consumers.join_next().await.is_some() {}
    }
}
