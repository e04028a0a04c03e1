//! REST for scheduled tasks: list them, see their runs, pause, resume, cancel, run now.

use axum::Json;
use axum::extract::State;
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_proto::v1::{ListRunsRequest, ListTasksRequest, Task, TaskRef};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, Result};
use crate::http::AppState;

/// A scheduled task.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"id": "t-standup", "series_id": "s-1", "session_id": "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10",
    "agent": "main", "name": "standup", "prompt": "Summarise yesterday's merges",
    "schedule": {"kind": "cron", "cron": "0 9 * * 1-5", "interval_secs": null, "at": null, "timezone": "Europe/Berlin"},
    "catch_up": "catch_up", "state": "active", "next_run": 1767258000000i64, "last_run": null,
    "created_at": 1767225600000i64, "updated_at": 1767225600000i64}))]
pub struct TaskBody {
    id: String,
    /// Changes when the schedule changes; runs are deduplicated per series and time.
    series_id: String,
    session_id: String,
    agent: String,
    name: String,
    prompt: String,
    schedule: ScheduleBody,
    /// Runs missed while the scheduler was down: `catch_up` (one run) or `skip`.
    catch_up: String,
    /// `active`, `paused`, `cancelled` or `completed`.
    state: String,
    /// Unix milliseconds of the next run, if any.
    next_run: Option<i64>,
    /// Unix milliseconds of the last run's scheduled time, if it ran.
    last_run: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ScheduleBody {
    /// `cron`, `interval` or `once`.
    kind: String,
    /// Five fields (minute hour day-of-month month day-of-week), read in `timezone`.
    cron: Option<String>,
    /// Seconds between runs.
    interval_secs: Option<i64>,
    /// When a `once` task runs.
    at: Option<String>,
    /// IANA time zone.
    timezone: String,
}

impl From<Task> for TaskBody {
    fn from(t: Task) -> Self {
        let schedule = t.schedule.unwrap_or_default();
        Self {
            id: t.id,
            series_id: t.series_id,
            session_id: t.session_id,
            agent: t.agent,
            name: t.name,
            prompt: t.prompt,
            schedule: ScheduleBody {
                kind: schedule.kind,
                cron: (!schedule.cron.is_empty()).then_some(schedule.cron),
                interval_secs: (schedule.interval_secs > 0).then_some(schedule.interval_secs),
                at: (!schedule.at.is_empty()).then_some(schedule.at),
                timezone: schedule.timezone,
            },
            catch_up: t.catch_up,
            state: t.state,
            next_run: (t.next_run_ms > 0).then_some(t.next_run_ms),
            last_run: (t.last_run_ms > 0).then_some(t.last_run_ms),
            created_at: t.created_at_ms,
            updated_at: t.updated_at_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TaskList {
    tasks: Vec<TaskBody>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TasksQuery {
    /// Only this session's tasks (default: every session's).
    #[serde(default)]
    session_id: String,
}

/// Scheduled tasks, of every session or of one.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(TasksQuery),
    responses((status = 200, description = "The tasks", body = TaskList)),
)]
pub(crate) async fn list_tasks(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<TasksQuery>,
) -> Result<Json<TaskList>> {
    let tasks = SchedulerClient::new(state.scheduler.clone())
        .list_tasks(ListTasksRequest {
            session_id: query.session_id,
        })
        .await?
        .into_inner()
        .tasks;
    Ok(Json(TaskList {
        tasks: tasks.into_iter().map(Into::into).collect(),
    }))
}

/// One run of a task (or one it skipped or failed to fire).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"series_id": "s-1", "scheduled_at": 1767258000000i64, "fired_at": 1767258000120i64,
    "outcome": "enqueued", "detail": null, "message_id": "0b8e5c1a-7d2f-4e3b-9c6a-5f1d2e3c4b5a"}))]
pub struct RunBody {
    series_id: String,
    /// Unix milliseconds the run was due.
    scheduled_at: i64,
    /// Unix milliseconds it fired.
    fired_at: i64,
    /// `enqueued`, `skipped` or `failed`.
    outcome: String,
    detail: Option<String>,
    /// The message the run queued, if it did.
    message_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RunList {
    runs: Vec<RunBody>,
}

/// A task's runs, newest first.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/runs",
    tag = "tasks",
    params(("id" = String, Path, description = "The task", example = "t-standup")),
    responses(
        (status = 200, description = "The runs", body = RunList),
        (status = 404, description = "No such task", body = ErrorBody),
    ),
)]
pub(crate) async fn list_runs(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunList>> {
    let runs = SchedulerClient::new(state.scheduler.clone())
        .list_runs(ListRunsRequest {
            task_id: id,
            limit: 0,
        })
        .await?
        .into_inner()
        .runs;
    let runs = runs
        .into_iter()
        .map(|r| RunBody {
            series_id: r.series_id,
            scheduled_at: r.scheduled_at_ms,
            fired_at: r.fired_at_ms,
            outcome: r.outcome,
            detail: (!r.detail.is_empty()).then_some(r.detail),
            message_id: (!r.message_id.is_empty()).then_some(r.message_id),
        })
        .collect();
    Ok(Json(RunList { runs }))
}

/// What can be done to a task.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // Documents the path parameter; the handler matches the words.
pub enum TaskAction {
    Pause,
    Resume,
    /// Ends the series for good.
    Cancel,
    /// Fires one run now, outside the schedule.
    Run,
}

/// Pauses, resumes, cancels or runs a task now, as an operator.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/{action}",
    tag = "tasks",
    params(
        ("id" = String, Path, description = "The task", example = "t-standup"),
        ("action" = inline(TaskAction), Path, description = "What to do", example = "pause"),
    ),
    responses(
        (status = 200, description = "The task after the action", body = TaskBody),
        (status = 404, description = "No such task, or no such action", body = ErrorBody),
        (status = 409, description = "The task's state does not allow the action (e.g. resuming a cancelled task)", body = ErrorBody),
    ),
)]
pub(crate) async fn task_action(
    State(state): State<AppState>,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<Json<TaskBody>> {
    let task = apply_action(&state, id, &action).await?;
    Ok(Json(task.into()))
}

/// Pauses, resumes, cancels or runs a task now (the API's and the console's buttons);
/// the task as it is after.
pub(crate) async fn apply_action(state: &AppState, task_id: String, action: &str) -> Result<Task> {
    let mut scheduler = SchedulerClient::new(state.scheduler.clone());
    let task_ref = TaskRef {
        task_id,
        session_id: String::new(),
    };
    let task = match action {
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
    Ok(task.into_inner())
}
