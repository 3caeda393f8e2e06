//! Assertions on what a test got back: the routing headers, the client event list and the value
//! of a series in the instance's own registry.

use cutover_proxy::app::LocalServer;
use prometheus::proto::MetricType;

use super::client::Response;

/// The `x-execution-mode` and `x-execution-reason` headers.
pub fn mode_reason(r: &Response) -> (Option<&str>, Option<&str>) {
    (r.header("x-execution-mode"), r.header("x-execution-reason"))
}

/// Routed in `mode` for `reason`, whatever the answer.
#[track_caller]
pub fn assert_routed(r: &Response, mode: &str, reason: &str) {
    assert_eq!(mode_reason(r), (Some(mode), Some(reason)));
}

/// A 200 served in `mode` for `reason`, body complete.
#[track_caller]
pub fn assert_served(r: &Response, mode: &str, reason: &str) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_routed(r, mode, reason);
    assert!(r.complete, "body cut short");
}

/// Client event names in order.
pub fn event_names(r: &Response) -> Vec<String> {
    r.events().into_iter().map(|(e, _)| e).collect()
}

/// The value of `name{labels}` in `server`'s registry (0 when the series does not exist yet);
/// counters, gauges, and histogram sample counts.
pub fn metric(server: &LocalServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let families = server.shared.metrics.registry().gather();
    let Some(family) = families.iter().find(|f| f.name() == name) else {
        return 0.0;
    };
    family
        .get_metric()
        .iter()
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| match family.get_field_type() {
            MetricType::COUNTER => m.get_counter().value(),
            MetricType::GAUGE => m.get_gauge().value(),
            _ => m.get_histogram().get_sample_count() as f64,
        })
        .sum()
}

/// `c{label}`, for a counter with one label.
pub fn counter(c: &prometheus::IntCounterVec, label: &str) -> u64 {
    c.with_label_values(&[label]).get()
}

/// `g{label}`, for a gauge with one label.
pub fn gauge(g: &prometheus::IntGaugeVec, label: &str) -> i64 {
    g.with_label_values(&[label]).get()
}

/// This process's resident memory, in KiB.
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// This process's open file descriptors.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
