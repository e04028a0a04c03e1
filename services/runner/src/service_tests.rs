//! The operator RPCs through the `Runner` trait, on a runner assembled in the test (real
//! registry, mailboxes and supervisor on the process backend, over a temporary directory);
//! no agent is started.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferroclaw_mailbox::agent::BatchStatus;
use ferroclaw_mailbox::{AgentMailbox, HostMailbox, JournalMode, NewInbound};
use ferroclaw_proto::v1::runner_server::Runner;
use ferroclaw_proto::v1::{
    GetRunnerStatusRequest, GetSessionRequest, ListAgentUsageRequest, ListSessionMessagesRequest,
    ListSessionsRequest,
};
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::mailbox_view::tests::chat_out;
use tonic::{Code, Request};

use crate::backend::Backend;
use crate::mailboxes::Mailboxes;
use crate::outbound_feed::OutboundFeed;
use crate::process_backend::ProcessBackend;
use crate::registry::{Registry, SessionRecord};
use crate::service::RunnerService;
use crate::supervisor::{AgentState, Supervisor, SupervisorLimits};

struct Harness {
    service: RunnerService,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn runner() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_path_buf();
    let shutdown = CancellationToken::new();
    let registry = Registry::open(&data_dir.join("runner.db")).await.unwrap();
    let mailboxes = Arc::new(Mailboxes::new(
        data_dir.clone(),
        JournalMode::Wal,
        HashMap::new(),
    ));
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let access = crate::credential_proxy::start(
        proxy,
        None,
        &data_dir,
        registry.clone(),
        &[],
        shutdown.clone(),
    )
    .await
    .unwrap();
    // Never run: no session is handed to the supervisor.
    let backend = Backend::Process(
        ProcessBackend::new(
            "/bin/true".into(),
            data_dir.clone(),
            60,
            "wal".into(),
            1,
            access,
        )
        .unwrap(),
    );
    let supervisor = Supervisor::new(
        backend,
        mailboxes.clone(),
        &[],
        SupervisorLimits {
            max_running_agents: 3,
            stuck_after: Duration::from_secs(60),
            max_batch: Duration::from_secs(60),
            disk: crate::disk_quota::DiskQuota {
                session_bytes: u64::MAX,
                agent_bytes: u64::MAX,
                data_dir: data_dir.clone(),
            },
        },
        shutdown.clone(),
    );
    let feed = OutboundFeed::start(
        data_dir.join("sessions"),
        registry.clone(),
        mailboxes.clone(),
        crate::outbound_policy::OutboundPolicy::new(&ferroclaw_common::Config::default()),
        supervisor.clone(),
        None,
    )
    .unwrap();
    Harness {
        service: RunnerService {
            registry,
            mailboxes,
            supervisor,
            feed,
            agents: HashMap::new(),
            shutdown: shutdown.clone(),
            counts: Default::default(),
            placement: None,
            moving: Default::default(),
            taken: Default::default(),
        },
        dir,
        shutdown,
    }
}

/// A chat message `message <id>` from `sender`.
fn chat_in(id: &str, sender: &str) -> NewInbound {
    crate::mailbox_view::tests::chat_in(id, &format!("message {id}"), sender)
}

impl Harness {
    /// A session with `inbound` messages, the first `answered` of them answered by one
    /// reply each, written as the runner and an agent would, outside the runner's cache.
    async fn session(&self, key: &str, inbound: usize, answered: usize) -> SessionRecord {
        let record = self
            .service
            .registry
            .get_or_create("main", key, None)
            .await
            .unwrap();
        let paths = self.service.mailboxes.paths(&record);
        let host = HostMailbox::open(paths.clone(), JournalMode::Wal)
            .await
            .unwrap();
        let mut seqs = Vec::new();
        for i in 0..inbound {
            let id = format!("{key}-{i}");
            seqs.push(host.enqueue(&chat_in(&id, "ann")).await.unwrap().seq);
        }
        if answered > 0 {
            let mut agent = AgentMailbox::open(paths, JournalMode::Wal).await.unwrap();
            for seq in &seqs[..answered] {
                agent
                    .finish(&[*seq], &[chat_out("answer")], BatchStatus::Completed)
                    .await
                    .unwrap();
            }
            agent.close().await;
        }
        host.close().await;
        record
    }

    /// Sets a session's last activity, as a message at that time would have.
    async fn active_at(&self, id: &str, at: i64) {
        let mut db = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(self.dir.path().join("runner.db"))
            .connect()
            .await
            .unwrap();
        sqlx::query("UPDATE sessions SET last_activity = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&mut db)
            .await
            .unwrap();
        db.close().await.unwrap();
    }
}

fn list(agent: &str, state: &str, sort: &str, offset: u32, limit: u32) -> ListSessionsRequest {
    ListSessionsRequest {
        agent: agent.into(),
        state: state.into(),
        sort: sort.into(),
        offset,
        limit,
    }
}

#[tokio::test]
async fn list_sessions_pages_with_counts_and_tokens() {
    let h = runner().await;
    let a = h.session("a", 3, 1).await;
    let b = h.session("b", 1, 1).await;
    let c = h.session("c", 2, 0).await;
    let other = h
        .service
        .registry
        .get_or_create("other", "x", None)
        .await
        .unwrap();
    h.active_at(&a.id, 3_000).await;
    h.active_at(&b.id, 1_000).await;
    h.active_at(&c.id, 2_000).await;
    h.active_at(&other.id, 500).await;
    h.service
        .registry
        .record_usage(&c.id, "main", 100, 7)
        .await
        .unwrap();
    h.service
        .registry
        .record_usage(&c.id, "main", 1, 1)
        .await
        .unwrap();

    let page = h
        .service
        .list_sessions(Request::new(list("main", "", "recent", 1, 2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page.matched, page.total), (3, 4));
    let ids: Vec<&str> = page.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [c.id.as_str(), b.id.as_str()]);
    let c_row = &page.sessions[0];
    assert_eq!(
        (c_row.messages_in, c_row.messages_out, c_row.pending),
        (Some(2), Some(0), 2)
    );
    assert_eq!(
        (
            c_row.model_requests,
            c_row.input_tokens,
            c_row.output_tokens
        ),
        (2, 101, 8)
    );
    assert_eq!(c_row.agent_state, "idle");
    let b_row = &page.sessions[1];
    assert_eq!(
        (b_row.messages_in, b_row.messages_out, b_row.pending),
        (Some(1), Some(1), 0)
    );
    assert_eq!(b_row.model_requests, 0);
    // The page's files were looked at without going through the cache of open mailboxes.
    assert_eq!(h.service.mailboxes.open_count().await, 0);

    let oldest = h
        .service
        .list_sessions(Request::new(list("", "idle", "oldest", 0, 10)))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = oldest.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [&*other.id, &*b.id, &*c.id, &*a.id]);
    // A session nothing was enqueued to has no files, and no messages.
    assert_eq!(oldest.sessions[0].messages_in, Some(0));
    let none = h
        .service
        .list_sessions(Request::new(list("", "running", "", 0, 10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((none.matched, none.total, none.sessions.len()), (0, 4, 0));
}

#[tokio::test]
async fn pages_filtered_by_state_cover_their_sessions_once() {
    let h = runner().await;
    let mut ids = Vec::new();
    for (i, key) in ["a", "b", "c", "d", "e", "f", "g"].iter().enumerate() {
        let s = h.session(key, 1, 0).await;
        // Two sessions share each activity time, f and g too: ties.
        h.active_at(&s.id, 1_000 * (i as i64 / 2).min(2)).await;
        ids.push(s.id);
    }
    let other = h
        .service
        .registry
        .get_or_create("other", "x", None)
        .await
        .unwrap();
    let supervisor = &h.service.supervisor;
    supervisor.pretend(&ids[1], AgentState::Running).await;
    supervisor.pretend(&ids[4], AgentState::Running).await;
    supervisor.pretend(&ids[2], AgentState::Queued).await;
    supervisor.pretend(&other.id, AgentState::Backoff).await;
    // Gone from the registry, still known to the supervisor: in no list.
    supervisor.pretend("ses_gone", AgentState::Running).await;
    let pages = |agent: &'static str, state: &'static str, sort: &'static str| {
        let service = &h.service;
        async move {
            let (mut seen, mut matched) = (Vec::new(), Vec::new());
            for offset in (0..10).step_by(2) {
                let page = service
                    .list_sessions(Request::new(list(agent, state, sort, offset, 2)))
                    .await
                    .unwrap()
                    .into_inner();
                matched.push((page.matched, page.total));
                seen.extend(page.sessions.into_iter().map(|s| (s.id, s.agent_state)));
            }
            matched.dedup();
            assert_eq!(matched.len(), 1, "every page counts the same");
            (matched[0].0, seen)
        }
    };
    let idle = |i: usize| (ids[i].clone(), "idle".to_string());
    // Idle: a, d, then f and g tied (by id).
    let mut tied = vec![idle(5), idle(6)];
    tied.sort();
    let (matched, seen) = pages("main", "idle", "oldest").await;
    let mut expected = vec![idle(0), idle(3)];
    expected.extend(tied.clone());
    assert_eq!((matched, seen), (4, expected));
    let (matched, seen) = pages("", "idle", "recent").await;
    assert_eq!(matched, 4, "the other agent's session is in backoff");
    let mut expected = tied;
    expected.extend([idle(3), idle(0)]);
    assert_eq!(seen, expected);
    let (matched, seen) = pages("", "running", "").await;
    assert_eq!(matched, 2);
    assert_eq!(
        seen.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        [ids[4].clone(), ids[1].clone()],
        "most recent first"
    );
    assert!(seen.iter().all(|(_, state)| state == "running"));
    assert_eq!(pages("other", "running", "").await.0, 0);
    assert_eq!(
        pages("other", "backoff", "").await,
        (1, vec![(other.id.clone(), "backoff".into())])
    );
    assert_eq!(
        pages("", "queued", "").await.1,
        vec![(ids[2].clone(), "queued".into())]
    );
    // Unfiltered: every session once, each with its state.
    let (matched, seen) = pages("", "", "recent").await;
    assert_eq!((matched, seen.len()), (8, 8));
    let states: HashMap<String, String> = seen.into_iter().collect();
    assert_eq!(states.len(), 8);
    assert_eq!(states[&ids[2]], "queued");
    assert_eq!(states[&ids[0]], "idle");
}

#[tokio::test]
async fn the_whole_list_keeps_pending_without_counts() {
    let h = runner().await;
    let a = h.session("a", 3, 1).await;
    let b = h.session("b", 1, 0).await;
    let all = h
        .service
        .list_sessions(Request::new(ListSessionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    // Creation order, as before lists had pages.
    let rows: Vec<(&str, i64, Option<i64>)> = all
        .sessions
        .iter()
        .map(|s| (s.id.as_str(), s.pending, s.messages_in))
        .collect();
    let mut expected = vec![(a.id.as_str(), 2, None), (b.id.as_str(), 1, None)];
    expected.sort_by_key(|(id, _, _)| {
        let r = if *id == a.id { &a } else { &b };
        (r.created_at, r.id.clone())
    });
    assert_eq!(rows, expected);
    assert_eq!((all.matched, all.total), (2, 2));
    let refused = h
        .service
        .list_sessions(Request::new(list("", "", "", 0, 501)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("at most 500"), "{refused:?}");
}

#[tokio::test]
async fn get_session_counts_its_messages() {
    let h = runner().await;
    let a = h.session("a", 2, 2).await;
    let got = h
        .service
        .get_session(Request::new(GetSessionRequest {
            session_id: a.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.messages_in, got.messages_out, got.pending),
        (Some(2), Some(2), 0)
    );
}

#[tokio::test]
async fn list_session_messages_reads_both_ways() {
    let h = runner().await;
    let a = h.session("a", 3, 2).await;
    let ask = |session_id: &str, limit| {
        Request::new(ListSessionMessagesRequest {
            session_id: session_id.into(),
            limit,
        })
    };
    let all = h
        .service
        .list_session_messages(ask(&a.id, 0))
        .await
        .unwrap()
        .into_inner()
        .messages;
    let seen: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|m| (m.direction.as_str(), m.state.as_str(), m.sender.as_str()))
        .collect();
    // Oldest first by creation (inbound first within a millisecond); the last question
    // is unanswered.
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.iter().filter(|m| m.0 == "in").count(), 3);
    assert!(
        all.windows(2)
            .all(|w| (w[0].created_at_ms, w[0].direction != "in")
                <= (w[1].created_at_ms, w[1].direction != "in"))
    );
    let last_in = all.iter().rev().find(|m| m.direction == "in").unwrap();
    assert_eq!(
        (last_in.state.as_str(), last_in.sender.as_str()),
        ("pending", "ann")
    );
    assert!(last_in.content_json.contains("message a-2"));
    assert!(
        all.iter()
            .filter(|m| m.direction == "out")
            .all(|m| m.state == "pending" && m.content_json.contains("answer"))
    );
    let latest = h
        .service
        .list_session_messages(ask(&a.id, 2))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(latest, all[3..].to_vec());
    let unknown = h
        .service
        .list_session_messages(ask("ses_nope", 0))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let too_many = h
        .service
        .list_session_messages(ask(&a.id, 501))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn list_agent_usage_has_totals_and_today() {
    let h = runner().await;
    let registry = &h.service.registry;
    registry.record_usage("s1", "main", 10, 1).await.unwrap();
    registry.record_usage("s2", "main", 20, 2).await.unwrap();
    registry.record_usage("s3", "alpha", 5, 5).await.unwrap();
    let usage = h
        .service
        .list_agent_usage(Request::new(ListAgentUsageRequest { days: 0 }))
        .await
        .unwrap()
        .into_inner();
    let agents: Vec<(&str, i64, i64, i64)> = usage
        .agents
        .iter()
        .map(|a| {
            (
                a.agent.as_str(),
                a.requests,
                a.input_tokens,
                a.output_tokens,
            )
        })
        .collect();
    assert_eq!(agents, [("alpha", 1, 5, 5), ("main", 2, 30, 3)]);
    let today = crate::utc_day::utc_day(ferroclaw_mailbox::now_ms());
    let main_days = &usage.agents[1].days;
    assert_eq!(main_days.iter().map(|d| d.requests).sum::<i64>(), 2);
    assert!(main_days.iter().all(|d| d.day <= today));
    let refused = h
        .service
        .list_agent_usage(Request::new(ListAgentUsageRequest { days: 367 }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn runner_status_reports_the_process_backend() {
    let h = runner().await;
    h.session("a", 1, 0).await;
    h.session("b", 0, 0).await;
    let status = h
        .service
        .get_runner_status(Request::new(GetRunnerStatusRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.backend, "process");
    assert!(status.engine_ok);
    assert_eq!(status.engine, "");
    assert_eq!(status.max_running_agents, 3);
    assert_eq!((status.running, status.queued), (0, 0));
    assert_eq!(status.sessions, 2);
    assert_eq!(status.agent_starts_total, 0);
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
}

/// What a console page costs at 10,000 sessions, first (files never counted) and again
/// (`cargo test --release -p ferroclaw-runner --lib list_timing -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn list_timing_at_10k_sessions() {
    use std::time::Instant;
    let h = runner().await;
    let template = h.session("template", 1, 1).await;
    let from = h.service.mailboxes.paths(&template);
    let n = 10_000;
    let mut db = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(h.dir.path().join("runner.db"))
        .connect()
        .await
        .unwrap();
    let mut tx = db.begin().await.unwrap();
    for i in 0..n {
        sqlx::query(
            "INSERT INTO sessions (id, agent, conversation_key, created_at, last_activity)
             VALUES ($1, 'main', $2, $3, $4)",
        )
        .bind(format!("ses_{i:05}"))
        .bind(format!("k{i}"))
        .bind(i as i64)
        .bind(((i * 7919) % n) as i64 + 1_000_000)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    db.close().await.unwrap();
    for i in 0..n {
        let to = h.dir.path().join(format!("sessions/main/ses_{i:05}"));
        std::fs::create_dir_all(to.join("in")).unwrap();
        std::fs::create_dir_all(to.join("out")).unwrap();
        std::fs::copy(from.inbound_db(), to.join("in/inbound.db")).unwrap();
        std::fs::copy(from.outbound_db(), to.join("out/outbound.db")).unwrap();
    }
    // Files written just now are not counted from memory.
    tokio::time::sleep(crate::count_cache::SETTLE + Duration::from_millis(100)).await;
    for (state, sort, offset) in [("", "recent", 0), ("", "oldest", 4950), ("idle", "", 0)] {
        let req = list("", state, sort, offset, 50);
        for run in ["first", "again", "again"] {
            let started = Instant::now();
            let page = h
                .service
                .list_sessions(Request::new(req.clone()))
                .await
                .unwrap()
                .into_inner();
            assert_eq!((page.sessions.len(), page.matched), (50, n as u64 + 1));
            assert!(page.sessions.iter().all(|s| s.messages_out == Some(1)));
            println!(
                "ListSessions state={state:?} sort={sort:?} offset={offset}, {run}: {:.2} ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
}
