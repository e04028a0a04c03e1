//! The real `ferroclaw-agent` binary killed with SIGKILL between claiming a batch and
//! completing it: the batch is processed again by the next agent, and exactly one reply
//! exists (ARCHITECTURE.md §4, "Atomicity").

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferroclaw_mailbox::content::ChatIn;
use ferroclaw_mailbox::{
    Destination, HostMailbox, InboundContent, JournalMode, NewInbound, Origin, OutboundRow,
    SessionPaths,
};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

const TEXT: &str = "hello from before the crash";
const WAIT: Duration = Duration::from_secs(30);

/// A session directory with one chat message to the API conversation "c".
async fn session_with_one_message(dir: &Path) -> (HostMailbox, i64) {
    let host = HostMailbox::open(SessionPaths::new(dir), JournalMode::Delete)
        .await
        .expect("host open");
    let enqueued = host
        .enqueue(&NewInbound {
            id: "m1".into(),
            content: InboundContent::Chat(ChatIn {
                text: TEXT.into(),
                sender: "ann".into(),
                attachments: vec![],
            }),
            origin: Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: "ann".into(),
                reply_to: Destination::Api {
                    conversation: "c".into(),
                },
            },
            process_after: None,
            trace: None,
        })
        .await
        .expect("enqueue");
    assert!(!enqueued.duplicate);
    (host, enqueued.seq)
}

/// Starts the agent binary on `dir`; its output goes to `<dir>/../<log>`.
fn start_agent(dir: &Path, log: &str, echo_delay_ms: u64, extra: &[&str]) -> Child {
    let log = std::fs::File::create(dir.parent().unwrap().join(log)).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferroclaw-agent"));
    cmd.arg("--session-dir")
        .arg(dir)
        .args(["--provider", "echo", "--idle-timeout-secs", "2"])
        .args(extra)
        .env("FERROCLAW_ECHO_DELAY_MS", echo_delay_ms.to_string())
        .env_remove("FERROCLAW_MAX_ATTEMPTS")
        .env_remove("FERROCLAW_JOURNAL_MODE")
        .env_remove("FERROCLAW_TIMEZONE")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    cmd.spawn().expect("spawn ferroclaw-agent")
}

fn log_of(dir: &Path, log: &str) -> String {
    std::fs::read_to_string(dir.parent().unwrap().join(log)).unwrap_or_default()
}

/// `(status, attempt)` of the `processing` row of `in_seq`, read from a read-only connection
/// to `out/outbound.db`; `None` while the agent has not created the file or the row.
async fn processing(dir: &Path, in_seq: i64) -> Option<(String, i64)> {
    let path = SessionPaths::new(dir).outbound_db();
    if !path.exists() {
        return None;
    }
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10));
    let pool: SqlitePool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .ok()?;
    // Errors (no such table yet) read as "not there yet".
    let row = sqlx::query_as("SELECT status, attempt FROM processing WHERE in_seq = $1")
        .bind(in_seq)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten();
    pool.close().await;
    row
}

/// Waits until the agent has claimed `in_seq` (status 'processing'), then SIGKILLs it.
async fn kill_mid_batch(dir: &Path, mut agent: Child, log: &str, in_seq: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((status, _)) = processing(dir, in_seq).await {
            assert_eq!(status, "processing", "the batch finished before the kill");
            break;
        }
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("agent exited early ({status}):\n{}", log_of(dir, log));
        }
        assert!(
            Instant::now() < deadline,
            "the agent never claimed the batch:\n{}",
            log_of(dir, log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = agent.id() as libc::pid_t;
    // SAFETY: `pid` is our own child, not yet reaped, so the id cannot have been reused.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill");
    let status = agent.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

/// Waits for the agent to exit by itself (idle timeout) and checks that it succeeded.
async fn wait_for_exit(dir: &Path, mut agent: Child, log: &str) {
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("agent did not exit:\n{}", log_of(dir, log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "agent {status}:\n{}", log_of(dir, log));
}

fn chat_text(row: &OutboundRow) -> String {
    assert_eq!(row.kind, "chat");
    let content: serde_json::Value = serde_json::from_str(&row.content).unwrap();
    content["text"].as_str().expect("chat text").to_string()
}

#[tokio::test]
async fn killed_mid_batch_is_redone_with_one_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("session");
    let (host, seq) = session_with_one_message(&dir).await;

    let first = start_agent(&dir, "first.log", 5000, &[]);
    kill_mid_batch(&dir, first, "first.log", seq).await;
    assert!(
        host.unsettled_after(0, usize::MAX)
            .await
            .unwrap()
            .is_empty(),
        "a reply was written before the kill"
    );
    assert_eq!(processing(&dir, seq).await, Some(("processing".into(), 1)));

    let second = start_agent(&dir, "second.log", 0, &[]);
    wait_for_exit(&dir, second, "second.log").await;

    let replies = host.unsettled_after(0, usize::MAX).await.unwrap();
    assert_eq!(replies.len(), 1, "{replies:?}");
    let reply = &replies[0];
    assert_eq!(chat_text(reply), format!("echo: {TEXT}"));
    assert_eq!(reply.in_reply_to, Some(seq));
    assert!(
        reply.seq % 2 == 1 && reply.seq > seq,
        "reply seq {}",
        reply.seq
    );
    let destination: Destination = serde_json::from_str(&reply.destination).unwrap();
    assert_eq!(
        destination,
        Destination::Api {
            conversation: "c".into()
        }
    );
    assert_eq!(processing(&dir, seq).await, Some(("completed".into(), 2)));
    assert_eq!(host.pending().await.unwrap().count, 0);
    host.close().await;
}

#[tokio::test]
async fn batch_out_of_attempts_fails_with_one_notice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("session");
    let (host, seq) = session_with_one_message(&dir).await;

    let first = start_agent(&dir, "first.log", 5000, &["--max-attempts", "1"]);
    kill_mid_batch(&dir, first, "first.log", seq).await;
    assert!(
        host.unsettled_after(0, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );

    let second = start_agent(&dir, "second.log", 0, &["--max-attempts", "1"]);
    wait_for_exit(&dir, second, "second.log").await;

    let replies = host.unsettled_after(0, usize::MAX).await.unwrap();
    assert_eq!(replies.len(), 1, "{replies:?}");
    let text = chat_text(&replies[0]);
    assert!(
        text.starts_with("Sorry, I could not process your message"),
        "{text}"
    );
    assert_eq!(replies[0].in_reply_to, Some(seq));
    assert_eq!(processing(&dir, seq).await, Some(("failed".into(), 2)));
    assert_eq!(host.pending().await.unwrap().count, 0);
    host.close().await;
}

#[tokio::test]
async fn a_message_joining_a_redone_batch_is_answered_not_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("session");
    let (host, poison) = session_with_one_message(&dir).await;

    let first = start_agent(&dir, "first.log", 5000, &["--max-attempts", "1"]);
    kill_mid_batch(&dir, first, "first.log", poison).await;
    // A new message arrives while no agent runs: it lands in the same batch as the
    // message the dead agent held, but has attempts of its own left.
    let late = host
        .enqueue(&NewInbound {
            id: "m2".into(),
            content: InboundContent::Chat(ChatIn {
                text: "late".into(),
                sender: "bob".into(),
                attachments: vec![],
            }),
            origin: Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: "bob".into(),
                reply_to: Destination::Api {
                    conversation: "c".into(),
                },
            },
            process_after: None,
            trace: None,
        })
        .await
        .expect("enqueue")
        .seq;

    let second = start_agent(&dir, "second.log", 0, &["--max-attempts", "1"]);
    wait_for_exit(&dir, second, "second.log").await;

    let replies = host.unsettled_after(0, usize::MAX).await.unwrap();
    let texts: Vec<String> = replies.iter().map(chat_text).collect();
    assert_eq!(replies.len(), 2, "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("Sorry, I could not process")),
        "{texts:?}"
    );
    assert!(texts.contains(&"echo: late".to_string()), "{texts:?}");
    assert_eq!(processing(&dir, poison).await, Some(("failed".into(), 2)));
    assert_eq!(processing(&dir, late).await, Some(("completed".into(), 1)));
    host.close().await;
}
