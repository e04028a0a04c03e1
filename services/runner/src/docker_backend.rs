//! The `docker` backend: each session's agent in its own locked-down container, created
//! through the Docker API (bollard), never the docker CLI.
//!
//! Hardened by default: a non-root user, a read-only root file system, a tmpfs `/tmp`, every
//! capability dropped, `no-new-privileges`, pids/memory/CPU limits, and only this
//! session's mounts (its `in/` read-only, its `out/` read-write, the agent's memory folder
//! read-write, `global/` read-only). Containers carry labels and a deterministic name, so a
//! restarted runner adopts those of known sessions and removes the rest.
//!
//! Network: none for agents that call no model; model agents join an internal network (no
//! route out of the host) whose only service for them is the runner's credential proxy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
    WaitContainerOptions,
};
use ferroclaw_common::config::AgentConfig;
use ferroclaw_common::error_text::with_causes;
use ferroclaw_mailbox::SessionPaths;
use ferroclaw_mailbox::session_fs::Dir;
use tokio::sync::OnceCell;
use tokio_stream::StreamExt;

use crate::credential_proxy::ModelAccess;
use crate::error::{Result, RunnerError};
use crate::registry::SessionRecord;

/// The agent's user inside its container (the image's /etc/passwd names it).
pub const AGENT_UID: u32 = 10001;
const LABEL_MANAGED: &str = "ferroclaw.managed";
const LABEL_SESSION: &str = "ferroclaw.session";
const LABEL_AGENT: &str = "ferroclaw.agent";
/// Which installation (data directory) a container belongs to: a runner adopts or removes
/// only its own, even when several installations share one engine.
const LABEL_INSTANCE: &str = "ferroclaw.instance";

/// Resource limits of one agent container.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_mb: i64,
    pub cpus: f64,
    pub pids: i64,
}

pub struct DockerBackend {
    docker: OnceCell<Docker>,
    instance: String,
    image: String,
    data_dir: PathBuf,
    idle_timeout_secs: u64,
    max_attempts: u32,
    limits: Limits,
    model_access: ModelAccess,
    /// The internal network of model agents, and the proxy URL they use on it.
    network: String,
    proxy_url: OnceCell<String>,
    /// `OTEL_*` for agents that export spans: only with `runner.agent_otlp_endpoint`, an
    /// address on the agents network (see [`crate::backend::telemetry_env`]).
    telemetry_env: Vec<(String, String)>,
}

/// One agent container of a session, started or adopted.
pub struct ContainerRun {
    docker: Docker,
    pub name: String,
}

/// How long the status probe waits for the engine's version.
const ENGINE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// "Docker 20.10.24, API 1.41" from what the engine says of itself.
fn describe_version(version: Option<&str>, api: Option<&str>) -> String {
    format!(
        "Docker {}, API {}",
        version.unwrap_or("(version unknown)"),
        api.unwrap_or("(unknown)")
    )
}

/// The engine `DOCKER_HOST` names, read as the docker CLI reads it: the local Unix socket
/// by default; `tcp://host:2376` with mutual TLS when `DOCKER_TLS_VERIFY` is set (the client
/// key, certificate and CA as `key.pem`, `cert.pem` and `ca.pem` in `DOCKER_CERT_PATH`); plain
/// `tcp://` otherwise, for a private network only, since whoever reaches an engine owns its
/// host.
fn connect() -> std::result::Result<Docker, bollard::errors::Error> {
    match std::env::var("DOCKER_HOST") {
        // Empty counts as unset, as for the docker CLI.
        Ok(host) if !host.is_empty() => Docker::connect_with_host(&host),
        _ => Docker::connect_with_local_defaults(),
    }
}

/// Where the engine is, for status pages: `None` for the local socket.
fn engine_host() -> Option<String> {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty() && !h.starts_with("unix://"))
        .map(|h| {
            let tls = std::env::var_os("DOCKER_TLS_VERIFY").is_some();
            format!("{h}{}", if tls { " (TLS)" } else { "" })
        })
}

fn docker_error(e: bollard::errors::Error) -> RunnerError {
    RunnerError::Docker(with_causes(&e))
}

/// The installation label: a stable hash of the data directory's absolute path.
fn instance_of(data_dir: &Path) -> String {
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let hash =
        ferroclaw_common::ids::stable_hash(path.as_os_str().as_encoded_bytes().iter().copied());
    format!("{hash:016x}")
}

/// The deterministic container name of a session.
pub fn container_name(session_id: &str) -> String {
    format!("ferroclaw-agent-{session_id}")
}

impl DockerBackend {
    pub fn new(
        image: String,
        data_dir: PathBuf,
        idle_timeout_secs: u64,
        max_attempts: u32,
        limits: Limits,
        model_access: ModelAccess,
        network: String,
    ) -> Self {
        Self {
            docker: OnceCell::new(),
            instance: instance_of(&data_dir),
            image,
            data_dir,
            idle_timeout_secs,
            max_attempts,
            limits,
            model_access,
            network,
            proxy_url: OnceCell::new(),
            telemetry_env: Vec::new(),
        }
    }

    /// Agents export their spans with this environment.
    pub fn with_telemetry_env(mut self, env: Vec<(String, String)>) -> Self {
        self.telemetry_env = env;
        self
    }

    /// Creates the agents' internal network unless it exists (compose creates it itself);
    /// returns the proxy URL agents use on it: the configured one, else the network's
    /// gateway (this host) at the proxy's port.
    async fn agent_network(&self, docker: &Docker) -> Result<String> {
        self.proxy_url
            .get_or_try_init(|| async {
                let found = match docker.inspect_network(&self.network, None).await {
                    Ok(found) => found,
                    Err(_) => {
                        let labels = HashMap::from([
                            (LABEL_MANAGED.to_string(), "true".to_string()),
                            (LABEL_INSTANCE.to_string(), self.instance.clone()),
                        ]);
                        let created = docker
                            .create_network(NetworkCreateRequest {
                                name: self.network.clone(),
                                driver: Some("bridge".into()),
                                internal: Some(true),
                                labels: Some(labels),
                                ..Default::default()
                            })
                            .await;
                        if let Err(e) = created {
                            // A concurrent start may have created it: inspect decides.
                            tracing::debug!(error = %e, "creating the agent network");
                        }
                        docker
                            .inspect_network(&self.network, None)
                            .await
                            .map_err(|e| {
                                RunnerError::Docker(format!(
                                    "agent network {}: {e}",
                                    self.network
                                ))
                            })?
                    }
                };
                if found.internal != Some(true) {
                    tracing::warn!(network = %self.network, "the agent network is not internal: agents can reach more than the proxy");
                }
                if let Some(url) = &self.model_access.configured_url {
                    return Ok(url.clone());
                }
                let gateway = found
                    .ipam
                    .and_then(|i| i.config)
                    .and_then(|c| c.into_iter().find_map(|c| c.gateway))
                    .ok_or_else(|| {
                        RunnerError::Docker(format!(
                            "agent network {} has no gateway; set runner.proxy_url",
                            self.network
                        ))
                    })?;
                if self.model_access.listen.ip().is_loopback() {
                    tracing::warn!(proxy = %self.model_access.listen, "the credential proxy listens on loopback, which agent containers cannot reach: set runner.proxy_listen to 0.0.0.0:<port> or the network's gateway");
                }
                Ok(format!("http://{gateway}:{}", self.model_access.listen.port()))
            })
            .await
            .cloned()
    }

    /// The engine connection, negotiated on first use (the engine may come up after us).
    async fn docker(&self) -> Result<Docker> {
        self.engine().await.map_err(|e| {
            RunnerError::Docker(format!("Docker engine unreachable: {}", with_causes(&e)))
        })
    }

    /// [`Self::docker`] with bollard's own error, for messages that say it their way.
    async fn engine(&self) -> std::result::Result<Docker, bollard::errors::Error> {
        self.docker
            .get_or_try_init(|| async { connect()?.negotiate_version().await })
            .await
            .cloned()
    }

    /// The engine's version, "Docker 20.10.24, API 1.41", asked within
    /// [`ENGINE_PROBE_TIMEOUT`] (a status page must not hang on a stuck engine); else
    /// why it does not answer.
    pub async fn engine_version(&self) -> std::result::Result<String, String> {
        let ask = async {
            let docker = self.engine().await.map_err(|e| with_causes(&e))?;
            docker.version().await.map_err(|e| with_causes(&e))
        };
        let version = tokio::time::timeout(ENGINE_PROBE_TIMEOUT, ask)
            .await
            .map_err(|_| format!("no answer within {} s", ENGINE_PROBE_TIMEOUT.as_secs_f32()))??;
        let described =
            describe_version(version.version.as_deref(), version.api_version.as_deref());
        Ok(match engine_host() {
            Some(host) => format!("{described} at {host}"),
            None => described,
        })
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<()> {
        let docker = self.docker().await?;
        docker.ping().await.map(|_| ()).map_err(|e| {
            RunnerError::Docker(format!("Docker engine unreachable: {}", with_causes(&e)))
        })
    }

    /// Containers this runner family created earlier: (name, session id, running).
    pub async fn managed(&self) -> Result<Vec<(String, String, bool)>> {
        let docker = self.docker().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.instance),
            ],
        )]);
        let containers = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(docker_error)?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let session = labels.get(LABEL_SESSION)?.clone();
                let name = c.names?.first()?.trim_start_matches('/').to_string();
                let running = c.state.is_some_and(|s| s.to_string() == "running");
                Some((name, session, running))
            })
            .collect())
    }

    /// Removes a container (after it is stopped or when its session is unknown).
    pub async fn remove(&self, name: &str) -> Result<()> {
        let docker = self.docker().await?;
        remove(&docker, name).await
    }

    /// Starts the session's container, or adopts it when it already runs (inspect first,
    /// create only when absent).
    pub async fn start(
        &self,
        session: &SessionRecord,
        paths: &SessionPaths,
        agent: &AgentConfig,
    ) -> Result<ContainerRun> {
        let docker = self.docker().await?;
        let name = container_name(&session.id);
        if let Ok(found) = docker.inspect_container(&name, None).await {
            if found.state.and_then(|s| s.running).unwrap_or(false) {
                tracing::info!(container = %name, "adopting the running agent container");
                return Ok(ContainerRun { docker, name });
            }
            remove(&docker, &name).await?;
            // The name is free only once the removal has finished.
            for _ in 0..100 {
                if docker.inspect_container(&name, None).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let agent_dir = self.data_dir.join("agents").join(&agent.name);
        let global_dir = self.data_dir.join("global");
        let memory_dir = agent.shared_memory_dir(&self.data_dir);
        let (out_dir, owned_memory) = (paths.out_dir(), memory_dir.clone());
        tokio::task::spawn_blocking(move || {
            prepare_agent_owned_dir(&out_dir)?;
            owned_memory.map_or(Ok(()), |m| prepare_agent_owned_dir(&m))
        })
        .await
        .map_err(|e| RunnerError::Config(format!("preparing the agent's directories: {e}")))??;
        // The operator's instructions: made if missing, never given to the agent's user.
        for dir in [&agent_dir, &global_dir] {
            std::fs::create_dir_all(dir).map_err(|source| RunnerError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let bind =
            |host: &Path, inside: &str, mode: &str| format!("{}:{inside}:{mode}", host.display());
        let mut env: Vec<String> = crate::backend::passthrough_env(false)
            .into_iter()
            .chain(self.telemetry_env.iter().cloned())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push("FERROCLAW_SESSION_DIR=/session".into());
        let network = if agent.uses_model_api() {
            let proxy_url = self.agent_network(&docker).await?;
            env.extend(
                self.model_access
                    .agent_env(&session.id, agent, &proxy_url)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}")),
            );
            self.network.clone()
        } else {
            "none".to_string()
        };
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_SESSION.to_string(), session.id.clone()),
            (LABEL_AGENT.to_string(), agent.name.clone()),
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
        ]);
        let mut binds = vec![
            bind(&paths.in_dir(), "/session/in", "ro"),
            bind(&paths.out_dir(), "/session/out", "rw"),
            // The operator's instructions: no session may rewrite another's system prompt.
            bind(&agent_dir, "/agent", "ro"),
            bind(&global_dir, "/global", "ro"),
        ];
        if let Some(memory) = &memory_dir {
            binds.push(bind(memory, "/memory", "rw"));
        }
        let host_config = HostConfig {
            binds: Some(binds),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                "rw,noexec,nosuid,nodev,size=64m".to_string(),
            )])),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            pids_limit: Some(self.limits.pids),
            memory: Some(self.limits.memory_mb * 1024 * 1024),
            nano_cpus: Some((self.limits.cpus * 1e9) as i64),
            network_mode: Some(network),
            init: Some(false),
            ..Default::default()
        };
        let mut cmd: Vec<String> = vec![
            "--session-dir".into(),
            "/session".into(),
            "--agent-dir".into(),
            "/agent".into(),
            "--global-dir".into(),
            "/global".into(),
            "--provider".into(),
            agent.provider.clone(),
            "--timezone".into(),
            agent.timezone.clone(),
            "--idle-timeout-secs".into(),
            self.idle_timeout_secs.to_string(),
            // A read-only in/ mount cannot host WAL's shared-memory index.
            "--journal-mode".into(),
            "delete".into(),
            "--max-attempts".into(),
            self.max_attempts.to_string(),
        ];
        if memory_dir.is_some() {
            cmd.extend(["--memory-dir".into(), "/memory".into()]);
        }
        let config = ContainerCreateBody {
            image: Some(self.image.clone()),
            user: Some(format!("{AGENT_UID}:{AGENT_UID}")),
            cmd: Some(cmd),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                config,
            )
            .await
            .map_err(docker_error)?;
        docker
            .start_container(
                &name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(docker_error)?;
        tracing::info!(container = %name, image = %self.image, "agent container started");
        Ok(ContainerRun { docker, name })
    }
}

impl ContainerRun {
    /// Waits for the container to exit, removes it, and says whether it exited cleanly.
    pub async fn wait(&self) -> Result<(bool, String)> {
        let mut stream = self.docker.wait_container(
            &self.name,
            Some(WaitContainerOptions {
                condition: "not-running".into(),
            }),
        );
        let outcome = match stream.next().await {
            Some(Ok(response)) => (
                response.status_code == 0,
                format!("exit code {}", response.status_code),
            ),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                (false, format!("exit code {code}"))
            }
            Some(Err(e)) => (false, format!("wait failed: {e}")),
            None => (false, "wait ended without a status".into()),
        };
        if let Err(e) = remove(&self.docker, &self.name).await {
            tracing::warn!(container = %self.name, error = %e, "cannot remove the container");
        }
        Ok(outcome)
    }

    /// Asks the agent to stop (SIGTERM, so it finishes its batch), then kills it after `grace`.
    pub async fn stop(&self, grace: Duration) {
        let options = StopContainerOptions {
            t: Some(grace.as_secs() as i32),
            signal: None,
        };
        if let Err(e) = self.docker.stop_container(&self.name, Some(options)).await {
            tracing::warn!(container = %self.name, error = %e, "cannot stop the container");
        }
    }
}

async fn remove(docker: &Docker, name: &str) -> Result<()> {
    docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .or_else(|e| match e {
            // Gone already, or its removal is under way.
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            } => Ok(()),
            other => Err(docker_error(other)),
        })
}

/// Makes `dir` (and its missing parents) and gives `dir` itself to the agent's user.
///
/// Only the directory the runner made is chowned, through its descriptor: never a walk of
/// what the agent put inside (which may hold links to host files, loops or a deep tree),
/// since everything the agent created there is the agent's already.
fn prepare_agent_owned_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| RunnerError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Dir::open(dir)
        .and_then(|d| d.chown(AGENT_UID, AGENT_UID))
        .map_err(|e| RunnerError::Mailbox(e.into()))
}

#[cfg(test)]
mod tests {
    use super::describe_version;

    #[test]
    fn the_engine_is_described_by_its_version_and_api() {
        assert_eq!(
            describe_version(Some("20.10.24"), Some("1.41")),
            "Docker 20.10.24, API 1.41"
        );
        assert_eq!(
            describe_version(None, Some("1.41")),
            "Docker (version unknown), API 1.41"
        );
    }
}
