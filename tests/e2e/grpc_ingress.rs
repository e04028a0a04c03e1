use std::time::Duration;

use ferroclaw_common::grpc::{channel, is_serving};
use ferroclaw_e2e::Cluster;
use ferroclaw_proto::v1::InjectMessageRequest;
use ferroclaw_proto::v1::gateway_client::GatewayClient;
use ferroclaw_proto::v1::inject_message_request::Target;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_message_over_grpc_and_every_service_reports_health() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    for (service, name) in [
        (&cluster.runner, "ferroclaw.v1.Runner"),
        (&cluster.delivery, "ferroclaw.v1.Delivery"),
        (&cluster.scheduler, "ferroclaw.v1.Scheduler"),
        (&cluster.gateway, "ferroclaw.v1.Gateway"),
    ] {
        assert!(
            is_serving(channel(&service.grpc_url())?, name).await,
            "{name} not serving"
        );
    }

    let mut gateway = GatewayClient::new(channel(&cluster.gateway.grpc_url())?);
    let request = |target, payload: &str, key: &str| InjectMessageRequest {
        target: Some(target),
        payload_json: payload.into(),
        idempotency_key: key.into(),
    };
    let first = gateway
        .inject_message(request(
            Target::Conversation("grpc".into()),
            r#"{"text": "via grpc"}"#,
            "g1",
        ))
        .await?
        .into_inner();
    let again = gateway
        .inject_message(request(
            Target::Conversation("grpc".into()),
            r#"{"text": "via grpc"}"#,
            "g1",
        ))
        .await?
        .into_inner();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.session_id, again.session_id);
    gateway
        .inject_message(request(Target::Source("default".into()), r#"{"n": 1}"#, ""))
        .await?;
    cluster
        .wait_for_lines("grpc", &["echo: via grpc".into()], Duration::from_secs(30))
        .await?;
    cluster
        .wait_for_lines(
            "webhook-default",
            &[r#"echo: webhook default: {"n":1}"#.into()],
            Duration::from_secs(30),
        )
        .await?;

    let unknown = gateway
        .inject_message(request(Target::Source("nope".into()), "{}", ""))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let bad = gateway
        .inject_message(request(Target::Conversation("grpc".into()), "{oops", ""))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    cluster.stop().await
}
