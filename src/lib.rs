//! cutover-proxy: a Pingora sidecar that moves chat traffic from a legacy Chat API to a runtime
//! orchestrator one organisation at a time, rewriting the runtime's SSE into Agent2UI events.
//!
//! The pure core (`config`, `identity`, `routing`, `sse`, `agent2ui`, `breaker`, `stats`) has no
//! I/O; the rest wires it to Pingora.

pub mod config;
