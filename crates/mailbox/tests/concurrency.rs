//! A host process and an agent process working on the same session directory at the same
//! time: no row is lost, no seq collides, no busy error reaches the caller.
//!
//! The test binary re-executes itself to get real, separate processes: the parent test
//! spawns `child_host` and `child_agent` (ignored tests that do nothing unless
//! `MAILBOX_CHILD_DIR` names the session directory), waits for both, then checks the files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroclaw_mailbox::agent::BatchStatus;
use ferroclaw_mailbox::content::{ChatIn, ChatOut};
use ferroclaw_mailbox::{
    AgentMailbox, Destination, Error, HostMailbox, InboundContent, JournalMode, NewInbound,
    NewOutbound, Origin, OutboundContent, Outcome, SessionPaths,
};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

/// Inbound messages the host enqueues (and replies the agent writes).
const N: usize = 3000;
/// Most rows the agent takes into one batch, so that many transactions interleave.
const MAX_BATCH: usize = 8;
/// Names the session directory in a child process.
const CHILD_DIR: &str = "MAILBOX_CHILD_DIR";
/// A child that runs longer than this is killed and the test fails.
const CHILD_TIMEOUT: Duration = Duration::from_secs(240);

fn message_id(i: usize) -> String {
    format!("msg-{i:05}")
}

fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD_DIR).map(PathBuf::from)
}

fn chat(i: usize) -> NewInbound {
    let conversation = format!("conv-{}", i % 7);
    NewInbound {
        id: message_id(i),
        content: InboundContent::Chat(ChatIn {
            text: format!("hello {i}"),
            sender: "tester".into(),
            attachments: vec![],
        }),
        origin: Origin {
            channel: "api".into(),
            conversation: conversation.clone(),
            sender: "tester".into(),
            reply_to: Destination::Api { conversation },
        },
        process_after: None,
        trace: None,
    }
}

/// Host role: enqueue N messages (plus a few duplicates) while settling every outbound row
/// the agent writes, until all N replies are settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of host_and_agent_processes_share_a_session"]
async fn child_host() {
    let Some(dir) = child_dir() else { return };
    let host = Arc::new(
        HostMailbox::open(SessionPaths::new(&dir), JournalMode::Delete)
            .await
            .expect("host open"),
    );

    let settler = {
        let host = host.clone();
        tokio::spawn(async move {
            let mut cursor = 0;
            let mut settled = 0;
            let deadline = Instant::now() + CHILD_TIMEOUT;
            while settled < N {
                assert!(Instant::now() < deadline, "host saw only {settled} replies");
                let rows = host
                    .unsettled_after(cursor, usize::MAX)
                    .await
                    .expect("unsettled_after");
                if rows.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                for row in rows {
                    assert!(row.seq > cursor, "rows come oldest first");
                    cursor = row.seq;
                    let first = host
                        .settle(row.seq, Outcome::Delivered, Some("pm"), None)
                        .await
                        .expect("settle");
                    assert!(first, "outbound {} settled twice", row.seq);
                    settled += 1;
                }
            }
        })
    };

    let mut seqs: Vec<i64> = Vec::with_capacity(N);
    for i in 0..N {
        let done = host.enqueue(&chat(i)).await.expect("enqueue");
        assert!(!done.duplicate, "{} reported as duplicate", done.id);
        seqs.push(done.seq);
        if i % 250 == 249 {
            // A redelivered message: the first row's seq comes back, nothing is added.
            let earlier = i - 100;
            let again = host.enqueue(&chat(earlier)).await.expect("enqueue dup");
            assert!(again.duplicate, "{} not reported as duplicate", again.id);
            assert_eq!(again.seq, seqs[earlier], "duplicate returns the first seq");
        }
    }
    let again = host.enqueue(&chat(0)).await.expect("enqueue dup");
    assert!(again.duplicate);
    assert_eq!(again.seq, seqs[0]);

    settler.await.expect("settler task");
    host.close().await;
}

/// Agent role: due → claim → finish(Completed) with one reply per row, until all N rows are
/// completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of host_and_agent_processes_share_a_session"]
async fn child_agent() {
    let Some(dir) = child_dir() else { return };
    let paths = SessionPaths::new(&dir);
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let open_deadline = Instant::now() + Duration::from_secs(30);

    // The host creates inbound.db; until it has (file and tables), open says "not found",
    // and only that.
    let mut mailbox = loop {
        match AgentMailbox::open(paths.clone(), JournalMode::Delete).await {
            Ok(mailbox) => break mailbox,
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && Instant::now() < open_deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("agent could not open the mailbox: {e}"),
        }
    };

    let mut completed: HashSet<i64> = HashSet::new();
    while completed.len() < N {
        assert!(
            Instant::now() < deadline,
            "agent completed only {}",
            completed.len()
        );
        let batch = mailbox.due(ferroclaw_mailbox::now_ms()).await.expect("due");
        assert!(batch.unreadable.is_empty(), "{:?}", batch.unreadable);
        if batch.rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let rows = &batch.rows[..batch.rows.len().min(MAX_BATCH)];
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let attempts = mailbox.claim(&seqs).await.expect("claim");
        assert!(
            attempts.iter().all(|a| *a == 1),
            "nothing was claimed before: {attempts:?}"
        );
        let replies: Vec<NewOutbound> = rows
            .iter()
            .map(|r| NewOutbound {
                in_reply_to: Some(r.seq),
                destination: r.origin.reply_to.clone(),
                content: OutboundContent::Chat(ChatOut {
                    text: format!("re: {}", r.id),
                }),
                trace: None,
            })
            .collect();
        let written = mailbox
            .finish(&seqs, &replies, BatchStatus::Completed)
            .await
            .expect("finish");
        assert_eq!(written.len(), replies.len());
        for seq in seqs {
            assert!(completed.insert(seq), "inbound {seq} handed out twice");
        }
    }
    mailbox.close().await;
}

/// Runs one role of this test binary in its own process, its output going to `<logs>/<role>.log`.
fn spawn_child(role: &str, session: &Path, logs: &Path) -> Child {
    let log = std::fs::File::create(logs.join(format!("{role}.log"))).expect("log file");
    Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", role, "--nocapture", "--include-ignored"])
        .env(CHILD_DIR, session)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn child")
}

/// Waits for both children. As soon as one fails (or the deadline passes) the other is
/// killed, so a failing role does not leave its partner waiting out its whole timeout.
fn wait_children(mut children: Vec<(&str, Child)>, logs: &Path, deadline: Instant) {
    let log_of =
        |role: &str| std::fs::read_to_string(logs.join(format!("{role}.log"))).unwrap_or_default();
    let mut failure = None;
    while !children.is_empty() && failure.is_none() {
        let mut i = 0;
        while i < children.len() {
            let (role, child) = &mut children[i];
            match child.try_wait().expect("wait child") {
                None => i += 1,
                Some(status) => {
                    let output = log_of(role);
                    if !status.success() {
                        failure = Some(format!("{role} failed ({status}):\n{output}"));
                    } else if !output.contains("1 passed") {
                        failure = Some(format!("{role} did not run its test:\n{output}"));
                    }
                    children.remove(i);
                }
            }
        }
        if failure.is_none() && !children.is_empty() && Instant::now() > deadline {
            failure = Some(format!("{} timed out", children[0].0));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (role, mut child) in children {
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("{role} killed; its output:\n{}", log_of(role));
    }
    if let Some(failure) = failure {
        panic!("{failure}");
    }
}

async fn read_only(path: &Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(path).read_only(true))
        .await
        .expect("open db read-only")
}

#[tokio::test]
async fn host_and_agent_processes_share_a_session() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = tmp.path().join("session");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let started = Instant::now();
    // The agent first, so that it is already retrying when the host creates inbound.db.
    let agent = spawn_child("child_agent", &session, &logs);
    std::thread::sleep(Duration::from_millis(200));
    let host = spawn_child("child_host", &session, &logs);
    let deadline = started + CHILD_TIMEOUT + Duration::from_secs(30);
    wait_children(
        vec![("child_host", host), ("child_agent", agent)],
        &logs,
        deadline,
    );
    eprintln!("{N} rows each way in {:?}", started.elapsed());

    let paths = SessionPaths::new(&session);
    let inbound = read_only(&paths.inbound_db()).await;
    let outbound = read_only(&paths.outbound_db()).await;

    // Inbound: every id exactly once, even seqs.
    let messages_in: Vec<(i64, String)> =
        sqlx::query_as("SELECT seq, id FROM messages_in ORDER BY seq")
            .fetch_all(&inbound)
            .await
            .unwrap();
    assert_eq!(messages_in.len(), N, "inbound rows");
    let ids: HashSet<&str> = messages_in.iter().map(|(_, id)| id.as_str()).collect();
    let expected: HashSet<String> = (0..N).map(message_id).collect();
    assert_eq!(ids.len(), N, "an inbound id appears twice");
    assert!(expected.iter().all(|id| ids.contains(id.as_str())));
    assert!(messages_in.iter().all(|(seq, _)| *seq > 0 && seq % 2 == 0));
    let in_seqs: HashMap<i64, &str> = messages_in
        .iter()
        .map(|(seq, id)| (*seq, id.as_str()))
        .collect();

    // Outbound: odd seqs, one reply per inbound row, each after the row it answers.
    let messages_out: Vec<(i64, Option<i64>, String)> =
        sqlx::query_as("SELECT seq, in_reply_to, content FROM messages_out ORDER BY seq")
            .fetch_all(&outbound)
            .await
            .unwrap();
    assert_eq!(messages_out.len(), N, "outbound rows");
    assert!(messages_out.iter().all(|(seq, _, _)| seq % 2 == 1));
    let mut answered = HashSet::new();
    for (seq, in_reply_to, content) in &messages_out {
        let in_seq = in_reply_to.expect("reply has in_reply_to");
        let id = in_seqs
            .get(&in_seq)
            .unwrap_or_else(|| panic!("reply {seq} to unknown inbound {in_seq}"));
        assert!(answered.insert(in_seq), "inbound {in_seq} answered twice");
        assert!(*seq > in_seq, "reply {seq} ordered before inbound {in_seq}");
        let content: serde_json::Value = serde_json::from_str(content).unwrap();
        assert_eq!(content["text"], format!("re: {id}"));
    }
    assert_eq!(answered.len(), N);

    // One seq order across both files: no seq is used twice.
    let all: HashSet<i64> = messages_in
        .iter()
        .map(|(seq, _)| *seq)
        .chain(messages_out.iter().map(|(seq, _, _)| *seq))
        .collect();
    assert_eq!(all.len(), 2 * N, "a seq is used in both files");

    // Processing: every inbound row completed on its first attempt.
    let processing: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT in_seq, status, attempt FROM processing")
            .fetch_all(&outbound)
            .await
            .unwrap();
    assert_eq!(processing.len(), N, "processing rows");
    for (in_seq, status, attempt) in &processing {
        assert!(in_seqs.contains_key(in_seq), "processing row {in_seq}");
        assert_eq!(status, "completed", "inbound {in_seq}");
        assert_eq!(*attempt, 1, "inbound {in_seq}");
    }

    // The two processes really overlapped: replies were written while the host still enqueued.
    let last_in: i64 = sqlx::query_scalar("SELECT max(created_at) FROM messages_in")
        .fetch_one(&inbound)
        .await
        .unwrap();
    let first_out: i64 = sqlx::query_scalar("SELECT min(created_at) FROM messages_out")
        .fetch_one(&outbound)
        .await
        .unwrap();
    assert!(first_out < last_in, "the agent only started after the host");

    // Delivered: the host settled every reply exactly once.
    let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM delivered")
        .fetch_one(&inbound)
        .await
        .unwrap();
    assert_eq!(delivered, N as i64, "settled rows");

    inbound.close().await;
    outbound.close().await;
}
