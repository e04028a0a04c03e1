//! The runner: owns sessions, their directories and their agents (ARCHITECTURE.md §2).
//! It is the only process that touches session directories.

pub mod activity;
mod agent_usage;
pub mod backend;
mod count_cache;
pub mod credential_proxy;
pub mod disk_quota;
pub mod docker_backend;
pub mod error;
pub mod handoff;
mod mailbox_view;
mod mailboxes;
pub mod metrics;
pub mod outbound_feed;
pub mod outbound_policy;
pub mod placement;
pub mod process_backend;
pub mod registry;
mod routing;
mod service;
#[cfg(test)]
mod service_tests;
pub mod session_files;
mod session_list;
mod session_messages;
pub mod slot_policy;
pub mod standby;
pub mod supervisor;
mod upkeep;
pub mod utc_day;

use std::collections::HashMap;
use std::sync::Arc;

use ferroclaw_common::Config;
use ferroclaw_common::grpc;
use ferroclaw_mailbox::JournalMode;
use ferroclaw_proto::v1::runner_server::RunnerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{Result, RunnerError};

use crate::backend::Backend;
use crate::docker_backend::{DockerBackend, Limits};
use crate::mailboxes::Mailboxes;
use crate::outbound_feed::OutboundFeed;
use crate::process_backend::ProcessBackend;
use crate::registry::Registry;
use crate::service::RunnerService;
use crate::supervisor::{Supervisor, SupervisorLimits};

/// Runs the runner on `listener` until `shutdown` is cancelled; then stops every agent
/// (each finishes its batch) before returning.
/// `proxy` is the credential proxy's listener.
pub async fn run(
    config: Config,
    listener: TcpListener,
    proxy: TcpListener,
    shutdown: CancellationToken,
    ready: ferroclaw_common::ready::Ready,
) -> Result<()> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| RunnerError::Io {
        path: data_dir.clone(),
        source,
    })?;
    let docker = config.runner.backend == "docker";
    let mode: JournalMode = if docker {
        // Agents read inbound.db from a read-only mount, where WAL's index cannot be shared.
        JournalMode::Delete
    } else {
        config
            .runner
            .journal_mode
            .parse()
            .map_err(RunnerError::Config)?
    };
    let at = ferroclaw_common::service_db::Location::new(
        data_dir.join("runner.db"),
        config.runner.database_url.as_deref(),
    )?;
    let mut registry = Registry::open(at.clone()).await?;
    // Several runners: held while this one runs, so a restart on this host knows the
    // process before it is gone.
    let mut _sole_here = None;
    let (listener, ready, held_lock, placement) = match &config.runner.id {
        // One runner serves a session store; others stand by until it goes.
        None => {
            let mut lock = ferroclaw_common::service_lock::ServiceLock::new(
                standby::LOCK,
                &at,
                registry.pool(),
            );
            let Some(standby::Active { listener, ready }) =
                standby::take_lock(&mut lock, listener, ready, &shutdown).await?
            else {
                return Ok(());
            };
            if let Some(placed) = placement::live_placed_runners(registry.pool(), &at).await? {
                return Err(RunnerError::Config(format!(
                    "runners with an id serve this database ({placed}); a runner without \
                     runner.id would serve their sessions too: give this one an id as well"
                )));
            }
            let held = tokio::spawn(standby::keep_lock(lock, shutdown.clone()));
            (listener, ready, Some(held), None)
        }
        // Several runners, each serving the sessions placed on it.
        Some(id) => {
            // A runner without an id holding the single-runner lock serves every session.
            let mut lock = ferroclaw_common::service_lock::ServiceLock::new(
                standby::LOCK,
                &at,
                registry.pool(),
            );
            // Other runners with an id hold it only for a moment as they start: try again.
            let mut free = false;
            for _ in 0..5 {
                if lock.hold().await? {
                    free = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            if !free {
                return Err(RunnerError::Config(
                    "a runner without runner.id serves this database (it holds the runner \
                     lock); runners with an id cannot serve beside it: give it an id too"
                        .into(),
                ));
            }
            lock.release().await;
            let path = data_dir.join(format!("runner-{id}.lock"));
            let Some(file) = ferroclaw_common::service_lock::try_lock_file(&path)? else {
                return Err(RunnerError::Config(format!(
                    "another runner with id {id:?} runs on this host (it holds {})",
                    path.display()
                )));
            };
            _sole_here = Some(file);
            let Some(placement) =
                register(&config, id, &listener, registry.pool(), &shutdown).await?
            else {
                return Ok(());
            };
            registry = registry.placed_as(id);
            (listener, Some(ready), None, Some(placement))
        }
    };
    let meta: HashMap<String, Vec<(String, String)>> = config
        .agents
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                vec![("timezone".to_string(), a.timezone.clone())],
            )
        })
        .collect();
    let mailboxes = Arc::new(Mailboxes::new(data_dir.clone(), mode, meta));
    let model_access = credential_proxy::start(
        proxy,
        config.runner.proxy_url.clone(),
        &data_dir,
        registry.clone(),
        &config.agents,
        shutdown.clone(),
    )
    .await?;
    let backend = if docker {
        Backend::Docker(Box::new(
            DockerBackend::new(
                config.runner.agent_image.clone(),
                data_dir.clone(),
                config.runner.idle_timeout_secs,
                config.runner.max_restarts,
                Limits {
                    memory_mb: config.runner.agent_memory_mb,
                    cpus: config.runner.agent_cpus,
                    pids: config.runner.agent_pids,
                },
                model_access,
                config.runner.agent_network.clone(),
            )
            // Agents sit on an internal network: they export spans only to an address the
            // operator put there for them.
            .with_telemetry_env(backend::telemetry_env(
                config.runner.agent_otlp_endpoint.as_deref(),
            )),
        ))
    } else {
        let binary = config
            .runner
            .agent_binary
            .clone()
            .unwrap_or_else(ProcessBackend::default_binary);
        Backend::Process(
            ProcessBackend::new(
                binary,
                data_dir.clone(),
                config.runner.idle_timeout_secs,
                config.runner.journal_mode.clone(),
                config.runner.max_restarts,
                model_access,
            )?
            // Local agents reach what the runner reaches: its own collector by default.
            .with_telemetry_env(backend::telemetry_env(
                config
                    .runner
                    .agent_otlp_endpoint
                    .clone()
                    .or_else(ferroclaw_common::telemetry::otlp_endpoint)
                    .as_deref(),
            )),
        )
    };
    let limits = SupervisorLimits {
        max_running_agents: config.runner.max_running_agents,
        stuck_after: std::time::Duration::from_secs(config.runner.stuck_after_secs),
        max_batch: std::time::Duration::from_secs(config.runner.max_batch_secs),
        disk: disk_quota::DiskQuota {
            session_bytes: config.runner.session_disk_mb.saturating_mul(1024 * 1024),
            agent_bytes: config.runner.agent_disk_mb.saturating_mul(1024 * 1024),
            data_dir: data_dir.clone(),
        },
    };
    let supervisor = Supervisor::new(
        backend,
        mailboxes.clone(),
        &config.agents,
        limits,
        shutdown.clone(),
    );
    let feed = OutboundFeed::start(
        data_dir.join("sessions"),
        registry.clone(),
        mailboxes.clone(),
        outbound_policy::OutboundPolicy::new(&config),
        supervisor.clone(),
        (config.runner.outbound_poll_ms > 0)
            .then(|| std::time::Duration::from_millis(config.runner.outbound_poll_ms)),
    )?;
    // An agent's idle time counts from its last reply (see `slot_policy`).
    supervisor.watch_output(feed.changes());
    let feed_for_sweep = feed.clone();
    if let Some(placement) = &placement {
        upkeep::claim_unplaced(&registry, &mailboxes, placement).await?;
    }
    // With the engine down, recovery waits: messages stay queued in their mailboxes.
    if let Err(e) = supervisor.recover(&registry).await {
        tracing::error!(error = %e, "cannot recover agents yet; their messages wait");
    }

    tokio::spawn(refresh_gauges(
        supervisor.clone(),
        registry.clone(),
        shutdown.clone(),
    ));
    let registry_for_watch = registry.clone();
    let service = RunnerService {
        registry,
        mailboxes: mailboxes.clone(),
        supervisor: supervisor.clone(),
        feed,
        agents: config
            .agents
            .iter()
            .map(|a| (a.name.clone(), a.clone()))
            .collect(),
        shutdown: shutdown.clone(),
        counts: Default::default(),
        placement: placement.clone(),
        moving: Default::default(),
        taken: Default::default(),
    };
    let service = Arc::new(service);
    let upkeep = placement.clone().map(|placement| {
        tokio::spawn(upkeep::keep_placed(
            service.clone(),
            placement,
            shutdown.clone(),
        ))
    });
    let (_, required) = ferroclaw_common::grpc_auth::internal_auth(&config.data_dir)
        .map_err(grpc::GrpcError::from)?;
    let (router, health) = grpc::server_for::<RunnerServer<RunnerService>>(required).await?;
    tokio::spawn(watch_backend(
        supervisor.clone(),
        registry_for_watch,
        health,
        shutdown.clone(),
    ));
    tokio::spawn(close_idle_mailboxes(
        mailboxes.clone(),
        feed_for_sweep,
        std::time::Duration::from_secs(config.runner.mailbox_idle_secs.max(1)),
        shutdown.clone(),
    ));
    // Files travel in single messages: room for the largest plus its envelope.
    let file_room = session_files::MAX_FILE_BYTES + 1024 * 1024;
    let router = router.add_service(
        RunnerServer::from_arc(service)
            .max_decoding_message_size(file_room)
            .max_encoding_message_size(file_room),
    );
    let metrics_addr =
        ferroclaw_common::metrics::serve_on(config.metrics.runner, shutdown.clone()).await?;
    if let Some(ready) = ready {
        ready.with_metrics(metrics_addr).announce();
    }
    tracing::info!(addr = ?listener.local_addr().ok(), "runner listening");
    grpc::serve(router, listener, shutdown.clone()).await?;
    supervisor.wait_stopped().await;
    mailboxes.close_all().await;
    tracing::info!("runner stopped");
    // Given up only now that no agent of this runner runs: a standby may take over, or
    // the others see this runner missing at once.
    if let (Some(placement), Some(upkeep)) = (placement, upkeep) {
        return match upkeep.await {
            Ok(true) => {
                placement.release().await;
                Ok(())
            }
            _ => Err(RunnerError::LostLease),
        };
    }
    match held_lock {
        Some(held) => match held.await {
            Ok(Some(mut lock)) => {
                lock.release().await;
                Ok(())
            }
            _ => Err(RunnerError::LostLock),
        },
        None => Ok(()),
    }
}

/// This host's name (the kernel's), or "unknown".
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Registers this runner among several (`runner.id`): its row, reachable at its
/// advertised URL. `None` when shutdown came first.
async fn register(
    config: &Config,
    id: &str,
    listener: &TcpListener,
    pool: &sqlx::AnyPool,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<placement::Placement>>> {
    let bound = listener.local_addr().map_err(|source| RunnerError::Io {
        path: "runner gRPC listener".into(),
        source,
    })?;
    let url = config
        .runner
        .own_url(bound)
        .map_err(|e| RunnerError::Config(e.to_string()))?;
    let (auth, _) = ferroclaw_common::grpc_auth::internal_auth(&config.data_dir)
        .map_err(grpc::GrpcError::from)?;
    let docker_host = if config.runner.backend == "docker" {
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "local".into())
    } else {
        "none (process backend)".into()
    };
    let me = placement::Registration {
        id: id.to_string(),
        host: this_host(),
        url,
        docker_host,
        capacity: i64::try_from(config.runner.max_running_agents).unwrap_or(i64::MAX),
        shared_storage: config.runner.shared_storage,
    };
    placement::Placement::register(pool.clone(), me, auth, shutdown).await
}

/// How often the gauges of agents and sessions are refreshed (a scrape is every 15 s or so).
const GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the agent and session gauges current: a count in memory and one `count(*)`.
async fn refresh_gauges(supervisor: Supervisor, registry: Registry, shutdown: CancellationToken) {
    let metrics = &metrics::METRICS;
    loop {
        let mut with_agent = 0;
        for (state, count) in supervisor.state_counts().await {
            metrics
                .agents
                .with_label_values(&[state.as_str()])
                .set(count as i64);
            with_agent += count as i64;
        }
        if let Ok(total) = registry.count().await {
            metrics
                .sessions
                .with_label_values(&["idle"])
                .set((total - with_agent).max(0));
        }
        metrics
            .sessions
            .with_label_values(&["with_agent"])
            .set(with_agent);
        tokio::select! {
            _ = tokio::time::sleep(GAUGE_REFRESH) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Closes the mailboxes of quiet sessions now and then, so their connections, threads and
/// files are given back.
async fn close_idle_mailboxes(
    mailboxes: Arc<Mailboxes>,
    feed: Arc<OutboundFeed>,
    idle: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(idle / 3);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let closed = mailboxes.close_idle(idle).await;
        let forgotten = feed.forget_quiet();
        tracing::trace!(closed, forgotten, "idle mailbox sweep");
        if closed > 0 || forgotten > 0 {
            let open = mailboxes.open_count().await;
            tracing::debug!(closed, open, "idle mailboxes closed");
            if open == 0 {
                give_memory_back();
            }
        }
    }
}

/// How long the process waits, once served, for blocking calls still running: a read stuck
/// on a FIFO an agent planted never returns by itself.
pub const BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Returns freed heap to the system once the last mailbox closed: their connections' page
/// caches are freed, but glibc keeps freed memory in its arenas otherwise, and a quiet
/// runner would go on holding its busiest hour's memory.
fn give_memory_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps glibc to two heap arenas. By default each thread that allocates may get one of
/// its own (up to 8 per core), and the threads that stand in for a runtime worker while a
/// mailbox waits for a lock come and go: their arenas kept a burst's freed memory, which
/// made the runner hold 226 MB after 2,000 new sessions instead of 78 MB. Two cores'
/// worth of allocation contention costs less than that.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tunable of the allocator; it allocates nothing.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Reports the backend's state through gRPC health (so `/readyz` shows it) and logs each
/// change; when the engine comes back, agents of waiting sessions start.
async fn watch_backend(
    supervisor: Supervisor,
    registry: Registry,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut was_ready = true;
    while !shutdown.is_cancelled() {
        let ready = supervisor.backend_ready().await;
        match (&ready, was_ready) {
            (Err(e), true) => {
                tracing::error!(error = %e, "agents cannot start; messages wait until the backend is back");
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            (Ok(()), false) => {
                tracing::info!("agent backend is back");
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                if let Err(e) = supervisor.recover(&registry).await {
                    tracing::error!(error = %e, "recovery after the backend came back failed");
                }
            }
            _ => {}
        }
        was_ready = ready.is_ok();
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// The runner as its binary runs it: the config read (`config`, else `$FERROCLAW_CONFIG`,
/// else `./ferroclaw.toml`), its addresses bound, then [`run`] until SIGTERM or Ctrl-C. Both
/// `ferroclaw-runner` and the one-binary services image start here.
pub async fn serve(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use ferroclaw_common::startup;
    limit_malloc_arenas();
    let (s, proxy) = startup::grpc_and_http_service(
        "runner",
        config,
        |c| c.runner.listen,
        |c| c.runner.proxy_listen,
    )
    .await?;
    let result = run(s.config, s.listener, proxy, s.shutdown, s.ready).await;
    // The last spans go out before the process ends.
    ferroclaw_common::telemetry::shutdown().await;
    result.context("runner failed")
}
