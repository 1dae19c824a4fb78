//! The legs of a request as the ingress agent sends them to the agents that own its engines,
//! and the events a leg streams back.

use pd_engine::protocol::ErrorKind;
use pd_engine::{FinishReason, Prompt, SamplingParams};
use serde::{Deserialize, Serialize};

/// Prefill on `engine`, shipping the KV to `decode_node` as shipment `shipment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillLeg {
    pub engine: String,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub decode_node: String,
    pub shipment: u64,
}

/// Decode on `engine` from shipment `shipment`, once the prefill side sealed it (the seal
/// carries the first token and the prompt). Opened together with the prefill leg, so the
/// decode starts the moment the KV is whole, without a round trip through the ingress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeLeg {
    pub engine: String,
    pub shipment: u64,
    pub sampling: SamplingParams,
}

/// Prefill and decode on one engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateLeg {
    pub engine: String,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// The output tokens the client already has, from an engine that failed: the engine
    /// recomputes them after the prompt and continues from there (empty: a new request).
    pub resume: Vec<u32>,
}

/// What a leg reports, in order; `Finished` or `Failed` is the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServeEvent {
    /// The prefill is done, its KV shipped and sealed at the decode host.
    Prefilled {
        first_token: u32,
        text: String,
        prompt_tokens: u32,
        prompt_tokens_cached: u32,
        pieces: u64,
        kv_bytes: u64,
        /// From the first KV piece handed out to the last one acknowledged by the decode host.
        kv_ms: f64,
        /// From the request's submission to the engine until its last reply was read.
        engine_us: u64,
    },
    /// The engine took the request; its prompt is this long once tokenized (generate legs).
    Admitted {
        prompt_tokens: u32,
    },
    /// An output token and the text it made final. Decode legs re-send the prefill's first
    /// token as index 0.
    Token {
        index: u32,
        token: u32,
        text: String,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: u32,
        prompt_tokens_cached: u32,
        output_tokens: u32,
        /// From the request's submission to the engine until its terminal reply was read.
        engine_us: u64,
    },
    Failed {
        failure: Failure,
        message: String,
    },
    /// An engine that moves its own KV finished a prefill: what a decode engine needs to pull
    /// the KV (vLLM's `kv_transfer_params`, opaque JSON).
    KvParams {
        params: String,
        prompt_tokens: u32,
        /// From the request's submission to the engine until its answer was read.
        engine_us: u64,
    },
    /// The agent shipped a prefill engine's KV for it (pdagent's vLLM connector), before its
    /// `KvParams`: what went, how long from the first piece to the last acknowledgement, and
    /// how much of that came after the engine's answer (the part not hidden behind its compute).
    KvShipped {
        pieces: u64,
        kv_bytes: u64,
        kv_ms: f64,
        tail_ms: f64,
        /// To another host (not this one).
        network: bool,
    },
}

/// What failed, for the ingress's answer (and retry decisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// The engine is not (or no longer) ready on that host.
    NoEngine,
    /// The engine is full now; another one or a later try may succeed.
    Busy,
    /// The request is invalid for this model.
    BadRequest,
    PromptTooLong,
    /// The engine process went away mid-request.
    EngineLost,
    /// The KV could not be shipped or was refused.
    KvTransfer,
    Internal,
    /// The engine's host could not be reached.
    Unreachable,
}

impl Failure {
    pub fn of(kind: ErrorKind) -> Failure {
        match kind {
            ErrorKind::Busy => Failure::Busy,
            ErrorKind::BadRequest => Failure::BadRequest,
            ErrorKind::PromptTooLong => Failure::PromptTooLong,
            ErrorKind::KvRefused => Failure::KvTransfer,
            ErrorKind::Malformed
            | ErrorKind::VersionMismatch
            | ErrorKind::UnknownRequest
            | ErrorKind::Internal => Failure::Internal,
        }
    }

    /// Whether the same request may succeed on other engines.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Failure::NoEngine
                | Failure::Busy
                | Failure::EngineLost
                | Failure::KvTransfer
                | Failure::Unreachable
        )
    }
}

/// One leg, as sent to the agent that owns its engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Leg {
    Prefill(PrefillLeg),
    Decode(DecodeLeg),
    Generate(GenerateLeg),
    /// Decode on an engine that pulls the KV itself, with what the prefill engine gave.
    EngineKvDecode(EngineKvDecodeLeg),
}

/// Decode on an engine that moves its own KV: the request again (`generate.resume` empty),
/// with the prefill engine's `kv_transfer_params` and the request id both legs share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineKvDecodeLeg {
    pub generate: GenerateLeg,
    pub kv_transfer_params: String,
    pub request_id: String,
}

impl Leg {
    pub fn engine(&self) -> &str {
        match self {
            Leg::Prefill(l) => &l.engine,
            Leg::Decode(l) => &l.engine,
            Leg::Generate(l) => &l.engine,
            Leg::EngineKvDecode(l) => &l.generate.engine,
        }
    }
}
