//! The openraft type configuration: what the log carries and how nodes are named.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandResult};

pub type NodeId = u64;

/// A Raft member as the network needs it: its node name (its certificate names it) and its
/// transport address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftPeer {
    pub name: String,
    pub address: String,
}

impl RaftPeer {
    /// Its transport address as a socket address (`None` when what was recorded is not
    /// `ip:port`).
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.address.parse().ok()
    }
}

impl std::fmt::Display for RaftPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.address)
    }
}

openraft::declare_raft_types!(
    /// pdagent's Raft: `Command`s in, `CommandResult`s out, nodes named by `RaftPeer`.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = RaftPeer,
);
