//! The engine: request queue, continuous batching with chunked prefill under a per-step token
//! budget, prefix caching, KV export during prefill and KV import for decode.
//!
//! A server loop drives it: `add_request` / `import_*` / `cancel` as messages arrive, and
//! `step` (or `step_with`, which hands out events as they happen, KV layers included) while
//! `has_work()`. Each step runs on the engine's own compute pool of `compute_threads` threads.
//!
//! Scheduling per step: every decoding sequence gets one token (a sequence that needs a new
//! KV block and finds none preempts the youngest other sequence, which is recomputed later);
//! then running prefills get chunks from the remaining budget; then waiting requests are
//! admitted in arrival order while the budget, `running_max` and the KV blocks for their whole
//! prompt allow. Admission reserves every block of the prompt up front, so a prefill never
//! stalls half way for lack of blocks.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{EngineConfig, ModelSpec};
use crate::error::EngineError;
use crate::hash;
use crate::kv_cache::{BlockPool, KvEvent, KvStore};
use crate::kv_format::{DTYPE_F32, KvGeometry, KvHeader, KvPiece};
use crate::model::{Model, ModelInfo, SeqInput};
use crate::sampling::{self, SamplingParams};
use crate::stats::{EngineStats, StepSample, StepTimes};
use crate::tokenizer::{Detokenizer, Tokenizer};

/// A request's id, chosen by the caller and unique among the engine's live requests.
pub type RequestId = u64;

/// The context of a model whose config allows more, unless `context_tokens_max` says
/// otherwise.
pub const CONTEXT_TOKENS_DEFAULT_MAX: usize = 32_768;

/// KV events kept until the caller drains them; older ones are dropped (and counted).
const KV_EVENTS_MAX: usize = 65_536;

/// A prompt as text (tokenized by the engine, with BOS), as token ids (used as they are), or
/// as chat messages (rendered with the model's chat template, then tokenized). Variants are
/// only appended (the engine protocol encodes them by position).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<crate::tokenizer::ChatMessage>),
}

/// What the engine does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// Prefill and decode here (colocated or monolithic).
    Generate,
    /// Prefill only: hand out the KV layer by layer and the first token, then finish.
    Prefill,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// An EOS or stop token was generated (it is included in the output).
    Stop,
    /// `max_tokens` were generated, the context limit was reached, or the sequence outgrew
    /// the whole KV cache.
    Length,
    /// A `Prefill` request produced its KV and first token.
    PrefillDone,
    /// `cancel` was called.
    Cancelled,
}

/// What a step reports. Per request: `KvStart` and `KvLayer`s (prefill only), `Token`s with
/// consecutive indices from 0, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EngineEvent {
    /// A `Prefill` request was admitted; its KV follows as `KvLayer`s. The header's token
    /// count is the prompt length.
    KvStart {
        id: RequestId,
        header: KvHeader,
        prompt_tokens: Vec<u32>,
    },
    /// One layer's KV rows for a range of prompt tokens, handed out as soon as the layer is
    /// computed. Per layer, pieces come in token order without gaps.
    KvLayer {
        id: RequestId,
        piece: KvPiece,
    },
    /// The output token at `index`; `text` is the newly final text (valid UTF-8, may be
    /// empty while a character is incomplete). A decode engine that imported KV re-sends the
    /// first token (index 0) so its stream is the whole output.
    Token {
        id: RequestId,
        index: u32,
        token: u32,
        text: String,
    },
    Finished {
        id: RequestId,
        reason: FinishReason,
        prompt_tokens: u32,
        /// Prompt tokens this engine ran through the model (0 after a complete KV import or
        /// a full prefix-cache hit).
        prompt_tokens_computed: u32,
        prompt_tokens_cached: u32,
        prompt_tokens_imported: u32,
        output_tokens: u32,
        /// Text that was held back until the end (U+FFFD for an incomplete character).
        text: String,
    },
    Error {
        id: RequestId,
        error: String,
    },
}

struct Seq {
    id: RequestId,
    kind: RequestKind,
    /// Prompt then output tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Leading blocks registered in the prefix cache (or found there).
    hashed_blocks: usize,
    last_hash: Option<u64>,
    sampling: SamplingParams,
    output: u32,
    detok: Detokenizer,
    prompt_computed: usize,
    prompt_cached: usize,
    prompt_imported: usize,
    /// Output token 0 came with imported KV and still has to be reported.
    emit_first: bool,
}

struct Import {
    seq: Seq,
    layers_done: Vec<usize>,
}

/// The reference engine. See the module docs for the scheduling rules.
pub struct Engine {
    cfg: EngineConfig,
    model: Model,
    tokenizer: Tokenizer,
    kv: KvStore,
    pool: BlockPool,
    threads: Arc<rayon::ThreadPool>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    imports: Vec<Import>,
    live: HashSet<RequestId>,
    eos: Vec<u32>,
    context_max: usize,
    pending: Vec<EngineEvent>,
    times: StepTimes,
    counters: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.info.name)
            .field(
                "fingerprint",
                &format_args!("{:016x}", self.model.info.fingerprint),
            )
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("importing", &self.imports.len())
            .finish()
    }
}

impl Engine {
    /// Loads the model and sizes the KV cache. Model loading reads only local files.
    pub fn new(cfg: EngineConfig) -> Result<Engine, EngineError> {
        cfg.validate()?;
        // Without an explicit limit, a checkpoint's context (often 128k) is capped: the
        // rotary tables and any one sequence's attention scale with it, on a CPU.
        let positions_max = if cfg.context_tokens_max == 0 {
            CONTEXT_TOKENS_DEFAULT_MAX
        } else {
            cfg.context_tokens_max
        };
        let (model, tokenizer) = match &cfg.model {
            ModelSpec::Preset(p) => (
                Model::from_preset(*p, cfg.weights_seed, positions_max)?,
                Tokenizer::Bytes,
            ),
            ModelSpec::Dir(d) => (Model::from_dir(d, positions_max)?, Tokenizer::from_dir(d)?),
        };
        let mc = &model.info.config;
        let context_max = positions_max.min(mc.context_tokens_max);
        let mut eos = mc.eos_token_ids.clone();
        if let Some(e) = tokenizer.eos_token_id()
            && !eos.contains(&e)
        {
            eos.push(e);
        }
        let kv = KvStore::new(
            mc.num_layers,
            cfg.kv_blocks,
            cfg.block_size_tokens,
            mc.num_kv_heads,
            mc.head_dim,
        );
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.compute_threads)
            .thread_name(|i| format!("pd-engine-compute-{i}"))
            .build()
            .map_err(|e| EngineError::ThreadPool {
                threads: cfg.compute_threads,
                reason: e.to_string(),
            })?;
        Ok(Engine {
            pool: BlockPool::new(cfg.kv_blocks, KV_EVENTS_MAX),
            cfg,
            model,
            tokenizer,
            kv,
            threads: Arc::new(threads),
            waiting: VecDeque::new(),
            running: Vec::new(),
            imports: Vec::new(),
            live: HashSet::new(),
            eos,
            context_max,
            pending: Vec::new(),
            times: StepTimes::default(),
            counters: EngineStats::default(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.model.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The context limit in tokens (prompt plus output).
    pub fn context_tokens_max(&self) -> usize {
        self.context_max
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// What this engine's KV looks like; a decode engine accepts only KV of equal geometry.
    pub fn kv_geometry(&self) -> KvGeometry {
        let c = &self.model.info.config;
        KvGeometry {
            model_fingerprint: self.model.info.fingerprint,
            dtype: DTYPE_F32,
            layers: c.num_layers as u32,
            kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            block_size_tokens: self.cfg.block_size_tokens as u32,
        }
    }

    /// The header of `token_count` tokens of this engine's KV.
    pub fn kv_header(&self, token_count: usize) -> KvHeader {
        KvHeader {
            geometry: self.kv_geometry(),
            token_count: token_count as u32,
        }
    }

    /// Whether `step` has anything to do.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.pending.is_empty()
    }

    /// Tokenizes a prompt the way `add_request` would.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t),
            Prompt::Tokens(t) => Ok(t.clone()),
            Prompt::Chat(m) => self.tokenizer.encode_chat(m, true),
        }
    }

    fn check_prompt(&self, id: RequestId, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt { id });
        }
        if tokens.len() >= self.context_max {
            return Err(EngineError::PromptTooLong {
                id,
                prompt_tokens: tokens.len(),
                context_tokens_max: self.context_max,
            });
        }
        let vocab_size = self.model.info.config.vocab_size;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(EngineError::TokenOutOfRange {
                id,
                token,
                vocab_size,
            });
        }
        let needed_blocks = tokens.len().div_ceil(self.cfg.block_size_tokens);
        if needed_blocks > self.pool.total() {
            return Err(EngineError::KvCacheTooSmall {
                id,
                needed_blocks,
                total_blocks: self.pool.total(),
            });
        }
        Ok(())
    }

    fn new_seq(
        &self,
        id: RequestId,
        kind: RequestKind,
        tokens: Vec<u32>,
        sampling: SamplingParams,
    ) -> Seq {
        Seq {
            id,
            kind,
            prompt_len: tokens.len(),
            tokens,
            computed: 0,
            blocks: Vec::new(),
            hashed_blocks: 0,
            last_hash: None,
            sampling,
            output: 0,
            detok: self.tokenizer.detokenizer(),
            prompt_computed: 0,
            prompt_cached: 0,
            prompt_imported: 0,
            emit_first: false,
        }
    }

    /// Queues a request. Errors leave the engine unchanged.
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: Prompt,
        sampling: SamplingParams,
        kind: RequestKind,
    ) -> Result<(), EngineError> {
        self.check_new(id, &sampling)?;
        let tokens = self.tokenize(&prompt)?;
        self.check_prompt(id, &tokens)?;
        let seq = self.new_seq(id, kind, tokens, sampling);
        self.live.insert(id);
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Queues a generation that continues after `output`, the tokens another engine had
    /// already produced for this prompt and sampling: the prompt and those tokens are computed
    /// (as a preempted request's are), and the next token reported has index `output.len()`.
    /// Sampling draws depend only on `(seed, output index)`, so the continuation equals what
    /// the first engine would have produced. Errors leave the engine unchanged.
    pub fn resume_request(
        &mut self,
        id: RequestId,
        prompt: Prompt,
        output: Vec<u32>,
        sampling: SamplingParams,
    ) -> Result<(), EngineError> {
        self.check_new(id, &sampling)?;
        if output.len() >= sampling.max_tokens as usize {
            return Err(EngineError::Sampling {
                id,
                field: "max_tokens",
                reason: format!(
                    "is {} but {} tokens were already produced; nothing is left to resume",
                    sampling.max_tokens,
                    output.len()
                ),
            });
        }
        let prompt_tokens = self.tokenize(&prompt)?;
        let prompt_len = prompt_tokens.len();
        let mut tokens = prompt_tokens;
        tokens.extend_from_slice(&output);
        self.check_prompt(id, &tokens)?;
        let mut seq = self.new_seq(id, RequestKind::Generate, tokens, sampling);
        seq.prompt_len = prompt_len;
        seq.output = output.len() as u32;
        for &t in &output {
            // The text of these tokens was reported by the first engine; the detokenizer only
            // needs their state (a character may still be incomplete).
            let _ = seq.detok.push(t);
        }
        // The first engine failed between a stop token and its report of the end: the
        // request is over, and ends here with the next step.
        if let Some(&last) = output.last() {
            let eos = !seq.sampling.ignore_eos && self.eos.contains(&last);
            if eos || seq.sampling.stop_token_ids.contains(&last) {
                let text = seq.detok.finish();
                self.pending
                    .push(finished_event(&seq, FinishReason::Stop, text));
                return Ok(());
            }
        }
        self.live.insert(id);
        self.waiting.push_back(seq);
        Ok(())
    }

    /// A new request's id is free, the queue has room and its sampling is valid.
    fn check_new(&self, id: RequestId, sampling: &SamplingParams) -> Result<(), EngineError> {
        if self.live.contains(&id) {
            return Err(EngineError::DuplicateRequest { id });
        }
        if self.waiting.len() >= self.cfg.queue_max {
            return Err(EngineError::QueueFull {
                id,
                queue_max: self.cfg.queue_max,
            });
        }
        sampling.validate(id)
    }

    /// The prompt length of a request still waiting for admission (just added).
    pub fn waiting_prompt_tokens(&self, id: RequestId) -> Option<u32> {
        self.waiting
            .iter()
            .rev()
            .find(|s| s.id == id)
            .map(|s| s.prompt_len as u32)
    }

    /// Begins importing a prefilled request's KV. `prompt_tokens` are the prompt's ids (the
    /// header's token count must match) and `first_token` the token the prefill engine picked.
    /// Blocks for the whole prompt are reserved now; pieces follow via [`Engine::import_piece`].
    pub fn import_begin(
        &mut self,
        id: RequestId,
        header: &KvHeader,
        prompt_tokens: Vec<u32>,
        first_token: u32,
        sampling: SamplingParams,
    ) -> Result<(), EngineError> {
        if self.live.contains(&id) {
            return Err(EngineError::DuplicateRequest { id });
        }
        self.kv_geometry()
            .check_compatible(&header.geometry)
            .map_err(|source| EngineError::Kv { id, source })?;
        if header.token_count as usize != prompt_tokens.len() {
            return Err(EngineError::ImportIncomplete {
                id,
                reason: format!(
                    "the KV header holds {} tokens but the prompt has {}",
                    header.token_count,
                    prompt_tokens.len()
                ),
            });
        }
        sampling.validate(id)?;
        self.check_prompt(id, &prompt_tokens)?;
        let vocab_size = self.model.info.config.vocab_size;
        if first_token as usize >= vocab_size {
            return Err(EngineError::TokenOutOfRange {
                id,
                token: first_token,
                vocab_size,
            });
        }
        if self.running.len() + self.imports.len() >= self.cfg.running_max {
            return Err(EngineError::DecodeSlotsFull {
                id,
                running_max: self.cfg.running_max,
            });
        }
        let needed_blocks = prompt_tokens.len().div_ceil(self.cfg.block_size_tokens);
        if needed_blocks > self.pool.available() {
            return Err(EngineError::KvCacheFull {
                id,
                needed_blocks,
                free_blocks: self.pool.available(),
            });
        }
        let mut seq = self.new_seq(id, RequestKind::Generate, prompt_tokens, sampling);
        for _ in 0..needed_blocks {
            let b = self.pool.allocate().expect("availability checked above");
            seq.blocks.push(b);
        }
        seq.tokens.push(first_token);
        self.live.insert(id);
        self.imports.push(Import {
            seq,
            layers_done: vec![0; self.model.info.config.num_layers],
        });
        Ok(())
    }

    /// Writes one piece of an import. Returns true when the import is complete (the request
    /// then decodes from the next step on). A refused piece aborts the import and frees its
    /// blocks: the request is gone and the error says why.
    pub fn import_piece(&mut self, id: RequestId, piece: &KvPiece) -> Result<bool, EngineError> {
        let Some(ix) = self.imports.iter().position(|i| i.seq.id == id) else {
            return Err(EngineError::UnknownRequest { id });
        };
        match self.write_piece(ix, piece) {
            Ok(done) => {
                if done {
                    let imp = self.imports.swap_remove(ix);
                    let mut seq = imp.seq;
                    seq.computed = seq.prompt_len;
                    seq.prompt_imported = seq.prompt_len;
                    seq.emit_first = true;
                    self.counters.prompt_tokens_imported_total += seq.prompt_len as u64;
                    if self.cfg.prefix_caching {
                        register_blocks(
                            &mut self.pool,
                            &mut seq,
                            self.cfg.block_size_tokens,
                            self.cfg.test_block_hash_mask,
                        );
                    }
                    self.running.push(seq);
                }
                Ok(done)
            }
            Err(source) => {
                let imp = self.imports.swap_remove(ix);
                self.drop_seq(imp.seq);
                Err(EngineError::Kv { id, source })
            }
        }
    }

    fn write_piece(
        &mut self,
        ix: usize,
        piece: &KvPiece,
    ) -> Result<bool, crate::kv_format::KvFormatError> {
        use crate::kv_format::KvFormatError as E;
        let g = self.kv_geometry();
        let imp = &mut self.imports[ix];
        let layer = piece.layer as usize;
        if layer >= imp.layers_done.len() {
            return Err(E::LayerOutOfRange {
                layer: piece.layer,
                layers: g.layers,
            });
        }
        if piece.token_start as usize != imp.layers_done[layer] {
            return Err(E::OutOfOrder {
                layer: piece.layer,
                token_start: piece.token_start,
                expected: imp.layers_done[layer] as u32,
            });
        }
        let end = u64::from(piece.token_start) + u64::from(piece.token_count);
        if end > imp.seq.prompt_len as u64 {
            return Err(E::TooManyTokens {
                end,
                token_count: imp.seq.prompt_len as u32,
            });
        }
        let (k, v) = piece.rows(&g)?;
        self.kv
            .write_rows(layer, &imp.seq.blocks, piece.token_start as usize, &k, &v);
        imp.layers_done[layer] = end as usize;
        Ok(imp.layers_done.iter().all(|&d| d == imp.seq.prompt_len))
    }

    /// Imports a whole KV blob (the 48-byte header, then pieces; see `KV_FORMAT.md`).
    pub fn import_kv(
        &mut self,
        id: RequestId,
        bytes: &[u8],
        prompt_tokens: Vec<u32>,
        first_token: u32,
        sampling: SamplingParams,
    ) -> Result<(), EngineError> {
        let header =
            KvHeader::from_bytes(bytes).map_err(|source| EngineError::Kv { id, source })?;
        self.import_begin(id, &header, prompt_tokens, first_token, sampling)?;
        let g = header.geometry;
        let mut rest = &bytes[crate::kv_format::KV_HEADER_BYTES..];
        let mut done = false;
        while !rest.is_empty() {
            let (piece, used) = match KvPiece::parse_prefix(rest, &g) {
                Ok(p) => p,
                Err(source) => {
                    self.abort_import(id);
                    return Err(EngineError::Kv { id, source });
                }
            };
            done = self.import_piece(id, &piece)?;
            rest = &rest[used..];
            if done && !rest.is_empty() {
                // The request already moved to running: take it back out, silently.
                if let Some(ix) = self.running.iter().position(|s| s.id == id) {
                    let seq = self.running.remove(ix);
                    self.drop_seq(seq);
                }
                return Err(EngineError::ImportIncomplete {
                    id,
                    reason: format!("{} bytes follow the complete KV", rest.len()),
                });
            }
        }
        if !done {
            self.abort_import(id);
            return Err(EngineError::ImportIncomplete {
                id,
                reason: "the blob ended before every layer covered every token".into(),
            });
        }
        Ok(())
    }

    fn abort_import(&mut self, id: RequestId) {
        if let Some(ix) = self.imports.iter().position(|i| i.seq.id == id) {
            let imp = self.imports.swap_remove(ix);
            self.drop_seq(imp.seq);
        }
    }

    fn drop_seq(&mut self, seq: Seq) {
        for b in &seq.blocks {
            self.pool.release(*b);
        }
        self.live.remove(&seq.id);
    }

    /// Cancels a request wherever it is (queued, importing or running) and frees its KV
    /// blocks at once. Its terminal event, `Finished { reason: Cancelled }`, comes with the
    /// next step.
    pub fn cancel(&mut self, id: RequestId) -> Result<(), EngineError> {
        let seq = if let Some(ix) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(ix)
        } else if let Some(ix) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(ix))
        } else if let Some(ix) = self.imports.iter().position(|i| i.seq.id == id) {
            Some(self.imports.swap_remove(ix).seq)
        } else {
            None
        };
        let Some(mut seq) = seq else {
            return Err(EngineError::UnknownRequest { id });
        };
        let text = seq.detok.finish();
        self.pending
            .push(finished_event(&seq, FinishReason::Cancelled, text));
        self.drop_seq(seq);
        Ok(())
    }

    /// Drains the KV events (blocks stored in / removed from the prefix cache).
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.counters.clone();
        s.queue_depth = self.waiting.len();
        s.running = self.running.len();
        s.importing = self.imports.len();
        s.kv_block_size_tokens = self.cfg.block_size_tokens;
        s.kv_blocks_total = self.pool.total();
        s.kv_blocks_used = self.pool.used();
        s.kv_blocks_free = self.pool.available();
        s.kv_blocks_cached = self.pool.cached_idle();
        s.prefix_cache_queries_blocks = self.pool.prefix_queries_blocks;
        s.prefix_cache_hits_blocks = self.pool.prefix_hits_blocks;
        s.kv_events_dropped_total = self.pool.events_dropped;
        self.times.fill(&mut s);
        s
    }

    /// Runs one step and returns its events.
    pub fn step(&mut self) -> Vec<EngineEvent> {
        let mut out = Vec::new();
        self.step_with(&mut |e| out.push(e));
        out
    }

    /// Runs one step, handing each event to `sink` as it happens: `KvLayer` events arrive
    /// while the forward pass is still computing the later layers.
    pub fn step_with(&mut self, sink: &mut (dyn FnMut(EngineEvent) + Send)) {
        let threads = self.threads.clone();
        threads.install(|| self.step_inner(sink));
    }

    fn step_inner(&mut self, sink: &mut (dyn FnMut(EngineEvent) + Send)) {
        self.counters.compute_threads = rayon::current_num_threads();
        for e in self.pending.drain(..) {
            sink(e);
        }
        // Output token 0 of completed imports.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].emit_first {
                self.running[i].emit_first = false;
                let tok = self.running[i].tokens[self.running[i].prompt_len];
                self.running[i].tokens.pop();
                if let Some(reason) = self.emit_token(i, tok, sink) {
                    self.finish(i, reason, sink);
                    continue;
                }
            }
            i += 1;
        }

        let plan = self.schedule(sink);
        if plan.is_empty() {
            return;
        }
        let bs = self.cfg.block_size_tokens;
        let inputs: Vec<SeqInput<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                SeqInput {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start_pos: s.computed,
                    block_table: &s.blocks,
                    want_logits: s.computed + n == s.tokens.len(),
                    export: s.kind == RequestKind::Prefill,
                }
            })
            .collect();
        let ids: Vec<RequestId> = plan.iter().map(|&(i, _)| self.running[i].id).collect();
        let row = self.model.info.config.num_kv_heads * self.model.info.config.head_dim;
        let mut sample = StepSample {
            prefill_tokens: 0,
            decode_sequences: 0,
            decode_context_tokens: 0,
            seconds: 0.0,
        };
        for &(i, n) in &plan {
            let s = &self.running[i];
            // Recomputed output tokens of a preempted sequence count as prefill: that is
            // what they cost.
            if n == 1 && s.computed >= s.prompt_len {
                sample.decode_sequences += 1;
                sample.decode_context_tokens += (s.computed + 1) as u64;
            } else {
                sample.prefill_tokens += n as u32;
            }
        }
        let t0 = Instant::now();
        let result = self.model.forward(&mut self.kv, &inputs, &mut |out| {
            sink(EngineEvent::KvLayer {
                id: ids[out.seq],
                piece: KvPiece::from_rows(out.layer, out.token_start, out.k, out.v, row),
            })
        });
        sample.seconds = t0.elapsed().as_secs_f64();
        drop(inputs);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Not expected on validated input; fail the batch's requests, keep serving.
                let mut ixs: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                ixs.sort_unstable();
                for &i in ixs.iter().rev() {
                    let seq = self.running.remove(i);
                    sink(EngineEvent::Error {
                        id: seq.id,
                        error: format!("step failed: {e}"),
                    });
                    self.drop_seq(seq);
                }
                return;
            }
        };
        self.times.record(sample);
        self.counters.steps_total += 1;

        let mut finished = Vec::new();
        let mut li = 0;
        for &(i, n) in &plan {
            let s = &mut self.running[i];
            let prompt_part = s.prompt_len.saturating_sub(s.computed).min(n);
            s.prompt_computed += prompt_part;
            self.counters.prompt_tokens_computed_total += prompt_part as u64;
            s.computed += n;
            if self.cfg.prefix_caching {
                register_blocks(&mut self.pool, s, bs, self.cfg.test_block_hash_mask);
            }
            if s.computed == s.tokens.len() {
                let tok = sampling::sample(&logits[li], &s.sampling, s.output);
                li += 1;
                if let Some(reason) = self.emit_token(i, tok, sink) {
                    finished.push((i, reason));
                }
            }
        }
        finished.sort_unstable_by_key(|f| f.0);
        for &(i, reason) in finished.iter().rev() {
            self.finish(i, reason, sink);
        }
    }

    /// Appends an output token and reports it; returns why the request ends, if it does.
    fn emit_token(
        &mut self,
        i: usize,
        tok: u32,
        sink: &mut (dyn FnMut(EngineEvent) + Send),
    ) -> Option<FinishReason> {
        let s = &mut self.running[i];
        s.tokens.push(tok);
        let text = s.detok.push(tok);
        sink(EngineEvent::Token {
            id: s.id,
            index: s.output,
            token: tok,
            text,
        });
        s.output += 1;
        self.counters.generated_tokens_total += 1;
        if s.kind == RequestKind::Prefill {
            return Some(FinishReason::PrefillDone);
        }
        let eos = !s.sampling.ignore_eos && self.eos.contains(&tok);
        if eos || s.sampling.stop_token_ids.contains(&tok) {
            return Some(FinishReason::Stop);
        }
        // The next step would compute position tokens.len() - 1.
        if s.output >= s.sampling.max_tokens || s.tokens.len() > self.context_max {
            return Some(FinishReason::Length);
        }
        None
    }

    fn finish(
        &mut self,
        i: usize,
        reason: FinishReason,
        sink: &mut (dyn FnMut(EngineEvent) + Send),
    ) {
        let mut seq = self.running.remove(i);
        let text = seq.detok.finish();
        sink(finished_event(&seq, reason, text));
        self.drop_seq(seq);
    }

    /// Picks this step's (running index, tokens) pairs; admits and preempts as needed.
    fn schedule(&mut self, sink: &mut (dyn FnMut(EngineEvent) + Send)) -> Vec<(usize, usize)> {
        let bs = self.cfg.block_size_tokens;
        let mut budget = self.cfg.step_tokens_max;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.tokens.len() - s.computed == 1 {
                if budget == 0 {
                    // Cannot happen while running_max <= step_tokens_max (validated); kept so
                    // that a bug here delays a token instead of wrapping the budget.
                    break;
                }
                if s.computed == s.blocks.len() * bs {
                    if s.blocks.len() + 1 > self.pool.total() {
                        // Longer than the whole cache: it can never continue, so it ends
                        // here instead of waiting for room forever.
                        self.finish(i, FinishReason::Length, sink);
                        continue;
                    }
                    if !self.make_room(i) {
                        // This sequence itself was preempted.
                        continue;
                    }
                    let b = self.pool.allocate().expect("make_room guarantees a block");
                    self.running[i].blocks.push(b);
                }
                plan.push((i, 1));
                budget -= 1;
            }
            i += 1;
        }
        for (i, s) in self.running.iter().enumerate() {
            let pending = s.tokens.len() - s.computed;
            if pending > 1 && budget > 0 {
                let n = pending.min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        while budget > 0 && self.running.len() < self.cfg.running_max {
            let Some(seq) = self.admit() else {
                break;
            };
            if seq.kind == RequestKind::Prefill {
                sink(EngineEvent::KvStart {
                    id: seq.id,
                    header: self.kv_header(seq.prompt_len),
                    prompt_tokens: seq.tokens[..seq.prompt_len].to_vec(),
                });
                self.export_cached(&seq, sink);
            }
            let n = (seq.tokens.len() - seq.computed).min(budget);
            budget -= n;
            self.running.push(seq);
            plan.push((self.running.len() - 1, n));
        }
        plan
    }

    /// Ensures one block can be allocated for running[i], preempting the youngest other
    /// non-exporting sequences (or running[i] itself, last). Returns false when running[i]
    /// was preempted.
    fn make_room(&mut self, i: usize) -> bool {
        while self.pool.available() == 0 {
            let victim = (0..self.running.len())
                .rev()
                .find(|&j| j > i && self.running[j].kind == RequestKind::Generate)
                .unwrap_or(i);
            self.preempt(victim);
            if victim == i {
                return false;
            }
        }
        true
    }

    /// Frees a running sequence's blocks and queues it first in line; it is recomputed from
    /// its tokens so far (prompt and output) when admitted again.
    fn preempt(&mut self, j: usize) {
        let mut seq = self.running.remove(j);
        for b in seq.blocks.drain(..) {
            self.pool.release(b);
        }
        seq.computed = 0;
        seq.hashed_blocks = 0;
        seq.last_hash = None;
        self.counters.preemptions_total += 1;
        self.waiting.push_front(seq);
    }

    /// Takes the front waiting request if the KV blocks for all its tokens can be had, after
    /// prefix-cache hits.
    fn admit(&mut self) -> Option<Seq> {
        let bs = self.cfg.block_size_tokens;
        let front = self.waiting.front()?;
        let total_blocks = front.tokens.len().div_ceil(bs);
        let hashes = if self.cfg.prefix_caching {
            // At least one token must be computed to get logits, so a prompt that is all
            // cached blocks recomputes its last block.
            let mask = self.cfg.test_block_hash_mask;
            let mut h: Vec<u64> = front
                .tokens
                .chunks_exact(bs)
                .scan(0u64, |parent, block| {
                    *parent = hash::block_hash(*parent, block) & mask;
                    Some(*parent)
                })
                .collect();
            if h.len() * bs >= front.tokens.len() {
                h.pop();
            }
            h
        } else {
            Vec::new()
        };
        let (hits, idle_hits) = self.pool.peek_prefix(&hashes, &front.tokens, bs);
        if self.pool.available() - idle_hits < total_blocks - hits {
            return None;
        }
        let mut seq = self.waiting.pop_front()?;
        let matched = self.pool.match_prefix(&hashes[..hits], &seq.tokens, bs);
        seq.blocks = matched;
        seq.hashed_blocks = hits;
        seq.last_hash = hits.checked_sub(1).map(|k| hashes[k]);
        seq.computed = hits * bs;
        let cached = seq.computed.min(seq.prompt_len);
        if seq.prompt_cached == 0 {
            seq.prompt_cached = cached;
            self.counters.prompt_tokens_cached_total += cached as u64;
        }
        while seq.blocks.len() < total_blocks {
            let b = self.pool.allocate().expect("availability checked above");
            seq.blocks.push(b);
        }
        Some(seq)
    }

    /// Hands out the KV of the prefix-cache hit of an exporting request, all layers, before
    /// its computed chunks.
    fn export_cached(&self, seq: &Seq, sink: &mut (dyn FnMut(EngineEvent) + Send)) {
        if seq.computed == 0 {
            return;
        }
        let row = self.model.info.config.num_kv_heads * self.model.info.config.head_dim;
        for layer in 0..self.model.info.config.num_layers {
            let (k, v) = self.kv.read_rows(layer, &seq.blocks, 0, seq.computed);
            sink(EngineEvent::KvLayer {
                id: seq.id,
                piece: KvPiece::from_rows(layer, 0, &k, &v, row),
            });
        }
    }

    /// The logits after each chunk of `tokens`, computed through the paged cache the way
    /// prefill and decode compute them (chunks of `chunk_tokens`; 1 = token by token). For
    /// checks and diagnostics; needs no queue and leaves no KV behind.
    pub fn logits(
        &mut self,
        tokens: &[u32],
        chunk_tokens: usize,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        const PROBE_ID: RequestId = u64::MAX;
        self.check_prompt(PROBE_ID, tokens)?;
        let blocks_needed = tokens.len().div_ceil(self.cfg.block_size_tokens);
        if blocks_needed > self.pool.available() {
            return Err(EngineError::KvCacheFull {
                id: PROBE_ID,
                needed_blocks: blocks_needed,
                free_blocks: self.pool.available(),
            });
        }
        let blocks: Vec<u32> = (0..blocks_needed)
            .map(|_| self.pool.allocate().expect("availability checked above"))
            .collect();
        let threads = self.threads.clone();
        let result = threads.install(|| {
            let mut out = Vec::new();
            let mut start = 0;
            while start < tokens.len() {
                let n = chunk_tokens.max(1).min(tokens.len() - start);
                let input = SeqInput {
                    tokens: &tokens[start..start + n],
                    start_pos: start,
                    block_table: &blocks,
                    want_logits: true,
                    export: false,
                };
                let mut l = self.model.forward(&mut self.kv, &[input], &mut |_| {})?;
                out.append(&mut l);
                start += n;
            }
            Ok(out)
        });
        for b in blocks {
            self.pool.release(b);
        }
        result
    }
}

/// Registers every newly full block of `s` whose KV is computed, chaining hashes.
fn register_blocks(pool: &mut BlockPool, s: &mut Seq, bs: usize, mask: u64) {
    let full = s.computed / bs;
    while s.hashed_blocks < full {
        let b = s.hashed_blocks;
        let toks = &s.tokens[b * bs..(b + 1) * bs];
        let h = hash::block_hash(s.last_hash.unwrap_or(0), toks) & mask;
        let parent_block = b.checked_sub(1).map(|p| s.blocks[p]);
        pool.register(s.blocks[b], h, s.last_hash, parent_block, toks);
        s.last_hash = Some(h);
        s.hashed_blocks += 1;
    }
}

fn finished_event(seq: &Seq, reason: FinishReason, text: String) -> EngineEvent {
    EngineEvent::Finished {
        id: seq.id,
        reason,
        prompt_tokens: seq.prompt_len as u32,
        prompt_tokens_computed: seq.prompt_computed as u32,
        prompt_tokens_cached: seq.prompt_cached as u32,
        prompt_tokens_imported: seq.prompt_imported as u32,
        output_tokens: seq.output,
        text,
    }
}
