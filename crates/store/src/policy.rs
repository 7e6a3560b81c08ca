//! Eviction policies for the expert slot cache, and a trace simulator to compare them.
//!
//! Self-contained on purpose: nothing here touches slot buffers or files, so `cache` can adopt it by keeping one
//! [`PolicyState`] per MoE layer and calling [`PolicyState::on_hit`], [`PolicyState::on_fill`] and
//! [`PolicyState::victim`] where it now stamps `last_used` and scans for the least recently used slot.
//!
//! The pinning rule is the cache's: a call (`ensure(layer, experts)`, one token's top-k in one layer) first stamps
//! its hits with the current clock, then each miss takes a victim among the slots *not* stamped by this call, and
//! stamps the slot it fills. So a token's misses never evict an expert the same token needs, and `slots ≥ top_k`
//! always leaves a victim.
//!
//! [`simulate`] replays a routing trace (the token-major `experts` array that `moestream run --trace-out` writes)
//! through that same rule, one call per token per MoE layer, and counts hits and misses. It models decode: the
//! engine's multi-token prefill instead asks for one expert at a time, so a trace that includes a prompt is
//! replayed as if the prompt were decoded token by token.

const EMPTY: u32 = u32::MAX;

/// Which slot a miss evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Least recently used slot (the cache's behaviour today).
    #[default]
    Lru,
    /// Least frequently used *expert* among the resident ones, where an expert's use count decays by half every
    /// `half_life` calls to the layer (counted per layer, so in decode `half_life` is in tokens). Counters are per
    /// expert, not per slot: an expert keeps its history while it is not resident. Ties go to the least recently
    /// used slot. `half_life` 0 is treated as 1.
    LfuAging { half_life: u32 },
}

impl EvictionPolicy {
    /// The cache's default: LFU with aging, half-life 16 calls (tokens in decode). LFU beat LRU on every
    /// single-context routing trace measured (BENCHMARKS.md, "Eviction policy"), where half-lives 16 to 256 were
    /// within 2 points of each other. A new context (another prompt on a warm cache) is where they part: there
    /// the former default 64 kept the old context's experts long enough to cost 20–44% more misses than 16 (tok/s
    /// +6% at ½ memory, +15% at ¼), for 3–5% more misses when a run replays exactly what the cache saw
    /// (BENCHMARKS.md, tenth pass).
    pub fn default_for_cache() -> Self {
        EvictionPolicy::LfuAging { half_life: 16 }
    }

    /// Parse `lru` or `lfu:HALF_LIFE` (e.g. `lfu:64`).
    pub fn parse(s: &str) -> Option<EvictionPolicy> {
        if s == "lru" {
            return Some(EvictionPolicy::Lru);
        }
        let h = s.strip_prefix("lfu:")?.parse().ok()?;
        Some(EvictionPolicy::LfuAging { half_life: h })
    }

    pub fn name(&self) -> String {
        match self {
            EvictionPolicy::Lru => "lru".into(),
            EvictionPolicy::LfuAging { half_life } => format!("lfu:{half_life}"),
        }
    }
}

/// Eviction bookkeeping for one MoE layer: `slots` recency stamps and slot owners, and (for LFU) one decayed
/// counter per expert. Everything is allocated in [`PolicyState::new`]; no method allocates.
///
/// `clock` is any counter that grows by at least one per call and stays constant within a call (the cache's
/// global clock will do). A slot is pinned for the current call iff its stamp equals the current clock; the cache
/// passes that test to [`PolicyState::victim`] (or uses [`PolicyState::is_pinned`]).
#[derive(Debug, Clone)]
pub struct PolicyState {
    policy: EvictionPolicy,
    /// Per slot: the clock of its last hit or fill; 0 = never used.
    last_used: Vec<u64>,
    /// Per slot: the expert it holds, or `EMPTY`.
    slot_expert: Vec<u32>,
    /// Per expert (LFU only, else empty): decayed use count as of `freq_at`.
    freq: Vec<f32>,
    /// Per expert (LFU only): the layer-local call number at which `freq` was last brought up to date.
    freq_at: Vec<u64>,
    /// Layer-local call number: advances once per distinct `clock` value seen.
    calls: u64,
    last_clock: u64,
    /// `1 / half_life`.
    decay_rate: f32,
}

impl PolicyState {
    pub fn new(policy: EvictionPolicy, slots: usize, num_experts: usize) -> Self {
        let (freq, freq_at, decay_rate) = match policy {
            EvictionPolicy::Lru => (Vec::new(), Vec::new(), 0.0),
            EvictionPolicy::LfuAging { half_life } => {
                (vec![0.0; num_experts], vec![0; num_experts], 1.0 / half_life.max(1) as f32)
            }
        };
        PolicyState {
            policy,
            last_used: vec![0; slots],
            slot_expert: vec![EMPTY; slots],
            freq,
            freq_at,
            calls: 0,
            last_clock: 0,
            decay_rate,
        }
    }

    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }

    pub fn slots(&self) -> usize {
        self.last_used.len()
    }

    /// The expert in `slot`, if any.
    pub fn slot_expert(&self, slot: usize) -> Option<u32> {
        let x = self.slot_expert[slot];
        (x != EMPTY).then_some(x)
    }

    /// Clock of the last hit or fill of `slot` (0: never).
    pub fn last_used(&self, slot: usize) -> u64 {
        self.last_used[slot]
    }

    /// Whether `slot` was hit or filled by the call running at `clock`.
    pub fn is_pinned(&self, slot: usize, clock: u64) -> bool {
        self.last_used[slot] == clock
    }

    /// `expert`'s decayed use count at the current call (LFU; 0 under LRU).
    pub fn frequency(&self, expert: u32) -> f32 {
        match self.policy {
            EvictionPolicy::Lru => 0.0,
            EvictionPolicy::LfuAging { .. } => self.decayed(expert as usize, self.calls),
        }
    }

    fn decayed(&self, x: usize, now: u64) -> f32 {
        let dt = now - self.freq_at[x];
        if dt == 0 { self.freq[x] } else { self.freq[x] * (-(dt as f32) * self.decay_rate).exp2() }
    }

    fn tick(&mut self, clock: u64) {
        if clock != self.last_clock {
            self.last_clock = clock;
            self.calls += 1;
        }
    }

    fn bump(&mut self, x: u32) {
        if let EvictionPolicy::LfuAging { .. } = self.policy {
            let x = x as usize;
            let now = self.calls;
            self.freq[x] = self.decayed(x, now) + 1.0;
            self.freq_at[x] = now;
        }
    }

    /// `slot` (which holds an expert) was hit by the call at `clock`: pins it for that call.
    pub fn on_hit(&mut self, slot: usize, clock: u64) {
        self.tick(clock);
        self.last_used[slot] = clock;
        let x = self.slot_expert[slot];
        if x != EMPTY {
            self.bump(x);
        }
    }

    /// `expert` was read into `slot` by the call at `clock` (replacing whatever it held): pins it for that call.
    pub fn on_fill(&mut self, slot: usize, expert: u32, clock: u64) {
        self.tick(clock);
        self.last_used[slot] = clock;
        self.slot_expert[slot] = expert;
        self.bump(expert);
    }

    /// `expert` is being read into `slot` ahead of need (a prefetch) by the call at `clock`: pinned for that call,
    /// but no use is counted, so a wrong guess does not look popular. A later hit counts the use.
    pub fn on_prefetch(&mut self, slot: usize, expert: u32, clock: u64) {
        self.last_used[slot] = clock;
        self.slot_expert[slot] = expert;
    }

    /// `slot` lost its expert without a replacement (a failed read): it becomes an empty, unpinned slot. The
    /// expert's LFU history is kept.
    pub fn on_clear(&mut self, slot: usize) {
        self.slot_expert[slot] = EMPTY;
        self.last_used[slot] = 0;
    }

    /// The slot a miss of the call at `clock` should take: never one for which `pinned` is true; an empty slot
    /// first (the lowest-numbered); else by policy, ties to the least recently used, then the lowest-numbered
    /// slot. `None` if every slot is pinned.
    pub fn victim(&self, clock: u64, pinned: impl Fn(usize) -> bool) -> Option<usize> {
        // `calls` advances on the first hit or fill of a call; a call whose first event is a miss has not ticked
        // yet, and decays as of one call later.
        let now = self.calls + u64::from(clock != self.last_clock);
        let mut best: Option<(usize, f32, u64)> = None;
        for s in 0..self.last_used.len() {
            if pinned(s) {
                continue;
            }
            let x = self.slot_expert[s];
            if x == EMPTY {
                return Some(s);
            }
            let f = match self.policy {
                EvictionPolicy::Lru => 0.0,
                EvictionPolicy::LfuAging { .. } => self.decayed(x as usize, now),
            };
            let t = self.last_used[s];
            if best.is_none_or(|(_, bf, bt)| f < bf || (f == bf && t < bt)) {
                best = Some((s, f, t));
            }
        }
        best.map(|(s, _, _)| s)
    }
}

/// Hits and misses of a simulated run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimResult {
    pub hits: u64,
    pub misses: u64,
}

impl SimResult {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 { 1.0 } else { self.hits as f64 / n as f64 }
    }
}

/// One MoE layer of the simulated cache: the expert→slot table beside the policy state.
#[derive(Debug, Clone)]
pub struct SimLayer {
    pub state: PolicyState,
    expert_slot: Vec<u32>,
}

impl SimLayer {
    pub fn new(policy: EvictionPolicy, slots: usize, num_experts: usize) -> Self {
        SimLayer { state: PolicyState::new(policy, slots, num_experts), expert_slot: vec![EMPTY; num_experts] }
    }

    /// What `ExpertStore::ensure` does for one call at `clock`, minus the reads: pin the hits, then give each miss
    /// a victim not pinned by this call. Writes each expert's slot to `slots_out` and returns (hits, misses).
    ///
    /// # Panics
    /// If an expert id is out of range or the call has more misses than unpinned slots.
    pub fn access(&mut self, experts: &[u32], clock: u64, slots_out: &mut [u32]) -> (u64, u64) {
        let mut misses = 0;
        for (j, &x) in experts.iter().enumerate() {
            let s = self.expert_slot[x as usize];
            slots_out[j] = s;
            if s != EMPTY {
                self.state.on_hit(s as usize, clock);
            } else {
                misses += 1;
            }
        }
        for (j, &x) in experts.iter().enumerate() {
            if slots_out[j] != EMPTY {
                continue;
            }
            let s = self.expert_slot[x as usize];
            if s != EMPTY {
                // A duplicate id in one call: the first occurrence already read it.
                slots_out[j] = s;
                continue;
            }
            let st = &self.state;
            let v = st.victim(clock, |s| st.is_pinned(s, clock)).expect("more misses in one call than unpinned slots");
            if let Some(old) = self.state.slot_expert(v) {
                self.expert_slot[old as usize] = EMPTY;
            }
            self.state.on_fill(v, x, clock);
            self.expert_slot[x as usize] = v as u32;
            slots_out[j] = v as u32;
        }
        (experts.len() as u64 - misses, misses)
    }
}

/// Replay a token-major routing trace `[token][moe_layer][top_k]` through a cache of `slots` slots per MoE layer
/// (capped at `num_experts`) under `policy`, one call per token per layer, with the cache's clock (one tick per
/// call, shared by all layers). Counts every expert of every token; nothing is warmed up first.
///
/// # Panics
/// If `trace.len()` is not a multiple of `moe_layers · top_k`, `top_k > slots`, or an id is `≥ num_experts`.
pub fn simulate(
    trace: &[u32],
    num_experts: usize,
    top_k: usize,
    moe_layers: usize,
    slots: usize,
    policy: EvictionPolicy,
) -> SimResult {
    let slots = slots.min(num_experts);
    let per_token = moe_layers * top_k;
    assert!(per_token > 0 && trace.len().is_multiple_of(per_token), "trace length is not tokens × layers × top-k");
    assert!(top_k <= slots, "top-k {top_k} above {slots} slots");
    let mut layers: Vec<SimLayer> = (0..moe_layers).map(|_| SimLayer::new(policy, slots, num_experts)).collect();
    let mut out = vec![0u32; top_k];
    let mut r = SimResult::default();
    let mut clock = 0u64;
    for tok in trace.chunks_exact(per_token) {
        for (layer, experts) in layers.iter_mut().zip(tok.chunks_exact(top_k)) {
            clock += 1;
            let (h, m) = layer.access(experts, clock, &mut out);
            r.hits += h;
            r.misses += m;
        }
    }
    r
}
