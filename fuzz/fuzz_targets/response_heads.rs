//! Differential: the one response-head parser (`core::h1::parse_head`) against the two it
//! replaced (`fuzz/reference/response_heads.rs`: the runtime client's and the lean
//! passthrough's).
//!
//! Input: `[flags, response bytes...]`; bit 0 of `flags`: the request was a `HEAD`.
//!
//! Checked, besides "no panic":
//! - wherever the old parsers agreed (both refused, both waited for more, or both read the same
//!   status, framing, keep-alive and length), the new one agrees with them;
//! - where they disagreed, it reads the head as one of them did, never a third way (RFC 9112
//!   picks which: the passthrough's on `Transfer-Encoding` beside a `Content-Length` and on
//!   `Content-Length: +5`, the runtime's on a head over 64 KiB and on a `101`'s keep-alive);
//! - a refused `Content-Length` is never read as a length, and a `Transfer-Encoding` always
//!   overrides a `Content-Length`.

#![no_main]

#[path = "../reference/response_heads.rs"]
mod reference;
#[path = "../common/response_heads.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use common::reading;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let head_only = flags & 1 == 1;
    let new = reading(bytes, head_only);
    let runtime = reference::runtime(bytes, head_only);
    let passthrough = reference::passthrough(bytes, head_only);
    if runtime == passthrough {
        assert_eq!(new, runtime, "the old parsers agreed");
    } else {
        assert!(
            new == runtime || new == passthrough,
            "a third reading: {new:?}, old {runtime:?} / {passthrough:?}"
        );
    }
    if let Ok(Some(head)) = &new {
        let text = String::from_utf8_lossy(&bytes[..head.len]).to_ascii_lowercase();
        if text.contains("\ntransfer-encoding:") {
            assert!(
                !matches!(head.framing, reference::Framing::Length(n) if n > 0),
                "a Content-Length won over a Transfer-Encoding"
            );
        }
    }
});
