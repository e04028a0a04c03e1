//! `GET /openapi.json`: the REST API as an OpenAPI 3.1 document, generated from the
//! handlers' `#[utoipa::path]` annotations and the types they answer with. What every
//! operation shares (the bearer token on `/v1`, the JSON error body, `503` with
//! `Retry-After`) is added here once, from the same rules the router applies.

use std::sync::OnceLock;

use axum::body::Bytes;
use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Components, ContentBuilder, OpenApi as Document, Ref, RefOr};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::error::{ErrorBody, ErrorCode, ErrorDetail};
use crate::{http, http_metrics, operator_api, tasks_api};

/// The security scheme's name in the document.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ferroclaw REST API",
        description = "Webhooks, API conversations, sessions and scheduled tasks of a ferroclaw \
            installation (ARCHITECTURE.md §9).\n\n\
            Every `/v1` route needs `Authorization: Bearer <token>` when the gateway has an API \
            token (`FERROCLAW_API_TOKEN`); without one it listens on loopback only and lets \
            every call through.\n\n\
            Every 4xx and 5xx carries the JSON error body `{\"error\": {\"code\", \"message\"}}`; \
            `code` is stable, `message` is for people. `503` (`unavailable`) means a ferroclaw \
            service is down or was lost mid-call: retry after `Retry-After` seconds."
    ),
    paths(
        http::post_hook,
        http::post_message,
        http::get_conversation_messages,
        conversation_events,
        http::answer_question,
        http::list_sessions,
        http::get_session,
        http::get_outbox_file,
        tasks_api::list_tasks,
        tasks_api::list_runs,
        tasks_api::task_action,
        operator_api::status,
        operator_api::list_agents,
        operator_api::list_deliveries,
        operator_api::retry_delivery,
        http::healthz,
        http::readyz,
        http::openapi_json,
        http_metrics::scrape,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, ConversationMessageView)),
    tags(
        (name = "messages", description = "Messages in: webhooks and API conversations; replies out"),
        (name = "sessions", description = "Sessions and the files their agents sent"),
        (name = "tasks", description = "Scheduled tasks"),
        (name = "operations", description = "What an operator watches: status, agents and spend, deliveries"),
        (name = "health", description = "Liveness, readiness and this document (no token needed)"),
    ),
    modifiers(&Shared),
)]
struct ApiDoc;

/// The document (built once).
pub fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(ApiDoc::openapi)
}

/// The document as served (serialized once).
pub fn document_json() -> Bytes {
    static JSON: OnceLock<Bytes> = OnceLock::new();
    JSON.get_or_init(|| {
        // Serializing plain data structures to a Vec cannot fail.
        Bytes::from(serde_json::to_vec(document()).unwrap_or_default())
    })
    .clone()
}

/// A page of `GET /v1/conversations/{id}/messages`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"messages": [{"cursor": 17, "kind": "text", "text": "The deploy at 09:12 added rate limits.",
    "content": {"text": "The deploy at 09:12 added rate limits."}, "download": null,
    "session_id": "3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10", "in_reply_to": 12, "created_at": 1767225660000i64}],
    "next_cursor": 17}))]
pub struct MessagesPage {
    messages: Vec<ConversationMessageView>,
    /// Pass as `after` to get what comes next (unchanged when no message came).
    next_cursor: i64,
}

/// A message of the assistant in an API conversation, as `/messages` and `/events` show it.
#[derive(Serialize, ToSchema)]
pub struct ConversationMessageView {
    /// Increases with each message of the conversation; the SSE event id.
    cursor: i64,
    /// `text`, `file`, `card`, …
    kind: String,
    /// The message as plain text.
    text: String,
    /// The full content, as the agent wrote it (`null` when absent).
    content: serde_json::Value,
    /// For `file` messages: where to fetch the bytes (`/v1/sessions/{id}/files/{path}`).
    download: Option<String>,
    session_id: String,
    /// The inbound message this answers, if known.
    in_reply_to: Option<i64>,
    /// Unix milliseconds.
    created_at: i64,
}

/// The assistant's messages as server-sent events, live (the handler lives in
/// `conversation_events`).
///
/// Each message is one `message` event: `id:` its cursor, `data:` the message as JSON (a
/// `ConversationMessageView`). A reconnecting client sends `Last-Event-ID` and resumes with no
/// gap and no repeat; idle streams carry `: keep-alive` comments.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/events",
    tag = "messages",
    params(
        ("id" = String, Path, description = "The API conversation", example = "support-42"),
        ("after" = Option<i64>, Query, description = "Start after this cursor (default 0: from the start)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The last cursor received; wins over `after`"),
    ),
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String,
            example = json!("id: 17\nevent: message\ndata: {\"cursor\":17,\"kind\":\"text\",\"text\":\"hi\",\"content\":{\"text\":\"hi\"},\"download\":null,\"session_id\":\"3f2a9c4e-0b1d-4c55-9a7e-2d6f1e8b7a10\",\"in_reply_to\":12,\"created_at\":1767225660000}\n\n")),
        (status = 404, description = "No route for this conversation", body = ErrorBody),
    ),
)]
#[allow(dead_code)] // Only its generated path description is used.
fn conversation_events() {}

/// What every operation shares, added from the rules the router applies: `require_token`
/// guards the `/v1` routes, each `/v1` route calls an internal service (503 when it is
/// down, 502 on an unexpected answer), and every error is the JSON error body.
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Components::new);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The API token (`FERROCLAW_API_TOKEN`); required on every `/v1` route \
                         when the gateway has one",
                    ))
                    .build(),
            ),
        );
        for (name, response) in shared_responses() {
            components.responses.insert(name.into(), RefOr::T(response));
        }
        for (path, item) in doc.paths.paths.iter_mut() {
            let guarded = path.starts_with("/v1/");
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                add_shared(operation, guarded);
            }
        }
    }
}

fn add_shared(operation: &mut Operation, guarded: bool) {
    let takes_input = operation.request_body.is_some()
        || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let mut shared = vec![("default", "Error")];
    if takes_input {
        shared.push(("400", "BadRequest"));
    }
    if guarded {
        operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
        shared.extend([
            ("401", "Unauthorized"),
            ("502", "UpstreamError"),
            ("503", "Unavailable"),
        ]);
    }
    let responses = &mut operation.responses.responses;
    for (status, name) in shared {
        responses
            .entry(status.into())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    }
}

/// The reusable error responses, all with the JSON error body.
fn shared_responses() -> Vec<(&'static str, utoipa::openapi::Response)> {
    let error = |description: &str, code: &str, message: &str| {
        ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .example(Some(
                    serde_json::json!({"error": {"code": code, "message": message}}),
                ))
                .build(),
        )
    };
    let seconds = || {
        HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            ))
            .description(Some("Seconds to wait before trying again"))
            .build()
    };
    vec![
        (
            "Error",
            error(
                "Any other error (405 with `Allow`, 414, 431, …): every 4xx and 5xx carries the \
                 JSON error body",
                "method_not_allowed",
                "method not allowed here; see the Allow header",
            )
            .build(),
        ),
        (
            "BadRequest",
            error(
                "A malformed request: path or query parameter, header or body",
                "bad_request",
                "invalid JSON body: expected value at line 1 column 1",
            )
            .build(),
        ),
        (
            "Unauthorized",
            error(
                "Missing or wrong bearer token",
                "unauthorized",
                "missing or invalid bearer token",
            )
            .build(),
        ),
        (
            "UpstreamError",
            error(
                "An internal service answered with an unexpected error",
                "upstream_error",
                "internal error",
            )
            .build(),
        ),
        (
            "Unavailable",
            error(
                "An internal service is down, did not answer in time, or was lost mid-call: \
                 retry after `Retry-After` seconds",
                "unavailable",
                "a ferroclaw service is unavailable, retry later: ferroclaw.v1.Runner/Enqueue: \
                 peer unreachable or connection lost: connection refused",
            )
            .header("Retry-After", seconds())
            .build(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    fn doc() -> Value {
        serde_json::from_slice(&document_json()).unwrap()
    }

    const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

    /// Every (METHOD, path) the document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = doc();
        let mut found = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    found.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        found
    }

    /// Every (METHOD, path) the gateway's router registers, read from the `.route(...)`
    /// calls in this crate's sources, so a route added anywhere later is seen here.
    fn routed() -> BTreeSet<(String, String)> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = BTreeSet::new();
        // Module directories too (`console/`), so their routes are seen.
        let mut dirs = vec![src];
        let mut files = Vec::new();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            for call in text.split(".route(").skip(1) {
                let call = call.trim_start();
                let Some(rest) = call.strip_prefix('"') else {
                    continue;
                };
                let Some(end) = rest.find('"') else { continue };
                // The operator console (`/ui`) serves HTML pages for people, not the API:
                // it is left out of the OpenAPI document on purpose.
                if rest[..end] == *"/ui" || rest[..end].starts_with("/ui/") {
                    continue;
                }
                // axum's `{*rest}` catch-all is a plain `{rest}` in OpenAPI.
                let route = rest[..end].replace("{*", "{");
                // The method router: up to the call's closing parenthesis.
                let mut depth = 1;
                let args = &rest[end..];
                let close = args
                    .char_indices()
                    .find(|&(_, c)| {
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => {}
                        }
                        depth == 0
                    })
                    .map_or(args.len(), |(i, _)| i);
                let methods = &args[..close];
                for method in METHODS {
                    let word = format!("{method}(");
                    let called = methods
                        .match_indices(&word)
                        .any(|(i, _)| i == 0 || !methods.as_bytes()[i - 1].is_ascii_alphanumeric());
                    if called {
                        found.insert((method.to_uppercase(), route.clone()));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn the_document_is_openapi_3_1_and_reads_back() {
        let value = doc();
        assert_eq!(value["openapi"], "3.1.0");
        assert!(value["info"]["title"].is_string() && value["info"]["version"].is_string());
        // The OpenAPI 3.1 fixed fields at each level (the e2e test validates the served
        // document against the official OAS 3.1 schema as well).
        let top: BTreeSet<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let allowed = BTreeSet::from([
            "openapi",
            "info",
            "paths",
            "components",
            "tags",
            "servers",
            "security",
            "externalDocs",
            "webhooks",
            "jsonSchemaDialect",
        ]);
        assert!(top.is_subset(&allowed), "{top:?}");
        for item in value["paths"].as_object().unwrap().values() {
            for (key, op) in item.as_object().unwrap() {
                assert!(
                    METHODS.contains(&key.as_str()),
                    "unexpected path item field {key}"
                );
                assert!(op["responses"].is_object() && op["operationId"].is_string());
                for p in op["parameters"].as_array().into_iter().flatten() {
                    assert!(
                        ["path", "query", "header", "cookie"].contains(&p["in"].as_str().unwrap())
                    );
                    assert!(p["schema"].is_object(), "{p}");
                    if p["in"] == "path" {
                        assert_eq!(p["required"], true, "{p}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let routed = routed();
        assert!(
            routed.contains(&("POST".into(), "/v1/messages".into())),
            "{routed:?}"
        );
        assert!(
            routed.len() >= 14,
            "the source scan missed routes: {routed:?}"
        );
        let documented = documented();
        let missing: Vec<_> = routed.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes without OpenAPI docs: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }

    #[test]
    fn every_reference_resolves_and_every_operation_is_complete() {
        let doc = doc();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for reference in refs {
            let pointer = reference.strip_prefix('#').expect("local references only");
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {reference}");
        }
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER],
            serde_json::json!({"type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"][BEARER]["description"]})
        );
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("default"), "{method} {path}");
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {path} has no success response"
                );
                // The bearer token exactly where `require_token` is layered.
                let secured = op.get("security") == Some(&serde_json::json!([{BEARER: []}]));
                assert_eq!(secured, path.starts_with("/v1/"), "{method} {path}");
                if secured {
                    assert!(responses.contains_key("401") && responses.contains_key("503"));
                }
                // Path templates and path parameters agree.
                let declared: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                let templated: BTreeSet<&str> = path
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                    .collect();
                assert_eq!(declared, templated, "{method} {path}");
            }
        }
        let unavailable = &doc["components"]["responses"]["Unavailable"];
        assert!(unavailable["headers"]["Retry-After"].is_object());
    }

    fn collect_refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => collect_refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }

    /// A router on peers that do not exist, with an API token.
    fn router() -> axum::Router {
        crate::test_router::offline_router(Some("t0ken"))
    }

    /// Each documented operation, called without and with the token: the router has it
    /// (never the fallback's 404 nor a 405), guards exactly the `/v1` ones, and answers
    /// every error with the JSON error body.
    #[tokio::test]
    async fn documented_operations_are_routed_and_guarded_as_documented() {
        let router = router();
        for (method, path) in documented() {
            // The SSE stream needs delivery up to answer at all; it is covered above.
            if path.ends_with("/events") {
                continue;
            }
            let concrete = path
                .replace("{action}", "pause")
                .replace("{path}", "a/b.txt")
                .replace("{source}", "default")
                .replace("{id}", "x");
            for token in [None, Some("Bearer t0ken")] {
                let mut request = Request::builder()
                    .method(Method::from_bytes(method.as_bytes()).unwrap())
                    .uri(&concrete)
                    .header("content-type", "application/json");
                if let Some(token) = token {
                    request = request.header("authorization", token);
                }
                let response = router
                    .clone()
                    .oneshot(request.body(Body::from("{}")).unwrap())
                    .await
                    .unwrap();
                let status = response.status();
                let json = response
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let what = format!("{method} {concrete} token={token:?}: {status} {body}");
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{what}");
                assert_ne!(body["error"]["message"], "no such endpoint", "{what}");
                if path.starts_with("/v1/") && token.is_none() {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                } else {
                    assert_ne!(status, StatusCode::UNAUTHORIZED, "{what}");
                }
                if status.is_client_error() || status.is_server_error() {
                    assert!(json && body["error"]["code"].is_string(), "{what}");
                }
            }
        }
    }
}
