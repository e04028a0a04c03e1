//! REST for scheduled tasks: list them, see their runs, pause, resume, cancel, run now.

use axum::Json;
use axum::extract::{Path, Query, State};
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_proto::v1::{ListRunsRequest, ListTasksRequest, Task, TaskRef};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, Result};
use crate::http::AppState;

pub fn task_json(t: Task) -> Value {
    let schedule = t.schedule.unwrap_or_default();
    json!({
        "id": t.id,
        "series_id": t.series_id,
        "session_id": t.session_id,
        "agent": t.agent,
        "name": t.name,
        "prompt": t.prompt,
        "schedule": {
            "kind": schedule.kind,
            "cron": (!schedule.cron.is_empty()).then_some(schedule.cron),
            "interval_secs": (schedule.interval_secs > 0).then_some(schedule.interval_secs),
            "at": (!schedule.at.is_empty()).then_some(schedule.at),
            "timezone": schedule.timezone,
        },
        "catch_up": t.catch_up,
        "state": t.state,
        "next_run": (t.next_run_ms > 0).then_some(t.next_run_ms),
        "last_run": (t.last_run_ms > 0).then_some(t.last_run_ms),
        "created_at": t.created_at_ms,
        "updated_at": t.updated_at_ms,
    })
}

#[derive(Deserialize)]
pub struct TasksQuery {
    #[serde(default)]
    session_id: String,
}

pub async fn list_tasks(
    State(state): State<AppState>,
    query: std::result::Result<Query<TasksQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let tasks = SchedulerClient::new(state.scheduler.clone())
        .list_tasks(ListTasksRequest {
            session_id: query.session_id,
        })
        .await?
        .into_inner()
        .tasks;
    Ok(Json(
        json!({"tasks": tasks.into_iter().map(task_json).collect::<Vec<_>>()}),
    ))
}

pub async fn list_runs(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let runs = SchedulerClient::new(state.scheduler.clone())
        .list_runs(ListRunsRequest {
            task_id: id,
            limit: 0,
        })
        .await?
        .into_inner()
        .runs;
    let runs: Vec<Value> = runs
        .into_iter()
        .map(|r| {
            json!({
                "series_id": r.series_id,
                "scheduled_at": r.scheduled_at_ms,
                "fired_at": r.fired_at_ms,
                "outcome": r.outcome,
                "detail": (!r.detail.is_empty()).then_some(r.detail),
                "message_id": (!r.message_id.is_empty()).then_some(r.message_id),
            })
        })
        .collect();
    Ok(Json(json!({"runs": runs})))
}

/// `POST /v1/tasks/{id}/{pause|resume|cancel|run}`, as an operator.
pub async fn task_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let mut scheduler = SchedulerClient::new(state.scheduler.clone());
    let task_ref = TaskRef {
        task_id: id,
        session_id: String::new(),
    };
    let task = match action.as_str() {
        "pause" => scheduler.pause_task(task_ref).await?,
        "resume" => scheduler.resume_task(task_ref).await?,
        "cancel" => scheduler.cancel_task(task_ref).await?,
        "run" => scheduler.run_now(task_ref).await?,
        other => {
            return Err(ApiError::NotFound(format!(
                "no task action {other:?} (pause, resume, cancel, run)"
            )));
        }
    };
    Ok(Json(task_json(task.into_inner())))
}
