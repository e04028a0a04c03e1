use std::time::Duration;

use ferroclaw_e2e::Cluster;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_leave_nothing_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_API_TOKEN", "s3cret".into()),
            ("FERROCLAW_MAX_BODY_BYTES", "1024".into()),
        ],
    )
    .await?;
    let api = cluster.api();
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>, token: Option<&str>| {
        let mut request = http
            .post(format!("{api}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            anyhow::Ok((status, body))
        }
    };
    let ok_body = br#"{"conversation":"c","text":"hi"}"#.to_vec();

    let (status, body) = post("/v1/messages", ok_body.clone(), None).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    let (status, _) = post("/v1/messages", ok_body.clone(), Some("wrong")).await?;
    assert_eq!(status, 401);

    let (status, body) = post("/v1/messages", b"{not json".to_vec(), Some("s3cret")).await?;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("invalid JSON"),
        "{body}"
    );
    let (status, body) = post(
        "/v1/messages",
        br#"{"conversation":"c"}"#.to_vec(),
        Some("s3cret"),
    )
    .await?;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("text"),
        "{body}"
    );
    let (status, _) = post(
        "/v1/messages",
        br#"{"conversation":"c","text":"  "}"#.to_vec(),
        Some("s3cret"),
    )
    .await?;
    assert_eq!(status, 400);

    let (status, body) = post("/v1/hooks/unknown", b"{}".to_vec(), Some("s3cret")).await?;
    assert_eq!(status, 404, "{body}");
    let big = serde_json::to_vec(&json!({"blob": "x".repeat(4096)}))?;
    let (status, body) = post("/v1/hooks/default", big, Some("s3cret")).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (413, json!("payload_too_large"))
    );

    // Health stays open; everything under /v1 needs the token.
    let (status, _) = cluster.get("/healthz").await?;
    assert_eq!(status, 200);
    let unauthenticated = reqwest::get(format!("{api}/v1/sessions")).await?;
    assert_eq!(unauthenticated.status().as_u16(), 401);

    // None of the rejects created a session or a session directory.
    let (status, sessions) = cluster.get("/v1/sessions").await?;
    assert_eq!(status, 200);
    assert_eq!(sessions["sessions"], json!([]), "{sessions}");
    assert!(!dir.path().join("sessions/main").exists());

    // And the token works.
    let (status, body) = post("/v1/messages", ok_body, Some("s3cret")).await?;
    assert_eq!(status, 202, "{body}");
    cluster.stop().await
}

/// Errors made below the handlers (the router's 405, a bad path parameter, a malformed
/// query, the parser limits) carry the same JSON error body as the handlers' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_the_json_error_body() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[("FERROCLAW_API_TOKEN", "s3cret".into())]).await?;
    let api = cluster.api();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, header: Option<(&str, String)>| {
        let mut request = http
            .request(method, format!("{api}{path}"))
            .bearer_auth("s3cret");
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::ensure!(
                content_type == "application/json" && body["error"]["code"].is_string(),
                "{status} is not the JSON error body: {content_type} {body}"
            );
            anyhow::Ok((status, headers, body))
        }
    };
    use reqwest::Method;

    // 405 names what is allowed, in `Allow` and in words.
    let (status, headers, body) = call(Method::DELETE, "/v1/messages".into(), None).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (405, &json!("method_not_allowed"))
    );
    assert_eq!(
        headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Allow")),
        "{body}"
    );
    let (status, headers, _) = call(Method::POST, "/healthz".into(), None).await?;
    assert_eq!(status, 405);
    assert!(headers.get("allow").is_some());

    // A path parameter that is not UTF-8 once decoded.
    let (status, _, body) = call(Method::GET, "/v1/sessions/%FF%FE".into(), None).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request")),
        "{body}"
    );
    let (status, _, _) = call(
        Method::GET,
        "/v1/conversations/%C3%28/messages".into(),
        None,
    )
    .await?;
    assert_eq!(status, 400);
    // A query that does not parse.
    let (status, _, body) = call(
        Method::GET,
        "/v1/conversations/c/messages?after=soon".into(),
        None,
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    // The parser limits: a request target over 8 KiB, headers over 16 KiB.
    let long = format!("/v1/sessions/{}", "a".repeat(9 * 1024));
    let (status, _, body) = call(Method::GET, long, None).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (414, &json!("uri_too_long"))
    );
    let big = Some(("x-padding", "p".repeat(20 * 1024)));
    let (status, _, body) = call(Method::GET, "/v1/sessions".into(), big).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (431, &json!("headers_too_large"))
    );
    // And an unknown route, as before.
    let (status, _, _) = call(Method::GET, "/v2/nothing".into(), None).await?;
    assert_eq!(status, 404);
    cluster.stop().await
}

fn signal(pid: Option<u32>, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = pid.ok_or_else(|| anyhow::anyhow!("the process has exited"))?;
    // SAFETY: kill(2) on a child process this test started.
    let done = unsafe { libc::kill(pid as libc::pid_t, signal) };
    anyhow::ensure!(done == 0, "kill: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The answer a client gets when an internal service goes away mid-call: 503, the JSON
/// error body naming the gRPC method, and when to retry.
async fn assert_unavailable(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 503, "{body}");
    assert!(
        retry_after.is_some_and(|s| s > 0),
        "Retry-After missing: {body}"
    );
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    Ok(body)
}

/// A runner that hangs, then dies with a call in flight; delivery killed during a
/// long-poll. Both calls end in 503 with `Retry-After` (before: 502 "transport error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_lost_mid_request_gives_503_with_retry_after() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), &[]).await?;
    let api = cluster.api();
    let http = reqwest::Client::new();

    // The runner stops answering (SIGSTOP): the call reaches it and waits.
    signal(cluster.runner.child.id(), libc::SIGSTOP)?;
    let pending = tokio::spawn(http.get(format!("{api}/v1/sessions")).send());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !pending.is_finished(),
        "the call should be waiting on the runner"
    );
    cluster.kill_runner().await?;
    let response = tokio::time::timeout(Duration::from_secs(10), pending).await???;
    let body = assert_unavailable(response).await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ferroclaw.v1.Runner/ListSessions")),
        "{body}"
    );
    // While it is down: the same, at once.
    let response = http.get(format!("{api}/v1/sessions")).send().await?;
    assert_unavailable(response).await?;
    cluster.restart_runner().await?;
    let (status, _) = cluster.get("/v1/sessions").await?;
    assert_eq!(status, 200);

    // Delivery dies while a long-poll waits on it.
    let pending = tokio::spawn(
        http.get(format!("{api}/v1/conversations/lost/messages?wait=20"))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!pending.is_finished(), "the long-poll should be waiting");
    cluster.kill_delivery().await?;
    let response = tokio::time::timeout(Duration::from_secs(10), pending).await???;
    let body = assert_unavailable(response).await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ferroclaw.v1.Delivery/ListConversationMessages")),
        "{body}"
    );
    cluster.restart_delivery().await?;
    let (status, _) = cluster.get("/v1/conversations/lost/messages").await?;
    assert_eq!(status, 200);
    cluster.stop().await
}
