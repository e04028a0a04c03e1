//! Console sign-in: the session cookie and the CSRF token, both HMACs under a key made
//! fresh in each process (a restart signs everyone out, which is the safe default).
//!
//! The cookie never holds the API token: it holds a random session id, when it was issued,
//! and an HMAC over both. The server also keeps the ids it issued, so signing out ends the
//! session for real and not only in the browser that signed out.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::HeaderMap;
use axum::http::header;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The session cookie's name.
pub const COOKIE: &str = "ferroclaw_console";
/// How long a sign-in lasts.
pub const SESSION_MS: i64 = 12 * 60 * 60 * 1000;
/// Sessions kept at most: sign-ins need the token, so this only bounds a careless script.
const MAX_SESSIONS: usize = 1024;
/// The session everyone shares when the gateway has no API token (loopback only): it still
/// gets a CSRF token, since a page on another site can post to a loopback address.
const OPEN_SESSION: &str = "open";

/// The per-process secret and the sessions issued under it.
pub struct Keys {
    key: [u8; 32],
    /// Session id → issued at (unix ms).
    live: Mutex<HashMap<String, i64>>,
}

/// Who is signed in: the session id the cookie carried (or the open session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub session: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

impl Keys {
    /// A fresh random key (from the OS generator, through two v4 UUIDs: 244 random bits).
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self::with_key(key)
    }

    fn with_key(key: [u8; 32]) -> Self {
        Self {
            key,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn mac(&self, parts: &[&str]) -> HmacSha256 {
        // Keys of any length are accepted by HMAC.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    fn sign(&self, parts: &[&str]) -> String {
        hex(&self.mac(parts).finalize().into_bytes())
    }

    fn verify(&self, parts: &[&str], given_hex: &str) -> bool {
        let Some(given) = unhex(given_hex) else {
            return false;
        };
        // `verify_slice` compares in constant time.
        self.mac(parts).verify_slice(&given).is_ok()
    }

    /// Starts a session; returns the cookie value to set.
    pub fn issue(&self, now_ms: i64) -> String {
        let session = uuid::Uuid::new_v4().simple().to_string();
        let issued = now_ms.to_string();
        let mac = self.sign(&["session", &session, &issued]);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, at| now_ms - *at < SESSION_MS);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(s, _)| s.clone())
        {
            live.remove(&oldest);
        }
        live.insert(session.clone(), now_ms);
        format!("{session}.{issued}.{mac}")
    }

    /// The session a cookie value names, when it is ours, unexpired and not signed out.
    pub fn check(&self, cookie: &str, now_ms: i64) -> Option<Signed> {
        let mut parts = cookie.split('.');
        let (session, issued, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !self.verify(&["session", session, issued], mac) {
            return None;
        }
        let at: i64 = issued.parse().ok()?;
        if now_ms - at >= SESSION_MS || at > now_ms + 60_000 {
            return None;
        }
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        (live.get(session) == Some(&at)).then(|| Signed {
            session: session.to_string(),
        })
    }

    /// Ends a session (sign-out).
    pub fn revoke(&self, signed: &Signed) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&signed.session);
    }

    /// The session of a gateway without an API token.
    pub fn open_session() -> Signed {
        Signed {
            session: OPEN_SESSION.into(),
        }
    }

    /// The CSRF token of a session: forms carry it in a hidden field.
    pub fn csrf(&self, signed: &Signed) -> String {
        self.sign(&["csrf", &signed.session])
    }

    /// Whether `given` is the session's CSRF token (constant time).
    pub fn csrf_ok(&self, signed: &Signed, given: &str) -> bool {
        self.verify(&["csrf", &signed.session], given)
    }
}

/// The session cookie's value in a request, if any.
pub fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for a new session: script cannot read it, other sites cannot send it.
pub fn set_cookie(value: &str) -> String {
    format!(
        "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}",
        SESSION_MS / 1000
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000;

    #[test]
    fn an_issued_cookie_checks_until_it_expires_or_is_revoked() {
        let keys = Keys::new();
        let cookie = keys.issue(NOW);
        let signed = keys.check(&cookie, NOW + 1000).expect("valid");
        assert!(!cookie.contains("t0ken"));
        assert!(keys.check(&cookie, NOW + SESSION_MS).is_none(), "expired");
        keys.revoke(&signed);
        assert!(keys.check(&cookie, NOW + 1000).is_none(), "signed out");
    }

    #[test]
    fn a_forged_or_foreign_cookie_is_refused() {
        let keys = Keys::with_key([1; 32]);
        let other = Keys::with_key([2; 32]);
        let cookie = keys.issue(NOW);
        assert!(other.check(&cookie, NOW).is_none(), "another process's key");
        let (session, rest) = cookie.split_once('.').unwrap();
        // Another session id under the same MAC.
        let mut forged_id = session.to_string();
        forged_id.replace_range(0..1, if session.starts_with('a') { "b" } else { "a" });
        assert!(keys.check(&format!("{forged_id}.{rest}"), NOW).is_none());
        // A later issue time (to outlive the expiry) breaks the MAC.
        let mac = rest.split_once('.').unwrap().1;
        assert!(
            keys.check(&format!("{session}.{}.{mac}", NOW + 5), NOW)
                .is_none()
        );
        for junk in ["", "a.b", "a.b.c.d", "x.1.zz", &format!("{cookie}.")] {
            assert!(keys.check(junk, NOW).is_none(), "{junk}");
        }
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let keys = Keys::new();
        let a = keys.check(&keys.issue(NOW), NOW).unwrap();
        let b = keys.check(&keys.issue(NOW), NOW).unwrap();
        let token = keys.csrf(&a);
        assert!(keys.csrf_ok(&a, &token));
        assert!(!keys.csrf_ok(&b, &token), "another session's token");
        assert!(!keys.csrf_ok(&a, ""));
        assert!(!keys.csrf_ok(&a, &token[..10]));
        let open = Keys::open_session();
        assert!(keys.csrf_ok(&open, &keys.csrf(&open)));
        assert!(
            !Keys::new().csrf_ok(&open, &keys.csrf(&open)),
            "per process"
        );
    }

    #[test]
    fn the_cookie_is_read_among_others_and_set_safely() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; ferroclaw_console=abc.1.ff; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_value(&headers), Some("abc.1.ff"));
        assert_eq!(cookie_value(&HeaderMap::new()), None);
        let set = set_cookie("v");
        for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
            assert!(set.contains(attr), "{set}");
            assert!(clear_cookie().contains(attr));
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn sessions_are_bounded() {
        let keys = Keys::new();
        let first = keys.issue(NOW);
        for i in 0..MAX_SESSIONS {
            keys.issue(NOW + 1 + i as i64);
        }
        assert!(keys.check(&first, NOW + 5000).is_none(), "the oldest went");
        assert!(keys.live.lock().unwrap().len() <= MAX_SESSIONS);
    }
}
