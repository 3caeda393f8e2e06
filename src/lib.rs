//! cutover-proxy: a Pingora sidecar that moves chat traffic from a legacy Chat API to a runtime
//! orchestrator one organisation at a time, rewriting the runtime's SSE into Agent2UI events.
//!
//! The crate reads bottom-up:
//! - [`core`]: pure decisions and formats, no I/O (no Pingora, no tokio, no sockets): config,
//!   identity, routing, the chat request, the conversation bridge's rules, SSE parsing, the
//!   runtime's HTTP/1 response decoding, the client's request head and chunked body checks,
//!   Agent2UI mapping, signed file links, the stream verdict, the commit point, execution stats,
//!   upstream deadlines and the breaker.
//! - [`upstream`]: the one HTTP/1.1 client of both upstreams: each upstream's policy, its pool,
//!   the retry-once rule, the request up to its response head, and a body whose reads enforce
//!   the idle deadline; the connection wrapper that enforces the deadlines for Pingora too.
//! - [`runtime`]: the runtime connection, the relay that streams one execution to the client,
//!   shadow copies and the conversation bridge's legacy client.
//! - [`proxy`]: the client-facing listener: our HTTP/1 front door (which serves plain requests
//!   and runtime chats on its own connection), then the Pingora `ProxyHttp` glue.
//! - [`ops`]: what operators talk to: admin API, Prometheus metrics, health checks, config reload.
//! - [`app`]: composition: shared state, upstream peers, the server and its drain, logging, the demo.

pub mod app;
pub mod core;
pub mod ops;
pub mod proxy;
pub mod runtime;
pub mod state;
pub mod upstream;
