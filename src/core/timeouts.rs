//! An upstream's deadlines as data, and the one rule for which of them a read of its connection
//! waits on.
//!
//! Each upstream (legacy, the runtime) declares its [`Timeouts`] once, from the config, as
//! linkerd2-proxy declares `Timeouts { request, response, idle }` per route and Pingora keeps
//! `PeerOptions` on a peer. A connection's [`ReadClock`] says, from what it last did, which
//! deadline its next read runs against: the response head's, counted from the request, or the
//! idle one, counted from the last byte received. `upstream::Watched` enforces it on every
//! upstream connection, whichever client (or Pingora) holds it; silence is then a failure
//! everywhere at once, and a new deadline is a field here and a line there.

use std::time::{Duration, Instant};

use crate::core::config::Config;

/// One upstream's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A connection must be made within this.
    pub connect: Duration,
    /// The response head must arrive within this of the request being sent.
    pub response: Duration,
    /// Inside a response, no byte at all for this long is a stall.
    pub idle: Duration,
    /// A pooled keep-alive connection idle longer than this is not reused.
    pub pool_idle: Duration,
}

impl Timeouts {
    /// `legacy.*`: the Chat API.
    pub fn legacy(config: &Config) -> Timeouts {
        let l = &config.legacy;
        Timeouts {
            connect: Duration::from_millis(l.connect_timeout_ms),
            response: Duration::from_millis(l.response_timeout_ms),
            idle: Duration::from_millis(l.idle_timeout_ms),
            pool_idle: Duration::from_millis(l.pool_idle_timeout_ms),
        }
    }

    /// `runtime.*`: the runtime orchestrator.
    pub fn runtime(config: &Config) -> Timeouts {
        let r = &config.runtime;
        Timeouts {
            connect: Duration::from_millis(r.connect_timeout_ms),
            response: Duration::from_millis(r.response_timeout_ms),
            idle: Duration::from_millis(r.idle_timeout_ms),
            pool_idle: Duration::from_millis(r.pool_idle_timeout_ms),
        }
    }

    /// How long `stage` allows.
    pub fn of(&self, stage: Stage) -> Duration {
        match stage {
            Stage::Connect => self.connect,
            Stage::Response => self.response,
            Stage::Idle => self.idle,
        }
    }
}

/// Which deadline passed; bounded, for `cutover_upstream_timeouts_total{stage}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// No connection within `connect_timeout_ms`.
    Connect,
    /// No response head within `response_timeout_ms` of the request.
    Response,
    /// No byte for `idle_timeout_ms` inside a response.
    Idle,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Connect, Stage::Response, Stage::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Response => "response",
            Stage::Idle => "idle",
        }
    }
}

/// Which upstream; bounded, for `cutover_upstream_timeouts_total{upstream}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamName {
    Legacy,
    Runtime,
    /// The fleet signal's Prometheus (its timeouts are the fleet's own, not a labelled series).
    Prometheus,
}

impl UpstreamName {
    pub const ALL: [UpstreamName; 2] = [UpstreamName::Legacy, UpstreamName::Runtime];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamName::Legacy => "legacy",
            UpstreamName::Runtime => "runtime",
            UpstreamName::Prometheus => "prometheus",
        }
    }
}

/// Where one connection's current exchange stands, for the deadline of its next read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadClock {
    awaiting_head: bool,
    /// When the request was sent (awaiting its head) or the last byte came (otherwise).
    since: Instant,
}

impl ReadClock {
    pub fn new(now: Instant) -> ReadClock {
        ReadClock {
            awaiting_head: false,
            since: now,
        }
    }

    /// The request, or more of it, went out: its answer's head is awaited from now.
    pub fn sent(&mut self, now: Instant) {
        self.awaiting_head = true;
        self.since = now;
    }

    /// Bytes came in. A head trickling in byte by byte is still a head that has not arrived:
    /// only [`ReadClock::head_received`] ends that wait.
    pub fn received(&mut self, now: Instant) {
        if !self.awaiting_head {
            self.since = now;
        }
    }

    /// A complete response head was read: from here on, silence is counted from each byte.
    pub fn head_received(&mut self, now: Instant) {
        self.awaiting_head = false;
        self.since = now;
    }

    /// The deadline the next read runs against, and which one it is.
    pub fn deadline(&self, timeouts: &Timeouts) -> (Stage, Instant) {
        let stage = if self.awaiting_head {
            Stage::Response
        } else {
            Stage::Idle
        };
        let at = self
            .since
            .checked_add(timeouts.of(stage))
            // Too far to name: as good as never.
            .unwrap_or(self.since + Duration::from_secs(365 * 24 * 3600));
        (stage, at)
    }
}

/// Deadlines for tests of the clock and of the reads it bounds.
#[cfg(test)]
pub const TEST_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_millis(100),
    response: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    pool_idle: Duration::from_secs(4),
};

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = TEST_TIMEOUTS;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn the_head_is_awaited_from_the_request_and_silence_from_each_byte() {
        let t0 = Instant::now();
        let mut c = ReadClock::new(t0);
        c.sent(at(t0, 1));
        assert_eq!(c.deadline(&T), (Stage::Response, at(t0, 11)));
        // Part of a head does not move the head's deadline.
        c.received(at(t0, 5));
        assert_eq!(c.deadline(&T), (Stage::Response, at(t0, 11)));
        c.head_received(at(t0, 6));
        assert_eq!(c.deadline(&T), (Stage::Idle, at(t0, 66)));
        c.received(at(t0, 30));
        assert_eq!(c.deadline(&T), (Stage::Idle, at(t0, 90)));
    }

    #[test]
    fn the_next_request_on_a_kept_connection_waits_for_its_own_head() {
        let t0 = Instant::now();
        let mut c = ReadClock::new(t0);
        c.sent(at(t0, 1));
        c.head_received(at(t0, 2));
        c.received(at(t0, 3));
        c.sent(at(t0, 100));
        assert_eq!(c.deadline(&T), (Stage::Response, at(t0, 110)));
    }

    #[test]
    fn labels_are_distinct_and_bounded() {
        let stages: Vec<_> = Stage::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(stages, ["connect", "response", "idle"]);
        let names: Vec<_> = UpstreamName::ALL.iter().map(|u| u.as_str()).collect();
        assert_eq!(names, ["legacy", "runtime"]);
    }

    #[test]
    fn the_policy_is_read_from_the_config() {
        let c = Config::parse(crate::core::config::MINIMAL).unwrap();
        let secs = Duration::from_secs;
        let timeouts = |connect, response, idle, pool_idle| Timeouts {
            connect: secs(connect),
            response: secs(response),
            idle: secs(idle),
            pool_idle: secs(pool_idle),
        };
        assert_eq!(Timeouts::legacy(&c), timeouts(1, 60, 300, 30));
        assert_eq!(Timeouts::runtime(&c), timeouts(1, 10, 60, 4));
    }
}
