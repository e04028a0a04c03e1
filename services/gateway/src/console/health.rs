//! The health page: the four services' readiness (as `/readyz` computes it), the agents
//! running and queued, and the version.

use axum::extract::State;
use axum::response::Response;
use ferroclaw_common::grpc::is_serving;
use ferroclaw_proto::v1::ListSessionsRequest;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use maud::html;

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
    // Agent counts when the runner answers; the page still renders when it does not.
    let sessions = if runner {
        RunnerClient::new(app.runner.clone())
            .list_sessions(ListSessionsRequest::default())
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
        @if let Some(list) = &sessions {
            h2 { "Agents" }
            ul.facts {
                li { "Sessions: " (list.sessions.len()) }
                li { "Running: " (list.sessions.iter().filter(|s| s.agent_state == "running").count()) }
                li { "Queued: " (list.sessions.iter().filter(|s| s.agent_state == "queued").count()) }
                li { "Agents started since the runner started: " (list.agent_starts_total) }
            }
        }
        p.version { "ferroclaw " (env!("CARGO_PKG_VERSION")) }
        p.note { "The Docker engine's state and the agent cap are not reported to the gateway yet." }
    };
    Ok(respond(layout::page(
        "Health",
        "/ui/health",
        Some(&operator),
        body,
    )))
}
