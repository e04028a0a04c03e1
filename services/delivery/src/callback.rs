//! Replies to webhook sources with a `callback_url`: a JSON POST, signed with the source's
//! secret (ferroclaw's timestamped scheme) and carrying an `Idempotency-Key` so a retried
//! POST can be recognised by the receiver.

use ferroclaw_common::config::WebhookRoute;
use ferroclaw_common::signing;
use ferroclaw_content::OutboundContent;
use ferroclaw_proto::v1::OutboundMessage;
use serde_json::json;

use crate::send_error::SendError;

/// The longest `Retry-After` taken from a receiver.
const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Posts one reply; returns a platform id naming the response.
pub async fn post(
    client: &reqwest::Client,
    route: &WebhookRoute,
    message: &OutboundMessage,
    content: &OutboundContent,
) -> Result<String, SendError> {
    let url = route.callback_url.as_deref().ok_or_else(|| {
        SendError::permanent(
            "The webhook source has no callback address any more.",
            format!("webhook source {:?} has no callback_url", route.source),
        )
    })?;
    let body = json!({
        "source": route.source,
        "session_id": message.session_id,
        "out_seq": message.seq,
        "in_reply_to": (message.in_reply_to > 0).then_some(message.in_reply_to),
        "kind": message.kind,
        "text": content.text(),
        "content": serde_json::from_str::<serde_json::Value>(&message.content_json).unwrap_or_default(),
    })
    .to_string();
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            format!("{}:{}", message.session_id, message.seq),
        )
        .timeout(std::time::Duration::from_secs(15));
    if let Some(secret) = route.secret() {
        let now = ferroclaw_content::now_ms() / 1000;
        request = request
            .header(signing::TIMESTAMP_HEADER, now.to_string())
            .header(
                signing::SIGNATURE_HEADER,
                signing::sign(secret.as_bytes(), now, body.as_bytes()),
            );
    }
    let response = request.body(body).send().await.map_err(|e| {
        SendError::transient(
            "The callback address could not be reached",
            format!("POST {url}: {e}"),
        )
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(format!("callback:{}", status.as_u16()));
    }
    let detail = format!("POST {url} answered {status}");
    // 429 or 503 with a Retry-After (seconds): the receiver's own wait, not an attempt.
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| std::time::Duration::from_secs(secs).min(LONGEST_WAIT));
    match (status.as_u16(), retry_after) {
        (429 | 503, Some(wait)) => Err(SendError::Wait {
            wait,
            plain: "The callback address kept asking to wait".into(),
            detail,
        }),
        (408 | 429, None) | (500.., _) => Err(SendError::transient(
            "The callback address kept failing",
            detail,
        )),
        (code, _) => Err(SendError::permanent(
            format!("The callback address refused the reply (HTTP {code})."),
            detail,
        )),
    }
}
