//! Firing: sleep until the earliest next run, enqueue each due run into its session with the
//! idempotency key "series id + scheduled time", then record it. A crash between the two fires
//! the run again after the restart under the same key, and the runner answers "duplicate": a
//! run is never delivered twice. The same holds when two schedulers fire one run around a
//! handover (see `leadership`): only the active one fires, and the first record stands.

use std::sync::Arc;
use std::time::Duration;

use ferroclaw_common::grpc_auth::GrpcChannel;
use ferroclaw_content::InboundContent;
use ferroclaw_content::TaskIn;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{EnqueueRequest, Origin};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, SchedulerError};
use crate::leadership::Leadership;
use crate::schedule::Schedule;
use crate::store::{RunRecord, TaskRow, TaskStore};
use crate::sync::Syncer;

/// A run this late is "missed" (the scheduler was down): the task's catch-up policy applies.
pub const GRACE_MS: i64 = 60_000;
/// Longest walk over missed cron runs before jumping to the present.
const MAX_WALK: usize = 100_000;
const BATCH: u32 = 500;
/// Longest sleep between looks at the store. Tasks created or changed through another
/// scheduler's API (a standby serves it too) wake only that one's loop, so the active one
/// looks again at least this often to fire them on time: two index lookups a second.
const PEER_CHANGES: Duration = Duration::from_secs(1);

/// The time source; tests drive firing with explicit times instead.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        ferroclaw_content::now_ms()
    }
}

/// What becomes of one due task at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The scheduled time of the run to enqueue, if any.
    pub fire: Option<i64>,
    /// Runs given up under the `skip` policy: (latest scheduled time, how many).
    pub skipped: Option<(i64, usize)>,
    /// The run after this one; `None` ends the series.
    pub next_run: Option<i64>,
}

/// Decides the run(s) of a task due at `now`: one run when on time; after downtime over
/// several runs, one catch-up run (the latest missed) or none (`skip`), then the normal
/// schedule.
pub fn plan(task: &TaskRow, schedule: &Schedule, now: i64) -> Plan {
    let scheduled = task.next_run.unwrap_or(now);
    let mut latest = scheduled;
    let mut count = 1usize;
    let mut next = match schedule {
        Schedule::Interval { secs } => {
            // Jump straight over missed intervals.
            let step = secs * 1000;
            let k = (now - scheduled).max(0) / step;
            latest = scheduled + k * step;
            count += k as usize;
            Some(latest + step)
        }
        _ => schedule.next_after(scheduled),
    };
    while let Some(n) = next.filter(|n| *n <= now) {
        if count >= MAX_WALK {
            next = schedule.next_after(now);
            break;
        }
        latest = n;
        count += 1;
        next = schedule.next_after(n);
    }
    if now - latest <= GRACE_MS || task.catch_up != "skip" {
        Plan {
            fire: Some(latest),
            skipped: None,
            next_run: next,
        }
    } else {
        Plan {
            fire: None,
            skipped: Some((latest, count)),
            next_run: next,
        }
    }
}

#[derive(Clone)]
pub struct Firer {
    store: TaskStore,
    runner: RunnerClient<GrpcChannel>,
    syncer: Syncer,
    clock: Arc<dyn Clock>,
}

impl Firer {
    pub fn new(
        store: TaskStore,
        runner: GrpcChannel,
        syncer: Syncer,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            runner: RunnerClient::new(runner),
            syncer,
            clock,
        }
    }

    /// Enqueues the run of `task` scheduled at `scheduled` into its session; the key makes
    /// a repeat of the same run a no-op. Returns the message id.
    pub async fn enqueue_run(&self, task: &TaskRow, key: &str) -> Result<String, tonic::Status> {
        let content = InboundContent::Task(TaskIn {
            task_id: task.id.clone(),
            name: task.name.clone(),
            prompt: task.prompt.clone(),
        });
        let request = EnqueueRequest {
            session_id: task.session_id.clone(),
            agent: task.agent.clone(),
            conversation_key: String::new(),
            kind: content.kind().into(),
            content_json: content.to_json(),
            origin: Some(Origin {
                channel: "task".into(),
                conversation: task.id.clone(),
                sender: "scheduler".into(),
                reply_to_json: task.reply_to.clone(),
            }),
            idempotency_key: key.to_string(),
            process_after_ms: 0,
            trace: String::new(),
        };
        let response = self.runner.clone().enqueue(request).await?.into_inner();
        if response.duplicate {
            tracing::info!(task = %task.id, key, "run was enqueued before (restart); not repeated");
        }
        Ok(response.message_id)
    }

    /// Fires every task due at `now`; returns how many runs were handled. A runner that
    /// cannot be reached stops the round with an error, recording nothing for that task.
    pub async fn fire_due(&self, now: i64) -> Result<usize> {
        let mut handled = 0;
        loop {
            let due = self.store.due(now, BATCH).await?;
            if due.is_empty() {
                return Ok(handled);
            }
            for task in due {
                self.fire_task(task, now).await?;
                handled += 1;
            }
        }
    }

    /// Fires `task` as read from [`TaskStore::due`] at `now`. A second scheduler that read
    /// the same row fires the same run under the same key (the runner answers "duplicate"),
    /// and its record gives way to the first.
    pub async fn fire_task(&self, mut task: TaskRow, now: i64) -> Result<()> {
        let schedule = match Schedule::parse(&task.schedule) {
            Ok(s) => s,
            Err(e) => {
                // Stored schedules were valid when written; a zone database change could
                // still break one. Park the task instead of firing it in a loop.
                tracing::error!(task = %task.id, error = %e, "stored schedule no longer valid; pausing");
                task.state = "paused".into();
                task.updated_at = now;
                self.store.update(&task).await?;
                self.syncer.mark(&task.session_id);
                return Ok(());
            }
        };
        let plan = plan(&task, &schedule, now);
        let due_at = task.next_run.unwrap_or(now);
        let run = match (plan.fire, plan.skipped) {
            (Some(at), _) => {
                let key = run_key(&task, at);
                match self.enqueue_run(&task, &key).await {
                    // When it was enqueued (not when the round began): the firing precision.
                    Ok(message_id) => RunRecord {
                        scheduled_at: at,
                        fired_at: now.max(self.clock.now_ms()),
                        outcome: "enqueued".into(),
                        detail: None,
                        message_id: Some(message_id),
                    },
                    Err(status) if permanent(&status) => RunRecord {
                        scheduled_at: at,
                        fired_at: now,
                        outcome: "failed".into(),
                        detail: Some(status.message().to_string()),
                        message_id: None,
                    },
                    Err(status) => return Err(SchedulerError::Runner(status)),
                }
            }
            (None, Some((at, count))) => RunRecord {
                scheduled_at: at,
                fired_at: now,
                outcome: "skipped".into(),
                detail: Some(format!(
                    "{count} run(s) missed while the scheduler was down"
                )),
                message_id: None,
            },
            (None, None) => return Ok(()),
        };
        task.last_run = Some(run.scheduled_at);
        task.next_run = plan.next_run;
        if task.next_run.is_none() {
            task.state = "completed".into();
        }
        task.updated_at = now;
        if !self.store.record_run(&task, due_at, &run).await? {
            tracing::info!(task = %task.id, scheduled = run.scheduled_at, "run was recorded by another scheduler");
            return Ok(());
        }
        crate::metrics::run(&run.outcome, run.scheduled_at, run.fired_at);
        tracing::info!(task = %task.id, scheduled = run.scheduled_at, lateness_ms = now - run.scheduled_at, outcome = %run.outcome, "task run");
        self.syncer.mark(&task.session_id);
        Ok(())
    }

    /// While this instance is the active scheduler: sleeps until the earliest next run or a
    /// change, fires what is due, repeats. A standby waits here until it takes over.
    pub async fn run(
        self,
        changed: Arc<Notify>,
        leadership: Arc<Leadership>,
        shutdown: CancellationToken,
    ) {
        let clock = self.clock.clone();
        let mut active = leadership.subscribe();
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            // Checked before every round: a lock lost while asleep fires nothing.
            if !leadership.confirm().await {
                tokio::select! {
                    _ = active.wait_for(|active| *active) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            let pause = match self.fire_due(clock.now_ms()).await {
                Ok(_) => {
                    failures = 0;
                    match self.store.earliest_next_run().await {
                        Ok(Some(at)) => Duration::from_millis((at - clock.now_ms()).max(0) as u64),
                        Ok(None) => Duration::MAX,
                        Err(e) => {
                            tracing::warn!(error = %e, "task store unavailable");
                            Duration::from_secs(1)
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let delay = Duration::from_millis((250u64 << failures.min(5)).min(5_000));
                    tracing::warn!(error = %e, ?delay, "firing interrupted; retrying");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause.min(PEER_CHANGES)) => {}
                _ = changed.notified() => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

/// The idempotency key of the run of `task`'s series scheduled at `at`.
pub fn run_key(task: &TaskRow, at: i64) -> String {
    format!("task:{}:{at}", task.series_id)
}

/// Errors that retrying will not fix: the run is recorded as failed and the series goes on.
/// A session that takes no work (over its disk quota, tampered with) is one of them.
fn permanent(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::NotFound
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclaw_proto::v1;

    fn task(
        kind: &str,
        cron: &str,
        secs: i64,
        catch_up: &str,
        next_run: i64,
    ) -> (TaskRow, Schedule) {
        let schedule = v1::Schedule {
            kind: kind.into(),
            cron: cron.into(),
            interval_secs: secs,
            at: "2026-01-01T00:00:00Z".into(),
            timezone: "UTC".into(),
        };
        let row = TaskRow {
            id: "t".into(),
            series_id: "s".into(),
            session_id: "ses".into(),
            agent: "main".into(),
            name: "n".into(),
            prompt: "p".into(),
            schedule: schedule.clone(),
            catch_up: catch_up.into(),
            reply_to: "{}".into(),
            state: "active".into(),
            next_run: Some(next_run),
            last_run: None,
            created_at: 0,
            updated_at: 0,
        };
        (row, Schedule::parse(&schedule).unwrap())
    }

    const HOUR: i64 = 3_600_000;
    const T0: i64 = 1_767_225_600_000; // 2026-01-01 00:00 UTC

    #[test]
    fn on_time_run_fires_and_schedules_the_next() {
        let (t, s) = task("cron", "0 * * * *", 0, "catch_up", T0);
        let p = plan(&t, &s, T0 + 20);
        assert_eq!(
            p,
            Plan {
                fire: Some(T0),
                skipped: None,
                next_run: Some(T0 + HOUR)
            }
        );
    }

    #[test]
    fn downtime_over_several_runs_gives_one_catch_up_or_none() {
        let (t, s) = task("cron", "0 * * * *", 0, "catch_up", T0);
        let now = T0 + 5 * HOUR + 10 * 60_000;
        let p = plan(&t, &s, now);
        assert_eq!(
            p.fire,
            Some(T0 + 5 * HOUR),
            "one run, for the latest missed time"
        );
        assert_eq!(p.next_run, Some(T0 + 6 * HOUR));
        let (t, s) = task("cron", "0 * * * *", 0, "skip", T0);
        let p = plan(&t, &s, now);
        assert_eq!(p.fire, None);
        assert_eq!(p.skipped, Some((T0 + 5 * HOUR, 6)));
        assert_eq!(p.next_run, Some(T0 + 6 * HOUR));
    }

    #[test]
    fn intervals_jump_over_missed_runs_and_once_completes() {
        let (t, s) = task("interval", "", 3600, "skip", T0);
        let p = plan(&t, &s, T0 + 5 * HOUR + 600_000);
        assert_eq!(p.skipped, Some((T0 + 5 * HOUR, 6)));
        assert_eq!(p.next_run, Some(T0 + 6 * HOUR));
        // The latest interval run is on time: it fires, the older ones are passed over.
        let (t, s) = task("interval", "", 60, "skip", T0);
        let p = plan(&t, &s, T0 + 10 * 60_000 + 5);
        assert_eq!(p.fire, Some(T0 + 10 * 60_000));
        assert_eq!(p.next_run, Some(T0 + 11 * 60_000));
        let (t, s) = task("once", "", 0, "catch_up", T0);
        let p = plan(&t, &s, T0 + 3 * HOUR);
        assert_eq!(
            p,
            Plan {
                fire: Some(T0),
                skipped: None,
                next_run: None
            }
        );
    }
}
