//! The Raft network on the agents' transport. pd-raft says what travels (`RaftRequest`,
//! `RaftResponse`); the agent carries it inside its own messages through `RaftRpc`, over the
//! mutually authenticated QUIC connections it already keeps.

// The error types are openraft's, fixed by its `RaftNetwork` trait.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::types::{NodeId, RaftPeer, TypeConfig};

/// A Raft RPC to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Its answer, with the peer's Raft error if it had one.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
}

/// Why a Raft RPC did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcFailure {
    /// The peer could not be reached (connect, timeout, connection lost): openraft backs off.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer answered something else than expected.
    #[error("network: {0}")]
    Network(String),
}

/// Carries Raft RPCs to peers; implemented by the agent.
pub trait RaftRpc: Send + Sync + 'static {
    fn call(
        &self,
        peer: &RaftPeer,
        req: RaftRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<RaftResponse, RpcFailure>> + Send;
}

/// Makes one `PeerClient` per target.
pub struct NetworkFactory<T> {
    rpc: Arc<T>,
}

impl<T> NetworkFactory<T> {
    pub fn new(rpc: Arc<T>) -> Self {
        NetworkFactory { rpc }
    }
}

impl<T: RaftRpc> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &RaftPeer) -> Self::Network {
        PeerClient {
            target,
            peer: node.clone(),
            rpc: self.rpc.clone(),
        }
    }
}

pub struct PeerClient<T> {
    target: NodeId,
    peer: RaftPeer,
    rpc: Arc<T>,
}

type RpcErr<E = RaftError<NodeId>> = RPCError<NodeId, RaftPeer, E>;

impl<T: RaftRpc> PeerClient<T> {
    async fn send<E: std::error::Error>(
        &self,
        req: RaftRequest,
        opt: &RPCOption,
    ) -> Result<RaftResponse, RpcErr<E>> {
        self.rpc
            .call(&self.peer, req, opt.hard_ttl())
            .await
            .map_err(|f| match f {
                RpcFailure::Unreachable(m) => {
                    RPCError::Unreachable(Unreachable::new(&RpcFailure::Unreachable(m)))
                }
                RpcFailure::Network(m) => {
                    RPCError::Network(NetworkError::new(&RpcFailure::Network(m)))
                }
            })
    }

    fn remote<R, E: std::error::Error>(&self, r: Result<R, E>) -> Result<R, RpcErr<E>> {
        r.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.peer.clone(),
                e,
            ))
        })
    }

    fn mismatch<E: std::error::Error>(&self) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&RpcFailure::Network(format!(
            "{} answered a different Raft RPC than was asked",
            self.peer
        ))))
    }
}

impl<T: RaftRpc> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.send(RaftRequest::AppendEntries(rpc), &option).await? {
            RaftResponse::AppendEntries(r) => self.remote(r),
            _ => Err(self.mismatch()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<RaftError<NodeId, InstallSnapshotError>>>
    {
        match self
            .send(RaftRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            RaftResponse::InstallSnapshot(r) => self.remote(r),
            _ => Err(self.mismatch()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.send(RaftRequest::Vote(rpc), &option).await? {
            RaftResponse::Vote(r) => self.remote(r),
            _ => Err(self.mismatch()),
        }
    }
}

/// Answers a Raft RPC with the local Raft instance.
pub async fn handle(raft: &openraft::Raft<TypeConfig>, req: RaftRequest) -> RaftResponse {
    match req {
        RaftRequest::AppendEntries(r) => RaftResponse::AppendEntries(raft.append_entries(r).await),
        RaftRequest::Vote(r) => RaftResponse::Vote(raft.vote(r).await),
        RaftRequest::InstallSnapshot(r) => {
            RaftResponse::InstallSnapshot(raft.install_snapshot(r).await)
        }
    }
}

/// A Raft node id from a node name (FNV-1a, 64 bits, never 0): stable across restarts and the
/// same on every host, so no id needs allocating. `ClusterState` refuses a collision.
pub fn node_id(name: &str) -> NodeId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        assert_eq!(node_id("node-1"), node_id("node-1"));
        let ids: std::collections::BTreeSet<_> =
            (1..=1000).map(|i| node_id(&format!("node-{i}"))).collect();
        assert_eq!(ids.len(), 1000);
        assert_ne!(node_id(""), 0);
    }

    #[test]
    fn raft_messages_round_trip_through_the_codec() {
        use openraft::{CommittedLeaderId, LogId, Vote};
        let req = RaftRequest::Vote(VoteRequest::new(
            Vote::new(3, 7),
            Some(LogId::new(CommittedLeaderId::new(2, 7), 9)),
        ));
        let bytes = pd_transport::codec::encode(&req).unwrap();
        let back: RaftRequest = pd_transport::codec::decode(&bytes, 1 << 20).unwrap();
        assert!(matches!(back, RaftRequest::Vote(v) if v.vote == Vote::new(3, 7)));
        let err: RaftResponse =
            RaftResponse::Vote(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)));
        let bytes = pd_transport::codec::encode(&err).unwrap();
        let back: RaftResponse = pd_transport::codec::decode(&bytes, 1 << 20).unwrap();
        assert!(matches!(back, RaftResponse::Vote(Err(RaftError::Fatal(_)))));
    }
}
