//! The health page: the four services' readiness (as `/readyz` computes it), the agent
//! backend and the Docker engine's state, the agents running and queued against the cap,
//! each instance of a peer given as several, the runners when several serve different
//! sessions, and the version.

use axum::extract::State;
use axum::response::Response;
use ferroclaw_common::grpc::is_serving;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{GetRunnerStatusRequest, RunnerStatus};
use maud::{Markup, html};

use super::layout::{self, respond};
use super::{Console, ConsoleError, Operator};

/// `GET /ui/health`.
pub async fn page(State(state): Console, operator: Operator) -> Result<Response, ConsoleError> {
    let app = &state.app;
    let (runner, delivery, scheduler) = tokio::join!(
        is_serving(app.runner.clone(), ""),
        is_serving(app.delivery.clone(), ""),
        is_serving(app.scheduler.clone(), "")
    );
    // The runner's own state when it answers; the page still renders when it does not.
    let status = if runner {
        RunnerClient::new(app.runner.clone())
            .get_runner_status(GetRunnerStatusRequest::default())
            .await
            .ok()
            .map(|r| r.into_inner())
    } else {
        None
    };
    // The gateway answers this page, so it is up.
    let services = [
        ("gateway", true),
        ("runner", runner),
        ("delivery", delivery),
        ("scheduler", scheduler),
    ];
    let all_ready = services.iter().all(|(_, ok)| *ok);
    // Peers given as several instances (a comma-separated URL), as the probes last saw them.
    let instances = crate::operator_api::instances(app);
    let body = html! {
        h1 { "Health" }
        p.overall { @if all_ready { "All services ready." } @else { "Not ready: a service does not answer." } }
        table.health {
            thead { tr { th { "Service" } th { "Readiness" } } }
            tbody {
                @for (name, ok) in services {
                    tr data-service=(name) {
                        td { (name) }
                        td { span class={ "outcome " @if ok { "outcome-ok" } @else { "outcome-failed" } } {
                            @if ok { "ready" } @else { "unreachable" }
                        } }
                    }
                }
            }
        }
        @if !instances.is_empty() {
            h2 { "Instances" }
            table.health.instances {
                thead { tr { th { "Service" } th { "Instance" } th { "State" } } }
                tbody {
                    @for i in &instances {
                        tr data-instance=(i.url) {
                            td { (i.service) }
                            td { code { (i.url) } }
                            td { span class={ "outcome " @if i.serving { "outcome-ok" } @else { "outcome-failed" } } {
                                @if i.serving { "serving" } @else { "not serving (standby, or down)" }
                            } }
                        }
                    }
                }
            }
        }
        @if let Some(status) = &status {
            (runner_facts(status))
        } @else {
            p.note { "The runner's state is unknown while it does not answer." }
        }
        p.version { "ferroclaw " (env!("CARGO_PKG_VERSION")) }
    };
    Ok(respond(layout::page(
        "Health",
        "/ui/health",
        Some(&operator),
        body,
    )))
}

/// The agent backend, the engine's state and the agents against the cap (of the runner
/// that answered); with several runners, each one and whether it is missing.
fn runner_facts(status: &RunnerStatus) -> Markup {
    let busy = status.running >= status.max_running_agents && status.max_running_agents > 0;
    html! {
        @if !status.runners.is_empty() {
            h2 { "Runners" }
            table.health.runners {
                thead { tr { th { "Runner" } th { "State" } th { "Sessions" } th { "Capacity" } th { "Docker host" } } }
                tbody {
                    @for r in &status.runners {
                        tr data-runner=(r.id) {
                            td { (r.id) @if r.id == status.runner_id { " (answered)" } br; code { (r.url) } }
                            td { span class={ "outcome " @if r.live { "outcome-ok" } @else { "outcome-failed" } } {
                                @if r.live { "live" } @else { "missing: its sessions wait" @if r.shared_storage { " or move" } }
                            } }
                            td { (r.sessions) }
                            td { (r.capacity) }
                            td { (r.docker_host) }
                        }
                    }
                }
            }
        }
        h2 { "Agents" }
        ul.facts {
            li data-fact="backend" { "Backend: " (status.backend) }
            @if status.backend == "docker" {
                li data-fact="engine" { "Docker engine: "
                    span class={ "outcome " @if status.engine_ok { "outcome-ok" } @else { "outcome-failed" } } {
                        @if status.engine_ok { "answers" } @else { "does not answer" }
                    }
                    " " (status.engine)
                }
            }
            li data-fact="running" { "Running: " (status.running) " of " (status.max_running_agents)
                @if busy { " (all slots busy)" } }
            li data-fact="queued" { "Queued for a slot: " (status.queued) }
            li { "Sessions: " (status.sessions) }
            li { "Agents started since the runner started: " (status.agent_starts_total) }
            @if !status.version.is_empty() && status.version != env!("CARGO_PKG_VERSION") {
                li { "Runner version: " (status.version) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_and_the_cap_are_shown() {
        let html = runner_facts(&RunnerStatus {
            backend: "docker".into(),
            engine_ok: false,
            engine: "the Docker engine does not answer: <refused>".into(),
            max_running_agents: 8,
            running: 8,
            queued: 3,
            sessions: 40,
            agent_starts_total: 12,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
        .into_string();
        assert!(html.contains("does not answer"));
        assert!(html.contains("&lt;refused&gt;"));
        assert!(html.contains("Running: 8 of 8 (all slots busy)"));
        assert!(html.contains("Queued for a slot: 3"));
        assert!(!html.contains("Runners"), "one runner: no table of them");
        let several = runner_facts(&RunnerStatus {
            runner_id: "runner-a".into(),
            runners: vec![
                ferroclaw_proto::v1::RunnerInstance {
                    id: "runner-a".into(),
                    url: "http://a:50051".into(),
                    live: true,
                    sessions: 12,
                    ..Default::default()
                },
                ferroclaw_proto::v1::RunnerInstance {
                    id: "<runner-b>".into(),
                    url: "http://b:50051".into(),
                    live: false,
                    sessions: 7,
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .into_string();
        assert!(several.contains("runner-a (answered)"), "{several}");
        assert!(several.contains("missing: its sessions wait"), "{several}");
        assert!(several.contains("&lt;runner-b&gt;"), "escaped: {several}");
        let process = runner_facts(&RunnerStatus {
            backend: "process".into(),
            engine_ok: true,
            max_running_agents: 8,
            ..Default::default()
        })
        .into_string();
        assert!(!process.contains("Docker engine"));
    }
}
