//! The rescue inside an open stream (`runtime.pre_content = "stream"`), without I/O: the request
//! legacy is sent when the runtime fails before content after the client's head went out, what
//! of legacy's answer can be relayed, and legacy's events written again for the client.
//!
//! Legacy speaks the client's protocol (Agent2UI over SSE), so its answer continues the stream
//! the client already reads: its frames are parsed (`core::sse`) and each one is written again
//! whole, LF only, never passed on as byte cuts of legacy's body.

use crate::core::forwarded::{is_forwarded, Forwarded};
use crate::core::passthrough::hop_by_hop;
use crate::core::sse::SseEvent;

/// The `error` event's code when legacy cannot take over a stream: it answered anything but a
/// 2xx `text/event-stream`, fell silent, or its answer broke off before its `done`.
pub const FALLBACK_FAILED: &str = "FALLBACK_FAILED";

/// A request header, as the client sent it.
pub type HeaderPair<'a> = (&'a [u8], &'a [u8]);

/// The request legacy is sent for a rescue, head and body in one buffer: the client's method,
/// target and body, with the headers legacy would get through Pingora's proxy (hop-by-hop ones
/// and those `Connection` names removed, the proxy credentials and the trusted org header
/// dropped, the proxy's `X-Forwarded-*` last), without `Accept-Encoding` (a compressed answer
/// could not be read event by event), framed by its length.
pub fn legacy_request(
    method: &str,
    target: &str,
    headers: &[HeaderPair],
    trusted: Option<&str>,
    forwarded: &Forwarded,
    body: &[u8],
) -> Vec<u8> {
    let connection_named: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for &(name, value) in headers {
        let dropped = [
            "proxy-authorization",
            "proxy-authenticate",
            "accept-encoding",
            "content-length",
            "transfer-encoding",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()));
        if dropped
            || hop_by_hop(name, &connection_named)
            || is_forwarded(name)
            || trusted.is_some_and(|t| name.eq_ignore_ascii_case(t.as_bytes()))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    forwarded.write_lines(&mut out);
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// Whether legacy's answer can continue the client's stream: a 2xx `text/event-stream` whose
/// body is not compressed. `Err`: why not, for the client's `error` event.
pub fn relayable(
    status: u16,
    content_type: Option<&[u8]>,
    content_encoding: Option<&[u8]>,
) -> Result<(), String> {
    if !(200..300).contains(&status) {
        return Err(format!("legacy answered {status} to the rescued request"));
    }
    let media = content_type
        .and_then(|v| v.split(|b| *b == b';').next())
        .map(<[u8]>::trim_ascii)
        .unwrap_or_default();
    if !media.eq_ignore_ascii_case(b"text/event-stream") {
        return Err(format!(
            "legacy answered {} instead of an event stream",
            String::from_utf8_lossy(content_type.unwrap_or(b"no content type"))
        ));
    }
    match content_encoding.map(<[u8]>::trim_ascii) {
        None | Some(b"") => Ok(()),
        Some(c) if c.eq_ignore_ascii_case(b"identity") => Ok(()),
        Some(c) => Err(format!(
            "legacy answered a {}-encoded stream",
            String::from_utf8_lossy(c)
        )),
    }
}

/// Legacy's `done`: its answer is whole, and the stream ends with it.
pub fn is_done(ev: &SseEvent) -> bool {
    ev.event.as_deref() == Some("done")
}

/// One of legacy's events written again for the client: its type, then its data a line at a
/// time, LF only. An event with no data is not dispatched by a browser: nothing is written.
pub fn write_event(ev: &SseEvent, out: &mut Vec<u8>) {
    if ev.data.is_empty() {
        return;
    }
    out.reserve(ev.data.len() + 32);
    if let Some(kind) = ev.event.as_deref() {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.push(b'\n');
    }
    for line in ev.data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::core::sse::SseParser;

    fn forwarded() -> Forwarded {
        Forwarded {
            for_: Some("203.0.113.9".into()),
            proto: "http".into(),
            host: Some("chat.example".into()),
        }
    }

    fn request(headers: &[(&str, &str)], trusted: Option<&str>) -> String {
        let pairs: Vec<HeaderPair> = headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        let bytes = legacy_request(
            "POST",
            "/api/v1/chat/sessions/s1?x=1",
            &pairs,
            trusted,
            &forwarded(),
            br#"{"message":"hi"}"#,
        );
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn legacy_gets_the_callers_request_as_pingora_would_forward_it() {
        let req = request(
            &[
                ("Host", "chat.example"),
                ("Authorization", "Bearer t"),
                ("Connection", "keep-alive, x-secret"),
                ("X-Secret", "hop"),
                ("Keep-Alive", "timeout=5"),
                ("Accept-Encoding", "gzip, br"),
                ("X-Forwarded-For", "10.9.9.9"),
                ("X-Org-Id", "org-b"),
                ("Proxy-Authorization", "Basic x"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "999"),
                ("X-Request-ID", "r-1"),
            ],
            Some("x-org-id"),
        );
        assert_eq!(
            req,
            "POST /api/v1/chat/sessions/s1?x=1 HTTP/1.1\r\n\
             Host: chat.example\r\n\
             Authorization: Bearer t\r\n\
             X-Request-ID: r-1\r\n\
             x-forwarded-for: 203.0.113.9\r\n\
             x-forwarded-proto: http\r\n\
             x-forwarded-host: chat.example\r\n\
             content-length: 16\r\n\r\n\
             {\"message\":\"hi\"}"
        );
        // Without the setting the org header is an ordinary one.
        assert!(request(&[("X-Org-Id", "org-b")], None).contains("X-Org-Id: org-b\r\n"));
    }

    #[test]
    fn only_a_plain_2xx_event_stream_continues_the_stream() {
        let sse = Some(&b"text/event-stream; charset=utf-8"[..]);
        assert_eq!(relayable(200, sse, None), Ok(()));
        assert_eq!(relayable(200, sse, Some(b"identity")), Ok(()));
        assert!(relayable(502, sse, None).unwrap_err().contains("502"));
        assert!(relayable(429, sse, None).is_err());
        let json = relayable(200, Some(b"application/json"), None).unwrap_err();
        assert!(json.contains("application/json"), "{json}");
        assert!(relayable(200, None, None).is_err());
        assert!(relayable(200, sse, Some(b"gzip"))
            .unwrap_err()
            .contains("gzip"));
    }

    fn parse(bytes: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut parser = SseParser::new(64 * 1024);
        let mut events = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&bytes.len()]) {
            let cut = cut.clamp(at, bytes.len());
            parser.feed(&bytes[at..cut], &mut events).unwrap();
            at = cut;
        }
        parser.finish();
        events
    }

    const LEGACY: &str = "event: message\r\ndata: {\"id\":\"m0\",\"type\":\"text\",\"data\":{\"content\":\"Hi\"}}\r\n\r\n\
                          : a comment\n\
                          event: message\ndata: {\"id\":\"m1\",\n\
                          data: \"type\":\"text\"}\n\n\
                          event: done\rdata: {\"executionMode\":\"direct_llm\"}\r\r";

    #[test]
    fn legacy_events_are_written_whole_with_lf_only() {
        let mut out = Vec::new();
        let events = parse(LEGACY.as_bytes(), &[]);
        for ev in &events {
            write_event(ev, &mut out);
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: message\ndata: {\"id\":\"m0\",\"type\":\"text\",\"data\":{\"content\":\"Hi\"}}\n\n\
             event: message\ndata: {\"id\":\"m1\",\ndata: \"type\":\"text\"}\n\n\
             event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n"
        );
        assert!(is_done(events.last().unwrap()));
        assert!(!is_done(&events[0]));
    }

    proptest! {
        /// However legacy's body is cut, the client gets the same events, each whole.
        #[test]
        fn any_cut_gives_the_same_events(mut cuts in proptest::collection::vec(0..LEGACY.len(), 0..6)) {
            cuts.sort_unstable();
            let whole = parse(LEGACY.as_bytes(), &[]);
            let cut = parse(LEGACY.as_bytes(), &cuts);
            prop_assert_eq!(whole, cut);
        }
    }
}
