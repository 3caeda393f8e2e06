//! Idle keep-alive connections of one upstream, generic over the connection.
//!
//! Pingora's `TransportConnector` pool watches every idle connection with a task of its own and
//! hands a connection over through that task, and its default peer asks the kernel for the
//! socket's address on every reuse: on a history read of a few dozen microseconds that doubled
//! the call, and every runtime stream paid it before its first event. Here an idle connection
//! just waits in a list. One that the upstream closed meanwhile is noticed when taken, if the
//! caller asks (a read that is ready at once: end of file or stray bytes); a request on one that
//! closes before any answer byte is repeated once on a fresh connection (`Upstream`). A sweep
//! ([`Pool::sweep`], run in the background by `Upstream`) closes what has idled past the
//! upstream's `pool_idle_timeout_ms`, so that a burst's connections do not stay open, each holding
//! a descriptor here and a worker there, until the next request.
//!
//! Each worker thread runs its own event loop: a connection is kept for the thread it was made or
//! taken on ([`Key`]), since another thread's use would cost two cross-thread wake-ups per read;
//! and each thread's connections sit behind a lock of their own, so workers never contend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Idle connections kept per key; the oldest goes when one more is released.
pub const MAX_IDLE: usize = 128;
/// Locks the idle lists are spread over, by worker thread.
const SHARDS: usize = 16;

/// What the pool needs of a connection: whether an idle one can still carry a request.
pub trait Idle {
    fn still_open(&mut self) -> bool;
}

/// Where a connection idles: its upstream's address and the worker thread it was made or taken
/// on ([`partition`]), fixed when it was: the thread that releases it may differ (a
/// multi-threaded runtime moves tasks), the event loop that serves it does not.
pub type Key = (SocketAddr, u64);

/// The key for a connection to `addr` made or taken on this thread.
pub fn key(addr: SocketAddr) -> Key {
    (addr, partition())
}

/// The pool partition of the calling worker thread.
///
/// A connection is registered with the event loop of the thread it was made on, and using it
/// from another thread costs two cross-thread wake-ups per read. Keyed per thread, a connection
/// is only reused there: this keys the idle lists here and, as the peers' `group_key`, the pools
/// of Pingora's connectors.
pub fn partition() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static PARTITION: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    PARTITION.with(|p| *p)
}

/// One shard's idle lists by key. A shard holds one worker's keys (a few more when workers
/// outnumber the shards): one per upstream address, a handful, which a scan finds for less than
/// hashing the key costs, and this is done twice per request (take and put).
struct Lists<C>(Vec<(Key, Vec<(C, Instant)>)>);

impl<C> Lists<C> {
    fn get(&self, key: Key) -> Option<&Vec<(C, Instant)>> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, list)| list)
    }

    fn get_mut(&mut self, key: Key) -> Option<&mut Vec<(C, Instant)>> {
        self.0
            .iter_mut()
            .find(|(k, _)| *k == key)
            .map(|(_, list)| list)
    }

    fn entry(&mut self, key: Key) -> &mut Vec<(C, Instant)> {
        let at = match self.0.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.0.push((key, Vec::new()));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }
}

pub struct Pool<C> {
    shards: Vec<Mutex<Lists<C>>>,
    /// The longest a connection may idle, as the last request asked (the setting is
    /// reloadable); `u64::MAX` until one did.
    max_idle_ms: AtomicU64,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool {
            shards: (0..SHARDS).map(|_| Mutex::new(Lists(Vec::new()))).collect(),
            max_idle_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl<C> Pool<C> {
    fn shard(&self, key: Key) -> &Mutex<Lists<C>> {
        &self.shards[key.1 as usize % SHARDS]
    }

    /// Keep `conn` for the next request for `key`.
    pub fn put(&self, key: Key, conn: C) {
        let mut idle = self.shard(key).lock().unwrap();
        let list = idle.entry(key);
        if list.len() >= MAX_IDLE {
            list.remove(0);
        }
        list.push((conn, Instant::now()));
    }

    /// How long a connection may idle, as the last request asked.
    pub fn max_idle(&self) -> Option<Duration> {
        match self.max_idle_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Close every connection that has idled for the longest a request last allowed; how many.
    pub fn sweep(&self) -> usize {
        let Some(max_idle) = self.max_idle() else {
            return 0;
        };
        let mut closed = Vec::new();
        for shard in &self.shards {
            let mut lists = shard.lock().unwrap();
            for (_, list) in &mut lists.0 {
                // Oldest first: the expired ones are a prefix.
                let expired = list.partition_point(|(_, since)| since.elapsed() >= max_idle);
                closed.extend(list.drain(..expired).map(|(conn, _)| conn));
            }
            lists.0.retain(|(_, list)| !list.is_empty());
        }
        // Closed outside the locks.
        closed.len()
    }

    /// Idle connections for `key` (for tests).
    pub fn idle(&self, key: Key) -> usize {
        self.shard(key).lock().unwrap().get(key).map_or(0, Vec::len)
    }
}

impl<C: Idle> Pool<C> {
    /// The most recently released connection for `key` that is younger than `max_idle` (and,
    /// with `check`, still open), if any; older ones are closed on the way.
    pub fn take(&self, key: Key, max_idle: Duration, check: bool) -> Option<C> {
        let ms = u64::try_from(max_idle.as_millis()).unwrap_or(u64::MAX - 1);
        if self.max_idle_ms.load(Ordering::Relaxed) != ms {
            self.max_idle_ms.store(ms, Ordering::Relaxed);
        }
        loop {
            let mut conn = {
                let mut idle = self.shard(key).lock().unwrap();
                let list = idle.get_mut(key)?;
                let (conn, since) = list.pop()?;
                if since.elapsed() >= max_idle {
                    // The rest are older still.
                    list.clear();
                    return None;
                }
                conn
            };
            if !check || conn.still_open() {
                return Some(conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that is open until told otherwise.
    struct Fake {
        id: u32,
        open: bool,
    }

    impl Idle for Fake {
        fn still_open(&mut self) -> bool {
            self.open
        }
    }

    fn fake(id: u32) -> Fake {
        Fake { id, open: true }
    }

    const LONG: Duration = Duration::from_secs(60);

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn an_open_connection_is_handed_back_newest_first() {
        let pool = Pool::default();
        pool.put(key(addr()), fake(1));
        pool.put(key(addr()), fake(2));
        assert_eq!(pool.take(key(addr()), LONG, true).unwrap().id, 2);
        assert_eq!(pool.idle(key(addr())), 1);
    }

    #[test]
    fn a_closed_connection_is_skipped_only_when_checked() {
        let pool = Pool::default();
        pool.put(key(addr()), fake(1));
        pool.put(key(addr()), Fake { id: 2, open: false });
        assert_eq!(pool.take(key(addr()), LONG, true).unwrap().id, 1);
        pool.put(key(addr()), Fake { id: 3, open: false });
        assert_eq!(pool.take(key(addr()), LONG, false).unwrap().id, 3);
    }

    #[test]
    fn a_connection_is_kept_for_the_thread_it_was_got_on() {
        let pool = std::sync::Arc::new(Pool::default());
        pool.put(key(addr()), fake(1));
        let elsewhere = pool.clone();
        let taken_elsewhere =
            std::thread::spawn(move || elsewhere.take(key(addr()), LONG, true).is_some())
                .join()
                .unwrap();
        assert!(
            !taken_elsewhere,
            "another worker took this worker's connection"
        );
        assert!(pool.take(key(addr()), LONG, true).is_some());
    }

    #[test]
    fn connections_idle_too_long_are_closed() {
        let pool = Pool::default();
        pool.put(key(addr()), fake(1));
        assert!(pool.take(key(addr()), Duration::ZERO, true).is_none());
        assert_eq!(pool.idle(key(addr())), 0);
    }

    #[test]
    fn a_sweep_closes_what_idled_past_the_last_requests_limit_and_keeps_the_rest() {
        let pool = Pool::default();
        pool.put(key(addr()), fake(1));
        assert_eq!(pool.sweep(), 0, "no limit before a request set one");
        assert!(pool.take(key(addr()), LONG, false).is_some());
        pool.put(key(addr()), fake(2));
        pool.put(key(addr()), fake(3));
        assert_eq!(pool.sweep(), 0, "younger than a minute");
        assert_eq!(pool.idle(key(addr())), 2);
        // A reload shortened the limit: the next request's limit is the sweep's.
        assert!(pool.take(key(addr()), Duration::ZERO, false).is_none());
        pool.put(key(addr()), fake(4));
        assert_eq!(pool.max_idle(), Some(Duration::ZERO));
        assert_eq!(pool.sweep(), 1);
        assert_eq!(pool.idle(key(addr())), 0);
    }

    #[test]
    fn at_most_max_idle_are_kept_and_the_oldest_goes() {
        let pool = Pool::default();
        for id in 0..MAX_IDLE as u32 + 3 {
            pool.put(key(addr()), fake(id));
        }
        assert_eq!(pool.idle(key(addr())), MAX_IDLE);
        let mut oldest = u32::MAX;
        while let Some(c) = pool.take(key(addr()), LONG, false) {
            oldest = oldest.min(c.id);
        }
        assert_eq!(oldest, 3);
    }
}
