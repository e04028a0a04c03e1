//! Idle sessions cost nothing: after 1,000 sessions got one message each and went quiet,
//! the runner's open files and threads are back near where they were before the first.

use std::time::Duration;

use ferroclaw_e2e::{Cluster, wait_until};

const SESSIONS: usize = 1000;

/// (open files, threads) of a process.
fn footprint(pid: u32) -> anyhow::Result<(usize, usize)> {
    let f = ferroclaw_e2e::footprint(pid)?;
    Ok((f.files, f.threads))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_quiet_sessions_hold_no_files_or_threads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            // Agents exit soon after their answer, and mailboxes close soon after.
            ("FERROCLAW_IDLE_TIMEOUT_SECS", "1".into()),
            ("FERROCLAW_MAILBOX_IDLE_SECS", "2".into()),
        ],
    )
    .await?;
    let pid = cluster
        .runner
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("the runner has no pid"))?;
    // The level before any session, once the first connections (delivery's stream, the
    // gateway's) are in place.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (files_before, threads_before) = footprint(pid)?;

    for i in 0..SESSIONS {
        let (status, body) = cluster
            .post_message(&format!("quiet-{i}"), "hello", None)
            .await?;
        anyhow::ensure!(status == 202 || status == 200, "{status}: {body}");
    }
    let mut delivered = 0;
    for _ in 0..600 {
        delivered = cluster
            .deliveries()
            .await?
            .iter()
            .filter(|d| d.state == "delivered")
            .count();
        if delivered >= SESSIONS {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(delivered, SESSIONS, "every session answered once");
    let (files_busy, threads_busy) = footprint(pid)?;

    // Quiet now: agents gone, mailboxes closed.
    let settled = wait_until(
        Duration::from_secs(60),
        "files and threads given back",
        || {
            footprint(pid).is_ok_and(|(files, threads)| {
                files <= files_before + 16 && threads <= threads_before + 8
            })
        },
    )
    .await;
    let (files_after, threads_after) = footprint(pid)?;
    println!(
        "runner with {SESSIONS} sessions: before {files_before} files / {threads_before} threads, \
         at the end of the load {files_busy} / {threads_busy}, quiet {files_after} / {threads_after}"
    );
    if settled.is_err() {
        // What is still open, by file name, to tell which part keeps it.
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
            let target = std::fs::read_link(fd.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            let kind = target
                .rsplit('/')
                .next()
                .unwrap_or("")
                .split(['[', ':'])
                .next()
                .unwrap_or("")
                .to_string();
            *kinds.entry(kind).or_default() += 1;
        }
        println!("open files by name: {kinds:?}");
    }
    settled?;
    cluster.stop().await
}
