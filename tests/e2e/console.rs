//! The operator console (`/ui`) in a real headless Chromium against the four real
//! services (and a model agent on a fake OpenAI-compatible API, for tokens and spend):
//! sign-in, sessions with counts and cost, a live conversation, a question card, a file
//! sent, a webhook session as a chat, tasks, a failed delivery with its plain reason,
//! agents and spend, health, and screenshots of every page at desktop and phone widths
//! (under `target/console-screenshots/`). `ferroclaw status` and `ferroclaw sessions` run
//! against the same services. The CSRF refusal is checked with plain HTTP.
//!
//! Without Chromium the browser test skips with a message, unless
//! `FERROCLAW_REQUIRE_BROWSER=1` (CI), where it fails.

use std::path::PathBuf;
use std::time::Duration;

use ferroclaw_e2e::Cluster;
use ferroclaw_e2e::browser::{Browser, Page};
use ferroclaw_e2e::fake_model::{FakeModel, Step};
use serde_json::json;

const TOKEN: &str = "console-t0ken";
const MODEL_KEY: &str = "sk-console-model";
const WAIT: Duration = Duration::from_secs(30);

fn token_env() -> Vec<(&'static str, String)> {
    vec![("FERROCLAW_API_TOKEN", TOKEN.into())]
}

/// Where the run's screenshots go: `target/console-screenshots/`.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

/// Screenshots of the open page at desktop (1280×800) and phone (390×844) widths.
async fn screenshots(page: &mut Page, name: &str) -> anyhow::Result<()> {
    let dir = screenshot_dir();
    for (size, width, height, mobile) in [("desktop", 1280, 800, false), ("phone", 390, 844, true)]
    {
        page.viewport(width, height, mobile).await?;
        // Let the layout settle at the new width.
        tokio::time::sleep(Duration::from_millis(200)).await;
        page.screenshot(&dir.join(format!("{name}-{size}.png")))
            .await?;
    }
    page.viewport(1280, 800, false).await
}

/// A JavaScript string literal.
fn js(text: &str) -> String {
    json!(text).to_string()
}

/// Whether some chat bubble's text is exactly `text`.
fn bubble_with(text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#chat .msg.agent .text')].some(e => e.textContent === {})",
        js(text)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() -> anyhow::Result<()> {
    let Some(mut browser) = Browser::launch().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // `main` echoes; `writer` is a priced model agent with a budget, for the spend page.
    let fake = FakeModel::start(MODEL_KEY).await?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            "[[agents]]\nname = \"main\"\n\n[[agents]]\nname = \"writer\"\nprovider = \"openai\"\n\
             model = \"test-model\"\napi_base_url = \"{}\"\nprice_per_mtok = [3.0, 15.0]\ntoken_budget = 100000\n\n\
             [[conversations]]\npattern = \"write*\"\nagent = \"writer\"\n\n[[conversations]]\npattern = \"*\"\nagent = \"main\"\n",
            fake.url()
        ),
    )?;
    let mut env = token_env();
    env.push(("FERROCLAW_CONFIG", config.display().to_string()));
    env.push(("OPENAI_API_KEY", MODEL_KEY.into()));
    let cluster = Cluster::start(&dir.path().join("data"), &env).await?;
    let api = cluster.api();
    let mut page = browser.new_page().await?;

    // The model agent answers once (its tokens are counted by the runner's proxy); an
    // action nobody knows fails for good, with a plain reason; a webhook opens a session
    // of its own.
    fake.push([Step::Text("Rust in autumn light".into())]);
    cluster
        .post_message("writer-1", "a haiku please", None)
        .await?;
    cluster
        .wait_for_lines("writer-1", &["Rust in autumn light".into()], WAIT)
        .await?;
    cluster
        .post_message(
            "plans",
            r#"!action {"action": "reboot_world", "params": {}}"#,
            None,
        )
        .await?;
    cluster
        .post_hook(
            "default",
            &json!({"event": "deploy", "service": "api"}),
            None,
        )
        .await?;

    // A task to pause and resume, scheduled by the echo agent's `!action`.
    let schedule = json!({"action": "schedule_task", "params": {"task_id": "t-console",
        "name": "digest", "prompt": "summarise", "interval_secs": 3600}});
    cluster
        .post_message("plans", &format!("!action {schedule}"), None)
        .await?;
    assert_eq!(cluster.task("t-console").await?["state"], json!("active"));

    // Sign-in: the wrong token is refused, the right one opens the sessions page.
    page.navigate(&format!("{api}/ui")).await?;
    screenshots(&mut page, "sign-in").await?;
    page.fill("#token", "not-the-token").await?;
    page.click(".sign-in button[type=submit]").await?;
    page.wait_for("document.querySelector('.sign-in .error') !== null", WAIT)
        .await?;
    assert_eq!(
        page.text(".sign-in .error").await?.as_deref(),
        Some("That is not the API token.")
    );
    assert_eq!(page.eval("location.pathname").await?, json!("/ui/sign-in"));
    page.fill("#token", TOKEN).await?;
    page.click(".sign-in button[type=submit]").await?;
    page.wait_for("location.pathname === '/ui/sessions'", WAIT)
        .await?;
    // The cookie is HttpOnly: script cannot read it.
    assert_eq!(page.eval("document.cookie").await?, json!(""));
    page.wait_for(
        "[...document.querySelectorAll('#sessions td.channel')].some(e => e.textContent === 'api:plans')",
        WAIT,
    )
    .await?;
    // The model session's row: messages in and out, tokens, and its cost at the price.
    let writer_row = "[...document.querySelectorAll('#sessions tr')].find(r => r.querySelector('td.channel')?.textContent === 'api:writer-1')";
    page.wait_for(&format!("{writer_row} !== undefined"), WAIT)
        .await?;
    let cells = page
        .eval(&format!(
            "(() => {{ const r = {writer_row}; return ['In', 'Out', 'Tokens', 'Cost'].map(l => r.querySelector(`td[data-label=\"${{l}}\"]`).textContent); }})()"
        ))
        .await?;
    let cells: Vec<String> = serde_json::from_value(cells)?;
    assert_eq!(cells[0], "1", "{cells:?}");
    assert_eq!(cells[1], "1", "{cells:?}");
    assert_ne!(cells[2], "0", "{cells:?}");
    assert!(cells[3].starts_with('$'), "{cells:?}");
    screenshots(&mut page, "sessions").await?;
    // The table updates live: a new session shows up without a reload.
    page.eval("window.notReloaded = true").await?;
    cluster.post_message("live-row", "hi", None).await?;
    page.wait_for(
        "[...document.querySelectorAll('#sessions td.channel')].some(e => e.textContent === 'api:live-row')",
        WAIT,
    )
    .await?;
    assert_eq!(page.eval("window.notReloaded === true").await?, json!(true));

    // A message sent from the conversation view; the echo reply appears without a reload.
    page.navigate(&format!("{api}/ui/conversations/console-chat"))
        .await?;
    page.wait_for("document.documentElement.dataset.js === 'ready'", WAIT)
        .await?;
    page.wait_for(
        "document.getElementById('live').textContent === 'Live.'",
        WAIT,
    )
    .await?;
    page.eval("window.notReloaded = true").await?;
    page.fill("#sender", "ann").await?;
    page.fill("#text", "hello <from> the console").await?;
    page.click("#send button[type=submit]").await?;
    page.wait_for(&bubble_with("echo: hello <from> the console"), WAIT)
        .await?;
    assert_eq!(page.eval("window.notReloaded === true").await?, json!(true));
    assert_eq!(
        page.eval("document.querySelector('#text').value").await?,
        json!("")
    );

    // A question card: its buttons answer it once; a second click is refused with the
    // reason shown.
    let card = json!({"question_id": "q-console", "text": "Deploy now?",
        "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "Not yet"}]});
    page.fill("#text", &format!("!card {card}")).await?;
    page.click("#send button[type=submit]").await?;
    page.wait_for(
        "document.querySelectorAll('#chat form.card button').length === 2",
        WAIT,
    )
    .await?;
    page.click("#chat form.card button[value=yes]").await?;
    page.wait_for(
        "document.querySelector('#chat form.card .status').textContent === 'answered: Yes'",
        WAIT,
    )
    .await?;
    page.wait_for(
        &bubble_with("echo: system question_response: ann answered \"Yes\""),
        WAIT,
    )
    .await?;
    page.click("#chat form.card button[value=no]").await?;
    page.wait_for(
        "document.querySelector('#chat form.card .status').classList.contains('error')",
        WAIT,
    )
    .await?;
    let refusal = page
        .text("#chat form.card .status")
        .await?
        .unwrap_or_default();
    assert!(refusal.contains("already answered"), "{refusal}");
    assert_eq!(page.eval("window.notReloaded === true").await?, json!(true));

    // A file, sent from the file form: it lands in the session's inbox and the agent
    // names it in its reply.
    page.eval(
        "(() => { const t = new DataTransfer(); t.items.add(new File(['ten bytes!'], 'note.txt', {type: 'text/plain'})); \
         document.querySelector(\"form[action$='/files'] input[type=file]\").files = t.files; })()",
    )
    .await?;
    page.fill("form[action$='/files'] input[name=text]", "see attached")
        .await?;
    page.click("form[action$='/files'] button[type=submit]")
        .await?;
    page.wait_for(
        &bubble_with("echo: see attached [file note.txt, 10 bytes]"),
        WAIT,
    )
    .await?;
    assert_eq!(page.eval("window.notReloaded === true").await?, json!(true));
    screenshots(&mut page, "conversation").await?;

    // A webhook's session reads as a chat: what came in, and the agent's answer.
    let (_, listed) = cluster.get("/v1/sessions?sort=recent&limit=50").await?;
    let hook_session = listed["sessions"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|s| s["conversation_key"] == "webhook:default")
        })
        .and_then(|s| s["id"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no webhook session in {listed}"))?
        .to_string();
    page.navigate(&format!("{api}/ui/sessions/{hook_session}"))
        .await?;
    page.wait_for(
        "document.querySelector('#session-chat .msg.mine .text')?.textContent.includes('deploy') && \
         [...document.querySelectorAll('#session-chat .msg.agent .text')].some(e => e.textContent.startsWith('echo: webhook default'))",
        WAIT,
    )
    .await?;
    screenshots(&mut page, "session").await?;

    // Tasks: pause and resume from the page; the REST API agrees.
    page.navigate(&format!("{api}/ui/tasks")).await?;
    let row = "tr[data-task='t-console']";
    assert_eq!(
        page.text(&format!("{row} .state")).await?.as_deref(),
        Some("active")
    );
    assert_eq!(
        page.text(&format!("{row} td:nth-child(3)"))
            .await?
            .as_deref(),
        Some("every hour")
    );
    screenshots(&mut page, "tasks").await?;
    page.click(&format!("{row} button[data-action=pause]"))
        .await?;
    page.wait_for(
        &format!("document.querySelector(\"{row} .state\")?.textContent === 'paused'"),
        WAIT,
    )
    .await?;
    assert_eq!(cluster.task("t-console").await?["state"], json!("paused"));
    page.click(&format!("{row} button[data-action=resume]"))
        .await?;
    page.wait_for(
        &format!("document.querySelector(\"{row} .state\")?.textContent === 'active'"),
        WAIT,
    )
    .await?;
    assert_eq!(cluster.task("t-console").await?["state"], json!("active"));

    // Run now: the run reaches the agent and shows in the task's run history.
    page.click(&format!("{row} button[data-action=run]"))
        .await?;
    cluster
        .wait_for_lines("plans", &["echo: task digest: summarise".into()], WAIT)
        .await?;
    cluster.runs("t-console", 1).await?;
    page.navigate(&format!("{api}/ui/tasks")).await?;
    page.click(&format!("{row} a[href$='/runs']")).await?;
    page.wait_for("location.pathname === '/ui/tasks/t-console/runs'", WAIT)
        .await?;
    assert_eq!(
        page.text("table.runs .outcome").await?.as_deref(),
        Some("enqueued")
    );

    // Deliveries and health.
    page.navigate(&format!("{api}/ui/deliveries")).await?;
    page.wait_for(
        "document.querySelectorAll('table.deliveries .outcome-ok').length >= 2",
        WAIT,
    )
    .await?;
    // The failed action is listed with its plain reason, and no retry: it would fail again.
    let failed = page
        .eval(
            "[...document.querySelectorAll('table.deliveries tr')].filter(r => r.querySelector('.outcome-failed')) \
             .map(r => [r.querySelector('td.reason').textContent, r.querySelector('form.retry') !== null])",
        )
        .await?;
    let failed: Vec<(String, bool)> = serde_json::from_value(failed)?;
    assert!(
        failed
            .iter()
            .any(|(reason, retry)| reason.starts_with("unknown action \"reboot_world\"") && !retry),
        "{failed:?}"
    );
    screenshots(&mut page, "deliveries").await?;

    // Agents and spend: the model agent's tokens by day as a chart, and its budget left.
    page.navigate(&format!("{api}/ui/agents")).await?;
    assert_eq!(
        page.eval("document.querySelectorAll('section[data-agent=writer] svg rect.bar').length")
            .await?,
        json!(30)
    );
    let budget = page
        .text("section[data-agent=writer] li.budget")
        .await?
        .unwrap_or_default();
    assert!(budget.contains("of 100,000 tokens used"), "{budget}");
    screenshots(&mut page, "agents").await?;

    page.navigate(&format!("{api}/ui/health")).await?;
    assert_eq!(
        page.eval("document.querySelectorAll('table.health .outcome-ok').length")
            .await?,
        json!(4)
    );
    let running = page
        .text("li[data-fact=running]")
        .await?
        .unwrap_or_default();
    assert!(running.ends_with(" of 8"), "{running}");
    assert_eq!(
        page.text("li[data-fact=backend]").await?.as_deref(),
        Some("Backend: process")
    );
    screenshots(&mut page, "health").await?;

    // The terminal's view of the same: aligned tables, no colour codes off a terminal.
    let cli = ferroclaw_e2e::binary("ferroclaw")?;
    let run = |args: &[&str]| {
        std::process::Command::new(&cli)
            .args(args)
            .env("FERROCLAW_API", &api)
            .env("FERROCLAW_API_TOKEN", TOKEN)
            .output()
    };
    let status = run(&["status"])?;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        text.contains("runner     ready") && text.contains("backend"),
        "{text}"
    );
    assert!(
        text.contains("unknown action"),
        "the failure is listed: {text}"
    );
    assert!(!text.contains('\x1b'), "{text}");
    let sessions = run(&["sessions", "--agent", "writer"])?;
    let text = String::from_utf8_lossy(&sessions.stdout).into_owned();
    assert!(sessions.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("SESSION"), "{text}");
    assert!(
        lines[1].contains("api:writer-1") && lines[1].contains('$'),
        "{text}"
    );
    assert!(text.contains("1 of 1 sessions"), "{text}");

    // Sign out: back to the form, and the pages need a sign-in again.
    page.click("form.sign-out button").await?;
    page.wait_for("document.querySelector('#token') !== null", WAIT)
        .await?;
    page.navigate(&format!("{api}/ui/sessions")).await?;
    assert_eq!(page.eval("location.pathname").await?, json!("/ui"));
    assert!(page.text("#token").await?.is_some(), "the sign-in form");

    println!("screenshots in {}", screenshot_dir().display());
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_without_the_csrf_token_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &token_env()).await?;
    let api = cluster.api();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let signed = http
        .post(format!("{api}/ui/sign-in"))
        .form(&[("token", TOKEN)])
        .send()
        .await?;
    assert_eq!(signed.status(), 303);
    let set = signed
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    assert!(cookie.starts_with("ferroclaw_console="), "{set}");

    let page = http
        .get(format!("{api}/ui/conversations/csrf-check"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(page.status(), 200);
    let html = page.text().await?;
    let csrf = html
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    assert!(!csrf.is_empty(), "the page carries a CSRF token");

    let send = |form: Vec<(&'static str, String)>| {
        http.post(format!("{api}/ui/conversations/csrf-check/messages"))
            .header("cookie", &cookie)
            .header("x-console-fetch", "1")
            .form(&form)
            .send()
    };
    for form in [
        vec![("text", "forged".to_string()), ("sender", "eve".into())],
        vec![
            ("text", "forged".to_string()),
            ("sender", "eve".into()),
            ("csrf", "0".repeat(64)),
        ],
    ] {
        let refused = send(form).await?;
        assert_eq!(refused.status(), 403);
        assert!(refused.text().await?.contains("CSRF"));
    }
    let refused = http
        .post(format!("{api}/ui/tasks/t-any/pause"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(refused.status(), 403);

    // With the token the same form goes through, and only that message reaches the agent.
    let sent = send(vec![
        ("text", "genuine".to_string()),
        ("sender", "ann".into()),
        ("csrf", csrf),
    ])
    .await?;
    assert_eq!(sent.status(), 202);
    let lines = cluster
        .wait_for_lines("csrf-check", &["echo: genuine".into()], WAIT)
        .await?;
    assert!(!lines.iter().any(|l| l.contains("forged")), "{lines:?}");
    cluster.stop().await
}
