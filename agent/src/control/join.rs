//! Joining a cluster: an agent with an empty data dir asks its seeds (then the coordinator
//! they name) to add it; the coordinator adds it as a Raft learner and registers it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pd_raft::network::node_id;
use pd_raft::{Command, RaftPeer};
use pd_transport::PeerIdentity;
use tracing::{info, warn};

use crate::config::Seed;
use crate::wire::{AgentRequest, AgentResponse};

use super::{CONTROL_RPC_TIMEOUT, ControlPlane, JOIN_RETRY};

impl ControlPlane {
    /// Asks the seeds (then whoever they name as coordinator) to add this agent, until one
    /// accepts.
    pub(super) async fn join_through(self: Arc<Self>, seeds: Vec<Seed>) {
        let req = || AgentRequest::Join {
            name: self.me.name.clone(),
            address: self.me.address.clone(),
        };
        let mut attempt = 0u64;
        loop {
            for seed in &seeds {
                let mut target = (seed.name.clone(), seed.address);
                // Follow at most a couple of redirects to the coordinator.
                for _ in 0..3 {
                    match self
                        .peers
                        .call(&target.0, target.1, &req(), CONTROL_RPC_TIMEOUT)
                        .await
                    {
                        Ok(AgentResponse::Joined { coordinator }) => {
                            info!(%coordinator, "joined the cluster");
                            return;
                        }
                        Ok(AgentResponse::NotCoordinator {
                            coordinator: Some(c),
                        }) => match c.socket_addr() {
                            Some(a) => target = (c.name, a),
                            None => break,
                        },
                        Ok(AgentResponse::NotCoordinator { coordinator: None }) => break,
                        Ok(other) => {
                            warn!(seed = %target.0, answer = ?other, "unexpected answer to join");
                            break;
                        }
                        Err(e) => {
                            if attempt.is_multiple_of(20) {
                                warn!(seed = %target.0, error = %e, "cannot join through this seed yet");
                            }
                            break;
                        }
                    }
                }
            }
            attempt += 1;
            tokio::time::sleep(JOIN_RETRY).await;
        }
    }

    /// Handles a join request (coordinator only): adds the host as a learner and registers it.
    pub async fn join(
        &self,
        requester: &PeerIdentity,
        name: String,
        address: String,
    ) -> Result<AgentResponse, String> {
        if *requester != PeerIdentity::Node(name.clone()) {
            return Err(format!("{requester} may not join as {name}"));
        }
        if address.parse::<SocketAddr>().is_err() {
            return Err(format!("join address {address:?} is not ip:port"));
        }
        if !self.is_coordinator() {
            return Ok(self.not_coordinator());
        }
        let id = node_id(&name);
        let known = self.membership(|m| m.get_node(&id).is_some());
        if !known {
            let peer = RaftPeer {
                name: name.clone(),
                address: address.clone(),
            };
            self.raft
                .add_learner(id, peer, false)
                .await
                .map_err(|e| format!("adding {name} as a learner: {e}"))?;
            info!(%name, %address, "added a learner");
        }
        let cmd = Command::RegisterNode {
            name: name.clone(),
            id,
            address,
            labels: BTreeMap::new(),
        };
        self.write(cmd)
            .await
            .map_err(|e| format!("registering {name}: {e}"))?;
        Ok(AgentResponse::Joined {
            coordinator: self.me.name.clone(),
        })
    }
}
