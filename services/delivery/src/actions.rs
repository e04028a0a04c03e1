//! Agent actions (outbound `action` rows) carried out for the agent: task management goes
//! to the scheduler, always on behalf of the session that wrote the row, so an agent can
//! only touch its own tasks.

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_content::ActionOut;
use ferroclaw_proto::v1::scheduler_client::SchedulerClient;
use ferroclaw_proto::v1::{
    CreateTaskRequest, OutboundMessage, Schedule, TaskRef, UpdateTaskRequest,
};
use serde::Deserialize;

/// Why an action did not happen.
#[derive(Debug)]
pub enum ActionError {
    /// The action is wrong and will stay wrong: the agent is told why.
    Rejected(String),
    /// The scheduler could not be reached: try again.
    Unavailable(String),
}

/// The parameters of the task actions.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TaskParams {
    task_id: Option<String>,
    name: Option<String>,
    prompt: Option<String>,
    cron: Option<String>,
    interval_secs: Option<i64>,
    at: Option<String>,
    timezone: Option<String>,
    catch_up: Option<String>,
}

impl TaskParams {
    /// The schedule the params name, if any; more than one kind is an error.
    fn schedule(&self) -> Result<Option<Schedule>, ActionError> {
        let timezone = self.timezone.clone().unwrap_or_default();
        let schedule = match (&self.cron, self.interval_secs, &self.at) {
            (None, None, None) => return Ok(None),
            (Some(cron), None, None) => Schedule {
                kind: "cron".into(),
                cron: cron.clone(),
                timezone,
                ..Default::default()
            },
            (None, Some(secs), None) => Schedule {
                kind: "interval".into(),
                interval_secs: secs,
                timezone,
                ..Default::default()
            },
            (None, None, Some(at)) => Schedule {
                kind: "once".into(),
                at: at.clone(),
                timezone,
                ..Default::default()
            },
            _ => {
                return Err(ActionError::Rejected(
                    "give exactly one of cron, interval_secs or at".into(),
                ));
            }
        };
        Ok(Some(schedule))
    }

    fn task_id(&self) -> Result<String, ActionError> {
        self.task_id
            .clone()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| ActionError::Rejected("task_id is required".into()))
    }
}

/// A task id derived from the row, so a retried `schedule_task` creates the same task.
fn derived_task_id(session_id: &str, seq: i64) -> String {
    let hash = ferroclaw_common::ids::stable_hash(session_id.bytes().chain(seq.to_le_bytes()));
    format!("tsk_{hash:016x}")
}

fn from_status(status: tonic::Status) -> ActionError {
    use tonic::Code::*;
    match status.code() {
        InvalidArgument | NotFound | PermissionDenied | FailedPrecondition | AlreadyExists => {
            ActionError::Rejected(status.message().to_string())
        }
        _ => ActionError::Unavailable(status.to_string()),
    }
}

/// Carries out `action` for the session of `message`; returns what it acted on (task id).
pub async fn perform(
    scheduler: &mut SchedulerClient<GrpcChannel>,
    message: &OutboundMessage,
    action: &ActionOut,
) -> Result<String, ActionError> {
    let params: TaskParams = serde_json::from_value(action.params.clone())
        .map_err(|e| ActionError::Rejected(format!("invalid params: {e}")))?;
    let task_ref = |params: &TaskParams| -> Result<TaskRef, ActionError> {
        Ok(TaskRef {
            task_id: params.task_id()?,
            session_id: message.session_id.clone(),
        })
    };
    let task = match action.action.as_str() {
        "schedule_task" => {
            let schedule = params.schedule()?.ok_or_else(|| {
                ActionError::Rejected("a schedule is required: cron, interval_secs or at".into())
            })?;
            let request = CreateTaskRequest {
                session_id: message.session_id.clone(),
                agent: message.agent.clone(),
                task_id: params
                    .task_id
                    .clone()
                    .unwrap_or_else(|| derived_task_id(&message.session_id, message.seq)),
                name: params.name.clone().unwrap_or_default(),
                prompt: params.prompt.clone().unwrap_or_default(),
                schedule: Some(schedule),
                catch_up: params.catch_up.clone().unwrap_or_default(),
                reply_to_json: message.destination_json.clone(),
            };
            scheduler.create_task(request).await
        }
        "update_task" => {
            let request = UpdateTaskRequest {
                task_id: params.task_id()?,
                session_id: message.session_id.clone(),
                name: params.name.clone(),
                prompt: params.prompt.clone(),
                schedule: params.schedule()?,
                catch_up: params.catch_up.clone(),
            };
            scheduler.update_task(request).await
        }
        "pause_task" => scheduler.pause_task(task_ref(&params)?).await,
        "resume_task" => scheduler.resume_task(task_ref(&params)?).await,
        "cancel_task" => scheduler.cancel_task(task_ref(&params)?).await,
        other => {
            return Err(ActionError::Rejected(format!(
                "unknown action {other:?} (known: schedule_task, update_task, pause_task, resume_task, cancel_task)"
            )));
        }
    };
    task.map(|t| t.into_inner().id).map_err(from_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derived_task_id("ses_a", 3), derived_task_id("ses_a", 3));
        assert_ne!(derived_task_id("ses_a", 3), derived_task_id("ses_a", 5));
        assert_ne!(derived_task_id("ses_a", 3), derived_task_id("ses_b", 3));
        assert!(derived_task_id("x", 1).starts_with("tsk_"));
    }

    #[test]
    fn params_name_one_schedule() {
        let p: TaskParams =
            serde_json::from_value(serde_json::json!({"cron": "0 9 * * *", "at": "x"})).unwrap();
        assert!(matches!(p.schedule(), Err(ActionError::Rejected(_))));
        let p: TaskParams =
            serde_json::from_value(serde_json::json!({"interval_secs": 5})).unwrap();
        assert_eq!(p.schedule().unwrap().unwrap().kind, "interval");
        assert!(serde_json::from_value::<TaskParams>(serde_json::json!({"cronn": "x"})).is_err());
    }
}
