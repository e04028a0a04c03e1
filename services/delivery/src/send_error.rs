//! Why one send did not succeed, in two forms: one plain sentence that a person (or the
//! agent) reads, and the details (statuses, upstream text) for the log and
//! `ListDeliveries`. Upstream and library text never reaches the plain sentence.

use std::time::Duration;

/// A failure in both forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// One sentence, no library or upstream text: "Discord refused the message: the bot
    /// may not post in this channel."
    pub plain: String,
    pub detail: String,
}

impl Failure {
    pub fn new(plain: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            plain: plain.into(),
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The destination asked us to wait (a rate limit): not a failed attempt.
    Wait {
        wait: Duration,
        /// What kept happening, for the notice if the reply is finally given up on:
        /// "Discord kept rate-limiting this channel".
        plain: String,
        detail: String,
    },
    /// Worth retrying (a server error, the network, a peer briefly down). `plain` says
    /// what kept happening: "Discord could not be reached".
    Transient(Failure),
    /// Will never work (a refusal, an unknown destination, a malformed message).
    Permanent(Failure),
}

impl SendError {
    pub fn transient(plain: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Transient(Failure::new(plain, detail))
    }

    pub fn permanent(plain: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Permanent(Failure::new(plain, detail))
    }
}

/// "15 minutes", "90 seconds", "2 hours": a duration as a person says it.
pub fn in_words(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = if secs >= 7200 && secs.is_multiple_of(3600) {
        (secs / 3600, "hour")
    } else if secs >= 120 && secs.is_multiple_of(60) || secs >= 600 {
        (secs.div_ceil(60), "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(in_words(Duration::from_secs(900)), "15 minutes");
        assert_eq!(in_words(Duration::from_secs(3)), "3 seconds");
        assert_eq!(in_words(Duration::from_secs(1)), "1 second");
        assert_eq!(in_words(Duration::from_secs(90)), "90 seconds");
        assert_eq!(in_words(Duration::from_secs(7200)), "2 hours");
        assert_eq!(in_words(Duration::from_secs(3600)), "60 minutes");
    }
}
