//! A reader of server-sent events (the WHATWG `text/event-stream` format), fed the body's
//! bytes as they arrive, in chunks cut anywhere.

/// Longest line accepted: a stream that never ends a line cannot take all memory.
const MAX_LINE: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `event:` (`message` when the stream names none).
    pub event: String,
    /// The `data:` lines, joined with newlines.
    pub data: String,
    /// The last event id in force when the event was dispatched (`id:` persists).
    pub id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("an event-stream line is longer than {MAX_LINE} bytes")]
pub struct LineTooLong;

#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The previous byte ended a line with `\r`: a `\n` right after belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
}

impl Parser {
    /// Takes the next bytes of the stream; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, LineTooLong> {
        let mut events = Vec::new();
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut events);
                }
                _ if self.line.len() >= MAX_LINE => return Err(LineTooLong),
                _ => self.line.push(b),
            }
        }
        Ok(events)
    }

    fn end_line(&mut self, events: &mut Vec<Event>) {
        let bytes = std::mem::take(&mut self.line);
        // Lines are whole here, so a character cut between chunks is whole again.
        let line = String::from_utf8_lossy(&bytes);
        if line.is_empty() {
            self.dispatch(events);
            return;
        }
        if line.starts_with(':') {
            return; // a comment: heartbeats
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            // `retry` and unknown fields: this reader keeps its own reconnection delay.
            _ => {}
        }
    }

    fn dispatch(&mut self, events: &mut Vec<Event>) {
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        // An event without data is not dispatched (the spec's rule).
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        events.push(Event {
            event: if event.is_empty() {
                "message".into()
            } else {
                event
            },
            data,
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::default();
        chunks
            .iter()
            .flat_map(|c| parser.feed(c).unwrap())
            .collect()
    }

    fn ev(event: &str, data: &str, id: Option<&str>) -> Event {
        Event {
            event: event.into(),
            data: data.into(),
            id: id.map(String::from),
        }
    }

    #[test]
    fn events_comments_and_ids() {
        let stream = b": keep-alive\n\nevent: message\nid: 7\ndata: {\"a\":1}\n\ndata:x\n\n";
        assert_eq!(
            all(&[stream]),
            vec![
                ev("message", "{\"a\":1}", Some("7")),
                // The id persists; no event name means `message`.
                ev("message", "x", Some("7")),
            ]
        );
    }

    #[test]
    fn chunks_cut_anywhere_give_the_same_events() {
        let stream =
            "event: message\r\nid: 12\r\ndata: héllo\r\ndata: two\r\n\r\nid: 13\rdata: z\r\r";
        let whole = all(&[stream.as_bytes()]);
        assert_eq!(
            whole,
            vec![
                ev("message", "héllo\ntwo", Some("12")),
                ev("message", "z", Some("13"))
            ]
        );
        let bytes = stream.as_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(all(&[&bytes[..cut], &bytes[cut..]]), whole, "cut at {cut}");
        }
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(all(&one_by_one), whole);
    }

    #[test]
    fn no_data_no_event_and_odd_fields() {
        assert_eq!(all(&[b"event: x\nid: 3\n\n"]), vec![]);
        // A field without a colon, a value without the space, an unknown field, a NUL id.
        assert_eq!(
            all(&[b"data\nfoo: bar\nid: a\0b\nevent:ping\n\n"]),
            vec![ev("ping", "", None)]
        );
        // An unfinished event is not dispatched.
        assert_eq!(all(&[b"data: half"]), vec![]);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut parser = Parser::default();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut result = Ok(Vec::new());
        for _ in 0..17 {
            result = parser.feed(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(result.is_err());
    }
}
