//! `ListSessions` and `GetSession`: filtered, sorted, paged session lists with counts.
//!
//! The filter (agent state) and the sort (last activity, creation) use only the
//! supervisor's in-memory states and the registry's columns. A page is cut by the
//! registry (in index order, so a page of 50 out of 10,000 sessions reads 50 rows): the
//! sessions whose agent is not idle are few and in memory, so a page of them reads those
//! rows only, and a page of idle ones leaves them out. Only the page's files are looked
//! at: their pending work and message counts come from short-lived read-only views
//! ([`crate::mailbox_view`]), which leave the cache of open mailboxes as it was, or from
//! the counts kept for files that did not change since ([`crate::count_cache`]). Tokens
//! come from the registry in one query for the whole page.

use std::collections::HashMap;
use std::time::Duration;

use ferroclaw_mailbox::SessionPaths;
use ferroclaw_proto::v1::{ListSessionsRequest, ListSessionsResponse, Session};
use tokio::task::JoinSet;

use crate::count_cache::{self, CountCache, Stamp};
use crate::error::{Result, RunnerError};
use crate::mailbox_view::{Counts, MailboxView};
pub use crate::registry::Order;
use crate::registry::{SessionRecord, Usage};
use crate::service::RunnerService;

/// The most sessions one page may hold.
pub const MAX_PAGE: u32 = 500;
/// The longest one session's files may take to be looked at; past it, its counts are unset.
const VIEW_TIMEOUT: Duration = Duration::from_secs(2);
/// Sessions' files looked at concurrently (each look is a connection and its thread).
const VIEWS_AT_ONCE: usize = 8;

/// What a `ListSessions` request asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only sessions whose agent is in this state; `None`: all.
    pub state: Option<String>,
    pub order: Order,
    pub offset: usize,
    /// `None`: every session (after `offset`), without message counts.
    pub limit: Option<usize>,
}

impl ListQuery {
    /// An empty sort is "recent" for a page, and creation order for the whole list (what
    /// it was before lists had pages). A state the runner never reports matches nothing.
    pub fn parse(req: &ListSessionsRequest) -> Result<Self> {
        if req.limit > MAX_PAGE {
            return Err(RunnerError::InvalidArgument(format!(
                "limit {} is too large: at most {MAX_PAGE} sessions a page (0 for all of them)",
                req.limit
            )));
        }
        let order = match req.sort.as_str() {
            "" if req.limit == 0 => Order::Created,
            "" | "recent" => Order::Recent,
            "oldest" => Order::Oldest,
            "created" => Order::Created,
            other => {
                return Err(RunnerError::InvalidArgument(format!(
                    "unknown sort {other:?}: \"recent\", \"oldest\" or \"created\""
                )));
            }
        };
        Ok(Self {
            state: (!req.state.is_empty()).then(|| req.state.clone()),
            order,
            offset: req.offset as usize,
            limit: (req.limit > 0).then_some(req.limit as usize),
        })
    }
}

/// Filters `records` (in any order) by their agent's state, sorts them and cuts the page
/// in memory: (how many matched before the cut, the page with each one's state). For the
/// whole list and for the few sessions with an agent; pages of the others are cut by the
/// registry in the same order.
pub fn select(
    records: Vec<SessionRecord>,
    state_of: impl Fn(&str) -> &'static str,
    query: &ListQuery,
) -> (usize, Vec<(SessionRecord, &'static str)>) {
    let mut matched: Vec<(SessionRecord, &'static str)> = records
        .into_iter()
        .map(|r| {
            let state = state_of(&r.id);
            (r, state)
        })
        .filter(|(_, state)| query.state.as_deref().is_none_or(|s| s == *state))
        .collect();
    // Ties broken by id, so pages never overlap or skip a session.
    match query.order {
        Order::Recent => matched.sort_by(|(a, _), (b, _)| {
            b.last_activity
                .cmp(&a.last_activity)
                .then_with(|| a.id.cmp(&b.id))
        }),
        Order::Oldest => matched.sort_by(|(a, _), (b, _)| {
            a.last_activity
                .cmp(&b.last_activity)
                .then_with(|| a.id.cmp(&b.id))
        }),
        Order::Created => matched.sort_by(|(a, _), (b, _)| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        }),
    }
    let count = matched.len();
    let page = matched
        .into_iter()
        .skip(query.offset)
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    (count, page)
}

/// Each session's counts: kept ones for files that did not change since they were
/// counted, else read through a view (at most [`VIEWS_AT_ONCE`] at a time, each within
/// [`VIEW_TIMEOUT`]); they come back in the order of `paths`. A session whose files cannot
/// be read gets no counts; the others are not held up by it.
pub async fn read_counts(
    paths: Vec<SessionPaths>,
    messages: bool,
    cache: &CountCache,
) -> Vec<Counts> {
    let mut counts = vec![Counts::default(); paths.len()];
    let stamps = stamps(cache, &paths).await;
    let mut looking = JoinSet::new();
    // A view's counts are kept under the stamp taken before it looked.
    let mut found = |i: usize, c: Counts, stamp: Option<Stamp>| {
        // Only counts with messages are kept: they serve the whole list's pending too.
        if messages && let Some(stamp) = stamp {
            cache.keep(&paths[i], stamp, c);
        }
        counts[i] = c;
    };
    for (i, stamp) in stamps.into_iter().enumerate() {
        if let Some(kept) = stamp.as_ref().and_then(|s| cache.get(&paths[i], s)) {
            let kept = if messages {
                kept
            } else {
                Counts {
                    pending: kept.pending,
                    ..Counts::default()
                }
            };
            found(i, kept, None);
            continue;
        }
        if looking.len() >= VIEWS_AT_ONCE
            && let Some(Ok((j, c, s))) = looking.join_next().await
        {
            found(j, c, s);
        }
        let session = paths[i].clone();
        looking.spawn(async move { (i, count_one(&session, messages).await, stamp) });
    }
    while let Some(done) = looking.join_next().await {
        if let Ok((i, c, s)) = done {
            found(i, c, s);
        }
    }
    counts
}

/// The stamps of the sessions' files, taken before any is read (a write after that then
/// shows as another stamp next time); `None` where they could not be taken.
async fn stamps(cache: &CountCache, paths: &[SessionPaths]) -> Vec<Option<Stamp>> {
    let settle = cache.settle();
    let owned = paths.to_vec();
    // A few lstat calls per session, on the blocking pool like every file access.
    tokio::task::spawn_blocking(move || count_cache::stamps(&owned, settle))
        .await
        .unwrap_or_else(|_| vec![None; paths.len()])
}

async fn count_one(paths: &SessionPaths, messages: bool) -> Counts {
    let look = async {
        let Some(mut view) = MailboxView::open(paths).await? else {
            // Nothing was ever enqueued: no files, no messages.
            return Ok(Counts {
                pending: Some(0),
                messages_in: messages.then_some(0),
                messages_out: messages.then_some(0),
            });
        };
        let counts = view.counts(messages).await;
        view.close().await;
        Ok::<_, RunnerError>(counts)
    };
    match tokio::time::timeout(VIEW_TIMEOUT, look).await {
        Ok(Ok(counts)) => counts,
        Ok(Err(e)) => {
            tracing::debug!(session = %paths.root().display(), error = %e, "session files not read");
            Counts::default()
        }
        Err(_) => {
            tracing::debug!(session = %paths.root().display(), "session files not read in time");
            Counts::default()
        }
    }
}

/// A session as the RPCs report it.
fn session(
    record: SessionRecord,
    state: &str,
    agent_starts: u64,
    counts: Counts,
    usage: Usage,
) -> Session {
    Session {
        id: record.id,
        agent: record.agent,
        conversation_key: record.conversation_key,
        created_at_ms: record.created_at,
        last_activity_ms: record.last_activity,
        agent_state: state.to_string(),
        pending: counts.pending.unwrap_or(0),
        agent_starts,
        messages_in: counts.messages_in,
        messages_out: counts.messages_out,
        model_requests: usage.requests,
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        runner: record.runner.unwrap_or_default(),
    }
}

/// A session's state: the supervisor's for the few with an agent, else idle.
fn state_in(states: &States, id: &str) -> &'static str {
    states.get(id).copied().unwrap_or("idle")
}

/// The sessions not idle, by id, with their state's name.
type States = HashMap<String, &'static str>;

/// A state's name as the runner reports it, for one read from another runner.
fn known_state(name: &str) -> Option<&'static str> {
    ["queued", "running", "backoff", "unavailable"]
        .into_iter()
        .find(|s| *s == name)
}

fn as_count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

impl RunnerService {
    /// A page of sessions. With several runners every session is listed (the registry is
    /// shared): the states come from every runner (`everywhere`; a call another runner
    /// forwarded asks for this runner's only), and a session served elsewhere is described
    /// by its runner.
    pub(crate) async fn list_sessions_page(
        &self,
        req: ListSessionsRequest,
        everywhere: bool,
    ) -> Result<ListSessionsResponse> {
        let query = ListQuery::parse(&req)?;
        let agent = (!req.agent.is_empty()).then_some(req.agent.as_str());
        let total = u64::try_from(self.registry.count().await?).unwrap_or(0);
        let mut states: States = self
            .supervisor
            .states()
            .await
            .into_iter()
            .map(|(id, s)| (id, s.as_str()))
            .collect();
        // With several runners: the agents the others started, too.
        let starts_elsewhere = if everywhere {
            self.add_states_elsewhere(&mut states).await?
        } else {
            0
        };
        let (matched, page) = match query.limit {
            Some(limit) => self.page_of(agent, &states, &query, limit).await?,
            // The whole list: every session is in it anyway.
            None => select(
                self.registry.list(agent).await?,
                |id| state_in(&states, id),
                &query,
            ),
        };
        let order: Vec<String> = page.iter().map(|(r, _)| r.id.clone()).collect();
        // Sessions served elsewhere are described by their runners.
        let (page, mut described) = if everywhere && query.limit.is_some() {
            self.described_elsewhere(page).await?
        } else {
            (page, Vec::new())
        };
        let ids: Vec<&str> = page.iter().map(|(r, _)| r.id.as_str()).collect();
        let mut usage = self.registry.usage_of_sessions(&ids).await?;
        // Message counts only for a page: the whole list is for callers that want pending.
        let paths = page.iter().map(|(r, _)| self.mailboxes.paths(r)).collect();
        let counts = read_counts(paths, query.limit.is_some(), &self.counts).await;
        let mut sessions: Vec<Session> = page
            .into_iter()
            .zip(counts)
            .map(|((record, state), counts)| {
                let starts = self.supervisor.agent_starts(&record.id);
                let used = usage.remove(&record.id).unwrap_or_default();
                session(record, state, starts, counts, used)
            })
            .collect();
        if !described.is_empty() {
            // Back in the page's order.
            sessions.append(&mut described);
            let place: HashMap<&str, usize> = order
                .iter()
                .enumerate()
                .map(|(i, id)| (id.as_str(), i))
                .collect();
            sessions.sort_by_key(|s| place.get(s.id.as_str()).copied().unwrap_or(usize::MAX));
        }
        Ok(ListSessionsResponse {
            sessions,
            agent_starts_total: self.supervisor.agent_starts_total() + starts_elsewhere,
            matched: matched as u64,
            total,
        })
    }

    /// Several runners: adds the states of the sessions the others serve (each live one is
    /// asked for its sessions with an agent, at most [`MAX_PAGE`] per state), and
    /// "unavailable" for those of missing runners; the agents the others started.
    async fn add_states_elsewhere(&self, states: &mut States) -> Result<u64> {
        let Some(placement) = &self.placement else {
            return Ok(0);
        };
        let mut starts = 0;
        for peer in placement.peers() {
            if peer.id == placement.id() {
                continue;
            }
            if !peer.live {
                for session in self.registry.placed_on(Some(&peer.id)).await? {
                    states.insert(session.id, "unavailable");
                }
                continue;
            }
            let mut client = placement.client_of(&peer.url)?;
            for (i, state) in ["queued", "running", "backoff"].into_iter().enumerate() {
                let ask = ListSessionsRequest {
                    state: state.into(),
                    limit: MAX_PAGE,
                    ..Default::default()
                };
                let asked = client.list_sessions(placement.forwarded(ask));
                match tokio::time::timeout(VIEW_TIMEOUT, asked).await {
                    Ok(Ok(answer)) => {
                        let answer = answer.into_inner();
                        if i == 0 {
                            starts += answer.agent_starts_total;
                        }
                        for session in answer.sessions {
                            if let Some(state) = known_state(&session.agent_state) {
                                states.insert(session.id, state);
                            }
                        }
                    }
                    Ok(Err(status)) => {
                        tracing::debug!(runner = %peer.id, %status, "another runner's states not read");
                    }
                    Err(_) => {
                        // A runner paused or dying: its sessions show idle until it answers.
                        tracing::debug!(runner = %peer.id, "another runner did not answer in time");
                        break;
                    }
                }
            }
        }
        Ok(starts)
    }

    /// Several runners: splits a page into the sessions served here (described below) and
    /// the others, described by their runners, or as unavailable (without counts) when
    /// theirs is missing or does not answer.
    async fn described_elsewhere(
        &self,
        page: Vec<(SessionRecord, &'static str)>,
    ) -> Result<(Vec<(SessionRecord, &'static str)>, Vec<Session>)> {
        let Some(placement) = &self.placement else {
            return Ok((page, Vec::new()));
        };
        let mut here = Vec::new();
        let mut asking = JoinSet::new();
        let mut unreadable: Vec<(SessionRecord, &'static str)> = Vec::new();
        for (record, state) in page {
            let Some(runner) = record.runner.clone().filter(|r| r != placement.id()) else {
                here.push((record, state));
                continue;
            };
            match placement.route(&record)? {
                crate::placement::Route::There { mut client, .. } => {
                    let ask = placement.forwarded(ferroclaw_proto::v1::GetSessionRequest {
                        session_id: record.id.clone(),
                    });
                    asking.spawn(async move {
                        let answer =
                            tokio::time::timeout(VIEW_TIMEOUT, client.get_session(ask)).await;
                        match answer {
                            Ok(Ok(session)) => Ok(session.into_inner()),
                            _ => Err((record, state)),
                        }
                    });
                }
                _ => {
                    tracing::trace!(session = %record.id, %runner, "its runner is missing");
                    unreadable.push((record, "unavailable"));
                }
            }
        }
        let mut described = Vec::new();
        while let Some(done) = asking.join_next().await {
            match done {
                Ok(Ok(session)) => described.push(session),
                Ok(Err(unanswered)) => unreadable.push(unanswered),
                Err(e) => tracing::warn!(error = %e, "describing a session failed"),
            }
        }
        if !unreadable.is_empty() {
            let ids: Vec<&str> = unreadable.iter().map(|(r, _)| r.id.as_str()).collect();
            let mut usage = self.registry.usage_of_sessions(&ids).await?;
            for (record, state) in unreadable {
                let used = usage.remove(&record.id).unwrap_or_default();
                described.push(session(record, state, 0, Counts::default(), used));
            }
        }
        Ok((here, described))
    }

    /// A page cut by the registry: (how many sessions matched, the page with each one's
    /// state). Sessions with an agent (queued, running, backoff) are at most one per agent
    /// and known by id: a page of them reads their rows only, a page of idle sessions is
    /// every other row.
    async fn page_of(
        &self,
        agent: Option<&str>,
        states: &States,
        query: &ListQuery,
        limit: usize,
    ) -> Result<(usize, Vec<(SessionRecord, &'static str)>)> {
        let registry = &self.registry;
        match query.state.as_deref() {
            None => {
                let matched = as_count(registry.count_of(agent).await?);
                let page = registry
                    .page(agent, &[], query.order, query.offset, limit)
                    .await?;
                let page = page
                    .into_iter()
                    .map(|r| {
                        let state = state_in(states, &r.id);
                        (r, state)
                    })
                    .collect();
                Ok((matched, page))
            }
            Some("idle") => {
                let busy: Vec<&str> = states.keys().map(String::as_str).collect();
                let busy_here = registry.get_many(&busy, agent).await?.len();
                let matched = as_count(registry.count_of(agent).await?).saturating_sub(busy_here);
                let page = registry
                    .page(agent, &busy, query.order, query.offset, limit)
                    .await?;
                Ok((matched, page.into_iter().map(|r| (r, "idle")).collect()))
            }
            Some(state) => {
                let ids: Vec<&str> = states
                    .iter()
                    .filter(|(_, s)| **s == state)
                    .map(|(id, _)| id.as_str())
                    .collect();
                let records = registry.get_many(&ids, agent).await?;
                Ok(select(records, |id| state_in(states, id), query))
            }
        }
    }

    /// A session whose runner is missing, as the registry knows it: its state is
    /// "unavailable", and its files (on that runner) are not read.
    pub(crate) async fn describe_unavailable(
        &self,
        record: SessionRecord,
        runner: &str,
    ) -> Result<Session> {
        let mut usage = self
            .registry
            .usage_of_sessions(&[record.id.as_str()])
            .await?;
        let used = usage.remove(&record.id).unwrap_or_default();
        let mut record = record;
        record.runner = Some(runner.to_string());
        Ok(session(record, "unavailable", 0, Counts::default(), used))
    }

    /// One session with its message counts and tokens.
    pub(crate) async fn describe_session(&self, record: SessionRecord) -> Result<Session> {
        let state = self
            .supervisor
            .state(&record.id)
            .await
            .map_or("idle", |s| s.as_str());
        let mut usage: HashMap<String, Usage> = self
            .registry
            .usage_of_sessions(&[record.id.as_str()])
            .await?;
        let counts = read_counts(vec![self.mailboxes.paths(&record)], true, &self.counts).await;
        let counts = counts.into_iter().next().unwrap_or_default();
        let used = usage.remove(&record.id).unwrap_or_default();
        let starts = self.supervisor.agent_starts(&record.id);
        Ok(session(record, state, starts, counts, used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, created_at: i64, last_activity: i64) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            agent: "main".into(),
            conversation_key: format!("api:{id}"),
            created_at,
            last_activity,
            runner: None,
            fence: 0,
        }
    }

    fn request(state: &str, sort: &str, offset: u32, limit: u32) -> ListSessionsRequest {
        ListSessionsRequest {
            agent: String::new(),
            state: state.into(),
            sort: sort.into(),
            offset,
            limit,
        }
    }

    fn ids(page: &[(SessionRecord, &str)]) -> Vec<String> {
        page.iter().map(|(r, _)| r.id.clone()).collect()
    }

    /// a: created first, active last; b and c tie on activity; d is running.
    fn records() -> Vec<SessionRecord> {
        vec![
            record("a", 1, 40),
            record("b", 2, 20),
            record("c", 3, 20),
            record("d", 4, 10),
        ]
    }

    fn state_of(id: &str) -> &'static str {
        if id == "d" { "running" } else { "idle" }
    }

    #[test]
    fn a_request_is_checked() {
        let q = ListQuery::parse(&request("", "", 0, 0)).unwrap();
        assert_eq!(
            (q.order, q.limit),
            (Order::Created, None),
            "the old whole list"
        );
        let q = ListQuery::parse(&request("idle", "", 5, 50)).unwrap();
        assert_eq!(
            q,
            ListQuery {
                state: Some("idle".into()),
                order: Order::Recent,
                offset: 5,
                limit: Some(50)
            }
        );
        assert_eq!(
            ListQuery::parse(&request("", "oldest", 0, 0))
                .unwrap()
                .order,
            Order::Oldest
        );
        assert!(ListQuery::parse(&request("", "", 0, MAX_PAGE)).is_ok());
        let too_many = ListQuery::parse(&request("", "", 0, MAX_PAGE + 1)).unwrap_err();
        assert!(matches!(too_many, RunnerError::InvalidArgument(m) if m.contains("at most 500")));
        assert!(matches!(
            ListQuery::parse(&request("", "sideways", 0, 10)),
            Err(RunnerError::InvalidArgument(_))
        ));
    }

    #[test]
    fn sessions_sort_by_activity_or_creation_with_ties_by_id() {
        let q = |sort| ListQuery::parse(&request("", sort, 0, 10)).unwrap();
        let (n, page) = select(records(), state_of, &q("recent"));
        assert_eq!(
            (n, ids(&page)),
            (4, vec!["a".into(), "b".into(), "c".into(), "d".into()])
        );
        let (_, page) = select(records(), state_of, &q("oldest"));
        assert_eq!(ids(&page), ["d", "b", "c", "a"]);
        let mut shuffled = records();
        shuffled.reverse();
        let (_, page) = select(shuffled, state_of, &q("created"));
        assert_eq!(ids(&page), ["a", "b", "c", "d"]);
        assert_eq!(page[3].1, "running");
    }

    #[test]
    fn the_filter_counts_before_the_page_is_cut() {
        let (n, page) = select(
            records(),
            state_of,
            &ListQuery::parse(&request("idle", "oldest", 1, 1)).unwrap(),
        );
        assert_eq!((n, ids(&page)), (3, vec!["c".to_string()]));
        let (n, page) = select(
            records(),
            state_of,
            &ListQuery::parse(&request("running", "", 0, 0)).unwrap(),
        );
        assert_eq!((n, ids(&page)), (1, vec!["d".to_string()]));
        // Past the end: nothing, still the count.
        let (n, page) = select(
            records(),
            state_of,
            &ListQuery::parse(&request("", "", 10, 5)).unwrap(),
        );
        assert_eq!((n, page.len()), (4, 0));
        // A state the runner never reports.
        let (n, _) = select(
            records(),
            state_of,
            &ListQuery::parse(&request("sleeping", "", 0, 0)).unwrap(),
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn pages_cover_every_session_once() {
        let many: Vec<SessionRecord> = (0..23)
            .map(|i| record(&format!("s{i:02}"), i, i % 4))
            .collect();
        let mut seen = Vec::new();
        for page in 0..5 {
            let q = ListQuery::parse(&request("", "recent", page * 5, 5)).unwrap();
            seen.extend(ids(&select(many.clone(), |_| "idle", &q).1));
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 23);
    }
}
