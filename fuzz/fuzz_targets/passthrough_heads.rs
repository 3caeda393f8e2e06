//! Client and legacy heads through the lean passthrough's head rules (`core::passthrough`).
//!
//! Input: `[split, bytes...]`: the bytes before `split` (scaled to the input) are a client
//! request, the rest a legacy response.
//!
//! Checked, besides "no panic":
//! - the head legacy gets is one complete head, the client's request line first (in HTTP/1.1),
//!   with no hop-by-hop header and no trusted org header, and with the header that frames its
//!   body and its `Host` whatever the client's `Connection` names;
//! - the head the client gets is one complete head with legacy's status, no hop-by-hop header
//!   but the one `connection` header;
//! - a chat the front door serves itself (`chat_head`) is a chat route with a body of exactly
//!   its `Content-Length`, within the limit, and never one the lean passthrough also takes;
//! - the head Pingora is handed (`with_forwarded`) is one valid head within Pingora's 256
//!   fields, with the client's request line, framing and other headers, and one
//!   `X-Forwarded-For` ending with the peer.

#![no_main]

use cutover_proxy::core::h1::parse_head;
use cutover_proxy::core::forwarded::is_forwarded;
use cutover_proxy::core::passthrough::{
    chat_head, client_head, header_lines, prepare, with_forwarded,
};
use cutover_proxy::core::request_head::{self, Framing};
use libfuzzer_sys::fuzz_target;

const FIXED_HOP: &[&str] = &["keep-alive", "proxy-connection", "te", "trailer", "upgrade"];

fn check_request(raw: &[u8]) {
    let Ok(Some(head)) = request_head::parse(raw, 32 * 1024) else {
        return;
    };
    let trusted = http::HeaderName::from_static("x-org-id");
    // The lean head must stay one well-formed head whether or not a trusted hop's own
    // X-Forwarded-* headers are passed on.
    let hop = cutover_proxy::core::forwarded::Hop {
        peer: Some(std::net::IpAddr::from([10, 0, 0, 9])),
        trusted: raw.len() % 2 == 0,
    };
    check_handed(raw, &head, &trusted, hop);
    if let Some(chat) = chat_head(raw, &head, 64) {
        assert_eq!(head.framing, Framing::Length(chat.body_len as u64));
        assert!(chat.body_len <= 64, "body over the limit");
        assert!(prepare(raw, &head, Some(&trusted), hop).is_none(), "a chat on the passthrough");
        let path = chat.path.as_str();
        let route = cutover_proxy::core::routing::chat_route(&http::Method::POST, path);
        assert_eq!(route, Some(chat.route), "not the chat route of its path");
        return;
    }
    let Some(req) = prepare(raw, &head, Some(&trusted), hop) else {
        return;
    };
    let out = &req.upstream_head;
    let mut headers = [httparse::EMPTY_HEADER; 300];
    let mut parsed = httparse::Request::new(&mut headers);
    assert_eq!(
        parsed.parse(out),
        Ok(httparse::Status::Complete(out.len())),
        "not one head"
    );
    // The request line as received, in HTTP/1.1 (as Pingora asks legacy).
    let line = raw[head.skip..].split(|b| *b == b'\n').next().unwrap();
    let (kept, _version) = line.split_at(line.len() - b"1.1\r".len());
    assert!(out.starts_with(kept), "request line changed");
    assert!(out[kept.len()..].starts_with(b"1.1\r\n"), "not asked in HTTP/1.1");
    let has = |name: &str| parsed.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    match head.framing {
        Framing::Length(_) => assert!(has("content-length"), "body sent without its length"),
        Framing::Chunked => assert!(has("transfer-encoding"), "body sent without its chunking"),
        Framing::None => {}
    }
    if header_lines(&raw[head.skip..head.skip + head.len])
        .1
        .any(|(n, _)| n.eq_ignore_ascii_case(b"host"))
    {
        assert!(has("host"), "Host dropped");
    }
    let xff: Vec<&[u8]> = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|h| h.value)
        .collect();
    assert_eq!(xff.len(), 1, "one X-Forwarded-For");
    assert!(xff[0].ends_with(b"10.0.0.9"), "the peer is not the last hop");
    if !hop.trusted {
        assert_eq!(xff[0], b"10.0.0.9", "an untrusted client's own X-Forwarded-For passed");
    }
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        assert!(name != "x-org-id", "trusted header forwarded");
        assert!(!FIXED_HOP.contains(&name.as_str()), "{name} forwarded");
        if name == "connection" {
            assert_eq!(h.value, b"keep-alive", "a client's Connection forwarded");
        }
    }
}

/// A head's request line, its line end included.
fn line(head: &[u8]) -> Vec<u8> {
    let end = head.iter().position(|b| *b == b'\n').map_or(head.len(), |i| i + 1);
    head[..end].to_vec()
}

fn check_handed(
    raw: &[u8],
    head: &request_head::Head,
    trusted: &http::HeaderName,
    hop: cutover_proxy::core::forwarded::Hop,
) {
    let client = match &head.rewritten {
        Some(bytes) => &bytes[..],
        None => &raw[head.skip..head.skip + head.len],
    };
    let handed = with_forwarded(client, hop, Some(trusted));
    // As Pingora reads it: at most 256 fields.
    let mut fields = [httparse::EMPTY_HEADER; 256];
    assert_eq!(
        httparse::Request::new(&mut fields).parse(&handed),
        Ok(httparse::Status::Complete(handed.len())),
        "not one head Pingora reads"
    );
    // Read again by the front door's rules (the three lines over its limit taken out).
    let fewer = with_forwarded(client, cutover_proxy::core::forwarded::Hop::default(), None);
    let strip: Vec<u8> = header_lines(&fewer)
        .1
        .filter(|(n, _)| !is_forwarded(n))
        .fold(line(&fewer), |mut out, (_, l)| {
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
            out
        });
    let again = request_head::parse(&[&strip[..], b"\r\n"].concat(), usize::MAX)
        .expect("the handed head is refused")
        .expect("the handed head is not whole");
    assert_eq!(again.framing, head.framing, "framing changed");
    assert_eq!(line(&handed), line(client), "request line changed");
    let names = |h: &[u8]| -> Vec<Vec<u8>> {
        header_lines(h)
            .1
            .map(|(n, _)| n.to_ascii_lowercase())
            .filter(|n| !is_forwarded(n))
            .collect()
    };
    // The client's own lines are all there, the ones Pingora drops moved after the proxy's.
    let (mut sent, mut got) = (names(client), names(&handed));
    sent.sort();
    got.sort();
    assert_eq!(sent, got, "a client header lost or added");
    let xff: Vec<&[u8]> = header_lines(&handed)
        .1
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"x-forwarded-for"))
        .map(|(n, l)| l[n.len() + 1..].trim_ascii())
        .collect();
    assert_eq!(xff.len(), 1, "one X-Forwarded-For");
    assert!(xff[0].ends_with(b"10.0.0.9"), "the peer is not the last hop");
}

fn check_response(raw: &[u8]) {
    let Ok(Some(head)) = parse_head(raw, false) else {
        return;
    };
    for (keep, rechunk) in [(true, false), (false, false), (true, true)] {
        let mut out = Vec::new();
        client_head(&raw[..head.len], keep, rechunk, &mut out);
        let mut headers = [httparse::EMPTY_HEADER; 300];
        let mut parsed = httparse::Response::new(&mut headers);
        assert_eq!(
            parsed.parse(&out),
            Ok(httparse::Status::Complete(out.len())),
            "not one head"
        );
        assert_eq!(parsed.code, Some(head.status));
        let connections = header_lines(&out)
            .1
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
            .count();
        assert_eq!(connections, 1);
        for h in parsed.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            assert!(!FIXED_HOP.contains(&name.as_str()), "{name} forwarded");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = split as usize * rest.len() / 256;
    check_request(&rest[..at]);
    check_response(&rest[at..]);
});
