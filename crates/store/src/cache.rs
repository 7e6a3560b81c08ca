//! The expert slot cache: per MoE layer, `slots ≤ experts` stacked slots, an expert→slot table, LRU recency, and
//! reads of missing experts straight into their slot's bytes.
//!
//! `ensure(layer, experts)` is the only call on the token path that may touch the disk. It first pins the hits,
//! then gives each miss the least recently used slot that the same call has not pinned, so one token's misses
//! never evict an expert that the token needs. A failed read leaves the slot marked empty and returns an error
//! naming the file and offset; the cache stays consistent.
//!
//! With `slots == experts` and `preload`, every expert is read once at start and `ensure` never misses: that is
//! the `--expert-cache all` mode.

use std::time::Instant;

use moestream_format::{ExpertRanges, TensorIndex};

use crate::resident::Files;
use crate::{SlotBuffer, StoreError};

const EMPTY: u32 = u32::MAX;

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
    pub bytes_read: u64,
    pub reads: u64,
    /// Per MoE layer (indexed by layer number; dense layers stay 0): (hits, misses).
    pub per_layer: Vec<(u64, u64)>,
    /// Expert read latencies (all ranges of one expert), log2-microsecond buckets: bucket b counts reads that took
    /// [2^b, 2^(b+1)) µs (bucket 0 also holds < 1 µs).
    pub latency_us_log2: [u64; 32],
}

impl StoreStats {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 { 1.0 } else { self.hits as f64 / n as f64 }
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

struct LayerCache {
    gate_up: SlotBuffer,
    down: SlotBuffer,
    /// Per expert: gate, up and down ranges (with MLX scales/biases).
    ranges: Vec<[ExpertRanges; 3]>,
    slot_expert: Vec<u32>,
    expert_slot: Vec<u32>,
    last_used: Vec<u64>,
}

/// The expert slot buffers of one MoE layer, as the kernels see them.
pub struct ExpertLayer<'a> {
    pub gate_up: &'a SlotBuffer,
    pub down: &'a SlotBuffer,
}

pub struct ExpertStore {
    layers: Vec<Option<LayerCache>>,
    files: Files,
    slots_per_layer: usize,
    num_experts: usize,
    bytes: u64,
    clock: u64,
    stats: StoreStats,
}

impl ExpertStore {
    /// Every expert resident (the issue-3 mode).
    pub fn load_all(index: &TensorIndex) -> Result<Self, StoreError> {
        Self::open(index, CacheSize::All)
    }

    /// Slot buffers sized by `size`, filled on demand (or all at once for `CacheSize::All`).
    pub fn open(index: &TensorIndex, size: CacheSize) -> Result<Self, StoreError> {
        let files = Files::open(index)?;
        let c = &index.config;
        let top_k = c.num_experts_per_tok;
        let moe_layers: Vec<usize> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).collect();
        // Bytes one slot takes in every buffer of one layer (the largest layer, if they differ).
        let mut slot_bytes = 0u64;
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
            let b = ranges.first().map(|x| x.iter().map(ExpertRanges::bytes).sum::<u64>()).unwrap_or(0);
            slot_bytes = slot_bytes.max(b);
            per_layer_ranges.push(Some((g, u, d, ranges)));
        }
        let e = c.num_experts;
        let slots = match size {
            CacheSize::All => e,
            CacheSize::Slots(n) => n,
            CacheSize::Bytes(b) => {
                let per_layer = b / moe_layers.len().max(1) as u64;
                (per_layer / slot_bytes.max(1)) as usize
            }
        }
        .min(e);
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
        let mut layers = Vec::with_capacity(c.num_layers);
        let mut bytes = 0u64;
        let (i, h) = (c.moe_intermediate_size, c.hidden_size);
        for lr in per_layer_ranges {
            let Some((g, u, d, ranges)) = lr else {
                layers.push(None);
                continue;
            };
            let gate_up = SlotBuffer::new(&[g, u], h, slots)?;
            let down = SlotBuffer::new(&[d], i, slots)?;
            for b in [&gate_up, &down] {
                bytes += (b.data.len() + b.scales.len() + b.biases.len()) as u64;
            }
            layers.push(Some(LayerCache {
                gate_up,
                down,
                ranges,
                slot_expert: vec![EMPTY; slots],
                expert_slot: vec![EMPTY; e],
                last_used: vec![0; slots],
            }));
        }
        let mut store = ExpertStore {
            layers,
            files,
            slots_per_layer: slots,
            num_experts: e,
            bytes,
            clock: 0,
            stats: StoreStats { per_layer: vec![(0, 0); c.num_layers], ..StoreStats::default() },
        };
        if slots == e {
            // Everything fits: read each expert into the slot of its own number, once.
            for l in 0..store.layers.len() {
                if store.layers[l].is_some() {
                    for x in 0..e {
                        store.load(l, x as u32, x)?;
                    }
                }
            }
            store.reset_stats();
        }
        Ok(store)
    }

    pub fn slots_per_layer(&self) -> usize {
        self.slots_per_layer
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
        let n = self.stats.per_layer.len();
        self.stats = StoreStats { per_layer: vec![(0, 0); n], ..StoreStats::default() };
    }

    pub fn layer(&self, l: usize) -> Option<ExpertLayer<'_>> {
        self.layers.get(l).and_then(Option::as_ref).map(|c| ExpertLayer { gate_up: &c.gate_up, down: &c.down })
    }

    /// Make `experts` (distinct ids) of `layer` resident and write their slots to `slots`. At most
    /// `slots_per_layer` experts per call.
    pub fn ensure(&mut self, layer: usize, experts: &[u32], slots: &mut [u32]) -> Result<(), StoreError> {
        if experts.len() > self.slots_per_layer {
            return Err(StoreError::Budget(format!(
                "{} experts requested at once in layer {layer}, but the layer has {} slots",
                experts.len(),
                self.slots_per_layer
            )));
        }
        self.clock += 1;
        let clock = self.clock;
        let e = self.num_experts;
        let Some(cache) = self.layers.get_mut(layer).and_then(Option::as_mut) else {
            return Err(StoreError::Layout { tensor: format!("blk.{layer}"), msg: "not a MoE layer".into() });
        };
        // Pass 1: hits, pinned for this call by stamping them with the current clock.
        let mut misses = 0;
        for (j, &x) in experts.iter().enumerate() {
            if x as usize >= e {
                return Err(StoreError::Layout { tensor: format!("blk.{layer}"), msg: format!("no expert {x}") });
            }
            let s = cache.expert_slot[x as usize];
            if s != EMPTY {
                cache.last_used[s as usize] = clock;
                slots[j] = s;
            } else {
                slots[j] = EMPTY;
                misses += 1;
            }
        }
        let hits = experts.len() as u64 - misses;
        self.stats.hits += hits;
        self.stats.per_layer[layer].0 += hits;
        if misses == 0 {
            return Ok(());
        }
        self.stats.misses += misses;
        self.stats.per_layer[layer].1 += misses;
        // Pass 2: each miss takes the least recently used slot not stamped by this call (empty slots have stamp 0).
        for j in 0..experts.len() {
            if slots[j] != EMPTY {
                continue;
            }
            let cache = self.layers[layer].as_mut().expect("checked above");
            let victim = (0..cache.last_used.len())
                .filter(|&s| cache.last_used[s] < clock)
                .min_by_key(|&s| cache.last_used[s])
                .ok_or_else(|| StoreError::Budget(format!("layer {layer}: no free slot")))?;
            let old = cache.slot_expert[victim];
            if old != EMPTY {
                cache.expert_slot[old as usize] = EMPTY;
            }
            cache.last_used[victim] = clock;
            self.load(layer, experts[j], victim)?;
            slots[j] = victim as u32;
        }
        Ok(())
    }

    /// Read expert `x` into `slot`. On failure the slot is left empty.
    fn load(&mut self, layer: usize, x: u32, slot: usize) -> Result<(), StoreError> {
        let t0 = Instant::now();
        let cache = self.layers[layer].as_mut().expect("MoE layer");
        cache.slot_expert[slot] = EMPTY;
        let [g, u, d] = cache.ranges[x as usize];
        let r = cache.gate_up.fill(&self.files, &[g, u], slot).and_then(|_| cache.down.fill(&self.files, &[d], slot));
        r?;
        cache.slot_expert[slot] = x;
        cache.expert_slot[x as usize] = slot as u32;
        let bytes = g.bytes() + u.bytes() + d.bytes();
        self.stats.bytes_read += bytes;
        self.stats.reads += [g, u, d].iter().map(|r| r.iter().count() as u64).sum::<u64>();
        let us = t0.elapsed().as_micros() as u64;
        let b = (64 - us.leading_zeros()).saturating_sub(1).min(31) as usize;
        self.stats.latency_us_log2[b] += 1;
        Ok(())
    }
}
