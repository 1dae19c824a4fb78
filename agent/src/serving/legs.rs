//! The legs of a request on the agents that own its engines: prefill (engine, then the KV
//! shipped piece by piece to the decode host as the engine hands it out), decode (wait for the
//! shipment, import it, stream the tokens) and generate (one engine does both: colocated, or a
//! decode engine serving a short prompt alone).
//!
//! A leg writes [`ServeEvent`]s into a channel. The ingress agent reads them: from a local task
//! when the engine is on its own host, or through a streaming RPC (`AgentRequest::Serve*`).
//! When the reader goes away (client disconnect, request over), the channel closes and the leg
//! cancels its engine request at once: the engine frees the request's KV blocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pd_engine::protocol::{AgentMessage, EngineMessage};
use pd_engine::{KvHeader, KvPiece, RequestId};
use tokio::sync::mpsc;

use crate::control::ControlPlane;
use crate::driver::HttpEngine;
use crate::engine::client::{EngineClient, Reply};
use crate::kv::protocol::{self, PrefillReplies, PrefillStep};
use crate::kv::ship::{KvInbox, KvSender};
use crate::peers::Peers;
use crate::supervisor::{ReadyEngine, Supervisor};
use crate::wire::kv::Seal;
use crate::wire::legs::{DecodeLeg, Failure, GenerateLeg, Leg, PrefillLeg, ServeEvent};
use crate::wire::{AgentRequest, AgentResponse};

use super::http_legs;
use super::metrics::Metrics;

/// Runs the legs whose engines live on this agent.
pub struct Legs {
    node: String,
    supervisor: Arc<Supervisor>,
    peers: Arc<Peers>,
    control: Arc<ControlPlane>,
    pub inbox: KvInbox,
    next_id: AtomicU64,
    /// Bound on the wait for a shipment's last piece once its decode leg began.
    kv_timeout: Duration,
    kv: KvLimits,
    metrics: Arc<Metrics>,
}

/// Bounds of the KV path (`[serving] kv_*`).
#[derive(Debug, Clone, Copy)]
pub struct KvLimits {
    /// Bytes the inbox holds at once.
    pub inbox_bytes_max: u64,
    /// An unclaimed shipment is dropped after this long.
    pub unclaimed: Duration,
    /// No piece acknowledged for this long: the shipment fails (see `stall_bound`).
    pub stall: Duration,
    /// The slowest link expected, bytes per second.
    pub link_floor_bytes_per_s: u64,
    /// Bound on a decode leg's wait for its shipment's last piece.
    pub wait: Duration,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            inbox_bytes_max: 8 << 30,
            unclaimed: Duration::from_secs(30),
            stall: Duration::from_secs(3),
            link_floor_bytes_per_s: 125_000_000,
            wait: Duration::from_secs(600),
        }
    }
}

/// How long a shipment may go without an acknowledgement: the configured bound, or, when
/// longer, what the pieces in flight need at the slowest expected link (they share it, so the
/// first acknowledgement may come only after all of them crossed).
pub fn stall_bound(
    configured: Duration,
    in_flight: usize,
    piece_bytes_max: u64,
    link_floor_bytes_per_s: u64,
) -> Duration {
    let bytes = in_flight as f64 * piece_bytes_max as f64;
    let needed = Duration::from_secs_f64(bytes / link_floor_bytes_per_s.max(1) as f64);
    configured.max(needed)
}

impl Legs {
    /// This node's engine supervisor.
    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }
}

type Events = mpsc::Sender<ServeEvent>;

/// Ends a leg with a failure event.
struct Fail(Failure, String);

/// How a leg that did not fail ended.
enum Ended {
    /// Its last event was sent.
    Done,
    /// The reader went away first (the engine request was cancelled).
    Gone,
}

impl Legs {
    pub fn new(
        supervisor: Arc<Supervisor>,
        peers: Arc<Peers>,
        control: Arc<ControlPlane>,
        kv: KvLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Legs {
            node: control.node_name().to_string(),
            supervisor,
            peers,
            control,
            inbox: KvInbox::new(kv.inbox_bytes_max),
            next_id: AtomicU64::new(1),
            kv_timeout: kv.wait,
            kv,
            metrics,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn engine(&self, engine: &str) -> Result<Arc<EngineClient>, Fail> {
        self.supervisor.ready_engine(engine).ok_or_else(|| {
            Fail(
                Failure::NoEngine,
                format!("engine {engine} is not ready on node {}", self.node),
            )
        })
    }

    /// Runs one leg to its end; the last event sent is `Finished` or `Failed` (unless the
    /// reader went away first).
    pub async fn run(&self, leg: Leg, tx: Events) {
        let engine = leg.engine().to_string();
        let (kind, result) = match (self.supervisor.ready(&engine), leg) {
            (Some(ReadyEngine::Http(h)), leg) => self.run_http(&h, leg, &tx).await,
            (_, Leg::Prefill(l)) => ("prefill", self.prefill(l, &tx).await),
            (_, Leg::Decode(l)) => ("decode", self.decode(l, &tx).await),
            (_, Leg::Generate(l)) => ("generate", self.generate(l, &tx).await),
            (_, Leg::EngineKvDecode(_)) => (
                "decode",
                Err(Fail(
                    Failure::NoEngine,
                    format!("engine {engine} is not ready on node {}", self.node),
                )),
            ),
        };
        let outcome = match &result {
            Ok(Ended::Gone) => "cancelled",
            Ok(Ended::Done) => "ok",
            Err(_) => "failed",
        };
        self.metrics.legs.inc(&[&engine, kind, outcome]);
        if let Err(Fail(failure, message)) = result {
            let _ = tx.send(ServeEvent::Failed { failure, message }).await;
        }
    }

    /// A leg on an engine that serves HTTP and moves its own KV.
    async fn run_http(
        &self,
        h: &HttpEngine,
        leg: Leg,
        tx: &Events,
    ) -> (&'static str, Result<Ended, Fail>) {
        let (kind, r) = match leg {
            Leg::Prefill(l) => ("prefill", http_legs::prefill(h, l, tx).await),
            Leg::Generate(l) => ("generate", http_legs::generate(h, l, None, tx).await),
            Leg::EngineKvDecode(l) => (
                "decode",
                http_legs::generate(
                    h,
                    l.generate,
                    Some((l.kv_transfer_params, l.request_id)),
                    tx,
                )
                .await,
            ),
            Leg::Decode(_) => (
                "decode",
                Err(http_legs::HttpFail(
                    Failure::Internal,
                    "this engine pulls its own KV: no shipment to decode from".into(),
                )),
            ),
        };
        let r = match r {
            Ok(true) => Ok(Ended::Done),
            Ok(false) => Ok(Ended::Gone),
            Err(http_legs::HttpFail(f, m)) => Err(Fail(f, m)),
        };
        (kind, r)
    }

    async fn prefill(&self, leg: PrefillLeg, tx: &Events) -> Result<Ended, Fail> {
        let client = self.engine(&leg.engine)?;
        let id = self.next_id();
        let submitted = Instant::now();
        let mut rx = client
            .submit(AgentMessage::Prefill {
                id,
                prompt: leg.prompt,
                sampling: leg.sampling,
            })
            .await
            .map_err(|e| Fail(Failure::EngineLost, e.to_string()))?;
        let mut ship = Shipper::new(self, &leg.decode_node, leg.shipment).await;
        let mut replies = PrefillReplies::default();
        let mut kv_began: Option<Instant> = None;
        let outcome = async {
            loop {
                let (msg, payload, at) = next_reply(&mut rx, tx).await?;
                match replies.step(msg, payload) {
                    PrefillStep::Begin {
                        header,
                        prompt_tokens,
                    } => {
                        kv_began = Some(Instant::now());
                        ship.prompt_tokens = Some(prompt_tokens);
                        ship.begin(header)?;
                    }
                    PrefillStep::Piece(piece) => {
                        tokio::select! {
                            r = ship.send(piece) => r?,
                            _ = tx.closed() => return Err(None),
                        }
                    }
                    PrefillStep::Done {
                        prompt_tokens_cached,
                    } => return Ok((prompt_tokens_cached, at.duration_since(submitted))),
                    PrefillStep::Failed { kind, message } => {
                        let failure = kind.map_or(Failure::Internal, Failure::of);
                        return Err(Some(Fail(failure, message)));
                    }
                    PrefillStep::Continue => {}
                }
            }
        }
        .await;
        let first = replies.first;
        let (cached, engine_time) = match outcome {
            Ok(c) => c,
            Err(why) => {
                let _ = client.cancel(id).await;
                if let Some(ship_to) = ship.local_inbox() {
                    ship_to.fail(leg.shipment, "the prefill leg ended");
                }
                return match why {
                    Some(f) => Err(f),
                    None => Ok(Ended::Gone), // the reader went away: nothing to tell
                };
            }
        };
        let (first_token, text) = first.ok_or_else(|| {
            Fail(
                Failure::Internal,
                "the prefill engine gave no first token".into(),
            )
        })?;
        let header = ship.header.ok_or_else(|| {
            Fail(
                Failure::Internal,
                "the prefill engine handed out no KV".into(),
            )
        })?;
        let prompt_tokens = ship.prompt_tokens.take().unwrap_or_default();
        let prompt_len = prompt_tokens.len() as u32;
        let seal = Seal {
            shipment: leg.shipment,
            pieces: ship.pieces,
            header,
            prompt_tokens,
            first_token,
        };
        // The seal may overtake the last pieces' acknowledgements: the decode host waits for the
        // count it names, and a piece cut short fails the shipment there.
        let (settled, sealed) = tokio::select! {
            r = async { tokio::join!(ship.settle(), self.seal(&leg.decode_node, seal)) } => r,
            _ = tx.closed() => return Ok(Ended::Gone),
        };
        if let Err(why) = settled {
            return Err(why.unwrap_or(Fail(Failure::KvTransfer, "KV shipping stopped".into())));
        }
        if let Err(why) = sealed {
            return Err(Fail(Failure::KvTransfer, why));
        }
        let path = if ship.local_inbox().is_some() {
            "host"
        } else {
            "network"
        };
        self.metrics.kv_bytes_sent.add(&[path], ship.payload_bytes);
        let _ = tx
            .send(ServeEvent::Prefilled {
                first_token,
                text,
                prompt_tokens: prompt_len,
                prompt_tokens_cached: cached,
                pieces: ship.pieces,
                kv_bytes: ship.payload_bytes,
                kv_ms: kv_began.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
                engine_us: engine_time.as_micros() as u64,
            })
            .await;
        Ok(Ended::Done)
    }

    async fn decode(&self, leg: DecodeLeg, tx: &Events) -> Result<Ended, Fail> {
        let client = match self.engine(&leg.engine) {
            Ok(c) => c,
            Err(f) => {
                self.inbox.forget(leg.shipment);
                return Err(f);
            }
        };
        let (seal, arrived) = tokio::select! {
            r = self.inbox.sealed(leg.shipment, self.kv_timeout) => r,
            _ = tx.closed() => {
                self.inbox.forget(leg.shipment);
                return Ok(Ended::Gone);
            }
        }
        .map_err(|e| Fail(Failure::KvTransfer, e.to_string()))?;
        if arrived.header != seal.header {
            return Err(Fail(
                Failure::KvTransfer,
                "the shipped KV does not match the prefill's header".into(),
            ));
        }
        let path = if arrived.local { "host" } else { "network" };
        self.metrics
            .kv_bytes_received
            .add(&[path], arrived.payload_bytes);
        let id = self.next_id();
        let submitted = Instant::now();
        let mut rx = protocol::decode_from(
            &client,
            id,
            seal.header,
            seal.prompt_tokens,
            seal.first_token,
            leg.sampling,
            &arrived.pieces,
        )
        .await
        .map_err(|e| Fail(Failure::EngineLost, e.to_string()))?;
        self.pump(&client, id, &mut rx, tx, submitted).await
    }

    /// Tells the decode host that a shipment is whole (on this host: directly).
    async fn seal(&self, decode_node: &str, seal: Seal) -> Result<(), String> {
        if decode_node == self.node {
            self.inbox.seal(seal);
            return Ok(());
        }
        let addr = self
            .control
            .node_address(decode_node)
            .ok_or_else(|| format!("node {decode_node} is not in the cluster"))?;
        match self
            .peers
            .call(decode_node, addr, &AgentRequest::KvSeal(seal), SEAL_TIMEOUT)
            .await
        {
            Ok(AgentResponse::KvSealed) => Ok(()),
            Ok(other) => Err(format!("{decode_node} answered a KV seal with {other:?}")),
            Err(e) => Err(format!("sealing the KV at {decode_node}: {e}")),
        }
    }

    async fn generate(&self, leg: GenerateLeg, tx: &Events) -> Result<Ended, Fail> {
        let client = self.engine(&leg.engine)?;
        let id = self.next_id();
        let submitted = Instant::now();
        let msg = if leg.resume.is_empty() {
            AgentMessage::Generate {
                id,
                prompt: leg.prompt,
                sampling: leg.sampling,
            }
        } else {
            AgentMessage::Resume {
                id,
                prompt: leg.prompt,
                output: leg.resume,
                sampling: leg.sampling,
            }
        };
        let mut rx = client
            .submit(msg)
            .await
            .map_err(|e| Fail(Failure::EngineLost, e.to_string()))?;
        self.pump(&client, id, &mut rx, tx, submitted).await
    }

    /// Forwards a request's tokens until its terminal event; cancels the engine request when
    /// the reader goes away.
    async fn pump(
        &self,
        client: &EngineClient,
        id: RequestId,
        rx: &mut mpsc::Receiver<Reply>,
        tx: &Events,
        submitted: Instant,
    ) -> Result<Ended, Fail> {
        let outcome = async {
            loop {
                let (msg, _, at) = next_reply(rx, tx).await?;
                let ev = match msg {
                    EngineMessage::Token {
                        index, token, text, ..
                    } => ServeEvent::Token { index, token, text },
                    EngineMessage::Admitted { prompt_tokens, .. } => {
                        ServeEvent::Admitted { prompt_tokens }
                    }
                    EngineMessage::Finished {
                        reason,
                        prompt_tokens,
                        prompt_tokens_cached,
                        output_tokens,
                        ..
                    } => {
                        let _ = tx
                            .send(ServeEvent::Finished {
                                reason,
                                prompt_tokens,
                                prompt_tokens_cached,
                                output_tokens,
                                engine_us: at.duration_since(submitted).as_micros() as u64,
                            })
                            .await;
                        return Ok(());
                    }
                    EngineMessage::Error { kind, message, .. } => {
                        return Err(Some(Fail(Failure::of(kind), message)));
                    }
                    _ => continue,
                };
                if tx.send(ev).await.is_err() {
                    return Err(None);
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => Ok(Ended::Done),
            Err(why) => {
                let _ = client.cancel(id).await;
                why.map_or(Ok(Ended::Gone), Err)
            }
        }
    }
}

/// The engine's next reply; `Err(None)` when the reader went away, a failure when the engine
/// connection was lost.
async fn next_reply(rx: &mut mpsc::Receiver<Reply>, tx: &Events) -> Result<Reply, Option<Fail>> {
    tokio::select! {
        r = rx.recv() => r.ok_or_else(|| Some(Fail(
            Failure::EngineLost,
            "the engine connection was lost (did the engine exit?)".into(),
        ))),
        _ = tx.closed() => Err(None),
    }
}

/// Bound on telling the decode host that a shipment is whole.
const SEAL_TIMEOUT: Duration = Duration::from_secs(5);
/// KV pieces in flight to the decode host at once (each its own stream).
const PIECES_IN_FLIGHT_MAX: usize = 16;

/// Where a prefill's KV goes: this host's inbox, or the decode host over QUIC.
struct Shipper {
    kv: KvLimits,
    /// The largest piece sent so far.
    piece_bytes_max: u64,
    target: Target,
    /// Pieces on their way, not yet acknowledged.
    in_flight: tokio::task::JoinSet<Result<(), pd_transport::TransportError>>,
    shipment: u64,
    header: Option<KvHeader>,
    prompt_tokens: Option<Vec<u32>>,
    pieces: u64,
    payload_bytes: u64,
}

enum Target {
    Local(KvInbox),
    Remote(Result<pd_transport::Connection, String>),
    Sending(KvSender),
}

impl Shipper {
    async fn new(legs: &Legs, decode_node: &str, shipment: u64) -> Shipper {
        let target = if decode_node == legs.node {
            Target::Local(legs.inbox.clone())
        } else {
            let conn = match legs.control.node_address(decode_node) {
                Some(addr) => legs
                    .peers
                    .connection(decode_node, addr)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err(format!("node {decode_node} is not in the cluster")),
            };
            Target::Remote(conn)
        };
        Shipper {
            kv: legs.kv,
            piece_bytes_max: 0,
            target,
            in_flight: tokio::task::JoinSet::new(),
            shipment,
            header: None,
            prompt_tokens: None,
            pieces: 0,
            payload_bytes: 0,
        }
    }

    /// Waits for one piece in flight to be acknowledged. A link that was cut sends no error,
    /// only silence: past the stall bound (`stall_bound`) without an acknowledgement the
    /// shipment fails (rather than after the transport's idle timeout).
    async fn settle_one(&mut self) -> Result<(), Option<Fail>> {
        let bound = stall_bound(
            self.kv.stall,
            self.in_flight.len(),
            self.piece_bytes_max,
            self.kv.link_floor_bytes_per_s,
        );
        let next = tokio::time::timeout(bound, self.in_flight.join_next())
            .await
            .map_err(|_| {
                Some(Fail(
                    Failure::KvTransfer,
                    format!(
                        "the decode host acknowledged no KV piece for {:.1} s: the link is cut or the host stalled",
                        bound.as_secs_f32()
                    ),
                ))
            })?;
        match next {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Some(Fail(Failure::KvTransfer, format!("shipping KV: {e}")))),
            Some(Err(e)) => Err(Some(Fail(Failure::Internal, format!("shipping KV: {e}")))),
        }
    }

    /// Waits until every piece sent is acknowledged by the decode host.
    async fn settle(&mut self) -> Result<(), Option<Fail>> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    fn local_inbox(&self) -> Option<&KvInbox> {
        match &self.target {
            Target::Local(i) => Some(i),
            _ => None,
        }
    }

    fn begin(&mut self, header: KvHeader) -> Result<(), Option<Fail>> {
        self.header = Some(header);
        if let Target::Remote(conn) = &self.target {
            let conn = conn
                .clone()
                .map_err(|why| Some(Fail(Failure::KvTransfer, why)))?;
            self.target = Target::Sending(KvSender::new(conn, self.shipment, &header));
        }
        Ok(())
    }

    async fn send(&mut self, piece: KvPiece) -> Result<(), Option<Fail>> {
        let header = self.header.ok_or_else(|| {
            Some(Fail(
                Failure::Internal,
                "a KV piece came before the KV header".into(),
            ))
        })?;
        self.pieces += 1;
        self.payload_bytes += piece.data.len() as u64;
        self.piece_bytes_max = self.piece_bytes_max.max(piece.data.len() as u64);
        match &mut self.target {
            Target::Local(inbox) => {
                inbox.put(self.shipment, header, piece);
                Ok(())
            }
            Target::Sending(s) => {
                self.in_flight.spawn(s.start(&piece));
                if self.in_flight.len() >= PIECES_IN_FLIGHT_MAX {
                    self.settle_one().await?;
                }
                Ok(())
            }
            Target::Remote(_) => Err(Some(Fail(
                Failure::Internal,
                "KV shipping did not begin".into(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stall_bound;
    use std::time::Duration;

    /// A slow but working link is not cut: the bound grows with what is in flight.
    #[test]
    fn the_stall_bound_covers_the_pieces_in_flight_at_the_slowest_link() {
        let three = Duration::from_secs(3);
        // 16 pieces of 1 MiB at 125 MB/s: 0.13 s, the configured bound stands.
        assert_eq!(stall_bound(three, 16, 1 << 20, 125_000_000), three);
        // 16 pieces of 64 MiB at 125 MB/s (1 Gbit/s): 8.6 s.
        let b = stall_bound(three, 16, 64 << 20, 125_000_000);
        assert!(
            b > Duration::from_secs(8) && b < Duration::from_secs(9),
            "{b:?}"
        );
        assert_eq!(stall_bound(three, 0, 0, 0), three);
    }
}
