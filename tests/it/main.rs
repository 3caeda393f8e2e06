//! The integration tests, one binary: each suite is a module, and they share `support` (the
//! `Harness`, scripted upstreams, the fake legacy Chat API, the raw client and assertions).
//! Linked once rather than once per suite, which is most of what building the tests costs.
//!
//! Suites run in one process: a test that measures the process itself (open descriptors, RSS,
//! bytes read) runs alone in a child process of this binary (`support::alone_in_process`).

mod support;

mod admin_api;
mod breaker_clock;
mod breaker_failover;
mod bridge;
mod bridge_chat;
mod chat_routing;
mod commit_point;
mod cors;
mod fault_catalogue;
mod faults;
mod fleet_signal;
mod forwarded;
mod front_door;
mod hostile_input;
mod identity;
mod lean_passthrough;
mod lean_runtime;
mod metrics_exposition;
mod passthrough;
mod real_runtime;
mod reload;
mod rescue;
mod response_heads;
mod rewrite_differential;
mod rollout;
mod runtime_files;
mod runtime_stream;
mod shadow_scorecard;
mod shutdown;
mod silence;
mod slow_body;
