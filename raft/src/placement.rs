//! Placement: which GPUs of which nodes run a deployment's engines. Pure: a function of the
//! replicated state, tested without a cluster.
//!
//! Rules, in order:
//! - an engine needs `tp` GPUs on one node; a GPU never runs two engines;
//! - only nodes that are ready and active (not cordoned, not draining) receive new engines,
//!   and only their GPUs that are not failed;
//! - a deployment whose model is a folder runs only on the nodes that had a matching copy
//!   when it was created (`ClusterState::model_hosts`);
//! - an engine keeps its place while its node is ready and its GPUs are usable (placement is
//!   stable: a healthy engine is never moved to make the layout prettier); cordoning a node
//!   keeps its engines, draining moves them;
//! - engines of one deployment go close together: onto the node that already holds most of the
//!   deployment, then nodes of the same `rack` label, then the nodes with the most free GPUs
//!   (so prefill and decode engines share a host when they fit), names breaking ties.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{AdminState, ClusterState, Deployment, NodeHealth, Placed};

/// Why a deployment cannot be placed in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "deployment {deployment} needs {engines} engines of {tp} GPU(s) each; {placed} fit. Free GPUs on ready, active nodes: {free}"
)]
pub struct PlacementError {
    pub deployment: String,
    pub engines: u32,
    pub tp: u32,
    pub placed: u32,
    /// e.g. "node-1: 0 of 2, node-2 (cordoned): -"
    pub free: String,
}

/// The engine ids of a deployment, in placement order: prefill and decode interleaved so that
/// pairs land together. Per role, the ids already assigned stay (the lowest indexes when
/// there are more than the layout asks for), and new ones take the lowest free indexes: a
/// flip or a scale never renames an engine that keeps running.
pub fn engine_ids(d: &Deployment, state: &ClusterState) -> Vec<(String, crate::state::EngineRole)> {
    let mut per_role: Vec<Vec<(String, crate::state::EngineRole)>> = d
        .layout
        .engines()
        .into_iter()
        .map(|(role, n)| {
            let mut held: Vec<u32> = state
                .assignments
                .values()
                .filter(|a| a.deployment == d.name && a.role == role)
                .filter_map(|a| crate::state::engine_index(&a.engine))
                .collect();
            held.sort_unstable();
            held.truncate(n as usize);
            let mut ks = held.clone();
            let mut k = 0;
            while ks.len() < n as usize {
                if !held.contains(&k) {
                    ks.push(k);
                }
                k += 1;
            }
            ks.sort_unstable();
            ks.into_iter()
                .map(|k| (format!("{}/{role}-{k}", d.name), role))
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    let longest = per_role.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for r in per_role.iter_mut() {
            if i < r.len() {
                out.push(r[i].clone());
            }
        }
    }
    out
}

fn usable_node(state: &ClusterState, node: &str, for_new: bool) -> bool {
    state.nodes.get(node).is_some_and(|n| {
        n.health == NodeHealth::Ready
            && match n.admin_state {
                AdminState::Active => true,
                AdminState::Cordoned => !for_new,
                AdminState::Draining => false,
            }
    })
}

/// Whether the node holds the deployment's model (always, for presets).
fn has_model(state: &ClusterState, deployment: &str, node: &str) -> bool {
    state
        .model_hosts
        .get(deployment)
        .is_none_or(|h| h.nodes.contains(node))
}

fn usable_gpu(state: &ClusterState, node: &str, gpu: u32) -> bool {
    state.nodes.get(node).is_some_and(|n| {
        n.gpus
            .iter()
            .any(|g| g.index == gpu && g.health != "failed")
    })
}

/// The places of `deployment`'s engines. Engines whose place is still good keep it; the rest
/// are placed anew. Returns every engine's place, or why they do not all fit.
pub fn place(state: &ClusterState, deployment: &str) -> Result<Vec<Placed>, PlacementError> {
    let d = state
        .deployments
        .get(deployment)
        .ok_or_else(|| PlacementError {
            deployment: deployment.to_string(),
            engines: 0,
            tp: 0,
            placed: 0,
            free: "(no such deployment)".into(),
        })?;
    let wanted = engine_ids(d, state);
    let wanted_ids: BTreeSet<&str> = wanted.iter().map(|(e, _)| e.as_str()).collect();
    // GPUs held by other deployments' engines, and by this deployment's engines that stay.
    let mut used: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut kept: BTreeMap<String, Placed> = BTreeMap::new();
    for a in state.assignments.values() {
        let stays = a.deployment != d.name
            || (wanted_ids.contains(a.engine.as_str())
                && wanted.iter().any(|(e, r)| *e == a.engine && *r == a.role)
                && a.gpus.len() == d.tp as usize
                && usable_node(state, &a.node, false)
                && has_model(state, &d.name, &a.node)
                && a.gpus.iter().all(|g| usable_gpu(state, &a.node, *g)));
        if !stays {
            continue;
        }
        used.extend(a.gpus.iter().map(|g| (a.node.clone(), *g)));
        if a.deployment == d.name {
            kept.insert(
                a.engine.clone(),
                Placed {
                    engine: a.engine.clone(),
                    role: a.role,
                    node: a.node.clone(),
                    gpus: a.gpus.clone(),
                },
            );
        }
    }
    let free_on = |used: &BTreeSet<(String, u32)>, node: &str| -> Vec<u32> {
        let Some(n) = state.nodes.get(node) else {
            return Vec::new();
        };
        let mut g: Vec<u32> = n
            .gpus
            .iter()
            .filter(|g| g.health != "failed" && !used.contains(&(node.to_string(), g.index)))
            .map(|g| g.index)
            .collect();
        g.sort();
        g
    };
    let rack = |node: &str| -> Option<String> {
        state
            .nodes
            .get(node)
            .and_then(|n| n.labels.get("rack").cloned())
    };
    let mut out: Vec<Placed> = Vec::new();
    let mut placed = 0u32;
    for (engine, role) in &wanted {
        if let Some(p) = kept.remove(engine) {
            out.push(p);
            placed += 1;
            continue;
        }
        // This deployment's engines per node and per rack, to keep them close.
        let mut here: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &out {
            *here.entry(p.node.as_str()).or_default() += 1;
        }
        let racks: BTreeSet<Option<String>> = out.iter().map(|p| rack(&p.node)).collect();
        let best = state
            .nodes
            .keys()
            .filter(|n| usable_node(state, n, true) && has_model(state, &d.name, n))
            .map(|n| (n.as_str(), free_on(&used, n)))
            .filter(|(_, free)| free.len() >= d.tp as usize)
            .max_by_key(|(n, free)| {
                (
                    here.get(n).copied().unwrap_or(0),
                    !out.is_empty() && racks.contains(&rack(n)),
                    free.len(),
                    std::cmp::Reverse(n.to_string()),
                )
            });
        let Some((node, free)) = best else {
            continue;
        };
        let gpus: Vec<u32> = free.into_iter().take(d.tp as usize).collect();
        used.extend(gpus.iter().map(|g| (node.to_string(), *g)));
        out.push(Placed {
            engine: engine.clone(),
            role: *role,
            node: node.to_string(),
            gpus,
        });
        placed += 1;
    }
    if placed < wanted.len() as u32 {
        let used_by_others: BTreeSet<(String, u32)> = state
            .assignments
            .values()
            .filter(|a| a.deployment != d.name)
            .flat_map(|a| a.gpus.iter().map(|g| (a.node.clone(), *g)))
            .collect();
        let free = state
            .nodes
            .values()
            .map(|n| {
                if !usable_node(state, &n.name, true) {
                    format!("{} ({:?}, {:?}): -", n.name, n.health, n.admin_state).to_lowercase()
                } else if !has_model(state, &d.name, &n.name) {
                    format!("{} (no copy of the model): -", n.name)
                } else {
                    format!(
                        "{}: {} of {}",
                        n.name,
                        free_on(&used_by_others, &n.name).len(),
                        n.gpus.len()
                    )
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(PlacementError {
            deployment: d.name.clone(),
            engines: wanted.len() as u32,
            tp: d.tp,
            placed,
            free: if free.is_empty() {
                "no nodes".into()
            } else {
                free
            },
        });
    }
    out.sort_by(|a, b| a.engine.cmp(&b.engine));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Command, GpuRecord, Layout};

    fn cluster(nodes: &[(&str, u32, Option<&str>)]) -> (ClusterState, u64) {
        let mut s = ClusterState::default();
        let mut i = 0;
        for (k, (name, gpus, rack)) in nodes.iter().enumerate() {
            i += 1;
            let mut labels = BTreeMap::new();
            if let Some(r) = rack {
                labels.insert("rack".to_string(), r.to_string());
            }
            s.apply(
                i,
                &Command::RegisterNode {
                    name: name.to_string(),
                    id: k as u64 + 1,
                    address: format!("127.0.0.{}:7400", k + 1),
                    labels,
                },
            )
            .unwrap();
            i += 1;
            s.apply(
                i,
                &Command::SetGpus {
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
            )
            .unwrap();
        }
        (s, i)
    }

    fn deploy(s: &mut ClusterState, i: &mut u64, name: &str, tp: u32, layout: Layout) {
        *i += 1;
        s.apply(
            *i,
            &Command::CreateDeployment {
                name: name.into(),
                engine: "builtin".into(),
                model: "tiny".into(),
                tp,
                ttft_ms: None,
                tpot_ms: None,
                layout,
            },
        )
        .unwrap();
    }

    fn commit(s: &mut ClusterState, i: &mut u64, name: &str) -> Vec<Placed> {
        let p = place(s, name).unwrap();
        *i += 1;
        s.apply(
            *i,
            &Command::SetAssignments {
                deployment: name.into(),
                assignments: p.clone(),
            },
        )
        .unwrap();
        p
    }

    fn gpus_distinct(s: &ClusterState) -> bool {
        let all: Vec<(String, u32)> = s
            .assignments
            .values()
            .flat_map(|a| a.gpus.iter().map(|g| (a.node.clone(), *g)))
            .collect();
        let set: BTreeSet<_> = all.iter().cloned().collect();
        set.len() == all.len()
    }

    /// A deployment with model hosts runs only there; the refusal names the nodes without a
    /// copy; deleting the deployment forgets its hosts.
    #[test]
    fn a_model_folder_deployment_runs_only_on_its_hosts() {
        let (mut s, mut i) = cluster(&[("a", 2, None), ("b", 2, None), ("c", 4, None)]);
        let create = |layout| Command::CreateCheckedDeployment {
            name: "ck".into(),
            engine: "builtin".into(),
            model: "/models/ck".into(),
            tp: 1,
            ttft_ms: None,
            tpot_ms: None,
            layout,
            plan: None,
            model_hosts: Some(crate::state::ModelHosts {
                fingerprint: "00000000000000ff".into(),
                nodes: ["a".to_string(), "b".to_string()].into(),
            }),
        };
        i += 1;
        s.apply(i, &create(Layout::Colocated { engines: 4 }))
            .unwrap();
        let p = commit(&mut s, &mut i, "ck");
        assert!(p.iter().all(|p| p.node != "c"), "{p:?}");
        // One more does not fit, although c has 4 free GPUs.
        i += 1;
        s.apply(
            i,
            &Command::ScaleDeployment {
                name: "ck".into(),
                layout: Layout::Colocated { engines: 5 },
            },
        )
        .unwrap();
        let e = place(&s, "ck").unwrap_err();
        assert!(e.free.contains("c (no copy of the model): -"), "{e}");
        // An empty host list is refused; deleting forgets the hosts.
        i += 1;
        s.apply(i, &Command::DeleteDeployment { name: "ck".into() })
            .unwrap();
        assert!(s.model_hosts.is_empty());
        let mut bad = create(Layout::Colocated { engines: 1 });
        if let Command::CreateCheckedDeployment { model_hosts, .. } = &mut bad {
            model_hosts.as_mut().unwrap().nodes.clear();
        }
        assert!(s.apply(i + 1, &bad).is_err());
        assert!(s.deployments.is_empty());
    }

    /// 2 prefill + 2 decode engines on four 2-GPU nodes: distinct GPUs, each prefill engine on
    /// the host of a decode engine.
    #[test]
    fn pairs_share_hosts_and_gpus_are_never_shared() {
        let (mut s, mut i) = cluster(&[
            ("node-1", 2, None),
            ("node-2", 2, None),
            ("node-3", 2, None),
            ("node-4", 2, None),
        ]);
        deploy(
            &mut s,
            &mut i,
            "tiny",
            1,
            Layout::Disaggregated {
                prefill: 2,
                decode: 2,
            },
        );
        let p = commit(&mut s, &mut i, "tiny");
        assert_eq!(p.len(), 4);
        assert!(gpus_distinct(&s));
        let node_of = |e: &str| p.iter().find(|x| x.engine == e).unwrap().node.clone();
        assert_eq!(node_of("tiny/prefill-0"), node_of("tiny/decode-0"));
        assert_eq!(node_of("tiny/prefill-1"), node_of("tiny/decode-1"));
        // A second deployment takes the GPUs left, never one of the first's.
        deploy(&mut s, &mut i, "other", 2, Layout::Colocated { engines: 2 });
        commit(&mut s, &mut i, "other");
        assert!(gpus_distinct(&s));
        assert_eq!(s.assignments.len(), 6);
        // A third does not fit, and says what is free.
        deploy(&mut s, &mut i, "third", 1, Layout::Colocated { engines: 1 });
        let e = place(&s, "third").unwrap_err();
        assert_eq!(e.placed, 0);
        assert!(e.free.contains("node-1: 0 of 2"), "{e}");
    }

    /// Placement is stable, and the generation (fencing token) of an unchanged engine stays;
    /// a down or draining node's engines move (new generation), a cordoned node's stay.
    #[test]
    fn stable_places_and_generations_move_only_what_must() {
        let (mut s, mut i) = cluster(&[("a", 2, None), ("b", 2, None), ("c", 2, None)]);
        deploy(
            &mut s,
            &mut i,
            "d",
            1,
            Layout::Disaggregated {
                prefill: 1,
                decode: 1,
            },
        );
        commit(&mut s, &mut i, "d");
        let before = s.assignments.clone();
        assert_eq!(place(&s, "d").unwrap().len(), 2);
        i += 1;
        let again = place(&s, "d").unwrap();
        assert_eq!(
            s.apply(
                i,
                &Command::SetAssignments {
                    deployment: "d".into(),
                    assignments: again
                }
            ),
            Ok(crate::state::Applied::Unchanged)
        );
        assert_eq!(s.assignments, before);
        let host = before.values().next().unwrap().node.clone();
        // Cordoned: engines stay.
        i += 1;
        s.apply(
            i,
            &Command::SetAdminState {
                node: host.clone(),
                state: AdminState::Cordoned,
            },
        )
        .unwrap();
        assert!(place(&s, "d").unwrap().iter().all(|p| p.node == host));
        // Down: both move, with a new generation.
        i += 1;
        s.apply(
            i,
            &Command::SetHealth {
                node: host.clone(),
                health: NodeHealth::Down,
            },
        )
        .unwrap();
        commit(&mut s, &mut i, "d");
        assert!(s.assignments.values().all(|a| a.node != host));
        assert!(s.assignments.values().all(|a| a.generation == i));
        assert!(gpus_distinct(&s));
        // A failed GPU is never chosen.
        let moved_to = s.assignments.values().next().unwrap().node.clone();
        let mut gpus = s.nodes[&moved_to].gpus.clone();
        for g in &mut gpus {
            g.health = "failed".into();
        }
        i += 1;
        s.apply(
            i,
            &Command::SetGpus {
                node: moved_to.clone(),
                gpus,
            },
        )
        .unwrap();
        let p = place(&s, "d").unwrap();
        assert!(
            p.iter().all(|x| x.node != moved_to && x.node != host),
            "{p:?}"
        );
        // With the last node draining too, nothing fits, and the error says so.
        let last = p[0].node.clone();
        i += 1;
        s.apply(
            i,
            &Command::SetAdminState {
                node: last,
                state: AdminState::Draining,
            },
        )
        .unwrap();
        let e = place(&s, "d").unwrap_err();
        assert!(e.to_string().contains("needs 2 engines"), "{e}");
        assert!(e.free.contains("draining"), "{e}");
    }

    /// Engines of one deployment fill a rack before spilling to another.
    #[test]
    fn racks_keep_a_deployment_together() {
        let (mut s, mut i) = cluster(&[
            ("a1", 1, Some("r1")),
            ("b1", 2, Some("r2")),
            ("c1", 1, Some("r1")),
        ]);
        deploy(
            &mut s,
            &mut i,
            "d",
            1,
            Layout::Disaggregated {
                prefill: 1,
                decode: 2,
            },
        );
        let p = commit(&mut s, &mut i, "d");
        // The first engine goes where most GPUs are free (b1, both of them), the third to the
        // next node with room.
        let nodes: BTreeSet<String> = p.iter().map(|x| x.node.clone()).collect();
        assert!(nodes.contains("b1"));
        assert_eq!(p.iter().filter(|x| x.node == "b1").count(), 2);
        // Scaling down drops the surplus engines; scaling up places more.
        i += 1;
        s.apply(
            i,
            &Command::ScaleDeployment {
                name: "d".into(),
                layout: Layout::Disaggregated {
                    prefill: 1,
                    decode: 1,
                },
            },
        )
        .unwrap();
        assert_eq!(commit(&mut s, &mut i, "d").len(), 2);
        assert_eq!(s.assignments.len(), 2);
    }

    #[test]
    fn bad_deployments_and_assignments_are_refused() {
        let (mut s, mut i) = cluster(&[("a", 2, None)]);
        let bad = |name: &str, tp, layout| Command::CreateDeployment {
            name: name.into(),
            engine: "builtin".into(),
            model: "tiny".into(),
            tp,
            ttft_ms: None,
            tpot_ms: None,
            layout,
        };
        for c in [
            bad("Bad_Name", 1, Layout::Colocated { engines: 1 }),
            bad("x", 0, Layout::Colocated { engines: 1 }),
            bad("x", 1, Layout::Colocated { engines: 0 }),
            bad(
                "x",
                1,
                Layout::Disaggregated {
                    prefill: 0,
                    decode: 1,
                },
            ),
        ] {
            i += 1;
            assert!(matches!(
                s.apply(i, &c),
                Err(crate::state::ApplyError::BadDeployment(_))
            ));
        }
        deploy(&mut s, &mut i, "x", 1, Layout::Colocated { engines: 2 });
        i += 1;
        assert!(matches!(
            s.apply(i, &bad("x", 1, Layout::Colocated { engines: 1 })),
            Err(crate::state::ApplyError::DeploymentExists(_))
        ));
        // Two engines on one GPU.
        let twice = vec![
            Placed {
                engine: "x/both-0".into(),
                role: crate::state::EngineRole::Both,
                node: "a".into(),
                gpus: vec![0],
            },
            Placed {
                engine: "x/both-1".into(),
                role: crate::state::EngineRole::Both,
                node: "a".into(),
                gpus: vec![0],
            },
        ];
        i += 1;
        assert!(
            s.apply(
                i,
                &Command::SetAssignments {
                    deployment: "x".into(),
                    assignments: twice
                }
            )
            .is_err()
        );
        commit(&mut s, &mut i, "x");
        i += 1;
        s.apply(i, &Command::DeleteDeployment { name: "x".into() })
            .unwrap();
        assert!(s.assignments.is_empty());
    }

    /// A flip changes the role of a node's engines in place (same node and GPUs, new ids and
    /// generation), moves the deployment's counts, leaves every other engine alone (ids and
    /// generations), is stable under placement, and is refused when it would leave a role
    /// empty or when the node has nothing to flip.
    #[test]
    fn flip_changes_roles_in_place_and_nothing_else() {
        use crate::state::{ApplyError, EngineRole};
        let (mut s, mut i) = cluster(&[("a", 1, None), ("b", 1, None), ("c", 1, None)]);
        deploy(
            &mut s,
            &mut i,
            "x",
            1,
            Layout::Disaggregated {
                prefill: 2,
                decode: 1,
            },
        );
        commit(&mut s, &mut i, "x");
        let before = s.assignments.clone();
        let (node, old) = before
            .values()
            .find(|a| a.role == EngineRole::Prefill)
            .map(|a| (a.node.clone(), a.clone()))
            .unwrap();
        i += 1;
        s.apply(
            i,
            &Command::FlipNode {
                node: node.clone(),
                role: EngineRole::Decode,
            },
        )
        .unwrap();
        assert_eq!(
            s.deployments["x"].layout,
            Layout::Disaggregated {
                prefill: 1,
                decode: 2
            }
        );
        let flipped = s.assignments.values().find(|a| a.node == node).unwrap();
        assert_eq!(flipped.role, EngineRole::Decode);
        assert_eq!(flipped.engine, "x/decode-1");
        assert_eq!(flipped.gpus, old.gpus);
        assert_eq!(flipped.generation, i);
        for a in before.values().filter(|a| a.node != node) {
            assert_eq!(s.assignments.get(&a.engine), Some(a), "untouched");
        }
        // Placement keeps it all as it is.
        let again = place(&s, "x").unwrap();
        assert_eq!(again.len(), 3);
        for p in &again {
            let a = &s.assignments[&p.engine];
            assert_eq!((&a.node, &a.gpus, a.role), (&p.node, &p.gpus, p.role));
        }
        // The last prefill engine cannot go; a node with no decode engine has nothing to flip
        // to prefill... the other way round it does.
        let last = s
            .assignments
            .values()
            .find(|a| a.role == EngineRole::Prefill)
            .unwrap()
            .node
            .clone();
        i += 1;
        let e = s
            .apply(
                i,
                &Command::FlipNode {
                    node: last.clone(),
                    role: EngineRole::Decode,
                },
            )
            .unwrap_err();
        assert!(
            matches!(e, ApplyError::Refused(ref m) if m.contains("without a prefill")),
            "{e}"
        );
        let e = s
            .apply(
                i,
                &Command::FlipNode {
                    node: last,
                    role: EngineRole::Prefill,
                },
            )
            .unwrap_err();
        assert!(
            matches!(e, ApplyError::Refused(ref m) if m.contains("no decode engine")),
            "{e}"
        );
        // Scaling down keeps the lowest ids; scaling up fills the lowest free ones.
        i += 1;
        s.apply(
            i,
            &Command::ScaleDeployment {
                name: "x".into(),
                layout: Layout::Disaggregated {
                    prefill: 1,
                    decode: 1,
                },
            },
        )
        .unwrap();
        let ids: Vec<String> = engine_ids(&s.deployments["x"], &s)
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&"x/decode-0".to_string()), "{ids:?}");
    }
}
