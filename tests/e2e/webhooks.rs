//! Signed webhook sources: ferroclaw's timestamped HMAC and GitHub's, delivery-id
//! idempotency, per-source size limits, and replies POSTed (signed) to a callback URL.

use std::time::Duration;

use ferroclaw_common::signing;
use ferroclaw_e2e::Cluster;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A callback receiver on loopback: hands each request's headers and body to the test.
async fn receiver() -> anyhow::Result<(u16, tokio::sync::mpsc::Receiver<(String, Vec<u8>)>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body) = loop {
                let Ok(n) = socket.read(&mut buf).await else {
                    break (String::new(), Vec::new());
                };
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                data.extend_from_slice(&buf[..n]);
                let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    break (head, data[end + 4..end + 4 + length].to_vec());
                }
            };
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            let _ = tx.send((head, body)).await;
        }
    });
    Ok((port, rx))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::trim))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_sources_idempotent_deliveries_and_signed_callbacks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (port, mut callbacks) = receiver().await?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[agents]]
name = "main"

[[webhooks]]
source = "signed"
agent = "main"
secret = "s3"

[[webhooks]]
source = "gh"
agent = "main"
secret_env = "E2E_GITHUB_SECRET"
signature = "github"

[[webhooks]]
source = "small"
agent = "main"
max_body_bytes = 64

[[webhooks]]
source = "cb"
agent = "main"
secret = "cbs"
callback_url = "http://127.0.0.1:{port}/hook"

[[conversations]]
pattern = "*"
agent = "main"
"#
        ),
    )?;
    let cluster = Cluster::start(
        dir.path(),
        &[
            ("FERROCLAW_CONFIG", config.display().to_string()),
            ("E2E_GITHUB_SECRET", "ghs".into()),
        ],
    )
    .await?;
    let http = reqwest::Client::new();
    let hook = |source: &str, body: &str, headers: Vec<(&'static str, String)>| {
        let mut request = http
            .post(format!("{}/v1/hooks/{source}", cluster.api()))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            request = request.header(k, v);
        }
        async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::Ok((status, body))
        }
    };
    let now = ferroclaw_mailbox::now_ms() / 1000;
    let signed = |body: &str, ts: i64, key: &str| {
        vec![
            ("x-ferroclaw-timestamp", ts.to_string()),
            (
                "x-ferroclaw-signature",
                signing::sign(b"s3", ts, body.as_bytes()),
            ),
            ("idempotency-key", key.to_string()),
        ]
    };

    // ferroclaw's scheme.
    let body = r#"{"n":1}"#;
    let (status, first) = hook("signed", body, signed(body, now, "d1")).await?;
    assert_eq!(status, 202, "{first}");
    let (status, replay) = hook("signed", body, signed(body, now, "d1")).await?;
    assert_eq!(
        (status, replay["duplicate"].clone()),
        (202, json!(true)),
        "a replay inside the window is the same delivery"
    );
    let (status, err) = hook(
        "signed",
        body,
        vec![
            ("x-ferroclaw-timestamp", now.to_string()),
            (
                "x-ferroclaw-signature",
                signing::sign(b"wrong", now, body.as_bytes()),
            ),
        ],
    )
    .await?;
    assert_eq!(
        (status, err["error"]["code"].clone()),
        (401, json!("bad_signature")),
        "{err}"
    );
    let (status, err) = hook("signed", body, vec![]).await?;
    assert_eq!(status, 401, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("missing"),
        "{err}"
    );
    let (status, err) = hook("signed", body, signed(body, now - 3600, "d2")).await?;
    assert_eq!(status, 401);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("tolerance"),
        "{err}"
    );
    let (status, _) = hook("signed", r#"{"n":2}"#, signed(body, now, "d3")).await?;
    assert_eq!(status, 401, "a signature of another body");

    // GitHub's scheme, with its delivery id header.
    let gh_body = r#"{"action":"opened"}"#;
    let gh = |delivery: &str| {
        vec![
            (
                "x-hub-signature-256",
                signing::sign_body(b"ghs", gh_body.as_bytes()),
            ),
            ("x-github-delivery", delivery.to_string()),
        ]
    };
    let (status, a) = hook("gh", gh_body, gh("g-1")).await?;
    assert_eq!((status, a["duplicate"].clone()), (202, json!(false)), "{a}");
    let (status, b) = hook("gh", gh_body, gh("g-1")).await?;
    assert_eq!((status, b["duplicate"].clone()), (202, json!(true)));
    let (status, _) = hook(
        "gh",
        gh_body,
        vec![("x-hub-signature-256", "sha256=00".into())],
    )
    .await?;
    assert_eq!(status, 401);

    // A per-source size limit.
    let (status, err) = hook(
        "small",
        &json!({"blob": "x".repeat(100)}).to_string(),
        vec![],
    )
    .await?;
    assert_eq!(
        (status, err["error"]["code"].clone()),
        (413, json!("payload_too_large"))
    );

    // One reply per delivery: a marker after the duplicates.
    cluster
        .wait_for_lines(
            "webhook-signed",
            &[r#"echo: webhook signed: {"n":1}"#.into()],
            Duration::from_secs(30),
        )
        .await?;
    let closed = r#"{"action":"closed"}"#;
    let marker_headers = vec![
        (
            "x-hub-signature-256",
            signing::sign_body(b"ghs", closed.as_bytes()),
        ),
        ("x-github-delivery", "g-2".to_string()),
    ];
    let (_, marker) = hook("gh", closed, marker_headers).await?;
    assert_eq!(marker["duplicate"], json!(false), "{marker}");
    let lines = cluster
        .wait_for_lines(
            "webhook-gh",
            &[r#"echo: webhook gh: {"action":"closed"}"#.into()],
            Duration::from_secs(30),
        )
        .await?;
    let opened = lines.iter().filter(|l| l.contains("opened")).count();
    assert_eq!(opened, 1, "g-1 answered once: {lines:?}");
    assert_eq!(cluster.texts("webhook-signed").await?.len(), 1);

    // Replies to a source with a callback URL are POSTed there, signed.
    let cb_body = r#"{"ping":true}"#;
    let cb_headers = vec![
        ("x-ferroclaw-timestamp", now.to_string()),
        (
            "x-ferroclaw-signature",
            signing::sign(b"cbs", now, cb_body.as_bytes()),
        ),
    ];
    let (status, accepted) = hook("cb", cb_body, cb_headers).await?;
    assert_eq!(status, 202, "{accepted}");
    let (head, body) = tokio::time::timeout(Duration::from_secs(30), callbacks.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no callback"))?;
    assert!(head.starts_with("post /hook "), "{head}");
    signing::verify(
        b"cbs",
        header(&head, "x-ferroclaw-timestamp"),
        header(&head, "x-ferroclaw-signature"),
        &body,
        ferroclaw_mailbox::now_ms() / 1000,
        300,
    )
    .map_err(|e| anyhow::anyhow!("the receiver cannot verify the callback: {e}"))?;
    assert!(header(&head, "idempotency-key").is_some());
    let reply: Value = serde_json::from_slice(&body)?;
    assert_eq!(reply["text"], json!(r#"echo: webhook cb: {"ping":true}"#));
    assert_eq!(reply["session_id"], accepted["session_id"]);
    cluster.stop().await
}
