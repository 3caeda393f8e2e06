//! The one response-head parser's reading of a head, in the terms of the two it replaced
//! (`fuzz/reference/response_heads.rs`): what the `response_heads` fuzz target and its property
//! test compare. The including module declares `reference`.

use cutover_proxy::core::h1::{parse_head, Framing};

use super::reference::{self, Reading};

pub fn reading(bytes: &[u8], head_only: bool) -> Result<Option<Reading>, ()> {
    match parse_head(bytes, head_only) {
        Ok(Some(h)) => Ok(Some(Reading {
            status: h.status,
            framing: match h.framing {
                Framing::Chunked => reference::Framing::Chunked,
                Framing::Length(n) => reference::Framing::Length(n),
                Framing::Close => reference::Framing::Close,
            },
            keep_alive: h.keep_alive,
            len: h.len,
        })),
        Ok(None) => Ok(None),
        Err(_) => Err(()),
    }
}
