//! Test support: scripted upstreams (`upstream`), a raw HTTP/1.1 client (`client`), fixtures and
//! the `Harness` (`harness`), assertions (`assert`), what a failover and a rescue share
//! (`failover`), and failoverbench's verdicts (`verdict`).

#![allow(dead_code, unused_imports)]

pub mod assert;
pub mod client;
pub mod failover;
pub mod harness;
pub mod legacy;
pub mod upstream;
pub mod verdict;

pub use assert::*;
pub use client::*;
pub use failover::*;
pub use harness::*;
pub use upstream::*;
pub use verdict::*;
