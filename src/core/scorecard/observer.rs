//! A read-only observer of an Agent2UI stream: the legacy answer going to the client, or what a
//! shadow copy would have sent, measured the same way from bytes cut anywhere.

use std::time::Duration;

use serde::Deserialize;

/// Largest SSE frame whose data an observer keeps to read; a larger one is counted, not kept.
pub const OBSERVED_FRAME_BYTES: usize = 64 * 1024;

/// The longest `event:` name an observer keeps; longer names match no event it looks for.
const MAX_EVENT_NAME: usize = 32;

/// Watches an Agent2UI stream (`event: message` with `{"type":"text","data":{"content"}}`,
/// `error`, `done`) go by: when its first event ended, whether it ended with `done` and had no
/// `error` on the way, and how many characters of text it carried.
///
/// It only reads what it is shown: the caller forwards the bytes as they are. Lines end in LF
/// (a CR before it is dropped), which is how both the legacy API and the proxy's own Agent2UI
/// writer end them. Memory is bounded: a frame over [`OBSERVED_FRAME_BYTES`] still counts as an
/// event (its name is kept) but its data is not, and it is counted in `oversized`.
#[derive(Debug, Default)]
pub struct StreamObserver {
    line: Vec<u8>,
    line_over: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    frame_over: bool,
    in_frame: bool,
    frame_bytes: usize,
    pub first_event: Option<Duration>,
    /// When the first event other than `thinking` and heartbeats ended: what a user sees as the
    /// answer starting (and where the runtime path commits).
    pub first_content: Option<Duration>,
    pub events: u64,
    pub saw_error: bool,
    /// The last event seen was `done`.
    pub ended_done: bool,
    pub text_chars: u64,
    pub oversized: u64,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    data: Option<Content>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    content: Option<String>,
}

impl StreamObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Look at the next bytes of the stream, `at` since the request started.
    pub fn feed(&mut self, bytes: &[u8], at: Duration) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.push_line_bytes(&rest[..i]);
            self.end_line(at);
            rest = &rest[i + 1..];
        }
        self.push_line_bytes(rest);
    }

    /// Whether the stream ended as a success: `done` last, no `error` on the way.
    pub fn succeeded(&self) -> bool {
        self.ended_done && !self.saw_error
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.line_over {
            return;
        }
        if self.line.len() + bytes.len() > OBSERVED_FRAME_BYTES {
            self.line_over = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, at: Duration) {
        let over = std::mem::take(&mut self.line_over);
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() && !over {
            if self.in_frame {
                self.dispatch(at);
            }
            self.line = line;
            return;
        }
        if line.first() != Some(&b':') || over {
            self.in_frame = true;
        }
        if over {
            // Only a data line can be this long in a stream worth reading: its frame is counted.
            self.frame_over = true;
            self.data.clear();
        } else if line.first() != Some(&b':') {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &b""[..]),
            };
            match field {
                b"event" => {
                    self.event.clear();
                    if value.len() <= MAX_EVENT_NAME {
                        self.event.extend_from_slice(value);
                    }
                }
                b"data" if !self.frame_over => {
                    self.frame_bytes += value.len() + 1;
                    if self.frame_bytes > OBSERVED_FRAME_BYTES {
                        self.frame_over = true;
                        self.data.clear();
                    } else {
                        if !self.data.is_empty() {
                            self.data.push(b'\n');
                        }
                        self.data.extend_from_slice(value);
                    }
                }
                _ => {}
            }
        }
        line.clear();
        self.line = line;
    }

    fn dispatch(&mut self, at: Duration) {
        self.events += 1;
        self.first_event.get_or_insert(at);
        let name: &[u8] = if self.event.is_empty() {
            b"message"
        } else {
            &self.event
        };
        self.ended_done = name == b"done";
        let mut content = !matches!(name, b"heartbeat" | b"ping");
        match name {
            b"error" => self.saw_error = true,
            b"message" if self.frame_over => self.oversized += 1,
            b"message" => {
                if let Ok(m) = serde_json::from_slice::<Message>(&self.data) {
                    content = m.kind != "thinking";
                    if m.kind == "text" {
                        let chars = m
                            .data
                            .and_then(|d| d.content)
                            .map_or(0, |c| c.chars().count());
                        self.text_chars += chars as u64;
                    }
                }
            }
            _ if self.frame_over => self.oversized += 1,
            _ => {}
        }
        if content {
            self.first_content.get_or_insert(at);
        }
        self.event.clear();
        self.data.clear();
        self.frame_over = false;
        self.in_frame = false;
        self.frame_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn text(content: &str) -> String {
        format!(
            "event: message\ndata: {}\n\n",
            serde_json::json!({"id": "m", "type": "text", "data": {"content": content}})
        )
    }

    const DONE: &str = "event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n";
    const ERROR: &str = "event: error\ndata: {\"code\":\"LLM\",\"message\":\"no\"}\n\n";

    fn observe(chunks: &[&[u8]]) -> StreamObserver {
        let mut o = StreamObserver::new();
        for (i, c) in chunks.iter().enumerate() {
            o.feed(c, MS * (i as u32 + 1));
        }
        o
    }

    #[test]
    fn a_legacy_answer_is_measured() {
        let stream = format!("{}{}{DONE}", text("Legacy"), text(" 你好"));
        let o = observe(&[stream.as_bytes()]);
        assert_eq!(o.events, 3);
        assert_eq!(o.first_event, Some(MS));
        assert_eq!(o.text_chars, 9, "characters, not bytes");
        assert!(o.succeeded());
    }

    #[test]
    fn first_content_skips_thinking_and_heartbeats() {
        let thinking = serde_json::json!({"id": "t", "type": "thinking", "data": {"content": "…"}});
        let o = observe(&[
            format!("event: message\ndata: {thinking}\n\n").as_bytes(),
            b"event: heartbeat\ndata: null\n\n: ping\n\n",
            text("a").as_bytes(),
            DONE.as_bytes(),
        ]);
        assert_eq!(o.first_event, Some(MS));
        assert_eq!(o.first_content, Some(MS * 3));
        let plan = "event: message\ndata: {\"type\":\"plan\",\"data\":{\"steps\":[]}}\n\n";
        assert_eq!(
            observe(&[plan.as_bytes()]).first_content,
            Some(MS),
            "a plan is content"
        );
        assert_eq!(
            observe(&[ERROR.as_bytes()]).first_content,
            Some(MS),
            "so is an error"
        );
    }

    #[test]
    fn an_error_on_the_way_fails_even_when_done_follows() {
        let stream = format!("{}{ERROR}{DONE}", text("x"));
        let o = observe(&[stream.as_bytes()]);
        assert!(o.saw_error && o.ended_done);
        assert!(!o.succeeded());
        assert!(!observe(&[text("cut short").as_bytes()]).succeeded());
        assert!(!observe(&[]).succeeded());
    }

    #[test]
    fn first_event_is_when_its_frame_ended() {
        let t = text("a");
        let (head, tail) = t.as_bytes().split_at(t.len() - 1);
        let o = observe(&[head, tail]);
        assert_eq!(o.first_event, Some(MS * 2));
    }

    #[test]
    fn crlf_lines_comments_and_default_event_names() {
        let o = observe(&[
            b": ping\r\n\r\ndata: {\"type\":\"text\",\"data\":{\"content\":\"abc\"}}\r\n\r\nevent: done\r\ndata: {}\r\n\r\n",
        ]);
        assert_eq!(o.events, 2, "a comment alone is no event");
        assert_eq!(o.text_chars, 3);
        assert!(o.succeeded());
    }

    #[test]
    fn an_oversized_frame_is_counted_not_kept_and_the_stream_goes_on() {
        let big = "x".repeat(OBSERVED_FRAME_BYTES * 2);
        let huge = text(&big);
        let mut o = StreamObserver::new();
        for piece in huge.as_bytes().chunks(1000) {
            o.feed(piece, MS);
            assert!(o.line.len() <= OBSERVED_FRAME_BYTES && o.data.len() <= OBSERVED_FRAME_BYTES);
        }
        o.feed(text("ok").as_bytes(), MS);
        o.feed(DONE.as_bytes(), MS);
        assert_eq!(o.oversized, 1);
        assert_eq!(o.events, 3);
        assert_eq!(o.text_chars, 2);
        assert!(o.succeeded());
    }

    #[test]
    fn many_data_lines_over_the_limit_are_counted_too() {
        let line = format!("data: {}\n", "y".repeat(1000));
        let mut o = StreamObserver::new();
        o.feed(b"event: message\n", MS);
        for _ in 0..(OBSERVED_FRAME_BYTES / 1000 + 5) {
            o.feed(line.as_bytes(), MS);
        }
        assert!(o.data.len() <= OBSERVED_FRAME_BYTES);
        o.feed(b"\n", MS);
        assert_eq!((o.events, o.oversized), (1, 1));
    }

    proptest! {
        #[test]
        fn any_cut_of_a_stream_is_observed_the_same(
            words in proptest::collection::vec("[a-zé你 ]{0,12}", 0..6),
            error in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let mut stream = String::new();
            for w in &words {
                stream.push_str(&text(w));
            }
            if error {
                stream.push_str(ERROR);
            }
            stream.push_str(DONE);
            let whole = observe(&[stream.as_bytes()]);
            let bytes = stream.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.sort_unstable();
            let mut o = StreamObserver::new();
            let mut from = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                o.feed(&bytes[from..p], MS);
                from = p;
            }
            let chars: usize = words.iter().map(|w| w.chars().count()).sum();
            prop_assert_eq!(o.text_chars, chars as u64);
            prop_assert_eq!(o.events, whole.events);
            prop_assert_eq!(o.succeeded(), !error);
            prop_assert_eq!(o.events as usize, words.len() + usize::from(error) + 1);
        }
    }
}
