//! gRPC reflection on every service, in both versions: `grpc.reflection.v1` (grpcurl) and
//! `v1alpha` (Python's grpcio-reflection and older tools), each listing the service's own
//! API, health and both reflection services, and resolving their descriptors.

use std::collections::BTreeSet;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_e2e::Cluster;
use tonic_reflection::pb::{v1, v1alpha};

const SHARED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// `ListServices` and `FileContainingSymbol(symbol)` over v1alpha, in one stream.
async fn v1alpha_reflect(
    channel: GrpcChannel,
    symbol: &str,
) -> anyhow::Result<(BTreeSet<String>, usize)> {
    use v1alpha::server_reflection_client::ServerReflectionClient;
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(symbol.to_string()),
    ]
    .map(|m| v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let (mut services, mut files) = (BTreeSet::new(), 0);
    while let Some(response) = responses.message().await? {
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                services.extend(list.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(found)) => {
                files += found.file_descriptor_proto.len();
            }
            other => anyhow::bail!("unexpected v1alpha answer: {other:?}"),
        }
    }
    Ok((services, files))
}

/// `ListServices` over v1.
async fn v1_services(channel: GrpcChannel) -> anyhow::Result<BTreeSet<String>> {
    use v1::server_reflection_client::ServerReflectionClient;
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let mut services = BTreeSet::new();
    while let Some(response) = responses.message().await? {
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                services.extend(list.service.into_iter().map(|s| s.name));
            }
            other => anyhow::bail!("unexpected v1 answer: {other:?}"),
        }
    }
    Ok(services)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_reflection_v1_and_v1alpha_and_lists_health() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    for (service, own) in [
        (&cluster.runner, "ferroclaw.v1.Runner"),
        (&cluster.delivery, "ferroclaw.v1.Delivery"),
        (&cluster.scheduler, "ferroclaw.v1.Scheduler"),
        (&cluster.gateway, "ferroclaw.v1.Gateway"),
    ] {
        // Reflection sits behind each server's caller check, like its API.
        let channel = cluster.internal_channel(&service.grpc_url())?;
        let (listed, files) = v1alpha_reflect(channel.clone(), own).await?;
        for name in SHARED.iter().chain([&own]) {
            assert!(listed.contains(*name), "{own}: v1alpha lists {listed:?}");
        }
        assert!(
            files > 0,
            "{own}: v1alpha resolves no descriptor for itself"
        );
        // A client that found health by reflection can resolve it too.
        let (_, health_files) = v1alpha_reflect(channel.clone(), "grpc.health.v1.Health").await?;
        assert!(
            health_files > 0,
            "{own}: no descriptor for grpc.health.v1.Health"
        );
        assert_eq!(
            v1_services(channel).await?,
            listed,
            "{own}: v1 and v1alpha differ"
        );
    }
    cluster.stop().await
}
