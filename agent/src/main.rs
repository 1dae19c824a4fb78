//! The `pdagent` binary: parse, validate, then run. Exit status 64 for a bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pdagent::config::{self, ConfigError, Overrides, Validated};
use pdagent::util::now_unix;
use pdagent::wire::AgentResponse;
use pdagent::{agent, logging, notify::Notifier};

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "pdagent",
    version,
    about = "pdagent: the cluster agent for prefill/decode-disaggregated LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Configuration file.
    #[arg(long, short = 'c', default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[command(flatten)]
        args: ConfigArgs,
        /// Found a new cluster with this agent as its first member. Only on the first host,
        /// once: ignored when the data dir already holds Raft state.
        #[arg(long)]
        bootstrap: bool,
        /// Take custody of the cluster CA key from this file (copied to <data_dir>/ca.key,
        /// mode 0600): on the first host, so that it can enroll hosts with join tokens and
        /// renew certificates. Voters receive it from the coordinator afterwards.
        #[arg(long, value_name = "FILE")]
        ca_key: Option<PathBuf>,
    },
    /// Show the cluster as an agent sees it (by default this host's own agent).
    Status {
        #[command(flatten)]
        args: ConfigArgs,
        /// Ask this agent instead: name@ip:port.
        #[arg(long)]
        agent: Option<String>,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration (and the certificates it names) without binding anything.
    CheckConfig(ConfigArgs),
    /// Show this host's GPUs (NVML, or the configured fixture) and their health.
    Gpus {
        #[command(flatten)]
        args: ConfigArgs,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The built-in reference engine: serve (an engine process), generate (one request,
    /// monolithic or disaggregated), bench.
    Engine {
        #[command(subcommand)]
        command: pdagent::engine_cli::EngineCommand,
    },
    /// Ping a peer agent over the transport with this node's certificate.
    Ping {
        #[command(flatten)]
        args: ConfigArgs,
        /// The peer's node name (its certificate must name it).
        #[arg(long)]
        peer: String,
        /// The peer's transport address (IP:port).
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Engine { command } => {
            logging::init(config::LogFormat::Human, "warn");
            match pdagent::engine_cli::run(command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(pdagent::engine_cli::EngineFailure::Usage(e)) => {
                    eprintln!("pdagent engine: {e}");
                    ExitCode::from(EX_USAGE)
                }
                Err(pdagent::engine_cli::EngineFailure::Failed(e)) => fail(e),
            }
        }
        Command::Run {
            args,
            bootstrap,
            ca_key,
        } => {
            let v = match load_config(&args) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("pdagent: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            logging::init(v.config.log.format, &v.config.log.level);
            let notifier = Notifier::from_env(v.config.systemd.notify);
            let rt = match runtime(&v) {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            // A host with a join token and no credentials yet enrolls first.
            let token = v.config.cluster.join_token.clone();
            if !token.is_empty() && pdagent::enrollment::credentials_absent(&v) {
                notifier.status("enrolling with the join token");
                if let Err(e) = rt.block_on(pdagent::enrollment::enroll_at_start(&v, &token)) {
                    eprintln!("pdagent: cluster.join_token: enrollment failed: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            }
            let id = match v.load_identity(now_unix()) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("pdagent: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let opts = agent::RunOptions { bootstrap, ca_key };
            match rt.block_on(agent::run(v, id, notifier, opts)) {
                Ok(()) => ExitCode::SUCCESS,
                // A configuration problem found at start (e.g. no address to advertise).
                Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
                    eprintln!("pdagent: {e}");
                    ExitCode::from(EX_USAGE)
                }
                Err(e) => fail(e),
            }
        }
        Command::CheckConfig(args) => match load_config(&args) {
            // A host that will enroll with its token has no credentials yet: that is fine.
            Ok(v)
                if !v.config.cluster.join_token.is_empty()
                    && pdagent::enrollment::credentials_absent(&v) =>
            {
                println!(
                    "configuration is valid: node {} on {}; no certificate yet: the agent enrolls with cluster.join_token through {} seed(s) at its first start",
                    v.node_name,
                    v.listen,
                    v.seeds.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pdagent: {e}");
                ExitCode::from(EX_USAGE)
            }
            Ok(_) => check_config(&args),
        },
        Command::Status {
            args,
            agent: target,
            json,
        } => {
            let Some((v, id)) = load(&args) else {
                return ExitCode::from(EX_USAGE);
            };
            logging::init(v.config.log.format, "warn");
            let (name, addr) = match target.as_deref().map(config::parse_seed) {
                Some(Ok(s)) => (s.name, s.address),
                Some(Err(e)) => {
                    eprintln!("pdagent: --agent: {e}");
                    return ExitCode::from(EX_USAGE);
                }
                None => {
                    let a = v.advertise.unwrap_or(v.listen);
                    let ip = if a.ip().is_unspecified() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        a.ip()
                    };
                    (v.node_name.clone(), std::net::SocketAddr::new(ip, a.port()))
                }
            };
            let rt = match runtime(&v) {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match rt.block_on(agent::status(&v, &id, &name, addr)) {
                Ok(s) if json => match serde_json::to_string(&s) {
                    Ok(j) => println!("{j}"),
                    Err(e) => return fail(e),
                },
                Ok(s) => {
                    println!(
                        "{} sees coordinator {} (term {}), {} node(s):",
                        s.node,
                        s.coordinator.as_deref().unwrap_or("none"),
                        s.term,
                        s.nodes.len()
                    );
                    for n in &s.nodes {
                        println!(
                            "  {:<20} {:<22} {:<8} {:<8} {:<9} {} GPU(s)",
                            n.name,
                            n.address,
                            n.raft_role,
                            format!("{:?}", n.health).to_lowercase(),
                            format!("{:?}", n.admin_state).to_lowercase(),
                            n.gpus.len()
                        );
                    }
                }
                Err(e) => return fail(e),
            }
            ExitCode::SUCCESS
        }
        Command::Gpus { args, json } => {
            let v = match load_config(&args) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("pdagent: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            logging::init(v.config.log.format, "warn");
            let mut discovery = match v.gpu_discovery() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("pdagent: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let (inv, _) = discovery.sample();
            if let Some(m) = &inv.message {
                eprintln!("pdagent: {m}");
            }
            if json {
                match serde_json::to_string(&inv) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail(e),
                }
            } else {
                print!("{}", pdagent::gpus::table(&inv));
            }
            ExitCode::SUCCESS
        }
        Command::Ping {
            args,
            peer,
            addr,
            count,
        } => {
            let Some((v, id)) = load(&args) else {
                return ExitCode::from(EX_USAGE);
            };
            logging::init(v.config.log.format, "warn");
            let rt = match runtime(&v) {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            for i in 0..count.max(1) {
                match rt.block_on(agent::ping(&v, &id, &peer, addr, u64::from(i))) {
                    Ok((
                        AgentResponse::Pong {
                            node,
                            protocol_version,
                            uptime_ms,
                            ..
                        },
                        rtt,
                    )) => println!(
                        "pong from {node} at {addr}: protocol {protocol_version}, up {uptime_ms} ms, rtt {:.3} ms",
                        rtt.as_secs_f64() * 1e3
                    ),
                    Ok((other, _)) => return fail(format!("unexpected answer to ping: {other:?}")),
                    Err(e) => return fail(e),
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("pdagent: error: {e:#}");
    ExitCode::FAILURE
}

fn runtime(v: &Validated) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if v.config.node.worker_threads > 0 {
        b.worker_threads(v.config.node.worker_threads);
    }
    b.enable_all().build()
}

/// Reads, overrides and validates the configuration (no certificates needed).
fn check_config(args: &ConfigArgs) -> ExitCode {
    match load(args) {
        Some((v, id)) => {
            println!(
                "configuration is valid: node {} on {}, certificate valid until {} (unix seconds)",
                v.node_name, v.listen, id.info.not_after_unix
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::from(EX_USAGE),
    }
}

fn load_config(args: &ConfigArgs) -> Result<Validated, ConfigError> {
    let explicit = args.config.as_os_str() != config::DEFAULT_CONFIG_PATH;
    let mut c = config::read_config(&args.config, explicit)?;
    c.apply(&args.overrides);
    c.validate()
}

/// Reads, overrides and validates the configuration and loads the node's identity; on failure
/// prints the error (naming the field) and returns `None`.
fn load(args: &ConfigArgs) -> Option<(Validated, pd_transport::Identity)> {
    let result = (|| -> Result<_, ConfigError> {
        let v = load_config(args)?;
        let id = v.load_identity(now_unix())?;
        Ok((v, id))
    })();
    match result {
        Ok(x) => Some(x),
        Err(e) => {
            eprintln!("pdagent: {e}");
            None
        }
    }
}
