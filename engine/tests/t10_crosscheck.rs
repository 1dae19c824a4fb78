//! The decoder against an independent Llama implementation (candle-transformers) on the same
//! weights, and the paged, chunked computation against one-shot computation.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use pd_engine::{Engine, EngineConfig, ModelSpec, Preset, save_preset_checkpoint};

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax(a: &[f32]) -> usize {
    (0..a.len()).fold(0, |b, i| if a[i] > a[b] { i } else { b })
}

/// Writes the preset to a checkpoint dir, loads it in candle-transformers' Llama, and compares
/// the last-token logits of a prompt and of several decode steps with ours.
fn crosscheck(preset: Preset, prompt_len: usize, decode_steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    save_preset_checkpoint(preset, 0, dir.path()).unwrap();
    let cfg_text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let lcfg: llama::LlamaConfig = serde_json::from_str(&cfg_text).unwrap();
    let lcfg = lcfg.into_config(false);
    let dev = Device::Cpu;
    let tensors =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let reference = llama::Llama::load(vb, &lcfg).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &lcfg, &dev).unwrap();

    let mut engine = Engine::new(EngineConfig::preset(preset)).unwrap();
    let tokens: Vec<u32> = std::iter::once(256)
        .chain((1..prompt_len).map(|i| ((i * 37 + 11) % 256) as u32))
        .collect();
    // Reference: the prompt in one pass, then one token at a time.
    let x = Tensor::new(tokens.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut want = vec![
        reference
            .forward(&x, 0, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    ];
    let mut all = tokens.clone();
    for _ in 0..decode_steps {
        let next = argmax(want.last().unwrap()) as u32;
        all.push(next);
        let x = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
        want.push(
            reference
                .forward(&x, all.len() - 1, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    // Ours: through the paged cache, prompt in one chunk then token by token.
    let got_prompt = engine.logits(&tokens, tokens.len()).unwrap();
    let got_steps = engine.logits(&all, 1).unwrap();
    assert_eq!(got_prompt.len(), 1);
    let d = max_rel_diff(&got_prompt[0], &want[0]);
    assert!(
        d < 1e-4,
        "{preset:?} prompt logits differ by {d} (relative)"
    );
    assert_eq!(argmax(&got_prompt[0]), argmax(&want[0]));
    for s in 0..=decode_steps {
        let ours = &got_steps[tokens.len() - 1 + s];
        let d = max_rel_diff(ours, &want[s]);
        assert!(
            d < 1e-4,
            "{preset:?} step {s} logits differ by {d} (relative)"
        );
    }
    // The model really depends on its input: different prompts give different logits.
    let other = engine
        .logits(&tokens[..prompt_len - 1], prompt_len)
        .unwrap();
    assert!(max_rel_diff(&other[0], &want[0]) > 1e-3);
}

/// Tiny preset (tied embeddings) matches candle-transformers' Llama within 1e-4 relative.
#[test]
fn tiny_matches_candle_transformers() {
    crosscheck(Preset::Tiny, 45, 6);
}

/// Small preset (untied lm_head, head_dim 64) matches candle-transformers' Llama.
#[test]
fn small_matches_candle_transformers() {
    crosscheck(Preset::Small, 21, 3);
}

/// Chunked prefill through the paged cache gives the logits of a one-shot prefill.
#[test]
fn chunked_logits_match_one_shot() {
    let mut engine = Engine::new(EngineConfig {
        model: ModelSpec::Preset(Preset::Tiny),
        block_size_tokens: 4,
        ..EngineConfig::default()
    })
    .unwrap();
    let tokens: Vec<u32> = (0..50).map(|i| (i * 5 % 256) as u32).collect();
    let one = engine.logits(&tokens, 50).unwrap();
    let chunked = engine.logits(&tokens, 7).unwrap();
    assert!(max_rel_diff(&one[0], chunked.last().unwrap()) < 1e-5);
    // The probe left no KV blocks in use.
    assert_eq!(engine.stats().kv_blocks_used, 0);
}
