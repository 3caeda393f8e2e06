//! The front door's strict reading of a client's HTTP/1 request head, before Pingora sees it.
//!
//! Pingora 0.9 accepts heads that an upstream may read differently (two `Content-Length`
//! lines, `Content-Length: 5, 5`, HTTP/1.1 without `Host`, control bytes in the target, which it
//! re-escapes): each is a way to make the proxy and the upstream disagree on where a request
//! ends. Here such a head is refused with the status nginx answers, and the one message framing
//! the proxy hands on is decided once (`Framing`). An absolute-form target is rewritten to
//! origin-form with the authority as `Host` (RFC 9112 §3.2.2), so routing only ever sees paths.

/// Most header lines in a head: Pingora's own limit (256), less the three `X-Forwarded-*`
/// lines added to each head it is handed (`core::passthrough::with_forwarded`).
pub const MAX_HEADERS: usize = 256 - 3;

/// Room for a head's header lines, left uninitialised for httparse's `*_with_uninit_headers`:
/// it writes what it parses, and writing 256 blank headers first cost more than parsing a
/// small head (about 1,200 instructions, three times per passthrough request).
pub fn header_slots<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [std::mem::MaybeUninit::uninit(); MAX_HEADERS]
}

/// How the request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A complete, valid head at the start of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Empty lines before the request line (RFC 9112 §2.2 lets a server skip them): dropped.
    pub skip: usize,
    /// Length of the head after `skip`, final CRLF included.
    pub len: usize,
    pub framing: Framing,
    /// The head to hand on instead of the client's bytes, when its target was rewritten.
    pub rewritten: Option<Vec<u8>>,
}

/// A head refused with `status`; `reason` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Refusal {
    const fn bad(reason: &'static str) -> Refusal {
        Refusal {
            status: 400,
            reason,
        }
    }
}

/// Every refusal reason of the front door (head, chunked body, connection), for the metric.
pub const REASONS: &[&str] = &[
    "header_too_large",
    "too_many_headers",
    "malformed",
    "target",
    "host",
    "content_length",
    "transfer_encoding",
    "unknown_transfer_coding",
    "chunk_size",
    "chunk_extension",
    "chunk_framing",
    "chunk_trailer",
    "header_timeout",
    "max_connections",
];

/// The response that goes with a refusal: nothing of the request was forwarded, and the
/// connection is closed after it.
pub fn refusal_response(status: u16) -> &'static [u8] {
    match status {
        408 => b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        431 => b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        501 => b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        503 => b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        _ => b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    }
}

/// Read the head at the start of `buf`: `Ok(None)` while it is incomplete and below
/// `max_header_bytes`; the caller stops reading at that size.
pub fn parse(buf: &[u8], max_header_bytes: usize) -> Result<Option<Head>, Refusal> {
    let mut skip = 0;
    while buf[skip..].starts_with(b"\r\n") {
        skip += 2;
    }
    let rest = &buf[skip..];
    // httparse also ends lines at a bare LF; an upstream may not, so neither do we.
    let Some(len) = head_end(rest)? else {
        if buf.len() >= max_header_bytes {
            return Err(Refusal {
                status: 431,
                reason: "header_too_large",
            });
        }
        return Ok(None);
    };
    if skip + len > max_header_bytes {
        return Err(Refusal {
            status: 431,
            reason: "header_too_large",
        });
    }
    let mut slots = header_slots();
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(&rest[..len], &mut slots) {
        Ok(httparse::Status::Complete(n)) if n == len => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: 431,
                reason: "too_many_headers",
            })
        }
        _ => return Err(Refusal::bad("malformed")),
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::bad("malformed"));
    };
    let target = Target::parse(method, target.as_bytes())?;

    let (mut host, mut length, mut coding) = (None, None, None);
    let (mut hosts, mut lengths, mut codings) = (0, 0, 0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            coding = Some(h.value);
        }
    }
    // RFC 9112 §3.2: exactly one Host on HTTP/1.1, never two.
    if hosts > 1 || (version == 1 && hosts == 0) {
        return Err(Refusal::bad("host"));
    }
    // httparse leaves trailing whitespace on a value; it is not part of it (RFC 9110 §5.5).
    let (length, coding, host) = (
        length.map(<[u8]>::trim_ascii),
        coding.map(<[u8]>::trim_ascii),
        host.map(<[u8]>::trim_ascii),
    );
    if let Some(h) = host {
        if !is_host(h) {
            return Err(Refusal::bad("host"));
        }
    }
    let framing = match (lengths, codings) {
        (0, 0) => Framing::None,
        (1, 0) => Framing::Length(content_length(length.unwrap_or_default())?),
        (0, 1) if version == 1 => transfer_coding(coding.unwrap_or_default())?,
        (0, _) => return Err(Refusal::bad("transfer_encoding")),
        (_, 0) => return Err(Refusal::bad("content_length")),
        _ => return Err(Refusal::bad("transfer_encoding")),
    };
    let rewritten = match target {
        Target::Kept => None,
        Target::Absolute { authority, path } => {
            Some(rebuild(method, &path, version, authority, req.headers))
        }
    };
    Ok(Some(Head {
        skip,
        len,
        framing,
        rewritten,
    }))
}

/// Whether bytes from `from` on can change `parse`'s answer below the size limit: they end the
/// head or break a line end. Lets a reader trickled a byte at a time scan each byte about once
/// instead of parsing the whole buffer again per read.
pub fn worth_parsing(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(3);
    // The usual case, a whole head in one read, without a search.
    if buf.len() >= start + 4 && buf.ends_with(b"\r\n\r\n") {
        return true;
    }
    let new = &buf[start..];
    if new.windows(4).any(|w| w == b"\r\n\r\n") {
        return true;
    }
    (start.max(1)..buf.len()).any(|i| {
        (buf[i] == b'\n' && buf[i - 1] != b'\r') || (buf[i - 1] == b'\r' && buf[i] != b'\n')
    }) || buf.first() == Some(&b'\n')
}

/// Where the head ends (after its CRLFCRLF), refusing bare LFs and lone CRs on the way.
fn head_end(buf: &[u8]) -> Result<Option<usize>, Refusal> {
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            b'\n' => return Err(Refusal::bad("malformed")),
            b'\r' => match buf.get(i + 1) {
                None => return Ok(None),
                Some(b'\n') => {
                    if buf[i + 2..].starts_with(b"\r\n") {
                        return Ok(Some(i + 4));
                    }
                    i += 2;
                }
                Some(_) => return Err(Refusal::bad("malformed")),
            },
            _ => i += 1,
        }
    }
    Ok(None)
}

enum Target<'a> {
    /// Origin-form, asterisk-form (OPTIONS) or authority-form (CONNECT): handed on as is.
    Kept,
    /// Absolute-form: handed on as `path` with `authority` as Host.
    Absolute { authority: &'a str, path: String },
}

impl<'a> Target<'a> {
    fn parse(method: &str, target: &'a [u8]) -> Result<Target<'a>, Refusal> {
        // Visible ASCII only: no controls, spaces or bytes Pingora would re-escape.
        // Nor a fragment.
        if target.is_empty()
            || !target
                .iter()
                .all(|&b| (0x21..=0x7E).contains(&b) && b != b'#')
        {
            return Err(Refusal::bad("target"));
        }
        let text = std::str::from_utf8(target).map_err(|_| Refusal::bad("target"))?;
        if method == "CONNECT" {
            return if is_host(text.as_bytes()) && text.contains(':') {
                Ok(Target::Kept)
            } else {
                Err(Refusal::bad("target"))
            };
        }
        if text.starts_with('/') {
            return Ok(Target::Kept);
        }
        if text == "*" && method == "OPTIONS" {
            return Ok(Target::Kept);
        }
        let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
        let after_scheme = if lower.starts_with("http://") {
            &text[7..]
        } else if lower.starts_with("https://") {
            &text[8..]
        } else {
            return Err(Refusal::bad("target"));
        };
        let end = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
        let (authority, rest) = after_scheme.split_at(end);
        if authority.is_empty() || !is_host(authority.as_bytes()) {
            return Err(Refusal::bad("target"));
        }
        let path = match rest.as_bytes().first() {
            None => "/".to_string(),
            Some(b'?') => format!("/{rest}"),
            _ => rest.to_string(),
        };
        Ok(Target::Absolute { authority, path })
    }
}

/// The bytes a `Host` may hold (a reg-name, an IP literal, a port), as a table: each byte
/// looked up once instead of searched for in a list of punctuation.
const HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let punctuation = b"-._~!$&'()*+,;=:[]%";
    let mut i = 0;
    while i < punctuation.len() {
        table[punctuation[i] as usize] = true;
        i += 1;
    }
    table
};

/// `uri-host [":" port]`: reg-name, IPv4 or an IP literal in brackets; never userinfo.
fn is_host(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|&b| HOST_BYTES[b as usize])
}

fn content_length(value: &[u8]) -> Result<u64, Refusal> {
    // One value of digits: a list (`5, 5`), a sign or whitespace is refused.
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::bad("content_length"));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(Refusal::bad("content_length"))
}

fn transfer_coding(value: &[u8]) -> Result<Framing, Refusal> {
    if value.eq_ignore_ascii_case(b"chunked") {
        return Ok(Framing::Chunked);
    }
    // A well-formed list of codings other than a lone `chunked` is one we do not implement.
    let codings = value
        .split(|&b| b == b',')
        .map(|c| c.trim_ascii())
        .collect::<Vec<_>>();
    let tokens = codings.iter().all(|c| {
        !c.is_empty()
            && c.iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    });
    if tokens {
        Err(Refusal {
            status: 501,
            reason: "unknown_transfer_coding",
        })
    } else {
        Err(Refusal::bad("transfer_encoding"))
    }
}

fn rebuild(
    method: &str,
    path: &str,
    version: u8,
    authority: &str,
    headers: &[httparse::Header<'_>],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        format!("{method} {path} HTTP/1.{version}\r\nHost: {authority}\r\n").as_bytes(),
    );
    for h in headers
        .iter()
        .filter(|h| !h.name.eq_ignore_ascii_case("host"))
    {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 32 * 1024;

    #[test]
    fn a_host_is_letters_digits_and_the_uri_s_host_punctuation() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b);
            assert_eq!(is_host(&[b]), expected, "{}", [b].escape_ascii());
        }
        assert!(is_host(b"[::1]:8080") && is_host(b"app.example.com"));
        assert!(!is_host(b"") && !is_host(b"a b") && !is_host(b"a/b"));
    }

    fn ok(head: &[u8]) -> Head {
        match parse(head, MAX) {
            Ok(Some(h)) => h,
            other => panic!("{}: {other:?}", head.escape_ascii()),
        }
    }

    fn refused(head: &[u8]) -> Refusal {
        match parse(head, MAX) {
            Err(r) => r,
            other => panic!("{}: {other:?}", head.escape_ascii()),
        }
    }

    #[test]
    fn valid_heads_are_read_with_their_framing() {
        let h = ok(b"GET /x HTTP/1.1\r\nHost: e\r\n\r\n");
        assert_eq!(
            (h.skip, h.len, h.framing, h.rewritten),
            (0, 28, Framing::None, None)
        );
        let h = ok(b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!((h.len, h.framing), (48, Framing::Length(5)));
        let h = ok(b"POST /x HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        let h = ok(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n");
        assert_eq!((h.skip, h.len), (4, 18));
        ok(b"OPTIONS * HTTP/1.1\r\nHost: e\r\n\r\n");
        ok(b"CONNECT e:443 HTTP/1.1\r\nHost: e:443\r\n\r\n");
        ok(b"GET /a?b=%20c&d=[1] HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
        let h = ok(b"POST / HTTP/1.1\r\nHost: e \r\nContent-Length: 5 \r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        let h = ok(b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\t\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
    }

    #[test]
    fn an_incomplete_head_waits_until_it_reaches_the_limit() {
        let head = b"GET /x HTTP/1.1\r\nHost: e\r\n\r\n";
        for end in 0..head.len() {
            assert_eq!(parse(&head[..end], MAX), Ok(None), "{end}");
        }
        let mut big = b"GET /x HTTP/1.1\r\nHost: e\r\nX-Big: ".to_vec();
        big.resize(MAX, b'a');
        assert_eq!(refused(&big).status, 431);
        assert_eq!(parse(&big[..MAX - 1], MAX), Ok(None));
        let mut whole = b"GET /x HTTP/1.1\r\nHost: e\r\nX-Big: ".to_vec();
        whole.resize(MAX - 2, b'a');
        whole.extend_from_slice(b"\r\n\r\n");
        assert_eq!(refused(&whole).reason, "header_too_large");
        let mut many = b"GET /x HTTP/1.1\r\nHost: e\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            refused(&many),
            Refusal {
                status: 431,
                reason: "too_many_headers"
            }
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases: &[(&[u8], u16, &str)] = &[
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400, "content_length"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 5, 5\r\n\r\n", 400, "content_length"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: +5\r\n\r\n", 400, "content_length"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 0x5\r\n\r\n", 400, "content_length"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length:\r\n\r\n", 400, "content_length"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 99999999999999999999\r\n\r\n", 400, "content_length"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "transfer_encoding"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "transfer_encoding"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501, "unknown_transfer_coding"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "unknown_transfer_coding"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "unknown_transfer_coding"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked;q=1\r\n\r\n", 400, "transfer_encoding"),
            (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", 400, "transfer_encoding"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "transfer_encoding"),
        ];
        for (head, status, reason) in cases {
            assert_eq!(
                refused(head),
                Refusal {
                    status: *status,
                    reason
                },
                "{}",
                head.escape_ascii()
            );
        }
    }

    #[test]
    fn host_is_required_once_and_well_formed() {
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n",
        ] {
            assert_eq!(
                refused(head),
                Refusal::bad("host"),
                "{}",
                head.escape_ascii()
            );
        }
        ok(b"GET / HTTP/1.0\r\n\r\n");
    }

    #[test]
    fn hostile_targets_and_line_ends_are_refused() {
        for (head, reason) in [
            (&b"GET /a\x01b HTTP/1.1\r\nHost: e\r\n\r\n"[..], "malformed"),
            (b"GET /a\x7fb HTTP/1.1\r\nHost: e\r\n\r\n", "malformed"),
            (b"GET /a b HTTP/1.1\r\nHost: e\r\n\r\n", "malformed"),
            (b"GET /a\tb HTTP/1.1\r\nHost: e\r\n\r\n", "malformed"),
            (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET a HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET /a#b HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET * HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET ftp://e/ HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET http://u@e/ HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET http:///x HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"CONNECT /x HTTP/1.1\r\nHost: e\r\n\r\n", "target"),
            (b"GET / HTTP/1.1\nHost: e\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\nHost: e\n\n", "malformed"),
            (b"GET / HTTP/1.1\r\nHost: e\r\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\n Host: e\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\nHost : e\r\n\r\n", "malformed"),
            (
                b"GET / HTTP/1.1\r\nHost: e\r\nX: a\r\n b\r\n\r\n",
                "malformed",
            ),
            (b"GET / HTTP/2.0\r\nHost: e\r\n\r\n", "malformed"),
            (b"GET  / HTTP/1.1\r\nHost: e\r\n\r\n", "malformed"),
        ] {
            assert_eq!(
                refused(head),
                Refusal::bad(reason),
                "{}",
                head.escape_ascii()
            );
        }
    }

    #[test]
    fn an_absolute_form_target_becomes_origin_form_with_its_authority_as_host() {
        let h = ok(b"POST http://Legacy:8080/api/chat?x=1 HTTP/1.1\r\nHost: other\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(
            String::from_utf8(h.rewritten.unwrap()).unwrap(),
            "POST /api/chat?x=1 HTTP/1.1\r\nHost: Legacy:8080\r\nContent-Length: 2\r\n\r\n"
        );
        let h = ok(b"GET HTTPS://e?q HTTP/1.1\r\nHost: e\r\n\r\n");
        assert_eq!(h.rewritten.unwrap(), b"GET /?q HTTP/1.1\r\nHost: e\r\n\r\n");
        let h = ok(b"GET http://e HTTP/1.0\r\n\r\n");
        assert_eq!(h.rewritten.unwrap(), b"GET / HTTP/1.0\r\nHost: e\r\n\r\n");
        // The rewritten head is itself a valid origin-form head.
        let again = ok(&ok(b"GET http://e/a HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n")
            .rewritten
            .unwrap());
        assert_eq!(again.rewritten, None);
    }

    #[test]
    fn worth_parsing_flags_the_end_of_a_head_and_broken_line_ends() {
        let head = b"GET / HTTP/1.1\r\nHost: e\r\n\r\n";
        for end in 0..head.len() {
            assert!(!worth_parsing(&head[..end], 0), "{end}");
        }
        for from in 0..head.len() {
            assert!(worth_parsing(head, from), "{from}");
        }
        assert!(worth_parsing(b"GET / HTTP/1.1\nH", 10));
        assert!(worth_parsing(b"GET / HTTP/1.1\rH", 10));
        assert!(worth_parsing(b"\n", 0));
    }

    proptest! {
        #[test]
        fn any_prefix_of_a_valid_head_waits_and_the_whole_is_accepted(
            path in "/[a-zA-Z0-9/._~%-]{0,40}",
            headers in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,30}"), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut head = format!("POST {path} HTTP/1.1\r\nHost: e\r\n");
            for (n, v) in &headers {
                if ["host", "content-length", "transfer-encoding"].contains(&n.to_ascii_lowercase().as_str()) {
                    continue;
                }
                head.push_str(&format!("{n}: {}\r\n", v.trim()));
            }
            head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let mut input = head.clone().into_bytes();
            input.extend_from_slice(&body);
            for end in 0..head.len() {
                prop_assert_eq!(parse(&input[..end], MAX), Ok(None));
            }
            let h = parse(&input, MAX).unwrap().unwrap();
            prop_assert_eq!(h.len, head.len());
            prop_assert_eq!(h.framing, Framing::Length(body.len() as u64));
        }

        #[test]
        fn a_control_byte_anywhere_in_the_target_is_refused(
            pre in "/[a-z]{0,10}", post in "[a-z]{0,10}", ctl in prop::sample::select((0u8..0x21).chain([0x7f]).collect::<Vec<_>>()),
        ) {
            let mut head = format!("GET {pre}").into_bytes();
            head.push(ctl);
            head.extend_from_slice(format!("{post} HTTP/1.1\r\nHost: e\r\n\r\n").as_bytes());
            prop_assert!(parse(&head, MAX).is_err());
        }
    }
}
