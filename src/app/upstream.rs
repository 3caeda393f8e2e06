//! The Pingora peer legacy is proxied to, derived from the same policy as every other call to
//! legacy (`core::timeouts::Timeouts`).
//!
//! Pingora keeps an upstream's timeouts as data on its peer (`PeerOptions`), but has one read
//! timeout for a response's head and each read of its body alike, while legacy's policy gives
//! its head 60 s and each silence inside its body 300 s. So the peer's read timeout is the idle
//! one, and the head's shorter deadline is kept by the front door's connection, which Pingora
//! polls while it waits for legacy (`proxy::front_door`, armed in `upstream_request_filter`).

use std::net::SocketAddr;

use pingora::upstreams::peer::HttpPeer;

pub use crate::upstream::pool::partition as pool_partition;
pub use crate::upstream::Resolver;
use crate::upstream::Timeouts;

/// Legacy's peer for Pingora's proxy, pooled per worker thread (`pool_partition`).
pub fn legacy_peer(addr: SocketAddr, t: &Timeouts) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.group_key = pool_partition();
    peer.options.connection_timeout = Some(t.connect);
    peer.options.read_timeout = Some(t.idle);
    peer.options.idle_timeout = Some(t.pool_idle);
    peer.options.tcp_keepalive = None;
    peer
}
