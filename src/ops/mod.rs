//! What operators talk to: the admin API, Prometheus metrics, the runtime health check and the
//! config reload watcher.

pub mod admin;
pub mod health;
pub mod metrics;
pub mod reload;
