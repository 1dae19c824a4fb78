//! The agent's side of the engine protocol: spawning an engine process of this same binary,
//! connecting to its socket, the hello, and requests whose replies are routed back by request
//! id.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::Unpoisoned;
use pd_engine::protocol::{AgentMessage, EngineHello, EngineMessage, PROTOCOL_VERSION};
use pd_engine::{EngineStats, KvEvent, KvPiece, RequestId};
use pd_transport::codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use super::serve::ENGINE_FRAME_BYTES_MAX;

/// A reply frame, the raw bytes that followed it (KV layers), and when it was read off the
/// socket (so that time spent by the caller does not count as the engine's).
pub type Reply = (EngineMessage, Option<Vec<u8>>, Instant);

#[derive(Debug, thiserror::Error)]
pub enum EngineClientError {
    #[error("engine at {path} did not answer within {ms} ms: {why}")]
    Unreachable { path: PathBuf, ms: u64, why: String },
    #[error("engine refused the hello: {0}")]
    Hello(String),
    #[error("the connection to the engine is lost")]
    Lost,
    #[error("engine protocol: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("engine I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer from the engine: {0}")]
    Unexpected(String),
}

type Routes = Arc<Mutex<HashMap<RequestId, mpsc::Sender<Reply>>>>;

/// Replies one request may have queued before its consumer takes them (tokens and KV pieces).
/// A consumer that falls this far behind loses its request (the channel closes without a
/// terminal event, as when the engine is lost) rather than hold the engine's one reader or
/// grow without bound.
pub const REPLIES_QUEUED_MAX: usize = 4096;
type Waiters = Arc<Mutex<VecDeque<oneshot::Sender<EngineMessage>>>>;

/// One connection to an engine process.
pub struct EngineClient {
    hello: EngineHello,
    write: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Routes,
    waiters: Waiters,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for EngineClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl EngineClient {
    /// Connects to the engine's socket (retrying while it loads its model) and says hello.
    pub async fn connect(
        socket: &Path,
        agent: &str,
        timeout: Duration,
    ) -> Result<Self, EngineClientError> {
        let until = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= until => {
                    return Err(EngineClientError::Unreachable {
                        path: socket.to_path_buf(),
                        ms: timeout.as_millis() as u64,
                        why: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        codec::write_frame(
            &mut wr,
            &AgentMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent: agent.to_string(),
            },
            ENGINE_FRAME_BYTES_MAX,
        )
        .await?;
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let first: EngineMessage =
            tokio::time::timeout(left, codec::read_frame(&mut rd, ENGINE_FRAME_BYTES_MAX))
                .await
                .map_err(|_| EngineClientError::Unreachable {
                    path: socket.to_path_buf(),
                    ms: timeout.as_millis() as u64,
                    why: "no hello".into(),
                })??;
        let hello = match first {
            EngineMessage::Hello(h) => h,
            EngineMessage::Error { message, .. } => return Err(EngineClientError::Hello(message)),
            other => return Err(EngineClientError::Unexpected(format!("{other:?}"))),
        };
        let routes: Routes = Arc::default();
        let waiters: Waiters = Arc::default();
        let payload_max = hello
            .kv
            .layer_payload_bytes(hello.context_tokens_max as usize)
            as u64;
        let reader = tokio::spawn(read_loop(rd, routes.clone(), waiters.clone(), payload_max));
        Ok(EngineClient {
            hello,
            write: tokio::sync::Mutex::new(wr),
            routes,
            waiters,
            reader,
        })
    }

    pub fn hello(&self) -> &EngineHello {
        &self.hello
    }

    async fn send(
        &self,
        msg: &AgentMessage,
        payload: Option<&[u8]>,
    ) -> Result<(), EngineClientError> {
        let mut w = self.write.lock().await;
        codec::write_frame(&mut *w, msg, ENGINE_FRAME_BYTES_MAX).await?;
        if let Some(p) = payload {
            w.write_all(p).await?;
        }
        Ok(())
    }

    /// Sends `Generate`, `Resume`, `Prefill` or `Decode`; the request's replies (up to and including its
    /// terminal `Finished` or `Error`) arrive on the returned channel. The channel closes
    /// without a terminal event if the engine connection is lost.
    pub async fn submit(
        &self,
        msg: AgentMessage,
    ) -> Result<mpsc::Receiver<Reply>, EngineClientError> {
        let id = match &msg {
            AgentMessage::Generate { id, .. }
            | AgentMessage::Resume { id, .. }
            | AgentMessage::Prefill { id, .. }
            | AgentMessage::Decode { id, .. } => *id,
            other => {
                return Err(EngineClientError::Unexpected(format!(
                    "{other:?} is not a request"
                )));
            }
        };
        let (tx, rx) = mpsc::channel(REPLIES_QUEUED_MAX);
        self.routes.locked().insert(id, tx);
        if let Err(e) = self.send(&msg, None).await {
            self.routes.locked().remove(&id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Sends one KV piece of a `Decode` in progress.
    pub async fn import_piece(
        &self,
        id: RequestId,
        piece: &KvPiece,
    ) -> Result<(), EngineClientError> {
        let msg = AgentMessage::ImportKv {
            id,
            layer: piece.layer,
            token_start: piece.token_start,
            token_count: piece.token_count,
            payload_bytes: piece.data.len() as u64,
        };
        self.send(&msg, Some(&piece.data)).await
    }

    pub async fn cancel(&self, id: RequestId) -> Result<(), EngineClientError> {
        self.send(&AgentMessage::Cancel { id }, None).await
    }

    async fn ask(&self, msg: AgentMessage) -> Result<EngineMessage, EngineClientError> {
        let (tx, rx) = oneshot::channel();
        self.waiters.locked().push_back(tx);
        self.send(&msg, None).await?;
        rx.await.map_err(|_| EngineClientError::Lost)
    }

    pub async fn stats(&self) -> Result<EngineStats, EngineClientError> {
        match self.ask(AgentMessage::Stats).await? {
            EngineMessage::Stats(s) => Ok(s),
            other => Err(EngineClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn kv_events(&self) -> Result<Vec<KvEvent>, EngineClientError> {
        match self.ask(AgentMessage::KvEvents).await? {
            EngineMessage::KvEvents { events } => Ok(events),
            other => Err(EngineClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Tells the engine to exit.
    pub async fn shutdown(&self) {
        let _ = self.send(&AgentMessage::Shutdown, None).await;
    }

    /// Sends raw bytes as they are: for tests of malformed input.
    #[doc(hidden)]
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), EngineClientError> {
        let mut w = self.write.lock().await;
        w.write_all(bytes).await?;
        Ok(())
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        !self.reader.is_finished()
    }
}

fn reply_id(m: &EngineMessage) -> Option<(RequestId, bool)> {
    match m {
        EngineMessage::Accepted { id }
        | EngineMessage::Admitted { id, .. }
        | EngineMessage::KvStart { id, .. }
        | EngineMessage::KvLayer { id, .. }
        | EngineMessage::Token { id, .. } => Some((*id, false)),
        EngineMessage::Finished { id, .. } => Some((*id, true)),
        EngineMessage::Error { id: Some(id), .. } => Some((*id, true)),
        _ => None,
    }
}

async fn read_loop(
    mut rd: tokio::net::unix::OwnedReadHalf,
    routes: Routes,
    waiters: Waiters,
    payload_max: u64,
) {
    loop {
        let msg: EngineMessage = match codec::read_frame(&mut rd, ENGINE_FRAME_BYTES_MAX).await {
            Ok(m) => m,
            Err(e) => {
                if !matches!(e, codec::CodecError::Truncated) {
                    tracing::warn!(error = %e, "bad frame from the engine: dropping the connection");
                }
                break;
            }
        };
        let payload = match &msg {
            EngineMessage::KvLayer { payload_bytes, .. } => {
                if *payload_bytes > payload_max {
                    tracing::warn!(payload_bytes, "engine announced an oversized KV piece");
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
        match reply_id(&msg) {
            Some((id, terminal)) => {
                let mut r = routes.locked();
                let tx = if terminal {
                    r.remove(&id)
                } else {
                    r.get(&id).cloned()
                };
                if let Some(tx) = tx
                    && let Err(mpsc::error::TrySendError::Full(_)) =
                        tx.try_send((msg, payload, Instant::now()))
                {
                    r.remove(&id);
                    tracing::warn!(
                        request = id,
                        queued = REPLIES_QUEUED_MAX,
                        "a request's consumer fell behind its engine's replies: the request is dropped"
                    );
                }
            }
            None => {
                let w = waiters.locked().pop_front();
                match w {
                    Some(w) => {
                        let _ = w.send(msg);
                    }
                    None => tracing::warn!(message = ?msg, "unsolicited message from the engine"),
                }
            }
        }
    }
    // Lost: every open request ends (its channel closes), every waiter errs.
    routes.locked().clear();
    waiters.locked().clear();
}

/// An engine child process of this binary.
pub struct EngineProcess {
    pub child: std::process::Child,
    pub socket: PathBuf,
}

impl EngineProcess {
    /// Starts `pdagent engine serve` with `args` (after `--socket`), stderr to `log` (or
    /// inherited).
    pub fn spawn(socket: &Path, args: &[String], log: Option<&Path>) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("engine")
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if let Some(l) = log {
            cmd.stderr(std::fs::File::create(l)?);
        }
        let child = cmd.spawn()?;
        Ok(EngineProcess {
            child,
            socket: socket.to_path_buf(),
        })
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
