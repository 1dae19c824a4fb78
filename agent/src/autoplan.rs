//! The coordinator's re-planning of planned deployments. Every `raft.autoplan_interval_ms`
//! the coordinator asks every agent what its ingress counted per model
//! (`AgentRequest::Workload`) and what its engines' steps took (`AgentRequest::StepTimes`),
//! takes the difference with the previous answers as one window (requests, lengths, SLO
//! attainment), refits the step-time model from the engines' counters (`steps.rs`; the
//! roofline until enough steps were seen), and lets `pd_planner::autoplan::decide` judge the
//! layout in force against every move reachable in one step, within the deployment's bounds,
//! scored with the planner's simulator. Each decision is recorded in the replicated state
//! (`Command::RecordAutoplan`); in mode `on` the allowed move goes with it, in the same
//! command: a flip of one host's engines (which drain first) or a scale by one engine.
//!
//! What a term of leadership holds lives for that term: a new coordinator's first round only
//! takes a baseline, so a window is never half of one; its forecast record and cool-down are
//! read back from the recorded decisions, so that a leader change loses one window.

mod steps;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pd_planner::autoplan::{
    self as ap, Bounds, Decision, Move, Past, Policy, SimScorer, Split, Window,
};
use pd_planner::{ModelSpec, Role, Slo, WorkerGroup};
use pd_raft::{
    AutoplanEvent, AutoplanMode, AutoplanMove, AutoplanScore, AutoplanSetting, ClusterState,
    Command, EngineRole, Layout, PlanRecord,
};

use crate::control::ControlPlane;
use crate::serving::metrics::Metrics;
use crate::supervisor::Supervisor;
use crate::util::Unpoisoned;
use crate::wire::latency::{EngineSteps, HistSnapshot, ModelWorkload};
use crate::wire::{AgentRequest, AgentResponse};

/// Bound on one agent's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Windows remembered per deployment (the forecast record needs a few).
const HISTORY_MAX: usize = 32;
/// P:D ratio bounds of a deployment that sets none.
const PD_RATIO_MIN: f64 = 1.0 / 16.0;
const PD_RATIO_MAX: f64 = 16.0;
/// Requests simulated per score.
const SIM_REQUESTS: u32 = 2000;

/// The re-planning loop and its latest decisions.
pub struct Autoplanner {
    control: Arc<ControlPlane>,
    /// This agent's own ingress counters (the coordinator's host serves requests too).
    metrics: Arc<Metrics>,
    /// This host's engines' step counters.
    supervisor: Arc<Supervisor>,
    interval: Duration,
    term: Mutex<Option<Term>>,
    /// The latest decisions, published after each round (read while the next one runs).
    published: Mutex<Option<Vec<pd_api::AutoplanReport>>>,
}

/// What one term of leadership holds.
struct Term {
    term: u64,
    tracks: HashMap<String, Track>,
}

/// One deployment followed through the term.
struct Track {
    /// Which deployment of that name (one made again starts afresh).
    created_at: u64,
    index: u64,
    /// The previous answers, by node, and when they came.
    last: Option<(Instant, BTreeMap<String, ModelWorkload>)>,
    history: Vec<Past>,
    /// The engines the deployment was planned with, as the simulator models them (the
    /// roofline's step times; the online fit replaces them when trusted).
    groups: Option<Result<Groups, String>>,
    steps: steps::StepBook,
    latest: Option<pd_api::AutoplanReport>,
}

impl Track {
    /// A deployment's track for a new term: its forecast record and moves read back from the
    /// decisions recorded before; its windows go on from the last recorded, one skipped (the
    /// baseline round).
    fn new(created_at: u64, recorded: &[AutoplanEvent]) -> Track {
        let history: Vec<Past> = recorded
            .iter()
            .map(|e| Past {
                index: e.window,
                predicted: e
                    .candidates
                    .first()
                    .and_then(|c| c.attainment_ppm)
                    .map(|a| f64::from(a) / 1e6),
                measured: (e.finished > 0).then(|| e.within_slo as f64 / e.finished as f64),
                moved: e.moved.is_some(),
            })
            .collect();
        Track {
            created_at,
            index: recorded.last().map_or(0, |e| e.window + 1),
            last: None,
            history,
            groups: None,
            steps: steps::StepBook::default(),
            latest: None,
        }
    }
}

struct Groups {
    model: ModelSpec,
    prefill: WorkerGroup,
    decode: WorkerGroup,
    slo: Slo,
}

/// A re-planned deployment as one round needs it.
struct Planned {
    name: String,
    created_at: u64,
    /// The engine driver.
    engine: String,
    model: String,
    tp: u32,
    ttft_ms: u32,
    tpot_ms: u32,
    layout: Layout,
    plan: PlanRecord,
    setting: AutoplanSetting,
    /// Its engines, by node: (prefill, decode, colocated).
    engines: BTreeMap<String, [u32; 3]>,
    /// GPUs it could grow onto.
    free_gpus: u32,
    /// The decisions recorded for it.
    recorded: Vec<AutoplanEvent>,
}

impl Planned {
    fn engines_total(&self) -> u32 {
        self.engines.values().flatten().sum()
    }
}

/// What one round decided for one deployment: the decision to record, with its move.
struct Outcome {
    deployment: String,
    event: AutoplanEvent,
    /// The best action's name (for the metrics).
    best: &'static str,
    predicted_goodput: Option<f64>,
    measured_goodput: f64,
}

impl Autoplanner {
    pub fn new(
        control: Arc<ControlPlane>,
        metrics: Arc<Metrics>,
        supervisor: Arc<Supervisor>,
        interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Autoplanner {
            control,
            metrics,
            supervisor,
            interval,
            term: Mutex::new(None),
            published: Mutex::new(None),
        })
    }

    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.round().await;
            }
        })
    }

    /// The latest decision of every re-planned deployment this term (`None`: this agent is
    /// not the coordinator).
    pub fn reports(&self) -> Option<Vec<pd_api::AutoplanReport>> {
        if !self.control.is_coordinator() {
            return None;
        }
        self.published.locked().clone()
    }

    /// What a term's tracks say now, by deployment.
    fn publish(t: &Term, state: &ClusterState) -> Vec<pd_api::AutoplanReport> {
        let mut out: Vec<_> = t
            .tracks
            .iter()
            .map(|(name, tr)| {
                tr.latest.clone().unwrap_or_else(|| pd_api::AutoplanReport {
                    deployment: name.clone(),
                    mode: state.autoplan_setting(name).mode.name().into(),
                    reason: "the first window of this coordinator's term is under way".into(),
                    ..empty_report()
                })
            })
            .collect();
        out.sort_by(|a, b| a.deployment.cmp(&b.deployment));
        out
    }

    async fn round(&self) {
        let term = {
            let m = self.control.raft.metrics();
            let m = m.borrow();
            (m.current_leader == Some(self.control.id)).then_some(m.current_term)
        };
        let Some(term) = term else {
            *self.term.locked() = None;
            *self.published.locked() = None;
            self.metrics.autoplan_goodput.retain_first(&|_| false);
            return;
        };
        let me = self.control.node_name().to_string();
        let state = self.control.state_snapshot();
        let planned = planned(&state);
        let peers = self.control.peers();
        let (workloads, step_times) = tokio::join!(
            peers.ask_others(&state, &me, AgentRequest::Workload, ASK_TIMEOUT),
            peers.ask_others(&state, &me, AgentRequest::StepTimes, ASK_TIMEOUT),
        );
        let mut answers: BTreeMap<String, Vec<ModelWorkload>> = workloads
            .into_iter()
            .filter_map(|(name, got)| match got {
                Some(AgentResponse::Workload(w)) => Some((name, w)),
                _ => None,
            })
            .collect();
        answers.insert(me, self.metrics.workloads());
        let mut engine_steps: Vec<EngineSteps> = step_times
            .into_iter()
            .filter_map(|(_, got)| match got {
                Some(AgentResponse::StepTimes(s)) => Some(s),
                _ => None,
            })
            .flatten()
            .collect();
        engine_steps.extend(EngineSteps::of(self.supervisor.engine_stats()));
        let now = Instant::now();
        let mut t = self.term.locked().take().filter(|t| t.term == term);
        let mut t = t.take().unwrap_or(Term {
            term,
            tracks: HashMap::new(),
        });
        t.tracks.retain(|name, tr| {
            planned
                .iter()
                .any(|p| &p.name == name && p.created_at == tr.created_at)
        });
        let interval_s = self.interval.as_secs_f64();
        let done = tokio::task::spawn_blocking(move || {
            let mut outcomes = Vec::new();
            for p in &planned {
                let tr = t
                    .tracks
                    .entry(p.name.clone())
                    .or_insert_with(|| Track::new(p.created_at, &p.recorded));
                // The reference engine prefills long prompts in chunks of its step budget.
                tr.steps.chunk_tokens = (p.engine == "builtin")
                    .then(|| pd_engine::EngineConfig::default().step_tokens_max as u32);
                tr.steps.take(&state, &p.name, &engine_steps);
                let fits = tr.steps.fit(&state, &p.name);
                outcomes.extend(step(tr, p, &answers, &fits, now, interval_s, term));
            }
            (t, outcomes, state)
        })
        .await;
        let (mut t, outcomes, state) = match done {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "a re-planning round failed");
                return;
            }
        };
        for o in outcomes {
            let window = o.event.window;
            let made = self.record(o.deployment.clone(), o.event).await;
            let tr = t.tracks.get_mut(&o.deployment);
            if let Some(tr) = tr {
                // This window's entry (a colocated layout's window has none).
                if let Some(last) = tr.history.last_mut().filter(|p| p.index == window) {
                    last.moved = made.is_some();
                }
                if let Some(r) = tr.latest.as_mut() {
                    r.moved = made.as_ref().map(|m| m.to_string());
                }
            }
            let made_label = if made.is_some() { "yes" } else { "no" };
            self.metrics
                .autoplan_decisions
                .inc(&[&o.deployment, o.best, made_label]);
            if let Some(g) = o.predicted_goodput {
                self.metrics
                    .autoplan_goodput
                    .set(&[&o.deployment, "predicted"], g);
            }
            self.metrics
                .autoplan_goodput
                .set(&[&o.deployment, "measured"], o.measured_goodput);
        }
        self.metrics
            .autoplan_goodput
            .retain_first(&|d| t.tracks.contains_key(d));
        *self.published.locked() = Some(Self::publish(&t, &state));
        *self.term.locked() = Some(t);
    }

    /// Records a decision; its move, if any, is made with it. A move refused where it is
    /// applied (the operator changed the mode or the layout meanwhile) leaves the decision
    /// recorded without it. Returns the move made.
    async fn record(&self, deployment: String, event: AutoplanEvent) -> Option<AutoplanMove> {
        let moved = event.moved.clone();
        let cmd = Command::RecordAutoplan {
            deployment: deployment.clone(),
            event: event.clone(),
        };
        match self.control.write(cmd).await {
            Ok(_) => {
                if let Some(m) = &moved {
                    tracing::info!(deployment = %deployment, window = event.window, reason = %event.reason, "re-planning: {m}");
                }
                moved
            }
            Err(e) if moved.is_some() => {
                tracing::warn!(deployment = %deployment, error = %e, "re-planning: the move was refused; recording the decision without it");
                let mut event = event;
                event.moved = None;
                event.allowed = false;
                event.reason = format!("{} (the move was refused: {e})", event.reason);
                let _ = self
                    .control
                    .write(Command::RecordAutoplan { deployment, event })
                    .await;
                None
            }
            Err(e) => {
                tracing::debug!(deployment = %deployment, error = %e, "re-planning: decision not recorded");
                None
            }
        }
    }
}

/// The deployments re-planned now: planned ones with both targets whose mode is not off.
fn planned(s: &ClusterState) -> Vec<Planned> {
    s.deployments
        .values()
        .filter_map(|d| {
            let plan = s.plans.get(&d.name)?;
            let setting = s.autoplan_setting(&d.name);
            if setting.mode == AutoplanMode::Off {
                return None;
            }
            let mut engines = BTreeMap::new();
            for a in s.assignments.values().filter(|a| a.deployment == d.name) {
                let e: &mut [u32; 3] = engines.entry(a.node.clone()).or_default();
                e[match a.role {
                    EngineRole::Prefill => 0,
                    EngineRole::Decode => 1,
                    EngineRole::Both => 2,
                }] += 1;
            }
            let hosts = s.model_hosts.get(&d.name).map(|h| &h.nodes);
            let (free, _) = crate::planned::free_gpus(s, hosts);
            Some(Planned {
                name: d.name.clone(),
                created_at: d.created_at,
                engine: d.engine.clone(),
                model: d.model.clone(),
                tp: d.tp.max(1),
                ttft_ms: d.ttft_ms?,
                tpot_ms: d.tpot_ms?,
                layout: d.layout,
                plan: plan.clone(),
                setting,
                engines,
                free_gpus: free.values().sum(),
                recorded: s.autoplan_events.get(&d.name).cloned().unwrap_or_default(),
            })
        })
        .collect()
}

/// The bounds and policy a deployment's setting asks for.
fn rules(p: &Planned, current: Split, interval_s: f64) -> (Bounds, Policy) {
    let s = &p.setting;
    let tp = p.tp;
    let ratio = |milli: Option<u32>, default: f64| milli.map_or(default, |m| f64::from(m) / 1e3);
    let bounds = Bounds {
        gpus_per_engine: tp,
        min_gpus: s.min_gpus.unwrap_or(2 * tp),
        max_gpus: s
            .max_gpus
            .unwrap_or(current.engines() * tp + p.free_gpus)
            .max(s.min_gpus.unwrap_or(0)),
        free_gpus: p.free_gpus,
        pd_ratio_min: ratio(s.pd_ratio_min_milli, PD_RATIO_MIN),
        pd_ratio_max: ratio(s.pd_ratio_max_milli, PD_RATIO_MAX),
    };
    let default = Policy::default();
    let policy = Policy {
        interval_s,
        gain_threshold: s
            .gain_threshold_milli
            .map_or(default.gain_threshold, |m| f64::from(m) / 1e3),
        cooldown_windows: s.cooldown_windows.unwrap_or(default.cooldown_windows),
        forecast_tolerance: s
            .forecast_tolerance_milli
            .map_or(default.forecast_tolerance, |m| f64::from(m) / 1e3),
        ..default
    };
    (bounds, policy)
}

/// The move that carries out `best` on the deployment's engines: a flip takes the host that
/// runs exactly one engine of the role moved (preferring one that runs nothing else of the
/// deployment), so that one engine changes role as scored.
fn carry_out(p: &Planned, best: Move, current: Split) -> Result<AutoplanMove, String> {
    match best {
        Move::Flip { from, to } => {
            let (k, role) = match (from, to) {
                (Role::Prefill, Role::Decode) => (0, EngineRole::Decode),
                (Role::Decode, Role::Prefill) => (1, EngineRole::Prefill),
                _ => return Err("only prefill and decode engines flip".into()),
            };
            p.engines
                .iter()
                .filter(|(_, n)| n[k] == 1)
                .min_by_key(|(name, n)| (n[1 - k] + n[2], (*name).clone()))
                .map(|(node, _)| AutoplanMove::Flip {
                    node: node.clone(),
                    role,
                })
                .ok_or_else(|| {
                    format!("no host runs exactly one {from:?} engine of the deployment: a flip would move more than one")
                })
        }
        Move::AddEngine(_) | Move::RemoveEngine(_) => {
            let s = best.apply(current).ok_or("the move does not apply")?;
            Ok(AutoplanMove::Scale {
                layout: Layout::Disaggregated {
                    prefill: s.prefill,
                    decode: s.decode,
                },
            })
        }
        Move::Keep => Err("nothing to move".into()),
    }
}

/// One round for one deployment: a baseline (nothing to record), or a window and its
/// decision.
fn step(
    tr: &mut Track,
    p: &Planned,
    answers: &BTreeMap<String, Vec<ModelWorkload>>,
    fits: &[steps::Fitted],
    now: Instant,
    interval_s: f64,
    term: u64,
) -> Option<Outcome> {
    let counters: BTreeMap<String, ModelWorkload> = answers
        .iter()
        .map(|(node, w)| {
            let mine = w.iter().find(|m| m.model == p.name).cloned();
            (node.clone(), mine.unwrap_or_else(|| nothing(&p.name)))
        })
        .collect();
    // An agent that did not answer keeps its last counters: when it answers again, its
    // difference covers the time it was silent, not everything since it started.
    let mut kept = tr.last.as_ref().map(|(_, b)| b.clone()).unwrap_or_default();
    kept.extend(counters.clone());
    let (then, before) = tr.last.replace((now, kept))?;
    let total = p.engines_total();
    let reporting: u32 = p
        .engines
        .iter()
        .filter(|(node, _)| counters.contains_key(*node))
        .map(|(_, n)| n.iter().sum::<u32>())
        .sum();
    let w = window(
        &before,
        &counters,
        (now - then).as_secs_f64(),
        reporting,
        total,
    );
    tr.index += 1;
    let mode = p.setting.mode;
    let calibration = steps::report(fits);
    let Layout::Disaggregated { prefill, decode } = p.layout else {
        let reason = "a colocated layout is not re-planned (moves flip and scale prefill and decode engines)";
        tr.latest = Some(pd_api::AutoplanReport {
            deployment: p.name.clone(),
            mode: mode.name().into(),
            window: tr.index,
            layout: layout_name(p.layout),
            reason: reason.into(),
            calibration,
            ..report_of_window(&w)
        });
        let event = AutoplanEvent {
            reason: reason.into(),
            ..window_event(tr.index, &w, p, term, mode)
        };
        return Some(Outcome {
            deployment: p.name.clone(),
            event,
            best: Move::Keep.name(),
            predicted_goodput: None,
            measured_goodput: measured_goodput(&w),
        });
    };
    let current = Split { prefill, decode };
    let (bounds, policy) = rules(p, current, interval_s);
    let groups = tr.groups.get_or_insert_with(|| groups(p));
    let d = match groups {
        Ok(g) => {
            let (mut prefill, mut decode) = (g.prefill.clone(), g.decode.clone());
            steps::calibrate(&mut prefill, steps::for_role(fits, EngineRole::Prefill));
            steps::calibrate(&mut decode, steps::for_role(fits, EngineRole::Decode));
            let scorer = SimScorer {
                model: &g.model,
                prefill,
                decode,
                slo: g.slo,
                requests: SIM_REQUESTS,
                seed: tr.index,
            };
            let reqs = (w.arrivals > 0).then(|| scorer.requests_for(&w));
            ap::decide(
                tr.index,
                &w,
                current,
                &bounds,
                &policy,
                &tr.history,
                |split| match &reqs {
                    Some(Ok(r)) => scorer.attainment(split, r),
                    Some(Err(e)) => Err(e.clone()),
                    None => Ok(1.0),
                },
            )
        }
        Err(why) => {
            let why = why.clone();
            ap::decide(tr.index, &w, current, &bounds, &policy, &tr.history, |_| {
                Err(pd_planner::PlanError::Invalid {
                    field: "the deployment's engines",
                    reason: why.clone(),
                })
            })
        }
    };
    let mut notes = d.notes.clone();
    notes.push(steps::note(fits));
    let moved = match (mode, d.act) {
        (AutoplanMode::On, true) => match carry_out(p, d.best, current) {
            Ok(m) => Some(m),
            Err(why) => {
                notes.push(format!("not moved: {why}"));
                None
            }
        },
        _ => None,
    };
    let changed = tr.latest.as_ref().is_none_or(|l| l.best != d.best.name());
    if d.act || changed {
        tracing::info!(deployment = %p.name, mode = mode.name(), window = d.index, layout = %current, best = d.best.name(), allowed = d.act, reason = %d.reason, "re-planning");
    }
    tr.history.push(Past {
        moved: moved.is_some(),
        ..d.past
    });
    if tr.history.len() > HISTORY_MAX {
        tr.history.remove(0);
    }
    let mut report = report(&p.name, &w, &d);
    report.mode = mode.name().into();
    report.notes = notes.clone();
    report.calibration = calibration;
    tr.latest = Some(report);
    let event = event(&w, &d, p, term, mode, notes, moved);
    Some(Outcome {
        deployment: p.name.clone(),
        event,
        best: d.best.name(),
        predicted_goodput: d
            .candidates
            .first()
            .and_then(|c| c.prediction.as_ref().ok())
            .map(|p| p.goodput_rps),
        measured_goodput: measured_goodput(&w),
    })
}

/// Requests per second within both targets in the window.
fn measured_goodput(w: &Window) -> f64 {
    if w.seconds > 0.0 {
        w.within_slo as f64 / w.seconds
    } else {
        0.0
    }
}

/// The decision as the replicated state records it (integers; texts and lists bounded).
fn event(
    w: &Window,
    d: &Decision,
    p: &Planned,
    term: u64,
    mode: AutoplanMode,
    notes: Vec<String>,
    moved: Option<AutoplanMove>,
) -> AutoplanEvent {
    let text = |s: String| crate::util::truncate_utf8(&s, pd_raft::state::AUTOPLAN_TEXT_BYTES_MAX);
    AutoplanEvent {
        best: d.best.name().into(),
        allowed: d.act,
        reason: text(d.reason.to_string()),
        candidates: d
            .candidates
            .iter()
            .take(pd_raft::state::AUTOPLAN_CANDIDATES_MAX)
            .map(|c| AutoplanScore {
                action: c.mv.name().into(),
                layout: Layout::Disaggregated {
                    prefill: c.split.prefill,
                    decode: c.split.decode,
                },
                attainment_ppm: c
                    .prediction
                    .as_ref()
                    .ok()
                    .map(|p| (p.attainment.clamp(0.0, 1.0) * 1e6).round() as u32),
                goodput_milli: c
                    .prediction
                    .as_ref()
                    .ok()
                    .map(|p| (p.goodput_rps.max(0.0) * 1e3).round() as u64),
                error: c.prediction.as_ref().err().map(|e| text(e.clone())),
            })
            .collect(),
        notes: notes
            .into_iter()
            .take(pd_raft::state::AUTOPLAN_NOTES_MAX)
            .map(text)
            .collect(),
        moved,
        ..window_event(d.index, w, p, term, mode)
    }
}

/// A window's record with nothing decided (keep, not allowed, no candidate).
fn window_event(
    index: u64,
    w: &Window,
    p: &Planned,
    term: u64,
    mode: AutoplanMode,
) -> AutoplanEvent {
    AutoplanEvent {
        window: index,
        term,
        decided_unix: crate::util::now_unix(),
        mode,
        seconds_milli: (w.seconds * 1e3).round() as u64,
        requests: w.arrivals,
        finished: w.finished,
        within_slo: w.within_slo,
        engines_reporting: w.engines_reporting,
        engines_total: w.engines_total,
        layout: p.layout,
        best: Move::Keep.name().into(),
        allowed: false,
        reason: String::new(),
        candidates: Vec::new(),
        notes: Vec::new(),
        moved: None,
    }
}

fn layout_name(l: Layout) -> String {
    match l {
        Layout::Disaggregated { prefill, decode } => format!("{prefill}P{decode}D"),
        Layout::Colocated { engines } => format!("{engines}C"),
    }
}

/// The engines of the deployment's plan, as the simulator models them (the planner is asked
/// again for the plan's request: it is deterministic).
fn groups(p: &Planned) -> Result<Groups, String> {
    let model = crate::planned::planner_model(&p.model).map_err(|e| e.to_string())?;
    let mut pools = BTreeMap::new();
    for part in p.plan.gpus.split(',').filter(|s| !s.is_empty()) {
        let (system, n) = part
            .split_once(':')
            .ok_or_else(|| format!("the plan's GPUs {:?} are not type:count", p.plan.gpus))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("the plan's GPUs {:?} are not type:count", p.plan.gpus))?;
        pools.insert(system.to_string(), n);
    }
    let req = crate::planned::plan_request(
        model.clone(),
        &pools,
        p.plan.isl,
        p.plan.osl,
        p.ttft_ms,
        p.tpot_ms,
        p.tp,
    )
    .map_err(|e| e.to_string())?;
    let slo = req.slo;
    let plan = pd_planner::plan(&req).map_err(|e| e.to_string())?;
    let c = plan
        .disaggregated
        .ok_or("the planner finds no disaggregated layout for the deployment's plan")?;
    let group = |role: Role| {
        c.layout
            .groups
            .iter()
            .find(|g| g.role == role)
            .cloned()
            .ok_or_else(|| format!("the plan has no {role:?} engines"))
    };
    Ok(Groups {
        model,
        prefill: group(Role::Prefill)?,
        decode: group(Role::Decode)?,
        slo,
    })
}

fn nothing(model: &str) -> ModelWorkload {
    let empty = HistSnapshot {
        bounds: crate::serving::metrics::LENGTH_BUCKETS.to_vec(),
        counts: vec![0; crate::serving::metrics::LENGTH_BUCKETS.len()],
        count: 0,
        sum: 0.0,
    };
    ModelWorkload {
        model: model.to_string(),
        requests: 0,
        within_slo: 0,
        missed_slo: 0,
        prompt_tokens: empty.clone(),
        output_tokens: empty,
    }
}

/// The window between two sets of answers, by node. A node whose counters went back (its
/// agent restarted) counts from zero; one that did not answer this time is left out.
pub(crate) fn window(
    before: &BTreeMap<String, ModelWorkload>,
    now: &BTreeMap<String, ModelWorkload>,
    seconds: f64,
    engines_reporting: u32,
    engines_total: u32,
) -> Window {
    let mut w = Window {
        seconds,
        arrivals: 0,
        isl: Vec::new(),
        osl: Vec::new(),
        finished: 0,
        within_slo: 0,
        engines_reporting,
        engines_total,
    };
    let mut isl = BTreeMap::<u32, u64>::new();
    let mut osl = BTreeMap::<u32, u64>::new();
    for (node, n) in now {
        let zero = nothing(&n.model);
        let b = before
            .get(node)
            .filter(|b| b.requests <= n.requests && b.within_slo <= n.within_slo)
            .unwrap_or(&zero);
        w.arrivals += n.requests - b.requests;
        let within = n.within_slo.saturating_sub(b.within_slo);
        w.within_slo += within;
        w.finished += within + n.missed_slo.saturating_sub(b.missed_slo);
        add_histogram(&mut isl, &n.prompt_tokens, &b.prompt_tokens);
        add_histogram(&mut osl, &n.output_tokens, &b.output_tokens);
    }
    w.isl = isl.into_iter().collect();
    w.osl = osl.into_iter().collect();
    w
}

/// Adds `now - before` into `into` as (upper bound, count); above the last bound is
/// `u32::MAX`.
fn add_histogram(into: &mut BTreeMap<u32, u64>, now: &HistSnapshot, before: &HistSnapshot) {
    let same = before.bounds == now.bounds && before.counts.len() == now.counts.len();
    let mut counted = 0;
    for (i, (bound, c)) in now.bounds.iter().zip(&now.counts).enumerate() {
        let d = c.saturating_sub(if same { before.counts[i] } else { 0 });
        counted += d;
        *into.entry(*bound as u32).or_insert(0) += d;
    }
    let all = now
        .count
        .saturating_sub(if same { before.count } else { 0 });
    *into.entry(u32::MAX).or_insert(0) += all.saturating_sub(counted);
}

fn empty_report() -> pd_api::AutoplanReport {
    pd_api::AutoplanReport {
        deployment: String::new(),
        mode: "advise".into(),
        window: 0,
        seconds: 0.0,
        requests: 0,
        rate_per_s: 0.0,
        judged: 0,
        within_slo: 0,
        engines_reporting: 0,
        engines_total: 0,
        layout: String::new(),
        best: "keep".into(),
        best_layout: String::new(),
        allowed: false,
        reason: String::new(),
        candidates: Vec::new(),
        notes: Vec::new(),
        decided_unix: crate::util::now_unix(),
        moved: None,
        calibration: Vec::new(),
    }
}

fn report_of_window(w: &Window) -> pd_api::AutoplanReport {
    pd_api::AutoplanReport {
        seconds: w.seconds,
        requests: w.arrivals,
        rate_per_s: w.rate(),
        judged: w.finished,
        within_slo: w.within_slo,
        engines_reporting: w.engines_reporting,
        engines_total: w.engines_total,
        ..empty_report()
    }
}

fn report(name: &str, w: &Window, d: &Decision) -> pd_api::AutoplanReport {
    pd_api::AutoplanReport {
        deployment: name.to_string(),
        window: d.index,
        layout: d.current.to_string(),
        best: d.best.name().to_string(),
        best_layout: d
            .best
            .apply(d.current)
            .map_or_else(String::new, |s| s.to_string()),
        allowed: d.act,
        reason: d.reason.to_string(),
        candidates: d
            .candidates
            .iter()
            .map(|c| pd_api::AutoplanCandidate {
                action: c.mv.name().to_string(),
                layout: c.split.to_string(),
                attainment: c.prediction.as_ref().ok().map(|p| p.attainment),
                goodput_rps: c.prediction.as_ref().ok().map(|p| p.goodput_rps),
                error: c.prediction.as_ref().err().cloned(),
            })
            .collect(),
        notes: d.notes.clone(),
        ..report_of_window(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(requests: u64, within: u64, missed: u64, prompts: &[f64]) -> ModelWorkload {
        let mut w = nothing("m");
        w.requests = requests;
        w.within_slo = within;
        w.missed_slo = missed;
        for &p in prompts {
            let h = &mut w.prompt_tokens;
            if let Some(i) = h.bounds.iter().position(|b| p <= *b) {
                h.counts[i] += 1;
            }
            h.count += 1;
        }
        w
    }

    #[test]
    fn an_agent_silent_for_a_round_is_not_counted_twice() {
        let p = Planned {
            name: "m".into(),
            created_at: 1,
            engine: "builtin".into(),
            model: "tiny".into(),
            tp: 1,
            ttft_ms: 500,
            tpot_ms: 20,
            // Colocated: the window is reported without asking the planner.
            layout: Layout::Colocated { engines: 2 },
            setting: AutoplanSetting::mode(AutoplanMode::Advise),
            recorded: Vec::new(),
            plan: PlanRecord {
                layout: Layout::Colocated { engines: 2 },
                isl: 16,
                osl: 16,
                gpus: "h100_sxm:2".into(),
                describe: String::new(),
                request_rate_milli: 0,
                output_tokens_per_s_per_gpu_milli: 0,
                output_tokens_per_s_per_user_milli: 0,
                ttft_mean_us: 0,
                ttft_p90_us: 0,
                tpot_mean_us: 0,
                tpot_p90_us: 0,
                slo_attainment_ppm: 0,
                planned_at: 0,
            },
            engines: BTreeMap::from([("a".into(), [0, 0, 1]), ("b".into(), [0, 0, 1])]),
            free_gpus: 0,
        };
        let mut tr = Track::new(1, &[]);
        let answers = |a: u64, b: Option<u64>| {
            let mut m = BTreeMap::from([("a".to_string(), vec![counted(a, a, 0, &[])])]);
            if let Some(b) = b {
                m.insert("b".to_string(), vec![counted(b, b, 0, &[])]);
            }
            m
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let step = |tr: &mut Track, a, at| step(tr, &p, &a, &[], at, 5.0, 1);
        assert!(step(&mut tr, answers(10, Some(100)), at(0)).is_none());
        assert!(tr.latest.is_none(), "the first round is a baseline");
        step(&mut tr, answers(12, None), at(5));
        let r = tr.latest.clone().unwrap();
        assert_eq!((r.window, r.requests), (1, 2));
        assert_eq!((r.engines_reporting, r.engines_total), (1, 2));
        // b answers again with 3 more than before its silence: 3, not its 103.
        step(&mut tr, answers(12, Some(103)), at(10));
        let r = tr.latest.clone().unwrap();
        assert_eq!((r.window, r.requests), (2, 3));
        assert!(r.reason.contains("colocated"), "{}", r.reason);
    }

    #[test]
    fn a_window_is_the_difference_of_two_answers_summed_over_agents() {
        let before = BTreeMap::from([
            ("a".to_string(), counted(10, 8, 2, &[100.0; 10])),
            ("b".to_string(), counted(5, 5, 0, &[100.0; 5])),
        ]);
        let now = BTreeMap::from([
            // 4 more on a: 3 within, 1 missed, prompts of 100, 1000 and one past every bucket.
            (
                "a".to_string(),
                counted(14, 11, 3, &[&[100.0; 12][..], &[1000.0, 1e9]].concat()),
            ),
            // b restarted: its counters count from zero.
            ("b".to_string(), counted(2, 1, 1, &[20.0, 20.0])),
            // c answered for the first time.
            ("c".to_string(), counted(1, 1, 0, &[100.0])),
        ]);
        let w = window(&before, &now, 15.0, 3, 4);
        assert_eq!(w.arrivals, 4 + 2 + 1);
        assert_eq!((w.finished, w.within_slo), (4 + 2 + 1, 3 + 1 + 1));
        assert_eq!((w.engines_reporting, w.engines_total), (3, 4));
        let isl: BTreeMap<u32, u64> = w.isl.iter().copied().collect();
        assert_eq!(isl[&128], 2 + 1, "{isl:?}");
        assert_eq!(isl[&32], 2);
        assert_eq!(isl[&1024], 1);
        assert_eq!(isl[&u32::MAX], 1);
        assert_eq!(isl.values().sum::<u64>(), 7);
        assert!((w.rate() - 7.0 / 15.0).abs() < 1e-12);
    }
}
