//! A harness that starts the four real service binaries as separate processes on free
//! ports (each announces its address; nothing is guessed) and talks to them over REST.
//! Used by the end-to-end tests in `e2e/` and by the `pipeline-bench` binary.
//!
//! The binaries must be built first: `cargo build --workspace --bins`.

pub mod browser;
pub mod docker_tls_proxy;
pub mod fake_discord;
pub mod fake_model;
pub mod otlp_receiver;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferroclaw_common::launch::{ServiceProcess, launch, sibling_binary};
use serde_json::{Value, json};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The four services of one ferroclaw installation, started on a fresh data directory.
pub struct Cluster {
    pub data_dir: PathBuf,
    envs: Vec<(&'static str, String)>,
    pub runner: ServiceProcess,
    pub delivery: ServiceProcess,
    pub scheduler: ServiceProcess,
    pub gateway: ServiceProcess,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

/// Path of a ferroclaw binary built by cargo, with a clear message when it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = sibling_binary(name);
    if !path.is_file() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` before the end-to-end tests",
            path.display()
        );
    }
    Ok(path)
}

impl Cluster {
    /// Starts runner, delivery, scheduler and gateway; `extra` env applies to all of them
    /// (and, through the runner, to agents).
    pub async fn start(data_dir: &Path, extra: &[(&'static str, String)]) -> anyhow::Result<Self> {
        let mut envs: Vec<(&'static str, String)> = vec![
            ("FERROCLAW_DATA_DIR", data_dir.display().to_string()),
            ("FERROCLAW_RUNNER_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_DELIVERY_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_SCHEDULER_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_GATEWAY_GRPC_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_HTTP_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_PROXY_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_RUNNER_METRICS_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_DELIVERY_METRICS_ADDR", "127.0.0.1:0".into()),
            ("FERROCLAW_SCHEDULER_METRICS_ADDR", "127.0.0.1:0".into()),
            (
                "FERROCLAW_AGENT_BINARY",
                binary("ferroclaw-agent")?.display().to_string(),
            ),
        ];
        if std::env::var_os("RUST_LOG").is_none() {
            // Keep test output readable; RUST_LOG=info shows the services' logs.
            envs.push(("RUST_LOG", "warn".into()));
        }
        envs.extend(extra.iter().cloned());
        let token = envs
            .iter()
            .find(|(k, _)| *k == "FERROCLAW_API_TOKEN")
            .map(|(_, v)| v.clone());
        let runner = start("runner", &envs, &[]).await?;
        envs.push(("FERROCLAW_RUNNER_URL", runner.grpc_url()));
        let scheduler = start("scheduler", &envs, &[]).await?;
        envs.push(("FERROCLAW_SCHEDULER_URL", scheduler.grpc_url()));
        let delivery = start("delivery", &envs, &[]).await?;
        envs.push(("FERROCLAW_DELIVERY_URL", delivery.grpc_url()));
        let gateway = start("gateway", &envs, &[]).await?;
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            envs,
            runner,
            delivery,
            scheduler,
            gateway,
            http: reqwest::Client::new(),
            token,
        })
    }

    /// A gRPC channel to one of the services that presents the cluster's internal token.
    pub fn internal_channel(
        &self,
        url: &str,
    ) -> anyhow::Result<ferroclaw_common::grpc_auth::GrpcChannel> {
        let (auth, _) = ferroclaw_common::grpc_auth::internal_auth(&self.data_dir)?;
        Ok(ferroclaw_common::grpc::channel(url, auth)?)
    }

    pub fn api(&self) -> String {
        format!(
            "http://{}",
            self.gateway
                .http
                .expect("gateway announces its HTTP address")
        )
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.api()));
        match &self.token {
            Some(t) => builder.bearer_auth(t),
            None => builder,
        }
    }

    /// The task `id` from `GET /v1/tasks`, once it is there (tasks are synced a moment
    /// after the agent's action).
    pub async fn task(&self, id: &str) -> anyhow::Result<Value> {
        for _ in 0..100 {
            let (_, body) = self.get("/v1/tasks").await?;
            if let Some(t) = body["tasks"]
                .as_array()
                .and_then(|ts| ts.iter().find(|t| t["id"].as_str() == Some(id)))
            {
                return Ok(t.clone());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!("task {id} never appeared")
    }

    /// The runs of task `id` from `GET /v1/tasks/{id}/runs`, once there are `at_least`: the
    /// scheduler records a run after the runner took its message, so the run's reply may
    /// arrive first.
    pub async fn runs(&self, id: &str, at_least: usize) -> anyhow::Result<Vec<Value>> {
        let mut runs = Vec::new();
        for _ in 0..100 {
            let (_, body) = self.get(&format!("/v1/tasks/{id}/runs")).await?;
            runs = body["runs"].as_array().cloned().unwrap_or_default();
            if runs.len() >= at_least {
                return Ok(runs);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "task {id} has {} runs, not {at_least}: {runs:?}",
            runs.len()
        )
    }

    /// `POST /v1/messages`; returns the status and JSON body.
    pub async fn post_message(
        &self,
        conversation: &str,
        text: &str,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .request(reqwest::Method::POST, "/v1/messages")
            .json(&json!({"conversation": conversation, "text": text, "sender": "tester"}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        send(request).await
    }

    /// Posts `text` until the API takes it (202) or `wait` passes, under one idempotency
    /// key throughout (`<conversation>:<text>`), so a try cut short by a failover is never
    /// enqueued twice.
    pub async fn post_until_taken(
        &self,
        conversation: &str,
        text: &str,
        wait: Duration,
    ) -> anyhow::Result<()> {
        let key = format!("{conversation}:{text}");
        let deadline = Instant::now() + wait;
        loop {
            match self.post_message(conversation, text, Some(&key)).await {
                Ok((202, _)) => return Ok(()),
                Ok((status, body)) if Instant::now() > deadline => {
                    bail!("{conversation}: {text} never taken: {status} {body}")
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `POST /v1/hooks/{source}`.
    pub async fn post_hook(
        &self,
        source: &str,
        payload: &Value,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .request(reqwest::Method::POST, &format!("/v1/hooks/{source}"))
            .json(payload);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        send(request).await
    }

    /// `GET /v1/conversations/{id}/messages?after=&wait=`: (messages, next cursor).
    pub async fn messages(
        &self,
        conversation: &str,
        after: i64,
        wait_secs: f64,
    ) -> anyhow::Result<(Vec<Value>, i64)> {
        let path =
            format!("/v1/conversations/{conversation}/messages?after={after}&wait={wait_secs}");
        let (status, body) = send(self.request(reqwest::Method::GET, &path)).await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        Ok((messages, body["next_cursor"].as_i64().unwrap_or(after)))
    }

    /// Every reply text of a conversation so far.
    pub async fn texts(&self, conversation: &str) -> anyhow::Result<Vec<String>> {
        let (messages, _) = self.messages(conversation, 0, 0.0).await?;
        Ok(messages
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// Waits until the conversation's replies contain every one of `lines` (echo replies
    /// may quote several messages, one per line); returns all reply lines.
    pub async fn wait_for_lines(
        &self,
        conversation: &str,
        lines: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut cursor = 0;
        let mut seen: Vec<String> = Vec::new();
        loop {
            if lines.iter().all(|l| seen.contains(l)) {
                return Ok(seen);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{conversation}: timed out; expected {lines:?}, have {seen:?}");
            }
            let (messages, next) = self
                .messages(conversation, cursor, left.as_secs_f64().min(5.0))
                .await?;
            cursor = next;
            for m in messages {
                seen.extend(
                    m["text"]
                        .as_str()
                        .unwrap_or_default()
                        .lines()
                        .map(String::from),
                );
            }
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        send(self.request(reqwest::Method::GET, path)).await
    }

    /// SIGKILL the runner (its agents notice and exit on their own).
    pub async fn kill_runner(&mut self) -> anyhow::Result<()> {
        self.runner.child.kill().await.context("kill runner")?;
        self.runner.child.wait().await?;
        Ok(())
    }

    /// SIGKILL delivery, mid-send or not.
    pub async fn kill_delivery(&mut self) -> anyhow::Result<()> {
        self.delivery.child.kill().await.context("kill delivery")?;
        self.delivery.child.wait().await?;
        Ok(())
    }

    /// Starts a new delivery on the address the old one had.
    pub async fn restart_delivery(&mut self) -> anyhow::Result<()> {
        let addr = self.delivery.grpc.context("delivery address")?;
        self.delivery = start(
            "delivery",
            &self.envs,
            &[("FERROCLAW_DELIVERY_ADDR", addr.to_string())],
        )
        .await?;
        Ok(())
    }

    /// Delivery's ledger, newest first (`ListDeliveries`).
    pub async fn deliveries(&self) -> anyhow::Result<Vec<ferroclaw_proto::v1::DeliveryRecord>> {
        let channel = self.internal_channel(&self.delivery.grpc_url())?;
        let response = ferroclaw_proto::v1::delivery_client::DeliveryClient::new(channel)
            .list_deliveries(ferroclaw_proto::v1::ListDeliveriesRequest { limit: 1000 })
            .await?;
        Ok(response.into_inner().deliveries)
    }

    /// Starts one more instance of `service` ("delivery", "scheduler", …) beside the
    /// cluster's, on addresses of its own, with the cluster's environment and `overrides`
    /// (a standby, or a second worker sharing a PostgreSQL database). The caller stops it.
    pub async fn start_another(
        &self,
        service: &str,
        overrides: &[(&'static str, String)],
    ) -> anyhow::Result<ServiceProcess> {
        start(service, &self.envs, overrides).await
    }

    /// Sets an environment variable for services started from now on (e.g. a restart).
    pub fn envs_set(&mut self, key: &'static str, value: &str) {
        self.envs.retain(|(k, _)| *k != key);
        self.envs.push((key, value.to_string()));
    }

    /// Starts a new runner on the address the old one had, so peers reconnect to it.
    pub async fn restart_runner(&mut self) -> anyhow::Result<()> {
        let addr = self.runner.grpc.context("runner address")?;
        // The proxy keeps its address too: agents of the old runner may still be finishing.
        let proxy = self.runner.http.context("runner proxy address")?;
        self.runner = start(
            "runner",
            &self.envs,
            &[
                ("FERROCLAW_RUNNER_ADDR", addr.to_string()),
                ("FERROCLAW_PROXY_ADDR", proxy.to_string()),
            ],
        )
        .await?;
        Ok(())
    }

    /// Stops the gateway (SIGTERM) and starts a new one on the same addresses.
    pub async fn restart_gateway(&mut self) -> anyhow::Result<()> {
        let http = self.gateway.http.context("gateway HTTP address")?;
        let grpc = self.gateway.grpc.context("gateway gRPC address")?;
        let status = self.gateway.stop(Duration::from_secs(15)).await?;
        anyhow::ensure!(status.success(), "gateway exited with {status}");
        self.gateway = start(
            "gateway",
            &self.envs,
            &[
                ("FERROCLAW_HTTP_ADDR", http.to_string()),
                ("FERROCLAW_GATEWAY_GRPC_ADDR", grpc.to_string()),
            ],
        )
        .await?;
        Ok(())
    }

    /// SIGTERM to every service, gateway first; fails when one does not exit cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(15);
        let mut failures = Vec::new();
        for service in [
            &mut self.gateway,
            &mut self.delivery,
            &mut self.scheduler,
            &mut self.runner,
        ] {
            let status = service.stop(grace).await?;
            if !status.success() {
                failures.push(format!("{}: {status}", service.name));
            }
        }
        if !failures.is_empty() {
            bail!("services did not stop cleanly: {failures:?}");
        }
        Ok(())
    }
}

async fn start(
    name: &str,
    envs: &[(&'static str, String)],
    overrides: &[(&'static str, String)],
) -> anyhow::Result<ServiceProcess> {
    let mut all: Vec<(&str, String)> = envs.to_vec();
    all.extend(overrides.iter().cloned());
    let binary = binary(&format!("ferroclaw-{name}"))?;
    Ok(launch(name, &binary, &all, READY_TIMEOUT).await?)
}

async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// A read-only connection to a session's `inbound.db` under `data_dir`.
pub async fn inbound_db(
    data_dir: &Path,
    agent: &str,
    session_id: &str,
) -> anyhow::Result<sqlx::SqliteConnection> {
    use sqlx::ConnectOptions;
    let path = data_dir
        .join("sessions")
        .join(agent)
        .join(session_id)
        .join("in/inbound.db");
    Ok(sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .connect()
        .await?)
}

/// Pids of the agent processes serving sessions under `data_dir`, by session directory.
pub fn agent_processes(data_dir: &Path) -> Vec<(u32, String)> {
    let needle = data_dir.join("sessions").display().to_string();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.ends_with("ferroclaw-agent")) {
            continue;
        }
        if let Some(dir) = args
            .iter()
            .skip_while(|a| *a != "--session-dir")
            .nth(1)
            .filter(|d| d.starts_with(&needle))
        {
            found.push((pid, dir.clone()));
        }
    }
    found
}

impl Cluster {
    /// `POST` a JSON body to an API path; returns the status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        send(self.request(reqwest::Method::POST, path).json(body)).await
    }

    /// The task mirror in a session's mailbox, as (id, spec) — what the agent's
    /// `list_tasks` reads.
    pub async fn mirrored_tasks(
        &self,
        agent: &str,
        session_id: &str,
    ) -> anyhow::Result<Vec<(String, Value)>> {
        let mut conn = inbound_db(&self.data_dir, agent, session_id).await?;
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, spec FROM tasks ORDER BY id")
            .fetch_all(&mut conn)
            .await?;
        rows.into_iter()
            .map(|(id, spec)| Ok((id, serde_json::from_str(&spec)?)))
            .collect()
    }
}

/// Whether a Docker engine answers. With `FERROCLAW_REQUIRE_DOCKER=1` (CI) a missing engine
/// is a failure, not a skip.
pub fn docker_available() -> bool {
    let ok = std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("FERROCLAW_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("FERROCLAW_REQUIRE_DOCKER=1 but no Docker engine answers");
    }
    ok
}

/// Builds the images once per test binary with the offline script (no registry needed),
/// from the binaries already built; returns the agent image name.
pub fn offline_agent_image() -> anyhow::Result<String> {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/build-offline.sh");
    if !*built {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(["--tag", "e2e", "--no-build"])
            .output()?;
        if !out.status.success() {
            bail!(
                "offline image build failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        *built = true;
    }
    Ok("ferroclaw-agent:e2e".into())
}

/// `docker inspect` of one container, as JSON (`None` when it does not exist).
pub fn docker_inspect(name: &str) -> Option<Value> {
    let out = std::process::Command::new("docker")
        .args(["inspect", name])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.get(0).cloned()
}

/// Runs `docker ARGS`, failing on a non-zero exit.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("docker").args(args).output()?;
    if !out.status.success() {
        bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The compose command here: the `docker compose` plugin, else standalone `docker-compose`.
pub fn compose_command() -> Option<Vec<String>> {
    let works = |cmd: &[&str]| {
        std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&["docker", "compose"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else if works(&["docker-compose"]) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

/// Builds an agent image from the hostile test binary (for the isolation test).
pub fn offline_hostile_image() -> anyhow::Result<String> {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/build-offline.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args([
                "--tag",
                "e2e",
                "--no-build",
                "--agent-binary",
                "hostile-agent",
            ])
            .args(["--agent-image", "ferroclaw-hostile"])
            .output()?;
        if !out.status.success() {
            bail!(
                "hostile image build failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        *built = true;
    }
    Ok("ferroclaw-hostile:e2e".into())
}

/// The environment that makes the process backend run the hostile stand-in agent.
pub fn hostile_process_agent() -> anyhow::Result<(&'static str, String)> {
    Ok((
        "FERROCLAW_AGENT_BINARY",
        binary("hostile-agent")?.display().to_string(),
    ))
}

/// The directory of session `session_id` of agent `main` under `data_dir`.
pub fn session_dir(data_dir: &Path, session_id: &str) -> PathBuf {
    data_dir.join("sessions/main").join(session_id)
}

/// Polls `ready` every 100 ms until it holds; fails naming `what` after `limit`.
pub async fn wait_until(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    while !ready() {
        if started.elapsed() > limit {
            bail!("waited {limit:?} in vain: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The `detail` of every outbound row of a session that was settled as failed, read from
/// its `in/inbound.db` (where the agent sees them too).
pub async fn failed_details(session_dir: &Path) -> anyhow::Result<Vec<String>> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(session_dir.join("in/inbound.db"))
        .read_only(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(options)
        .await?;
    let rows: Vec<(Option<String>,)> =
        sqlx::query_as("SELECT detail FROM delivered WHERE outcome = 'failed' ORDER BY out_seq")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    Ok(rows.into_iter().map(|(d,)| d.unwrap_or_default()).collect())
}

/// What a process holds, from /proc: resident memory (kB), threads and open files.
pub struct Footprint {
    pub rss_kb: u64,
    pub threads: usize,
    pub files: usize,
}

pub fn footprint(pid: u32) -> anyhow::Result<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Footprint {
        rss_kb,
        threads: std::fs::read_dir(format!("/proc/{pid}/task"))?.count(),
        files: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
    })
}

/// CPU time of a process from `/proc/<pid>/stat`, in seconds: its own (user + system), and
/// that of its children it has waited for (the runner's exited agents).
pub fn cpu_times(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis: utime, stime, cutime and cstime
    // are the 12th to 15th of them.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    let [utime, stime, cutime, cstime] = fields[..] else {
        return None;
    };
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(((utime + stime) / ticks, (cutime + cstime) / ticks))
}
