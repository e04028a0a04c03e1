//! OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, OpenRouter) with tool calls.

use std::time::Duration;

use serde_json::{Value, json};

use super::{
    Block, Completion, Endpoint, Message, ModelError, Request, Role, Usage, error_of,
    transport_error, unreadable,
};

type Failure = (ModelError, Option<Duration>);

/// The neutral history in chat-completions form: tool results become `tool` messages.
fn messages(system: &str, history: &[Message]) -> Vec<Value> {
    let mut out = vec![json!({"role": "system", "content": system})];
    for message in history {
        match message.role {
            Role::User => {
                for block in &message.content {
                    if let Block::ToolResult {
                        tool_use_id,
                        content,
                        is_error,
                    } = block
                    {
                        out.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": tool_content(content, *is_error)}));
                    }
                }
                let text = message.text();
                if !text.is_empty() {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
            Role::Assistant => {
                let calls: Vec<Value> = message
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        Block::ToolUse { id, name, input } => Some(json!({
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": input.to_string()},
                        })),
                        _ => None,
                    })
                    .collect();
                let mut m = json!({"role": "assistant", "content": message.text()});
                if !calls.is_empty() {
                    m["tool_calls"] = Value::Array(calls);
                }
                out.push(m);
            }
        }
    }
    out
}

/// A tool result's content: chat completions have no error flag, so an error says so in
/// its first word.
fn tool_content(content: &str, is_error: bool) -> String {
    if is_error && !content.starts_with("error: ") {
        format!("error: {content}")
    } else {
        content.to_string()
    }
}

pub fn body(endpoint: &Endpoint, request: &Request<'_>) -> Value {
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.schema,
            }})
        })
        .collect();
    let mut body = json!({
        "model": endpoint.model,
        "messages": messages(request.system, request.messages),
    });
    body[endpoint.max_tokens_field.name()] = json!(endpoint.max_tokens);
    // OpenAI and vLLM refuse an empty list: without tools (a compaction) there is no field.
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
        .post(format!("{}/v1/chat/completions", endpoint.base_url))
        .bearer_auth(&endpoint.token)
        .json(&body(endpoint, request))
        .send()
        .await
        .map_err(transport_error)?;
    if !response.status().is_success() {
        return Err(error_of(response).await);
    }
    let answer: Value = response
        .json()
        .await
        .map_err(|e| unreadable(format!("unreadable completion: {e}")))?;
    parse(&answer)
}

fn parse(answer: &Value) -> Result<Completion, Failure> {
    let choice = &answer["choices"][0];
    if choice.is_null() {
        return Err(unreadable(format!(
            "a completion without choices: {answer}"
        )));
    }
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(Block::Text { text: text.into() });
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let name = call["function"]["name"].as_str().unwrap_or("").to_string();
        let arguments = &call["function"]["arguments"];
        // Most servers send arguments as a JSON string; some (Ollama) as an object.
        let input = match arguments {
            Value::String(s) if s.trim().is_empty() => json!({}),
            Value::String(s) => serde_json::from_str(s).map_err(|e| {
                unreadable(format!("tool call {name} has unreadable arguments: {e}"))
            })?,
            Value::Null => json!({}),
            other => other.clone(),
        };
        content.push(Block::ToolUse {
            id: call["id"].as_str().unwrap_or("").to_string(),
            name,
            input,
        });
    }
    let has_calls = content.iter().any(|b| matches!(b, Block::ToolUse { .. }));
    let stop_reason = match choice["finish_reason"].as_str() {
        _ if has_calls => "tool_use",
        Some("length") => "max_tokens",
        _ => "end_turn",
    };
    let usage = &answer["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(prompt);
    Ok(Completion {
        content,
        stop_reason: stop_reason.into(),
        usage: Usage {
            input_tokens: prompt - cached,
            output_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
            cache_read_tokens: cached,
            cache_write_tokens: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MaxTokensField, ToolSpec};

    fn endpoint(base_url: &str, configured: Option<&str>) -> Endpoint {
        Endpoint {
            base_url: base_url.into(),
            token: "t".into(),
            model: "m".into(),
            max_tokens: 321,
            max_tokens_field: MaxTokensField::resolve(configured, base_url).unwrap(),
        }
    }

    #[test]
    fn a_request_without_tools_has_no_tools_key() {
        let messages = [Message::user_text("summarise")];
        let request = Request {
            system: "sys",
            messages: &messages,
            tools: &[],
        };
        let b = body(&endpoint("http://vllm:8000", None), &request);
        assert!(b.get("tools").is_none(), "{b}");
        let tools = [ToolSpec {
            name: "bash",
            description: "run",
            schema: json!({"type": "object"}),
        }];
        let with = body(
            &endpoint("http://vllm:8000", None),
            &Request {
                tools: &tools,
                ..request
            },
        );
        assert_eq!(with["tools"][0]["function"]["name"], "bash");
    }

    #[test]
    fn the_max_tokens_field_follows_the_host_and_the_override() {
        let messages = [Message::user_text("hi")];
        let request = Request {
            system: "sys",
            messages: &messages,
            tools: &[],
        };
        let field = |url: &str, configured: Option<&str>| {
            let b = body(&endpoint(url, configured), &request);
            let mut names: Vec<&str> = ["max_tokens", "max_completion_tokens"]
                .into_iter()
                .filter(|k| b.get(*k) == Some(&json!(321)))
                .collect();
            assert_eq!(names.len(), 1, "exactly one limit field in {b}");
            names.remove(0).to_string()
        };
        assert_eq!(
            field("https://api.openai.com", None),
            "max_completion_tokens"
        );
        assert_eq!(
            field("https://api.openai.com/v1", None),
            "max_completion_tokens"
        );
        assert_eq!(field("http://127.0.0.1:11434", None), "max_tokens");
        assert_eq!(field("https://openrouter.ai/api", None), "max_tokens");
        assert_eq!(
            field("http://litellm:4000", Some("max_completion_tokens")),
            "max_completion_tokens"
        );
        assert_eq!(
            field("https://api.openai.com", Some("max_tokens")),
            "max_tokens"
        );
        let bad = MaxTokensField::resolve(Some("max_output_tokens"), "http://x");
        assert!(
            matches!(&bad, Err(ModelError::Config(m)) if m.contains("expected max_tokens or max_completion_tokens")),
            "{bad:?}"
        );
    }

    #[test]
    fn an_error_result_says_error_in_its_content() {
        let history = vec![
            Message {
                role: Role::Assistant,
                content: vec![
                    Block::ToolUse {
                        id: "c1".into(),
                        name: "bash".into(),
                        input: json!({"command": "false"}),
                    },
                    Block::ToolUse {
                        id: "c2".into(),
                        name: "read_file".into(),
                        input: json!({"path": "a"}),
                    },
                ],
            },
            Message {
                role: Role::User,
                content: vec![
                    Block::ToolResult {
                        tool_use_id: "c1".into(),
                        content: "exit status 1".into(),
                        is_error: true,
                    },
                    Block::ToolResult {
                        tool_use_id: "c2".into(),
                        content: "fine".into(),
                        is_error: false,
                    },
                ],
            },
        ];
        let wire = messages("sys", &history);
        assert_eq!(wire[2]["content"], "error: exit status 1");
        assert_eq!(wire[3]["content"], "fine");
        assert_eq!(tool_content("error: twice", true), "error: twice");
    }

    #[test]
    fn tool_calls_round_trip_through_the_wire_shape() {
        let history = vec![
            Message::user_text("list files"),
            Message {
                role: Role::Assistant,
                content: vec![Block::ToolUse {
                    id: "c1".into(),
                    name: "bash".into(),
                    input: json!({"command": "ls"}),
                }],
            },
            Message {
                role: Role::User,
                content: vec![Block::ToolResult {
                    tool_use_id: "c1".into(),
                    content: "a.txt".into(),
                    is_error: false,
                }],
            },
        ];
        let wire = messages("sys", &history);
        assert_eq!(wire[0]["role"], "system");
        assert_eq!(
            wire[2]["tool_calls"][0]["function"]["arguments"],
            "{\"command\":\"ls\"}"
        );
        assert_eq!(
            wire[3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "a.txt"})
        );

        let answer = json!({
            "choices": [{"finish_reason": "tool_calls", "message": {"content": null, "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "send_message", "arguments": "{\"text\":\"hi\"}"}}
            ]}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 5}
        });
        let done = parse(&answer).unwrap();
        assert_eq!(done.stop_reason, "tool_use");
        assert_eq!(done.usage.input_tokens, 30);
        assert_eq!(
            done.content,
            vec![Block::ToolUse {
                id: "c2".into(),
                name: "send_message".into(),
                input: json!({"text": "hi"})
            }]
        );
    }
}
