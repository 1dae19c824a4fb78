//! Helpers shared by the engine's integration tests: drive an `Engine` through whole requests.
#![allow(dead_code)]

use pd_engine::{
    Engine, EngineConfig, EngineEvent, FinishReason, KvHeader, KvPiece, Preset, Prompt, RequestId,
    RequestKind, SamplingParams,
};

pub fn engine(preset: Preset) -> Engine {
    Engine::new(EngineConfig::preset(preset)).expect("engine starts")
}

/// What a finished request reported.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: FinishReason,
    pub prompt_tokens: u32,
    pub prompt_tokens_computed: u32,
    pub prompt_tokens_cached: u32,
    pub prompt_tokens_imported: u32,
}

/// Folds one request's events into an outcome; checks indices are consecutive.
pub fn collect(
    id: RequestId,
    events: &[EngineEvent],
    out: &mut Option<Outcome>,
    acc: &mut (Vec<u32>, String),
) {
    for e in events {
        match e {
            EngineEvent::Token {
                id: i,
                index,
                token,
                text,
            } if *i == id => {
                assert_eq!(
                    *index as usize,
                    acc.0.len(),
                    "token indices are consecutive"
                );
                acc.0.push(*token);
                acc.1.push_str(text);
            }
            EngineEvent::Finished {
                id: i,
                reason,
                prompt_tokens,
                prompt_tokens_computed,
                prompt_tokens_cached,
                prompt_tokens_imported,
                output_tokens,
                text,
            } if *i == id => {
                assert!(out.is_none(), "exactly one terminal event");
                assert_eq!(*output_tokens as usize, acc.0.len());
                acc.1.push_str(text);
                *out = Some(Outcome {
                    tokens: acc.0.clone(),
                    text: acc.1.clone(),
                    reason: *reason,
                    prompt_tokens: *prompt_tokens,
                    prompt_tokens_computed: *prompt_tokens_computed,
                    prompt_tokens_cached: *prompt_tokens_cached,
                    prompt_tokens_imported: *prompt_tokens_imported,
                });
            }
            EngineEvent::Error { id: i, error } if *i == id => {
                panic!("request {id} failed: {error}")
            }
            _ => {}
        }
    }
}

/// Runs steps until request `id` finishes.
pub fn run(engine: &mut Engine, id: RequestId) -> Outcome {
    let mut out = None;
    let mut acc = (Vec::new(), String::new());
    for _ in 0..100_000 {
        let ev = engine.step();
        collect(id, &ev, &mut out, &mut acc);
        if let Some(o) = out.take() {
            return o;
        }
    }
    panic!("request {id} did not finish");
}

pub fn generate(engine: &mut Engine, id: RequestId, prompt: Prompt, s: SamplingParams) -> Outcome {
    engine
        .add_request(id, prompt, s, RequestKind::Generate)
        .expect("request accepted");
    run(engine, id)
}

/// What a prefill engine hands out.
pub struct Prefilled {
    pub header: KvHeader,
    pub prompt_tokens: Vec<u32>,
    pub pieces: Vec<KvPiece>,
    pub first_token: u32,
    pub outcome: Outcome,
}

pub fn prefill(engine: &mut Engine, id: RequestId, prompt: Prompt, s: SamplingParams) -> Prefilled {
    engine
        .add_request(id, prompt, s, RequestKind::Prefill)
        .expect("prefill accepted");
    let mut header = None;
    let mut prompt_tokens = Vec::new();
    let mut pieces = Vec::new();
    let mut out = None;
    let mut acc = (Vec::new(), String::new());
    for _ in 0..100_000 {
        let ev = engine.step();
        for e in &ev {
            match e {
                EngineEvent::KvStart {
                    id: i,
                    header: h,
                    prompt_tokens: p,
                } if *i == id => {
                    assert!(header.is_none());
                    header = Some(*h);
                    prompt_tokens = p.clone();
                }
                EngineEvent::KvLayer { id: i, piece } if *i == id => {
                    assert!(header.is_some(), "KvStart comes before the layers");
                    assert!(acc.0.is_empty(), "KV layers come before the first token");
                    pieces.push(piece.clone());
                }
                _ => {}
            }
        }
        collect(id, &ev, &mut out, &mut acc);
        if let Some(o) = out.take() {
            assert_eq!(o.reason, FinishReason::PrefillDone);
            assert_eq!(o.tokens.len(), 1);
            return Prefilled {
                header: header.expect("KvStart"),
                prompt_tokens,
                pieces,
                first_token: o.tokens[0],
                outcome: o,
            };
        }
    }
    panic!("prefill {id} did not finish");
}

/// Imports the pieces into `engine` and decodes to the end.
pub fn decode(engine: &mut Engine, id: RequestId, p: &Prefilled, s: SamplingParams) -> Outcome {
    engine
        .import_begin(id, &p.header, p.prompt_tokens.clone(), p.first_token, s)
        .expect("import accepted");
    let n = p.pieces.len();
    for (k, piece) in p.pieces.iter().enumerate() {
        let done = engine.import_piece(id, piece).expect("piece accepted");
        assert_eq!(
            done,
            k + 1 == n,
            "import completes with the last piece only"
        );
    }
    run(engine, id)
}

/// The payload bytes of a prefill's pieces (headers excluded).
pub fn payload_bytes(p: &Prefilled) -> usize {
    p.pieces.iter().map(|x| x.data.len()).sum()
}

/// Header + pieces as one blob (the layout of KV_FORMAT.md).
pub fn blob(p: &Prefilled) -> Vec<u8> {
    let mut b = p.header.to_bytes().to_vec();
    for piece in &p.pieces {
        b.extend_from_slice(&piece.to_bytes());
    }
    b
}
