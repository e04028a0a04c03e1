//! The `Scheduler` gRPC service: create and manage tasks.

use std::sync::Arc;

use ferroclaw_content::Destination;
use ferroclaw_proto::v1::scheduler_server::Scheduler;
use ferroclaw_proto::v1::{
    CreateTaskRequest, ListRunsRequest, ListRunsResponse, ListTasksRequest, ListTasksResponse, Run,
    Task, TaskRef, UpdateTaskRequest,
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::error::{Result, SchedulerError};
use crate::firing::{Clock, Firer};
use crate::schedule::Schedule;
use crate::store::{RunRecord, TaskRow, TaskStore};
use crate::sync::Syncer;

const MAX_PROMPT: usize = 20_000;
const MAX_NAME: usize = 200;

pub struct SchedulerService {
    pub(crate) store: TaskStore,
    pub(crate) firer: Firer,
    pub(crate) syncer: Syncer,
    /// Tells the firing loop that the earliest next run may have changed.
    pub(crate) changed: Arc<Notify>,
    pub(crate) clock: Arc<dyn Clock>,
}

fn invalid(message: impl Into<String>) -> SchedulerError {
    SchedulerError::InvalidArgument(message.into())
}

fn check_catch_up(value: &str) -> Result<String> {
    match value {
        "" | "catch_up" => Ok("catch_up".into()),
        "skip" => Ok("skip".into()),
        other => Err(invalid(format!(
            "catch_up must be catch_up or skip, not {other:?}"
        ))),
    }
}

fn check_text(what: &str, value: &str, max: usize) -> Result<()> {
    if value.trim().is_empty() {
        return Err(invalid(format!("{what} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(invalid(format!("{what} is longer than {max} characters")));
    }
    Ok(())
}

/// The first run of `schedule` from `now`; a one-off moment already past is refused.
fn first_run(schedule: &Schedule, now: i64) -> Result<i64> {
    let first = schedule
        .first(now)
        .ok_or_else(|| invalid("the schedule has no future run"))?;
    if first < now - crate::firing::GRACE_MS {
        return Err(invalid("the moment to run at is in the past"));
    }
    Ok(first)
}

impl SchedulerService {
    /// The task, when `session_id` (the caller; empty = operator) may act on it.
    async fn owned(&self, task_id: &str, session_id: &str) -> Result<TaskRow> {
        let task = self
            .store
            .get(task_id)
            .await?
            .ok_or_else(|| SchedulerError::NotFound(format!("no task {task_id:?}")))?;
        if !session_id.is_empty() && task.session_id != session_id {
            return Err(SchedulerError::PermissionDenied(format!(
                "task {task_id:?} belongs to another session"
            )));
        }
        Ok(task)
    }

    async fn save(&self, task: &TaskRow) -> Result<Task> {
        self.store.update(task).await?;
        self.syncer.mark(&task.session_id);
        self.changed.notify_one();
        Ok(task.to_proto())
    }

    async fn create(&self, req: CreateTaskRequest) -> Result<Task> {
        if req.session_id.is_empty() || req.agent.is_empty() {
            return Err(invalid("session_id and agent are required"));
        }
        check_text("prompt", &req.prompt, MAX_PROMPT)?;
        let name = if req.name.trim().is_empty() {
            req.prompt.chars().take(60).collect()
        } else {
            check_text("name", &req.name, MAX_NAME)?;
            req.name.clone()
        };
        let catch_up = check_catch_up(&req.catch_up)?;
        serde_json::from_str::<Destination>(&req.reply_to_json)
            .map_err(|e| invalid(format!("reply_to_json is not a destination: {e}")))?;
        let proto = req
            .schedule
            .as_ref()
            .ok_or_else(|| invalid("schedule is required"))?;
        let schedule = Schedule::parse(proto)?;
        let now = self.clock.now_ms();
        let next_run = first_run(&schedule, now)?;
        let id = if req.task_id.is_empty() {
            ferroclaw_common::ids::new_id("tsk")
        } else if ferroclaw_common::ids::is_safe_name(&req.task_id) {
            req.task_id.clone()
        } else {
            return Err(invalid("task_id must be letters, digits, '-', '_' or '.'"));
        };
        let task = TaskRow {
            id: id.clone(),
            series_id: ferroclaw_common::ids::new_id("ser"),
            session_id: req.session_id.clone(),
            agent: req.agent.clone(),
            name,
            prompt: req.prompt.clone(),
            schedule: schedule.to_proto(),
            catch_up,
            reply_to: req.reply_to_json.clone(),
            state: "active".into(),
            next_run: Some(next_run),
            last_run: None,
            created_at: now,
            updated_at: now,
        };
        if !self.store.insert(&task).await? {
            // Idempotent for the same session (a retried action); taken otherwise.
            let existing = self
                .owned(&id, &req.session_id)
                .await
                .map_err(|e| match e {
                    SchedulerError::PermissionDenied(_) => {
                        SchedulerError::AlreadyExists(format!("task id {id:?} is taken"))
                    }
                    other => other,
                })?;
            return Ok(existing.to_proto());
        }
        tracing::info!(task = %id, session = %task.session_id, next_run, "task created");
        self.syncer.mark(&task.session_id);
        self.changed.notify_one();
        Ok(task.to_proto())
    }

    async fn update(&self, req: UpdateTaskRequest) -> Result<Task> {
        let mut task = self.owned(&req.task_id, &req.session_id).await?;
        if matches!(task.state.as_str(), "cancelled" | "completed") {
            return Err(SchedulerError::FailedPrecondition(format!(
                "task {:?} is {} and cannot change",
                task.id, task.state
            )));
        }
        if let Some(name) = &req.name {
            check_text("name", name, MAX_NAME)?;
            task.name = name.clone();
        }
        if let Some(prompt) = &req.prompt {
            check_text("prompt", prompt, MAX_PROMPT)?;
            task.prompt = prompt.clone();
        }
        if let Some(catch_up) = &req.catch_up {
            task.catch_up = check_catch_up(catch_up)?;
        }
        let now = self.clock.now_ms();
        if let Some(proto) = &req.schedule {
            let schedule = Schedule::parse(proto)?;
            let next_run = first_run(&schedule, now)?;
            task.schedule = schedule.to_proto();
            // A new schedule is a new series: its runs are deduplicated on their own.
            task.series_id = ferroclaw_common::ids::new_id("ser");
            if task.state == "active" {
                task.next_run = Some(next_run);
            }
        }
        task.updated_at = now;
        self.save(&task).await
    }

    async fn set_state(&self, r: TaskRef, target: &str) -> Result<Task> {
        let mut task = self.owned(&r.task_id, &r.session_id).await?;
        let now = self.clock.now_ms();
        match (task.state.as_str(), target) {
            (from, _) if from == target => return Ok(task.to_proto()),
            ("cancelled" | "completed", _) => {
                return Err(SchedulerError::FailedPrecondition(format!(
                    "task {:?} is {} and cannot be {target}",
                    task.id, task.state
                )));
            }
            (_, "active") => {
                // Runs that fell in the pause are not caught up: the series goes on from now.
                let schedule = Schedule::parse(&task.schedule)?;
                task.next_run = match &schedule {
                    Schedule::Once { .. } => task.next_run,
                    _ => schedule.next_after(now - 1).or(task.next_run),
                };
            }
            (_, "cancelled") => task.next_run = None,
            _ => {}
        }
        task.state = target.into();
        task.updated_at = now;
        tracing::info!(task = %task.id, state = target, "task state changed");
        self.save(&task).await
    }

    async fn run_now(&self, r: TaskRef) -> Result<Task> {
        let task = self.owned(&r.task_id, &r.session_id).await?;
        if task.state == "cancelled" {
            return Err(SchedulerError::FailedPrecondition(format!(
                "task {:?} is cancelled",
                task.id
            )));
        }
        let now = self.clock.now_ms();
        let key = format!("task:{}:manual:{now}", task.series_id);
        let message_id = self.firer.enqueue_run(&task, &key).await?;
        let run = RunRecord {
            scheduled_at: now,
            fired_at: now,
            outcome: "enqueued".into(),
            detail: Some("run now".into()),
            message_id: Some(message_id),
        };
        self.store.add_run(&task, &run).await?;
        Ok(task.to_proto())
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    async fn create_task(
        &self,
        request: Request<CreateTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn update_task(
        &self,
        request: Request<UpdateTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        Ok(Response::new(self.update(request.into_inner()).await?))
    }

    async fn pause_task(&self, request: Request<TaskRef>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            self.set_state(request.into_inner(), "paused").await?,
        ))
    }

    async fn resume_task(&self, request: Request<TaskRef>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            self.set_state(request.into_inner(), "active").await?,
        ))
    }

    async fn cancel_task(&self, request: Request<TaskRef>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            self.set_state(request.into_inner(), "cancelled").await?,
        ))
    }

    async fn run_now(&self, request: Request<TaskRef>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            SchedulerService::run_now(self, request.into_inner()).await?,
        ))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let session = request.into_inner().session_id;
        let tasks = self
            .store
            .list((!session.is_empty()).then_some(session.as_str()))
            .await?;
        Ok(Response::new(ListTasksResponse {
            tasks: tasks.iter().map(TaskRow::to_proto).collect(),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let req = request.into_inner();
        self.owned(&req.task_id, "").await?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(1000),
        };
        let runs = self.store.runs(&req.task_id, limit).await?;
        Ok(Response::new(ListRunsResponse {
            runs: runs
                .into_iter()
                .map(|(series_id, r)| Run {
                    task_id: req.task_id.clone(),
                    series_id,
                    scheduled_at_ms: r.scheduled_at,
                    fired_at_ms: r.fired_at,
                    outcome: r.outcome,
                    detail: r.detail.unwrap_or_default(),
                    message_id: r.message_id.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
