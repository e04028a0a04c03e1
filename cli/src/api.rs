//! `ferroclaw send` and `ferroclaw hook`: clients of the gateway's REST API.

use std::io::Read;

use anyhow::{Context, bail};
use serde_json::{Value, json};

#[derive(clap::Args, Clone)]
pub struct ApiArgs {
    /// The gateway's REST API.
    #[arg(long, env = "FERROCLAW_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Bearer token, when the gateway requires one.
    #[arg(long, env = "FERROCLAW_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ApiArgs {
    pub(crate) fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.api.trim_end_matches('/'));
        let builder = client.request(method, url);
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }
}

/// Sends the request and returns its JSON body, or fails with the API's error message.
pub(crate) async fn call(builder: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = builder
        .send()
        .await
        .context("cannot reach the ferroclaw API")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        bail!("{status}: {message}");
    }
    Ok(body)
}

pub async fn send(
    api: &ApiArgs,
    conversation: &str,
    sender: &str,
    text: &str,
    wait: f64,
    idempotency_key: Option<&str>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let encoded = encode(conversation);
    let path = format!("/v1/conversations/{encoded}/messages");
    // Where the conversation ends now, so only replies to this message are printed.
    let mut cursor = call(api.request(&client, reqwest::Method::GET, &path)).await?["next_cursor"]
        .as_i64()
        .unwrap_or(0);
    let mut post = api
        .request(&client, reqwest::Method::POST, "/v1/messages")
        .json(&json!({"conversation": conversation, "text": text, "sender": sender}));
    if let Some(key) = idempotency_key {
        post = post.header("Idempotency-Key", key);
    }
    let accepted = call(post).await?;
    eprintln!(
        "accepted: session {} message {}{}",
        accepted["session_id"].as_str().unwrap_or("?"),
        accepted["message_id"].as_str().unwrap_or("?"),
        if accepted["duplicate"] == json!(true) {
            " (duplicate)"
        } else {
            ""
        }
    );
    if wait <= 0.0 {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(wait);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            bail!("no reply within {wait} s");
        }
        let page = call(api.request(
            &client,
            reqwest::Method::GET,
            &format!("{path}?after={cursor}&wait={}", left.as_secs_f64()),
        ))
        .await?;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        cursor = page["next_cursor"].as_i64().unwrap_or(cursor);
        let mut answered = false;
        for message in &messages {
            println!("{}", message["text"].as_str().unwrap_or_default());
            answered |= message["in_reply_to"].is_number();
        }
        if answered {
            return Ok(());
        }
    }
}

pub async fn hook(
    api: &ApiArgs,
    source: &str,
    json_arg: Option<String>,
    idempotency_key: Option<&str>,
) -> anyhow::Result<()> {
    let text = match json_arg {
        Some(text) => text,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the JSON document from stdin")?;
            text
        }
    };
    let payload: Value =
        serde_json::from_str(&text).context("the webhook body is not valid JSON")?;
    let client = reqwest::Client::new();
    let mut post = api
        .request(
            &client,
            reqwest::Method::POST,
            &format!("/v1/hooks/{}", encode(source)),
        )
        .json(&payload);
    if let Some(key) = idempotency_key {
        post = post.header("Idempotency-Key", key);
    }
    println!("{}", call(post).await?);
    Ok(())
}

/// Percent-encodes a path segment.
pub(crate) fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(clap::Subcommand)]
pub enum TaskCommand {
    /// Every task (or one session's), one line each.
    List {
        #[arg(long)]
        session: Option<String>,
    },
    /// A task's run history.
    Runs {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// Fire one run now, outside the schedule.
    Run {
        id: String,
    },
}

pub async fn tasks(api: &ApiArgs, command: TaskCommand) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let (method, path) = match &command {
        TaskCommand::List { session } => (
            reqwest::Method::GET,
            format!(
                "/v1/tasks?session_id={}",
                encode(session.as_deref().unwrap_or(""))
            ),
        ),
        TaskCommand::Runs { id } => (
            reqwest::Method::GET,
            format!("/v1/tasks/{}/runs", encode(id)),
        ),
        TaskCommand::Pause { id } => (
            reqwest::Method::POST,
            format!("/v1/tasks/{}/pause", encode(id)),
        ),
        TaskCommand::Resume { id } => (
            reqwest::Method::POST,
            format!("/v1/tasks/{}/resume", encode(id)),
        ),
        TaskCommand::Cancel { id } => (
            reqwest::Method::POST,
            format!("/v1/tasks/{}/cancel", encode(id)),
        ),
        TaskCommand::Run { id } => (
            reqwest::Method::POST,
            format!("/v1/tasks/{}/run", encode(id)),
        ),
    };
    let body = call(api.request(&client, method, &path)).await?;
    match command {
        TaskCommand::List { .. } => {
            for t in body["tasks"].as_array().cloned().unwrap_or_default() {
                let schedule = &t["schedule"];
                let when = schedule["cron"]
                    .as_str()
                    .map(String::from)
                    .or_else(|| {
                        schedule["interval_secs"]
                            .as_i64()
                            .map(|s| format!("every {s}s"))
                    })
                    .or_else(|| schedule["at"].as_str().map(|a| format!("at {a}")))
                    .unwrap_or_default();
                println!(
                    "{}  {:<9}  {} ({})  {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["state"].as_str().unwrap_or("?"),
                    when,
                    schedule["timezone"].as_str().unwrap_or("UTC"),
                    t["name"].as_str().unwrap_or("")
                );
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(&body)?),
    }
    Ok(())
}
