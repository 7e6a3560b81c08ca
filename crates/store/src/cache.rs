//! The expert slot cache: stacked slots in pools (one per MoE layer, or one that all MoE layers share for a byte
//! budget), an expert→slot table per layer, an eviction policy per pool, and reads of missing experts straight
//! into their slot's bytes. This module owns which expert sits in which slot; it must not decide how slots are
//! computed from (the kernels only see a layer's buffers and slot indices).
//!
//! `ensure(layer, experts)` is the only call on the token path that may touch the disk. It first pins the hits,
//! then gives each miss the policy's victim among the pool's slots that the same call has not pinned (in a shared
//! pool possibly another layer's expert), so one token's misses never evict an expert that the token needs. A
//! failed read leaves the slot marked empty and returns an error naming the file and offset; the cache stays
//! consistent.
//!
//! All ranges of all of one call's misses go to the `reader` as one batch, so k misses × 3+ ranges are in flight
//! together. An expert whose ranges lie back to back in one file (a `moestream pack` sidecar's slab) is read with
//! one request that scatters into its slot buffers, so with the sidecar a miss is one read. The batch vectors live in the store and are reserved at open for the largest possible batch, so a warm
//! `ensure` allocates nothing (checked by `tests/no_alloc.rs`).
//!
//! Guesses (`prefetch`) are read on the reader's prefetch lane into slots marked `busy`, and never hold up an
//! `ensure`: it withdraws the guessed reads not yet started (except for the experts it needs), takes no busy slot as
//! a victim, and waits for a guess only when it needs one of its experts (in `ensure_end`, after the caller has
//! computed the hits).
//!
//! With `slots == experts` and `preload`, every expert is read once at start and `ensure` never misses: that is
//! the `--expert-cache all` mode.

use std::time::Instant;

use moestream_format::{ExpertRanges, FileRange, TensorIndex};
use moestream_quant::Encoding;

use crate::policy::{EvictionPolicy, PolicyState};
use crate::reader::{ExpertReader, MAX_SEGS, NO_SEGMENT, ReadOptions, ReadRequest};
use crate::{SlotBuffer, StoreError};

const EMPTY: u32 = u32::MAX;

/// What [`ExpertStore::ensure_begin`] writes for an expert whose read is still in flight.
pub const EMPTY_SLOT: u32 = EMPTY;

/// How many slots each MoE layer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSize {
    /// Every expert resident, read at load time.
    All,
    /// A byte budget over all MoE layers, split evenly.
    Bytes(u64),
    /// Slots per layer.
    Slots(usize),
}

/// Cache statistics, cumulative since load (or the last `reset_stats`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    pub hits: u64,
    pub misses: u64,
    /// Useful expert bytes read (the sum of the ranges' lengths).
    pub bytes_read: u64,
    /// Bytes the read syscalls transferred: `bytes_read` plus the aligned-superset overhead of O_DIRECT reads.
    pub bytes_read_disk: u64,
    /// Read requests (one positioned read each, buffered or direct): one per range, or one per expert whose ranges
    /// are adjacent in one file (a pack sidecar), which is read whole and scattered.
    pub reads: u64,
    /// Of `reads`, those done with O_DIRECT.
    pub reads_direct: u64,
    /// Read batches: `ensure` calls that missed (each reads all of its misses concurrently).
    pub read_batches: u64,
    /// Per model file (indexed like `TensorIndex::files`): whether expert reads use O_DIRECT. False where direct I/O
    /// is off, or the filesystem refused it and the file fell back to buffered reads.
    pub direct_io: Vec<bool>,
    /// Per MoE layer (indexed by layer number; dense layers stay 0): (hits, misses).
    pub per_layer: Vec<(u64, u64)>,
    /// Expert read latencies (from the start of the batch until the last range of that expert is in place), log2-microsecond buckets: bucket b counts reads that took
    /// [2^b, 2^(b+1)) µs (bucket 0 also holds < 1 µs).
    pub latency_us_log2: [u64; 32],
    /// Experts read ahead of need by `prefetch` (successfully); their bytes and reads are also in `bytes_read*` and
    /// `reads`.
    pub prefetch_reads: u64,
    pub prefetch_bytes: u64,
    /// Hits on a prefetched expert, its first use since the prefetch read it (also counted in `hits`).
    pub prefetch_hits: u64,
    /// Prefetched experts evicted before any use: wrong guesses.
    pub prefetch_wasted: u64,
    /// Time `ensure` spent waiting for a prefetch still in flight, in microseconds (only when it needed one of the
    /// experts being read).
    pub prefetch_wait_us: u64,
    /// Guessed experts withdrawn before their read started, because an `ensure` came first (nothing was read).
    pub prefetch_cancelled: u64,
    /// Guesses dropped because the previous guess's reads were still in flight.
    pub prefetch_skipped: u64,
    /// Time `ensure` spent blocked on its own (demand) reads, in microseconds. With `prefetch_wait_us`, the I/O
    /// stall the caller saw: what prefetch exists to shrink.
    pub read_wait_us: u64,
}

impl StoreStats {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 { 1.0 } else { self.hits as f64 / n as f64 }
    }

    /// The I/O stall the caller saw, in microseconds: blocked on demand reads plus waiting for prefetch.
    pub fn stall_us(&self) -> u64 {
        self.read_wait_us + self.prefetch_wait_us
    }

    /// Upper edge (µs) of the bucket holding percentile `p` (0..=100) of read latencies, or 0 with no reads.
    pub fn latency_percentile_us(&self, p: f64) -> u64 {
        let total: u64 = self.latency_us_log2.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (b, &n) in self.latency_us_log2.iter().enumerate() {
            acc += n;
            if acc >= want {
                return 1u64 << (b + 1);
            }
        }
        1u64 << 32
    }
}

/// What a cache size means for a model, computed from the index alone (nothing read, nothing allocated): the
/// `moestream info` dry run, and the sizing `ExpertStore::open` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePlan {
    pub slots_per_layer: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_layers: usize,
    /// Bytes of one expert (gate, up and down, with any scales and biases): one slot, and one miss's read.
    pub slot_bytes: u64,
}

impl CachePlan {
    pub fn new(index: &TensorIndex, size: CacheSize) -> Result<Self, StoreError> {
        let c = &index.config;
        let mut slot_bytes = 0u64;
        let mut moe_layers = 0;
        for l in (0..c.num_layers).filter(|&l| c.layer_is_moe(l)) {
            moe_layers += 1;
            let mut b = 0;
            for p in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
                let t = index.get(&format!("blk.{l}.{p}.weight"))?;
                let r = t
                    .expert(0)
                    .ok_or_else(|| StoreError::Layout { tensor: t.name.clone(), msg: "no expert 0".into() })?;
                b += r.bytes();
            }
            slot_bytes = slot_bytes.max(b);
        }
        let e = c.num_experts;
        let slots = match size {
            CacheSize::All => e,
            CacheSize::Slots(n) => n,
            CacheSize::Bytes(b) => (b / moe_layers.max(1) as u64 / slot_bytes.max(1)) as usize,
        }
        .min(e);
        Ok(CachePlan { slots_per_layer: slots, num_experts: e, top_k: c.num_experts_per_tok, moe_layers, slot_bytes })
    }

    /// Whether the store would make this plan's slots one pool shared by all MoE layers (with `share`, the
    /// engine's default; `--per-layer-slots` turns it off): a byte budget below every expert, more than one MoE
    /// layer, and every MoE layer's experts stored alike (encodings, shapes and stored form of gate, up and down;
    /// a Q4_K_M file mixes Q4_K and Q6_K down projections, so its layers keep their own slots). The store also
    /// compares the slot layouts these imply; the `info` dry run has only this.
    pub fn shares_pool(&self, index: &TensorIndex, size: CacheSize, share: bool) -> bool {
        if !share
            || !matches!(size, CacheSize::Bytes(_))
            || self.slots_per_layer >= self.num_experts
            || self.moe_layers < 2
        {
            return false;
        }
        let c = &index.config;
        let form = |l: usize| -> Option<Vec<(Encoding, Vec<usize>, bool)>> {
            ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
                .iter()
                .map(|p| {
                    index.get(&format!("blk.{l}.{p}.weight")).ok().map(|t| (t.encoding, t.shape.clone(), t.data_packed))
                })
                .collect()
        };
        let forms: Vec<_> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).map(form).collect();
        forms.iter().all(Option::is_some) && forms.windows(2).all(|w| w[0] == w[1])
    }

    /// Slots in one pool: every MoE layer's share when `shared`, else one layer's.
    pub fn pool_slots(&self, shared: bool) -> usize {
        if shared { self.slots_per_layer * self.moe_layers } else { self.slots_per_layer }
    }

    /// Slot memory over all MoE layers.
    pub fn bytes(&self) -> u64 {
        self.slot_bytes * (self.slots_per_layer * self.moe_layers) as u64
    }

    /// Expected expert misses per decode token if routing were uniform and independent from token to token (the
    /// pessimistic case: trained models reuse experts): each of the k choices per layer misses with probability
    /// `1 − slots/E`.
    pub fn uniform_misses_per_token(&self) -> f64 {
        let miss = 1.0 - self.slots_per_layer as f64 / self.num_experts.max(1) as f64;
        (self.moe_layers * self.top_k) as f64 * miss
    }
}

/// What one MoE layer knows about its experts: where they are in the files, and which slot (of its pool) holds
/// each resident one.
struct LayerCache {
    /// Per expert: gate, up and down ranges (with MLX scales/biases).
    ranges: Vec<[ExpertRanges; 3]>,
    /// Per expert: the one range covering all of its ranges, where they are adjacent in one file (read as one).
    spans: Vec<Option<FileRange>>,
    expert_slot: Vec<u32>,
    /// Index into `ExpertStore::pools`.
    pool: usize,
}

/// Slot memory and the bookkeeping that decides what it holds: one per MoE layer, or one shared by all of them
/// (see [`ExpertStore::open_with_sharing`]).
struct Pool {
    gate_up: SlotBuffer,
    down: SlotBuffer,
    /// Per slot: the (layer, expert) it holds, `(EMPTY, EMPTY)` if none (also while a read into it is in flight).
    owner: Vec<(u32, u32)>,
    /// Recency and (for LFU) decayed use counts; decides victims. Its expert keys are `layer · experts + expert`
    /// in a shared pool, the expert alone in a layer's own.
    policy: PolicyState,
    /// Per slot: filled by a prefetch and not used since (for the prefetch hit/waste counts).
    prefetched: Vec<bool>,
    /// Per slot: a prefetch read into it may still be in flight; no call may take it as a victim until the
    /// prefetch batch is completed.
    busy: Vec<bool>,
    shared: bool,
    /// Experts per layer: the stride of a shared pool's policy keys.
    experts: usize,
    /// Shared pools: per layer, the slots whose policy key is that layer's (resident or being read).
    held: Vec<u32>,
}

impl Pool {
    fn key(&self, layer: usize, expert: u32) -> u32 {
        if self.shared { (layer * self.experts) as u32 + expert } else { expert }
    }

    /// Give `slot` (a victim, already unmapped) to `layer`'s `expert` for the call at `clock`, pinning it for that
    /// call; a prefetch counts no use (see `PolicyState::on_prefetch`).
    fn take(&mut self, slot: usize, layer: usize, expert: u32, clock: u64, prefetch: bool) {
        if self.shared {
            if let Some(k) = self.policy.slot_expert(slot) {
                self.held[k as usize / self.experts] -= 1;
            }
            self.held[layer] += 1;
        }
        let key = self.key(layer, expert);
        if prefetch {
            self.policy.on_prefetch(slot, key, clock);
        } else {
            self.policy.on_fill(slot, key, clock);
        }
    }

    /// `slot` lost its expert without a replacement (a failed read).
    fn clear(&mut self, slot: usize) {
        if self.shared
            && let Some(k) = self.policy.slot_expert(slot)
        {
            self.held[k as usize / self.experts] -= 1;
        }
        self.owner[slot] = (EMPTY, EMPTY);
        self.policy.on_clear(slot);
    }

    /// Whether a prefill wave of `layer` may take `slot`: any slot in a layer's own pool; in a shared pool an
    /// empty slot, one of `layer`'s own, or one of a layer that holds more than an even share (`share` slots).
    /// Decode misses take the policy's victim anywhere, so the first decode token after a long prefill takes the
    /// least recently used slots, all of the first layers the prefill passed; if the next prefill's waves could
    /// do the same, each layer would strip the next one down the stack (measured: 40% → 18% hits on a repeated
    /// 512-token prompt at ½ memory). Waves take only the surplus of layers above their share.
    fn may_take(&self, slot: usize, layer: usize, share: u32) -> bool {
        match self.key_layer(slot, layer) {
            None => true,
            Some(l) => l == layer || self.held[l] > share,
        }
    }

    /// The layer whose expert (by policy key) `slot` holds or is being filled with, if any.
    fn key_layer(&self, slot: usize, layer_of_own: usize) -> Option<usize> {
        let k = self.policy.slot_expert(slot)?;
        Some(if self.shared { k as usize / self.experts } else { layer_of_own })
    }
}

/// Empty `slot` of `pool` before it takes another expert: its old expert (of whichever layer) is no longer
/// resident, and a prefetched one that was never used counts as a wasted guess.
fn unmap(pool: &mut Pool, layers: &mut [Option<LayerCache>], slot: usize, stats: &mut StoreStats) {
    let (l, x) = pool.owner[slot];
    if l != EMPTY {
        if let Some(c) = layers.get_mut(l as usize).and_then(Option::as_mut) {
            c.expert_slot[x as usize] = EMPTY;
        }
        pool.owner[slot] = (EMPTY, EMPTY);
    }
    if std::mem::take(&mut pool.prefetched[slot]) {
        stats.prefetch_wasted += 1;
    }
}

/// The expert slot buffers of one MoE layer, as the kernels see them.
pub struct ExpertLayer<'a> {
    pub gate_up: &'a SlotBuffer,
    pub down: &'a SlotBuffer,
}

/// One missed expert of the current batch.
#[derive(Clone, Copy)]
struct Miss {
    expert: u32,
    slot: u32,
    /// Index into the caller's `experts`/`slots` (for `ensure`).
    at: u32,
    done: Instant,
    failed: bool,
}

pub struct ExpertStore {
    layers: Vec<Option<LayerCache>>,
    pools: Vec<Pool>,
    reader: ExpertReader,
    /// Reused per batch, reserved at open for the largest batch: no allocation on the token path.
    batch: Vec<ReadRequest>,
    batch_misses: Vec<Miss>,
    /// The prefetch batch: submitted by `prefetch`, in flight on the reader until `finish_prefetch`. Kept apart from
    /// `batch` because the reader writes into it while the caller computes.
    pf_batch: Vec<ReadRequest>,
    pf_misses: Vec<Miss>,
    /// The layer and start time of the prefetch in flight.
    pf_in_flight: Option<(usize, Instant)>,
    /// The first read error of the last completed prefetch (reported only if a call was waiting for its expert).
    pf_error: Option<StoreError>,
    /// The current call's experts that a prefetch still in flight is reading: (index into the call's `experts`,
    /// expert). `ensure_end` waits for the prefetch and hands out their slots.
    pf_wanted: Vec<(u32, u32)>,
    /// The layer of the call `pf_wanted` belongs to.
    wanted_layer: usize,
    /// The layer and start time of the demand batch `ensure_begin` left in flight (`batch`, `batch_misses`).
    demand_in_flight: Option<(usize, Instant)>,
    slots_per_layer: usize,
    num_experts: usize,
    /// Calls for more experts than this are prefill waves (see `Pool::may_take`).
    top_k: usize,
    bytes: u64,
    clock: u64,
    /// Reads go through O_DIRECT (where the filesystem allows): block-aligned pieces are then read in place.
    direct_io: bool,
    stats: StoreStats,
}

impl ExpertStore {
    /// Every expert resident (the issue-3 mode).
    pub fn load_all(index: &TensorIndex) -> Result<Self, StoreError> {
        Self::open(index, CacheSize::All)
    }

    /// Slot buffers sized by `size`, filled on demand (or all at once for `CacheSize::All`), read with the
    /// default `ReadOptions` (O_DIRECT where allowed, 8 I/O threads).
    pub fn open(index: &TensorIndex, size: CacheSize) -> Result<Self, StoreError> {
        Self::open_with(index, size, &ReadOptions::default())
    }

    /// As `open`, reading experts as `read` says.
    pub fn open_with(index: &TensorIndex, size: CacheSize, read: &ReadOptions) -> Result<Self, StoreError> {
        Self::open_with_policy(index, size, read, EvictionPolicy::default_for_cache())
    }

    /// As `open_with`, choosing victims by `eviction`; a byte budget is one pool shared by all MoE layers where
    /// their slots have one layout.
    pub fn open_with_policy(
        index: &TensorIndex,
        size: CacheSize,
        read: &ReadOptions,
        eviction: EvictionPolicy,
    ) -> Result<Self, StoreError> {
        Self::open_with_sharing(index, size, read, eviction, true)
    }

    /// As `open_with_policy`. With `share` and a [`CacheSize::Bytes`] budget, and when every MoE layer's experts
    /// have the same slot layout (encodings, shapes, stored form), the budget's slots form one pool that all MoE
    /// layers draw from, and a miss evicts the policy's victim among *all* layers' experts: layers differ widely in
    /// how many distinct experts they use (random weights: 30 to 107 of 128 over a 39-token trace), and an even
    /// split leaves the busy ones thrashing while quiet ones hold experts nobody asks for. `slots_per_layer` is
    /// then the even split (the most one call may ask for, and the prefill wave length), not a per-layer limit.
    /// Otherwise each MoE layer has its own `slots_per_layer` slots.
    ///
    /// Slot memory is one stacked buffer per projection either way (per layer, or for the pool), so the kernels'
    /// gathered view of a layer's experts is unchanged: slot indices just range over the pool.
    pub fn open_with_sharing(
        index: &TensorIndex,
        size: CacheSize,
        read: &ReadOptions,
        eviction: EvictionPolicy,
        share: bool,
    ) -> Result<Self, StoreError> {
        let c = &index.config;
        let top_k = c.num_experts_per_tok;
        let moe_layers: Vec<usize> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).collect();
        // Bytes one slot takes in every buffer of one layer (the largest layer, if they differ).
        let mut slot_bytes = 0u64;
        let mut max_range = 0u64;
        // Ranges per expert (gate, up, down, each with MLX scales and biases): the batch size per miss.
        let mut ranges_per_expert = 0usize;
        let mut per_layer_ranges = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            if !c.layer_is_moe(l) {
                per_layer_ranges.push(None);
                continue;
            }
            let get = |p: &str| index.get(&format!("blk.{l}.{p}.weight"));
            let (g, u, d) = (get("ffn_gate_exps")?, get("ffn_up_exps")?, get("ffn_down_exps")?);
            let mut ranges = Vec::with_capacity(g.num_experts());
            for e in 0..g.num_experts() {
                let r = |t: &moestream_format::TensorEntry| {
                    t.expert(e)
                        .ok_or_else(|| StoreError::Layout { tensor: t.name.clone(), msg: format!("no expert {e}") })
                };
                ranges.push([r(g)?, r(u)?, r(d)?]);
            }
            let spans: Vec<Option<FileRange>> = ranges.iter().map(coalesced_span).collect();
            for (x, sp) in ranges.iter().zip(&spans) {
                max_range = max_range.max(x.iter().flat_map(ExpertRanges::iter).map(|r| r.len).max().unwrap_or(0));
                max_range = max_range.max(sp.map_or(0, |r| r.len));
                ranges_per_expert = ranges_per_expert.max(x.iter().map(|r| r.iter().count()).sum());
            }
            let b = ranges.first().map(|x| x.iter().map(ExpertRanges::bytes).sum::<u64>()).unwrap_or(0);
            slot_bytes = slot_bytes.max(b);
            per_layer_ranges.push(Some((g, u, d, ranges, spans)));
        }
        let e = c.num_experts;
        // One rule for how a budget becomes slots, and for whether they are shared, with the `info` dry run.
        let plan = CachePlan::new(index, size)?;
        let slots = plan.slots_per_layer;
        if slots < top_k {
            let need = top_k as u64 * slot_bytes * moe_layers.len() as u64;
            return Err(StoreError::Budget(format!(
                "the expert cache gives {slots} slots per layer, below the minimum of top-k = {top_k}; that needs \
                 {:.2} GiB ({top_k} × {:.2} MiB × {} MoE layers)",
                need as f64 / (1u64 << 30) as f64,
                slot_bytes as f64 / (1u64 << 20) as f64,
                moe_layers.len()
            )));
        }
        let (i, h) = (c.moe_intermediate_size, c.hidden_size);
        // Shared only where one slot layout fits every layer (a Q4_K_M file mixes Q4_K and Q6_K down projections).
        let layout = |g, u, d| -> Result<_, StoreError> {
            let (gu, dn) = (SlotBuffer::new(&[g, u], h, 0, read.pack)?, SlotBuffer::new(&[d], i, 0, read.pack)?);
            Ok((gu.layout(), dn.layout()))
        };
        let mut layouts = Vec::with_capacity(moe_layers.len());
        for (g, u, d, _, _) in per_layer_ranges.iter().flatten() {
            layouts.push(layout(g, u, d)?);
        }
        let shared = plan.shares_pool(index, size, share) && layouts.windows(2).all(|w| w[0] == w[1]);
        let pool_slots = plan.pool_slots(shared);
        let new_pool = |g, u, d, n_keys: usize, policy: EvictionPolicy| -> Result<Pool, StoreError> {
            Ok(Pool {
                gate_up: SlotBuffer::new(&[g, u], h, pool_slots, read.pack)?,
                down: SlotBuffer::new(&[d], i, pool_slots, read.pack)?,
                owner: vec![(EMPTY, EMPTY); pool_slots],
                policy: PolicyState::new(policy, pool_slots, n_keys),
                prefetched: vec![false; pool_slots],
                busy: vec![false; pool_slots],
                shared,
                experts: e,
                held: vec![0; if shared { c.num_layers } else { 0 }],
            })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        let mut pools = Vec::with_capacity(if shared { 1 } else { moe_layers.len() });
        for lr in per_layer_ranges {
            let Some((g, u, d, ranges, spans)) = lr else {
                layers.push(None);
                continue;
            };
            if pools.is_empty() || !shared {
                // One layer's LFU half-life is in its own calls (one per decode token); a shared pool's policy
                // sees every MoE layer's calls, so the same half-life in tokens is that many times longer.
                let policy = match eviction {
                    EvictionPolicy::LfuAging { half_life } if shared => {
                        EvictionPolicy::LfuAging { half_life: half_life.max(1).saturating_mul(moe_layers.len() as u32) }
                    }
                    p => p,
                };
                pools.push(new_pool(g, u, d, if shared { c.num_layers * e } else { e }, policy)?);
            }
            layers.push(Some(LayerCache { ranges, spans, expert_slot: vec![EMPTY; e], pool: pools.len() - 1 }));
        }
        let bytes = pools
            .iter()
            .flat_map(|p| [&p.gate_up, &p.down])
            .map(|b| (b.data.len() + b.scales.len() + b.biases.len()) as u64)
            .sum();
        let converts = pools.iter().any(|p| p.gate_up.converts() || p.down.converts());
        let reader = ExpertReader::open(&index.files, read, max_range, converts)?;
        // One call asks for at most `slots` experts (checked in `ensure_begin`); a prefetch takes as many.
        let mut store = ExpertStore {
            layers,
            pools,
            reader,
            batch: Vec::with_capacity(slots * ranges_per_expert),
            batch_misses: Vec::with_capacity(slots),
            pf_batch: Vec::with_capacity(slots * ranges_per_expert),
            pf_misses: Vec::with_capacity(slots),
            pf_in_flight: None,
            pf_error: None,
            pf_wanted: Vec::with_capacity(slots),
            wanted_layer: 0,
            demand_in_flight: None,
            slots_per_layer: slots,
            num_experts: e,
            top_k,
            bytes,
            clock: 0,
            direct_io: read.direct_io,
            stats: StoreStats::default(),
        };
        store.reset_stats();
        if slots == e {
            // Everything fits: read each expert into the slot of its own number, once, one layer per batch.
            for l in 0..store.layers.len() {
                if store.layers[l].is_some() {
                    store.batch_misses.clear();
                    let now = Instant::now();
                    let pi = store.layers[l].as_ref().map_or(0, |c| c.pool);
                    for x in 0..e {
                        store.pools[pi].take(x, l, x as u32, 0, false);
                    }
                    store.batch_misses.extend((0..e as u32).map(|x| Miss {
                        expert: x,
                        slot: x,
                        at: x,
                        done: now,
                        failed: false,
                    }));
                    let cache = store.layers[l].as_ref().expect("checked above");
                    plan_batch(
                        &mut store.pools[pi],
                        cache,
                        &store.batch_misses,
                        &mut store.batch,
                        now,
                        store.direct_io,
                    );
                    // SAFETY: `batch` and the slots stay untouched until `finish_demand` just below.
                    unsafe { store.reader.submit(&mut store.batch) };
                    store.demand_in_flight = Some((l, now));
                    store.finish_demand()?;
                }
            }
            store.reset_stats();
        }
        Ok(store)
    }

    /// The even split of the budget over MoE layers: with a shared pool, the most one call may ask for (and the
    /// prefill wave length); otherwise each layer's own slot count.
    pub fn slots_per_layer(&self) -> usize {
        self.slots_per_layer
    }

    /// Whether all MoE layers draw from one slot pool (see [`ExpertStore::open_with_sharing`]).
    pub fn shared(&self) -> bool {
        self.pools.first().is_some_and(|p| p.shared)
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Bytes of slot memory (all layers).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats = StoreStats {
            per_layer: vec![(0, 0); self.layers.len()],
            direct_io: self.reader.direct_active().collect(),
            ..StoreStats::default()
        };
    }

    pub fn layer(&self, l: usize) -> Option<ExpertLayer<'_>> {
        self.layers.get(l).and_then(Option::as_ref).map(|c| {
            let p = &self.pools[c.pool];
            ExpertLayer { gate_up: &p.gate_up, down: &p.down }
        })
    }

    /// Make `experts` (distinct ids) of `layer` resident and write their slots to `slots`. At most
    /// `slots_per_layer` experts per call. [`ExpertStore::ensure_begin`] then [`ExpertStore::ensure_end`].
    pub fn ensure(&mut self, layer: usize, experts: &[u32], slots: &mut [u32]) -> Result<(), StoreError> {
        self.ensure_begin(layer, experts, slots)?;
        self.ensure_end(slots)
    }

    /// The first half of [`ExpertStore::ensure`]: writes the slots of the experts already resident (hits) to
    /// `slots` and [`EMPTY_SLOT`] for the others (misses), starts reading the misses into victim slots, and
    /// returns the number of misses without waiting. The hits' slots can be computed from while the reads run
    /// (victims are never hits of this call). [`ExpertStore::ensure_end`] with the same `slots` waits and fills
    /// in the misses; any other call on the store first completes the reads (a failed one is then read again by
    /// the next `ensure` that needs it, which reports the error).
    pub fn ensure_begin(&mut self, layer: usize, experts: &[u32], slots: &mut [u32]) -> Result<usize, StoreError> {
        // An earlier batch never ended: complete it (its error, if any, resurfaces when its expert is needed).
        let _ = self.finish_demand();
        if experts.len() > self.slots_per_layer {
            return Err(StoreError::Budget(format!(
                "{} experts requested at once in layer {layer}, but the layer has {} slots",
                experts.len(),
                self.slots_per_layer
            )));
        }
        if slots.len() < experts.len() {
            return Err(StoreError::Budget(format!(
                "{} experts requested with room for {} slots",
                experts.len(),
                slots.len()
            )));
        }
        self.settle_prefetch(layer, experts);
        self.clock += 1;
        let clock = self.clock;
        let e = self.num_experts;
        self.batch_misses.clear();
        let Some(cache) = self.layers.get_mut(layer).and_then(Option::as_mut) else {
            return Err(StoreError::Layout { tensor: format!("blk.{layer}"), msg: "not a MoE layer".into() });
        };
        let pi = cache.pool;
        let pool = &mut self.pools[pi];
        // A guess of this layer still in flight: the experts it is reading are neither hits nor misses yet.
        let reading = match self.pf_in_flight {
            Some((pl, _)) if pl == layer => &self.pf_misses[..],
            _ => &[],
        };
        self.pf_wanted.clear();
        self.wanted_layer = layer;
        // Pass 1: hits, pinned for this call by stamping them with the current clock.
        let mut misses = 0;
        for (j, &x) in experts.iter().enumerate() {
            if x as usize >= e {
                return Err(StoreError::Layout { tensor: format!("blk.{layer}"), msg: format!("no expert {x}") });
            }
            let s = cache.expert_slot[x as usize];
            if s != EMPTY {
                pool.policy.on_hit(s as usize, clock);
                if std::mem::take(&mut pool.prefetched[s as usize]) {
                    self.stats.prefetch_hits += 1;
                }
                slots[j] = s;
            } else if reading.iter().any(|m| m.expert == x && !m.failed) {
                // Counted as a hit (the guess was right); its slot is `busy`, so no miss below takes it.
                slots[j] = EMPTY;
                self.pf_wanted.push((j as u32, x));
            } else {
                slots[j] = EMPTY;
                misses += 1;
            }
        }
        let wanted = self.pf_wanted.len();
        let hits = experts.len() as u64 - misses;
        self.stats.hits += hits;
        self.stats.per_layer[layer].0 += hits;
        if misses == 0 {
            return Ok(wanted);
        }
        self.stats.misses += misses;
        self.stats.per_layer[layer].1 += misses;
        // Pass 2: each miss takes the policy's victim among slots this call has not pinned (empty slots first); in
        // a shared pool that may be another layer's expert (nothing computes from another layer's slots now).
        let now = Instant::now();
        let (wave, share) = (experts.len() > self.top_k, self.slots_per_layer as u32);
        for j in 0..experts.len() {
            if slots[j] != EMPTY || self.pf_wanted.iter().any(|&(at, _)| at as usize == j) {
                continue;
            }
            let mut victim = self.victim(pi, layer, clock, wave, share);
            if victim.is_none() && self.pf_in_flight.is_some() {
                // Every other slot is being read into by a guess (a cache of few slots): let the guess land, and
                // pin the experts this call wanted from it, which are now mapped and no longer busy.
                self.wait_prefetch();
                let (cache, pool) = (self.layers[layer].as_ref().expect("checked above"), &mut self.pools[pi]);
                for &(_, x) in &self.pf_wanted {
                    let s = cache.expert_slot[x as usize];
                    if s != EMPTY {
                        pool.policy.on_hit(s as usize, clock);
                    }
                }
                victim = self.victim(pi, layer, clock, wave, share);
            }
            let victim = victim.ok_or_else(|| StoreError::Budget(format!("layer {layer}: no free slot")))?;
            let pool = &mut self.pools[pi];
            unmap(pool, &mut self.layers, victim, &mut self.stats);
            // Pins the slot for the rest of this call, so the next miss cannot pick it.
            pool.take(victim, layer, experts[j], clock, false);
            self.batch_misses.push(Miss {
                expert: experts[j],
                slot: victim as u32,
                at: j as u32,
                done: now,
                failed: false,
            });
        }
        // Pass 3: start reading every miss as one batch.
        let cache = self.layers[layer].as_ref().expect("checked above");
        plan_batch(&mut self.pools[pi], cache, &self.batch_misses, &mut self.batch, now, self.direct_io);
        // SAFETY: `batch` and the victim slots (unmapped above, so no `layer` view of a resident expert covers them)
        // are left alone until `finish_demand`, which `ensure_end`, `ensure_begin`, `prefetch` and drop call first.
        unsafe { self.reader.submit(&mut self.batch) };
        self.demand_in_flight = Some((layer, now));
        Ok(misses as usize + wanted)
    }

    /// The policy's victim in pool `pi` for a miss of `layer` in the call at `clock`: not pinned by this call, not
    /// being read into by a guess, and (prefill waves) allowed by `Pool::may_take`.
    fn victim(&self, pi: usize, layer: usize, clock: u64, wave: bool, share: u32) -> Option<usize> {
        let pool = &self.pools[pi];
        pool.policy.victim(clock, |s| {
            pool.policy.is_pinned(s, clock) || pool.busy[s] || (wave && !pool.may_take(s, layer, share))
        })
    }

    /// Before an `ensure` of `layer`'s `experts`: withdraw the guessed reads no I/O thread has started, except those
    /// of experts this call needs (the others would only delay its own reads), and if the guess is then done, map
    /// what arrived. A guess still in flight lands in the background: its slots stay `busy` (out of victim choice),
    /// and the experts this call needs from it are waited for in `ensure_end` (`pf_wanted`).
    fn settle_prefetch(&mut self, layer: usize, experts: &[u32]) {
        let Some((pl, _)) = self.pf_in_flight else { return };
        let misses = &mut self.pf_misses;
        // A withdrawn guess is marked failed now, not when the guess lands: while the rest of it is still on the
        // disk, `ensure_begin` must see that this expert is not coming and read it itself.
        let mut keep = |tag: u32| {
            let Some(m) = misses.get_mut(tag as usize) else { return false };
            let kept = pl == layer && experts.contains(&m.expert);
            m.failed |= !kept;
            kept
        };
        if self.reader.cancel_prefetch(&mut keep) {
            self.wait_prefetch();
        }
    }

    /// Wait for the prefetch in flight, if any, and map the experts that arrived.
    fn wait_prefetch(&mut self) {
        let Some((layer, t0)) = self.pf_in_flight.take() else { return };
        let w = Instant::now();
        self.reader.wait_prefetch();
        self.stats.prefetch_wait_us += w.elapsed().as_micros() as u64;
        let cache = self.layers[layer].as_mut().expect("prefetch targets a MoE layer");
        let pool = &mut self.pools[cache.pool];
        let (misses, batch) = (&self.pf_misses, &self.pf_batch);
        let cancelled = (0..misses.len() as u32).filter(|&i| batch.iter().any(|r| r.tag == i && r.cancelled)).count();
        self.stats.prefetch_cancelled += cancelled as u64;
        // A failed or withdrawn guess is not an error: its slot stays empty, and a demand read will report a real
        // failure (or `ensure_end` this one, if its call was waiting for the expert).
        let (misses, batch) = (&mut self.pf_misses, &mut self.pf_batch);
        self.pf_error = complete_batch(pool, cache, layer, misses, batch, &mut self.stats, t0, false).err();
        for m in &self.pf_misses {
            pool.busy[m.slot as usize] = false;
            if !m.failed {
                pool.prefetched[m.slot as usize] = true;
                self.stats.prefetch_reads += 1;
            }
        }
        let misses = &self.pf_misses;
        self.stats.prefetch_bytes +=
            self.pf_batch.iter().filter(|r| !misses[r.tag as usize].failed).map(|r| r.range.len).sum::<u64>();
    }

    /// The second half of [`ExpertStore::ensure`]: waits for the reads `ensure_begin` started and writes the
    /// missed experts' slots into `slots` (the same slice). Returns the first read error, if any (its expert stays
    /// not resident).
    pub fn ensure_end(&mut self, slots: &mut [u32]) -> Result<(), StoreError> {
        let mut r = self.finish_demand();
        for m in &self.batch_misses {
            if !m.failed
                && let Some(s) = slots.get_mut(m.at as usize)
            {
                *s = m.slot;
            }
        }
        self.batch_misses.clear();
        if !self.pf_wanted.is_empty() {
            self.wait_prefetch();
            let (layer, clock) = (self.wanted_layer, self.clock);
            let cache = self.layers[layer].as_ref().expect("wanted experts belong to a MoE layer");
            let pool = &mut self.pools[cache.pool];
            for &(j, x) in &self.pf_wanted {
                let s = cache.expert_slot[x as usize];
                if s == EMPTY {
                    // The guess's read failed: this call needed it, so its error is this call's.
                    let e = self.pf_error.take().unwrap_or_else(|| {
                        StoreError::Budget(format!("layer {layer}: the read of expert {x} did not complete"))
                    });
                    r = r.and(Err(e));
                    continue;
                }
                if !pool.policy.is_pinned(s as usize, clock) {
                    pool.policy.on_hit(s as usize, clock);
                }
                if std::mem::take(&mut pool.prefetched[s as usize]) {
                    self.stats.prefetch_hits += 1;
                }
                if let Some(out) = slots.get_mut(j as usize) {
                    *out = s;
                }
            }
            self.pf_wanted.clear();
        }
        r
    }

    /// Wait for the demand batch in flight, if any, and map the experts that arrived.
    fn finish_demand(&mut self) -> Result<(), StoreError> {
        let Some((layer, t0)) = self.demand_in_flight.take() else { return Ok(()) };
        let w = Instant::now();
        self.reader.wait();
        // The stall a caller sees: time blocked here, not the reads' whole duration.
        self.stats.read_wait_us += w.elapsed().as_micros() as u64;
        let cache = self.layers[layer].as_mut().expect("demand reads target a MoE layer");
        let pool = &mut self.pools[cache.pool];
        let (misses, batch) = (&mut self.batch_misses, &mut self.batch);
        let r = complete_batch(pool, cache, layer, misses, batch, &mut self.stats, t0, true);
        for (d, a) in self.stats.direct_io.iter_mut().zip(self.reader.direct_active()) {
            *d = a;
        }
        r
    }

    /// Start reading those of `experts` (a guess at what `layer` will need next) that are not resident, into
    /// victim slots, and return without waiting: the reads overlap whatever the caller computes next. The next
    /// `ensure` (of any layer) first waits for them and maps the experts that arrived. A guess is only a hint:
    /// invalid ids are ignored, at most `slots_per_layer` experts are taken, a failed read just leaves its slot
    /// empty (a later `ensure` that needs the expert reads it again and reports any error), and nothing it does
    /// can change which bytes an `ensure` returns. It never evicts one of `experts`, nor one of `keep`: experts of
    /// the same layer whose slots the caller is still computing from (a prefill wave), which the reader must not
    /// overwrite.
    pub fn prefetch(&mut self, layer: usize, experts: &[u32], keep: &[u32]) {
        // A demand batch in flight is completed first (its error, if any, resurfaces at the next `ensure`).
        let _ = self.finish_demand();
        self.batch_misses.clear();
        self.pf_wanted.clear();
        if self.pf_in_flight.is_some() {
            if !self.reader.prefetch_idle() {
                // The last guess is still on the disk: adding another would only queue more bytes behind it.
                self.stats.prefetch_skipped += 1;
                return;
            }
            self.wait_prefetch();
        }
        let e = self.num_experts;
        let Some(cache) = self.layers.get(layer).and_then(Option::as_ref) else { return };
        let pi = cache.pool;
        self.clock += 1;
        let clock = self.clock;
        self.pf_misses.clear();
        let now = Instant::now();
        for (j, &x) in experts.iter().take(self.slots_per_layer).enumerate() {
            let Some(cache) = self.layers[layer].as_ref() else { return };
            if x as usize >= e || cache.expert_slot[x as usize] != EMPTY {
                continue;
            }
            if self.pf_misses.iter().any(|m| m.expert == x) {
                continue;
            }
            let pool = &mut self.pools[pi];
            let mine = |y: u32| pool.key(layer, y);
            let held = |s: usize| {
                pool.policy.slot_expert(s).is_some_and(|k| {
                    experts.iter().chain(keep).any(|&y| (y as usize) < e && mine(y) == k)
                        // A guess only takes empty slots or its own layer's: the layer just ensured may still
                        // be computed from (the caller prefetches before its matmuls), and a guess should not
                        // push out what other layers use.
                        || pool.key_layer(s, layer) != Some(layer)
                })
            };
            let busy = |s: usize| pool.busy[s];
            let Some(victim) = pool.policy.victim(clock, |s| pool.policy.is_pinned(s, clock) || busy(s) || held(s))
            else {
                break;
            };
            unmap(pool, &mut self.layers, victim, &mut self.stats);
            pool.take(victim, layer, x, clock, true);
            self.pf_misses.push(Miss { expert: x, slot: victim as u32, at: j as u32, done: now, failed: false });
        }
        if self.pf_misses.is_empty() {
            return;
        }
        let cache = self.layers[layer].as_ref().expect("checked above");
        plan_batch(&mut self.pools[pi], cache, &self.pf_misses, &mut self.pf_batch, now, self.direct_io);
        for m in &self.pf_misses {
            self.pools[pi].busy[m.slot as usize] = true;
        }
        // SAFETY: `pf_batch` and the destination slots (unmapped above, so no `ensure` or `layer` view hands them
        // out, and `busy`, so no call takes them as victims) are left alone until `wait_prefetch`, which every
        // call that finds the guess still in flight either skips (leaving `pf_batch` and the slots alone) or makes;
        // drop waits too.
        let started = unsafe { self.reader.submit_prefetch(&mut self.pf_batch) };
        debug_assert!(started, "the prefetch lane was idle");
        self.pf_in_flight = Some((layer, now));
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        // The reader may still be writing into slot memory that `pools` frees (fields drop before the reader).
        self.reader.wait();
        self.reader.cancel_prefetch(&mut |_| false);
        self.reader.wait_prefetch();
    }
}

/// The read requests for `misses` (each into its slot's buffers), coalesced per expert where its ranges are
/// adjacent in one file.
fn plan_batch(
    pool: &mut Pool,
    cache: &LayerCache,
    misses: &[Miss],
    batch: &mut Vec<ReadRequest>,
    t0: Instant,
    direct: bool,
) {
    batch.clear();
    for (tag, m) in misses.iter().enumerate() {
        let [g, u, d] = cache.ranges[m.expert as usize];
        let s = m.slot as usize;
        let first = batch.len();
        pool.gate_up.plan_fill(&[g, u], s, tag as u32, t0, batch);
        pool.down.plan_fill(&[d], s, tag as u32, t0, batch);
        // A sidecar stored packed with block-sized pieces: each piece can go straight into its slot by O_DIRECT,
        // which beats one read through the bounce buffer (a copy of every byte on the compute cores).
        let in_place = direct && batch[first..].iter().all(ReadRequest::lands_in_place);
        if !in_place && let Some(span) = cache.spans[m.expert as usize] {
            coalesce(batch, first, span, tag as u32, t0);
        }
    }
}

/// After the reader ran `batch`: count it, map the experts whose reads all succeeded, clear the slots of the
/// others (marked `failed`), and return the first error. `demand` batches also record read latencies.
#[allow(clippy::too_many_arguments)]
fn complete_batch(
    pool: &mut Pool,
    cache: &mut LayerCache,
    layer: usize,
    misses: &mut [Miss],
    batch: &mut [ReadRequest],
    stats: &mut StoreStats,
    t0: Instant,
    demand: bool,
) -> Result<(), StoreError> {
    let mut first_err = None;
    for req in batch.iter_mut() {
        let m = &mut misses[req.tag as usize];
        m.done = m.done.max(req.done_at);
        if req.cancelled {
            m.failed = true;
            continue;
        }
        if let Some(e) = req.error.take() {
            m.failed = true;
            first_err.get_or_insert(e);
            continue;
        }
        stats.reads += 1;
        stats.reads_direct += req.direct as u64;
        stats.bytes_read += req.range.len;
        stats.bytes_read_disk += req.disk_bytes;
    }
    if demand {
        stats.read_batches += 1;
    }
    for m in misses.iter() {
        let s = m.slot as usize;
        if m.failed {
            // Not cached: a later call reads it again, and the slot is the first to be reused.
            pool.clear(s);
            continue;
        }
        pool.owner[s] = (layer as u32, m.expert);
        cache.expert_slot[m.expert as usize] = s as u32;
        if demand {
            let us = m.done.saturating_duration_since(t0).as_micros() as u64;
            let b = (64 - us.leading_zeros()).saturating_sub(1).min(31) as usize;
            stats.latency_us_log2[b] += 1;
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// If all of one expert's ranges lie in one file back to back (each starting where the previous one ends, in file
/// order), and there are at least two, the one range covering them.
fn coalesced_span(parts: &[ExpertRanges; 3]) -> Option<FileRange> {
    let mut rs = [FileRange { file: 0, offset: 0, len: 0 }; MAX_SEGS];
    let mut n = 0;
    for r in parts.iter().flat_map(ExpertRanges::iter) {
        *rs.get_mut(n)? = r;
        n += 1;
    }
    let rs = &mut rs[..n];
    if n < 2 {
        return None;
    }
    rs.sort_unstable_by_key(|r| (r.file, r.offset));
    let adjacent = rs.windows(2).all(|w| w[1].file == w[0].file && w[1].offset == w[0].offset + w[0].len);
    let last = rs[n - 1];
    adjacent.then(|| FileRange { file: rs[0].file, offset: rs[0].offset, len: last.offset + last.len - rs[0].offset })
}

/// Replace the single-range requests `batch[first..]` (one expert's, each with one destination) by one request for
/// `span` that scatters into their destinations in file order. Sorts in place and shrinks `batch`: no allocation.
fn coalesce(batch: &mut Vec<ReadRequest>, first: usize, span: FileRange, tag: u32, now: Instant) {
    let planned = &mut batch[first..];
    debug_assert!(planned.len() <= MAX_SEGS);
    planned.sort_unstable_by_key(|r| r.range.offset);
    let mut segs = [NO_SEGMENT; MAX_SEGS];
    for (s, r) in segs.iter_mut().zip(planned.iter()) {
        *s = r.segments()[0];
    }
    let n = planned.len();
    batch.truncate(first);
    batch.push(ReadRequest::scatter(span, &segs[..n], tag, now));
}
