//! What `pdagent status` and `pdctl status` show of this agent's view of the cluster.

use std::collections::BTreeSet;

use openraft::ServerState;
use pd_raft::NodeId;

use crate::util::UnpoisonedRw;
use crate::wire::{NodeStatus, StatusReport};

use super::ControlPlane;

impl ControlPlane {
    /// This agent's view of the cluster.
    pub fn status(&self) -> StatusReport {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let s = self.state.read_locked();
        let nodes = s
            .state
            .nodes
            .values()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                address: n.address.clone(),
                raft_role: if voters.contains(&n.id) {
                    "voter"
                } else if learners.contains(&n.id) {
                    "learner"
                } else {
                    "none"
                }
                .to_string(),
                health: n.health,
                admin_state: n.admin_state,
                labels: n.labels.clone(),
                gpus: n.gpus.clone(),
            })
            .collect();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        StatusReport {
            node: self.me.name.clone(),
            coordinator: m
                .current_leader
                .and_then(|l| membership.get_node(&l))
                .map(|n| n.name.clone()),
            term: m.current_term,
            raft_state: state.to_string(),
            last_applied: m.last_applied.map(|l| l.index),
            in_cluster: voters.contains(&self.id) || learners.contains(&self.id),
            nodes,
        }
    }
}
