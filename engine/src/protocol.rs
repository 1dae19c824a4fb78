//! The engine protocol: the messages between an agent and its engine process over a unix
//! socket (documented in `engine/PROTOCOL.md`).
//!
//! These are serde types; the agent frames them with the project's codec (bincode, 4-byte
//! length prefix). Enum variants are encoded by their position, so **variants and fields are
//! only ever appended, never reordered, renumbered or removed**; a changed message is a new
//! variant. The tests pin the variant numbers.
//!
//! Bulk KV never goes through the codec: a [`AgentMessage::ImportKv`] or
//! [`EngineMessage::KvLayer`] frame announces `payload_bytes`, and exactly that many raw bytes
//! (K rows then V rows, little-endian f32, see `KV_FORMAT.md`) follow it on the stream.

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineEvent, FinishReason, Prompt, RequestId};
use crate::error::EngineError;
use crate::hash::BLOCK_HASH_FUNCTION;
use crate::kv_cache::KvEvent;
use crate::kv_format::{KvGeometry, KvHeader, KvPiece};
use crate::sampling::SamplingParams;
use crate::stats::EngineStats;

/// Version of this protocol; the hello exchange refuses a peer with another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// What the engine process is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EngineRole {
    Prefill,
    Decode,
    Both,
}

/// Agent to engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// [0] First message on a connection.
    Hello {
        protocol_version: u32,
        agent: String,
    },
    /// [1] Prefill and decode here; replies: `Accepted`, `Token`s, `Finished` (or `Error`).
    Generate {
        id: RequestId,
        prompt: Prompt,
        sampling: SamplingParams,
    },
    /// [2] Prefill only; replies: `Accepted`, `KvStart`, `KvLayer`s (each followed by raw
    /// bytes), `Token` index 0, `Finished { reason: PrefillDone }`.
    Prefill {
        id: RequestId,
        prompt: Prompt,
        sampling: SamplingParams,
    },
    /// [3] Decode from imported KV: reserves the blocks; `ImportKv` pieces follow. Replies:
    /// `Accepted`, then once every piece arrived `Token`s from index 0 (the prefill engine's
    /// first token, re-sent) and `Finished`.
    Decode {
        id: RequestId,
        header: KvHeader,
        prompt_tokens: Vec<u32>,
        first_token: u32,
        sampling: SamplingParams,
    },
    /// [4] One KV piece of a `Decode`; exactly `payload_bytes` raw bytes follow this frame.
    ImportKv {
        id: RequestId,
        layer: u32,
        token_start: u32,
        token_count: u32,
        payload_bytes: u64,
    },
    /// [5] Cancel a request in any state; its KV blocks are freed at once.
    Cancel { id: RequestId },
    /// [6] Reply: `Stats`.
    Stats,
    /// [7] Drain the KV events; reply: `KvEvents`.
    KvEvents,
    /// [8] Finish nothing more, exit.
    Shutdown,
    /// [9] Generate after `output`, the tokens already produced for this prompt and sampling
    /// (by an engine that failed): the prompt and those tokens are computed, then replies as
    /// `Generate` with `Token`s from index `output.len()`; `Finished` counts all output tokens.
    Resume {
        id: RequestId,
        prompt: Prompt,
        output: Vec<u32>,
        sampling: SamplingParams,
    },
}

/// Engine to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EngineMessage {
    /// [0] Reply to `Hello`.
    Hello(EngineHello),
    /// [1] A request was queued (or an import begun).
    Accepted { id: RequestId },
    /// [2] A prefill's KV begins; the header goes in front of the pieces when shipped.
    KvStart {
        id: RequestId,
        header: KvHeader,
        prompt_tokens: Vec<u32>,
    },
    /// [3] One layer's KV for a token range; exactly `payload_bytes` raw bytes follow.
    KvLayer {
        id: RequestId,
        layer: u32,
        token_start: u32,
        token_count: u32,
        payload_bytes: u64,
    },
    /// [4] An output token and the text it made final.
    Token {
        id: RequestId,
        index: u32,
        token: u32,
        text: String,
    },
    /// [5] The request's terminal event.
    Finished {
        id: RequestId,
        reason: FinishReason,
        prompt_tokens: u32,
        prompt_tokens_computed: u32,
        prompt_tokens_cached: u32,
        prompt_tokens_imported: u32,
        output_tokens: u32,
        text: String,
    },
    /// [6] A refusal or failure; with `id` it is the request's terminal event.
    Error {
        id: Option<RequestId>,
        kind: ErrorKind,
        message: String,
    },
    /// [7] Reply to `Stats`.
    Stats(EngineStats),
    /// [8] Reply to `KvEvents`.
    KvEvents { events: Vec<KvEvent> },
    /// [9] Right after `Accepted` of a `Generate` or `Prefill`: the prompt's length once
    /// tokenized (so an agent that ends the request early still knows it).
    Admitted { id: RequestId, prompt_tokens: u32 },
}

/// What an engine announces: enough for an agent to pair engines and for a router to hash
/// prefixes the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineHello {
    pub protocol_version: u32,
    pub role: EngineRole,
    pub model_name: String,
    pub model_fingerprint: u64,
    pub kv: KvGeometry,
    pub block_size_tokens: u32,
    /// Names the block hash; see `pd_engine::hash`.
    pub block_hash_function: String,
    pub context_tokens_max: u32,
    pub vocab_size: u32,
    pub eos_token_ids: Vec<u32>,
    pub compute_threads: u32,
}

/// Coarse classes of errors, for the agent's retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The message could not be decoded or is not allowed now.
    Malformed,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The request is invalid (empty prompt, bad sampling, token out of range, duplicate id).
    BadRequest,
    /// The prompt does not fit the context.
    PromptTooLong,
    /// KV refused: other model, dtype or layout, corrupt or out-of-order bytes.
    KvRefused,
    /// Not enough KV blocks or queue space now; another engine or a later try may succeed.
    Busy,
    /// The request id is not known.
    UnknownRequest,
    /// The engine failed.
    Internal,
}

impl ErrorKind {
    /// Whether the same request may succeed if tried again (later or elsewhere).
    pub fn retryable(self) -> bool {
        matches!(self, ErrorKind::Busy | ErrorKind::Internal)
    }
}

impl From<&EngineError> for ErrorKind {
    fn from(e: &EngineError) -> ErrorKind {
        match e {
            EngineError::PromptTooLong { .. } => ErrorKind::PromptTooLong,
            EngineError::Kv { .. } | EngineError::ImportIncomplete { .. } => ErrorKind::KvRefused,
            EngineError::KvCacheFull { .. }
            | EngineError::QueueFull { .. }
            | EngineError::DecodeSlotsFull { .. } => ErrorKind::Busy,
            EngineError::UnknownRequest { .. } => ErrorKind::UnknownRequest,
            EngineError::EmptyPrompt { .. }
            | EngineError::TokenOutOfRange { .. }
            | EngineError::Sampling { .. }
            | EngineError::DuplicateRequest { .. }
            | EngineError::KvCacheTooSmall { .. }
            | EngineError::Tokenizer(_) => ErrorKind::BadRequest,
            EngineError::Config { .. }
            | EngineError::Checkpoint { .. }
            | EngineError::Compute(_)
            | EngineError::ThreadPool { .. } => ErrorKind::Internal,
        }
    }
}

impl EngineMessage {
    /// The `Error` message for a refusal of request `id`.
    pub fn error(id: Option<RequestId>, e: &EngineError) -> EngineMessage {
        EngineMessage::Error {
            id,
            kind: ErrorKind::from(e),
            message: e.to_string(),
        }
    }

    /// The message for an engine event, and the raw bytes that follow it on the stream (KV
    /// layers only).
    pub fn from_event(e: EngineEvent) -> (EngineMessage, Option<Vec<u8>>) {
        match e {
            EngineEvent::KvStart {
                id,
                header,
                prompt_tokens,
            } => (
                EngineMessage::KvStart {
                    id,
                    header,
                    prompt_tokens,
                },
                None,
            ),
            EngineEvent::KvLayer { id, piece } => (
                EngineMessage::KvLayer {
                    id,
                    layer: piece.layer,
                    token_start: piece.token_start,
                    token_count: piece.token_count,
                    payload_bytes: piece.data.len() as u64,
                },
                Some(piece.data),
            ),
            EngineEvent::Token {
                id,
                index,
                token,
                text,
            } => (
                EngineMessage::Token {
                    id,
                    index,
                    token,
                    text,
                },
                None,
            ),
            EngineEvent::Finished {
                id,
                reason,
                prompt_tokens,
                prompt_tokens_computed,
                prompt_tokens_cached,
                prompt_tokens_imported,
                output_tokens,
                text,
            } => (
                EngineMessage::Finished {
                    id,
                    reason,
                    prompt_tokens,
                    prompt_tokens_computed,
                    prompt_tokens_cached,
                    prompt_tokens_imported,
                    output_tokens,
                    text,
                },
                None,
            ),
            EngineEvent::Error { id, error } => (
                EngineMessage::Error {
                    id: Some(id),
                    kind: ErrorKind::Internal,
                    message: error,
                },
                None,
            ),
        }
    }
}

impl AgentMessage {
    /// Rebuilds the piece of an `ImportKv` frame from the raw bytes that followed it.
    pub fn import_piece(&self, payload: Vec<u8>) -> Option<(RequestId, KvPiece)> {
        match self {
            AgentMessage::ImportKv {
                id,
                layer,
                token_start,
                token_count,
                ..
            } => Some((
                *id,
                KvPiece {
                    layer: *layer,
                    token_start: *token_start,
                    token_count: *token_count,
                    data: payload,
                },
            )),
            _ => None,
        }
    }
}

impl Engine {
    /// This engine's hello.
    pub fn hello(&self, role: EngineRole) -> EngineHello {
        let g = self.kv_geometry();
        EngineHello {
            protocol_version: PROTOCOL_VERSION,
            role,
            model_name: self.model_info().name.clone(),
            model_fingerprint: g.model_fingerprint,
            kv: g,
            block_size_tokens: g.block_size_tokens,
            block_hash_function: BLOCK_HASH_FUNCTION.to_string(),
            context_tokens_max: self.context_tokens_max() as u32,
            vocab_size: self.model_info().config.vocab_size as u32,
            eos_token_ids: self.eos_token_ids().to_vec(),
            compute_threads: self.config().compute_threads as u32,
        }
    }
}

/// Checks a peer's hello version.
pub fn check_version(peer_version: u32) -> Result<(), String> {
    if peer_version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!(
            "engine protocol version {peer_version} is not supported (this side speaks {PROTOCOL_VERSION}); run the same pdagent build for agent and engine"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The agent's codec is the only place that speaks bincode; the tests go through it too.
    use pd_transport::codec;

    fn enc<T: Serialize>(m: &T) -> Vec<u8> {
        codec::encode(m).unwrap()
    }

    fn round<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(m: T) {
        let b = enc(&m);
        let back: T = codec::decode(&b, 1 << 24).unwrap();
        assert_eq!(back, m);
    }

    fn header() -> KvHeader {
        KvHeader {
            geometry: KvGeometry {
                model_fingerprint: 42,
                dtype: 1,
                layers: 4,
                kv_heads: 2,
                head_dim: 32,
                block_size_tokens: 16,
            },
            token_count: 9,
        }
    }

    /// Every message round-trips through the project's codec configuration (bincode 2,
    /// standard config, serde mode).
    #[test]
    fn messages_round_trip_through_bincode() {
        let s = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: 3,
            max_tokens: 5,
            stop_token_ids: vec![1, 2],
            ignore_eos: true,
        };
        round(AgentMessage::Hello {
            protocol_version: 1,
            agent: "a".into(),
        });
        round(AgentMessage::Generate {
            id: 1,
            prompt: Prompt::Text("hé".into()),
            sampling: s.clone(),
        });
        round(AgentMessage::Prefill {
            id: 2,
            prompt: Prompt::Tokens(vec![1, 2, 3]),
            sampling: s.clone(),
        });
        round(AgentMessage::Decode {
            id: 3,
            header: header(),
            prompt_tokens: vec![5; 9],
            first_token: 7,
            sampling: s,
        });
        round(AgentMessage::ImportKv {
            id: 3,
            layer: 1,
            token_start: 0,
            token_count: 9,
            payload_bytes: 4608,
        });
        round(AgentMessage::Cancel { id: 3 });
        round(AgentMessage::Stats);
        round(AgentMessage::KvEvents);
        round(AgentMessage::Shutdown);
        round(AgentMessage::Resume {
            id: 4,
            prompt: Prompt::Text("r".into()),
            output: vec![9, 8],
            sampling: SamplingParams::greedy(4),
        });
        round(EngineMessage::Finished {
            id: 1,
            reason: FinishReason::Length,
            prompt_tokens: 3,
            prompt_tokens_computed: 0,
            prompt_tokens_cached: 0,
            prompt_tokens_imported: 3,
            output_tokens: 4,
            text: "x".into(),
        });
        round(EngineMessage::KvEvents {
            events: vec![
                KvEvent::Stored {
                    block_hash: 1,
                    parent_hash: None,
                    token_ids: vec![1],
                },
                KvEvent::Removed { block_hash: 1 },
            ],
        });
        round(EngineMessage::Stats(EngineStats::default()));
        round(EngineMessage::Error {
            id: None,
            kind: ErrorKind::Malformed,
            message: "m".into(),
        });
    }

    /// Variant numbers are the wire format: appending is allowed, renumbering is not.
    #[test]
    fn variant_numbers_are_pinned() {
        assert_eq!(enc(&AgentMessage::Cancel { id: 0 })[0], 5);
        assert_eq!(enc(&AgentMessage::Stats)[0], 6);
        assert_eq!(enc(&AgentMessage::KvEvents)[0], 7);
        assert_eq!(enc(&AgentMessage::Shutdown)[0], 8);
        assert_eq!(
            enc(&AgentMessage::Resume {
                id: 0,
                prompt: Prompt::Tokens(vec![]),
                output: vec![],
                sampling: SamplingParams::default(),
            })[0],
            9
        );
        assert_eq!(enc(&EngineMessage::Accepted { id: 0 })[0], 1);
        assert_eq!(enc(&EngineMessage::Stats(EngineStats::default()))[0], 7);
        assert_eq!(enc(&EngineMessage::KvEvents { events: vec![] })[0], 8);
        assert_eq!(
            enc(&EngineMessage::Admitted {
                id: 0,
                prompt_tokens: 1
            })[0],
            9
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[255u8, 1, 2][..], &[3], &[1, 200, 200, 200, 200, 200]] {
            let r: Result<AgentMessage, _> = codec::decode(bytes, 1 << 20);
            assert!(r.is_err());
        }
    }

    #[test]
    fn kv_layer_event_becomes_frame_plus_raw_bytes() {
        let piece = KvPiece {
            layer: 2,
            token_start: 4,
            token_count: 1,
            data: vec![9; 512],
        };
        let (m, raw) = EngineMessage::from_event(EngineEvent::KvLayer { id: 8, piece });
        assert_eq!(
            m,
            EngineMessage::KvLayer {
                id: 8,
                layer: 2,
                token_start: 4,
                token_count: 1,
                payload_bytes: 512
            }
        );
        assert_eq!(raw.unwrap().len(), 512);
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        assert!(check_version(PROTOCOL_VERSION + 1).is_err());
    }
}
