//! An error as one line with its causes: many libraries' own `Display` stops at the top
//! ("transport error", "client error (SendRequest)"), and the cause says what is wrong.

/// `error` and each of its sources, joined by ": " (a source already quoted is skipped).
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_the_error() {
        let e = Outer(std::io::Error::other("invalid peer certificate"));
        assert_eq!(with_causes(&e), "outer: invalid peer certificate");
    }
}
