//! The engine supervisor: every agent makes the engines that the replicated assignments give
//! its node run, and keeps them running. How one kind of engine runs is its driver's business
//! (`driver`, chosen by the deployment's `engine`); when and where is decided here.
//!
//! - Start: through the driver, with `CUDA_VISIBLE_DEVICES` set to the GPUs' UUIDs; its
//!   socket, log and a record (`<id>.json`: engine, pid, generation, role, model, driver, and
//!   once ready its identity) under `<data_dir>/engines/`.
//! - Ready: the driver's probe (for the builtin engine: the hello plus a one-token request,
//!   not a bare connect).
//! - Restart on exit with exponential backoff; after `CRASH_LOOP_RESTARTS_MAX` restarts within
//!   `CRASH_LOOP_WINDOW` the engine is `failed` and left alone until its assignment changes.
//! - Stop: when an assignment goes away or changes, `Shutdown`, then SIGKILL after a grace.
//! - Fencing: the highest generation acted on per GPU; an assignment older than that for any
//!   of its GPUs is ignored (`is_fresh`).
//! - Re-adoption: a new agent (after `kill -9` or an upgrade) reads the records and has each
//!   engine's driver recover it: alive, answering on its socket as the recorded role, model
//!   and fingerprint; it restarts none of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_raft::{Assignment, ClusterState};
use tracing::{info, warn};

use crate::driver::{Driver, EngineSpec, HttpEngine, Probe, Task, TaskRecord};
use crate::engine::client::EngineClient;
use crate::gpus::SharedInventory;
use crate::util::{Unpoisoned, UnpoisonedRw};
use crate::wire::{EngineLoad, EngineReport, EngineState};

/// Restarts within `CRASH_LOOP_WINDOW` after which an engine is left failed.
pub const CRASH_LOOP_RESTARTS_MAX: usize = 5;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(120);
/// Bound on the load sample of one engine.
const STATS_TIMEOUT: Duration = Duration::from_millis(500);

/// The supervisor's waits, settable so that its tests need no sleeps.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Restart backoff: doubles from `backoff_min` per recent restart, up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest an engine no longer assigned here may take to finish its running requests.
    pub drain_timeout: Duration,
    /// Grace for an engine told to stop before it is killed.
    pub stop_grace: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// Where the supervisor takes its orders from and reports to: the control plane, or a test.
pub trait Orders: Send + Sync {
    /// The replicated state as this agent has applied it.
    fn state(&self) -> ClusterState;
    /// What this agent's engines are doing now (for liveness reports and `GET /v1/engines`).
    fn publish(&self, engines: Vec<EngineReport>);
}

struct Managed {
    spec: EngineSpec,
    assignment: Assignment,
    /// The driver's name, from the deployment.
    driver: String,
    task: Option<Task>,
    state: EngineState,
    restarts: u32,
    recent: Vec<Instant>,
    next_start: Instant,
    load: EngineLoad,
    /// When it entered its state (starting: when the process started).
    since: Instant,
    /// Why it last exited or failed, with its log's tail.
    note: String,
}

impl Managed {
    fn new(spec: EngineSpec, assignment: Assignment, driver: String, state: EngineState) -> Self {
        Managed {
            spec,
            assignment,
            driver,
            task: None,
            state,
            restarts: 0,
            recent: Vec::new(),
            next_start: Instant::now(),
            load: EngineLoad::default(),
            since: Instant::now(),
            note: String::new(),
        }
    }

    fn ready_handle(&self) -> Option<ReadyEngine> {
        let t = self.task.as_ref()?;
        match (&t.client, &t.http) {
            (Some(c), _) => Some(ReadyEngine::Builtin(c.clone())),
            (None, Some(h)) => Some(ReadyEngine::Http(h.clone())),
            _ => None,
        }
    }

    fn set_state(&mut self, state: EngineState) {
        if self.state != state {
            self.state = state;
            self.since = Instant::now();
        }
    }
}

/// How the serving path reaches a ready engine of this node.
#[derive(Clone)]
pub enum ReadyEngine {
    /// The reference engine's protocol connection.
    Builtin(Arc<EngineClient>),
    /// An engine's HTTP server on 127.0.0.1.
    Http(Arc<HttpEngine>),
}

/// The last `lines` non-empty lines of a log file (its last 64 KiB read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text
        .split(['\n', '\r'])
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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

/// Test-only: see `driver::builtin::TEST_ENGINE_FAULTS_ENV`.
pub use crate::driver::builtin::TEST_ENGINE_FAULTS_ENV;

pub struct Supervisor {
    node: String,
    /// Where relative model names are (`node.models_dir`).
    models_dir: PathBuf,
    dir: PathBuf,
    orders: Arc<dyn Orders>,
    inventory: Option<SharedInventory>,
    drivers: BTreeMap<&'static str, Arc<dyn Driver>>,
    timings: Timings,
    engines: tokio::sync::Mutex<BTreeMap<String, Managed>>,
    acted: std::sync::Mutex<HashMap<u32, u64>>,
    /// How to reach the ready engines, for the serving path (which must not wait for a
    /// reconcile pass holding `engines`).
    ready: std::sync::RwLock<HashMap<String, ReadyEngine>>,
    /// Engines no longer assigned here, finishing their running requests.
    draining: tokio::sync::Mutex<Vec<Managed>>,
    /// The latest stats of each ready engine (load, step times), sampled every pass.
    stats: std::sync::RwLock<HashMap<String, pd_engine::EngineStats>>,
    /// KV bytes each ready engine moved itself (vLLM's NIXL counter), sampled every pass.
    kv_moved: std::sync::RwLock<HashMap<String, u64>>,
}

fn report_of(node: &str, m: &Managed) -> EngineReport {
    let http = m.task.as_ref().and_then(|t| t.http.as_ref());
    let note = match m.state {
        EngineState::Starting | EngineState::Failed => m.note.clone(),
        _ => String::new(),
    };
    EngineReport {
        driver: m.driver.clone(),
        state_ms: m.since.elapsed().as_millis() as u64,
        note,
        port: http.map(|h| h.port),
        kv_port: http.and_then(|h| h.kv_port),
        engine: m.assignment.engine.clone(),
        deployment: m.assignment.deployment.clone(),
        node: node.to_string(),
        role: m.assignment.role,
        gpus: m.assignment.gpus.clone(),
        state: m.state,
        pid: m.task.as_ref().map(|t| t.pid),
        restarts: m.restarts,
        generation: m.assignment.generation,
        load: m.load,
    }
}

impl Supervisor {
    /// The agent's supervisor: the builtin driver and `others`, default timings.
    pub fn new(
        node: &str,
        data_dir: &Path,
        models_dir: &Path,
        orders: Arc<dyn Orders>,
        inventory: Option<SharedInventory>,
        others: Vec<Arc<dyn Driver>>,
    ) -> std::io::Result<Arc<Self>> {
        let mut drivers: Vec<Arc<dyn Driver>> =
            vec![Arc::new(crate::driver::builtin::Builtin::new(node))];
        drivers.extend(others);
        Self::with_drivers(
            node,
            data_dir,
            models_dir,
            orders,
            inventory,
            drivers,
            Timings::default(),
        )
    }

    /// A supervisor with these drivers (by their names) and timings.
    pub fn with_drivers(
        node: &str,
        data_dir: &Path,
        models_dir: &Path,
        orders: Arc<dyn Orders>,
        inventory: Option<SharedInventory>,
        drivers: Vec<Arc<dyn Driver>>,
        timings: Timings,
    ) -> std::io::Result<Arc<Self>> {
        let dir = data_dir.join("engines");
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(Supervisor {
            node: node.to_string(),
            models_dir: models_dir.to_path_buf(),
            dir,
            orders,
            inventory,
            drivers: drivers.into_iter().map(|d| (d.name(), d)).collect(),
            timings,
            engines: tokio::sync::Mutex::new(BTreeMap::new()),
            acted: std::sync::Mutex::new(HashMap::new()),
            ready: std::sync::RwLock::new(HashMap::new()),
            draining: tokio::sync::Mutex::new(Vec::new()),
            stats: std::sync::RwLock::new(HashMap::new()),
            kv_moved: std::sync::RwLock::new(HashMap::new()),
        }))
    }

    /// Publishes what this agent's engines are doing (read by liveness reports without
    /// waiting for a reconcile pass).
    fn publish(&self, engines: &BTreeMap<String, Managed>) {
        self.orders
            .publish(engines.values().map(|m| report_of(&self.node, m)).collect());
        let ready = engines
            .iter()
            .filter(|(_, m)| m.state == EngineState::Ready)
            .filter_map(|(id, m)| m.ready_handle().map(|c| (id.clone(), c)))
            .collect();
        *self.ready.write_locked() = ready;
    }

    /// How to reach a ready engine of this node.
    pub fn ready(&self, engine: &str) -> Option<ReadyEngine> {
        self.ready
            .read_locked()
            .get(engine)
            .filter(|c| match c {
                ReadyEngine::Builtin(c) => c.is_connected(),
                ReadyEngine::Http(_) => true,
            })
            .cloned()
    }

    /// The connection to a ready builtin engine of this node.
    pub fn ready_engine(&self, engine: &str) -> Option<Arc<EngineClient>> {
        match self.ready(engine)? {
            ReadyEngine::Builtin(c) => Some(c),
            ReadyEngine::Http(_) => None,
        }
    }

    fn paths(&self, engine: &str) -> (PathBuf, PathBuf, PathBuf) {
        let n = safe_name(engine);
        (
            self.dir.join(format!("{n}.sock")),
            self.dir.join(format!("{n}.log")),
            self.dir.join(format!("{n}.json")),
        )
    }

    fn spec(&self, a: &Assignment, model: &str, engine_args: &[String]) -> EngineSpec {
        let (socket, log, _) = self.paths(&a.engine);
        EngineSpec {
            engine: a.engine.clone(),
            deployment: a.deployment.clone(),
            role: a.role,
            model: crate::models::resolve(&self.models_dir, model),
            gpus: a.gpus.clone(),
            generation: a.generation,
            visible_devices: self.visible_devices(&a.gpus),
            socket,
            log,
            engine_args: engine_args.to_vec(),
        }
    }

    fn write_record(&self, m: &Managed) -> std::io::Result<()> {
        let Some(task) = &m.task else {
            return Ok(());
        };
        let record = TaskRecord {
            engine: m.spec.engine.clone(),
            pid: task.pid,
            generation: m.spec.generation,
            role: m.spec.role,
            model: m.spec.model.clone(),
            gpus: m.spec.gpus.clone(),
            deployment: m.spec.deployment.clone(),
            driver: m.driver.clone(),
            identity: task.identity.clone(),
            port: task.http.as_ref().map(|h| h.port),
            kv_port: task.http.as_ref().and_then(|h| h.kv_port),
            kv_transport: task
                .http
                .as_ref()
                .map_or(crate::driver::KvTransport::Nixl, |h| h.kv_transport),
        };
        let (_, _, path) = self.paths(&m.spec.engine);
        crate::util::write_atomic(
            &path,
            &serde_json::to_string(&record).unwrap_or_default(),
            false,
        )
    }

    /// Re-adopts engines that survived the previous agent: each one's driver recovers it from
    /// its record, verifying it over its socket; those that fail the check are stopped.
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
                .and_then(|t| serde_json::from_str::<TaskRecord>(&t).ok())
            else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let Some(driver) = self.drivers.get(rec.driver.as_str()).cloned() else {
                warn!(engine = %rec.engine, driver = %rec.driver, "recorded engine of an unknown driver: left alone");
                continue;
            };
            let assignment = Assignment {
                engine: rec.engine.clone(),
                deployment: rec.deployment.clone(),
                role: rec.role,
                node: self.node.clone(),
                gpus: rec.gpus.clone(),
                generation: rec.generation,
            };
            let args = self
                .orders
                .state()
                .engine_args
                .get(&rec.deployment)
                .cloned()
                .unwrap_or_default();
            let spec = self.spec(&assignment, &rec.model, &args);
            let task = match driver.recover(&spec, &rec).await {
                Ok(t) => t,
                Err(why) => {
                    warn!(engine = %rec.engine, pid = rec.pid, %why, "recorded engine not re-adopted");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            info!(engine = %rec.engine, pid = rec.pid, "re-adopted a running engine");
            self.acted
                .locked()
                .extend(rec.gpus.iter().map(|g| (*g, rec.generation)));
            let mut m = Managed::new(spec, assignment, rec.driver.clone(), EngineState::Ready);
            m.task = Some(task);
            self.engines.lock().await.insert(rec.engine.clone(), m);
        }
    }

    /// Reconciles forever, every `interval`, and at once when `kick` is notified (a
    /// coordinator's `Reconcile` directive).
    pub async fn run(self: Arc<Self>, interval: Duration, kick: Arc<tokio::sync::Notify>) {
        self.adopt().await;
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = kick.notified() => {}
            }
            self.reconcile().await;
        }
    }

    /// One pass: stop what is no longer assigned, start what is, restart what died, probe
    /// what is starting.
    pub async fn reconcile(&self) {
        let state = self.orders.state();
        let acted = self.acted.locked().clone();
        // Engine id -> (assignment, model, driver).
        let desired: BTreeMap<String, (Assignment, String, String)> = state
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
                state.deployments.get(&a.deployment).map(|d| {
                    (
                        a.engine.clone(),
                        (a.clone(), d.model.clone(), d.engine.clone()),
                    )
                })
            })
            .collect();
        let mut engines = self.engines.lock().await;
        // Stop engines no longer assigned here (or assigned differently).
        let stale: Vec<String> = engines
            .iter()
            .filter(|(id, m)| {
                desired.get(*id).is_none_or(|(a, model, driver)| {
                    *a != m.assignment
                        || crate::models::resolve(&self.models_dir, model) != m.spec.model
                        || *driver != m.driver
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        // Engines no longer assigned here drain: no new requests (they leave the ready set),
        // those running finish, then they stop (at the latest after the drain timeout).
        {
            let mut draining = self.draining.lock().await;
            for id in stale {
                if let Some(mut m) = engines.remove(&id) {
                    if m.state == EngineState::Ready && m.task.is_some() {
                        info!(engine = %id, "draining engine: running requests finish first");
                        m.set_state(EngineState::Draining);
                        m.next_start = Instant::now() + self.timings.drain_timeout;
                        draining.push(m);
                    } else {
                        self.stop(m).await;
                    }
                }
            }
            let mut still = Vec::new();
            for mut m in draining.drain(..) {
                // Idle: gone, or nothing queued or running. Silent but alive: still busy.
                let idle = match (m.task.as_mut(), self.drivers.get(m.driver.as_str())) {
                    (Some(t), Some(d)) => {
                        d.wait(t).is_some()
                            || matches!(
                                d.stats(t, STATS_TIMEOUT).await,
                                Some(s) if s.queue_depth == 0 && s.running == 0 && s.importing == 0
                            )
                    }
                    _ => true,
                };
                if idle {
                    self.stop(m).await;
                } else if Instant::now() >= m.next_start {
                    warn!(engine = %m.assignment.engine, timeout_s = self.timings.drain_timeout.as_secs(), "engine still busy after the drain timeout: stopping it");
                    self.stop(m).await;
                } else {
                    still.push(m);
                }
            }
            *draining = still;
        }
        // GPUs still held by draining engines: a new engine on them waits for the drain (a
        // flip restarts an engine on its own GPUs).
        let held: BTreeSet<u32> = self
            .draining
            .lock()
            .await
            .iter()
            .flat_map(|m| m.assignment.gpus.iter().copied())
            .collect();
        for (id, (a, model, driver)) in &desired {
            if !engines.contains_key(id) {
                self.acted
                    .locked()
                    .extend(a.gpus.iter().map(|g| (*g, a.generation)));
                let args = state
                    .engine_args
                    .get(&a.deployment)
                    .cloned()
                    .unwrap_or_default();
                engines.insert(
                    id.clone(),
                    Managed::new(
                        self.spec(a, model, &args),
                        a.clone(),
                        driver.clone(),
                        EngineState::Starting,
                    ),
                );
            }
        }
        self.publish(&engines);
        let ids: Vec<String> = engines.keys().cloned().collect();
        for id in ids {
            if let Some(m) = engines.get_mut(&id) {
                if m.task.is_none() && m.assignment.gpus.iter().any(|g| held.contains(g)) {
                    continue;
                }
                self.tend(m).await;
                if m.state == EngineState::Ready
                    && let (Some(t), Some(d)) = (&m.task, self.drivers.get(m.driver.as_str()))
                    && let Some(s) = d.stats(t, STATS_TIMEOUT).await
                {
                    m.load = load_of(&s);
                    let moved = t.kv_bytes_moved.load(std::sync::atomic::Ordering::Relaxed);
                    if moved > 0 {
                        self.kv_moved.write_locked().insert(id.clone(), moved);
                    }
                    self.stats.write_locked().insert(id.clone(), s);
                }
            }
            self.publish(&engines);
        }
        let ready = |id: &String| {
            engines
                .get(id)
                .is_some_and(|m| m.state == EngineState::Ready)
        };
        self.stats.write_locked().retain(|id, _| ready(id));
        self.kv_moved.write_locked().retain(|id, _| ready(id));
    }

    /// KV bytes this node's engines moved themselves (vLLM's NIXL counter, since each one
    /// started), by engine id.
    pub fn engine_kv_moved(&self) -> HashMap<String, u64> {
        self.kv_moved.read_locked().clone()
    }

    /// The latest stats of this node's ready engines, by engine id.
    pub fn engine_stats(&self) -> HashMap<String, pd_engine::EngineStats> {
        self.stats.read_locked().clone()
    }

    /// Moves one engine along: start it, notice it died, probe it.
    async fn tend(&self, m: &mut Managed) {
        if m.state == EngineState::Failed {
            return;
        }
        let Some(driver) = self.drivers.get(m.driver.as_str()).cloned() else {
            warn!(engine = %m.assignment.engine, driver = %m.driver, "no such engine driver on this agent");
            m.note = format!("no driver {:?} on this agent", m.driver);
            m.set_state(EngineState::Failed);
            return;
        };
        let mut exited = m.task.as_mut().and_then(|t| driver.wait(t));
        if exited.is_none()
            && m.state == EngineState::Starting
            && m.task.is_some()
            && let Some(limit) = driver.start_timeout()
            && m.since.elapsed() > limit
        {
            exited = Some(format!("not ready within {} s", limit.as_secs()));
        }
        if let Some(why) = exited {
            warn!(engine = %m.assignment.engine, pid = ?m.task.as_ref().map(|t| t.pid), %why, "engine exited");
            let tail = log_tail(&m.spec.log, 5);
            m.note = if tail.is_empty() {
                why.clone()
            } else {
                format!("{why}; its log ends:\n{tail}")
            };
            if let Some(task) = m.task.take() {
                // Make sure of it (an engine that closed its socket may still run).
                driver.stop(task, Duration::ZERO).await;
            }
            m.restarts += 1;
            let now = Instant::now();
            m.recent
                .retain(|t| now.duration_since(*t) < CRASH_LOOP_WINDOW);
            m.recent.push(now);
            if m.recent.len() > CRASH_LOOP_RESTARTS_MAX {
                warn!(engine = %m.assignment.engine, restarts = m.restarts, "engine crash-looping: giving up until its assignment changes");
                m.set_state(EngineState::Failed);
                return;
            }
            let backoff = (self.timings.backoff_min * 2u32.pow(m.recent.len() as u32 - 1))
                .min(self.timings.backoff_max);
            m.next_start = now + backoff;
            m.set_state(EngineState::Starting);
        }
        let Some(task) = m.task.as_mut() else {
            if Instant::now() < m.next_start {
                return;
            }
            match driver.start(&m.spec) {
                Ok(task) => {
                    info!(engine = %m.assignment.engine, pid = task.pid, driver = driver.name(), "engine started");
                    m.task = Some(task);
                    m.since = Instant::now();
                    if let Err(e) = self.write_record(m) {
                        warn!(engine = %m.assignment.engine, error = %e, "cannot record the engine");
                    }
                }
                Err(e) => {
                    warn!(engine = %m.assignment.engine, error = %e, "cannot start the engine");
                    m.note = format!("cannot start: {e}");
                    // Start failures count as crashes: a command that cannot run ends failed,
                    // not in an endless loop.
                    let now = Instant::now();
                    m.recent
                        .retain(|t| now.duration_since(*t) < CRASH_LOOP_WINDOW);
                    m.recent.push(now);
                    if m.recent.len() > CRASH_LOOP_RESTARTS_MAX {
                        warn!(engine = %m.assignment.engine, "engine cannot be started: giving up until its assignment changes");
                        m.set_state(EngineState::Failed);
                        return;
                    }
                    m.next_start = now + self.timings.backoff_max;
                }
            }
            return;
        };
        if m.state == EngineState::Starting {
            // What it is doing while it loads: its log's last line, read once a pass.
            m.note = log_tail(&m.spec.log, 1);
            match driver.probe(&m.spec, task).await {
                Probe::Ready => {
                    info!(engine = %m.assignment.engine, elapsed_ms = m.since.elapsed().as_millis() as u64, "engine ready");
                    m.set_state(EngineState::Ready);
                    m.note.clear();
                    if let Err(e) = self.write_record(m) {
                        warn!(engine = %m.assignment.engine, error = %e, "cannot record the engine");
                    }
                }
                Probe::NotYet => {}
                Probe::Failed(e) => {
                    warn!(engine = %m.assignment.engine, error = %e, "engine probe failed")
                }
            }
        }
    }

    /// GPU UUIDs for `CUDA_VISIBLE_DEVICES` (MIG instance UUIDs when MIG is on), indexes when
    /// the inventory does not know them.
    fn visible_devices(&self, gpus: &[u32]) -> String {
        let inv = self.inventory.as_ref().map(|i| i.locked().clone());
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

    async fn stop(&self, m: Managed) {
        info!(engine = %m.assignment.engine, "stopping engine");
        if let (Some(task), Some(d)) = (m.task, self.drivers.get(m.driver.as_str())) {
            d.stop(task, self.timings.stop_grace).await;
        }
        let (sock, _, rec) = self.paths(&m.assignment.engine);
        let _ = std::fs::remove_file(sock);
        let _ = std::fs::remove_file(rec);
    }
}

/// An engine's load from its own counters.
fn load_of(s: &pd_engine::EngineStats) -> EngineLoad {
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

#[cfg(test)]
mod tests;
