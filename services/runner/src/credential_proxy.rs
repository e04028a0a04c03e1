//! The credential proxy: agents call model APIs through it with a per-session token; it
//! checks the token, lets through only what a turn needs (the provider's message endpoint,
//! for the agent's own models), enforces the agent's token budget, swaps in the real API
//! key, streams the answer back and records the tokens used. No API key ever enters an
//! agent, and the key opens nothing else of the operator's account (files, batches,
//! fine-tuning, admin endpoints).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use ferroclaw_common::config::AgentConfig;
use ferroclaw_common::signing;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, RunnerError};
use crate::registry::Registry;

/// Largest request body an agent may send (a long history with files in it).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;
/// How much of a response is kept to read its token usage from.
const USAGE_SCAN_BYTES: usize = 4 * 1024 * 1024;
/// How long a session token is valid. A new one is issued at every agent start.
const TOKEN_TTL_SECS: i64 = 24 * 60 * 60;

/// The requests a turn needs, per API flavour: everything else is refused.
const ANTHROPIC_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
];
const OPENAI_ROUTES: &[(&str, &str)] = &[("POST", "/v1/chat/completions"), ("GET", "/v1/models")];

/// What agents need to reach the proxy: its URL and the secret their tokens are made with.
#[derive(Clone)]
pub struct ModelAccess {
    /// Where the proxy listens, and the URL the config gives for it (if any).
    pub listen: std::net::SocketAddr,
    pub configured_url: Option<String>,
    secret: Arc<Vec<u8>>,
}

impl ModelAccess {
    /// A fresh proxy token for one session of `agent`, valid for a day.
    pub fn token(&self, session_id: &str, agent: &str) -> String {
        let grant = signing::TokenGrant {
            session_id: session_id.to_string(),
            agent: agent.to_string(),
            expires_at: unix_now() + TOKEN_TTL_SECS,
        };
        signing::session_token(&self.secret, &grant)
    }

    /// The environment an agent of `agent` needs to call its model through the proxy.
    /// The proxy URL for local agents (the process backend).
    pub fn local_url(&self) -> String {
        self.configured_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// The environment an agent of `agent` needs to call its model at `url`.
    pub fn agent_env(
        &self,
        session_id: &str,
        agent: &AgentConfig,
        url: &str,
    ) -> Vec<(String, String)> {
        if !agent.uses_model_api() {
            return Vec::new();
        }
        let mut env = vec![
            ("FERROCLAW_MODEL_URL".into(), url.to_string()),
            (
                "FERROCLAW_MODEL_TOKEN".into(),
                self.token(session_id, &agent.name),
            ),
            (
                "FERROCLAW_MODEL".into(),
                agent.model.clone().unwrap_or_default(),
            ),
            ("FERROCLAW_MAX_TOKENS".into(), agent.max_tokens.to_string()),
            (
                "FERROCLAW_CONTEXT_WINDOW".into(),
                agent.context_window.to_string(),
            ),
        ];
        if agent.api_flavour() == "openai" {
            // Resolved against the upstream, which the agent (behind the proxy) cannot see.
            env.push((
                "FERROCLAW_MAX_TOKENS_FIELD".into(),
                agent.max_tokens_field().to_string(),
            ));
        }
        if !agent.send_to.is_empty() {
            env.push(("FERROCLAW_SEND_TO".into(), agent.send_to.join(",")));
        }
        if !agent.web_fetch_allow.is_empty() {
            env.push((
                "FERROCLAW_WEB_FETCH_ALLOW".into(),
                agent.web_fetch_allow.join(","),
            ));
        }
        if let Some(command) = &agent.command {
            env.push(("FERROCLAW_CLAUDE_BIN".into(), command.clone()));
        }
        if let Some((input, output)) = agent.price_per_mtok {
            env.push((
                "FERROCLAW_PRICE_PER_MTOK".into(),
                format!("{input},{output}"),
            ));
        }
        env
    }
}

/// The proxy's secret, kept beside the runner's database so tokens of running agents stay
/// valid across a runner restart.
pub fn load_secret(data_dir: &Path) -> Result<Vec<u8>> {
    let path = data_dir.join("runner.proxy-key");
    let io = |source| RunnerError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let secret: Vec<u8> = (0..2)
        .flat_map(|_| uuid::Uuid::new_v4().into_bytes())
        .collect();
    ferroclaw_common::atomic_file::write_mode(&path, &secret, 0o600).map_err(io)?;
    Ok(secret)
}

#[derive(Clone)]
struct Proxy {
    secret: Arc<Vec<u8>>,
    registry: Registry,
    agents: Arc<HashMap<String, AgentConfig>>,
    http: reqwest::Client,
}

/// Binds the proxy and serves it until `shutdown`; returns how agents reach it.
pub async fn start(
    listener: TcpListener,
    url: Option<String>,
    data_dir: &Path,
    registry: Registry,
    agents: &[AgentConfig],
    shutdown: CancellationToken,
) -> Result<ModelAccess> {
    let secret = Arc::new(load_secret(data_dir)?);
    let bound = listener
        .local_addr()
        .map_err(|e| RunnerError::Config(format!("credential proxy address: {e}")))?;
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| RunnerError::Config(format!("credential proxy HTTP client: {e}")))?;
    let proxy = Proxy {
        secret: secret.clone(),
        registry,
        agents: Arc::new(agents.iter().map(|a| (a.name.clone(), a.clone())).collect()),
        http,
    };
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tracing::info!(addr = %bound, "credential proxy listening");
    tokio::spawn(async move {
        // Streamed answers go out in small writes: without NODELAY, Nagle's algorithm and
        // the client's delayed ACK hold each one back.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "credential proxy stopped");
        }
    });
    Ok(ModelAccess {
        listen: bound,
        configured_url: url,
        secret,
    })
}

/// An error in the shape both Anthropic's and OpenAI's clients read.
fn refuse(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({
        "type": "error",
        "error": {"type": kind, "code": kind, "message": message},
    });
    (status, axum::Json(body)).into_response()
}

/// The token from `x-api-key` (Anthropic's header) or `Authorization: Bearer` (OpenAI's).
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key);
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Refuses a request a model turn does not need: another path or method than the
/// provider's allow-list, or a body that names a model the agent is not configured for.
/// Returns the body to forward: the JSON that was checked, written out again, so a second
/// `model` key that the upstream might read instead can never ride along.
fn check_request(
    agent: &AgentConfig,
    method: &axum::http::Method,
    path: &str,
    body: Bytes,
) -> Result<Bytes, String> {
    let routes = match agent.api_flavour() {
        "openai" => OPENAI_ROUTES,
        _ => ANTHROPIC_ROUTES,
    };
    if !routes
        .iter()
        .any(|(m, p)| method.as_str() == *m && path == *p)
    {
        let allowed: Vec<String> = routes.iter().map(|(m, p)| format!("{m} {p}")).collect();
        return Err(format!(
            "{method} {path} is not forwarded: agent {:?} may call {}",
            agent.name,
            allowed.join(", ")
        ));
    }
    if method == axum::http::Method::GET {
        return Ok(body);
    }
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("the request body is not JSON: {e}"))?;
    match parsed["model"].as_str() {
        Some(model) if agent.allows_model(model) => serde_json::to_vec(&parsed)
            .map(Bytes::from)
            .map_err(|e| format!("the request body: {e}")),
        Some(model) => Err(format!(
            "model {model:?} is not configured for agent {:?} (agents.model, agents.models)",
            agent.name
        )),
        None => Err("the request body names no model".into()),
    }
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let Some(grant) = presented_token(request.headers())
        .and_then(|t| signing::verify_session_token(&proxy.secret, t))
    else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid ferroclaw session token".into(),
        );
    };
    if grant.expires_at <= unix_now() {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "the ferroclaw session token has expired (a new one comes with the next agent start)"
                .into(),
        );
    }
    let session_id = grant.session_id;
    let agent = match proxy.registry.get(&session_id).await {
        Ok(Some(session)) if session.agent == grant.agent => {
            proxy.agents.get(&session.agent).cloned()
        }
        Ok(Some(_)) => None,
        Ok(None) => None,
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                format!("session registry: {e}"),
            );
        }
    };
    let Some(agent) = agent.filter(AgentConfig::uses_model_api) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!("session {session_id} has no agent that may call a model API"),
        );
    };
    if let Some(budget) = agent.token_budget {
        match proxy.registry.usage(None, Some(&agent.name)).await {
            Ok(used) if used.total_tokens() >= budget as i64 => {
                return refuse(
                    StatusCode::PAYMENT_REQUIRED,
                    "budget_exceeded",
                    format!(
                        "the token budget of agent {:?} is spent ({} of {budget} tokens); an operator can raise agents.token_budget",
                        agent.name,
                        used.total_tokens()
                    ),
                );
            }
            Ok(_) => {}
            Err(e) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    format!("usage records: {e}"),
                );
            }
        }
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("reading the request: {e}"),
            );
        }
    };
    let body = match check_request(&agent, &parts.method, parts.uri.path(), body) {
        Ok(body) => body,
        Err(reason) => {
            tracing::warn!(session = %session_id, agent = %agent.name, %reason, "credential proxy refused a request");
            return refuse(StatusCode::FORBIDDEN, "permission_error", reason);
        }
    };
    match upstream(&proxy, &agent, &session_id, parts, body).await {
        Ok(response) => response,
        Err(message) => refuse(StatusCode::BAD_GATEWAY, "api_error", message),
    }
}

/// Sends the request on with the real key and streams the answer back, counting tokens.
async fn upstream(
    proxy: &Proxy,
    agent: &AgentConfig,
    session_id: &str,
    request: axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, String> {
    let path = request
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let url = format!("{}{path}", agent.upstream_base_url());
    let method = request.method;
    let mut headers = request.headers;
    for name in [
        "x-api-key",
        "authorization",
        "host",
        "content-length",
        "connection",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if let Some(key) = agent.api_key() {
        let value = HeaderValue::from_str(&key).map_err(|_| "the API key is not a valid header")?;
        if agent.api_flavour() == "anthropic" {
            headers.insert("x-api-key", value);
        } else {
            let bearer = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "the API key is not a valid header")?;
            headers.insert(header::AUTHORIZATION, bearer);
        }
    }
    let answer = proxy
        .http
        .request(method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("model API {}: {e}", agent.upstream_base_url()))?;
    let status = answer.status();
    let mut out_headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            out_headers.append(name.clone(), value.clone());
        }
    }
    // Pass the body through as it arrives (streaming answers stay streaming) while keeping
    // a copy to read the usage from when it ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let registry = proxy.registry.clone();
    let session = session_id.to_string();
    let agent_name = agent.name.clone();
    let price_per_mtok = agent.price_per_mtok;
    let mut stream = answer.bytes_stream();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    if seen.len() < USAGE_SCAN_BYTES {
                        seen.extend_from_slice(&bytes);
                    }
                    if tx.send(Ok(bytes)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    break;
                }
            }
        }
        // The answer is complete for the agent now; recording the usage need not delay it.
        drop(tx);
        if status.is_success() {
            let (input, output) = usage_in(&seen);
            count_usage(&agent_name, input, output, price_per_mtok);
            if let Err(e) = registry
                .record_usage(&session, &agent_name, input, output)
                .await
            {
                tracing::error!(error = %e, session, "cannot record model usage");
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = out_headers;
    Ok(response)
}

/// Input and output tokens reported in a response: a JSON body, or the `data:` events of a
/// server-sent stream. Anthropic reports `input_tokens` (plus cache tokens) and
/// `output_tokens`, OpenAI `prompt_tokens` and `completion_tokens`; streamed counts are
/// cumulative, so the largest of each wins.
pub fn usage_in(body: &[u8]) -> (i64, i64) {
    let text = String::from_utf8_lossy(body);
    let documents: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(doc) => vec![doc],
        Err(_) => text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect(),
    };
    let mut input = 0;
    let mut output = 0;
    for doc in &documents {
        for usage in [&doc["usage"], &doc["message"]["usage"]] {
            let n = |key: &str| usage[key].as_i64().unwrap_or(0);
            let this_input = n("input_tokens")
                + n("cache_creation_input_tokens")
                + n("cache_read_input_tokens")
                + n("prompt_tokens");
            input = input.max(this_input);
            output = output.max(n("output_tokens") + n("completion_tokens"));
        }
    }
    (input, output)
}

/// Adds one answer's tokens, and their price when the operator set one, to the metrics.
fn count_usage(agent: &str, input: i64, output: i64, price_per_mtok: Option<(f64, f64)>) {
    let metrics = &crate::metrics::METRICS;
    let tokens = |direction, n: i64| {
        metrics
            .model_tokens
            .with_label_values(&[agent, direction])
            .inc_by(n.max(0) as u64)
    };
    tokens("input", input);
    tokens("output", output);
    let cost = price_per_mtok.map_or(0.0, |(per_input, per_output)| {
        (input.max(0) as f64 * per_input + output.max(0) as f64 * per_output) / 1_000_000.0
    });
    metrics.model_cost.with_label_values(&[agent]).inc_by(cost);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_json_and_streams() {
        let openai = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        assert_eq!(usage_in(openai), (12, 3));
        let anthropic = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n";
        assert_eq!(usage_in(anthropic), (25, 42));
        assert_eq!(usage_in(b"not json"), (0, 0));
    }

    #[test]
    fn only_a_turn_s_requests_for_the_agent_s_models_pass() {
        use axum::http::Method;
        let mut agent = AgentConfig::echo("main");
        agent.provider = "anthropic".into();
        agent.model = Some("claude-a".into());
        agent.models = vec!["claude-small".into()];
        let body = |model: &str| format!(r#"{{"model":"{model}","messages":[]}}"#).into_bytes();
        assert!(
            check_request(
                &agent,
                &Method::POST,
                "/v1/messages",
                Bytes::from(body("claude-a"))
            )
            .is_ok()
        );
        assert!(
            check_request(
                &agent,
                &Method::POST,
                "/v1/messages/count_tokens",
                Bytes::from(body("claude-small"))
            )
            .is_ok()
        );
        for (method, path) in [
            (Method::POST, "/v1/files"),
            (Method::GET, "/v1/messages"),
            (Method::POST, "/v1/messages/batches"),
            (Method::DELETE, "/v1/messages"),
            (Method::POST, "/v1/organizations/x/api_keys"),
            (Method::POST, "/v1/chat/completions"),
        ] {
            let err =
                check_request(&agent, &method, path, Bytes::from(body("claude-a"))).unwrap_err();
            assert!(err.contains("is not forwarded"), "{method} {path}: {err}");
        }
        let err = check_request(
            &agent,
            &Method::POST,
            "/v1/messages",
            Bytes::from(body("claude-opus")),
        )
        .unwrap_err();
        assert!(err.contains("not configured"), "{err}");
        assert!(
            check_request(
                &agent,
                &Method::POST,
                "/v1/messages",
                Bytes::from_static(b"{}")
            )
            .is_err()
        );
        // Two `model` keys: the one checked is the one forwarded, alone.
        let twice = Bytes::from_static(br#"{"model":"claude-opus","model":"claude-a"}"#);
        let sent = check_request(&agent, &Method::POST, "/v1/messages", twice).unwrap();
        assert_eq!(&sent[..], br#"{"model":"claude-a"}"#);
        agent.provider = "openai".into();
        assert!(check_request(&agent, &Method::GET, "/v1/models", Bytes::new()).is_ok());
        assert!(
            check_request(
                &agent,
                &Method::POST,
                "/v1/chat/completions",
                Bytes::from(body("claude-a"))
            )
            .is_ok()
        );
        for path in [
            "/v1/batches",
            "/v1/fine_tuning/jobs",
            "/v1/files",
            "/v1/messages",
        ] {
            assert!(
                check_request(&agent, &Method::POST, path, Bytes::from(body("claude-a"))).is_err(),
                "{path}"
            );
        }
    }

    #[test]
    fn the_secret_is_kept_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_secret(dir.path()).unwrap();
        let b = load_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }
}
