//! Anthropic's Messages API, streamed: tool-use blocks, prompt caching of the system prompt
//! and the history, and errors that arrive inside the stream (`overloaded_error`).

use std::time::Duration;

use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::sse::{self, Event};
use super::{
    Block, Completion, Endpoint, Fault, ModelError, Request, Usage, error_of, transport_error,
    unreadable,
};

const API_VERSION: &str = "2023-06-01";

type Failure = (ModelError, Option<Duration>);

/// The request body: the system prompt and the last history block are marked for caching,
/// so each turn pays full price only for what is new.
pub fn body(endpoint: &Endpoint, request: &Request<'_>) -> Value {
    let mut messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    if let Some(last) = messages
        .last_mut()
        .and_then(|m| m["content"].as_array_mut())
        .and_then(|blocks| blocks.last_mut())
    {
        last["cache_control"] = json!({"type": "ephemeral"});
    }
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.schema}))
        .collect();
    let mut body = json!({
        "model": endpoint.model,
        "max_tokens": endpoint.max_tokens,
        "stream": true,
        "system": [{"type": "text", "text": request.system, "cache_control": {"type": "ephemeral"}}],
        "messages": messages,
    });
    // Without tools (a compaction) there is no field, as for OpenAI-compatible servers.
    if !tools.is_empty() {
        body["tools"] = Value::Array(tools);
    }
    body
}

pub async fn complete(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    request: &Request<'_>,
) -> Result<Completion, Failure> {
    let response = http
        .post(format!("{}/v1/messages", endpoint.base_url))
        .header("x-api-key", &endpoint.token)
        .header("anthropic-version", API_VERSION)
        .json(&body(endpoint, request))
        .send()
        .await
        .map_err(transport_error)?;
    if !response.status().is_success() {
        return Err(error_of(response).await);
    }
    let mut stream = response.bytes_stream();
    let mut parser = sse::Parser::default();
    let mut message = Streamed::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport_error)?;
        for event in parser.push(&chunk) {
            if message.apply(&event)? {
                return message.finish();
            }
        }
    }
    Err(unreadable("the stream ended before message_stop"))
}

/// A message being assembled from stream events.
#[derive(Default)]
struct Streamed {
    blocks: Vec<Partial>,
    stop_reason: String,
    usage: Usage,
}

enum Partial {
    Text(String),
    Tool {
        id: String,
        name: String,
        json: String,
    },
    /// Kinds we do not use (thinking, …): kept out of the history.
    Other,
}

impl Streamed {
    /// Applies one event; `Ok(true)` at `message_stop`.
    fn apply(&mut self, event: &Event) -> Result<bool, Failure> {
        let data: Value = serde_json::from_str(&event.data)
            .map_err(|e| unreadable(format!("unreadable stream event {:?}: {e}", event.event)))?;
        match data["type"].as_str().unwrap_or(&event.event) {
            "message_start" => self.count(&data["message"]["usage"]),
            "content_block_start" => {
                let block = &data["content_block"];
                let partial = match block["type"].as_str() {
                    Some("text") => Partial::Text(block["text"].as_str().unwrap_or("").into()),
                    Some("tool_use") => Partial::Tool {
                        id: block["id"].as_str().unwrap_or("").into(),
                        name: block["name"].as_str().unwrap_or("").into(),
                        json: String::new(),
                    },
                    _ => Partial::Other,
                };
                self.blocks.push(partial);
            }
            "content_block_delta" => {
                let index = data["index"].as_u64().unwrap_or(0) as usize;
                let delta = &data["delta"];
                match (self.blocks.get_mut(index), delta["type"].as_str()) {
                    (Some(Partial::Text(text)), Some("text_delta")) => {
                        text.push_str(delta["text"].as_str().unwrap_or(""));
                    }
                    (Some(Partial::Tool { json, .. }), Some("input_json_delta")) => {
                        json.push_str(delta["partial_json"].as_str().unwrap_or(""));
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(reason) = data["delta"]["stop_reason"].as_str() {
                    self.stop_reason = reason.into();
                }
                self.count(&data["usage"]);
            }
            "message_stop" => return Ok(true),
            "error" => {
                let kind = data["error"]["type"].as_str().unwrap_or("error");
                let text = format!("{kind} in the stream: {}", event.data);
                let reason = match kind {
                    "overloaded_error" => "overloaded",
                    "rate_limit_error" => "rate limited",
                    "api_error" => "server error",
                    "timeout_error" => "timed out",
                    "invalid_request_error" => "bad request",
                    _ => "refused the request",
                };
                let fault = Fault::new(format!("failed mid-answer ({reason})"), text);
                let error = match kind {
                    "overloaded_error" | "rate_limit_error" | "api_error" | "timeout_error" => {
                        ModelError::Transient(fault)
                    }
                    _ => ModelError::Permanent(fault),
                };
                return Err((error, None));
            }
            _ => {}
        }
        Ok(false)
    }

    /// Counts are cumulative within a stream: keep the largest seen.
    fn count(&mut self, usage: &Value) {
        let n = |k: &str| usage[k].as_u64().unwrap_or(0);
        let u = &mut self.usage;
        u.input_tokens = u.input_tokens.max(n("input_tokens"));
        u.output_tokens = u.output_tokens.max(n("output_tokens"));
        u.cache_read_tokens = u.cache_read_tokens.max(n("cache_read_input_tokens"));
        u.cache_write_tokens = u.cache_write_tokens.max(n("cache_creation_input_tokens"));
    }

    fn finish(self) -> Result<Completion, Failure> {
        let mut content = Vec::new();
        for partial in self.blocks {
            match partial {
                Partial::Text(text) if !text.is_empty() => content.push(Block::Text { text }),
                Partial::Tool { id, name, json } => {
                    let input = if json.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&json).map_err(|e| {
                            unreadable(format!("tool call {name} has unreadable input: {e}"))
                        })?
                    };
                    content.push(Block::ToolUse { id, name, input });
                }
                _ => {}
            }
        }
        Ok(Completion {
            content,
            stop_reason: self.stop_reason,
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, ToolSpec};

    fn event(data: Value) -> Event {
        Event {
            event: data["type"].as_str().unwrap_or("").into(),
            data: data.to_string(),
        }
    }

    #[test]
    fn assembles_text_and_tool_calls() {
        let mut m = Streamed::default();
        let events = [
            json!({"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":4,"output_tokens":1}}}),
            json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}),
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}),
            json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"tu1","name":"bash","input":{}}}),
            json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"command\":"}}),
            json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"ls\"}"}}),
            json!({"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":7}}),
        ];
        for e in events {
            assert!(!m.apply(&event(e)).unwrap());
        }
        assert!(m.apply(&event(json!({"type":"message_stop"}))).unwrap());
        let done = m.finish().unwrap();
        assert_eq!(done.stop_reason, "tool_use");
        assert_eq!(done.usage.input_tokens, 10);
        assert_eq!(done.usage.cache_read_tokens, 4);
        assert_eq!(done.usage.output_tokens, 7);
        assert_eq!(
            done.content,
            vec![
                Block::Text {
                    text: "Hello".into()
                },
                Block::ToolUse {
                    id: "tu1".into(),
                    name: "bash".into(),
                    input: json!({"command": "ls"})
                },
            ]
        );
    }

    #[test]
    fn overload_inside_the_stream_is_transient_and_bad_requests_are_not() {
        let mut m = Streamed::default();
        let over =
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}});
        assert!(matches!(
            m.apply(&event(over)),
            Err((ModelError::Transient(_), _))
        ));
        let bad = json!({"type":"error","error":{"type":"invalid_request_error","message":"no"}});
        assert!(matches!(
            m.apply(&event(bad)),
            Err((ModelError::Permanent(_), _))
        ));
    }

    #[test]
    fn body_caches_system_and_history() {
        let endpoint = Endpoint {
            base_url: "http://x".into(),
            token: "t".into(),
            model: "m".into(),
            max_tokens: 100,
            max_tokens_field: crate::model::MaxTokensField::MaxTokens,
        };
        let messages = [Message::user_text("hi")];
        let tools = [ToolSpec {
            name: "bash",
            description: "run",
            schema: json!({"type": "object"}),
        }];
        let b = body(
            &endpoint,
            &Request {
                system: "sys",
                messages: &messages,
                tools: &tools,
            },
        );
        assert_eq!(b["system"][0]["cache_control"]["type"], "ephemeral");
        assert_eq!(
            b["messages"][0]["content"][0]["cache_control"]["type"],
            "ephemeral"
        );
        assert_eq!(b["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(b["stream"], true);
        assert_eq!(b["max_tokens"], 100);

        let without = body(
            &endpoint,
            &Request {
                system: "sys",
                messages: &messages,
                tools: &[],
            },
        );
        assert!(without.get("tools").is_none(), "{without}");
    }
}
