//! A model-driven agent: each batch is a turn of one persistent conversation. The model
//! calls tools until it gives a final answer; the session commands `/clear`, `/compact`,
//! `/cost` and `/context` are answered here without the model.

use std::path::PathBuf;
use tracing::Instrument;

use ferroclaw_mailbox::{Destination, InboundRow, now_ms};

use crate::commands::{Command, Segment, segments};
use crate::formatter;
use crate::model::{Block, Completion, Message, Model, ModelError, Request, Role, ToolSpec};
use crate::provider::{Folders, Prompt, Reply, by_destination};
use crate::tools::{self, ToolContext, ToolLimits};
use crate::transcript::Transcript;

/// Model requests in one turn at most: a model looping on tools stops here.
const MAX_STEPS: usize = 40;
/// Compact when the next request could take the context past this share of the window.
const COMPACT_AT: f64 = 0.8;

/// Prices in dollars per million tokens (input, output), when the config names them.
pub type Prices = Option<(f64, f64)>;

pub struct ModelAgent {
    model: Model,
    tools: Vec<ToolSpec>,
    limits: ToolLimits,
    folders: Folders,
    transcript_path: PathBuf,
    transcript: Transcript,
    context_window: u64,
    max_tokens: u64,
    prices: Prices,
    http: reqwest::Client,
}

pub struct ModelAgentOptions {
    pub folders: Folders,
    pub context_window: u64,
    pub max_tokens: u64,
    pub prices: Prices,
}

impl ModelAgent {
    pub fn new(model: Model, options: ModelAgentOptions) -> Result<Self, ModelError> {
        let transcript_path = Transcript::path_in(&options.folders.state_dir);
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| ModelError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            model,
            tools: tools::specs(),
            limits: ToolLimits::from_env(),
            folders: options.folders,
            transcript: Transcript::load(&transcript_path),
            transcript_path,
            context_window: options.context_window,
            max_tokens: options.max_tokens,
            prices: options.prices,
            http,
        })
    }

    /// Answers a batch: one turn (or command) per destination, in order.
    pub async fn respond(&mut self, prompt: &Prompt<'_>) -> (Vec<Reply>, Vec<i64>) {
        let mut replies = Vec::new();
        let mut consumed = Vec::new();
        for (destination, rows) in by_destination(prompt.rows) {
            for segment in segments(&rows) {
                match segment {
                    Segment::Turn(turn) => {
                        let turn: Vec<InboundRow> = turn.into_iter().cloned().collect();
                        let (r, c) = self.turn(&destination, &turn, prompt).await;
                        replies.extend(r);
                        consumed.extend(c);
                    }
                    Segment::Command(command, row) => {
                        let text = self.command(command).await;
                        replies.push(Reply::chat(&destination, row.seq, text));
                    }
                }
            }
        }
        self.save();
        (replies, consumed)
    }

    fn save(&self) {
        if let Err(e) = self.transcript.save(&self.transcript_path) {
            // The conversation goes on; only a restart would lose the latest steps.
            tracing::error!(error = %e, "cannot save the transcript");
        }
    }

    /// One turn: the model works with tools until it answers. Messages sent with tools and
    /// the final answer come back as replies; a failure becomes a notice to the user.
    async fn turn(
        &mut self,
        destination: &Destination,
        rows: &[InboundRow],
        prompt: &Prompt<'_>,
    ) -> (Vec<Reply>, Vec<i64>) {
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let in_reply_to = seqs.last().copied().unwrap_or(0);
        self.transcript.begin_turn(&seqs);
        if self.needs_compaction() {
            if let Err(e) = self.compact().await {
                tracing::warn!(error = %e, "automatic compaction failed; going on");
            }
            // Compaction rewrote the history: this turn now starts after the summary.
            self.transcript.begin_turn(&seqs);
        }
        let start = self.transcript.messages.len();
        let text = formatter::format_batch(rows, prompt.tz, now_ms());
        self.push_user(Block::Text { text });
        let system = crate::memory::system_prompt(&self.folders);
        let mut ctx = ToolContext {
            mailbox: prompt.mailbox,
            workspace: self.folders.workspace_dir.clone(),
            destination: destination.clone(),
            in_reply_to,
            limits: self.limits.clone(),
            replies: Vec::new(),
            consumed: Vec::new(),
            http: self.http.clone(),
            send_to: tools::send_to_from_env(),
        };
        let mut answer = String::new();
        let mut finished = false;
        for _ in 0..MAX_STEPS {
            let completion = match self.request(&system).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "the model request failed");
                    // Forget the failed turn, so the next one starts from a clean history.
                    self.transcript.messages.truncate(start);
                    self.transcript.last_turn = None;
                    self.save();
                    let mut replies = ctx.replies;
                    replies.push(Reply::chat(destination, in_reply_to, failure_text(&e)));
                    return (replies, ctx.consumed);
                }
            };
            let calls: Vec<(String, String, serde_json::Value)> = completion
                .content
                .iter()
                .filter_map(|b| match b {
                    Block::ToolUse { id, name, input } => {
                        Some((id.clone(), name.clone(), input.clone()))
                    }
                    _ => None,
                })
                .collect();
            if !completion.content.is_empty() {
                self.transcript.messages.push(Message {
                    role: Role::Assistant,
                    content: completion.content.clone(),
                });
            }
            self.save();
            if calls.is_empty() {
                answer = Message {
                    role: Role::Assistant,
                    content: completion.content,
                }
                .text();
                finished = true;
                break;
            }
            let mut results = Vec::new();
            for (id, name, input) in calls {
                tracing::info!(tool = %name, "tool call");
                let span = tracing::info_span!(
                    "execute_tool",
                    otel.name = %format!("execute_tool {name}"),
                    gen_ai.operation.name = "execute_tool",
                    gen_ai.tool.name = %name,
                    gen_ai.tool.call.id = %id,
                    error.type = tracing::field::Empty,
                );
                let (content, is_error) = match tools::run(&name, &input, &mut ctx)
                    .instrument(span.clone())
                    .await
                {
                    Ok(out) => (out, false),
                    Err(out) => {
                        span.record("error.type", "tool_error");
                        (out, true)
                    }
                };
                results.push(Block::ToolResult {
                    tool_use_id: id,
                    content,
                    is_error,
                });
            }
            self.transcript.messages.push(Message {
                role: Role::User,
                content: results,
            });
            self.save();
        }
        let mut replies = ctx.replies;
        if !finished {
            answer = format!(
                "I stopped after {MAX_STEPS} model requests in one turn without finishing. Tell me how to go on."
            );
        }
        if !answer.trim().is_empty() {
            replies.push(Reply::chat(destination, in_reply_to, answer));
        }
        (replies, ctx.consumed)
    }

    /// Adds a user block, joining the previous user message when the history ends with one
    /// (the APIs want user and assistant to alternate).
    fn push_user(&mut self, block: Block) {
        match self.transcript.messages.last_mut() {
            Some(last) if last.role == Role::User => last.content.push(block),
            _ => self.transcript.messages.push(Message {
                role: Role::User,
                content: vec![block],
            }),
        }
    }

    async fn request(&mut self, system: &str) -> Result<Completion, ModelError> {
        let completion = self
            .model
            .complete(&Request {
                system,
                messages: &self.transcript.messages,
                tools: &self.tools,
            })
            .await?;
        self.transcript.usage.add(completion.usage);
        self.transcript.requests += 1;
        self.transcript.context_tokens =
            completion.usage.prompt_tokens() + completion.usage.output_tokens;
        Ok(completion)
    }

    fn context_estimate(&self) -> u64 {
        let estimate = Transcript::estimate_tokens(&self.transcript.messages);
        if self.transcript.context_tokens > 0 {
            self.transcript.context_tokens.max(estimate)
        } else {
            estimate
        }
    }

    fn needs_compaction(&self) -> bool {
        self.transcript.messages.len() > 2
            && (self.context_estimate() + self.max_tokens) as f64
                > self.context_window as f64 * COMPACT_AT
    }

    /// Replaces the history with a summary the model writes; returns (before, after) tokens.
    async fn compact(&mut self) -> Result<(u64, u64), ModelError> {
        let before = self.context_estimate();
        let mut messages = self.transcript.messages.clone();
        let instruction = Block::Text {
            text: "Summarise our conversation so far for your own later use: the facts, \
                   decisions, open tasks and anything the user asked you to remember. Write \
                   only the summary."
                .into(),
        };
        match messages.last_mut() {
            Some(last) if last.role == Role::User => last.content.push(instruction),
            _ => messages.push(Message {
                role: Role::User,
                content: vec![instruction],
            }),
        }
        let completion = self
            .model
            .complete(&Request {
                system: "You summarise conversations faithfully and briefly.",
                messages: &messages,
                tools: &[],
            })
            .await?;
        self.transcript.usage.add(completion.usage);
        self.transcript.requests += 1;
        let summary = Message {
            role: Role::Assistant,
            content: completion.content,
        }
        .text();
        self.transcript.messages = vec![
            Message::user_text(format!(
                "<summary of the conversation so far>\n{summary}\n</summary>"
            )),
            Message {
                role: Role::Assistant,
                content: vec![Block::Text {
                    text: "Noted; I will continue from this summary.".into(),
                }],
            },
        ];
        self.transcript.last_turn = None;
        self.transcript.compactions += 1;
        let after = Transcript::estimate_tokens(&self.transcript.messages);
        self.transcript.context_tokens = after;
        self.save();
        Ok((before, after))
    }

    async fn command(&mut self, command: Command) -> String {
        match command {
            Command::Clear => {
                let dropped = self.transcript.messages.len();
                self.transcript.messages.clear();
                self.transcript.last_turn = None;
                self.transcript.context_tokens = 0;
                self.save();
                format!("Started a fresh conversation ({dropped} earlier messages forgotten).")
            }
            Command::Compact => {
                if self.transcript.messages.len() <= 2 {
                    return "Nothing to compact yet.".into();
                }
                match self.compact().await {
                    Ok((before, after)) => format!(
                        "Compacted the conversation from about {before} to about {after} tokens (saved about {}).",
                        before.saturating_sub(after)
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "compaction failed");
                        format!("Could not compact the conversation: {}.", e.plain())
                    }
                }
            }
            Command::Cost => {
                let u = self.transcript.usage;
                let mut text = format!(
                    "Tokens so far: {} input ({} read from cache, {} written to cache), {} output, in {} requests.",
                    u.input_tokens + u.cache_read_tokens + u.cache_write_tokens,
                    u.cache_read_tokens,
                    u.cache_write_tokens,
                    u.output_tokens,
                    self.transcript.requests
                );
                match self.prices {
                    Some((input, output)) => {
                        // Cache reads cost a tenth, cache writes a quarter more (Anthropic's rates).
                        let dollars = (u.input_tokens as f64
                            + u.cache_read_tokens as f64 * 0.1
                            + u.cache_write_tokens as f64 * 1.25)
                            * input
                            / 1e6
                            + u.output_tokens as f64 * output / 1e6;
                        text.push_str(&format!(" Cost: about ${dollars:.4}."));
                    }
                    None => text.push_str(" Cost: no prices configured (agents.price_per_mtok)."),
                }
                text
            }
            Command::Files => crate::commands::list_files(&self.folders.workspace_dir),
            Command::Context => {
                let used = self.context_estimate();
                format!(
                    "Context: about {used} of {} tokens ({:.0}%), {} messages, compacted {} times.",
                    self.context_window,
                    used as f64 * 100.0 / self.context_window.max(1) as f64,
                    self.transcript.messages.len(),
                    self.transcript.compactions
                )
            }
        }
    }
}

/// What the user reads when the model could not answer: one plain sentence (the details
/// are in the log).
fn failure_text(error: &ModelError) -> String {
    format!("Sorry, I could not answer: {}.", error.plain())
}
