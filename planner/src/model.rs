//! Model architectures: the built-in catalog (numbers from each model's published
//! `config.json`) and the parser of any local Hugging Face `config.json`.
//!
//! Everything the performance model needs is derived here: parameter counts (total and active),
//! FLOPs per token, attention FLOPs per (query, key) pair and KV bytes per token.

use serde_json::Value;

use crate::{Dtype, PlanError};

/// How a layer's attention is laid out.
#[derive(Debug, Clone, PartialEq)]
pub enum Attention {
    /// Multi-head or grouped-query attention (Llama, Qwen, Mixtral, gpt-oss).
    Gqa {
        heads: u32,
        kv_heads: u32,
        head_dim: u32,
    },
    /// Multi-head latent attention (DeepSeek-V2/V3): the cache holds one compressed latent of
    /// `kv_lora_rank + qk_rope_head_dim` values per token and layer, shared by every head.
    Mla {
        heads: u32,
        q_lora_rank: Option<u32>,
        kv_lora_rank: u32,
        qk_nope_head_dim: u32,
        qk_rope_head_dim: u32,
        v_head_dim: u32,
    },
}

/// A mixture-of-experts feed-forward block.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    /// Routed experts per layer.
    pub experts: u32,
    pub experts_per_token: u32,
    /// Experts every token goes through (DeepSeek's shared expert).
    pub shared_experts: u32,
    pub moe_intermediate_size: u32,
    /// The first layers that keep a dense MLP (`first_k_dense_replace`).
    pub dense_layers: u32,
}

/// Layers that attend only to the last `tokens` positions (gpt-oss alternates them with full
/// attention): their KV cache and attention cost stop growing past the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    pub tokens: u32,
    pub layers: u32,
}

/// A decoder-only transformer, as far as its serving cost goes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub hidden_size: u32,
    pub layers: u32,
    pub vocab_size: u32,
    /// The dense MLP's width (SwiGLU: gate, up and down projections).
    pub intermediate_size: u32,
    pub attention: Attention,
    pub moe: Option<Moe>,
    pub sliding_window: Option<SlidingWindow>,
    pub tie_word_embeddings: bool,
    /// The format the published checkpoint ships in (DeepSeek-V3: fp8, gpt-oss: MXFP4).
    pub native_weights: Dtype,
}

#[allow(clippy::too_many_arguments)]
fn gqa(
    name: &str,
    hidden: u32,
    layers: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    intermediate: u32,
    vocab: u32,
) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        hidden_size: hidden,
        layers,
        vocab_size: vocab,
        intermediate_size: intermediate,
        attention: Attention::Gqa {
            heads,
            kv_heads,
            head_dim,
        },
        moe: None,
        sliding_window: None,
        tie_word_embeddings: false,
        native_weights: Dtype::Bf16,
    }
}

/// The built-in models, with the numbers of their published `config.json`.
pub fn catalog() -> Vec<ModelSpec> {
    let llama8 = gqa("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256);
    let llama70 = gqa("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256);
    let qwen8 = gqa("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936);
    let qwen32 = gqa("Qwen3-32B", 5120, 64, 64, 8, 128, 25600, 151936);
    let qwen235 = ModelSpec {
        moe: Some(Moe {
            experts: 128,
            experts_per_token: 8,
            shared_experts: 0,
            moe_intermediate_size: 1536,
            dense_layers: 0,
        }),
        ..gqa("Qwen3-235B-A22B", 4096, 94, 64, 4, 128, 12288, 151936)
    };
    let deepseek = ModelSpec {
        name: "DeepSeek-V3".into(),
        hidden_size: 7168,
        // The multi-token-prediction layer (num_nextn_predict_layers) is not served.
        layers: 61,
        vocab_size: 129280,
        intermediate_size: 18432,
        attention: Attention::Mla {
            heads: 128,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
        },
        moe: Some(Moe {
            experts: 256,
            experts_per_token: 8,
            shared_experts: 1,
            moe_intermediate_size: 2048,
            dense_layers: 3,
        }),
        sliding_window: None,
        tie_word_embeddings: false,
        native_weights: Dtype::Fp8,
    };
    let gpt_oss = ModelSpec {
        moe: Some(Moe {
            experts: 128,
            experts_per_token: 4,
            shared_experts: 0,
            moe_intermediate_size: 2880,
            dense_layers: 0,
        }),
        sliding_window: Some(SlidingWindow {
            tokens: 128,
            layers: 18,
        }),
        native_weights: Dtype::Int4,
        ..gqa("gpt-oss-120b", 2880, 36, 64, 8, 64, 2880, 201088)
    };
    vec![llama8, llama70, qwen8, qwen32, qwen235, deepseek, gpt_oss]
}

/// Finds a catalog model by name, ignoring case; the error lists the known names.
pub fn find_model(name: &str) -> Result<ModelSpec, PlanError> {
    let all = catalog();
    let wanted = name.trim();
    // "meta-llama/Llama-3.1-8B" and "Qwen/Qwen3-8B" name the same models.
    let short = wanted.rsplit('/').next().unwrap_or(wanted);
    all.iter()
        .find(|m| m.name.eq_ignore_ascii_case(wanted) || m.name.eq_ignore_ascii_case(short))
        .cloned()
        .ok_or_else(|| PlanError::UnknownModel {
            name: name.into(),
            known: all
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl ModelSpec {
    /// Query heads.
    pub fn heads(&self) -> u32 {
        match self.attention {
            Attention::Gqa { heads, .. } | Attention::Mla { heads, .. } => heads,
        }
    }

    /// Weights of one layer's attention projections.
    pub fn attention_params_per_layer(&self) -> f64 {
        let h = self.hidden_size as f64;
        match self.attention {
            Attention::Gqa {
                heads,
                kv_heads,
                head_dim,
            } => {
                let q = (heads * head_dim) as f64;
                let kv = (kv_heads * head_dim) as f64;
                h * q + 2.0 * h * kv + q * h
            }
            Attention::Mla {
                heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let n = heads as f64;
                let qk = (qk_nope_head_dim + qk_rope_head_dim) as f64;
                let q = match q_lora_rank {
                    Some(r) => h * r as f64 + r as f64 * n * qk,
                    None => h * n * qk,
                };
                let kv_a = h * (kv_lora_rank + qk_rope_head_dim) as f64;
                let kv_b = kv_lora_rank as f64 * n * (qk_nope_head_dim + v_head_dim) as f64;
                let o = n * v_head_dim as f64 * h;
                q + kv_a + kv_b + o
            }
        }
    }

    fn dense_mlp_params(&self) -> f64 {
        3.0 * self.hidden_size as f64 * self.intermediate_size as f64
    }

    /// Weights of one routed expert (SwiGLU: gate, up, down).
    pub fn expert_params(&self) -> f64 {
        self.moe.as_ref().map_or(0.0, |m| {
            3.0 * self.hidden_size as f64 * m.moe_intermediate_size as f64
        })
    }

    fn moe_layers(&self) -> u32 {
        self.moe
            .as_ref()
            .map_or(0, |m| self.layers.saturating_sub(m.dense_layers))
    }

    /// Routed-expert weights of all layers: the part a decode step reads only where its batch
    /// routes tokens.
    pub fn routed_expert_params(&self) -> f64 {
        self.moe.as_ref().map_or(0.0, |m| {
            self.moe_layers() as f64 * m.experts as f64 * self.expert_params()
        })
    }

    /// Weights every token uses inside the transformer blocks (attention, dense MLPs, shared
    /// experts and routers), without embeddings and the LM head.
    pub fn always_active_block_params(&self) -> f64 {
        let attn = self.layers as f64 * self.attention_params_per_layer();
        match &self.moe {
            None => attn + self.layers as f64 * self.dense_mlp_params(),
            Some(m) => {
                let dense = m.dense_layers.min(self.layers) as f64 * self.dense_mlp_params();
                let per_moe_layer = m.shared_experts as f64 * self.expert_params()
                    + self.hidden_size as f64 * m.experts as f64;
                attn + dense + self.moe_layers() as f64 * per_moe_layer
            }
        }
    }

    /// Block weights one token computes with: the always-active part plus its routed experts.
    pub fn active_block_params(&self) -> f64 {
        self.always_active_block_params()
            + self.moe.as_ref().map_or(0.0, |m| {
                self.moe_layers() as f64 * m.experts_per_token as f64 * self.expert_params()
            })
    }

    /// The LM head (vocab × hidden); the embedding table has the same size.
    pub fn lm_head_params(&self) -> f64 {
        self.vocab_size as f64 * self.hidden_size as f64
    }

    fn embedding_tables(&self) -> f64 {
        if self.tie_word_embeddings { 1.0 } else { 2.0 }
    }

    /// All weights, as published parameter counts give them (norms and biases left out).
    pub fn total_params(&self) -> f64 {
        self.always_active_block_params()
            + self.routed_expert_params()
            + self.embedding_tables() * self.lm_head_params()
    }

    /// Weights one token computes with: its block weights and the LM head (the embedding is
    /// a lookup). This is how gpt-oss's 5.1B "active" is counted.
    pub fn active_params(&self) -> f64 {
        self.active_block_params() + self.lm_head_params()
    }

    /// Bytes of all weights. Quantized checkpoints keep the embedding table and the LM head in
    /// bf16; the block projections take `weights`.
    pub fn weight_bytes(&self, weights: Dtype) -> f64 {
        (self.always_active_block_params() + self.routed_expert_params()) * weights.bytes()
            + self.embedding_tables() * self.lm_head_params() * Dtype::Bf16.bytes()
    }

    /// KV-cache values stored per token and per full-attention layer.
    fn kv_values_per_layer(&self) -> f64 {
        match self.attention {
            Attention::Gqa {
                kv_heads, head_dim, ..
            } => 2.0 * kv_heads as f64 * head_dim as f64,
            Attention::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => (kv_lora_rank + qk_rope_head_dim) as f64,
        }
    }

    fn full_attention_layers(&self) -> u32 {
        self.layers - self.sliding_window.map_or(0, |w| w.layers.min(self.layers))
    }

    /// KV bytes one token adds to the cache while its sequence is shorter than any sliding
    /// window (2 × layers × kv_heads × head_dim × bytes; MLA: layers × latent × bytes).
    pub fn kv_bytes_per_token(&self, kv: Dtype) -> f64 {
        self.layers as f64 * self.kv_values_per_layer() * kv.bytes()
    }

    /// KV bytes of a whole sequence of `context` tokens: sliding-window layers keep only the
    /// last window.
    pub fn kv_bytes_for_context(&self, context: f64, kv: Dtype) -> f64 {
        let per_layer = self.kv_values_per_layer() * kv.bytes();
        let full = self.full_attention_layers() as f64 * context;
        let sliding = self
            .sliding_window
            .map_or(0.0, |w| w.layers as f64 * context.min(w.tokens as f64));
        (full + sliding) * per_layer
    }

    /// Attention FLOPs per (query, key) pair and layer in prefill: QKᵀ and PV, two FLOPs per
    /// multiply-add. MLA prefill runs un-absorbed, with its 192-wide query/key heads.
    pub fn prefill_attention_flops_per_pair(&self) -> f64 {
        match self.attention {
            Attention::Gqa {
                heads, head_dim, ..
            } => 4.0 * heads as f64 * head_dim as f64,
            Attention::Mla {
                heads,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
                ..
            } => 2.0 * heads as f64 * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) as f64,
        }
    }

    /// The same in decode. MLA decode absorbs the up-projections and attends in the latent
    /// space, so each head works on kv_lora_rank + rope values.
    pub fn decode_attention_flops_per_pair(&self) -> f64 {
        match self.attention {
            Attention::Gqa { .. } => self.prefill_attention_flops_per_pair(),
            Attention::Mla {
                heads,
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => 2.0 * heads as f64 * (2 * kv_lora_rank + qk_rope_head_dim) as f64,
        }
    }

    /// (query, key) pairs over all layers, for `new` tokens appended causally after `prefix`
    /// cached ones: full layers see every earlier token, sliding layers at most the window.
    pub fn attention_pairs(&self, new: f64, prefix: f64) -> f64 {
        let mean_keys = prefix + new / 2.0;
        let full = self.full_attention_layers() as f64 * new * mean_keys;
        let sliding = self.sliding_window.map_or(0.0, |w| {
            w.layers as f64 * new * mean_keys.min(w.tokens as f64)
        });
        full + sliding
    }

    /// Key positions all layers read for one decode token at `context`.
    pub fn decode_pairs(&self, context: f64) -> f64 {
        self.attention_pairs(1.0, context)
    }

    /// Fraction of the KV heads one of `tp` ranks stores. GQA shards by KV head and replicates
    /// a head when there are fewer heads than ranks; MLA's latent is replicated on every rank.
    pub fn kv_share_per_rank(&self, tp: u32) -> f64 {
        match self.attention {
            Attention::Gqa { kv_heads, .. } => kv_heads.div_ceil(tp) as f64 / kv_heads as f64,
            Attention::Mla { .. } => 1.0,
        }
    }
}

/// Reads a Hugging Face `config.json` (Llama, Qwen, Mistral/Mixtral, DeepSeek, gpt-oss style
/// keys). `name` is what the operator called the model (usually its folder's name).
pub fn parse_hf_config(name: &str, json: &str) -> Result<ModelSpec, PlanError> {
    let root: Value = serde_json::from_str(json).map_err(|e| PlanError::ConfigSyntax {
        reason: e.to_string(),
    })?;
    // Multimodal checkpoints nest the language model's numbers under `text_config`.
    let cfg = match root.get("hidden_size") {
        None => root.get("text_config").unwrap_or(&root),
        Some(_) => &root,
    };
    let hidden = req_u32(cfg, "hidden_size", "width of the residual stream")?;
    let layers = req_u32(cfg, "num_hidden_layers", "number of decoder layers")?;
    let heads = req_u32(cfg, "num_attention_heads", "query heads per layer")?;
    let vocab = req_u32(cfg, "vocab_size", "size of the LM head")?;
    let kv_heads = opt_u32(cfg, "num_key_value_heads")?.unwrap_or(heads);
    let head_dim = opt_u32(cfg, "head_dim")?.unwrap_or(hidden / heads);
    if heads == 0 || kv_heads == 0 || layers == 0 || hidden == 0 {
        return Err(PlanError::BadField {
            field: "num_attention_heads",
            value: heads.to_string(),
            expected: "positive sizes for heads, layers and hidden_size",
        });
    }
    let attention = match opt_u32(cfg, "kv_lora_rank")? {
        Some(kv_lora_rank) => Attention::Mla {
            heads,
            q_lora_rank: opt_u32(cfg, "q_lora_rank")?,
            kv_lora_rank,
            qk_nope_head_dim: req_u32(cfg, "qk_nope_head_dim", "MLA: non-rotary query/key width")?,
            qk_rope_head_dim: req_u32(cfg, "qk_rope_head_dim", "MLA: rotary query/key width")?,
            v_head_dim: req_u32(cfg, "v_head_dim", "MLA: value head width")?,
        },
        None => Attention::Gqa {
            heads,
            kv_heads,
            head_dim,
        },
    };
    let experts = first_u32(
        cfg,
        &["num_experts", "num_local_experts", "n_routed_experts"],
    )?;
    let moe = match experts {
        Some(experts) if experts > 1 => {
            let per_token = first_u32(cfg, &["num_experts_per_tok", "experts_per_token"])?.ok_or(
                PlanError::MissingField {
                    field: "num_experts_per_tok",
                    what: "experts each token is routed to",
                },
            )?;
            let width = match opt_u32(cfg, "moe_intermediate_size")? {
                Some(w) => w,
                None => req_u32(cfg, "intermediate_size", "width of each expert's MLP")?,
            };
            Some(Moe {
                experts,
                experts_per_token: per_token,
                shared_experts: opt_u32(cfg, "n_shared_experts")?.unwrap_or(0),
                moe_intermediate_size: width,
                dense_layers: opt_u32(cfg, "first_k_dense_replace")?.unwrap_or(0),
            })
        }
        _ => None,
    };
    // A pure MoE model (Mixtral, gpt-oss) has no separate dense width: its experts are it.
    let intermediate = match opt_u32(cfg, "intermediate_size")? {
        Some(i) => i,
        None if moe.is_some() => moe.as_ref().map_or(0, |m| m.moe_intermediate_size),
        None => {
            return Err(PlanError::MissingField {
                field: "intermediate_size",
                what: "width of the MLP",
            });
        }
    };
    let sliding_window = sliding_window(cfg, layers)?;
    let native_weights = native_dtype(&root);
    Ok(ModelSpec {
        name: name.into(),
        hidden_size: hidden,
        layers,
        vocab_size: vocab,
        intermediate_size: intermediate,
        attention,
        moe,
        sliding_window,
        tie_word_embeddings: cfg
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        native_weights,
    })
}

fn sliding_window(cfg: &Value, layers: u32) -> Result<Option<SlidingWindow>, PlanError> {
    let Some(tokens) = opt_u32(cfg, "sliding_window")? else {
        return Ok(None);
    };
    // gpt-oss and Gemma name each layer's kind; Qwen ships a window it does not use.
    if let Some(kinds) = cfg.get("layer_types").and_then(Value::as_array) {
        let sliding = kinds
            .iter()
            .filter(|k| k.as_str() == Some("sliding_attention"))
            .count() as u32;
        return Ok((sliding > 0).then_some(SlidingWindow {
            tokens,
            layers: sliding.min(layers),
        }));
    }
    if cfg.get("use_sliding_window").and_then(Value::as_bool) == Some(false) {
        return Ok(None);
    }
    let layers = match opt_u32(cfg, "max_window_layers")? {
        // Qwen2 style: layers below max_window_layers use full attention.
        Some(full) if cfg.get("use_sliding_window").is_some() => layers.saturating_sub(full),
        _ => layers,
    };
    Ok((layers > 0).then_some(SlidingWindow { tokens, layers }))
}

fn native_dtype(root: &Value) -> Dtype {
    let method = root
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    match method.as_str() {
        "fp8" | "fbgemm_fp8" | "compressed-tensors" => Dtype::Fp8,
        "mxfp4" | "awq" | "gptq" | "marlin" | "bitsandbytes" => Dtype::Int4,
        _ => Dtype::Bf16,
    }
}

fn opt_u32(cfg: &Value, field: &'static str) -> Result<Option<u32>, PlanError> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| PlanError::BadField {
                field,
                value: v.to_string(),
                expected: "a non-negative integer",
            }),
    }
}

fn req_u32(cfg: &Value, field: &'static str, what: &'static str) -> Result<u32, PlanError> {
    opt_u32(cfg, field)?.ok_or(PlanError::MissingField { field, what })
}

fn first_u32(cfg: &Value, fields: &[&'static str]) -> Result<Option<u32>, PlanError> {
    for f in fields {
        if let Some(v) = opt_u32(cfg, f)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        ((a - b) / b).abs() <= rel
    }

    #[test]
    fn kv_bytes_per_token_match_the_published_figures() {
        // Published KV sizes (bf16): 128 KiB, 256 KiB, 320 KiB; DeepSeek-V3 ≈ 69 KiB (61 × 576 × 2 bytes).
        let kib = |n: &str| find_model(n).unwrap().kv_bytes_per_token(Dtype::Bf16) / 1024.0;
        assert_eq!(kib("Llama-3.1-8B"), 128.0);
        assert_eq!(kib("Qwen3-32B"), 256.0);
        assert_eq!(kib("Llama-3.1-70B"), 320.0);
        assert_eq!(kib("DeepSeek-V3") * 1024.0, 61.0 * 576.0 * 2.0);
        // A 4K-token Llama-70B prompt is 1.34 GB of KV.
        let m = find_model("llama-3.1-70b").unwrap();
        assert!(close(
            m.kv_bytes_for_context(4096.0, Dtype::Bf16),
            1.342e9,
            0.01
        ));
    }

    #[test]
    fn parameter_counts_match_the_model_names() {
        let p = |n: &str| {
            let m = find_model(n).unwrap();
            (m.total_params() / 1e9, m.active_params() / 1e9)
        };
        let (t, _) = p("Llama-3.1-8B");
        assert!(close(t, 8.03, 0.01), "{t}");
        let (t, _) = p("Llama-3.1-70B");
        assert!(close(t, 70.6, 0.01), "{t}");
        let (t, _) = p("Qwen3-8B");
        assert!(close(t, 8.2, 0.02), "{t}");
        let (t, _) = p("Qwen3-32B");
        assert!(close(t, 32.8, 0.02), "{t}");
        let (t, a) = p("Qwen3-235B-A22B");
        assert!(close(t, 235.0, 0.01) && close(a, 22.0, 0.03), "{t} {a}");
        let (t, a) = p("DeepSeek-V3");
        assert!(close(t, 671.0, 0.01) && close(a, 37.0, 0.03), "{t} {a}");
        let (t, a) = p("gpt-oss-120b");
        // OpenAI's model card: 116.83B total, 5.13B active.
        assert!(close(t, 116.83, 0.005) && close(a, 5.13, 0.01), "{t} {a}");
    }

    #[test]
    fn names_are_case_insensitive_and_unknown_names_list_the_catalog() {
        assert_eq!(
            find_model("QWEN3-235b-a22b").unwrap().name,
            "Qwen3-235B-A22B"
        );
        assert_eq!(
            find_model("meta-llama/Llama-3.1-8B").unwrap().name,
            "Llama-3.1-8B"
        );
        match find_model("llama-4") {
            Err(PlanError::UnknownModel { known, .. }) => {
                assert!(known.contains("DeepSeek-V3") && known.contains("gpt-oss-120b"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sliding_window_bounds_gpt_oss_kv() {
        let m = find_model("gpt-oss-120b").unwrap();
        let per_layer = 2.0 * 8.0 * 64.0 * 2.0;
        // 18 full layers hold all 10k tokens, 18 sliding layers only the last 128.
        let want = (18.0 * 10_000.0 + 18.0 * 128.0) * per_layer;
        assert_eq!(m.kv_bytes_for_context(10_000.0, Dtype::Bf16), want);
    }

    const LLAMA_8B: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,
        "intermediate_size":14336,"num_attention_heads":32,"num_hidden_layers":32,
        "num_key_value_heads":8,"vocab_size":128256,"tie_word_embeddings":false,
        "rope_theta":500000.0,"torch_dtype":"bfloat16"}"#;

    #[test]
    fn parses_a_llama_config_like_the_catalog_entry() {
        let m = parse_hf_config("Llama-3.1-8B", LLAMA_8B).unwrap();
        assert_eq!(m, find_model("Llama-3.1-8B").unwrap());
    }

    #[test]
    fn parses_deepseek_and_gpt_oss_configs() {
        let ds = r#"{"hidden_size":7168,"num_hidden_layers":61,"num_attention_heads":128,
            "num_key_value_heads":128,"vocab_size":129280,"intermediate_size":18432,
            "moe_intermediate_size":2048,"n_routed_experts":256,"n_shared_experts":1,
            "num_experts_per_tok":8,"first_k_dense_replace":3,"kv_lora_rank":512,
            "q_lora_rank":1536,"qk_nope_head_dim":128,"qk_rope_head_dim":64,"v_head_dim":128,
            "quantization_config":{"quant_method":"fp8"}}"#;
        assert_eq!(
            parse_hf_config("DeepSeek-V3", ds).unwrap(),
            find_model("DeepSeek-V3").unwrap()
        );
        let mut kinds = Vec::new();
        for _ in 0..18 {
            kinds.push("\"sliding_attention\"");
            kinds.push("\"full_attention\"");
        }
        let oss = format!(
            r#"{{"hidden_size":2880,"num_hidden_layers":36,"num_attention_heads":64,
            "num_key_value_heads":8,"head_dim":64,"vocab_size":201088,"intermediate_size":2880,
            "num_local_experts":128,"experts_per_token":4,"sliding_window":128,
            "layer_types":[{}],"quantization_config":{{"quant_method":"mxfp4"}}}}"#,
            kinds.join(",")
        );
        assert_eq!(
            parse_hf_config("gpt-oss-120b", &oss).unwrap(),
            find_model("gpt-oss-120b").unwrap()
        );
    }

    #[test]
    fn qwen_windows_that_are_off_and_nested_text_configs() {
        // Qwen3 ships a sliding window it does not use.
        let qwen = r#"{"hidden_size":4096,"num_hidden_layers":36,"num_attention_heads":32,
            "num_key_value_heads":8,"head_dim":128,"intermediate_size":12288,
            "vocab_size":151936,"sliding_window":null,"use_sliding_window":false,
            "max_window_layers":36,"tie_word_embeddings":false}"#;
        assert_eq!(
            parse_hf_config("Qwen3-8B", qwen).unwrap(),
            find_model("Qwen3-8B").unwrap()
        );
        // Mistral-7B-v0.1: every layer slides over 4096 tokens.
        let mistral = r#"{"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"intermediate_size":14336,"vocab_size":32000,
            "sliding_window":4096}"#;
        let m = parse_hf_config("mistral", mistral).unwrap();
        assert_eq!(
            m.sliding_window,
            Some(SlidingWindow {
                tokens: 4096,
                layers: 32
            })
        );
        assert_eq!(
            m.kv_bytes_for_context(10_000.0, Dtype::Bf16),
            m.kv_bytes_for_context(4096.0, Dtype::Bf16)
        );
        // Multimodal checkpoints keep the language model under text_config.
        let nested = format!(r#"{{"architectures":["X"],"text_config":{LLAMA_8B}}}"#);
        assert_eq!(
            parse_hf_config("Llama-3.1-8B", &nested).unwrap(),
            find_model("Llama-3.1-8B").unwrap()
        );
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse_hf_config("x", r#"{"hidden_size":4096,"num_attention_heads":32}"#);
        assert_eq!(
            err.unwrap_err(),
            PlanError::MissingField {
                field: "num_hidden_layers",
                what: "number of decoder layers"
            }
        );
        assert!(matches!(
            parse_hf_config("x", "{not json"),
            Err(PlanError::ConfigSyntax { .. })
        ));
        let bad = LLAMA_8B.replace("\"num_hidden_layers\":32", "\"num_hidden_layers\":\"32\"");
        assert!(matches!(
            parse_hf_config("x", &bad),
            Err(PlanError::BadField {
                field: "num_hidden_layers",
                ..
            })
        ));
    }
}
