//! The conversation view: an API conversation's messages as a chat, new ones live over the
//! SSE stream (the API's handler, behind the console's cookie), a form to send as a chosen
//! sender, and question cards whose buttons answer with the API's rules.
//!
//! Delivery keeps the assistant's messages only; the operator's own sends show in the page
//! that sent them (the script adds them) but not after a reload.

use std::collections::VecDeque;

use axum::Form;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use ferroclaw_proto::v1::{
    AnswerQuestionRequest, ConversationMessage, ListConversationMessagesRequest,
};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{self, csrf_field, respond};
use super::{Console, ConsoleError, Operator, from_script, time, urls};
use crate::conversation_events::{self, EventsQuery};
use crate::error::ApiPath;
use crate::ingress::check_conversation;

/// Messages the page shows at most (the latest); older ones are not rendered.
const SHOWN: usize = 200;
/// Messages asked of delivery per call while reading the history.
const BATCH: u32 = 500;

/// `GET /ui/conversations/{id}`.
pub async fn page(
    State(state): Console,
    operator: Operator,
    Path(conversation): Path<String>,
) -> Result<Response, ConsoleError> {
    check_conversation(&conversation)?;
    state.app.ingress.conversation_agent(&conversation)?;
    let (messages, cursor) = latest(&state.app.delivery, &conversation).await?;
    let base = urls::conversation(&conversation);
    let body = html! {
        h1 { "Conversation " code { (conversation) } }
        ol #chat.chat data-events=(format!("{base}/events?after={cursor}")) data-csrf=(operator.csrf) {
            @for m in &messages { (message(m, &operator)) }
        }
        p #live.note role="status" { "Live updates need JavaScript." }
        form #send.send method="post" action=(format!("{base}/messages")) data-fetch="message" {
            (csrf_field(&operator))
            label { "Sender " input #sender type="text" name="sender" value="operator" maxlength="200"; }
            label.grow { "Message " textarea #text name="text" rows="2" required {} }
            button type="submit" { "Send" }
            p.status role="status" {}
        }
        form.send method="post" action=(format!("{base}/files")) enctype="multipart/form-data" data-fetch="message" {
            (csrf_field(&operator))
            input type="hidden" name="sender" value="operator" data-sender-copy;
            label.grow { "File " input type="file" name="file" required; }
            label.grow { "Caption " input type="text" name="text" maxlength="2000"; }
            button type="submit" { "Send file" }
            p.status role="status" {}
        }
        @if let Some(m) = messages.back() {
            p.note { a href=(urls::session(&m.session_id)) { "Both sides of this conversation, as the agent saw them" } }
        }
    };
    Ok(respond(layout::page(
        "Conversation",
        "/ui/sessions",
        Some(&operator),
        body,
    )))
}

/// The latest [`SHOWN`] messages and the cursor after them, read in batches.
async fn latest(
    delivery: &ferroclaw_common::grpc_auth::GrpcChannel,
    conversation: &str,
) -> Result<(VecDeque<ConversationMessage>, i64), ConsoleError> {
    let mut client = DeliveryClient::new(delivery.clone());
    let mut kept = VecDeque::new();
    let mut after = 0;
    loop {
        let response = client
            .list_conversation_messages(ListConversationMessagesRequest {
                conversation: conversation.to_string(),
                after,
                wait_ms: 0,
                limit: BATCH,
            })
            .await?
            .into_inner();
        let got = response.messages.len();
        for m in response.messages {
            if kept.len() == SHOWN {
                kept.pop_front();
            }
            kept.push_back(m);
        }
        // No progress or a short batch: that was the end.
        if got < BATCH as usize || response.next_cursor <= after {
            return Ok((kept, response.next_cursor.max(after)));
        }
        after = response.next_cursor;
    }
}

/// One message as a chat bubble; a card gets its answer buttons, a file its link.
fn message(m: &ConversationMessage, operator: &Operator) -> Markup {
    let content: Value = serde_json::from_str(&m.content_json).unwrap_or(Value::Null);
    html! {
        li.msg.agent data-cursor=(m.cursor) data-kind=(m.kind) {
            div.meta { (m.kind) " · " (time::utc(m.created_at_ms)) }
            // A card shows its question itself.
            @if !m.text.is_empty() && m.kind != "card" { div.text { (m.text) } }
            @if m.kind == "card" { (card(&content, operator)) }
            @if m.kind == "file" && let Some(path) = content["path"].as_str() {
                a.file href=(file_link(&m.session_id, path)) download { (content["name"].as_str().unwrap_or(path)) }
            }
        }
    }
}

/// The console's link to a session's outbox file (each path segment encoded).
pub(super) fn file_link(session_id: &str, path: &str) -> String {
    let path: Vec<String> = path.split('/').map(urls::encode).collect();
    format!(
        "/ui/sessions/{}/files/{}",
        urls::encode(session_id),
        path.join("/")
    )
}

/// A question card: the question, and one button per option in a form that answers it.
pub(super) fn card(content: &Value, operator: &Operator) -> Markup {
    let question = content["question_id"].as_str().unwrap_or_default();
    let options = content["options"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    html! {
        form.card method="post" action=(format!("/ui/questions/{}/answer", urls::encode(question))) data-fetch="answer" {
            (csrf_field(operator))
            input type="hidden" name="user" value="operator";
            @if let Some(text) = content["text"].as_str() { p.question { (text) } }
            div.options {
                @for option in options {
                    button type="submit" name="option" value=(option["id"].as_str().unwrap_or_default()) {
                        (option["label"].as_str().or(option["id"].as_str()).unwrap_or("?"))
                    }
                }
            }
            p.status role="status" {}
        }
    }
}

/// `GET /ui/conversations/{id}/events`: the API's SSE stream, behind the cookie.
pub async fn events(
    State(state): Console,
    _operator: Operator,
    Path(conversation): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    conversation_events::sse(State(state.app.clone()), Path(conversation), headers, query)
        .await
        .into_response()
}

#[derive(Deserialize)]
pub struct SendForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    sender: String,
}

fn form<T>(form: Result<Form<T>, FormRejection>) -> Result<T, ConsoleError> {
    form.map(|Form(f)| f)
        .map_err(|e| ConsoleError::BadRequest(e.body_text()))
}

/// `POST /ui/conversations/{id}/messages`: the same ingress as `POST /v1/messages`.
pub async fn send(
    State(state): Console,
    operator: Operator,
    Path(conversation): Path<String>,
    headers: HeaderMap,
    sent: Result<Form<SendForm>, FormRejection>,
) -> Result<Response, ConsoleError> {
    let sent = form(sent)?;
    operator.check_csrf(&state.keys, &sent.csrf)?;
    let accepted = state
        .app
        .ingress
        .message(&conversation, sent.text, sent.sender, None)
        .await?;
    if from_script(&headers) {
        // A command the gateway answered itself is shown as that answer.
        let text = accepted.answer.unwrap_or_else(|| "sent".into());
        return Ok((StatusCode::ACCEPTED, text).into_response());
    }
    Ok(Redirect::to(&urls::conversation(&conversation)).into_response())
}

/// Most bytes one sent file may have (what the runner takes into an inbox).
pub const MAX_FILE_BYTES: usize = 25 * 1024 * 1024;

/// A multipart send: the fields read, the file kept in memory (bounded by the route's
/// body limit).
#[derive(Default)]
struct FileSend {
    csrf: String,
    sender: String,
    text: String,
    file: Option<(String, Vec<u8>)>,
}

async fn read_file_send(mut multipart: Multipart) -> Result<FileSend, ConsoleError> {
    let bad =
        |e: MultipartError| ConsoleError::BadRequest(format!("unreadable form: {}", e.body_text()));
    let mut sent = FileSend::default();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        match field.name().unwrap_or_default() {
            "file" => {
                let name = base_name(field.file_name().unwrap_or_default());
                let data = field.bytes().await.map_err(bad)?;
                if !name.is_empty() || !data.is_empty() {
                    sent.file = Some((name, data.to_vec()));
                }
            }
            "csrf" => sent.csrf = field.text().await.map_err(bad)?,
            "sender" => sent.sender = field.text().await.map_err(bad)?,
            "text" => sent.text = field.text().await.map_err(bad)?,
            // Unknown fields are ignored, as the plain form does.
            _ => {}
        }
    }
    Ok(sent)
}

/// The last path segment of a browser-given file name (some send a full Windows path).
fn base_name(name: &str) -> String {
    name.rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `POST /ui/conversations/{id}/files`: a file (and an optional caption) into the
/// conversation's session inbox, then a chat message that carries it.
pub async fn send_file(
    State(state): Console,
    operator: Operator,
    Path(conversation): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ConsoleError> {
    let multipart = multipart.map_err(|e| ConsoleError::BadRequest(e.body_text()))?;
    let sent = read_file_send(multipart).await?;
    operator.check_csrf(&state.keys, &sent.csrf)?;
    check_conversation(&conversation)?;
    let agent = state.app.ingress.conversation_agent(&conversation)?;
    let Some((name, data)) = sent.file else {
        return Err(ConsoleError::BadRequest("choose a file to send".into()));
    };
    if name.is_empty() {
        return Err(ConsoleError::BadRequest("the file has no name".into()));
    }
    if data.len() > MAX_FILE_BYTES {
        return Err(ConsoleError::BadRequest(format!(
            "the file is {} bytes; at most {MAX_FILE_BYTES} can be sent",
            data.len()
        )));
    }
    // The folder is named by this message's own id, so two files of one name do not meet.
    let message_id = ferroclaw_common::ids::new_id("upl");
    let attachment = state
        .app
        .ingress
        .put_inbox_file(
            &agent,
            format!("api:{conversation}"),
            &message_id,
            &name,
            data,
        )
        .await?;
    let accepted = state
        .app
        .ingress
        .message_with_files(
            &conversation,
            sent.text,
            sent.sender,
            None,
            vec![attachment],
        )
        .await?;
    if from_script(&headers) {
        let text = accepted.answer.unwrap_or_else(|| format!("sent {name}"));
        return Ok((StatusCode::ACCEPTED, text).into_response());
    }
    Ok(Redirect::to(&urls::conversation(&conversation)).into_response())
}

#[derive(Deserialize)]
pub struct AnswerForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    option: String,
    #[serde(default)]
    user: String,
}

/// `POST /ui/questions/{id}/answer`: delivery applies the API's rules (first answer wins,
/// expiry, who may answer); a refusal's reason is the answer's text.
pub async fn answer(
    State(state): Console,
    operator: Operator,
    Path(question_id): Path<String>,
    answered: Result<Form<AnswerForm>, FormRejection>,
) -> Result<Response, ConsoleError> {
    let answered = form(answered)?;
    operator.check_csrf(&state.keys, &answered.csrf)?;
    let response = DeliveryClient::new(state.app.delivery.clone())
        .answer_question(AnswerQuestionRequest {
            question_id,
            option: answered.option,
            user: answered.user,
        })
        .await?
        .into_inner();
    Ok(format!("answered: {}", response.label).into_response())
}

/// `GET /ui/sessions/{id}/files/{path}`: an outbox file, as the API serves it.
pub async fn file(
    State(state): Console,
    _operator: Operator,
    ApiPath(path): ApiPath<(String, String)>,
) -> Result<Response, ConsoleError> {
    Ok(crate::http::get_outbox_file(State(state.app.clone()), ApiPath(path)).await?)
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

    #[test]
    fn a_card_has_one_button_per_option_and_its_csrf_token() {
        let content = serde_json::json!({
            "question_id": "q/1", "text": "Deploy <now>?",
            "options": [{"id": "yes", "label": "Yes"}, {"id": "no\"", "label": "<i>No</i>"}],
        });
        let html = card(&content, &operator()).into_string();
        assert!(
            html.contains(r#"action="/ui/questions/q%2F1/answer""#),
            "{html}"
        );
        assert!(html.contains(r#"name="csrf" value="tok""#));
        assert_eq!(html.matches("<button").count(), 2);
        assert!(html.contains("Deploy &lt;now&gt;?"));
        assert!(html.contains("&lt;i&gt;No&lt;/i&gt;") && html.contains(r#"value="no&quot;""#));
    }

    #[test]
    fn browser_file_names_keep_their_last_segment() {
        assert_eq!(base_name("C:\\Users\\me\\report.pdf"), "report.pdf");
        assert_eq!(base_name("../../etc/passwd"), "passwd");
        assert_eq!(base_name(" notes.txt "), "notes.txt");
        assert_eq!(base_name(""), "");
    }

    #[test]
    fn file_links_stay_under_the_session() {
        assert_eq!(
            file_link("ses 1", "out/../a b.txt"),
            "/ui/sessions/ses%201/files/out/../a%20b.txt"
        );
    }
}
