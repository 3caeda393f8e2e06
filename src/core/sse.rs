//! Incremental parser for `text/event-stream` bytes (WHATWG HTML "server-sent events" rules): the
//! proxy feeds it the runtime's body chunks as they arrive, cut anywhere, and gets back whole
//! events, with the size of a pending frame bounded. (Client events are written by `agent2ui`.)

use std::fmt;

/// One dispatched server-sent event.
///
/// `event` is `None` when the frame had no (or an empty) `event:` field, i.e. the type is the default
/// `message`. `id` is the stream's *last event ID* at dispatch time (WHATWG: it persists across
/// events until another `id:` field changes it; `None` while it is empty). `retry` is the value of a
/// valid `retry:` field inside this frame, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
}

/// Why the parser gave up on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    /// A frame (the event being accumulated plus the current incomplete line) exceeded `limit` bytes.
    FrameTooLarge { limit: usize },
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::FrameTooLarge { limit } => {
                write!(f, "SSE frame larger than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SseError {}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// Capacity of the line carry buffer kept between lines.
const CARRY_KEEP: usize = 16 * 1024;

/// Incremental SSE parser. Feed it byte chunks cut anywhere; it buffers only the incomplete tail line.
#[derive(Debug)]
pub struct SseParser {
    max_frame_bytes: usize,
    /// Bytes of the current, not yet terminated line.
    carry: Vec<u8>,
    /// The previous chunk ended in CR: a LF at the start of the next one belongs to that terminator.
    pending_cr: bool,
    /// How many bytes of a leading BOM have been matched; `None` once the stream start is behind us.
    bom_matched: Option<usize>,
    /// Bytes (lines plus one per terminator) of the undispatched frame, comments excluded.
    frame_bytes: usize,
    /// The frame's `data:` lines joined by LF (WHATWG appends each with an LF and drops the
    /// last one at dispatch; joining is the same text without the push and pop).
    data: String,
    /// A `data:` line came in this frame: it is an event even when its data is empty.
    has_data: bool,
    event: String,
    last_id: String,
    retry: Option<u64>,
    comments: u64,
    poisoned: Option<SseError>,
}

impl SseParser {
    /// A parser that fails once a pending frame grows beyond `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        SseParser {
            max_frame_bytes,
            carry: Vec::new(),
            pending_cr: false,
            bom_matched: Some(0),
            frame_bytes: 0,
            data: String::new(),
            has_data: false,
            event: String::new(),
            last_id: String::new(),
            retry: None,
            comments: 0,
            poisoned: None,
        }
    }

    /// Push complete events parsed from `chunk` onto `out`. Err once a pending frame exceeds
    /// max_frame_bytes (the parser is then poisoned: later feeds return the same Err). Events
    /// completed earlier in the same chunk are still pushed.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        let mut chunk = chunk;
        if let Some(matched) = self.bom_matched {
            let mut m = matched;
            let mut i = 0;
            while m < BOM.len() && i < chunk.len() && chunk[i] == BOM[m] {
                m += 1;
                i += 1;
            }
            if m == BOM.len() {
                self.bom_matched = None;
                chunk = &chunk[i..];
            } else if i == chunk.len() {
                // Still (possibly) the start of a BOM: wait for more bytes.
                self.bom_matched = Some(m);
                return Ok(());
            } else {
                // Not a BOM after all: the bytes held back are ordinary stream bytes.
                self.bom_matched = None;
                chunk = &chunk[i..];
                self.process(&BOM[..m], out)?;
            }
        }
        self.process(chunk, out)
    }

    /// End of input: the unterminated last event is discarded (WHATWG). Returns true if a partial
    /// frame (any bytes of an undispatched event) was pending, so the caller can tell a truncated
    /// stream. The parser is reset for a new stream (the comment count is kept).
    pub fn finish(&mut self) -> bool {
        let pending = self.poisoned.is_some()
            || self.frame_bytes > 0
            || !self.carry.is_empty()
            || matches!(self.bom_matched, Some(m) if m > 0);
        self.carry.clear();
        self.pending_cr = false;
        self.bom_matched = Some(0);
        self.reset_frame();
        self.last_id.clear();
        self.poisoned = None;
        pending
    }

    /// Between reads: give back what a large line or frame left behind beyond `keep` bytes, so
    /// that a stream that waits keeps small buffers whatever passed before. What is pending (a
    /// line or frame not complete yet) is kept.
    pub fn shrink(&mut self, keep: usize) {
        self.carry.shrink_to(keep);
        self.data.shrink_to(keep);
    }

    /// Number of `:` comment lines seen (e.g. sse-starlette's `: ping`).
    pub fn comments(&self) -> u64 {
        self.comments
    }

    fn reset_frame(&mut self) {
        self.frame_bytes = 0;
        self.data.clear();
        self.has_data = false;
        self.event.clear();
        self.retry = None;
    }

    fn poison(&mut self) -> SseError {
        let err = SseError::FrameTooLarge {
            limit: self.max_frame_bytes,
        };
        self.poisoned = Some(err.clone());
        err
    }

    fn process(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut pos = 0;
        if self.pending_cr && !chunk.is_empty() {
            self.pending_cr = false;
            if chunk[0] == b'\n' {
                pos = 1;
            }
        }
        while pos < chunk.len() {
            let rest = &chunk[pos..];
            let Some(len) = find_line_end(rest) else {
                if self.frame_bytes + self.carry.len() + rest.len() > self.max_frame_bytes {
                    return Err(self.poison());
                }
                self.carry.extend_from_slice(rest);
                break;
            };
            if self.carry.is_empty() {
                self.line(&rest[..len], out);
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(&rest[..len]);
                self.line(&line, out);
                line.clear();
                // Do not keep a huge buffer for the rest of a long stream after one long line.
                line.shrink_to(CARRY_KEEP);
                self.carry = line;
            }
            if self.frame_bytes > self.max_frame_bytes {
                return Err(self.poison());
            }
            pos += len + 1;
            if rest[len] == b'\r' {
                match chunk.get(pos) {
                    Some(b'\n') => pos += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
        }
        Ok(())
    }

    /// Interpret one complete line (without its terminator).
    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        self.frame_bytes += line.len() + 1;
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if std::mem::replace(&mut self.has_data, true) {
                    self.data.push('\n');
                }
                self.data.push_str(&text(value));
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(&text(value));
            }
            b"id" if !value.contains(&0) => {
                self.last_id.clear();
                self.last_id.push_str(&text(value));
            }
            b"retry" => self.retry = parse_retry(value).or(self.retry),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        if !self.has_data {
            self.reset_frame();
            return;
        }
        let data = std::mem::take(&mut self.data);
        let event = (!self.event.is_empty()).then(|| self.event.clone());
        let id = (!self.last_id.is_empty()).then(|| self.last_id.clone());
        out.push(SseEvent {
            event,
            data,
            id,
            retry: self.retry,
        });
        self.reset_frame();
    }
}

/// Index of the first CR or LF in `bytes` (vectorised: a frame is one long line, and the blank
/// line that ends it is found without a search).
#[inline]
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    match bytes.first() {
        Some(b'\n' | b'\r') => Some(0),
        _ => memchr::memchr2(b'\n', b'\r', bytes),
    }
}

/// A `retry` value: ASCII digits only (no sign, no spaces); `None` if invalid or beyond u64.
fn parse_retry(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |ms, &b| {
        if b.is_ascii_digit() {
            ms.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// `bytes` as text: borrowed when valid UTF-8 (the fast, usual case, checked with SIMD), else
/// decoded lossily.
#[inline]
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match simdutf8::basic::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Serialise one event, LF line endings only; multi-line data (split on CRLF, LF or CR) becomes
/// several `data:` lines. `event` None = no event line; CR and LF in it are dropped. The
/// property tests write the streams they parse back with it.
#[cfg(test)]
fn write_event(out: &mut Vec<u8>, event: Option<&str>, data: &str) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        if find_line_end(name.as_bytes()).is_none() {
            out.extend_from_slice(name.as_bytes());
        } else {
            out.extend(name.bytes().filter(|&b| b != b'\r' && b != b'\n'));
        }
        out.push(b'\n');
    }
    let mut rest = data.as_bytes();
    loop {
        out.extend_from_slice(b"data: ");
        match find_line_end(rest) {
            None => {
                out.extend_from_slice(rest);
                out.extend_from_slice(b"\n\n");
                return;
            }
            Some(len) => {
                out.extend_from_slice(&rest[..len]);
                out.push(b'\n');
                let skip = if rest[len] == b'\r' && rest.get(len + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[len + skip..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 64 * 1024;

    fn parse_chunks(chunks: &[&[u8]]) -> (Vec<SseEvent>, bool, u64) {
        let mut p = SseParser::new(MAX);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        let comments = p.comments();
        (out, p.finish(), comments)
    }

    fn parse(bytes: &[u8]) -> Vec<SseEvent> {
        let (events, pending, _) = parse_chunks(&[bytes]);
        assert!(!pending, "unexpected partial frame in {bytes:?}");
        events
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
            ..SseEvent::default()
        }
    }

    #[test]
    fn shrink_gives_back_a_large_frames_buffers_and_keeps_what_is_pending() {
        let mut p = SseParser::new(MAX);
        let mut out = Vec::new();
        let big = format!("data: {}", "x".repeat(16 * 1024));
        // The line comes in two reads: its start waits in `carry`.
        let (first, second) = big.as_bytes().split_at(8 * 1024);
        p.feed(first, &mut out).unwrap();
        p.feed(second, &mut out).unwrap();
        p.feed(b"\n\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(p.carry.capacity() >= 8 * 1024);
        p.shrink(1024);
        assert!(p.carry.capacity() <= 1024, "{}", p.carry.capacity());
        assert!(p.data.capacity() <= 1024, "{}", p.data.capacity());
        // A pending line survives a shrink whole.
        let pending = format!("data: {}", "y".repeat(4 * 1024));
        p.feed(pending.as_bytes(), &mut out).unwrap();
        p.shrink(1024);
        p.feed(b"\n\n", &mut out).unwrap();
        assert_eq!(out[1].data, "y".repeat(4 * 1024));
    }

    #[test]
    fn lf_crlf_and_cr_terminate_lines() {
        let want = vec![ev(Some("a"), "1"), ev(None, "2")];
        assert_eq!(parse(b"event: a\ndata: 1\n\ndata: 2\n\n"), want);
        assert_eq!(parse(b"event: a\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n"), want);
        assert_eq!(parse(b"event: a\rdata: 1\r\rdata: 2\r\r"), want);
        assert_eq!(parse(b"event: a\r\ndata: 1\r\n\ndata: 2\r\r\n"), want);
    }

    #[test]
    fn crlf_split_across_feeds_is_one_terminator() {
        // If the CR and the LF were two terminators, the LF would be an empty line dispatching
        // "1" early and "2" would become a separate event.
        let (events, pending, _) = parse_chunks(&[b"data: 1\r", b"\ndata: 2\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![ev(None, "1\n2")]);
        assert!(!pending);
        // A lone CR at a chunk end followed by something else is still a terminator.
        let (events, _, _) = parse_chunks(&[b"data: 1\r", b"\r"]);
        assert_eq!(events, vec![ev(None, "1")]);
        // Empty chunks in between do not lose the pending CR.
        let (events, _, _) = parse_chunks(&[b"data: 1\r", b"", b"\ndata: 2\n\n"]);
        assert_eq!(events, vec![ev(None, "1\n2")]);
    }

    #[test]
    fn leading_bom_is_skipped_once() {
        assert_eq!(parse(b"\xEF\xBB\xBFdata: x\n\n"), vec![ev(None, "x")]);
        // Split across feeds.
        let (events, _, _) = parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: x\n\n"]);
        assert_eq!(events, vec![ev(None, "x")]);
        // Only one BOM is stripped: a second one makes the field name unknown.
        assert_eq!(
            parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n"),
            vec![ev(None, "y")]
        );
        // A BOM later in the stream is not special either.
        assert_eq!(
            parse(b"data: a\n\n\xEF\xBB\xBFdata: b\n\ndata: c\n\n"),
            vec![ev(None, "a"), ev(None, "c")]
        );
        // A partial BOM prefix that turns out not to be one is kept as data bytes (lossy).
        let (events, _, _) = parse_chunks(&[b"\xEF", b"\xBBx: 1\ndata: ok\n\n"]);
        assert_eq!(events, vec![ev(None, "ok")]);
    }

    #[test]
    fn comments_are_counted_and_ignored() {
        let (events, pending, comments) =
            parse_chunks(&[b": ping\r\n\r\n: ping\r\ndata: x\r\n:\r\n\r\n: ping - 2026\r\n\r\n"]);
        assert_eq!(events, vec![ev(None, "x")]);
        assert_eq!(comments, 4);
        assert!(!pending);
    }

    #[test]
    fn multi_line_data_joins_with_lf() {
        assert_eq!(
            parse(b"data: a\ndata:b\ndata:  c\ndata\ndata: \n\n"),
            vec![ev(None, "a\nb\n c\n\n")]
        );
        // A single empty data line dispatches an event with empty data.
        assert_eq!(parse(b"data\n\n"), vec![ev(None, "")]);
        assert_eq!(parse(b"data:\n\n"), vec![ev(None, "")]);
    }

    #[test]
    fn event_id_and_retry_fields() {
        let events =
            parse(b"event: plan\nid: 7\nretry: 3000\ndata: x\n\ndata: y\n\nid\ndata: z\n\n");
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: Some("plan".into()),
                    data: "x".into(),
                    id: Some("7".into()),
                    retry: Some(3000),
                },
                // The last event ID persists; event type and retry are per frame.
                SseEvent {
                    event: None,
                    data: "y".into(),
                    id: Some("7".into()),
                    retry: None,
                },
                // An empty id field resets it.
                ev(None, "z"),
            ]
        );
        // id containing NUL is ignored; retry must be all digits.
        let events = parse(b"id: 1\n\nid: a\0b\nretry: 12a\nretry: -1\nretry: +1\nretry:  1\nretry:\nretry: 99999999999999999999\ndata: x\n\n");
        assert_eq!(
            events,
            vec![SseEvent {
                event: None,
                data: "x".into(),
                id: Some("1".into()),
                retry: None,
            }]
        );
        // A valid retry is kept when an invalid one follows.
        assert_eq!(parse(b"retry: 5\nretry: x\ndata: x\n\n")[0].retry, Some(5));
        // Only one leading space is stripped; unknown fields are ignored; the last event wins.
        assert_eq!(
            parse(b"event:  two\nevent: three\nfoo: bar\nDATA: no\ndata:x\n\n"),
            vec![ev(Some("three"), "x")]
        );
        // An empty event field means the default type.
        assert_eq!(parse(b"event:\ndata: x\n\n"), vec![ev(None, "x")]);
    }

    #[test]
    fn field_without_colon_has_empty_value() {
        assert_eq!(parse(b"data\ndata\n\n"), vec![ev(None, "\n")]);
        assert_eq!(parse(b"event\ndata: x\n\n"), vec![ev(None, "x")]);
        assert_eq!(parse(b"retry\ndata: x\n\n"), vec![ev(None, "x")]);
    }

    #[test]
    fn frame_without_data_dispatches_nothing_but_resets() {
        // The event name of a data-less frame does not leak into the next frame.
        assert_eq!(parse(b"event: a\n\ndata: x\n\n"), vec![ev(None, "x")]);
        assert_eq!(parse(b"\n\n\n\n"), vec![]);
    }

    #[test]
    fn unterminated_last_event_is_discarded_and_reported() {
        let (events, pending, _) = parse_chunks(&[b"data: a\n\ndata: b\n"]);
        assert_eq!(events, vec![ev(None, "a")]);
        assert!(pending);
        let (events, pending, _) = parse_chunks(&[b"data: a\n\ndata: [DO"]);
        assert_eq!(events, vec![ev(None, "a")]);
        assert!(pending);
        let (_, pending, _) = parse_chunks(&[b"data: a\n\n"]);
        assert!(!pending);
        let (_, pending, _) = parse_chunks(&[b"data: a\r\n\r"]);
        assert!(!pending, "a trailing CR is a complete terminator");
        let (_, pending, _) = parse_chunks(&[b""]);
        assert!(!pending);
        // finish() resets the parser for another stream.
        let mut p = SseParser::new(MAX);
        let mut out = Vec::new();
        p.feed(b"id: 9\nevent: x\ndata: partial", &mut out).unwrap();
        assert!(p.finish());
        assert!(!p.finish());
        p.feed(b"data: new\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "new")]);
    }

    #[test]
    fn frame_limit_bounds_events_and_endless_lines() {
        let limit = 4096;
        let mut p = SseParser::new(limit);
        let mut out = Vec::new();
        // Events up to the limit pass, many times over.
        let line = format!("data: {}\n\n", "x".repeat(1000));
        for _ in 0..100 {
            p.feed(line.as_bytes(), &mut out).unwrap();
        }
        assert_eq!(out.len(), 100);

        // Many short data lines accumulate past the limit.
        let mut p = SseParser::new(limit);
        let err = (0..1000)
            .map(|_| p.feed(b"data: 0123456789\n", &mut out))
            .find_map(Result::err)
            .expect("limit not enforced on accumulated lines");
        assert_eq!(err, SseError::FrameTooLarge { limit });

        // An endless line without newline is bounded too, and the parser stays poisoned.
        let mut p = SseParser::new(limit);
        let chunk = [b'a'; 1024];
        let mut fed = 0;
        let err = loop {
            match p.feed(&chunk, &mut out) {
                Ok(()) => fed += chunk.len(),
                Err(e) => break e,
            }
            assert!(fed <= limit, "accepted {fed} bytes of a single line");
        };
        assert_eq!(err, SseError::FrameTooLarge { limit });
        assert_eq!(
            p.feed(b"\n\ndata: ok\n\n", &mut out),
            Err(SseError::FrameTooLarge { limit })
        );
        assert!(p.finish());

        // The limit also applies to a huge complete line inside one chunk.
        let mut p = SseParser::new(limit);
        let big = format!("data: ok\n\ndata: {}\n\n", "y".repeat(limit));
        let mut out = Vec::new();
        assert!(p.feed(big.as_bytes(), &mut out).is_err());
        assert_eq!(out, vec![ev(None, "ok")]);
    }

    #[test]
    fn invalid_utf8_is_decoded_lossily() {
        let (events, _, _) = parse_chunks(&[b"event: \xFF\xFE\ndata: a\xC3\nid: \x80\n", b"\n"]);
        assert_eq!(
            events,
            vec![SseEvent {
                event: Some("\u{FFFD}\u{FFFD}".into()),
                data: "a\u{FFFD}".into(),
                id: Some("\u{FFFD}".into()),
                retry: None,
            }]
        );
        // Arbitrary garbage never panics.
        let garbage: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for size in [1, 3, 7, 64, 5000] {
            let mut p = SseParser::new(MAX);
            let mut out = Vec::new();
            for c in garbage.chunks(size) {
                p.feed(c, &mut out).unwrap();
            }
            p.finish();
        }
    }

    #[test]
    fn cjk_split_mid_character() {
        let stream = "event: text\ndata: 你好，世界🌏\n\n".as_bytes();
        let whole = parse(stream);
        assert_eq!(whole, vec![ev(Some("text"), "你好，世界🌏")]);
        for cut in 0..=stream.len() {
            let (events, pending, _) = parse_chunks(&[&stream[..cut], &stream[cut..]]);
            assert_eq!(events, whole, "cut at {cut}");
            assert!(!pending);
        }
        let singles: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_chunks(&singles).0, whole);
    }

    #[test]
    fn write_event_uses_lf_only() {
        let mut out = Vec::new();
        write_event(&mut out, Some("message"), "{\"a\":1}");
        assert_eq!(out, b"event: message\ndata: {\"a\":1}\n\n");
        out.clear();
        write_event(&mut out, None, "a\r\nb\rc\nd");
        assert_eq!(out, b"data: a\ndata: b\ndata: c\ndata: d\n\n");
        out.clear();
        write_event(&mut out, None, "");
        assert_eq!(out, b"data: \n\n");
        out.clear();
        write_event(&mut out, Some("x\r\ny"), "z\n");
        assert_eq!(out, b"event: xy\ndata: z\ndata: \n\n");
        assert_eq!(parse(&out), vec![ev(Some("xy"), "z\n")]);
    }

    #[derive(Debug, Clone)]
    struct Stream {
        events: Vec<(Option<String>, String)>,
        bytes: Vec<u8>,
        comments: u64,
    }

    /// Events written with `write_event`, each LF replaced by a random terminator, random comment
    /// lines in between, optionally behind a BOM.
    fn stream() -> impl Strategy<Value = Stream> {
        let event = (
            proptest::option::of("[a-z_:. ]{1,10}"),
            "[a-z :{}\"\\\\\n\u{4f60}\u{597d}\u{1F30F}\u{00e9}]{0,24}",
        );
        (
            proptest::collection::vec(event, 0..6),
            proptest::collection::vec((0u8..3, proptest::option::weighted(0.2, "[ a-z]{0,8}")), 64),
            any::<bool>(),
        )
            .prop_map(|(events, choices, bom)| {
                let mut written = Vec::new();
                for (name, data) in &events {
                    write_event(&mut written, name.as_deref(), data);
                }
                let mut bytes = Vec::new();
                if bom {
                    bytes.extend_from_slice(&BOM);
                }
                let mut comments = 0;
                let mut prev_cr = false;
                let mut lines = written.split(|&b| b == b'\n').collect::<Vec<_>>();
                lines.pop(); // after the final terminator
                for (i, line) in lines.into_iter().enumerate() {
                    let (sep, comment) = &choices[i % choices.len()];
                    if let Some(text) = comment {
                        bytes.extend_from_slice(b":");
                        bytes.extend_from_slice(text.as_bytes());
                        bytes.push(b'\n');
                        comments += 1;
                        prev_cr = false;
                    }
                    bytes.extend_from_slice(line);
                    // After a bare CR, an empty line ended by LF would merge into a CRLF.
                    let sep = if prev_cr && line.is_empty() && *sep == 0 {
                        1
                    } else {
                        *sep
                    };
                    bytes.extend_from_slice([&b"\n"[..], b"\r\n", b"\r"][sep as usize]);
                    prev_cr = sep == 2;
                }
                Stream {
                    events,
                    bytes,
                    comments,
                }
            })
    }

    proptest! {
        #[test]
        fn line_end_search_matches_naive(bytes in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>(), Just(0x8a), Just(0x0c)],
            0..64,
        ), start in 0usize..64) {
            let bytes = &bytes[start.min(bytes.len())..];
            let naive = bytes.iter().position(|&b| b == b'\n' || b == b'\r');
            prop_assert_eq!(find_line_end(bytes), naive);
            let no_breaks: Vec<u8> = bytes.iter().map(|&b| if b == b'\n' || b == b'\r' { b'x' } else { b }).collect();
            prop_assert_eq!(find_line_end(&no_breaks), None);
        }

        #[test]
        fn any_chunking_round_trips(s in stream(), cuts in proptest::collection::vec(1usize..40, 1..20)) {
            let expected: Vec<SseEvent> = s
                .events
                .iter()
                .map(|(name, data)| ev(name.as_deref(), data))
                .collect();
            let (whole, pending, comments) = parse_chunks(&[&s.bytes]);
            prop_assert_eq!(&whole, &expected);
            prop_assert!(!pending);
            prop_assert_eq!(comments, s.comments);

            for cut in 0..=s.bytes.len() {
                let (events, pending, comments) = parse_chunks(&[&s.bytes[..cut], &s.bytes[cut..]]);
                prop_assert_eq!(&events, &whole, "cut at {}", cut);
                prop_assert!(!pending);
                prop_assert_eq!(comments, s.comments);
            }

            let singles: Vec<&[u8]> = s.bytes.chunks(1).collect();
            prop_assert_eq!(&parse_chunks(&singles).0, &whole);

            let mut chunks = Vec::new();
            let mut rest = &s.bytes[..];
            for n in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (a, b) = rest.split_at((*n).min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            let (events, pending, _) = parse_chunks(&chunks);
            prop_assert_eq!(&events, &whole);
            prop_assert!(!pending);
        }
    }
}
