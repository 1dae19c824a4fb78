//! `pdctl demo`: what works so far, on one machine, with real processes. It creates a cluster
//! PKI, issues two node certificates, starts two `pdagent` processes on loopback (node-1 on
//! 127.0.0.1, node-2 on 127.0.0.2), has each ping the other over QUIC with mutual TLS, shows
//! that a host from another cluster is refused, runs a short transport benchmark, and stops the
//! agents with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

struct Running {
    name: String,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port(ip: &str) -> Result<u16> {
    Ok(std::net::UdpSocket::bind((ip, 0))?.local_addr()?.port())
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
    let tmp;
    let dir = match dir {
        Some(d) => {
            if d.join("ca").exists() {
                bail!(
                    "{} already holds a demo; pass another --dir or remove it",
                    d.display()
                );
            }
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = std::env::temp_dir().join(format!("pdctl-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp
        }
    };
    println!("pdagent demo in {}", dir.display());
    println!("\n1. cluster PKI, offline");
    let ca_dir = dir.join("ca");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let init = pki::init_cluster_dir(&ca_dir, "demo", now, 3600)?;
    println!("   CA fingerprint {}", init.ca_fingerprint);
    let nodes = [("node-1", "127.0.0.1"), ("node-2", "127.0.0.2")];
    let mut cfgs = Vec::new();
    for (node, ip) in nodes {
        let listen = format!("{ip}:{}", free_udp_port(ip)?);
        let cfg = write_node(&dir, &ca_dir, node, &listen)?;
        println!("   issued {node}, listening on {listen}");
        cfgs.push((node, listen, cfg));
    }

    println!("\n2. two agents, real processes");
    let mut running = Vec::new();
    for (node, _, cfg) in &cfgs {
        let log = std::fs::File::create(dir.join(format!("{node}.log")))?;
        let child = Command::new(&pdagent)
            .args(["run", "--config"])
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", pdagent.display()))?;
        println!(
            "   started {node} (pid {}), log {}",
            child.id(),
            dir.join(format!("{node}.log")).display()
        );
        running.push(Running {
            name: node.to_string(),
            child,
        });
    }

    println!("\n3. each agent pings the other over QUIC with mutual TLS");
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, (from, _, from_cfg)) in cfgs.iter().enumerate() {
        let (to, to_addr, _) = &cfgs[1 - i];
        let answer = loop {
            match ping(&pdagent, from_cfg, to, to_addr) {
                Ok(a) => break a,
                Err(e) if Instant::now() > deadline => bail!("{from} could not reach {to}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        println!("   {from} -> {answer}");
    }

    println!("\n4. a host from another cluster is refused");
    let foreign_dir = dir.join("foreign");
    pki::init_cluster_dir(&foreign_dir.join("ca"), "foreign", now, 3600)?;
    let foreign_cfg = write_node(
        &foreign_dir,
        &foreign_dir.join("ca"),
        "node-9",
        "127.0.0.9:0",
    )?;
    match ping(&pdagent, &foreign_cfg, "node-1", &cfgs[0].1) {
        Ok(a) => bail!("a foreign host was answered: {a}"),
        Err(e) => println!("   refused: {e}"),
    }
    match ping(&pdagent, &cfgs[1].2, "node-1", &cfgs[0].1) {
        Ok(a) => println!("   node-1 still serves: {a}"),
        Err(e) => bail!("node-1 stopped serving after the refusal: {e}"),
    }

    println!(
        "\n5. transport benchmark (256 MiB x 3, loopback; `pdctl bench transport` for the full run)"
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(pd_transport::bench::run(&opts))?;
    println!(
        "   QUIC {:.2} GB/s, TLS/TCP {:.2} GB/s, TCP {:.2} GB/s, ratio {:.2} (datagram {} bytes)",
        r.quic_gbps, r.tls_tcp_gbps, r.tcp_gbps, r.ratio, r.datagram_bytes
    );

    println!("\n6. SIGTERM: clean shutdown");
    for mut a in running {
        let pid = a.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let until = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = a.child.try_wait()? {
                break s;
            }
            if Instant::now() > until {
                bail!("{} did not stop within 10 s of SIGTERM", a.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        println!("   {} exited with {status}", a.name);
    }
    println!("\nWorks so far: PKI, mutual-TLS QUIC transport, agent life cycle. Not yet: the Raft");
    println!("control plane, GPU discovery, engines and the OpenAI API (see README, Status).");
    Ok(())
}
