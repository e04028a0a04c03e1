use std::collections::HashMap;
use std::time::Duration;

use ferroclaw_e2e::{Cluster, agent_processes};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_is_restarted_and_the_message_answered_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[("FERROCLAW_ECHO_DELAY_MS", "1500".into())]).await?;
    cluster.post_message("crash", "survive this", None).await?;
    // Wait for the agent to be mid-batch, then kill it.
    let mut killed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some((pid, _)) = agent_processes(dir.path()).first() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // SAFETY: kill(2) on a pid we just read; no memory effects.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            killed = true;
            break;
        }
    }
    assert!(killed, "the agent never started");
    let lines = cluster
        .wait_for_lines(
            "crash",
            &["echo: survive this".into()],
            Duration::from_secs(30),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.texts("crash").await?,
        vec!["echo: survive this".to_string()],
        "{lines:?}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_per_session_under_concurrent_enqueues_and_idle_stop() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_IDLE_TIMEOUT_SECS", "1".into()),
            ("FERROCLAW_ECHO_DELAY_MS", "50".into()),
        ],
    )
    .await?;
    let cluster = std::sync::Arc::new(cluster);
    let mut posts = Vec::new();
    for i in 0..30 {
        let cluster = cluster.clone();
        posts.push(tokio::spawn(async move {
            cluster
                .post_message(&format!("burst-{}", i % 3), &format!("b{i}"), None)
                .await
        }));
    }
    // Sample the process table while the burst is handled.
    let mut most = 0;
    for _ in 0..20 {
        let mut per_session: HashMap<String, usize> = HashMap::new();
        for (_, session) in agent_processes(dir.path()) {
            *per_session.entry(session).or_default() += 1;
        }
        most = most.max(per_session.values().copied().max().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for post in posts {
        let (status, body) = post.await??;
        assert_eq!(status, 202, "{body}");
    }
    assert!(most <= 1, "{most} agents served one session at once");
    for c in 0..3 {
        let want: Vec<String> = (0..30)
            .filter(|i| i % 3 == c)
            .map(|i| format!("echo: b{i}"))
            .collect();
        cluster
            .wait_for_lines(&format!("burst-{c}"), &want, Duration::from_secs(30))
            .await?;
    }
    // Idle agents exit and the session shows idle; a new message starts one again.
    let mut idle = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, sessions) = cluster.get("/v1/sessions").await?;
        let all_idle = sessions["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["agent_state"] == json!("idle")));
        if all_idle && agent_processes(dir.path()).is_empty() {
            idle = true;
            break;
        }
    }
    assert!(idle, "agents did not stop after the idle timeout");
    cluster.post_message("burst-0", "again", None).await?;
    cluster
        .wait_for_lines("burst-0", &["echo: again".into()], Duration::from_secs(30))
        .await?;
    match std::sync::Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.stop().await,
        Err(_) => anyhow::bail!("cluster still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_more_busy_sessions_than_slots_all_answered_under_the_cap() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_MAX_RUNNING_AGENTS", "2".into()),
            ("FERROCLAW_ECHO_DELAY_MS", "200".into()),
        ],
    )
    .await?;
    let cluster = std::sync::Arc::new(cluster);
    let sampler = {
        let data = dir.path().to_path_buf();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut most = 0;
            let mut saw_queued = false;
            for _ in 0..150 {
                most = most.max(agent_processes(&data).len());
                if let Ok((_, s)) = cluster.get("/v1/sessions").await {
                    saw_queued |= s["sessions"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["agent_state"] == json!("queued")));
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            (most, saw_queued)
        })
    };
    for round in 0..2 {
        for s in 0..6 {
            let (status, body) = cluster
                .post_message(&format!("cap-{s}"), &format!("r{round}"), None)
                .await?;
            assert_eq!(status, 202, "{body}");
        }
    }
    for s in 0..6 {
        cluster
            .wait_for_lines(
                &format!("cap-{s}"),
                &["echo: r0".into(), "echo: r1".into()],
                Duration::from_secs(60),
            )
            .await?;
    }
    let (most, saw_queued) = sampler.await?;
    assert!(most <= 2, "{most} agents ran at once with a cap of 2");
    assert!(
        saw_queued,
        "no session was ever queued: the cap was not exercised"
    );
    match std::sync::Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.stop().await,
        Err(_) => anyhow::bail!("cluster still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_agent_is_killed_retried_and_finally_the_user_is_told() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_STUCK_AFTER_SECS", "1".into()),
            ("FERROCLAW_ECHO_HANG_MS", "600000".into()),
            ("FERROCLAW_MAX_RESTARTS", "2".into()),
        ],
    )
    .await?;
    cluster.post_message("stuck", "are you there", None).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let texts = cluster.texts("stuck").await?;
        if let Some(t) = texts.first() {
            break t.clone();
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the user was never told"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.starts_with("Sorry, I could not process your message: the agent failed 2 times"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cluster.texts("stuck").await?.len(),
        1,
        "one notice, nothing else"
    );
    cluster.stop().await
}

/// An agent that holds a batch and keeps touching its heartbeat is not "alive" forever:
/// past `runner.max_batch_secs` it is stopped and the batch retried, like a stuck one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_heartbeats_but_never_finishes_is_stopped_after_max_batch_secs()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ferroclaw_e2e::hostile_process_agent()?,
            ("FERROCLAW_MAX_BATCH_SECS", "2".into()),
        ],
    )
    .await?;
    let (_, hanging) = cluster.post_message("hang", "hang", None).await?;
    let starts = ferroclaw_e2e::session_dir(
        dir.path(),
        hanging["session_id"].as_str().unwrap_or_default(),
    )
    .join("out/state/hang-starts");
    let count = || {
        std::fs::read_to_string(&starts)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    ferroclaw_e2e::wait_until(
        Duration::from_secs(30),
        "the heartbeating agent is stopped and started again",
        || count() >= 2,
    )
    .await?;
    eprintln!("stopped and restarted after {:?}", started.elapsed());
    // The heartbeat never went stale (stuck_after_secs is 120 s): the batch's age stopped it.
    assert!(started.elapsed() < Duration::from_secs(60));
    cluster.stop().await
}

/// An agent that writes past its session's disk quota is stopped, the session takes no new
/// message (saying why) until files are removed, and other sessions carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_its_disk_quota_is_stopped_and_takes_no_work_until_files_go()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ferroclaw_e2e::hostile_process_agent()?,
            ("FERROCLAW_SESSION_DISK_MB", "1".into()),
        ],
    )
    .await?;
    let (_, filler) = cluster.post_message("filler", "fill", None).await?;
    let session_dir = ferroclaw_e2e::session_dir(
        dir.path(),
        filler["session_id"].as_str().unwrap_or_default(),
    );
    // Only once the agent has its batch (a later message would join it).
    ferroclaw_e2e::wait_until(Duration::from_secs(30), "the agent writes its file", || {
        session_dir.join("out/workspace/fill.bin").exists()
    })
    .await?;
    let started = std::time::Instant::now();
    let refusal = loop {
        let (status, body) = cluster.post_message("filler", "more", None).await?;
        if status == 409 {
            break body;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the session kept taking work past its quota: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let said = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("over the quota of 1 MB"), "{refusal}");
    // The agent was stopped: no process serves the session any more.
    let serving = || {
        let needle = session_dir.display().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
            .any(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
    };
    ferroclaw_e2e::wait_until(
        Duration::from_secs(15),
        "the agent over its quota is stopped",
        || !serving(),
    )
    .await?;
    // Others carry on.
    cluster.post_message("other", "hello", None).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.texts("other").await?.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "another session was not answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Files removed: the session takes work again.
    std::fs::remove_file(session_dir.join("out/workspace/fill.bin"))?;
    let (status, body) = cluster.post_message("filler", "again", None).await?;
    assert_eq!(status, 202, "{body}");
    cluster.stop().await
}
