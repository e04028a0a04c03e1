//! Aligned tables for the terminal, coloured when stdout is a terminal (and `NO_COLOR` is
//! not set). Widths count characters, so `—` and `…` align like any letter.

use std::io::IsTerminal;

/// A cell's colour (ANSI), used only when colour is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Plain,
    Good,
    Warn,
    Bad,
    Dim,
}

impl Tone {
    fn code(self) -> Option<&'static str> {
        match self {
            Self::Plain => None,
            Self::Good => Some("32"),
            Self::Warn => Some("33"),
            Self::Bad => Some("31"),
            Self::Dim => Some("2"),
        }
    }
}

/// Whether to colour what goes to stdout.
pub fn colour_on() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stdout().is_terminal()
}

/// A table: a header and rows of (text, tone) cells. Columns listed in `right` are
/// right-aligned (numbers).
pub struct Table {
    header: Vec<&'static str>,
    right: Vec<usize>,
    rows: Vec<Vec<(String, Tone)>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Self {
            header,
            right: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Right-aligns these columns.
    pub fn right(mut self, columns: &[usize]) -> Self {
        self.right = columns.to_vec();
        self
    }

    /// Adds a row. Control characters are shown as `�`: cells carry text agents can
    /// influence (a delivery failure's reason), and an escape sequence must not reach the
    /// operator's terminal.
    pub fn row(&mut self, cells: Vec<(String, Tone)>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|(text, tone)| (inert(&text), tone))
                .collect(),
        );
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines, indented by `indent` spaces; the header bold when coloured.
    pub fn render(&self, indent: usize, colour: bool) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (text, _)) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(text.chars().count());
            }
        }
        let pad = " ".repeat(indent);
        let mut out = String::new();
        let line = |cells: Vec<(String, Tone)>, bold: bool, out: &mut String| {
            out.push_str(&pad);
            let last = cells.len().min(columns).saturating_sub(1);
            for (i, (text, tone)) in cells.into_iter().enumerate().take(columns) {
                let gap = widths[i].saturating_sub(text.chars().count());
                let right = self.right.contains(&i);
                if right {
                    out.push_str(&" ".repeat(gap));
                }
                match (colour, bold, tone.code()) {
                    (true, true, _) => out.push_str(&format!("\x1b[1m{text}\x1b[0m")),
                    (true, false, Some(code)) => {
                        out.push_str(&format!("\x1b[{code}m{text}\x1b[0m"))
                    }
                    _ => out.push_str(&text),
                }
                // No trailing spaces after the last column.
                if !right && i < last {
                    out.push_str(&" ".repeat(gap));
                }
                if i < last {
                    out.push_str("  ");
                }
            }
            out.push('\n');
        };
        line(
            self.header
                .iter()
                .map(|h| (h.to_string(), Tone::Plain))
                .collect(),
            true,
            &mut out,
        );
        for row in &self.rows {
            line(row.clone(), false, &mut out);
        }
        out
    }
}

/// `text` with every control character (C0, DEL, C1) replaced by `�`.
pub fn inert(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// `5 s ago`, `3 min ago`, `2 h ago`, `4 d ago`; `never` for 0.
pub fn ago(ms: i64, now_ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = (now_ms - ms).max(0) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut t = Table::new(vec!["NAME", "STATE", "N"]).right(&[2]);
        t.row(vec![
            ("runner".into(), Tone::Plain),
            ("ready".into(), Tone::Good),
            ("7".into(), Tone::Plain),
        ]);
        t.row(vec![
            ("—".into(), Tone::Plain),
            ("unreachable".into(), Tone::Bad),
            ("1,200".into(), Tone::Plain),
        ]);
        t
    }

    #[test]
    fn columns_align_and_numbers_go_right() {
        let text = table().render(2, false);
        assert_eq!(
            text,
            "  NAME    STATE            N\n  runner  ready            7\n  —       unreachable  1,200\n"
        );
    }

    #[test]
    fn colour_wraps_cells_in_ansi_codes() {
        let text = table().render(0, true);
        assert!(text.contains("\x1b[1mNAME\x1b[0m"));
        assert!(text.contains("\x1b[32mready\x1b[0m"));
        assert!(text.contains("\x1b[31munreachable\x1b[0m"));
        assert!(!text.contains("\x1b[0mrunner"), "plain cells stay plain");
    }

    #[test]
    fn escape_sequences_never_reach_the_terminal() {
        let mut t = Table::new(vec!["REASON"]);
        t.row(vec![(
            "bad \x1b]0;owned\x07 \u{9b}31m\r\n".into(),
            Tone::Bad,
        )]);
        let text = t.render(0, false);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 2, "{text:?}");
    }

    #[test]
    fn figures_read_plainly() {
        assert_eq!(ago(1_000, 181_000), "3 min ago");
        assert_eq!(ago(0, 5), "never");
    }
}
