//! Upstream addresses and the Pingora peers built from them.
//!
//! Names are resolved off the request path's critical section: IP literals parse directly, DNS
//! names are looked up asynchronously and cached briefly, so a Kubernetes Service name works
//! without a lookup per request and without pinning a stale address forever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora::upstreams::peer::HttpPeer;

/// How long a resolved DNS name is reused.
const DNS_TTL: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Resolver {
    cache: Mutex<HashMap<String, (SocketAddr, Instant)>>,
}

impl Resolver {
    pub async fn resolve(&self, addr: &str) -> std::io::Result<SocketAddr> {
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            return Ok(sa);
        }
        if let Some((sa, at)) = self.cache.lock().unwrap().get(addr) {
            if at.elapsed() < DNS_TTL {
                return Ok(*sa);
            }
        }
        let sa = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{addr} resolved to no address"),
            )
        })?;
        self.cache
            .lock()
            .unwrap()
            .insert(addr.to_string(), (sa, Instant::now()));
        Ok(sa)
    }
}

/// Connection settings of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSettings {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
}

/// The pool partition of the calling worker thread.
///
/// A connection is registered with the event loop of the thread it was made on, and using it
/// from another thread costs two cross-thread wake-ups per read. Keyed per thread, a connection
/// is only reused there: this keys our own idle lists (`runtime::pool::Key`) and, as the peers'
/// `group_key`, the pools of Pingora's connectors.
pub(crate) fn pool_partition() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static PARTITION: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    PARTITION.with(|p| *p)
}

pub fn peer(addr: SocketAddr, settings: &PeerSettings) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.group_key = pool_partition();
    peer.options.connection_timeout = Some(settings.connect_timeout);
    peer.options.idle_timeout = Some(settings.pool_idle_timeout);
    peer.options.tcp_keepalive = None;
    peer
}
