//! The tasks page: every scheduled task with its schedule in words, next and last run and
//! state; pause, resume, cancel and run-now buttons; and each task's run history.

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_proto::v1::{ListRunsRequest, ListTasksRequest, Task};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{self, csrf_field, respond};
use super::{Console, ConsoleError, Operator, from_script, schedule_words, time, urls};

/// Runs shown on a task's history page.
const RUNS_SHOWN: u32 = 200;

/// `GET /ui/tasks`.
pub async fn page(State(state): Console, operator: Operator) -> Result<Response, ConsoleError> {
    let tasks = SchedulerClient::new(state.app.scheduler.clone())
        .list_tasks(ListTasksRequest {
            session_id: String::new(),
        })
        .await?
        .into_inner()
        .tasks;
    let now = ferroclaw_content::now_ms();
    let body = html! {
        h1 { "Tasks" }
        div.scroll {
            table.tasks.stack {
                thead { tr {
                    th { "Task" } th { "Agent" } th { "Schedule" } th { "State" }
                    th { "Next run" } th { "Last run" } th { "Actions" }
                } }
                tbody {
                    @for task in &tasks { (row(task, &operator, now)) }
                    @if tasks.is_empty() { tr { td colspan="7" { "No tasks." } } }
                }
            }
        }
    };
    Ok(respond(layout::page(
        "Tasks",
        "/ui/tasks",
        Some(&operator),
        body,
    )))
}

fn row(task: &Task, operator: &Operator, now: i64) -> Markup {
    let schedule = task.schedule.clone().unwrap_or_default();
    let id = urls::encode(&task.id);
    html! {
        tr data-task=(task.id) {
            td data-label="Task" { strong { (task.name) } br; code { (task.id) } }
            td data-label="Agent" { (task.agent) }
            td data-label="Schedule" { (schedule_words::describe(&schedule)) }
            td data-label="State" { span class={ "state task-" (state_class(&task.state)) } { (task.state) } }
            td data-label="Next run" title=(time::utc(task.next_run_ms)) { @if task.next_run_ms > 0 { (time::ago(task.next_run_ms, now)) } @else { "—" } }
            td data-label="Last run" title=(time::utc(task.last_run_ms)) { @if task.last_run_ms > 0 { (time::ago(task.last_run_ms, now)) } @else { "never" } }
            td data-label="Actions" { div.actions {
                @for (action, label) in actions(&task.state) {
                    form method="post" action=(format!("/ui/tasks/{id}/{action}")) {
                        (csrf_field(operator))
                        button type="submit" data-action=(action) { (label) }
                    }
                }
                a href=(format!("/ui/tasks/{id}/runs")) { "runs" }
            } }
        }
    }
}

/// What an operator can do to a task in `state`.
fn actions(state: &str) -> Vec<(&'static str, &'static str)> {
    match state {
        "active" => vec![("pause", "Pause"), ("run", "Run now"), ("cancel", "Cancel")],
        "paused" => vec![
            ("resume", "Resume"),
            ("run", "Run now"),
            ("cancel", "Cancel"),
        ],
        _ => Vec::new(),
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "active" => "active",
        "paused" => "paused",
        "cancelled" => "cancelled",
        "completed" => "completed",
        _ => "other",
    }
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/tasks/{id}/{action}`: as `POST /v1/tasks/{id}/{action}`, then back to the list.
pub async fn action(
    State(state): Console,
    operator: Operator,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, ConsoleError> {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    operator.check_csrf(&state.keys, &csrf)?;
    let task = crate::tasks_api::apply_action(&state.app, id, &action).await?;
    if from_script(&headers) {
        return Ok(task.state.into_response());
    }
    Ok(Redirect::to("/ui/tasks").into_response())
}

/// `GET /ui/tasks/{id}/runs`: the task's runs, newest first, with their outcomes.
pub async fn runs(
    State(state): Console,
    operator: Operator,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let runs = SchedulerClient::new(state.app.scheduler.clone())
        .list_runs(ListRunsRequest {
            task_id: id.clone(),
            limit: RUNS_SHOWN,
        })
        .await?
        .into_inner()
        .runs;
    let body = html! {
        h1 { "Runs of " code { (id) } }
        p { a href="/ui/tasks" { "← all tasks" } }
        div.scroll {
            table.runs {
                thead { tr { th { "Scheduled" } th { "Fired" } th { "Outcome" } th { "Detail" } } }
                tbody {
                    @for run in &runs {
                        tr {
                            td { (time::utc(run.scheduled_at_ms)) }
                            td { (time::utc(run.fired_at_ms)) }
                            td { span class={ "outcome outcome-" (outcome_class(&run.outcome)) } { (run.outcome) } }
                            td { (run.detail) }
                        }
                    }
                    @if runs.is_empty() { tr { td colspan="4" { "No runs yet." } } }
                }
            }
        }
    };
    Ok(respond(layout::page(
        "Task runs",
        "/ui/tasks",
        Some(&operator),
        body,
    )))
}

fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "enqueued" => "ok",
        "skipped" => "skipped",
        "failed" => "failed",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_follow_the_state() {
        let words = |s| actions(s).iter().map(|(a, _)| *a).collect::<Vec<_>>();
        assert_eq!(words("active"), ["pause", "run", "cancel"]);
        assert_eq!(words("paused"), ["resume", "run", "cancel"]);
        assert!(words("cancelled").is_empty() && words("completed").is_empty());
    }
}
