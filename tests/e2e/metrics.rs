//! Prometheus metrics: every service's `/metrics` is valid text exposition (checked by
//! `promtool check metrics` where Prometheus' promtool is installed), and its counters and
//! histograms move when messages go through.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use ferroclaw_e2e::Cluster;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn scrape(addr: Option<std::net::SocketAddr>) -> anyhow::Result<String> {
    let addr = addr.context("the service named no metrics address")?;
    let response = reqwest::get(format!("http://{addr}/metrics")).await?;
    anyhow::ensure!(
        response.status() == 200,
        "GET /metrics: {}",
        response.status()
    );
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type}"
    );
    Ok(response.text().await?)
}

/// The sum of the samples named `name` whose labels include `labels`.
/// Scrapes until `done` holds for the text (a metric recorded just after what the test
/// waited for), or [`WAIT`] has passed; the last text either way.
async fn scrape_until(
    addr: Option<std::net::SocketAddr>,
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await?;
        if done(&text) || std::time::Instant::now() > deadline {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let found: BTreeMap<&str, &str> = label_text
                .split("\",")
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k.trim_matches(','), v.trim_end_matches('"')))
                })
                .collect();
            labels
                .iter()
                .all(|(k, v)| found.get(k) == Some(v))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `promtool check metrics` on one service's output, or `None` when promtool is absent
/// (an error instead when `FERROCLAW_REQUIRE_PROMTOOL=1`).
fn promtool_check(service: &str, text: &str) -> anyhow::Result<Option<()>> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("FERROCLAW_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1") {
                anyhow::bail!(
                    "promtool is required (FERROCLAW_REQUIRE_PROMTOOL=1) but not installed"
                );
            }
            eprintln!(
                "skipping promtool check: promtool is not installed (Debian: apt-get install prometheus)"
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "promtool check metrics failed for the {service}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Some(()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_valid_metrics_that_move() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let gateway = || scrape(cluster.gateway.http);

    let before = gateway().await?;
    let posts = |text: &str| {
        sample(
            text,
            "ferroclaw_http_requests_total",
            &[
                ("route", "/v1/messages"),
                ("method", "POST"),
                ("status", "202"),
            ],
        )
    };
    // One at a time, so each message gets its own reply row (an agent answers a batch
    // with one).
    let mut expected = Vec::new();
    for i in 0..3 {
        let (status, body) = cluster
            .post_message("metered", &format!("m{i}"), None)
            .await?;
        assert_eq!(status, 202, "{body}");
        expected.push(format!("echo: m{i}"));
        cluster.wait_for_lines("metered", &expected, WAIT).await?;
    }

    // Delivery's stage is recorded right after the reply is stored: give it a moment.
    let delivery = scrape_until(cluster.delivery.metrics, |text| {
        sample(
            text,
            "ferroclaw_deliveries_total",
            &[("outcome", "delivered"), ("destination", "api")],
        ) >= 3.0
    })
    .await?;
    let after = gateway().await?;
    let runner = scrape(cluster.runner.metrics).await?;
    let scheduler = scrape(cluster.scheduler.metrics).await?;

    // Gateway: a counter and a histogram per route.
    assert!(posts(&after) - posts(&before) >= 3.0, "{after}");
    assert!(
        sample(
            &after,
            "ferroclaw_http_request_seconds_count",
            &[("route", "/v1/messages"), ("method", "POST")]
        ) >= 3.0,
        "{after}"
    );
    // Runner: messages in, the first pipeline stage, agents started, gRPC calls answered.
    assert!(
        sample(
            &runner,
            "ferroclaw_runner_messages_enqueued_total",
            &[("agent", "main"), ("duplicate", "false")]
        ) >= 3.0,
        "{runner}"
    );
    assert!(
        sample(
            &runner,
            "ferroclaw_pipeline_stage_seconds_count",
            &[("stage", "enqueue_to_reply_written")]
        ) >= 3.0,
        "{runner}"
    );
    assert!(
        sample(
            &runner,
            "ferroclaw_runner_agent_starts_total",
            &[("agent", "main")]
        ) >= 1.0,
        "{runner}"
    );
    assert!(
        sample(
            &runner,
            "ferroclaw_grpc_server_calls_total",
            &[("method", "/ferroclaw.v1.Runner/Enqueue"), ("code", "OK")]
        ) >= 3.0,
        "{runner}"
    );
    // Delivery: outcomes by destination kind, and the last stage.
    assert!(
        sample(
            &delivery,
            "ferroclaw_deliveries_total",
            &[("outcome", "delivered"), ("destination", "api")]
        ) >= 3.0,
        "{delivery}"
    );
    assert!(
        sample(
            &delivery,
            "ferroclaw_pipeline_stage_seconds_count",
            &[("stage", "reply_written_to_delivered")]
        ) >= 3.0,
        "{delivery}"
    );

    let mut checked = 0;
    for (service, text) in [
        ("gateway", &after),
        ("runner", &runner),
        ("delivery", &delivery),
        ("scheduler", &scheduler),
    ] {
        if promtool_check(service, text)?.is_some() {
            checked += 1;
        }
    }
    if checked > 0 {
        eprintln!("promtool check metrics passed for {checked} services");
    }

    // Only GET /metrics is served on a metrics address.
    let addr = cluster.runner.metrics.context("runner metrics")?;
    let other = reqwest::get(format!("http://{addr}/other")).await?;
    assert_eq!(other.status(), 404);
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_records_how_late_runs_fire() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(800)).to_rfc3339();
    let action = json!({"action": "schedule_task", "params": {"task_id": "t-lag", "name": "lag", "prompt": "tick", "at": at}});
    let (status, body) = cluster
        .post_message("lagged", &format!("!action {action}"), None)
        .await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines("lagged", &["echo: task lag: tick".into()], WAIT)
        .await?;
    // The scheduler counts a run once it has recorded it, after the runner took the
    // message: the reply may arrive first.
    let scheduler = scrape_until(cluster.scheduler.metrics, |text| {
        sample(
            text,
            "ferroclaw_scheduler_runs_total",
            &[("outcome", "enqueued")],
        ) > 0.0
    })
    .await?;
    assert_eq!(
        sample(
            &scheduler,
            "ferroclaw_scheduler_runs_total",
            &[("outcome", "enqueued")]
        ),
        1.0,
        "{scheduler}"
    );
    assert_eq!(
        sample(&scheduler, "ferroclaw_scheduler_lag_seconds_count", &[]),
        1.0,
        "{scheduler}"
    );
    promtool_check("scheduler", &scheduler)?;
    cluster.stop().await
}
