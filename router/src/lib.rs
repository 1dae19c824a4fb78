//! `pd-router`: the per-agent routing decision. Every agent's ingress owns one [`Router`] per
//! deployment (there is no central router); for each request it picks a prefill and a decode
//! engine (or one engine) from the candidates the caller passes.
//!
//! This crate owns the prefix index (which engine is believed to hold which prompt prefix, see
//! [`block_hashes`]), the cost model and the policies. It never does IO, opens sockets, reads a
//! clock, spawns threads or logs: the caller passes live load with the candidates and, for the
//! benchmark, its own clock. Decisions are deterministic for the same inputs and state.
//!
//! # Cost policy
//!
//! In the manner of Dynamo's KV-aware router (worker cost
//! `overlap_weight × prefill_blocks + decode_blocks`). Every term is in **blocks**: one unit is
//! the work of prefilling one block of `block_tokens` tokens. With `B` the prompt's blocks
//! (`max(ceil(prompt_tokens / block_tokens), blocks.len())`, at least 1 where it scales a load),
//! `cached(e)` the leading blocks engine `e` is believed to hold, `load(e) = queued + running +
//! inflight` and `w = overlap_weight`:
//!
//! ```text
//! prefill(p)   = w × ( (B − cached(p))        uncached blocks p must compute
//!                    + load(p) × B )          each request ahead of us ≈ one prompt like ours
//! decode(d)    = ( load(d)                    requests sharing d's decode batch
//!                + kv_pressure_weight × kv_usage(d)² ) × B
//! transfer     = distance_weight × distance(p, d) × B      distance: same node 0, same rack 1, else 2
//! pair(p, d)   = prefill(p) + decode(d) + transfer(p, d)   → lowest wins
//! colocated(e) = w × (B − cached(e)) + decode(e)          (a `Both` engine does both; its load
//!                                                          counts once)
//! decode_only(d) = w × (B − cached(d)) + decode(d)
//! ```
//!
//! The decode load is scaled by `B` because each request in a decode batch holds about a
//! prompt's worth of KV blocks (Dynamo's `decode_blocks`); the quadratic KV term makes an engine
//! near full cost up to `kv_pressure_weight` extra requests, so it is avoided strongly while
//! others have room. `distance_weight` is "prefill blocks per KV block shipped per unit of
//! distance": at the default 0.5, shipping a prompt's KV across racks costs as much as
//! prefilling it once more; in practice it decides between otherwise similar pairs. All
//! available pairs are searched (counts are small); ties go to the lowest candidate index
//! (prefill first, then decode). What a decode engine already holds does not lower a pair's
//! cost: the whole prompt's KV is shipped to it.
//!
//! # Decision kinds
//!
//! - With at least one available prefill and one available decode engine: **decode-only** if
//!   `short_prompt_tokens > 0` and some decode engine would have at most that many uncached
//!   tokens (`prompt_tokens − cached(d) × block_tokens`; covers short prompts and full cache
//!   hits) — the best such engine by `decode_only(d)`; otherwise **disaggregated**.
//! - Else, with an available `Both` engine: **colocated**.
//! - Else, with an available decode engine but no prefill engine: **decode-only** (a decode
//!   engine can prefill: slower, but the request is served).
//! - Else an error that says what is missing.
//!
//! Round-robin and random apply the same rules, choosing engines by their own rule instead of
//! the cost (the decode engine first, then the prefill engine). Unavailable candidates are never
//! chosen.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
mod hash;
mod index;
mod table;

use std::fmt;
use std::str::FromStr;

pub use hash::{block_hashes, token_block_hashes};
pub use index::{ENGINE_SLOTS_MAX, INDEX_ENTRIES_MAX};
use index::{PrefixIndex, SlotSet};

/// What an engine does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Computes prompts and ships their KV to a decode engine.
    Prefill,
    /// Generates tokens from imported KV (and can prefill itself, slower).
    Decode,
    /// Colocated: one engine does both.
    Both,
}

/// One engine the router may choose, with live load (as last reported, plus what this agent
/// itself has in flight).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Unique id, e.g. `"tiny/prefill-0"`.
    pub engine: String,
    /// The node the engine runs on.
    pub node: String,
    /// The node's `rack` label.
    pub rack: Option<String>,
    /// What the engine does.
    pub role: Role,
    /// Requests waiting in the engine.
    pub queued: u32,
    /// Requests running.
    pub running: u32,
    /// Share of its KV blocks in use, `0..=1` (clamped; NaN counts as full).
    pub kv_usage: f32,
    /// Requests this agent has sent and not seen finish.
    pub inflight: u32,
    /// False when not ready or its circuit is open: never chosen.
    pub available: bool,
}

/// How the router picks engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Lowest cost (prefix overlap, load, KV pressure, distance); see the crate docs.
    Cost,
    /// Cycles over the available engines of each role (separate counters).
    RoundRobin,
    /// Uniform among the available engines of each role, from `RouterConfig::seed`.
    Random,
}

impl Policy {
    /// The configuration spelling: `cost`, `round-robin` or `random`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Cost => "cost",
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing policy name that is none of the known ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPolicy {
    /// What was given.
    pub given: String,
}

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown routing policy {:?}: expected \"cost\", \"round-robin\" or \"random\"",
            self.given
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cost" => Ok(Policy::Cost),
            "round-robin" => Ok(Policy::RoundRobin),
            "random" => Ok(Policy::Random),
            _ => Err(UnknownPolicy {
                given: s.to_owned(),
            }),
        }
    }
}

/// The router's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// How engines are picked.
    pub policy: Policy,
    /// Tokens per prefix block (the engine's block size, e.g. 16); one hash of the request
    /// counts as this many tokens.
    pub block_tokens: u32,
    /// An uncached prompt part at or below this many tokens may skip remote prefill and run on
    /// the decode engine alone (0: never).
    pub short_prompt_tokens: u32,
    /// Weight of prefill work (uncached and queued blocks) against decode load: Dynamo's
    /// `overlap_score_weight`.
    pub overlap_weight: f32,
    /// Cost, in prefill blocks, of shipping one KV block over one unit of distance (same node 0,
    /// same rack 1, else 2).
    pub distance_weight: f32,
    /// Extra decode load, in requests, of an engine whose KV is full (scaled by `kv_usage²`).
    pub kv_pressure_weight: f32,
    /// Bound on the prefix index, in block entries (least recently recorded evicted first).
    pub index_entries_max: usize,
    /// Seed for [`Policy::Random`].
    pub seed: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            policy: Policy::Cost,
            block_tokens: 16,
            short_prompt_tokens: 32,
            overlap_weight: 1.0,
            distance_weight: 0.5,
            kv_pressure_weight: 16.0,
            index_entries_max: 100_000,
            seed: 0,
        }
    }
}

/// A [`RouterConfig`] field out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field's name.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "router config: {} {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl RouterConfig {
    /// Checks every field is in range; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.block_tokens == 0 {
            return err("block_tokens", "must be at least 1");
        }
        for (field, v) in [
            ("overlap_weight", self.overlap_weight),
            ("distance_weight", self.distance_weight),
            ("kv_pressure_weight", self.kv_pressure_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(field, &format!("must be a finite number >= 0, not {v}"));
            }
        }
        if !(1..=INDEX_ENTRIES_MAX).contains(&self.index_entries_max) {
            return err(
                "index_entries_max",
                &format!(
                    "must be between 1 and {INDEX_ENTRIES_MAX}, not {}",
                    self.index_entries_max
                ),
            );
        }
        Ok(())
    }
}

/// How a request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// A prefill engine computes the prompt and ships its KV to a decode engine.
    Disaggregated,
    /// A decode engine does the whole request (short prompt, cache hit, or no prefill engine).
    DecodeOnly,
    /// A `Both` engine does the whole request.
    Colocated,
}

impl DecisionKind {
    /// The metrics label: `disaggregated`, `decode_only` or `colocated`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Disaggregated => "disaggregated",
            DecisionKind::DecodeOnly => "decode_only",
            DecisionKind::Colocated => "colocated",
        }
    }
}

/// Which engines serve a request: indexes into the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engines {
    /// `prefill` computes the prompt and ships its KV to `decode`.
    Disaggregated {
        /// The prefill engine.
        prefill: usize,
        /// The decode engine.
        decode: usize,
    },
    /// A decode engine does the whole request (short prompt, cache hit, or no prefill engine).
    DecodeOnly {
        /// The decode engine.
        decode: usize,
    },
    /// A `Both` engine does the whole request.
    Colocated {
        /// The colocated engine.
        engine: usize,
    },
}

/// The router's choice for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// How the request is served, and by which engines.
    pub engines: Engines,
    /// Prefix blocks the engine that computes the prompt is believed to hold.
    pub cached_blocks: u32,
    /// The prompt's blocks, as the cost counted them.
    pub prompt_blocks: u32,
}

impl Engines {
    /// How the request is served.
    pub fn kind(self) -> DecisionKind {
        match self {
            Engines::Disaggregated { .. } => DecisionKind::Disaggregated,
            Engines::DecodeOnly { .. } => DecisionKind::DecodeOnly,
            Engines::Colocated { .. } => DecisionKind::Colocated,
        }
    }
}

impl Decision {
    /// How the request is served.
    pub fn kind(&self) -> DecisionKind {
        self.engines.kind()
    }

    /// The prefill engine, when disaggregated.
    pub fn prefill(&self) -> Option<usize> {
        match self.engines {
            Engines::Disaggregated { prefill, .. } => Some(prefill),
            _ => None,
        }
    }

    /// The engine that produces the output tokens: the decode engine, or the colocated one.
    pub fn decode(&self) -> usize {
        match self.engines {
            Engines::Disaggregated { decode, .. } | Engines::DecodeOnly { decode } => decode,
            Engines::Colocated { engine } => engine,
        }
    }

    /// The engine that computes the prompt.
    pub fn computes(&self) -> usize {
        self.prefill().unwrap_or(self.decode())
    }
}

/// Why no engine could be picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The candidate list is empty.
    NoEngines,
    /// No available engine can serve the request; the counts are of available engines.
    NoneAvailable {
        /// Available prefill engines (useless without a decode engine).
        prefill: usize,
        /// Available decode engines.
        decode: usize,
        /// Candidates not ready or with an open circuit.
        unavailable: usize,
    },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NoEngines => f.write_str(
                "no engine to route to: the deployment has no prefill, decode or colocated engine",
            ),
            RouteError::NoneAvailable {
                prefill,
                decode,
                unavailable,
            } => write!(
                f,
                "no decode or colocated engine is available ({prefill} prefill, {decode} decode \
                 ready; {unavailable} engines not ready or with an open circuit)"
            ),
        }
    }
}

impl std::error::Error for RouteError {}

/// SplitMix64: a tiny, well-mixed generator for the random policy.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        hash::finalize(self.0)
    }

    /// Uniform in `0..n` (multiply-shift; `n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Where a candidate runs, hashed for quick comparison (strings compared on a hash match).
#[derive(Debug, Clone, Copy)]
struct Place {
    node: u64,
    rack: Option<u64>,
}

/// Marks a candidate without an index slot (or unavailable) in `Scratch::overlap`.
const NO_SLOT: u32 = u32::MAX;

/// Per-call buffers kept between calls, so that routing allocates nothing once warm.
#[derive(Debug, Default)]
struct Scratch {
    overlap: Vec<u32>,
    places: Vec<Place>,
    decode_costs: Vec<(usize, f64)>,
}

/// The prompt as the cost sees it.
#[derive(Debug, Clone, Copy)]
struct Prompt {
    tokens: u32,
    blocks: u32,
}

/// Picks engines per request; see the crate docs for the cost. Holds the prefix index and the
/// round-robin and random state.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    index: PrefixIndex,
    rng: SplitMix64,
    next_prefill: usize,
    next_decode: usize,
    next_both: usize,
    scratch: Scratch,
}

impl Router {
    /// A router with an empty index.
    ///
    /// # Panics
    /// When `cfg` is out of range: call [`RouterConfig::validate`] (or [`Router::try_new`]) where
    /// the configuration is read.
    pub fn new(cfg: RouterConfig) -> Self {
        match Self::try_new(cfg) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// A router with an empty index, or the configuration error.
    pub fn try_new(cfg: RouterConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Router {
            index: PrefixIndex::new(cfg.index_entries_max),
            rng: SplitMix64(cfg.seed),
            cfg,
            next_prefill: 0,
            next_decode: 0,
            next_both: 0,
            scratch: Scratch::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Picks engines for a request whose prompt has these block hashes (see [`block_hashes`])
    /// and about `prompt_tokens` tokens. The candidates are one deployment's engines and may mix
    /// `Prefill`/`Decode` (disaggregated) and `Both` (colocated) engines. See the crate docs for
    /// the rules. Does not record anything: call [`Router::record_decision`] once the request is
    /// sent.
    pub fn route(
        &mut self,
        blocks: &[u64],
        prompt_tokens: u32,
        candidates: &[Candidate],
    ) -> Result<Decision, RouteError> {
        if candidates.is_empty() {
            return Err(RouteError::NoEngines);
        }
        let (mut prefill, mut decode, mut both) = (0, 0, 0);
        for c in candidates.iter().filter(|c| c.available) {
            match c.role {
                Role::Prefill => prefill += 1,
                Role::Decode => decode += 1,
                Role::Both => both += 1,
            }
        }
        let by_tokens = prompt_tokens.div_ceil(self.cfg.block_tokens);
        let prompt = Prompt {
            tokens: prompt_tokens,
            blocks: by_tokens.max(u32::try_from(blocks.len()).unwrap_or(u32::MAX)),
        };
        self.compute_overlaps(blocks, candidates);

        let decision = if prefill > 0 && decode > 0 {
            self.pick_disaggregated(prompt, candidates)
        } else if both > 0 {
            let e = self.pick_colocated(prompt, candidates);
            self.decision(Engines::Colocated { engine: e }, prompt)
        } else if decode > 0
            && let Some(d) = self.pick_decode_only(prompt, candidates, false)
        {
            self.decision(Engines::DecodeOnly { decode: d }, prompt)
        } else {
            return Err(RouteError::NoneAvailable {
                prefill,
                decode,
                unavailable: candidates.iter().filter(|c| !c.available).count(),
            });
        };
        Ok(decision)
    }

    /// Records what a sent request leaves in engine caches: the prompt's blocks on the engine
    /// that computed it and on the decode engine (imported KV lands in its cache).
    pub fn record_decision(
        &mut self,
        decision: &Decision,
        candidates: &[Candidate],
        blocks: &[u64],
    ) {
        let decode = candidates[decision.decode()].engine.as_str();
        match decision.prefill() {
            Some(p) => self.index.record(&[&candidates[p].engine, decode], blocks),
            None => self.index.record(&[decode], blocks),
        }
    }

    /// Remembers that `engine` now holds these prefix blocks (called after a request was sent
    /// there: the prefill engine for disaggregated, the engine itself otherwise; and the decode
    /// engine too, since imported KV lands in its cache).
    pub fn record(&mut self, engine: &str, blocks: &[u64]) {
        self.index.record(&[engine], blocks);
    }

    /// Forgets an engine (gone, restarted: its cache is empty). O(index entries).
    pub fn forget_engine(&mut self, engine: &str) {
        self.index.forget(engine);
    }

    /// How many leading blocks of `blocks` `engine` is believed to hold.
    pub fn overlap(&self, engine: &str, blocks: &[u64]) -> u32 {
        self.index.overlap(engine, blocks)
    }

    /// Block entries in the prefix index (at most `index_entries_max`).
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    /// Engines the prefix index tracks (at most [`ENGINE_SLOTS_MAX`]).
    pub fn index_engines(&self) -> usize {
        self.index.engines()
    }

    /// Fills `scratch.overlap` (per candidate, in one walk) and `scratch.places`.
    fn compute_overlaps(&mut self, blocks: &[u64], candidates: &[Candidate]) {
        let s = &mut self.scratch;
        s.overlap.clear();
        s.places.clear();
        let mut set = SlotSet::EMPTY;
        for c in candidates {
            // Slots stand in the overlap column until the walk replaces them with depths.
            match self.index.slot(&c.engine).filter(|_| c.available) {
                Some(slot) => {
                    set.insert(slot);
                    s.overlap.push(slot);
                }
                None => s.overlap.push(NO_SLOT),
            }
            s.places.push(Place {
                node: hash::str_hash(&c.node),
                rack: c.rack.as_deref().map(hash::str_hash),
            });
        }
        let mut depth = [0u32; ENGINE_SLOTS_MAX];
        if !set.is_empty() {
            self.index.leading_matches(blocks, set, &mut depth);
        }
        for held in &mut s.overlap {
            *held = if *held == NO_SLOT {
                0
            } else {
                depth[*held as usize]
            };
        }
    }

    fn decision(&self, engines: Engines, prompt: Prompt) -> Decision {
        let mut d = Decision {
            engines,
            cached_blocks: 0,
            prompt_blocks: prompt.blocks,
        };
        d.cached_blocks = self.scratch.overlap[d.computes()];
        d
    }

    fn pick_disaggregated(&mut self, prompt: Prompt, cands: &[Candidate]) -> Decision {
        let short = self.cfg.short_prompt_tokens > 0;
        let (p, d) = match self.cfg.policy {
            Policy::Cost => {
                if short && let Some(d) = self.pick_decode_only(prompt, cands, true) {
                    return self.decision(Engines::DecodeOnly { decode: d }, prompt);
                }
                self.best_pair(prompt, cands)
            }
            Policy::RoundRobin | Policy::Random => {
                let d = self.next_of(Role::Decode, cands);
                if short && self.is_short_on(d, prompt) {
                    return self.decision(Engines::DecodeOnly { decode: d }, prompt);
                }
                (self.next_of(Role::Prefill, cands), d)
            }
        };
        self.decision(
            Engines::Disaggregated {
                prefill: p,
                decode: d,
            },
            prompt,
        )
    }

    /// The decode engine to run the request alone; with `short_only`, only among engines where
    /// the uncached part is short (`None` if there is none).
    fn pick_decode_only(
        &mut self,
        prompt: Prompt,
        cands: &[Candidate],
        short_only: bool,
    ) -> Option<usize> {
        match self.cfg.policy {
            Policy::Cost => {
                let mut best: Option<(usize, f64)> = None;
                for (i, c) in cands.iter().enumerate() {
                    if !(c.available && c.role == Role::Decode) {
                        continue;
                    }
                    if short_only && !self.is_short_on(i, prompt) {
                        continue;
                    }
                    let cost = f64::from(self.cfg.overlap_weight) * self.uncached_blocks(i, prompt)
                        + self.decode_cost(c, prompt);
                    if best.is_none_or(|(_, b)| cost < b) {
                        best = Some((i, cost));
                    }
                }
                best.map(|(i, _)| i)
            }
            Policy::RoundRobin | Policy::Random => {
                let d = self.next_of(Role::Decode, cands);
                (!short_only || self.is_short_on(d, prompt)).then_some(d)
            }
        }
    }

    fn pick_colocated(&mut self, prompt: Prompt, cands: &[Candidate]) -> usize {
        match self.cfg.policy {
            Policy::Cost => {
                let mut best: Option<(usize, f64)> = None;
                for (i, c) in cands.iter().enumerate() {
                    if !(c.available && c.role == Role::Both) {
                        continue;
                    }
                    // One engine, one load: counted once (in the decode term).
                    let cost = f64::from(self.cfg.overlap_weight) * self.uncached_blocks(i, prompt)
                        + self.decode_cost(c, prompt);
                    if best.is_none_or(|(_, b)| cost < b) {
                        best = Some((i, cost));
                    }
                }
                best.expect("an available colocated engine").0
            }
            Policy::RoundRobin | Policy::Random => self.next_of(Role::Both, cands),
        }
    }

    /// The cheapest (prefill, decode) pair over all available pairs; ties to the lowest indices.
    fn best_pair(&mut self, prompt: Prompt, cands: &[Candidate]) -> (usize, usize) {
        let mut decode_costs = std::mem::take(&mut self.scratch.decode_costs);
        decode_costs.clear();
        for (i, c) in cands.iter().enumerate() {
            if c.available && c.role == Role::Decode {
                decode_costs.push((i, self.decode_cost(c, prompt)));
            }
        }
        let per_distance = f64::from(self.cfg.distance_weight) * scale(prompt);
        let mut best: Option<(usize, usize, f64)> = None;
        for (p, c) in cands.iter().enumerate() {
            if !(c.available && c.role == Role::Prefill) {
                continue;
            }
            let pc = self.prefill_cost(p, c, prompt);
            // Decode and transfer costs are >= 0: this prefill engine cannot win.
            if best.is_some_and(|(_, _, b)| pc >= b) {
                continue;
            }
            for &(d, dc) in &decode_costs {
                let cost = pc + dc + per_distance * self.distance(p, d, cands);
                if best.is_none_or(|(_, _, b)| cost < b) {
                    best = Some((p, d, cost));
                }
            }
        }
        self.scratch.decode_costs = decode_costs;
        let (p, d, _) = best.expect("an available prefill and decode engine");
        (p, d)
    }

    /// Same node 0, same rack 1, else 2.
    fn distance(&self, a: usize, b: usize, cands: &[Candidate]) -> f64 {
        let (pa, pb) = (self.scratch.places[a], self.scratch.places[b]);
        if pa.node == pb.node && cands[a].node == cands[b].node {
            0.0
        } else if pa.rack.is_some() && pa.rack == pb.rack && cands[a].rack == cands[b].rack {
            1.0
        } else {
            2.0
        }
    }

    fn uncached_blocks(&self, i: usize, prompt: Prompt) -> f64 {
        f64::from(prompt.blocks.saturating_sub(self.scratch.overlap[i]))
    }

    fn is_short_on(&self, i: usize, prompt: Prompt) -> bool {
        let cached_tokens = self.scratch.overlap[i].saturating_mul(self.cfg.block_tokens);
        prompt.tokens.saturating_sub(cached_tokens) <= self.cfg.short_prompt_tokens
    }

    fn prefill_cost(&self, i: usize, c: &Candidate, prompt: Prompt) -> f64 {
        f64::from(self.cfg.overlap_weight)
            * (self.uncached_blocks(i, prompt) + load(c) * scale(prompt))
    }

    fn decode_cost(&self, c: &Candidate, prompt: Prompt) -> f64 {
        let kv = if c.kv_usage.is_nan() {
            1.0
        } else {
            f64::from(c.kv_usage.clamp(0.0, 1.0))
        };
        (load(c) + f64::from(self.cfg.kv_pressure_weight) * kv * kv) * scale(prompt)
    }

    /// The next available engine of `role` for round-robin or random.
    fn next_of(&mut self, role: Role, cands: &[Candidate]) -> usize {
        let n = cands
            .iter()
            .filter(|c| c.available && c.role == role)
            .count();
        assert!(n > 0, "no available {role:?} engine to pick from");
        let k = match self.cfg.policy {
            Policy::Random => self.rng.below(n),
            _ => {
                let counter = match role {
                    Role::Prefill => &mut self.next_prefill,
                    Role::Decode => &mut self.next_decode,
                    Role::Both => &mut self.next_both,
                };
                let k = *counter % n;
                *counter = counter.wrapping_add(1);
                k
            }
        };
        cands
            .iter()
            .enumerate()
            .filter(|(_, c)| c.available && c.role == role)
            .nth(k)
            .map(|(i, _)| i)
            .expect("k < n")
    }
}

fn load(c: &Candidate) -> f64 {
    f64::from(c.queued) + f64::from(c.running) + f64::from(c.inflight)
}

/// The prompt's blocks as a load multiplier (at least 1, so that load still counts for an
/// empty prompt).
fn scale(prompt: Prompt) -> f64 {
    f64::from(prompt.blocks.max(1))
}
