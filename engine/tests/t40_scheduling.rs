//! Continuous batching, chunked prefill, prefix caching, preemption, limits, cancellation and
//! stats.

mod common;

use common::*;
use pd_engine::{
    Engine, EngineConfig, EngineError, EngineEvent, FinishReason, KvEvent, Preset, Prompt,
    RequestKind, SamplingParams, hash,
};

fn tiny(cfg: EngineConfig) -> Engine {
    Engine::new(EngineConfig {
        model: pd_engine::ModelSpec::Preset(Preset::Tiny),
        ..cfg
    })
    .unwrap()
}

/// Runs all `ids` to the end, interleaved in one engine.
fn run_all(e: &mut Engine, ids: &[u64]) -> Vec<Outcome> {
    let mut outs: Vec<Option<Outcome>> = vec![None; ids.len()];
    let mut accs: Vec<(Vec<u32>, String)> = vec![(Vec::new(), String::new()); ids.len()];
    let mut done = vec![None; ids.len()];
    for _ in 0..100_000 {
        let ev = e.step();
        for (k, id) in ids.iter().enumerate() {
            common::collect(*id, &ev, &mut outs[k], &mut accs[k]);
            if let Some(o) = outs[k].take() {
                done[k] = Some(o);
            }
        }
        if done.iter().all(|d| d.is_some()) {
            return done.into_iter().map(|d| d.unwrap()).collect();
        }
    }
    panic!("requests did not finish");
}

fn prompts() -> Vec<String> {
    (0..6)
        .map(|i| format!("request number {i} {}", "x".repeat(i * 9)))
        .collect()
}

/// Requests batched together (with chunked prefill and a small budget) produce what each
/// produces alone.
#[test]
fn batched_and_chunked_equals_alone() {
    let s = SamplingParams::greedy(20);
    let mut alone = Vec::new();
    for (k, p) in prompts().iter().enumerate() {
        let mut e = engine(Preset::Tiny);
        alone.push(generate(&mut e, k as u64, Prompt::Text(p.clone()), s.clone()).tokens);
    }
    let mut e = tiny(EngineConfig {
        step_tokens_max: 24,
        running_max: 4,
        ..EngineConfig::default()
    });
    let ids: Vec<u64> = (0..6).collect();
    for (k, p) in prompts().iter().enumerate() {
        e.add_request(
            k as u64,
            Prompt::Text(p.clone()),
            s.clone(),
            RequestKind::Generate,
        )
        .unwrap();
    }
    let st = e.stats();
    assert_eq!(st.queue_depth, 6);
    let outs = run_all(&mut e, &ids);
    for (k, o) in outs.iter().enumerate() {
        assert_eq!(o.tokens, alone[k], "request {k}");
    }
    let st = e.stats();
    assert_eq!(st.running, 0);
    assert_eq!(st.kv_blocks_used, 0);
    assert!(
        st.recent_steps
            .iter()
            .any(|s| s.prefill_tokens > 0 && s.decode_sequences > 0),
        "prefill chunks ran beside decodes"
    );
    assert!(
        st.recent_steps
            .iter()
            .all(|s| s.prefill_tokens as usize + s.decode_sequences as usize <= 24)
    );
    assert!(st.recent_steps.iter().all(|s| s.decode_sequences <= 4));
    assert!(!st.decode_timings.is_empty());
    assert!(!st.prefill_timings.is_empty());
    assert!(
        st.decode_timings
            .iter()
            .all(|t| t.seconds_total > 0.0 && t.steps > 0)
    );
}

/// With too few KV blocks for every sequence's growth, the youngest is preempted and
/// recomputed; outputs stay the same.
#[test]
fn preemption_recomputes_without_changing_outputs() {
    let s = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(40)
    };
    let mut alone = Vec::new();
    for (k, p) in prompts().iter().take(3).enumerate() {
        let mut e = engine(Preset::Tiny);
        alone.push(generate(&mut e, k as u64, Prompt::Text(p.clone()), s.clone()).tokens);
    }
    let mut e = tiny(EngineConfig {
        block_size_tokens: 4,
        kv_blocks: 30,
        prefix_caching: false,
        ..EngineConfig::default()
    });
    for (k, p) in prompts().iter().take(3).enumerate() {
        e.add_request(
            k as u64,
            Prompt::Text(p.clone()),
            s.clone(),
            RequestKind::Generate,
        )
        .unwrap();
    }
    let outs = run_all(&mut e, &[0, 1, 2]);
    for (k, o) in outs.iter().enumerate() {
        assert_eq!(o.tokens, alone[k], "request {k}");
    }
    assert!(e.stats().preemptions_total > 0);
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// Forced collisions (every block hashes to 0): one client's cached blocks are never reused
/// for another client's prompt. The second prompt computes its own KV and its text is what it
/// is alone; a repeat of the first prompt still hits the cache.
#[test]
fn colliding_block_hashes_cannot_poison_the_prefix_cache() {
    let s = SamplingParams::greedy(12);
    let planted = "the attacker's prompt, long enough for a few blocks of KV; ".repeat(2);
    let victim = "the victim's own question, also long enough for a few blocks; ".repeat(2);
    let alone = generate(
        &mut engine(Preset::Tiny),
        1,
        Prompt::Text(victim.clone()),
        s.clone(),
    );
    let mut e = tiny(EngineConfig {
        test_block_hash_mask: 0,
        ..EngineConfig::default()
    });
    let first = generate(&mut e, 1, Prompt::Text(planted.clone()), s.clone());
    assert!(
        e.stats().kv_blocks_cached > 0,
        "the planted blocks are cached"
    );
    let second = generate(&mut e, 2, Prompt::Text(victim.clone()), s.clone());
    assert_eq!(
        second.prompt_tokens_cached, 0,
        "nothing of the planted KV reused"
    );
    assert_eq!(second.prompt_tokens_computed, second.prompt_tokens);
    assert_eq!(second.tokens, alone.tokens);
    assert_eq!(second.text, alone.text);
    let again = generate(&mut e, 3, Prompt::Text(planted), s);
    assert!(again.prompt_tokens_cached > 0, "a true repeat still hits");
    assert_eq!(again.tokens, first.tokens);
}

/// A repeated prompt hits the prefix cache: fewer prompt tokens computed, same output, and
/// the KV events name the block hashes a router computes from the tokens.
#[test]
fn prefix_cache_hits_and_kv_events() {
    let s = SamplingParams::greedy(8);
    let text = "a shared system prompt that is long enough for a few blocks; ".repeat(2);
    let mut e = engine(Preset::Tiny);
    let first = generate(&mut e, 1, Prompt::Text(text.clone()), s.clone());
    let events = e.take_kv_events();
    let tokens = e.tokenize(&Prompt::Text(text.clone())).unwrap();
    let want = hash::block_hashes(&tokens, 16);
    let stored: Vec<u64> = events
        .iter()
        .filter_map(|ev| match ev {
            KvEvent::Stored { block_hash, .. } => Some(*block_hash),
            _ => None,
        })
        .collect();
    assert_eq!(
        &stored[..want.len()],
        want.as_slice(),
        "stored hashes are the router's hashes, in order"
    );
    if let KvEvent::Stored {
        parent_hash,
        token_ids,
        ..
    } = &events[1]
    {
        assert_eq!(*parent_hash, Some(want[0]));
        assert_eq!(token_ids.as_slice(), &tokens[16..32]);
    }
    let second = generate(&mut e, 2, Prompt::Text(text.clone()), s.clone());
    assert_eq!(second.tokens, first.tokens);
    assert_eq!(second.prompt_tokens_cached as usize, want.len() * 16);
    assert_eq!(
        second.prompt_tokens_computed as usize,
        tokens.len() - want.len() * 16
    );
    let st = e.stats();
    assert!(st.prefix_cache_hits_blocks >= want.len() as u64);
    assert!(st.kv_blocks_cached > 0);
    assert_eq!(st.kv_blocks_used, 0);

    // A prefill engine with a cache hit still ships the whole prompt's KV.
    let p = prefill(&mut e, 3, Prompt::Text(text.clone()), s.clone());
    assert_eq!(
        payload_bytes(&p),
        e.kv_geometry().payload_bytes(tokens.len())
    );
    assert_eq!(p.outcome.prompt_tokens_cached as usize, want.len() * 16);
    let mut dec = engine(Preset::Tiny);
    assert_eq!(decode(&mut dec, 3, &p, s).tokens, first.tokens);

    // Eviction: a small cache filled by other prompts evicts the cached blocks (Removed events).
    let mut small = tiny(EngineConfig {
        kv_blocks: 8,
        ..EngineConfig::default()
    });
    generate(
        &mut small,
        1,
        Prompt::Text("y".repeat(60)),
        SamplingParams::greedy(2),
    );
    small.take_kv_events();
    generate(
        &mut small,
        2,
        Prompt::Text("z".repeat(100)),
        SamplingParams::greedy(2),
    );
    assert!(
        small
            .take_kv_events()
            .iter()
            .any(|ev| matches!(ev, KvEvent::Removed { .. }))
    );
}

/// Limits and bad input: clear errors, and the engine keeps serving.
#[test]
fn bad_requests_get_clear_errors() {
    let mut e = tiny(EngineConfig {
        context_tokens_max: 64,
        queue_max: 2,
        ..EngineConfig::default()
    });
    let s = SamplingParams::greedy(4);
    let err = e
        .add_request(
            1,
            Prompt::Text("x".repeat(64)),
            s.clone(),
            RequestKind::Generate,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::PromptTooLong {
                prompt_tokens: 65,
                context_tokens_max: 64,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("shorten the prompt"));
    assert!(matches!(
        e.add_request(2, Prompt::Tokens(vec![]), s.clone(), RequestKind::Generate),
        Err(EngineError::EmptyPrompt { .. })
    ));
    assert!(matches!(
        e.add_request(
            3,
            Prompt::Tokens(vec![1, 9999]),
            s.clone(),
            RequestKind::Generate
        ),
        Err(EngineError::TokenOutOfRange { token: 9999, .. })
    ));
    let bad = SamplingParams {
        top_p: 0.0,
        ..s.clone()
    };
    assert!(matches!(
        e.add_request(4, Prompt::Text("a".into()), bad, RequestKind::Generate),
        Err(EngineError::Sampling { field: "top_p", .. })
    ));
    e.add_request(
        5,
        Prompt::Text("a".into()),
        s.clone(),
        RequestKind::Generate,
    )
    .unwrap();
    assert!(matches!(
        e.add_request(
            5,
            Prompt::Text("a".into()),
            s.clone(),
            RequestKind::Generate
        ),
        Err(EngineError::DuplicateRequest { .. })
    ));
    e.add_request(
        6,
        Prompt::Text("b".into()),
        s.clone(),
        RequestKind::Generate,
    )
    .unwrap();
    assert!(matches!(
        e.add_request(
            7,
            Prompt::Text("c".into()),
            s.clone(),
            RequestKind::Generate
        ),
        Err(EngineError::QueueFull { .. })
    ));
    let outs = run_all(&mut e, &[5, 6]);
    assert!(
        outs.iter()
            .all(|o| o.tokens.len() == 4 && o.reason == FinishReason::Length)
    );
    // Generation stops at the context limit.
    let long = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(1000)
    };
    let o = generate(&mut e, 8, Prompt::Text("x".repeat(50)), long);
    assert_eq!(o.reason, FinishReason::Length);
    assert_eq!(
        o.prompt_tokens as usize + o.tokens.len(),
        65,
        "positions 0..63 computed plus the last token"
    );
    // KV cache too small for a prompt at all.
    let mut e2 = tiny(EngineConfig {
        kv_blocks: 2,
        block_size_tokens: 4,
        ..EngineConfig::default()
    });
    assert!(matches!(
        e2.add_request(1, Prompt::Text("x".repeat(20)), s, RequestKind::Generate),
        Err(EngineError::KvCacheTooSmall { .. })
    ));
}

/// A sequence that outgrows the whole KV cache ends with `Length` instead of waiting for
/// room forever.
#[test]
fn sequence_longer_than_the_cache_ends() {
    let mut e = tiny(EngineConfig {
        kv_blocks: 4,
        block_size_tokens: 4,
        ..EngineConfig::default()
    });
    let s = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(100)
    };
    let o = generate(&mut e, 1, Prompt::Text("abcd".into()), s);
    assert_eq!(o.reason, FinishReason::Length);
    assert_eq!(
        o.prompt_tokens as usize + o.tokens.len(),
        17,
        "16 cached positions plus the last token"
    );
    assert!(!e.has_work());
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// Stop tokens end generation and are included; max_tokens bounds it.
#[test]
fn stop_tokens_and_max_tokens() {
    let mut e = engine(Preset::Tiny);
    let free = generate(
        &mut e,
        1,
        Prompt::Text("stop here".into()),
        SamplingParams::greedy(12),
    );
    let stop_at = free.tokens[3];
    let first_hit = free.tokens.iter().position(|&t| t == stop_at).unwrap();
    let s = SamplingParams {
        stop_token_ids: vec![stop_at],
        ..SamplingParams::greedy(12)
    };
    let o = generate(&mut e, 2, Prompt::Text("stop here".into()), s);
    assert_eq!(o.reason, FinishReason::Stop);
    assert_eq!(o.tokens, free.tokens[..=first_hit].to_vec());
}

/// Cancelling queued and running requests frees their blocks and yields one terminal event.
#[test]
fn cancel_frees_blocks_everywhere() {
    let mut e = tiny(EngineConfig {
        running_max: 1,
        ..EngineConfig::default()
    });
    let s = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(500)
    };
    e.add_request(
        1,
        Prompt::Text("running one, long enough for blocks".into()),
        s.clone(),
        RequestKind::Generate,
    )
    .unwrap();
    e.add_request(
        2,
        Prompt::Text("queued one".into()),
        s.clone(),
        RequestKind::Generate,
    )
    .unwrap();
    for _ in 0..3 {
        e.step();
    }
    let st = e.stats();
    assert_eq!((st.running, st.queue_depth), (1, 1));
    assert!(st.kv_blocks_used > 0);
    e.cancel(1).unwrap();
    e.cancel(2).unwrap();
    let st = e.stats();
    assert_eq!((st.running, st.queue_depth, st.kv_blocks_used), (0, 0, 0));
    let ev = e.step();
    let cancelled: Vec<u64> = ev
        .iter()
        .filter_map(|x| match x {
            EngineEvent::Finished {
                id,
                reason: FinishReason::Cancelled,
                ..
            } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, vec![1, 2]);
    assert!(!e.has_work());
    // The engine still serves.
    let o = generate(
        &mut e,
        3,
        Prompt::Text("after".into()),
        SamplingParams::greedy(3),
    );
    assert_eq!(o.tokens.len(), 3);
}

/// KV layers are handed out during the forward pass, before the step ends, in layer order.
#[test]
fn kv_layers_stream_during_the_step() {
    let mut e = engine(Preset::Tiny);
    e.add_request(
        1,
        Prompt::Text("stream".into()),
        SamplingParams::greedy(1),
        RequestKind::Prefill,
    )
    .unwrap();
    let mut order = Vec::new();
    e.step_with(&mut |ev| match ev {
        EngineEvent::KvStart { .. } => order.push("start".to_string()),
        EngineEvent::KvLayer { piece, .. } => order.push(format!("layer{}", piece.layer)),
        EngineEvent::Token { .. } => order.push("token".to_string()),
        EngineEvent::Finished { .. } => order.push("finished".to_string()),
        EngineEvent::Error { error, .. } => panic!("{error}"),
    });
    assert_eq!(
        order,
        [
            "start", "layer0", "layer1", "layer2", "layer3", "token", "finished"
        ]
    );
    // A prefill engine keeps no KV referenced after the request (its full blocks stay cached).
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// Steps run on a pool of `compute_threads` threads (1 by default), and the engine can move
/// to the server loop's thread.
#[test]
fn steps_run_on_the_configured_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
    for threads in [1, 2] {
        let mut e = tiny(EngineConfig {
            compute_threads: threads,
            ..EngineConfig::default()
        });
        generate(
            &mut e,
            1,
            Prompt::Text("threads".into()),
            SamplingParams::greedy(2),
        );
        assert_eq!(e.stats().compute_threads, threads);
    }
}

/// The bench runs and reports positive rates for every batch size.
#[test]
fn bench_reports_rates() {
    let r = pd_engine::bench(
        &EngineConfig::preset(Preset::Tiny),
        &pd_engine::BenchOptions {
            prefill_tokens: 64,
            prefill_repeats: 1,
            decode_batches: vec![1, 4],
            decode_context_tokens: 16,
            decode_steps: 4,
        },
    )
    .unwrap();
    assert_eq!(r.decode.len(), 2);
    assert!(r.prefill_tokens_per_s > 0.0 && r.decode.iter().all(|d| d.tokens_per_s > 0.0));
    assert_eq!(r.compute_threads, 1);
}

/// A request resumed after the first k output tokens (on a fresh engine, as after a failure)
/// continues with the same tokens from index k, and texts that join into the same text, at
/// temperature 0 and when sampling, on these fixed cases. (Replay computes in other shapes
/// than the undisturbed run, so the logits agree to rounding, not bit for bit: a choice closer
/// than that could differ; README "When engines, hosts and links fail".)
#[test]
fn resumed_request_continues_exactly() {
    let prompt = Prompt::Text("resume this request on another engine".into());
    for sampling in [
        SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(24)
        },
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: 42,
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::default()
        },
    ] {
        let mut e = engine(Preset::Tiny);
        e.add_request(1, prompt.clone(), sampling.clone(), RequestKind::Generate)
            .unwrap();
        let mut texts: Vec<String> = Vec::new();
        let mut tokens = Vec::new();
        let mut tail = String::new();
        while tail.is_empty() && tokens.len() < 24 {
            for ev in e.step() {
                match ev {
                    EngineEvent::Token { token, text, .. } => {
                        tokens.push(token);
                        texts.push(text);
                    }
                    EngineEvent::Finished { text, .. } => tail = text + "\u{0}",
                    _ => {}
                }
            }
        }
        let whole: String = texts.concat() + tail.trim_end_matches('\u{0}');
        for k in [1usize, 5, tokens.len() - 1] {
            let mut e = engine(Preset::Tiny);
            e.resume_request(7, prompt.clone(), tokens[..k].to_vec(), sampling.clone())
                .unwrap();
            let mut got = Vec::new();
            let mut text: String = texts[..k].concat();
            let mut finished = None;
            for _ in 0..10_000 {
                for ev in e.step() {
                    match ev {
                        EngineEvent::Token {
                            index,
                            token,
                            text: t,
                            ..
                        } => {
                            assert_eq!(index as usize, k + got.len(), "indices continue");
                            got.push(token);
                            text.push_str(&t);
                        }
                        EngineEvent::Finished {
                            output_tokens,
                            text: t,
                            ..
                        } => {
                            text.push_str(&t);
                            finished = Some(output_tokens);
                        }
                        EngineEvent::Error { error, .. } => panic!("{error}"),
                        _ => {}
                    }
                }
                if finished.is_some() {
                    break;
                }
            }
            assert_eq!(finished, Some(tokens.len() as u32), "all output counted");
            assert_eq!(got, tokens[k..], "resumed at {k} continues the same");
            assert_eq!(text, whole, "resumed at {k} joins into the same text");
        }
        // Nothing left to resume is refused, and leaves the engine unchanged.
        let mut e = engine(Preset::Tiny);
        let err = e
            .resume_request(9, prompt.clone(), tokens.clone(), sampling.clone())
            .unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Sampling {
                    field: "max_tokens",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!e.has_work());
        // Output that ends in a stop token is over: the request ends at the next step.
        let stop = SamplingParams {
            stop_token_ids: vec![tokens[2]],
            ..sampling.clone()
        };
        e.resume_request(10, prompt.clone(), tokens[..3].to_vec(), stop)
            .unwrap();
        let ev = e.step();
        assert!(
            matches!(
                ev.as_slice(),
                [EngineEvent::Finished {
                    reason: FinishReason::Stop,
                    output_tokens: 3,
                    ..
                }]
            ),
            "{ev:?}"
        );
        assert!(!e.has_work());
    }
}
