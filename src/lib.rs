//! cutover-proxy: a Pingora sidecar that moves chat traffic from a legacy Chat API to a runtime
//! orchestrator one organisation at a time, rewriting the runtime's SSE into Agent2UI events.
//!
//! The pure core (`config`, `identity`, `routing`, `sse`, `agent2ui`, `breaker`, `stats`, `h1`) has no
//! I/O; the rest wires it to Pingora.

pub mod admin;
pub mod agent2ui;
pub mod app;
pub mod breaker;
pub mod chat;
pub mod config;
pub mod demo;
pub mod h1;
pub mod health;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod runtime;
pub mod shadow;
pub mod sse;
pub mod state;
pub mod stats;
pub mod upstream;
