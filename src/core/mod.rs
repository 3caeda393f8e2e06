//! The pure core: every decision and format the proxy makes, with no I/O. Nothing here names
//! Pingora, tokio or a socket (`scripts/check-layers.sh` fails the build if it does), so each
//! module is unit- and property-tested on its own.

pub mod agent2ui;
pub mod breaker;
pub mod bridge;
pub mod chat;
pub mod chunked;
pub mod commit;
pub mod config;
pub mod cors;
pub mod files;
pub mod fleet;
pub mod forwarded;
pub mod h1;
pub mod identity;
pub mod ids;
pub mod json;
pub mod passthrough;
pub mod persist;
pub mod prometheus;
pub mod recent;
pub mod request_head;
pub mod rescue;
pub mod rollout;
pub mod routing;
pub mod scorecard;
pub mod significance;
pub mod sse;
pub mod stats;
pub mod stream;
pub mod timeouts;
