use std::time::Duration;

use ferroclaw_common::grpc::{channel, is_serving};
use ferroclaw_common::grpc_auth::AttachToken;
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
            // Health needs no credential.
            is_serving(channel(&service.grpc_url(), AttachToken::new(None)?)?, name).await,
            "{name} not serving"
        );
    }

    let mut gateway = GatewayClient::new(channel(
        &cluster.gateway.grpc_url(),
        AttachToken::new(None)?,
    )?);
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

/// The internal services answer only callers with the internal token; the public Gateway
/// only callers with the API token, when one is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_server_authenticates_its_callers() -> anyhow::Result<()> {
    use ferroclaw_proto::v1::delivery_client::DeliveryClient;
    use ferroclaw_proto::v1::runner_client::RunnerClient;
    use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
    use ferroclaw_proto::v1::{ListDeliveriesRequest, ListSessionsRequest, ListTasksRequest};
    use tonic::Code;

    let dir = tempfile::tempdir()?;
    let cluster =
        Cluster::start(dir.path(), &[("FERROCLAW_API_TOKEN", "api-secret".into())]).await?;
    let token_file = dir.path().join("internal.token");
    assert!(
        token_file.exists(),
        "the internal token is made in the data dir"
    );
    let credentials = [
        ("none", AttachToken::new(None)?),
        ("wrong", AttachToken::new(Some("not-the-token"))?),
        ("API token", AttachToken::new(Some("api-secret"))?),
    ];
    for (what, auth) in credentials {
        let code = |r: Result<_, tonic::Status>| r.err().map(|s: tonic::Status| s.code());
        let mut runner = RunnerClient::new(channel(&cluster.runner.grpc_url(), auth.clone())?);
        let listed = runner.list_sessions(ListSessionsRequest::default()).await;
        assert_eq!(
            code(listed.map(|_| ())),
            Some(Code::Unauthenticated),
            "runner, {what}"
        );
        let mut delivery =
            DeliveryClient::new(channel(&cluster.delivery.grpc_url(), auth.clone())?);
        let listed = delivery
            .list_deliveries(ListDeliveriesRequest { limit: 5 })
            .await;
        assert_eq!(
            code(listed.map(|_| ())),
            Some(Code::Unauthenticated),
            "delivery, {what}"
        );
        let mut scheduler =
            SchedulerClient::new(channel(&cluster.scheduler.grpc_url(), auth.clone())?);
        let listed = scheduler.list_tasks(ListTasksRequest::default()).await;
        assert_eq!(
            code(listed.map(|_| ())),
            Some(Code::Unauthenticated),
            "scheduler, {what}"
        );
    }
    // With the internal token, each serves.
    let mut runner = RunnerClient::new(cluster.internal_channel(&cluster.runner.grpc_url())?);
    runner.list_sessions(ListSessionsRequest::default()).await?;
    let mut delivery = DeliveryClient::new(cluster.internal_channel(&cluster.delivery.grpc_url())?);
    delivery
        .list_deliveries(ListDeliveriesRequest { limit: 5 })
        .await?;
    let mut scheduler =
        SchedulerClient::new(cluster.internal_channel(&cluster.scheduler.grpc_url())?);
    scheduler.list_tasks(ListTasksRequest::default()).await?;

    // The public Gateway takes the API token, and nothing else.
    let inject = InjectMessageRequest {
        target: Some(Target::Conversation("authed".into())),
        payload_json: r#"{"text": "hi"}"#.into(),
        idempotency_key: "a1".into(),
    };
    for (what, auth) in [
        ("none", AttachToken::new(None)?),
        ("wrong", AttachToken::new(Some("nope"))?),
    ] {
        let mut gateway = GatewayClient::new(channel(&cluster.gateway.grpc_url(), auth)?);
        let refused = gateway.inject_message(inject.clone()).await;
        assert_eq!(
            refused.err().map(|s| s.code()),
            Some(Code::Unauthenticated),
            "gateway, {what}"
        );
    }
    let mut gateway = GatewayClient::new(channel(
        &cluster.gateway.grpc_url(),
        AttachToken::new(Some("api-secret"))?,
    )?);
    let accepted = gateway.inject_message(inject).await?.into_inner();
    assert!(!accepted.session_id.is_empty());
    cluster.stop().await
}

/// `Runner.SettleBatch`: every valid settlement is taken once (one commit per session), an
/// invalid one or one for an unknown session is refused by name without failing the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_batch_takes_the_valid_and_names_the_refused() -> anyhow::Result<()> {
    use ferroclaw_proto::v1::runner_client::RunnerClient;
    use ferroclaw_proto::v1::{Outcome, SettleBatchRequest, SettleRequest};

    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let (status, body) = cluster.post_message("settled", "hi", None).await?;
    assert_eq!(status, 202, "{body}");
    let session = body["session_id"].as_str().unwrap_or_default().to_string();
    cluster
        .wait_for_lines(
            "settled",
            &["echo: hi".into()],
            std::time::Duration::from_secs(30),
        )
        .await?;
    let settle = |session: &str, out_seq: i64| SettleRequest {
        session_id: session.to_string(),
        out_seq,
        outcome: Outcome::Delivered as i32,
        platform_message_id: String::new(),
        detail: String::new(),
    };
    let mut runner = RunnerClient::new(cluster.internal_channel(&cluster.runner.grpc_url())?);
    let results = runner
        .settle_batch(SettleBatchRequest {
            settlements: vec![
                settle(&session, 99),
                settle(&session, 101),
                settle(&session, 2),
                settle("ses_unknown", 1),
                settle(&session, 99),
            ],
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    assert!(
        results[0].recorded && results[0].refused.is_empty(),
        "{results:?}"
    );
    assert!(
        results[1].recorded && results[1].refused.is_empty(),
        "{results:?}"
    );
    assert!(
        results[2].refused.contains("not an agent (odd) seq"),
        "{results:?}"
    );
    assert!(results[3].refused.contains("ses_unknown"), "{results:?}");
    // The first outcome stands, within one batch as across calls.
    assert!(
        !results[4].recorded && results[4].refused.is_empty(),
        "{results:?}"
    );

    let too_many = runner
        .settle_batch(SettleBatchRequest {
            settlements: (0..513).map(|i| settle(&session, 2 * i + 101)).collect(),
        })
        .await;
    assert_eq!(
        too_many.err().map(|s| s.code()),
        Some(tonic::Code::InvalidArgument)
    );
    cluster.stop().await
}
