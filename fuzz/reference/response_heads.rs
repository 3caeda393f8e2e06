//! The two response-head parsers the proxy had before `core::h1::parse_head` became the only one,
//! kept verbatim as the reference of the `response_heads` differential fuzz target and of
//! `tests/it/response_heads.rs`: the runtime's (`h1::parse_head`) and the lean passthrough's
//! (`passthrough::parse_response`). They disagreed on a `Content-Length` beside a
//! `Transfer-Encoding` that does not end in `chunked`, on `Content-Length: +5`, and on an empty
//! element at the end of a `Transfer-Encoding` list; wherever they agreed, the parser that
//! replaced them must agree with both.

#![allow(dead_code)]

/// How a body is delimited, in the terms both old parsers can be read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    Close,
}

/// What an old parser made of a complete head: `None` for a refused one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub status: u16,
    pub framing: Framing,
    pub keep_alive: bool,
    pub len: usize,
}

const MAX_HEADERS: usize = 100;
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The runtime client's parser (`core::h1::parse_head` before the change). `Err(())`: refused;
/// `Ok(None)`: incomplete.
pub fn runtime(buf: &[u8], request_was_head: bool) -> Result<Option<Reading>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    if len > MAX_HEAD_BYTES {
        return Err(());
    }
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = last_token(h.value).eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(())?;
            if length.is_some_and(|l| l != v) {
                return Err(());
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let framing = if request_was_head || status == 204 || status == 304 || status / 100 == 1 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        Framing::Close
    };
    let keep_alive =
        framing != Framing::Close && !close && (http11 || keep_alive_token) && status != 101;
    Ok(Some(Reading {
        status,
        framing,
        keep_alive,
        len,
    }))
}

fn last_token(value: &[u8]) -> &[u8] {
    value
        .rsplit(|b| *b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// The lean passthrough's parser (`core::passthrough::parse_response` before the change), its
/// "no body" read as a zero length. It had no size limit of its own (its caller had one).
pub fn passthrough(buf: &[u8], head_only: bool) -> Result<Option<Reading>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let code = resp.code.ok_or(())?;
    let (mut chunked, mut coded, mut length) = (false, false, None);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if named(name, "transfer-encoding") {
            coded = true;
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if named(name, "content-length") {
            let n: u64 = std::str::from_utf8(h.value.trim_ascii())
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse().ok())
                .ok_or(())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    let framing = if head_only || code == 204 || code == 304 || (100..200).contains(&code) {
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
    let (close, keep_alive_token) = connection(&buf[..len]);
    let keep_alive =
        !close && (resp.version == Some(1) || keep_alive_token) && framing != Framing::Close;
    Ok(Some(Reading {
        status: code,
        framing,
        keep_alive,
        len,
    }))
}

fn named(name: &[u8], token: &str) -> bool {
    name.eq_ignore_ascii_case(token.as_bytes())
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// `close` and `keep-alive` in the head's `Connection` lines, read line by line as received.
fn connection(head: &[u8]) -> (bool, bool) {
    let start = head
        .iter()
        .position(|b| *b == b'\n')
        .map_or(head.len(), |i| i + 1);
    let (mut close, mut keep_alive) = (false, false);
    for line in head[start..]
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
    {
        let name = line.split(|b| *b == b':').next().unwrap_or(line);
        if !named(name, "connection") {
            continue;
        }
        for t in tokens(line.get(name.len() + 1..).unwrap_or_default()) {
            close |= t.eq_ignore_ascii_case(b"close");
            keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    (close, keep_alive)
}
