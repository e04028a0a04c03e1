//! Several instances of one service behind one channel: a peer URL may list them,
//! comma-separated (`http://delivery-a:50052,http://delivery-b:50052`). Calls are balanced
//! over the instances that answer the gRPC health check as SERVING; one that stops
//! answering (dead, partitioned, draining) is left out within [`PROBE_EVERY`] plus
//! [`PROBE_TIMEOUT`], and taken back once it answers again. Calls in flight to an instance
//! that dies fail as with a single one, and the callers' retries land on the others.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::grpc::GrpcError;

/// How often each instance is asked whether it serves.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// An instance that does not answer within this is left out.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the probes found last, by instance URL, for status pages.
static LAST_SEEN: LazyLock<Mutex<HashMap<String, bool>>> = LazyLock::new(Mutex::default);

/// Whether the instance at `url` served at its last probe; `None` when it is not watched
/// (a peer given one URL is called without probes).
pub fn serving(url: &str) -> Option<bool> {
    LAST_SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(url)
        .copied()
}

fn record(url: &str, up: bool) {
    LAST_SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(url.to_string(), up);
}

/// The instances a peer URL lists, in order; one for a plain URL.
pub fn instances(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// A channel balanced over `endpoints` (by URL), each taken in only while it serves. Needs
/// a Tokio runtime: the probing task runs until the channel and its clones are dropped.
pub fn balanced(endpoints: Vec<(String, Endpoint)>) -> Result<Channel, GrpcError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| GrpcError::Url {
        url: endpoints
            .iter()
            .map(|(u, _)| u.as_str())
            .collect::<Vec<_>>()
            .join(","),
        message: "several instances need a running Tokio runtime to be watched".into(),
    })?;
    let (channel, changes) = Channel::balance_channel::<String>(endpoints.len() * 2 + 1);
    runtime.spawn(watch(endpoints, changes));
    Ok(channel)
}

/// Probes every instance each [`PROBE_EVERY`] and keeps the balanced set to those serving.
/// Ends when the channel is gone (its change receiver closed).
async fn watch(endpoints: Vec<(String, Endpoint)>, changes: Sender<Change<String, Endpoint>>) {
    let probes: Vec<(String, Endpoint, HealthClient<Channel>)> = endpoints
        .into_iter()
        .map(|(url, endpoint)| {
            let client = HealthClient::new(endpoint.clone().connect_lazy());
            (url, endpoint, client)
        })
        .collect();
    let mut serving: HashMap<String, bool> = HashMap::new();
    loop {
        for (url, endpoint, client) in &probes {
            let up = serves(client.clone()).await;
            record(url, up);
            let was = serving.get(url).copied().unwrap_or(false);
            let change = match (was, up) {
                (false, true) => Change::Insert(url.clone(), endpoint.clone()),
                (true, false) => Change::Remove(url.clone()),
                _ => continue,
            };
            if up {
                tracing::info!(instance = %url, "instance serves; calls go to it");
            } else {
                tracing::warn!(instance = %url, "instance does not serve; calls avoid it");
            }
            if changes.send(change).await.is_err() {
                return;
            }
            serving.insert(url.clone(), up);
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Whether the instance answers its health check (the whole server's, "") as SERVING.
async fn serves(mut client: HealthClient<Channel>) -> bool {
    let asked = client.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, asked).await,
        Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_lists_its_instances() {
        assert_eq!(instances("http://a:1"), ["http://a:1"]);
        assert_eq!(
            instances(" http://a:1 , http://b:2,"),
            ["http://a:1", "http://b:2"]
        );
        assert!(instances(" , ").is_empty());
    }
}
