//! Agents in Docker containers (real engine; the images come from the offline build).

use std::time::Duration;

use ferroclaw_e2e::{Cluster, docker, docker_available, docker_inspect, offline_agent_image};
use serde_json::{Value, json};

async fn docker_cluster(
    dir: &std::path::Path,
    extra: &[(&'static str, String)],
) -> anyhow::Result<Cluster> {
    let mut env = vec![
        ("FERROCLAW_RUNNER_BACKEND", "docker".to_string()),
        ("FERROCLAW_AGENT_IMAGE", offline_agent_image()?),
    ];
    env.extend(extra.iter().cloned());
    Cluster::start(dir, &env).await
}

/// The hostile agent's first reply in `conversation`: its JSON report of what it managed.
async fn hostile_report(cluster: &Cluster, conversation: &str) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(text) = cluster.texts(conversation).await?.first() {
            return Ok(serde_json::from_str(text)?);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no report from the hostile agent in {conversation}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn container(session: &Value) -> String {
    format!("ferroclaw-agent-{}", session.as_str().unwrap_or_default())
}

/// Waits until the container of a session runs.
async fn running(name: &str) -> anyhow::Result<Value> {
    for _ in 0..200 {
        if let Some(c) = docker_inspect(name).filter(|c| c["State"]["Running"] == json!(true)) {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("container {name} never ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_answer_from_hardened_containers_that_go_away_on_stop() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let cluster = docker_cluster(dir.path(), &[]).await?;
    let (status, body) = cluster
        .post_message("boxed", "hello from a box", None)
        .await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines(
            "boxed",
            &["echo: hello from a box".into()],
            Duration::from_secs(60),
        )
        .await?;

    let name = container(&body["session_id"]);
    let c = running(&name).await?;
    let host = &c["HostConfig"];
    assert_eq!(c["Config"]["User"], json!("10001:10001"), "non-root");
    assert_eq!(host["ReadonlyRootfs"], json!(true));
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]));
    assert_eq!(host["NetworkMode"], json!("none"));
    assert!(
        host["Memory"].as_i64().unwrap_or(0) > 0 && host["PidsLimit"].as_i64().unwrap_or(0) > 0
    );
    assert!(host["Tmpfs"]["/tmp"].is_string());
    let binds: Vec<String> = serde_json::from_value(host["Binds"].clone())?;
    assert_eq!(binds.len(), 4, "only this session's mounts: {binds:?}");
    assert!(
        binds.iter().any(|b| b.ends_with("/in:/session/in:ro")),
        "{binds:?}"
    );
    assert!(binds.iter().all(|b| !b.contains("docker.sock")));
    assert_eq!(
        c["Config"]["Labels"]["ferroclaw.session"],
        body["session_id"]
    );

    cluster.stop().await?;
    assert!(
        docker_inspect(&name).is_none(),
        "the container was left behind"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_mid_batch_still_gives_exactly_one_reply() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let cluster = docker_cluster(dir.path(), &[("FERROCLAW_ECHO_DELAY_MS", "2000".into())]).await?;
    let (_, body) = cluster.post_message("kill", "still here", None).await?;
    let name = container(&body["session_id"]);
    running(&name).await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    docker(&["kill", &name])?;
    cluster
        .wait_for_lines(
            "kill",
            &["echo: still here".into()],
            Duration::from_secs(60),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.texts("kill").await?,
        vec!["echo: still here".to_string()]
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_adopts_running_containers() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut cluster =
        docker_cluster(dir.path(), &[("FERROCLAW_ECHO_DELAY_MS", "1500".into())]).await?;
    let mut names = Vec::new();
    for c in 0..3 {
        let (_, body) = cluster
            .post_message(&format!("adopt-{c}"), &format!("a{c}"), None)
            .await?;
        names.push(container(&body["session_id"]));
    }
    let mut ids = Vec::new();
    for name in &names {
        ids.push(running(name).await?["Id"].clone());
    }
    cluster.kill_runner().await?;
    cluster.restart_runner().await?;
    for c in 0..3 {
        cluster
            .wait_for_lines(
                &format!("adopt-{c}"),
                &[format!("echo: a{c}")],
                Duration::from_secs(60),
            )
            .await?;
    }
    // The same containers served on: adopted, not recreated.
    for (name, id) in names.iter().zip(&ids) {
        if let Some(c) = docker_inspect(name) {
            assert_eq!(&c["Id"], id, "{name} was recreated");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for c in 0..3 {
        assert_eq!(
            cluster.texts(&format!("adopt-{c}")).await?,
            vec![format!("echo: a{c}")]
        );
    }
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_contained() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // A normal session first, whose files the hostile agent will go after.
    let normal = docker_cluster(dir.path(), &[]).await?;
    let (_, victim) = normal.post_message("victim", "secret", None).await?;
    normal
        .wait_for_lines("victim", &["echo: secret".into()], Duration::from_secs(60))
        .await?;
    normal.stop().await?;
    let victim_db = dir
        .path()
        .join("sessions/main")
        .join(victim["session_id"].as_str().unwrap_or_default())
        .join("in/inbound.db");
    assert!(victim_db.exists());

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let hostile = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_RUNNER_BACKEND", "docker".to_string()),
            (
                "FERROCLAW_AGENT_IMAGE",
                ferroclaw_e2e::offline_hostile_image()?,
            ),
            (
                "FERROCLAW_ECHO_OTHER_SESSION_DB",
                victim_db.display().to_string(),
            ),
            ("FERROCLAW_ECHO_HOST_PORT", port.to_string()),
        ],
    )
    .await?;
    hostile.post_message("attacker", "try", None).await?;
    let report = hostile_report(&hostile, "attacker").await?;
    assert_eq!(report["uid"], json!(10001), "runs as non-root: {report}");
    assert_eq!(report["read_other_session"], json!(false), "{report}");
    assert_eq!(report["write_own_inbound"], json!(false), "{report}");
    assert_eq!(report["write_root_fs"], json!(false), "{report}");
    assert_eq!(report["interfaces"], json!(["lo"]), "no network: {report}");
    assert_eq!(report["reach_host_loopback"], json!(false), "{report}");
    assert_eq!(report["docker_socket"], json!(false), "{report}");
    assert_eq!(
        report["write_agent_md"],
        json!(false),
        "AGENT.md is read-only: {report}"
    );
    assert_eq!(
        report["write_memory"],
        json!(false),
        "no shared memory by default"
    );
    drop(listener);
    hostile.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_engine_unreachable_messages_wait_and_readyz_says_so() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let nowhere = format!("unix://{}", dir.path().join("no-engine.sock").display());
    let mut cluster = docker_cluster(dir.path(), &[("DOCKER_HOST", nowhere)]).await?;
    let (status, body) = cluster.post_message("waiting", "hold on", None).await?;
    assert_eq!(status, 202, "accepted while the engine is away: {body}");
    let mut not_ready = Value::Null;
    for _ in 0..50 {
        let (status, ready) = cluster.get("/readyz").await?;
        if status == 503 {
            not_ready = ready;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(not_ready["runner"], json!("unreachable"), "{not_ready}");
    assert!(cluster.texts("waiting").await?.is_empty());

    // The engine "comes back" (the runner reaches the real one) and the message is answered.
    cluster.kill_runner().await?;
    cluster.envs_set("DOCKER_HOST", "unix:///var/run/docker.sock");
    cluster.restart_runner().await?;
    cluster
        .wait_for_lines(
            "waiting",
            &["echo: hold on".into()],
            Duration::from_secs(60),
        )
        .await?;
    let (status, _) = cluster.get("/readyz").await?;
    assert_eq!(status, 200);
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_stay_under_the_cap_and_every_session_is_answered() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let cluster = docker_cluster(
        dir.path(),
        &[
            ("FERROCLAW_MAX_RUNNING_AGENTS", "2".into()),
            ("FERROCLAW_ECHO_DELAY_MS", "200".into()),
        ],
    )
    .await?;
    let mut names = Vec::new();
    for s in 0..6 {
        let (status, body) = cluster
            .post_message(&format!("ccap-{s}"), "go", None)
            .await?;
        assert_eq!(status, 202, "{body}");
        names.push(container(&body["session_id"]));
    }
    let sampler = {
        let names = names.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..60 {
                let listed = docker(&["ps", "--format", "{{.Names}}"]).unwrap_or_default();
                let ours = listed
                    .lines()
                    .filter(|n| names.iter().any(|m| m == n))
                    .count();
                most = most.max(ours);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };
    for s in 0..6 {
        cluster
            .wait_for_lines(
                &format!("ccap-{s}"),
                &["echo: go".into()],
                Duration::from_secs(90),
            )
            .await?;
    }
    let most = sampler.await?;
    assert!(
        most <= 2,
        "{most} agent containers ran at once with a cap of 2"
    );
    assert!(most >= 1);
    cluster.stop().await
}

/// Every regular file under `dir` with its length and a hash of its bytes (links are not
/// followed). WAL's shared-memory index is left out: readers legitimately write to it.
fn snapshot(dir: &std::path::Path) -> Vec<(String, usize, u64)> {
    use std::hash::{Hash, Hasher};
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() && !path.to_string_lossy().ends_with("-shm") {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut hasher);
                files.push((path.display().to_string(), bytes.len(), hasher.finish()));
            }
        }
    }
    files.sort();
    files
}

async fn chat_count(cluster: &Cluster, conversation: &str) -> anyhow::Result<usize> {
    let (messages, _) = cluster.messages(conversation, 0, 0.0).await?;
    Ok(messages
        .iter()
        .filter(|m| m["kind"] == json!("chat"))
        .count())
}

fn owner(path: &std::path::Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::symlink_metadata(path)?.uid())
}

/// The hostile agent plants links (to the runner's /proc, the session's in/, the data dir,
/// /etc, a host file), a FIFO, link loops and a link DAG in its out/ and the agent folder,
/// sends the files they lead to, and swaps its outbound.db for a link to another session's.
/// The runner follows none of them: every download is refused, no host file changes owner,
/// the other session's files stay as they were, and other sessions keep being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_never_follows_a_link_an_agent_planted() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    links_are_never_followed(Backend::Docker).await
}

/// The same attacks from a process agent: the runner's side is the same code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_never_follows_a_link_a_process_agent_planted() -> anyhow::Result<()> {
    links_are_never_followed(Backend::Process).await
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Docker,
    Process,
}

async fn links_are_never_followed(backend: Backend) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let normal = match backend {
        Backend::Docker => docker_cluster(&data, &[]).await?,
        Backend::Process => Cluster::start(&data, &[]).await?,
    };
    let (_, victim) = normal.post_message("victim", "secret", None).await?;
    normal
        .wait_for_lines("victim", &["echo: secret".into()], Duration::from_secs(60))
        .await?;
    normal.stop().await?;
    let victim_dir = data
        .join("sessions/main")
        .join(victim["session_id"].as_str().unwrap_or_default());
    // What the victim's agent wrote: a runner following the planted link would write there.
    let victim_before = snapshot(&victim_dir.join("out"));
    assert!(!victim_before.is_empty());

    // Root-owned things outside the data dir, which a following chown would give away.
    let host = dir.path().join("host");
    std::fs::create_dir_all(host.join("dir"))?;
    let host_file = host.join("secret-file");
    std::fs::write(&host_file, b"host secret")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o600))?;
    let owners_before = (owner(&host_file)?, owner(&host.join("dir"))?);

    let mut env = match backend {
        Backend::Docker => vec![
            ("FERROCLAW_RUNNER_BACKEND", "docker".to_string()),
            (
                "FERROCLAW_AGENT_IMAGE",
                ferroclaw_e2e::offline_hostile_image()?,
            ),
        ],
        Backend::Process => vec![(
            "FERROCLAW_AGENT_BINARY",
            ferroclaw_e2e::binary("hostile-agent")?
                .display()
                .to_string(),
        )],
    };
    env.extend([
        ("FERROCLAW_ECHO_DATA_DIR", data.display().to_string()),
        ("FERROCLAW_ECHO_HOST_FILE", host_file.display().to_string()),
        (
            "FERROCLAW_ECHO_HOST_DIR",
            host.join("dir").display().to_string(),
        ),
        (
            "FERROCLAW_ECHO_OTHER_SESSION_OUTBOUND",
            victim_dir.join("out/outbound.db").display().to_string(),
        ),
    ]);
    let mut hostile = Cluster::start(&data, &env).await?;
    hostile.post_message("attacker", "plant", None).await?;
    let mut files = Vec::new();
    let mut report = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while files.len() < 7 || report.is_null() {
        let (messages, _) = hostile.messages("attacker", 0, 5.0).await?;
        for m in &messages {
            if m["kind"] == json!("file") && !files.contains(&m["download"]) {
                files.push(m["download"].clone());
            } else if m["kind"] == json!("chat") {
                report = serde_json::from_str(m["text"].as_str().unwrap_or("null"))?;
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the hostile agent's replies did not all arrive: {messages:?}"
        );
    }
    assert_eq!(report["planted"], json!(true), "{report}");
    assert_eq!(
        report["planted_in_agent_folder"],
        json!(backend == Backend::Process),
        "the agent folder is read-only in a container: {report}"
    );
    assert_eq!(files.len(), 7, "{files:?}");
    for link in &files {
        let link = link.as_str().unwrap_or_default();
        let (status, body) = hostile.get(link).await?;
        assert_eq!(status, 400, "{link} must be refused: {body}");
        assert!(
            body.to_string()
                .contains("not a regular file in the session"),
            "{link}: {body}"
        );
    }
    let secret = std::fs::read(data.join("runner.proxy-key"))?;
    let environ = std::fs::read(format!("/proc/{}/environ", std::process::id()))?;
    assert!(!secret.is_empty() && !environ.is_empty());

    // A new session of the same agent starts a container (the agent folder, with its loops,
    // DAG and links, is prepared again), and the planting session restarts in its own out/.
    let started = std::time::Instant::now();
    hostile.post_message("bystander", "hello", None).await?;
    hostile.post_message("attacker", "again", None).await?;
    for (conversation, chats) in [("bystander", 1), ("attacker", 2)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while chat_count(&hostile, conversation).await? < chats {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{conversation} got no answer: a link stopped its agent from starting"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "both agents started and answered in {:?} with the links in place",
        started.elapsed()
    );
    assert_eq!(
        (owner(&host_file)?, owner(&host.join("dir"))?),
        owners_before,
        "no host file changed owner"
    );
    assert_eq!(std::fs::read(&host_file)?, b"host secret");

    // outbound.db swapped for a link to the victim's: after a runner restart (a fresh open),
    // the victim's rows are not served again as the attacker's, and others keep working.
    let (_, swapper) = hostile.post_message("swapper", "swap", None).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while hostile.texts("swapper").await?.is_empty() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no answer to swap");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let swapped = data
        .join("sessions/main")
        .join(swapper["session_id"].as_str().unwrap_or_default())
        .join("out/outbound.db");
    for _ in 0..100 {
        if std::fs::symlink_metadata(&swapped).is_ok_and(|m| m.file_type().is_symlink()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        std::fs::symlink_metadata(&swapped)?
            .file_type()
            .is_symlink(),
        "the agent swapped {} for a link",
        swapped.display()
    );
    hostile.kill_runner().await?;
    hostile.restart_runner().await?;
    let (status, refused) = hostile.post_message("swapper", "more", None).await?;
    assert_eq!(status, 409, "a tampered session takes no work: {refused}");
    assert!(refused.to_string().contains("tampered"), "{refused}");
    hostile.post_message("after", "still there?", None).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while hostile.texts("after").await?.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "other sessions are answered after the runner met the link"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        chat_count(&hostile, "swapper").await?,
        1,
        "the tampered session is stopped: its new message is not answered"
    );
    assert_eq!(
        hostile.texts("victim").await?,
        vec!["echo: secret".to_string()],
        "the victim's reply was not served again through the link"
    );
    assert_eq!(
        snapshot(&victim_dir.join("out")),
        victim_before,
        "the victim's files are byte-identical"
    );
    hostile.stop().await
}

/// The operator's instructions are read-only in every mode; sharing a writable memory
/// across sessions is opt-in, and one session's workspace is invisible to another's agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_folder_is_read_only_and_shared_memory_is_opt_in() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("agents/main"))?;
    std::fs::write(data.join("agents/main/AGENT.md"), "operator's instructions")?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        "[[agents]]\nname = \"main\"\nshared_memory = true\n",
    )?;
    let cluster = Cluster::start(
        &data,
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("FERROCLAW_RUNNER_BACKEND", "docker".to_string()),
            (
                "FERROCLAW_AGENT_IMAGE",
                ferroclaw_e2e::offline_hostile_image()?,
            ),
        ],
    )
    .await?;
    let (_, first) = cluster.post_message("first", "hi", None).await?;
    let first_report = hostile_report(&cluster, "first").await?;
    assert_eq!(
        first_report["write_agent_md"],
        json!(false),
        "{first_report}"
    );
    assert_eq!(first_report["write_memory"], json!(true), "{first_report}");
    // The first session's workspace exists now; the second session's agent looks for it.
    let workspace = data
        .join("sessions/main")
        .join(first["session_id"].as_str().unwrap_or_default())
        .join("out/workspace");
    std::fs::create_dir_all(&workspace)?;
    std::fs::write(workspace.join("NOTES.md"), "first session's notes")?;
    cluster.stop().await?;
    let cluster = Cluster::start(
        &data,
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("FERROCLAW_RUNNER_BACKEND", "docker".to_string()),
            (
                "FERROCLAW_AGENT_IMAGE",
                ferroclaw_e2e::offline_hostile_image()?,
            ),
            (
                "FERROCLAW_ECHO_OTHER_WORKSPACE",
                workspace.display().to_string(),
            ),
        ],
    )
    .await?;
    cluster.post_message("second", "hi", None).await?;
    let second_report = hostile_report(&cluster, "second").await?;
    assert_eq!(
        second_report["read_other_workspace"],
        json!(false),
        "{second_report}"
    );
    assert_eq!(
        second_report["write_agent_md"],
        json!(false),
        "{second_report}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("agents/main/AGENT.md"))?,
        "operator's instructions"
    );
    let shared = std::fs::read_to_string(data.join("memory/main/NOTES.md"))?;
    assert_eq!(shared.matches("obey the attacker").count(), 2, "{shared}");
    cluster.stop().await
}
