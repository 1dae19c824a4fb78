//! `pdctl`: the operator's command-line tool. It reaches agents through their admin API (with
//! the control plane), and uses `pd-transport` only for the offline PKI and the transport
//! benchmark.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pd_transport::bench::{BenchOptions, BenchReport};
use pd_transport::config::Congestion;
use pd_transport::{TransportConfig, pki};

mod autoplan;
mod bench_calibrate;
mod bench_failover;
mod bench_faults;
mod bench_kv;
mod bench_serve;
mod bench_shift;
mod bench_vllm;
mod client;
mod demo;
mod faultproxy;
mod load;
mod local;
mod plan;

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "pdctl", version, about = "Operate a pdagent cluster")]
struct Cli {
    /// pdctl configuration (admin endpoints and credential). Default: $PDCTL_CONFIG, then
    /// ./pdctl.toml, then /etc/pdagent/pdctl.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Output,
    /// Same as `-o json`: exactly one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The cluster: coordinator, term, and every node.
    Status,
    /// Nodes with their Raft role, health, admin state, labels and GPUs.
    Nodes,
    /// GPUs of every node.
    Gpus,
    /// Set (key=value) or remove (key-) a node label. `pdagent/voter=eligible` lets a host
    /// become a Raft voter (and so hold the CA key); `rack` spreads voters.
    Label { node: String, assignment: String },
    /// Stop placing new work on a node.
    Cordon { node: String },
    /// Allow work on a node again.
    Uncordon { node: String },
    /// Move work off a node.
    Drain { node: String },
    /// Change the role of a node's engines (of disaggregated deployments): they drain
    /// (running requests finish) and start again in the other role on the same GPUs; their
    /// deployments' prefill and decode counts move with them.
    Flip {
        node: String,
        #[arg(long, value_parser = ["prefill", "decode"])]
        role: String,
    },
    /// Remove a node from the cluster and revoke its certificates; its agent is refused from
    /// then on.
    Remove { node: String },
    /// Create a deployment: the coordinator places its engines on free GPUs (refused, saying
    /// what is free, when they do not fit). Engines are not started yet: placement only.
    Deploy {
        /// The deployment's name (also the model id clients will ask for).
        name: String,
        /// Engine driver: builtin (the reference engine) or vllm (vLLM's OpenAI server, a
        /// model folder on the hosts; see `[drivers.vllm]` in pdagent.toml).
        #[arg(long, default_value = "builtin")]
        engine: String,
        /// An extra argument for every engine of the deployment (repeatable), e.g.
        /// `--engine-arg=--max-model-len=1024`. Flags the driver sets itself are refused.
        #[arg(long = "engine-arg", allow_hyphen_values = true)]
        engine_args: Vec<String>,
        /// vllm: how the KV goes from prefill to decode engine: `agent` (pdagent's KV
        /// connector; the agents ship it over QUIC with mutual TLS, checksummed) or `nixl`
        /// (vLLM's NixlConnector). Default: agent where vLLM's KV is in host memory
        /// (`drivers.vllm.kv_buffer_device = "cpu"`), nixl on GPU hosts.
        #[arg(long, value_parser = ["agent", "nixl"])]
        kv_transport: Option<String>,
        /// A preset (tiny, small) or a model folder on the hosts: absolute, or relative to each
        /// agent's `node.models_dir`. Engines are placed only on hosts whose copy matches.
        #[arg(long)]
        model: String,
        /// The checkpoint fingerprint (hex) the hosts' copies must have. Default: the one most
        /// copies agree on.
        #[arg(long)]
        model_fingerprint: Option<String>,
        /// GPUs per engine.
        #[arg(long, default_value_t = 1)]
        tp: u32,
        #[command(flatten)]
        layout: DeployLayoutArgs,
        /// Time-to-first-token target, ms.
        #[arg(long)]
        ttft_ms: Option<u32>,
        /// Time-per-output-token target, ms.
        #[arg(long)]
        tpot_ms: Option<u32>,
        /// Return once every engine is ready (hello and a one-token probe), showing progress.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (vLLM engines load for minutes).
        #[arg(long, default_value_t = 1200)]
        wait_timeout_s: u64,
        /// Re-planning: `on` (the coordinator flips and scales the deployment's engines when
        /// its simulator, calibrated on the engines' own step times, predicts more requests
        /// within the targets), `advise` (it records what it would do) or `off`. Default:
        /// advise for a planned layout, off otherwise. `--max-gpus` bounds it too.
        #[arg(long, value_parser = ["on", "advise", "off"])]
        autoplan: Option<String>,
        #[command(flatten)]
        bounds: autoplan::Bounds,
    },
    /// Delete a deployment and its engines' places.
    Undeploy { name: String },
    /// Change a deployment's engine counts.
    Scale {
        name: String,
        #[command(flatten)]
        layout: LayoutArgs,
    },
    /// Deployments and where their engines are placed.
    Deployments,
    /// Every engine: deployment, node, GPUs, role, state, pid, restarts, generation.
    Engines,
    /// The coordinator's re-planning of planned deployments: the latest window's load and SLO
    /// attainment, the best move and whether it is made; with a deployment's name every
    /// candidate's predicted attainment and the step-time fit. `pdctl autoplan NAME
    /// on|advise|off [bounds]` sets its mode; `--explain` shows its latest recorded decision.
    Autoplan {
        name: Option<String>,
        /// on, advise or off: set the deployment's mode (and the bounds given).
        #[arg(value_parser = ["on", "advise", "off"])]
        mode: Option<String>,
        /// The latest recorded decision of the deployment, with its inputs, every candidate's
        /// score and the reason.
        #[arg(long, conflicts_with = "mode")]
        explain: bool,
        /// GPUs the deployment may grow to.
        #[arg(long)]
        max_gpus: Option<u32>,
        #[command(flatten)]
        bounds: autoplan::Bounds,
    },
    /// The re-planner's recorded decisions (taken or not), oldest first.
    Events { name: Option<String> },
    /// API keys of the OpenAI API. Once the cluster has one, every agent's API asks for a key
    /// (`Authorization: Bearer <key>`).
    Apikey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Join tokens, minted offline from the CA folder.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A cluster of agents on this machine (node-k on 127.0.0.k).
    Local {
        #[command(subcommand)]
        command: local::LocalCommand,
    },
    /// The system on this machine: a local cluster serves the `small` model through the OpenAI
    /// API, disaggregated (1 prefill + 1 decode engine, KV shipped between hosts) and then
    /// colocated (2 engines) on the same cores, and prints the two side by side.
    Demo {
        /// Where to put the demo's files (default: a new folder under the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Agents in the local cluster (one fixture GPU each).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Requests in the workload.
        #[arg(long, default_value_t = 16)]
        requests: usize,
        /// Stay up afterwards, serving on 127.0.0.1:8000, until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Print one JSON object with both runs' figures.
        #[arg(long)]
        json: bool,
        /// builtin (the reference engine) or vllm (needs --vllm-command; says how to install
        /// vLLM where it is missing).
        #[arg(long, default_value = "builtin")]
        engine: String,
        #[command(flatten)]
        vllm: local::VllmLocal,
    },
    /// The cluster's PKI, offline: create it, issue node certificates.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Plan a deployment offline: the best disaggregated (xPyD) and colocated layouts for a
    /// model, GPUs, a workload and TTFT/TPOT targets, and the `pdctl deploy` command for it.
    Plan(plan::PlanArgs),
    /// A UDP fault proxy for the transport: forwards datagrams between peers and the agent at
    /// UPSTREAM, dropping, delaying, blackholing or cutting them; faults change with commands
    /// on stdin (`help`). For a local cluster, `pdctl local proxy NODE` does the wiring.
    Faultproxy {
        /// Address peers send to (the agent's advertised transport address).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The agent's own transport address.
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[command(flatten)]
        faults: faultproxy::FaultArgs,
    },
    /// Benchmarks that print figures and a ratio against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

/// A layout in words: `2P + 2D` or `3 colocated`.
fn layout_text(l: &pd_api::Layout) -> String {
    match *l {
        pd_api::Layout::Disaggregated { prefill, decode } => format!("{prefill}P + {decode}D"),
        pd_api::Layout::Colocated { engines } => format!("{engines} colocated"),
    }
}

/// A deployment's predicted (for a planned layout) and measured latencies, as table rows.
fn latency_lines(d: &pd_api::DeploymentView) -> Vec<String> {
    let name = d.deployment.name.as_str();
    let ms = |v: Option<f64>| match v {
        Some(x) => format!("{x:.1} ms"),
        None => "-".into(),
    };
    let mut out = Vec::new();
    if let Some(plan) = &d.plan {
        let p = &plan.predicted;
        out.push(format!(
            "{name:<24} {:<10} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "predicted",
            format!("{:.1}/s", p.request_rate_per_s),
            ms(Some(p.ttft_ms_mean)),
            ms(Some(p.ttft_ms_p90)),
            ms(Some(p.tpot_ms_mean)),
            ms(Some(p.tpot_ms_p90)),
        ));
    }
    let m = &d.measured;
    if m.requests > 0 || !out.is_empty() {
        out.push(format!(
            "{name:<24} {:<10} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "measured",
            m.requests.to_string(),
            ms(m.ttft_ms_mean),
            ms(m.ttft_ms_p90),
            ms(m.tpot_ms_mean),
            ms(m.tpot_ms_p90),
        ));
    }
    out
}

/// A deployment's engine counts: `--prefill X --decode Y`, or `--colocated N`.
#[derive(clap::Args, Debug, Clone)]
struct LayoutArgs {
    /// Prefill engines (with --decode).
    #[arg(long, requires = "decode", conflicts_with = "colocated")]
    prefill: Option<u32>,
    /// Decode engines (with --prefill).
    #[arg(long, requires = "prefill")]
    decode: Option<u32>,
    /// Engines that both prefill and decode.
    #[arg(long)]
    colocated: Option<u32>,
}

impl LayoutArgs {
    /// The admin API's layout fields, or an error when no layout was given.
    fn body(&self) -> Result<pd_api::DeployRequest> {
        if self.prefill.is_none() && self.colocated.is_none() {
            anyhow::bail!("give --prefill X --decode Y, or --colocated N");
        }
        Ok(pd_api::DeployRequest {
            prefill: self.prefill,
            decode: self.decode,
            colocated: self.colocated,
            ..Default::default()
        })
    }
}

/// `pdctl deploy`'s layout: engine counts, or `--layout planned` with the workload to plan for.
#[derive(clap::Args, Debug, Clone)]
struct DeployLayoutArgs {
    #[command(flatten)]
    counts: LayoutArgs,
    /// `planned`: the coordinator's planner chooses prefill and decode (or colocated) engine
    /// counts from the free GPUs, the model and the --ttft-ms/--tpot-ms targets.
    #[arg(long, value_parser = ["planned"], conflicts_with_all = ["prefill", "decode", "colocated"],
          requires_all = ["ttft_ms", "tpot_ms"])]
    layout: Option<String>,
    /// Prompt tokens per request the planned layout is sized for.
    #[arg(long, requires = "layout")]
    isl: Option<u32>,
    /// Output tokens per request the planned layout is sized for.
    #[arg(long, requires = "layout")]
    osl: Option<u32>,
    /// Plan on at most this many of the free GPUs.
    #[arg(long, requires = "layout")]
    max_gpus: Option<u32>,
}

impl DeployLayoutArgs {
    fn body(&self) -> Result<pd_api::DeployRequest> {
        if self.layout.is_none() {
            return self.counts.body();
        }
        Ok(pd_api::DeployRequest {
            layout: self.layout.clone(),
            isl: self.isl,
            osl: self.osl,
            max_gpus: self.max_gpus,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Make a key; it is printed once (the cluster keeps only its SHA-256).
    Create {
        /// What the key is for (shown by `list`).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// The keys: id, name, creation time (never the secrets).
    List,
    /// Revoke a key by id: every agent refuses it within a moment (the API keeps asking for
    /// keys even when none is left).
    Revoke { id: String },
    /// Whether the OpenAI API asks for a key: `yes` (the default once a key was created) or
    /// `no` (open to anyone who reaches it).
    Require {
        #[arg(value_parser = ["yes", "no"])]
        answer: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a join token (needs the CA key in DIR).
    Create {
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime: seconds, or with a unit (30m, 24h, 7d).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create the cluster CA, the admin credential and a first join token in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cluster, written into the CA certificate.
        #[arg(long, default_value = "pdagent")]
        name: String,
        /// Lifetime of the first join token, in hours.
        #[arg(long, default_value_t = 24)]
        token_ttl_hours: u64,
    },
    /// Issue a node certificate offline into DIR/nodes/NODE/ (copy that folder to the host's
    /// <data_dir>/pki/).
    Cert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        /// Lifetime in days.
        #[arg(long, default_value_t = pki::LEAF_LIFETIME_DAYS_DEFAULT)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// SIGKILL the coordinator of a local cluster, repeatedly; time until a write is
    /// acknowledged again.
    Failover {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The serving path on a local cluster: agent time per request, routing decision time, and
    /// a request-rate sweep with SLO attainment and goodput, disaggregated against colocated.
    Serve {
        /// Requests per rate point of the sweep (vllm: requests per measurement).
        #[arg(long, default_value_t = 50)]
        requests: usize,
        /// builtin: how many times the sweep runs (the goodput's spread is printed).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// builtin: the reference engine (agent time, routing, a rate sweep with goodput);
        /// vllm: a vLLM NIXL pair (agent time, paired against vLLM's two-step flow sent
        /// straight to the engines, TTFT and TPOT against colocated vLLM); needs
        /// --vllm-command.
        #[arg(long, default_value = "builtin")]
        engine: String,
        #[command(flatten)]
        vllm: local::VllmLocal,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// vLLM's KV from prefill to decode host through NIXL (over TCP) and through the agents
    /// (`--kv-transport agent`: QUIC with mutual TLS, checksummed), on a local cluster of its
    /// own: the same short and long prompts one at a time, KV transfer time, effective GB/s and
    /// TTFT (median, p90) per path and their ratio. Needs --vllm-command.
    Kv {
        /// Only vllm (the reference engine's KV always goes through the agents).
        #[arg(long, default_value = "vllm")]
        engine: String,
        /// Measured requests per prompt kind (short, long), after one warm-up each.
        #[arg(long, default_value_t = 12)]
        requests: usize,
        #[command(flatten)]
        vllm: local::VllmLocal,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Re-planning against a workload that changes shape, on a local cluster of `--nodes`
    /// agents (the reference engine, `tiny`): the same arrivals in phases (decode-heavy: short
    /// prompts, long outputs; prefill-heavy: the reverse) against every static layout, the
    /// static layout best for phase 1 (a), the same start with --autoplan on (b), and per phase
    /// the best static layout (c). Prints per phase the share within both targets, TTFT and
    /// TPOT p90, the layout and every move; (b)/(a) and (b)/(c) over the run.
    Shift {
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// The phases in order, comma-separated: decode, prefill.
        #[arg(long, default_value = "decode,prefill,decode", value_delimiter = ',')]
        phases: Vec<String>,
        /// Seconds per phase.
        #[arg(long, default_value_t = 60.0)]
        phase_s: f64,
        /// Seconds of mixed requests before each run (not counted).
        #[arg(long, default_value_t = 30.0)]
        warmup_s: f64,
        /// Requests per second in decode-heavy and prefill-heavy phases (Poisson).
        #[arg(long, default_value_t = 2.0)]
        decode_rate: f64,
        #[arg(long, default_value_t = 2.5)]
        prefill_rate: f64,
        /// Prompt bytes of decode-heavy and prefill-heavy requests (±50%; one token a byte).
        #[arg(long, default_value_t = 64)]
        short_prompt: usize,
        #[arg(long, default_value_t = 1200)]
        long_prompt: usize,
        /// Output tokens of prefill-heavy and decode-heavy requests.
        #[arg(long, default_value_t = 4)]
        short_output: u32,
        #[arg(long, default_value_t = 128)]
        long_output: u32,
        #[arg(long, default_value_t = 1500)]
        ttft_ms: u32,
        #[arg(long, default_value_t = 10)]
        tpot_ms: u32,
        /// The re-planner's gain threshold and cool-down windows for the autoplan run.
        #[arg(long)]
        threshold: Option<f64>,
        #[arg(long)]
        cooldown: Option<u32>,
        /// Skip the static runs: only the autoplan run, from this layout (e.g. 1P3D).
        #[arg(long)]
        autoplan_only: Option<String>,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Failure semantics on a local cluster (1 prefill + 2 decode engines of `tiny` on 4
    /// hosts): a fixed-seed load while, one at a time, the KV link is cut (UDP fault proxy),
    /// the prefill engine, a decode engine and a decode host are killed. Per fault: requests
    /// done, retried, migrated, failed with an explicit error, hung and lost, and recovery times.
    Faults {
        /// Requests per fault.
        #[arg(long, default_value_t = 24)]
        requests: usize,
        /// Poisson arrival rate, requests per second.
        #[arg(long, default_value_t = 4.0)]
        rate: f64,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Whether the planner predicts the reference engine: calibrate its step times from the
    /// engines' measurements on one workload (1 prefill + 1 decode engine on a local cluster),
    /// then predict mean TTFT and TPOT of another workload at half its measured capacity and
    /// compare with `reps` measured runs.
    Calibrate {
        /// Preset: tiny or small.
        #[arg(long, default_value = "small")]
        model: String,
        /// Requests per measured run.
        #[arg(long, default_value_t = 40)]
        requests: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// QUIC (the production transport) against TLS over TCP and plain TCP on loopback.
    Transport {
        /// Bytes per repetition.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Parallelism K: QUIC endpoint pairs, TCP connections.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Largest UDP payload (path-MTU discovery's upper bound); 8952 fits 9000-byte frames.
        #[arg(long, default_value_t = 8952)]
        datagram_bytes: u16,
        #[arg(long)]
        no_gso: bool,
        #[arg(long, value_enum, default_value = "cubic")]
        congestion: CongestionArg,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CongestionArg {
    Cubic,
    Bbr,
    Newreno,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pdctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses 90, 90s, 30m, 24h, 7d into seconds.
fn parse_ttl(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {s:?}: expected seconds or 30m, 24h, 7d"))?;
    if n == 0 {
        anyhow::bail!("--ttl must be positive");
    }
    Ok(n * mult)
}

fn admin(cli_config: &Option<PathBuf>) -> Result<client::AdminClient> {
    let path = cli_config
        .clone()
        .unwrap_or_else(client::default_config_path);
    client::AdminClient::from_config(&path)
}

use client::segment as seg;

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// A value's name as the admin API writes it (`ready`, `cordoned`, ...).
fn word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn print_status(v: &pd_api::Status, nodes_only: bool) {
    if !nodes_only {
        println!(
            "coordinator {} (term {}), answered by {}",
            v.coordinator.as_deref().unwrap_or("none"),
            v.term,
            v.node
        );
    }
    println!(
        "{:<20} {:<22} {:<8} {:<8} {:<9} {:>4}  LABELS",
        "NAME", "ADDRESS", "ROLE", "HEALTH", "STATE", "GPUS"
    );
    for n in &v.nodes {
        let n = &n.status;
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<20} {:<22} {:<8} {:<8} {:<9} {:>4}  {}",
            n.name,
            n.address,
            n.raft_role,
            word(&n.health),
            word(&n.admin_state),
            n.gpus.len(),
            labels.join(",")
        );
    }
    if let Some(why) = &v.voters_short {
        println!("note: {why}");
    }
}

/// One line: how many engines, in which states, for how many deployments.
fn engine_summary(engines: &[pd_api::EngineReport]) -> String {
    let deployments: std::collections::BTreeSet<&str> =
        engines.iter().map(|e| e.deployment.as_str()).collect();
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    for e in engines {
        *by_state.entry(word(&e.state)).or_default() += 1;
    }
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!(
        "engines: {} in {} deployment(s){}{}",
        engines.len(),
        deployments.len(),
        if states.is_empty() { "" } else { ": " },
        states.join(", ")
    )
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json || cli.output == Output::Json;
    match cli.command {
        Command::Status | Command::Nodes | Command::Gpus => {
            let c = admin(&cli.config)?;
            let v: pd_api::Status = block_on(c.get("/v1/status"))??;
            match (&cli.command, json) {
                (Command::Status, true) => print_json(&v)?,
                (Command::Nodes, true) => print_json(&v.nodes)?,
                (Command::Gpus, true) => {
                    let gpus: std::collections::BTreeMap<&str, Vec<GpuRow>> = v
                        .nodes
                        .iter()
                        .map(|n| {
                            let list = n.status.gpus.iter().map(|g| with_telemetry(g, n)).collect();
                            (n.status.name.as_str(), list)
                        })
                        .collect();
                    print_json(&gpus)?
                }
                (Command::Status, false) => {
                    print_status(&v, false);
                    // The engines at a glance (`pdctl engines` for each one).
                    if let Ok(Ok(e)) = block_on(c.get::<pd_api::Engines>("/v1/engines")) {
                        println!("{}", engine_summary(&e.engines));
                    }
                }
                (Command::Nodes, false) => print_status(&v, true),
                _ => {
                    println!(
                        "{:<20} {:>3} {:<36} {:<26} {:>9} {:>9} {:>5} {:>5} {:>7} HEALTH",
                        "NODE",
                        "IDX",
                        "UUID",
                        "NAME",
                        "MEM GiB",
                        "USED GiB",
                        "UTIL%",
                        "TEMP",
                        "POWER W"
                    );
                    for n in &v.nodes {
                        for g in &n.status.gpus {
                            let g = with_telemetry(g, n);
                            let opt = |x: Option<f64>| match x {
                                Some(x) => format!("{x:.0}"),
                                None => "-".to_string(),
                            };
                            let gib = |x: Option<u64>| match x {
                                Some(x) => format!("{:.1}", x as f64 / (1u64 << 30) as f64),
                                None => "-".to_string(),
                            };
                            println!(
                                "{:<20} {:>3} {:<36} {:<26} {:>9} {:>9} {:>5} {:>5} {:>7} {}",
                                n.status.name,
                                g.index,
                                g.uuid,
                                g.name,
                                gib(Some(g.memory_total_bytes)),
                                gib(g.memory_used_bytes),
                                opt(g.utilization_gpu_pct.map(f64::from)),
                                opt(g.temperature_c.map(f64::from)),
                                opt(g.power_w),
                                g.health
                            );
                        }
                    }
                }
            }
        }
        Command::Label { node, assignment } => {
            let c = admin(&cli.config)?;
            let r: pd_api::Changed = if let Some(key) = assignment.strip_suffix('-') {
                block_on(c.send::<(), _>(
                    "DELETE",
                    &format!("/v1/nodes/{}/labels/{}", seg(&node), seg(key)),
                    None,
                ))??
            } else {
                let (k, val) = assignment.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("{assignment:?}: expected key=value, or key- to remove")
                })?;
                let body = pd_api::LabelRequest { value: val.into() };
                block_on(c.send(
                    "PUT",
                    &format!("/v1/nodes/{}/labels/{}", seg(&node), seg(k)),
                    Some(&body),
                ))??
            };
            println!(
                "{node}: {}",
                if r.changed {
                    "label updated"
                } else {
                    "unchanged"
                }
            );
        }
        Command::Cordon { ref node }
        | Command::Uncordon { ref node }
        | Command::Drain { ref node } => {
            let verb = match cli.command {
                Command::Cordon { .. } => "cordon",
                Command::Uncordon { .. } => "uncordon",
                _ => "drain",
            };
            let c = admin(&cli.config)?;
            let path = format!("/v1/nodes/{}/{verb}", seg(node));
            let r: pd_api::Changed = block_on(c.send::<(), _>("POST", &path, None))??;
            println!(
                "{node}: {}",
                if r.changed {
                    format!("{verb}ed")
                } else {
                    "unchanged".into()
                }
            );
        }
        Command::Flip { node, role } => {
            let c = admin(&cli.config)?;
            let body = pd_api::FlipRequest { role: role.clone() };
            let r: pd_api::Flipped = block_on(c.send(
                "POST",
                &format!("/v1/nodes/{}/flip", seg(&node)),
                Some(&body),
            ))??;
            if json {
                print_json(&r)?;
            } else {
                let engines: Vec<String> = r
                    .engines
                    .iter()
                    .map(|e| format!("{} ({})", e.engine, e.role))
                    .collect();
                println!(
                    "{node}: flipped to {role}; its engines now: {} (the old ones drain first: running requests finish)",
                    engines.join(", ")
                );
            }
        }
        Command::Deploy {
            name,
            engine,
            engine_args,
            kv_transport,
            model,
            model_fingerprint,
            tp,
            layout,
            ttft_ms,
            tpot_ms,
            wait,
            wait_timeout_s,
            autoplan,
            bounds,
        } => {
            let layout_body = layout.body()?;
            let body = pd_api::DeployRequest {
                autoplan: bounds.request(
                    autoplan,
                    layout_body.max_gpus,
                    layout_body.layout.is_some(),
                ),
                name: name.clone(),
                engine: engine.clone(),
                model: model.clone(),
                tp: Some(tp),
                ttft_ms,
                tpot_ms,
                model_fingerprint,
                engine_args,
                kv_transport,
                ..layout_body
            };
            let c = admin(&cli.config)?;
            let created: pd_api::Created =
                block_on(c.send("POST", "/v1/deployments", Some(&body)))??;
            if let Some(h) = &created.model_hosts {
                let nodes: Vec<&str> = h.nodes.iter().map(String::as_str).collect();
                println!(
                    "{name}: model {model} (fingerprint {}) on {}",
                    h.fingerprint,
                    nodes.join(", ")
                );
                for (node, why) in created.model_missing.iter().flatten() {
                    println!("  not on {node}: {why}");
                }
            }
            if let Some(plan) = &created.plan {
                let p = &plan.predicted;
                println!(
                    "{name}: planned {} on {} for {} → {} tokens: {:.2} req/s, TTFT p90 {:.1} ms, TPOT p90 {:.2} ms predicted",
                    plan.describe,
                    plan.gpus,
                    plan.isl,
                    plan.osl,
                    p.request_rate_per_s,
                    p.ttft_ms_p90,
                    p.tpot_ms_p90,
                );
            }
            if !wait {
                println!("{name}: deployment created; `pdctl engines` shows its engines");
            } else {
                let d: pd_api::Deployments = block_on(c.get("/v1/deployments"))??;
                let engines_wanted = d
                    .deployments
                    .iter()
                    .find(|d| d.deployment.name == name)
                    .map(|d| d.deployment.layout.engine_count())
                    .context("the deployment is gone")?;
                wait_engines_ready(
                    &c,
                    &name,
                    engines_wanted as usize,
                    std::time::Duration::from_secs(wait_timeout_s),
                )?;
                println!("{name}: every engine is ready");
            }
        }
        Command::Undeploy { name } => {
            let c = admin(&cli.config)?;
            let path = format!("/v1/deployments/{}", seg(&name));
            block_on(c.send::<(), pd_api::Changed>("DELETE", &path, None))??;
            println!("{name}: deployment deleted");
        }
        Command::Scale { name, layout } => {
            let body = layout.body()?;
            let c = admin(&cli.config)?;
            let r: pd_api::Changed = block_on(c.send(
                "PUT",
                &format!("/v1/deployments/{}/layout", seg(&name)),
                Some(&body),
            ))??;
            println!("{name}: {}", if r.changed { "scaled" } else { "unchanged" });
        }
        Command::Engines => {
            let c = admin(&cli.config)?;
            let v: pd_api::Engines = block_on(c.get("/v1/engines"))??;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{:<28} {:<12} {:<8} {:<8} {:<8} {:<14} {:>8} {:>8} {:>10} {:>11}",
                    "ENGINE",
                    "NODE",
                    "DRIVER",
                    "GPUS",
                    "ROLE",
                    "STATE",
                    "PID",
                    "RESTARTS",
                    "GENERATION",
                    "PORT/KV"
                );
                for e in &v.engines {
                    println!(
                        "{:<28} {:<12} {:<8} {:<8} {:<8} {:<14} {:>8} {:>8} {:>10} {:>11}",
                        e.engine,
                        e.node,
                        if e.driver.is_empty() {
                            "builtin"
                        } else {
                            &e.driver
                        },
                        serde_json::to_string(&e.gpus)?,
                        e.role.to_string(),
                        state_with_age(e),
                        e.pid.map_or("-".to_string(), |p| p.to_string()),
                        e.restarts,
                        e.generation,
                        match (e.port, e.kv_port) {
                            (Some(p), Some(k)) => format!("{p}/{k}"),
                            (Some(p), None) => p.to_string(),
                            _ => "-".to_string(),
                        }
                    );
                    for line in e.note.lines() {
                        println!("    {line}");
                    }
                }
            }
        }
        Command::Autoplan {
            name,
            mode,
            explain,
            max_gpus,
            bounds,
        } => autoplan::run(
            &admin(&cli.config)?,
            name,
            mode,
            explain,
            max_gpus,
            bounds,
            json,
        )?,
        Command::Events { name } => autoplan::events(&admin(&cli.config)?, name, json)?,
        Command::Apikey { command } => {
            let c = admin(&cli.config)?;
            match command {
                ApiKeyCommand::Create { name } => {
                    let body = pd_api::ApiKeyRequest { name };
                    let v: pd_api::ApiKeyCreated =
                        block_on(c.send("POST", "/v1/apikeys", Some(&body)))??;
                    if json {
                        print_json(&v)?;
                    } else {
                        println!("{}", v.key);
                        eprintln!(
                            "API key {} created; it is shown only now. The OpenAI API of every agent now asks for a key.",
                            v.id
                        );
                    }
                }
                ApiKeyCommand::List => {
                    let v: pd_api::ApiKeys = block_on(c.get("/v1/apikeys"))??;
                    if json {
                        print_json(&v)?;
                    } else {
                        println!(
                            "keys are {}",
                            if v.required {
                                "required"
                            } else {
                                "not required"
                            }
                        );
                        println!("{:<10} {:<12} NAME", "ID", "CREATED");
                        for k in &v.api_keys {
                            println!("{:<10} {:<12} {}", k.id, k.created_unix, k.name);
                        }
                    }
                }
                ApiKeyCommand::Require { answer } => {
                    let required = answer == "yes";
                    let body = pd_api::RequiredRequest { required };
                    block_on(c.send::<_, pd_api::Changed>(
                        "PUT",
                        "/v1/apikeys/required",
                        Some(&body),
                    ))??;
                    println!(
                        "the OpenAI API {}",
                        if required {
                            "asks for a key"
                        } else {
                            "is open: no key is asked for"
                        }
                    );
                }
                ApiKeyCommand::Revoke { id } => {
                    let path = format!("/v1/apikeys/{}", seg(&id));
                    block_on(c.send::<(), pd_api::Changed>("DELETE", &path, None))??;
                    println!("{id}: revoked");
                }
            }
        }
        Command::Deployments => {
            let c = admin(&cli.config)?;
            let v: pd_api::Deployments = block_on(c.get("/v1/deployments"))??;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{:<24} {:<8} {:<16} {:>3} {:<28} ENGINE PLACES",
                    "DEPLOYMENT", "ENGINE", "MODEL", "TP", "LAYOUT"
                );
                let mut latency = Vec::new();
                for d in &v.deployments {
                    let mut layout = layout_text(&d.deployment.layout);
                    if d.plan.is_some() {
                        layout += " (planned)";
                    }
                    latency.push(latency_lines(d));
                    let places: Vec<String> = d
                        .engines
                        .iter()
                        .map(|e| {
                            format!(
                                "{}@{}:{}",
                                e.engine.rsplit('/').next().unwrap_or(""),
                                e.node,
                                serde_json::to_string(&e.gpus).unwrap_or_default()
                            )
                        })
                        .collect();
                    println!(
                        "{:<24} {:<8} {:<16} {:>3} {:<28} {}",
                        d.deployment.name,
                        d.deployment.engine,
                        d.deployment.model,
                        d.deployment.tp,
                        layout,
                        if places.is_empty() {
                            "(not placed yet)".to_string()
                        } else {
                            places.join(" ")
                        }
                    );
                }
                if latency.iter().any(|l| !l.is_empty()) {
                    println!();
                    println!(
                        "{:<24} {:<10} {:>8} {:>9} {:>9} {:>9} {:>9}",
                        "DEPLOYMENT", "", "REQUESTS", "TTFT", "TTFT p90", "TPOT", "TPOT p90"
                    );
                    for l in latency.into_iter().flatten() {
                        println!("{l}");
                    }
                }
                if !v.measured_without.is_empty() {
                    println!(
                        "(measured without {}: no answer)",
                        serde_json::to_string(&v.measured_without)?
                    );
                }
            }
        }
        Command::Remove { node } => {
            let c = admin(&cli.config)?;
            let path = format!("/v1/nodes/{}", seg(&node));
            block_on(c.send::<(), pd_api::Changed>("DELETE", &path, None))??;
            println!("{node}: removed from the cluster");
        }
        Command::Token {
            command: TokenCommand::Create { dir, ttl },
        } => {
            let ttl = parse_ttl(&ttl)?;
            let ca = pki::CertAuthority::load(&dir)
                .with_context(|| format!("loading the CA from {}", dir.display()))?;
            let now = now_unix();
            let token = ca.join_token(now, ttl);
            if json {
                print_json(&serde_json::json!({ "token": token, "expires_unix": now + ttl }))?;
            } else {
                println!("{token}");
                eprintln!("expires at {} (unix seconds)", now + ttl);
            }
        }
        Command::Local { command } => local::run(command, json)?,
        Command::Faultproxy {
            listen,
            upstream,
            faults,
        } => {
            let f = faults.faults()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let front = faultproxy::bind(listen).await?;
                    faultproxy::run(
                        front,
                        upstream,
                        f,
                        faults.seed,
                        faultproxy::stdin_lines(),
                        |l| println!("{l}"),
                    )
                    .await
                })?;
        }
        Command::Demo {
            dir,
            nodes,
            requests,
            keep,
            json,
            engine,
            vllm,
        } => demo::run(demo::DemoOptions {
            dir,
            nodes,
            requests,
            keep,
            json,
            engine,
            vllm,
        })?,
        Command::Plan(args) => plan::run(args, json)?,
        Command::Cluster { command } => match command {
            ClusterCommand::Init {
                dir,
                name,
                token_ttl_hours,
            } => {
                let out = pki::init_cluster_dir(&dir, &name, now_unix(), token_ttl_hours * 3600)
                    .with_context(|| format!("creating the cluster PKI in {}", dir.display()))?;
                println!("created cluster {name:?} in {}", dir.display());
                for f in &out.files {
                    println!("  {}", f.display());
                }
                println!("CA fingerprint (sha256): {}", out.ca_fingerprint);
                println!(
                    "join token expires at {} (unix seconds)",
                    out.token_expiry_unix
                );
                println!(
                    "keep ca.key and admin.key on this machine only; next: pdctl cluster cert --dir {} --node NAME",
                    dir.display()
                );
            }
            ClusterCommand::Cert { dir, node, days } => {
                if days < 1 {
                    anyhow::bail!("--days must be at least 1");
                }
                let files = pki::issue_node_files(&dir, &node, days)
                    .with_context(|| format!("issuing a certificate for {node}"))?;
                println!("issued a certificate for node {node}, valid {days} days:");
                for f in &files {
                    println!("  {}", f.display());
                }
                println!(
                    "copy {} to that host's <data_dir>/pki/",
                    dir.join("nodes").join(&node).display()
                );
            }
        },
        Command::Bench { command } => match command {
            BenchCommand::Faults {
                requests,
                rate,
                json,
            } => {
                let r = bench_faults::run(requests, rate, json)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    bench_faults::print(&r);
                }
                if r.hung > 0 || r.lost > 0 {
                    anyhow::bail!("{} request(s) hung and {} lost", r.hung, r.lost);
                }
            }
            BenchCommand::Calibrate {
                model,
                requests,
                reps,
                json,
            } => {
                let r = bench_calibrate::run(&model, requests, reps, json)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    bench_calibrate::print(&r);
                }
                if !r.within_tolerance {
                    anyhow::bail!(
                        "a prediction is outside the stated tolerance of {:.0}% (the report above says which)",
                        r.tolerance * 100.0
                    );
                }
            }
            BenchCommand::Serve {
                requests,
                repeats,
                engine,
                vllm,
                json,
            } => match engine.as_str() {
                "builtin" => {
                    let r = bench_serve::run(requests, repeats, json)?;
                    if json {
                        println!("{}", serde_json::to_string(&r)?);
                    } else {
                        bench_serve::print(&r);
                    }
                }
                "vllm" => {
                    let r = bench_vllm::run(requests, &vllm, json)?;
                    if json {
                        println!("{}", serde_json::to_string(&r)?);
                    } else {
                        bench_vllm::print(&r);
                    }
                }
                other => anyhow::bail!("--engine {other:?}: builtin or vllm"),
            },
            BenchCommand::Shift {
                nodes,
                phases,
                phase_s,
                warmup_s,
                decode_rate,
                prefill_rate,
                short_prompt,
                long_prompt,
                short_output,
                long_output,
                ttft_ms,
                tpot_ms,
                threshold,
                cooldown,
                autoplan_only,
                json,
            } => {
                let autoplan_only = autoplan_only
                    .map(|s| bench_shift::parse_split(&s))
                    .transpose()?;
                let o = bench_shift::ShiftOptions {
                    autoplan_only,
                    nodes,
                    phases,
                    phase_s,
                    warmup_s,
                    decode_rate,
                    prefill_rate,
                    short_prompt,
                    long_prompt,
                    short_output,
                    long_output,
                    ttft_ms,
                    tpot_ms,
                    threshold,
                    cooldown,
                };
                let r = bench_shift::run(&o, json)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    bench_shift::print(&r);
                }
            }
            BenchCommand::Kv {
                engine,
                requests,
                vllm,
                json,
            } => {
                if engine != "vllm" {
                    anyhow::bail!(
                        "--engine {engine:?}: only vllm (the builtin engine's KV always goes through the agents: `pdctl bench serve`)"
                    );
                }
                let r = bench_kv::run(requests, &vllm, json)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    bench_kv::print(&r);
                }
            }
            BenchCommand::Failover { nodes, rounds } => {
                let r = bench_failover::run(nodes, rounds, json)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "failover over {} rounds on {} local agents (heartbeat {} ms, election timeout {}-{} ms):",
                        r.rounds,
                        r.nodes,
                        r.heartbeat_ms,
                        r.election_timeout_ms[0],
                        r.election_timeout_ms[1]
                    );
                    println!(
                        "  kill of the coordinator -> first acknowledged write: p50 {:.0} ms, max {:.0} ms",
                        r.failover_ms_p50, r.failover_ms_max
                    );
                }
            }
            BenchCommand::Transport {
                bytes,
                streams,
                reps,
                datagram_bytes,
                no_gso,
                congestion,
                json,
            } => {
                let transport = TransportConfig {
                    max_datagram_bytes: datagram_bytes,
                    // Loopback carries any size; start there instead of probing up from 1200.
                    initial_datagram_bytes: datagram_bytes,
                    gso: !no_gso,
                    congestion: match congestion {
                        CongestionArg::Cubic => Congestion::Cubic,
                        CongestionArg::Bbr => Congestion::Bbr,
                        CongestionArg::Newreno => Congestion::NewReno,
                    },
                    ..TransportConfig::default()
                };
                transport
                    .validate("")
                    .map_err(|e| anyhow::anyhow!("--datagram-bytes: {e}"))?;
                if streams == 0 || streams > 64 {
                    anyhow::bail!("--streams must be between 1 and 64");
                }
                let opts = BenchOptions {
                    bytes,
                    streams,
                    reps,
                    transport,
                };
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                let report = rt.block_on(pd_transport::bench::run(&opts))?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print_bench(&report);
                }
            }
        },
    }
    Ok(())
}

fn print_bench(r: &BenchReport) {
    println!(
        "transport benchmark: {} MiB x {} reps over {} parallel stream(s), loopback",
        r.bytes >> 20,
        r.reps,
        r.streams
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  {:<10} {:>7} GB/s   samples: {}",
        "QUIC",
        format!("{:.2}", r.quic_gbps),
        fmt(&r.quic_samples_gbps)
    );
    println!(
        "  {:<10} {:>7} GB/s   samples: {}",
        "TLS/TCP",
        format!("{:.2}", r.tls_tcp_gbps),
        fmt(&r.tls_tcp_samples_gbps)
    );
    println!(
        "  {:<10} {:>7} GB/s   samples: {}",
        "TCP",
        format!("{:.2}", r.tcp_gbps),
        fmt(&r.tcp_samples_gbps)
    );
    println!("  ratio QUIC / TLS-over-TCP: {:.2}", r.ratio);
    println!(
        "  datagram {} bytes, GSO {} (max {} segments per send), UDP buffer {} KiB, congestion {:?}, {} packets lost",
        r.datagram_bytes,
        if r.gso { "on" } else { "off" },
        r.gso_segments_max,
        r.udp_buffer_bytes >> 10,
        r.congestion,
        r.quic_lost_packets
    );
}

/// One GPU as `pdctl gpus` shows it: its record with the node's latest telemetry for it
/// merged in (health from the telemetry when newer; `telemetry_age_ms` says how old).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct GpuRow {
    index: u32,
    uuid: String,
    name: String,
    memory_total_bytes: u64,
    health: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    power_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    utilization_gpu_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry_age_ms: Option<u64>,
}

fn with_telemetry(gpu: &pd_api::GpuRecord, node: &pd_api::NodeView) -> GpuRow {
    let mut row = GpuRow {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        name: gpu.name.clone(),
        memory_total_bytes: gpu.memory_total_bytes,
        health: gpu.health.clone(),
        temperature_c: None,
        power_w: None,
        utilization_gpu_pct: None,
        memory_used_bytes: None,
        telemetry_age_ms: None,
    };
    let live = node
        .telemetry
        .as_ref()
        .and_then(|t| Some((t.age_ms, t.gpus.iter().find(|x| x.index == gpu.index)?)));
    if let Some((age_ms, live)) = live {
        row.temperature_c = live.temperature_c;
        row.power_w = live.power_w;
        row.utilization_gpu_pct = live.utilization_gpu_pct;
        row.memory_used_bytes = Some(live.memory_used_bytes);
        row.health = live.health.clone();
        row.telemetry_age_ms = Some(age_ms);
    }
    row
}

/// Waits until `wanted` engines of deployment `name` are ready, printing progress lines on
/// stderr; fails when one is failed (crash loop) or at the timeout.
/// `starting 1m05s`: an engine's state and how long it has been in it, for states that last.
fn state_with_age(e: &pd_api::EngineReport) -> String {
    let state = word(&e.state);
    match (state.as_str(), e.state_ms) {
        ("starting" | "draining", ms) => {
            let s = ms / 1000;
            if s >= 60 {
                format!("{state} {}m{:02}s", s / 60, s % 60)
            } else {
                format!("{state} {s}s")
            }
        }
        _ => state,
    }
}

pub(crate) fn wait_engines_ready(
    c: &client::AdminClient,
    name: &str,
    wanted: usize,
    timeout: std::time::Duration,
) -> Result<()> {
    let until = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let v: pd_api::Engines = block_on(c.get("/v1/engines"))??;
        let mine: Vec<&pd_api::EngineReport> =
            v.engines.iter().filter(|e| e.deployment == name).collect();
        let ready = mine
            .iter()
            .filter(|e| e.state == pd_api::EngineState::Ready)
            .count();
        let failed: Vec<&&pd_api::EngineReport> = mine
            .iter()
            .filter(|e| e.state == pd_api::EngineState::Failed)
            .collect();
        // The slowest engine still starting: how long, and what its log says last.
        let loading = mine
            .iter()
            .filter(|e| e.state == pd_api::EngineState::Starting)
            .max_by_key(|e| e.state_ms)
            .map(|e| {
                let note: String = e.note.chars().take(100).collect();
                format!(
                    "; {} {}{}",
                    e.engine,
                    state_with_age(e),
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(": {note}")
                    }
                )
            })
            .unwrap_or_default();
        let line = format!(
            "{ready}/{wanted} engines ready, {} placed, {} failed{loading}",
            mine.len(),
            failed.len()
        );
        if line != last {
            eprintln!("  {line}");
            last = line;
        }
        if ready == wanted {
            // Ready means serving: every agent's router must see them too (each refreshes
            // its view on its own clock).
            let r: pd_api::Routable = block_on(c.get(&format!(
                "/v1/deployments/{}/routable",
                client::segment(name)
            )))??;
            if r.every_agent {
                return Ok(());
            }
            let behind: Vec<&str> = r
                .nodes
                .iter()
                .filter(|n| n.api != Some(false) && n.engines != Some(wanted as u32))
                .map(|n| n.node.as_str())
                .collect();
            let line = format!(
                "{ready}/{wanted} engines ready; waiting for {} to route to them",
                behind.join(", ")
            );
            if line != last {
                eprintln!("  {line}");
                last = line;
            }
        }
        if !failed.is_empty() {
            for e in &failed {
                eprintln!("  {} on {} failed: {}", e.engine, e.node, e.note);
            }
            anyhow::bail!(
                "{name}: {} engine(s) failed (crash loop); see `pdctl engines` and the agents' engine logs",
                failed.len()
            );
        }
        if std::time::Instant::now() > until {
            anyhow::bail!(
                "{name}: not every engine was ready after {} s ({last})",
                timeout.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[cfg(test)]
mod summary_tests {
    fn engine(deployment: &str, state: pd_api::EngineState) -> pd_api::EngineReport {
        pd_api::EngineReport {
            engine: format!("{deployment}/decode-0"),
            deployment: deployment.into(),
            node: "node-1".into(),
            role: pd_api::EngineRole::Decode,
            gpus: vec![0],
            state,
            pid: None,
            restarts: 0,
            generation: 1,
            load: Default::default(),
            driver: "builtin".into(),
            state_ms: 0,
            note: String::new(),
            port: None,
            kv_port: None,
        }
    }

    #[test]
    fn engine_summary_counts_states_and_deployments() {
        use pd_api::EngineState::{Failed, Ready};
        let v = [engine("a", Ready), engine("a", Ready), engine("b", Failed)];
        assert_eq!(
            super::engine_summary(&v),
            "engines: 3 in 2 deployment(s): 1 failed, 2 ready"
        );
        assert_eq!(super::engine_summary(&[]), "engines: 0 in 0 deployment(s)");
    }
}
