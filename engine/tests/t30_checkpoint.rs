//! Local safetensors checkpoints: the same weights loaded from disk generate the same tokens
//! as when built in memory; broken checkpoints are refused with errors that name the problem.

mod common;

use common::*;
use pd_engine::{
    Engine, EngineConfig, EngineError, ModelSpec, Preset, Prompt, SamplingParams,
    save_preset_checkpoint,
};

fn from_dir(dir: &std::path::Path) -> Result<Engine, EngineError> {
    Engine::new(EngineConfig {
        model: ModelSpec::Dir(dir.to_path_buf()),
        ..EngineConfig::default()
    })
}

/// Both presets: written to a temp dir, loaded back (tokenizer.json included), same
/// fingerprint, same tokens, same text; and KV crosses between the two.
#[test]
fn checkpoint_generates_like_the_in_memory_preset() {
    for (preset, max_tokens) in [(Preset::Tiny, 20), (Preset::Small, 5)] {
        let dir = tempfile::tempdir().unwrap();
        save_preset_checkpoint(preset, 0, dir.path()).unwrap();
        let mut disk = from_dir(dir.path()).unwrap();
        let mut mem = engine(preset);
        assert_eq!(disk.model_info().fingerprint, mem.model_info().fingerprint);
        assert_eq!(disk.model_info().config, mem.model_info().config);
        assert!(disk.tokenizer().chat_template().is_some());
        for (id, text) in [(1, "checkpoint"), (2, "ünïcode ✓")] {
            let s = SamplingParams::greedy(max_tokens);
            let want = generate(&mut mem, id, Prompt::Text(text.into()), s.clone());
            let got = generate(&mut disk, id, Prompt::Text(text.into()), s.clone());
            assert_eq!(got.tokens, want.tokens, "{preset:?} {text:?}");
            // The texts agree where the output bytes are valid UTF-8; where they are not, the
            // checkpoint's ByteFallback decoder replaces whole byte runs (see tokenizer.rs).
            let bytes: Vec<u8> = want
                .tokens
                .iter()
                .filter(|&&t| t < 256)
                .map(|&t| t as u8)
                .collect();
            if std::str::from_utf8(&bytes).is_ok() {
                assert_eq!(got.text, want.text);
            }
            assert_eq!(got.prompt_tokens, want.prompt_tokens);
        }
        // Prefill from the in-memory preset, decode on the checkpoint engine.
        let s = SamplingParams::greedy(max_tokens);
        let want = generate(&mut mem, 10, Prompt::Text("cross".into()), s.clone());
        let p = prefill(&mut mem, 11, Prompt::Text("cross".into()), s.clone());
        let got = decode(&mut disk, 12, &p, s);
        assert_eq!(got.tokens, want.tokens);
    }
}

/// Another seed is another model: different fingerprint and different tokens.
#[test]
fn seed_changes_the_model() {
    let a = engine(Preset::Tiny);
    let b = Engine::new(EngineConfig {
        weights_seed: 7,
        ..EngineConfig::preset(Preset::Tiny)
    })
    .unwrap();
    assert_ne!(a.model_info().fingerprint, b.model_info().fingerprint);
    // The same seed gives the same fingerprint (weights are deterministic).
    assert_eq!(
        a.model_info().fingerprint,
        engine(Preset::Tiny).model_info().fingerprint
    );
}

/// Missing files, missing tensors, wrong shapes, unsupported architectures and garbage are
/// errors, not panics.
#[test]
fn broken_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");

    save_preset_checkpoint(Preset::Tiny, 0, dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();

    // Shapes that disagree with the weights.
    std::fs::write(
        &cfg_path,
        good_cfg.replace("\"intermediate_size\": 768", "\"intermediate_size\": 700"),
    )
    .unwrap();
    let e = from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(e, EngineError::Checkpoint { .. }) && e.to_string().contains("shape"),
        "{e}"
    );

    // An architecture the engine does not run.
    std::fs::write(&cfg_path, good_cfg.replace("\"llama\"", "\"qwen2\"")).unwrap();
    let e = from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("qwen2"), "{e}");

    // An untied config needs lm_head.weight, which a tied checkpoint lacks.
    std::fs::write(
        &cfg_path,
        good_cfg.replace(
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
        ),
    )
    .unwrap();
    let e = from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("lm_head.weight is missing"), "{e}");

    // Garbage config and garbage weights.
    std::fs::write(&cfg_path, "{not json").unwrap();
    assert!(matches!(
        from_dir(dir.path()),
        Err(EngineError::Checkpoint { .. })
    ));
    std::fs::write(&cfg_path, &good_cfg).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!",
    )
    .unwrap();
    assert!(matches!(
        from_dir(dir.path()),
        Err(EngineError::Checkpoint { .. })
    ));

    // A missing tokenizer.
    let dir2 = tempfile::tempdir().unwrap();
    save_preset_checkpoint(Preset::Tiny, 0, dir2.path()).unwrap();
    std::fs::remove_file(dir2.path().join("tokenizer.json")).unwrap();
    assert!(matches!(
        from_dir(dir2.path()),
        Err(EngineError::Tokenizer(_))
    ));
}
