//! The agent's event loop: wait for due work (file notification, deferred due time or a
//! fallback tick), claim the batch, answer it, write replies and completion atomically.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use ferroclaw_mailbox::agent::{Batch, BatchStatus};
use ferroclaw_mailbox::content::ChatOut;
use ferroclaw_mailbox::wake::DirWatch;
use ferroclaw_mailbox::{
    AgentMailbox, Destination, InboundRow, JournalMode, NewOutbound, OutboundContent, SessionPaths,
    now_ms,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::formatter;
use crate::lock;
use crate::provider::{Folders, Prompt, Provider, by_destination};

/// Fallback rescan and parent check, in case a file notification is missed.
const TICK: Duration = Duration::from_secs(1);
/// How often the heartbeat is touched while a batch is being worked on.
const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub session_dir: PathBuf,
    /// The agent's folder: the operator's instructions, read-only.
    pub agent_dir: PathBuf,
    /// The session's own workspace (model providers' working directory and notes).
    pub workspace_dir: PathBuf,
    /// Memory shared by the agent's sessions, when the operator opted in.
    pub memory_dir: Option<PathBuf>,
    /// Shared, read-only memory.
    pub global_dir: PathBuf,
    pub provider: String,
    pub timezone: Tz,
    pub idle_timeout: Duration,
    pub journal_mode: JournalMode,
    /// Attempts at one batch (counting those of agents that died on it) before it is failed.
    pub max_attempts: i64,
    /// Exit when the parent process goes away (local process backend).
    pub exit_with_parent: bool,
    /// Benchmark baseline only: ignore the doorbell and look for due messages this often,
    /// as NanoClaw's agents do (500 ms). `None`: the doorbell wakes the agent.
    pub poll: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Mailbox(#[from] ferroclaw_mailbox::Error),
    #[error(transparent)]
    Provider(#[from] crate::provider::ProviderError),
    #[error("session lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs until idle for `idle_timeout`, shutdown, or the parent going away.
pub async fn run(options: AgentOptions, shutdown: CancellationToken) -> Result<(), AgentError> {
    let paths = SessionPaths::new(&options.session_dir);
    let lock_path = paths.agent_lock();
    let Some(_lock) = lock::acquire(&lock_path, &shutdown)
        .await
        .map_err(|source| AgentError::Lock {
            path: lock_path,
            source,
        })?
    else {
        return Ok(());
    };
    let folders = Folders {
        session_dir: options.session_dir.clone(),
        journal_mode: options.journal_mode,
        agent_dir: options.agent_dir.clone(),
        global_dir: options.global_dir.clone(),
        workspace_dir: options.workspace_dir.clone(),
        memory_dir: options.memory_dir.clone(),
        state_dir: paths.state_dir(),
    };
    let mut provider = Provider::from_name(&options.provider, &folders)?;
    let mut mailbox = AgentMailbox::open(paths.clone(), options.journal_mode).await?;
    let tz = match mailbox.meta("timezone").await? {
        Some(name) => name.parse().unwrap_or(options.timezone),
        None => options.timezone,
    };
    let wake = Arc::new(Notify::new());
    let _watch = match options.poll {
        None => Some(DirWatch::notifying(
            &paths.in_dir(),
            "inbound.bell",
            wake.clone(),
        )?),
        Some(_) => None,
    };
    let parent = std::os::unix::process::parent_id();
    tracing::info!(session = %paths.root().display(), "agent running");

    let mut idle_deadline = Instant::now() + options.idle_timeout;
    let mut tick = tokio::time::interval(options.poll.unwrap_or(TICK));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = mailbox.due(now_ms()).await?;
        if !batch.unreadable.is_empty() {
            fail_unreadable(&mut mailbox, &batch).await?;
        }
        if !batch.rows.is_empty() {
            process(&mut mailbox, &mut provider, &batch.rows, tz, &options).await?;
            idle_deadline = Instant::now() + options.idle_timeout;
            if shutdown.is_cancelled() {
                break;
            }
            continue;
        }
        let due_in = batch
            .next_due
            .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64));
        tokio::select! {
            _ = wake.notified() => {}
            _ = tick.tick() => {
                if options.exit_with_parent && std::os::unix::process::parent_id() != parent {
                    tracing::warn!("parent process is gone; exiting");
                    break;
                }
            }
            _ = tokio::time::sleep(due_in.unwrap_or(Duration::MAX)), if due_in.is_some() => {}
            _ = tokio::time::sleep_until(idle_deadline) => {
                tracing::info!("idle; exiting");
                break;
            }
            _ = shutdown.cancelled() => break,
        }
    }
    mailbox.close().await;
    Ok(())
}

/// Claims, answers and completes one batch. Messages that already used up their attempts
/// (agents kept dying on them) are failed with a notice to the user; the rest are answered.
async fn process(
    mailbox: &mut AgentMailbox,
    provider: &mut Provider,
    rows: &[InboundRow],
    tz: Tz,
    options: &AgentOptions,
) -> Result<(), AgentError> {
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    // Heartbeat first: the runner must never see a claimed batch beside an old heartbeat.
    mailbox.touch_heartbeat()?;
    let attempts = mailbox.claim(&seqs).await?;
    type Claimed<'a> = Vec<(&'a InboundRow, i64)>;
    let (exhausted, live): (Claimed, Claimed) = rows
        .iter()
        .zip(attempts)
        .partition(|(_, attempt)| *attempt > options.max_attempts);
    if !exhausted.is_empty() {
        let failed: Vec<InboundRow> = exhausted.iter().map(|(r, _)| (*r).clone()).collect();
        let failed_seqs: Vec<i64> = failed.iter().map(|r| r.seq).collect();
        tracing::error!(seqs = ?failed_seqs, "messages failed {} times; giving up on them", options.max_attempts);
        let notices = failure_notices(&failed, options.max_attempts);
        mailbox
            .finish(&failed_seqs, &notices, BatchStatus::Failed)
            .await?;
    }
    if live.is_empty() {
        return Ok(());
    }
    let attempt = live.iter().map(|(_, a)| *a).max().unwrap_or(1);
    let rows: Vec<InboundRow> = live
        .into_iter()
        .map(|(r, _)| with_local_attachments(r.clone(), &options.session_dir))
        .collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let span = tracing::info_span!(
        "batch",
        otel.name = "agent.batch",
        first = seqs[0],
        size = seqs.len(),
        attempt
    );
    // The batch joins the trace of its last message (the one its replies answer).
    if let Some(parent) = rows.last().and_then(|r| r.trace.as_deref()) {
        ferroclaw_common::telemetry::continue_trace(&span, parent);
    }
    // `instrument`, not `span.enter()`: a guard held across `.await` leaves the span entered
    // while the batch waits, so events of other tasks (the shutdown listener) land in it.
    answer(mailbox, provider, &rows, &seqs, tz)
        .instrument(span)
        .await
}

/// Asks the provider and completes the batch with its replies in one transaction.
async fn answer(
    mailbox: &mut AgentMailbox,
    provider: &mut Provider,
    rows: &[InboundRow],
    seqs: &[i64],
    tz: Tz,
) -> Result<(), AgentError> {
    let text = formatter::format_batch(rows, tz, now_ms());
    let answer = {
        let shared: &AgentMailbox = mailbox;
        let prompt = Prompt {
            text: &text,
            rows,
            tz,
            mailbox: shared,
        };
        let respond = provider.respond(&prompt);
        tokio::pin!(respond);
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                answer = &mut respond => break answer,
                _ = beat.tick() => shared.touch_heartbeat()?,
            }
        }
    };
    let replies = answer.replies;
    let mut seqs = seqs.to_vec();
    seqs.extend(answer.consumed);
    // Delivery continues from the batch (its own span when this agent exports, else the
    // message's).
    let trace = Some(ferroclaw_common::telemetry::current_traceparent())
        .filter(|t| !t.is_empty())
        .or_else(|| rows.last().and_then(|r| r.trace.clone()));
    let out: Vec<NewOutbound> = replies
        .into_iter()
        .map(|r| NewOutbound {
            in_reply_to: Some(r.in_reply_to),
            destination: r.destination,
            content: r.content,
            trace: trace.clone(),
        })
        .collect();
    let written = mailbox.finish(&seqs, &out, BatchStatus::Completed).await?;
    tracing::info!(replies = written.len(), "batch completed");
    Ok(())
}

/// Attachment paths arrive relative to the session directory (`in/inbox/…`): the agent
/// and its model see where the files are from here.
fn with_local_attachments(mut row: InboundRow, session_dir: &std::path::Path) -> InboundRow {
    if let ferroclaw_mailbox::InboundContent::Chat(chat) = &mut row.content {
        for a in &mut chat.attachments {
            if std::path::Path::new(&a.path).is_relative() {
                a.path = session_dir.join(&a.path).display().to_string();
            }
        }
    }
    row
}

/// One message per destination saying the batch could not be processed.
fn failure_notices(rows: &[InboundRow], attempts: i64) -> Vec<NewOutbound> {
    by_destination(rows)
        .into_iter()
        .map(|(destination, members)| notice(
            destination,
            members.last().map(|r| r.seq),
            format!(
                "Sorry, I could not process your message: the agent failed {attempts} times while working on it. Please try again."
            ),
        ))
        .collect()
}

fn notice(destination: Destination, in_reply_to: Option<i64>, text: String) -> NewOutbound {
    NewOutbound {
        in_reply_to,
        destination,
        content: OutboundContent::Chat(ChatOut { text }),
        trace: None,
    }
}

/// Rows this agent cannot read (a newer runner?) are failed with a notice, never retried
/// forever.
async fn fail_unreadable(mailbox: &mut AgentMailbox, batch: &Batch) -> Result<(), AgentError> {
    for (seq, origin, error) in &batch.unreadable {
        tracing::error!(seq, %error, "unreadable inbound message");
        let text = format!("Sorry, I could not read this message: {error}");
        let reply = notice(origin.reply_to.clone(), Some(*seq), text);
        mailbox
            .finish(&[*seq], &[reply], BatchStatus::Failed)
            .await?;
    }
    Ok(())
}
