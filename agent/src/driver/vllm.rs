//! The `vllm` driver: vLLM's OpenAI server as a child process in its own process group,
//! reached only through its agent (HTTP on 127.0.0.1). Its KV goes from prefill to decode
//! engine one of two ways (the deployment's `--kv-transport`, carried with its engine
//! arguments as `--kv-transport=agent|nixl`; `agent` when not given):
//! - `agent`: pdagent's own KV connector (`python/pdagent_vllm`, embedded in this binary and
//!   written under `<data_dir>/python` at start) hands each layer's KV to this agent over
//!   `<data_dir>/kv.sock` (`kv::bridge`), which ships it over QUIC with mutual TLS;
//! - `nixl`: vLLM's NixlConnector, the decode engine pulling the KV itself.
//!
//! - start: the model folder, `--served-model-name` (the deployment), `--host 127.0.0.1` and a
//!   port from `drivers.vllm.port_range`, `--tensor-parallel-size`, for prefill and decode
//!   engines `--kv-transfer-config` (pdagent's connector with this agent's socket, or
//!   NixlConnector with the NIXL side channel on the node's address and a port of its own;
//!   `kv_producer` or `kv_consumer`), the air-gapped environment, then the deployment's own
//!   engine arguments (those the driver owns are refused);
//! - probe: `/health` answers 200 and `/v1/models` lists the served name;
//! - stats: the engine's `/metrics` (renamed metrics across versions tolerated);
//! - stop: SIGTERM to the group, the grace, SIGKILL;
//! - recover: pid alive, and `/v1/models` on the recorded port names the recorded model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pd_raft::EngineRole;

use super::http;
use super::{
    BoxFuture, Capabilities, Driver, EngineSpec, HttpEngine, Identity, KvPath, KvTransport, Probe,
    Task, TaskRecord,
};
use crate::config::VllmSection;
use crate::util::Unpoisoned;

pub const NAME: &str = "vllm";
pub const CAPABILITIES: Capabilities = Capabilities {
    kv: KvPath::Engine,
    // A replayed stream continues validly (greedy: the same text), not bit for bit.
    exact_replay: false,
    resume: true,
};

/// Flags the driver sets itself: a deployment's `--engine-arg` may not.
pub const OWNED_FLAGS: &[&str] = &[
    "--served-model-name",
    "--host",
    "--port",
    "--tensor-parallel-size",
    "-tp",
    "--kv-transfer-config",
    "--model",
    "--uds",
    "--data-parallel-size",
    "-dp",
    "--api-key",
];

/// Bound on one readiness or identity request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver's own argument among a deployment's engine arguments: how the KV travels.
pub const KV_TRANSPORT_ARG: &str = "--kv-transport";

/// The connector package, embedded so that the agent and its connector always match.
const CONNECTOR_FILES: &[(&str, &str)] = &[
    (
        "__init__.py",
        include_str!("../../../python/pdagent_vllm/__init__.py"),
    ),
    (
        "connector.py",
        include_str!("../../../python/pdagent_vllm/connector.py"),
    ),
];

/// The class and module vLLM loads for `--kv-transport agent`.
pub const CONNECTOR_CLASS: &str = "PdagentConnector";
pub const CONNECTOR_MODULE: &str = "pdagent_vllm.connector";

/// The KV transport a deployment's engine arguments name, and the arguments for vLLM (without
/// it).
pub fn split_kv_transport(args: &[String]) -> Result<(KvTransport, Vec<String>), String> {
    let mut transport = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == KV_TRANSPORT_ARG {
            it.next().cloned().unwrap_or_default()
        } else if let Some(v) = a.strip_prefix("--kv-transport=") {
            v.to_string()
        } else {
            rest.push(a.clone());
            continue;
        };
        let t = KvTransport::parse(&value)
            .ok_or_else(|| format!("--kv-transport {value:?}: agent or nixl"))?;
        if transport.replace(t).is_some_and(|was| was != t) {
            return Err("--kv-transport given twice, differently".into());
        }
    }
    Ok((transport.unwrap_or_default(), rest))
}

/// A deployment's engine arguments with its KV transport written in: `asked` (from `pdctl
/// deploy --kv-transport`) when given, else the one the arguments already name, else
/// `default`. Refused when `asked` is not a transport or contradicts the arguments.
pub fn with_kv_transport(
    args: &[String],
    asked: Option<&str>,
    default: KvTransport,
) -> Result<Vec<String>, String> {
    let asked = match asked {
        Some(a) => Some(
            KvTransport::parse(a).ok_or_else(|| format!("--kv-transport {a:?}: agent or nixl"))?,
        ),
        None => None,
    };
    let named = args
        .iter()
        .any(|a| a == KV_TRANSPORT_ARG || a.starts_with("--kv-transport="));
    let (given, rest) = split_kv_transport(args)?;
    let transport = match (asked, named) {
        (Some(a), true) if a != given => {
            return Err(format!(
                "--kv-transport {} contradicts the engine argument --kv-transport={}",
                a.as_str(),
                given.as_str()
            ));
        }
        (Some(a), _) => a,
        (None, true) => given,
        (None, false) => default,
    };
    let mut out = rest;
    out.push(format!("{KV_TRANSPORT_ARG}={}", transport.as_str()));
    Ok(out)
}

/// Where both transports work (KV staged in host memory) pdagent's own is the default; on GPU
/// hosts, whose KV the connector does not read yet, NIXL.
pub fn default_kv_transport(cfg: &VllmSection) -> KvTransport {
    if cfg.kv_buffer_device == "cpu" {
        KvTransport::Agent
    } else {
        KvTransport::Nixl
    }
}

/// Checks a deployment's engine arguments: none may set what the driver owns.
pub fn check_engine_args(args: &[String]) -> Result<(), String> {
    let (_, args) = split_kv_transport(args)?;
    let args = &args;
    for a in args {
        let flag = a.split('=').next().unwrap_or(a);
        if OWNED_FLAGS.contains(&flag) {
            return Err(format!(
                "engine argument {a:?}: the vllm driver sets {flag} itself (owned: {})",
                OWNED_FLAGS.join(", ")
            ));
        }
        if !a.starts_with('-') && !args.iter().any(|x| x.starts_with('-')) {
            return Err(format!(
                "engine argument {a:?}: the model is the deployment's --model; give flags"
            ));
        }
    }
    Ok(())
}

pub struct Vllm {
    cfg: VllmSection,
    /// The address other hosts reach this one on (NIXL's side channel listens there).
    host_ip: String,
    /// This agent's KV socket (`kv::bridge`), for pdagent's connector.
    kv_socket: PathBuf,
    /// Where the connector package was written (on vLLM's `PYTHONPATH`).
    python_dir: PathBuf,
    ports: std::ops::RangeInclusive<u16>,
    /// Ports held by this driver's engines.
    taken: Mutex<BTreeSet<u16>>,
}

fn kill_group(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stderr(std::process::Stdio::null())
        .status();
}

impl Vllm {
    /// The driver; writes the connector package under `data_dir/python`.
    pub fn new(
        cfg: VllmSection,
        host_ip: String,
        data_dir: &Path,
        kv_socket: PathBuf,
    ) -> Result<Self, String> {
        let ports = cfg.ports().map_err(|e| e.to_string())?;
        let python_dir = data_dir.join("python");
        let package = python_dir.join("pdagent_vllm");
        std::fs::create_dir_all(&package).map_err(|e| format!("{}: {e}", package.display()))?;
        for (name, text) in CONNECTOR_FILES {
            let path = package.join(name);
            crate::util::write_atomic(&path, text, false)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(Vllm {
            cfg,
            host_ip,
            kv_socket,
            python_dir,
            ports,
            taken: Mutex::new(BTreeSet::new()),
        })
    }

    /// `n` consecutive free ports (bindable now, held by no engine of this driver).
    fn take_ports(&self, n: u16) -> Result<u16, String> {
        let mut taken = self.taken.locked();
        let (lo, hi) = (*self.ports.start(), *self.ports.end());
        let mut base = lo;
        while base.checked_add(n - 1).is_some_and(|top| top <= hi) {
            let free = (base..base + n).all(|p| {
                !taken.contains(&p)
                    && std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
                    && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            });
            if free {
                taken.extend(base..base + n);
                return Ok(base);
            }
            base += 1;
        }
        Err(format!(
            "no {n} free ports left in drivers.vllm.port_range {}",
            self.cfg.port_range
        ))
    }

    fn release(&self, e: &HttpEngine) {
        let mut taken = self.taken.locked();
        taken.remove(&e.port);
        if let Some(k) = e.kv_port {
            for p in k..k.saturating_add(e.kv_ports) {
                taken.remove(&p);
            }
        }
    }

    fn argv(&self, spec: &EngineSpec, port: u16, transport: KvTransport) -> Vec<String> {
        let (_, engine_args) = split_kv_transport(&spec.engine_args).unwrap_or_default();
        let mut argv = self.cfg.command.clone();
        // `--model`, not the positional form: `python -m vllm.entrypoints.openai.api_server`
        // ignores a positional model.
        for (k, v) in [
            ("--model", spec.model.clone()),
            ("--served-model-name", spec.deployment.clone()),
            ("--host", "127.0.0.1".to_string()),
            ("--port", port.to_string()),
            ("--tensor-parallel-size", spec.gpus.len().max(1).to_string()),
        ] {
            argv.push(k.to_string());
            argv.push(v);
        }
        if let Some(role) = kv_role(spec.role) {
            let config = match transport {
                KvTransport::Nixl => serde_json::json!({
                    "kv_connector": "NixlConnector",
                    "kv_role": role,
                    "kv_buffer_device": self.cfg.kv_buffer_device,
                    "kv_connector_extra_config": {"kv_lease_duration": self.cfg.kv_lease_s},
                }),
                KvTransport::Agent => serde_json::json!({
                    "kv_connector": CONNECTOR_CLASS,
                    "kv_connector_module_path": CONNECTOR_MODULE,
                    "kv_role": role,
                    // A shipment that did not arrive whole: the decode engine computes the
                    // prompt itself, never decoding from KV it did not get.
                    "kv_load_failure_policy": "recompute",
                    "kv_connector_extra_config": {
                        "socket": self.kv_socket.display().to_string(),
                        "engine": spec.engine,
                        "fingerprint": format!("{:016x}", folder_fingerprint(&spec.model)),
                    },
                }),
            };
            argv.push("--kv-transfer-config".into());
            argv.push(config.to_string());
        }
        argv.extend(engine_args);
        argv
    }
}

/// NIXL's role for an engine: none for a colocated one.
fn kv_role(role: EngineRole) -> Option<&'static str> {
    match role {
        EngineRole::Prefill => Some("kv_producer"),
        EngineRole::Decode => Some("kv_consumer"),
        EngineRole::Both => None,
    }
}

/// The fingerprint (hex) of a model folder as a number; 0 when it cannot be read.
fn folder_fingerprint(model: &str) -> u64 {
    crate::models::fingerprint(std::path::Path::new(model))
        .ok()
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or(0)
}

/// Whether `/v1/models` on `port` serves `name` from `root`: (served, the root it names).
async fn serves(port: u16, name: &str) -> Result<Option<String>, String> {
    let a = http::get(port, "/v1/models", PROBE_TIMEOUT).await?;
    if a.status != 200 {
        return Err(format!("/v1/models answered {}: {}", a.status, a.text()));
    }
    let v = a.json()?;
    Ok(v["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == name))
        .map(|m| m["root"].as_str().unwrap_or_default().to_string()))
}

impl Driver for Vllm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn start_timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.cfg.start_timeout_ms))
    }

    fn start(&self, spec: &EngineSpec) -> Result<Task, String> {
        use std::os::unix::process::CommandExt;
        check_engine_args(&spec.engine_args)?;
        if crate::models::is_preset(&spec.model) {
            return Err(format!(
                "model {:?} is a builtin preset; vLLM needs a model folder (pdagent engine export --model {} --out DIR)",
                spec.model, spec.model
            ));
        }
        let (transport, _) = split_kv_transport(&spec.engine_args)?;
        let port = self.take_ports(1)?;
        // One NIXL side-channel listener per engine serves all its TP ranks.
        let kv_port = match kv_role(spec.role).filter(|_| transport == KvTransport::Nixl) {
            Some(_) => match self.take_ports(1) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.taken.locked().remove(&port);
                    return Err(e);
                }
            },
            None => None,
        };
        let engine = HttpEngine {
            port,
            kv_transport: transport,
            tp: spec.gpus.len().max(1) as u32,
            kv_port,
            kv_ports: u16::from(kv_port.is_some()),
            served_name: spec.deployment.clone(),
        };
        let fail = |e: String| {
            self.release(&engine);
            Err(e)
        };
        let log = match std::fs::File::create(&spec.log) {
            Ok(f) => f,
            Err(e) => return fail(format!("{}: {e}", spec.log.display())),
        };
        let err_log = match log.try_clone() {
            Ok(f) => f,
            Err(e) => return fail(format!("{}: {e}", spec.log.display())),
        };
        let argv = self.argv(spec, port, transport);
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("CUDA_VISIBLE_DEVICES", &spec.visible_devices)
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .env("VLLM_NIXL_SIDE_CHANNEL_HOST", &self.host_ip)
            .env("PYTHONUNBUFFERED", "1");
        if let Some(k) = kv_port {
            cmd.env("VLLM_NIXL_SIDE_CHANNEL_PORT", k.to_string());
        }
        // The connector package first, then whatever the configuration puts there.
        let mut pythonpath = self.python_dir.display().to_string();
        if let Some(p) = self
            .cfg
            .env
            .get("PYTHONPATH")
            .cloned()
            .or_else(|| std::env::var("PYTHONPATH").ok())
            .filter(|p| !p.is_empty())
        {
            pythonpath = format!("{pythonpath}:{p}");
        }
        cmd.envs(&self.cfg.env)
            .env("PYTHONPATH", pythonpath)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group: it outlives an agent restart, and stops whole.
            .process_group(0);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return fail(format!(
                    "cannot run {:?} (drivers.vllm.command): {e}",
                    argv[0]
                ));
            }
        };
        let mut task = Task::new(child.id());
        task.child = Some(child);
        task.identity = Some(Identity {
            model_name: spec.deployment.clone(),
            model_fingerprint: folder_fingerprint(&spec.model),
        });
        task.http = Some(Arc::new(engine));
        Ok(task)
    }

    fn wait(&self, task: &mut Task) -> Option<String> {
        let status = match &mut task.child {
            Some(child) => match child.try_wait() {
                Ok(None) => return None,
                Ok(Some(s)) => s.to_string(),
                Err(e) => e.to_string(),
            },
            None if super::builtin::pid_alive(task.pid) => return None,
            None => "gone".to_string(),
        };
        task.child = None;
        // Its workers may outlive it: the group goes with it.
        kill_group(task.pid, "KILL");
        if let Some(e) = &task.http {
            self.release(e);
        }
        Some(format!("exited ({status})"))
    }

    fn probe<'a>(&'a self, spec: &'a EngineSpec, task: &'a mut Task) -> BoxFuture<'a, Probe> {
        Box::pin(async move {
            let Some(e) = task.http.clone() else {
                return Probe::Failed("no port recorded".into());
            };
            match http::get(e.port, "/health", PROBE_TIMEOUT).await {
                Ok(a) if a.status == 200 => {}
                _ => return Probe::NotYet,
            }
            match serves(e.port, &e.served_name).await {
                Ok(Some(root)) if root.is_empty() || root == spec.model => Probe::Ready,
                Ok(Some(root)) => Probe::Failed(format!(
                    "the engine on port {} serves {root}, not {}",
                    e.port, spec.model
                )),
                Ok(None) => Probe::Failed(format!(
                    "/v1/models on port {} does not list {}",
                    e.port, e.served_name
                )),
                Err(_) => Probe::NotYet,
            }
        })
    }

    fn stats<'a>(
        &'a self,
        task: &'a Task,
        timeout: Duration,
    ) -> BoxFuture<'a, Option<pd_engine::EngineStats>> {
        Box::pin(async move {
            let e = task.http.as_ref()?;
            let a = http::get(e.port, "/metrics", timeout).await.ok()?;
            if a.status != 200 {
                return None;
            }
            let m = parse_metrics(&String::from_utf8_lossy(&a.body));
            let moved = first(&m, &["vllm:nixl_bytes_transferred_sum"]).unwrap_or(0.0);
            task.kv_bytes_moved
                .store(moved.max(0.0) as u64, std::sync::atomic::Ordering::Relaxed);
            Some(stats_of(&m))
        })
    }

    fn stop<'a>(&'a self, mut task: Task, grace: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            kill_group(task.pid, "TERM");
            super::wait_exit(&mut task, grace).await;
            kill_group(task.pid, "KILL");
            if let Some(mut c) = task.child.take() {
                let _ = c.wait();
            }
            if let Some(e) = &task.http {
                self.release(e);
            }
        })
    }

    fn recover<'a>(
        &'a self,
        spec: &'a EngineSpec,
        record: &'a TaskRecord,
    ) -> BoxFuture<'a, Result<Task, String>> {
        Box::pin(async move {
            if !super::builtin::pid_alive(record.pid) {
                return Err(format!("pid {} is gone", record.pid));
            }
            let refuse = |why: String| {
                kill_group(record.pid, "KILL");
                Err(why)
            };
            let Some(port) = record.port else {
                return refuse("the record has no port".into());
            };
            let name = record
                .identity
                .as_ref()
                .map_or(spec.deployment.clone(), |i| i.model_name.clone());
            match serves(port, &name).await {
                Ok(Some(root)) if root.is_empty() || root == spec.model => {}
                Ok(Some(root)) => {
                    return refuse(format!(
                        "port {port} serves {root}, the record says {}",
                        spec.model
                    ));
                }
                Ok(None) => return refuse(format!("port {port} does not serve {name}")),
                Err(e) => return refuse(format!("port {port} does not answer: {e}")),
            }
            let engine = HttpEngine {
                port,
                kv_transport: record.kv_transport,
                tp: spec.gpus.len().max(1) as u32,
                kv_port: record.kv_port,
                kv_ports: u16::from(record.kv_port.is_some()),
                served_name: name,
            };
            {
                let mut taken = self.taken.locked();
                taken.insert(port);
                if let Some(k) = engine.kv_port {
                    taken.extend(k..k.saturating_add(engine.kv_ports));
                }
            }
            let mut task = Task::new(record.pid);
            task.identity = record.identity.clone();
            task.http = Some(Arc::new(engine));
            Ok(task)
        })
    }
}

/// Prometheus text: each metric name's samples summed over label sets, and per `source`
/// label for the prompt-token counter (`name{source=X}` keys).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim()),
            None => match line.split_once(char::is_whitespace) {
                Some((s, v)) => (s, v.trim()),
                None => continue,
            },
        };
        let value: f64 = match value.split_whitespace().next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => continue,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        *out.entry(name.to_string()).or_default() += value;
        if let Some(src) = labels
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("source="))
        {
            *out.entry(format!("{name}{{source={}}}", src.trim_matches('"')))
                .or_default() += value;
        }
    }
    out
}

/// The first of `names` present (metrics renamed across vLLM versions).
fn first(m: &BTreeMap<String, f64>, names: &[&str]) -> Option<f64> {
    names.iter().find_map(|n| m.get(*n).copied())
}

/// Scale of the KV usage ratio in `EngineStats`' block counts (vLLM reports a ratio).
const KV_USAGE_SCALE: f64 = 10_000.0;

/// The load signals the router uses, from vLLM's metrics.
pub fn stats_of(m: &BTreeMap<String, f64>) -> pd_engine::EngineStats {
    let n = |names: &[&str]| first(m, names).unwrap_or(0.0).max(0.0);
    let usage = n(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]).min(1.0);
    let used = (usage * KV_USAGE_SCALE).round() as usize;
    pd_engine::EngineStats {
        queue_depth: n(&["vllm:num_requests_waiting"]) as usize,
        running: n(&["vllm:num_requests_running"]) as usize,
        kv_blocks_total: KV_USAGE_SCALE as usize,
        kv_blocks_used: used,
        kv_blocks_free: KV_USAGE_SCALE as usize - used,
        prefix_cache_queries_blocks: n(&[
            "vllm:prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_queries_total",
        ]) as u64,
        prefix_cache_hits_blocks: n(&[
            "vllm:prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_hits_total",
        ]) as u64,
        prompt_tokens_computed_total: n(&[
            "vllm:prompt_tokens_by_source_total{source=local_compute}",
        ]) as u64,
        prompt_tokens_cached_total: n(&[
            "vllm:prompt_tokens_by_source_total{source=local_cache_hit}",
        ]) as u64,
        prompt_tokens_imported_total: n(&[
            "vllm:prompt_tokens_by_source_total{source=external_kv_transfer}",
        ]) as u64,
        generated_tokens_total: n(&["vllm:generation_tokens_total"]) as u64,
        preemptions_total: n(&["vllm:num_preemptions_total"]) as u64,
        ..pd_engine::EngineStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_and_split_by_source() {
        let text = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 3.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 470.0
vllm:nixl_bytes_transferred_sum{engine="0",model_name="m"} 1.048576e+06
"#;
        let m = parse_metrics(text);
        assert_eq!(m["vllm:num_requests_running"], 2.0);
        assert_eq!(m["vllm:prompt_tokens_by_source_total"], 473.0);
        let s = stats_of(&m);
        assert_eq!((s.running, s.queue_depth), (2, 1));
        assert_eq!(s.kv_blocks_used * 4, s.kv_blocks_total);
        assert_eq!(s.prompt_tokens_computed_total, 3);
        assert_eq!(s.prompt_tokens_imported_total, 470);
        // Older names are read too.
        let old = parse_metrics("vllm:gpu_cache_usage_perc 0.5\n");
        assert_eq!(stats_of(&old).kv_blocks_used, 5000);
    }

    #[test]
    fn owned_flags_are_refused() {
        let ok =
            |a: &[&str]| check_engine_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["--max-model-len", "1024", "--enforce-eager"]).is_ok());
        assert!(ok(&["--dtype=float32"]).is_ok());
        let e = ok(&["--port", "9000"]).unwrap_err();
        assert!(e.contains("--port"), "{e}");
        assert!(ok(&["--kv-transfer-config={}"]).is_err());
        assert!(ok(&["/models/other"]).is_err());
        // The driver's own --kv-transport is taken out, and checked.
        assert!(ok(&["--kv-transport=nixl", "--enforce-eager"]).is_ok());
        assert!(ok(&["--kv-transport", "agent"]).is_ok());
        let e = ok(&["--kv-transport=rdma"]).unwrap_err();
        assert!(e.contains("agent or nixl"), "{e}");
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (t, rest) = split_kv_transport(&args(&["--kv-transport", "nixl", "--x"])).unwrap();
        assert_eq!((t, rest), (KvTransport::Nixl, args(&["--x"])));
        let (t, rest) = split_kv_transport(&[]).unwrap();
        assert_eq!((t, rest.len()), (KvTransport::Agent, 0));
        assert!(
            split_kv_transport(&args(&["--kv-transport=agent", "--kv-transport=nixl"])).is_err()
        );
        // Written in at deploy time: asked, named, or the default; contradictions refused.
        let w =
            |a: &[&str], asked: Option<&str>| with_kv_transport(&args(a), asked, KvTransport::Nixl);
        assert_eq!(
            w(&["--x"], None).unwrap(),
            args(&["--x", "--kv-transport=nixl"])
        );
        assert_eq!(
            w(&[], Some("agent")).unwrap(),
            args(&["--kv-transport=agent"])
        );
        assert_eq!(
            w(&["--kv-transport", "agent"], None).unwrap(),
            args(&["--kv-transport=agent"])
        );
        assert!(w(&["--kv-transport=agent"], Some("nixl")).is_err());
        assert!(w(&[], Some("tcp")).unwrap_err().contains("agent or nixl"));
    }
}
