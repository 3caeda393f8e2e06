//! The circuit breaker that keeps the runtime out when it misbehaves.
//!
//! [`Breaker`] is a pure state machine (Closed → Open → HalfOpen → Closed/Open) over a
//! [`stats::Window`](crate::core::stats::Window) of runtime outcomes; every call takes the time as an
//! `Instant`, so tests drive it without sleeping. [`SharedBreaker`] wraps it for the proxy: a mutex,
//! a lock-free mirror of the state for the hot path, `tracing` logs and transition callbacks.
//!
//! Rules (the external contract's "Breaker and failover"):
//! - Closed: every request is allowed. Outcomes go into the window; with at least `min_requests`
//!   samples, error rate > `error_rate`, timeout rate > `timeout_rate` or mean latency >
//!   `max_mean_latency` opens the breaker. So do `health_failures` consecutive failed health checks.
//! - Open: every request is rejected (served by legacy). Once `open_for` has passed, and the last
//!   health check did not fail, the clock alone turns it HalfOpen ([`Breaker::tick`]): the proxy
//!   ticks on every request and status read and on a timer at [`Breaker::retry_at`], so what is
//!   reported is never stale.
//! - HalfOpen: at most `half_open_probes` probes are in flight at once; `half_open_probes` probe
//!   successes close it (with a fresh window), one probe failure opens it again.
//! - A manual trip keeps it Open, whatever happens, until a manual reset.
//!
//! - With `[fleet]` on, a reading of every replica's runtime outcomes ([`Breaker::record_fleet`])
//!   opens a Closed breaker too when it crosses the same thresholds with at least
//!   `min_requests` samples fleet-wide; readings older than the last close never count
//!   (`core::fleet`). Half-open probes and closing stay local.
//!
//! Every opening names its [`Signal`]: the replica's own window, the fleet's, the health check,
//! a failed probe or a manual trip.
//!
//! Every `Probe` admission must end in exactly one `record(.., probe = true, ..)` or
//! `release_probe()`, or its slot stays taken.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::core::fleet::{FleetEvidence, FleetReading, FleetSignal};
use crate::core::stats::{Outcome, Window, WindowStats};

/// Breaker thresholds and timings, derived from `[breaker]` and `[runtime]` of proxy.toml.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Span of the sliding window of runtime outcomes.
    pub window: Duration,
    /// No threshold is evaluated on fewer samples.
    pub min_requests: u64,
    /// Open when the error rate is strictly above this (0..=1).
    pub error_rate: f64,
    /// Open when the timeout rate is strictly above this (0..=1).
    pub timeout_rate: f64,
    /// Open when the mean latency is strictly above this.
    pub max_mean_latency: Duration,
    /// How long Open lasts before probes are let through.
    pub open_for: Duration,
    /// Probe successes needed to close, and most probes in flight at once (0 acts as 1).
    pub half_open_probes: u32,
    /// Consecutive failed health checks that open the breaker (0 acts as 1).
    pub health_failures: u32,
}

impl BreakerSettings {
    /// `max_mean_latency` = `breaker.latency_ratio` × `runtime.execution_timeout_ms`;
    /// `health_failures` = `runtime.health_failures`.
    pub fn from_config(c: &crate::core::config::Config) -> Self {
        let b = &c.breaker;
        let nanos = c.runtime.execution_timeout_ms as f64 * 1e6 * b.latency_ratio;
        let max_mean_latency = if nanos.is_nan() || nanos <= 0.0 {
            Duration::ZERO
        } else if nanos >= u64::MAX as f64 {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos.round() as u64)
        };
        BreakerSettings {
            window: Duration::from_secs(b.window_secs),
            min_requests: b.min_requests,
            error_rate: b.error_rate,
            timeout_rate: b.timeout_rate,
            max_mean_latency,
            open_for: Duration::from_secs(b.open_secs),
            half_open_probes: b.half_open_probes,
            health_failures: c.runtime.health_failures,
        }
    }

    /// Why `stats` should open the breaker, or `None` when it should not: fewer than
    /// `min_requests` samples, or no threshold strictly exceeded. Checked in the order error
    /// rate, timeout rate, mean latency.
    pub fn exceeded(&self, stats: &WindowStats) -> Option<String> {
        let n = stats.total;
        if n == 0 || n < self.min_requests {
            return None;
        }
        let plural = if n == 1 { "request" } else { "requests" };
        let error_rate = stats.error_rate();
        if error_rate > self.error_rate {
            let (v, t) = fmt_pair(error_rate, self.error_rate, 2);
            return Some(format!("error rate {v} > {t} over {n} {plural}"));
        }
        let timeout_rate = stats.timeout_rate();
        if timeout_rate > self.timeout_rate {
            let (v, t) = fmt_pair(timeout_rate, self.timeout_rate, 2);
            return Some(format!("timeout rate {v} > {t} over {n} {plural}"));
        }
        // Exact integer comparison: sum > limit × n  ⇔  mean > limit.
        if stats.total_latency.as_nanos() > self.max_mean_latency.as_nanos() * u128::from(n) {
            let (v, t) = fmt_pair(
                stats.avg_latency_ms(),
                self.max_mean_latency.as_secs_f64() * 1000.0,
                0,
            );
            return Some(format!("mean latency {v} ms > {t} ms over {n} {plural}"));
        }
        None
    }

    /// Why a fleet reading should open the breaker, or `None`: the same thresholds as
    /// [`exceeded`](Self::exceeded) on the fleet's error and timeout rates, with at least
    /// `min_requests` samples fleet-wide (mean latency stays a replica's own judgement).
    pub fn fleet_exceeded(&self, e: &FleetEvidence) -> Option<String> {
        let n = e.samples.round();
        if n < 1.0 || n < self.min_requests as f64 {
            return None;
        }
        let scope = if e.since_close {
            "all replicas, since this one closed"
        } else {
            "all replicas"
        };
        let plural = if n == 1.0 { "request" } else { "requests" };
        if e.error_rate > self.error_rate {
            let (v, t) = fmt_pair(e.error_rate, self.error_rate, 2);
            return Some(format!("error rate {v} > {t} over {n} {plural}, {scope}"));
        }
        if e.timeout_rate > self.timeout_rate {
            let (v, t) = fmt_pair(e.timeout_rate, self.timeout_rate, 2);
            return Some(format!("timeout rate {v} > {t} over {n} {plural}, {scope}"));
        }
        None
    }

    fn probes(&self) -> u32 {
        self.half_open_probes.max(1)
    }

    fn health_limit(&self) -> u32 {
        self.health_failures.max(1)
    }
}

/// Format a measured value and its limit with at least `min_precision` decimals, adding
/// decimals (up to 6) until they read differently, so a reason never says "0.50 > 0.50".
fn fmt_pair(value: f64, limit: f64, min_precision: usize) -> (String, String) {
    let mut p = min_precision;
    loop {
        let (v, l) = (format!("{value:.p$}"), format!("{limit:.p$}"));
        if v != l || p >= 6 {
            return (v, l);
        }
        p += 1;
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Breaker state; `fallbackEnabled` in the admin API is `state != Closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// `closed` | `open` | `half_open`, as the admin API spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// True while the breaker keeps (some) traffic away from the runtime. HalfOpen counts: every
    /// request beyond the probes in flight still goes to legacy, and the runtime has not yet
    /// proved itself; `chat_runtime_fallback_enabled` and `fallbackEnabled` both follow this.
    pub fn fallback_enabled(self) -> bool {
        self != State::Closed
    }

    fn to_u8(self) -> u8 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What opened the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// This replica's own window of runtime outcomes.
    Local,
    /// The fleet's outcomes, read from Prometheus (`[fleet]`).
    Fleet,
    /// Consecutive failed health checks.
    Health,
    /// A half-open probe that failed.
    Probe,
    /// The kill switch.
    Manual,
}

impl Signal {
    pub const ALL: [Signal; 5] = [
        Signal::Local,
        Signal::Fleet,
        Signal::Health,
        Signal::Probe,
        Signal::Manual,
    ];

    /// `local` | `fleet` | `health` | `probe` | `manual`, as the metrics and the status name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Local => "local",
            Signal::Fleet => "fleet",
            Signal::Health => "health",
            Signal::Probe => "probe",
            Signal::Manual => "manual",
        }
    }
}

/// Answer to "may this request go to the runtime?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// HalfOpen: go ahead as a probe; report it with `probe = true` or `release_probe`.
    Probe,
    /// Serve it from legacy.
    Rejected,
}

/// A change of state, with the human-readable reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
    /// What opened it, for a transition to Open.
    pub signal: Option<Signal>,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)
    }
}

/// The breaker state machine. Not thread-safe by itself: see [`SharedBreaker`].
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    reason: String,
    manual: bool,
    /// Runtime outcomes recorded while Closed; cleared whenever the breaker closes.
    window: Window,
    opened_at: Instant,
    /// Probes admitted and not yet recorded or released (across half-open phases).
    probes_in_flight: u32,
    /// Probe successes in the current half-open phase.
    probe_successes: u32,
    /// Consecutive failed health checks.
    health_failures: u32,
    /// What opened it, while not Closed.
    signal: Option<Signal>,
    /// The fleet's readings, judged against the last close.
    fleet: FleetSignal,
}

impl Breaker {
    /// A closed breaker with an empty window.
    pub fn new(settings: BreakerSettings, now: Instant) -> Self {
        Breaker {
            window: Window::new(settings.window, now),
            settings,
            state: State::Closed,
            reason: String::new(),
            manual: false,
            opened_at: now,
            probes_in_flight: 0,
            probe_successes: 0,
            health_failures: 0,
            signal: None,
            fleet: FleetSignal::default(),
        }
    }

    /// Move to `to` for `reason`; `signal` names what opened it (kept while it is not Closed).
    fn transition(
        &mut self,
        to: State,
        reason: String,
        signal: Option<Signal>,
        now: Instant,
    ) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        self.reason.clone_from(&reason);
        self.probe_successes = 0;
        match to {
            State::Open => {
                self.opened_at = now;
                self.signal = signal;
            }
            State::Closed => {
                self.window.clear(now);
                self.signal = None;
                self.fleet.closed(now);
            }
            State::HalfOpen => {}
        }
        if from == to {
            None
        } else {
            Some(Transition {
                from,
                to,
                reason,
                signal: (to == State::Open).then_some(self.signal).flatten(),
            })
        }
    }

    fn take_probe(&mut self) -> Admission {
        if self.probes_in_flight < self.settings.probes() {
            self.probes_in_flight += 1;
            Admission::Probe
        } else {
            Admission::Rejected
        }
    }

    /// Ask to send one request to the runtime. Closed → `Allowed`. Open → `Rejected`, unless
    /// `open_for` has elapsed and the last health check did not fail, in which case it becomes
    /// HalfOpen and this request is its first probe. HalfOpen → `Probe` while fewer than
    /// `half_open_probes` probes are in flight, else `Rejected`. Manually tripped → `Rejected`.
    pub fn admit(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        if self.manual {
            return (Admission::Rejected, None);
        }
        match self.state {
            State::Closed => (Admission::Allowed, None),
            State::HalfOpen => (self.take_probe(), None),
            State::Open => match self.tick(now) {
                Some(t) => (self.take_probe(), Some(t)),
                None => (Admission::Rejected, None),
            },
        }
    }

    /// Let time act with no request to prompt it: Open turns HalfOpen once `open_for` has
    /// passed since it opened, unless it was tripped by hand or the last health check failed.
    /// The only transition a tick makes. Whoever reports the state ticks first, and a timer
    /// ticks at [`Breaker::retry_at`], so the state never waits for traffic to move.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        if self.state != State::Open || self.manual || self.health_failures > 0 {
            return None;
        }
        if now.saturating_duration_since(self.opened_at) < self.settings.open_for {
            return None;
        }
        let reason = format!(
            "half-open after {} open: letting up to {} probes through",
            fmt_duration(self.settings.open_for),
            self.settings.probes()
        );
        self.transition(State::HalfOpen, reason, None, now)
    }

    /// Outcome of a runtime execution; `probe` = it was admitted as `Probe`.
    ///
    /// Closed: recorded into the window, then the thresholds are evaluated (see
    /// [`BreakerSettings::exceeded`]). HalfOpen: a probe failure (error or timeout) opens the
    /// breaker again, the `half_open_probes`-th probe success closes it with a cleared window;
    /// non-probe outcomes (requests admitted before it opened) are ignored. Open: ignored, apart
    /// from freeing the probe slot.
    pub fn record(
        &mut self,
        outcome: Outcome,
        latency: Duration,
        probe: bool,
        now: Instant,
    ) -> Option<Transition> {
        if probe {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
        match self.state {
            State::Closed => {
                self.window.record(outcome, latency, now);
                let reason = self.settings.exceeded(&self.window.snapshot(now))?;
                self.transition(State::Open, reason, Some(Signal::Local), now)
            }
            State::HalfOpen if probe => {
                let needed = self.settings.probes();
                if outcome.is_failure() {
                    let reason = format!(
                        "half-open probe failed: {outcome} after {} of {needed} successes",
                        self.probe_successes
                    );
                    self.transition(State::Open, reason, Some(Signal::Probe), now)
                } else {
                    self.probe_successes += 1;
                    if self.probe_successes >= needed {
                        let plural = if needed == 1 { "probe" } else { "probes" };
                        let reason = format!("closed: {needed} {plural} succeeded");
                        self.transition(State::Closed, reason, None, now)
                    } else {
                        None
                    }
                }
            }
            _ => None,
        }
    }

    /// A probe that ended with no verdict (the client went away): free its slot.
    pub fn release_probe(&mut self) {
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
    }

    /// Background health check result. `health_failures` consecutive failures open the breaker
    /// ("health check failed N times: <detail>"); a success resets the count. While the last
    /// check failed, an Open breaker does not go HalfOpen.
    pub fn record_health(
        &mut self,
        healthy: bool,
        detail: &str,
        now: Instant,
    ) -> Option<Transition> {
        if healthy {
            self.health_failures = 0;
            return None;
        }
        self.health_failures = self.health_failures.saturating_add(1);
        if self.health_failures < self.settings.health_limit() || self.manual {
            return None;
        }
        let reason = format!(
            "health check failed {} times: {detail}",
            self.health_failures
        );
        if self.state == State::Open {
            // Already open: name the cause that now keeps it open, without a transition.
            self.reason = reason;
            self.signal = Some(Signal::Health);
            None
        } else {
            self.transition(State::Open, reason, Some(Signal::Health), now)
        }
    }

    /// Manual kill switch: Open until [`Breaker::reset`], whatever the probes or health say.
    /// `None` when it was already Open (the manual flag is still set).
    pub fn trip(&mut self, now: Instant) -> Option<Transition> {
        if self.manual {
            return None;
        }
        self.manual = true;
        if self.state == State::Open {
            self.reason = "tripped manually".to_owned();
            self.signal = Some(Signal::Manual);
            None
        } else {
            self.transition(
                State::Open,
                "tripped manually".to_owned(),
                Some(Signal::Manual),
                now,
            )
        }
    }

    /// Manual reset: Closed, window cleared, manual flag and health failure count cleared.
    /// `None` when it was already Closed (the window is cleared anyway).
    pub fn reset(&mut self, now: Instant) -> Option<Transition> {
        self.manual = false;
        self.health_failures = 0;
        self.window.clear(now);
        if self.state == State::Closed {
            None
        } else {
            self.transition(
                State::Closed,
                "closed: reset manually".to_owned(),
                None,
                now,
            )
        }
    }

    /// A reading of the fleet's runtime outcomes. A Closed breaker that is not tripped by hand
    /// opens when the reading counts (see `core::fleet`: not older than the last close) and
    /// crosses the thresholds with at least `min_requests` samples fleet-wide
    /// ([`BreakerSettings::fleet_exceeded`]); its reason starts with `fleet: `. Whatever the
    /// state, the reading is kept as the baseline of the next close.
    pub fn record_fleet(&mut self, reading: FleetReading, now: Instant) -> Option<Transition> {
        let evidence = self.fleet.observe(reading, self.settings.window)?;
        if self.state != State::Closed || self.manual {
            return None;
        }
        let why = self.settings.fleet_exceeded(&evidence)?;
        self.transition(
            State::Open,
            format!("fleet: {why}"),
            Some(Signal::Fleet),
            now,
        )
    }

    /// What opened the breaker, while it is not Closed.
    pub fn signal(&self) -> Option<Signal> {
        self.signal
    }

    /// The fleet's readings as this breaker holds them.
    pub fn fleet(&self) -> &FleetSignal {
        &self.fleet
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Reason of the latest transition (kept after closing, e.g. "closed: 3 probes succeeded");
    /// empty until the first one.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn manually_tripped(&self) -> bool {
        self.manual
    }

    /// Totals of the runtime outcomes recorded since the breaker last closed, over the window.
    pub fn window_stats(&self, now: Instant) -> WindowStats {
        self.window.snapshot(now)
    }

    /// Hot reload: new thresholds apply from the next call; the state is kept, and so is the
    /// window unless its span changed.
    pub fn set_settings(&mut self, s: BreakerSettings, now: Instant) {
        self.window.set_span(s.window, now);
        self.settings = s;
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Probes admitted and not yet recorded or released.
    pub fn probes_in_flight(&self) -> u32 {
        self.probes_in_flight
    }

    /// Consecutive failed health checks so far.
    pub fn health_failures(&self) -> u32 {
        self.health_failures
    }

    /// When the current open period ends: an Open breaker lets probes through from then on (if
    /// health allows); a HalfOpen one reports the end of the period that led to it, which is
    /// past. `None` when Closed or manually tripped.
    pub fn retry_at(&self) -> Option<Instant> {
        (self.state != State::Closed && !self.manual)
            .then(|| self.opened_at.checked_add(self.settings.open_for))
            .flatten()
    }
}

/// What the admin API reports about the breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerStatus {
    pub state: State,
    pub reason: String,
    pub manual: bool,
    /// What opened it, while not Closed.
    pub signal: Option<Signal>,
}

impl BreakerStatus {
    /// `fallbackEnabled`: true unless Closed.
    pub fn fallback_enabled(&self) -> bool {
        self.state.fallback_enabled()
    }
}

impl serde::Serialize for BreakerStatus {
    /// `{"fallbackEnabled","fallbackReason","state","manuallyTripped","openedBy"}`: the `data`
    /// object of `GET /runtime/fallback/status`, plus the manual flag and what opened it.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("BreakerStatus", 5)?;
        s.serialize_field("fallbackEnabled", &self.fallback_enabled())?;
        s.serialize_field("fallbackReason", &self.reason)?;
        s.serialize_field("state", &self.state)?;
        s.serialize_field("manuallyTripped", &self.manual)?;
        s.serialize_field("openedBy", &self.signal)?;
        s.end()
    }
}

type Callback = Box<dyn Fn(&Transition) + Send + Sync>;

/// A [`Breaker`] shared by the proxy's threads.
///
/// Methods read `Instant::now()` themselves (after taking the lock, so the breaker sees time
/// move forward). Each transition is logged with `tracing::warn!` and passed to the
/// [`on_transition`](SharedBreaker::on_transition) callbacks, in order, while the lock is
/// held: a callback must not call this breaker's methods other than [`state`](Self::state).
pub struct SharedBreaker {
    inner: Mutex<Breaker>,
    state: AtomicU8,
    callbacks: RwLock<Vec<Callback>>,
}

impl SharedBreaker {
    pub fn new(b: Breaker) -> Self {
        SharedBreaker {
            state: AtomicU8::new(b.state().to_u8()),
            inner: Mutex::new(b),
            callbacks: RwLock::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Breaker> {
        // A panicking callback must not take the breaker down with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the breaker under the lock, then publish its state and any transition.
    fn apply<R>(&self, f: impl FnOnce(&mut Breaker, Instant) -> (R, Option<Transition>)) -> R {
        let mut b = self.lock();
        let (r, t) = f(&mut b, Instant::now());
        self.state.store(b.state().to_u8(), Ordering::Release);
        if let Some(t) = t {
            tracing::warn!(
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = %t.reason,
                "runtime circuit breaker {} -> {}: {}",
                t.from,
                t.to,
                t.reason
            );
            let callbacks = self.callbacks.read().unwrap_or_else(|e| e.into_inner());
            for cb in callbacks.iter() {
                cb(&t);
            }
        }
        r
    }

    /// See [`Breaker::admit`]. Lock-free while Closed.
    pub fn admit(&self) -> Admission {
        if self.state() == State::Closed {
            return Admission::Allowed;
        }
        self.apply(|b, now| b.admit(now))
    }

    /// See [`Breaker::record`].
    pub fn record(&self, outcome: Outcome, latency: Duration, probe: bool) {
        self.apply(|b, now| ((), b.record(outcome, latency, probe, now)))
    }

    /// See [`Breaker::release_probe`].
    pub fn release_probe(&self) {
        self.apply(|b, _| {
            b.release_probe();
            ((), None)
        })
    }

    /// See [`Breaker::record_health`].
    pub fn record_health(&self, healthy: bool, detail: &str) {
        self.apply(|b, now| ((), b.record_health(healthy, detail, now)))
    }

    /// Manual kill switch; see [`Breaker::trip`].
    pub fn trip(&self) {
        self.apply(|b, now| ((), b.trip(now)))
    }

    /// Manual reset; see [`Breaker::reset`].
    pub fn reset(&self) {
        self.apply(|b, now| ((), b.reset(now)))
    }

    /// A reading of the fleet; see [`Breaker::record_fleet`].
    pub fn record_fleet(&self, reading: FleetReading) {
        self.apply(|b, now| ((), b.record_fleet(reading, now)))
    }

    /// Current state, without taking the lock.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// See [`Breaker::tick`]; returns the state after it. Lock-free unless Open.
    pub fn tick(&self) -> State {
        if self.state() != State::Open {
            return self.state();
        }
        self.apply(|b, now| {
            let t = b.tick(now);
            (b.state(), t)
        })
    }

    /// The state as it last moved; see [`report`](Self::report) for what to show.
    pub fn status(&self) -> BreakerStatus {
        let b = self.lock();
        BreakerStatus {
            state: b.state(),
            reason: b.reason().to_owned(),
            manual: b.manually_tripped(),
            signal: b.signal(),
        }
    }

    /// The status as of now, for the admin API: ticked first (in the same lock), so an open
    /// period that is over reads `half_open` whether or not a request came since.
    pub fn report(&self) -> BreakerStatus {
        self.apply(|b, now| {
            let t = b.tick(now);
            let status = BreakerStatus {
                state: b.state(),
                reason: b.reason().to_owned(),
                manual: b.manually_tripped(),
                signal: b.signal(),
            };
            (status, t)
        })
    }

    /// See [`Breaker::retry_at`].
    pub fn retry_at(&self) -> Option<Instant> {
        self.lock().retry_at()
    }

    /// See [`Breaker::window_stats`].
    pub fn window_stats(&self) -> WindowStats {
        let b = self.lock();
        b.window_stats(Instant::now())
    }

    /// Hot reload; see [`Breaker::set_settings`].
    pub fn set_settings(&self, s: BreakerSettings) {
        self.apply(|b, now| {
            b.set_settings(s, now);
            ((), None)
        })
    }

    /// Call `f` with every future transition (e.g. to update the fallback gauge).
    pub fn on_transition(&self, f: impl Fn(&Transition) + Send + Sync + 'static) {
        self.callbacks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// Run `f` on the inner breaker under the lock (tests, diagnostics). Transitions made
    /// through it are neither logged nor passed to callbacks, but the state mirror is updated.
    pub fn with_breaker<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> R {
        self.apply(|b, _| (f(b), None))
    }
}

impl fmt::Debug for SharedBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBreaker")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fleet::FleetCounts;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    const MS: Duration = Duration::from_millis(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: secs(60),
            min_requests: 10,
            error_rate: 0.5,
            timeout_rate: 0.3,
            max_mean_latency: 100 * MS,
            open_for: secs(30),
            half_open_probes: 3,
            health_failures: 3,
        }
    }

    fn record_n(b: &mut Breaker, n: usize, outcome: Outcome, now: Instant) -> Option<Transition> {
        let mut last = None;
        for _ in 0..n {
            if let Some(t) = b.record(outcome, 10 * MS, false, now) {
                assert!(last.is_none(), "two transitions");
                last = Some(t);
            }
        }
        last
    }

    /// A new breaker with the default test settings, and the time it was made.
    fn closed() -> (Breaker, Instant) {
        closed_with(settings())
    }

    /// A new breaker with these settings, and the time it was made.
    fn closed_with(s: BreakerSettings) -> (Breaker, Instant) {
        let t0 = Instant::now();
        (Breaker::new(s, t0), t0)
    }

    /// A status in `state`, falling back to legacy, for a reason that starts with `reason`.
    fn falls_back(status: &BreakerStatus, state: State, reason: &str) {
        assert_eq!(status.state, state);
        assert!(status.fallback_enabled());
        assert!(status.reason.starts_with(reason), "{}", status.reason);
    }

    /// A breaker opened by errors at `t0`.
    fn opened(t0: Instant) -> Breaker {
        opened_with(settings(), t0)
    }

    /// A breaker with these settings, opened by errors at `t0`.
    fn opened_with(s: BreakerSettings, t0: Instant) -> Breaker {
        let mut b = Breaker::new(s, t0);
        let t = record_n(&mut b, 10, Outcome::Error, t0).unwrap();
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        b
    }

    /// A breaker opened by errors that half-opens with `probes` probes, and the time it first
    /// admits them (`open_for` after it opened).
    fn half_opening(probes: u32) -> (Breaker, Instant) {
        let t0 = Instant::now();
        let s = BreakerSettings {
            half_open_probes: probes,
            ..settings()
        };
        (opened_with(s, t0), t0 + secs(30))
    }

    #[test]
    fn starts_closed_and_allows() {
        let (mut b, t0) = closed();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.reason(), "");
        assert!(!b.manually_tripped());
        assert_eq!(b.admit(t0), (Admission::Allowed, None));
        assert_eq!(b.retry_at(), None);
    }

    #[test]
    fn error_rate_opens_only_strictly_above_threshold() {
        let (mut b, t0) = closed();
        assert_eq!(record_n(&mut b, 5, Outcome::Success, t0), None);
        // 5 of 10: exactly 0.5, not above.
        assert_eq!(record_n(&mut b, 5, Outcome::Error, t0), None);
        assert_eq!(b.state(), State::Closed);
        let t = b.record(Outcome::Error, 10 * MS, false, t0).unwrap();
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert_eq!(t.reason, "error rate 0.55 > 0.50 over 11 requests");
        assert_eq!(b.reason(), t.reason);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t0).0, Admission::Rejected);
    }

    #[test]
    fn timeout_rate_opens_only_strictly_above_threshold() {
        let (mut b, t0) = closed();
        record_n(&mut b, 7, Outcome::Success, t0);
        // 3 of 10: exactly 0.3.
        assert_eq!(record_n(&mut b, 3, Outcome::Timeout, t0), None);
        let t = b.record(Outcome::Timeout, 10 * MS, false, t0).unwrap();
        assert_eq!(t.to, State::Open);
        assert_eq!(t.reason, "timeout rate 0.36 > 0.30 over 11 requests");
    }

    #[test]
    fn mean_latency_opens_only_strictly_above_threshold() {
        let (mut b, t0) = closed();
        for _ in 0..10 {
            assert_eq!(b.record(Outcome::Success, 100 * MS, false, t0), None);
        }
        // Mean exactly 100 ms: not above.
        assert_eq!(b.state(), State::Closed);
        let t = b.record(Outcome::Success, 111 * MS, false, t0).unwrap();
        assert_eq!(t.to, State::Open);
        assert_eq!(t.reason, "mean latency 101 ms > 100 ms over 11 requests");
    }

    #[test]
    fn latency_counts_failures_too() {
        let (mut b, t0) = closed_with(BreakerSettings {
            error_rate: 1.0,
            timeout_rate: 1.0,
            ..settings()
        });
        for _ in 0..9 {
            b.record(Outcome::Success, MS, false, t0);
        }
        let t = b.record(Outcome::Timeout, secs(2), false, t0).unwrap();
        assert_eq!(t.reason, "mean latency 201 ms > 100 ms over 10 requests");
    }

    #[test]
    fn no_decision_below_min_requests() {
        let (mut b, t0) = closed();
        assert_eq!(record_n(&mut b, 9, Outcome::Error, t0), None);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.window_stats(t0).error, 9);
        let t = b.record(Outcome::Error, 10 * MS, false, t0).unwrap();
        assert_eq!(t.reason, "error rate 1.00 > 0.50 over 10 requests");
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let t0 = Instant::now();
        // Within the window, the 10th error opens it ...
        let mut b = Breaker::new(settings(), t0);
        record_n(&mut b, 9, Outcome::Error, t0);
        assert!(b.record(Outcome::Error, MS, false, t0 + secs(30)).is_some());
        // ... but not once the first nine have slid out.
        let mut b = Breaker::new(settings(), t0);
        record_n(&mut b, 9, Outcome::Error, t0);
        assert_eq!(b.record(Outcome::Error, MS, false, t0 + secs(61)), None);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.window_stats(t0 + secs(61)).total, 1);
    }

    #[test]
    fn open_rejects_then_goes_half_open_after_open_for() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        assert_eq!(b.retry_at(), Some(t0 + secs(30)));
        assert_eq!(b.admit(t0 + secs(1)), (Admission::Rejected, None));
        assert_eq!(
            b.admit(t0 + secs(30) - Duration::from_nanos(1)),
            (Admission::Rejected, None)
        );
        let (a, t) = b.admit(t0 + secs(30));
        assert_eq!(a, Admission::Probe);
        let t = t.unwrap();
        assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
        assert_eq!(
            t.reason,
            "half-open after 30s open: letting up to 3 probes through"
        );
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.probes_in_flight(), 1);
    }

    #[test]
    fn tick_half_opens_at_retry_at_with_no_request() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let at = b.retry_at().unwrap();
        assert_eq!(b.tick(t0), None);
        assert_eq!(b.tick(at - Duration::from_nanos(1)), None);
        assert_eq!(b.state(), State::Open);
        let t = b.tick(at).unwrap();
        assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
        assert_eq!(
            t.reason,
            "half-open after 30s open: letting up to 3 probes through"
        );
        assert_eq!(b.reason(), t.reason);
        // A tick takes no probe slot: the first request after it is still a probe.
        assert_eq!(b.probes_in_flight(), 0);
        assert_eq!(b.retry_at(), Some(at));
        assert_eq!(b.tick(at + secs(3600)), None);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(at + secs(1)), (Admission::Probe, None));
    }

    #[test]
    fn tick_changes_nothing_but_an_open_period_that_is_over() {
        let (mut b, t0) = closed();
        assert_eq!(b.tick(t0 + secs(3600)), None);
        assert_eq!(b.state(), State::Closed);

        // Tripped by hand: open whatever the clock says.
        b.trip(t0);
        assert_eq!(b.tick(t0 + secs(3600)), None);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.reason(), "tripped manually");

        // Opened by errors, then tripped: still held.
        let mut b = opened(t0);
        b.trip(t0 + secs(1));
        assert_eq!(b.tick(t0 + secs(31)), None);
        assert_eq!(b.state(), State::Open);
        b.reset(t0 + secs(32));
        assert_eq!(b.tick(t0 + secs(3600)), None);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn tick_waits_while_the_last_health_check_failed() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.record_health(false, "503", t0 + secs(10));
        assert_eq!(b.tick(t0 + secs(31)), None);
        assert_eq!(b.tick(t0 + secs(300)), None);
        assert_eq!(b.state(), State::Open);
        b.record_health(true, "", t0 + secs(301));
        let t = b.tick(t0 + secs(301)).unwrap();
        assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
    }

    #[test]
    fn tick_follows_a_reopening_from_half_open() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.tick(t0 + secs(30));
        assert_eq!(b.admit(t0 + secs(31)).0, Admission::Probe);
        let t = b.record(Outcome::Error, MS, true, t0 + secs(40)).unwrap();
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        // The new open period counts from the reopening, not from the first opening.
        assert_eq!(b.retry_at(), Some(t0 + secs(70)));
        assert_eq!(b.tick(t0 + secs(69)), None);
        assert_eq!(b.tick(t0 + secs(70)).unwrap().to, State::HalfOpen);
    }

    #[test]
    fn half_open_closes_after_enough_probe_successes() {
        let (mut b, t1) = half_opening(3);
        for _ in 0..3 {
            assert_eq!(b.admit(t1).0, Admission::Probe);
        }
        assert_eq!(b.admit(t1), (Admission::Rejected, None));
        assert_eq!(b.record(Outcome::Success, MS, true, t1), None);
        assert_eq!(b.record(Outcome::Success, MS, true, t1), None);
        assert_eq!(b.state(), State::HalfOpen);
        let t = b.record(Outcome::Success, MS, true, t1).unwrap();
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert_eq!(t.reason, "closed: 3 probes succeeded");
        assert_eq!(b.reason(), "closed: 3 probes succeeded");
        assert_eq!(b.probes_in_flight(), 0);
        // The old failures are gone: one more error does not reopen it.
        assert_eq!(b.window_stats(t1).total, 0);
        assert_eq!(b.record(Outcome::Error, MS, false, t1), None);
        assert_eq!(b.admit(t1), (Admission::Allowed, None));
    }

    #[test]
    fn probe_slot_freed_by_success_admits_another_probe() {
        let (mut b, t1) = half_opening(3);
        for _ in 0..3 {
            b.admit(t1);
        }
        b.record(Outcome::Success, MS, true, t1);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        assert_eq!(b.admit(t1).0, Admission::Rejected);
    }

    #[test]
    fn one_probe_failure_reopens() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + secs(30);
        b.admit(t1);
        b.admit(t1);
        assert!(b.record(Outcome::Success, MS, true, t1).is_none());
        let t2 = t1 + secs(1);
        let t = b.record(Outcome::Timeout, MS, true, t2).unwrap();
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        assert_eq!(
            t.reason,
            "half-open probe failed: timeout after 1 of 3 successes"
        );
        // Open for another open_for, counted from the failure.
        assert_eq!(b.admit(t2 + secs(29)).0, Admission::Rejected);
        let (a, t) = b.admit(t2 + secs(30));
        assert_eq!(a, Admission::Probe);
        assert_eq!(t.unwrap().to, State::HalfOpen);
        // Successes from the earlier phase do not carry over.
        b.record(Outcome::Success, MS, true, t2 + secs(30));
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn probe_error_reopens() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.admit(t0 + secs(30));
        let t = b.record(Outcome::Error, MS, true, t0 + secs(30)).unwrap();
        assert_eq!(t.to, State::Open);
        assert_eq!(
            t.reason,
            "half-open probe failed: error after 0 of 3 successes"
        );
    }

    #[test]
    fn probe_concurrency_is_bounded_and_release_frees_a_slot() {
        let (mut b, t1) = half_opening(2);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        for _ in 0..5 {
            assert_eq!(b.admit(t1).0, Admission::Rejected);
        }
        assert_eq!(b.probes_in_flight(), 2);
        b.release_probe();
        assert_eq!(b.probes_in_flight(), 1);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        assert_eq!(b.admit(t1).0, Admission::Rejected);
        // A released probe is no verdict: still half-open.
        assert_eq!(b.state(), State::HalfOpen);
        // Releasing more than was admitted does not underflow.
        for _ in 0..5 {
            b.release_probe();
        }
        assert_eq!(b.probes_in_flight(), 0);
    }

    #[test]
    fn probes_from_an_earlier_phase_still_count_against_the_bound() {
        let (mut b, t1) = half_opening(2);
        b.admit(t1);
        b.admit(t1);
        // One fails: open again, the other is still running.
        b.record(Outcome::Error, MS, true, t1);
        let t2 = t1 + secs(30);
        assert_eq!(b.admit(t2).0, Admission::Probe);
        assert_eq!(b.admit(t2).0, Admission::Rejected);
        // The straggler's success counts for the new phase and frees its slot.
        b.record(Outcome::Success, MS, true, t2);
        assert_eq!(b.probes_in_flight(), 1);
        let t = b.record(Outcome::Success, MS, true, t2).unwrap();
        assert_eq!(t.to, State::Closed);
    }

    #[test]
    fn non_probe_outcomes_are_ignored_unless_closed() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        // A request admitted before it opened finishes while Open, then while HalfOpen.
        assert_eq!(b.record(Outcome::Success, MS, false, t0), None);
        b.admit(t0 + secs(30));
        assert_eq!(b.record(Outcome::Error, MS, false, t0 + secs(30)), None);
        assert_eq!(b.record(Outcome::Success, MS, false, t0 + secs(30)), None);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.probes_in_flight(), 1);
    }

    #[test]
    fn late_probe_outcome_while_closed_is_a_normal_sample() {
        let (mut b, t1) = half_opening(1);
        b.admit(t1);
        b.release_probe();
        b.admit(t1);
        b.record(Outcome::Success, MS, true, t1);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.record(Outcome::Error, MS, true, t1), None);
        assert_eq!(b.window_stats(t1).error, 1);
        assert_eq!(b.probes_in_flight(), 0);
    }

    #[test]
    fn manual_trip_stays_open_until_reset() {
        let (mut b, t0) = closed();
        let t = b.trip(t0).unwrap();
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert_eq!(t.reason, "tripped manually");
        assert!(b.manually_tripped());
        assert_eq!(b.retry_at(), None);
        assert_eq!(b.trip(t0), None);
        for later in [secs(30), secs(31), secs(3600)] {
            assert_eq!(b.admit(t0 + later), (Admission::Rejected, None));
        }
        assert_eq!(b.state(), State::Open);
        // Health does not override it either.
        assert_eq!(b.record_health(true, "", t0 + secs(40)), None);
        for _ in 0..5 {
            assert_eq!(b.record_health(false, "down", t0 + secs(40)), None);
        }
        assert_eq!(b.reason(), "tripped manually");
        let t = b.reset(t0 + secs(3600)).unwrap();
        assert_eq!((t.from, t.to), (State::Open, State::Closed));
        assert_eq!(t.reason, "closed: reset manually");
        assert!(!b.manually_tripped());
        assert_eq!(b.admit(t0 + secs(3600)).0, Admission::Allowed);
    }

    #[test]
    fn trip_while_open_or_half_open() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        assert_eq!(b.trip(t0), None);
        assert!(b.manually_tripped());
        assert_eq!(b.reason(), "tripped manually");
        assert_eq!(b.admit(t0 + secs(60)).0, Admission::Rejected);

        let mut b = opened(t0);
        b.admit(t0 + secs(30));
        let t = b.trip(t0 + secs(30)).unwrap();
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        // The outstanding probe's success does not close it.
        assert_eq!(b.record(Outcome::Success, MS, true, t0 + secs(31)), None);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn reset_closes_and_clears() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.record_health(false, "x", t0);
        let t = b.reset(t0).unwrap();
        assert_eq!(t.to, State::Closed);
        assert_eq!(b.window_stats(t0).total, 0);
        assert_eq!(b.health_failures(), 0);
        assert_eq!(record_n(&mut b, 9, Outcome::Error, t0), None);
        // Reset while closed clears the window too.
        assert_eq!(b.reset(t0), None);
        assert_eq!(b.window_stats(t0).total, 0);
        assert_eq!(b.reason(), "closed: reset manually");
    }

    #[test]
    fn consecutive_health_failures_open() {
        let (mut b, t0) = closed();
        assert_eq!(b.record_health(false, "timeout", t0), None);
        assert_eq!(b.record_health(false, "timeout", t0), None);
        assert_eq!(b.record_health(true, "", t0), None);
        assert_eq!(b.health_failures(), 0);
        assert_eq!(b.record_health(false, "timeout", t0), None);
        assert_eq!(b.record_health(false, "timeout", t0), None);
        assert_eq!(b.state(), State::Closed);
        let t = b.record_health(false, "connection refused", t0).unwrap();
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert_eq!(t.reason, "health check failed 3 times: connection refused");
        // Further failures keep it open with an up-to-date reason, no new transition.
        assert_eq!(b.record_health(false, "connection refused", t0), None);
        assert_eq!(
            b.reason(),
            "health check failed 4 times: connection refused"
        );
    }

    #[test]
    fn health_failures_reaching_limit_while_half_open_reopen() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.admit(t0 + secs(30));
        b.record_health(false, "503", t0 + secs(31));
        b.record_health(false, "503", t0 + secs(32));
        let t = b.record_health(false, "503", t0 + secs(33)).unwrap();
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    }

    #[test]
    fn failing_health_blocks_half_open_until_it_recovers() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        // One failure is below the limit but still blocks probing.
        assert_eq!(b.record_health(false, "503", t0 + secs(10)), None);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t0 + secs(31)), (Admission::Rejected, None));
        assert_eq!(b.admit(t0 + secs(300)), (Admission::Rejected, None));
        b.record_health(true, "", t0 + secs(301));
        let (a, t) = b.admit(t0 + secs(301));
        assert_eq!(a, Admission::Probe);
        assert_eq!(t.unwrap().to, State::HalfOpen);
    }

    #[test]
    fn health_opened_breaker_recovers_without_manual_step() {
        let (mut b, t0) = closed();
        for _ in 0..3 {
            b.record_health(false, "refused", t0);
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t0 + secs(60)).0, Admission::Rejected);
        b.record_health(true, "", t0 + secs(60));
        let t1 = t0 + secs(61);
        for _ in 0..3 {
            assert_eq!(b.admit(t1).0, Admission::Probe);
        }
        for _ in 0..3 {
            b.record(Outcome::Success, MS, true, t1);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn set_settings_takes_effect_and_keeps_state() {
        let (mut b, t0) = closed();
        record_n(&mut b, 4, Outcome::Error, t0);
        let mut s = settings();
        s.min_requests = 5;
        b.set_settings(s.clone(), t0);
        assert_eq!(b.settings(), &s);
        // Same window span: the four errors are kept.
        assert_eq!(b.window_stats(t0).total, 4);
        let t = b.record(Outcome::Error, MS, false, t0).unwrap();
        assert_eq!(t.reason, "error rate 1.00 > 0.50 over 5 requests");
        // Open stays open; a shorter open_for applies to the current open period.
        s.open_for = secs(5);
        b.set_settings(s.clone(), t0 + secs(1));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t0 + secs(5)).0, Admission::Probe);
        // Fewer probes needed now.
        s.half_open_probes = 1;
        b.set_settings(s.clone(), t0 + secs(5));
        let t = b.record(Outcome::Success, MS, true, t0 + secs(5)).unwrap();
        assert_eq!(t.reason, "closed: 1 probe succeeded");
        // A new span restarts the window.
        record_n(&mut b, 3, Outcome::Error, t0 + secs(6));
        s.window = secs(10);
        b.set_settings(s, t0 + secs(7));
        assert_eq!(b.window_stats(t0 + secs(7)).total, 0);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn raising_a_threshold_stops_it_opening() {
        let (mut b, t0) = closed();
        let mut s = settings();
        s.error_rate = 1.0;
        b.set_settings(s, t0);
        assert_eq!(record_n(&mut b, 20, Outcome::Error, t0), None);
    }

    #[test]
    fn zero_probes_and_zero_health_failures_act_as_one() {
        let (mut b, t0) = closed_with(BreakerSettings {
            half_open_probes: 0,
            health_failures: 0,
            ..settings()
        });
        assert!(b.record_health(false, "x", t0).is_some());
        b.record_health(true, "", t0);
        assert_eq!(b.admit(t0 + secs(30)).0, Admission::Probe);
        assert_eq!(b.admit(t0 + secs(30)).0, Admission::Rejected);
        assert!(b
            .record(Outcome::Success, MS, true, t0 + secs(30))
            .is_some());
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_half_open() {
        let t0 = Instant::now() + secs(100);
        let mut b = opened(t0);
        assert_eq!(b.admit(t0 - secs(50)).0, Admission::Rejected);
        assert_eq!(b.record(Outcome::Error, MS, false, t0 - secs(50)), None);
    }

    #[test]
    fn reason_formatting() {
        assert_eq!(fmt_pair(0.83333, 0.5, 2), ("0.83".into(), "0.50".into()));
        assert_eq!(fmt_pair(0.501, 0.5, 2), ("0.501".into(), "0.500".into()));
        assert_eq!(
            fmt_pair(0.5000001, 0.5, 2),
            ("0.500000".into(), "0.500000".into())
        );
        assert_eq!(
            fmt_pair(240000.4, 240000.0, 0),
            ("240000.4".into(), "240000.0".into())
        );
        let s = BreakerSettings {
            min_requests: 1,
            ..settings()
        };
        let one = WindowStats {
            total: 1,
            error: 1,
            ..WindowStats::default()
        };
        assert_eq!(
            s.exceeded(&one).as_deref(),
            Some("error rate 1.00 > 0.50 over 1 request")
        );
        assert_eq!(fmt_duration(secs(30)), "30s");
        assert_eq!(fmt_duration(1500 * MS), "1500ms");
    }

    #[test]
    fn exceeded_checks_in_order_and_needs_min_requests() {
        let s = settings();
        let mut st = WindowStats {
            total: 10,
            success: 0,
            error: 6,
            timeout: 4,
            total_latency: secs(10),
        };
        assert!(s.exceeded(&st).unwrap().starts_with("error rate 0.60"));
        st.error = 5;
        st.success = 1;
        assert!(s.exceeded(&st).unwrap().starts_with("timeout rate 0.40"));
        st.timeout = 3;
        st.success = 2;
        assert_eq!(
            s.exceeded(&st).as_deref(),
            Some("mean latency 1000 ms > 100 ms over 10 requests")
        );
        st.total_latency = secs(1);
        assert_eq!(s.exceeded(&st), None);
        assert_eq!(s.exceeded(&WindowStats::default()), None);
        let few = WindowStats {
            total: 9,
            error: 9,
            ..WindowStats::default()
        };
        assert_eq!(s.exceeded(&few), None);
    }

    #[test]
    fn settings_from_config() {
        let c = crate::core::config::Config::parse(crate::core::config::MINIMAL).unwrap();
        let s = BreakerSettings::from_config(&c);
        // The contract's thresholds (with `execution_timeout_ms` = 300000, `health_failures` = 3).
        assert_eq!(
            s,
            BreakerSettings {
                window: secs(300),
                min_requests: 10,
                error_rate: 0.5,
                timeout_rate: 0.3,
                max_mean_latency: secs(240),
                open_for: secs(30),
                half_open_probes: 3,
                health_failures: 3,
            }
        );

        let text = format!(
            "{}execution_timeout_ms = 1000\ncommit_timeout_ms = 500\nhealth_failures = 5\n[breaker]\nwindow_secs = 60\n\
             min_requests = 4\nerror_rate = 0.25\ntimeout_rate = 0.1\nlatency_ratio = 0.3\n\
             open_secs = 7\nhalf_open_probes = 2\n",
            crate::core::config::MINIMAL.trim_start()
        );
        let c = crate::core::config::Config::parse(&text).unwrap();
        assert_eq!(
            BreakerSettings::from_config(&c),
            BreakerSettings {
                window: secs(60),
                min_requests: 4,
                error_rate: 0.25,
                timeout_rate: 0.1,
                max_mean_latency: 300 * MS,
                open_for: secs(7),
                half_open_probes: 2,
                health_failures: 5,
            }
        );

        let mut c = c;
        c.breaker.latency_ratio = 1e300;
        assert_eq!(
            BreakerSettings::from_config(&c).max_mean_latency,
            Duration::MAX
        );
    }

    fn reading(taken_at: Instant, total: f64, error: f64, timeout: f64) -> FleetReading {
        FleetReading {
            taken_at,
            counts: FleetCounts {
                total,
                error,
                timeout,
            },
        }
    }

    #[test]
    fn the_fleet_opens_a_closed_breaker_and_says_so() {
        let (mut b, t0) = closed();
        // This replica saw two errors: far from min_requests on its own.
        record_n(&mut b, 2, Outcome::Error, t0);
        let t = b.record_fleet(reading(t0, 12.0, 9.0, 0.0), t0).unwrap();
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert_eq!(
            t.reason,
            "fleet: error rate 0.75 > 0.50 over 12 requests, all replicas"
        );
        assert_eq!(t.signal, Some(Signal::Fleet));
        assert_eq!(b.signal(), Some(Signal::Fleet));
        assert_eq!(b.admit(t0).0, Admission::Rejected);
        // Probes and closing stay local: a failing fleet reading while half-open changes nothing.
        let t1 = t0 + secs(30);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        assert_eq!(b.record_fleet(reading(t1, 40.0, 40.0, 0.0), t1), None);
        assert_eq!(b.state(), State::HalfOpen);
        for _ in 0..2 {
            assert_eq!(b.admit(t1).0, Admission::Probe);
        }
        for _ in 0..3 {
            b.record(Outcome::Success, MS, true, t1);
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.signal(), None);
    }

    #[test]
    fn the_fleet_needs_min_requests_and_a_crossed_threshold() {
        let (mut b, t0) = closed();
        assert_eq!(b.record_fleet(reading(t0, 9.0, 9.0, 0.0), t0), None);
        assert_eq!(b.record_fleet(reading(t0, 20.0, 10.0, 6.0), t0), None);
        let t = b.record_fleet(reading(t0, 20.0, 10.0, 7.0), t0).unwrap();
        assert_eq!(
            t.reason,
            "fleet: timeout rate 0.35 > 0.30 over 20 requests, all replicas"
        );
    }

    #[test]
    fn a_fleet_reading_older_than_the_last_close_does_not_reopen_it() {
        let (mut b, t0) = closed();
        // Opened by the fleet, then closed by its own probes at t1.
        b.record_fleet(reading(t0, 12.0, 12.0, 0.0), t0).unwrap();
        let t1 = t0 + secs(31);
        for _ in 0..3 {
            b.admit(t1);
        }
        for _ in 0..3 {
            b.record(Outcome::Success, MS, true, t1);
        }
        assert_eq!(b.state(), State::Closed);
        // A poll sent before the close and answered after it.
        assert_eq!(
            b.record_fleet(reading(t1 - secs(1), 14.0, 12.0, 0.0), t1 + secs(1)),
            None
        );
        // Taken after it, the same failures are nothing new.
        assert_eq!(
            b.record_fleet(reading(t1 + secs(5), 20.0, 12.0, 0.0), t1 + secs(5)),
            None
        );
        assert_eq!(b.state(), State::Closed);
        // New failures since the close do reopen it.
        let t = b
            .record_fleet(reading(t1 + secs(10), 32.0, 24.0, 0.0), t1 + secs(10))
            .unwrap();
        assert_eq!(
            t.reason,
            "fleet: error rate 0.60 > 0.50 over 18 requests, all replicas, since this one closed"
        );
    }

    #[test]
    fn a_manual_trip_or_reset_keeps_its_own_signal() {
        let (mut b, t0) = closed();
        b.trip(t0);
        assert_eq!(b.record_fleet(reading(t0, 12.0, 12.0, 0.0), t0), None);
        assert_eq!(b.signal(), Some(Signal::Manual));
        b.reset(t0 + secs(1));
        // The reset is a close: the reading before it does not count again.
        assert_eq!(
            b.record_fleet(reading(t0 + secs(2), 12.0, 12.0, 0.0), t0 + secs(2)),
            None
        );
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn every_opening_names_its_signal() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        assert_eq!(b.signal(), Some(Signal::Local));
        b.admit(t0 + secs(30));
        let t = b.record(Outcome::Error, MS, true, t0 + secs(30)).unwrap();
        assert_eq!(t.signal, Some(Signal::Probe));
        let mut b = Breaker::new(settings(), t0);
        for _ in 0..3 {
            b.record_health(false, "503", t0);
        }
        assert_eq!(b.signal(), Some(Signal::Health));
        b.trip(t0);
        assert_eq!(b.signal(), Some(Signal::Manual));
    }

    #[test]
    fn names_and_display() {
        assert_eq!(State::Closed.as_str(), "closed");
        assert_eq!(State::Open.as_str(), "open");
        assert_eq!(State::HalfOpen.as_str(), "half_open");
        assert!(!State::Closed.fallback_enabled());
        assert!(State::HalfOpen.fallback_enabled() && State::Open.fallback_enabled());
        for s in [State::Closed, State::Open, State::HalfOpen] {
            assert_eq!(State::from_u8(s.to_u8()), s);
        }
        let t = Transition {
            from: State::Closed,
            to: State::Open,
            reason: "x".into(),
            signal: Some(Signal::Local),
        };
        let names: Vec<&str> = Signal::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["local", "fleet", "health", "probe", "manual"]);
        assert_eq!(t.to_string(), "closed -> open: x");
        assert_eq!(serde_json::to_value(State::HalfOpen).unwrap(), "half_open");
    }

    #[test]
    fn the_json_names_are_the_metric_names() {
        for state in [State::Closed, State::Open, State::HalfOpen] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for signal in Signal::ALL {
            assert_eq!(serde_json::to_value(signal).unwrap(), signal.as_str());
        }
    }

    #[test]
    fn status_json() {
        let st = BreakerStatus {
            state: State::Open,
            reason: "tripped manually".into(),
            manual: true,
            signal: Some(Signal::Manual),
        };
        assert_eq!(
            serde_json::to_string(&st).unwrap(),
            r#"{"fallbackEnabled":true,"fallbackReason":"tripped manually","state":"open","manuallyTripped":true,"openedBy":"manual"}"#
        );
    }

    #[test]
    fn shared_breaker_mirrors_state_and_reports_transitions() {
        let mut s = settings();
        s.open_for = Duration::ZERO;
        s.half_open_probes = 1;
        let shared = SharedBreaker::new(Breaker::new(s, Instant::now()));
        let seen: Arc<Mutex<Vec<(State, State)>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        shared.on_transition(move |t| seen2.lock().unwrap().push((t.from, t.to)));

        assert_eq!(shared.state(), State::Closed);
        assert_eq!(shared.admit(), Admission::Allowed);
        for _ in 0..10 {
            shared.record(Outcome::Error, MS, false);
        }
        assert_eq!(shared.state(), State::Open);
        let status = shared.status();
        falls_back(&status, State::Open, "error rate 1.00");
        assert!(!status.manual);
        assert_eq!(shared.window_stats().error, 10);

        assert_eq!(shared.admit(), Admission::Probe);
        assert_eq!(shared.state(), State::HalfOpen);
        assert_eq!(shared.admit(), Admission::Rejected);
        shared.release_probe();
        assert_eq!(shared.admit(), Admission::Probe);
        shared.record(Outcome::Success, MS, true);
        assert_eq!(shared.state(), State::Closed);

        shared.trip();
        assert_eq!(shared.state(), State::Open);
        assert!(shared.status().manual);
        assert_eq!(shared.admit(), Admission::Rejected);
        shared.reset();
        assert_eq!(shared.state(), State::Closed);

        for _ in 0..3 {
            shared.record_health(false, "down");
        }
        assert_eq!(shared.state(), State::Open);
        assert_eq!(shared.status().reason, "health check failed 3 times: down");

        let mut s2 = settings();
        s2.min_requests = 1;
        shared.set_settings(s2);
        assert_eq!(shared.with_breaker(|b| b.settings().min_requests), 1);

        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed),
                (State::Closed, State::Open),
                (State::Open, State::Closed),
                (State::Closed, State::Open),
            ]
        );
        assert!(format!("{shared:?}").contains("Open"));
    }

    #[test]
    fn shared_report_ticks_and_passes_the_transition_on() {
        let mut s = settings();
        s.min_requests = 1;
        s.open_for = Duration::ZERO;
        let shared = SharedBreaker::new(Breaker::new(s, Instant::now()));
        let seen: Arc<Mutex<Vec<(State, State)>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        shared.on_transition(move |t| seen2.lock().unwrap().push((t.from, t.to)));
        assert_eq!(shared.tick(), State::Closed);
        shared.record(Outcome::Error, MS, false);
        // Nothing ticked since it opened: the mirror and a plain status read have not moved.
        assert_eq!(shared.state(), State::Open);
        assert_eq!(shared.status().state, State::Open);
        falls_back(&shared.report(), State::HalfOpen, "half-open after 0s open");
        assert_eq!(shared.state(), State::HalfOpen);
        assert!(shared.retry_at().is_some_and(|at| at <= Instant::now()));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(State::Closed, State::Open), (State::Open, State::HalfOpen)]
        );

        shared.trip();
        assert_eq!(shared.tick(), State::Open);
        assert_eq!(shared.report().state, State::Open);
        assert_eq!(shared.retry_at(), None);
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn shared_breaker_bounds_probes_across_threads() {
        let mut s = settings();
        s.open_for = Duration::ZERO;
        s.half_open_probes = 2;
        s.min_requests = 1;
        let shared = Arc::new(SharedBreaker::new(Breaker::new(s, Instant::now())));
        shared.record(Outcome::Error, MS, false);
        assert_eq!(shared.state(), State::Open);
        let in_flight = Arc::new(AtomicU32::new(0));
        let max_seen = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let shared = Arc::clone(&shared);
                let in_flight = Arc::clone(&in_flight);
                let max_seen = Arc::clone(&max_seen);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if shared.admit() == Admission::Probe {
                            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            max_seen.fetch_max(n, Ordering::SeqCst);
                            std::thread::yield_now();
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            shared.release_probe();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let max = max_seen.load(Ordering::SeqCst);
        assert!((1..=2).contains(&max), "{max}");
        assert_eq!(shared.with_breaker(|b| b.probes_in_flight()), 0);
        assert_eq!(shared.state(), State::HalfOpen);
    }

    #[test]
    fn panicking_callback_does_not_poison_the_breaker() {
        let shared = Arc::new(SharedBreaker::new(Breaker::new(settings(), Instant::now())));
        shared.on_transition(|_| panic!("boom"));
        let s2 = Arc::clone(&shared);
        assert!(std::thread::spawn(move || s2.trip()).join().is_err());
        assert_eq!(shared.state(), State::Open);
        assert!(shared.status().manual);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit,
        Finish(u8, u64),
        Release,
        Health(bool),
        Advance(u64),
        Tick,
        Trip,
        Reset,
        /// A fleet reading of (total, errors), taken this many ms before now.
        Fleet(u8, u8, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Admit),
            6 => (0u8..3, 0u64..400).prop_map(|(o, l)| Op::Finish(o, l)),
            1 => Just(Op::Release),
            2 => any::<bool>().prop_map(Op::Health),
            4 => (0u64..3000).prop_map(Op::Advance),
            2 => Just(Op::Tick),
            1 => Just(Op::Trip),
            1 => Just(Op::Reset),
            2 => (0u8..30, 0u8..30, 0u64..2000).prop_map(|(n, e, lag)| Op::Fleet(n, e, lag)),
        ]
    }

    fn settings_strategy() -> impl Strategy<Value = BreakerSettings> {
        (
            (1u64..6, 1u64..8, 0u32..=10, 0u32..=10),
            (20u64..300, 0u64..2000, 0u32..4, 0u32..4),
        )
            .prop_map(
                |((w, min, er, tr), (lat, open, probes, health))| BreakerSettings {
                    window: secs(w),
                    min_requests: min,
                    error_rate: f64::from(er) / 10.0,
                    timeout_rate: f64::from(tr) / 10.0,
                    max_mean_latency: Duration::from_millis(lat),
                    open_for: Duration::from_millis(open),
                    half_open_probes: probes,
                    health_failures: health,
                },
            )
    }

    /// Independent of `BreakerSettings::exceeded`: does `s` break a threshold?
    fn violates(set: &BreakerSettings, s: &WindowStats) -> bool {
        s.total > 0
            && s.total >= set.min_requests
            && (s.error as f64 / s.total as f64 > set.error_rate
                || s.timeout as f64 / s.total as f64 > set.timeout_rate
                || s.total_latency.as_secs_f64() / s.total as f64
                    > set.max_mean_latency.as_secs_f64() + 1e-12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn breaker_invariants(set in settings_strategy(), ops in proptest::collection::vec(op(), 1..300)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = Breaker::new(set.clone(), t0);
            let max_probes = set.half_open_probes.max(1);
            // Requests the test holds: probes and allowed (non-probe) ones.
            let mut probes: u32 = 0;
            let mut allowed: u32 = 0;
            for op in ops {
                let before = b.state();
                let was_manual = b.manually_tripped();
                let t = match op {
                    Op::Admit => {
                        let (a, t) = b.admit(now);
                        match a {
                            Admission::Probe => probes += 1,
                            Admission::Allowed => {
                                prop_assert_eq!(before, State::Closed);
                                allowed += 1;
                            }
                            Admission::Rejected => prop_assert_ne!(before, State::Closed),
                        }
                        if let Some(t) = &t {
                            prop_assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
                            prop_assert!(!was_manual);
                        }
                        t
                    }
                    Op::Finish(o, lat) => {
                        let outcome = [Outcome::Success, Outcome::Error, Outcome::Timeout][o as usize];
                        let probe = if probes > 0 && (allowed == 0 || lat % 2 == 0) {
                            probes -= 1;
                            true
                        } else {
                            allowed = allowed.saturating_sub(1);
                            false
                        };
                        let t = b.record(outcome, Duration::from_millis(lat), probe, now);
                        if before == State::Closed {
                            // Opens exactly when a threshold is exceeded on ≥ min_requests samples.
                            let stats = b.window_stats(now);
                            prop_assert_eq!(t.is_some(), violates(&set, &stats), "{:?} {:?}", stats, t);
                        }
                        if let Some(t) = &t {
                            prop_assert!(!was_manual);
                            prop_assert!(matches!(
                                (t.from, t.to),
                                (State::Closed, State::Open) | (State::HalfOpen, State::Open) | (State::HalfOpen, State::Closed)
                            ), "{:?}", t);
                            if t.from == State::HalfOpen {
                                prop_assert!(probe);
                                prop_assert_eq!(t.to == State::Open, outcome.is_failure());
                            }
                        }
                        t
                    }
                    Op::Release => {
                        if probes > 0 {
                            probes -= 1;
                            b.release_probe();
                        }
                        None
                    }
                    Op::Health(ok) => {
                        let t = b.record_health(ok, "detail", now);
                        if let Some(t) = &t {
                            prop_assert!(!ok && !was_manual);
                            prop_assert_eq!(t.to, State::Open);
                            prop_assert!(b.health_failures() >= set.health_failures.max(1));
                            prop_assert!(t.reason.starts_with("health check failed"));
                        }
                        t
                    }
                    Op::Advance(ms) => {
                        now += Duration::from_millis(ms);
                        None
                    }
                    Op::Tick => {
                        let t = b.tick(now);
                        if let Some(t) = &t {
                            prop_assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
                            prop_assert!(!was_manual);
                            prop_assert_eq!(b.health_failures(), 0);
                        }
                        // Never left Open past its period when time alone may move it.
                        if b.state() == State::Open && !b.manually_tripped() && b.health_failures() == 0 {
                            prop_assert!(b.retry_at().is_some_and(|at| now < at));
                        }
                        t
                    }
                    Op::Trip => {
                        let t = b.trip(now);
                        prop_assert_eq!(b.state(), State::Open);
                        prop_assert!(b.manually_tripped());
                        t
                    }
                    Op::Reset => {
                        let t = b.reset(now);
                        prop_assert_eq!(b.state(), State::Closed);
                        prop_assert!(!b.manually_tripped());
                        prop_assert_eq!(b.window_stats(now).total, 0);
                        t
                    }
                    Op::Fleet(n, e, lag) => {
                        let taken_at = now.checked_sub(Duration::from_millis(lag)).unwrap_or(now);
                        let counts = FleetCounts { total: f64::from(n), error: f64::from(e.min(n)), timeout: 0.0 };
                        let stale = b.fleet().last_close().is_some_and(|c| taken_at <= c);
                        let t = b.record_fleet(FleetReading { taken_at, counts }, now);
                        if let Some(t) = &t {
                            prop_assert_eq!((t.from, t.to), (State::Closed, State::Open));
                            prop_assert!(!was_manual && !stale);
                            prop_assert!(t.reason.starts_with("fleet: "));
                            prop_assert_eq!(t.signal, Some(Signal::Fleet));
                            prop_assert!(counts.total >= set.min_requests as f64);
                        }
                        t
                    }
                };
                prop_assert_eq!(b.signal().is_some(), b.state() != State::Closed);
                if let Some(t) = &t {
                    prop_assert_eq!(t.from, before);
                    prop_assert_eq!(t.to, b.state());
                    prop_assert_ne!(t.from, t.to);
                    prop_assert_eq!(b.reason(), t.reason.as_str());
                } else {
                    prop_assert_eq!(b.state(), before);
                }
                if b.manually_tripped() {
                    prop_assert_eq!(b.state(), State::Open);
                }
                prop_assert_eq!(b.probes_in_flight(), probes);
                prop_assert!(probes <= max_probes);
            }
        }
    }
}
