//! The HTTP/1.1 client side of every upstream call, without I/O: the request bytes, the one
//! reading of a response head, and the response body's framing (chunked, length or
//! close-delimited), for the runtime's streams, its files, the bridge's calls and the lean
//! passthrough alike (`upstream` is their one client).
//!
//! Upstream connections are read by their callers rather than through Pingora's client session,
//! whose 64 KiB body buffer per connection and reader task per stream dominated the memory of
//! held streams. The decoder hands payload out as slices of the caller's buffer, so nothing is
//! copied between the socket and the SSE parser.

use std::fmt;

/// A response head larger than this is refused.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A chunk-size line (size, extensions, CRLF) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Trailer bytes after the last chunk beyond this are refused.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// Room for a response's header lines, left uninitialised for httparse (see
/// `request_head::header_slots`).
fn header_slots<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [std::mem::MaybeUninit::uninit(); MAX_HEADERS]
}

/// Encode a request: head and body in one buffer, so it leaves in one write.
pub fn encode_request(method: &str, path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let head_len: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(method.len() + path.len() + head_len + body.len() + 32);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    /// Until the runtime closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// The connection can carry another request once this body is read to its end.
    pub keep_alive: bool,
    /// Bytes of the buffer the head took.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    Invalid(String),
    TooLarge,
    BadContentLength,
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Invalid(e) => write!(f, "invalid response head: {e}"),
            HeadError::TooLarge => write!(f, "response head larger than {MAX_HEAD_BYTES} bytes"),
            HeadError::BadContentLength => write!(f, "invalid or conflicting Content-Length"),
        }
    }
}

/// Parse a response head from the start of `buf`; `Ok(None)` while it is incomplete.
/// `request_was_head`: the request was a `HEAD`, so no body follows whatever the head says.
///
/// The one reading of a response head for every upstream client, framed by RFC 9112 §6.3:
/// - a `Transfer-Encoding` overrides any `Content-Length` (which is then ignored, though still
///   checked): the body is chunked when `chunked` is its last coding, else it runs to the close;
/// - a `Content-Length` is `1*DIGIT` (no sign, no inner space); repeated, the values must agree;
/// - a head that says neither is close-delimited (allowed for a response);
/// - `HEAD`, 1xx, 204 and 304 have no body.
pub fn parse_head(buf: &[u8], request_was_head: bool) -> Result<Option<Head>, HeadError> {
    let mut headers = header_slots();
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Invalid(e.to_string())),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let mut coded = false;
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding frames the body (RFC 9112 §6.1); empty list elements are
            // ignored (RFC 9110 §5.6.1).
            coded = true;
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = content_length(h.value).ok_or(HeadError::BadContentLength)?;
            if length.is_some_and(|l| l != v) {
                return Err(HeadError::BadContentLength);
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let framing = if request_was_head || status == 204 || status == 304 || status / 100 == 1 {
        Framing::Length(0)
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    let keep_alive =
        framing != Framing::Close && !close && (http11 || keep_alive_token) && status != 101;
    Ok(Some(Head {
        status,
        framing,
        keep_alive,
        len,
    }))
}

/// A `Content-Length` value: `1*DIGIT` between optional whitespace.
fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The value of the first header called `name` in a complete response head, if any.
pub fn header_value<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut headers = header_slots();
    let mut resp = httparse::Response::new(&mut []);
    httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, head, &mut headers)
        .ok()?;
    resp.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The elements of a comma-separated header value, trimmed, empty ones left out.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    BadChunk(&'static str),
    /// The connection ended before the body did.
    Truncated,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::BadChunk(why) => write!(f, "invalid chunked body: {why}"),
            BodyError::Truncated => write!(f, "connection closed before the end of the body"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a chunk-size line.
    Size,
    /// Inside a chunk, this many payload bytes to go.
    Data(u64),
    /// After a chunk's payload: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to the empty one; bytes seen so far.
    Trailers(usize),
    /// A length-delimited body, this many bytes to go.
    Length(u64),
    Close,
    Done,
}

/// Decodes a response body incrementally, from whatever pieces the socket delivers.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: State,
}

/// Hand `sink` what `rest` holds of the `n` payload bytes still due: how many it took, and how
/// many are still due after them.
fn pass_on(rest: &[u8], n: u64, sink: &mut impl FnMut(&[u8])) -> (usize, u64) {
    let take = rest.len().min(usize::try_from(n).unwrap_or(usize::MAX));
    sink(&rest[..take]);
    (take, n - take as u64)
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Chunked => State::Size,
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Close => State::Close,
        };
        BodyDecoder { state }
    }

    /// The body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode what `input` holds, handing each piece of payload to `sink` in order. Returns the
    /// bytes consumed; the rest (an incomplete chunk-size line or CRLF) must be offered again
    /// with more bytes after it. Bytes after the end of the body are not consumed.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<usize, BodyError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                State::Done => return Ok(pos),
                _ if rest.is_empty() => return Ok(pos),
                State::Close => {
                    sink(rest);
                    return Ok(input.len());
                }
                State::Length(n) => {
                    let (took, left) = pass_on(rest, n, &mut sink);
                    pos += took;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                }
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        if used > MAX_CHUNK_LINE {
                            return Err(BodyError::BadChunk("chunk-size line too long"));
                        }
                        pos += used;
                        self.state = if size == 0 {
                            State::Trailers(0)
                        } else {
                            State::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_LINE => {
                        return Err(BodyError::BadChunk("chunk-size line too long"))
                    }
                    Ok(httparse::Status::Partial) => return Ok(pos),
                    Err(_) => return Err(BodyError::BadChunk("invalid chunk size")),
                },
                State::Data(n) => {
                    let (took, left) = pass_on(rest, n, &mut sink);
                    pos += took;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        self.state = State::Size;
                    }
                    [b'\n', ..] => {
                        pos += 1;
                        self.state = State::Size;
                    }
                    [b'\r'] => return Ok(pos),
                    _ => return Err(BodyError::BadChunk("missing CRLF after chunk data")),
                },
                State::Trailers(seen) => {
                    let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                        if seen + rest.len() > MAX_TRAILER_BYTES {
                            return Err(BodyError::BadChunk("trailers too large"));
                        }
                        return Ok(pos);
                    };
                    let line = &rest[..nl];
                    pos += nl + 1;
                    let seen = seen + nl + 1;
                    if line.is_empty() || line == b"\r" {
                        self.state = State::Done;
                    } else if seen > MAX_TRAILER_BYTES {
                        return Err(BodyError::BadChunk("trailers too large"));
                    } else {
                        self.state = State::Trailers(seen);
                    }
                }
            }
        }
    }

    /// The connection reached end of file: fine for a close-delimited body, which is now done;
    /// an error for any other body not read to its end.
    pub fn eof(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::Close => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_values_are_found_by_name_in_any_case() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\n\
            content-disposition: attachment; filename=\"a.pdf\"\r\n\r\nbody";
        assert_eq!(
            super::header_value(head, "content-type"),
            Some(&b"application/pdf"[..])
        );
        assert_eq!(
            super::header_value(head, "Content-Disposition"),
            Some(&b"attachment; filename=\"a.pdf\""[..])
        );
        assert_eq!(super::header_value(head, "content-length"), None);
        assert_eq!(super::header_value(b"HTTP/1.1 200", "content-type"), None);
    }

    use super::*;
    use proptest::prelude::*;

    fn head(raw: &str) -> Head {
        parse_head(raw.as_bytes(), false).unwrap().unwrap()
    }

    #[test]
    fn request_is_one_buffer_head_then_body() {
        let req = encode_request(
            "POST",
            "/run",
            &[("host", b"rt:8000"), ("content-length", b"2")],
            b"{}",
        );
        assert_eq!(
            req,
            b"POST /run HTTP/1.1\r\nhost: rt:8000\r\ncontent-length: 2\r\n\r\n{}".to_vec()
        );
    }

    #[test]
    fn framing_follows_the_head() {
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nrest");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
        assert_eq!(
            &"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nrest"[h.len..],
            "rest"
        );
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(12));
        let h = head("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep_alive, "a close-delimited body ends the connection");
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n");
        assert!(!h.keep_alive, "HTTP/1.0 closes unless told otherwise");
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n");
        assert!(h.keep_alive, "HTTP/1.0 asked to keep alive");
        for code in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
            let raw = format!("HTTP/1.1 {code}\r\nContent-Length: 9\r\n\r\n");
            assert_eq!(head(&raw).framing, Framing::Length(0), "{code}");
        }
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked, "chunked wins over a length");
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, \r\n\r\n");
        assert_eq!(
            h.framing,
            Framing::Chunked,
            "an empty list element is ignored"
        );
        let h = head("HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!((h.status, h.framing), (100, Framing::Length(0)));
    }

    /// Where the runtime's and the lean passthrough's parsers disagreed, RFC 9112 decides.
    #[test]
    fn framing_disagreements_are_settled_by_rfc_9112() {
        // §6.3: a Transfer-Encoding overrides a Content-Length; one that does not end in
        // `chunked` delimits a response by the close.
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 5\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        // RFC 9110 §8.6: Content-Length = 1*DIGIT.
        for bad in [
            "+5",
            "5 5",
            "0x5",
            "",
            "5,5",
            "5\u{a0}",
            "18446744073709551616",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert_eq!(
                parse_head(raw.as_bytes(), false),
                Err(HeadError::BadContentLength),
                "{bad:?}"
            );
        }
        let h = head("HTTP/1.1 200 OK\r\ncontent-length:  007 \r\ncontent-length: 7\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(7));
        // A switch of protocols never goes back to the pool.
        let h = head("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(0), false));
        // A HEAD's answer has no body whatever it says.
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(
            parse_head(raw, true).unwrap().unwrap().framing,
            Framing::Length(0)
        );
    }

    #[test]
    fn bad_heads_are_refused() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le", false),
            Ok(None)
        );
        assert!(matches!(
            parse_head(b"garbage\r\n\r\n", false),
            Err(HeadError::Invalid(_))
        ));
        assert_eq!(
            parse_head(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            Err(HeadError::BadContentLength)
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false),
            Err(HeadError::BadContentLength)
        );
        let mut big = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 10, b'a');
        assert_eq!(parse_head(&big, false), Err(HeadError::TooLarge));
    }

    fn decode_all(framing: Framing, pieces: &[&[u8]]) -> (Vec<u8>, Result<bool, BodyError>) {
        let mut dec = BodyDecoder::new(framing);
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for p in pieces {
            pending.extend_from_slice(p);
            match dec.decode(&pending, |s| out.extend_from_slice(s)) {
                Ok(used) => {
                    pending.drain(..used);
                }
                Err(e) => return (out, Err(e)),
            }
        }
        (out, Ok(dec.is_done()))
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let (out, done) = decode_all(
            Framing::Chunked,
            &[b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"],
        );
        assert_eq!(out, b"hello world");
        assert_eq!(done, Ok(true));
    }

    #[test]
    fn bytes_after_the_body_are_left_alone() {
        let mut dec = BodyDecoder::new(Framing::Chunked);
        let input = b"2\r\nok\r\n0\r\n\r\nHTTP/1.1";
        let used = dec.decode(input, |_| {}).unwrap();
        assert!(dec.is_done());
        assert_eq!(&input[used..], b"HTTP/1.1");
        let mut dec = BodyDecoder::new(Framing::Length(2));
        assert_eq!(dec.decode(b"okNEXT", |_| {}), Ok(2));
        assert!(dec.is_done());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        assert!(decode_all(Framing::Chunked, &[b"zz\r\n"]).1.is_err());
        assert!(decode_all(Framing::Chunked, &[b"2\r\nokX"]).1.is_err());
        let long = vec![b'0'; MAX_CHUNK_LINE + 2];
        assert!(decode_all(Framing::Chunked, &[&long]).1.is_err());
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b'a', MAX_TRAILER_BYTES + 1));
        assert!(decode_all(Framing::Chunked, &[&trailers]).1.is_err());
    }

    #[test]
    fn end_of_file_ends_only_a_close_delimited_body() {
        let mut dec = BodyDecoder::new(Framing::Close);
        assert_eq!(dec.decode(b"anything", |_| {}), Ok(8));
        assert_eq!(dec.eof(), Ok(()));
        assert!(dec.is_done());
        let mut dec = BodyDecoder::new(Framing::Length(5));
        dec.decode(b"abc", |_| {}).unwrap();
        assert_eq!(dec.eof(), Err(BodyError::Truncated));
        let mut dec = BodyDecoder::new(Framing::Chunked);
        dec.decode(b"5\r\nab", |_| {}).unwrap();
        assert_eq!(dec.eof(), Err(BodyError::Truncated));
    }

    fn chunked(payload: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = payload;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    proptest! {
        /// Cut anywhere, in any number of pieces, a chunked body decodes to its payload.
        #[test]
        fn chunked_decodes_from_any_cut(
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
            sizes in proptest::collection::vec(1usize..300, 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let wire = chunked(&payload, &sizes);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            at.push(0);
            at.push(wire.len());
            at.sort_unstable();
            let pieces: Vec<&[u8]> = at.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
            let (out, done) = decode_all(Framing::Chunked, &pieces);
            prop_assert_eq!(out, payload);
            prop_assert_eq!(done, Ok(true));
        }

        /// A length-delimited body yields exactly its length, whatever follows.
        #[test]
        fn length_decodes_from_any_cut(
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = payload.clone();
            wire.extend_from_slice(b"trailing garbage");
            let c = cut.index(wire.len() + 1);
            let (out, done) = decode_all(Framing::Length(payload.len() as u64), &[&wire[..c], &wire[c..]]);
            prop_assert_eq!(out, payload);
            prop_assert_eq!(done, Ok(true));
        }

        /// No input makes the decoder panic or consume more than it was given.
        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut dec = BodyDecoder::new(Framing::Chunked);
            if let Ok(used) = dec.decode(&input, |_| {}) {
                prop_assert!(used <= input.len());
            }
            let _ = parse_head(&input, false);
        }
    }
}
