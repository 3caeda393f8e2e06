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

use crate::upstream::pool::partition;
use crate::upstream::Timeouts;

/// Legacy's peer for Pingora's proxy, pooled per worker thread (`upstream::pool::partition`).
pub(super) fn legacy_peer(addr: SocketAddr, t: &Timeouts) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.group_key = partition();
    peer.options.connection_timeout = Some(t.connect);
    peer.options.read_timeout = Some(t.idle);
    peer.options.idle_timeout = Some(t.pool_idle);
    peer.options.tcp_keepalive = None;
    peer
}
