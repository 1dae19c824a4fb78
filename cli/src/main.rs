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

mod demo;

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "pdctl", version, about = "Operate a pdagent cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what works so far on this machine: PKI, two agents on loopback pinging each other
    /// over mutual-TLS QUIC, a refused foreign host, a short transport benchmark.
    Demo {
        /// Where to put the demo's files (default: a new folder under the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The cluster's PKI, offline: create it, issue node certificates.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Benchmarks that print figures and a ratio against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo { dir } => demo::run(dir)?,
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
