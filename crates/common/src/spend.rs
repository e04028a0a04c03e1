//! Money and token figures as the console, the REST API and the CLI show them: an agent's
//! `price_per_mtok` turns tokens into dollars; no price, no dollar figure.

/// Dollars for `input` and `output` tokens at `price` (dollars per million input and
/// output tokens), or `None` when the agent has no price.
pub fn cost_usd(price: Option<(f64, f64)>, input: i64, output: i64) -> Option<f64> {
    price.map(|(per_input, per_output)| {
        (input.max(0) as f64 * per_input + output.max(0) as f64 * per_output) / 1_000_000.0
    })
}

/// `$1.23`, `$0.042`, `$0.0047`, `<$0.0001`; `—` without a price.
pub fn dollars(cost: Option<f64>) -> String {
    match cost {
        None => "—".into(),
        Some(0.0) => "$0".into(),
        Some(c) if c >= 0.995 => format!("${c:.2}"),
        Some(c) if c >= 0.00995 => format!("${c:.3}"),
        Some(c) if c >= 0.0001 => format!("${c:.4}"),
        Some(_) => "<$0.0001".into(),
    }
}

/// `1,234,567`: thousands separated, for token counts.
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_become_dollars_at_the_agents_price() {
        assert_eq!(cost_usd(None, 1_000, 1_000), None);
        assert_eq!(
            cost_usd(Some((3.0, 15.0)), 1_000_000, 100_000),
            Some(3.0 + 1.5)
        );
        assert_eq!(dollars(Some(4.5)), "$4.50");
        assert_eq!(dollars(Some(0.042)), "$0.042");
        assert_eq!(dollars(None), "—");
        assert_eq!(dollars(Some(0.0)), "$0");
        assert_eq!(dollars(Some(0.004_71)), "$0.0047");
        assert_eq!(dollars(Some(0.000_012)), "<$0.0001");
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(-12_345), "-12,345");
    }
}
