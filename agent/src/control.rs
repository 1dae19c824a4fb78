//! The control plane in each agent: its Raft node, joining a cluster, the coordinator's
//! duties when this agent leads (registering itself, keeping the configured number of voters),
//! and the cluster view for `status`.
//!
//! An agent with an empty data dir never founds a cluster by itself: it is either told to
//! (`--bootstrap`, once, on the first host) or joins through its seeds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::RaftLogStorage;
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use pd_raft::network::{NetworkFactory, node_id};
use pd_raft::state::GpuRecord;
use pd_raft::store::{self, SharedState};
use pd_raft::{ApplyError, Command, CommandResult, NodeHealth, NodeId, RaftPeer, TypeConfig};
use pd_transport::enroll::{Enrolled, Refusal};
use pd_transport::pki::{self, Validity};
use pd_transport::{Endpoint, PeerIdentity};
use tracing::{info, warn};

use crate::custody::CaCustody;
use crate::enrollment::now_unix;

use crate::config::{Seed, Validated};
use crate::gpus::SharedInventory;
use crate::peers::Peers;
use crate::wire::{
    AgentRequest, AgentResponse, Directive, GpuTelemetry, NodeStatus, NodeTelemetry, StatusReport,
};

/// Bound on one control-plane request to another agent.
const CONTROL_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between join attempts.
const JOIN_RETRY: Duration = Duration::from_millis(500);
/// Bound on a write forwarded to the coordinator.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a write did not reach the log.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no coordinator is elected right now; retry shortly")]
    NoCoordinator,
    #[error("{0}")]
    Unreachable(String),
}

pub struct ControlPlane {
    pub raft: Raft<TypeConfig>,
    pub id: NodeId,
    pub me: RaftPeer,
    state: SharedState,
    peers: Arc<Peers>,
    voters: usize,
    interval: Duration,
    /// How often a voter compares its log with the other voters' (`may_campaign`).
    catch_up_grace: Duration,
    /// A handle on the Raft log (to read its last entry).
    log_tip: pd_raft::store::LogStore,
    inventory: Option<SharedInventory>,
    /// Bound on one forwarded write. A healthy coordinator answers in milliseconds; a dead one
    /// never does, and waiting longer only delays the retry that finds its successor. A write
    /// that times out but did commit is harmless to repeat: every command is idempotent.
    attempt_timeout: Duration,
    /// Pause between write attempts while there is no reachable coordinator.
    retry_pause: Duration,
    liveness: Liveness,
    /// When each node last reported (coordinator only; not replicated).
    last_seen: std::sync::Mutex<HashMap<String, Instant>>,
    /// What the coordinator last said about a voter shortage (said again only when it changes).
    voters_said: std::sync::Mutex<Option<String>>,
    /// Each node's latest GPU telemetry and when it came (coordinator only; not replicated).
    telemetry: std::sync::Mutex<HashMap<String, (Instant, Vec<GpuTelemetry>)>>,
    /// This node's engines, as the supervisor last published them.
    local_engines: std::sync::Mutex<Vec<crate::supervisor::EngineReport>>,
    /// Every node's engines as last reported (coordinator only; not replicated).
    engine_reports: std::sync::Mutex<HashMap<String, Vec<crate::supervisor::EngineReport>>>,
    /// Placement failures already logged (so each is logged once).
    unplaced: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The newest Raft term a directive came with (an agent may learn of a term from a
    /// directive before its Raft does).
    directive_term: std::sync::atomic::AtomicU64,
    /// Wakes the supervisor for a pass now (a `Reconcile` directive).
    pub engines_kick: Arc<tokio::sync::Notify>,
    /// Coordinator only: each engine's (node, generation) when directives were last pushed.
    pushed: std::sync::Mutex<BTreeMap<String, (String, u64)>>,
    /// The CA key, while this agent is a voter and has it.
    custody: Arc<CaCustody>,
    /// The cluster CA certificate (PEM), handed to enrolling hosts.
    ca_pem: String,
}

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

/// Liveness timings from `[cluster]`.
#[derive(Debug, Clone, Copy)]
struct Liveness {
    heartbeat: Duration,
    suspect_after: Duration,
    down_after: Duration,
}

impl ControlPlane {
    /// Opens the Raft store under the data dir and starts the Raft node. Bootstraps a new
    /// cluster when asked and the store is empty; joins through the seeds when the store is
    /// empty and seeds are set; otherwise resumes from the store.
    pub async fn start(
        cfg: &Validated,
        advertise: SocketAddr,
        peers: Arc<Peers>,
        bootstrap: bool,
        inventory: Option<SharedInventory>,
        custody: Arc<CaCustody>,
        ca_pem: String,
    ) -> anyhow::Result<Arc<Self>> {
        let (mut log, sm) = store::open(&cfg.config.node.data_dir.join("raft"))?;
        let fresh =
            log.read_vote().await?.is_none() && log.get_log_state().await?.last_log_id.is_none();
        let state = sm.shared();
        let r = &cfg.config.raft;
        let raft_cfg = openraft::Config {
            cluster_name: "pdagent".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            install_snapshot_timeout: r.election_timeout_max_ms.max(2000),
            ..Default::default()
        }
        .validate()?;
        let id = node_id(&cfg.node_name);
        let me = RaftPeer {
            name: cfg.node_name.clone(),
            address: advertise.to_string(),
        };
        let log_tip = log.clone();
        let raft = Raft::new(
            id,
            Arc::new(raft_cfg),
            NetworkFactory::new(peers.clone()),
            log,
            sm,
        )
        .await?;
        let cp = Arc::new(ControlPlane {
            raft,
            id,
            me,
            state,
            peers,
            voters: cfg.config.cluster.voters as usize,
            interval: Duration::from_millis(r.coordinator_interval_ms),
            catch_up_grace: Duration::from_millis(2 * r.heartbeat_ms),
            log_tip,
            inventory,
            attempt_timeout: Duration::from_millis((4 * r.heartbeat_ms).max(200)),
            retry_pause: Duration::from_millis(r.heartbeat_ms),
            liveness: Liveness {
                heartbeat: Duration::from_millis(cfg.config.cluster.heartbeat_ms),
                suspect_after: Duration::from_millis(cfg.config.cluster.suspect_after_ms),
                down_after: Duration::from_millis(cfg.config.cluster.down_after_ms),
            },
            last_seen: std::sync::Mutex::new(HashMap::new()),
            voters_said: std::sync::Mutex::new(None),
            telemetry: std::sync::Mutex::new(HashMap::new()),
            unplaced: std::sync::Mutex::new(std::collections::HashSet::new()),
            local_engines: std::sync::Mutex::new(Vec::new()),
            engine_reports: std::sync::Mutex::new(HashMap::new()),
            directive_term: std::sync::atomic::AtomicU64::new(0),
            engines_kick: Arc::new(tokio::sync::Notify::new()),
            pushed: std::sync::Mutex::new(BTreeMap::new()),
            custody,
            ca_pem,
        });
        if fresh && bootstrap {
            info!(node = %cp.me, "bootstrapping a new cluster");
            cp.raft
                .initialize(BTreeMap::from([(id, cp.me.clone())]))
                .await?;
        } else if bootstrap {
            info!(
                "--bootstrap ignored: this agent already belongs to a cluster (its data dir has Raft state)"
            );
        } else if fresh && !cfg.seeds.is_empty() {
            tokio::spawn(cp.clone().join_through(cfg.seeds.clone()));
        } else if fresh {
            warn!(
                "this agent belongs to no cluster: run `pdagent run --bootstrap` once on the first host, \
                 or set cluster.seeds to join one"
            );
        }
        tokio::spawn(cp.clone().coordinator_loop());
        tokio::spawn(cp.clone().election_gate_loop());
        tokio::spawn(cp.clone().liveness_loop());
        Ok(cp)
    }

    /// The coordinator this agent knows of.
    pub fn coordinator(&self) -> Option<RaftPeer> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).cloned()
    }

    /// The agent's transport endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        self.peers.endpoint()
    }

    pub fn custody(&self) -> &CaCustody {
        &self.custody
    }

    fn is_coordinator(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Asks the seeds (then whoever they name as coordinator) to add this agent, until one
    /// accepts.
    async fn join_through(self: Arc<Self>, seeds: Vec<Seed>) {
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
                        }) => match c.address.parse() {
                            Ok(a) => target = (c.name, a),
                            Err(_) => break,
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
            return Ok(AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            });
        }
        let id = node_id(&name);
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned();
        if known.is_none() {
            self.raft
                .add_learner(
                    id,
                    RaftPeer {
                        name: name.clone(),
                        address: address.clone(),
                    },
                    false,
                )
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
        match self.raft.client_write(cmd).await {
            Ok(r) => r.data.map_err(|e| e.to_string())?,
            Err(e) => return Err(format!("registering {name}: {e}")),
        };
        Ok(AgentResponse::Joined {
            coordinator: self.me.name.clone(),
        })
    }

    /// A command another agent proposed over the transport: applied only when this agent is
    /// the coordinator and the peer's certificate may propose it (`authority`: a node speaks
    /// only for itself; admin changes come through the coordinator's admin API).
    pub async fn propose_from_peer(
        &self,
        peer: &PeerIdentity,
        cmd: Command,
    ) -> Result<AgentResponse, String> {
        let PeerIdentity::Node(node) = peer else {
            return Err("admin changes go through the admin API, not the transport".into());
        };
        if let Err(e) = crate::authority::node_may_propose(node, &cmd) {
            warn!(%node, command = cmd.kind(), "refused a proposal: {e}");
            return Err(format!("refused: {e}"));
        }
        Ok(self.propose(cmd).await)
    }

    /// Writes `cmd` here when this agent is the coordinator, or names the coordinator that
    /// must take it (`Ok(Err(name))`). While none is elected it waits (until
    /// `FORWARD_TIMEOUT`). The admin API's writes come here: a write the admin credential
    /// authorized is applied only by the coordinator that checked the credential.
    pub async fn propose_or_redirect(
        &self,
        cmd: Command,
    ) -> Result<Result<CommandResult, String>, SubmitError> {
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            match self.propose(cmd.clone()).await {
                AgentResponse::Proposed(r) => return Ok(Ok(r)),
                AgentResponse::NotCoordinator {
                    coordinator: Some(c),
                } if c.name != self.me.name => return Ok(Err(c.name)),
                _ => {}
            }
            if tokio::time::Instant::now() + self.retry_pause > deadline {
                return Err(SubmitError::NoCoordinator);
            }
            tokio::time::sleep(self.retry_pause).await;
        }
    }

    /// Writes a command through Raft (coordinator only). Removing a node also takes it out of
    /// the Raft membership first.
    pub async fn propose(&self, cmd: Command) -> AgentResponse {
        if !self.is_coordinator() {
            return AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            };
        }
        if let Command::RemoveNode { node, .. } = &cmd {
            if *node == self.me.name {
                return AgentResponse::Proposed(Err(ApplyError::Refused(format!(
                    "{node} is the coordinator; stop it (another agent takes over) and remove it from there"
                ))));
            }
            if let Err(e) = self.remove_member(node_id(node)).await {
                return AgentResponse::Proposed(Err(ApplyError::Refused(format!(
                    "removing {node} from Raft: {e}"
                ))));
            }
        }
        match self.raft.client_write(cmd).await {
            Ok(r) => AgentResponse::Proposed(r.data),
            Err(_) => AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            },
        }
    }

    async fn remove_member(&self, id: NodeId) -> Result<(), String> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let change = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.learner_ids().any(|l| l == id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Ok(());
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Writes a command through whichever agent is coordinator. While a coordinator is being
    /// elected or cannot be reached, it asks again (each attempt bounded by the election
    /// timeout, so a dead coordinator costs one election, not a connection timeout) until
    /// `FORWARD_TIMEOUT`.
    pub async fn submit(&self, cmd: Command) -> Result<CommandResult, SubmitError> {
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            let err = match self.propose(cmd.clone()).await {
                AgentResponse::Proposed(r) => return Ok(r),
                AgentResponse::NotCoordinator {
                    coordinator: Some(c),
                } => match c.address.parse::<SocketAddr>() {
                    Ok(addr) => match self
                        .peers
                        .call(
                            &c.name,
                            addr,
                            &AgentRequest::Propose(cmd.clone()),
                            self.attempt_timeout,
                        )
                        .await
                    {
                        Ok(AgentResponse::Proposed(r)) => return Ok(r),
                        Ok(AgentResponse::NotCoordinator { .. }) => SubmitError::NoCoordinator,
                        Ok(other) => {
                            SubmitError::Unreachable(format!("unexpected answer {other:?}"))
                        }
                        Err(e) => SubmitError::Unreachable(format!(
                            "forwarding to coordinator {}: {e}",
                            c.name
                        )),
                    },
                    Err(_) => SubmitError::Unreachable(format!("bad address {}", c.address)),
                },
                AgentResponse::NotCoordinator { coordinator: None } => SubmitError::NoCoordinator,
                other => SubmitError::Unreachable(format!("unexpected answer {other:?}")),
            };
            if tokio::time::Instant::now() + self.retry_pause > deadline {
                return Err(err);
            }
            tokio::time::sleep(self.retry_pause).await;
        }
    }

    /// A copy of the replicated state as this agent has applied it.
    pub fn state_snapshot(&self) -> pd_raft::ClusterState {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .state
            .clone()
    }

    /// Reads node `name`'s record in the replicated state.
    fn with_node<T>(
        &self,
        name: &str,
        f: impl FnOnce(&pd_raft::NodeRecord) -> Option<T>,
    ) -> Option<T> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .state
            .nodes
            .get(name)
            .and_then(f)
    }

    /// The transport address of node `name`, from the replicated state.
    pub fn node_address(&self, name: &str) -> Option<SocketAddr> {
        self.with_node(name, |n| n.address.parse().ok())
    }

    /// Node `name`'s health as the coordinator last recorded it (heartbeats).
    pub fn node_health(&self, name: &str) -> Option<NodeHealth> {
        self.with_node(name, |n| Some(n.health))
    }

    /// This agent's node name.
    pub fn node_name(&self) -> &str {
        &self.me.name
    }

    /// Places every deployment's engines (coordinator only) and writes the assignments that
    /// changed. A deployment that does not fit keeps what it has and is logged.
    async fn place_deployments(&self) -> Result<(), String> {
        let state = self.state_snapshot();
        for name in state.deployments.keys() {
            let current: Vec<pd_raft::Placed> = state
                .assignments
                .values()
                .filter(|a| a.deployment == *name)
                .map(|a| pd_raft::Placed {
                    engine: a.engine.clone(),
                    role: a.role,
                    node: a.node.clone(),
                    gpus: a.gpus.clone(),
                })
                .collect();
            let next = match pd_raft::placement::place(&state, name) {
                Ok(p) => p,
                Err(e) => {
                    let mut warned = self.unplaced.lock().unwrap_or_else(|p| p.into_inner());
                    if warned.len() >= 256 {
                        warned.clear();
                    }
                    if warned.insert(e.to_string()) {
                        warn!(error = %e, "cannot place every engine");
                    }
                    continue;
                }
            };
            if next == current {
                continue;
            }
            info!(deployment = %name, engines = next.len(), "placing engines");
            self.raft
                .client_write(Command::SetAssignments {
                    deployment: name.clone(),
                    assignments: next,
                })
                .await
                .map_err(|e| e.to_string())?
                .data
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Coordinator: tells the agents whose engines' assignments changed since the last push to
    /// reconcile now (a `Reconcile` directive with this term), instead of at their next pass.
    fn push_directives(self: &Arc<Self>) {
        let (now, index): (BTreeMap<String, (String, u64)>, u64) = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            let now = s
                .state
                .assignments
                .values()
                .map(|a| (a.engine.clone(), (a.node.clone(), a.generation)))
                .collect();
            (now, s.last_applied.map_or(0, |l| l.index))
        };
        let changed: BTreeSet<String> = {
            let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
            let mut nodes = BTreeSet::new();
            for (engine, (node, generation)) in &now {
                if pushed.get(engine) != Some(&(node.clone(), *generation)) {
                    nodes.insert(node.clone());
                }
            }
            for (engine, (node, _)) in pushed.iter() {
                if !now.contains_key(engine) {
                    nodes.insert(node.clone());
                }
            }
            *pushed = now;
            nodes
        };
        let term = self.raft.metrics().borrow().current_term;
        for node in changed {
            if node == self.me.name {
                self.engines_kick.notify_one();
                continue;
            }
            let Some(addr) = self.with_node(&node, |n| n.address.parse::<SocketAddr>().ok()) else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let req = AgentRequest::Directive {
                    term,
                    directive: Directive::Reconcile { index },
                };
                match this
                    .peers
                    .call(&node, addr, &req, this.attempt_timeout)
                    .await
                {
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

    /// Whether `name` was removed from the cluster (its agent is refused from then on).
    pub fn is_removed(&self, name: &str) -> bool {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .state
            .is_removed(node_id(name))
    }

    /// Replicates this host's GPU list when it differs from what the cluster records.
    async fn report_gpus(&self) -> Result<(), String> {
        let Some(inv) = &self.inventory else {
            return Ok(());
        };
        let gpus: Vec<GpuRecord> = {
            let inv = inv.lock().unwrap_or_else(|p| p.into_inner());
            inv.gpus
                .iter()
                .map(|g| GpuRecord {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    name: g.name.clone(),
                    memory_total_bytes: g.memory.total_bytes,
                    health: g.health.to_string(),
                })
                .collect()
        };
        let recorded = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            match s.state.nodes.get(&self.me.name) {
                Some(n) => n.gpus.clone(),
                None => return Ok(()),
            }
        };
        if recorded == gpus {
            return Ok(());
        }
        self.submit(Command::SetGpus {
            node: self.me.name.clone(),
            gpus,
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The last entry of this agent's Raft log.
    pub async fn last_log_id(&self) -> Option<openraft::LogId<NodeId>> {
        let mut log = self.log_tip.clone();
        log.get_log_state().await.ok().and_then(|s| s.last_log_id)
    }

    /// Keeps this voter out of elections while another live voter holds a longer log
    /// (`may_campaign`): asked every two heartbeats.
    async fn election_gate_loop(self: Arc<Self>) {
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
                    let addr = p.address.parse::<SocketAddr>().ok()?;
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

    /// The coordinator's duties, run on every agent and acted on only by the leader.
    async fn coordinator_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tick.tick().await;
            if let Err(e) = self.report_gpus().await {
                tracing::debug!(error = %e, "GPU report not replicated yet");
            }
            self.sync_revocations();
            if let Err(e) = self.record_certificate().await {
                tracing::debug!(error = %e, "certificate not recorded yet");
            }
            if let Err(e) = self.keep_custody().await {
                tracing::debug!(error = %e, "CA key custody not settled yet");
            }
            if !self.is_coordinator() {
                continue;
            }
            if let Err(e) = self.coordinate().await {
                warn!(error = %e, "coordinator duty failed; will retry");
            }
            self.push_directives();
        }
    }

    async fn coordinate(&self) -> Result<(), String> {
        let registered = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            s.state.nodes.get(&self.me.name).map(|n| n.address.clone())
        };
        if registered.as_deref() != Some(self.me.address.as_str()) {
            // A coordinator that was never registered bootstrapped the cluster: the operator
            // chose it to hold the CA key, so it is eligible to vote.
            let labels = match registered {
                None => BTreeMap::from([(
                    crate::voters::VOTER_LABEL.to_string(),
                    crate::voters::VOTER_ELIGIBLE.to_string(),
                )]),
                Some(_) => BTreeMap::new(),
            };
            let cmd = Command::RegisterNode {
                name: self.me.name.clone(),
                id: self.id,
                address: self.me.address.clone(),
                labels,
            };
            self.raft
                .client_write(cmd)
                .await
                .map_err(|e| e.to_string())?
                .data
                .map_err(|e| e.to_string())?;
        }
        self.keep_voters().await?;
        self.place_deployments().await
    }

    /// The members of the Raft group as the voter choice sees them: (voters, learners).
    fn members(&self) -> (Vec<crate::voters::Member>, Vec<crate::voters::Member>) {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        let member = |id: NodeId| {
            let node = s.state.nodes.values().find(|n| n.id == id);
            crate::voters::Member {
                id,
                name: membership
                    .get_node(&id)
                    .map_or_else(|| id.to_string(), |n| n.name.clone()),
                health: node.map(|n| n.health),
                rack: node.and_then(|n| n.labels.get("rack").cloned()),
                eligible: node.is_some_and(|n| {
                    n.labels.get(crate::voters::VOTER_LABEL).map(String::as_str)
                        == Some(crate::voters::VOTER_ELIGIBLE)
                }),
            }
        };
        (
            membership.voter_ids().map(member).collect(),
            membership.learner_ids().map(member).collect(),
        )
    }

    /// Why this cluster has fewer voters than `cluster.voters`, if it has.
    pub fn voters_short(&self) -> Option<String> {
        let (voters, learners) = self.members();
        crate::voters::plan(self.id, self.voters, &voters, &learners).short
    }

    /// Keeps `cluster.voters` voters (`voters::plan`: eligible learners only) and says once
    /// when it cannot.
    async fn keep_voters(&self) -> Result<(), String> {
        let (voters, learners) = self.members();
        let plan = crate::voters::plan(self.id, self.voters, &voters, &learners);
        {
            let mut said = self.voters_said.lock().unwrap_or_else(|p| p.into_inner());
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
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(plan.next), true)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Records a liveness report (coordinator only; the log is not touched).
    pub fn heartbeat(&self, requester: &PeerIdentity, node: &str) -> Result<AgentResponse, String> {
        if *requester != PeerIdentity::Node(node.to_string()) {
            return Err(format!("{requester} may not report for {node}"));
        }
        if !self.is_coordinator() {
            return Ok(AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            });
        }
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), Instant::now());
        Ok(AgentResponse::HeartbeatAck)
    }

    /// A liveness report with telemetry (coordinator only; the log is not touched).
    pub fn report(
        &self,
        requester: &PeerIdentity,
        node: &str,
        gpus: Vec<GpuTelemetry>,
    ) -> Result<AgentResponse, String> {
        let ack = self.heartbeat(requester, node)?;
        if matches!(ack, AgentResponse::HeartbeatAck) {
            self.telemetry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), (Instant::now(), gpus));
        }
        Ok(ack)
    }

    pub fn inventory(&self) -> Option<SharedInventory> {
        self.inventory.clone()
    }

    pub fn set_local_engines(&self, engines: Vec<crate::supervisor::EngineReport>) {
        *self.local_engines.lock().unwrap_or_else(|p| p.into_inner()) = engines;
    }

    /// This node's engines as its supervisor last published them.
    pub fn local_engines(&self) -> Vec<crate::supervisor::EngineReport> {
        self.local_engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps a node's engine report (coordinator only).
    pub fn record_engines(&self, node: &str, engines: Vec<crate::supervisor::EngineReport>) {
        if self.is_coordinator() {
            self.engine_reports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), engines);
        }
    }

    /// Every assigned engine with its last reported state (`starting` and no pid when its
    /// node has not reported it yet). Answered from the coordinator's reports.
    pub fn engines(&self) -> Vec<crate::supervisor::EngineReport> {
        use crate::supervisor::{EngineReport, EngineState};
        let state = self.state_snapshot();
        let reports = self
            .engine_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let local = self.local_engines();
        state
            .assignments
            .values()
            .map(|a| {
                let from = if a.node == self.me.name {
                    local.iter().find(|r| r.engine == a.engine).cloned()
                } else {
                    reports
                        .get(&a.node)
                        .and_then(|l| l.iter().find(|r| r.engine == a.engine).cloned())
                };
                from.filter(|r| r.generation == a.generation)
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

    /// The engines of the cluster, from the coordinator (this agent's view if it cannot be
    /// asked).
    pub async fn cluster_engines(&self) -> Vec<crate::supervisor::EngineReport> {
        self.cluster_engines_within(self.attempt_timeout).await
    }

    /// `cluster_engines`, waiting up to `timeout` for the coordinator (the admin API waits
    /// longer than the serving path's frequent refresh: an operator's listing should not fall
    /// back to this node's own engines because a loaded coordinator answered late).
    pub async fn cluster_engines_within(
        &self,
        timeout: Duration,
    ) -> Vec<crate::supervisor::EngineReport> {
        if self.is_coordinator() {
            return self.engines();
        }
        let ask = async {
            let c = self.coordinator()?;
            let addr: SocketAddr = c.address.parse().ok()?;
            match self
                .peers
                .call(&c.name, addr, &AgentRequest::Engines, timeout)
                .await
            {
                Ok(AgentResponse::Engines(e)) => Some(e),
                _ => None,
            }
        };
        ask.await.unwrap_or_else(|| self.engines())
    }

    /// This node's GPU readings now.
    fn local_telemetry(&self) -> Vec<GpuTelemetry> {
        let Some(inv) = &self.inventory else {
            return Vec::new();
        };
        let inv = inv.lock().unwrap_or_else(|p| p.into_inner());
        inv.gpus
            .iter()
            .map(|g| GpuTelemetry {
                index: g.index,
                temperature_c: g.telemetry.temperature_c,
                power_w: g.telemetry.power_w,
                utilization_gpu_pct: g.telemetry.utilization_gpu_pct,
                memory_used_bytes: g.memory.used_bytes,
                health: g.health.to_string(),
            })
            .collect()
    }

    /// The latest telemetry of every node this coordinator heard from (its own read now).
    pub fn telemetry(&self) -> Vec<NodeTelemetry> {
        let mut out = vec![NodeTelemetry {
            node: self.me.name.clone(),
            age_ms: 0,
            gpus: self.local_telemetry(),
        }];
        if !self.is_coordinator() {
            return out;
        }
        let t = self.telemetry.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(
            t.iter()
                .filter(|(n, _)| **n != self.me.name)
                .map(|(n, (at, gpus))| NodeTelemetry {
                    node: n.clone(),
                    age_ms: at.elapsed().as_millis() as u64,
                    gpus: gpus.clone(),
                }),
        );
        out
    }

    /// The cluster's telemetry: from this agent when it coordinates, else from the coordinator
    /// (this node's own readings at least, when the coordinator cannot be asked).
    pub async fn cluster_telemetry(&self) -> Vec<NodeTelemetry> {
        if self.is_coordinator() {
            return self.telemetry();
        }
        let ask = async {
            let c = self.coordinator()?;
            let addr: SocketAddr = c.address.parse().ok()?;
            match self
                .peers
                .call(
                    &c.name,
                    addr,
                    &AgentRequest::Telemetry,
                    self.attempt_timeout,
                )
                .await
            {
                Ok(AgentResponse::Telemetry(t)) => Some(t),
                _ => None,
            }
        };
        ask.await.unwrap_or_else(|| self.telemetry())
    }

    /// Every agent reports to the coordinator; the coordinator turns silence into suspect and
    /// down (and reports back into ready) through the log, only when a node's health changes.
    async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.liveness.heartbeat);
        let mut leader_since: Option<Instant> = None;
        loop {
            tick.tick().await;
            if self.is_coordinator() {
                let since = *leader_since.get_or_insert_with(Instant::now);
                if let Err(e) = self.judge_liveness(since).await {
                    tracing::debug!(error = %e, "health change not written yet");
                }
                continue;
            }
            leader_since = None;
            let Some(c) = self.coordinator() else {
                continue;
            };
            let Ok(addr) = c.address.parse::<SocketAddr>() else {
                continue;
            };
            let req = AgentRequest::NodeReport {
                node: self.me.name.clone(),
                gpus: self.local_telemetry(),
                engines: self.local_engines(),
            };
            let _ = self
                .peers
                .call(&c.name, addr, &req, 2 * self.liveness.heartbeat)
                .await;
        }
    }

    async fn judge_liveness(&self, leader_since: Instant) -> Result<(), String> {
        let now = Instant::now();
        let nodes: Vec<(String, NodeHealth)> = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            s.state
                .nodes
                .values()
                .map(|n| (n.name.clone(), n.health))
                .collect()
        };
        let changes: Vec<(String, NodeHealth)> = {
            let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .into_iter()
                .filter_map(|(name, health)| {
                    let want = if name == self.me.name {
                        NodeHealth::Ready
                    } else {
                        // A new coordinator gives everyone a full period from its election.
                        let last = seen
                            .get(&name)
                            .copied()
                            .unwrap_or(leader_since)
                            .max(leader_since);
                        let silent = now.saturating_duration_since(last);
                        if silent >= self.liveness.down_after {
                            NodeHealth::Down
                        } else if silent >= self.liveness.suspect_after {
                            NodeHealth::Suspect
                        } else {
                            NodeHealth::Ready
                        }
                    };
                    (want != health).then_some((name, want))
                })
                .collect()
        };
        for (node, health) in changes {
            info!(%node, ?health, "node health changed");
            let r = self
                .raft
                .client_write(Command::SetHealth { node, health })
                .await
                .map_err(|e| e.to_string())?;
            r.data.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Copies the replicated revocation list into the transport, which checks it on every new
    /// connection.
    fn sync_revocations(&self) {
        let revoked: Vec<String> = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            s.state.revoked_serials.iter().cloned().collect()
        };
        if self.endpoint().revocations().replace(revoked) {
            info!(
                revoked = self.endpoint().revocations().len(),
                "revocation list updated"
            );
        }
    }

    /// Makes sure the cluster knows this node's certificate, so that removing the node revokes
    /// it (certificates issued offline are learnt this way).
    async fn record_certificate(&self) -> Result<(), String> {
        let info = self.endpoint().identity().info;
        let known = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            if !s.state.nodes.contains_key(&self.me.name) {
                return Ok(());
            }
            s.state
                .certificates
                .get(&self.me.name)
                .is_some_and(|c| c.contains_key(&info.serial_hex))
        };
        if known {
            return Ok(());
        }
        self.submit(Command::RecordCertificate {
            node: self.me.name.clone(),
            cert_serial: info.serial_hex,
            not_after_unix: info.not_after_unix,
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// CA key custody follows the voter set: a voter without the key fetches it from the
    /// coordinator; a learner that still holds it deletes it.
    /// A node removed from the cluster deletes it too, once it learns of the removal (from its
    /// own copy of the state, or from a peer that refuses it).
    async fn keep_custody(&self) -> Result<(), String> {
        if self.peers.told_removed() || self.is_removed(&self.me.name) {
            if self.custody.discard()? {
                warn!("this node was removed from the cluster: deleted its copy of the CA key");
            }
            return Ok(());
        }
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == self.id);
        let learner = membership.learner_ids().any(|l| l == self.id);
        if learner && self.custody.holds_key() {
            self.custody.discard()?;
            info!("this agent is no longer a voter: deleted its copy of the CA key");
            return Ok(());
        }
        if !voter || self.custody.holds_key() {
            return Ok(());
        }
        let Some(c) = self.coordinator().filter(|c| c.name != self.me.name) else {
            return Ok(());
        };
        let addr: SocketAddr = c.address.parse().map_err(|_| "bad coordinator address")?;
        match self
            .peers
            .call(
                &c.name,
                addr,
                &AgentRequest::FetchCaKey,
                CONTROL_RPC_TIMEOUT,
            )
            .await
        {
            Ok(AgentResponse::CaKey { key_pem }) => {
                self.custody.store(&key_pem)?;
                info!(from = %c.name, path = %self.custody.path().display(), "this voter now holds the CA key");
                Ok(())
            }
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Hands the CA key to a voter that asks (coordinator only).
    pub fn ca_key_for(&self, requester: &PeerIdentity) -> Result<AgentResponse, String> {
        let PeerIdentity::Node(name) = requester else {
            return Err("only agents hold the CA key".into());
        };
        if !self.is_coordinator() {
            return Ok(AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            });
        }
        let voter = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == node_id(name));
        if !voter {
            return Err(format!(
                "{name} is not a voter; only voters hold the CA key"
            ));
        }
        let ca = self
            .custody
            .authority()
            .ok_or("the coordinator does not hold the CA key either")?;
        info!(node = %name, "handing the CA key to a voter");
        Ok(AgentResponse::CaKey {
            key_pem: ca.key_pem(),
        })
    }

    /// Enrolls a host that presented a join token: signed here when this agent is the
    /// coordinator, otherwise forwarded to it.
    pub async fn enroll(
        &self,
        token: String,
        node: String,
        csr_pem: String,
    ) -> Result<Enrolled, Refusal> {
        if self.is_coordinator() {
            return self.enroll_here(&token, &node, &csr_pem).await;
        }
        let Some(c) = self.coordinator() else {
            return Err(Refusal::retry("no coordinator is elected right now"));
        };
        let addr: SocketAddr = c
            .address
            .parse()
            .map_err(|_| Refusal::retry("bad coordinator address"))?;
        let req = AgentRequest::Enroll {
            token,
            node,
            csr_pem,
        };
        match self.peers.call(&c.name, addr, &req, FORWARD_TIMEOUT).await {
            Ok(AgentResponse::Certificate { cert_pem, ca_pem }) => {
                Ok(Enrolled { cert_pem, ca_pem })
            }
            Ok(AgentResponse::EnrollRefused { reason, retryable }) => {
                Err(Refusal { reason, retryable })
            }
            Ok(AgentResponse::NotCoordinator { .. }) => {
                Err(Refusal::retry("the coordinator changed; retry"))
            }
            Ok(other) => Err(Refusal::retry(format!("unexpected answer {other:?}"))),
            Err(e) => Err(Refusal::retry(format!(
                "cannot reach the coordinator {}: {e}",
                c.name
            ))),
        }
    }

    /// The coordinator's side of an enrollment forwarded by another agent.
    pub async fn enroll_forwarded(
        &self,
        token: String,
        node: String,
        csr_pem: String,
    ) -> AgentResponse {
        if !self.is_coordinator() {
            return AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            };
        }
        match self.enroll_here(&token, &node, &csr_pem).await {
            Ok(e) => AgentResponse::Certificate {
                cert_pem: e.cert_pem,
                ca_pem: e.ca_pem,
            },
            Err(r) => AgentResponse::EnrollRefused {
                reason: r.reason,
                retryable: r.retryable,
            },
        }
    }

    async fn enroll_here(
        &self,
        token: &str,
        node: &str,
        csr_pem: &str,
    ) -> Result<Enrolled, Refusal> {
        let ca = self.custody.authority().ok_or_else(|| {
            Refusal::retry(format!(
                "the coordinator {} does not hold the CA key (start the first host with                  `pdagent run --bootstrap --ca-key ca.key`)",
                self.me.name
            ))
        })?;
        let token_id = ca
            .verify_join_token(token, now_unix().max(0) as u64)
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        pki::validate_node_name(node).map_err(|e| Refusal::fatal(e.to_string()))?;
        let taken = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            s.state.nodes.contains_key(node)
        };
        if taken {
            return Err(Refusal::fatal(format!(
                "a node named {node} is already in the cluster; pick another node.name, or                  `pdctl remove {node}` first if that host is gone"
            )));
        }
        let cert_pem = ca
            .sign_node_csr(csr_pem, node, Validity::default())
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        let info = pki::first_cert_der(&cert_pem)
            .and_then(|d| pki::cert_info(&d))
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        let cmd = Command::EnrollNode {
            node: node.to_string(),
            id: node_id(node),
            cert_serial: info.serial_hex,
            not_after_unix: info.not_after_unix,
        };
        match self.raft.client_write(cmd).await {
            Ok(r) => r.data.map_err(|e| Refusal::fatal(e.to_string()))?,
            Err(e) => return Err(Refusal::retry(format!("recording the enrollment: {e}"))),
        };
        info!(%node, token = %token_id, "enrolled a host with a join token");
        Ok(Enrolled {
            cert_pem,
            ca_pem: self.ca_pem.clone(),
        })
    }

    /// Renews a node's certificate for its own name (coordinator only): signs the request and
    /// records the new serial.
    pub async fn renew(
        &self,
        requester: &PeerIdentity,
        csr_pem: &str,
    ) -> Result<AgentResponse, String> {
        let PeerIdentity::Node(node) = requester else {
            return Err("only agents renew node certificates".into());
        };
        if !self.is_coordinator() {
            return Ok(AgentResponse::NotCoordinator {
                coordinator: self.coordinator(),
            });
        }
        if self.is_removed(node) {
            return Err(crate::wire::removal_message(node));
        }
        let ca = self
            .custody
            .authority()
            .ok_or("the coordinator does not hold the CA key")?;
        let cert_pem = ca
            .sign_node_csr(csr_pem, node, Validity::default())
            .map_err(|e| e.to_string())?;
        let info = pki::first_cert_der(&cert_pem)
            .and_then(|d| pki::cert_info(&d))
            .map_err(|e| e.to_string())?;
        self.raft
            .client_write(Command::RecordCertificate {
                node: node.clone(),
                cert_serial: info.serial_hex,
                not_after_unix: info.not_after_unix,
            })
            .await
            .map_err(|e| format!("recording the renewal: {e}"))?
            .data
            .map_err(|e| e.to_string())?;
        info!(%node, "renewed a node's certificate");
        Ok(AgentResponse::Certificate {
            cert_pem,
            ca_pem: self.ca_pem.clone(),
        })
    }

    /// Asks the coordinator (possibly this agent) to renew this node's certificate.
    pub async fn request_renewal(&self, csr_pem: String) -> Result<(String, String), String> {
        let me = PeerIdentity::Node(self.me.name.clone());
        let answer = if self.is_coordinator() {
            self.renew(&me, &csr_pem).await?
        } else {
            let c = self
                .coordinator()
                .ok_or("no coordinator is elected right now")?;
            let addr: SocketAddr = c.address.parse().map_err(|_| "bad coordinator address")?;
            self.peers
                .call(
                    &c.name,
                    addr,
                    &AgentRequest::Renew { csr_pem },
                    FORWARD_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())?
        };
        match answer {
            AgentResponse::Certificate { cert_pem, ca_pem } => Ok((cert_pem, ca_pem)),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// This agent's view of the cluster.
    pub fn status(&self) -> StatusReport {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
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

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "Raft did not shut down cleanly");
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
