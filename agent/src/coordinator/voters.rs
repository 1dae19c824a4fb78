//! Which agents vote in Raft: a pure choice from the membership, the nodes' health and their
//! labels. A voter holds the CA key (`custody`), so who may vote is the operator's decision:
//! a host votes only once an admin labels it `pdagent/voter=eligible` (the first host is
//! labelled when it bootstraps the cluster). A join token alone never leads to the CA key.

use std::collections::BTreeSet;

use pd_raft::{NodeHealth, NodeId};

/// The label that makes a host eligible to vote, and its value.
pub const VOTER_LABEL: &str = "pdagent/voter";
pub const VOTER_ELIGIBLE: &str = "eligible";

/// A Raft member as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    /// As recorded in the replicated state (`None`: not registered yet).
    pub health: Option<NodeHealth>,
    pub rack: Option<String>,
    /// Labelled `pdagent/voter=eligible`.
    pub eligible: bool,
}

/// What the coordinator should do with the voter set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterPlan {
    /// The voters to have; equal to the current set when nothing changes.
    pub next: BTreeSet<NodeId>,
    /// Learners that become voters.
    pub promoted: Vec<String>,
    /// Voters recorded down, replaced.
    pub replaced: Vec<String>,
    /// Voters no longer eligible, replaced by eligible learners.
    pub retired: Vec<String>,
    /// Why the cluster has fewer voters than it wants, when it does.
    pub short: Option<String>,
}

/// Keeps `want` voters: the coordinator (`me`) always stays; a voter recorded down is
/// replaced; missing voters are filled from ready learners labelled eligible, preferring
/// racks (the `rack` label) with no voter yet, then names; a voter that lost its eligibility
/// is replaced when an eligible learner is ready. The voter set never shrinks for want of a
/// replacement.
pub fn plan(me: NodeId, want: usize, voters: &[Member], learners: &[Member]) -> VoterPlan {
    let current: BTreeSet<NodeId> = voters.iter().map(|v| v.id).collect();
    let mut keep: Vec<&Member> = voters
        .iter()
        .filter(|v| v.id == me || v.health != Some(NodeHealth::Down))
        .collect();
    let replaced: Vec<String> = voters
        .iter()
        .filter(|v| !keep.iter().any(|k| k.id == v.id))
        .map(|v| v.name.clone())
        .collect();
    let mut racks: BTreeSet<Option<String>> = keep.iter().map(|v| v.rack.clone()).collect();
    let ready = |m: &&Member| m.id == me || m.health == Some(NodeHealth::Ready);
    let mut candidates: Vec<&Member> = learners
        .iter()
        .filter(ready)
        .filter(|m| m.eligible)
        .collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let mut promoted = Vec::new();
    while keep.len() < want && !candidates.is_empty() {
        let i = candidates
            .iter()
            .position(|m| !racks.contains(&m.rack))
            .unwrap_or(0);
        let m = candidates.remove(i);
        racks.insert(m.rack.clone());
        promoted.push(m.name.clone());
        keep.push(m);
    }
    let mut retired = Vec::new();
    for slot in keep.iter_mut() {
        if slot.id == me || slot.eligible || candidates.is_empty() {
            continue;
        }
        let m = candidates.remove(0);
        retired.push(slot.name.clone());
        promoted.push(m.name.clone());
        *slot = m;
    }
    let short = (keep.len() < want).then(|| {
        let waiting = learners
            .iter()
            .filter(ready)
            .filter(|m| !m.eligible)
            .count();
        format!(
            "{} of {want} voters: no ready learner is eligible to vote ({waiting} ready but not \
             eligible); an admin makes a host eligible with `pdctl label NODE \
             {VOTER_LABEL}={VOTER_ELIGIBLE}` (a voter holds the CA key)",
            keep.len()
        )
    });
    let next: BTreeSet<NodeId> = keep.iter().map(|m| m.id).collect();
    if next.len() < current.len().min(want) {
        return VoterPlan {
            next: current,
            promoted: vec![],
            replaced: vec![],
            retired: vec![],
            short,
        };
    }
    VoterPlan {
        next,
        promoted,
        replaced,
        retired,
        short,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: NodeId, health: NodeHealth, eligible: bool, rack: Option<&str>) -> Member {
        Member {
            id,
            name: format!("node-{id}"),
            health: Some(health),
            rack: rack.map(str::to_string),
            eligible,
        }
    }
    use NodeHealth::{Down, Ready, Suspect};

    fn ids(v: &[NodeId]) -> BTreeSet<NodeId> {
        v.iter().copied().collect()
    }

    #[test]
    fn only_eligible_learners_are_promoted() {
        let voters = [m(1, Ready, true, None)];
        let learners = [
            m(2, Ready, false, None),
            m(3, Ready, true, None),
            m(4, Ready, false, None),
        ];
        let p = plan(1, 3, &voters, &learners);
        assert_eq!(p.next, ids(&[1, 3]));
        assert_eq!(p.promoted, vec!["node-3"]);
        let short = p.short.unwrap();
        assert!(
            short.contains("2 of 3") && short.contains("2 ready but not eligible"),
            "{short}"
        );
        assert!(short.contains("pdagent/voter=eligible"), "{short}");
    }

    #[test]
    fn a_cluster_of_token_joined_hosts_keeps_its_one_voter() {
        let voters = [m(1, Ready, true, None)];
        let learners = [m(2, Ready, false, None), m(3, Ready, false, None)];
        let p = plan(1, 3, &voters, &learners);
        assert_eq!(p.next, ids(&[1]));
        assert!(p.promoted.is_empty());
        assert!(p.short.is_some());
    }

    #[test]
    fn a_down_voter_is_replaced_from_eligible_learners_only() {
        let voters = [
            m(1, Ready, true, None),
            m(2, Down, true, None),
            m(3, Ready, true, None),
        ];
        // Only an ineligible learner: the dead voter stays (the set never shrinks).
        let p = plan(1, 3, &voters, &[m(4, Ready, false, None)]);
        assert_eq!(p.next, ids(&[1, 2, 3]));
        assert!(p.short.is_some());
        // An eligible one replaces it.
        let p = plan(
            1,
            3,
            &voters,
            &[m(4, Ready, false, None), m(5, Ready, true, None)],
        );
        assert_eq!(p.next, ids(&[1, 3, 5]));
        assert_eq!(p.replaced, vec!["node-2"]);
        assert_eq!(p.promoted, vec!["node-5"]);
        assert_eq!(p.short, None);
    }

    #[test]
    fn suspect_learners_wait_and_the_coordinator_always_stays() {
        let voters = [m(1, Down, false, None)];
        let p = plan(1, 3, &voters, &[m(2, Suspect, true, None)]);
        assert_eq!(p.next, ids(&[1]));
        assert!(p.replaced.is_empty());
    }

    #[test]
    fn racks_without_a_voter_come_first() {
        let voters = [m(1, Ready, true, Some("a"))];
        let learners = [
            m(2, Ready, true, Some("a")),
            m(3, Ready, true, Some("a")),
            m(4, Ready, true, Some("b")),
        ];
        let p = plan(1, 3, &voters, &learners);
        assert_eq!(p.next, ids(&[1, 2, 4]));
        assert_eq!(p.promoted, vec!["node-4", "node-2"]);
    }

    #[test]
    fn a_voter_that_lost_its_eligibility_is_retired_when_a_replacement_is_ready() {
        let voters = [
            m(1, Ready, true, None),
            m(2, Ready, false, None),
            m(3, Ready, true, None),
        ];
        let p = plan(1, 3, &voters, &[]);
        assert_eq!(p.next, ids(&[1, 2, 3]), "no replacement: it stays");
        let p = plan(1, 3, &voters, &[m(4, Ready, true, None)]);
        assert_eq!(p.next, ids(&[1, 3, 4]));
        assert_eq!(p.retired, vec!["node-2"]);
        assert_eq!(p.promoted, vec!["node-4"]);
    }

    #[test]
    fn nothing_changes_when_all_is_well() {
        let voters = [
            m(1, Ready, true, None),
            m(2, Ready, true, None),
            m(3, Ready, true, None),
        ];
        let p = plan(2, 3, &voters, &[m(4, Ready, true, None)]);
        assert_eq!(p.next, ids(&[1, 2, 3]));
        assert!(p.promoted.is_empty() && p.replaced.is_empty() && p.retired.is_empty());
        assert_eq!(p.short, None);
    }
}
