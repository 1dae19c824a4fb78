//! Helpers for pdagent's multi-process tests: find the release binaries, make a cluster PKI
//! with the real `pdctl`, start real `pdagent` processes on loopback, wait for conditions with
//! deadlines (never fixed sleeps), and run one multi-process test at a time.
//!
//! The binaries must be built first (`cargo build --release --bins`, which the README's test
//! command does). `PD_TEST_TIMEOUT_SCALE` multiplies every deadline for slow machines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// Multi-process tests hold this so that they run one at a time within a test binary (cargo
/// runs test binaries one after another).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A deadline, scaled by `PD_TEST_TIMEOUT_SCALE`.
pub fn deadline(base: Duration) -> Instant {
    let scale: f64 = std::env::var("PD_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    Instant::now() + base.mul_f64(scale.max(0.1))
}

/// Polls `cond` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(what: &str, until: Instant, mut cond: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Path of a release binary of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let env = format!("{}_BIN", name.to_ascii_uppercase());
    if let Ok(p) = std::env::var(&env) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (`cargo build --release --bins`) or set {env}",
        p.display()
    );
    p
}

pub fn pdctl(args: &[&str]) -> Output {
    Command::new(bin("pdctl"))
        .args(args)
        .output()
        .expect("run pdctl")
}

pub fn pdagent(args: &[&str]) -> Output {
    Command::new(bin("pdagent"))
        .args(args)
        .output()
        .expect("run pdagent")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A cluster PKI made by `pdctl cluster init` in a temp dir, with node folders on demand.
pub struct TestPki {
    pub root: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let ca = root.path().join("ca");
        let out = pdctl(&["cluster", "init", "--dir", ca.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "pdctl cluster init: {}",
            text(&out.stderr)
        );
        TestPki { root }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.path().join("ca")
    }

    /// Issues a certificate for `node` and lays out its data dir with `pki/`; returns a config
    /// file for it listening on `listen`.
    pub fn node(&self, node: &str, listen: &str) -> PathBuf {
        let out = pdctl(&[
            "cluster",
            "cert",
            "--dir",
            self.ca_dir().to_str().unwrap(),
            "--node",
            node,
        ]);
        assert!(
            out.status.success(),
            "pdctl cluster cert: {}",
            text(&out.stderr)
        );
        let data = self.root.path().join(node);
        std::fs::create_dir_all(&data).unwrap();
        let status = Command::new("cp")
            .arg("-r")
            .arg(self.ca_dir().join("nodes").join(node))
            .arg(data.join("pki"))
            .status()
            .unwrap();
        assert!(status.success());
        let cfg = self.root.path().join(format!("{node}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[node]\nname = \"{node}\"\ndata_dir = \"{}\"\nlisten = \"{listen}\"\nworker_threads = 1\n\
                 [admin]\nlisten = \"{}:0\"\n",
                data.display(),
                listen.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip)
            ),
        )
        .unwrap();
        cfg
    }
}

/// Raft timings for tests: fast enough to keep tests short, slow enough to hold on a loaded
/// 2-core machine.
pub const TEST_RAFT: &str = "[raft]\nheartbeat_ms = 150\nelection_timeout_min_ms = 1000\nelection_timeout_max_ms = 2000\ncoordinator_interval_ms = 200\n";

impl TestPki {
    /// A node config (as `node`) that joins through `seeds` ("name@ip:port") with test timings.
    pub fn cluster_node(&self, node: &str, listen: &str, seeds: &[String]) -> PathBuf {
        let cfg = self.node(node, listen);
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        text.push_str(&format!(
            "[cluster]\nseeds = [{}]\nheartbeat_ms = 100\nsuspect_after_ms = 1000\ndown_after_ms = 3000\n{TEST_RAFT}",
            seeds.join(", ")
        ));
        std::fs::write(&cfg, text).unwrap();
        cfg
    }
}

/// `pdagent status --json` against the agent of `config` (or `agent`, name@addr).
pub fn status(config: &Path, agent: Option<&str>) -> Option<serde_json::Value> {
    let mut args = vec!["status", "--json", "--config", config.to_str().unwrap()];
    if let Some(a) = agent {
        args.extend(["--agent", a]);
    }
    let out = pdagent(&args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_str(text(&out.stdout).trim()).ok()
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A free UDP port on an address (bound then released: good enough on loopback).
pub fn free_udp_port(ip: &str) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `pdagent run`, killed when dropped. Its stderr goes to a file.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(config: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = config.with_extension("log");
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin("pdagent"));
        cmd.arg("run").arg("--config").arg(config).args(extra_args);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn pdagent");
        Agent { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, until: Instant) -> Option<i32> {
        wait_for("agent to exit", until, || self.child.try_wait().unwrap()).code()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
