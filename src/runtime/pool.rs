//! Idle keep-alive connections to the runtime and, for the bridge's calls, to legacy.
//!
//! Pingora's `TransportConnector` pool watches every idle connection with a task of its own and
//! hands a connection over through that task, and its default peer asks the kernel for the
//! socket's address on every reuse: on a history read of a few dozen microseconds that doubled
//! the call, and every runtime stream paid it before its first event. Here an idle connection
//! just waits in a list. One that the upstream closed meanwhile is noticed when taken (a read
//! that is ready at once: end of file or stray bytes), and a request on one that closes before
//! any answer byte is repeated once on a fresh connection by the caller.
//!
//! Each worker thread runs its own event loop: a connection is kept for the thread it was made or
//! taken on ([`Key`]), since another thread's use would cost two cross-thread wake-ups per read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;
use tokio::io::AsyncReadExt;

use crate::app::upstream::pool_partition;

/// Idle connections kept per key; more are closed when released.
const MAX_IDLE: usize = 64;

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<(Stream, Instant)>>>,
}

/// Where a connection idles: its upstream's address and the worker thread it was made or taken
/// on (`upstream::pool_partition`), fixed when it was: the thread that releases it may differ
/// (a multi-threaded runtime moves tasks), the event loop that serves it does not.
pub type Key = (SocketAddr, u64);

/// The key for a connection to `addr` made or taken on this thread.
pub fn key(addr: SocketAddr) -> Key {
    (addr, pool_partition())
}

impl Pool {
    /// The most recently released connection for `key` that is younger than `max_idle` and still
    /// open, if any; older ones are closed on the way.
    pub fn take(&self, key: Key, max_idle: Duration) -> Option<Stream> {
        loop {
            let mut stream = {
                let mut idle = self.idle.lock().unwrap();
                let list = idle.get_mut(&key)?;
                let found = list.pop()?;
                if found.1.elapsed() >= max_idle {
                    // The rest are older still.
                    list.clear();
                    return None;
                }
                found.0
            };
            if still_open(&mut stream) {
                return Some(stream);
            }
        }
    }

    /// Keep `stream` for the next call for `key`.
    pub fn put(&self, key: Key, stream: Stream) {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push((stream, Instant::now()));
        }
    }

    /// Idle connections for `key` (for tests).
    pub fn idle(&self, key: Key) -> usize {
        self.idle.lock().unwrap().get(&key).map_or(0, Vec::len)
    }
}

/// Connections to upstreams: a pooled one when there is one, else a new one.
pub struct Connections {
    connector: TransportConnector,
    idle: Pool,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            connector: TransportConnector::new(None),
            idle: Pool::default(),
        }
    }
}

impl Connections {
    /// The connection for a request's `attempt` for `key` (reached as `peer`), and whether it was
    /// pooled. Only the first attempt may take a pooled one: a request on a pooled one that fails
    /// before any answer byte is sent once more, on a new one.
    pub async fn for_attempt(
        &self,
        attempt: u32,
        key: Key,
        peer: &HttpPeer,
        max_idle: Duration,
    ) -> pingora::Result<(Stream, bool)> {
        if attempt == 0 {
            if let Some(stream) = self.idle.take(key, max_idle) {
                return Ok((stream, true));
            }
        }
        Ok((self.connector.new_stream(peer).await?, false))
    }

    /// Keep `stream`, got for `key`, whose last answer was read to its end, for the next request.
    pub fn put(&self, key: Key, stream: Stream) {
        self.idle.put(key, stream)
    }
}

/// An idle keep-alive connection has nothing to read: a read that completes at once means the
/// upstream closed it (0 bytes) or sent something unasked, and either way it cannot carry a
/// request.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    stream.read(&mut byte).now_or_never().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the pooled client side and the upstream's side.
    async fn pair() -> (SocketAddr, Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let client: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(client));
        (addr, client, server)
    }

    const LONG: Duration = Duration::from_secs(60);

    /// Whether the pool still hands out its connection to `addr` once what the upstream sent
    /// (on its way over loopback) has reached the client side: taken and put back until then.
    async fn still_handed_out(pool: &Pool, addr: SocketAddr) -> bool {
        for _ in 0..1000 {
            let Some(stream) = pool.take(key(addr), LONG) else {
                return false;
            };
            pool.put(key(addr), stream);
            tokio::task::yield_now().await;
        }
        true
    }

    #[tokio::test]
    async fn an_open_connection_is_handed_back_newest_first() {
        let (addr, a, _sa) = pair().await;
        let (_, b, _sb) = pair().await;
        let pool = Pool::default();
        let b_id = b.id();
        pool.put(key(addr), a);
        pool.put(key(addr), b);
        let taken = pool.take(key(addr), LONG).expect("an idle connection");
        assert_eq!(taken.id(), b_id);
        assert_eq!(pool.idle(key(addr)), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let (addr, client, mut server) = pair().await;
        let pool = Pool::default();
        pool.put(key(addr), client);
        server.shutdown().await.unwrap();
        drop(server);
        assert!(
            !still_handed_out(&pool, addr).await,
            "a closed connection was handed out"
        );
        assert_eq!(pool.idle(key(addr)), 0);
    }

    #[tokio::test]
    async fn a_connection_with_unasked_bytes_is_not_handed_out() {
        let (addr, client, mut server) = pair().await;
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let pool = Pool::default();
        pool.put(key(addr), client);
        assert!(!still_handed_out(&pool, addr).await);
    }

    #[tokio::test]
    async fn a_connection_is_kept_for_the_thread_it_was_got_on() {
        let (addr, client, _server) = pair().await;
        let pool = std::sync::Arc::new(Pool::default());
        pool.put(key(addr), client);
        let elsewhere = pool.clone();
        let taken_elsewhere = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move { elsewhere.take(key(addr), LONG).is_some() })
        })
        .join()
        .unwrap();
        assert!(
            !taken_elsewhere,
            "another worker took this worker's connection"
        );
        assert!(pool.take(key(addr), LONG).is_some());
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_closed() {
        let (addr, client, _server) = pair().await;
        let pool = Pool::default();
        pool.put(key(addr), client);
        assert!(pool.take(key(addr), Duration::ZERO).is_none());
        assert_eq!(pool.idle(key(addr)), 0);
    }

    #[tokio::test]
    async fn at_most_max_idle_are_kept() {
        let pool = Pool::default();
        let mut keep = Vec::new();
        let mut addr = None;
        for _ in 0..MAX_IDLE + 3 {
            let (a, client, server) = pair().await;
            // All to one key, whatever port each pair got.
            let to = *addr.get_or_insert(a);
            pool.put(key(to), client);
            keep.push(server);
        }
        assert_eq!(pool.idle(key(addr.unwrap())), MAX_IDLE);
    }
}
