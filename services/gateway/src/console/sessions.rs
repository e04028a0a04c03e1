//! The sessions page: every session's agent, channel, state, last activity, messages in
//! and out, tokens and cost, filtered, sorted and paginated by the runner (50 rows a page,
//! so only one page crosses gRPC however many sessions there are), refreshed live by the
//! script.

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::response::Response;
use ferroclaw_common::Config;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{ListSessionsRequest, ListSessionsResponse, Session};
use maud::{Markup, html};

use ferroclaw_common::spend;
use serde::Deserialize;

use super::layout::{self, respond};
use super::paging::{PAGE_SIZE, Page};
use super::{Console, ConsoleError, Operator, time, urls};

/// The states a session's agent can be in (the runner's words).
pub const STATES: [&str; 5] = ["idle", "queued", "running", "backoff", "unavailable"];

/// `?page=&agent=&state=&sort=`, read leniently: a bad page number is page 1.
#[derive(Debug, Default, Deserialize)]
pub struct SessionsQuery {
    #[serde(default)]
    page: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    state: String,
    /// `oldest` for least recent activity first; anything else: most recent first.
    #[serde(default)]
    sort: String,
}

impl SessionsQuery {
    fn page(&self) -> usize {
        self.page.parse().unwrap_or(1).max(1)
    }

    fn oldest_first(&self) -> bool {
        self.sort == "oldest"
    }

    /// The query string for `page` with the same filter and sort.
    fn with_page(&self, page: usize) -> String {
        let mut query = format!("page={page}");
        for (key, value) in [
            ("agent", &self.agent),
            ("state", &self.state),
            ("sort", &self.sort),
        ] {
            if !value.is_empty() {
                query.push_str(&format!("&{key}={}", urls::encode(value)));
            }
        }
        query
    }
}

fn parse(
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<SessionsQuery, ConsoleError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ConsoleError::BadRequest(e.body_text()))
}

/// One page of sessions, as the runner filters, sorts and cuts it. A page past the end
/// is asked again as the last page.
async fn load(
    state: &super::ConsoleState,
    query: &SessionsQuery,
) -> Result<(ListSessionsResponse, Page), ConsoleError> {
    let mut client = RunnerClient::new(state.app.runner.clone());
    let ask = |page: usize| ListSessionsRequest {
        agent: query.agent.clone(),
        state: query.state.clone(),
        sort: if query.oldest_first() {
            "oldest"
        } else {
            "recent"
        }
        .into(),
        offset: u32::try_from((page - 1) * PAGE_SIZE).unwrap_or(u32::MAX),
        limit: PAGE_SIZE as u32,
    };
    let mut response = client.list_sessions(ask(query.page())).await?.into_inner();
    let page = Page::of(query.page(), response.matched as usize, PAGE_SIZE);
    if page.number != query.page() {
        response = client.list_sessions(ask(page.number)).await?.into_inner();
    }
    Ok((response, page))
}

/// The whole page: filters, the table (swapped live by the script).
async fn render_page(
    state: &super::ConsoleState,
    operator: &Operator,
    query: &SessionsQuery,
) -> Result<Response, ConsoleError> {
    let (list, page) = load(state, query).await?;
    let config = &state.app.config;
    let agents: Vec<&str> = config.agents.iter().map(|a| a.name.as_str()).collect();
    let body = html! {
        h1 { "Sessions" }
        form.filters method="get" action="/ui/sessions" {
            label { "Agent "
                select name="agent" {
                    option value="" { "all" }
                    @for agent in &agents {
                        option value=(agent) selected[*agent == query.agent] { (agent) }
                    }
                    @if !query.agent.is_empty() && !agents.contains(&query.agent.as_str()) {
                        option value=(query.agent) selected { (query.agent) }
                    }
                }
            }
            label { "State "
                select name="state" {
                    option value="" { "all" }
                    @for s in STATES {
                        option value=(s) selected[s == query.state] { (s) }
                    }
                }
            }
            label { "Sort "
                select name="sort" {
                    option value="recent" selected[!query.oldest_first()] { "latest activity first" }
                    option value="oldest" selected[query.oldest_first()] { "oldest activity first" }
                }
            }
            button type="submit" { "Apply" }
        }
        div #sessions data-refresh=(format!("/ui/sessions/rows?{}", query.with_page(page.number))) {
            (render_rows(&list, &page, query, config, ferroclaw_content::now_ms()))
        }
        p.note { "Cost is reckoned from each agent's "
            code { "price_per_mtok" } "; “—” where the agent has none. “Pending” counts inbound messages the agent has not processed yet." }
    };
    Ok(respond(layout::page(
        "Sessions",
        "/ui/sessions",
        Some(operator),
        body,
    )))
}

/// `GET /ui/sessions`.
pub async fn page(
    axum::extract::State(state): Console,
    operator: Operator,
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let query = parse(query)?;
    render_page(&state, &operator, &query).await
}

/// `GET /ui/sessions/rows`: the table alone, which the script swaps in every few seconds.
pub async fn rows(
    axum::extract::State(state): Console,
    _operator: Operator,
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let query = parse(query)?;
    let (list, page) = load(&state, &query).await?;
    Ok(respond(render_rows(
        &list,
        &page,
        &query,
        &state.app.config,
        ferroclaw_content::now_ms(),
    )))
}

/// A count the runner may leave out (message counts of unlimited lists).
pub(super) fn maybe(n: Option<i64>) -> String {
    n.map_or_else(|| "—".into(), spend::count)
}

/// The page of sessions as a table with its pager.
pub fn render_rows(
    list: &ListSessionsResponse,
    page: &Page,
    query: &SessionsQuery,
    config: &Config,
    now_ms: i64,
) -> Markup {
    let matched = list.matched;
    html! {
        p.count { (matched) @if matched == 1 { " session" } @else { " sessions" } @if matched != list.total { " (of " (list.total) ")" } }
        div.scroll {
            table.sessions.stack {
                thead { tr {
                    th { "Agent" } th { "Channel" } th { "State" } th { "Last activity" }
                    th.num { "In" } th.num { "Out" } th.num { "Pending" } th.num { "Tokens" } th.num { "Cost" }
                    th.num { "Agent starts" } th { "Session" }
                } }
                tbody {
                    @for s in &list.sessions {
                        (row(s, config, now_ms))
                    }
                    @if list.sessions.is_empty() {
                        tr { td colspan="11" { "No sessions." } }
                    }
                }
            }
        }
        (pager(page, query))
    }
}

fn row(s: &Session, config: &Config, now_ms: i64) -> Markup {
    let price = config.agent(&s.agent).and_then(|a| a.price_per_mtok);
    let cost = spend::cost_usd(price, s.input_tokens, s.output_tokens);
    html! {
        tr {
            td data-label="Agent" { (s.agent) }
            td.channel data-label="Channel" {
                @if let Some(conversation) = urls::api_conversation(&s.conversation_key) {
                    a href=(urls::conversation(conversation)) { (s.conversation_key) }
                } @else {
                    a href=(urls::session(&s.id)) { (s.conversation_key) }
                }
            }
            td data-label="State" {
                span class={ "state state-" (state_class(&s.agent_state)) } { (s.agent_state) }
                // Several runners: which one serves it (or is missing, when unavailable).
                @if !s.runner.is_empty() { " " small.runner { "on " (s.runner) } }
            }
            td data-label="Last activity" title=(time::utc(s.last_activity_ms)) { (time::ago(s.last_activity_ms, now_ms)) }
            td.num data-label="In" { (maybe(s.messages_in)) }
            td.num data-label="Out" { (maybe(s.messages_out)) }
            td.num data-label="Pending" { (s.pending) }
            td.num data-label="Tokens" title=(format!("{} in, {} out, {} requests", spend::count(s.input_tokens), spend::count(s.output_tokens), spend::count(s.model_requests))) {
                (spend::count(s.input_tokens + s.output_tokens))
            }
            td.num data-label="Cost" { (spend::dollars(cost)) }
            td.num data-label="Agent starts" { (s.agent_starts) }
            td.id data-label="Session" { a href=(urls::session(&s.id)) { code { (s.id) } } }
        }
    }
}

/// A CSS class for a state: one of the known words, else `other` (the state itself is
/// runner output, not a class name).
fn state_class(state: &str) -> &'static str {
    STATES
        .iter()
        .find(|s| **s == state)
        .copied()
        .unwrap_or("other")
}

fn pager(page: &Page, query: &SessionsQuery) -> Markup {
    html! {
        nav.pager aria-label="pages" {
            @if let Some(p) = page.previous() {
                a rel="prev" href=(format!("/ui/sessions?{}", query.with_page(p))) { "← previous" }
            }
            span { "page " (page.number) " of " (page.count) }
            @if let Some(p) = page.next() {
                a rel="next" href=(format!("/ui/sessions?{}", query.with_page(p))) { "next →" }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(i: usize, state: &str) -> Session {
        Session {
            id: format!("ses-{i:05}"),
            agent: if i.is_multiple_of(2) { "main" } else { "ops" }.into(),
            conversation_key: format!("api:conv-{i}"),
            created_at_ms: 1_767_225_600_000,
            last_activity_ms: 1_767_225_600_000 + i as i64 * 1000,
            agent_state: state.into(),
            pending: (i % 3) as i64,
            agent_starts: 1,
            messages_in: Some(i as i64),
            messages_out: Some(2 * i as i64),
            model_requests: 3,
            input_tokens: 1_500_000,
            output_tokens: 100_000,
            runner: String::new(),
        }
    }

    fn query(page: &str, state: &str, sort: &str) -> SessionsQuery {
        SessionsQuery {
            page: page.into(),
            state: state.into(),
            sort: sort.into(),
            ..Default::default()
        }
    }

    fn rows_of(html: &str) -> usize {
        html.matches("<tr>").count() - 1
    }

    fn priced_config() -> Config {
        let mut config = Config::default();
        config.agents[0].price_per_mtok = Some((3.0, 15.0));
        config
    }

    fn list(sessions: Vec<Session>, matched: u64, total: u64) -> ListSessionsResponse {
        ListSessionsResponse {
            sessions,
            matched,
            total,
            ..Default::default()
        }
    }

    #[test]
    fn a_session_of_a_missing_runner_shows_which() {
        let mut away = session(1, "unavailable");
        away.runner = "runner-b".into();
        let here = session(2, "idle");
        let html = render_rows(
            &list(vec![away, here], 2, 2),
            &Page::of(1, 2, PAGE_SIZE),
            &query("1", "", ""),
            &priced_config(),
            0,
        )
        .into_string();
        assert!(html.contains("state-unavailable"), "{html}");
        assert_eq!(html.matches("on runner-b").count(), 1, "{html}");
    }

    #[test]
    fn a_page_shows_its_rows_counts_tokens_and_cost() {
        let sessions: Vec<Session> = (0..50).map(|i| session(i, "idle")).collect();
        let page = Page::of(2, 120, PAGE_SIZE);
        let html = render_rows(
            &list(sessions, 120, 120),
            &page,
            &query("2", "", "oldest"),
            &priced_config(),
            0,
        )
        .into_string();
        assert_eq!(rows_of(&html), 50);
        assert!(html.contains("page 2 of 3"));
        assert!(
            html.contains(r#"href="/ui/sessions?page=3&amp;sort=oldest""#),
            "{html}"
        );
        assert!(html.contains(r#"href="/ui/sessions?page=1&amp;sort=oldest""#));
        // main is priced: 1.5 M input at $3 plus 0.1 M output at $15; ops is not.
        assert!(html.contains("$6.00"), "{html}");
        assert!(html.contains("1,600,000"));
        assert!(html.contains(r#"data-label="Cost">—"#));
        assert!(html.contains(r#"data-label="Out">98<"#), "{html}");
    }

    #[test]
    fn a_filtered_count_names_the_total_and_unknown_counts_show_a_dash() {
        let mut s = session(3, "running");
        s.messages_in = None;
        let html = render_rows(
            &list(vec![s], 10, 100),
            &Page::of(1, 10, PAGE_SIZE),
            &query("", "running", ""),
            &Config::default(),
            0,
        )
        .into_string();
        assert!(html.contains("10 sessions (of 100)"));
        assert!(html.contains(r#"data-label="In">—"#));
    }

    #[test]
    fn hostile_ids_are_escaped_and_links_stay_in_the_console() {
        let mut s = session(1, "<b>weird</b>");
        s.conversation_key = "api:../../v1/x?\"><script>".into();
        s.id = "<img src=x>".into();
        let html = render_rows(
            &list(vec![s], 1, 1),
            &Page::of(1, 1, PAGE_SIZE),
            &query("", "", ""),
            &Config::default(),
            0,
        )
        .into_string();
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("<b>"));
        assert!(html.contains("state-other"));
        assert!(
            html.contains(r#"href="/ui/conversations/..%2F..%2Fv1%2Fx%3F%22%3E%3Cscript%3E""#),
            "{html}"
        );
        assert!(html.contains(r#"href="/ui/sessions/%3Cimg%20src%3Dx%3E""#));
    }

    #[test]
    fn bad_page_numbers_are_page_one() {
        assert_eq!(query("x", "", "").page(), 1);
        assert_eq!(query("0", "", "").page(), 1);
        assert_eq!(query("7", "", "").page(), 7);
    }
}
