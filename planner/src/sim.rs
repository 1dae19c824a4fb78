//! A discrete-event simulator of one layout under one workload.
//!
//! Disaggregated: requests queue at prefill engines (least expected finish time first), which
//! batch whole prompts up to a token limit; the KV streams to a decode engine (least loaded by
//! KV) over the sender's NICs, layer by layer, so it overlaps the prefill step; decode engines
//! batch continuously up to a batch limit and admit a sequence only when its whole KV
//! (prompt + output) fits. Colocated: one engine does both, with chunked prefill sharing each
//! step's token budget with the running decodes (decodes first, as vLLM schedules).
//!
//! Decode steps are the bulk of the events, so a decode engine keeps only sums: the step
//! counter and Σ(context at admission − admission step) give every step's total context in
//! O(1), and a heap of finishing steps retires sequences.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::{ModelSpec, PerfModel, PlanError, Request, SLO_ATTAINMENT_TARGET, Slo, StepLoad};

/// What a group of engines does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
    /// Prefill and decode in the same engine.
    Colocated,
}

/// Identical engines of one role on one kind of GPU.
#[derive(Debug, Clone)]
pub struct WorkerGroup {
    pub system: String,
    pub role: Role,
    pub workers: u32,
    pub perf: PerfModel,
    /// Sequences decoding at once (decode and colocated engines).
    pub max_batch: u32,
    /// Tokens per step: whole prompts per prefill step; prompt chunks plus decode tokens per
    /// colocated step.
    pub max_step_tokens: u32,
}

/// A whole deployment: either prefill and decode groups, or colocated groups.
#[derive(Debug, Clone)]
pub struct Layout {
    pub groups: Vec<WorkerGroup>,
}

impl Layout {
    pub fn gpus(&self) -> u32 {
        self.groups.iter().map(|g| g.workers * g.perf.tp).sum()
    }

    pub fn is_colocated(&self) -> bool {
        self.groups.iter().any(|g| g.role == Role::Colocated)
    }

    fn validate(&self, model: &ModelSpec, longest: f64) -> Result<(), PlanError> {
        let has = |r: Role| self.groups.iter().any(|g| g.role == r && g.workers > 0);
        let shape_ok = if has(Role::Colocated) {
            !has(Role::Prefill) && !has(Role::Decode)
        } else {
            has(Role::Prefill) && has(Role::Decode)
        };
        if !shape_ok {
            return Err(PlanError::invalid(
                "layout",
                "it needs prefill and decode engines, or colocated engines only",
            ));
        }
        for g in &self.groups {
            if g.role != Role::Prefill && g.max_batch == 0 {
                return Err(PlanError::invalid("layout", "a decode batch limit of 0"));
            }
            if g.role == Role::Colocated && g.max_step_tokens <= g.max_batch {
                return Err(PlanError::invalid(
                    "layout",
                    format!(
                        "a colocated step budget of {} tokens leaves no room for prompts next to {} decodes",
                        g.max_step_tokens, g.max_batch
                    ),
                ));
            }
            if g.role != Role::Prefill && g.perf.max_sequences(model, longest) == 0 {
                return Err(PlanError::invalid(
                    "layout",
                    format!(
                        "a {longest}-token sequence does not fit the KV memory of TP{} on {}",
                        g.perf.tp, g.system
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Mean and percentiles of one measure over the measured requests.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    /// Nearest-rank percentiles.
    pub fn of(values: &mut [f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let at = |q: f64| values[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            mean: values.iter().sum::<f64>() / n as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// What one simulation measured. Requests in the first and last tenth of the arrivals (and
/// before the warm-up time of `simulate_after`) are simulated but not measured: the system is
/// filling up and draining then.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    pub measured_requests: u32,
    pub ttft_s: Summary,
    pub tpot_s: Summary,
    /// Share of measured requests that met both targets.
    pub slo_attainment: f64,
    /// Output tokens of all requests over the time from the first arrival to the last
    /// completion.
    pub output_tokens_per_s: f64,
    /// Output tokens of requests that met both targets, over the same time.
    pub slo_output_tokens_per_s: f64,
    /// Sequences in a decode step, averaged over time and decode engines (idle time counts 0).
    pub mean_decode_batch: f64,
    pub duration_s: f64,
}

impl SimReport {
    pub fn meets_target(&self) -> bool {
        self.slo_attainment >= SLO_ATTAINMENT_TARGET
    }
}

const UNMEASURED_HEAD: f64 = 0.1;
const UNMEASURED_TAIL: f64 = 0.1;

#[derive(Debug, Clone, Copy)]
enum Kind {
    StepDone(u32),
    KvArrived { req: u32, worker: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        self.t.total_cmp(&o.t).then(self.seq.cmp(&o.seq))
    }
}

/// Sequences decoding in one engine, kept as sums (see the module doc).
#[derive(Debug, Default)]
struct DecodeBatch {
    step: u64,
    running: u32,
    /// Σ over running sequences of (context at admission − admission step).
    base_sum: f64,
    /// (finishing step, request)
    finishing: BinaryHeap<Reverse<(u64, u32)>>,
}

impl DecodeBatch {
    fn context_sum(&self) -> f64 {
        self.base_sum + self.running as f64 * self.step as f64
    }

    /// `context` tokens are cached when the sequence joins; it emits `steps` more tokens.
    fn admit(&mut self, req: u32, context: f64, steps: u64) {
        self.running += 1;
        self.base_sum += context - self.step as f64;
        self.finishing.push(Reverse((self.step + steps, req)));
    }
}

#[derive(Debug)]
struct Worker {
    group: usize,
    busy: bool,
    /// Prefill: prompts waiting. Decode: sequences whose KV arrived. Colocated: prompts not
    /// yet admitted.
    queue: VecDeque<u32>,
    queued_tokens: f64,
    /// Prefill: the prompts of the running step.
    in_step: Vec<u32>,
    step_start_s: f64,
    link_free_s: f64,
    /// Decode/colocated: KV bytes per rank reserved for sequences in transfer, waiting or
    /// running.
    reserved_bytes: f64,
    /// Decode: prompts done whose KV waits on the prefill engine for memory here.
    pending: VecDeque<u32>,
    pending_bytes: f64,
    batch: DecodeBatch,
    /// Colocated: admitted prompts with the tokens already prefilled.
    prefilling: VecDeque<(u32, u32)>,
    /// Colocated: tokens each of the first prefilling prompts gets in the running step.
    chunks: Vec<u32>,
    /// Σ running × step duration, for the time-averaged batch.
    batch_sequence_s: f64,
}

struct ReqState {
    first_token_s: f64,
    done_s: f64,
    /// KV bytes per rank it holds on its decode (or colocated) engine.
    kv_bytes: f64,
    prefill_worker: u32,
    /// When its prefill step began (the KV streams from then on) and ended.
    prefill_start_s: f64,
    prefill_end_s: f64,
}

struct Sim<'a> {
    model: &'a ModelSpec,
    layout: &'a Layout,
    reqs: &'a [Request],
    state: Vec<ReqState>,
    workers: Vec<Worker>,
    events: BinaryHeap<Reverse<Event>>,
    seq: u64,
    /// Prefill seconds per prompt token of each group at the mean ISL, for routing.
    prefill_s_per_token: Vec<f64>,
    layers: f64,
    /// Engines that take new requests (prefill or colocated), and decode engines.
    entries: Vec<usize>,
    decoders: Vec<usize>,
    /// Per group: scratch for one request's KV bytes per rank; 1 / KV budget.
    need_bytes: Vec<f64>,
    inverse_budget: Vec<f64>,
}

/// Simulates `requests` on `layout` and measures them against `slo`. Deterministic: the same
/// inputs give the same report.
pub fn simulate(
    model: &ModelSpec,
    layout: &Layout,
    requests: &[Request],
    slo: &Slo,
) -> Result<SimReport, PlanError> {
    simulate_after(model, layout, requests, slo, 0.0)
}

/// Like `simulate`, but measures only requests that arrive at `warmup_s` or later: a decode
/// batch takes about a request's lifetime to fill, and requests before that see a system
/// emptier than it will be.
pub fn simulate_after(
    model: &ModelSpec,
    layout: &Layout,
    requests: &[Request],
    slo: &Slo,
    warmup_s: f64,
) -> Result<SimReport, PlanError> {
    if requests.is_empty() {
        return Err(PlanError::invalid("workload", "no requests"));
    }
    let longest = requests
        .iter()
        .map(|r| r.isl as f64 + r.osl as f64)
        .fold(0.0, f64::max);
    layout.validate(model, longest)?;
    let mean_isl = requests.iter().map(|r| r.isl as f64).sum::<f64>() / requests.len() as f64;
    let mut workers = Vec::new();
    for (g, group) in layout.groups.iter().enumerate() {
        for _ in 0..group.workers {
            workers.push(Worker {
                group: g,
                busy: false,
                queue: VecDeque::new(),
                queued_tokens: 0.0,
                in_step: Vec::new(),
                step_start_s: 0.0,
                link_free_s: 0.0,
                reserved_bytes: 0.0,
                pending: VecDeque::new(),
                pending_bytes: 0.0,
                batch: DecodeBatch::default(),
                prefilling: VecDeque::new(),
                chunks: Vec::new(),
                batch_sequence_s: 0.0,
            });
        }
    }
    let prefill_s_per_token = layout
        .groups
        .iter()
        .map(|g| {
            let l = mean_isl.round().max(1.0) as u32;
            g.perf.prefill_s(&[l]) / l as f64
        })
        .collect();
    let mut sim = Sim {
        model,
        layout,
        reqs: requests,
        state: requests
            .iter()
            .map(|_| ReqState {
                first_token_s: f64::NAN,
                done_s: f64::NAN,
                kv_bytes: 0.0,
                prefill_worker: 0,
                prefill_start_s: 0.0,
                prefill_end_s: 0.0,
            })
            .collect(),
        workers,
        events: BinaryHeap::new(),
        seq: 0,
        prefill_s_per_token,
        layers: model.layers as f64,
        entries: Vec::new(),
        decoders: Vec::new(),
        need_bytes: vec![0.0; layout.groups.len()],
        inverse_budget: layout
            .groups
            .iter()
            .map(|g| 1.0 / g.perf.kv_budget_bytes())
            .collect(),
    };
    for w in 0..sim.workers.len() {
        match sim.group(w).role {
            Role::Decode => sim.decoders.push(w),
            Role::Prefill | Role::Colocated => sim.entries.push(w),
        }
    }

    sim.run();
    Ok(sim.report(slo, warmup_s))
}

impl Sim<'_> {
    fn push(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            t,
            seq: self.seq,
            kind,
        }));
    }

    fn group(&self, w: usize) -> &WorkerGroup {
        &self.layout.groups[self.workers[w].group]
    }

    fn run(&mut self) {
        let mut next = 0;
        loop {
            let arrival = self.reqs.get(next).map(|r| r.arrival_s);
            let event = self.events.peek().map(|e| e.0.t);
            match (arrival, event) {
                (None, None) => break,
                (Some(a), e) if e.is_none_or(|e| a <= e) => {
                    self.arrive(next as u32, a);
                    next += 1;
                }
                _ => {
                    let Reverse(ev) = self.events.pop().expect("peeked");
                    match ev.kind {
                        Kind::StepDone(w) => self.step_done(w as usize, ev.t),
                        Kind::KvArrived { req, worker } => {
                            self.kv_arrived(req, worker as usize, ev.t)
                        }
                    }
                }
            }
        }
    }

    fn arrive(&mut self, req: u32, now: f64) {
        let r = self.reqs[req as usize];
        let colocated = self.layout.is_colocated();
        // Prefill: the earliest expected finish. Colocated: the fewest outstanding requests.
        let mut best = (f64::INFINITY, usize::MAX);
        for &i in &self.entries {
            let w = &self.workers[i];
            let g = &self.layout.groups[w.group];
            let score = match (colocated, g.role) {
                (false, Role::Prefill) => {
                    let per = self.prefill_s_per_token[w.group];
                    let busy_left = if w.busy {
                        per * r.isl as f64 * 0.5
                    } else {
                        0.0
                    };
                    (w.queued_tokens + r.isl as f64) * per + busy_left
                }
                (true, Role::Colocated) => {
                    (w.queue.len() + w.prefilling.len()) as f64
                        + w.batch.running as f64
                        + w.reserved_bytes / g.perf.kv_budget_bytes()
                }
                _ => continue,
            };
            if score < best.0 {
                best = (score, i);
            }
        }
        let w = best.1;
        self.workers[w].queue.push_back(req);
        self.workers[w].queued_tokens += r.isl as f64;
        if !self.workers[w].busy {
            self.start_step(w, now);
        }
    }

    fn start_step(&mut self, w: usize, now: f64) {
        match self.group(w).role {
            Role::Prefill => self.start_prefill(w, now),
            Role::Decode => self.start_decode(w, now),
            Role::Colocated => self.start_colocated(w, now),
        }
    }

    fn start_prefill(&mut self, w: usize, now: f64) {
        let limit = self.group(w).max_step_tokens as f64;
        let mut load = StepLoad::default();
        let worker = &mut self.workers[w];
        while let Some(&req) = worker.queue.front() {
            let isl = self.reqs[req as usize].isl as f64;
            if !worker.in_step.is_empty() && load.prefill_tokens + isl > limit {
                break;
            }
            worker.queue.pop_front();
            worker.queued_tokens -= isl;
            load.add_chunk(isl, 0.0, true);
            worker.in_step.push(req);
        }
        if worker.in_step.is_empty() {
            worker.busy = false;
            return;
        }
        worker.busy = true;
        worker.step_start_s = now;
        let t = now + self.layout.groups[worker.group].perf.step_s(&load);
        self.push(t, Kind::StepDone(w as u32));
    }

    fn step_done(&mut self, w: usize, now: f64) {
        match self.group(w).role {
            Role::Prefill => self.prefill_done(w, now),
            Role::Decode => {
                self.retire(w, now);
                self.start_transfers(w, now);
                self.start_decode(w, now);
            }
            Role::Colocated => self.colocated_done(w, now),
        }
    }

    fn prefill_done(&mut self, w: usize, now: f64) {
        let done = std::mem::take(&mut self.workers[w].in_step);
        for &req in &done {
            let r = self.reqs[req as usize];
            let context = (r.isl + r.osl) as f64;
            for (need, g) in self.need_bytes.iter_mut().zip(&self.layout.groups) {
                *need = g.perf.kv_bytes_per_rank(self.model, context);
            }
            // The decode engine with the least KV committed, relative to its memory.
            let mut best = (f64::INFINITY, usize::MAX);
            for &i in &self.decoders {
                let d = &self.workers[i];
                let score = (d.reserved_bytes + d.pending_bytes + self.need_bytes[d.group])
                    * self.inverse_budget[d.group];
                if score < best.0 {
                    best = (score, i);
                }
            }
            let d = best.1;
            let need = self.need_bytes[self.workers[d].group];
            let s = &mut self.state[req as usize];
            s.kv_bytes = need;
            s.prefill_worker = w as u32;
            s.prefill_start_s = self.workers[w].step_start_s;
            s.prefill_end_s = now;
            self.workers[d].pending.push_back(req);
            self.workers[d].pending_bytes += need;
            self.start_transfers(d, now);
        }
        // Keep the allocation for the next step.
        self.workers[w].in_step = done;
        self.workers[w].in_step.clear();
        self.start_prefill(w, now);
    }

    /// Pulls KV into decode engine `d` while its memory has room, in arrival order. Until
    /// then the prefill engine holds the KV (as vLLM's NIXL flow does), and the request waits.
    fn start_transfers(&mut self, d: usize, now: f64) {
        let budget = self.group(d).perf.kv_budget_bytes();
        while let Some(&req) = self.workers[d].pending.front() {
            let need = self.state[req as usize].kv_bytes;
            if self.workers[d].reserved_bytes + need > budget {
                break;
            }
            self.workers[d].pending.pop_front();
            self.workers[d].pending_bytes -= need;
            self.workers[d].reserved_bytes += need;
            let s = &self.state[req as usize];
            let p = s.prefill_worker as usize;
            let isl = self.reqs[req as usize].isl as f64;
            let transfer = self
                .group(p)
                .perf
                .kv_transfer_s(&self.group(d).perf, self.model, isl);
            // Memory free at once: the KV streams layer by layer while the prefill step runs,
            // and cannot arrive before the last layer is computed and sent, nor before the
            // NIC has moved it all. Memory freed later: the whole KV moves from now.
            let (ready, last_layer) = if now > s.prefill_end_s {
                (now, now)
            } else {
                (s.prefill_start_s, s.prefill_end_s + transfer / self.layers)
            };
            let start = ready.max(self.workers[p].link_free_s);
            let arrive = (start + transfer).max(last_layer);
            self.workers[p].link_free_s = arrive;
            self.push(
                arrive,
                Kind::KvArrived {
                    req,
                    worker: d as u32,
                },
            );
        }
    }

    fn kv_arrived(&mut self, req: u32, d: usize, now: f64) {
        let r = self.reqs[req as usize];
        self.state[req as usize].first_token_s = now;
        if r.osl <= 1 {
            self.state[req as usize].done_s = now;
            self.workers[d].reserved_bytes -= self.state[req as usize].kv_bytes;
            self.start_transfers(d, now);
            return;
        }
        self.workers[d].queue.push_back(req);
        if !self.workers[d].busy {
            self.start_decode(d, now);
        }
    }

    /// Moves sequences whose KV has arrived into the batch, up to the batch limit (their
    /// memory was reserved before the transfer).
    fn start_decode(&mut self, d: usize, now: f64) {
        let g = self.workers[d].group;
        let max_batch = self.layout.groups[g].max_batch;
        let worker = &mut self.workers[d];
        while worker.batch.running < max_batch {
            let Some(req) = worker.queue.pop_front() else {
                break;
            };
            let r = self.reqs[req as usize];
            worker
                .batch
                .admit(req, r.isl as f64 + 1.0, (r.osl - 1) as u64);
        }
        if worker.batch.running == 0 {
            worker.busy = false;
            return;
        }
        worker.busy = true;
        worker.step_start_s = now;
        let load = StepLoad::decode(worker.batch.running as f64, worker.batch.context_sum());
        let dt = self.layout.groups[g].perf.step_s(&load);
        worker.batch_sequence_s += worker.batch.running as f64 * dt;
        self.push(now + dt, Kind::StepDone(d as u32));
    }

    /// Ends a decode step: every running sequence has one more token; those done leave and
    /// give back their KV memory.
    fn retire(&mut self, w: usize, now: f64) {
        let worker = &mut self.workers[w];
        worker.batch.step += 1;
        while let Some(&Reverse((step, req))) = worker.batch.finishing.peek() {
            if step > worker.batch.step {
                break;
            }
            worker.batch.finishing.pop();
            let r = self.reqs[req as usize];
            let s = &mut self.state[req as usize];
            s.done_s = now;
            worker.batch.running -= 1;
            // Undo what `admit` added: the context it joined with minus its admission step.
            let admitted_at = step - (r.osl - 1) as u64;
            worker.batch.base_sum -= r.isl as f64 + 1.0 - admitted_at as f64;
            worker.reserved_bytes -= s.kv_bytes;
        }
    }

    fn start_colocated(&mut self, w: usize, now: f64) {
        let g = self.workers[w].group;
        let group = &self.layout.groups[g];
        let (max_batch, budget) = (group.max_batch, group.perf.kv_budget_bytes());
        let worker = &mut self.workers[w];
        // Admit prompts while sequences and KV memory allow; the whole sequence is reserved.
        while let Some(&req) = worker.queue.front() {
            let r = self.reqs[req as usize];
            if worker.batch.running + worker.prefilling.len() as u32 >= max_batch {
                break;
            }
            let need = group
                .perf
                .kv_bytes_per_rank(self.model, (r.isl + r.osl) as f64);
            if worker.reserved_bytes + need > budget {
                break;
            }
            worker.queue.pop_front();
            worker.queued_tokens -= r.isl as f64;
            worker.reserved_bytes += need;
            self.state[req as usize].kv_bytes = need;
            worker.prefilling.push_back((req, 0));
        }
        let mut load = StepLoad::decode(worker.batch.running as f64, worker.batch.context_sum());
        let mut room = group.max_step_tokens.saturating_sub(worker.batch.running);
        worker.chunks.clear();
        for &(req, done) in &worker.prefilling {
            if room == 0 {
                break;
            }
            let isl = self.reqs[req as usize].isl;
            let c = (isl - done).min(room);
            room -= c;
            load.add_chunk(c as f64, done as f64, done + c == isl);
            worker.chunks.push(c);
        }
        if load.prefill_tokens + load.decode_seqs <= 0.0 {
            worker.busy = false;
            return;
        }
        worker.busy = true;
        let dt = group.perf.step_s(&load);
        worker.batch_sequence_s += worker.batch.running as f64 * dt;
        self.push(now + dt, Kind::StepDone(w as u32));
    }

    fn colocated_done(&mut self, w: usize, now: f64) {
        self.retire(w, now);
        let worker = &mut self.workers[w];
        let chunks = std::mem::take(&mut worker.chunks);
        for (i, c) in chunks.iter().enumerate() {
            worker.prefilling[i].1 += c;
        }
        worker.chunks = chunks;
        while let Some(&(req, done)) = worker.prefilling.front() {
            let r = self.reqs[req as usize];
            if done < r.isl {
                break;
            }
            worker.prefilling.pop_front();
            self.state[req as usize].first_token_s = now;
            if r.osl <= 1 {
                self.state[req as usize].done_s = now;
                worker.reserved_bytes -= self.state[req as usize].kv_bytes;
            } else {
                worker
                    .batch
                    .admit(req, r.isl as f64 + 1.0, (r.osl - 1) as u64);
            }
        }
        self.start_colocated(w, now);
    }

    fn report(&self, slo: &Slo, warmup_s: f64) -> SimReport {
        let n = self.reqs.len();
        let warm = self.reqs.partition_point(|r| r.arrival_s < warmup_s);
        let lo = ((n as f64 * UNMEASURED_HEAD) as usize).max(warm);
        let hi = (n - (n as f64 * UNMEASURED_TAIL) as usize)
            .max(lo + 1)
            .min(n);
        let (mut ttft, mut tpot) = (Vec::new(), Vec::new());
        let mut met = 0u32;
        for i in lo..hi {
            let (r, s) = (&self.reqs[i], &self.state[i]);
            let t1 = s.first_token_s - r.arrival_s;
            let tp = if r.osl > 1 {
                (s.done_s - s.first_token_s) / (r.osl - 1) as f64
            } else {
                0.0
            };
            if t1 <= slo.ttft_s && tp <= slo.tpot_s {
                met += 1;
            }
            ttft.push(t1);
            if r.osl > 1 {
                tpot.push(tp);
            }
        }
        let first = self.reqs[0].arrival_s;
        let last = self.state.iter().map(|s| s.done_s).fold(first, f64::max);
        let duration = (last - first).max(1e-9);
        let all_tokens: f64 = self.reqs.iter().map(|r| r.osl as f64).sum();
        let slo_tokens: f64 = self
            .reqs
            .iter()
            .zip(&self.state)
            .filter(|(r, s)| {
                s.first_token_s - r.arrival_s <= slo.ttft_s
                    && (r.osl <= 1
                        || (s.done_s - s.first_token_s) / (r.osl - 1) as f64 <= slo.tpot_s)
            })
            .map(|(r, _)| r.osl as f64)
            .sum();
        let decoders: Vec<&Worker> = self
            .workers
            .iter()
            .filter(|w| self.layout.groups[w.group].role != Role::Prefill)
            .collect();
        let mean_batch = decoders.iter().map(|w| w.batch_sequence_s).sum::<f64>()
            / (duration * decoders.len().max(1) as f64);
        let measured = (hi - lo) as u32;
        SimReport {
            measured_requests: measured,
            ttft_s: Summary::of(&mut ttft),
            tpot_s: Summary::of(&mut tpot),
            slo_attainment: met as f64 / measured.max(1) as f64,
            output_tokens_per_s: all_tokens / duration,
            slo_output_tokens_per_s: slo_tokens / duration,
            mean_decode_batch: mean_batch,
            duration_s: duration,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Calibration, Dtypes, LengthDist, StepCost, SystemSpec, Workload};

    /// A small Llama for the planner's tests.
    pub(crate) fn tiny() -> ModelSpec {
        crate::parse_hf_config(
            "tiny",
            r#"{"hidden_size":256,"num_hidden_layers":4,"num_attention_heads":4,
                "num_key_value_heads":2,"intermediate_size":512,"vocab_size":1024}"#,
        )
        .unwrap()
    }

    /// A host whose step times are exactly the given calibration, with a fast network.
    pub(crate) fn measured(model: &ModelSpec, cal: Calibration, memory_bytes: f64) -> PerfModel {
        let host = SystemSpec::measured_host("host", memory_bytes, 1e12);
        PerfModel::new(model, &host, Dtypes::bf16(), 1, StepCost::Measured(cal)).unwrap()
    }

    fn cal(prefill_base_s: f64, decode_base_s: f64) -> Calibration {
        Calibration {
            prefill_base_s,
            prefill_per_token_s: 0.0,
            prefill_per_square_token_s: 0.0,
            decode_base_s,
            decode_per_seq_s: 0.0,
            decode_per_context_token_s: 0.0,
        }
    }

    fn group(role: Role, perf: PerfModel, max_batch: u32, max_step_tokens: u32) -> WorkerGroup {
        WorkerGroup {
            system: "host".into(),
            role,
            workers: 1,
            perf,
            max_batch,
            max_step_tokens,
        }
    }

    fn poisson(rate: f64, isl: u32, osl: u32, n: u32) -> Vec<Request> {
        Workload::Poisson {
            rate_per_s: rate,
            isl: LengthDist::Fixed(isl),
            osl: LengthDist::Fixed(osl),
            requests: n,
            seed: 42,
        }
        .requests()
        .unwrap()
    }

    const LOOSE: Slo = Slo {
        ttft_s: 1e9,
        tpot_s: 1e9,
    };

    /// One prefill engine with a deterministic 10 ms step, one prompt per step, Poisson
    /// arrivals: an M/D/1 queue, whose mean wait is ρ/(2μ(1−ρ)).
    #[test]
    fn prefill_queue_matches_md1() {
        let m = tiny();
        for (rho, tolerance) in [(0.5, 0.04), (0.8, 0.06)] {
            let service = 0.010;
            let mu = 1.0 / service;
            let prefill = measured(&m, cal(service, 1e-4), 1e9);
            let decode = measured(&m, cal(service, 1e-4), 1e9);
            let transfer = prefill.kv_transfer_s(&decode, &m, 100.0);
            let layout = Layout {
                groups: vec![
                    group(Role::Prefill, prefill, 0, 100),
                    group(Role::Decode, decode, 64, 0),
                ],
            };
            let reqs = poisson(rho * mu, 100, 2, 200_000);
            let r = simulate(&m, &layout, &reqs, &LOOSE).unwrap();
            let wait = r.ttft_s.mean - service - transfer / m.layers as f64;
            let want = rho / (2.0 * mu * (1.0 - rho));
            assert!(
                ((wait - want) / want).abs() < tolerance,
                "ρ={rho}: wait {wait} vs M/D/1 {want}"
            );
        }
    }

    /// Decode at a constant 10 ms step with room for everyone: each sequence is in the batch
    /// for exactly OSL−1 steps, so by Little's law the mean batch is λ·(OSL−1)·T; a sequence
    /// joins at the next step boundary, on average T/2 after its KV arrives.
    #[test]
    fn decode_batch_in_steady_state_obeys_littles_law() {
        let m = tiny();
        let step = 0.010;
        let (rate, osl) = (100.0, 51u32);
        let layout = Layout {
            groups: vec![
                group(Role::Prefill, measured(&m, cal(1e-4, step), 1e9), 0, 100),
                group(Role::Decode, measured(&m, cal(1e-4, step), 1e9), 10_000, 0),
            ],
        };
        let r = simulate(&m, &layout, &poisson(rate, 100, osl, 40_000), &LOOSE).unwrap();
        let little = rate * (osl - 1) as f64 * step;
        assert!(
            ((r.mean_decode_batch - little) / little).abs() < 0.02,
            "{} vs {little}",
            r.mean_decode_batch
        );
        let tpot = step * (1.0 + 0.5 / (osl - 1) as f64);
        assert!(
            ((r.tpot_s.mean - tpot) / tpot).abs() < 0.005,
            "{:?}",
            r.tpot_s
        );
        // Every step is exactly 10 ms, so no request's TPOT is below it.
        assert!(r.tpot_s.p50 >= step);
    }

    /// Overloaded decode with a batch limit K completes K sequences every (OSL−1) steps.
    #[test]
    fn saturated_decode_runs_at_the_batch_limit() {
        let m = tiny();
        let step = 0.010;
        let (k, osl) = (16u32, 51u32);
        let layout = Layout {
            groups: vec![
                group(Role::Prefill, measured(&m, cal(1e-4, step), 1e9), 0, 100),
                group(Role::Decode, measured(&m, cal(1e-4, step), 1e9), k, 0),
            ],
        };
        let capacity = k as f64 / ((osl - 1) as f64 * step);
        let r = simulate(
            &m,
            &layout,
            &poisson(2.0 * capacity, 100, osl, 4000),
            &LOOSE,
        )
        .unwrap();
        let tokens = capacity * osl as f64;
        assert!(
            ((r.output_tokens_per_s - tokens) / tokens).abs() < 0.02,
            "{} vs {tokens}",
            r.output_tokens_per_s
        );
        assert!(
            (r.mean_decode_batch - k as f64).abs() < 0.3,
            "{}",
            r.mean_decode_batch
        );
        // Queueing for the batch shows in TPOT of later requests, never below the step.
        assert!(r.tpot_s.p90 > step);
    }

    /// KV memory, not the batch limit, bounds the batch: only 3 sequences fit.
    #[test]
    fn kv_memory_limits_the_decode_batch() {
        let m = tiny();
        let weights = m.weight_bytes(crate::Dtype::Bf16);
        let per_seq = m.kv_bytes_for_context(151.0, crate::Dtype::Bf16);
        let decode = measured(&m, cal(1e-4, 0.01), weights + 3.5 * per_seq);
        assert_eq!(decode.max_sequences(&m, 151.0), 3);
        let layout = Layout {
            groups: vec![
                group(Role::Prefill, measured(&m, cal(1e-4, 0.01), 1e9), 0, 100),
                group(Role::Decode, decode, 1000, 0),
            ],
        };
        let r = simulate(&m, &layout, &poisson(50.0, 100, 51, 2000), &LOOSE).unwrap();
        assert!(
            r.mean_decode_batch <= 3.0 && r.mean_decode_batch > 2.8,
            "{}",
            r.mean_decode_batch
        );
        // Waiting for memory delays the first token: the KV stays on the prefill engine.
        assert!(r.ttft_s.p50 > 1.0, "{:?}", r.ttft_s);
    }

    /// KV that waited on the prefill engine for decode memory moves only once memory is
    /// free: it cannot have streamed during a prefill step long past.
    #[test]
    fn kv_waiting_for_decode_memory_moves_after_memory_frees() {
        let m = tiny();
        let weights = m.weight_bytes(crate::Dtype::Bf16);
        let one_seq = m.kv_bytes_for_context(111.0, crate::Dtype::Bf16);
        let host = |memory: f64| SystemSpec::measured_host("host", memory, 2e6);
        let perf = |memory: f64| {
            PerfModel::new(
                &m,
                &host(memory),
                Dtypes::bf16(),
                1,
                StepCost::Measured(cal(1e-3, 0.01)),
            )
            .unwrap()
        };
        let (prefill, decode) = (perf(1e9), perf(weights + 1.5 * one_seq));
        let transfer = prefill.kv_transfer_s(&decode, &m, 100.0);
        assert!(transfer > 0.01, "{transfer}");
        let layout = Layout {
            groups: vec![
                group(Role::Prefill, prefill, 0, 100),
                group(Role::Decode, decode, 8, 0),
            ],
        };
        let two = |_| Request {
            arrival_s: 0.0,
            isl: 100,
            osl: 11,
        };
        let reqs: Vec<Request> = (0..2).map(two).collect();
        let r = simulate(&m, &layout, &reqs, &LOOSE).unwrap();
        // The first KV arrives after one transfer and decodes 10 steps of 10 ms; only then
        // does the second one's transfer begin.
        let first_done = transfer + 10.0 * 0.01;
        assert!((r.ttft_s.p50 - transfer).abs() < 1e-9, "{:?}", r.ttft_s);
        assert!(
            (r.ttft_s.p99 - (first_done + transfer)).abs() < 1e-9,
            "{:?}",
            r.ttft_s
        );
    }

    /// A lone request on a colocated engine: its prompt goes in chunks of the step budget,
    /// then each step emits one token.
    #[test]
    fn colocated_lone_request_takes_its_chunks_then_decode_steps() {
        let m = tiny();
        let c = Calibration {
            prefill_base_s: 1e-3,
            prefill_per_token_s: 1e-5,
            prefill_per_square_token_s: 1e-9,
            decode_base_s: 4e-3,
            decode_per_seq_s: 1e-4,
            decode_per_context_token_s: 1e-6,
        };
        let perf = measured(&m, c, 1e9);
        let layout = Layout {
            groups: vec![group(Role::Colocated, perf, 8, 256)],
        };
        let reqs = vec![Request {
            arrival_s: 0.0,
            isl: 1000,
            osl: 11,
        }];
        let r = simulate(&m, &layout, &reqs, &LOOSE).unwrap();
        // Chunks of 256, 256, 256, 232 tokens after 0, 256, 512, 768 cached.
        let mut ttft = 0.0;
        for (new, prefix) in [(256.0, 0.0), (256.0, 256.0), (256.0, 512.0), (232.0, 768.0)] {
            ttft += 1e-3 + 1e-5 * new + 1e-9 * new * (2.0 * prefix + new);
        }
        assert!(
            (r.ttft_s.mean - ttft).abs() < 1e-12,
            "{} vs {ttft}",
            r.ttft_s.mean
        );
        // 10 decode steps at contexts 1001..=1010.
        let decode: f64 = (1001..=1010)
            .map(|ctx| 4e-3 + 1e-4 + 1e-6 * ctx as f64)
            .sum();
        assert!((r.tpot_s.mean - decode / 10.0).abs() < 1e-12);
    }

    /// Under load, a colocated engine's decode steps carry prompt chunks part of the time: its
    /// TPOT lies between a pure decode step and a full mixed step, and the share of mixed
    /// steps matches the prompt tokens that must go through, φ = λ·ISL·T/chunk.
    #[test]
    fn colocated_prompt_chunks_stretch_tpot_by_their_share_of_steps() {
        let m = tiny();
        let c = Calibration {
            prefill_base_s: 0.010,
            prefill_per_token_s: 1e-5,
            prefill_per_square_token_s: 0.0,
            decode_base_s: 0.010,
            decode_per_seq_s: 0.0,
            decode_per_context_token_s: 0.0,
        };
        let budget = 264u32;
        let layout = Layout {
            groups: vec![group(Role::Colocated, measured(&m, c, 1e9), 64, budget)],
        };
        let (rate, isl, osl) = (20.0, 200u32, 41u32);
        let r = simulate(&m, &layout, &poisson(rate, isl, osl, 20_000), &LOOSE).unwrap();
        // A decode-only step is 10 ms; one with a full 200-token prompt 12 ms.
        let (decode, mixed) = (0.010, 0.010 + 1e-5 * 200.0);
        assert!(
            r.tpot_s.mean > decode && r.tpot_s.mean < mixed,
            "{:?}",
            r.tpot_s
        );
        // Every prompt is one chunk (budget − batch ≥ 200 while the batch stays under 64):
        // mixed steps per second = λ, so the mean step is T_d + λ·T·(T_m − T_d) per token.
        let mean_step = decode / (1.0 - rate * (mixed - decode));
        let share = rate * mean_step;
        let want = decode + share * (mixed - decode);
        assert!(
            ((r.tpot_s.mean - want) / want).abs() < 0.02,
            "TPOT {} vs {want}",
            r.tpot_s.mean
        );
    }

    #[test]
    fn same_inputs_same_report_and_bad_layouts_are_refused() {
        let m = tiny();
        let layout = Layout {
            groups: vec![
                group(Role::Prefill, measured(&m, cal(1e-3, 1e-2), 1e9), 0, 400),
                group(Role::Decode, measured(&m, cal(1e-3, 1e-2), 1e9), 32, 0),
            ],
        };
        let w = Workload::Poisson {
            rate_per_s: 30.0,
            isl: LengthDist::Uniform { min: 50, max: 400 },
            osl: LengthDist::Uniform { min: 1, max: 60 },
            requests: 3000,
            seed: 9,
        };
        let reqs = w.requests().unwrap();
        let slo = Slo {
            ttft_s: 0.05,
            tpot_s: 0.02,
        };
        let a = simulate(&m, &layout, &reqs, &slo).unwrap();
        assert_eq!(a, simulate(&m, &layout, &reqs, &slo).unwrap());
        assert!(a.slo_attainment > 0.0 && a.slo_attainment <= 1.0);
        let only_prefill = Layout {
            groups: vec![layout.groups[0].clone()],
        };
        assert!(simulate(&m, &only_prefill, &reqs, &slo).is_err());
        assert!(simulate(&m, &layout, &[], &slo).is_err());
    }
}
