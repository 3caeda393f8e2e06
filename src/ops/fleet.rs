//! The fleet signal's poller: every `[fleet] poll_ms`, in the background, the fleet's runtime
//! outcomes are read from Prometheus and handed to the breaker (`Breaker::record_fleet`).
//!
//! Nothing on the request path waits for it: a request reads the breaker's state, which a reading
//! may have moved. When Prometheus is slow, down or answers garbage, the breaker simply gets no
//! reading and the replica decides on its own window; each poll is counted
//! (`cutover_fleet_polls_total{result}`), `cutover_fleet_signal_up` and the status say which it
//! is, and the log has one line per change of state, not one per poll. The config is read each
//! round, so `[fleet]` is reloadable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::core::fleet::{FleetReading, FleetState};
use crate::core::prometheus::{fleet_counts, fleet_query, HttpUrl};
use crate::ops::prometheus::{query, HttpGet, QueryError};
use crate::state::Shared;

/// How often a disabled poller looks at the config again.
const OFF_RECHECK: Duration = Duration::from_secs(1);

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
