//! Replies to webhook sources with a `callback_url`: a JSON POST, signed with the source's
//! secret (ferroclaw's timestamped scheme) and carrying an `Idempotency-Key` so a retried
//! POST can be recognised by the receiver.

use ferroclaw_common::config::WebhookRoute;
use ferroclaw_common::signing;
use ferroclaw_content::OutboundContent;
use ferroclaw_proto::v1::OutboundMessage;
use serde_json::json;

pub enum CallbackError {
    /// The receiver refused it for good (a 4xx other than 408/429).
    Permanent(String),
    /// Worth retrying (a network error, 408, 429, 5xx).
    Transient(String),
}

/// Posts one reply; returns a platform id naming the response.
pub async fn post(
    client: &reqwest::Client,
    route: &WebhookRoute,
    message: &OutboundMessage,
    content: &OutboundContent,
) -> Result<String, CallbackError> {
    let url = route
        .callback_url
        .as_deref()
        .ok_or_else(|| CallbackError::Permanent("the source has no callback_url".into()))?;
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
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| CallbackError::Transient(format!("POST {url}: {e}")))?;
    let status = response.status();
    if status.is_success() {
        return Ok(format!("callback:{}", status.as_u16()));
    }
    let detail = format!("POST {url} answered {status}");
    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
        Err(CallbackError::Permanent(detail))
    } else {
        Err(CallbackError::Transient(detail))
    }
}
