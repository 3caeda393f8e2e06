//! What operators talk to: the admin API, Prometheus metrics, the runtime health check, the
//! config reload watcher, and the fleet signal read from Prometheus.

pub mod admin;
pub mod fleet;
pub mod health;
pub mod prometheus;
pub mod reload;
