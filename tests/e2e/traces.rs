//! One OpenTelemetry trace per message: with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a
//! collector on loopback, an API message and a webhook each yield one trace holding spans
//! of the gateway, the runner, the agent and delivery, every span's parent inside the trace
//! (or, for the webhook, the caller's span it continued), and the model call's GenAI
//! attributes set.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_model::{FakeModel, Step};
use ferroclaw_e2e::otlp_receiver::{OtlpReceiver, ReceivedSpan, render_tree};

const KEY: &str = "sk-trace-test";
const WAIT: Duration = Duration::from_secs(60);
const SERVICES: [&str; 4] = [
    "ferroclaw-gateway",
    "ferroclaw-runner",
    "ferroclaw-agent",
    "ferroclaw-delivery",
];

/// Waits until the trace holding a span `find` picks has spans of every service, a finished
/// delivery send, and every parent it names (spans are exported as they end, so an outer
/// span arrives after its children); returns them. After [`WAIT`] it returns what arrived,
/// for the caller's checks to explain.
async fn wait_for_trace(
    receiver: &OtlpReceiver,
    find: impl Fn(&ReceivedSpan) -> bool,
    outside: &[&str],
) -> anyhow::Result<Vec<ReceivedSpan>> {
    let started = Instant::now();
    loop {
        if let Some(root) = receiver.spans().into_iter().find(|s| find(s)) {
            let trace = receiver.trace(&root.trace_id);
            let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
            let sent = trace
                .iter()
                .any(|s| s.service == "ferroclaw-delivery" && s.name.starts_with("send "));
            let complete = SERVICES.iter().all(|s| services.contains(s)) && sent;
            if complete && (parents_inside(&trace, outside).is_ok() || started.elapsed() > WAIT) {
                return Ok(trace);
            }
            if started.elapsed() > WAIT {
                anyhow::bail!(
                    "trace {} has services {services:?}:\n{}",
                    root.trace_id,
                    render_tree(&trace)
                );
            }
        } else if started.elapsed() > WAIT {
            let names: BTreeSet<String> = receiver
                .spans()
                .iter()
                .map(|s| format!("{} {}", s.service, s.name))
                .collect();
            anyhow::bail!("no root span arrived; spans seen: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every span's parent is in the trace, or is one of `outside` (a caller's span).
fn parents_inside(trace: &[ReceivedSpan], outside: &[&str]) -> Result<(), String> {
    let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let strays: Vec<String> = trace
        .iter()
        .filter(|s| {
            !s.parent_span_id.is_empty()
                && !ids.contains(s.parent_span_id.as_str())
                && !outside.contains(&s.parent_span_id.as_str())
        })
        .map(|s| format!("{} [{}] parent {}", s.name, s.service, s.parent_span_id))
        .collect();
    let roots = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty() || outside.contains(&s.parent_span_id.as_str()))
        .count();
    if strays.is_empty() && roots == 1 {
        Ok(())
    } else {
        Err(format!(
            "{roots} roots, spans with parents outside the trace: {strays:?}\n{}",
            render_tree(trace)
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_and_a_webhook_each_make_one_trace_through_every_process() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Text("traced hello".into()),
        Step::Text("traced hook".into()),
    ]);
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[[agents]]\nname = \"main\"\nprovider = \"openai\"\nmodel = \"test-model\"\napi_base_url = \"{}\"\n",
            fake.url()
        ),
    )?;
    let cluster = Cluster::start(
        &dir.path().join("data"),
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("OPENAI_API_KEY", KEY.to_string()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            // Export within a moment instead of the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    )
    .await?;

    // An API message: the gateway's request span is the root.
    let (status, body) = cluster.post_message("traced", "hello", None).await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines("traced", &["traced hello".into()], WAIT)
        .await?;
    let trace = wait_for_trace(
        &receiver,
        |s| s.service == "ferroclaw-gateway" && s.name == "POST /v1/messages",
        &[],
    )
    .await?;
    parents_inside(&trace, &[]).map_err(|e| {
        let all: Vec<String> = receiver
            .spans()
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} {} <- {}",
                    s.service, s.name, s.trace_id, s.span_id, s.parent_span_id
                )
            })
            .collect();
        anyhow::anyhow!("{e}\nall spans:\n{}", all.join("\n"))
    })?;
    let model = trace
        .iter()
        .find(|s| s.service == "ferroclaw-agent" && s.name == "chat test-model")
        .ok_or_else(|| anyhow::anyhow!("no model span:\n{}", render_tree(&trace)))?;
    assert_eq!(model.attributes["gen_ai.request.model"], "test-model");
    assert_eq!(model.attributes["gen_ai.operation.name"], "chat");
    let input: u64 = model.attributes["gen_ai.usage.input_tokens"].parse()?;
    let output: u64 = model.attributes["gen_ai.usage.output_tokens"].parse()?;
    assert!(input > 0 && output > 0, "{:?}", model.attributes);
    assert!(
        trace
            .iter()
            .any(|s| s.service == "ferroclaw-agent" && s.name == "agent.batch"),
        "{}",
        render_tree(&trace)
    );
    println!("API message trace:\n{}", render_tree(&trace));
    // The same tokens are counted in the runner's metrics, by agent.
    let addr = cluster
        .runner
        .metrics
        .ok_or_else(|| anyhow::anyhow!("the runner named no metrics address"))?;
    let counted = |metrics: &str, direction: &str| {
        metrics.lines().any(|line| {
            line.starts_with("ferroclaw_model_tokens_total{")
                && line.contains("agent=\"main\"")
                && line.contains(&format!("direction=\"{direction}\""))
                && line
                    .rsplit_once(' ')
                    .and_then(|(_, v)| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
        })
    };
    // Usage is recorded as the model's answer ends, a moment after the reply.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .text()
            .await?;
        if counted(&metrics, "input") && counted(&metrics, "output") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        counted(&metrics, "input") && counted(&metrics, "output"),
        "{metrics}"
    );

    // A webhook carrying the caller's traceparent continues the caller's trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("{}/v1/hooks/default", cluster.api()))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&serde_json::json!({"event": "traced"}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let hook = wait_for_trace(&receiver, |s| s.trace_id == caller_trace, &[caller_span]).await?;
    parents_inside(&hook, &[caller_span]).map_err(anyhow::Error::msg)?;
    assert!(
        hook.iter()
            .any(|s| s.parent_span_id == caller_span && s.service == "ferroclaw-gateway"),
        "{}",
        render_tree(&hook)
    );
    cluster.stop().await
}
