//! `--layout planned`: the planner (`pd-planner`) sizes a deployment from the replicated GPU
//! inventory and the deployment's targets, and its prediction is kept beside the deployment
//! (`PlanRecord`) to be shown next to what the agents measure.
//!
//! Pure except `planner_model`, which may read a model folder's `config.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pd_planner::{Dtype, Dtypes, GpuPool, PlanRequest, Slo, StepCost};
use pd_raft::{AdminState, ClusterState, Layout, NodeHealth, PlanRecord};

/// Seed of the planner's simulated arrivals: fixed, so a plan can be reproduced offline with
/// `pdctl plan --seed 1`.
const PLAN_SEED: u64 = 1;

/// What a `--layout planned` deployment asks of the planner.
#[derive(Debug, Clone)]
pub struct PlannedDeploy {
    pub model: String,
    pub tp: u32,
    pub ttft_ms: u32,
    pub tpot_ms: u32,
    pub isl: u32,
    pub osl: u32,
    /// At most this many GPUs (default: every free GPU of a known type).
    pub max_gpus: Option<u32>,
    /// Only the GPUs of these nodes (those that hold the model folder); `None`: any node.
    pub hosts: Option<BTreeSet<String>>,
}

/// Why no plan: what is missing, for the operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanRefusal {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    NoFit(String),
}

/// The planner's view of a deployment's model: an engine preset, a folder with a Hugging Face
/// `config.json` on this host, or a planner catalog name.
pub fn planner_model(model: &str) -> Result<pd_planner::ModelSpec, PlanRefusal> {
    let from_json = |json: &str| {
        pd_planner::parse_hf_config(model, json)
            .map_err(|e| PlanRefusal::Input(format!("model {model}: {e}")))
    };
    if let pd_engine::ModelSpec::Preset(p) = pd_engine::ModelSpec::parse(model) {
        let hf = pd_engine::ModelConfig::preset(p).to_hf_json();
        return from_json(&hf.to_string());
    }
    let config = Path::new(model).join("config.json");
    if let Ok(json) = std::fs::read_to_string(&config) {
        return from_json(&json);
    }
    pd_planner::find_model(model).map_err(|e| {
        PlanRefusal::Input(format!(
            "model {model}: not a preset, no {} on this agent, and {e}",
            config.display()
        ))
    })
}

/// GPUs free for a new deployment, by planner system: on nodes that are ready and active,
/// healthy, held by no engine. GPUs the planner knows no system for are listed apart.
pub fn free_gpus(
    state: &ClusterState,
    hosts: Option<&BTreeSet<String>>,
) -> (BTreeMap<String, u32>, BTreeMap<String, u32>) {
    let mut known = BTreeMap::new();
    let mut unknown = BTreeMap::new();
    for n in state.nodes.values() {
        if n.health != NodeHealth::Ready
            || n.admin_state != AdminState::Active
            || hosts.is_some_and(|h| !h.contains(&n.name))
        {
            continue;
        }
        for g in &n.gpus {
            let held = state
                .assignments
                .values()
                .any(|a| a.node == n.name && a.gpus.contains(&g.index));
            if held || g.health != "healthy" {
                continue;
            }
            match pd_planner::system_for_nvml_name(&g.name) {
                Some(s) => *known.entry(s.name).or_insert(0) += 1,
                None => *unknown.entry(g.name.clone()).or_insert(0) += 1,
            }
        }
    }
    (known, unknown)
}

/// The planner's request for `model` on `gpus` (count by planner system), with the
/// roofline's step times; also what the coordinator's re-planning asks again (`autoplan`).
pub fn plan_request(
    model: pd_planner::ModelSpec,
    gpus: &BTreeMap<String, u32>,
    isl: u32,
    osl: u32,
    ttft_ms: u32,
    tpot_ms: u32,
    tp: u32,
) -> Result<PlanRequest, PlanRefusal> {
    let mut pools = Vec::new();
    for (system, count) in gpus {
        pools.push(GpuPool {
            system: pd_planner::find_system(system)
                .map_err(|e| PlanRefusal::Input(e.to_string()))?,
            gpus: *count,
            cost: StepCost::Roofline(Default::default()),
        });
    }
    Ok(PlanRequest {
        dtypes: Dtypes::new(model.native_weights, Dtype::Bf16)
            .map_err(|e| PlanRefusal::Input(e.to_string()))?,
        model,
        pools,
        isl,
        osl,
        slo: Slo {
            ttft_s: ttft_ms as f64 / 1e3,
            tpot_s: tpot_ms as f64 / 1e3,
        },
        seed: PLAN_SEED,
        tp: Some(tp),
    })
}

/// Plans `want` on the free GPUs of `state`: the layout with more output tokens/s/GPU of the
/// best disaggregated and the best colocated one, as a record for the replicated state.
pub fn plan(state: &ClusterState, want: &PlannedDeploy) -> Result<PlanRecord, PlanRefusal> {
    let model = planner_model(&want.model)?;
    let (known, unknown) = free_gpus(state, want.hosts.as_ref());
    let mut left = want.max_gpus.unwrap_or(u32::MAX);
    let mut chosen = BTreeMap::new();
    for (system, count) in &known {
        let gpus = (*count).min(left);
        left -= gpus;
        if gpus > 0 {
            chosen.insert(system.clone(), gpus);
        }
    }
    if chosen.is_empty() {
        let mut why =
            "no free GPU to plan on (healthy, on a ready and active node, held by no engine)"
                .to_string();
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|(n, c)| format!("{c} × {n}")).collect();
            why += &format!(
                "; the planner knows no system for {} (known: a100_sxm, h100_sxm, h200_sxm, b200_sxm)",
                list.join(", ")
            );
        }
        return Err(PlanRefusal::NoFit(why));
    }
    let gpus_text: Vec<String> = chosen.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    let req = plan_request(
        model,
        &chosen,
        want.isl,
        want.osl,
        want.ttft_ms,
        want.tpot_ms,
        want.tp,
    )?;
    let plan = pd_planner::plan(&req).map_err(|e| PlanRefusal::Input(e.to_string()))?;
    let Some(best) = plan.best() else {
        return Err(PlanRefusal::NoFit(format!(
            "no layout of {} at TP {} on {} meets TTFT {} ms and TPOT {} ms for 90% of requests ({} → {} tokens): {}",
            want.model,
            want.tp,
            gpus_text.join(", "),
            want.ttft_ms,
            want.tpot_ms,
            want.isl,
            want.osl,
            plan.notes.join("; ")
        )));
    };
    let layout = if best.colocated_workers() > 0 {
        Layout::Colocated {
            engines: best.colocated_workers(),
        }
    } else {
        Layout::Disaggregated {
            prefill: best.prefill_workers(),
            decode: best.decode_workers(),
        }
    };
    let us = |s: f64| (s * 1e6).round() as u64;
    let milli = |v: f64| (v * 1e3).round() as u64;
    Ok(PlanRecord {
        layout,
        isl: want.isl,
        osl: want.osl,
        gpus: gpus_text.join(","),
        describe: best.describe(),
        request_rate_milli: milli(best.request_rate_per_s),
        output_tokens_per_s_per_gpu_milli: milli(best.output_tokens_per_s_per_gpu),
        output_tokens_per_s_per_user_milli: milli(best.output_tokens_per_s_per_user),
        ttft_mean_us: us(best.ttft_s.mean),
        ttft_p90_us: us(best.ttft_s.p90),
        tpot_mean_us: us(best.tpot_s.mean),
        tpot_p90_us: us(best.tpot_s.p90),
        slo_attainment_ppm: (best.slo_attainment * 1e6).round() as u32,
        planned_at: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_raft::state::GpuRecord;
    use pd_raft::{Command, EngineRole, Placed};

    fn cluster(nodes: u32, gpus: u32, name: &str) -> ClusterState {
        let mut s = ClusterState::default();
        let mut index = 0;
        let mut apply = |s: &mut ClusterState, c: Command| {
            index += 1;
            s.apply(index, &c).unwrap();
        };
        for k in 1..=nodes {
            let node = format!("node-{k}");
            apply(
                &mut s,
                Command::RegisterNode {
                    name: node.clone(),
                    id: k as u64,
                    address: format!("127.0.0.{k}:7400"),
                    labels: BTreeMap::new(),
                },
            );
            let gpus = (0..gpus)
                .map(|i| GpuRecord {
                    index: i,
                    uuid: format!("GPU-{k}-{i}"),
                    name: name.into(),
                    memory_total_bytes: 80 << 30,
                    health: "healthy".into(),
                })
                .collect();
            apply(&mut s, Command::SetGpus { node, gpus });
        }
        s
    }

    fn want(model: &str, tp: u32) -> PlannedDeploy {
        PlannedDeploy {
            model: model.into(),
            tp,
            ttft_ms: 2000,
            tpot_ms: 50,
            isl: 1024,
            osl: 256,
            max_gpus: None,
            hosts: None,
        }
    }

    #[test]
    fn presets_read_as_the_engine_defines_them() {
        let m = planner_model("tiny").unwrap();
        assert_eq!((m.hidden_size, m.layers, m.vocab_size), (256, 4, 258));
        assert!(m.tie_word_embeddings);
        let m = planner_model("Llama-3.1-8B").unwrap();
        assert_eq!(m.layers, 32);
        let e = planner_model("/nowhere/model").unwrap_err().to_string();
        assert!(e.contains("/nowhere/model/config.json"), "{e}");
    }

    #[test]
    fn the_plan_is_sized_on_free_healthy_gpus_of_ready_active_nodes() {
        let mut s = cluster(4, 8, "NVIDIA H100 80GB HBM3");
        let (known, _) = free_gpus(&s, None);
        assert_eq!(known.get("h100_sxm"), Some(&32));
        // A cordoned node, a down node, a failed GPU and an engine's GPUs do not count.
        let mut i = 100;
        let mut apply = |s: &mut ClusterState, c: Command| {
            i += 1;
            s.apply(i, &c).unwrap();
        };
        apply(
            &mut s,
            Command::SetAdminState {
                node: "node-1".into(),
                state: AdminState::Cordoned,
            },
        );
        apply(
            &mut s,
            Command::SetHealth {
                node: "node-2".into(),
                health: NodeHealth::Down,
            },
        );
        let mut gpus = s.nodes["node-3"].gpus.clone();
        gpus[0].health = "failed".into();
        apply(
            &mut s,
            Command::SetGpus {
                node: "node-3".into(),
                gpus,
            },
        );
        apply(
            &mut s,
            Command::CreateDeployment {
                name: "other".into(),
                engine: "builtin".into(),
                model: "tiny".into(),
                tp: 2,
                ttft_ms: None,
                tpot_ms: None,
                layout: Layout::Colocated { engines: 1 },
            },
        );
        apply(
            &mut s,
            Command::SetAssignments {
                deployment: "other".into(),
                assignments: vec![Placed {
                    engine: "other/both-0".into(),
                    role: EngineRole::Both,
                    node: "node-4".into(),
                    gpus: vec![0, 1],
                }],
            },
        );
        let (known, _) = free_gpus(&s, None);
        assert_eq!(known.get("h100_sxm"), Some(&(7 + 6)));
        // Only the nodes that hold the model.
        let hosts: BTreeSet<String> = ["node-3".to_string()].into();
        let (known, _) = free_gpus(&s, Some(&hosts));
        assert_eq!(known.get("h100_sxm"), Some(&7));
    }

    #[test]
    fn a_plan_fits_the_gpus_and_records_its_prediction() {
        let s = cluster(2, 8, "NVIDIA H100 80GB HBM3");
        let p = plan(&s, &want("Llama-3.1-8B", 1)).unwrap();
        let engines = p.layout.engine_count();
        assert!((1..=16).contains(&engines), "{p:?}");
        assert_eq!(p.gpus, "h100_sxm:16");
        assert!(p.describe.contains("TP1"), "{}", p.describe);
        assert!(!p.describe.contains("TP2"), "{}", p.describe);
        assert!(p.ttft_p90_us > 0 && p.ttft_p90_us <= 2_000_000, "{p:?}");
        assert!(p.tpot_p90_us > 0 && p.tpot_p90_us <= 50_000, "{p:?}");
        assert!(p.slo_attainment_ppm >= 900_000, "{p:?}");
        assert!(p.request_rate_milli > 0);
        // A budget caps it; the same inputs give the same plan.
        let mut small = want("Llama-3.1-8B", 1);
        small.max_gpus = Some(3);
        let p3 = plan(&s, &small).unwrap();
        assert_eq!(p3.gpus, "h100_sxm:3");
        assert!(p3.layout.engine_count() <= 3);
        assert_eq!(plan(&s, &small).unwrap(), p3);
        // The plan is a command the state machine takes.
        let mut s2 = s.clone();
        s2.apply(
            1000,
            &Command::CreateCheckedDeployment {
                name: "llama".into(),
                engine: "builtin".into(),
                model: "Llama-3.1-8B".into(),
                tp: 1,
                ttft_ms: Some(2000),
                tpot_ms: Some(50),
                layout: p3.layout,
                plan: Some(p3.clone()),
                model_hosts: None,
            },
        )
        .unwrap();
        assert_eq!(s2.deployments["llama"].layout, p3.layout);
        assert_eq!(s2.plans["llama"].planned_at, 1000);
        s2.apply(
            1001,
            &Command::DeleteDeployment {
                name: "llama".into(),
            },
        )
        .unwrap();
        assert!(s2.plans.is_empty());
    }

    #[test]
    fn no_plan_says_what_is_missing() {
        let s = cluster(1, 2, "NVIDIA L40S");
        let e = plan(&s, &want("tiny", 1)).unwrap_err().to_string();
        assert!(
            e.contains("no free GPU") && e.contains("2 × NVIDIA L40S"),
            "{e}"
        );
        // Targets no layout can meet.
        let s = cluster(1, 2, "NVIDIA H100 80GB HBM3");
        let mut w = want("Llama-3.1-70B", 1);
        w.tpot_ms = 1;
        let e = plan(&s, &w).unwrap_err().to_string();
        assert!(e.contains("no layout of Llama-3.1-70B at TP 1"), "{e}");
        let mut w = want("tiny", 3);
        w.tp = 3;
        assert!(plan(&s, &w).unwrap_err().to_string().contains("TP 3"));
    }
}
