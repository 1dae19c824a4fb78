//! Elections: a voter stays out of them while another live voter holds a longer log.

use std::sync::Arc;

use pd_raft::{NodeId, RaftPeer};

use crate::wire::{AgentRequest, AgentResponse};

use super::ControlPlane;

/// Whether this voter may start an election: only when no live voter that answered holds a
/// longer log (`mine` against `theirs`, compared as Raft compares them). A voter with a shorter
/// log would lose; worse, openraft then holds back that voter's elections by twice the
/// election timeout until it next campaigns itself, which slowed later failovers (measured: a
/// restarted voter that had not caught up campaigned first in most slow rounds). The voter
/// with the longest log among those alive is always allowed, so an election can always happen.
pub fn may_campaign(
    mine: Option<openraft::LogId<NodeId>>,
    theirs: &[Option<openraft::LogId<NodeId>>],
) -> bool {
    theirs.iter().all(|t| mine >= *t)
}

impl ControlPlane {
    /// Keeps this voter out of elections while another live voter holds a longer log
    /// (`may_campaign`): asked every two heartbeats.
    pub(super) async fn election_gate_loop(self: Arc<Self>) {
        let mut allowed = true;
        let every = self.catch_up_grace;
        loop {
            tokio::time::sleep(every).await;
            let others: Vec<RaftPeer> = {
                let m = self.raft.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                // Learners never campaign: nothing to gate, nobody to ask.
                if !membership.voter_ids().any(|v| v == self.id) {
                    continue;
                }
                membership
                    .voter_ids()
                    .filter(|v| *v != self.id)
                    .filter_map(|v| membership.get_node(&v).cloned())
                    .collect()
            };
            let mut asks = tokio::task::JoinSet::new();
            for p in others {
                let peers = self.peers.clone();
                asks.spawn(async move {
                    let addr = p.socket_addr()?;
                    match peers
                        .call(&p.name, addr, &AgentRequest::LogTip, every)
                        .await
                    {
                        Ok(AgentResponse::LogTip(tip)) => Some(tip),
                        _ => None,
                    }
                });
            }
            let theirs: Vec<Option<openraft::LogId<NodeId>>> =
                asks.join_all().await.into_iter().flatten().collect();
            let now = may_campaign(self.last_log_id().await, &theirs);
            if now != allowed {
                self.raft.runtime_config().elect(now);
                tracing::debug!(allowed = now, "elections from this agent");
                allowed = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Only a voter whose log is at least as long as every live voter's may campaign; ties and
    /// a voter alone may.
    #[test]
    fn only_the_longest_log_campaigns() {
        use openraft::{CommittedLeaderId, LogId};
        let id = |term, index| Some(LogId::new(CommittedLeaderId::new(term, 1), index));
        assert!(super::may_campaign(id(3, 72), &[id(3, 70), id(3, 72)]));
        assert!(!super::may_campaign(id(3, 70), &[id(3, 72)]));
        // A later term wins over a longer index, as in Raft's vote check.
        assert!(super::may_campaign(id(4, 10), &[id(3, 72)]));
        assert!(!super::may_campaign(id(3, 72), &[id(4, 10)]));
        assert!(super::may_campaign(None, &[]));
        assert!(super::may_campaign(None, &[None]));
        assert!(!super::may_campaign(None, &[id(1, 1)]));
    }
}
