//! Replies to Discord channels through serenity's HTTP client: long replies split at line
//! or code-fence boundaries into ordered chunks of at most 2 000 characters, each posted
//! with a nonce and `enforce_nonce`, so a retried post cannot appear twice.

use std::sync::Arc;

use ferroclaw_common::config::DiscordConfig;
use ferroclaw_content::OutboundContent;
use ferroclaw_proto::v1::OutboundMessage;
use serenity::all::ButtonStyle;
use serenity::builder::{CreateActionRow, CreateAttachment, CreateButton, CreateMessage};
use serenity::http::{Http, HttpBuilder, HttpError};
use serenity::model::channel::Nonce;
use serenity::model::id::ChannelId;

/// Discord's limit on a message's content, in characters.
pub const MAX_CHARS: usize = 2000;

pub enum DiscordError {
    /// Missing permission, unknown channel, a bad request: it will never work.
    Permanent(String),
    /// Rate limits, server errors, the network: try again.
    Transient(String),
}

#[derive(Clone)]
pub struct DiscordOut {
    http: Arc<Http>,
    max_upload_bytes: u64,
}

/// A file to attach: its name and bytes (read from the session's outbox).
pub struct FileBytes {
    pub name: String,
    pub data: Vec<u8>,
}

impl DiscordOut {
    /// The client, when a bot token is configured.
    pub fn from_config(config: &DiscordConfig) -> Option<Self> {
        let token = config.token()?;
        let mut builder = HttpBuilder::new(token);
        if let Some(url) = &config.api_url {
            // Serenity only honours a proxy with its own rate limiter off; our retries
            // (with the answer's retry-after) take its place.
            builder = builder
                .proxy(url.trim_end_matches('/'))
                .ratelimiter_disabled(true);
        }
        Some(Self {
            http: Arc::new(builder.build()),
            max_upload_bytes: config.max_upload_bytes,
        })
    }

    /// Shows the bot typing in a channel for about 10 s; failures only matter to the logs.
    pub async fn typing(&self, channel_id: &str) {
        let Some(channel) = channel_id.parse::<u64>().ok().filter(|id| *id != 0) else {
            return;
        };
        if let Err(e) = ChannelId::new(channel).broadcast_typing(&self.http).await {
            tracing::debug!(error = %e, channel_id, "typing indicator failed");
        }
    }

    /// Posts one outbound row; returns the first Discord message's id.
    pub async fn send(
        &self,
        channel_id: &str,
        message: &OutboundMessage,
        content: &OutboundContent,
        file: Option<FileBytes>,
    ) -> Result<String, DiscordError> {
        let channel = channel_id
            .parse::<u64>()
            .ok()
            .filter(|id| *id != 0)
            .map(ChannelId::new)
            .ok_or_else(|| {
                DiscordError::Permanent(format!("{channel_id:?} is not a channel id"))
            })?;
        let text = match content {
            OutboundContent::Chat(chat) => chat.text.clone(),
            OutboundContent::Card(card) => {
                let rows = buttons(card)?;
                let text: String = card.text.chars().take(MAX_CHARS).collect();
                let posted = channel
                    .send_message(
                        &self.http,
                        CreateMessage::new()
                            .content(text)
                            .components(rows)
                            .nonce(Nonce::String(nonce(&message.session_id, message.seq, 0)))
                            .enforce_nonce(true),
                    )
                    .await
                    .map_err(classify)?;
                return Ok(posted.id.to_string());
            }
            OutboundContent::File(f) => {
                let file = file.ok_or_else(|| {
                    DiscordError::Permanent(format!("the file {} was not read", f.name))
                })?;
                if file.data.len() as u64 > self.max_upload_bytes {
                    return Err(DiscordError::Permanent(format!(
                        "{} is {} bytes; Discord takes files up to {} bytes here",
                        f.name,
                        file.data.len(),
                        self.max_upload_bytes
                    )));
                }
                let caption: String = f.caption.chars().take(MAX_CHARS).collect();
                let posted = channel
                    .send_message(
                        &self.http,
                        CreateMessage::new()
                            .content(caption)
                            .add_file(CreateAttachment::bytes(file.data, f.name.clone()))
                            .nonce(Nonce::String(nonce(&message.session_id, message.seq, 0)))
                            .enforce_nonce(true),
                    )
                    .await
                    .map_err(classify)?;
                return Ok(posted.id.to_string());
            }
            OutboundContent::Action(_) => {
                return Err(DiscordError::Permanent(
                    "an action has no Discord form".into(),
                ));
            }
        };
        if text.trim().is_empty() {
            return Err(DiscordError::Permanent("the message is empty".into()));
        }
        let mut first = None;
        for (i, chunk) in split(&text, MAX_CHARS).into_iter().enumerate() {
            let nonce = nonce(&message.session_id, message.seq, i);
            let posted = channel
                .send_message(
                    &self.http,
                    CreateMessage::new()
                        .content(chunk)
                        .nonce(Nonce::String(nonce))
                        .enforce_nonce(true),
                )
                .await
                .map_err(classify)?;
            first.get_or_insert(posted.id.to_string());
        }
        Ok(first.unwrap_or_default())
    }
}

/// The custom id of a question's button: the question and the option's index.
pub fn button_id(question_id: &str, index: usize) -> String {
    format!("q:{question_id}:{index}")
}

/// One button per option, five to a row (Discord allows five rows).
fn buttons(card: &ferroclaw_content::CardOut) -> Result<Vec<CreateActionRow>, DiscordError> {
    if card.options.is_empty() || card.options.len() > 25 {
        return Err(DiscordError::Permanent(format!(
            "a question needs 1 to 25 options, not {}",
            card.options.len()
        )));
    }
    if button_id(&card.question_id, 24).len() > 100 {
        return Err(DiscordError::Permanent(format!(
            "question id {:?} is too long for Discord's 100-character custom ids",
            card.question_id
        )));
    }
    Ok(card
        .options
        .chunks(5)
        .enumerate()
        .map(|(row, options)| {
            CreateActionRow::Buttons(
                options
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        let label: String = o.label.chars().take(80).collect();
                        CreateButton::new(button_id(&card.question_id, row * 5 + i))
                            .label(label)
                            .style(ButtonStyle::Primary)
                    })
                    .collect(),
            )
        })
        .collect())
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

fn classify(error: serenity::Error) -> DiscordError {
    match error {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(response)) => {
            let status = response.status_code.as_u16();
            let detail = format!(
                "Discord answered {status}: {} (code {})",
                response.error.message, response.error.code
            );
            if status == 429 || status >= 500 {
                DiscordError::Transient(detail)
            } else {
                DiscordError::Permanent(detail)
            }
        }
        other => DiscordError::Transient(format!("Discord: {other}")),
    }
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
