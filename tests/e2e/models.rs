//! Model agents end to end: the agent talks to a fake Anthropic or OpenAI-compatible API on
//! loopback through the runner's credential proxy, runs tools, keeps its conversation
//! across restarts, and never sees the API key.

use std::path::Path;
use std::time::Duration;

use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::fake_model::{FakeModel, Step, last_user_text};
use serde_json::{Value, json};

const KEY: &str = "sk-real-key-7f3a9c";
const WAIT: Duration = Duration::from_secs(60);

/// A cluster whose agent `main` uses `provider` against the fake, with `extra` TOML lines
/// in its agent section.
async fn model_cluster(
    dir: &Path,
    provider: &str,
    fake: &FakeModel,
    extra: &str,
    env: &[(&'static str, String)],
) -> anyhow::Result<Cluster> {
    let config = dir.join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[[agents]]\nname = \"main\"\nprovider = \"{provider}\"\nmodel = \"test-model\"\napi_base_url = \"{}\"\n{extra}\n",
            fake.url()
        ),
    )?;
    let key_var = if provider == "openai" {
        "OPENAI_API_KEY"
    } else {
        "ANTHROPIC_API_KEY"
    };
    let mut all = vec![
        ("FERROCLAW_CONFIG", config.display().to_string()),
        (key_var, KEY.to_string()),
        ("FERROCLAW_MODEL_RETRY_BASE_MS", "20".into()),
    ];
    all.extend(env.iter().cloned());
    Cluster::start(&dir.join("data"), &all).await
}

/// A claude-code agent run by the stand-in `fake-claude`, whose model says "claude says hi".
async fn claude_code_cluster(
    dir: &Path,
    env: &[(&'static str, String)],
) -> anyhow::Result<(FakeModel, Cluster)> {
    let fake = FakeModel::start(KEY).await?;
    fake.push([Step::Text("claude says hi".into())]);
    let claude = ferroclaw_e2e::binary("fake-claude")?;
    let command = format!("command = \"{}\"", claude.display());
    let cluster = model_cluster(dir, "claude-code", &fake, &command, env).await?;
    Ok((fake, cluster))
}

fn tool(name: &str, input: Value) -> (String, Value) {
    (name.to_string(), input)
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_agent_runs_bash_and_send_message_and_never_sees_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![tool(
            "bash",
            json!({"command": "echo hello-from-bash > note.txt && cat note.txt"}),
        )]),
        Step::Tools(vec![tool("send_message", json!({"text": "working on it"}))]),
        Step::Text("done: the note says hello-from-bash".into()),
    ]);
    let cluster = model_cluster(dir.path(), "anthropic", &fake, "", &[]).await?;
    cluster
        .post_message("work", "please make a note", None)
        .await?;
    cluster
        .wait_for_lines(
            "work",
            &[
                "working on it".into(),
                "done: the note says hello-from-bash".into(),
            ],
            WAIT,
        )
        .await?;
    let texts = cluster.texts("work").await?;
    assert_eq!(
        texts,
        vec!["working on it", "done: the note says hello-from-bash"],
        "the progress message first, then the answer, each once"
    );

    let received = fake.received();
    assert_eq!(received.len(), 3, "one request per step");
    assert!(
        received.iter().all(|r| r.key.as_deref() == Some(KEY)),
        "the proxy put the real key on every request"
    );
    let first = &received[0].body;
    assert_eq!(first["model"], json!("test-model"));
    assert_eq!(first["stream"], json!(true));
    assert_eq!(
        first["system"][0]["cache_control"]["type"],
        json!("ephemeral")
    );
    assert!(last_user_text(first).contains("please make a note"));
    let tools: Vec<&str> = first["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(tools.contains(&"bash") && tools.contains(&"ask_user_question"));
    // The bash result went back to the model as a tool_result block.
    let second = received[1].body["messages"].to_string();
    assert!(
        second.contains("tool_result") && second.contains("hello-from-bash"),
        "{second}"
    );
    // bash ran in the session's own workspace, not in the agent's (read-only) folder.
    let note = in_workspace(&cluster.data_dir, "note.txt")?;
    assert_eq!(std::fs::read_to_string(note)?.trim(), "hello-from-bash");
    assert!(!cluster.data_dir.join("agents/main/note.txt").exists());

    // The key is nowhere the agent can look: not in its environment or command line, not
    // in any file of the data directory.
    let agents = ferroclaw_e2e::agent_processes(&cluster.data_dir);
    assert!(!agents.is_empty(), "the agent is still running (idle)");
    for (pid, _) in &agents {
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains(KEY), "key in the agent's environment");
        assert!(!String::from_utf8_lossy(&cmdline).contains(KEY));
        assert!(
            environ.contains("FERROCLAW_MODEL_TOKEN="),
            "the agent has its session token instead"
        );
    }
    assert_eq!(
        files_containing(&cluster.data_dir, KEY),
        Vec::<String>::new()
    );

    // /cost reports what the proxy and the model counted.
    // The proxy serves only holders of a session token it issued.
    let proxy = format!(
        "http://{}/v1/messages",
        cluster
            .runner
            .http
            .ok_or_else(|| anyhow::anyhow!("no proxy address"))?
    );
    let http = reqwest::Client::new();
    for key in [None, Some("ses_x.00"), Some(KEY)] {
        let mut request = http.post(&proxy).json(&json!({"model": "m"}));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let refused = request.send().await?;
        assert_eq!(refused.status().as_u16(), 401, "{key:?}");
        let body: Value = refused.json().await?;
        assert_eq!(body["error"]["type"], json!("authentication_error"));
    }
    assert_eq!(fake.received().len(), 3, "nothing got through");

    // With a valid session token, only a turn's request for the agent's model gets through:
    // other endpoints of the account, other methods and other models are refused here.
    let (_, sessions) = cluster.get("/v1/sessions").await?;
    let session = sessions["sessions"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let secret = std::fs::read(cluster.data_dir.join("runner.proxy-key"))?;
    let token = |agent: &str, expires_at: i64| {
        ferroclaw_common::signing::session_token(
            &secret,
            &ferroclaw_common::signing::TokenGrant {
                session_id: session.clone(),
                agent: agent.into(),
                expires_at,
            },
        )
    };
    let valid = token("main", i64::MAX);
    let base = proxy.trim_end_matches("/v1/messages").to_string();
    let model = json!({"model": "test-model", "messages": []});
    let refusals = [
        (reqwest::Method::POST, "/v1/files", model.clone(), 403),
        (reqwest::Method::POST, "/v1/batches", model.clone(), 403),
        (
            reqwest::Method::POST,
            "/v1/fine_tuning/jobs",
            model.clone(),
            403,
        ),
        (
            reqwest::Method::GET,
            "/v1/organizations/org-1/api_keys",
            model.clone(),
            403,
        ),
        (reqwest::Method::DELETE, "/v1/messages", model.clone(), 403),
        (
            reqwest::Method::POST,
            "/v1/messages",
            json!({"model": "claude-opus-expensive", "messages": []}),
            403,
        ),
    ];
    for (method, path, body, status) in refusals {
        let refused = http
            .request(method.clone(), format!("{base}{path}"))
            .header("x-api-key", &valid)
            .json(&body)
            .send()
            .await?;
        assert_eq!(refused.status().as_u16(), status, "{method} {path} {body}");
        let body: Value = refused.json().await?;
        assert_eq!(body["error"]["type"], json!("permission_error"), "{body}");
    }
    for (what, stale) in [
        ("expired", token("main", 1_000)),
        ("another agent's", token("other", i64::MAX)),
    ] {
        let refused = http
            .post(&proxy)
            .header("x-api-key", &stale)
            .json(&model)
            .send()
            .await?;
        let expected = if what == "expired" { 401 } else { 403 };
        assert_eq!(refused.status().as_u16(), expected, "{what} token");
    }
    assert_eq!(
        fake.received().len(),
        3,
        "no refused request reached the model API"
    );

    cluster.post_message("work", "/cost", None).await?;
    let cost = wait_for_text(&cluster, "work", "Tokens so far").await?;
    assert!(cost.contains("in 3 requests"), "{cost}");
    cluster.stop().await
}

/// `rel` in the workspace of the (one) session of agent `main` that has it.
fn in_workspace(data_dir: &Path, rel: &str) -> anyhow::Result<std::path::PathBuf> {
    std::fs::read_dir(data_dir.join("sessions/main"))?
        .flatten()
        .map(|session| session.path().join("out/workspace").join(rel))
        .find(|path| path.exists())
        .ok_or_else(|| anyhow::anyhow!("no session workspace holds {rel}"))
}

/// Waits for a reply containing `needle`; returns it.
async fn wait_for_text(
    cluster: &Cluster,
    conversation: &str,
    needle: &str,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = cluster
            .texts(conversation)
            .await?
            .into_iter()
            .find(|t| t.contains(needle))
        {
            return Ok(t);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{conversation}: no reply containing {needle:?}; have {:?}",
            cluster.texts(conversation).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_in_the_stream_and_529_are_retried_and_giving_up_is_explained()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::OverloadMidStream,
        Step::Status(529),
        Step::Text("answer after two retries".into()),
    ]);
    let cluster = model_cluster(dir.path(), "anthropic", &fake, "", &[]).await?;
    cluster.post_message("flaky", "hello", None).await?;
    cluster
        .wait_for_lines("flaky", &["answer after two retries".into()], WAIT)
        .await?;
    assert_eq!(fake.received().len(), 3);
    assert_eq!(
        cluster.texts("flaky").await?.len(),
        1,
        "the lost partial answer never went out"
    );

    // Six overloads in a row: the agent gives up and says so.
    fake.push((0..6).map(|_| Step::Status(529)));
    cluster.post_message("flaky", "again", None).await?;
    let notice = wait_for_text(&cluster, "flaky", "gave up").await?;
    assert_eq!(
        notice,
        "Sorry, I could not answer: the model provider answered 529 (overloaded), and I gave up after 6 tries; try again later."
    );
    assert_eq!(fake.received().len(), 9);
    // The failed turn left no trace: the next request holds the first exchange and the new
    // message only.
    cluster.post_message("flaky", "third", None).await?;
    wait_for_text(&cluster, "flaky", "model: ").await?;
    let last = fake
        .received()
        .last()
        .map(|r| r.body.clone())
        .unwrap_or_default();
    let history = last["messages"].to_string();
    assert!(
        history.contains("answer after two retries") && !history.contains("again"),
        "{history}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_restart_and_clear_and_compact_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([Step::Text("Nice to meet you, Ann.".into())]);
    let mut cluster = model_cluster(dir.path(), "anthropic", &fake, "", &[]).await?;
    cluster.post_message("mem", "my name is Ann", None).await?;
    cluster
        .wait_for_lines("mem", &["Nice to meet you, Ann.".into()], WAIT)
        .await?;

    // The runner dies (its agent with it); a new one starts a new agent process.
    cluster.kill_runner().await?;
    cluster.restart_runner().await?;
    fake.push([Step::Text("You are Ann.".into())]);
    cluster
        .post_message("mem", "what is my name?", None)
        .await?;
    cluster
        .wait_for_lines("mem", &["You are Ann.".into()], WAIT)
        .await?;
    let body = &fake.received()[1].body;
    let history = body["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 3, "{history:?}");
    assert!(history[0].to_string().contains("my name is Ann"));
    assert!(history[1].to_string().contains("Nice to meet you, Ann."));

    // /compact: the model writes a summary that replaces the history.
    fake.push([Step::Text("The user is called Ann.".into())]);
    cluster.post_message("mem", "/compact", None).await?;
    let compacted = wait_for_text(&cluster, "mem", "Compacted").await?;
    assert!(compacted.contains("saved about"), "{compacted}");
    let summary_request = &fake.received()[2].body;
    assert!(
        summary_request.get("tools").is_none(),
        "a request without tools has no tools field: {summary_request}"
    );
    fake.push([Step::Text("Still Ann.".into())]);
    cluster.post_message("mem", "and now?", None).await?;
    cluster
        .wait_for_lines("mem", &["Still Ann.".into()], WAIT)
        .await?;
    let after = fake.received()[3].body["messages"].clone();
    assert_eq!(after.as_array().map(Vec::len), Some(3), "{after}");
    assert!(after[0].to_string().contains("The user is called Ann."));

    // /context and /clear.
    cluster.post_message("mem", "/context", None).await?;
    let context = wait_for_text(&cluster, "mem", "Context:").await?;
    assert!(context.contains("of 200000 tokens"), "{context}");
    cluster.post_message("mem", "/clear", None).await?;
    wait_for_text(&cluster, "mem", "Started a fresh conversation").await?;
    cluster.post_message("mem", "who am I?", None).await?;
    wait_for_text(&cluster, "mem", "model: ").await?;
    let fresh = fake
        .received()
        .last()
        .map(|r| r.body["messages"].clone())
        .unwrap_or_default();
    assert_eq!(fresh.as_array().map(Vec::len), Some(1), "{fresh}");
    assert_eq!(fake.received().len(), 5, "commands never reached the model");
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_agent_calls_tools_and_a_spent_budget_is_explained() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![tool(
            "write_file",
            json!({"path": "plans/today.md", "content": "1. tea\n2. code\n"}),
        )]),
        Step::Tools(vec![tool("read_file", json!({"path": "plans/today.md"}))]),
        Step::Text("Plan saved.".into()),
    ]);
    let mut cluster = model_cluster(dir.path(), "openai", &fake, "", &[]).await?;
    cluster.post_message("plan", "plan my day", None).await?;
    cluster
        .wait_for_lines("plan", &["Plan saved.".into()], WAIT)
        .await?;
    let received = fake.received();
    assert_eq!(received[0].path, "/v1/chat/completions");
    assert!(received.iter().all(|r| r.key.as_deref() == Some(KEY)));
    let third = received[2].body["messages"].clone();
    let tool_message = third
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|m| m["role"] == "tool")
        .cloned()
        .unwrap_or_default();
    assert!(
        tool_message["content"]
            .as_str()
            .unwrap_or("")
            .contains("1. tea"),
        "{third}"
    );
    assert_eq!(
        std::fs::read_to_string(in_workspace(&cluster.data_dir, "plans/today.md")?)?,
        "1. tea\n2. code\n"
    );

    // The operator sets a budget below what the agent has used: the proxy refuses, and the
    // user is told why.
    let config = dir.path().join("ferroclaw.toml");
    let with_budget = std::fs::read_to_string(&config)? + "token_budget = 100\n";
    std::fs::write(&config, with_budget)?;
    cluster.kill_runner().await?;
    cluster.restart_runner().await?;
    cluster.post_message("plan", "and tomorrow?", None).await?;
    let refused = wait_for_text(&cluster, "plan", "budget").await?;
    assert_eq!(
        refused,
        "Sorry, I could not answer: this agent's token budget is spent; an operator can raise agents.token_budget."
    );
    assert_eq!(fake.received().len(), 3, "the proxy refused before the API");
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_user_question_waits_for_the_answer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![tool(
            "ask_user_question",
            json!({"question": "Which colour?", "options": ["Red", "Blue"]}),
        )]),
        Step::Text("Blue it is.".into()),
    ]);
    let cluster = model_cluster(dir.path(), "anthropic", &fake, "", &[]).await?;
    cluster.post_message("ask", "paint the shed", None).await?;
    let deadline = std::time::Instant::now() + WAIT;
    let card = loop {
        let (messages, _) = cluster.messages("ask", 0, 1.0).await?;
        if let Some(m) = messages.iter().find(|m| m["kind"] == json!("card")) {
            break m.clone();
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no question card");
    };
    assert_eq!(card["text"], json!("Which colour?"));
    let question_id = card["content"]["question_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (status, body) = cluster
        .post(
            &format!("/v1/questions/{question_id}/answer"),
            &json!({"option": "1", "user": "ann"}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    cluster
        .wait_for_lines("ask", &["Blue it is.".into()], WAIT)
        .await?;
    let results = fake.received()[1].body["messages"].to_string();
    assert!(results.contains("ann answered: Blue"), "{results}");
    // The answer was used up by the waiting tool call, not answered again as a new turn.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.received().len(), 2);
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containerised_model_agent_reaches_only_the_proxy_and_never_the_key() -> anyhow::Result<()>
{
    if !ferroclaw_e2e::docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![tool(
            "send_message",
            json!({"text": "hello from a container"}),
        )]),
        Step::Text("done".into()),
    ]);
    let network = format!("fc-e2e-{}-agents", std::process::id());
    let cluster = model_cluster(
        dir.path(),
        "anthropic",
        &fake,
        "",
        &[
            ("FERROCLAW_RUNNER_BACKEND", "docker".into()),
            (
                "FERROCLAW_AGENT_IMAGE",
                ferroclaw_e2e::offline_agent_image()?,
            ),
            // Containers reach the proxy through their network's gateway, not loopback.
            ("FERROCLAW_PROXY_ADDR", "0.0.0.0:0".into()),
            ("FERROCLAW_AGENT_NETWORK", network.clone()),
        ],
    )
    .await?;
    let (_, accepted) = cluster.post_message("boxed", "hi", None).await?;
    cluster
        .wait_for_lines(
            "boxed",
            &["hello from a container".into(), "done".into()],
            WAIT,
        )
        .await?;
    assert!(
        fake.received()
            .iter()
            .all(|r| r.key.as_deref() == Some(KEY))
    );

    let name = format!(
        "ferroclaw-agent-{}",
        accepted["session_id"].as_str().unwrap_or_default()
    );
    let container = ferroclaw_e2e::docker_inspect(&name)
        .ok_or_else(|| anyhow::anyhow!("no container {name}"))?;
    assert_eq!(container["HostConfig"]["NetworkMode"], json!(network));
    let env = container["Config"]["Env"].to_string();
    assert!(!env.contains(KEY), "key in the container's environment");
    assert!(env.contains("FERROCLAW_MODEL_TOKEN="), "{env}");
    let processes = ferroclaw_e2e::docker(&["top", &name, "-eo", "pid,args"])?;
    assert!(
        processes.contains("ferroclaw-agent") && !processes.contains(KEY),
        "{processes}"
    );
    assert_eq!(
        files_containing(&cluster.data_dir, KEY),
        Vec::<String>::new()
    );
    let net: Value =
        serde_json::from_str(&ferroclaw_e2e::docker(&["network", "inspect", &network])?)?;
    assert_eq!(net[0]["Internal"], json!(true), "no route out of the host");

    cluster.stop().await?;
    ferroclaw_e2e::docker(&["network", "rm", &network])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_the_cli_with_ferroclaw_tools_over_mcp_and_resumes() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (fake, cluster) = claude_code_cluster(dir.path(), &[]).await?;
    cluster.post_message("cc", "hello claude", None).await?;
    let first = "claude says hi [session fake-session-1, resumed: false]";
    cluster
        .wait_for_lines("cc", &["via mcp".into(), first.into()], WAIT)
        .await?;
    assert_eq!(cluster.texts("cc").await?, vec!["via mcp", first]);
    let received = fake.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].key.as_deref(),
        Some(KEY),
        "the proxy added the key"
    );
    assert!(last_user_text(&received[0].body).contains("hello claude"));

    fake.push([Step::Text("again".into())]);
    cluster.post_message("cc", "more", None).await?;
    cluster
        .wait_for_lines(
            "cc",
            &["again [session fake-session-1, resumed: true]".into()],
            WAIT,
        )
        .await?;
    cluster.post_message("cc", "/cost", None).await?;
    let cost = wait_for_text(&cluster, "cc", "Tokens so far").await?;
    assert!(
        cost.contains("in 2 turns") && cost.contains("$0.0250"),
        "{cost}"
    );
    cluster.stop().await
}

/// Three turns in conversation "long" with an agent whose window the tool definitions
/// alone nearly fill, so the history is compacted before the third.
async fn count_to_three(
    dir: &std::path::Path,
    provider: &str,
    fake: &FakeModel,
) -> anyhow::Result<Cluster> {
    let cluster = model_cluster(
        dir,
        provider,
        fake,
        "context_window = 1000\nmax_tokens = 100",
        &[],
    )
    .await?;
    for (text, answer) in [("count", "one"), ("go on", "two"), ("and on", "three")] {
        cluster.post_message("long", text, None).await?;
        cluster
            .wait_for_lines("long", &[answer.to_string()], WAIT)
            .await?;
    }
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_context_is_compacted_before_the_next_request() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Text("one".into()),
        Step::Text("two".into()),
        Step::Text("SUMMARY: counted to two".into()),
        Step::Text("three".into()),
    ]);
    let cluster = count_to_three(dir.path(), "anthropic", &fake).await?;
    let received = fake.received();
    assert_eq!(received.len(), 4);
    assert!(
        received[1].body["tools"].is_array() && received[2].body.get("tools").is_none(),
        "the third request is the summary, without a tools field"
    );
    let after = received[3].body["messages"].clone();
    assert!(
        after[0].to_string().contains("SUMMARY: counted to two"),
        "{after}"
    );
    assert!(last_user_text(&received[3].body).contains("and on"));
    assert!(
        !after.to_string().contains("go on"),
        "the old turns are gone: {after}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_message_reaches_only_the_conversations_the_config_allows() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![
            tool(
                "send_message",
                json!({"to": "alerts", "text": "disk almost full"}),
            ),
            tool("send_message", json!({"to": "private", "text": "leak"})),
        ]),
        Step::Text("reported".into()),
    ]);
    let cluster = model_cluster(
        dir.path(),
        "anthropic",
        &fake,
        "send_to = [\"alerts\"]",
        &[],
    )
    .await?;
    cluster.post_message("ops", "check the disk", None).await?;
    cluster
        .wait_for_lines("ops", &["reported".into()], WAIT)
        .await?;
    cluster
        .wait_for_lines("alerts", &["disk almost full".into()], WAIT)
        .await?;
    assert!(cluster.texts("private").await?.is_empty());
    let results = fake.received()[1].body["messages"].to_string();
    assert!(
        results.contains("you may not send to \\\"private\\\"; allowed: alerts"),
        "{results}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_gate_lets_admins_clear_answers_help_and_forwards_the_rest()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![tool(
            "write_file",
            json!({"path": "notes.md", "content": "x"}),
        )]),
        Step::Text("noted".into()),
    ]);
    let cluster = model_cluster(
        dir.path(),
        "anthropic",
        &fake,
        "admins = [\"mia\"]\n[roles]\nowners = [\"olga\"]",
        &[],
    )
    .await?;
    let say = |sender: &'static str, text: &'static str| {
        let body = json!({"conversation": "gate", "text": text, "sender": sender});
        let cluster = &cluster;
        async move { cluster.post("/v1/messages", &body).await }
    };
    let (status, _) = say("bob", "take a note").await?;
    assert_eq!(status, 202);
    cluster
        .wait_for_lines("gate", &["noted".into()], WAIT)
        .await?;

    // A non-admin's admin command: refused with one line, nothing enqueued.
    for command in ["/clear", "/compact", "/context", "/cost", "/files"] {
        let (status, body) = say("bob", command).await?;
        assert_eq!(status, 403, "{command}: {body}");
        assert_eq!(
            body["error"]["message"],
            json!(format!("{command} is for admins only, and bob is not one."))
        );
    }
    // Filtered commands are answered by the gateway, for anyone.
    let (status, body) = say("bob", "/help").await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["answer"].as_str().unwrap_or("").contains("/compact"),
        "{body}"
    );
    let (status, body) = say("olga", "/login").await?;
    assert_eq!(
        (status, body["session_id"].clone()),
        (200, json!("")),
        "{body}"
    );
    // The agent's admin and the owner may use admin commands; the agent answers them.
    assert_eq!(say("mia", "/files").await?.0, 202);
    wait_for_text(&cluster, "gate", "notes.md").await?;
    assert_eq!(say("olga", "/cost").await?.0, 202);
    wait_for_text(&cluster, "gate", "Tokens so far").await?;
    // Any other command goes to the model like a message.
    assert_eq!(say("bob", "/deploy staging").await?.0, 202);
    wait_for_text(&cluster, "gate", "model: ").await?;
    assert_eq!(
        fake.received().len(),
        3,
        "only the messages and /deploy reached the model"
    );
    assert!(last_user_text(&fake.received()[2].body).contains("/deploy staging"));
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_file_can_be_downloaded_from_the_api_conversation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Tools(vec![tool(
            "write_file",
            json!({"path": "report.txt", "content": "hello report"}),
        )]),
        Step::Tools(vec![tool(
            "send_file",
            json!({"path": "report.txt", "caption": "the report"}),
        )]),
        Step::Text("done".into()),
    ]);
    let cluster = model_cluster(dir.path(), "anthropic", &fake, "", &[]).await?;
    cluster
        .post_message("files", "write me a report", None)
        .await?;
    cluster
        .wait_for_lines("files", &["done".into()], WAIT)
        .await?;
    let (messages, _) = cluster.messages("files", 0, 0.0).await?;
    let file = messages
        .iter()
        .find(|m| m["kind"] == json!("file"))
        .ok_or_else(|| anyhow::anyhow!("no file message in {messages:?}"))?;
    assert_eq!(file["text"], json!("the report"));
    let link = file["download"].as_str().unwrap_or_default().to_string();
    assert!(link.contains("/files/outbox/"), "{link}");
    let response = cluster
        .http
        .get(format!("{}{link}", cluster.api()))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    let disposition = response
        .headers()
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(disposition, "attachment; filename=\"report.txt\"");
    assert_eq!(response.bytes().await?.as_ref(), b"hello report");

    // Only the outbox is served.
    let session = file["session_id"].as_str().unwrap_or_default();
    for (path, status) in [
        ("outbox/..%2F..%2Fin/inbound.db", 400),
        ("state/transcript.json", 400),
        ("outbox/nope/x.txt", 404),
    ] {
        let got = cluster
            .http
            .get(format!(
                "{}/v1/sessions/{session}/files/{path}",
                cluster.api()
            ))
            .send()
            .await?
            .status()
            .as_u16();
        assert_eq!(got, status, "{path}");
    }
    cluster.stop().await
}

/// A line forged into Claude Code's MCP spool becomes an outbound row like any other, and
/// the host refuses its destination as it refuses a forged row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_mcp_spool_line_is_refused_by_the_host() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_fake, cluster) = claude_code_cluster(
        dir.path(),
        &[("FERROCLAW_ECHO_FORGE_SPOOL", "victim".into())],
    )
    .await?;
    let (_, cc) = cluster.post_message("cc", "hello claude", None).await?;
    let first = "claude says hi [session fake-session-1, resumed: false]";
    cluster
        .wait_for_lines("cc", &["via mcp".into(), first.into()], WAIT)
        .await?;
    let session = ferroclaw_e2e::session_dir(
        &cluster.data_dir,
        cc["session_id"].as_str().unwrap_or_default(),
    );
    let deadline = std::time::Instant::now() + WAIT;
    let refused = loop {
        let refused = ferroclaw_e2e::failed_details(&session).await?;
        if !refused.is_empty() || std::time::Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // The refusal is told to the agent once; its turn answering that notice forges again
    // and is refused without another notice, so one or two refusals, never a loop.
    assert!((1..=2).contains(&refused.len()), "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|r| r.contains("may not send to the API conversation \"victim\"")),
        "{refused:?}"
    );
    assert!(
        cluster.texts("victim").await?.is_empty(),
        "nothing reached the victim"
    );
    cluster.stop().await
}

/// Compaction, automatic and by `/compact`, against an OpenAI-compatible server: the
/// summary request carries no `tools` field (OpenAI and vLLM refuse an empty list), and a
/// server other than api.openai.com gets `max_tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compaction_sends_no_tools_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([
        Step::Text("one".into()),
        Step::Text("two".into()),
        Step::Text("SUMMARY: counted to two".into()),
        Step::Text("three".into()),
        Step::Text("SUMMARY: counted to three".into()),
    ]);
    let cluster = count_to_three(dir.path(), "openai", &fake).await?;
    cluster.post_message("long", "/compact", None).await?;
    wait_for_text(&cluster, "long", "Compacted").await?;
    let received = fake.received();
    assert_eq!(received.len(), 5, "three turns and two summaries");
    for (i, request) in received.iter().enumerate() {
        let body = &request.body;
        let summary = i == 2 || i == 4;
        assert_eq!(
            body.get("tools").is_some(),
            !summary,
            "request {i}: tools only on turns: {body}"
        );
        if !summary {
            assert!(body["tools"].as_array().is_some_and(|t| !t.is_empty()));
        }
        assert_eq!(body["max_tokens"], json!(100), "request {i}: {body}");
        assert!(body.get("max_completion_tokens").is_none(), "{body}");
    }
    assert!(
        received[3].body["messages"]
            .to_string()
            .contains("SUMMARY: counted to two"),
        "the automatic summary replaced the history"
    );
    assert!(last_user_text(&received[4].body).contains("Summarise our conversation"));
    cluster.stop().await
}

/// What users read of a failed model call is the status and a short reason; the provider's
/// raw body never reaches them. A 429's `retry-after-ms` is waited for, and a tool error
/// reaches an OpenAI-compatible model as a result that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_failures_read_plainly_and_retry_after_ms_is_honoured() -> anyhow::Result<()> {
    const SECRET: &str = "org-7Hq2 on tokens per min";
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    let error = |status: u16, wait_ms: Option<&str>| {
        let body = json!({"error": {
            "message": format!("Rate limit reached for test-model in organization {SECRET}"),
            "type": "tokens", "param": null, "code": "rate_limit_exceeded"}})
        .to_string();
        Step::Error {
            status,
            body,
            headers: wait_ms
                .map(|ms| vec![("retry-after-ms".to_string(), ms.to_string())])
                .unwrap_or_default(),
        }
    };
    fake.push([
        Step::Tools(vec![tool("read_file", json!({"path": "missing.txt"}))]),
        error(429, Some("1500")),
        Step::Text("no such file".into()),
    ]);
    let cluster = model_cluster(dir.path(), "openai", &fake, "", &[]).await?;
    cluster
        .post_message("plain", "read missing.txt", None)
        .await?;
    cluster
        .wait_for_lines("plain", &["no such file".into()], WAIT)
        .await?;
    let received = fake.received();
    assert_eq!(received.len(), 3);
    let waited = received[2].at.duration_since(received[1].at);
    assert!(
        waited >= Duration::from_millis(1400),
        "the retry waited {waited:?}, not the 1.5 s retry-after-ms asked (backoff alone is 20 ms)"
    );
    let tool_message = received[2].body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|m| m["role"] == "tool")
        .cloned()
        .unwrap_or_default();
    assert!(
        tool_message["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("error: ")),
        "{tool_message}"
    );

    // A permanent refusal, then a rate limit that does not pass.
    fake.push([error(400, None)]);
    cluster.post_message("plain", "again", None).await?;
    let refused = wait_for_text(&cluster, "plain", "400").await?;
    assert_eq!(
        refused,
        "Sorry, I could not answer: the model provider answered 400 (bad request); an operator can find the details in the agent's log."
    );
    fake.push((0..6).map(|_| error(429, Some("10"))));
    cluster.post_message("plain", "and again", None).await?;
    let gave_up = wait_for_text(&cluster, "plain", "gave up").await?;
    assert_eq!(
        gave_up,
        "Sorry, I could not answer: the model provider answered 429 (rate limited), and I gave up after 6 tries; try again later."
    );
    assert_eq!(fake.received().len(), 10);
    for text in cluster.texts("plain").await? {
        for leak in [SECRET, "rate_limit_exceeded", "{", "HTTP"] {
            assert!(!text.contains(leak), "{leak:?} reached the user: {text}");
        }
    }
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_field_override_reaches_the_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeModel::start(KEY).await?;
    fake.push([Step::Text("ok".into())]);
    let cluster = model_cluster(
        dir.path(),
        "openai",
        &fake,
        "max_tokens = 123\nmax_tokens_field = \"max_completion_tokens\"",
        &[],
    )
    .await?;
    cluster.post_message("limit", "hi", None).await?;
    cluster
        .wait_for_lines("limit", &["ok".into()], WAIT)
        .await?;
    let body = fake.received()[0].body.clone();
    assert_eq!(body["max_completion_tokens"], json!(123), "{body}");
    assert!(body.get("max_tokens").is_none(), "{body}");
    cluster.stop().await
}
