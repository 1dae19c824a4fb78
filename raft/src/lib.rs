//! `pd-raft`: the control plane's replicated state.
//!
//! Owns: the openraft type configuration, the `ClusterState` state machine as a pure `apply`
//! (with a schema version), and the Raft log, vote and snapshot storage on disk (redb, fsync
//! before acknowledging).
//!
//! Also the Raft network adapter: what Raft RPCs carry, and a `RaftNetworkFactory` that sends
//! them through the agent's transport (`RaftRpc`).
//!
//! Must never: open sockets itself or read the clock.

#![forbid(unsafe_code)]

pub mod network;
pub mod placement;
pub mod state;
pub mod store;
pub mod types;

pub use state::{
    AdminState, ApiKey, Applied, ApplyError, Assignment, AutoplanEvent, AutoplanMode, AutoplanMove,
    AutoplanScore, AutoplanSetting, ClusterState, Command, CommandResult, Deployment, EngineRole,
    Layout, ModelHosts, NodeHealth, NodeRecord, Placed, PlanRecord, SCHEMA_VERSION,
};
pub use types::{NodeId, RaftPeer, TypeConfig};
