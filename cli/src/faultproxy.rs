//! A UDP fault proxy for the transport: put it in front of an agent (`pdctl local proxy NODE`
//! does the wiring for a local cluster) and it forwards every datagram between the agent and
//! its peers, dropping, delaying, blackholing or cutting them on command.
//!
//! Each client address (a peer agent's QUIC endpoint) is a flow with its own upstream socket,
//! so the agent sees one address per peer, as without the proxy. Directions: `up` is towards
//! the agent behind the proxy, `down` is back to the peer.
//!
//! Faults are changed while it runs with one command per line on stdin (`help` lists them);
//! every command is answered with one line on stdout, and a cut flow is announced with a line
//! that begins `cut`. The decisions ([`Faults::decide`]) are a pure function of the settings,
//! the flow's byte count and a seeded random stream.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::load::Rng;

/// Which way a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Peer to the agent behind the proxy.
    Up,
    /// The agent back to the peer.
    Down,
}

/// The fault settings; all off by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Probability of dropping a datagram, per direction.
    pub drop_up: f64,
    pub drop_down: f64,
    /// Added one-way latency, both directions.
    pub delay: Duration,
    pub blackhole_up: bool,
    pub blackhole_down: bool,
    /// Cut a flow (both directions, for good) once it carried this many more bytes, counted
    /// from when the setting was given.
    pub cut_after: Option<u64>,
    /// Only the flows of this peer host are cut (all when unset).
    pub cut_peer: Option<std::net::IpAddr>,
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drop up {} down {}, delay {} ms, blackhole {}, cut {}",
            self.drop_up,
            self.drop_down,
            self.delay.as_millis(),
            match (self.blackhole_up, self.blackhole_down) {
                (false, false) => "none",
                (true, false) => "up",
                (false, true) => "down",
                (true, true) => "both",
            },
            match (self.cut_after, self.cut_peer) {
                (None, _) => "off".to_string(),
                (Some(n), None) => format!("after {n} bytes"),
                (Some(n), Some(ip)) => format!("after {n} bytes from {ip}"),
            },
        )
    }
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward after this delay.
    Forward(Duration),
    Drop,
    /// This datagram crossed the flow's cut: dropped, and so is everything after it.
    Cut,
}

/// A flow's state as far as the faults are concerned.
#[derive(Debug, Clone, Default)]
pub struct FlowState {
    /// Bytes since the cut was armed (both directions).
    pub bytes: u64,
    pub cut: bool,
}

impl Faults {
    /// The fate of a datagram of `len` bytes going `dir` on the flow of `peer`; `roll` is a
    /// uniform draw in [0, 1).
    pub fn decide(
        &self,
        flow: &mut FlowState,
        peer: std::net::IpAddr,
        dir: Dir,
        len: usize,
        roll: f64,
    ) -> Verdict {
        if flow.cut {
            return Verdict::Drop;
        }
        if let Some(limit) = self.cut_after
            && self.cut_peer.is_none_or(|p| p == peer)
        {
            flow.bytes += len as u64;
            if flow.bytes > limit {
                flow.cut = true;
                return Verdict::Cut;
            }
        }
        let (blackhole, drop) = match dir {
            Dir::Up => (self.blackhole_up, self.drop_up),
            Dir::Down => (self.blackhole_down, self.drop_down),
        };
        if blackhole || roll < drop {
            return Verdict::Drop;
        }
        Verdict::Forward(self.delay)
    }
}

/// A command read from stdin.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyCommand {
    Drop(f64, Option<Dir>),
    Delay(Duration),
    Blackhole(Option<Dir>, bool),
    CutAfter(u64, Option<std::net::IpAddr>),
    /// Every fault off, cut flows restored.
    Heal,
    Stats,
    Help,
    Quit,
}

pub const COMMANDS_HELP: &str = "commands: drop P [up|down] (probability 0..1, both ways unless one is named) | delay MS | blackhole up|down|both|none | cut BYTES [PEER_IP] (cut each flow, or the peer host's, after BYTES more bytes) | heal | stats | quit";

/// Parses one command line.
pub fn parse_command(line: &str) -> Result<ProxyCommand, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let dir = |w: Option<&&str>| -> Result<Option<Dir>, String> {
        match w.copied() {
            None | Some("both") => Ok(None),
            Some("up") => Ok(Some(Dir::Up)),
            Some("down") => Ok(Some(Dir::Down)),
            Some(other) => Err(format!("{other:?} is not a direction (up, down, both)")),
        }
    };
    let number = |w: Option<&&str>, what: &str| -> Result<f64, String> {
        let w = w.ok_or_else(|| format!("{what} is missing"))?;
        w.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{what}: {w:?} is not a number >= 0"))
    };
    let cmd = match words.first().copied() {
        Some("drop") => {
            let p = number(words.get(1), "drop probability")?;
            if p > 1.0 {
                return Err(format!("drop probability {p} is above 1"));
            }
            ProxyCommand::Drop(p, dir(words.get(2))?)
        }
        Some("delay") => {
            let ms = number(words.get(1), "delay in ms")?;
            if ms > 60_000.0 {
                return Err(format!("delay {ms} ms is above 60000"));
            }
            ProxyCommand::Delay(Duration::from_micros((ms * 1000.0) as u64))
        }
        Some("blackhole") => match words.get(1).copied() {
            Some("none") => ProxyCommand::Blackhole(None, false),
            Some(_) => ProxyCommand::Blackhole(dir(words.get(1))?, true),
            None => return Err("blackhole needs up, down, both or none".into()),
        },
        Some("cut") => {
            let peer = match words.get(2) {
                None => None,
                Some(w) => Some(
                    w.parse()
                        .map_err(|_| format!("cut: {w:?} is not an IP address"))?,
                ),
            };
            ProxyCommand::CutAfter(number(words.get(1), "cut BYTES")? as u64, peer)
        }
        Some("heal") => ProxyCommand::Heal,
        Some("stats") => ProxyCommand::Stats,
        Some("help") => ProxyCommand::Help,
        Some("quit") | Some("exit") => ProxyCommand::Quit,
        Some(other) => return Err(format!("unknown command {other:?}; {COMMANDS_HELP}")),
        None => return Err(COMMANDS_HELP.to_string()),
    };
    if words.len() > 3 {
        return Err(format!("too many words in {line:?}; {COMMANDS_HELP}"));
    }
    Ok(cmd)
}

impl Faults {
    /// Applies a settings command; other commands change nothing.
    pub fn apply(&mut self, cmd: &ProxyCommand) {
        match *cmd {
            ProxyCommand::Drop(p, d) => {
                if d != Some(Dir::Down) {
                    self.drop_up = p;
                }
                if d != Some(Dir::Up) {
                    self.drop_down = p;
                }
            }
            ProxyCommand::Delay(d) => self.delay = d,
            ProxyCommand::Blackhole(d, on) => {
                if d != Some(Dir::Down) {
                    self.blackhole_up = on;
                }
                if d != Some(Dir::Up) {
                    self.blackhole_down = on;
                }
            }
            ProxyCommand::CutAfter(n, peer) => {
                self.cut_after = Some(n);
                self.cut_peer = peer;
            }
            ProxyCommand::Heal => *self = Faults::default(),
            ProxyCommand::Stats | ProxyCommand::Help | ProxyCommand::Quit => {}
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    forwarded: u64,
    forwarded_bytes: u64,
    dropped: u64,
}

struct Shared {
    faults: Faults,
    rng: Rng,
    flows: HashMap<SocketAddr, FlowState>,
    up: Counts,
    down: Counts,
    /// Lines to print (cuts), drained by the command loop's printer.
    notices: Vec<String>,
}

impl Shared {
    fn decide(&mut self, peer: SocketAddr, dir: Dir, len: usize) -> Verdict {
        let roll = self.rng.unit();
        let flow = self.flows.entry(peer).or_default();
        let v = self.faults.decide(flow, peer.ip(), dir, len, roll);
        let c = match dir {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        };
        match v {
            Verdict::Forward(_) => {
                c.forwarded += 1;
                c.forwarded_bytes += len as u64;
            }
            Verdict::Drop => c.dropped += 1,
            Verdict::Cut => {
                c.dropped += 1;
                self.notices.push(format!(
                    "cut flow {peer} after {} bytes",
                    self.flows.get(&peer).map_or(0, |f| f.bytes)
                ));
            }
        }
        v
    }
}

/// Datagram queue of one direction: sent in order, each no earlier than its due time.
type Queue = mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>;

fn sender(send: impl Fn(Vec<u8>) + Send + 'static) -> Queue {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            send(bytes);
        }
    });
    tx
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lines of stdin, read by a thread of their own; the channel closes at the end of stdin.
pub fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// How long the proxy retries an address still held (by the agent that just left it).
const BIND_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The proxy's socket, where peers send. An address in use is retried for a few seconds: the
/// agent that held it may still be exiting.
pub async fn bind(listen: SocketAddr) -> Result<UdpSocket> {
    let until = tokio::time::Instant::now() + BIND_BUSY_WAIT;
    loop {
        match UdpSocket::bind(listen).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            r => {
                return r.with_context(|| format!("binding the proxy's UDP address {listen}"));
            }
        }
    }
}

/// Runs the proxy on `front` (from [`bind`]) until `quit` or the end of `lines` (stdin:
/// [`stdin_lines`]); answers and notices go to `say`, one line each.
pub async fn run(
    front: UdpSocket,
    upstream: SocketAddr,
    faults: Faults,
    seed: u64,
    mut lines: mpsc::UnboundedReceiver<String>,
    say: impl Fn(String),
) -> Result<()> {
    let listen = front.local_addr()?;
    let front = Arc::new(front);
    let shared = Arc::new(Mutex::new(Shared {
        faults,
        rng: Rng::new(seed),
        flows: HashMap::new(),
        up: Counts::default(),
        down: Counts::default(),
        notices: Vec::new(),
    }));
    // Datagrams from peers.
    let front_task = {
        let front = front.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut flows: HashMap<SocketAddr, Queue> = HashMap::new();
            // The return paths end with this task (the JoinSet aborts them when dropped), so
            // no socket of the proxy outlives `run`.
            let mut paths = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, peer)) = front.recv_from(&mut buf).await else {
                    continue;
                };
                let verdict = lock(&shared).decide(peer, Dir::Up, n);
                let Verdict::Forward(delay) = verdict else {
                    continue;
                };
                let queue = match flows.get(&peer) {
                    Some(q) => q.clone(),
                    None => {
                        let Ok(back) = open_upstream(upstream).await else {
                            continue;
                        };
                        let back = Arc::new(back);
                        paths.spawn(return_path(
                            back.clone(),
                            front.clone(),
                            peer,
                            shared.clone(),
                        ));
                        let q = sender(move |b| {
                            let _ = back.try_send(&b);
                        });
                        flows.insert(peer, q.clone());
                        q
                    }
                };
                let _ = queue.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
            }
        })
    };
    // Commands.
    say(format!(
        "proxy {listen} -> {upstream}: {}",
        lock(&shared).faults
    ));
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let line = tokio::select! {
            l = lines.recv() => l,
            _ = tick.tick() => {
                for n in std::mem::take(&mut lock(&shared).notices) {
                    say(n);
                }
                continue;
            }
        };
        let Some(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        match parse_command(&line) {
            Ok(ProxyCommand::Quit) => break,
            Ok(ProxyCommand::Help) => say(COMMANDS_HELP.to_string()),
            Ok(ProxyCommand::Stats) => {
                let s = lock(&shared);
                say(format!(
                    "stats flows {} cut {} up forwarded {} ({} bytes) dropped {} down forwarded {} ({} bytes) dropped {}",
                    s.flows.len(),
                    s.flows.values().filter(|f| f.cut).count(),
                    s.up.forwarded,
                    s.up.forwarded_bytes,
                    s.up.dropped,
                    s.down.forwarded,
                    s.down.forwarded_bytes,
                    s.down.dropped
                ));
            }
            Ok(cmd) => {
                let mut s = lock(&shared);
                s.faults.apply(&cmd);
                // A new cut counts from now; healing restores cut flows.
                if matches!(cmd, ProxyCommand::CutAfter(..) | ProxyCommand::Heal) {
                    for f in s.flows.values_mut() {
                        *f = FlowState::default();
                    }
                }
                say(format!("ok: {}", s.faults));
            }
            Err(e) => say(format!("error: {e}")),
        }
    }
    front_task.abort();
    Ok(())
}

async fn open_upstream(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(upstream).await?;
    Ok(s)
}

/// Datagrams from the agent back to `peer`.
async fn return_path(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    peer: SocketAddr,
    shared: Arc<Mutex<Shared>>,
) {
    let queue = sender(move |b| {
        let _ = front.try_send_to(&b, peer);
    });
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(n) = back.recv(&mut buf).await else {
            // ICMP errors surface here on some systems; the flow stays.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let verdict = lock(&shared).decide(peer, Dir::Down, n);
        if let Verdict::Forward(delay) = verdict {
            let _ = queue.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
        }
    }
}

/// The faults to start with, as command-line flags (the same as the stdin commands).
#[derive(clap::Args, Debug, Clone)]
pub struct FaultArgs {
    /// Drop this share of datagrams, both directions (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub drop: f64,
    /// Add this one-way latency, both directions.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Drop everything going up (to the agent), down (from it) or both.
    #[arg(long)]
    pub blackhole: Option<String>,
    /// Cut each flow, for good, once it carried this many bytes.
    #[arg(long)]
    pub cut_after: Option<u64>,
    /// Cut only the flows of this peer host (with --cut-after).
    #[arg(long, requires = "cut_after")]
    pub cut_peer: Option<std::net::IpAddr>,
    /// Seed of the drop decisions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl FaultArgs {
    pub fn faults(&self) -> Result<Faults> {
        let mut f = Faults::default();
        let mut lines = vec![
            format!("drop {}", self.drop),
            format!("delay {}", self.delay_ms),
        ];
        if let Some(b) = &self.blackhole {
            lines.push(format!("blackhole {b}"));
        }
        if let Some(n) = self.cut_after {
            match self.cut_peer {
                Some(ip) => lines.push(format!("cut {n} {ip}")),
                None => lines.push(format!("cut {n}")),
            }
        }
        for l in lines {
            match parse_command(&l) {
                Ok(cmd) => f.apply(&cmd),
                Err(e) => bail!("{e}"),
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_apply() {
        let mut f = Faults::default();
        for line in [
            "drop 0.25 up",
            "delay 20",
            "blackhole down",
            "cut 1000 127.0.0.2",
        ] {
            f.apply(&parse_command(line).unwrap());
        }
        assert_eq!(
            f,
            Faults {
                drop_up: 0.25,
                drop_down: 0.0,
                delay: Duration::from_millis(20),
                blackhole_up: false,
                blackhole_down: true,
                cut_after: Some(1000),
                cut_peer: Some("127.0.0.2".parse().unwrap()),
            }
        );
        f.apply(&parse_command("heal").unwrap());
        assert_eq!(f, Faults::default());
        for bad in [
            "drop 2",
            "drop x",
            "delay -1",
            "blackhole sideways",
            "cut",
            "cut 5 nowhere",
            "jump",
            "",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} is refused");
        }
        assert_eq!(parse_command("quit"), Ok(ProxyCommand::Quit));
    }

    fn ip() -> std::net::IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn cut_counts_both_directions_and_is_final() {
        let f = Faults {
            cut_after: Some(100),
            ..Faults::default()
        };
        let mut flow = FlowState::default();
        assert_eq!(
            f.decide(&mut flow, ip(), Dir::Up, 60, 0.5),
            Verdict::Forward(Duration::ZERO)
        );
        assert_eq!(
            f.decide(&mut flow, ip(), Dir::Down, 40, 0.5),
            Verdict::Forward(Duration::ZERO)
        );
        assert_eq!(f.decide(&mut flow, ip(), Dir::Up, 1, 0.5), Verdict::Cut);
        assert_eq!(f.decide(&mut flow, ip(), Dir::Down, 1, 0.5), Verdict::Drop);
        // Another flow is not cut.
        let mut other = FlowState::default();
        assert!(matches!(
            f.decide(&mut other, ip(), Dir::Up, 10, 0.5),
            Verdict::Forward(_)
        ));
        // A cut of one peer host's flows leaves the others alone.
        let only = Faults {
            cut_after: Some(0),
            cut_peer: Some("127.0.0.2".parse().unwrap()),
            ..Faults::default()
        };
        let mut flow = FlowState::default();
        assert!(matches!(
            only.decide(&mut flow, ip(), Dir::Up, 10, 0.5),
            Verdict::Forward(_)
        ));
        let peer = "127.0.0.2".parse().unwrap();
        assert_eq!(only.decide(&mut flow, peer, Dir::Up, 10, 0.5), Verdict::Cut);
    }

    #[test]
    fn drops_follow_the_probability_and_the_seed() {
        let f = Faults {
            drop_up: 0.3,
            blackhole_down: true,
            ..Faults::default()
        };
        let mut rng = Rng::new(7);
        let mut flow = FlowState::default();
        let dropped = (0..10_000)
            .filter(|_| f.decide(&mut flow, ip(), Dir::Up, 10, rng.unit()) == Verdict::Drop)
            .count();
        assert!((2_700..3_300).contains(&dropped), "{dropped}");
        assert_eq!(
            f.decide(&mut flow, ip(), Dir::Down, 10, 0.99),
            Verdict::Drop
        );
        let a: Vec<f64> = (0..5)
            .map({
                let mut r = Rng::new(1);
                move |_| r.unit()
            })
            .collect();
        let b: Vec<f64> = (0..5)
            .map({
                let mut r = Rng::new(1);
                move |_| r.unit()
            })
            .collect();
        assert_eq!(a, b);
    }
}
