//! The `X-Forwarded-*` headers on a request Pingora sends to legacy (the lean path writes the
//! same lines itself, `core::passthrough`).

use http::HeaderName;
use pingora::http::RequestHeader;
use pingora::Result;

use crate::core::forwarded::{Forwarded, Hop, Received, NAMES};

/// The three as header names, to remove a client's copies without parsing a name each time.
const HEADERS: [HeaderName; 3] = [
    HeaderName::from_static(NAMES[0]),
    HeaderName::from_static(NAMES[1]),
    HeaderName::from_static(NAMES[2]),
];

/// Replace the request's `X-Forwarded-*` headers with the proxy's, last in the head, in the
/// order the lean path writes them.
///
/// Each header Pingora adds costs a name parsed and stored twice (its map and its case map),
/// so the values are written once into one buffer by the lean path's writer, without `fmt` or
/// a `String` each, and nothing is removed from a request that came without any of them.
pub(super) fn set(req: &mut RequestHeader, hop: Hop) -> Result<()> {
    let mut values = Vec::with_capacity(64);
    let (spans, sent) = {
        let mut got = Received::default();
        for (name, value) in req.headers.iter() {
            got.see(name.as_str().as_bytes(), value.as_bytes());
        }
        let sent = !got.xff.is_empty() || got.proto.is_some() || got.forwarded_host.is_some();
        (Forwarded::write_values(hop, &got, &mut values), sent)
    };
    if sent {
        for name in &HEADERS {
            req.remove_header(name);
        }
    }
    for (name, span) in NAMES.into_iter().zip(spans) {
        if let Some(span) = span {
            req.append_header(name, &values[span])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::forwarded::TrustedProxies;

    /// The head Pingora writes for `headers` from `peer` (trusted or not), the forwarded
    /// headers set by `set_them`.
    fn sent(
        headers: &[(&str, &str)],
        peer: &str,
        trusted: bool,
        set_them: fn(&mut RequestHeader, Hop) -> Result<()>,
    ) -> String {
        let mut req = RequestHeader::build("GET", b"/api/v1/agents", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        let list = if trusted {
            vec![peer.to_string()]
        } else {
            Vec::new()
        };
        let hop = Hop::of(
            Some(peer.parse().unwrap()),
            &TrustedProxies::parse(&list).unwrap(),
        );
        set_them(&mut req, hop).unwrap();
        let mut wire = bytes::BytesMut::new();
        req.header_to_h1_wire(&mut wire);
        String::from_utf8(wire.to_vec()).unwrap()
    }

    /// How the headers were set before [`set`] wrote the values itself: each as a `String`
    /// from [`Forwarded::of`], all three names removed whatever the client sent.
    fn as_before(req: &mut RequestHeader, hop: Hop) -> Result<()> {
        let mut got = Received::default();
        for (name, value) in req.headers.iter() {
            got.see(name.as_str().as_bytes(), value.as_bytes());
        }
        let forwarded = Forwarded::of(hop, &got);
        for name in NAMES {
            req.remove_header(name);
        }
        for (name, value) in forwarded.headers() {
            req.append_header(name, value)?;
        }
        Ok(())
    }

    #[test]
    fn legacy_gets_the_same_head_as_before_whoever_sent_what() {
        let claims: &[(&str, &str)] = &[
            ("Host", "api.example.com"),
            ("X-Forwarded-For", "198.51.100.7, 10.9.9.9"),
            ("Accept", "*/*"),
            ("x-forwarded-proto", "https"),
            ("X-FORWARDED-FOR", "172.16.0.1"),
            ("X-Forwarded-Host", "app.example.com"),
            ("User-Agent", "t"),
        ];
        let plain: &[(&str, &str)] = &[("Host", "api.example.com"), ("Accept", "*/*")];
        let only_for: &[(&str, &str)] = &[("X-Forwarded-For", "1.2.3.4"), ("Host", "h")];
        let empty_claims: &[(&str, &str)] = &[("x-forwarded-proto", ""), ("Host", "")];
        for headers in [claims, plain, only_for, empty_claims, &[]] {
            for (peer, trusted) in [("10.1.2.3", true), ("203.0.113.9", false), ("::1", true)] {
                assert_eq!(
                    sent(headers, peer, trusted, set),
                    sent(headers, peer, trusted, as_before),
                    "{headers:?} from {peer} (trusted {trusted})"
                );
            }
        }
        // Removing a client's copies moves the map's last entry into the first one's place
        // (`HeaderMap::remove`): `User-Agent` before `Accept`, as before.
        assert_eq!(
            sent(claims, "10.1.2.3", true, set),
            "Host: api.example.com\r\nUser-Agent: t\r\nAccept: */*\r\n\
             x-forwarded-for: 198.51.100.7, 10.9.9.9, 172.16.0.1, 10.1.2.3\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: app.example.com\r\n"
        );
        assert_eq!(
            sent(claims, "203.0.113.9", false, set),
            "Host: api.example.com\r\nUser-Agent: t\r\nAccept: */*\r\n\
             x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: api.example.com\r\n"
        );
        assert_eq!(
            sent(plain, "203.0.113.9", false, set),
            "Host: api.example.com\r\nAccept: */*\r\n\
             x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: api.example.com\r\n"
        );
    }
}
