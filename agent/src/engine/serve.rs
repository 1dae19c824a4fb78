//! The engine process: `pdagent engine serve`. It loads the model, then serves the engine
//! protocol (`engine/PROTOCOL.md`) on a unix socket (mode 0600) to its agent.
//!
//! Threads: one compute thread owns the `Engine` and runs its steps (with the engine's own
//! compute pool, one thread by default); the IO runs on a current-thread tokio runtime. They
//! talk through channels, so reading and writing sockets never waits for a step.
//!
//! Frames: every message is one codec frame (`pd_transport::codec`); `ImportKv` and `KvLayer`
//! frames are followed by exactly `payload_bytes` raw bytes. A malformed frame is answered with
//! `Error { kind: Malformed }` and closes that connection; the engine keeps serving others.
//!
//! The engine exits by itself when no agent has been connected for `orphan_timeout` (its
//! agent is gone), when told `Shutdown`, or on SIGTERM.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::Unpoisoned;
use pd_engine::protocol::{AgentMessage, EngineMessage, EngineRole, ErrorKind, check_version};
use pd_engine::{Engine, EngineConfig, EngineEvent, RequestId, RequestKind};
use pd_transport::codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Bound on one protocol frame (a prompt of a long context as text, a finished text).
pub const ENGINE_FRAME_BYTES_MAX: usize = 16 << 20;
/// How often the IO loop checks whether its agent is gone.
const ORPHAN_CHECK: Duration = Duration::from_millis(200);

/// Fault settings for tests, accepted only with `--test-faults`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Exit abruptly (status 101) after emitting this many tokens in total.
    pub crash_after_tokens: Option<u64>,
    /// Stop stepping and answering after this many tokens (the process stays alive).
    pub hang_after_tokens: Option<u64>,
    /// Wait this long before loading the model.
    pub slow_start_ms: u64,
    /// Refuse every KV import.
    pub refuse_kv: bool,
}

impl Faults {
    /// Parses `crash_after_tokens=N,hang_after_tokens=N,slow_start_ms=N,refuse_kv`.
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let num = || {
                v.parse::<u64>()
                    .map_err(|_| format!("--test-faults {k}: {v:?} is not a number"))
            };
            match k {
                "crash_after_tokens" => f.crash_after_tokens = Some(num()?),
                "hang_after_tokens" => f.hang_after_tokens = Some(num()?),
                "slow_start_ms" => f.slow_start_ms = num()?,
                "refuse_kv" => f.refuse_kv = true,
                other => {
                    return Err(format!(
                        "--test-faults: unknown fault {other:?} (crash_after_tokens, hang_after_tokens, slow_start_ms, refuse_kv)"
                    ));
                }
            }
        }
        Ok(f)
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: PathBuf,
    pub role: EngineRole,
    pub engine: EngineConfig,
    pub orphan_timeout: Duration,
    pub faults: Faults,
}

type ConnId = u64;
/// A frame to write, with the raw bytes that follow it; `None` closes the connection.
type Out = Option<(EngineMessage, Option<Vec<u8>>)>;

enum Cmd {
    Open(ConnId, mpsc::UnboundedSender<Out>),
    Msg(ConnId, AgentMessage, Option<Vec<u8>>),
    Closed(ConnId),
}

/// Runs the engine process until its agent is gone or it is told to stop.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    if opts.faults.slow_start_ms > 0 {
        std::thread::sleep(Duration::from_millis(opts.faults.slow_start_ms));
    }
    let loaded = Instant::now();
    let engine = Engine::new(opts.engine.clone())?;
    let hello = engine.hello(opts.role);
    info!(
        model = %hello.model_name,
        fingerprint = format!("{:016x}", hello.model_fingerprint),
        role = ?opts.role,
        load_ms = loaded.elapsed().as_millis() as u64,
        "engine loaded"
    );
    // The largest KV piece a peer may announce: one layer of a whole context.
    let payload_max = hello
        .kv
        .layer_payload_bytes(hello.context_tokens_max as usize) as u64;
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<Cmd>();
    let role = opts.role;
    let faults = opts.faults.clone();
    std::thread::Builder::new()
        .name("engine-compute".into())
        .spawn(move || compute_loop(engine, role, faults, cmd_rx))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(io_loop(opts, cmd_tx, payload_max))
}

async fn io_loop(
    opts: ServeOptions,
    cmd_tx: std_mpsc::Sender<Cmd>,
    payload_max: u64,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&opts.socket);
    let listener = UnixListener::bind(&opts.socket)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", opts.socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))?;
    }
    info!(socket = %opts.socket.display(), "engine serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // (connections open, since when none has been)
    let presence = Arc::new(Mutex::new((0usize, Instant::now())));
    let mut next_id: ConnId = 0;
    let mut check = tokio::time::interval(ORPHAN_CHECK);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                next_id += 1;
                let id = next_id;
                presence.locked().0 += 1;
                let (out_tx, out_rx) = mpsc::unbounded_channel();
                if cmd_tx.send(Cmd::Open(id, out_tx.clone())).is_err() {
                    anyhow::bail!("the compute thread stopped");
                }
                let cmd_tx = cmd_tx.clone();
                let presence = presence.clone();
                tokio::spawn(async move {
                    connection(id, stream, cmd_tx.clone(), out_tx, out_rx, payload_max).await;
                    let _ = cmd_tx.send(Cmd::Closed(id));
                    let mut p = presence.locked();
                    p.0 -= 1;
                    if p.0 == 0 {
                        p.1 = Instant::now();
                    }
                });
            }
            _ = check.tick() => {
                let (open, since) = *presence.locked();
                if open == 0 && since.elapsed() >= opts.orphan_timeout {
                    warn!(
                        timeout_ms = opts.orphan_timeout.as_millis() as u64,
                        "no agent connected for too long: exiting"
                    );
                    break;
                }
            }
            _ = term.recv() => {
                info!("SIGTERM: exiting");
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

/// Reads frames from one connection and hands them to the compute thread; writes what the
/// compute thread sends back.
async fn connection(
    id: ConnId,
    stream: tokio::net::UnixStream,
    cmd_tx: std_mpsc::Sender<Cmd>,
    out_tx: mpsc::UnboundedSender<Out>,
    mut out_rx: mpsc::UnboundedReceiver<Out>,
    payload_max: u64,
) {
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(Some((msg, payload))) = out_rx.recv().await {
            if codec::write_frame(&mut wr, &msg, ENGINE_FRAME_BYTES_MAX)
                .await
                .is_err()
            {
                return;
            }
            if let Some(p) = payload
                && wr.write_all(&p).await.is_err()
            {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    loop {
        let msg: AgentMessage = match codec::read_frame(&mut rd, ENGINE_FRAME_BYTES_MAX).await {
            Ok(m) => m,
            Err(codec::CodecError::Truncated) => break,
            Err(e) => {
                warn!(conn = id, error = %e, "malformed frame from the agent: closing its connection");
                let _ = out_tx.send(Some((
                    EngineMessage::Error {
                        id: None,
                        kind: ErrorKind::Malformed,
                        message: format!("malformed frame: {e}"),
                    },
                    None,
                )));
                break;
            }
        };
        let payload = match &msg {
            AgentMessage::ImportKv { payload_bytes, .. } => {
                if *payload_bytes > payload_max {
                    let _ = out_tx.send(Some((
                        EngineMessage::Error {
                            id: None,
                            kind: ErrorKind::Malformed,
                            message: format!(
                                "a KV piece of {payload_bytes} bytes is larger than one layer of a whole context ({payload_max} bytes)"
                            ),
                        },
                        None,
                    )));
                    break;
                }
                let mut buf = vec![0u8; *payload_bytes as usize];
                if rd.read_exact(&mut buf).await.is_err() {
                    break;
                }
                Some(buf)
            }
            _ => None,
        };
        if cmd_tx.send(Cmd::Msg(id, msg, payload)).is_err() {
            break;
        }
    }
    let _ = out_tx.send(None);
    let _ = writer.await;
}

/// The compute thread: applies commands, steps the engine while it has work, routes each
/// event to the connection that owns its request.
fn compute_loop(mut engine: Engine, role: EngineRole, faults: Faults, rx: std_mpsc::Receiver<Cmd>) {
    let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Out>> = HashMap::new();
    let mut owner: HashMap<RequestId, ConnId> = HashMap::new();
    let mut tokens_out = 0u64;
    loop {
        let first = if engine.has_work() {
            rx.try_recv().ok()
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        let mut next = first;
        while let Some(cmd) = next {
            handle(&mut engine, role, &faults, &mut conns, &mut owner, cmd);
            next = rx.try_recv().ok();
        }
        if !engine.has_work() {
            continue;
        }
        let mut events = Vec::new();
        engine.step_with(&mut |e| events.push(e));
        for e in events {
            if matches!(e, EngineEvent::Token { .. }) {
                tokens_out += 1;
                if faults.crash_after_tokens.is_some_and(|n| tokens_out > n) {
                    warn!(tokens_out, "test fault: crashing");
                    // Let the tokens already handed to the IO thread reach the agent first.
                    std::thread::sleep(Duration::from_millis(200));
                    std::process::exit(101);
                }
                if faults.hang_after_tokens.is_some_and(|n| tokens_out > n) {
                    warn!(tokens_out, "test fault: hanging");
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
            }
            route(&conns, &mut owner, e);
        }
    }
}

fn event_id(e: &EngineEvent) -> RequestId {
    match e {
        EngineEvent::KvStart { id, .. }
        | EngineEvent::KvLayer { id, .. }
        | EngineEvent::Token { id, .. }
        | EngineEvent::Finished { id, .. }
        | EngineEvent::Error { id, .. } => *id,
    }
}

fn route(
    conns: &HashMap<ConnId, mpsc::UnboundedSender<Out>>,
    owner: &mut HashMap<RequestId, ConnId>,
    e: EngineEvent,
) {
    let id = event_id(&e);
    let terminal = matches!(e, EngineEvent::Finished { .. } | EngineEvent::Error { .. });
    let conn = if terminal {
        owner.remove(&id)
    } else {
        owner.get(&id).copied()
    };
    if let Some(tx) = conn.and_then(|c| conns.get(&c)) {
        let _ = tx.send(Some(EngineMessage::from_event(e)));
    }
}

fn handle(
    engine: &mut Engine,
    role: EngineRole,
    faults: &Faults,
    conns: &mut HashMap<ConnId, mpsc::UnboundedSender<Out>>,
    owner: &mut HashMap<RequestId, ConnId>,
    cmd: Cmd,
) {
    let (conn, msg, payload) = match cmd {
        Cmd::Open(c, tx) => {
            conns.insert(c, tx);
            return;
        }
        Cmd::Closed(c) => {
            conns.remove(&c);
            // Requests of a connection that went away are cancelled: their KV is freed now.
            let orphaned: Vec<RequestId> = owner
                .iter()
                .filter(|(_, o)| **o == c)
                .map(|(id, _)| *id)
                .collect();
            for id in orphaned {
                owner.remove(&id);
                let _ = engine.cancel(id);
            }
            return;
        }
        Cmd::Msg(c, m, p) => (c, m, p),
    };
    let Some(tx) = conns.get(&conn).cloned() else {
        return;
    };
    let reply = |m: EngineMessage| {
        let _ = tx.send(Some((m, None)));
    };
    let refuse = |id: RequestId, kind: ErrorKind, message: String| {
        let _ = tx.send(Some((
            EngineMessage::Error {
                id: Some(id),
                kind,
                message,
            },
            None,
        )));
    };
    let role_refusal = |id: RequestId, what: &str| {
        refuse(
            id,
            ErrorKind::BadRequest,
            format!("this engine's role is {role:?}; it does not {what}"),
        )
    };
    match msg {
        AgentMessage::Hello {
            protocol_version,
            agent,
        } => match check_version(protocol_version) {
            Ok(()) => {
                info!(%agent, conn, "agent connected");
                reply(EngineMessage::Hello(engine.hello(role)));
            }
            Err(message) => {
                let _ = tx.send(Some((
                    EngineMessage::Error {
                        id: None,
                        kind: ErrorKind::VersionMismatch,
                        message,
                    },
                    None,
                )));
                let _ = tx.send(None);
            }
        },
        AgentMessage::Generate { id, .. }
        | AgentMessage::Resume { id, .. }
        | AgentMessage::Prefill { id, .. } => {
            let queued = match msg {
                AgentMessage::Generate {
                    id,
                    prompt,
                    sampling,
                } if role != EngineRole::Prefill => {
                    engine.add_request(id, prompt, sampling, RequestKind::Generate)
                }
                AgentMessage::Resume {
                    id,
                    prompt,
                    output,
                    sampling,
                } if role != EngineRole::Prefill => {
                    engine.resume_request(id, prompt, output, sampling)
                }
                AgentMessage::Prefill {
                    id,
                    prompt,
                    sampling,
                } if role != EngineRole::Decode => {
                    engine.add_request(id, prompt, sampling, RequestKind::Prefill)
                }
                AgentMessage::Prefill { .. } => {
                    return role_refusal(id, "prefill for another engine");
                }
                _ => return role_refusal(id, "generate"),
            };
            match queued {
                Ok(()) => {
                    owner.insert(id, conn);
                    reply(EngineMessage::Accepted { id });
                    if let Some(prompt_tokens) = engine.waiting_prompt_tokens(id) {
                        reply(EngineMessage::Admitted { id, prompt_tokens });
                    }
                }
                Err(e) => reply(EngineMessage::error(Some(id), &e)),
            }
        }
        AgentMessage::Decode {
            id,
            header,
            prompt_tokens,
            first_token,
            sampling,
        } => {
            if role == EngineRole::Prefill {
                return role_refusal(id, "decode");
            }
            if faults.refuse_kv {
                return refuse(id, ErrorKind::KvRefused, "test fault: refusing KV".into());
            }
            match engine.import_begin(id, &header, prompt_tokens, first_token, sampling) {
                Ok(()) => {
                    owner.insert(id, conn);
                    reply(EngineMessage::Accepted { id });
                }
                Err(e) => reply(EngineMessage::error(Some(id), &e)),
            }
        }
        ref m @ AgentMessage::ImportKv { id, .. } => {
            let Some((_, piece)) = m.import_piece(payload.unwrap_or_default()) else {
                return;
            };
            if owner.get(&id) != Some(&conn) {
                return refuse(
                    id,
                    ErrorKind::UnknownRequest,
                    format!("request {id} has no KV import in progress on this connection"),
                );
            }
            if let Err(e) = engine.import_piece(id, &piece) {
                // The engine dropped the import: this is the request's terminal event.
                owner.remove(&id);
                reply(EngineMessage::error(Some(id), &e));
            }
        }
        AgentMessage::Cancel { id } => {
            // Unknown ids (already finished) are ignored: the request had its terminal event.
            if owner.get(&id) == Some(&conn) {
                let _ = engine.cancel(id);
            }
        }
        AgentMessage::Stats => reply(EngineMessage::Stats(engine.stats())),
        AgentMessage::KvEvents => reply(EngineMessage::KvEvents {
            events: engine.take_kv_events(),
        }),
        AgentMessage::Shutdown => {
            info!("told to shut down");
            std::process::exit(0);
        }
    }
}
