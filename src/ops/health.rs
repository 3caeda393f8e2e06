//! Background health checks of the runtime, feeding the breaker.
//!
//! They run on their own schedule, never on the request path (the source document checked health
//! on every request), and re-read the config each round so interval and path are reloadable.

use std::sync::Arc;
use std::time::Duration;

use pingora::http::RequestHeader;
use tokio::sync::watch;

use crate::app::state::Shared;
use crate::app::upstream;

/// One health check: `Ok` on a 2xx answer within the timeout.
pub async fn check_once(shared: &Shared) -> Result<(), String> {
    let active = shared.snapshot();
    let rt = &active.config.runtime;
    let timeout = Duration::from_millis(rt.health_timeout_ms);
    let probe = async {
        let addr = shared
            .resolver
            .resolve(&rt.address)
            .await
            .map_err(|e| format!("resolving {}: {e}", rt.address))?;
        let peer = upstream::peer(addr, &active.runtime);
        let (mut session, _) = shared
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut req = RequestHeader::build("GET", rt.health_path.as_bytes(), Some(2))
            .map_err(|e| e.to_string())?;
        req.insert_header("host", rt.address.as_str())
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| format!("request: {e}"))?;
        session
            .finish_request_body()
            .await
            .map_err(|e| format!("request: {e}"))?;
        session
            .read_response_header()
            .await
            .map_err(|e| format!("response: {e}"))?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        // Drain the (small) body so the connection can be reused for the next check.
        while let Ok(Some(_)) = session.read_response_body().await {}
        if session.response_done() {
            shared
                .connector
                .release_http_session(session, &peer, Some(active.runtime.pool_idle_timeout))
                .await;
        }
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("{} answered {status}", rt.health_path))
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Check every `health_interval_ms` until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let result = check_once(&shared).await;
        let metrics = shared.metrics;
        match &result {
            Ok(()) => {
                metrics.health_up.set(1);
                metrics.health_checks_total.with_label_values(&["ok"]).inc();
            }
            Err(detail) => {
                metrics.health_up.set(0);
                metrics
                    .health_checks_total
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(%detail, "runtime health check failed");
            }
        }
        shared
            .breaker
            .record_health(result.is_ok(), result.as_ref().err().map_or("", |d| d));
        let interval = Duration::from_millis(shared.snapshot().config.runtime.health_interval_ms);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
