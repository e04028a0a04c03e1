//! HMAC-SHA256 signatures of webhook bodies, both ways: verifying what sources send to the
//! gateway and signing what delivery posts to callback URLs.
//!
//! ferroclaw's scheme signs `"<unix seconds>.<body>"` and sends
//! `X-Ferroclaw-Timestamp: <unix seconds>` and `X-Ferroclaw-Signature: sha256=<hex>`;
//! the timestamp bounds replays to a tolerance window. GitHub's scheme signs the body alone
//! (`X-Hub-Signature-256: sha256=<hex>`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "x-ferroclaw-timestamp";
pub const SIGNATURE_HEADER: &str = "x-ferroclaw-signature";
pub const GITHUB_SIGNATURE_HEADER: &str = "x-hub-signature-256";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("{0} is not of the form sha256=<hex>")]
    Malformed(&'static str),
    #[error("signature does not match the body")]
    Mismatch,
    #[error("timestamp is outside the {0} s tolerance window (a replay, or a clock off)")]
    Stale(u64),
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length: this cannot fail.
    Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `sha256=<hex>` of `"<timestamp>.<body>"`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// `sha256=<hex>` of the body alone (GitHub's scheme).
pub fn sign_body(secret: &[u8], body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

fn check(
    mac: Hmac<Sha256>,
    header: Option<&str>,
    name: &'static str,
) -> Result<(), SignatureError> {
    let given = header.ok_or(SignatureError::Missing(name))?;
    let given = given
        .strip_prefix("sha256=")
        .and_then(unhex)
        .ok_or(SignatureError::Malformed(name))?;
    // Constant-time comparison.
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)
}

/// Verifies ferroclaw's scheme at time `now` (unix seconds).
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let timestamp = timestamp.ok_or(SignatureError::Missing("X-Ferroclaw-Timestamp"))?;
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed("X-Ferroclaw-Timestamp"))?;
    if now.abs_diff(ts) > tolerance_secs {
        return Err(SignatureError::Stale(tolerance_secs));
    }
    let mut mac = mac(secret);
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    check(mac, signature, "X-Ferroclaw-Signature")
}

/// Verifies GitHub's scheme.
pub fn verify_github(
    secret: &[u8],
    signature: Option<&str>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let mut mac = mac(secret);
    mac.update(body);
    check(mac, signature, "X-Hub-Signature-256")
}

/// The token an agent presents to the runner's credential proxy: its session id and an
/// HMAC of it under the runner's secret, so the proxy needs no token table.
pub fn session_token(secret: &[u8], grant: &TokenGrant) -> String {
    let payload = format!("{}.{}.{}", grant.session_id, grant.expires_at, grant.agent);
    let signature = sign_body(secret, payload.as_bytes());
    let hex = signature.trim_start_matches("sha256=");
    format!("{payload}.{hex}")
}

/// What a proxy token grants: one session of one agent, until a moment (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub session_id: String,
    pub agent: String,
    pub expires_at: i64,
}

/// The grant of a proxy token whose HMAC checks out (expired or not: the caller decides,
/// so it can say which).
pub fn verify_session_token(secret: &[u8], token: &str) -> Option<TokenGrant> {
    let (payload, hex) = token.rsplit_once('.')?;
    let header = format!("sha256={hex}");
    verify_github(secret, Some(&header), payload.as_bytes()).ok()?;
    let (session_id, rest) = payload.split_once('.')?;
    let (expires_at, agent) = rest.split_once('.')?;
    Some(TokenGrant {
        session_id: session_id.to_string(),
        agent: agent.to_string(),
        expires_at: expires_at.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_tokens_verify_only_under_their_secret() {
        let grant = TokenGrant {
            session_id: "ses_1".into(),
            agent: "main.bot".into(),
            expires_at: 1_900_000_000,
        };
        let token = session_token(b"secret", &grant);
        assert_eq!(verify_session_token(b"secret", &token), Some(grant));
        assert_eq!(verify_session_token(b"other", &token), None);
        let longer = token.replace("1900000000", "1900000001");
        assert_eq!(verify_session_token(b"secret", &longer), None);
        let forged = token.replace("ses_1", "ses_2");
        assert_eq!(verify_session_token(b"secret", &forged), None);
        assert_eq!(verify_session_token(b"secret", "no-dot"), None);
    }

    #[test]
    fn round_trips_and_rejections() {
        let s = sign(b"k", 1000, b"{}");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert_eq!(
            verify(b"k", Some("1000"), Some(&s), b"{}", 1100, 300),
            Ok(())
        );
        assert_eq!(
            verify(b"k", Some("1000"), Some(&s), b"{ }", 1100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"x", Some("1000"), Some(&s), b"{}", 1100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"k", Some("1000"), Some(&s), b"{}", 1400, 300),
            Err(SignatureError::Stale(300))
        );
        assert!(matches!(
            verify(b"k", None, Some(&s), b"{}", 1000, 300),
            Err(SignatureError::Missing(_))
        ));
        assert!(matches!(
            verify(b"k", Some("1000"), None, b"{}", 1000, 300),
            Err(SignatureError::Missing(_))
        ));
        assert!(matches!(
            verify(b"k", Some("1000"), Some("md5=ab"), b"{}", 1000, 300),
            Err(SignatureError::Malformed(_))
        ));
        // GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
        let gh = sign_body(b"It's a Secret to Everybody", b"Hello, World!");
        assert_eq!(
            gh,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        assert_eq!(
            verify_github(b"It's a Secret to Everybody", Some(&gh), b"Hello, World!"),
            Ok(())
        );
    }
}
