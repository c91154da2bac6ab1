//! A `text/event-stream` reader (the WHATWG server-sent events format):
//! bytes in, as they come off the wire, the `data` of each event out.
//!
//! Lines end with `\n`, `\r\n` or `\r` (also when a chunk ends between the
//! `\r` and the `\n`); a line starting with `:` is a comment; `data:` lines
//! of one event are joined with `\n`; a blank line ends an event; other
//! fields (`event`, `id`, `retry`) are ignored; a leading byte-order mark
//! is dropped. A multi-byte character may be split across chunks.

use std::collections::VecDeque;

/// The largest event (its pending line and data), like the largest HTTP
/// answer read.
const MAX_EVENT: usize = 16 * 1024 * 1024;

/// An event larger than the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TooLarge;

/// Splits an event stream into the data of its events.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// The bytes of the line not yet ended.
    line: Vec<u8>,
    /// The data lines of the event so far, `\n`-joined.
    data: String,
    /// Whether the event has a `data` field (it may be empty).
    has_data: bool,
    /// The last byte seen was `\r`: a `\n` right after it ends nothing.
    after_cr: bool,
    /// Past the first line (where a byte-order mark may be).
    started: bool,
    /// The events' data, in order, not yet taken.
    ready: VecDeque<String>,
}

impl SseParser {
    /// Reads a chunk of the stream.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), TooLarge> {
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(end) = chunk.iter().position(|b| matches!(b, b'\n' | b'\r')) {
            self.line.extend_from_slice(&chunk[..end]);
            self.end_line()?;
            let cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(chunk);
        if self.line.len() + self.data.len() > MAX_EVENT {
            return Err(TooLarge);
        }
        Ok(())
    }

    /// The stream ended: an event that was not closed by a blank line is
    /// taken too (a lenient reading of a server that stops short).
    pub fn finish(&mut self) -> Result<(), TooLarge> {
        if !self.line.is_empty() {
            self.end_line()?;
        }
        self.dispatch();
        Ok(())
    }

    /// The data of the next complete event.
    pub fn next_event(&mut self) -> Option<String> {
        self.ready.pop_front()
    }

    fn end_line(&mut self) -> Result<(), TooLarge> {
        let raw = std::mem::take(&mut self.line);
        let mut line = String::from_utf8_lossy(&raw).into_owned();
        if !self.started {
            self.started = true;
            if let Some(rest) = line.strip_prefix('\u{feff}') {
                line = rest.to_owned();
            }
        }
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
            if self.data.len() > MAX_EVENT {
                return Err(TooLarge);
            }
        }
        Ok(())
    }

    /// Ends the event: its data is ready unless it had none, or only
    /// blanks (a keep-alive `data:` line).
    fn dispatch(&mut self) {
        let data = std::mem::take(&mut self.data);
        if std::mem::take(&mut self.has_data) && !data.trim().is_empty() {
            self.ready.push_back(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c).expect("small");
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        p.finish().expect("small");
        while let Some(e) = p.next_event() {
            out.push(e);
        }
        out
    }

    #[test]
    fn one_event_per_blank_line() {
        assert_eq!(
            events(&[b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n"]),
            ["{\"a\":1}", "{\"b\":2}"]
        );
    }

    #[test]
    fn every_line_ending_and_splits_between_cr_and_lf() {
        let text = b"data: one\r\ndata: 1\r\n\r\ndata: two\rdata: 2\r\rdata: three\ndata: 3\n\n";
        let expected = ["one\n1", "two\n2", "three\n3"];
        assert_eq!(events(&[text]), expected);
        // Every split of the same bytes gives the same events.
        for at in 0..text.len() {
            let (a, b) = text.split_at(at);
            assert_eq!(events(&[a, b]), expected, "split at {at}");
        }
        // Byte by byte.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(events(&bytes), expected);
    }

    #[test]
    fn comments_other_fields_multi_line_data_and_a_bom() {
        let text = "\u{feff}: keep-alive\nevent: message\nid: 7\nretry: 10\ndata:{\"x\":\ndata: \"é\"}\n\n:\n\n";
        assert_eq!(events(&[text.as_bytes()]), ["{\"x\":\n\"é\"}"]);
        // A character split across chunks survives.
        let bytes = text.as_bytes();
        let at = text.find('é').expect("there") + 1;
        assert_eq!(events(&[&bytes[..at], &bytes[at..]]), ["{\"x\":\n\"é\"}"]);
    }

    #[test]
    fn empty_data_and_a_missing_final_blank_line() {
        assert_eq!(events(&[b"data:\n\ndata\n\n"]), Vec::<String>::new());
        assert_eq!(events(&[b"data: last"]), ["last"]);
        assert_eq!(events(&[b"data: last\n"]), ["last"]);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut p = SseParser::default();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut refused = false;
        for _ in 0..20 {
            if p.push(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
