//! The runtime side of a chat: one connection per execution, the relay that turns its SSE into
//! client events under the execution's deadlines, and fire-and-forget shadow copies.

pub mod connection;
pub mod detached;
pub mod downstream;
pub mod events;
pub mod execution;
pub mod files;
pub mod relay;
pub mod rescue;
pub mod respond;
pub mod shadow;
