//! The `X-Forwarded-*` headers on a request Pingora sends to legacy (the lean path writes the
//! same lines itself, `core::passthrough`).

use pingora::http::RequestHeader;
use pingora::Result;

use crate::core::forwarded::{Forwarded, Hop, Received, FOR, HOST, PROTO};

/// Replace the request's `X-Forwarded-*` headers with the proxy's, last in the head, in the
/// order the lean path writes them.
pub(super) fn set(req: &mut RequestHeader, hop: Hop) -> Result<()> {
    let forwarded = {
        let mut got = Received::default();
        for (name, value) in req.headers.iter() {
            got.see(name.as_str().as_bytes(), value.as_bytes());
        }
        Forwarded::of(hop, &got)
    };
    for name in [FOR, PROTO, HOST] {
        req.remove_header(name);
    }
    for (name, value) in forwarded.headers() {
        req.append_header(name, value)?;
    }
    Ok(())
}
