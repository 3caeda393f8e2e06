//! The one response-head parser (`core::h1::parse_head`) against the two it replaced (the
//! runtime client's and the lean passthrough's, kept in `fuzz/reference/`), on heads built from
//! the framing headers they read differently: wherever the old parsers agreed, the new one
//! agrees; where they disagreed, it reads the head as RFC 9112 says, which is always as one of
//! them did. The `response_heads` fuzz target runs the same property on arbitrary bytes.

// Not the Harness: a property of the pure head parser, with no proxy or sockets.
#[path = "../../fuzz/common/response_heads.rs"]
mod common;
#[path = "../../fuzz/reference/response_heads.rs"]
mod reference;

use common::reading;
use proptest::prelude::*;

fn header() -> impl Strategy<Value = String> {
    let te = prop::sample::select(vec![
        "chunked",
        "gzip",
        "gzip, chunked",
        "chunked, gzip",
        "chunked,",
        " Chunked ",
        "",
    ]);
    let cl = prop::sample::select(vec![
        "5",
        "0",
        " 7 ",
        "+5",
        "-1",
        "",
        "5, 5",
        "0x5",
        "18446744073709551616",
        "007",
    ]);
    let conn = prop::sample::select(vec!["close", "keep-alive", "Keep-Alive, x", "upgrade", ""]);
    prop_oneof![
        te.prop_map(|v| format!("Transfer-Encoding: {v}")),
        cl.prop_map(|v| format!("Content-Length: {v}")),
        conn.prop_map(|v| format!("Connection: {v}")),
        "[a-z]{1,8}: [a-z0-9 ]{0,12}".prop_map(|h| h),
    ]
}

fn head() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let status = prop::sample::select(vec![
        "100 Continue",
        "101 Switching Protocols",
        "103 Early Hints",
        "200 OK",
        "204 No Content",
        "304 Not Modified",
        "404 Not Found",
        "502 Bad Gateway",
    ]);
    let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]);
    (
        version,
        status,
        prop::collection::vec(header(), 0..6),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(version, status, headers, head_only, body)| {
            let mut raw = format!("{version} {status}\r\n");
            for h in headers {
                raw.push_str(&h);
                raw.push_str("\r\n");
            }
            raw.push_str("\r\n");
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(&body);
            (raw, head_only)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_old_parsers_agreements_hold_and_their_disagreements_are_settled(
        (raw, head_only) in head(),
    ) {
        let new = reading(&raw, head_only);
        let runtime = reference::runtime(&raw, head_only);
        let passthrough = reference::passthrough(&raw, head_only);
        if runtime == passthrough {
            prop_assert_eq!(new, runtime, "the old parsers agreed");
        } else {
            prop_assert!(
                new == runtime || new == passthrough,
                "a third reading: {:?}, old {:?} / {:?}", new, runtime, passthrough
            );
        }
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        if let Ok(Some(h)) = &new {
            // RFC 9112 §6.3: a Transfer-Encoding overrides a Content-Length.
            if text.contains("\ntransfer-encoding:") {
                let framed_by_length = matches!(h.framing, reference::Framing::Length(n) if n > 0);
                prop_assert!(!framed_by_length, "{}", text);
            }
        }
        // RFC 9110 §8.6: Content-Length = 1*DIGIT.
        for bad in ["+5", "-1", "0x5", "5, 5"] {
            if text.contains(&format!("content-length: {bad}\r\n")) {
                prop_assert_eq!(new, Err(()), "{}", text);
            }
        }
    }

    /// Arbitrary bytes: the same property, and no panic.
    #[test]
    fn arbitrary_bytes_read_as_one_of_the_old_parsers_did(
        raw in prop::collection::vec(any::<u8>(), 0..200),
        head_only in any::<bool>(),
    ) {
        let mut bytes = b"HTTP/1.1 200 OK\r\n".to_vec();
        bytes.extend_from_slice(&raw);
        let new = reading(&bytes, head_only);
        let runtime = reference::runtime(&bytes, head_only);
        let passthrough = reference::passthrough(&bytes, head_only);
        prop_assert!(new == runtime || new == passthrough);
        if runtime == passthrough {
            prop_assert_eq!(new, runtime);
        }
    }
}
