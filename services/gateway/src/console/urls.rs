//! Links built from attacker-controlled ids (conversations, sessions, tasks): each id is
//! percent-encoded as one path segment or query value, so `/`, `?`, `#` or `..` in an id
//! cannot point a link elsewhere.

/// `text` as one URL path segment or query value: everything but unreserved characters
/// (RFC 3986) is percent-encoded.
pub fn encode(text: &str) -> String {
    // `.` is unreserved. An id that is exactly `.` or `..` is resolved away by the
    // browser, encoded or not: its link lands on another `/ui` page, never outside.
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The console page of an API conversation.
pub fn conversation(id: &str) -> String {
    format!("/ui/conversations/{}", encode(id))
}

/// The console page of a session (its messages both ways, for any channel).
pub fn session(id: &str) -> String {
    format!("/ui/sessions/{}", encode(id))
}

/// The API conversation a session belongs to, from its conversation key (`api:<id>`).
pub fn api_conversation(conversation_key: &str) -> Option<&str> {
    conversation_key.strip_prefix("api:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_one_segment() {
        assert_eq!(encode("support-42"), "support-42");
        assert_eq!(encode("../a/b?c#d e.txt"), "..%2Fa%2Fb%3Fc%23d%20e.txt");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(conversation("a/b"), "/ui/conversations/a%2Fb");
        assert_eq!(api_conversation("api:x:y"), Some("x:y"));
        assert_eq!(api_conversation("discord:1"), None);
    }
}
