//! `pdagent engine generate`: one request through engine processes, monolithic (one engine
//! prefills and decodes) or disaggregated (a prefill engine process and a decode engine process;
//! the KV goes from one to the other over QUIC bulk streams with mutual TLS, piece by piece as
//! the prefill engine hands it out: the path the agents use between hosts).
//!
//! Times exclude process start and model load: the clock starts when the request is sent to
//! an engine that has already said hello.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_engine::protocol::{AgentMessage, EngineMessage, EngineRole};
use pd_engine::{FinishReason, Prompt, SamplingParams};
use pd_transport::pki::{CertAuthority, Validity};
use pd_transport::{
    BulkHeader, BulkReader, Endpoint, Identity, PeerIdentity, Service, TransportConfig,
};
use serde::Serialize;

use crate::engine::client::{EngineClient, EngineProcess, Reply};
use crate::kv::protocol::{self, PrefillReplies, PrefillStep};
use crate::kv::ship::{KvInbox, KvSender};

/// Bound on the model load of a spawned engine (the `small` preset takes about a second).
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Monolithic,
    Disaggregated,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub mode: Mode,
    pub temperature: f32,
    pub seed: u64,
    /// Weights of presets (both engines).
    pub weights_seed: u64,
    /// Another seed for the decode engine only: a different model, for tests of refusal.
    pub decode_weights_seed: Option<u64>,
    /// Extra `pdagent engine serve` arguments for every engine (e.g. `--test-faults ...`).
    pub engine_args: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub mode: Mode,
    pub model: String,
    pub model_fingerprint: String,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: u32,
    /// Prompt tokens the engine that decoded had to compute (0 when it imported the KV).
    pub decode_prompt_tokens_computed: u32,
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    /// KV payload bytes sent from the prefill to the decode engine (0 when monolithic).
    pub kv_bytes: u64,
    pub kv_pieces: u64,
    /// The KV geometry: payload bytes are 2 x layers x kv_heads x head_dim x
    /// bytes_per_element x prompt_tokens.
    pub kv_layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub kv_bytes_per_element: u32,
}

/// Receives KV pieces on the decode side's endpoint.
struct KvReceiver {
    inbox: KvInbox,
}

impl Service for KvReceiver {
    type Request = ();
    type Response = ();
    async fn call(&self, _peer: &PeerIdentity, _req: ()) -> Result<(), String> {
        Ok(())
    }
    async fn bulk(
        &self,
        _peer: &PeerIdentity,
        header: BulkHeader,
        body: BulkReader,
    ) -> Result<(), String> {
        self.inbox.accept(header, body).await
    }
}

fn engine_args(opts: &GenerateOptions, role: &str, weights_seed: u64) -> Vec<String> {
    let mut a = vec![
        "--role".to_string(),
        role.to_string(),
        "--model".to_string(),
        opts.model.clone(),
        "--weights-seed".to_string(),
        weights_seed.to_string(),
    ];
    a.extend(opts.engine_args.iter().cloned());
    a
}

fn sampling(opts: &GenerateOptions) -> SamplingParams {
    SamplingParams {
        temperature: opts.temperature,
        seed: opts.seed,
        max_tokens: opts.max_tokens,
        ..SamplingParams::default()
    }
}

fn reason(r: FinishReason) -> String {
    format!("{r:?}").to_ascii_lowercase()
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Reply>, what: &str) -> anyhow::Result<Reply> {
    match tokio::time::timeout(REQUEST_TIMEOUT, rx.recv()).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => anyhow::bail!("{what}: the engine connection was lost (did the engine exit?)"),
        Err(_) => anyhow::bail!("{what}: no answer within {} s", REQUEST_TIMEOUT.as_secs()),
    }
}

pub async fn generate(opts: GenerateOptions) -> anyhow::Result<GenerateReport> {
    let dir = tempfile::Builder::new()
        .prefix("pdagent-engine-")
        .tempdir()?;
    match opts.mode {
        Mode::Monolithic => monolithic(&opts, dir.path()).await,
        Mode::Disaggregated => disaggregated(&opts, dir.path()).await,
    }
}

async fn monolithic(
    opts: &GenerateOptions,
    dir: &std::path::Path,
) -> anyhow::Result<GenerateReport> {
    let sock = dir.join("engine.sock");
    let _proc = EngineProcess::spawn(&sock, &engine_args(opts, "both", opts.weights_seed), None)?;
    let engine = EngineClient::connect(&sock, "pdagent-generate", ENGINE_START_TIMEOUT).await?;
    let t0 = Instant::now();
    let mut rx = engine
        .submit(AgentMessage::Generate {
            id: 1,
            prompt: Prompt::Text(opts.prompt.clone()),
            sampling: sampling(opts),
        })
        .await?;
    let d = collect(&mut rx, t0, "generate", None).await?;
    engine.shutdown().await;
    Ok(report(opts, &engine, d, 0, 0))
}

/// What an engine decoded for one request.
struct Decoded {
    tokens: Vec<u32>,
    /// When each token was known, from the request's start.
    times: Vec<Duration>,
    text: String,
    reason: FinishReason,
    prompt_tokens: u32,
    prompt_tokens_computed: u32,
}

/// Reads a request's tokens until its terminal event. With `first` (disaggregated), the
/// stream's index 0 is the prefill engine's first token re-sent: checked, counted as `first`.
async fn collect(
    rx: &mut tokio::sync::mpsc::Receiver<Reply>,
    t0: Instant,
    what: &str,
    first: Option<(u32, Duration)>,
) -> anyhow::Result<Decoded> {
    let mut tokens = Vec::new();
    let mut times = Vec::new();
    let mut out = String::new();
    loop {
        match next(rx, what).await?.0 {
            EngineMessage::Token {
                index, token, text, ..
            } => {
                match first {
                    Some((f, at)) if index == 0 => {
                        anyhow::ensure!(
                            token == f,
                            "the decode engine re-sent first token {token}, the prefill engine gave {f}"
                        );
                        times.push(at);
                    }
                    _ => times.push(t0.elapsed()),
                }
                tokens.push(token);
                out.push_str(&text);
            }
            EngineMessage::Finished {
                reason,
                prompt_tokens,
                prompt_tokens_computed,
                text,
                ..
            } => {
                out.push_str(&text);
                return Ok(Decoded {
                    tokens,
                    times,
                    text: out,
                    reason,
                    prompt_tokens,
                    prompt_tokens_computed,
                });
            }
            EngineMessage::Error { kind, message, .. } => {
                anyhow::bail!("{what}: the engine refused ({kind:?}): {message}")
            }
            _ => {}
        }
    }
}

fn report(
    opts: &GenerateOptions,
    engine: &EngineClient,
    d: Decoded,
    kv_bytes: u64,
    kv_pieces: u64,
) -> GenerateReport {
    let times = &d.times;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let ttft_ms = times.first().map_or(0.0, |t| ms(*t));
    let tpot_ms = match (times.first(), times.last()) {
        (Some(a), Some(b)) if times.len() > 1 => ms(*b - *a) / (times.len() - 1) as f64,
        _ => 0.0,
    };
    GenerateReport {
        mode: opts.mode,
        model: engine.hello().model_name.clone(),
        model_fingerprint: format!("{:016x}", engine.hello().model_fingerprint),
        tokens: d.tokens,
        text: d.text,
        finish_reason: reason(d.reason),
        prompt_tokens: d.prompt_tokens,
        decode_prompt_tokens_computed: d.prompt_tokens_computed,
        ttft_ms,
        tpot_ms,
        kv_bytes,
        kv_pieces,
        kv_layers: engine.hello().kv.layers,
        kv_heads: engine.hello().kv.kv_heads,
        head_dim: engine.hello().kv.head_dim,
        kv_bytes_per_element: engine.hello().kv.bytes_per_element() as u32,
    }
}

fn identity(ca: &CertAuthority, name: &str) -> anyhow::Result<Identity> {
    let i = ca.issue_node(name, Validity::days_from_now(1))?;
    Ok(Identity::from_pem(&ca.cert_pem, &i.cert_pem, &i.key_pem)?)
}

async fn disaggregated(
    opts: &GenerateOptions,
    dir: &std::path::Path,
) -> anyhow::Result<GenerateReport> {
    let (psock, dsock) = (dir.join("prefill.sock"), dir.join("decode.sock"));
    let _p = EngineProcess::spawn(
        &psock,
        &engine_args(opts, "prefill", opts.weights_seed),
        None,
    )?;
    let dseed = opts.decode_weights_seed.unwrap_or(opts.weights_seed);
    let _d = EngineProcess::spawn(&dsock, &engine_args(opts, "decode", dseed), None)?;
    let (prefill, decode) = tokio::try_join!(
        EngineClient::connect(&psock, "pdagent-generate", ENGINE_START_TIMEOUT),
        EngineClient::connect(&dsock, "pdagent-generate", ENGINE_START_TIMEOUT),
    )?;
    anyhow::ensure!(
        prefill.hello().role == EngineRole::Prefill && decode.hello().role == EngineRole::Decode,
        "engines came up in the wrong roles"
    );

    // Two hosts' transports on loopback under a throwaway cluster CA.
    let ca = CertAuthority::generate("engine-generate")?;
    let tcfg = TransportConfig::default();
    let local = "127.0.0.1:0".parse()?;
    let decode_ep = Endpoint::bind(local, &identity(&ca, "decode-host")?, &tcfg)?;
    let inbox = KvInbox::default();
    let server = decode_ep.serve(Arc::new(KvReceiver {
        inbox: inbox.clone(),
    }));
    let prefill_ep = Endpoint::bind(local, &identity(&ca, "prefill-host")?, &tcfg)?;
    let conn = prefill_ep
        .connect(decode_ep.local_addr(), "decode-host")
        .await?;

    let id = 1;
    let sampling = sampling(opts);
    let t0 = Instant::now();
    let mut rx = prefill
        .submit(AgentMessage::Prefill {
            id,
            prompt: Prompt::Text(opts.prompt.clone()),
            sampling: sampling.clone(),
        })
        .await?;
    let mut replies = PrefillReplies::default();
    let mut sender: Option<KvSender> = None;
    let mut prompt_tokens = Vec::new();
    let mut first_at = None;
    loop {
        let (msg, payload, _) = next(&mut rx, "prefill").await?;
        match replies.step(msg, payload) {
            PrefillStep::Begin {
                header,
                prompt_tokens: p,
            } => {
                prompt_tokens = p;
                sender = Some(KvSender::new(conn.clone(), id, &header));
            }
            PrefillStep::Piece(piece) => {
                let s = sender
                    .as_mut()
                    .ok_or_else(|| anyhow::anyhow!("KV layer before KV start"))?;
                s.send(&piece).await?;
            }
            PrefillStep::Continue => {
                if replies.first.is_some() && first_at.is_none() {
                    first_at = Some(t0.elapsed());
                }
            }
            PrefillStep::Done { .. } => break,
            PrefillStep::Failed { kind, message } => {
                anyhow::bail!("prefill engine refused ({kind:?}): {message}")
            }
        }
    }
    let sender = sender.ok_or_else(|| anyhow::anyhow!("the prefill engine exported no KV"))?;
    let (first_token, first_at) = match (replies.first, first_at) {
        (Some((token, _)), Some(at)) => (token, at),
        _ => anyhow::bail!("the prefill engine gave no first token"),
    };
    let arrived = inbox
        .complete(id, sender.pieces(), Duration::from_secs(30))
        .await?;
    let mut rx = protocol::decode_from(
        &decode,
        id,
        arrived.header,
        prompt_tokens,
        first_token,
        sampling,
        &arrived.pieces,
    )
    .await?;
    let d = collect(&mut rx, t0, "decode", Some((first_token, first_at))).await?;
    prefill.shutdown().await;
    decode.shutdown().await;
    conn.close("done");
    server.abort();
    Ok(report(
        opts,
        &decode,
        d,
        sender.payload_bytes,
        sender.pieces(),
    ))
}
