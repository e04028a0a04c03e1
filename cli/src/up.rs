//! `ferroclaw up`: the four services as separate local processes, agents as local child
//! processes of the runner. Internal gRPC ports are chosen by the OS and handed on from each
//! service's readiness line; only the REST API has a fixed address.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ferroclaw_common::launch::{ServiceProcess, launch, sibling_binary};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(15);

pub async fn run(
    data_dir: PathBuf,
    http_addr: String,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let mut common: Vec<(&str, String)> = vec![
        ("FERROCLAW_DATA_DIR", data_dir.display().to_string()),
        ("FERROCLAW_RUNNER_ADDR", "127.0.0.1:0".into()),
        ("FERROCLAW_DELIVERY_ADDR", "127.0.0.1:0".into()),
        ("FERROCLAW_SCHEDULER_ADDR", "127.0.0.1:0".into()),
        ("FERROCLAW_GATEWAY_GRPC_ADDR", "127.0.0.1:0".into()),
        ("FERROCLAW_PROXY_ADDR", "127.0.0.1:0".into()),
        // Free ports unless set: they are printed below, for a scrape config.
        (
            "FERROCLAW_RUNNER_METRICS_ADDR",
            metrics_addr("FERROCLAW_RUNNER_METRICS_ADDR"),
        ),
        (
            "FERROCLAW_DELIVERY_METRICS_ADDR",
            metrics_addr("FERROCLAW_DELIVERY_METRICS_ADDR"),
        ),
        (
            "FERROCLAW_SCHEDULER_METRICS_ADDR",
            metrics_addr("FERROCLAW_SCHEDULER_METRICS_ADDR"),
        ),
        ("FERROCLAW_HTTP_ADDR", http_addr),
    ];
    if let Some(config) = config {
        let config = config
            .canonicalize()
            .with_context(|| format!("config file {}", config.display()))?;
        common.push(("FERROCLAW_CONFIG", config.display().to_string()));
    }
    let mut services: Vec<ServiceProcess> = Vec::new();
    let started = start_all(&common, &mut services).await;
    if let Err(e) = started {
        stop_all(&mut services).await;
        return Err(e);
    }
    let gateway = &services[3];
    let metrics = |service: &ServiceProcess| {
        service
            .metrics
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_default()
    };
    println!(
        "ferroclaw is up\n  REST API      http://{}\n  gateway gRPC  {}\n  runner gRPC   {}\n  data          {}\n  metrics       http://{}/metrics (gateway)\n                {} (runner)\n                {} (scheduler)\n                {} (delivery)\nPress Ctrl-C to stop.",
        gateway.http.map(|a| a.to_string()).unwrap_or_default(),
        gateway.grpc_url(),
        services[0].grpc_url(),
        data_dir.display(),
        gateway.http.map(|a| a.to_string()).unwrap_or_default(),
        metrics(&services[0]),
        metrics(&services[1]),
        metrics(&services[2]),
    );
    let outcome = wait_for_exit(&mut services).await;
    stop_all(&mut services).await;
    outcome
}

/// A metrics address from the environment, else a free loopback port.
fn metrics_addr(var: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "127.0.0.1:0".into())
}

async fn start_all(
    common: &[(&str, String)],
    services: &mut Vec<ServiceProcess>,
) -> anyhow::Result<()> {
    let start = |name: &'static str, extra: Vec<(&'static str, String)>| {
        let mut envs: Vec<(&str, String)> = common.to_vec();
        envs.extend(extra);
        async move {
            let binary = sibling_binary(&format!("ferroclaw-{name}"));
            launch(name, &binary, &envs, READY_TIMEOUT)
                .await
                .with_context(|| format!("starting the {name}"))
        }
    };
    let runner = start("runner", vec![]).await?;
    let runner_url = runner.grpc_url();
    services.push(runner);
    let scheduler = start(
        "scheduler",
        vec![("FERROCLAW_RUNNER_URL", runner_url.clone())],
    )
    .await?;
    let scheduler_url = scheduler.grpc_url();
    services.push(scheduler);
    let delivery = start(
        "delivery",
        vec![
            ("FERROCLAW_RUNNER_URL", runner_url.clone()),
            ("FERROCLAW_SCHEDULER_URL", scheduler_url.clone()),
        ],
    )
    .await?;
    let delivery_url = delivery.grpc_url();
    services.push(delivery);
    let gateway = start(
        "gateway",
        vec![
            ("FERROCLAW_RUNNER_URL", runner_url),
            ("FERROCLAW_DELIVERY_URL", delivery_url),
            ("FERROCLAW_SCHEDULER_URL", scheduler_url),
        ],
    )
    .await?;
    services.push(gateway);
    Ok(())
}

/// Until Ctrl-C / SIGTERM (a clean stop) or a service dying on its own (an error).
async fn wait_for_exit(services: &mut [ServiceProcess]) -> anyhow::Result<()> {
    let mut exits = Box::pin(async {
        let waits = services.iter_mut().map(|s| {
            Box::pin(async move {
                let status = s.child.wait().await;
                (s.name.clone(), status)
            })
        });
        futures_select_all(waits.collect()).await
    });
    tokio::select! {
        _ = ferroclaw_common::shutdown::signal() => {
            eprintln!("stopping ferroclaw…");
            Ok(())
        }
        (name, status) = &mut exits => {
            anyhow::bail!("the {name} exited unexpectedly ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))
        }
    }
}

/// The first of several futures to finish.
async fn futures_select_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(move |cx| {
        for future in futures.iter_mut() {
            if let std::task::Poll::Ready(output) = std::pin::Pin::new(future).poll(cx) {
                return std::task::Poll::Ready(output);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Stops in reverse start order, so nothing is accepted that cannot be processed.
async fn stop_all(services: &mut Vec<ServiceProcess>) {
    while let Some(mut service) = services.pop() {
        match service.stop(STOP_GRACE).await {
            Ok(status) => eprintln!("{} stopped ({status})", service.name),
            Err(e) => eprintln!("{} did not stop cleanly: {e}", service.name),
        }
    }
}
