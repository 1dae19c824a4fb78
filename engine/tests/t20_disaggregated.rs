//! Prefill in one engine, KV shipped, decode in another: the same tokens as one engine doing
//! both, with no prompt token recomputed, and KV from elsewhere refused.

mod common;

use common::*;
use pd_engine::{
    Engine, EngineConfig, EngineError, FinishReason, KvFormatError, KvHeader, Preset, Prompt,
    SamplingParams,
};

fn check_preset(preset: Preset, prompts: &[&str], max_tokens: u32) {
    let mut mono = engine(preset);
    let mut pre = engine(preset);
    let mut dec = engine(preset);
    let g = mono.kv_geometry();
    let mut outputs = std::collections::HashSet::new();
    for (k, text) in prompts.iter().enumerate() {
        let id = k as u64 + 1;
        let s = SamplingParams::greedy(max_tokens);
        let want = generate(&mut mono, id, Prompt::Text(text.to_string()), s.clone());
        let p = prefill(&mut pre, id, Prompt::Text(text.to_string()), s.clone());
        assert_eq!(p.prompt_tokens.len(), text.len() + 1, "BOS + bytes");
        assert_eq!(p.header.token_count as usize, p.prompt_tokens.len());
        // KV payload = 2 × layers × kv_heads × head_dim × 4 bytes × prompt tokens.
        let expected = 2
            * g.layers as usize
            * g.kv_heads as usize
            * g.head_dim as usize
            * 4
            * p.prompt_tokens.len();
        assert_eq!(payload_bytes(&p), expected);
        assert_eq!(g.payload_bytes(p.prompt_tokens.len()), expected);
        outputs.insert(want.tokens.clone());
        let got = decode(&mut dec, id, &p, s);
        assert_eq!(got.tokens, want.tokens, "{preset:?} prompt {text:?}");
        assert_eq!(got.text, want.text);
        assert_eq!(got.reason, want.reason);
        assert_eq!(
            got.prompt_tokens_computed, 0,
            "decode computed no prompt token"
        );
        assert_eq!(got.prompt_tokens_imported as usize, p.prompt_tokens.len());
        assert_eq!(want.prompt_tokens_computed as usize, p.prompt_tokens.len());
    }
    assert_eq!(dec.stats().prompt_tokens_computed_total, 0);
    // The outputs depend on the prompt (the comparison above is not between constants).
    assert!(outputs.len() > 1, "{outputs:?}");
}

/// Several prompts and lengths (within one block, across blocks, exact block multiples) on the
/// tiny preset.
#[test]
fn tiny_disaggregated_equals_monolithic() {
    let long = "a longer prompt that spans several KV blocks of sixteen tokens each, ".repeat(3);
    check_preset(
        Preset::Tiny,
        &[
            "x",
            "hello",
            "fifteen chars!!",
            "héllo wörld ✓ ünïcode",
            &long,
        ],
        24,
    );
}

/// The small preset with short prompts.
#[test]
fn small_disaggregated_equals_monolithic() {
    check_preset(Preset::Small, &["hi", "the small preset, thirty-one t"], 6);
}

/// Seeded sampling continues identically on the decode engine (the draw depends only on seed
/// and token index).
#[test]
fn sampled_disaggregated_equals_monolithic() {
    let mut mono = engine(Preset::Tiny);
    let mut pre = engine(Preset::Tiny);
    let mut dec = engine(Preset::Tiny);
    let s = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 99,
        max_tokens: 20,
        ..Default::default()
    };
    let want = generate(&mut mono, 1, Prompt::Text("sampling".into()), s.clone());
    let p = prefill(&mut pre, 1, Prompt::Text("sampling".into()), s.clone());
    let got = decode(&mut dec, 1, &p, s);
    assert_eq!(got.tokens, want.tokens);
}

/// A whole KV blob (header + pieces) imports too, and chunked prefill (several pieces per
/// layer) ships the same KV.
#[test]
fn chunked_prefill_ships_in_pieces_and_blob_import_works() {
    let text = "chunked prefill cuts this prompt into pieces of at most 8 tokens";
    let mut mono = engine(Preset::Tiny);
    let want = generate(
        &mut mono,
        1,
        Prompt::Text(text.into()),
        SamplingParams::greedy(12),
    );
    let mut pre = Engine::new(EngineConfig {
        step_tokens_max: 8,
        running_max: 4,
        ..EngineConfig::preset(Preset::Tiny)
    })
    .unwrap();
    let p = prefill(
        &mut pre,
        1,
        Prompt::Text(text.into()),
        SamplingParams::greedy(12),
    );
    let layers = pre.kv_geometry().layers as usize;
    assert_eq!(p.pieces.len(), layers * (text.len() + 1).div_ceil(8));
    let mut dec = engine(Preset::Tiny);
    dec.import_kv(
        1,
        &blob(&p),
        p.prompt_tokens.clone(),
        p.first_token,
        SamplingParams::greedy(12),
    )
    .unwrap();
    let got = run(&mut dec, 1);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.prompt_tokens_computed, 0);
}

/// Flipped bits in the KV either are refused or change the output: the KV is really used.
#[test]
fn corrupted_kv_changes_the_output_or_is_refused() {
    let text = "corruption must show";
    let s = SamplingParams::greedy(16);
    let mut pre = engine(Preset::Tiny);
    let p = prefill(&mut pre, 1, Prompt::Text(text.into()), s.clone());
    let mut dec = engine(Preset::Tiny);
    let clean = decode(&mut dec, 1, &p, s.clone());

    // Scale every value of the V rows: finite, so it is accepted, but the attention output
    // changes.
    let mut bad = Prefilled {
        header: p.header,
        prompt_tokens: p.prompt_tokens.clone(),
        pieces: p.pieces.clone(),
        first_token: p.first_token,
        outcome: p.outcome.clone(),
    };
    for piece in &mut bad.pieces {
        let half = piece.data.len() / 2;
        for c in piece.data[half..].chunks_exact_mut(4) {
            let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * -3.0 + 0.5;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    let corrupt = decode(&mut dec, 2, &bad, s.clone());
    assert_ne!(
        corrupt.tokens[1..],
        clean.tokens[1..],
        "corrupted KV must change the tokens after the first"
    );

    // A NaN is refused, the import is dropped and its blocks are freed.
    let mut nan = p.pieces[0].clone();
    nan.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    dec.import_begin(
        3,
        &p.header,
        p.prompt_tokens.clone(),
        p.first_token,
        s.clone(),
    )
    .unwrap();
    let e = dec.import_piece(3, &nan).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::Kv {
                source: KvFormatError::NonFinite { .. },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(dec.stats().kv_blocks_used, 0);
    assert_eq!(dec.stats().importing, 0);

    // Truncated and out-of-order pieces are refused.
    dec.import_begin(
        4,
        &p.header,
        p.prompt_tokens.clone(),
        p.first_token,
        s.clone(),
    )
    .unwrap();
    let mut short = p.pieces[0].clone();
    short.data.pop();
    assert!(matches!(
        dec.import_piece(4, &short),
        Err(EngineError::Kv {
            source: KvFormatError::PayloadSize { .. },
            ..
        })
    ));
    dec.import_begin(
        5,
        &p.header,
        p.prompt_tokens.clone(),
        p.first_token,
        s.clone(),
    )
    .unwrap();
    let mut late = p.pieces[0].clone();
    late.token_start = 1;
    assert!(matches!(
        dec.import_piece(5, &late),
        Err(EngineError::Kv {
            source: KvFormatError::OutOfOrder { .. },
            ..
        })
    ));
    // Garbage blob.
    let e = dec
        .import_kv(
            6,
            b"not kv at all, definitely not a header of 48 bytes",
            p.prompt_tokens.clone(),
            p.first_token,
            s.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::Kv {
                source: KvFormatError::BadMagic { .. },
                ..
            }
        ),
        "{e}"
    );
    // Trailing bytes after a complete blob are refused and leave nothing behind.
    let mut trailing = blob(&p);
    trailing.extend_from_slice(b"extra");
    assert!(matches!(
        dec.import_kv(
            8,
            &trailing,
            p.prompt_tokens.clone(),
            p.first_token,
            s.clone()
        ),
        Err(EngineError::ImportIncomplete { .. })
    ));
    assert_eq!((dec.stats().running, dec.stats().kv_blocks_used), (0, 0));
    // A blob cut short is refused too.
    let cut = blob(&p);
    assert!(
        dec.import_kv(
            9,
            &cut[..cut.len() - 100],
            p.prompt_tokens.clone(),
            p.first_token,
            s.clone()
        )
        .is_err()
    );
    assert_eq!((dec.stats().importing, dec.stats().kv_blocks_used), (0, 0));
    // The engine still serves.
    let again = decode(&mut dec, 7, &p, s);
    assert_eq!(again.tokens, clean.tokens);
    assert_eq!(dec.stats().kv_blocks_used, 0);
}

/// KV of another model (other weights), dtype or layout is refused with a clear error.
#[test]
fn foreign_kv_is_refused() {
    let s = SamplingParams::greedy(4);
    let mut pre = Engine::new(EngineConfig {
        weights_seed: 1,
        ..EngineConfig::preset(Preset::Tiny)
    })
    .unwrap();
    let p = prefill(&mut pre, 1, Prompt::Text("other weights".into()), s.clone());
    let mut dec = engine(Preset::Tiny);
    let e = dec
        .import_begin(
            1,
            &p.header,
            p.prompt_tokens.clone(),
            p.first_token,
            s.clone(),
        )
        .unwrap_err();
    assert!(matches!(
        e,
        EngineError::Kv {
            source: KvFormatError::FingerprintMismatch { .. },
            ..
        }
    ));
    assert!(e.to_string().contains("another model"), "{e}");

    let small = engine(Preset::Small);
    let mut h: KvHeader = small.kv_header(3);
    h.geometry.model_fingerprint = dec.kv_geometry().model_fingerprint;
    let e = dec
        .import_begin(2, &h, vec![256, 1, 2], 5, s.clone())
        .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::Kv {
                source: KvFormatError::LayoutMismatch {
                    field: "layers",
                    ..
                },
                ..
            }
        ),
        "{e}"
    );

    let mut h = dec.kv_header(3);
    h.geometry.dtype = 2;
    let e = dec
        .import_begin(3, &h, vec![256, 1, 2], 5, s.clone())
        .unwrap_err();
    assert!(matches!(
        e,
        EngineError::Kv {
            source: KvFormatError::LayoutMismatch { field: "dtype", .. },
            ..
        }
    ));

    let mut other_blocks = Engine::new(EngineConfig {
        block_size_tokens: 8,
        ..EngineConfig::preset(Preset::Tiny)
    })
    .unwrap();
    let e = other_blocks
        .import_begin(4, &p.header, p.prompt_tokens.clone(), p.first_token, s)
        .unwrap_err();
    assert!(matches!(e, EngineError::Kv { .. }));
    assert_eq!(dec.stats().kv_blocks_used, 0);
}

/// A decode engine with every slot taken refuses a new import as busy (retryable elsewhere).
#[test]
fn full_decode_engine_refuses_imports() {
    let s = SamplingParams::greedy(4);
    let mut pre = engine(Preset::Tiny);
    let p = prefill(&mut pre, 1, Prompt::Text("slots".into()), s.clone());
    let mut dec = Engine::new(EngineConfig {
        running_max: 1,
        ..EngineConfig::preset(Preset::Tiny)
    })
    .unwrap();
    dec.import_begin(
        1,
        &p.header,
        p.prompt_tokens.clone(),
        p.first_token,
        s.clone(),
    )
    .unwrap();
    let e = dec
        .import_begin(
            2,
            &p.header,
            p.prompt_tokens.clone(),
            p.first_token,
            s.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(e, EngineError::DecodeSlotsFull { running_max: 1, .. }),
        "{e}"
    );
    assert!(pd_engine::protocol::ErrorKind::from(&e).retryable());
    for piece in &p.pieces {
        dec.import_piece(1, piece).unwrap();
    }
    run(&mut dec, 1);
    // Free again once the first is done.
    dec.import_begin(2, &p.header, p.prompt_tokens.clone(), p.first_token, s)
        .unwrap();
}

/// A decode that is cancelled mid-import or mid-decode frees its blocks and reports one
/// terminal event.
#[test]
fn cancelled_decode_frees_blocks() {
    let s = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(1000)
    };
    let mut pre = engine(Preset::Tiny);
    let p = prefill(
        &mut pre,
        1,
        Prompt::Text("cancel me please, a prompt over two blocks....".into()),
        s.clone(),
    );
    let mut dec = engine(Preset::Tiny);
    dec.import_begin(
        1,
        &p.header,
        p.prompt_tokens.clone(),
        p.first_token,
        s.clone(),
    )
    .unwrap();
    dec.import_piece(1, &p.pieces[0]).unwrap();
    assert!(dec.stats().kv_blocks_used > 0);
    dec.cancel(1).unwrap();
    assert_eq!(dec.stats().kv_blocks_used, 0);
    let ev = dec.step();
    assert!(matches!(
        ev.as_slice(),
        [pd_engine::EngineEvent::Finished {
            reason: FinishReason::Cancelled,
            ..
        }]
    ));
    // Pieces for a cancelled import are refused as unknown.
    assert!(matches!(
        dec.import_piece(1, &p.pieces[1]),
        Err(EngineError::UnknownRequest { .. })
    ));

    dec.import_begin(2, &p.header, p.prompt_tokens.clone(), p.first_token, s)
        .unwrap();
    for piece in &p.pieces {
        dec.import_piece(2, piece).unwrap();
    }
    for _ in 0..5 {
        dec.step();
    }
    assert!(dec.stats().kv_blocks_used > 0);
    dec.cancel(2).unwrap();
    let st = dec.stats();
    assert_eq!(st.kv_blocks_used, 0);
    assert_eq!(st.running, 0);
    assert!(matches!(
        dec.cancel(2),
        Err(EngineError::UnknownRequest { .. })
    ));
}
