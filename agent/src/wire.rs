//! The agent's messages between agents. Variants are only appended, never renumbered or
//! changed: a new need gets a new variant (bincode encodes the variant index).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRequest {
    /// Liveness and round-trip check.
    Ping { nonce: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentResponse {
    Pong {
        node: String,
        nonce: u64,
        protocol_version: u16,
        uptime_ms: u64,
    },
}
