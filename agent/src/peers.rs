//! Connections to other agents, opened on demand from the agent's one endpoint and kept. A
//! call is bounded by its timeout, connecting included; a failed connection is dropped and
//! reopened on the next call. Each peer has its own lock, so a dead peer never delays calls to
//! the others.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pd_raft::RaftPeer;
use pd_raft::network::{RaftRequest, RaftResponse, RaftRpc, RpcFailure};
use pd_transport::{Connection, Endpoint, TransportError};

use crate::util::Unpoisoned;
use crate::wire::{AgentRequest, AgentResponse};

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

pub struct Peers {
    endpoint: Endpoint,
    slots: Mutex<HashMap<String, Slot>>,
    /// A peer (its certificate verified) said this node was removed from the cluster.
    removed: AtomicBool,
}

impl Peers {
    pub fn new(endpoint: Endpoint) -> Self {
        Peers {
            endpoint,
            slots: Mutex::new(HashMap::new()),
            removed: AtomicBool::new(false),
        }
    }

    /// Whether a peer refused this node as removed (its certificate revoked, or its name
    /// removed from the replicated state).
    pub fn told_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    fn note_removal(&self, e: &TransportError) {
        let removed = match e {
            TransportError::Revoked { .. } => true,
            TransportError::Remote(m) => {
                crate::wire::is_removal(m, &self.endpoint.identity().info.identity)
            }
            _ => false,
        };
        if removed && !self.removed.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "a peer refused this node: it was removed from the cluster");
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn slot(&self, name: &str) -> Slot {
        let mut m = self.slots.locked();
        m.entry(name.to_string()).or_default().clone()
    }

    /// The kept connection to agent `name` at `addr`, opened if needed.
    pub async fn connection(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        let slot = self.slot(name);
        let mut guard = slot.lock().await;
        let live = guard
            .as_ref()
            .filter(|c| c.quic().close_reason().is_none() && c.remote_address() == addr);
        if let Some(c) = live {
            return Ok(c.clone());
        }
        *guard = None;
        let c = self.endpoint.connect(addr, name).await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    fn forget(&self, name: &str) {
        self.slots.locked().remove(name);
    }

    /// One request to agent `name` at `addr`, within `timeout` (connecting included).
    /// Asks every other agent of `state` (every node but `me` not known to be down) the same
    /// request at once: each node's answer, `None` where it did not answer within `timeout`
    /// (or has no address).
    pub async fn ask_others(
        self: &Arc<Self>,
        state: &pd_raft::ClusterState,
        me: &str,
        req: AgentRequest,
        timeout: Duration,
    ) -> Vec<(String, Option<AgentResponse>)> {
        let req = Arc::new(req);
        let mut asks = tokio::task::JoinSet::new();
        for n in state.nodes.values() {
            if n.name == me || n.health == pd_raft::NodeHealth::Down {
                continue;
            }
            let (name, addr, peers) = (n.name.clone(), n.socket_addr(), self.clone());
            let req = req.clone();
            asks.spawn(async move {
                let got = match addr {
                    Some(addr) => peers.call(&name, addr, &req, timeout).await.ok(),
                    None => None,
                };
                (name, got)
            });
        }
        asks.join_all().await
    }

    pub async fn call(
        &self,
        name: &str,
        addr: SocketAddr,
        req: &AgentRequest,
        timeout: Duration,
    ) -> Result<AgentResponse, TransportError> {
        let attempt = async {
            let conn = self.connection(name, addr).await?;
            conn.call(req).await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.note_removal(&e);
                if !matches!(e, TransportError::Remote(_)) {
                    self.forget(name);
                }
                Err(e)
            }
            Err(_) => {
                self.forget(name);
                Err(TransportError::Timeout {
                    what: format!("request to {name} at {addr}"),
                    ms: timeout.as_millis() as u64,
                })
            }
        }
    }
}

impl RaftRpc for Peers {
    async fn call(
        &self,
        peer: &RaftPeer,
        req: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftResponse, RpcFailure> {
        let addr: SocketAddr = peer
            .address
            .parse()
            .map_err(|_| RpcFailure::Unreachable(format!("{peer}: bad address")))?;
        match Peers::call(self, &peer.name, addr, &AgentRequest::Raft(req), timeout).await {
            Ok(AgentResponse::Raft(r)) => Ok(r),
            Ok(other) => Err(RpcFailure::Network(format!(
                "{peer} answered a Raft RPC with {other:?}"
            ))),
            Err(TransportError::Remote(m)) => Err(RpcFailure::Network(m)),
            Err(e) => Err(RpcFailure::Unreachable(e.to_string())),
        }
    }
}
