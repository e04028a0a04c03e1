//! Seq parity: one order across both mailbox files without coordination.

/// The next host (runner) seq: the smallest even number above `max_seen`.
pub fn next_host(max_seen: i64) -> i64 {
    let n = max_seen.max(0) + 1;
    if n % 2 == 0 { n } else { n + 1 }
}

/// The next agent seq: the smallest odd number above `max_seen`.
pub fn next_agent(max_seen: i64) -> i64 {
    let n = max_seen.max(0) + 1;
    if n % 2 == 1 { n } else { n + 1 }
}

pub fn is_host(seq: i64) -> bool {
    seq > 0 && seq % 2 == 0
}

pub fn is_agent(seq: i64) -> bool {
    seq % 2 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_and_strictly_above() {
        for max in 0..50 {
            let h = next_host(max);
            let a = next_agent(max);
            assert!(h > max && is_host(h) && h - max <= 2);
            assert!(a > max && is_agent(a) && a - max <= 2);
        }
        assert_eq!(next_host(0), 2);
        assert_eq!(next_agent(0), 1);
        assert_eq!(next_host(7), 8);
        assert_eq!(next_agent(8), 9);
    }
}
