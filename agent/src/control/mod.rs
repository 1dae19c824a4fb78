//! The agent's Raft node: starting it and joining a cluster, the one way to write a command
//! (`write` here on the coordinator, `submit` from anywhere), the one way to ask the
//! coordinator something (`call_coordinator`), and reads of the replicated state.
//!
//! The coordinator's duties are `coordinator`; the PKI's are `enrollment` and `custody`; this
//! agent's reports to the coordinator are `reporting`. They all go through this node.
//!
//! An agent with an empty data dir never founds a cluster by itself: it is either told to
//! (`--bootstrap`, once, on the first host) or joins through its seeds.

mod directive;
mod election;
mod join;
mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{ChangeMembers, Raft, SnapshotPolicy};
use pd_raft::network::{NetworkFactory, node_id};
use pd_raft::store::{self, SharedState};
use pd_raft::{
    Applied, ApplyError, ClusterState, Command, CommandResult, NodeHealth, NodeId, RaftPeer,
    TypeConfig,
};
use pd_transport::{Endpoint, PeerIdentity};
use tracing::{info, warn};

use crate::config::Validated;
use crate::peers::Peers;
use crate::util::UnpoisonedRw;
use crate::wire::{AgentRequest, AgentResponse};

pub use directive::fence_directive;
pub use election::may_campaign;

/// Bound on one control-plane request to another agent.
pub const CONTROL_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between join attempts.
const JOIN_RETRY: Duration = Duration::from_millis(500);
/// Bound on a write forwarded to the coordinator.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a write did not reach the log.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no coordinator is elected right now; retry shortly")]
    NoCoordinator,
    #[error("{0}")]
    Unreachable(String),
}

/// Why a write on this node did not apply.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Raft did not commit it (this node stopped leading, or is shutting down).
    #[error("{0}")]
    NotCommitted(String),
    /// It committed, and the state machine refused it.
    #[error(transparent)]
    Refused(#[from] ApplyError),
}

/// Why the coordinator could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no coordinator is elected right now")]
    NoCoordinator,
    #[error("the coordinator {0}'s address {1:?} is not ip:port")]
    BadAddress(String, String),
    #[error("cannot reach the coordinator {0}: {1}")]
    Unreachable(String, String),
}

pub struct ControlPlane {
    pub raft: Raft<TypeConfig>,
    pub id: NodeId,
    pub me: RaftPeer,
    state: SharedState,
    peers: Arc<Peers>,
    /// How often a voter compares its log with the other voters' (`may_campaign`).
    catch_up_grace: Duration,
    /// A handle on the Raft log (to read its last entry).
    log_tip: pd_raft::store::LogStore,
    /// Bound on one forwarded write. A healthy coordinator answers in milliseconds; a dead one
    /// never does, and waiting longer only delays the retry that finds its successor. A write
    /// that times out but did commit is harmless to repeat: every command is idempotent.
    pub attempt_timeout: Duration,
    /// Pause between write attempts while there is no reachable coordinator.
    retry_pause: Duration,
    /// The newest Raft term a directive came with (an agent may learn of a term from a
    /// directive before its Raft does).
    directive_term: std::sync::atomic::AtomicU64,
    /// Wakes the supervisor for a pass now (a `Reconcile` directive).
    pub engines_kick: Arc<tokio::sync::Notify>,
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
            catch_up_grace: Duration::from_millis(2 * r.heartbeat_ms),
            log_tip,
            attempt_timeout: Duration::from_millis((4 * r.heartbeat_ms).max(200)),
            retry_pause: Duration::from_millis(r.heartbeat_ms),
            directive_term: std::sync::atomic::AtomicU64::new(0),
            engines_kick: Arc::new(tokio::sync::Notify::new()),
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
        tokio::spawn(cp.clone().election_gate_loop());
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

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    pub fn is_coordinator(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// The answer of an agent that is not the coordinator.
    pub fn not_coordinator(&self) -> AgentResponse {
        AgentResponse::NotCoordinator {
            coordinator: self.coordinator(),
        }
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
            return self.not_coordinator();
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
        match self.write(cmd).await {
            Ok(a) => AgentResponse::Proposed(Ok(a)),
            Err(WriteError::Refused(e)) => AgentResponse::Proposed(Err(e)),
            Err(WriteError::NotCommitted(_)) => self.not_coordinator(),
        }
    }

    /// Applies `cmd` through this node's Raft (coordinator only): the one place a
    /// `client_write` result is read.
    pub async fn write(&self, cmd: Command) -> Result<Applied, WriteError> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data?),
            Err(e) => Err(WriteError::NotCommitted(e.to_string())),
        }
    }

    async fn remove_member(&self, id: NodeId) -> Result<(), String> {
        let change = self.membership(|m| {
            if m.voter_ids().any(|v| v == id) {
                Some(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            } else if m.learner_ids().any(|l| l == id) {
                Some(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
            } else {
                None
            }
        });
        if let Some(change) = change {
            self.raft
                .change_membership(change, false)
                .await
                .map_err(|e| e.to_string())?;
        }
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
                AgentResponse::NotCoordinator { .. } => match self
                    .call_coordinator(&AgentRequest::Propose(cmd.clone()), self.attempt_timeout)
                    .await
                {
                    Ok(AgentResponse::Proposed(r)) => return Ok(r),
                    Ok(AgentResponse::NotCoordinator { .. }) | Err(CallError::NoCoordinator) => {
                        SubmitError::NoCoordinator
                    }
                    Ok(other) => SubmitError::Unreachable(format!("unexpected answer {other:?}")),
                    Err(e) => SubmitError::Unreachable(e.to_string()),
                },
                other => SubmitError::Unreachable(format!("unexpected answer {other:?}")),
            };
            if tokio::time::Instant::now() + self.retry_pause > deadline {
                return Err(err);
            }
            tokio::time::sleep(self.retry_pause).await;
        }
    }

    /// Sends `req` to the coordinator this agent knows of (never to itself), bounded by
    /// `timeout`: the one way to ask the coordinator something.
    pub async fn call_coordinator(
        &self,
        req: &AgentRequest,
        timeout: Duration,
    ) -> Result<AgentResponse, CallError> {
        let c = self
            .coordinator()
            .filter(|c| c.name != self.me.name)
            .ok_or(CallError::NoCoordinator)?;
        let addr = c
            .socket_addr()
            .ok_or_else(|| CallError::BadAddress(c.name.clone(), c.address.clone()))?;
        self.peers
            .call(&c.name, addr, req, timeout)
            .await
            .map_err(|e| CallError::Unreachable(c.name, e.to_string()))
    }

    /// A copy of the replicated state as this agent has applied it.
    pub fn state_snapshot(&self) -> ClusterState {
        self.read_state(ClusterState::clone)
    }

    /// Reads the replicated state as this agent has applied it, without copying it.
    pub fn read_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.read_locked().state)
    }

    /// The index of the last entry this agent applied.
    pub fn last_applied_index(&self) -> u64 {
        self.state.read_locked().last_applied.map_or(0, |l| l.index)
    }

    /// Reads the Raft membership as this agent knows it.
    pub fn membership<T>(&self, f: impl FnOnce(&openraft::Membership<NodeId, RaftPeer>) -> T) -> T {
        let m = self.raft.metrics().borrow().clone();
        f(m.membership_config.membership())
    }

    /// Reads node `name`'s record in the replicated state.
    fn with_node<T>(
        &self,
        name: &str,
        f: impl FnOnce(&pd_raft::NodeRecord) -> Option<T>,
    ) -> Option<T> {
        self.read_state(|s| s.nodes.get(name).and_then(f))
    }

    /// The transport address of node `name`, from the replicated state.
    pub fn node_address(&self, name: &str) -> Option<SocketAddr> {
        self.with_node(name, |n| n.socket_addr())
    }

    /// Node `name`'s health as the coordinator last recorded it (heartbeats).
    pub fn node_health(&self, name: &str) -> Option<NodeHealth> {
        self.with_node(name, |n| Some(n.health))
    }

    /// This agent's node name.
    pub fn node_name(&self) -> &str {
        &self.me.name
    }

    /// Whether `name` was removed from the cluster (its agent is refused from then on).
    pub fn is_removed(&self, name: &str) -> bool {
        self.read_state(|s| s.is_removed(node_id(name)))
    }

    /// The last entry of this agent's Raft log.
    pub async fn last_log_id(&self) -> Option<openraft::LogId<NodeId>> {
        let mut log = self.log_tip.clone();
        log.get_log_state().await.ok().and_then(|s| s.last_log_id)
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "Raft did not shut down cleanly");
        }
    }
}
