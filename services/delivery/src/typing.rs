//! Typing indicators: while an agent works on a batch whose replies go to a Discord
//! channel, the channel shows the bot typing (Discord's indicator lasts about 10 s, so it is
//! renewed every 8 s until the work ends).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_content::Destination;
use ferroclaw_proto::v1::WatchActivityRequest;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use tokio_util::sync::CancellationToken;

use crate::discord::DiscordOut;

const RENEW: Duration = Duration::from_secs(8);

/// Follows the runner's activity stream until shutdown, reconnecting as needed.
pub async fn run(runner: GrpcChannel, discord: DiscordOut, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    while !shutdown.is_cancelled() {
        match follow(&runner, &discord, &shutdown).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "activity stream interrupted");
            }
        }
        let delay = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

async fn follow(
    runner: &GrpcChannel,
    discord: &DiscordOut,
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let mut stream = RunnerClient::new(runner.clone())
        .watch_activity(WatchActivityRequest {})
        .await?
        .into_inner();
    // GrpcChannel → sessions working for it.
    let mut active: HashMap<String, HashSet<String>> = HashMap::new();
    let mut renew = tokio::time::interval(RENEW);
    renew.tick().await;
    loop {
        tokio::select! {
            activity = stream.message() => {
                let Some(activity) = activity? else { return Ok(()) };
                let Ok(Destination::Discord { channel_id }) =
                    serde_json::from_str::<Destination>(&activity.destination_json)
                else {
                    continue;
                };
                let sessions = active.entry(channel_id.clone()).or_default();
                if activity.working {
                    if sessions.is_empty() {
                        discord.typing(&channel_id).await;
                    }
                    sessions.insert(activity.session_id);
                } else {
                    sessions.remove(&activity.session_id);
                    if sessions.is_empty() {
                        active.remove(&channel_id);
                    }
                }
            }
            _ = renew.tick() => {
                for channel in active.keys() {
                    discord.typing(channel).await;
                }
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
