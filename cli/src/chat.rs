//! `ferroclaw chat -c ID`: an interactive chat in a terminal. Each line read from stdin is
//! posted to the conversation (`POST /v1/messages`); the assistant's messages are printed as
//! they arrive on the conversation's event stream (`GET /v1/conversations/{id}/events`),
//! which is reopened with `Last-Event-ID` when it drops. End of input (Ctrl-D) ends the chat.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::api::{ApiArgs, call, encode};
use crate::sse;

/// Without a byte for this long (the gateway sends a heartbeat every 15 s), the stream is
/// taken for dead and reopened.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(10);

pub async fn run(api: &ApiArgs, conversation: &str, sender: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let encoded = encode(conversation);
    // Where the conversation ends now: only messages from here on are shown.
    let messages = format!("/v1/conversations/{encoded}/messages");
    let start = call(api.request(&client, reqwest::Method::GET, &messages))
        .await?
        .get("next_cursor")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let events = format!("/v1/conversations/{encoded}/events");
    let mut watching = tokio::spawn(watch(api.clone(), client.clone(), events, start));
    eprintln!("chatting in {conversation:?}: type a message and press Enter; Ctrl-D ends");
    let mut lines = stdin_lines();
    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { break };
                let text = line.context("cannot read stdin")?;
                if text.trim().is_empty() {
                    continue;
                }
                let post = api
                    .request(&client, reqwest::Method::POST, "/v1/messages")
                    .json(&json!({"conversation": conversation, "text": text, "sender": sender}));
                // A message the API refuses is reported; the chat goes on.
                if let Err(e) = call(post).await {
                    eprintln!("not sent: {e:#}");
                }
            }
            ended = &mut watching => {
                return match ended {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Ok(()),
                    Err(e) => Err(e).context("the event stream task failed"),
                };
            }
        }
    }
    watching.abort();
    Ok(())
}

/// Lines of stdin from a plain thread: a read blocked in the terminal must not keep the
/// process from exiting (a runtime waits for its own blocking tasks).
fn stdin_lines() -> tokio::sync::mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let failed = line.is_err();
            if tx.blocking_send(line).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Why a stream ended.
enum Interrupted {
    /// Worth reopening: the network, a restart, a 5xx.
    Retry(anyhow::Error),
    /// Reopening cannot help (a 4xx: bad token, unknown conversation).
    Fatal(anyhow::Error),
}

/// Prints every message after `after`, reopening the stream from the last one shown.
async fn watch(
    api: ApiArgs,
    client: reqwest::Client,
    path: String,
    after: i64,
) -> anyhow::Result<()> {
    let mut seen = Seen { last: after };
    let mut retry = FIRST_RETRY;
    loop {
        let opened_at = seen.last;
        match stream_once(&api, &client, &path, &mut seen).await {
            Ok(()) => {}
            Err(Interrupted::Fatal(e)) => return Err(e),
            Err(Interrupted::Retry(e)) => eprintln!("(stream interrupted: {e:#}; reconnecting)"),
        }
        // Back off only while nothing gets through.
        retry = if seen.last > opened_at {
            FIRST_RETRY
        } else {
            (retry * 2).min(MAX_RETRY)
        };
        tokio::time::sleep(retry).await;
    }
}

/// One connection to the event stream, until it ends.
async fn stream_once(
    api: &ApiArgs,
    client: &reqwest::Client,
    path: &str,
    seen: &mut Seen,
) -> Result<(), Interrupted> {
    let response = api
        .request(client, reqwest::Method::GET, path)
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", seen.last.to_string())
        .send()
        .await
        .map_err(|e| Interrupted::Retry(e.into()))?;
    let status = response.status();
    if !status.is_success() {
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        let error = anyhow::anyhow!("{status}: {message}");
        return Err(
            if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
                Interrupted::Fatal(error)
            } else {
                Interrupted::Retry(error)
            },
        );
    }
    let mut response = response;
    let mut parser = sse::Parser::default();
    loop {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, response.chunk()).await {
            Err(_) => return Err(Interrupted::Retry(anyhow::anyhow!("no heartbeat"))),
            Ok(Err(e)) => return Err(Interrupted::Retry(e.into())),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(chunk))) => chunk,
        };
        let events = parser
            .feed(&chunk)
            .map_err(|e| Interrupted::Retry(e.into()))?;
        for event in events {
            if let Some(message) = seen.accept(&event) {
                println!("{}", show(&message));
            }
        }
    }
}

/// The last message shown: the stream's resume point, and a guard against showing one twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    last: i64,
}

impl Seen {
    /// The message an event carries, when it is one not shown yet.
    fn accept(&mut self, event: &sse::Event) -> Option<Value> {
        if event.event != "message" {
            return None;
        }
        let cursor: i64 = event.id.as_deref()?.parse().ok()?;
        if cursor <= self.last {
            return None;
        }
        let message: Value = serde_json::from_str(&event.data).ok()?;
        self.last = cursor;
        Some(message)
    }
}

/// A message as a line (or lines) of the chat.
fn show(message: &Value) -> String {
    let text = message["text"].as_str().unwrap_or_default();
    let mut shown = if text.is_empty() {
        format!("[{}]", message["kind"].as_str().unwrap_or("message"))
    } else {
        text.to_string()
    };
    if let Some(link) = message["download"].as_str() {
        shown.push_str(&format!(" (download: {link})"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, text: &str) -> sse::Event {
        sse::Event {
            event: "message".into(),
            data: json!({"cursor": id, "kind": "chat", "text": text}).to_string(),
            id: Some(id.into()),
        }
    }

    #[test]
    fn each_message_is_shown_once_in_order() {
        let mut seen = Seen { last: 5 };
        assert!(seen.accept(&message("5", "old")).is_none());
        assert_eq!(seen.accept(&message("7", "a")).unwrap()["text"], "a");
        assert!(seen.accept(&message("7", "a")).is_none(), "a repeat");
        assert!(seen.accept(&message("6", "late")).is_none(), "a step back");
        assert_eq!(seen.accept(&message("9", "b")).unwrap()["text"], "b");
        assert_eq!(seen.last, 9);
    }

    #[test]
    fn other_events_and_bad_ids_are_skipped() {
        let mut seen = Seen { last: 0 };
        let mut other = message("3", "x");
        other.event = "ping".into();
        assert!(seen.accept(&other).is_none());
        assert!(seen.accept(&message("x", "x")).is_none());
        let mut bad_json = message("4", "x");
        bad_json.data = "{".into();
        assert!(seen.accept(&bad_json).is_none());
        assert_eq!(seen.last, 0, "nothing accepted moves the resume point");
    }

    #[test]
    fn messages_show_their_text_or_kind() {
        assert_eq!(show(&json!({"text": "hi", "kind": "chat"})), "hi");
        assert_eq!(show(&json!({"text": "", "kind": "card"})), "[card]");
        assert_eq!(
            show(&json!({"text": "f", "kind": "file", "download": "/v1/x"})),
            "f (download: /v1/x)"
        );
    }
}
