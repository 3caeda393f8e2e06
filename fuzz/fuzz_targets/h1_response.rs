//! A runtime's HTTP/1.1 response bytes, cut anywhere, through the head parser and the body
//! decoder the relay uses.
//!
//! Input: `[cut count, cut positions (2 bytes each)..., response bytes...]`.
//!
//! Checked, besides "no panic":
//! - the decoder never claims more bytes than it was offered;
//! - it does not depend on where the network cut the bytes: fed in pieces, it yields the same
//!   payload, the same end and the same verdict (error or not) as fed at once.

#![no_main]

use cutover_proxy::core::h1::{parse_head, BodyDecoder};
use libfuzzer_sys::fuzz_target;

/// Decode `body` fed in `pieces` the way the relay does: unconsumed bytes are offered again
/// with the next piece. Returns (payload, done, failed).
fn decode(framing: cutover_proxy::core::h1::Framing, pieces: &[&[u8]]) -> (Vec<u8>, bool, bool) {
    let mut dec = BodyDecoder::new(framing);
    let mut payload = Vec::new();
    let mut pending = Vec::new();
    for piece in pieces {
        pending.extend_from_slice(piece);
        match dec.decode(&pending, |p| payload.extend_from_slice(p)) {
            Ok(used) => {
                assert!(used <= pending.len(), "consumed more than offered");
                pending.drain(..used);
            }
            Err(_) => return (payload, dec.is_done(), true),
        }
        if dec.is_done() {
            break;
        }
    }
    (payload, dec.is_done(), false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n % 8) as usize;
    if rest.len() < 2 * n {
        return;
    }
    let (cuts, bytes) = rest.split_at(2 * n);
    let Ok(Some(head)) = parse_head(bytes, false) else {
        return;
    };
    assert!(head.len <= bytes.len());
    let body = &bytes[head.len..];

    let whole = decode(head.framing, &[body]);
    let mut at: Vec<usize> = cuts
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize % (body.len() + 1))
        .collect();
    at.push(0);
    at.push(body.len());
    at.sort_unstable();
    let pieces: Vec<&[u8]> = at.windows(2).map(|w| &body[w[0]..w[1]]).collect();
    let cut = decode(head.framing, &pieces);
    assert_eq!(whole, cut, "decoding depends on where the bytes were cut");
});
