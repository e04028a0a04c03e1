//! A standby runner on the same session store (the data directory, as on shared storage,
//! and one PostgreSQL database) takes over when the active one is SIGKILLed under load:
//! callers list both runners, every message is answered exactly once, and the killed
//! runner, started again, stands by instead of serving beside the new one (the lock fences
//! it out).

use std::time::{Duration, Instant};

use ferroclaw_e2e::Cluster;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const WAIT: Duration = Duration::from_secs(60);
const CONVERSATIONS: usize = 8;
const MESSAGES: usize = 6;

/// The health a runner reports for the whole server.
async fn health(url: &str) -> anyhow::Result<i32> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(answer.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_runner_takes_over_and_every_message_is_answered_once() -> anyhow::Result<()> {
    let Some(postgres) = ferroclaw_common::test_postgres::cluster() else {
        return Ok(());
    };
    let url = postgres.create_database("runner_standby").await?;
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), &[("DATABASE_URL", url)]).await?;
    let mut standby = cluster.start_another("runner", &[]).await?;
    let standby_url = standby.grpc_url();
    assert_eq!(
        health(&standby_url).await?,
        ServingStatus::NotServing as i32,
        "the second runner stands by"
    );
    // Every caller lists both runners.
    let runners = format!("{},{}", cluster.runner.grpc_url(), standby_url);
    cluster.envs_set("FERROCLAW_RUNNER_URL", &runners);
    cluster.restart_gateway().await?;
    cluster.kill_delivery().await?;
    cluster.restart_delivery().await?;
    let mut scheduler = cluster.start_another("scheduler", &[]).await?;
    std::mem::swap(&mut cluster.scheduler, &mut scheduler);
    scheduler.stop(Duration::from_secs(15)).await?;

    let conversations: Vec<String> = (0..CONVERSATIONS).map(|i| format!("ha-{i}")).collect();
    let cluster = std::sync::Arc::new(tokio::sync::Mutex::new(cluster));
    let senders: Vec<_> = conversations
        .iter()
        .map(|conversation| {
            let cluster = cluster.clone();
            let conversation = conversation.clone();
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    let text = format!("m{n}");
                    {
                        let cluster = cluster.lock().await;
                        cluster.post_until_taken(&conversation, &text, WAIT).await?;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    // Mid-load, the active runner dies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    {
        let mut cluster = cluster.lock().await;
        cluster.kill_runner().await?;
    }
    for sender in senders {
        sender.await??;
    }
    let mut cluster = std::sync::Arc::into_inner(cluster)
        .ok_or_else(|| anyhow::anyhow!("a sender still holds the cluster"))?
        .into_inner();
    for conversation in &conversations {
        let expected: Vec<String> = (0..MESSAGES).map(|n| format!("echo: m{n}")).collect();
        let seen = cluster
            .wait_for_lines(conversation, &expected, WAIT)
            .await?;
        assert_eq!(seen, expected, "{conversation}: every reply once, in order");
    }
    println!("all answered {:?} after the kill", killed.elapsed());
    assert_eq!(health(&standby_url).await?, ServingStatus::Serving as i32);

    // The killed runner comes back: it stands by, and the new active one goes on serving.
    let mut returned = cluster.start_another("runner", &[]).await?;
    assert_eq!(
        health(&returned.grpc_url()).await?,
        ServingStatus::NotServing as i32,
        "a returning runner must not serve beside the active one"
    );
    cluster
        .post_until_taken("ha-0", "after the return", WAIT)
        .await?;
    cluster
        .wait_for_lines("ha-0", &["echo: after the return".into()], WAIT)
        .await?;
    returned.stop(Duration::from_secs(15)).await?;
    // The survivor is the cluster's runner now, stopped with the rest.
    std::mem::swap(&mut cluster.runner, &mut standby);
    cluster.stop().await
}
