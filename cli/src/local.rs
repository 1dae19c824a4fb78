//! `pdctl local`: a cluster of real agents on this machine, node-k listening on 127.0.0.k
//! (transport on the base port, admin API on the next one), each with its own data dir, log
//! and fixture GPUs under DIR/node-k/. The agents run detached; `DIR/pdctl.toml` lets
//! `pdctl --config DIR/pdctl.toml ...` talk to them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use pd_transport::pki;

use crate::client::AdminClient;
use crate::demo::find_pdagent;

/// The agent's environment variable for engine test faults (see the agent's supervisor).
const TEST_ENGINE_FAULTS_ENV: &str = "PDAGENT_TEST_ENGINE_FAULTS";

pub const DEFAULT_DIR: &str = "pdagent-local";
pub const DEFAULT_BASE_PORT: u16 = 7400;
const NODES_MAX: usize = 64;
/// Raft timings of local clusters: quick failover on one machine.
pub const LOCAL_HEARTBEAT_MS: u64 = 50;
pub const LOCAL_ELECTION_MIN_MS: u64 = 200;
pub const LOCAL_ELECTION_MAX_MS: u64 = 400;
/// How long `up` and `start` wait for the cluster to be whole.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum LocalCommand {
    /// Start N agents and wait until the cluster is whole.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Fixture GPUs per node (H100 80GB).
        #[arg(long, default_value_t = 2)]
        gpus_per_node: u32,
        /// Folder for everything the cluster writes.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// node-k listens on 127.0.0.k:PORT (transport, UDP) and 127.0.0.k:PORT+1 (admin, TCP).
        #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
        base_port: u16,
        /// node-k serves the OpenAI API on 127.0.0.k:API_PORT.
        #[arg(long, default_value_t = DEFAULT_API_PORT)]
        api_port: u16,
        #[command(flatten)]
        vllm: VllmLocal,
    },
    /// Stop every agent of the local cluster (SIGTERM, then SIGKILL after 10 s).
    Down {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Kill a node as if it lost power (SIGKILL).
    Kill {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        node: String,
        /// Kill only the agent (engines, once there are any, keep running).
        #[arg(long)]
        agent_only: bool,
    },
    /// Start a node of the local cluster again.
    Start {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        node: String,
        /// Test only: the engines this agent starts from now on get these fault settings
        /// (`crash_after_tokens=N,hang_after_tokens=N,slow_start_ms=N,refuse_kv`).
        #[arg(long)]
        engine_faults: Option<String>,
    },
    /// Put a UDP fault proxy in front of a node's transport: its agent restarts (engines kept)
    /// listening on another port, and the proxy takes its address, so every peer reaches it
    /// through the proxy. Faults change with commands on stdin (`help`); on `quit` or the end
    /// of stdin the agent goes back to its own address.
    Proxy {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        node: String,
        #[command(flatten)]
        faults: crate::faultproxy::FaultArgs,
    },
}

fn node_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join(node)
}

fn pid_file(dir: &Path, node: &str) -> PathBuf {
    node_dir(dir, node).join("agent.pid")
}

/// The pid of a node's agent if that process is alive and is a pdagent.
fn live_pid(dir: &Path, node: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(dir, node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie (state Z) is dead for our purposes.
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    (String::from_utf8_lossy(&cmdline).contains("pdagent") && state != "Z").then_some(pid)
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?
        .success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

fn nodes_in(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<(usize, String)> = std::fs::read_dir(dir)
        .with_context(|| format!("{} is not a local cluster folder", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let k = n.strip_prefix("node-")?.parse().ok()?;
            Some((k, n))
        })
        .collect();
    v.sort();
    Ok(v.into_iter().map(|x| x.1).collect())
}

fn fixture(gpus: u32) -> String {
    format!(
        "# {gpus} x H100 80GB on NVSwitch (fixture: nvml/FIXTURE.md)\n[[gpu]]\ncount = {gpus}\nname = \"NVIDIA H100 80GB HBM3\"\n\
         memory_total_mib = 81559\ncompute_capability = \"9.0\"\narchitecture = \"Hopper\"\npcie_generation = 5\n\
         pcie_width = 16\nnvlink = \"all\"\nmig = \"disabled\"\ntemperature_c = 35\npower_w = 70.0\npower_limit_w = 700.0\n\
         utilization_gpu_pct = 0\nutilization_memory_pct = 0\necc = true\nremapped_rows_supported = true\n"
    )
}

fn start_agent(dir: &Path, node: &str, bootstrap: bool) -> Result<u32> {
    start_agent_with(dir, node, bootstrap, None)
}

fn start_agent_with(
    dir: &Path,
    node: &str,
    bootstrap: bool,
    engine_faults: Option<&str>,
) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let pdagent = find_pdagent()?;
    let nd = node_dir(dir, node);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("agent.log"))?;
    let mut cmd = Command::new(pdagent);
    cmd.arg("run").arg("--config").arg(nd.join("pdagent.toml"));
    // Faults are only ever asked for explicitly: not inherited from this shell.
    cmd.env_remove(TEST_ENGINE_FAULTS_ENV);
    if let Some(f) = engine_faults {
        cmd.env(TEST_ENGINE_FAULTS_ENV, f);
    }
    if bootstrap {
        // The first host founds the cluster and holds the CA key, so the cluster can enroll
        // hosts with join tokens and renew certificates; voters get the key from it.
        cmd.arg("--bootstrap")
            .arg("--ca-key")
            .arg(dir.join("ca").join(pki::CA_KEY_FILE));
    }
    // Its own process group: the agents outlive this command and ignore the terminal's ^C.
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the agent of {node}"))?;
    std::fs::write(pid_file(dir, node), format!("{}\n", child.id()))?;
    Ok(child.id())
}

/// Pids of the engine processes a node's agent started (from its records), alive ones only.
fn engine_pids(dir: &Path, node: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(node_dir(dir, node).join("data/engines")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
        .filter(|pid| {
            // Still an engine (the builtin engine or vLLM), not a pid reused since.
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("engine") || c.contains("vllm")
            })
        })
        .collect()
}

/// Signals an engine's whole process group (it leads one: vLLM's workers are in it too).
fn signal_group(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stderr(std::process::Stdio::null())
        .status();
}

/// SIGKILLs a node's agent and, unless `agent_only`, its engines, as if the host lost power;
/// returns the agent's pid.
pub fn kill(dir: &Path, node: &str) -> Result<u32> {
    kill_node(dir, node, false)
}

fn kill_node(dir: &Path, node: &str, agent_only: bool) -> Result<u32> {
    let pid = live_pid(dir, node).with_context(|| format!("{node} is not running"))?;
    signal(pid, "KILL")?;
    if !agent_only {
        for e in engine_pids(dir, node) {
            signal_group(e, "KILL");
        }
    }
    Ok(pid)
}

/// Starts a stopped node's agent again (never with --bootstrap).
pub fn start(dir: &Path, node: &str, engine_faults: Option<&str>) -> Result<u32> {
    if let Some(pid) = live_pid(dir, node) {
        bail!("{node} is already running (pid {pid})");
    }
    start_agent_with(dir, node, false, engine_faults)
}

/// Waits until process `pid` is gone (its sockets closed).
fn wait_gone(pid: u32) -> Result<()> {
    let deadline = Instant::now() + STOP_GRACE;
    // A zombie (a child of this process that nobody reaped) holds no sockets: gone. But a
    // killed multi-threaded process shows its main thread as a zombie while its other threads
    // are still exiting, and those still hold its sockets: gone only when the main thread is
    // all that is left.
    let alive = || {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|st| {
            st.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        });
        match zombie {
            Err(_) => false,
            Ok(false) => true,
            Ok(true) => {
                std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| tasks.count() > 1)
            }
        }
    };
    while alive() {
        if Instant::now() > deadline {
            bail!("process {pid} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A node's agent moved behind a fault proxy: it listens on a private port and advertises its
/// usual address, which the proxy takes. Its engines keep running (re-adopted).
pub struct ProxyWiring {
    dir: PathBuf,
    node: String,
    cfg_path: PathBuf,
    original: String,
    behind: String,
    /// The node's advertised transport address (the proxy's).
    pub public: std::net::SocketAddr,
    /// Where its agent listens behind the proxy.
    pub private: std::net::SocketAddr,
}

impl ProxyWiring {
    /// Plans the move (changes nothing yet).
    pub fn new(dir: &Path, node: &str) -> Result<ProxyWiring> {
        let cfg_path = node_dir(dir, node).join("pdagent.toml");
        let original = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{node} is not part of the local cluster in {}",
                dir.display()
            )
        })?;
        let cfg: toml::Value = toml::from_str(&original)?;
        if cfg.get("node").and_then(|n| n.get("advertise")).is_some() {
            bail!("{node} already has node.advertise set (is a proxy in front of it already?)");
        }
        let public: std::net::SocketAddr = cfg
            .get("node")
            .and_then(|n| n.get("listen"))
            .and_then(|l| l.as_str())
            .and_then(|l| l.parse().ok())
            .with_context(|| format!("{}: no node.listen address", cfg_path.display()))?;
        // A free UDP port for the agent, next to its public address.
        let private = std::net::UdpSocket::bind((public.ip(), 0))?.local_addr()?;
        let listen_line = format!("listen = \"{public}\"\n");
        if original.matches(&listen_line).count() != 1 {
            bail!("{}: cannot find its node.listen line", cfg_path.display());
        }
        let behind = original.replacen(
            &listen_line,
            &format!("listen = \"{private}\"\nadvertise = \"{public}\"\n"),
            1,
        );
        Ok(ProxyWiring {
            dir: dir.to_path_buf(),
            node: node.to_string(),
            cfg_path,
            original,
            behind,
            public,
            private,
        })
    }

    /// Stops the agent (SIGKILL; its engines keep running): its address is free.
    pub fn stop_agent(&self) -> Result<()> {
        if let Some(pid) = live_pid(&self.dir, &self.node) {
            signal(pid, "KILL")?;
            wait_gone(pid)?;
        }
        Ok(())
    }

    /// Starts the agent behind the proxy; returns its pid.
    pub fn start_behind(&self) -> Result<u32> {
        std::fs::write(&self.cfg_path, &self.behind)?;
        start_agent(&self.dir, &self.node, false)
    }

    /// Puts the agent back on its own address (the proxy must be gone).
    pub fn restore(&self) -> Result<()> {
        self.stop_agent()?;
        std::fs::write(&self.cfg_path, &self.original)?;
        start_agent(&self.dir, &self.node, false)?;
        Ok(())
    }
}

/// `pdctl local proxy`: see [`LocalCommand::Proxy`].
fn proxy(dir: &Path, node: &str, args: &crate::faultproxy::FaultArgs) -> Result<()> {
    let faults = args.faults()?;
    let w = ProxyWiring::new(dir, node)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        w.stop_agent()?;
        let front = crate::faultproxy::bind(w.public).await?;
        let pid = w.start_behind()?;
        println!(
            "agent of {node} (pid {pid}) now listens on {}; the proxy holds {}",
            w.private, w.public
        );
        crate::faultproxy::run(
            front,
            w.private,
            faults,
            args.seed,
            crate::faultproxy::stdin_lines(),
            |l| println!("{l}"),
        )
        .await
    });
    // Every socket of the proxy is closed with its runtime.
    drop(rt);
    w.restore()?;
    eprintln!("{node}: agent back on {}", w.public);
    result
}

/// Runs `f` on a new local cluster of `nodes` agents with `gpus` fixture GPUs each (in a
/// temporary folder; `f` gets the folder and the OpenAI API port), then stops it. Its files are
/// removed on success and kept, with a line saying where, on failure.
pub fn with_cluster<T>(
    what: &str,
    nodes: usize,
    gpus: u32,
    f: impl FnOnce(&Path, u16) -> Result<T>,
) -> Result<T> {
    with_cluster_vllm(what, nodes, gpus, &VllmLocal::default(), f)
}

/// As [`with_cluster`], with the agents' vLLM settings.
pub fn with_cluster_vllm<T>(
    what: &str,
    nodes: usize,
    gpus: u32,
    vllm: &VllmLocal,
    f: impl FnOnce(&Path, u16) -> Result<T>,
) -> Result<T> {
    let tmp = std::env::temp_dir().join(format!("pdctl-{what}-{}", std::process::id()));
    let base = free_base_port(nodes)?;
    let (dir, _) = create(nodes, gpus, &tmp, base, base + 2, vllm, true)?;
    let result = f(&dir, base + 2);
    let _ = down(&dir, true);
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => eprintln!("the cluster's files and logs are kept in {}", dir.display()),
    }
    result
}

/// The OpenAI API port of local clusters (node-k on 127.0.0.k:8000).
pub const DEFAULT_API_PORT: u16 = 8000;

fn check_free(ip: &str, port: u16, api_port: u16) -> Result<()> {
    std::net::TcpListener::bind((ip, api_port)).with_context(|| {
        format!("TCP {ip}:{api_port} (the OpenAI API) is taken (try --api-port)")
    })?;
    std::net::UdpSocket::bind((ip, port))
        .with_context(|| format!("UDP {ip}:{port} is taken (try --base-port)"))?;
    // Enrollment listens on TCP at the transport's port number.
    std::net::TcpListener::bind((ip, port))
        .with_context(|| format!("TCP {ip}:{port} is taken (try --base-port)"))?;
    std::net::TcpListener::bind((ip, port + 1))
        .with_context(|| format!("TCP {ip}:{} is taken (try --base-port)", port + 1))?;
    Ok(())
}

/// Voters a local cluster of `n` nodes keeps.
fn voters_for(n: usize) -> usize {
    if n >= 5 {
        5
    } else if n >= 3 {
        3
    } else {
        1
    }
}

/// Waits until the admin API reports `n` nodes, all with their GPUs replicated, the configured
/// number of voters, and a coordinator.
fn wait_whole(client: &AdminClient, n: usize, gpus: u32, quiet: bool) -> Result<pd_api::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let until = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    loop {
        match rt.block_on(client.get::<pd_api::Status>("/v1/status")) {
            Ok(v) => {
                let list: Vec<&pd_api::NodeStatus> = v.nodes.iter().map(|x| &x.status).collect();
                let with_gpus = list
                    .iter()
                    .filter(|x| x.gpus.len() == gpus as usize)
                    .count();
                let voters = list.iter().filter(|x| x.raft_role == "voter").count();
                // The operator's choice of voters: node-1 to node-V (node-1 bootstrapped and
                // is eligible already).
                for x in &list {
                    let name = x.name.as_str();
                    let k: usize = name
                        .strip_prefix("node-")
                        .and_then(|k| k.parse().ok())
                        .unwrap_or(usize::MAX);
                    let eligible =
                        x.labels.get("pdagent/voter").map(String::as_str) == Some("eligible");
                    if k <= voters_for(n) && !eligible {
                        let path = format!("/v1/nodes/{name}/labels/pdagent%2Fvoter");
                        let body = pd_api::LabelRequest {
                            value: "eligible".into(),
                        };
                        let _ = rt.block_on(client.send::<_, pd_api::Changed>(
                            "PUT",
                            &path,
                            Some(&body),
                        ));
                    }
                }
                let line = format!(
                    "{}/{n} nodes registered, {with_gpus}/{n} with GPUs, {voters}/{} voters",
                    list.len(),
                    voters_for(n)
                );
                if line != last && !quiet {
                    eprintln!("  {line}");
                }
                last = line;
                if list.len() == n
                    && with_gpus == n
                    && voters == voters_for(n)
                    && v.coordinator.is_some()
                {
                    return Ok(v);
                }
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > until {
            bail!(
                "the local cluster was not whole after {} s: {last}",
                READY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The vLLM settings of a local cluster's agents (`[drivers.vllm]`); node-k takes ports
/// 20000+100(k-1) to +99, so that engines of different agents never race for one.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VllmLocal {
    /// vLLM's OpenAI server as one argv string, split on spaces (drivers.vllm.command), e.g.
    /// "/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server".
    #[arg(long)]
    pub vllm_command: Option<String>,
    /// Where NIXL stages KV (drivers.vllm.kv_buffer_device): cpu on hosts without GPUs.
    #[arg(long)]
    pub vllm_kv_device: Option<String>,
    /// Extra environment for vLLM, K=V (repeatable; drivers.vllm.env).
    #[arg(long = "vllm-env")]
    pub vllm_env: Vec<String>,
}

impl VllmLocal {
    /// The `[drivers.vllm]` section for node `k` (1-based).
    fn section(&self, k: usize) -> Result<String> {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let lo = 20_000 + 100 * (k - 1);
        let mut out = format!("[drivers.vllm]\nport_range = \"{lo}-{}\"\n", lo + 99);
        if let Some(c) = &self.vllm_command {
            let argv: Vec<String> = c.split_whitespace().map(q).collect();
            if argv.is_empty() {
                bail!("--vllm-command is empty");
            }
            out.push_str(&format!("command = [{}]\n", argv.join(", ")));
        }
        if let Some(d) = &self.vllm_kv_device {
            out.push_str(&format!("kv_buffer_device = {}\n", q(d)));
        }
        if !self.vllm_env.is_empty() {
            out.push_str("[drivers.vllm.env]\n");
            for kv in &self.vllm_env {
                let Some((key, value)) = kv.split_once('=') else {
                    bail!("--vllm-env {kv:?}: give K=V");
                };
                out.push_str(&format!("{} = {}\n", q(key), q(value)));
            }
        }
        Ok(out)
    }
}

pub fn run(cmd: LocalCommand, json: bool) -> Result<()> {
    match cmd {
        LocalCommand::Up {
            nodes,
            gpus_per_node,
            dir,
            base_port,
            api_port,
            vllm,
        } => up(nodes, gpus_per_node, &dir, base_port, api_port, &vllm, json),
        LocalCommand::Down { dir } => down(&dir, false),
        LocalCommand::Kill {
            dir,
            node,
            agent_only,
        } => {
            let pid = kill_node(&dir, &node, agent_only)?;
            println!("{node}: killed (pid {pid})");
            Ok(())
        }
        LocalCommand::Proxy { dir, node, faults } => proxy(&dir, &node, &faults),
        LocalCommand::Start {
            dir,
            node,
            engine_faults,
        } => {
            if !node_dir(&dir, &node).join("pdagent.toml").exists() {
                bail!(
                    "{node} is not part of the local cluster in {}",
                    dir.display()
                );
            }
            let pid = start(&dir, &node, engine_faults.as_deref())?;
            println!("{node}: started (pid {pid})");
            Ok(())
        }
    }
}

fn up(
    n: usize,
    gpus: u32,
    dir: &Path,
    base_port: u16,
    api_port: u16,
    vllm: &VllmLocal,
    json: bool,
) -> Result<()> {
    let (dir, status) = create(n, gpus, dir, base_port, api_port, vllm, json)?;
    let api: Vec<String> = (1..=n)
        .map(|k| format!("http://127.0.0.{k}:{api_port}/v1"))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({ "dir": dir, "config": dir.join("pdctl.toml"), "status": status, "openai": api })
        );
    } else {
        println!(
            "local cluster of {n} node(s) is up; coordinator {}",
            status.coordinator.as_deref().unwrap_or("?")
        );
        println!(
            "  pdctl --config {} status",
            dir.join("pdctl.toml").display()
        );
        println!("  OpenAI API: {}", api.join(", "));
        println!("  pdctl local down --dir {}", dir.display());
    }
    Ok(())
}

/// A base port free for UDP and TCP p, TCP p+1 (admin) and TCP p+2 (OpenAI API) on
/// 127.0.0.1..=127.0.0.n, for clusters that must not collide with a user's (benchmarks).
pub fn free_base_port(n: usize) -> Result<u16> {
    for _ in 0..100 {
        let p = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if p < 65000 && (1..=n).all(|k| check_free(&format!("127.0.0.{k}"), p, p + 2).is_ok()) {
            return Ok(p);
        }
    }
    bail!("no free base port found on 127.0.0.1..{n}")
}

/// Creates the local cluster's files, starts its agents and waits until it is whole. Returns
/// the (canonical) folder and the cluster status.
pub fn create(
    n: usize,
    gpus: u32,
    dir: &Path,
    base_port: u16,
    api_port: u16,
    vllm: &VllmLocal,
    quiet: bool,
) -> Result<(PathBuf, pd_api::Status)> {
    let json = quiet;
    if n == 0 || n > NODES_MAX {
        bail!("--nodes must be between 1 and {NODES_MAX}");
    }
    if gpus > 64 {
        bail!("--gpus-per-node must be at most 64");
    }
    if base_port == 0 || base_port == u16::MAX {
        bail!("--base-port must leave room for the admin port");
    }
    if dir.join("pdctl.toml").exists() {
        bail!(
            "{} already holds a local cluster: `pdctl local down --dir {0}` and remove it first",
            dir.display()
        );
    }
    for k in 1..=n {
        check_free(&format!("127.0.0.{k}"), base_port, api_port)?;
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let ca = dir.join("ca");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    pki::init_cluster_dir(&ca, "local", now, 24 * 3600)?;
    let voters = if n >= 5 {
        5
    } else if n >= 3 {
        3
    } else {
        1
    };
    let seed = format!("node-1@127.0.0.1:{base_port}");
    // As on real hosts: the first host gets an offline certificate and the CA key, the others
    // enroll with the join token (their own key pairs, certificates signed by the coordinator).
    let token = std::fs::read_to_string(ca.join(pki::JOIN_TOKEN_FILE))?;
    let mut agents = Vec::new();
    for k in 1..=n {
        let node = format!("node-{k}");
        let nd = node_dir(&dir, &node);
        std::fs::create_dir_all(nd.join("data/pki"))?;
        let join = if k == 1 {
            pki::issue_node_files(&ca, &node, 365)?;
            for f in [pki::NODE_CERT_FILE, pki::NODE_KEY_FILE, pki::CA_CERT_FILE] {
                std::fs::copy(
                    ca.join("nodes").join(&node).join(f),
                    nd.join("data/pki").join(f),
                )?;
            }
            String::new()
        } else {
            format!("join_token = \"{}\"\n", token.trim())
        };
        std::fs::write(nd.join("gpus.toml"), fixture(gpus))?;
        let ip = format!("127.0.0.{k}");
        let gpu_section = if gpus > 0 {
            format!("[gpus]\nfixture = \"{}\"\n", nd.join("gpus.toml").display())
        } else {
            String::new()
        };
        std::fs::write(
            nd.join("pdagent.toml"),
            format!(
                "# node {k} of a local cluster (pdctl local up)\n[node]\nname = \"{node}\"\ndata_dir = \"{}\"\n\
                 listen = \"{ip}:{base_port}\"\nworker_threads = 1\n[admin]\nlisten = \"{ip}:{}\"\n{gpu_section}\
                 [cluster]\nseeds = [\"{seed}\"]\n{join}voters = {voters}\nheartbeat_ms = 100\nsuspect_after_ms = 1000\ndown_after_ms = 4000\n\
                 [raft]\nheartbeat_ms = {LOCAL_HEARTBEAT_MS}\nelection_timeout_min_ms = {LOCAL_ELECTION_MIN_MS}\nelection_timeout_max_ms = {LOCAL_ELECTION_MAX_MS}\n\
                 coordinator_interval_ms = 200\nautoplan_interval_ms = 10000\n\
                 {}[serving]\nlisten = \"{ip}:{api_port}\"\nview_refresh_ms = 100\n",
                nd.join("data").display(),
                base_port + 1,
                // Before [serving], which stays last (tests append serving settings).
                vllm.section(k)?
            ),
        )?;
        agents.push(format!("\"{node}@{ip}:{}\"", base_port + 1));
    }
    std::fs::write(
        dir.join("pdctl.toml"),
        format!(
            "# pdctl configuration for the local cluster in this folder (pdctl local up)\n\
             ca_cert = \"ca/ca.crt\"\nadmin_cert = \"ca/admin.crt\"\nadmin_key = \"ca/admin.key\"\n\
             agents = [{}]\n",
            agents.join(", ")
        ),
    )?;
    if !json {
        eprintln!("starting {n} agent(s) in {}", dir.display());
    }
    for k in 1..=n {
        start_agent(&dir, &format!("node-{k}"), k == 1)?;
    }
    let client = AdminClient::from_config(&dir.join("pdctl.toml"))?;
    let status = match wait_whole(&client, n, gpus, json) {
        Ok(s) => s,
        Err(e) => {
            let _ = down(&dir, true);
            return Err(e.context(format!(
                "see the logs under {}/node-*/agent.log",
                dir.display()
            )));
        }
    };
    Ok((dir, status))
}

pub fn down(dir: &Path, quiet: bool) -> Result<()> {
    let nodes = nodes_in(dir)?;
    let mut running = Vec::new();
    let mut engines = Vec::new();
    for node in &nodes {
        engines.extend(engine_pids(dir, node));
        if let Some(pid) = live_pid(dir, node) {
            signal(pid, "TERM")?;
            running.push((node.clone(), pid));
        }
    }
    // Engines outlive their agent on purpose (re-adoption); `down` stops them too, each with
    // its process group, and kills what is left after the grace.
    for pid in &engines {
        signal_group(*pid, "TERM");
    }
    let until = Instant::now() + STOP_GRACE;
    for (node, pid) in running {
        while live_pid(dir, &node).is_some() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if live_pid(dir, &node).is_some() {
            signal(pid, "KILL")?;
            if !quiet {
                println!("{node}: killed after {} s", STOP_GRACE.as_secs());
            }
        } else if !quiet {
            println!("{node}: stopped");
        }
    }
    while engines
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in engines {
        signal_group(pid, "KILL");
    }
    Ok(())
}
