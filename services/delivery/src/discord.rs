//! Replies to Discord channels over Discord's REST API (v10): long replies split at line
//! or code-fence boundaries into ordered chunks of at most 2 000 characters, each posted
//! with a nonce and `enforce_nonce`, so a retried post cannot appear twice. Every post
//! carries `allowed_mentions`, so a reply never pings a role or everyone unless its route
//! allows it. Rate limits are honoured as Discord announces them ([`RateLimits`]); a 429 is
//! a wait, never a failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferroclaw_common::config::DiscordConfig;
use ferroclaw_content::OutboundContent;
use ferroclaw_proto::v1::OutboundMessage;
use serde_json::{Value, json};

use crate::discord_limits::RateLimits;
use crate::send_error::SendError;

/// Discord's limit on a message's content, in characters.
pub const MAX_CHARS: usize = 2000;
/// Discord's API when `api_url` is not set.
const DISCORD_API: &str = "https://discord.com";
/// One request's longest wait for Discord's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const MESSAGES: &str = "messages";
const TYPING: &str = "typing";

#[derive(Clone)]
pub struct DiscordOut {
    http: reqwest::Client,
    /// `<base>/api/v10`.
    api: String,
    authorization: String,
    limits: Arc<RateLimits>,
    max_upload_bytes: u64,
    routes: Arc<Vec<ferroclaw_common::config::DiscordRoute>>,
    /// Channel → its parent channel (threads), learnt on demand for routes' mention rules.
    parents: Arc<Mutex<HashMap<String, Option<String>>>>,
}

/// A file to attach: its name and bytes (read from the session's outbox).
pub struct FileBytes {
    pub name: String,
    pub data: Vec<u8>,
}

/// How far a row's posting got: a long reply retried after a rate limit goes on from the
/// chunk it stopped at.
#[derive(Debug, Default)]
pub struct Progress {
    chunks_posted: usize,
    first_id: Option<String>,
}

impl DiscordOut {
    /// The client, when a bot token is configured.
    pub fn from_config(config: &DiscordConfig) -> Option<Self> {
        let token = config.token()?;
        let base = config
            .api_url
            .as_deref()
            .unwrap_or(DISCORD_API)
            .trim_end_matches('/');
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "DiscordBot (https://github.com/ferroclaw/ferroclaw, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .ok()?;
        Some(Self {
            http,
            api: format!("{base}/api/v10"),
            authorization: format!("Bot {token}"),
            limits: Arc::new(RateLimits::default()),
            max_upload_bytes: config.max_upload_bytes,
            routes: Arc::new(config.routes.clone()),
            parents: Arc::default(),
        })
    }

    /// Shows the bot typing in a channel for about 10 s; failures only matter to the logs,
    /// and a rate-limited channel simply shows no indicator.
    pub async fn typing(&self, channel_id: &str) {
        if channel(channel_id).is_err() || !self.limits.delay(TYPING, channel_id).is_zero() {
            return;
        }
        let url = format!("{}/channels/{channel_id}/typing", self.api);
        match self.request(reqwest::Method::POST, &url).send().await {
            Ok(response) if response.status().as_u16() == 429 => {
                let headers = response.headers().clone();
                let body = response.bytes().await.unwrap_or_default();
                self.limits.limited(TYPING, channel_id, &headers, &body);
            }
            Ok(response) => self.limits.observe(TYPING, channel_id, response.headers()),
            Err(e) => tracing::debug!(error = %e, channel_id, "typing indicator failed"),
        }
    }

    /// How long a post to this channel must wait for its rate limit (zero: go now).
    pub fn delay(&self, channel_id: &str) -> Duration {
        self.limits.delay(MESSAGES, channel_id)
    }

    /// Posts one outbound row, going on from `progress`; returns the first Discord
    /// message's id.
    pub async fn send(
        &self,
        channel_id: &str,
        message: &OutboundMessage,
        content: &OutboundContent,
        file: Option<FileBytes>,
        progress: &mut Progress,
    ) -> Result<String, SendError> {
        channel(channel_id)?;
        let allowed_mentions = self.allowed_mentions(channel_id).await;
        let payload = |text: String, chunk: usize| {
            json!({
                "content": text,
                "nonce": nonce(&message.session_id, message.seq, chunk),
                "enforce_nonce": true,
                "allowed_mentions": allowed_mentions,
            })
        };
        let texts = match content {
            OutboundContent::Chat(chat) => {
                if chat.text.trim().is_empty() {
                    return Err(SendError::permanent(
                        "The message was empty, so it was not posted.",
                        "empty chat message",
                    ));
                }
                split(&chat.text, MAX_CHARS)
            }
            OutboundContent::Card(card) => {
                let mut body = payload(card.text.chars().take(MAX_CHARS).collect(), 0);
                body["components"] = buttons(card)?;
                return self.post(channel_id, Post::Json(body)).await;
            }
            OutboundContent::File(f) => {
                let file = file.ok_or_else(|| {
                    SendError::permanent(
                        format!("The file {} could not be read.", f.name),
                        format!("the file {} was not read", f.name),
                    )
                })?;
                if file.data.len() as u64 > self.max_upload_bytes {
                    return Err(SendError::permanent(
                        format!(
                            "The file {} is too big for this Discord server ({} bytes; the limit is {}).",
                            f.name,
                            file.data.len(),
                            self.max_upload_bytes
                        ),
                        format!("{} is {} bytes", f.name, file.data.len()),
                    ));
                }
                let mut body = payload(f.caption.chars().take(MAX_CHARS).collect(), 0);
                body["attachments"] = json!([{"id": 0, "filename": file.name}]);
                return self.post(channel_id, Post::File(body, file)).await;
            }
            OutboundContent::Action(_) => {
                return Err(SendError::permanent(
                    "An action cannot be posted to Discord.",
                    "an action has no Discord form",
                ));
            }
        };
        for (i, chunk) in texts.into_iter().enumerate().skip(progress.chunks_posted) {
            let id = self.post(channel_id, Post::Json(payload(chunk, i))).await?;
            progress.first_id.get_or_insert(id);
            progress.chunks_posted = i + 1;
        }
        Ok(progress.first_id.clone().unwrap_or_default())
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header("authorization", &self.authorization)
    }

    /// One create-message call; the answer's rate-limit headers are learnt whatever it is.
    async fn post(&self, channel_id: &str, post: Post) -> Result<String, SendError> {
        let wait = self.delay(channel_id);
        if !wait.is_zero() {
            return Err(rate_limited(wait, "a rate limit announced earlier"));
        }
        let url = format!("{}/channels/{channel_id}/messages", self.api);
        let request = self.request(reqwest::Method::POST, &url);
        let request = match post {
            Post::Json(body) => request.json(&body),
            Post::File(body, file) => {
                let (content_type, bytes) = multipart(&body, &file);
                request.header("content-type", content_type).body(bytes)
            }
        };
        let response = request.send().await.map_err(|e| {
            SendError::transient("Discord could not be reached", format!("POST {url}: {e}"))
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap_or_default();
        if status == 429 {
            let limited = self.limits.limited(MESSAGES, channel_id, &headers, &body);
            let scope = if limited.global { "global" } else { "route" };
            return Err(rate_limited(
                limited.wait,
                &format!("a {scope} 429 asking for {:?}", limited.wait),
            ));
        }
        self.limits.observe(MESSAGES, channel_id, &headers);
        let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
        if (200..300).contains(&status) {
            return answer["id"].as_str().map(str::to_string).ok_or_else(|| {
                SendError::transient(
                    "Discord gave an unreadable answer",
                    format!("Discord answered {status} without a message id"),
                )
            });
        }
        let code = answer["code"].as_i64().unwrap_or(0);
        let text: String = answer["message"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        let detail = format!("Discord answered {status}: {text} (code {code})");
        if status >= 500 || status == 408 {
            return Err(SendError::transient("Discord kept failing", detail));
        }
        Err(SendError::permanent(refusal(status, code), detail))
    }

    /// Users named in the text and the replied-to user may be pinged; roles and
    /// `@everyone`/`@here` only where the channel's route allows them.
    async fn allowed_mentions(&self, channel_id: &str) -> Value {
        let mut parse = vec!["users".to_string()];
        if let Some(extra) = self.route_mentions(channel_id).await {
            parse.extend(extra);
        }
        json!({"parse": parse, "replied_user": true})
    }

    /// The `allow_mentions` of the channel's route (a thread's is its parent's). The parent
    /// is asked of Discord only when some route widens mentions at all.
    async fn route_mentions(&self, channel_id: &str) -> Option<Vec<String>> {
        if self.routes.iter().all(|r| r.allow_mentions.is_empty()) {
            return None;
        }
        let of = |id: &str| {
            self.routes
                .iter()
                .find(|r| r.channel == id)
                .map(|r| r.allow_mentions.clone())
        };
        if let Some(found) = of(channel_id) {
            return Some(found);
        }
        let parent = self.parent(channel_id).await?;
        of(&parent)
    }

    async fn parent(&self, channel_id: &str) -> Option<String> {
        if let Some(known) = self.parents.lock().ok()?.get(channel_id) {
            return known.clone();
        }
        let url = format!("{}/channels/{channel_id}", self.api);
        let response = self.request(reqwest::Method::GET, &url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let channel: Value = response.json().await.ok()?;
        let parent = channel["parent_id"].as_str().map(str::to_string);
        if let Ok(mut parents) = self.parents.lock() {
            if parents.len() >= 10_000 {
                parents.clear();
            }
            parents.insert(channel_id.to_string(), parent.clone());
        }
        parent
    }
}

enum Post {
    Json(Value),
    File(Value, FileBytes),
}

fn rate_limited(wait: Duration, what: &str) -> SendError {
    SendError::Wait {
        wait,
        plain: "Discord kept rate-limiting this channel".into(),
        detail: format!("Discord rate limit: {what}"),
    }
}

/// A channel id is a non-zero number.
fn channel(channel_id: &str) -> Result<u64, SendError> {
    channel_id
        .parse::<u64>()
        .ok()
        .filter(|id| *id != 0)
        .ok_or_else(|| {
            SendError::permanent(
                "The reply names no valid Discord channel.",
                format!("{channel_id:?} is not a channel id"),
            )
        })
}

/// What a refusal means, in a sentence (Discord's JSON error codes).
fn refusal(status: u16, code: i64) -> String {
    let why = match (status, code) {
        (_, 50001) | (_, 50013) | (403, _) => "the bot may not post in this channel",
        (_, 10003) | (404, _) => "the channel does not exist any more",
        (_, 50035) | (_, 50006) => "it was not a valid Discord message",
        (_, 40005) | (413, _) => "the file is too big for this server",
        (401, _) => "the bot's token was not accepted",
        _ => "Discord would not take it",
    };
    format!("Discord refused the message: {why}.")
}

/// A `multipart/form-data` body with `payload_json` and the file as `files[0]`.
fn multipart(payload: &Value, file: &FileBytes) -> (String, Vec<u8>) {
    let boundary = format!(
        "ferroclaw-{:016x}",
        ferroclaw_common::ids::stable_hash(file.data.iter().copied().take(4096))
    );
    let name: String = file
        .name
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect();
    let mut body = Vec::with_capacity(file.data.len() + 1024);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"payload_json\"\r\n\
             Content-Type: application/json\r\n\r\n{payload}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"{name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&file.data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The custom id of a question's button: the question and the option's index.
pub fn button_id(question_id: &str, index: usize) -> String {
    format!("q:{question_id}:{index}")
}

/// One button per option, five to a row (Discord allows five rows).
fn buttons(card: &ferroclaw_content::CardOut) -> Result<Value, SendError> {
    if card.options.is_empty() || card.options.len() > 25 {
        return Err(SendError::permanent(
            "A question needs 1 to 25 options to be shown on Discord.",
            format!("a question with {} options", card.options.len()),
        ));
    }
    if button_id(&card.question_id, 24).len() > 100 {
        return Err(SendError::permanent(
            "The question's id is too long for Discord's buttons.",
            format!(
                "question id {:?} is over 100 characters with its option",
                card.question_id
            ),
        ));
    }
    let rows: Vec<Value> = card
        .options
        .chunks(5)
        .enumerate()
        .map(|(row, options)| {
            let buttons: Vec<Value> = options
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let label: String = o.label.chars().take(80).collect();
                    // type 2: a button; style 1: primary.
                    json!({"type": 2, "style": 1, "label": label,
                           "custom_id": button_id(&card.question_id, row * 5 + i)})
                })
                .collect();
            // type 1: an action row.
            json!({"type": 1, "components": buttons})
        })
        .collect();
    Ok(Value::Array(rows))
}

/// A nonce per (row, chunk): at most 25 characters, as Discord requires.
fn nonce(session_id: &str, seq: i64, chunk: usize) -> String {
    let hash = ferroclaw_common::ids::stable_hash(
        session_id
            .bytes()
            .chain(seq.to_le_bytes())
            .chain((chunk as u64).to_le_bytes()),
    );
    format!("{hash:016x}")
}

/// Splits text into chunks of at most `limit` characters, preferring line breaks, then
/// spaces. A code block cut in two is closed at the end of one chunk and reopened (with
/// its language) at the start of the next. The line break a cut falls on is dropped;
/// nothing else is lost or reordered.
pub fn split(text: &str, limit: usize) -> Vec<String> {
    const CLOSE: &str = "\n```";
    let mut chunks = Vec::new();
    let mut rest = text;
    let mut reopen: Option<String> = None;
    while !rest.is_empty() {
        let prefix = reopen.take().map(|fence| fence + "\n").unwrap_or_default();
        let prefix_len = prefix.chars().count();
        if prefix_len + rest.chars().count() <= limit {
            chunks.push(prefix + rest);
            break;
        }
        let budget = limit.saturating_sub(prefix_len + CLOSE.len()).max(1);
        let hard = rest
            .char_indices()
            .nth(budget)
            .map_or(rest.len(), |(i, _)| i);
        let window = &rest[..hard];
        let cut = window
            .rfind('\n')
            .filter(|i| *i > hard / 2)
            .or_else(|| window.rfind(' ').filter(|i| *i > hard / 2))
            .unwrap_or(hard);
        let (piece, after) = rest.split_at(cut);
        rest = after.strip_prefix('\n').unwrap_or(after);
        let mut chunk = prefix + piece;
        if let Some(open) = open_fence(&chunk) {
            chunk.push_str(CLOSE);
            reopen = Some(open);
        }
        chunks.push(chunk);
    }
    chunks
}

/// The opening line of a code block left open at the end of `chunk`, if any.
fn open_fence(chunk: &str) -> Option<String> {
    let mut open: Option<&str> = None;
    for line in chunk.lines() {
        if line.trim_start().starts_with("```") {
            open = match open {
                Some(_) => None,
                None => Some(line.trim()),
            };
        }
    }
    open.map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_chunk() {
        assert_eq!(split("hello", 2000), vec!["hello"]);
    }

    #[test]
    fn long_text_splits_at_lines_in_order_without_loss() {
        let lines: Vec<String> = (0..300)
            .map(|i| format!("line {i:03} of the reply"))
            .collect();
        let text = lines.join("\n");
        let chunks = split(&text, 2000);
        assert!(chunks.len() >= 3);
        assert!(chunks.iter().all(|c| c.chars().count() <= 2000));
        assert_eq!(chunks.join("\n"), text);
    }

    #[test]
    fn a_cut_code_block_is_closed_and_reopened() {
        let code: Vec<String> = (0..200).map(|i| format!("let x{i} = {i};")).collect();
        let text = format!("Here:\n```rust\n{}\n```\ndone", code.join("\n"));
        let chunks = split(&text, 1000);
        assert!(chunks.len() >= 3);
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.chars().count() <= 1000, "chunk {i}");
            assert!(open_fence(chunk).is_none(), "chunk {i} leaves a block open");
            if i > 0 {
                assert!(
                    chunk.starts_with("```rust\n"),
                    "chunk {i} reopens the block"
                );
            }
        }
        // Without the added fences, the text is whole and in order.
        let rebuilt: Vec<String> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c = if i > 0 {
                    c.strip_prefix("```rust\n").unwrap_or(c)
                } else {
                    c
                };
                let c = if i + 1 < chunks.len() {
                    c.strip_suffix("\n```").unwrap_or(c)
                } else {
                    c
                };
                c.to_string()
            })
            .collect();
        assert_eq!(rebuilt.join("\n"), text);
    }

    #[test]
    fn unbroken_text_is_cut_hard_at_char_boundaries() {
        let text = "é".repeat(4500);
        let chunks = split(&text, 2000);
        assert_eq!(
            chunks.iter().map(|c| c.chars().count()).sum::<usize>(),
            4500
        );
        assert!(chunks.iter().all(|c| c.chars().count() <= 2000));
    }

    #[test]
    fn nonces_are_short_and_distinct() {
        let a = nonce("ses_1", 3, 0);
        assert_eq!(a.len(), 16);
        assert_ne!(a, nonce("ses_1", 3, 1));
        assert_ne!(a, nonce("ses_1", 5, 0));
        assert_eq!(a, nonce("ses_1", 3, 0));
    }
}
