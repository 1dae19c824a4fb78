//! The coordinator's duties, carried out by whichever agent leads Raft: keep the voters, place
//! the deployments' engines, tell agents to reconcile, and turn the agents' reports into node
//! health. What it decides is `core` and `voters` (pure); this file runs those decisions.
//!
//! What only the coordinator holds (when each node last reported, their telemetry and engines,
//! what it last told them) lives in a [`Duty`] that exists only while this agent leads, for one
//! Raft term: a new term starts from nothing, so nothing a former coordinator heard outlives
//! its leadership.

pub mod core;
pub mod voters;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ChangeMembers;
use pd_raft::{Command, NodeId};
use pd_transport::PeerIdentity;
use tracing::{info, warn};

use crate::config::Validated;
use crate::control::ControlPlane;
use crate::reporting::LocalReports;
use crate::util::Unpoisoned;
use crate::wire::{
    AgentRequest, AgentResponse, Directive, EngineReport, GpuTelemetry, NodeTelemetry,
};

use self::core::{LivenessTimings, Pushed};
use self::voters::{Member, VOTER_ELIGIBLE, VOTER_LABEL};

/// Placement failures remembered (each is logged once) before the memory is cleared.
const UNPLACED_REMEMBERED_MAX: usize = 256;

/// What the coordinator holds for one term of leadership; dropped when it ends.
struct Duty {
    term: u64,
    /// When this agent became the leader of this term.
    since: Instant,
    /// When each node last reported.
    last_seen: Mutex<HashMap<String, Instant>>,
    /// Each node's latest GPU telemetry and when it came.
    telemetry: Mutex<HashMap<String, (Instant, Vec<GpuTelemetry>)>>,
    /// Every node's engines as last reported.
    engines: Mutex<HashMap<String, Vec<EngineReport>>>,
    /// Each engine's (node, generation) when directives were last pushed.
    pushed: Mutex<Pushed>,
    /// Placement failures already logged.
    unplaced: Mutex<HashSet<String>>,
    /// What was last said about a voter shortage (said again only when it changes).
    voters_said: Mutex<Option<String>>,
}

impl Duty {
    fn new(term: u64) -> Self {
        Duty {
            term,
            since: Instant::now(),
            last_seen: Mutex::default(),
            telemetry: Mutex::default(),
            engines: Mutex::default(),
            pushed: Mutex::default(),
            unplaced: Mutex::default(),
            voters_said: Mutex::default(),
        }
    }
}

pub struct Coordinator {
    control: Arc<ControlPlane>,
    local: Arc<LocalReports>,
    /// `cluster.voters`.
    voters: usize,
    interval: Duration,
    liveness: LivenessTimings,
    duty: Mutex<Option<Arc<Duty>>>,
    /// The engines the coordinator last listed for this agent (`cluster_engines`), or last
    /// heard of while this agent was the coordinator, by node: what this agent goes on with
    /// while the coordinator cannot be asked.
    last_listed: Mutex<HashMap<String, Vec<EngineReport>>>,
}

impl Coordinator {
    pub fn new(cfg: &Validated, control: Arc<ControlPlane>, local: Arc<LocalReports>) -> Arc<Self> {
        let c = &cfg.config.cluster;
        Arc::new(Coordinator {
            control,
            local,
            voters: c.voters as usize,
            interval: Duration::from_millis(cfg.config.raft.coordinator_interval_ms),
            liveness: LivenessTimings {
                heartbeat: Duration::from_millis(c.heartbeat_ms),
                suspect_after: Duration::from_millis(c.suspect_after_ms),
                down_after: Duration::from_millis(c.down_after_ms),
            },
            duty: Mutex::new(None),
            last_listed: Mutex::default(),
        })
    }

    /// This node's own engines and GPUs.
    pub fn local(&self) -> &LocalReports {
        &self.local
    }

    /// Runs the duties while this agent leads (every agent runs this; only the leader acts).
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().run())
    }

    /// The duties every `interval` and the liveness judgments every heartbeat, each on its
    /// own clock: a slow membership change never delays a health change, nor the reverse.
    async fn run(self: Arc<Self>) {
        let duties = async {
            let mut tick = tokio::time::interval(self.interval);
            loop {
                tick.tick().await;
                let Some(duty) = self.lead() else { continue };
                if let Err(e) = self.coordinate(&duty).await {
                    warn!(error = %e, "coordinator duty failed; will retry");
                }
                self.push_directives(&duty);
            }
        };
        let liveness = async {
            let mut tick = tokio::time::interval(self.liveness.heartbeat);
            loop {
                tick.tick().await;
                let Some(duty) = self.lead() else { continue };
                if let Err(e) = self.judge_liveness(&duty).await {
                    tracing::debug!(error = %e, "health change not written yet");
                }
            }
        };
        tokio::join!(duties, liveness);
    }

    /// This term's duty while this agent leads; `None` (and the former term's duty dropped)
    /// otherwise.
    fn lead(&self) -> Option<Arc<Duty>> {
        let (leader, term) = {
            let metrics = self.control.raft.metrics();
            let m = metrics.borrow();
            (m.current_leader, m.current_term)
        };
        let mut slot = self.duty.locked();
        if leader != Some(self.control.id) {
            // What it heard as coordinator is what this agent last knew of the engines.
            if let Some(ended) = slot.take() {
                *self.last_listed.locked() = ended.engines.locked().clone();
            }
            return None;
        }
        if slot.as_ref().map(|d| d.term) != Some(term) {
            *slot = Some(Arc::new(Duty::new(term)));
        }
        slot.clone()
    }

    async fn coordinate(&self, duty: &Duty) -> Result<(), String> {
        let me = &self.control.me;
        if let Some(cmd) = self
            .control
            .read_state(|s| core::registration(s, me, self.control.id))
        {
            self.control.write(cmd).await.map_err(|e| e.to_string())?;
        }
        self.keep_voters(duty).await?;
        self.place_deployments(duty).await
    }

    /// The members of the Raft group as the voter choice sees them: (voters, learners).
    fn members(&self) -> (Vec<Member>, Vec<Member>) {
        self.control.membership(|membership| {
            self.control.read_state(|s| {
                let member = |id: NodeId| {
                    let node = s.nodes.values().find(|n| n.id == id);
                    Member {
                        id,
                        name: membership
                            .get_node(&id)
                            .map_or_else(|| id.to_string(), |n| n.name.clone()),
                        health: node.map(|n| n.health),
                        rack: node.and_then(|n| n.labels.get("rack").cloned()),
                        eligible: node.is_some_and(|n| {
                            n.labels.get(VOTER_LABEL).map(String::as_str) == Some(VOTER_ELIGIBLE)
                        }),
                    }
                };
                (
                    membership.voter_ids().map(member).collect(),
                    membership.learner_ids().map(member).collect(),
                )
            })
        })
    }

    /// Why this cluster has fewer voters than `cluster.voters`, if it has.
    pub fn voters_short(&self) -> Option<String> {
        let (voters, learners) = self.members();
        voters::plan(self.control.id, self.voters, &voters, &learners).short
    }

    /// Keeps `cluster.voters` voters (`voters::plan`: eligible learners only) and says once
    /// when it cannot.
    async fn keep_voters(&self, duty: &Duty) -> Result<(), String> {
        let (voters, learners) = self.members();
        let plan = voters::plan(self.control.id, self.voters, &voters, &learners);
        {
            let mut said = duty.voters_said.locked();
            if *said != plan.short {
                if let Some(why) = &plan.short {
                    warn!("{why}");
                }
                *said = plan.short.clone();
            }
        }
        let current: BTreeSet<NodeId> = voters.iter().map(|v| v.id).collect();
        if plan.next == current {
            return Ok(());
        }
        for name in &plan.replaced {
            warn!(node = %name, "replacing a voter that is down");
        }
        for name in &plan.retired {
            warn!(node = %name, "retiring a voter that is no longer eligible");
        }
        for name in &plan.promoted {
            info!(node = %name, "promoting an eligible learner to voter");
        }
        self.control
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(plan.next), true)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Places every deployment's engines and writes the assignments that changed. A
    /// deployment that does not fit keeps what it has and is logged once.
    async fn place_deployments(&self, duty: &Duty) -> Result<(), String> {
        let decided = self.control.read_state(core::placements);
        {
            let mut warned = duty.unplaced.locked();
            for e in decided.unplaced {
                if warned.len() >= UNPLACED_REMEMBERED_MAX {
                    warned.clear();
                }
                if warned.insert(e.clone()) {
                    warn!(error = %e, "cannot place every engine");
                }
            }
        }
        for (deployment, assignments) in decided.write {
            info!(%deployment, engines = assignments.len(), "placing engines");
            self.control
                .write(Command::SetAssignments {
                    deployment,
                    assignments,
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Tells the agents whose engines' assignments changed since the last push to reconcile
    /// now (a `Reconcile` directive with this term), instead of at their next pass.
    fn push_directives(&self, duty: &Duty) {
        let now = self.control.read_state(core::assigned);
        let index = self.control.last_applied_index();
        let changed = {
            let mut pushed = duty.pushed.locked();
            let changed = core::directive_targets(&pushed, &now);
            *pushed = now;
            changed
        };
        for node in changed {
            if node == self.control.me.name {
                self.control.engines_kick.notify_one();
                continue;
            }
            let Some(addr) = self.control.node_address(&node) else {
                continue;
            };
            let req = AgentRequest::Directive {
                term: duty.term,
                directive: Directive::Reconcile { index },
            };
            let peers = self.control.peers().clone();
            let timeout = self.control.attempt_timeout;
            tokio::spawn(async move {
                match peers.call(&node, addr, &req, timeout).await {
                    Ok(AgentResponse::DirectiveRefused { why, .. }) => {
                        warn!(%node, %why, "directive refused");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "directive not delivered (the agent reconciles at its next pass anyway)")
                    }
                }
            });
        }
    }

    /// Turns silence into suspect and down (and reports into ready) through the log, only
    /// when a node's health changes.
    async fn judge_liveness(&self, duty: &Duty) -> Result<(), String> {
        let changes = {
            let seen = duty.last_seen.locked();
            self.control.read_state(|s| {
                core::judge_liveness(
                    s,
                    &self.control.me.name,
                    &seen,
                    duty.since,
                    Instant::now(),
                    &self.liveness,
                )
            })
        };
        for (node, health) in changes {
            info!(%node, ?health, "node health changed");
            self.control
                .write(Command::SetHealth { node, health })
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A node's liveness report, with its telemetry and engines when it sent them (the log is
    /// not touched). Only the node itself may report for itself.
    pub fn report(
        &self,
        requester: &PeerIdentity,
        node: &str,
        gpus: Option<Vec<GpuTelemetry>>,
        engines: Option<Vec<EngineReport>>,
    ) -> Result<AgentResponse, String> {
        if *requester != PeerIdentity::Node(node.to_string()) {
            return Err(format!("{requester} may not report for {node}"));
        }
        let Some(duty) = self.lead() else {
            return Ok(self.control.not_coordinator());
        };
        let now = Instant::now();
        duty.last_seen.locked().insert(node.to_string(), now);
        if let Some(gpus) = gpus {
            duty.telemetry
                .locked()
                .insert(node.to_string(), (now, gpus));
        }
        if let Some(engines) = engines {
            duty.engines.locked().insert(node.to_string(), engines);
        }
        Ok(AgentResponse::HeartbeatAck)
    }

    /// Every assigned engine with its last reported state (`core::engines_view`), from this
    /// coordinator's reports; on another agent, from what the coordinator last listed.
    pub fn engines(&self) -> Vec<EngineReport> {
        let local = self.local.engines();
        let view = |reports: &HashMap<String, Vec<EngineReport>>| {
            self.control
                .read_state(|s| core::engines_view(s, &self.control.me.name, &local, reports))
        };
        match self.lead() {
            Some(d) => view(&d.engines.locked()),
            None => view(&self.last_listed.locked()),
        }
    }

    /// The latest telemetry of every node this coordinator heard from (its own read now).
    pub fn telemetry(&self) -> Vec<NodeTelemetry> {
        let me = &self.control.me.name;
        let mut out = vec![NodeTelemetry {
            node: me.clone(),
            age_ms: 0,
            gpus: self.local.telemetry(),
        }];
        if let Some(duty) = self.lead() {
            out.extend(
                duty.telemetry
                    .locked()
                    .iter()
                    .filter(|(n, _)| *n != me)
                    .map(|(n, (at, gpus))| NodeTelemetry {
                        node: n.clone(),
                        age_ms: at.elapsed().as_millis() as u64,
                        gpus: gpus.clone(),
                    }),
            );
        }
        out
    }

    /// The engines of the cluster, from the coordinator (this agent's view if it cannot be
    /// asked).
    pub async fn cluster_engines(&self) -> Vec<EngineReport> {
        self.cluster_engines_within(self.control.attempt_timeout)
            .await
    }

    /// `cluster_engines`, waiting up to `timeout` for the coordinator (the admin API waits
    /// longer than the serving path's frequent refresh: an operator's listing should not fall
    /// back to this node's own engines because a loaded coordinator answered late).
    pub async fn cluster_engines_within(&self, timeout: Duration) -> Vec<EngineReport> {
        if self.control.is_coordinator() {
            return self.engines();
        }
        match self
            .control
            .call_coordinator(&AgentRequest::Engines, timeout)
            .await
        {
            Ok(AgentResponse::Engines(e)) => {
                *self.last_listed.locked() = core::by_node(&e);
                e
            }
            // The coordinator's last list, with this node's own engines as they are now.
            _ => self.engines(),
        }
    }

    /// The cluster's telemetry: from this agent when it coordinates, else from the coordinator
    /// (this node's own readings at least, when the coordinator cannot be asked).
    pub async fn cluster_telemetry(&self) -> Vec<NodeTelemetry> {
        if self.control.is_coordinator() {
            return self.telemetry();
        }
        match self
            .control
            .call_coordinator(&AgentRequest::Telemetry, self.control.attempt_timeout)
            .await
        {
            Ok(AgentResponse::Telemetry(t)) => t,
            _ => self.telemetry(),
        }
    }
}
