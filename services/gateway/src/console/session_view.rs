//! A session's page: its messages both ways as a chat, read from the session's mailbox
//! through the runner, for any channel (a Discord channel's session, a webhook source, a
//! task's runs). Refreshed live by the script. API conversations also have their own view
//! (with a send form and replies over SSE), linked from here.

use axum::extract::{Path, State};
use axum::response::Response;
use ferroclaw_proto::v1::runner_client::RunnerClient;
use ferroclaw_proto::v1::{GetSessionRequest, ListSessionMessagesRequest, Session, SessionMessage};
use maud::{Markup, html};

use ferroclaw_common::spend;
use serde_json::Value;

use super::conversation::{card, file_link};
use super::layout::{self, respond};
use super::sessions::maybe;
use super::{Console, ConsoleError, Operator, time, urls};

/// Messages shown (the latest).
const SHOWN: u32 = 200;
/// Longest text shown per message, in characters; the rest is cut with a mark.
const LONGEST_TEXT: usize = 4000;

/// `GET /ui/sessions/{id}`.
pub async fn page(
    State(state): Console,
    operator: Operator,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let mut runner = RunnerClient::new(state.app.runner.clone());
    let session = runner
        .get_session(GetSessionRequest {
            session_id: id.clone(),
        })
        .await?
        .into_inner();
    let messages = latest(&state, &id).await?;
    let price = state
        .app
        .config
        .agent(&session.agent)
        .and_then(|a| a.price_per_mtok);
    let body = html! {
        h1 { "Session " code { (session.id) } }
        (facts(&session, price))
        div #session-chat data-refresh=(format!("{}/messages", urls::session(&id))) {
            (chat(&id, &messages, &operator))
        }
    };
    Ok(respond(layout::page(
        "Session",
        "/ui/sessions",
        Some(&operator),
        body,
    )))
}

/// `GET /ui/sessions/{id}/messages`: the chat alone, which the script swaps in.
pub async fn messages(
    State(state): Console,
    operator: Operator,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let messages = latest(&state, &id).await?;
    Ok(respond(chat(&id, &messages, &operator)))
}

async fn latest(
    state: &super::ConsoleState,
    id: &str,
) -> Result<Vec<SessionMessage>, ConsoleError> {
    Ok(RunnerClient::new(state.app.runner.clone())
        .list_session_messages(ListSessionMessagesRequest {
            session_id: id.to_string(),
            limit: SHOWN,
        })
        .await?
        .into_inner()
        .messages)
}

fn facts(s: &Session, price: Option<(f64, f64)>) -> Markup {
    html! {
        ul.facts {
            li { "Agent: " (s.agent) }
            li { "Channel: "
                @if let Some(conversation) = urls::api_conversation(&s.conversation_key) {
                    a href=(urls::conversation(conversation)) { (s.conversation_key) }
                } @else { (s.conversation_key) }
            }
            li { "State: " (s.agent_state) }
            li { "Messages: " (maybe(s.messages_in)) " in, " (maybe(s.messages_out)) " out, " (s.pending) " pending" }
            li { "Tokens: " (spend::count(s.input_tokens)) " in, " (spend::count(s.output_tokens)) " out ("
                (spend::dollars(spend::cost_usd(price, s.input_tokens, s.output_tokens))) ")" }
            li { "Last activity: " (time::utc(s.last_activity_ms)) }
        }
    }
}

/// The messages as a chat: the agent's on one side, what it was sent on the other.
pub fn chat(session_id: &str, messages: &[SessionMessage], operator: &Operator) -> Markup {
    html! {
        ol.chat {
            @for m in messages { (bubble(session_id, m, operator)) }
            @if messages.is_empty() { li.note { "No messages yet." } }
        }
    }
}

fn bubble(session_id: &str, m: &SessionMessage, operator: &Operator) -> Markup {
    let content: Value = serde_json::from_str(&m.content_json).unwrap_or(Value::Null);
    let from_agent = m.direction == "out";
    let who = if from_agent {
        "agent".to_string()
    } else if !m.sender.is_empty() {
        m.sender.clone()
    } else {
        m.kind.clone()
    };
    html! {
        li class={ "msg " @if from_agent { "agent" } @else { "mine" } } data-kind=(m.kind) data-seq=(m.seq) {
            div.meta { (who) " · " (m.kind) " · " (time::utc(m.created_at_ms)) " · " span class={ "delivery-" (state_class(&m.state)) } { (m.state) } }
            @if m.kind == "card" && from_agent {
                (card(&content, operator))
            } @else if m.kind == "file" && from_agent && let Some(path) = content["path"].as_str() {
                a.file href=(file_link(session_id, path)) download { (content["name"].as_str().unwrap_or(path)) }
            } @else {
                div.text { (shown_text(&m.kind, &content)) }
            }
            @if let Some(files) = content["attachments"].as_array() {
                @for a in files { div.attachment { "📎 " (a["name"].as_str().unwrap_or("file")) } }
            }
        }
    }
}

/// What a message says, in a line or a paragraph, cut at [`LONGEST_TEXT`].
fn shown_text(kind: &str, content: &Value) -> String {
    let text = match kind {
        "webhook" => content["payload"].to_string(),
        "task" => format!(
            "task {}: {}",
            content["name"].as_str().unwrap_or_default(),
            content["prompt"].as_str().unwrap_or_default()
        ),
        "action" => format!("action {}", content["action"].as_str().unwrap_or("?")),
        _ => content["text"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| content.to_string()),
    };
    if text.chars().count() > LONGEST_TEXT {
        let cut: String = text.chars().take(LONGEST_TEXT).collect();
        format!("{cut} … (cut)")
    } else {
        text
    }
}

/// A class for a row's state: a known word, else `other` (runner output is no class name).
fn state_class(state: &str) -> &'static str {
    match state {
        "delivered" | "processed" => "ok",
        "failed" => "failed",
        "pending" => "pending",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::auth::Keys;

    fn operator() -> Operator {
        Operator {
            signed: Keys::open_session(),
            csrf: "tok".into(),
            can_sign_out: false,
        }
    }

    fn message(direction: &str, kind: &str, content: &str, sender: &str) -> SessionMessage {
        SessionMessage {
            direction: direction.into(),
            seq: 1,
            kind: kind.into(),
            content_json: content.into(),
            created_at_ms: 1_767_258_000_000,
            state: "delivered".into(),
            sender: sender.into(),
        }
    }

    #[test]
    fn both_directions_read_as_a_chat_and_stay_escaped() {
        let html = chat(
            "ses-1",
            &[
                message(
                    "in",
                    "chat",
                    r#"{"text":"hi <b>there</b>","sender":"alice","attachments":[{"path":"in/inbox/1/a.png","name":"a.png","size":3}]}"#,
                    "alice",
                ),
                message("out", "chat", r#"{"text":"echo: hi"}"#, ""),
                message(
                    "out",
                    "card",
                    r#"{"question_id":"q1","text":"Go?","options":[{"id":"y","label":"Yes"}]}"#,
                    "",
                ),
                message("in", "webhook", r#"{"source":"gh","payload":{"a":1}}"#, "gh"),
            ],
            &operator(),
        )
        .into_string();
        assert!(html.contains("hi &lt;b&gt;there&lt;/b&gt;"), "{html}");
        assert!(html.contains(r#"class="msg mine""#) && html.contains(r#"class="msg agent""#));
        assert!(html.contains("alice · chat"));
        assert!(html.contains("📎 a.png"));
        assert!(html.contains(r#"action="/ui/questions/q1/answer""#));
        assert!(html.contains(r#"{&quot;a&quot;:1}"#), "{html}");
    }

    #[test]
    fn long_text_is_cut() {
        let long = "x".repeat(LONGEST_TEXT + 10);
        let text = shown_text("chat", &serde_json::json!({ "text": long }));
        assert!(text.ends_with("… (cut)"));
        assert_eq!(
            text.chars().count(),
            LONGEST_TEXT + " … (cut)".chars().count()
        );
    }
}
