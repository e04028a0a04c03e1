//! Identifiers: a short prefix that says what the id names, then a random UUID.

/// A new random id such as `ses_5b0c…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A 64-bit FNV-1a hash: stable across releases and platforms (unlike std's hasher), for
/// ids derived from other ids.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// True for names safe to use as one path component and in URLs: ASCII letters, digits,
/// `-`, `_` and `.` (not leading), 1 to 128 characters.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        let a = new_id("ses");
        assert!(a.starts_with("ses_") && a.len() == 36);
        assert_ne!(a, new_id("ses"));
        assert!(is_safe_name("main"));
        assert!(is_safe_name("ses_abc-1.2"));
        assert!(!is_safe_name(".."));
        assert!(!is_safe_name("a/b"));
        assert!(!is_safe_name(""));
    }
}
