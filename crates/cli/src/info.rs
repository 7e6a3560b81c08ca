//! `moestream info`: a dry run that says what running a model with a given expert budget would take — the memory
//! plan (trunk, expert cache, KV and recurrent state) and the expected expert reads per decode token — from the
//! tensor index alone, without loading weights.
//!
//! The I/O estimate assumes uniform routing with no reuse from token to token, the pessimistic case: trained models
//! reuse experts, so measured hit rates (printed by `run`) are higher. With a shared slot pool the estimate is the
//! same (uniform routing spreads the pool evenly); what a shared pool buys is room for uneven layers.

use std::path::Path;

use anyhow::{Context, Result};
use moestream_format::{LayerAttention, TensorIndex};
use moestream_store::{CachePlan, CacheSize};
use serde::Serialize;

#[derive(Serialize)]
struct Plan {
    architecture: &'static str,
    layers: usize,
    full_attention_layers: usize,
    linear_attention_layers: usize,
    moe_layers: usize,
    experts: usize,
    experts_per_token: usize,
    /// Resident trunk: every tensor that is not a routed expert, as stored.
    bytes_trunk: u64,
    /// The even split of the budget over the MoE layers; with `shared_pool`, an average, not a per-layer limit.
    slots_per_layer: usize,
    /// One slot pool that every MoE layer draws from (the engine's default for a byte budget where the layers'
    /// experts are stored alike; `--per-layer-slots` splits it), holding `pool_slots`.
    shared_pool: bool,
    pool_slots: usize,
    bytes_per_expert: u64,
    bytes_expert_cache: u64,
    /// Context positions the KV cache is sized for.
    ctx: usize,
    /// f32 keys and values of the full-attention layers for `ctx` positions, plus the Gated DeltaNet conv and
    /// recurrent state of the linear layers.
    bytes_kv_and_state: u64,
    bytes_total: u64,
    /// Uniform-routing estimate (see the module doc).
    expected_misses_per_token: f64,
    expected_read_bytes_per_token: f64,
    /// Decode ceiling from reads alone at 1 and 3 GB/s of disk bandwidth (`null` when nothing is read).
    disk_bound_tok_s_at_1gbps: Option<f64>,
    disk_bound_tok_s_at_3gbps: Option<f64>,
}

pub fn run(model: &Path, size: CacheSize, per_layer_slots: bool, ctx: usize, json: bool) -> Result<()> {
    let index = TensorIndex::open(model)?;
    index.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    let c = &index.config;
    let plan =
        CachePlan::new(&index, size).with_context(|| format!("planning the expert cache of {}", model.display()))?;
    let trunk: u64 = index.tensors.values().filter(|t| !t.is_expert_stack()).map(|t| t.bytes()).sum();
    let full = (0..c.num_layers).filter(|&l| c.layer_types.get(l) != Some(&LayerAttention::LinearAttention)).count();
    let linear = c.num_layers - full;
    let kv = full as u64 * ctx as u64 * (c.num_kv_heads * c.head_dim) as u64 * 2 * 4;
    let state = match &c.linear {
        Some(la) => {
            let conv = (2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim)
                * la.conv_kernel.saturating_sub(1);
            let rec = la.num_value_heads * la.key_head_dim * la.value_head_dim;
            linear as u64 * (conv + rec) as u64 * 4
        }
        None => 0,
    };
    let shared = plan.shares_pool(&index, size, !per_layer_slots);
    let misses = plan.uniform_misses_per_token();
    let read = misses * plan.slot_bytes as f64;
    let bound = |gbps: f64| (read > 0.0).then(|| gbps * 1e9 / read);
    let p = Plan {
        architecture: c.architecture.model_type(),
        layers: c.num_layers,
        full_attention_layers: full,
        linear_attention_layers: linear,
        moe_layers: plan.moe_layers,
        experts: plan.num_experts,
        experts_per_token: plan.top_k,
        bytes_trunk: trunk,
        slots_per_layer: plan.slots_per_layer,
        shared_pool: shared,
        pool_slots: plan.pool_slots(shared),
        bytes_per_expert: plan.slot_bytes,
        bytes_expert_cache: plan.bytes(),
        ctx,
        bytes_kv_and_state: kv + state,
        bytes_total: trunk + plan.bytes() + kv + state,
        expected_misses_per_token: misses,
        expected_read_bytes_per_token: read,
        disk_bound_tok_s_at_1gbps: bound(1.0),
        disk_bound_tok_s_at_3gbps: bound(3.0),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "{}: {} layers ({} full attention, {} linear attention), {} MoE layers of {} experts, top-{}",
        p.architecture, p.layers, full, linear, p.moe_layers, p.experts, p.experts_per_token
    );
    let slots = if p.shared_pool {
        format!(
            "{} slots shared by the {} MoE layers, {} per layer on average, of {} experts each",
            p.pool_slots, p.moe_layers, p.slots_per_layer, p.experts
        )
    } else {
        format!("{} of {} slots per layer", p.slots_per_layer, p.experts)
    };
    println!(
        "memory plan: trunk {:.2} GB + expert cache {:.2} GB ({slots}, {:.1} MB per expert) + KV and state {:.2} GB \
         at {} positions = {:.2} GB",
        gb(p.bytes_trunk),
        gb(p.bytes_expert_cache),
        p.bytes_per_expert as f64 / 1e6,
        gb(p.bytes_kv_and_state),
        ctx,
        gb(p.bytes_total),
    );
    if p.slots_per_layer < p.experts_per_token {
        println!(
            "too small: the expert cache needs at least top-k = {} slots per layer ({:.2} GB)",
            p.experts_per_token,
            (p.experts_per_token * p.moe_layers) as f64 * p.bytes_per_expert as f64 / 1e9
        );
    }
    match (p.disk_bound_tok_s_at_1gbps, p.disk_bound_tok_s_at_3gbps) {
        (Some(a), Some(b)) => println!(
            "expected reads per decode token (uniform routing, no reuse; trained models do better): {:.1} experts = \
             {:.0} MB; decode is at most {a:.2} tok/s at 1 GB/s of disk, {b:.2} tok/s at 3 GB/s",
            p.expected_misses_per_token,
            p.expected_read_bytes_per_token / 1e6,
        ),
        _ => println!("every expert is resident: decode reads nothing from disk"),
    }
    Ok(())
}
