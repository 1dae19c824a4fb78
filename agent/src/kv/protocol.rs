//! The prefill/decode exchange with the reference engine, in one place.
//!
//! A prefill engine answers a `Prefill` with `KvStart`, then `KvLayer` pieces (raw bytes
//! follow each), the first token, and `Finished { PrefillDone }`. [`PrefillReplies`] reads
//! those replies as steps for whoever ships the KV (the serving path's prefill leg, or
//! `pdagent engine generate`); [`decode_from`] starts a decode engine from a whole shipment.

use pd_engine::protocol::{AgentMessage, EngineMessage, ErrorKind};
use pd_engine::{FinishReason, KvHeader, KvPiece, RequestId, SamplingParams};
use tokio::sync::mpsc;

use crate::engine::client::{EngineClient, EngineClientError, Reply};

/// What one reply of a prefill engine asks of its agent.
#[derive(Debug, PartialEq)]
pub enum PrefillStep {
    /// The KV export begins: its header, and the prompt as the engine tokenized it.
    Begin {
        header: KvHeader,
        prompt_tokens: Vec<u32>,
    },
    /// One piece to ship.
    Piece(KvPiece),
    /// The prefill is done; this many prompt tokens came from the engine's prefix cache.
    Done { prompt_tokens_cached: u32 },
    /// The engine refused (`kind` says why) or broke the protocol (`kind` is `None`).
    Failed {
        kind: Option<ErrorKind>,
        message: String,
    },
    /// Nothing to do.
    Continue,
}

/// A prefill engine's replies read in order; keeps its first token.
#[derive(Debug, Default)]
pub struct PrefillReplies {
    began: bool,
    /// The first output token and its text, once the engine gave it.
    pub first: Option<(u32, String)>,
}

impl PrefillReplies {
    /// The step one reply (with its raw bytes, for a `KvLayer`) asks for.
    pub fn step(&mut self, msg: EngineMessage, payload: Option<Vec<u8>>) -> PrefillStep {
        match msg {
            EngineMessage::KvStart {
                header,
                prompt_tokens,
                ..
            } => {
                self.began = true;
                PrefillStep::Begin {
                    header,
                    prompt_tokens,
                }
            }
            EngineMessage::KvLayer {
                layer,
                token_start,
                token_count,
                ..
            } => {
                if !self.began {
                    return PrefillStep::Failed {
                        kind: None,
                        message: "the prefill engine sent a KV layer before the KV start".into(),
                    };
                }
                PrefillStep::Piece(KvPiece {
                    layer,
                    token_start,
                    token_count,
                    data: payload.unwrap_or_default(),
                })
            }
            EngineMessage::Token {
                index: 0,
                token,
                text,
                ..
            } => {
                self.first = Some((token, text));
                PrefillStep::Continue
            }
            EngineMessage::Finished {
                reason: FinishReason::PrefillDone,
                prompt_tokens_cached,
                ..
            } => PrefillStep::Done {
                prompt_tokens_cached,
            },
            EngineMessage::Finished { reason, .. } => PrefillStep::Failed {
                kind: None,
                message: format!("the prefill engine finished with {reason:?}"),
            },
            EngineMessage::Error { kind, message, .. } => PrefillStep::Failed {
                kind: Some(kind),
                message,
            },
            _ => PrefillStep::Continue,
        }
    }
}

/// Starts decode request `id` on `client` from a whole shipment: the prompt's KV (`pieces`, in
/// the order they were produced), its header, the prompt's tokens and the prefill's first
/// token. The engine's replies come on the returned channel.
pub async fn decode_from(
    client: &EngineClient,
    id: RequestId,
    header: KvHeader,
    prompt_tokens: Vec<u32>,
    first_token: u32,
    sampling: SamplingParams,
    pieces: &[KvPiece],
) -> Result<mpsc::Receiver<Reply>, EngineClientError> {
    let rx = client
        .submit(AgentMessage::Decode {
            id,
            header,
            prompt_tokens,
            first_token,
            sampling,
        })
        .await?;
    for piece in pieces {
        client.import_piece(id, piece).await?;
    }
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> KvHeader {
        KvHeader {
            geometry: pd_engine::KvGeometry {
                model_fingerprint: 7,
                dtype: 0,
                layers: 2,
                kv_heads: 2,
                head_dim: 4,
                block_size_tokens: 16,
            },
            token_count: 3,
        }
    }

    fn layer(l: u32) -> EngineMessage {
        EngineMessage::KvLayer {
            id: 1,
            layer: l,
            token_start: 0,
            token_count: 3,
            payload_bytes: 4,
        }
    }

    fn finished(reason: FinishReason) -> EngineMessage {
        EngineMessage::Finished {
            id: 1,
            reason,
            prompt_tokens: 3,
            prompt_tokens_computed: 3,
            prompt_tokens_cached: 0,
            prompt_tokens_imported: 0,
            output_tokens: 1,
            text: String::new(),
        }
    }

    /// The replies of a prefill, in order: begin, pieces with their bytes, the first token
    /// kept, done.
    #[test]
    fn a_prefill_reads_as_begin_pieces_and_done() {
        let mut r = PrefillReplies::default();
        let begin = r.step(
            EngineMessage::KvStart {
                id: 1,
                header: header(),
                prompt_tokens: vec![5, 6, 7],
            },
            None,
        );
        assert_eq!(
            begin,
            PrefillStep::Begin {
                header: header(),
                prompt_tokens: vec![5, 6, 7]
            }
        );
        match r.step(layer(0), Some(vec![1, 2, 3, 4])) {
            PrefillStep::Piece(p) => {
                assert_eq!((p.layer, p.token_start, p.token_count), (0, 0, 3));
                assert_eq!(p.data, vec![1, 2, 3, 4]);
            }
            other => panic!("{other:?}"),
        }
        let token = EngineMessage::Token {
            id: 1,
            index: 0,
            token: 42,
            text: "hi".into(),
        };
        assert_eq!(r.step(token, None), PrefillStep::Continue);
        assert_eq!(r.first, Some((42, "hi".to_string())));
        assert_eq!(
            r.step(finished(FinishReason::PrefillDone), None),
            PrefillStep::Done {
                prompt_tokens_cached: 0
            }
        );
    }

    /// A piece before the start, a finish other than the prefill's and an engine error are
    /// failures; the error keeps its kind (retry decisions depend on it).
    #[test]
    fn protocol_breaks_and_refusals_fail_the_prefill() {
        let mut r = PrefillReplies::default();
        assert!(matches!(
            r.step(layer(0), Some(vec![0; 4])),
            PrefillStep::Failed { kind: None, .. }
        ));
        assert!(matches!(
            r.step(finished(FinishReason::Length), None),
            PrefillStep::Failed { kind: None, .. }
        ));
        let refused = EngineMessage::Error {
            id: Some(1),
            kind: ErrorKind::Busy,
            message: "full".into(),
        };
        assert_eq!(
            r.step(refused, None),
            PrefillStep::Failed {
                kind: Some(ErrorKind::Busy),
                message: "full".into()
            }
        );
    }
}
