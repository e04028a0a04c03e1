//! Peers named by a list of instances (`FERROCLAW_DELIVERY_URL=http://a,http://b`): the
//! gateway calls whichever delivery and scheduler serve. With two of each on one PostgreSQL
//! database, one of each is SIGKILLed, and the API keeps answering through the others:
//! conversations are read, messages answered, tasks listed.

use std::time::{Duration, Instant};

use ferroclaw_common::grpc_instances::PROBE_EVERY;
use ferroclaw_e2e::Cluster;
use sqlx::Connection;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_goes_on_through_the_surviving_delivery_and_scheduler() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let url = postgres.create_database("instances").await?;
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), &[("DATABASE_URL", url.clone())]).await?;
    let mut scheduler = cluster.start_another("scheduler", &[]).await?;
    let schedulers = format!("{},{}", cluster.scheduler.grpc_url(), scheduler.grpc_url());
    let mut delivery = cluster
        .start_another(
            "delivery",
            &[("FERROCLAW_SCHEDULER_URL", schedulers.clone())],
        )
        .await?;
    let deliveries = format!("{},{}", cluster.delivery.grpc_url(), delivery.grpc_url());
    cluster.envs_set("FERROCLAW_DELIVERY_URL", &deliveries);
    cluster.envs_set("FERROCLAW_SCHEDULER_URL", &schedulers);
    cluster.restart_gateway().await?;

    let (status, body) = cluster.post_message("both", "before", None).await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines("both", &["echo: before".into()], WAIT)
        .await?;

    // Killed while idle: a delivery killed mid-lane holds its lane until the lease expires
    // (delivery_shared.rs), which is not what this test measures.
    let mut db = sqlx::postgres::PgConnection::connect(&url).await?;
    let deadline = Instant::now() + WAIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM delivery.lane_leases")
        .fetch_one(&mut db)
        .await?
        > 0
    {
        anyhow::ensure!(Instant::now() < deadline, "a lane lease was never given up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One delivery and one scheduler die; the cluster keeps the survivors (stopped at the end).
    std::mem::swap(&mut cluster.delivery, &mut delivery);
    std::mem::swap(&mut cluster.scheduler, &mut scheduler);
    for dead in [&mut delivery, &mut scheduler] {
        dead.child.kill().await?;
        dead.child.wait().await?;
    }
    let killed = Instant::now();
    // The gateway's probes leave the dead ones out within a probe round and its timeout.
    tokio::time::sleep(PROBE_EVERY * 3).await;

    let (status, body) = cluster.post_message("both", "after", None).await?;
    assert_eq!(status, 202, "{body}");
    let lines = cluster
        .wait_for_lines("both", &["echo: before".into(), "echo: after".into()], WAIT)
        .await?;
    assert_eq!(lines, ["echo: before", "echo: after"], "each reply once");
    let (status, tasks) = cluster.get("/v1/tasks").await?;
    assert_eq!(
        status, 200,
        "tasks through the surviving scheduler: {tasks}"
    );
    let (status, ready) = cluster.get("/readyz").await?;
    assert_eq!(status, 200, "{ready}");
    // The status names every instance and says which serve.
    let (_, summary) = cluster.get("/v1/status").await?;
    let serving = |url: &str| {
        summary["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["url"] == url)
            .map(|i| i["serving"].clone())
    };
    assert_eq!(
        serving(&delivery.grpc_url()),
        Some(serde_json::json!(false)),
        "{summary}"
    );
    assert_eq!(
        serving(&scheduler.grpc_url()),
        Some(serde_json::json!(false)),
        "{summary}"
    );
    assert_eq!(
        serving(&cluster.delivery.grpc_url()),
        Some(serde_json::json!(true)),
        "{summary}"
    );
    // The console's health page shows the same.
    let page = reqwest::get(format!("{}/ui/health", cluster.api()))
        .await?
        .text()
        .await?;
    let dead_row = page
        .split("<tr ")
        .find(|row| row.contains(&format!("data-instance=\"{}\"", delivery.grpc_url())))
        .unwrap_or_default()
        .to_string();
    assert!(dead_row.contains("not serving"), "{page}");
    println!(
        "answered through the survivors {:?} after the kills",
        killed.elapsed()
    );
    cluster.stop().await
}
