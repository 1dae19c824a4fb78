//! The coordinator's decisions, pure: from the replicated state, what the agents reported and
//! the time, to the actions the coordinator's task then carries out (health to record,
//! placements to write, agents to tell to reconcile, itself to register). Nothing here does IO
//! or reads a clock; every function is tested with tables of cases.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use pd_raft::{ClusterState, Command, NodeHealth, NodeId, Placed, RaftPeer};

use crate::wire::{EngineReport, EngineState};

use super::voters::{VOTER_ELIGIBLE, VOTER_LABEL};

/// Liveness timings from `[cluster]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessTimings {
    pub heartbeat: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
}

/// The health each node should have now, where it differs from what is recorded: silence
/// longer than `suspect_after` makes a node suspect, longer than `down_after` down, and a
/// report makes it ready again. A new coordinator gives every node a full period from its own
/// election (`leader_since`) before judging it; the coordinator itself is always ready.
pub fn judge_liveness(
    state: &ClusterState,
    me: &str,
    last_seen: &HashMap<String, Instant>,
    leader_since: Instant,
    now: Instant,
    t: &LivenessTimings,
) -> Vec<(String, NodeHealth)> {
    state
        .nodes
        .values()
        .filter_map(|n| {
            let want = if n.name == me {
                NodeHealth::Ready
            } else {
                let last = last_seen
                    .get(&n.name)
                    .copied()
                    .unwrap_or(leader_since)
                    .max(leader_since);
                let silent = now.saturating_duration_since(last);
                if silent >= t.down_after {
                    NodeHealth::Down
                } else if silent >= t.suspect_after {
                    NodeHealth::Suspect
                } else {
                    NodeHealth::Ready
                }
            };
            (want != n.health).then(|| (n.name.clone(), want))
        })
        .collect()
}

/// What placement decided for every deployment: the assignments to write where they differ
/// from the current ones, and the deployments that do not fit (they keep what they have).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placements {
    pub write: Vec<(String, Vec<Placed>)>,
    pub unplaced: Vec<String>,
}

/// Places every deployment's engines (`pd_raft::placement::place`) and keeps the changes.
pub fn placements(state: &ClusterState) -> Placements {
    let mut out = Placements::default();
    for name in state.deployments.keys() {
        let current: Vec<Placed> = state
            .assignments
            .values()
            .filter(|a| a.deployment == *name)
            .map(|a| Placed {
                engine: a.engine.clone(),
                role: a.role,
                node: a.node.clone(),
                gpus: a.gpus.clone(),
            })
            .collect();
        match pd_raft::placement::place(state, name) {
            Ok(next) if next != current => out.write.push((name.clone(), next)),
            Ok(_) => {}
            Err(e) => out.unplaced.push(e.to_string()),
        }
    }
    out
}

/// Each assigned engine's (node, generation): what the coordinator last told agents about.
pub type Pushed = BTreeMap<String, (String, u64)>;

/// The engines as assigned now.
pub fn assigned(state: &ClusterState) -> Pushed {
    state
        .assignments
        .values()
        .map(|a| (a.engine.clone(), (a.node.clone(), a.generation)))
        .collect()
}

/// The nodes to tell to reconcile: those with an engine assigned, moved or re-generated since
/// `before`, and those that lost one.
pub fn directive_targets(before: &Pushed, now: &Pushed) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for (engine, at) in now {
        if before.get(engine) != Some(at) {
            nodes.insert(at.0.clone());
        }
    }
    for (engine, (node, _)) in before {
        if !now.contains_key(engine) {
            nodes.insert(node.clone());
        }
    }
    nodes
}

/// The command that registers the coordinator itself, when the state does not record it at its
/// address. A coordinator that was never registered bootstrapped the cluster: the operator chose
/// it to hold the CA key, so it is labelled eligible to vote.
pub fn registration(state: &ClusterState, me: &RaftPeer, id: NodeId) -> Option<Command> {
    let registered = state.nodes.get(&me.name).map(|n| n.address.as_str());
    if registered == Some(me.address.as_str()) {
        return None;
    }
    let labels = match registered {
        None => BTreeMap::from([(VOTER_LABEL.to_string(), VOTER_ELIGIBLE.to_string())]),
        Some(_) => BTreeMap::new(),
    };
    Some(Command::RegisterNode {
        name: me.name.clone(),
        id,
        address: me.address.clone(),
        labels,
    })
}

/// Every assigned engine with its last reported state: this node's from `local`, the others'
/// from `reports`; a report of another generation does not count, and an engine nobody
/// reported yet is `starting` with no pid.
pub fn engines_view(
    state: &ClusterState,
    me: &str,
    local: &[EngineReport],
    reports: &HashMap<String, Vec<EngineReport>>,
) -> Vec<EngineReport> {
    state
        .assignments
        .values()
        .map(|a| {
            let list = if a.node == me {
                Some(local)
            } else {
                reports.get(&a.node).map(Vec::as_slice)
            };
            list.and_then(|l| l.iter().find(|r| r.engine == a.engine))
                .filter(|r| r.generation == a.generation)
                .cloned()
                .unwrap_or_else(|| EngineReport {
                    engine: a.engine.clone(),
                    deployment: a.deployment.clone(),
                    node: a.node.clone(),
                    role: a.role,
                    gpus: a.gpus.clone(),
                    state: EngineState::Starting,
                    pid: None,
                    restarts: 0,
                    generation: a.generation,
                    load: Default::default(),
                    driver: state
                        .deployments
                        .get(&a.deployment)
                        .map(|d| d.engine.clone())
                        .unwrap_or_default(),
                    state_ms: 0,
                    note: "not reported by its agent yet".into(),
                    port: None,
                    kv_port: None,
                })
        })
        .collect()
}

/// Engine reports grouped by the node that runs them.
pub fn by_node(engines: &[EngineReport]) -> HashMap<String, Vec<EngineReport>> {
    let mut out: HashMap<String, Vec<EngineReport>> = HashMap::new();
    for e in engines {
        out.entry(e.node.clone()).or_default().push(e.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_raft::state::GpuRecord;
    use pd_raft::{Assignment, EngineRole, Layout};

    /// A state with these nodes (each with `gpus` GPUs) at these healths.
    fn state_with(nodes: &[(&str, NodeHealth, u32)]) -> ClusterState {
        let mut s = ClusterState::default();
        let mut i = 0;
        for (k, (name, health, gpus)) in nodes.iter().enumerate() {
            let cmds = [
                Command::RegisterNode {
                    name: name.to_string(),
                    id: k as u64 + 1,
                    address: format!("127.0.0.{}:7400", k + 1),
                    labels: BTreeMap::new(),
                },
                Command::SetGpus {
                    node: name.to_string(),
                    gpus: (0..*gpus)
                        .map(|g| GpuRecord {
                            index: g,
                            uuid: format!("GPU-{name}-{g}"),
                            name: "NVIDIA H100 80GB HBM3".into(),
                            memory_total_bytes: 80 << 30,
                            health: "healthy".into(),
                        })
                        .collect(),
                },
                Command::SetHealth {
                    node: name.to_string(),
                    health: *health,
                },
            ];
            for c in &cmds {
                i += 1;
                s.apply(i, c).unwrap();
            }
        }
        s
    }

    fn state(nodes: &[(&str, NodeHealth)]) -> ClusterState {
        state_with(&nodes.iter().map(|(n, h)| (*n, *h, 0)).collect::<Vec<_>>())
    }

    const T: LivenessTimings = LivenessTimings {
        heartbeat: Duration::from_millis(100),
        suspect_after: Duration::from_millis(500),
        down_after: Duration::from_millis(2000),
    };

    /// Silence turns into suspect, then down; a report brings a node back; the coordinator is
    /// always ready; nothing is written for a node whose health is already right; a new
    /// coordinator judges nobody before a full period from its election.
    #[test]
    fn silence_becomes_suspect_then_down_and_a_report_heals() {
        use NodeHealth::*;
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        // (recorded health, last seen ms or none, leader since ms, now ms, expected change)
        type Case = (NodeHealth, Option<u64>, u64, u64, Option<NodeHealth>);
        let cases: &[Case] = &[
            (Ready, Some(1000), 0, 1100, None),
            (Ready, Some(1000), 0, 1500, Some(Suspect)),
            (Ready, Some(1000), 0, 3000, Some(Down)),
            (Suspect, Some(1000), 0, 3000, Some(Down)),
            (Suspect, Some(2900), 0, 3000, Some(Ready)),
            (Down, Some(2900), 0, 3000, Some(Ready)),
            (Down, Some(0), 0, 2500, None),
            // Never heard from: judged from the coordinator's election.
            (Ready, None, 1000, 1400, None),
            (Ready, None, 1000, 1600, Some(Suspect)),
            (Ready, None, 1000, 3100, Some(Down)),
            // Heard from before this coordinator was elected: a full period from its election.
            (Ready, Some(0), 1000, 1400, None),
            (Down, Some(0), 1000, 1400, Some(Ready)),
        ];
        for (i, (recorded, seen, since, now, want)) in cases.iter().enumerate() {
            let s = state(&[("me", Down), ("n2", *recorded)]);
            let seen: HashMap<String, Instant> = seen
                .map(|m| ("n2".to_string(), ms(m)))
                .into_iter()
                .collect();
            let got = judge_liveness(&s, "me", &seen, ms(*since), ms(*now), &T);
            let mut expected: Vec<(String, NodeHealth)> = vec![("me".into(), Ready)];
            if let Some(w) = want {
                expected.push(("n2".into(), *w));
            }
            assert_eq!(got, expected, "case {i}");
        }
    }

    fn assignment(engine: &str, node: &str, generation: u64) -> Assignment {
        Assignment {
            engine: engine.into(),
            deployment: engine.split('/').next().unwrap().into(),
            role: EngineRole::Decode,
            node: node.into(),
            gpus: vec![0],
            generation,
        }
    }

    /// Agents are told to reconcile when an engine of theirs appears, moves, gets a new
    /// generation or goes away; nobody when nothing changed.
    #[test]
    fn only_agents_whose_engines_changed_are_told() {
        let p = |l: &[(&str, &str, u64)]| -> Pushed {
            l.iter()
                .map(|(e, n, g)| (e.to_string(), (n.to_string(), *g)))
                .collect()
        };
        let set = |l: &[&str]| -> BTreeSet<String> { l.iter().map(|s| s.to_string()).collect() };
        let cases: &[(Pushed, Pushed, BTreeSet<String>)] = &[
            (p(&[]), p(&[]), set(&[])),
            (p(&[("d/x-0", "a", 1)]), p(&[("d/x-0", "a", 1)]), set(&[])),
            (p(&[]), p(&[("d/x-0", "a", 1)]), set(&["a"])),
            (
                p(&[("d/x-0", "a", 1)]),
                p(&[("d/x-0", "a", 2)]),
                set(&["a"]),
            ),
            (
                p(&[("d/x-0", "a", 1)]),
                p(&[("d/x-0", "b", 2)]),
                set(&["b"]),
            ),
            (p(&[("d/x-0", "a", 1)]), p(&[]), set(&["a"])),
            (
                p(&[("d/x-0", "a", 1), ("d/x-1", "b", 1)]),
                p(&[("d/x-1", "b", 1), ("d/x-2", "c", 3)]),
                set(&["a", "c"]),
            ),
        ];
        for (i, (before, now, want)) in cases.iter().enumerate() {
            assert_eq!(directive_targets(before, now), *want, "case {i}");
        }
        let mut s = state(&[("a", NodeHealth::Ready)]);
        s.assignments
            .insert("d/x-0".into(), assignment("d/x-0", "a", 7));
        assert_eq!(assigned(&s), p(&[("d/x-0", "a", 7)]));
    }

    /// The coordinator registers itself when it is missing (labelled eligible: it bootstrapped
    /// the cluster) or recorded at another address (no label change), and not otherwise.
    #[test]
    fn the_coordinator_registers_itself_once() {
        let me = RaftPeer {
            name: "me".into(),
            address: "10.0.0.1:7000".into(),
        };
        let id = 42;
        let empty = ClusterState::default();
        match registration(&empty, &me, id) {
            Some(Command::RegisterNode { labels, .. }) => {
                assert_eq!(
                    labels.get(VOTER_LABEL).map(String::as_str),
                    Some(VOTER_ELIGIBLE)
                )
            }
            other => panic!("{other:?}"),
        }
        let mut moved = state(&[("me", NodeHealth::Ready)]);
        match registration(&moved, &me, id) {
            Some(Command::RegisterNode {
                labels, address, ..
            }) => {
                assert!(labels.is_empty());
                assert_eq!(address, me.address);
            }
            other => panic!("{other:?}"),
        }
        moved.nodes.get_mut("me").unwrap().address = me.address.clone();
        assert_eq!(registration(&moved, &me, id), None);
    }

    fn report(engine: &str, node: &str, generation: u64, state: EngineState) -> EngineReport {
        EngineReport {
            engine: engine.into(),
            deployment: "d".into(),
            node: node.into(),
            role: EngineRole::Decode,
            gpus: vec![0],
            state,
            pid: Some(1),
            restarts: 0,
            generation,
            load: Default::default(),
            driver: "builtin".into(),
            state_ms: 5,
            note: String::new(),
            port: None,
            kv_port: None,
        }
    }

    /// The engines view takes this node's engines from its supervisor and the others' from
    /// their reports, ignores a report of an older generation and shows an engine nobody
    /// reported as starting.
    #[test]
    fn the_engines_view_joins_assignments_and_reports() {
        let mut s = state(&[("me", NodeHealth::Ready), ("b", NodeHealth::Ready)]);
        for (e, n, g) in [("d/x-0", "me", 3), ("d/x-1", "b", 4), ("d/x-2", "b", 5)] {
            s.assignments.insert(e.into(), assignment(e, n, g));
        }
        let local = vec![report("d/x-0", "me", 3, EngineState::Ready)];
        let reports = HashMap::from([(
            "b".to_string(),
            vec![
                report("d/x-1", "b", 4, EngineState::Draining),
                // A report from before the engine was re-assigned.
                report("d/x-2", "b", 2, EngineState::Ready),
            ],
        )]);
        let view = engines_view(&s, "me", &local, &reports);
        let states: Vec<(&str, EngineState, Option<u32>)> = view
            .iter()
            .map(|r| (r.engine.as_str(), r.state, r.pid))
            .collect();
        assert_eq!(
            states,
            vec![
                ("d/x-0", EngineState::Ready, Some(1)),
                ("d/x-1", EngineState::Draining, Some(1)),
                ("d/x-2", EngineState::Starting, None),
            ]
        );
        assert_eq!(view[2].generation, 5);
        assert_eq!(view[2].note, "not reported by its agent yet");

        // An agent that cannot ask the coordinator goes on with the coordinator's last
        // listing (`by_node`), its own engines as its supervisor says now.
        let listed = by_node(&view);
        assert_eq!(listed["b"].len(), 2);
        let mut now = local.clone();
        now[0].state = EngineState::Draining;
        let again = engines_view(&s, "me", &now, &listed);
        let states: Vec<EngineState> = again.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            vec![
                EngineState::Draining,
                EngineState::Draining,
                EngineState::Starting
            ]
        );
    }

    /// Placement writes a deployment's engines once; with them applied it writes nothing; a
    /// deployment that does not fit is named and keeps what it has.
    #[test]
    fn placement_writes_only_changes() {
        let mut s = state_with(&[("a", NodeHealth::Ready, 2), ("b", NodeHealth::Ready, 2)]);
        let mut i = 100;
        let mut apply = |s: &mut ClusterState, c: Command| {
            i += 1;
            s.apply(i, &c).unwrap();
        };
        apply(
            &mut s,
            Command::CreateDeployment {
                name: "d".into(),
                engine: "builtin".into(),
                model: "tiny".into(),
                tp: 1,
                ttft_ms: None,
                tpot_ms: None,
                layout: Layout::Disaggregated {
                    prefill: 1,
                    decode: 1,
                },
            },
        );
        let first = placements(&s);
        assert!(first.unplaced.is_empty(), "{first:?}");
        assert_eq!(first.write.len(), 1);
        let (name, placed) = &first.write[0];
        assert_eq!(name, "d");
        assert_eq!(placed.len(), 2);
        apply(
            &mut s,
            Command::SetAssignments {
                deployment: "d".into(),
                assignments: placed.clone(),
            },
        );
        assert_eq!(placements(&s), Placements::default());
        apply(
            &mut s,
            Command::CreateDeployment {
                name: "big".into(),
                engine: "builtin".into(),
                model: "tiny".into(),
                tp: 8,
                ttft_ms: None,
                tpot_ms: None,
                layout: Layout::Colocated { engines: 1 },
            },
        );
        let second = placements(&s);
        assert!(second.write.is_empty(), "{second:?}");
        assert_eq!(second.unplaced.len(), 1);
        assert!(second.unplaced[0].contains("big"), "{second:?}");
    }
}
