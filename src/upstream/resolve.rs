//! Upstream addresses: IP literals parse directly, DNS names are looked up asynchronously and
//! cached briefly, so a Kubernetes Service name works without a lookup per request and without
//! pinning a stale address forever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
