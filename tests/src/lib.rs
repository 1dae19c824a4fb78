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
        let ip = listen.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip);
        std::fs::write(
            &cfg,
            format!(
                "[node]\nname = \"{node}\"\ndata_dir = \"{}\"\nlisten = \"{listen}\"\nworker_threads = 1\n\
                 [admin]\nlisten = \"{ip}:0\"\n[serving]\nlisten = \"{ip}:0\"\n",
                data.display(),
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

/// A pdctl configuration that speaks to the local admin socket of the agent with data dir
/// `data_dir`.
pub fn socket_config(data_dir: &Path) -> PathBuf {
    let cfg = data_dir.join("socket-pdctl.toml");
    std::fs::write(
        &cfg,
        format!("socket = \"{}\"\n", data_dir.join("admin.sock").display()),
    )
    .unwrap();
    cfg
}

/// Makes `nodes` eligible to vote (the label `pdagent/voter=eligible`, an admin's decision)
/// through the local admin socket of the agent with data dir `data_dir`, which must be the
/// coordinator's (only the coordinator applies admin writes). Retries until each node is
/// registered.
pub fn make_eligible(data_dir: &Path, nodes: &[String]) {
    let cfg = socket_config(data_dir);
    for node in nodes {
        wait_for(
            &format!("{node} labelled eligible to vote"),
            deadline(Duration::from_secs(60)),
            || {
                let out = pdctl(&[
                    "--config",
                    cfg.to_str().unwrap(),
                    "label",
                    node,
                    "pdagent/voter=eligible",
                ]);
                out.status.success().then_some(())
            },
        );
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

/// A `pdctl local up` cluster in a temp dir, stopped (`pdctl local down`) when dropped.
pub struct LocalCluster {
    /// The API port of every node (127.0.0.k:api_port).
    pub api_port: u16,
    pub dir: tempfile::TempDir,
}

impl LocalCluster {
    /// `nodes` nodes with 2 fixture GPUs each.
    pub fn up(nodes: usize, port: u16) -> Self {
        Self::up_with(nodes, 2, port)
    }

    /// `nodes` nodes with `gpus` fixture GPUs each, transport on `port`, admin on `port + 1`,
    /// OpenAI API on `port + 2`.
    pub fn up_with(nodes: usize, gpus: u32, port: u16) -> Self {
        Self::up_args(nodes, gpus, port, &[])
    }

    /// As `up_with`, with more `pdctl local up` arguments.
    pub fn up_args(nodes: usize, gpus: u32, port: u16, extra: &[&str]) -> Self {
        Self::up_env(nodes, gpus, port, extra, &[])
    }

    /// As `up_args`, with environment for the agents (test faults).
    pub fn up_env(
        nodes: usize,
        gpus: u32,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (nodes, port_s, api_s, gpus) = (
            nodes.to_string(),
            port.to_string(),
            (port + 2).to_string(),
            gpus.to_string(),
        );
        let mut args = vec![
            "local",
            "up",
            "--nodes",
            &nodes,
            "--dir",
            dir.path().to_str().unwrap(),
            "--base-port",
            &port_s,
            "--api-port",
            &api_s,
            "--gpus-per-node",
            &gpus,
        ];
        args.extend_from_slice(extra);
        let out = Command::new(bin("pdctl"))
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "local up: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        LocalCluster {
            dir,
            api_port: port + 2,
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("pdctl.toml")
    }

    pub fn pdctl(&self, args: &[&str]) -> std::process::Output {
        let cfg = self.config();
        let mut a = vec!["--config", cfg.to_str().unwrap()];
        a.extend_from_slice(args);
        pdctl(&a)
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.pdctl(&["status", "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = pdctl(&["local", "down", "--dir", self.dir.path().to_str().unwrap()]);
    }
}

/// A base port free on 127.0.0.1..=127.0.0.n for UDP p, TCP p (enrollment), TCP p+1 (admin)
/// and TCP p+2 (OpenAI API).
pub fn free_base(n: usize) -> u16 {
    for _ in 0..50 {
        let p = free_udp_port("127.0.0.1");
        if p >= 65000 {
            continue;
        }
        let ok = (1..=n).all(|k| {
            let ip = format!("127.0.0.{k}");
            std::net::UdpSocket::bind((ip.as_str(), p)).is_ok()
                && std::net::TcpListener::bind((ip.as_str(), p)).is_ok()
                && std::net::TcpListener::bind((ip.as_str(), p + 1)).is_ok()
                && std::net::TcpListener::bind((ip.as_str(), p + 2)).is_ok()
        });
        if ok {
            return p;
        }
    }
    panic!("no free base port");
}

/// One HTTP/1.1 answer.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        text(&self.body)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|ev| ev.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

/// One plain HTTP/1.1 request (`Connection: close`), read to the end; a test client with no
/// dependencies that sees exactly what the server sent.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpReply> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // A server may answer (413) and close before the whole body is sent: read its answer.
    let sent = s.write_all(body);
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw)
        && raw.is_empty()
    {
        return Err(sent.err().unwrap_or(e));
    }
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk size line"))?;
            let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return Err(bad("chunk cut short"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

/// `POST path` with a JSON body.
pub fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> HttpReply {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("POST {addr}{path}: {e}"))
}

// Serving tests: deployments, metrics, OpenAI answers and SSE streams.

/// `pdctl deploy ... --wait` (120 s), asserting success.
pub fn deploy(l: &LocalCluster, args: &[&str]) {
    let mut a = vec!["deploy"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--wait", "--wait-timeout-s", "120"]);
    let out = l.pdctl(&a);
    assert!(
        out.status.success(),
        "deploy: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The node running each engine.
pub fn engine_nodes(l: &LocalCluster) -> std::collections::HashMap<String, String> {
    let out = l.pdctl(&["engines", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["engine"].as_str().unwrap().to_string(),
                e["node"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A counter's value in a Prometheus text body (0 when absent).
pub fn metric(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// node-k's OpenAI API address.
pub fn node_addr(l: &LocalCluster, node: &str) -> String {
    let k = node.trim_start_matches("node-");
    format!("127.0.0.{k}:{}", l.api_port)
}

/// An agent's `/metrics` text.
pub fn metrics_of(addr: &str) -> String {
    http(addr, "GET", "/metrics", &[], b"").unwrap().text()
}

/// Asserts OpenAI's error shape and returns the error object.
pub fn error_of(r: &HttpReply, status: u16) -> serde_json::Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

/// Concatenated text of an SSE completion or chat stream, and the finish reason.
pub fn stream_text(events: &[String]) -> (String, String, Option<serde_json::Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let Some(c) = v["choices"].as_array().and_then(|c| c.first()) else {
            continue;
        };
        if let Some(t) = c["text"].as_str() {
            text.push_str(t);
        }
        if let Some(t) = c["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, usage)
}

/// Reads a stream to its end; the `data:` payloads.
pub fn read_sse(s: &mut std::net::TcpStream) -> Vec<String> {
    use std::io::Read;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    // Chunked framing aside, every event is a "data: ...\n\n" line.
    text.split('\n')
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// Sends a streaming `/v1/completions` request; the socket, to read the answer from.
pub fn start_stream(addr: &str, body: &serde_json::Value) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// `pdctl engines -o json`: the engines.
pub fn engines(l: &LocalCluster) -> Vec<serde_json::Value> {
    let out = l.pdctl(&["engines", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["engines"].as_array().unwrap().clone()
}

/// An engine's pid in `pdctl engines -o json`'s list.
pub fn pid_of(engines: &[serde_json::Value], engine: &str) -> u64 {
    engines
        .iter()
        .find(|e| e["engine"] == engine)
        .and_then(|e| e["pid"].as_u64())
        .unwrap_or_else(|| panic!("no pid for {engine}: {engines:?}"))
}

/// Reads an HTTP answer's head (through the blank line); the body stays on the socket.
pub fn read_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the answer's head ended early");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The `x-pdagent-route` header of an answer's head.
pub fn route_of(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-pdagent-route")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no route header in {head}"))
}

/// The engine that streams the tokens: the last one of a route.
pub fn streaming_engine(route: &str) -> (String, String) {
    let last = route.rsplit(['>', ' ']).next().unwrap();
    let (engine, node) = last.split_once('@').unwrap();
    (engine.to_string(), node.to_string())
}

/// Runs `tests/python/openai_client.py` (the official OpenAI SDK, completions and chat,
/// streaming and not, errors, and the Prometheus parser on `/metrics`) with `python` against
/// the API at `addr` for `model`, asserting it passed.
pub fn openai_sdk_client(python: &str, addr: &str, model: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(format!("http://{addr}/v1"))
        .arg(model)
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out.stdout).contains("ok"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
