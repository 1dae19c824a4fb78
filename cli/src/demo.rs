//! `pdctl demo`: what works so far, on one machine, with real processes: a local cluster of
//! three agents (offline PKI, Raft over mutual-TLS QUIC, fixture GPUs), a write through the
//! admin API, the coordinator killed and replaced, a foreign host refused, a short transport
//! benchmark, and a clean stop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pd_transport::pki;

/// Finds `pdagent` next to this executable, then on PATH.
pub fn find_pdagent() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("pdagent")));
    if let Some(p) = beside.filter(|p| p.exists()) {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("pdagent"))
        .find(|p| p.exists())
        .context(
            "pdagent not found next to pdctl or on PATH (build it: cargo build --release --bins)",
        )
}

fn write_node(dir: &Path, ca_dir: &Path, node: &str, listen: &str) -> Result<PathBuf> {
    pki::issue_node_files(ca_dir, node, 30)?;
    let data = dir.join(node);
    std::fs::create_dir_all(data.join("pki"))?;
    for f in [pki::NODE_CERT_FILE, pki::NODE_KEY_FILE, pki::CA_CERT_FILE] {
        std::fs::copy(
            ca_dir.join("nodes").join(node).join(f),
            data.join("pki").join(f),
        )?;
    }
    let cfg = dir.join(format!("{node}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"{node}\"\ndata_dir = \"{}\"\nlisten = \"{listen}\"\nworker_threads = 1\n",
            data.display()
        ),
    )?;
    Ok(cfg)
}

fn ping(pdagent: &Path, from_cfg: &Path, peer: &str, addr: &str) -> Result<String, String> {
    let out = Command::new(pdagent)
        .args(["ping", "--config"])
        .arg(from_cfg)
        .args(["--peer", peer, "--addr", addr])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .trim()
    .to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

pub fn run(dir: Option<PathBuf>) -> Result<()> {
    let pdagent = find_pdagent()?;
    let dir = match dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                bail!("{} is not empty; pass another --dir", d.display());
            }
            d
        }
        None => std::env::temp_dir().join(format!("pdctl-demo-{}", std::process::id())),
    };
    println!("pdagent demo in {}", dir.display());

    println!(
        "\n1. a cluster of three agents on this machine (pdctl local up): node-1 founds it with an"
    );
    println!(
        "   offline certificate and the CA key; node-2 and node-3 join with the join token (their own"
    );
    println!(
        "   key pairs, certificates signed by the coordinator); node-k on 127.0.0.k, two fixture GPUs"
    );
    println!("   each, Raft over mutual-TLS QUIC");
    let base = crate::local::free_base_port(3)?;
    let (dir, status) = crate::local::create(3, 2, &dir, base, base + 2, true)?;
    let result = tour(&dir, &pdagent, status);
    let _ = crate::local::down(&dir, true);
    println!(
        "\n7. all agents stopped (SIGTERM); files kept in {}",
        dir.display()
    );
    result?;
    println!(
        "\nWorks so far: PKI and joining with tokens, mutual-TLS QUIC transport, GPU inventory, the Raft control plane,"
    );
    println!(
        "the admin API and pdctl. Also built: engines (pdctl deploy), pdagent engine generate, pdctl plan.\nNot yet: the OpenAI API, KV shipping between agents (see README, Status)."
    );
    Ok(())
}

fn tour(dir: &Path, pdagent: &Path, status: serde_json::Value) -> Result<()> {
    let client = crate::client::AdminClient::from_config(&dir.join("pdctl.toml"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    crate::print_status(&status, false);

    println!("\n2. a write through the admin API (pdctl label node-2 rack=r1), replicated by Raft");
    rt.block_on(client.request(
        "PUT",
        "/v1/nodes/node-2/labels/rack",
        Some(serde_json::json!({"value": "r1"})),
    ))?;
    crate::print_status(
        &rt.block_on(client.request("GET", "/v1/status", None))?,
        false,
    );

    println!("\n3. the coordinator's host loses power (SIGKILL)");
    let leader = status["coordinator"]
        .as_str()
        .unwrap_or("node-1")
        .to_string();
    let killed = Instant::now();
    crate::local::kill(dir, &leader)?;
    let deadline = killed + Duration::from_secs(30);
    let after = loop {
        if let Ok(v) = rt.block_on(client.request("GET", "/v1/status", None))
            && v["coordinator"].is_string()
            && v["coordinator"] != leader.as_str()
        {
            break v;
        }
        if Instant::now() > deadline {
            bail!("no new coordinator within 30 s of killing {leader}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "   {leader} killed; new coordinator after {} ms",
        killed.elapsed().as_millis()
    );
    crate::print_status(&after, false);
    crate::local::start(dir, &leader)?;
    println!("   {leader} started again: it rejoins from its data dir");

    println!("\n4. a host from another cluster is refused at the TLS handshake");
    let foreign = dir.join("foreign");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    pki::init_cluster_dir(&foreign.join("ca"), "foreign", now, 3600)?;
    let foreign_cfg = write_node(&foreign, &foreign.join("ca"), "node-9", "127.0.0.9:0")?;
    let node2 = format!(
        "127.0.0.2:{}",
        status["nodes"][1]["address"]
            .as_str()
            .unwrap_or(":0")
            .rsplit(':')
            .next()
            .unwrap_or("0")
    );
    match ping(pdagent, &foreign_cfg, "node-2", &node2) {
        Ok(a) => bail!("a foreign host was answered: {a}"),
        Err(e) => println!("   refused: {}", e.trim_start_matches("pdagent: error: ")),
    }

    println!("\n5. GPUs in the cluster (fixtures here; NVML on GPU hosts)");
    let v = rt.block_on(client.request("GET", "/v1/status", None))?;
    for n in v["nodes"].as_array().into_iter().flatten() {
        for g in n["gpus"].as_array().into_iter().flatten() {
            println!(
                "   {} GPU {} {} {}",
                n["name"].as_str().unwrap_or(""),
                g["index"],
                g["name"].as_str().unwrap_or(""),
                g["health"].as_str().unwrap_or("")
            );
        }
    }

    println!(
        "\n6. transport benchmark (256 MiB x 3, loopback; `pdctl bench transport` for the full run)"
    );
    let transport = pd_transport::TransportConfig {
        initial_datagram_bytes: 8952,
        ..Default::default()
    };
    let opts = pd_transport::bench::BenchOptions {
        bytes: 256 << 20,
        streams: 1,
        reps: 3,
        transport,
    };
    let mrt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = mrt.block_on(pd_transport::bench::run(&opts))?;
    println!(
        "   QUIC {:.2} GB/s, TLS/TCP {:.2} GB/s, TCP {:.2} GB/s, ratio {:.2} (datagram {} bytes)",
        r.quic_gbps, r.tls_tcp_gbps, r.tcp_gbps, r.ratio, r.datagram_bytes
    );
    Ok(())
}
