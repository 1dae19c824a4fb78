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
use crate::driver::{HttpEngine, KvTransport};
use crate::engine::client::{EngineClient, Reply};
use crate::kv::bridge::{self, Bridge, Handed};
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
    /// The local channel to the KV connectors of this host's vLLM engines.
    pub bridge: Arc<Bridge>,
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
        data_dir: &std::path::Path,
    ) -> Self {
        let inbox = KvInbox::new(kv.inbox_bytes_max);
        let m = metrics.clone();
        let on_taken = Box::new(move |t: bridge::Taken| {
            let path = if t.network { "network" } else { "host" };
            m.kv_bytes_received.add(&[path], t.payload_bytes);
            m.kv_wait.observe(path, t.wait.as_secs_f64());
        });
        let bridge = Arc::new(Bridge::new(data_dir, inbox.clone(), kv.wait, on_taken));
        Legs {
            node: control.node_name().to_string(),
            supervisor,
            peers,
            control,
            inbox,
            bridge,
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
            Leg::Prefill(l) if h.kv_transport == KvTransport::Agent => {
                ("prefill", self.agent_kv_prefill(h, l, tx).await)
            }
            Leg::Prefill(l) => (
                "prefill",
                match http_legs::prefill(h, &l, http_legs::nixl_params(), tx).await {
                    Ok(Some(p)) => Ok(http_legs::send_params(p, tx).await),
                    Ok(None) => Ok(false),
                    Err(e) => Err(e),
                },
            ),
            Leg::Generate(l) => ("generate", http_legs::generate(h, l, None, tx).await),
            Leg::EngineKvDecode(l) => {
                // pdagent's connector: the shipment is kept for the engine until the leg ends.
                let shipment = agent_shipment(&l.kv_transfer_params);
                for rank in shipment
                    .iter()
                    .flat_map(|s| (0..h.tp).map(|r| bridge::rank_shipment(*s, r)))
                {
                    self.inbox.claim(rank);
                }
                let r = http_legs::generate(
                    h,
                    l.generate,
                    Some((l.kv_transfer_params, l.request_id)),
                    tx,
                )
                .await;
                for rank in shipment
                    .iter()
                    .flat_map(|s| (0..h.tp).map(|r| bridge::rank_shipment(*s, r)))
                {
                    self.inbox.forget(rank);
                }
                ("decode", r)
            }
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

    /// A prefill on a vLLM engine with pdagent's connector: the engine computes the prompt and
    /// its connector hands each layer's KV to this agent (`kv::bridge`), which ships it to the
    /// decode host as it comes (as for the reference engine), then seals it there. The ingress
    /// gets what was shipped and the engine's `kv_transfer_params` (naming the shipment).
    async fn agent_kv_prefill(
        &self,
        h: &HttpEngine,
        leg: PrefillLeg,
        tx: &Events,
    ) -> Result<bool, http_legs::HttpFail> {
        use http_legs::HttpFail;
        let tp = h.tp.max(1);
        let mut expected = self.bridge.expect(leg.shipment, tp);
        let mut ships = Vec::new();
        for rank in 0..tp {
            let id = bridge::rank_shipment(leg.shipment, rank);
            ships.push(Shipper::new(self, &leg.decode_node, id).await);
        }
        let params = serde_json::json!({
            "do_remote_decode": true,
            "pdagent": {"shipment": bridge::shipment_hex(leg.shipment)},
        });
        let http = http_legs::prefill(h, &leg, params, tx);
        tokio::pin!(http);
        let mut answer = None;
        let mut ended = vec![None::<(u64, u32)>; tp as usize];
        let mut began: Option<Instant> = None;
        let fail_local = |ships: &[Shipper], why: &str| {
            for s in ships {
                if let Some(i) = s.local_inbox() {
                    i.fail(s.shipment, why);
                }
            }
        };
        let kv_fail = |f: Option<Fail>| match f {
            Some(Fail(f, m)) => HttpFail(f, m),
            None => HttpFail(Failure::KvTransfer, "KV shipping stopped".into()),
        };
        // Once the engine answered, its connector has handed out everything (it saves each
        // layer during the forward pass); a bound guards against one that did not.
        let mut handed_by = None;
        let mut answered_at = None;
        let outcome: Result<(), HttpFail> = async {
            loop {
                if answer.is_some() && ended.iter().all(Option::is_some) {
                    return Ok(());
                }
                let until = handed_by.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
                tokio::select! {
                    r = &mut http, if answer.is_none() => match r? {
                        Some(p) => {
                            answer = Some(p);
                            answered_at = Some(Instant::now());
                            handed_by = Some(tokio::time::Instant::now() + CONNECTOR_END_WAIT);
                        }
                        None => return Err(HttpFail(Failure::Internal, String::new())),
                    },
                    ev = expected.rx.recv() => match ev {
                        Some(Handed::Piece { rank, header, piece, crc }) => {
                            let Some(ship) = ships.get_mut(rank as usize) else {
                                return Err(HttpFail(Failure::Internal, format!("a KV piece from TP rank {rank} of {tp}")));
                            };
                            if ship.header.is_none() {
                                began.get_or_insert_with(Instant::now);
                                ship.begin(header).map_err(kv_fail)?;
                            }
                            tokio::select! {
                                r = ship.send(piece, crc) => r.map_err(kv_fail)?,
                                _ = tx.closed() => return Err(HttpFail(Failure::Internal, String::new())),
                            }
                        }
                        Some(Handed::End { rank, pieces, tokens }) => {
                            if let Some(e) = ended.get_mut(rank as usize) {
                                *e = Some((pieces, tokens));
                            }
                        }
                        Some(Handed::Abort { why }) => return Err(HttpFail(Failure::KvTransfer, why)),
                        None => return Err(HttpFail(Failure::Internal, "the KV bridge closed".into())),
                    },
                    _ = tokio::time::sleep_until(until), if handed_by.is_some() => {
                        return Err(HttpFail(Failure::KvTransfer, format!(
                            "the prefill engine answered, but its KV connector did not hand out all of the KV within {} s",
                            CONNECTOR_END_WAIT.as_secs()
                        )));
                    }
                }
            }
        }
        .await;
        if let Err(HttpFail(f, m)) = outcome {
            fail_local(&ships, "the prefill leg ended");
            // An empty message: the reader went away, nothing to tell.
            return if m.is_empty() {
                Ok(false)
            } else {
                Err(HttpFail(f, m))
            };
        }
        let answer = answer.expect("answered");
        for (rank, (ship, end)) in ships.iter().zip(&ended).enumerate() {
            let (pieces, tokens) = end.expect("ended");
            if pieces != ship.pieces {
                fail_local(&ships, "KV pieces lost between the engine and its agent");
                return Err(HttpFail(
                    Failure::KvTransfer,
                    format!(
                        "TP rank {rank} handed out {pieces} KV pieces, the agent got {}",
                        ship.pieces
                    ),
                ));
            }
            if tokens != answer.prompt_tokens && answer.prompt_tokens > 0 {
                fail_local(&ships, "KV for another prompt length");
                return Err(HttpFail(
                    Failure::KvTransfer,
                    format!(
                        "TP rank {rank} shipped {tokens} prompt tokens of KV, the engine counted {}",
                        answer.prompt_tokens
                    ),
                ));
            }
        }
        let mut pieces = 0;
        let mut kv_bytes = 0;
        for ship in &mut ships {
            let Some(header) = ship.header else {
                return Err(HttpFail(
                    Failure::Internal,
                    "the prefill engine's connector handed out no KV".into(),
                ));
            };
            let seal = Seal {
                shipment: ship.shipment,
                pieces: ship.pieces,
                header,
                prompt_tokens: Vec::new(),
                first_token: 0,
            };
            let (settled, sealed) = tokio::select! {
                r = async { tokio::join!(ship.settle(), self.seal(&leg.decode_node, seal)) } => r,
                _ = tx.closed() => return Ok(false),
            };
            settled.map_err(kv_fail)?;
            sealed.map_err(|why| HttpFail(Failure::KvTransfer, why))?;
            pieces += ship.pieces;
            kv_bytes += ship.payload_bytes;
        }
        let network = leg.decode_node != self.node;
        let path = if network { "network" } else { "host" };
        self.metrics.kv_bytes_sent.add(&[path], kv_bytes);
        let ms = |t: Option<Instant>| t.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let (kv_ms, tail_ms) = (ms(began), ms(answered_at));
        tracing::info!(shipment = %bridge::shipment_hex(leg.shipment), request_id = %http_legs::request_id(leg.shipment), decode_node = %leg.decode_node, pieces, kv_bytes, kv_ms, tail_ms, "KV shipped for a vLLM prefill");
        let shipped = ServeEvent::KvShipped {
            pieces,
            kv_bytes,
            kv_ms,
            tail_ms,
            network,
        };
        if tx.send(shipped).await.is_err() {
            return Ok(false);
        }
        Ok(http_legs::send_params(answer, tx).await)
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
                        let crc = crate::kv::ship::checksum(&piece.data);
                        tokio::select! {
                            r = ship.send(piece, crc) => r?,
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
/// How long after a vLLM prefill's answer its connector may take to report the end of its KV.
const CONNECTOR_END_WAIT: Duration = Duration::from_secs(30);

/// The shipment pdagent's connector names in a decode leg's `kv_transfer_params`.
fn agent_shipment(params: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(params).ok()?;
    u64::from_str_radix(v["pdagent"]["shipment"].as_str()?, 16).ok()
}
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

    /// Ships one piece whose checksum (taken where it was made) is `crc`.
    async fn send(&mut self, piece: KvPiece, crc: u32) -> Result<(), Option<Fail>> {
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
                inbox.put(self.shipment, header, piece, crc);
                Ok(())
            }
            Target::Sending(s) => {
                self.in_flight.spawn(s.start(&piece, crc));
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
