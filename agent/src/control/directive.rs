//! Directives: what a coordinator tells an agent directly, outside the log (today: reconcile
//! now), fenced by Raft term so that a deposed coordinator is not obeyed.

use pd_raft::NodeId;
use pd_raft::network::node_id;
use pd_transport::PeerIdentity;
use tracing::warn;

use crate::wire::{AgentResponse, Directive};

use super::ControlPlane;

/// The fencing of directives, pure: a directive of term `term` is
/// refused when this agent has seen a newer term (`seen`: its Raft's, or a directive's), and,
/// in the term its Raft is in (`raft_term`), when it does not come from that term's leader.
pub fn fence_directive(
    term: u64,
    seen: u64,
    raft_term: u64,
    leader: Option<NodeId>,
    from: NodeId,
) -> Result<(), String> {
    if term < seen {
        return Err(format!(
            "stale term {term}: this agent has seen term {seen}"
        ));
    }
    if term == raft_term && leader.is_some_and(|l| l != from) {
        return Err(format!("the sender is not the coordinator of term {term}"));
    }
    Ok(())
}

impl ControlPlane {
    /// A directive from a coordinator: refused when its term is older than one this agent has
    /// seen (from Raft or from another directive), or when it comes from a node that is not
    /// the leader of the term this agent is in.
    pub async fn directive(
        &self,
        peer: &PeerIdentity,
        term: u64,
        directive: Directive,
    ) -> Result<AgentResponse, String> {
        let PeerIdentity::Node(from) = peer else {
            return Err("only agents give directives".into());
        };
        let m = self.raft.metrics().borrow().clone();
        let seen = self
            .directive_term
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(m.current_term);
        if let Err(why) =
            fence_directive(term, seen, m.current_term, m.current_leader, node_id(from))
        {
            warn!(%from, term, seen, %why, "refused a directive");
            return Ok(AgentResponse::DirectiveRefused {
                seen_term: seen,
                why,
            });
        }
        self.directive_term
            .fetch_max(term, std::sync::atomic::Ordering::Relaxed);
        match directive {
            Directive::Reconcile { index } => {
                // Wait (briefly) for the log to bring the change here, then wake the
                // supervisor.
                let mut metrics = self.raft.metrics();
                let until = tokio::time::Instant::now() + self.attempt_timeout;
                loop {
                    let applied = metrics.borrow().last_applied.map_or(0, |l| l.index);
                    if applied >= index {
                        break;
                    }
                    match tokio::time::timeout_at(until, metrics.changed()).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                self.engines_kick.notify_one();
                Ok(AgentResponse::DirectiveDone)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Directives are fenced by term: an older term than one seen is refused; in the current
    /// term only its leader is obeyed; a newer term (the agent's Raft lags) is accepted.
    #[test]
    fn directives_with_a_stale_term_are_refused() {
        assert!(super::fence_directive(5, 5, 5, Some(1), 1).is_ok());
        let e = super::fence_directive(4, 5, 5, Some(1), 1).unwrap_err();
        assert!(
            e.contains("stale term 4") && e.contains("seen term 5"),
            "{e}"
        );
        // Seen from an earlier directive, ahead of this agent's Raft.
        assert!(super::fence_directive(6, 7, 5, Some(1), 2).is_err());
        assert!(
            super::fence_directive(5, 5, 5, Some(1), 2)
                .unwrap_err()
                .contains("not the coordinator")
        );
        assert!(super::fence_directive(5, 5, 5, None, 2).is_ok());
        assert!(super::fence_directive(8, 5, 5, Some(1), 2).is_ok());
    }
}
