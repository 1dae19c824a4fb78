//! The Llama-architecture decoder: shapes, weights (seeded presets or a safetensors checkpoint),
//! the model fingerprint and the batched forward pass over the paged KV cache.
//!
//! All computation is f32 on the CPU. Matrix products go through candle's gemm; the only loops
//! written here copy KV rows between the paged store and contiguous per-sequence tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Preset;
use crate::error::EngineError;
use crate::hash;
use crate::kv_cache::KvStore;

/// Llama-3 style frequency scaling of the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The shapes and constants of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub context_tokens_max: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Byte tokenizer ids: 0..=255 are bytes, then these specials.
pub(crate) const BYTE_BOS: u32 = 256;
pub(crate) const BYTE_EOS: u32 = 257;
pub(crate) const BYTE_VOCAB: usize = 258;

impl ModelConfig {
    /// The fixed shapes of a preset. Changing them changes every fingerprint: don't.
    pub fn preset(preset: Preset) -> ModelConfig {
        match preset {
            Preset::Tiny => ModelConfig {
                hidden_size: 256,
                intermediate_size: 768,
                num_layers: 4,
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 32,
                vocab_size: BYTE_VOCAB,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                rope_scaling: None,
                context_tokens_max: 2048,
                tie_word_embeddings: true,
                bos_token_id: Some(BYTE_BOS),
                eos_token_ids: vec![BYTE_EOS],
            },
            Preset::Small => ModelConfig {
                hidden_size: 512,
                intermediate_size: 1536,
                num_layers: 8,
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 64,
                vocab_size: BYTE_VOCAB,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                rope_scaling: None,
                context_tokens_max: 4096,
                tie_word_embeddings: false,
                bos_token_id: Some(BYTE_BOS),
                eos_token_ids: vec![BYTE_EOS],
            },
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return Err("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return Err(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be positive and even",
                self.head_dim
            ));
        }
        if self.context_tokens_max == 0 {
            return Err("max_position_embeddings must be positive".into());
        }
        Ok(())
    }

    /// KV bytes of one token over all layers (K and V, f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * 4
    }

    /// The HF `config.json` of this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_tokens_max,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "torch_dtype": "float32",
        });
        if let Some(s) = self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }

    /// Reads an HF Llama `config.json`.
    fn from_hf_json(text: &str) -> Result<ModelConfig, String> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: Option<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rms_norm_eps: f64,
            #[serde(default = "default_theta")]
            rope_theta: f32,
            rope_scaling: Option<serde_json::Value>,
            max_position_embeddings: usize,
            tie_word_embeddings: Option<bool>,
            bos_token_id: Option<u32>,
            eos_token_id: Option<serde_json::Value>,
        }
        fn default_theta() -> f32 {
            10_000.0
        }
        let hf: Hf = serde_json::from_str(text).map_err(|e| format!("config.json: {e}"))?;
        if let Some(t) = &hf.model_type
            && t != "llama"
        {
            return Err(format!(
                "model_type {t:?} is not supported; the reference engine runs Llama-architecture models (model_type \"llama\")"
            ));
        }
        let rope_scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|k| k.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(
                        serde_json::from_value::<RopeScaling>(v.clone())
                            .map_err(|e| format!("config.json rope_scaling: {e}"))?,
                    ),
                    other => return Err(format!("rope_scaling type {other:?} is not supported")),
                }
            }
        };
        let eos_token_ids = match &hf.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Number(n)) => vec![
                n.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("config.json eos_token_id is not a token id")?,
            ],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|n| {
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| "config.json eos_token_id holds a non-id".to_string())
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("config.json eos_token_id must be an id or a list".into()),
        };
        let heads = hf.num_attention_heads.max(1);
        let cfg = ModelConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling,
            context_tokens_max: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The names and shapes of every weight, in the HF Llama naming.
    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.num_heads * hd, h],
            ));
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.num_kv_heads * hd, h],
            ));
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.num_kv_heads * hd, h],
            ));
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.num_heads * hd],
            ));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out
    }
}

/// What a caller may know about the loaded model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `tiny`, `small` or the checkpoint directory.
    pub name: String,
    pub config: ModelConfig,
    /// Hash over the config and every weight (see `KV_FORMAT.md`); KV is only exchanged
    /// between engines with equal fingerprints.
    pub fingerprint: u64,
}

/// SplitMix64: a tiny, well-known PRNG whose output is the same on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) from the top 24 bits: exact in f32, so no libm rounding enters.
    fn next_symmetric(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32;
        u * 2.0 - 1.0
    }
}

/// The weights of a preset, generated from `seed`, under their HF names. Uniform
/// distributions scaled to the usual standard deviations (1/sqrt(fan_in) for projections),
/// and norm weights near 1 (not exactly 1, so a checkpoint loader that dropped them would be
/// caught by the tests).
pub(crate) fn preset_weights(
    cfg: &ModelConfig,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let mut out = BTreeMap::new();
    for (name, shape) in cfg.weight_shapes() {
        let n: usize = shape.iter().product();
        let mut rng = SplitMix64(seed ^ hash::fnv1a64(name.as_bytes()));
        let (scale, offset) = if name.ends_with("norm.weight") {
            (0.1f32, 1.0f32)
        } else if name.contains("embed_tokens") {
            (0.1 * 3f32.sqrt(), 0.0)
        } else {
            let fan_in = shape[1] as f32;
            (3f32.sqrt() / fan_in.sqrt(), 0.0)
        };
        let data: Vec<f32> = (0..n)
            .map(|_| rng.next_symmetric() * scale + offset)
            .collect();
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// Writes a preset as a Llama checkpoint directory (config.json, model.safetensors and a
/// byte-level tokenizer.json/tokenizer_config.json), so other tools can load the same weights.
pub fn save_preset_checkpoint(preset: Preset, seed: u64, dir: &Path) -> Result<(), EngineError> {
    let cfg = ModelConfig::preset(preset);
    let weights = preset_weights(&cfg, seed)?;
    let ck = |reason: String| EngineError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| ck(format!("cannot create directory: {e}")))?;
    let json = serde_json::to_string_pretty(&cfg.to_hf_json()).map_err(|e| ck(e.to_string()))?;
    std::fs::write(dir.join("config.json"), json)
        .map_err(|e| ck(format!("cannot write config.json: {e}")))?;
    let map: HashMap<String, Tensor> = weights.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))
        .map_err(|e| ck(format!("cannot write model.safetensors: {e}")))?;
    crate::tokenizer::write_byte_tokenizer(dir).map_err(|e| ck(e.to_string()))?;
    Ok(())
}

/// Loads every `*.safetensors` file of `dir` as f32 tensors.
fn load_checkpoint_weights(
    dir: &Path,
    cfg: &ModelConfig,
) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let ck = |reason: String| EngineError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ck(format!("cannot read directory: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ck("no *.safetensors file".into()));
    }
    let mut all = BTreeMap::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| ck(format!("{}: {e}", f.display())))?;
        all.extend(tensors);
    }
    let mut out = BTreeMap::new();
    for (name, shape) in cfg.weight_shapes() {
        let t = all
            .remove(&name)
            .ok_or_else(|| ck(format!("tensor {name} is missing")))?;
        if t.dims() != shape.as_slice() {
            return Err(ck(format!(
                "tensor {name} has shape {:?}, config.json implies {shape:?}",
                t.dims()
            )));
        }
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| ck(format!("tensor {name}: cannot convert to f32: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Hash over the config and every weight, in name order (see `KV_FORMAT.md`).
fn fingerprint(cfg: &ModelConfig, weights: &BTreeMap<String, Tensor>) -> Result<u64, EngineError> {
    let mut h = hash::fnv1a64(b"pdagent-model-v1");
    let put = |h: &mut u64, v: u64| *h = hash::fnv1a64_update(*h, &v.to_le_bytes());
    for v in [
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    ] {
        put(&mut h, v as u64);
    }
    put(&mut h, cfg.rms_norm_eps.to_bits());
    put(&mut h, u64::from(cfg.rope_theta.to_bits()));
    put(&mut h, u64::from(cfg.tie_word_embeddings));
    if let Some(s) = cfg.rope_scaling {
        put(&mut h, u64::from(s.factor.to_bits()));
        put(&mut h, u64::from(s.low_freq_factor.to_bits()));
        put(&mut h, u64::from(s.high_freq_factor.to_bits()));
        put(&mut h, s.original_max_position_embeddings as u64);
    }
    for (name, t) in weights {
        h = hash::fnv1a64_update(h, name.as_bytes());
        for d in t.dims() {
            put(&mut h, *d as u64);
        }
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        h = hash::fnv1a64_words(h, data.iter().map(|x| x.to_bits()));
    }
    Ok(h)
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v projections fused: [(heads + 2 kv_heads) × head_dim, hidden]. Weights keep
    /// the checkpoint's [out, in] layout and are multiplied through a transposed view, which
    /// gemm reads without repacking (measured faster at decode batch > 1 than [in, out]).
    wqkv: Tensor,
    wo: Tensor,
    mlp_norm: Tensor,
    /// gate and up projections fused: [2 × intermediate, hidden].
    wgate_up: Tensor,
    wdown: Tensor,
}

/// One sequence's share of a forward pass.
pub(crate) struct SeqInput<'a> {
    /// The tokens computed in this pass (a prefill chunk or one decode token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; the KV of positions before it is already in the cache.
    pub start_pos: usize,
    /// The blocks holding this sequence's KV, covering `start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    /// Compute the logits of the last token.
    pub want_logits: bool,
    /// Hand this pass's KV rows out layer by layer.
    pub export: bool,
}

/// One layer's KV rows of one sequence, handed out as soon as the layer is computed.
/// Rows are [tokens, kv_heads, head_dim] f32.
pub(crate) struct LayerKvOut<'a> {
    pub seq: usize,
    pub layer: usize,
    pub token_start: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
}

pub(crate) struct Model {
    pub info: ModelInfo,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// cos and sin of every position, [context, head_dim / 2].
    rope_cos: Tensor,
    rope_sin: Tensor,
}

impl Model {
    /// `positions_max` bounds the positions the model will ever compute (the engine's
    /// context), which sizes the rotary tables.
    pub fn from_preset(
        preset: Preset,
        seed: u64,
        positions_max: usize,
    ) -> Result<Model, EngineError> {
        let cfg = ModelConfig::preset(preset);
        let weights = preset_weights(&cfg, seed)?;
        Model::build(preset.name().to_string(), cfg, weights, positions_max)
    }

    pub fn from_dir(dir: &Path, positions_max: usize) -> Result<Model, EngineError> {
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| {
            EngineError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!("cannot read config.json: {e}"),
            }
        })?;
        let cfg = ModelConfig::from_hf_json(&text).map_err(|reason| EngineError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        })?;
        let weights = load_checkpoint_weights(dir, &cfg)?;
        Model::build(dir.display().to_string(), cfg, weights, positions_max)
    }

    fn build(
        name: String,
        cfg: ModelConfig,
        mut w: BTreeMap<String, Tensor>,
        positions_max: usize,
    ) -> Result<Model, EngineError> {
        let fingerprint = fingerprint(&cfg, &w)?;
        let mut take = |n: &str| {
            w.remove(n).ok_or_else(|| EngineError::Checkpoint {
                path: name.clone().into(),
                reason: format!("tensor {n} is missing"),
            })
        };
        let t = |x: Tensor| -> Result<Tensor, EngineError> { Ok(x.contiguous()?) };
        let embed = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            t(embed.clone())?
        } else {
            t(take("lm_head.weight")?)?
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let q = take(&format!("{p}.self_attn.q_proj.weight"))?;
            let k = take(&format!("{p}.self_attn.k_proj.weight"))?;
            let v = take(&format!("{p}.self_attn.v_proj.weight"))?;
            let gate = take(&format!("{p}.mlp.gate_proj.weight"))?;
            let up = take(&format!("{p}.mlp.up_proj.weight"))?;
            layers.push(Layer {
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                wqkv: t(Tensor::cat(&[&q, &k, &v], 0)?)?,
                wo: t(take(&format!("{p}.self_attn.o_proj.weight"))?)?,
                mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                wgate_up: t(Tensor::cat(&[&gate, &up], 0)?)?,
                wdown: t(take(&format!("{p}.mlp.down_proj.weight"))?)?,
            });
        }
        let (rope_cos, rope_sin) = rope_tables(&cfg, positions_max.min(cfg.context_tokens_max))?;
        Ok(Model {
            info: ModelInfo {
                name,
                config: cfg,
                fingerprint,
            },
            embed,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
        })
    }

    /// One forward pass over a batch of sequences. Writes every computed token's K and V into
    /// the paged store, calls `on_layer` with each exporting sequence's rows right after each
    /// layer, and returns the last-token logits of the sequences with `want_logits`, in order.
    pub fn forward(
        &self,
        kv: &mut KvStore,
        seqs: &[SeqInput<'_>],
        on_layer: &mut dyn FnMut(LayerKvOut<'_>),
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = &self.info.config;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let group = nh / nkv;
        let dev = Device::Cpu;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs {
            ids.extend_from_slice(s.tokens);
            positions.extend((s.start_pos..s.start_pos + s.tokens.len()).map(|p| p as u32));
        }
        let n_total = ids.len();
        if n_total == 0 {
            return Ok(Vec::new());
        }
        let ids_t = Tensor::from_vec(ids, n_total, &dev)?;
        let pos_t = Tensor::from_vec(positions, n_total, &dev)?;
        // Batched rope: every token is its own "batch" row with its own cos/sin row.
        let cos = self
            .rope_cos
            .index_select(&pos_t, 0)?
            .reshape((n_total, 1, hd / 2))?;
        let sin = self
            .rope_sin
            .index_select(&pos_t, 0)?
            .reshape((n_total, 1, hd / 2))?;
        let mut x = self.embed.index_select(&ids_t, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let row = nkv * hd;

        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps as f32)?;
            let qkv = h.matmul(&layer.wqkv.t()?)?;
            let q = qkv
                .narrow(1, 0, nh * hd)?
                .reshape((n_total, nh, 1, hd))?
                .contiguous()?;
            let k = qkv
                .narrow(1, nh * hd, nkv * hd)?
                .reshape((n_total, nkv, 1, hd))?
                .contiguous()?;
            let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?.contiguous()?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?.reshape((n_total, nh, hd))?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let k_rows = k.flatten_all()?.to_vec1::<f32>()?;
            let v_rows = v.flatten_all()?.to_vec1::<f32>()?;

            let mut outs = Vec::with_capacity(seqs.len());
            let mut off = 0usize;
            for (si, s) in seqs.iter().enumerate() {
                let n = s.tokens.len();
                let kr = &k_rows[off * row..(off + n) * row];
                let vr = &v_rows[off * row..(off + n) * row];
                kv.write_rows(li, s.block_table, s.start_pos, kr, vr);
                if s.export {
                    on_layer(LayerKvOut {
                        seq: si,
                        layer: li,
                        token_start: s.start_pos,
                        k: kr,
                        v: vr,
                    });
                }
                let ctx = s.start_pos + n;
                let (kc, vc) = kv.gather_head_major(li, s.block_table, ctx);
                let kc = Tensor::from_vec(kc, (nkv, ctx, hd), &dev)?;
                let vc = Tensor::from_vec(vc, (nkv, ctx, hd), &dev)?;
                // [n, nh, hd] -> [nkv, group × n, hd]: query head h reads KV head h / group.
                let qs = q
                    .narrow(0, off, n)?
                    .reshape((n, nkv, group, hd))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?
                    .reshape((nkv, group * n, hd))?;
                let att = (qs.matmul(&kc.t()?)? * scale)?;
                let att = if n > 1 {
                    let mut mask = vec![0f32; n * ctx];
                    for i in 0..n {
                        let p = s.start_pos + i;
                        for m in &mut mask[i * ctx + p + 1..(i + 1) * ctx] {
                            *m = f32::NEG_INFINITY;
                        }
                    }
                    let mask = Tensor::from_vec(mask, (n, ctx), &dev)?;
                    att.reshape((nkv, group, n, ctx))?
                        .broadcast_add(&mask)?
                        .reshape((nkv, group * n, ctx))?
                } else {
                    att
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att
                    .matmul(&vc)?
                    .reshape((nkv, group, n, hd))?
                    .permute((2, 0, 1, 3))?
                    .reshape((n, nh * hd))?;
                outs.push(y);
                off += n;
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Tensor::cat(&outs, 0)?
            };
            x = (x + attn.matmul(&layer.wo.t()?)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, cfg.rms_norm_eps as f32)?;
            let gu = h.matmul(&layer.wgate_up.t()?)?;
            let i = cfg.intermediate_size;
            let act = (candle_nn::ops::silu(&gu.narrow(1, 0, i)?)? * gu.narrow(1, i, i)?)?;
            x = (x + act.matmul(&layer.wdown.t()?)?)?;
        }

        let mut rows = Vec::new();
        let mut off = 0u32;
        for s in seqs {
            off += s.tokens.len() as u32;
            if s.want_logits {
                rows.push(off - 1);
            }
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let n_rows = rows.len();
        let last = x.index_select(&Tensor::from_vec(rows, n_rows, &dev)?, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.rms_norm_eps as f32)?;
        let logits = last.matmul(&self.lm_head.t()?)?;
        Ok(logits.to_vec2::<f32>()?)
    }
}

/// cos/sin tables computed the way candle-transformers' Llama does (positions × inverse
/// frequencies as one matmul), so the cross-check compares like with like.
fn rope_tables(cfg: &ModelConfig, ctx: usize) -> Result<(Tensor, Tensor), EngineError> {
    let hd = cfg.head_dim;
    let base: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / hd as f32))
        .collect();
    let inv_freq: Vec<f32> = match cfg.rope_scaling {
        None => base,
        Some(s) => {
            let low_wavelen = s.original_max_position_embeddings as f32 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f32 / s.high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2. * std::f32::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / s.factor
                    } else {
                        let smooth = (s.original_max_position_embeddings as f32 / wavelen
                            - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1. - smooth) * freq / s.factor + smooth * freq
                    }
                })
                .collect()
        }
    };
    let dev = Device::Cpu;
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, n), &dev)?;
    let idx = Tensor::arange(0, ctx as u32, &dev)?
        .to_dtype(DType::F32)?
        .reshape((ctx, 1))?
        .matmul(&inv_freq)?;
    Ok((idx.cos()?, idx.sin()?))
}
