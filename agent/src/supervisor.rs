//! The engine supervisor: every agent makes the engines that the replicated assignments give
//! its node run, and keeps them running.
//!
//! - Start: `pdagent engine serve` as a child process in its own process group (so it
//!   outlives an agent restart), `CUDA_VISIBLE_DEVICES` set to the GPUs' UUIDs, one compute
//!   thread; its socket, log and a record (`<id>.json`: engine, pid, generation, role, model)
//!   under `<data_dir>/engines/`.
//! - Ready: the engine's hello plus a one-token probe, not a bare connect.
//! - Restart on exit with exponential backoff; after `CRASH_LOOP_RESTARTS_MAX` restarts within
//!   `CRASH_LOOP_WINDOW` the engine is `failed` and left alone until its assignment changes.
//! - Stop: when an assignment goes away or changes, `Shutdown`, then SIGKILL after a grace.
//! - Fencing: the highest generation acted on per GPU; an assignment older than that for any
//!   of its GPUs is ignored (`is_fresh`).
//! - Re-adoption: a new agent (after `kill -9` or an upgrade) reads the records, connects to
//!   each live engine's socket and checks its hello (role and model) before adopting it; it
//!   restarts none of them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_engine::protocol::{AgentMessage, EngineMessage, EngineRole as WireRole};
use pd_engine::{Prompt, SamplingParams};
use pd_raft::{Assignment, EngineRole};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::control::ControlPlane;
use crate::engine::client::EngineClient;
use crate::gpus::SharedInventory;

/// Restarts within `CRASH_LOOP_WINDOW` after which an engine is left failed.
pub const CRASH_LOOP_RESTARTS_MAX: usize = 5;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(120);
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Bound on the hello and the one-token probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an engine no longer assigned here may take to finish its running requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the load sample of one engine.
const STATS_TIMEOUT: Duration = Duration::from_millis(500);
/// Grace for an engine told to shut down.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// An engine with no agent connected this long exits by itself: longer than an agent restart.
const ENGINE_ORPHAN_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    Starting,
    Ready,
    Draining,
    Stopped,
    Failed,
}

/// One engine as its agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineReport {
    pub engine: String,
    pub deployment: String,
    pub node: String,
    pub role: EngineRole,
    pub gpus: Vec<u32>,
    pub state: EngineState,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub generation: u64,
    /// Load as the engine last reported it (ready engines only).
    pub load: EngineLoad,
}

/// An engine's load, sampled by its agent every reconcile pass, for routers on every agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineLoad {
    /// Requests waiting for admission.
    pub queued: u32,
    /// Requests admitted (prefilling, decoding or importing).
    pub running: u32,
    /// Share of the KV blocks referenced by live requests, 0..=1.
    pub kv_usage: f32,
}

impl EngineLoad {
    pub fn of(s: &pd_engine::EngineStats) -> Self {
        EngineLoad {
            queued: s.queue_depth as u32,
            running: (s.running + s.importing) as u32,
            kv_usage: if s.kv_blocks_total == 0 {
                0.0
            } else {
                s.kv_blocks_used as f32 / s.kv_blocks_total as f32
            },
        }
    }
}

/// What survives an agent restart, next to the engine's socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    engine: String,
    pid: u32,
    generation: u64,
    role: EngineRole,
    model: String,
    gpus: Vec<u32>,
    deployment: String,
}

struct Managed {
    assignment: Assignment,
    model: String,
    /// Our child, when we started it (not when adopted).
    child: Option<std::process::Child>,
    pid: Option<u32>,
    client: Option<Arc<EngineClient>>,
    state: EngineState,
    restarts: u32,
    recent: Vec<Instant>,
    next_start: Instant,
    load: EngineLoad,
}

/// Whether `a` is at least as new as what was acted on for each of its GPUs.
pub fn is_fresh(a: &Assignment, acted: &HashMap<u32, u64>) -> bool {
    a.gpus
        .iter()
        .all(|g| acted.get(g).is_none_or(|seen| a.generation >= *seen))
}

fn safe_name(engine: &str) -> String {
    engine
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn kill(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn wire_role(r: EngineRole) -> WireRole {
    match r {
        EngineRole::Prefill => WireRole::Prefill,
        EngineRole::Decode => WireRole::Decode,
        EngineRole::Both => WireRole::Both,
    }
}

/// Test-only: when set on the agent, the engines it starts from then on get these
/// `--test-faults` (e.g. `crash_after_tokens=1`).
pub const TEST_ENGINE_FAULTS_ENV: &str = "PDAGENT_TEST_ENGINE_FAULTS";

pub struct Supervisor {
    node: String,
    dir: PathBuf,
    control: Arc<ControlPlane>,
    inventory: Option<SharedInventory>,
    engines: tokio::sync::Mutex<BTreeMap<String, Managed>>,
    acted: std::sync::Mutex<HashMap<u32, u64>>,
    /// Connections to the ready engines, for the serving path (which must not wait for a
    /// reconcile pass holding `engines`).
    ready: std::sync::RwLock<HashMap<String, Arc<EngineClient>>>,
    /// Engines no longer assigned here, finishing their running requests.
    draining: tokio::sync::Mutex<Vec<Managed>>,
}

fn report_of(node: &str, m: &Managed) -> EngineReport {
    EngineReport {
        engine: m.assignment.engine.clone(),
        deployment: m.assignment.deployment.clone(),
        node: node.to_string(),
        role: m.assignment.role,
        gpus: m.assignment.gpus.clone(),
        state: m.state,
        pid: m.pid,
        restarts: m.restarts,
        generation: m.assignment.generation,
        load: m.load,
    }
}

impl Supervisor {
    pub fn new(
        node: &str,
        data_dir: &Path,
        control: Arc<ControlPlane>,
        inventory: Option<SharedInventory>,
    ) -> std::io::Result<Arc<Self>> {
        let dir = data_dir.join("engines");
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(Supervisor {
            node: node.to_string(),
            dir,
            control,
            inventory,
            engines: tokio::sync::Mutex::new(BTreeMap::new()),
            acted: std::sync::Mutex::new(HashMap::new()),
            ready: std::sync::RwLock::new(HashMap::new()),
            draining: tokio::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Publishes what this agent's engines are doing (read by liveness reports without
    /// waiting for a reconcile pass).
    fn publish(&self, engines: &BTreeMap<String, Managed>) {
        self.control
            .set_local_engines(engines.values().map(|m| report_of(&self.node, m)).collect());
        let ready = engines
            .iter()
            .filter(|(_, m)| m.state == EngineState::Ready)
            .filter_map(|(id, m)| m.client.clone().map(|c| (id.clone(), c)))
            .collect();
        *self.ready.write().unwrap_or_else(|p| p.into_inner()) = ready;
    }

    /// The connection to a ready engine of this node.
    pub fn ready_engine(&self, engine: &str) -> Option<Arc<EngineClient>> {
        self.ready
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(engine)
            .filter(|c| c.is_connected())
            .cloned()
    }

    fn paths(&self, engine: &str) -> (PathBuf, PathBuf, PathBuf) {
        let n = safe_name(engine);
        (
            self.dir.join(format!("{n}.sock")),
            self.dir.join(format!("{n}.log")),
            self.dir.join(format!("{n}.json")),
        )
    }

    /// Adopts engines that survived the previous agent: live pid, socket answering a hello
    /// with the recorded role and model.
    pub async fn adopt(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(rec) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<Record>(&t).ok())
            else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let (sock, _, _) = self.paths(&rec.engine);
            let verified = if pid_alive(rec.pid) {
                match EngineClient::connect(&sock, &self.node, Duration::from_secs(5)).await {
                    Ok(c) if c.hello().role == wire_role(rec.role) => Some(c),
                    Ok(c) => {
                        warn!(engine = %rec.engine, role = ?c.hello().role, "engine on the socket is not the recorded one");
                        None
                    }
                    Err(e) => {
                        warn!(engine = %rec.engine, error = %e, "recorded engine does not answer");
                        None
                    }
                }
            } else {
                None
            };
            let Some(client) = verified else {
                if pid_alive(rec.pid) {
                    kill(rec.pid, "KILL");
                }
                let _ = std::fs::remove_file(&path);
                continue;
            };
            info!(engine = %rec.engine, pid = rec.pid, "re-adopted a running engine");
            self.acted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(rec.gpus.iter().map(|g| (*g, rec.generation)));
            self.engines.lock().await.insert(
                rec.engine.clone(),
                Managed {
                    assignment: Assignment {
                        engine: rec.engine.clone(),
                        deployment: rec.deployment.clone(),
                        role: rec.role,
                        node: self.node.clone(),
                        gpus: rec.gpus.clone(),
                        generation: rec.generation,
                    },
                    model: rec.model.clone(),
                    child: None,
                    pid: Some(rec.pid),
                    client: Some(Arc::new(client)),
                    state: EngineState::Ready,
                    restarts: 0,
                    recent: Vec::new(),
                    next_start: Instant::now(),
                    load: EngineLoad::default(),
                },
            );
        }
    }

    /// Reconciles forever, every `interval`.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        self.adopt().await;
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            self.reconcile().await;
        }
    }

    /// One pass: stop what is no longer assigned, start what is, restart what died, probe
    /// what is starting.
    pub async fn reconcile(&self) {
        let state = self.control.state_snapshot();
        let acted = self.acted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let desired: BTreeMap<String, (Assignment, String)> = state
            .assignments
            .values()
            .filter(|a| a.node == self.node)
            .filter(|a| {
                let fresh = is_fresh(a, &acted);
                if !fresh {
                    warn!(engine = %a.engine, generation = a.generation, "ignoring an assignment older than one already acted on");
                }
                fresh
            })
            .filter_map(|a| {
                state
                    .deployments
                    .get(&a.deployment)
                    .map(|d| (a.engine.clone(), (a.clone(), d.model.clone())))
            })
            .collect();
        let mut engines = self.engines.lock().await;
        // Stop engines no longer assigned here (or assigned differently).
        let stale: Vec<String> = engines
            .iter()
            .filter(|(id, m)| {
                desired
                    .get(*id)
                    .is_none_or(|(a, model)| *a != m.assignment || *model != m.model)
            })
            .map(|(id, _)| id.clone())
            .collect();
        // Engines no longer assigned here drain: no new requests (they leave the ready set),
        // those running finish, then they stop (at the latest after `DRAIN_TIMEOUT`).
        {
            let mut draining = self.draining.lock().await;
            for id in stale {
                if let Some(mut m) = engines.remove(&id) {
                    if m.state == EngineState::Ready && m.client.is_some() {
                        info!(engine = %id, "draining engine: running requests finish first");
                        m.state = EngineState::Draining;
                        m.next_start = Instant::now() + DRAIN_TIMEOUT;
                        draining.push(m);
                    } else {
                        self.stop(m).await;
                    }
                }
            }
            let mut still = Vec::new();
            for m in draining.drain(..) {
                let idle = match &m.client {
                    Some(c) if c.is_connected() => {
                        matches!(
                            tokio::time::timeout(STATS_TIMEOUT, c.stats()).await,
                            Ok(Ok(s)) if s.queue_depth == 0 && s.running == 0 && s.importing == 0
                        )
                    }
                    _ => true,
                };
                if idle {
                    self.stop(m).await;
                } else if Instant::now() >= m.next_start {
                    warn!(engine = %m.assignment.engine, timeout_s = DRAIN_TIMEOUT.as_secs(), "engine still busy after the drain timeout: stopping it");
                    self.stop(m).await;
                } else {
                    still.push(m);
                }
            }
            *draining = still;
        }
        // GPUs still held by draining engines: a new engine on them waits for the drain (a
        // flip restarts an engine on its own GPUs).
        let held: std::collections::BTreeSet<u32> = self
            .draining
            .lock()
            .await
            .iter()
            .flat_map(|m| m.assignment.gpus.iter().copied())
            .collect();
        for (id, (a, model)) in &desired {
            if !engines.contains_key(id) {
                self.acted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(a.gpus.iter().map(|g| (*g, a.generation)));
                engines.insert(
                    id.clone(),
                    Managed {
                        assignment: a.clone(),
                        model: model.clone(),
                        child: None,
                        pid: None,
                        client: None,
                        state: EngineState::Starting,
                        restarts: 0,
                        recent: Vec::new(),
                        next_start: Instant::now(),
                        load: EngineLoad::default(),
                    },
                );
            }
        }
        self.publish(&engines);
        let ids: Vec<String> = engines.keys().cloned().collect();
        for id in ids {
            if let Some(m) = engines.get_mut(&id) {
                if m.pid.is_none() && m.assignment.gpus.iter().any(|g| held.contains(g)) {
                    continue;
                }
                self.tend(m).await;
                if m.state == EngineState::Ready
                    && let Some(c) = m.client.clone()
                    && let Ok(Ok(s)) = tokio::time::timeout(STATS_TIMEOUT, c.stats()).await
                {
                    m.load = EngineLoad::of(&s);
                }
            }
            self.publish(&engines);
        }
    }

    /// Moves one engine along: start it, notice it died, probe it.
    async fn tend(&self, m: &mut Managed) {
        if m.state == EngineState::Failed {
            return;
        }
        let alive = match (&mut m.child, m.pid) {
            (Some(child), _) => matches!(child.try_wait(), Ok(None)),
            (None, Some(pid)) => pid_alive(pid),
            (None, None) => false,
        };
        let connected = m.client.as_ref().is_none_or(|c| c.is_connected());
        if m.pid.is_some() && (!alive || !connected) {
            warn!(engine = %m.assignment.engine, pid = ?m.pid, "engine exited");
            if let Some(pid) = m.pid.filter(|_| alive) {
                kill(pid, "KILL");
            }
            if let Some(mut c) = m.child.take() {
                let _ = c.wait();
            }
            m.pid = None;
            m.client = None;
            m.restarts += 1;
            let now = Instant::now();
            m.recent
                .retain(|t| now.duration_since(*t) < CRASH_LOOP_WINDOW);
            m.recent.push(now);
            if m.recent.len() > CRASH_LOOP_RESTARTS_MAX {
                warn!(engine = %m.assignment.engine, restarts = m.restarts, "engine crash-looping: giving up until its assignment changes");
                m.state = EngineState::Failed;
                return;
            }
            let backoff = (RESTART_BACKOFF_MIN * 2u32.pow(m.recent.len() as u32 - 1))
                .min(RESTART_BACKOFF_MAX);
            m.next_start = now + backoff;
            m.state = EngineState::Starting;
        }
        if m.pid.is_none() {
            if Instant::now() < m.next_start {
                return;
            }
            match self.spawn(m) {
                Ok(pid) => {
                    info!(engine = %m.assignment.engine, pid, "engine started");
                    m.pid = Some(pid);
                }
                Err(e) => {
                    warn!(engine = %m.assignment.engine, error = %e, "cannot start the engine");
                    m.next_start = Instant::now() + RESTART_BACKOFF_MAX;
                }
            }
            return;
        }
        if m.state == EngineState::Starting {
            let (sock, _, _) = self.paths(&m.assignment.engine);
            if m.client.is_none() {
                match EngineClient::connect(&sock, &self.node, Duration::from_millis(50)).await {
                    Ok(c) => m.client = Some(Arc::new(c)),
                    Err(_) => return,
                }
            }
            let Some(client) = m.client.clone() else {
                return;
            };
            match probe(&client).await {
                Ok(()) => {
                    info!(engine = %m.assignment.engine, "engine ready");
                    m.state = EngineState::Ready;
                }
                Err(e) => warn!(engine = %m.assignment.engine, error = %e, "engine probe failed"),
            }
        }
    }

    fn spawn(&self, m: &mut Managed) -> std::io::Result<u32> {
        use std::os::unix::process::CommandExt;
        let a = &m.assignment;
        let (sock, log, rec) = self.paths(&a.engine);
        let _ = std::fs::remove_file(&sock);
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["engine", "serve", "--socket"])
            .arg(&sock)
            .args(["--role", &a.role.to_string(), "--model", &m.model])
            .args(["--orphan-timeout-ms", &ENGINE_ORPHAN_TIMEOUT_MS.to_string()]);
        // Test-only: the engine's fault knobs, for fault tests (`pdctl local start
        // --engine-faults`).
        if let Ok(f) = std::env::var(TEST_ENGINE_FAULTS_ENV)
            && !f.is_empty()
        {
            cmd.args(["--test-faults", &f]);
        }
        cmd.env("CUDA_VISIBLE_DEVICES", self.visible_devices(&a.gpus))
            .env("RAYON_NUM_THREADS", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            // Its own process group: the engine outlives an agent restart and is re-adopted.
            .process_group(0);
        let child = cmd.spawn()?;
        let pid = child.id();
        let record = Record {
            engine: a.engine.clone(),
            pid,
            generation: a.generation,
            role: a.role,
            model: m.model.clone(),
            gpus: a.gpus.clone(),
            deployment: a.deployment.clone(),
        };
        crate::enrollment::write_atomic(
            &rec,
            &serde_json::to_string(&record).unwrap_or_default(),
            false,
        )?;
        m.child = Some(child);
        m.client = None;
        Ok(pid)
    }

    /// GPU UUIDs for `CUDA_VISIBLE_DEVICES` (MIG instance UUIDs when MIG is on), indexes when
    /// the inventory does not know them.
    fn visible_devices(&self, gpus: &[u32]) -> String {
        let inv = self
            .inventory
            .as_ref()
            .map(|i| i.lock().unwrap_or_else(|p| p.into_inner()).clone());
        gpus.iter()
            .map(|g| {
                inv.as_ref()
                    .and_then(|inv| inv.gpus.iter().find(|x| x.index == *g))
                    .map(|x| match x.mig.instances.first() {
                        Some(mig) => mig.uuid.clone(),
                        None => x.uuid.clone(),
                    })
                    .unwrap_or_else(|| g.to_string())
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn stop(&self, mut m: Managed) {
        info!(engine = %m.assignment.engine, "stopping engine");
        if let Some(c) = &m.client {
            c.shutdown().await;
        }
        let until = Instant::now() + STOP_GRACE;
        if let Some(pid) = m.pid {
            while pid_alive(pid) && Instant::now() < until {
                if let Some(child) = &mut m.child
                    && !matches!(child.try_wait(), Ok(None))
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if pid_alive(pid) {
                kill(pid, "KILL");
            }
        }
        if let Some(mut c) = m.child.take() {
            let _ = c.wait();
        }
        let (sock, _, rec) = self.paths(&m.assignment.engine);
        let _ = std::fs::remove_file(sock);
        let _ = std::fs::remove_file(rec);
    }
}

/// A one-token request: the engine computes, not just accepts connections.
async fn probe(c: &EngineClient) -> Result<(), String> {
    let id = u64::MAX - 1;
    let prompt = Prompt::Tokens(vec![1]);
    let sampling = SamplingParams {
        max_tokens: 1,
        ..SamplingParams::default()
    };
    // A prefill engine only prefills; the others generate.
    let msg = if c.hello().role == WireRole::Prefill {
        AgentMessage::Prefill {
            id,
            prompt,
            sampling,
        }
    } else {
        AgentMessage::Generate {
            id,
            prompt,
            sampling,
        }
    };
    let mut rx = c.submit(msg).await.map_err(|e| e.to_string())?;
    let until = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some((EngineMessage::Finished { .. }, _, _))) => return Ok(()),
            Ok(Some((EngineMessage::Error { message, .. }, _, _))) => return Err(message),
            Ok(Some(_)) => {}
            Ok(None) => return Err("connection lost".into()),
            Err(_) => return Err("no answer to the probe".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(gpus: &[u32], generation: u64) -> Assignment {
        Assignment {
            engine: "d/prefill-0".into(),
            deployment: "d".into(),
            role: EngineRole::Prefill,
            node: "n".into(),
            gpus: gpus.to_vec(),
            generation,
        }
    }

    /// Fencing: an assignment older than one already acted on for any of its GPUs is ignored.
    #[test]
    fn older_generations_are_ignored() {
        let acted = HashMap::from([(0, 10), (1, 5)]);
        assert!(is_fresh(&a(&[0], 10), &acted));
        assert!(is_fresh(&a(&[0, 1], 12), &acted));
        assert!(!is_fresh(&a(&[0], 9), &acted));
        assert!(!is_fresh(&a(&[1, 0], 7), &acted));
        assert!(is_fresh(&a(&[2], 1), &acted));
    }
}
