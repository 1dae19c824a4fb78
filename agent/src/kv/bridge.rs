//! The local KV channel between an engine's KV connector and its agent: pdagent's vLLM
//! connector (`python/pdagent_vllm`) hands each layer's KV of a prefill to this agent, which
//! ships it to the decode host over QUIC exactly as it ships the reference engine's pieces
//! (`kv::ship`); on the decode host the connector asks its agent for a shipment and copies the
//! pieces into the blocks vLLM allocated.
//!
//! One unix socket per agent (`<data_dir>/kv.sock`, mode 0600: only the agent's user, who runs
//! its engines, may connect). Every message is a frame: a u32 (little-endian) length, that many
//! bytes of JSON (the head), a u64 length, that many raw bytes (the body, empty but for pieces).
//! Each connection first says `hello` (its engine, role, TP rank and KV geometry); then:
//!
//! - `put {shipment, layer, start, count, tokens, crc}` + K rows then V rows: one piece of a
//!   prefill's KV, its CRC-32 taken by the connector (checked here, and again on the decode
//!   host before the piece is kept). No answer: the connector does not wait on the network.
//! - `end {shipment, pieces, tokens}`: that rank handed out all of the request's KV.
//! - `abort {shipment, why}`: the request was aborted or preempted; its shipment fails.
//! - `get {shipment, tokens}`: waits until the shipment is whole on this host (or failed), then
//!   answers `{ok, pieces}` and the pieces (`{layer, start, count, crc}` + bytes), or
//!   `{ok: false, error}`.
//!
//! A malformed frame closes that connection, never the agent. Shipments are per TP rank: the
//! rank's pieces travel as their own shipment ([`rank_shipment`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pd_engine::kv_format::dtype_code;
use pd_engine::{KvGeometry, KvHeader, KvPiece};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::ship::{KV_PIECE_BYTES_MAX, KvInbox, KvShipError, checksum};
use crate::util::Unpoisoned;

/// Largest frame head accepted.
pub const HEAD_BYTES_MAX: u32 = 64 << 10;
/// Bound on handing a whole shipment to a decode engine's connector once it is here.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Pieces a prefill leg may have waiting before the connector's writes wait for it.
const HANDED_QUEUE: usize = 64;

/// The shipment of TP rank `rank` of a request whose shipment is `shipment`.
pub fn rank_shipment(shipment: u64, rank: u32) -> u64 {
    shipment ^ (u64::from(rank) << 48)
}

/// The shipment id as the connector writes it (16 hex digits).
pub fn shipment_hex(shipment: u64) -> String {
    format!("{shipment:016x}")
}

fn parse_shipment(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s, 16).map_err(|_| format!("shipment {s:?} is not 16 hex digits"))
}

/// What a connector hands to the prefill leg of a shipment.
#[derive(Debug)]
pub enum Handed {
    Piece {
        rank: u32,
        header: KvHeader,
        piece: KvPiece,
        crc: u32,
    },
    /// A rank handed out all of its pieces.
    End { rank: u32, pieces: u64, tokens: u32 },
    /// The engine gave up the request (aborted, preempted).
    Abort { why: String },
}

/// What a connector says of itself first.
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    pub engine: String,
    pub role: String,
    #[serde(default)]
    pub rank: u32,
    #[serde(default = "one")]
    pub tp: u32,
    pub dtype: String,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    /// The model's fingerprint as the agent gave it to the engine (hex).
    pub fingerprint: String,
}

fn one() -> u32 {
    1
}

impl Hello {
    /// The KV geometry of this rank's shard.
    pub fn geometry(&self) -> Result<KvGeometry, String> {
        let dtype = dtype_code(&self.dtype)
            .ok_or_else(|| format!("KV dtype {:?} is not one pdagent ships", self.dtype))?;
        let model_fingerprint = u64::from_str_radix(&self.fingerprint, 16)
            .map_err(|_| format!("fingerprint {:?} is not hex", self.fingerprint))?;
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 || self.block_size == 0 {
            return Err("a KV geometry with a zero dimension".into());
        }
        if self.rank >= self.tp {
            return Err(format!("TP rank {} of {}", self.rank, self.tp));
        }
        Ok(KvGeometry {
            model_fingerprint,
            dtype,
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size_tokens: self.block_size,
        })
    }
}

/// What a decode engine's connector took from this host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Taken {
    pub payload_bytes: u64,
    pub pieces: u64,
    /// The pieces crossed the network (not from this host's own prefill).
    pub network: bool,
    pub wait: Duration,
}

/// Counts of what the bridge saw, for `/metrics`.
#[derive(Debug, Default)]
pub struct BridgeCounts {
    /// Pieces a connector sent whose bytes did not match its checksum.
    pub local_integrity_failures: std::sync::atomic::AtomicU64,
    /// Shipments a decode connector asked for and did not get (failed, timed out, refused).
    pub gets_failed: std::sync::atomic::AtomicU64,
}

/// The agent's side of the local KV channel.
pub struct Bridge {
    path: PathBuf,
    /// Prefill legs waiting for their connector's pieces, by (rank) shipment.
    outgoing: Mutex<HashMap<u64, mpsc::Sender<Handed>>>,
    inbox: KvInbox,
    /// Bound on a decode connector's wait for its shipment.
    wait: Duration,
    pub counts: BridgeCounts,
    /// Called with what each successful `get` handed over (the serving metrics).
    on_taken: Box<dyn Fn(Taken) + Send + Sync>,
}

/// A frame: its head and body.
pub type Frame = (Value, Vec<u8>);

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, String> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let head_len = u32::from_le_bytes(len);
    if head_len > HEAD_BYTES_MAX {
        return Err(format!(
            "a frame head of {head_len} bytes (at most {HEAD_BYTES_MAX})"
        ));
    }
    let mut head = vec![0u8; head_len as usize];
    r.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let head: Value =
        serde_json::from_slice(&head).map_err(|e| format!("a frame head is not JSON: {e}"))?;
    if !head.is_object() {
        return Err("a frame head is not a JSON object".into());
    }
    let mut blen = [0u8; 8];
    r.read_exact(&mut blen).await.map_err(|e| e.to_string())?;
    let body_len = u64::from_le_bytes(blen);
    if body_len > KV_PIECE_BYTES_MAX {
        return Err(format!(
            "a frame body of {body_len} bytes (at most {KV_PIECE_BYTES_MAX})"
        ));
    }
    let mut body = vec![0u8; body_len as usize];
    r.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(Some((head, body)))
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &Value,
    body: &[u8],
) -> std::io::Result<()> {
    let head = serde_json::to_vec(head).unwrap_or_default();
    let mut buf = Vec::with_capacity(12 + head.len());
    buf.extend_from_slice(&(head.len() as u32).to_le_bytes());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    w.write_all(&buf).await?;
    w.write_all(body).await
}

fn field<'a>(head: &'a Value, name: &str) -> Result<&'a Value, String> {
    head.get(name)
        .ok_or_else(|| format!("{} without {name}", head["op"]))
}

fn u32_of(head: &Value, name: &str) -> Result<u32, String> {
    field(head, name)?
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{name} is not a u32"))
}

fn shipment_of(head: &Value) -> Result<u64, String> {
    parse_shipment(
        field(head, "shipment")?
            .as_str()
            .ok_or("shipment is not a string")?,
    )
}

/// The socket of the agent whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("kv.sock")
}

impl Bridge {
    pub fn new(
        data_dir: &Path,
        inbox: KvInbox,
        wait: Duration,
        on_taken: Box<dyn Fn(Taken) + Send + Sync>,
    ) -> Bridge {
        Bridge {
            path: socket_path(data_dir),
            outgoing: Mutex::default(),
            inbox,
            wait,
            counts: BridgeCounts::default(),
            on_taken,
        }
    }

    /// The socket engines connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Listens on the socket (replacing a stale one) and serves connectors until aborted.
    pub fn listen(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path)?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: do not spin on it.
                        tracing::warn!(error = %e, "the KV socket could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let this = this.clone();
                tokio::spawn(async move {
                    if let Err(why) = this.serve(stream).await {
                        tracing::warn!(%why, "a KV connector's connection closed");
                    }
                });
            }
        }))
    }

    /// Registers a prefill leg's wait for the pieces of `shipment` from `tp` ranks; the pieces
    /// come on the receiver until it is dropped (then the entry goes too, see [`Expected`]).
    pub fn expect(self: &Arc<Self>, shipment: u64, tp: u32) -> Expected {
        let (tx, rx) = mpsc::channel(HANDED_QUEUE);
        let mut out = self.outgoing.locked();
        for rank in 0..tp.max(1) {
            out.insert(rank_shipment(shipment, rank), tx.clone());
        }
        Expected {
            bridge: self.clone(),
            shipment,
            tp: tp.max(1),
            rx,
        }
    }

    fn handed_to(&self, shipment: u64) -> Option<mpsc::Sender<Handed>> {
        self.outgoing.locked().get(&shipment).cloned()
    }

    async fn serve(&self, stream: tokio::net::UnixStream) -> Result<(), String> {
        let (mut r, mut w) = stream.into_split();
        let Some((head, _)) = read_frame(&mut r).await? else {
            return Ok(());
        };
        if head["op"] != "hello" {
            return Err(format!("the first frame is {}, not hello", head["op"]));
        }
        let hello: Hello =
            serde_json::from_value(head.clone()).map_err(|e| format!("hello: {e}"))?;
        let geometry = match hello.geometry() {
            Ok(g) => g,
            Err(why) => {
                let _ = write_frame(&mut w, &json!({"ok": false, "error": why}), &[]).await;
                return Err(why);
            }
        };
        write_frame(&mut w, &json!({"ok": true}), &[])
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(engine = %hello.engine, role = %hello.role, rank = hello.rank, tp = hello.tp, ?geometry, "a KV connector joined");
        while let Some((head, body)) = read_frame(&mut r).await? {
            match head["op"].as_str().unwrap_or_default() {
                "put" => self.put(&hello, geometry, &head, body).await?,
                "end" => {
                    let shipment = rank_shipment(shipment_of(&head)?, hello.rank);
                    let end = Handed::End {
                        rank: hello.rank,
                        pieces: field(&head, "pieces")?.as_u64().ok_or("pieces")?,
                        tokens: u32_of(&head, "tokens")?,
                    };
                    if let Some(tx) = self.handed_to(shipment) {
                        let _ = tx.send(end).await;
                    }
                }
                "abort" => {
                    let shipment = rank_shipment(shipment_of(&head)?, hello.rank);
                    let why = head["why"].as_str().unwrap_or("aborted").to_string();
                    if let Some(tx) = self.handed_to(shipment) {
                        let _ = tx.send(Handed::Abort { why }).await;
                    }
                }
                "get" => {
                    let base = shipment_of(&head)?;
                    let tokens = u32_of(&head, "tokens")?;
                    self.get(&hello, geometry, base, tokens, &mut w)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                other => return Err(format!("unknown op {other:?}")),
            }
        }
        Ok(())
    }

    /// One piece from a prefill engine's connector, checked and handed to its leg.
    async fn put(
        &self,
        hello: &Hello,
        geometry: KvGeometry,
        head: &Value,
        body: Vec<u8>,
    ) -> Result<(), String> {
        let shipment = rank_shipment(shipment_of(head)?, hello.rank);
        let (layer, start, count, tokens) = (
            u32_of(head, "layer")?,
            u32_of(head, "start")?,
            u32_of(head, "count")?,
            u32_of(head, "tokens")?,
        );
        let crc = u32_of(head, "crc")?;
        let Some(tx) = self.handed_to(shipment) else {
            // Its leg is over (the request ended or was cancelled): nothing waits for it.
            return Ok(());
        };
        let expected = geometry.layer_payload_bytes(count as usize);
        let end = u64::from(start) + u64::from(count);
        let why = if layer >= geometry.layers {
            Some(format!(
                "a piece for layer {layer} of {} layers",
                geometry.layers
            ))
        } else if end > u64::from(tokens) {
            Some(format!("a piece for tokens {start}..{end} of {tokens}"))
        } else if body.len() != expected {
            Some(format!(
                "a piece of {} bytes for {count} tokens (expected {expected})",
                body.len()
            ))
        } else if checksum(&body) != crc {
            self.counts
                .local_integrity_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(format!(
                "layer {layer} tokens {start}..{end} failed its checksum between the engine and its agent"
            ))
        } else {
            None
        };
        let handed = match why {
            Some(why) => Handed::Abort {
                why: format!("engine {}: {why}", hello.engine),
            },
            None => Handed::Piece {
                rank: hello.rank,
                header: KvHeader {
                    geometry,
                    token_count: tokens,
                },
                piece: KvPiece {
                    layer,
                    token_start: start,
                    token_count: count,
                    data: body,
                },
                crc,
            },
        };
        let _ = tx.send(handed).await;
        Ok(())
    }

    /// Hands a whole shipment to a decode engine's connector, or says why not.
    async fn get<W: AsyncWrite + Unpin>(
        &self,
        hello: &Hello,
        geometry: KvGeometry,
        base: u64,
        tokens: u32,
        w: &mut W,
    ) -> std::io::Result<()> {
        let shipment = rank_shipment(base, hello.rank);
        let began = Instant::now();
        let got = self.inbox.sealed(shipment, self.wait).await;
        let refuse = |why: String| {
            self.counts
                .gets_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(shipment = %shipment_hex(base), rank = hello.rank, engine = %hello.engine, %why, "a decode engine's KV was not handed over");
            json!({"ok": false, "error": why})
        };
        let (seal, arrived) = match got {
            Ok(x) => x,
            Err(e @ (KvShipError::Failed { .. } | KvShipError::Timeout { .. })) => {
                return write_frame(w, &refuse(e.to_string()), &[]).await;
            }
        };
        // What the pieces are must be what this engine holds: the same model and layout,
        // named field by field when not.
        let check = geometry
            .check_compatible(&arrived.header.geometry)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                if arrived.header != seal.header {
                    Err("the pieces disagree with the prefill's seal".to_string())
                } else if arrived.header.token_count != tokens {
                    Err(format!(
                        "the shipment holds {} prompt tokens, this request has {tokens}",
                        arrived.header.token_count
                    ))
                } else {
                    complete(&arrived.header, &arrived.pieces)
                }
            });
        if let Err(why) = check {
            return write_frame(w, &refuse(why), &[]).await;
        }
        let payload: u64 = arrived.pieces.iter().map(|p| p.data.len() as u64).sum();
        write_frame(
            w,
            &json!({"ok": true, "pieces": arrived.pieces.len(), "tokens": tokens}),
            &[],
        )
        .await?;
        // A connector that stops reading does not hold the shipment's memory for ever.
        let hand_over = async {
            for (p, crc) in arrived.pieces.iter().zip(&arrived.checksums) {
                let head = json!({"layer": p.layer, "start": p.token_start, "count": p.token_count, "crc": crc});
                write_frame(w, &head, &p.data).await?;
            }
            w.flush().await
        };
        tokio::time::timeout(HAND_OVER_TIMEOUT, hand_over)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the decode engine's connector stopped reading its KV",
                )
            })??;
        let taken = Taken {
            payload_bytes: payload,
            pieces: arrived.pieces.len() as u64,
            network: !arrived.local,
            wait: began.elapsed(),
        };
        tracing::info!(shipment = %shipment_hex(base), rank = hello.rank, engine = %hello.engine, bytes = payload, pieces = taken.pieces, wait_ms = taken.wait.as_secs_f64() * 1e3, "KV handed to the decode engine");
        (self.on_taken)(taken);
        Ok(())
    }
}

/// Checks that `pieces` cover every layer's tokens `0..token_count` exactly once, in order.
pub fn complete(header: &KvHeader, pieces: &[KvPiece]) -> Result<(), String> {
    let mut next = vec![0u32; header.geometry.layers as usize];
    for p in pieces {
        let Some(n) = next.get_mut(p.layer as usize) else {
            return Err(format!("a piece for layer {} is out of range", p.layer));
        };
        if p.token_start != *n {
            return Err(format!(
                "layer {}: a piece starts at token {}, expected {}",
                p.layer, p.token_start, n
            ));
        }
        *n += p.token_count;
    }
    match next.iter().position(|n| *n != header.token_count) {
        Some(l) => Err(format!(
            "layer {l} has {} of {} tokens",
            next[l], header.token_count
        )),
        None => Ok(()),
    }
}

/// A prefill leg's registration: the connector's pieces for the shipment, until dropped.
pub struct Expected {
    bridge: Arc<Bridge>,
    shipment: u64,
    tp: u32,
    pub rx: mpsc::Receiver<Handed>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        let mut out = self.bridge.outgoing.locked();
        for rank in 0..self.tp {
            out.remove(&rank_shipment(self.shipment, rank));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tokens: u32) -> KvHeader {
        KvHeader {
            geometry: KvGeometry {
                model_fingerprint: 1,
                dtype: pd_engine::kv_format::DTYPE_F32,
                layers: 2,
                kv_heads: 1,
                head_dim: 2,
                block_size_tokens: 16,
            },
            token_count: tokens,
        }
    }

    fn piece(layer: u32, start: u32, count: u32) -> KvPiece {
        KvPiece {
            layer,
            token_start: start,
            token_count: count,
            data: vec![0; 16 * count as usize],
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_frames_are_errors() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &json!({"op": "put", "layer": 3}), b"abc")
            .await
            .unwrap();
        write_frame(&mut buf, &json!({"op": "end"}), &[])
            .await
            .unwrap();
        let mut r = buf.as_slice();
        let (h, b) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((h["layer"].as_u64(), b.as_slice()), (Some(3), &b"abc"[..]));
        let (h, b) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((h["op"].as_str(), b.len()), (Some("end"), 0));
        assert!(read_frame(&mut r).await.unwrap().is_none(), "a clean end");

        // A head over the bound, a head that is not a JSON object, a truncated body.
        let mut big = (HEAD_BYTES_MAX + 1).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 8]);
        assert!(read_frame(&mut big.as_slice()).await.is_err());
        let mut not_obj = Vec::new();
        write_frame(&mut not_obj, &json!([1, 2]), &[])
            .await
            .unwrap();
        assert!(read_frame(&mut not_obj.as_slice()).await.is_err());
        let mut cut = Vec::new();
        write_frame(&mut cut, &json!({"op": "put"}), &[1; 100])
            .await
            .unwrap();
        cut.truncate(cut.len() - 10);
        assert!(read_frame(&mut cut.as_slice()).await.is_err());
    }

    #[test]
    fn a_shipment_must_cover_every_layer_once() {
        let h = header(5);
        let whole = [
            piece(0, 0, 3),
            piece(0, 3, 2),
            piece(1, 0, 3),
            piece(1, 3, 2),
        ];
        assert!(complete(&h, &whole).is_ok());
        let e = complete(&h, &whole[..3]).unwrap_err();
        assert!(e.contains("layer 1 has 3 of 5"), "{e}");
        let e = complete(&h, &[piece(0, 0, 3), piece(0, 2, 3)]).unwrap_err();
        assert!(e.contains("expected 3"), "{e}");
        assert!(complete(&h, &[piece(2, 0, 5)]).is_err());
    }

    #[test]
    fn ranks_ship_apart_and_hellos_name_bad_geometry() {
        assert_ne!(rank_shipment(7, 0), rank_shipment(7, 1));
        assert_eq!(rank_shipment(7, 0), 7);
        let hello = |dtype: &str, heads: u32| Hello {
            engine: "e".into(),
            role: "prefill".into(),
            rank: 0,
            tp: 1,
            dtype: dtype.into(),
            layers: 4,
            kv_heads: heads,
            head_dim: 32,
            block_size: 128,
            fingerprint: "00ff".into(),
        };
        let g = hello("torch.bfloat16", 2).geometry().unwrap();
        assert_eq!((g.dtype, g.model_fingerprint), (2, 255));
        assert_eq!(g.bytes_per_element(), 2);
        assert!(hello("int8", 2).geometry().unwrap_err().contains("int8"));
        assert!(hello("float32", 0).geometry().is_err());
        let beyond = Hello {
            rank: 2,
            tp: 2,
            ..hello("float32", 2)
        };
        assert!(beyond.geometry().unwrap_err().contains("TP rank 2 of 2"));
    }
}
