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
