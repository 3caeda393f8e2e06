//! The lean passthrough's head rules (`server.lean_passthrough`): which requests the front door
//! forwards to legacy itself, the request head legacy gets, and the response head the client
//! gets. Both heads go on as received, line by line, minus hop-by-hop headers (and, to legacy,
//! the trusted org header), so legacy and the client see what they would through Pingora's proxy.
//! Legacy's head is read by `core::h1::parse_head`, as every upstream's is.

use crate::core::files::ROUTE_PREFIX;
use std::mem::MaybeUninit;

use crate::core::forwarded::{is_forwarded, Forwarded, Hop, Received};
use crate::core::h1::tokens;
use crate::core::request_head::{header_slots, Framing, Head};
use crate::core::routing::{chat_route, ChatRoute};

fn named(name: &[u8], token: &str) -> bool {
    name.eq_ignore_ascii_case(token.as_bytes())
}

/// Hop-by-hop: the fixed ones and those a `Connection` header names (RFC 9110 §7.6.1).
pub fn hop_by_hop(name: &[u8], connection_named: &[&[u8]]) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| named(name, h))
        || connection_named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
}

/// The header lines of a head (after its start line, before the empty line), as received: each
/// line's name (up to its first `:`) and the whole line.
pub fn header_lines(head: &[u8]) -> (usize, HeaderLines<'_>) {
    // httparse takes a bare LF for a line end in a response; the empty lines are the head's end.
    let start = memchr::memchr(b'\n', head).map_or(head.len(), |i| i + 1);
    (
        start,
        HeaderLines {
            rest: &head[start..],
        },
    )
}

/// See [`header_lines`]. Lines are found with `memchr`: heads are read twice or three times
/// per passthrough request, and a byte at a time that was a tenth of its instructions.
pub struct HeaderLines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for HeaderLines<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.rest.is_empty() {
            let (line, rest) = match memchr::memchr(b'\n', self.rest) {
                Some(end) => (&self.rest[..end], &self.rest[end + 1..]),
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            // Names are short: a plain search beats a vectorised one's set-up.
            let name = line
                .iter()
                .position(|b| *b == b':')
                .map_or(line, |colon| &line[..colon]);
            return Some((name, line));
        }
        None
    }
}

/// `Connection` tokens of a head: whether it said `close`, `keep-alive`, and what else it named.
struct Connection<'a> {
    close: bool,
    keep_alive: bool,
    named: Vec<&'a [u8]>,
}

fn connection<'a>(lines: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Connection<'a> {
    let mut c = Connection {
        close: false,
        keep_alive: false,
        named: Vec::new(),
    };
    for (name, line) in lines {
        if !named(name, "connection") {
            continue;
        }
        for t in tokens(line.get(name.len() + 1..).unwrap_or_default()) {
            if t.eq_ignore_ascii_case(b"close") {
                c.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                c.keep_alive = true;
            } else {
                c.named.push(t);
            }
        }
    }
    c
}

impl Connection<'_> {
    /// Whether the client lets the connection stay open after this request.
    fn keeps_alive(&self, http11: bool) -> bool {
        !self.close && (http11 || self.keep_alive)
    }
}

/// The client's own head at the front of `buf`, parsed into `headers`; `None` when the front
/// door rewrote it (its target) or it does not parse whole.
fn origin_request<'h, 'b>(
    buf: &'b [u8],
    head: &Head,
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Option<(&'b [u8], httparse::Request<'h, 'b>)> {
    if head.rewritten.is_some() {
        return None;
    }
    let bytes = &buf[head.skip..head.skip + head.len];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(_)) = req.parse_with_uninit_headers(bytes, headers) else {
        return None;
    };
    Some((bytes, req))
}

/// What the `X-Forwarded-*` lines add to a head, beyond a `Host` and a caller's own chain.
const FORWARDED_ROOM: usize = 160;

/// A request the lean path takes, its head as legacy gets it.
pub struct Request {
    pub upstream_head: Vec<u8>,
    pub head_only: bool,
    /// The client lets the connection stay open after this request.
    pub keep_alive: bool,
    /// The client speaks HTTP/1.1 (so can be sent a chunked body).
    pub http11: bool,
    pub framing: Framing,
}

/// The lean form of the head at the front of `buf`, if the lean path may take it. `hop`: where
/// it came from, for the `X-Forwarded-*` headers legacy gets (`core::forwarded`), written last
/// as Pingora's path writes them.
pub fn prepare(
    buf: &[u8],
    head: &Head,
    trusted: Option<&http::HeaderName>,
    hop: Hop,
) -> Option<Request> {
    let mut headers = header_slots();
    let (bytes, req) = origin_request(buf, head, &mut headers)?;
    let (method, path, version) = (req.method?, req.path?, req.version?);
    if method == "CONNECT" || path.starts_with(ROUTE_PREFIX) {
        return None;
    }
    let method_name = http::Method::from_bytes(method.as_bytes()).ok()?;
    if chat_route(&method_name, path).is_some() {
        return None;
    }
    if req
        .headers
        .iter()
        .any(|h| named(h.name.as_bytes(), "upgrade") || named(h.name.as_bytes(), "expect"))
    {
        return None;
    }
    let (start, lines) = header_lines(bytes);
    let conn = connection(header_lines(bytes).1);
    // Dropping a header the client names in `Connection` must not drop the request's framing
    // (legacy would read the body as the next request) or its `Host`: Pingora re-frames those.
    if conn.named.iter().any(|n| {
        ["content-length", "transfer-encoding", "host"]
            .iter()
            .any(|h| named(n, h))
    }) {
        return None;
    }
    // Room for the forwarded headers too (their names, the peer's address, the Host again):
    // the head is written without growing.
    let mut out = Vec::with_capacity(bytes.len() + FORWARDED_ROOM);
    if version == 0 {
        // As Pingora does: legacy is asked in HTTP/1.1, so the pooled connection stays open.
        let line = &bytes[..start];
        let at = line.len() - b"1.0\r\n".len();
        out.extend_from_slice(&line[..at]);
        out.extend_from_slice(b"1.1\r\n");
    } else {
        out.extend_from_slice(&bytes[..start]);
    }
    let mut received = Received::default();
    // Pingora frames a chunked body after the request filters: its `Transfer-Encoding` comes
    // last, after the forwarded headers.
    let mut chunked = None;
    for (name, line) in lines {
        received.see(name, line.get(name.len() + 1..).unwrap_or_default());
        match fate(name, &conn.named, trusted) {
            Fate::Kept => {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
            Fate::Reframed => chunked = Some(line),
            Fate::Dropped | Fate::Replaced => {}
        }
    }
    Forwarded::write(hop, &received, &mut out);
    if let Some(line) = chunked {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(Request {
        upstream_head: out,
        head_only: method == "HEAD",
        keep_alive: conn.keeps_alive(version == 1),
        http11: version == 1,
        framing: head.framing,
    })
}

/// What becomes of a client's header line on its way to legacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Sent on as it came.
    Kept,
    /// Hop-by-hop (the fixed ones and those `Connection` names), the proxy credentials (this
    /// hop's; Pingora drops them too) and the trusted org header: not sent.
    Dropped,
    /// `Transfer-Encoding`: Pingora frames the body again after the request filters, so it
    /// comes last, after the forwarded headers.
    Reframed,
    /// A client's `X-Forwarded-*`: the proxy's are sent instead (`core::forwarded`).
    Replaced,
}

fn fate(name: &[u8], connection_named: &[&[u8]], trusted: Option<&http::HeaderName>) -> Fate {
    if is_forwarded(name) {
        Fate::Replaced
    } else if hop_by_hop(name, connection_named)
        || named(name, "proxy-authorization")
        || named(name, "proxy-authenticate")
        || trusted.is_some_and(|t| named(name, t.as_str()))
    {
        Fate::Dropped
    } else if named(name, "transfer-encoding") {
        Fate::Reframed
    } else {
        Fate::Kept
    }
}

/// The head the front door hands Pingora for `head` (a client's, whole): the client's
/// `X-Forwarded-*` lines replaced by the proxy's (those the lean path writes), and the lines
/// Pingora or its filters will drop or frame again moved after them.
///
/// Pingora reads the proxy's lines as the request's own and builds its header maps at their
/// size; three headers added to its parsed request would grow both maps (values, and names as
/// sent) up to three times each, and parse and hash each name again. What is removed from
/// those maps leaves the slot to the last entry, so lines that are removed must come last for
/// the rest to keep their order: legacy gets the lines the lean path sends, in its order.
pub fn with_forwarded(head: &[u8], hop: Hop, trusted: Option<&http::HeaderName>) -> Vec<u8> {
    // Most heads' `Connection` names no header to drop: one pass over their lines then, a
    // second for one that does.
    handed(head, hop, trusted, &[]).unwrap_or_else(|| {
        let conn = connection(header_lines(head).1);
        handed(head, hop, trusted, &conn.named).expect("every header it names is known")
    })
}

/// [`with_forwarded`], knowing the headers `Connection` names; `None` if it names another.
fn handed(
    head: &[u8],
    hop: Hop,
    trusted: Option<&http::HeaderName>,
    connection_named: &[&[u8]],
) -> Option<Vec<u8>> {
    let (start, lines) = header_lines(head);
    let mut out = Vec::with_capacity(head.len() + FORWARDED_ROOM);
    out.extend_from_slice(&head[..start]);
    let mut received = Received::default();
    let mut last = false;
    for (name, line) in lines {
        received.see(name, line.get(name.len() + 1..).unwrap_or_default());
        if named(name, "connection")
            && connection([(name, line)].into_iter())
                .named
                .iter()
                .any(|t| !connection_named.iter().any(|n| n.eq_ignore_ascii_case(t)))
        {
            return None;
        }
        match fate(name, connection_named, trusted) {
            Fate::Kept => {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
            Fate::Dropped | Fate::Reframed => last = true,
            Fate::Replaced => {}
        }
    }
    Forwarded::write(hop, &received, &mut out);
    if last {
        for (name, line) in header_lines(head).1 {
            if matches!(
                fate(name, connection_named, trusted),
                Fate::Dropped | Fate::Reframed
            ) {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// A chat request the front door serves itself (`server.lean_runtime`): its head, parsed once.
#[derive(Debug)]
pub struct ChatHead {
    pub route: ChatRoute,
    pub path: String,
    pub version: http::Version,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub keep_alive: bool,
    /// The body's length: the whole body is read before the runtime is asked.
    pub body_len: usize,
}

/// The chat head at the front of `buf`, if the front door may serve it without Pingora: a chat
/// route with a `Content-Length` body of at most `max_body` bytes (the most legacy can be sent
/// again), no `Expect` or `Upgrade`, in origin form. Anything else (chunked bodies, `100-continue`,
/// heads the front door rewrote) goes through Pingora, which serves it the same way.
pub fn chat_head(buf: &[u8], head: &Head, max_body: usize) -> Option<ChatHead> {
    let Framing::Length(len) = head.framing else {
        return None;
    };
    let body_len = usize::try_from(len).ok().filter(|n| *n <= max_body)?;
    let mut parsed = header_slots();
    let (bytes, req) = origin_request(buf, head, &mut parsed)?;
    let (method, path, version) = (req.method?, req.path?, req.version?);
    let route = chat_route(&http::Method::from_bytes(method.as_bytes()).ok()?, path)?;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if named(name, "upgrade") || named(name, "expect") {
            return None;
        }
        let name = http::HeaderName::from_bytes(name).ok()?;
        headers.push((name, http::HeaderValue::from_bytes(h.value).ok()?));
    }
    Some(ChatHead {
        route,
        path: path.to_string(),
        version: if version == 1 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        },
        headers,
        keep_alive: connection(header_lines(bytes).1).keeps_alive(version == 1),
        body_len,
    })
}

/// The response head the client gets: legacy's, minus hop-by-hop headers, with Pingora's
/// `Connection` header; `rechunk`: a close-delimited body goes on chunked, as Pingora sends it
/// to keep the client connection.
pub fn client_head(head: &[u8], keep: bool, rechunk: bool, out: &mut Vec<u8>) {
    // Empty lines before the status line are read past (`h1::parse_head`) and not sent on, as
    // Pingora writes only the status line: the first line is the status line.
    let empty = head
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let head = &head[empty..];
    // Ours may be a little longer than legacy's.
    out.reserve(head.len() + 64);
    let (start, lines) = header_lines(head);
    let conn = connection(header_lines(head).1);
    out.extend_from_slice(&head[..start]);
    let ours: &[u8] = if keep {
        b"Connection: keep-alive\r\n"
    } else {
        b"Connection: close\r\n"
    };
    // Where legacy's was, as Pingora writes it, else last.
    let mut written = false;
    for (name, line) in lines {
        if named(name, "connection") && !written {
            out.extend_from_slice(ours);
            written = true;
        } else if !hop_by_hop(name, &conn.named) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    if rechunk {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !written {
        out.extend_from_slice(ours);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request_head;

    fn lean(raw: &[u8], trusted: Option<&str>) -> Option<Request> {
        lean_from(raw, trusted, Hop::default())
    }

    fn lean_from(raw: &[u8], trusted: Option<&str>, hop: Hop) -> Option<Request> {
        let head = request_head::parse(raw, 32 * 1024).unwrap().unwrap();
        let trusted = trusted.map(|t| http::HeaderName::from_bytes(t.as_bytes()).unwrap());
        prepare(raw, &head, trusted.as_ref(), hop)
    }

    fn chat(raw: &[u8]) -> Option<ChatHead> {
        let head = request_head::parse(raw, 32 * 1024).unwrap().unwrap();
        chat_head(raw, &head, 64)
    }

    #[test]
    fn the_front_door_takes_chats_with_a_bounded_length_and_nothing_to_negotiate() {
        let c = chat(b"POST /api/v1/chat/sessions/s-1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Length: 64\r\n\r\n").unwrap();
        assert_eq!(c.route, ChatRoute::Session("s-1".into()));
        assert_eq!(
            (c.body_len, c.keep_alive, c.version),
            (64, true, http::Version::HTTP_11)
        );
        assert_eq!(c.headers.len(), 3);
        assert_eq!(c.headers[1].1, "Bearer t");
        let c = chat(b"POST /api/v1/chat/start HTTP/1.0\r\nContent-Length: 2\r\n\r\n").unwrap();
        assert_eq!((c.route, c.keep_alive), (ChatRoute::Start, false));
        let c = chat(b"POST /api/v1/chat/start HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n").unwrap();
        assert!(c.keep_alive);
        let c = chat(b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nConnection: x, close\r\nContent-Length: 2\r\n\r\n").unwrap();
        assert!(!c.keep_alive);
        for raw in [
            // Over the limit, chunked, no body, something to negotiate, not a chat.
            &b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nContent-Length: 65\r\n\r\n"[..],
            b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n",
            b"POST http://a/api/v1/chat/start HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n",
            b"GET /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n",
            b"POST /api/v1/agents HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n",
        ] {
            assert!(chat(raw).is_none(), "{}", raw.escape_ascii());
        }
    }

    #[test]
    fn chat_file_upgrade_expect_connect_and_absolute_targets_stay_with_pingora() {
        for raw in [
            &b"POST /api/v1/chat/start HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"[..],
            b"POST /api/v1/chat/sessions/s-1?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /api/v1/runtime/files/f-1?sig=x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(lean(raw, None).is_none(), "{}", raw.escape_ascii());
        }
        for raw in [
            &b"GET /api/v1/chat/sessions/s-1 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"POST /api/v1/chat/started HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(lean(raw, None).is_some(), "{}", raw.escape_ascii());
        }
    }

    #[test]
    fn a_connection_naming_the_framing_or_the_host_stays_with_pingora() {
        for raw in [
            &b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 1\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close, transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: HOST\r\n\r\n",
        ] {
            assert!(lean(raw, None).is_none(), "{}", String::from_utf8_lossy(raw));
        }
        assert!(lean(
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: x-hostname\r\n\r\n",
            None
        )
        .is_some());
    }

    #[test]
    fn the_head_goes_on_as_received_without_hop_by_hop_and_trusted_headers() {
        let raw = b"GET /x?a=%20 HTTP/1.1\r\nHost: a\r\nX-Org-Id: org-a\r\nx-org-id: org-b\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nTrailer: x\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nX-Keep:  a  b\r\n\r\n";
        let req = lean(raw, Some("x-org-id")).unwrap();
        assert_eq!(
            String::from_utf8(req.upstream_head).unwrap(),
            "GET /x?a=%20 HTTP/1.1\r\nHost: a\r\nX-Keep:  a  b\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\n"
        );
        assert!(!req.keep_alive);
        let req = lean(b"GET / HTTP/1.1\r\nHost: a\r\nX-Org-Id: o\r\n\r\n", None).unwrap();
        assert!(req.keep_alive);
        assert!(String::from_utf8(req.upstream_head)
            .unwrap()
            .contains("X-Org-Id: o\r\n"));
    }

    #[test]
    fn the_forwarded_headers_are_the_proxy_s_own_unless_a_trusted_hop_sent_them() {
        let raw = b"GET /x HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nHost: api\r\nx-forwarded-proto: https\r\nX-A: 1\r\nX-Forwarded-For: 5.6.7.8\r\nX-Forwarded-Host: front\r\n\r\n";
        let peer = Some("10.0.0.9".parse().unwrap());
        let direct = Hop {
            peer,
            trusted: false,
        };
        let req = lean_from(raw, None, direct).unwrap();
        assert_eq!(
            String::from_utf8(req.upstream_head).unwrap(),
            "GET /x HTTP/1.1\r\nHost: api\r\nX-A: 1\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: api\r\n\r\n"
        );
        let hop = Hop {
            peer,
            trusted: true,
        };
        let req = lean_from(raw, None, hop).unwrap();
        assert_eq!(
            String::from_utf8(req.upstream_head).unwrap(),
            "GET /x HTTP/1.1\r\nHost: api\r\nX-A: 1\r\n\
             x-forwarded-for: 1.2.3.4, 5.6.7.8, 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: front\r\n\r\n"
        );
    }

    #[test]
    fn http_1_0_keeps_alive_only_when_asked_and_legacy_is_asked_in_http_1_1() {
        let req = lean(b"GET / HTTP/1.0\r\n\r\n", None).unwrap();
        assert!(!req.keep_alive);
        assert_eq!(
            req.upstream_head,
            b"GET / HTTP/1.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let req = lean(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", None).unwrap();
        assert!(req.keep_alive);
    }

    #[test]
    fn the_client_gets_legacys_head_without_hop_by_hop_and_with_pingoras_connection() {
        let mut out = Vec::new();
        client_head(
            b"HTTP/1.1 200 Fine\r\nX-B: 1\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
            true,
            false,
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nX-B: 1\r\nConnection: keep-alive\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
        );
        let mut out = Vec::new();
        client_head(b"HTTP/1.1 204 No Content\r\n\r\n", false, false, &mut out);
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        client_head(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", true, true, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        );
        // Empty lines before the status line are not sent on, and the status line is never
        // taken for a header, not even one its Connection names (found by fuzzing).
        let mut out = Vec::new();
        client_head(
            b"\n\r\nHTTP/1.1 200\r\nConnection: HTTP/1.1 200\r\n\r\n",
            true,
            false,
            &mut out,
        );
        assert_eq!(out, b"HTTP/1.1 200\r\nConnection: keep-alive\r\n\r\n");
    }

    #[test]
    fn the_head_handed_on_has_the_proxy_s_forwarded_lines_last() {
        let peer = |ip: &str, trusted: bool| Hop {
            peer: Some(ip.parse().unwrap()),
            trusted,
        };
        let plain = b"GET /a HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            String::from_utf8(with_forwarded(plain, peer("10.1.2.3", false), None)).unwrap(),
            "GET /a HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: app.test\r\n\r\n"
        );
        // A client's own are dropped, wherever they were; a trusted hop's are carried on.
        let sent = b"GET /a HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nHost: app.test\r\n\
                     X-Forwarded-Proto: https\r\nAccept: */*\r\nX-Forwarded-Host: evil.test\r\n\r\n";
        assert_eq!(
            String::from_utf8(with_forwarded(sent, peer("10.1.2.3", false), None)).unwrap(),
            "GET /a HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: app.test\r\n\r\n"
        );
        assert_eq!(
            String::from_utf8(with_forwarded(sent, peer("10.1.2.3", true), None)).unwrap(),
            "GET /a HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\n\
             x-forwarded-for: 1.1.1.1, 10.1.2.3\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: evil.test\r\n\r\n"
        );
        // What Pingora drops or frames again goes last, so that its removal reorders nothing.
        let hop_by_hop = b"POST /a HTTP/1.1\r\nHost: app.test\r\nConnection: close, X-Secret\r\n\
                           X-Secret: 1\r\nTransfer-Encoding: chunked\r\nX-Org: o\r\nAccept: */*\r\n\r\n";
        let org = http::HeaderName::from_static("x-org");
        assert_eq!(
            String::from_utf8(with_forwarded(hop_by_hop, peer("10.1.2.3", false), Some(&org)))
                .unwrap(),
            "POST /a HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: app.test\r\nConnection: close, X-Secret\r\n\
             X-Secret: 1\r\nTransfer-Encoding: chunked\r\nX-Org: o\r\n\r\n"
        );
        // Bare LF line ends come out as CRLF; no Host, no X-Forwarded-Host.
        assert_eq!(
            String::from_utf8(with_forwarded(
                b"GET / HTTP/1.0\nAccept: x\n\n",
                Hop::default(),
                None
            ))
            .unwrap(),
            "GET / HTTP/1.0\nAccept: x\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    proptest::proptest! {
        #[test]
        fn header_lines_split_a_head_as_a_byte_by_byte_split_does(
            head in proptest::collection::vec(
                proptest::sample::select(b"ab:: \r\n\n\n".to_vec()), 0..80),
        ) {
            let start = head.iter().position(|b| *b == b'\n').map_or(head.len(), |i| i + 1);
            let expected: Vec<(&[u8], &[u8])> = head[start..]
                .split(|b| *b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .filter(|l| !l.is_empty())
                .map(|l| (l.split(|b| *b == b':').next().unwrap_or(l), l))
                .collect();
            let (got_start, lines) = header_lines(&head);
            proptest::prop_assert_eq!(got_start, start);
            proptest::prop_assert_eq!(lines.collect::<Vec<_>>(), expected);
        }

        /// What Pingora reads from the head it is handed is what it used to send legacy after
        /// taking the client's head: every other header as it came, in order, then the three
        /// that [`Forwarded::of`] gives for the hop.
        #[test]
        fn the_handed_head_carries_what_forwarded_of_gives(
            headers in proptest::collection::vec((
                proptest::sample::select(vec![
                    "Host", "Accept", "X-Forwarded-For", "x-forwarded-proto",
                    "X-Forwarded-Host", "X-Other",
                ]),
                "[a-z0-9.,: ]{0,12}",
            ), 0..8),
            trusted in proptest::bool::ANY,
            peer in proptest::option::of(proptest::sample::select(vec!["10.0.0.1", "::1"])),
        ) {
            let mut raw = b"GET /x HTTP/1.1\r\n".to_vec();
            for (name, value) in &headers {
                raw.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            let hop = Hop { peer: peer.map(|p| p.parse().unwrap()), trusted };
            let handed = with_forwarded(&raw, hop, None);

            let mut parsed = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut parsed);
            proptest::prop_assert!(req.parse(&handed).unwrap().is_complete());
            let got: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();

            let mut received = Received::default();
            for (name, value) in &headers {
                received.see(name.as_bytes(), value.as_bytes());
            }
            let mut expected: Vec<(String, String)> = headers
                .iter()
                .filter(|(n, _)| !is_forwarded(n.as_bytes()))
                .map(|(n, v)| (n.to_string(), v.trim().to_string()))
                .collect();
            expected.extend(
                Forwarded::of(hop, &received)
                    .headers()
                    .map(|(n, v)| (n.to_string(), v.to_string())),
            );
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
