//! The fleet signal's poller: every `[fleet] poll_ms`, in the background, the fleet's runtime
//! outcomes are read from Prometheus and handed to the breaker (`Breaker::record_fleet`).
//!
//! Nothing on the request path waits for it: a request reads the breaker's state, which a reading
//! may have moved. When Prometheus is slow, down or answers garbage, the breaker simply gets no
//! reading and the replica decides on its own window; each poll is counted
//! (`cutover_fleet_polls_total{result}`), `cutover_fleet_signal_up` and the status say which it
//! is, and the log has one line per change of state, not one per poll. The config is read each
//! round, so `[fleet]` is reloadable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::app::state::Shared;
use crate::core::fleet::{FleetCounts, FleetReading};
use crate::core::prometheus::{fleet_counts, fleet_query, HttpUrl};
use crate::ops::prometheus::{query, HttpGet, QueryError};

/// How often a disabled poller looks at the config again.
const OFF_RECHECK: Duration = Duration::from_secs(1);

/// Where the fleet signal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetState {
    /// `[fleet] prometheus_url` is empty.
    Off,
    /// The last poll gave a reading.
    Ok,
    /// Prometheus could not be reached, was too slow or answered 5xx.
    Unavailable,
    /// It answered something else than the fleet's counts.
    Invalid,
}

impl FleetState {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetState::Off => "off",
            FleetState::Ok => "ok",
            FleetState::Unavailable => "unavailable",
            FleetState::Invalid => "invalid",
        }
    }
}

/// The poller's last word, for `GET /runtime/fallback/status`.
#[derive(Debug)]
pub struct FleetStatus {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: FleetState,
    detail: String,
    last: Option<(Instant, FleetCounts)>,
}

impl Default for FleetStatus {
    fn default() -> Self {
        FleetStatus {
            inner: Mutex::new(Inner {
                state: FleetState::Off,
                detail: String::new(),
                last: None,
            }),
        }
    }
}

impl FleetStatus {
    pub fn state(&self) -> FleetState {
        self.inner.lock().unwrap().state
    }

    /// Record where it stands; the previous state, so the caller logs changes only.
    fn set(&self, state: FleetState, detail: String) -> FleetState {
        let mut i = self.inner.lock().unwrap();
        let before = i.state;
        i.state = state;
        i.detail = detail;
        before
    }

    fn reading(&self, taken_at: Instant, counts: FleetCounts) {
        self.inner.lock().unwrap().last = Some((taken_at, counts));
    }

    /// `{"state","detail","lastReading":{"total","error","timeout","ageMs"}|null}`.
    pub fn to_json(&self, now: Instant) -> Value {
        let i = self.inner.lock().unwrap();
        let last = i.last.map(|(at, c)| {
            json!({
                "total": c.total,
                "error": c.error,
                "timeout": c.timeout,
                "ageMs": now.saturating_duration_since(at).as_millis() as u64,
            })
        });
        json!({"state": i.state.as_str(), "detail": i.detail, "lastReading": last})
    }
}

/// Poll until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, http: Arc<dyn HttpGet>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let active = shared.snapshot();
        let fleet = &active.config.fleet;
        let wait = if fleet.enabled() {
            poll_once(&shared, &*http).await;
            Duration::from_millis(fleet.poll_ms)
        } else {
            if shared.fleet.set(FleetState::Off, String::new()) != FleetState::Off {
                tracing::info!(
                    "fleet signal off: the breaker decides on this replica's window alone"
                );
                shared.metrics.fleet_signal_up.set(0);
            }
            OFF_RECHECK
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One poll: a reading for the breaker, or the reason there is none.
pub async fn poll_once(shared: &Shared, http: &dyn HttpGet) {
    let active = shared.snapshot();
    let config = &active.config;
    let result = async {
        let url = HttpUrl::parse(&config.fleet.prometheus_url).map_err(QueryError::Invalid)?;
        let promql = fleet_query(&config.fleet.query, config.breaker.window_secs);
        let taken_at = Instant::now();
        let samples = query(
            http,
            &url,
            &promql,
            Duration::from_millis(config.fleet.timeout_ms),
        )
        .await?;
        let counts = fleet_counts(&samples).map_err(QueryError::Invalid)?;
        Ok::<_, QueryError>(FleetReading { taken_at, counts })
    }
    .await;
    let m = shared.metrics;
    match result {
        Ok(reading) => {
            m.fleet_polls_total.with_label_values(&["ok"]).inc();
            m.fleet_signal_up.set(1);
            shared.fleet.reading(reading.taken_at, reading.counts);
            shared.breaker.record_fleet(reading);
            let before = shared.fleet.set(FleetState::Ok, String::new());
            if before != FleetState::Ok {
                tracing::info!(
                    total = reading.counts.total,
                    error = reading.counts.error,
                    timeout = reading.counts.timeout,
                    "fleet signal up: the breaker also reads every replica's runtime outcomes"
                );
            }
        }
        Err(e) => {
            m.fleet_polls_total.with_label_values(&[e.kind()]).inc();
            m.fleet_signal_up.set(0);
            let state = match e {
                QueryError::Unavailable(_) => FleetState::Unavailable,
                QueryError::Invalid(_) => FleetState::Invalid,
            };
            let before = shared.fleet.set(state, e.detail().to_owned());
            if before != state {
                tracing::warn!(
                    state = state.as_str(),
                    detail = e.detail(),
                    "fleet signal {}: the breaker decides on this replica's window alone until Prometheus answers: {}",
                    state.as_str(),
                    e.detail()
                );
            }
        }
    }
}
