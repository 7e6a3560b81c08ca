//! The Qwen3 MoE family: Qwen3-MoE (`qwen3_moe`), and the hybrids Qwen3.5-MoE (`qwen3_5_moe`) and Qwen3-Next
//! (`qwen3_next`). A pre-norm decoder with GQA, per-head q/k RMSNorm before NeoX RoPE (partial for the hybrids),
//! and a softmax top-k router over SwiGLU experts (dense-MLP layers where `mlp_only_layers` /
//! `decoder_sparse_step` say so). The hybrids add: Gated DeltaNet layers (`cpu::gdn`) in place of attention on
//! most layers, a per-head sigmoid output gate on full attention, a shared expert with a sigmoid gate, and
//! zero-centred RMSNorms (`1 + w`, folded into the weights at load when the file has not already done so).
//!
//! Decode (one token) runs each MoE layer as two gathered passes over the token's k expert slots: gate+up fused
//! with SwiGLU, then down with the router weights. Prefill groups the chunk's tokens by expert (as ggml's
//! `mul_mat_id`) and runs one GEMM per expert, so each expert's bytes are walked once per chunk.

use moestream_cpu::attention::{AttnDispatch, AttnShape};
use moestream_cpu::gdn::{conv1d_silu_step, delta_rule_step, l2norm_inplace, rmsnorm_gated_inplace, sigmoid, softplus};
use moestream_cpu::ops::{
    rmsnorm, rmsnorm_heads_inplace, rope_cos_sin, rope_inv_freq, rope_neox_with, silu, softmax_inplace, top_k,
};
use moestream_cpu::{Dispatch, ThreadPool, WeightView, sum_parts};
use moestream_format::{Architecture, LayerAttention, ModelConfig, TensorIndex};
use std::sync::Mutex;

use moestream_store::{
    CacheSize, EMPTY_SLOT, EvictionPolicy, ExpertStore, OwnedWeight, ReadOptions, ResidentWeights, StoreStats, WeightId,
};

use crate::ModelError;

/// The default prompt tokens per prefill pass (`ModelOptions::prefill_chunk`, the CLI's `--prefill-chunk`): on the
/// Qwen3-30B-A3B shape a 512-token prompt in one pass prefills 13–24% faster than in two of 256, for ~25 MB more
/// scratch per session (BENCHMARKS.md, fifth pass).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub threads: usize,
    /// Largest number of prompt tokens processed as one batch ([`DEFAULT_PREFILL_CHUNK`] unless set).
    pub prefill_chunk: usize,
    /// Lossy: route to this many experts instead of the config's top-k.
    pub top_k: Option<usize>,
    /// Quantize activations to 8 bits for integer dot products on block-quantized weights (as llama.cpp does).
    /// Faster on 4-bit weights; off by default because it changes logits slightly.
    pub q8_activations: bool,
    /// Expert slots per layer: all resident, a byte budget, or a slot count.
    pub expert_cache: CacheSize,
    /// How decode runs a token's experts (for comparison; every mode gives bit-identical results).
    pub moe_kernels: MoeKernels,
    /// How missing experts are read (O_DIRECT, I/O threads).
    pub read: ReadOptions,
    /// Which slot a miss evicts.
    pub eviction: EvictionPolicy,
    /// A byte budget is one slot pool for all MoE layers (a miss may evict another layer's expert) rather than an
    /// even split per layer; see `ExpertStore::open_with_sharing`.
    pub shared_expert_pool: bool,
    /// What decode reads ahead for the next MoE layer while this one computes.
    pub prefetch: Prefetch,
    /// Regroup `Q4_0`, `Q4_K` and `Q6_K` matrices as `Q4_0x16` / `Q4_Kx16` / `Q6_Kx16` where the kernel table is faster on them
    /// (`Dispatch::packs`: q8 activations on AVX-512 VNNI). Changes summation order only (f32 rounding), never
    /// which values are used.
    pub pack: bool,
}

/// Expert prefetch during decode (`--prefetch`): right after layer l's experts are resident, start reading a guess
/// at what the next MoE layer will need, so the reads overlap layer l's expert matmuls and the next attention.
/// Guesses only decide what is read early; `ensure` still decides what is used, so outputs never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    None,
    /// The experts the previous token chose in the next layer.
    Prev,
    /// The next layer's router applied to the current residual stream (normalised with the next layer's norm):
    /// its top-k.
    Lookahead,
}

impl Prefetch {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Prefetch::None),
            "prev" => Some(Prefetch::Prev),
            "lookahead" => Some(Prefetch::Lookahead),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Prefetch::None => "none",
            Prefetch::Prev => "prev",
            Prefetch::Lookahead => "lookahead",
        }
    }
}

/// Decode-time MoE execution, the SwiftLM knobs `MLX_MOE_STACKED` and `MLX_MOE_FUSE_GATEUP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeKernels {
    /// One gathered call per projection over all k slots (true), or k separate per-expert calls.
    pub stacked: bool,
    /// Gate and up as one `[2·I, H]` walk with SwiGLU fused (true), or two separate walks.
    pub fuse_gate_up: bool,
}

impl Default for MoeKernels {
    fn default() -> Self {
        MoeKernels { stacked: true, fuse_gate_up: true }
    }
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            top_k: None,
            q8_activations: false,
            expert_cache: CacheSize::All,
            moe_kernels: MoeKernels::default(),
            read: ReadOptions::default(),
            eviction: EvictionPolicy::default_for_cache(),
            shared_expert_pool: true,
            prefetch: Prefetch::None,
            pack: true,
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    moe: bool,
    mixer: Mixer,
    // Weights are resolved to ids at load so the token path neither formats names nor hashes them.
    /// MoE layers: the router. Dense layers: gate, up, down.
    router: Option<WeightId>,
    dense: Option<[WeightId; 3]>,
    /// Hybrids: the shared expert (gate, up, down) and its `[1, H]` sigmoid gate.
    shared: Option<([WeightId; 3], WeightId)>,
}

/// What mixes tokens in a layer.
enum Mixer {
    Full(FullAttn),
    Linear(Box<Gdn>),
}

/// Softmax attention over the KV cache (`kv`: this layer's index among the full-attention layers). `gated`:
/// q_proj yields a query and a sigmoid output gate per head (the hybrids).
struct FullAttn {
    wq: WeightId,
    wk: WeightId,
    wv: WeightId,
    wo: WeightId,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    gated: bool,
    kv: usize,
}

/// A Gated DeltaNet layer. Projections are either separate (Qwen3.5: qkv, z, b, a) or fused per key head
/// (Qwen3-Next: `[q | k | v·r | z·r]` and `[b·r | a·r]`), which `gdn` unpacks into the separate layout per token.
struct Gdn {
    /// Index among the linear layers: which conv and recurrent state this layer owns in a `Session`.
    state: usize,
    proj: GdnProj,
    /// `[C, K]` depthwise conv kernel over the qkv channels.
    conv: Vec<f32>,
    /// `−exp(A_log)` per value head.
    neg_a: Vec<f32>,
    dt_bias: Vec<f32>,
    /// Gated RMSNorm weight (`dv`, plain, not zero-centred).
    norm: Vec<f32>,
    out: WeightId,
    /// Value head j reads key head `j % Hk` (llama.cpp's tiled order) instead of `j / r` (HF's grouped order).
    v_tiled: bool,
}

enum GdnProj {
    Separate {
        qkv: WeightId,
        z: WeightId,
        b: WeightId,
        a: WeightId,
    },
    Fused {
        qkvz: WeightId,
        ba: WeightId,
    },
    /// llama.cpp's Qwen3-Next GGUF: qkv and z as in Qwen3.5, `[b·r | a·r]` still fused per key head.
    SplitFusedBa {
        qkv: WeightId,
        z: WeightId,
        ba: WeightId,
    },
}

pub struct Qwen3Moe {
    pub config: ModelConfig,
    resident: ResidentWeights,
    /// Behind a lock because `forward` takes `&self`; only the engine thread calls it, so it is never contended.
    experts: Mutex<ExpertStore>,
    pool: ThreadPool,
    dispatch: Dispatch,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    inv_freq: Vec<f32>,
    top_k: usize,
    chunk: usize,
    kernels: MoeKernels,
    prefetch: Prefetch,
    embd: WeightId,
    /// `output.weight`, or the embedding when tied.
    head: WeightId,
    /// Per layer: the next MoE layer after it, if any (the prefetch target).
    next_moe: Vec<Option<usize>>,
}

/// One conversation's state: KV cache and scratch, sized at creation.
pub struct Session {
    pub pos: usize,
    capacity: usize,
    /// Times each expert was chosen, `[layer × n_experts]`: routing statistics for streaming and benchmarks.
    expert_counts: Vec<u64>,
    /// When enabled: every token's top-k choices per MoE layer, in order (`[token][layer][k]`, dense layers
    /// skipped), for cache-policy studies. Off by default; it grows with the sequence.
    trace: Option<Vec<u32>>,
    routing_reuse: RoutingReuse,
    /// KV cache of the full-attention layers, `[full layer][position][kv heads × d]`.
    k: LineAlignedF32,
    v: LineAlignedF32,
    /// Gated DeltaNet state of the linear layers: conv history `[linear layer][C][K−1]` and the recurrent state
    /// `[linear layer][value head][dk][dv]`, f32. Part of the conversation, like the KV cache.
    conv_state: Vec<f32>,
    rec_state: Vec<f32>,
    /// KV row width (kv heads × head_dim).
    kvd: usize,
    s: Scratch,
}

/// Routing reuse over a session's decode tokens: for each decode token and MoE layer, how many of its top-k
/// experts were also in the previous token's top-k at that layer. Random weights reuse about k/E (uniform
/// routing); real models far more, which is what an expert cache lives on (issue 7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoutingReuse {
    /// Choices that repeat one of the previous token's at the same layer.
    pub repeated: u64,
    /// Choices counted (decode tokens × MoE layers × k).
    pub choices: u64,
}

impl RoutingReuse {
    /// `repeated / choices`, or NaN before the first decode token.
    pub fn rate(&self) -> f64 {
        if self.choices == 0 { f64::NAN } else { self.repeated as f64 / self.choices as f64 }
    }
}

/// A conversation's state after its first `pos` tokens: the KV rows of every full-attention layer up to `pos`,
/// and the Gated DeltaNet conv and recurrent state (which, unlike a KV cache, cannot be cut back to an earlier
/// position, so a prompt cache must keep a snapshot). Restoring it into a session of the same model continues
/// bit-identically to the session it was taken from.
#[derive(Clone)]
pub struct SessionSnapshot {
    pub pos: usize,
    /// Per full-attention layer, `pos` rows of keys then of values.
    kv: Vec<f32>,
    conv_state: Vec<f32>,
    rec_state: Vec<f32>,
    /// KV row width and layer count it was taken with, checked on restore.
    kvd: usize,
    full_layers: usize,
}

impl SessionSnapshot {
    pub fn bytes(&self) -> u64 {
        (self.kv.len() + self.conv_state.len() + self.rec_state.len()) as u64 * 4
    }
}

impl Session {
    /// Copy the state after the first `self.pos` tokens (allocates; not for the per-token path).
    pub fn snapshot(&self) -> SessionSnapshot {
        let (pos, cap, kvd) = (self.pos, self.capacity, self.kvd);
        let full = self.k.len().checked_div(cap * kvd).unwrap_or(0);
        let mut kv = Vec::with_capacity(2 * full * pos * kvd);
        for l in 0..full {
            let base = l * cap * kvd;
            kv.extend_from_slice(&self.k[base..base + pos * kvd]);
            kv.extend_from_slice(&self.v[base..base + pos * kvd]);
        }
        SessionSnapshot {
            pos,
            kv,
            conv_state: self.conv_state.clone(),
            rec_state: self.rec_state.clone(),
            kvd,
            full_layers: full,
        }
    }

    /// Continue from `snap` (taken from a session of the same model): positions after `snap.pos` are forgotten.
    pub fn restore(&mut self, snap: &SessionSnapshot) -> Result<(), ModelError> {
        let (cap, kvd) = (self.capacity, self.kvd);
        let full = self.k.len().checked_div(cap * kvd).unwrap_or(0);
        if snap.kvd != kvd
            || snap.full_layers != full
            || snap.conv_state.len() != self.conv_state.len()
            || snap.rec_state.len() != self.rec_state.len()
        {
            return Err(ModelError::Session("the snapshot was taken from a different model".into()));
        }
        if snap.pos > cap {
            return Err(ModelError::ContextFull { needed: snap.pos, capacity: cap });
        }
        let n = snap.pos * kvd;
        for l in 0..full {
            let (base, at) = (l * cap * kvd, 2 * l * n);
            self.k[base..base + n].copy_from_slice(&snap.kv[at..at + n]);
            self.v[base..base + n].copy_from_slice(&snap.kv[at + n..at + 2 * n]);
        }
        self.conv_state.copy_from_slice(&snap.conv_state);
        self.rec_state.copy_from_slice(&snap.rec_state);
        self.pos = snap.pos;
        // The prefetch guess from the previous token no longer applies.
        self.s.has_prev = false;
        Ok(())
    }

    /// Forget every position from `pos` on, for attention-only models (the KV cache is positional). Hybrids keep
    /// a recurrent state that cannot be rewound: restore a snapshot instead (rewinding to the current position is
    /// a no-op for every model).
    pub fn rewind(&mut self, pos: usize) -> Result<(), ModelError> {
        if pos == self.pos {
            return Ok(());
        }
        if !self.rec_state.is_empty() {
            return Err(ModelError::Session(
                "a hybrid model's recurrent state cannot be rewound; restore a snapshot instead".into(),
            ));
        }
        if pos > self.pos {
            return Err(ModelError::Session(format!("cannot rewind to {pos}: only {} positions exist", self.pos)));
        }
        self.pos = pos;
        self.s.has_prev = false;
        Ok(())
    }

    /// Bytes of the KV cache (f32 keys and values for every layer and position).
    pub fn kv_bytes(&self) -> u64 {
        (self.k.len() + self.v.len() + self.conv_state.len() + self.rec_state.len()) as u64 * 4
    }

    /// How often each expert of each layer was chosen so far, `[layer × n_experts]` row-major.
    pub fn expert_counts(&self) -> &[u64] {
        &self.expert_counts
    }

    /// Routing reuse of this session's decode tokens so far (see [`RoutingReuse`]).
    pub fn routing_reuse(&self) -> RoutingReuse {
        self.routing_reuse
    }

    /// Start recording routing choices (see [`Session::trace`]).
    pub fn enable_trace(&mut self) {
        self.trace.get_or_insert_with(Vec::new);
    }

    /// Recorded choices: for each token in order, for each MoE layer in order, its top-k expert ids.
    pub fn trace(&self) -> Option<&[u32]> {
        self.trace.as_deref()
    }
}

struct Scratch {
    x: Vec<f32>,
    hn: Vec<f32>,
    /// Gated attention: q_proj's raw `[query | gate]` per head, and the gates de-interleaved.
    qg: Vec<f32>,
    gate: Vec<f32>,
    /// Gated DeltaNet: the input projection(s) for the chunk (qkv then z, or Qwen3-Next's fused qkvz), z, b and
    /// a (`[b | a]` per token), one token's qkv channels through the conv, and the chunk's outputs.
    lin_in: Vec<f32>,
    lin_z: Vec<f32>,
    lin_ba: Vec<f32>,
    lin_qkv: Vec<f32>,
    lin_o: Vec<f32>,
    /// Shared expert gate logit per token.
    sh_gate: Vec<f32>,
    q: Vec<f32>,
    kk: Vec<f32>,
    vv: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    router: Vec<f32>,
    topk_idx: Vec<u32>,
    topk_w: Vec<f32>,
    moe_out: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    xin: Vec<f32>,
    dn: Vec<f32>,
    /// Decode: each chosen expert's unweighted down output (`[k × H]`), summed by `sum_parts`.
    parts: Vec<f32>,
    /// RoPE angles of the chunk's positions (`[token × (cos | sin)]`), computed once per chunk for every layer.
    rope_cs: Vec<f32>,
    order: Vec<u32>,
    offsets: Vec<u32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
    /// The last token's top-k per layer (`[layer × k]`), once `has_prev`: the `Prefetch::Prev` guess.
    prev_topk: Vec<u32>,
    has_prev: bool,
    /// Look-ahead scratch: normalised residual, next router's logits, its top-k.
    la_hn: Vec<f32>,
    la_router: Vec<f32>,
    la_idx: Vec<u32>,
    la_w: Vec<f32>,
}

fn view(w: &OwnedWeight) -> WeightView<'_> {
    WeightView {
        encoding: w.encoding,
        rows: w.rows,
        cols: w.cols,
        data: w.data.as_slice(),
        scales: w.scales.as_slice(),
        biases: w.biases.as_slice(),
    }
}

/// The `[rows, cols]` matrix in slot `slot` of a stacked slot buffer.
fn slot_view(b: &moestream_store::SlotBuffer, slot: u32, rows: usize, cols: usize) -> WeightView<'_> {
    let (data, scales, biases) = b.slot(slot as usize);
    WeightView { encoding: b.encoding, rows, cols, data, scales, biases }
}

/// Rows `0..a` and `a..` of a view, as two views (gate and up halves of a fused slot).
fn split_rows<'a>(w: &WeightView<'a>, a: usize) -> (WeightView<'a>, WeightView<'a>) {
    let rb = w.data.len() / w.rows.max(1);
    let gb = w.scales.len() / w.rows.max(1);
    let top =
        WeightView { rows: a, data: &w.data[..a * rb], scales: &w.scales[..a * gb], biases: &w.biases[..a * gb], ..*w };
    let bottom = WeightView {
        rows: w.rows - a,
        data: &w.data[a * rb..],
        scales: &w.scales[a * gb..],
        biases: &w.biases[a * gb..],
        ..*w
    };
    (top, bottom)
}

/// Decode row `r` of a resident matrix (embedding lookup).
fn dequant_row(w: &OwnedWeight, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
    let bad = |e: moestream_quant::QuantError| ModelError::Unsupported(format!("embedding row {r}: {e}"));
    let rb = w.encoding.row_bytes(w.cols).ok_or_else(|| ModelError::Unsupported("embedding row size".into()))?;
    // Side buffers (MLX scales/biases) hold the same number of bytes per row.
    let sb = w.scales.len() / w.rows.max(1);
    w.encoding
        .dequantize(
            &w.data.as_slice()[r * rb..(r + 1) * rb],
            &w.scales.as_slice()[r * sb..(r + 1) * sb],
            &w.biases.as_slice()[r * sb..(r + 1) * sb],
            w.cols,
            out,
        )
        .map_err(bad)
}

impl Qwen3Moe {
    /// Load the trunk and every expert (all resident).
    pub fn load(index: &TensorIndex, opts: &ModelOptions) -> Result<Self, ModelError> {
        let c = index.config.clone();
        let gguf = index.gguf.is_some();
        let dispatch = if opts.q8_activations { Dispatch::best() } else { Dispatch::best_exact() };
        let mut resident = ResidentWeights::load(index)?;
        // Q4_0 and Q4_K matrices are regrouped for the 16-row int8 kernels where the table has them; the embedding
        // is read by row, so it stays as stored (also when the head is tied to it).
        let pack = if opts.pack { dispatch.pack_set() } else { moestream_quant::packed::PackSet::NONE };
        if pack.any() {
            resident.pack(&[resident.id("token_embd.weight")?], pack)?;
        }
        let read = ReadOptions { pack, ..opts.read.clone() };
        let experts = Mutex::new(ExpertStore::open_with_sharing(
            index,
            opts.expert_cache,
            &read,
            opts.eviction,
            opts.shared_expert_pool,
        )?);
        // HF hybrid checkpoints keep RMSNorm weights zero-centred (`1 + w`); MLX and GGUF conversions have added the
        // 1 already. The conv kernel's stored layout tells them apart: HF keeps PyTorch's `[C, 1, K]`.
        let plus_one = c.architecture.is_hybrid()
            && index
                .tensors
                .iter()
                .any(|(n, t)| n.ends_with(".ssm_conv1d.weight") && t.stored_shape.len() == 3 && t.stored_shape[1] == 1);
        let shift = |mut v: Vec<f32>| {
            if plus_one {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            v
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        let (mut n_full, mut n_lin) = (0, 0);
        for l in 0..c.num_layers {
            let v = |n: &str| resident.vector(&format!("blk.{l}.{n}.weight")).map(<[f32]>::to_vec);
            let w = |n: &str| resident.id(&format!("blk.{l}.{n}.weight"));
            let moe = c.layer_is_moe(l);
            let mixer = if c.layer_types.get(l) == Some(&LayerAttention::LinearAttention) {
                let la = c.linear.as_ref().ok_or_else(|| {
                    ModelError::Unsupported(format!("layer {l} is linear attention but the config has no linear_*"))
                })?;
                let proj = if c.architecture == Architecture::Qwen3Next && gguf {
                    // llama.cpp's converter splits qkvz into attn_qkv and attn_gate (Qwen3.5's layout, value heads
                    // still grouped) but keeps ba fused per key head.
                    GdnProj::SplitFusedBa { qkv: w("attn_qkv")?, z: w("attn_gate")?, ba: w("ssm_ba")? }
                } else if c.architecture == Architecture::Qwen3Next {
                    GdnProj::Fused { qkvz: w("ssm_in")?, ba: w("ssm_ba")? }
                } else {
                    GdnProj::Separate { qkv: w("attn_qkv")?, z: w("attn_gate")?, b: w("ssm_beta")?, a: w("ssm_alpha")? }
                };
                let conv = v("ssm_conv1d")?;
                let ch = 2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim;
                if conv.len() != ch * la.conv_kernel {
                    return Err(ModelError::Unsupported(format!(
                        "blk.{l}.ssm_conv1d: {} values, expected {ch} channels × kernel {}",
                        conv.len(),
                        la.conv_kernel
                    )));
                }
                let gdn = Gdn {
                    state: n_lin,
                    proj,
                    conv,
                    // GGUF stores A = −exp(A_log) itself (`ssm_a`); HF and MLX store A_log.
                    neg_a: match resident.vector(&format!("blk.{l}.ssm_a.weight")) {
                        Ok(a) => a.to_vec(),
                        Err(_) => v("ssm_a_log")?.iter().map(|a| -a.exp()).collect(),
                    },
                    dt_bias: v("ssm_dt_bias")?,
                    norm: v("ssm_norm")?,
                    out: w("ssm_out")?,
                    // llama.cpp's Qwen3.5 converter reorders value heads from grouped-by-key-head to tiled so that
                    // ggml can broadcast q/k with a plain repeat (docs/llamacpp-qwen35moe-gguf.md). It permutes
                    // every per-value-head tensor consistently (v rows of qkv and the conv, z, b, a, A, dt_bias,
                    // out_proj columns), so only the value → key head map changes: tiled head j reads key head
                    // j mod Hk instead of j / r. Adapting that map costs nothing, whereas undoing the permutation
                    // at load would have to move ssm_out's *columns*, which quantized blocks span.
                    v_tiled: gguf && c.architecture == Architecture::Qwen35Moe,
                };
                n_lin += 1;
                Mixer::Linear(Box::new(gdn))
            } else {
                n_full += 1;
                Mixer::Full(FullAttn {
                    wq: w("attn_q")?,
                    wk: w("attn_k")?,
                    wv: w("attn_v")?,
                    wo: w("attn_output")?,
                    q_norm: shift(v("attn_q_norm")?),
                    k_norm: shift(v("attn_k_norm")?),
                    gated: c.architecture.is_hybrid(),
                    kv: n_full - 1,
                })
            };
            let shared = if moe && c.shared_expert_intermediate_size > 0 {
                Some(([w("ffn_gate_shexp")?, w("ffn_up_shexp")?, w("ffn_down_shexp")?], w("ffn_gate_inp_shexp")?))
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: shift(v("attn_norm")?),
                ffn_norm: shift(v("ffn_norm")?),
                moe,
                mixer,
                router: if moe { Some(w("ffn_gate_inp")?) } else { None },
                dense: if moe { None } else { Some([w("ffn_gate")?, w("ffn_up")?, w("ffn_down")?]) },
                shared,
            });
        }
        let output_norm = shift(resident.vector("output_norm.weight")?.to_vec());
        let embd = resident.id("token_embd.weight")?;
        let head = resident.id("output.weight").unwrap_or(embd);
        let top_k = opts.top_k.unwrap_or(c.num_experts_per_tok);
        if top_k == 0 || top_k > c.num_experts {
            return Err(ModelError::Unsupported(format!("--top-k {top_k} outside 1..={}", c.num_experts)));
        }
        let rot = ((c.head_dim as f64 * c.partial_rotary_factor) as usize) & !1;
        let c_layers = c.num_layers;
        let moe_at: Vec<bool> = (0..c_layers).map(|l| c.layer_is_moe(l)).collect();
        Ok(Qwen3Moe {
            inv_freq: rope_inv_freq(c.rope_theta, rot),
            config: c,
            resident,
            experts,
            pool: ThreadPool::new(opts.threads.max(1)),
            dispatch,
            layers,
            output_norm,
            top_k,
            chunk: opts.prefill_chunk.max(1),
            kernels: opts.moe_kernels,
            prefetch: opts.prefetch,
            embd,
            head,
            next_moe: (0..c_layers).map(|l| (l + 1..c_layers).find(|&m| moe_at[m])).collect(),
        })
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident.bytes()
    }

    fn store(&self) -> std::sync::MutexGuard<'_, ExpertStore> {
        // The cache tables are updated only after each read completes, so a poisoned lock is still consistent.
        self.experts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn expert_bytes(&self) -> u64 {
        self.store().bytes()
    }

    pub fn slots_per_layer(&self) -> usize {
        self.store().slots_per_layer()
    }

    /// Expert cache statistics since load or the last reset.
    /// Whether all MoE layers draw from one expert slot pool.
    pub fn expert_pool_shared(&self) -> bool {
        self.store().shared()
    }

    pub fn store_stats(&self) -> StoreStats {
        self.store().stats().clone()
    }

    pub fn reset_store_stats(&self) {
        self.store().reset_stats()
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    pub fn new_session(&self, capacity: usize) -> Session {
        let c = &self.config;
        let t = self.chunk;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let inter = c.moe_intermediate_size.max(c.intermediate_size).max(c.shared_expert_intermediate_size);
        let k = self.top_k;
        let n_full = self.layers.iter().filter(|l| matches!(l.mixer, Mixer::Full(_))).count();
        let n_lin = self.layers.len() - n_full;
        let gated = c.architecture.is_hybrid();
        let (conv_ch, kern, hv, dkv, lin_in, hvdv) = match &c.linear {
            Some(la) => {
                let (hk, hv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
                (2 * hk * dk + hv * dv, la.conv_kernel, hv, dk * dv, 2 * hk * dk + 2 * hv * dv, hv * dv)
            }
            None => (0, 1, 0, 0, 0, 0),
        };
        Session {
            pos: 0,
            capacity,
            expert_counts: vec![0; c.num_layers * c.num_experts],
            trace: None,
            routing_reuse: RoutingReuse::default(),
            k: LineAlignedF32::zeroed(n_full * capacity * kvd),
            v: LineAlignedF32::zeroed(n_full * capacity * kvd),
            conv_state: vec![0.0; n_lin * conv_ch * kern.saturating_sub(1)],
            rec_state: vec![0.0; n_lin * hv * dkv],
            kvd,
            s: Scratch {
                x: vec![0.0; t * h],
                hn: vec![0.0; t * h],
                qg: vec![0.0; if gated { t * 2 * qd } else { 0 }],
                gate: vec![0.0; if gated { t * qd } else { 0 }],
                lin_in: vec![0.0; t * lin_in],
                lin_z: vec![0.0; t * hvdv],
                lin_ba: vec![0.0; t * 2 * hv],
                lin_qkv: vec![0.0; conv_ch],
                lin_o: vec![0.0; t * hvdv],
                sh_gate: vec![0.0; t],
                q: vec![0.0; t * qd],
                kk: vec![0.0; t * kvd],
                vv: vec![0.0; t * kvd],
                attn: vec![0.0; t * qd],
                o: vec![0.0; t * h],
                router: vec![0.0; t * c.num_experts],
                topk_idx: vec![0; t * k],
                topk_w: vec![0.0; t * k],
                moe_out: vec![0.0; t * h],
                gu: vec![0.0; t * 2 * inter],
                act: vec![0.0; t * inter],
                xin: vec![0.0; t * h],
                dn: vec![0.0; t * h],
                parts: vec![0.0; k * h],
                rope_cs: vec![0.0; t * 2 * self.inv_freq.len()],
                order: vec![0; t * k],
                offsets: vec![0; c.num_experts + 1],
                scores: vec![0.0; c.num_heads * capacity],
                // One row; grown only when a caller asks for every position's logits (a prefill-time request:
                // a full chunk of rows would be 155 MB at Qwen3's vocabulary).
                logits: vec![0.0; c.vocab_size],
                prev_topk: vec![0; c.num_layers * k],
                has_prev: false,
                la_hn: vec![0.0; h],
                la_router: vec![0.0; c.num_experts],
                la_idx: vec![0; k],
                la_w: vec![0.0; k],
            },
        }
    }

    /// Run `tokens` at positions `sess.pos..`, appending to the KV cache. Writes the logits of every position to
    /// `out` (`tokens.len() × vocab`) when `all_logits`, else only the last position's (`vocab`).
    pub fn forward(
        &self,
        sess: &mut Session,
        tokens: &[u32],
        all_logits: bool,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let v = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(ModelError::BadToken { token: bad, vocab: v });
        }
        if sess.pos + tokens.len() > sess.capacity {
            return Err(ModelError::ContextFull { needed: sess.pos + tokens.len(), capacity: sess.capacity });
        }
        out.clear();
        let chunks = tokens.len().div_ceil(self.chunk);
        for (ci, chunk) in tokens.chunks(self.chunk).enumerate() {
            let last = ci + 1 == chunks;
            self.forward_chunk(sess, chunk, all_logits || last, all_logits)?;
            let n = chunk.len();
            if all_logits {
                out.extend_from_slice(&sess.s.logits[..n * v]);
            } else if last {
                out.extend_from_slice(&sess.s.logits[..v]);
            }
        }
        Ok(())
    }

    fn forward_chunk(&self, sess: &mut Session, tokens: &[u32], logits: bool, all: bool) -> Result<(), ModelError> {
        let c = &self.config;
        let n = tokens.len();
        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let embd = self.resident.at(self.embd);
        for (t, &tok) in tokens.iter().enumerate() {
            dequant_row(embd, tok as usize, &mut sess.s.x[t * h..(t + 1) * h])?;
        }
        let m = 2 * self.inv_freq.len();
        for (t, cs) in sess.s.rope_cs[..n * m].chunks_exact_mut(m.max(1)).enumerate() {
            rope_cos_sin(&self.inv_freq, sess.pos + t, cs);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let s = &mut sess.s;
            for t in 0..n {
                rmsnorm(&s.x[t * h..(t + 1) * h], &layer.attn_norm, eps, &mut s.hn[t * h..(t + 1) * h]);
            }
            match &layer.mixer {
                Mixer::Full(a) => self.attention(a, sess, n)?,
                Mixer::Linear(g) => self.gdn(g, sess, n)?,
            }
            let s = &mut sess.s;
            for (x, o) in s.x[..n * h].iter_mut().zip(&s.o[..n * h]) {
                *x += o;
            }
            for t in 0..n {
                rmsnorm(&s.x[t * h..(t + 1) * h], &layer.ffn_norm, eps, &mut s.hn[t * h..(t + 1) * h]);
            }
            if layer.moe {
                self.moe(l, &mut sess.s, n)?;
                if let Some((w, gate)) = layer.shared {
                    self.shared_expert(w, gate, &mut sess.s, n)?;
                }
                let k = self.top_k;
                let s = &mut sess.s;
                let prev = &mut s.prev_topk[l * k..(l + 1) * k];
                if n == 1 && s.has_prev {
                    let repeated = s.topk_idx[..k].iter().filter(|e| prev.contains(e)).count();
                    sess.routing_reuse.repeated += repeated as u64;
                    sess.routing_reuse.choices += k as u64;
                }
                prev.copy_from_slice(&s.topk_idx[(n - 1) * k..n * k]);
                let e = c.num_experts;
                for &x in &sess.s.topk_idx[..n * self.top_k] {
                    sess.expert_counts[l * e + x as usize] += 1;
                }
                if let Some(tr) = sess.trace.as_mut() {
                    // Appended layer-major; reordered token-major once the chunk is done (below).
                    tr.extend_from_slice(&sess.s.topk_idx[..n * self.top_k]);
                }
            } else {
                self.dense_mlp(l, &mut sess.s, n)?;
            }
            let s = &mut sess.s;
            for (x, o) in s.x[..n * h].iter_mut().zip(&s.moe_out[..n * h]) {
                *x += o;
            }
        }
        if let Some(tr) = sess.trace.as_mut() {
            let k = self.top_k;
            let moe = self.layers.iter().filter(|l| l.moe).count();
            let start = tr.len() - moe * n * k;
            let chunk: Vec<u32> = tr[start..].to_vec();
            for t in 0..n {
                for m in 0..moe {
                    let src = (m * n + t) * k;
                    let dst = start + (t * moe + m) * k;
                    tr[dst..dst + k].copy_from_slice(&chunk[src..src + k]);
                }
            }
        }
        sess.pos += n;
        sess.s.has_prev = true;
        if logits {
            let s = &mut sess.s;
            let first = if all { 0 } else { n - 1 };
            let rows = n - first;
            for t in first..n {
                let (src, dst) = (t * h, (t - first) * h);
                rmsnorm(&s.x[src..src + h], &self.output_norm, eps, &mut s.hn[dst..dst + h]);
            }
            let head = self.resident.at(self.head);
            let v = c.vocab_size;
            if s.logits.len() < rows * v {
                s.logits.resize(rows * v, 0.0);
            }
            self.matmul(&view(head), &s.hn[..rows * h], rows, &mut s.logits[..rows * v])?;
        }
        Ok(())
    }

    /// Softmax attention of the chunk (input `s.hn`, output `s.o`), appending its keys and values to the cache.
    fn attention(&self, a: &FullAttn, sess: &mut Session, n: usize) -> Result<(), ModelError> {
        let FullAttn { wq, wk, wv, wo, q_norm, k_norm, gated, kv } = a;
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let (qd, kvd) = (nh * d, nkv * d);
        let eps = c.rms_norm_eps as f32;
        let (pos0, cap) = (sess.pos, sess.capacity);
        let w = |id: WeightId| view(self.resident.at(id));
        let s = &mut sess.s;
        // q_proj's output: [query | gate] per head when gated (split below), else the query.
        let qw = if *gated { 2 * qd } else { qd };
        let q_out = if *gated { &mut s.qg[..n * qw] } else { &mut s.q[..n * qw] };
        if n == 1 {
            // One pool run for q, k and v (per encoding): see `Dispatch::gemv_many`.
            let ys: &mut [&mut [f32]] = &mut [q_out, &mut s.kk[..kvd], &mut s.vv[..kvd]];
            self.dispatch.gemv_many(&self.pool, &[w(*wq), w(*wk), w(*wv)], &s.hn[..h], ys)?;
        } else {
            self.matmul(&w(*wq), &s.hn[..n * h], n, q_out)?;
            self.matmul(&w(*wk), &s.hn[..n * h], n, &mut s.kk[..n * kvd])?;
            self.matmul(&w(*wv), &s.hn[..n * h], n, &mut s.vv[..n * kvd])?;
        }
        if *gated {
            for t in 0..n {
                for hd in 0..nh {
                    let src = &s.qg[t * 2 * qd + hd * 2 * d..t * 2 * qd + (hd + 1) * 2 * d];
                    s.q[t * qd + hd * d..t * qd + (hd + 1) * d].copy_from_slice(&src[..d]);
                    s.gate[t * qd + hd * d..t * qd + (hd + 1) * d].copy_from_slice(&src[d..]);
                }
            }
        }
        let kbase = kv * cap * kvd;
        for t in 0..n {
            let q = &mut s.q[t * qd..(t + 1) * qd];
            rmsnorm_heads_inplace(q, q_norm, eps);
            let cs = &s.rope_cs[t * 2 * self.inv_freq.len()..(t + 1) * 2 * self.inv_freq.len()];
            rope_neox_with(q, d, cs);
            let k = &mut s.kk[t * kvd..(t + 1) * kvd];
            rmsnorm_heads_inplace(k, k_norm, eps);
            rope_neox_with(k, d, cs);
            let at = kbase + (pos0 + t) * kvd;
            sess.k[at..at + kvd].copy_from_slice(k);
            sess.v[at..at + kvd].copy_from_slice(&s.vv[t * kvd..(t + 1) * kvd]);
        }
        {
            let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: d, scale: 1.0 / (d as f32).sqrt() };
            let kernels = AttnDispatch::best();
            let kc = &sess.k[kbase..kbase + cap * kvd];
            let vc = &sess.v[kbase..kbase + cap * kvd];
            let q = &s.q;
            let hb = heads_per_task(shape.group(), nh, self.pool.n_threads());
            // One task per block of `hb` query heads of one kv head, each walking the chunk's tokens in order;
            // a head's result does not depend on `hb`, so neither does anything downstream.
            let scores = SharedMut::new(&mut s.scores);
            let attn = SharedMut::new(&mut s.attn);
            self.pool.run(nh / hb, &|task| {
                let h0 = task * hb;
                // SAFETY: task `task` owns scores rows `h0..h0 + hb` and that column block of every attn row; no
                // other task writes them.
                let sc = unsafe { scores.slice(h0 * cap, hb * cap) };
                for t in 0..n {
                    let o = unsafe { attn.slice(t * qd + h0 * d, hb * d) };
                    let qt = &q[t * qd..(t + 1) * qd];
                    kernels.attend(&shape, qt, kc, vc, pos0 + t + 1, h0..h0 + hb, sc, o);
                }
            });
        }
        if *gated {
            for (a, &g) in s.attn[..n * qd].iter_mut().zip(&s.gate[..n * qd]) {
                *a *= sigmoid(g);
            }
        }
        self.matmul(&w(*wo), &s.attn[..n * qd], n, &mut s.o[..n * h])
    }

    /// A Gated DeltaNet layer over the chunk (input `s.hn`, output `s.o`), token by token through the session's
    /// conv and recurrent state.
    fn gdn(&self, g: &Gdn, sess: &mut Session, n: usize) -> Result<(), ModelError> {
        let c = &self.config;
        let la = c.linear.as_ref().expect("linear layers have a linear config");
        let h = c.hidden_size;
        let (hk, hv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
        let (kern, r) = (la.conv_kernel, hv / hk);
        let (kd, vd) = (hk * dk, hv * dv);
        let ch = 2 * kd + vd;
        let eps = c.rms_norm_eps as f32;
        let w = |id: WeightId| view(self.resident.at(id));
        let s = &mut sess.s;
        // Projections for the whole chunk. Separate: qkv rows into lin_in, z, and [b | a] per token. Fused: qkvz
        // into lin_in and [b·r | a·r] per key head into lin_ba, unpacked per token below.
        let in_w = match &g.proj {
            GdnProj::Separate { qkv, z, b, a } => {
                self.matmul(&w(*qkv), &s.hn[..n * h], n, &mut s.lin_in[..n * ch])?;
                self.matmul(&w(*z), &s.hn[..n * h], n, &mut s.lin_z[..n * vd])?;
                // b and a land in separate halves of lin_ba: [n × hv] then [n × hv].
                let (bb, aa) = s.lin_ba[..2 * n * hv].split_at_mut(n * hv);
                self.matmul(&w(*b), &s.hn[..n * h], n, bb)?;
                self.matmul(&w(*a), &s.hn[..n * h], n, aa)?;
                ch
            }
            GdnProj::Fused { qkvz, ba } => {
                self.matmul(&w(*qkvz), &s.hn[..n * h], n, &mut s.lin_in[..n * (ch + vd)])?;
                self.matmul(&w(*ba), &s.hn[..n * h], n, &mut s.lin_ba[..n * 2 * hv])?;
                ch + vd
            }
            GdnProj::SplitFusedBa { qkv, z, ba } => {
                self.matmul(&w(*qkv), &s.hn[..n * h], n, &mut s.lin_in[..n * ch])?;
                self.matmul(&w(*z), &s.hn[..n * h], n, &mut s.lin_z[..n * vd])?;
                self.matmul(&w(*ba), &s.hn[..n * h], n, &mut s.lin_ba[..n * 2 * hv])?;
                ch
            }
        };
        // [b·r | a·r] per key head → b then a in value-head order, in place through a small buffer.
        let unfuse_ba = |ba: &mut [f32]| -> Result<(), ModelError> {
            let mut tmp = [0f32; 256];
            if 2 * hv > tmp.len() {
                return Err(ModelError::Unsupported(format!("{hv} linear value heads above 128")));
            }
            for i in 0..hk {
                tmp[i * r..(i + 1) * r].copy_from_slice(&ba[i * 2 * r..i * 2 * r + r]);
                tmp[hv + i * r..hv + (i + 1) * r].copy_from_slice(&ba[i * 2 * r + r..(i + 1) * 2 * r]);
            }
            ba.copy_from_slice(&tmp[..2 * hv]);
            Ok(())
        };
        let conv_len = ch * (kern - 1);
        let conv_state = &mut sess.conv_state[g.state * conv_len..(g.state + 1) * conv_len];
        let rec = &mut sess.rec_state[g.state * hv * dk * dv..(g.state + 1) * hv * dk * dv];
        let q_scale = 1.0 / (dk as f32).sqrt();
        for t in 0..n {
            let row = &s.lin_in[t * in_w..(t + 1) * in_w];
            let qkv = &mut s.lin_qkv[..ch];
            let (beta_at, a_at);
            match g.proj {
                GdnProj::Separate { .. } => {
                    qkv.copy_from_slice(row);
                    (beta_at, a_at) = (t * hv, n * hv + t * hv);
                }
                GdnProj::Fused { .. } => {
                    // Per key head i: [q_i | k_i | v_i (r heads) | z_i (r heads)] → qkv layout and z.
                    let grp = 2 * dk + 2 * r * dv;
                    for i in 0..hk {
                        let b = &row[i * grp..(i + 1) * grp];
                        qkv[i * dk..(i + 1) * dk].copy_from_slice(&b[..dk]);
                        qkv[kd + i * dk..kd + (i + 1) * dk].copy_from_slice(&b[dk..2 * dk]);
                        qkv[2 * kd + i * r * dv..2 * kd + (i + 1) * r * dv]
                            .copy_from_slice(&b[2 * dk..2 * dk + r * dv]);
                        s.lin_z[t * vd + i * r * dv..t * vd + (i + 1) * r * dv].copy_from_slice(&b[2 * dk + r * dv..]);
                    }
                    unfuse_ba(&mut s.lin_ba[t * 2 * hv..(t + 1) * 2 * hv])?;
                    (beta_at, a_at) = (t * 2 * hv, t * 2 * hv + hv);
                }
                GdnProj::SplitFusedBa { .. } => {
                    qkv.copy_from_slice(row);
                    unfuse_ba(&mut s.lin_ba[t * 2 * hv..(t + 1) * 2 * hv])?;
                    (beta_at, a_at) = (t * 2 * hv, t * 2 * hv + hv);
                }
            }
            conv1d_silu_step(qkv, &g.conv, conv_state, kern);
            let (qs, rest) = qkv.split_at_mut(kd);
            let (ks, vs) = rest.split_at_mut(kd);
            for i in 0..hk {
                l2norm_inplace(&mut qs[i * dk..(i + 1) * dk], 1e-6);
                l2norm_inplace(&mut ks[i * dk..(i + 1) * dk], 1e-6);
            }
            qs.iter_mut().for_each(|v| *v *= q_scale);
            // Value heads are independent: one pool task each (the state, dk·dv floats per head, dominates).
            let (qs, ks, vs) = (&*qs, &*ks, &*vs);
            let ba = &s.lin_ba;
            let o_all = SharedMut::new(&mut s.lin_o[t * vd..(t + 1) * vd]);
            let st = SharedMut::new(rec);
            self.pool.run(hv, &|hh| {
                let i = if g.v_tiled { hh % hk } else { hh / r };
                let beta = sigmoid(ba[beta_at + hh]);
                let gg = g.neg_a[hh] * softplus(ba[a_at + hh] + g.dt_bias[hh]);
                // SAFETY: task `hh` alone touches state block `hh` and output block `hh`.
                let (state, out) = unsafe { (st.slice(hh * dk * dv, dk * dv), o_all.slice(hh * dv, dv)) };
                delta_rule_step(
                    state,
                    &qs[i * dk..(i + 1) * dk],
                    &ks[i * dk..(i + 1) * dk],
                    &vs[hh * dv..(hh + 1) * dv],
                    gg,
                    beta,
                    out,
                );
            });
            let o = &mut s.lin_o[t * vd..(t + 1) * vd];
            rmsnorm_gated_inplace(o, &s.lin_z[t * vd..(t + 1) * vd], &g.norm, eps);
        }
        self.matmul(&w(g.out), &s.lin_o[..n * vd], n, &mut s.o[..n * h])
    }

    /// Add the shared expert, scaled per token by `sigmoid(gate · x)`, to `s.moe_out` (input `s.hn`).
    fn shared_expert(
        &self,
        [gate, up, down]: [WeightId; 3],
        gw: WeightId,
        s: &mut Scratch,
        n: usize,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (h, is) = (c.hidden_size, c.shared_expert_intermediate_size);
        let w = |id: WeightId| view(self.resident.at(id));
        self.matmul(&w(gate), &s.hn[..n * h], n, &mut s.gu[..n * is])?;
        self.matmul(&w(up), &s.hn[..n * h], n, &mut s.act[..n * is])?;
        for (a, g) in s.act[..n * is].iter_mut().zip(&s.gu[..n * is]) {
            *a *= silu(*g);
        }
        self.matmul(&w(down), &s.act[..n * is], n, &mut s.dn[..n * h])?;
        self.matmul(&w(gw), &s.hn[..n * h], n, &mut s.sh_gate[..n])?;
        for t in 0..n {
            let sg = sigmoid(s.sh_gate[t]);
            for (o, &v) in s.moe_out[t * h..(t + 1) * h].iter_mut().zip(&s.dn[t * h..(t + 1) * h]) {
                *o += sg * v;
            }
        }
        Ok(())
    }

    fn matmul(&self, w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), ModelError> {
        if n == 1 {
            self.dispatch.gemv(&self.pool, w, x, y)?;
        } else {
            self.dispatch.gemm(&self.pool, w, x, n, y)?;
        }
        Ok(())
    }

    fn dense_mlp(&self, l: usize, s: &mut Scratch, n: usize) -> Result<(), ModelError> {
        let c = &self.config;
        let (h, im) = (c.hidden_size, c.intermediate_size);
        let [gate, up, down] = self.layers[l].dense.expect("a dense layer has gate, up and down");
        let w = |id: WeightId| view(self.resident.at(id));
        self.matmul(&w(gate), &s.hn[..n * h], n, &mut s.gu[..n * im])?;
        self.matmul(&w(up), &s.hn[..n * h], n, &mut s.act[..n * im])?;
        for (a, g) in s.act[..n * im].iter_mut().zip(&s.gu[..n * im]) {
            *a *= silu(*g);
        }
        self.matmul(&w(down), &s.act[..n * im], n, &mut s.moe_out[..n * h])
    }

    /// Decode of one MoE layer whose `ensure_begin` left reads in flight: gate_up and down of the experts already
    /// resident (slot ≠ `EMPTY_SLOT`) first, overlapping the reads, then `ensure_end` and the experts that arrived.
    /// Experts are computed in that order (hits, then misses) into `act` and `parts`, and summed in choice order
    /// by `sum_parts`, so the output is bit-identical to the one-pass gathered form at any cache size.
    fn moe_decode_overlapped(
        &self,
        l: usize,
        s: &mut Scratch,
        store: &mut std::sync::MutexGuard<'_, ExpertStore>,
        slots: &mut [u32],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (h, im, k) = (c.hidden_size, c.moe_intermediate_size, slots.len());
        // Choice indices, hits first; `at[j]` is where choice j's activations and part go.
        let (mut order, mut at) = ([0usize; 32], [0usize; 32]);
        let mut n_hit = 0;
        for (j, &sl) in slots.iter().enumerate() {
            if sl != EMPTY_SLOT {
                order[n_hit] = j;
                n_hit += 1;
            }
        }
        let mut p = n_hit;
        for (j, &sl) in slots.iter().enumerate() {
            if sl == EMPTY_SLOT {
                order[p] = j;
                p += 1;
            }
        }
        for (p, &j) in order[..k].iter().enumerate() {
            at[j] = p;
        }
        let (pool, d) = (&self.pool, &self.dispatch);
        let x = &s.hn[..h];
        let run = |store: &std::sync::MutexGuard<'_, ExpertStore>,
                   slots: &[u32],
                   range: std::ops::Range<usize>,
                   act: &mut [f32],
                   parts: &mut [f32]|
         -> Result<(), ModelError> {
            if range.is_empty() {
                return Ok(());
            }
            let layer = store.layer(l).ok_or_else(|| ModelError::Unsupported(format!("layer {l} has no experts")))?;
            let mut views_gu = [slot_view(layer.gate_up, slots[order[range.start]], 2 * im, h); 32];
            let mut views_dn = [slot_view(layer.down, slots[order[range.start]], h, im); 32];
            for (q, &j) in order[range.clone()].iter().enumerate() {
                views_gu[q] = slot_view(layer.gate_up, slots[j], 2 * im, h);
                views_dn[q] = slot_view(layer.down, slots[j], h, im);
            }
            let m = range.len();
            let (a, pt) = (&mut act[range.start * im..range.end * im], &mut parts[range.start * h..range.end * h]);
            d.gathered_gate_up(pool, &views_gu[..m], x, a)?;
            d.gathered_down_parts(pool, &views_dn[..m], a, pt)?;
            Ok(())
        };
        let (act, parts) = (&mut s.act[..k * im], &mut s.parts[..k * h]);
        run(store, slots, 0..n_hit, act, parts)?;
        store.ensure_end(slots)?;
        if slots.contains(&EMPTY_SLOT) {
            return Err(ModelError::Unsupported(format!("layer {l}: an expert read did not complete")));
        }
        run(store, slots, n_hit..k, act, parts)?;
        sum_parts(parts, &at[..k], &s.topk_w[..k], &mut s.moe_out[..h])?;
        Ok(())
    }

    fn moe(&self, l: usize, s: &mut Scratch, n: usize) -> Result<(), ModelError> {
        let c = &self.config;
        let (h, e, im, k) = (c.hidden_size, c.num_experts, c.moe_intermediate_size, self.top_k);
        let router = self.resident.at(self.layers[l].router.expect("a MoE layer has a router"));
        self.matmul(&view(router), &s.hn[..n * h], n, &mut s.router[..n * e])?;
        for t in 0..n {
            let r = &mut s.router[t * e..(t + 1) * e];
            softmax_inplace(r);
            let (idx, wts) = (&mut s.topk_idx[t * k..(t + 1) * k], &mut s.topk_w[t * k..(t + 1) * k]);
            top_k(r, k, idx, wts);
            if c.norm_topk_prob {
                let sum: f32 = wts.iter().sum();
                wts.iter_mut().for_each(|w| *w /= sum);
            }
        }
        let mut store = self.store();
        if n == 1 {
            // Decode: make the token's k experts resident, then one gathered pass per projection over their slots.
            let mut slots = [0u32; 32];
            if k > slots.len() {
                return Err(ModelError::Unsupported(format!("top-k {k} above 32")));
            }
            let overlap = self.kernels.stacked && self.kernels.fuse_gate_up;
            let pending = store.ensure_begin(l, &s.topk_idx[..k], &mut slots[..k])?;
            if pending > 0 && overlap {
                // Compute the resident experts while the missed ones are read, then the rest.
                self.moe_decode_overlapped(l, s, &mut store, &mut slots[..k])?;
            } else {
                store.ensure_end(&mut slots[..k])?;
            }
            if let Some(nl) = self.next_moe[l] {
                match self.prefetch {
                    Prefetch::None => {}
                    Prefetch::Prev if s.has_prev => store.prefetch(nl, &s.prev_topk[nl * k..(nl + 1) * k], &[]),
                    Prefetch::Prev => {}
                    Prefetch::Lookahead => {
                        // The residual stream as layer l's experts see it, normalised as layer nl would normalise
                        // its own input: a cheap stand-in for nl's router input.
                        rmsnorm(&s.x[..h], &self.layers[nl].ffn_norm, c.rms_norm_eps as f32, &mut s.la_hn);
                        let r = self.resident.at(self.layers[nl].router.expect("a MoE layer has a router"));
                        self.matmul(&view(r), &s.la_hn, 1, &mut s.la_router)?;
                        top_k(&s.la_router, k, &mut s.la_idx, &mut s.la_w);
                        store.prefetch(nl, &s.la_idx, &[]);
                    }
                }
            }
            if pending > 0 && overlap {
                return Ok(());
            }
            let layer = store.layer(l).ok_or_else(|| ModelError::Unsupported(format!("layer {l} has no experts")))?;
            let mut views_gu = [slot_view(layer.gate_up, slots[0], 2 * im, h); 32];
            let mut views_dn = [slot_view(layer.down, slots[0], h, im); 32];
            for j in 0..k {
                views_gu[j] = slot_view(layer.gate_up, slots[j], 2 * im, h);
                views_dn[j] = slot_view(layer.down, slots[j], h, im);
            }
            let (x, act, out) = (&s.hn[..h], &mut s.act[..k * im], &mut s.moe_out[..h]);
            let (pool, d) = (&self.pool, &self.dispatch);
            match (self.kernels.stacked, self.kernels.fuse_gate_up) {
                (true, true) => d.gathered_gate_up(pool, &views_gu[..k], x, act)?,
                (true, false) => {
                    let mut gate = [views_gu[0]; 32];
                    let mut up = [views_gu[0]; 32];
                    for j in 0..k {
                        (gate[j], up[j]) = split_rows(&views_gu[j], im);
                    }
                    d.gathered_gate_up_split(pool, &gate[..k], &up[..k], x, act)?;
                }
                (false, fuse) => {
                    for j in 0..k {
                        let a = &mut act[j * im..(j + 1) * im];
                        if fuse {
                            d.gathered_gate_up(pool, &views_gu[j..j + 1], x, a)?;
                        } else {
                            let (g, u) = split_rows(&views_gu[j], im);
                            d.gathered_gate_up_split(pool, &[g], &[u], x, a)?;
                        }
                    }
                }
            }
            if self.kernels.stacked {
                d.gathered_down(pool, &views_dn[..k], act, &s.topk_w[..k], out)?;
            } else {
                // k separate calls, summed in choice order exactly as the gathered kernel does.
                out.fill(0.0);
                for j in 0..k {
                    let y = &mut s.dn[..h];
                    d.gemv(pool, &views_dn[j], &act[j * im..(j + 1) * im], y)?;
                    for (o, &v) in out.iter_mut().zip(y.iter()) {
                        *o += s.topk_w[j] * v;
                    }
                }
            }
            return Ok(());
        }
        // Prefill: counting sort of (token, choice) pairs by expert, then one GEMM pair per used expert.
        let offs = &mut s.offsets;
        offs.fill(0);
        for &x in &s.topk_idx[..n * k] {
            offs[x as usize + 1] += 1;
        }
        for i in 0..e {
            offs[i + 1] += offs[i];
        }
        let mut fill = [0u32; 1024];
        if e > fill.len() {
            return Err(ModelError::Unsupported(format!("{e} experts above 1024")));
        }
        fill[..e].copy_from_slice(&offs[..e]);
        for (pair, &x) in s.topk_idx[..n * k].iter().enumerate() {
            s.order[fill[x as usize] as usize] = pair as u32;
            fill[x as usize] += 1;
        }
        s.moe_out[..n * h].fill(0.0);
        // The chunk's experts in waves of up to one layer's slots: each wave's misses are read as one concurrent
        // batch, every expert at most once per wave, and a cache of only top-k slots still works however many
        // distinct experts the chunk routes to. Experts run in expert order, so results do not depend on the waves.
        let mut used = [0u32; 1024];
        let mut nused = 0;
        for ex in 0..e {
            if offs[ex + 1] > offs[ex] {
                used[nused] = ex as u32;
                nused += 1;
            }
        }
        let mut wave_slots = [0u32; 1024];
        // With prefetch on, waves take half the slots so the next wave can be read into the other half while this
        // one computes (its experts are kept from eviction); the set of experts and their order do not change.
        let slots = store.slots_per_layer().max(1);
        let wave_len = if self.prefetch == Prefetch::None || slots < 2 { slots } else { slots / 2 };
        let mut waves = used[..nused].chunks(wave_len).peekable();
        while let Some(wave) = waves.next() {
            store.ensure(l, wave, &mut wave_slots[..wave.len()])?;
            if self.prefetch != Prefetch::None
                && let Some(next) = waves.peek()
            {
                store.prefetch(l, next, wave);
            }
            let layer = store.layer(l).ok_or_else(|| ModelError::Unsupported(format!("layer {l} has no experts")))?;
            for (&ex, &slot) in wave.iter().zip(&wave_slots) {
                let ex = ex as usize;
                let (a, b) = (offs[ex] as usize, offs[ex + 1] as usize);
                let cnt = b - a;
                for (r, &pair) in s.order[a..b].iter().enumerate() {
                    let t = pair as usize / k;
                    s.xin[r * h..(r + 1) * h].copy_from_slice(&s.hn[t * h..(t + 1) * h]);
                }
                self.matmul(
                    &slot_view(layer.gate_up, slot, 2 * im, h),
                    &s.xin[..cnt * h],
                    cnt,
                    &mut s.gu[..cnt * 2 * im],
                )?;
                for r in 0..cnt {
                    let row = &s.gu[r * 2 * im..(r + 1) * 2 * im];
                    for i in 0..im {
                        s.act[r * im + i] = silu(row[i]) * row[im + i];
                    }
                }
                self.matmul(&slot_view(layer.down, slot, h, im), &s.act[..cnt * im], cnt, &mut s.dn[..cnt * h])?;
                for (r, &pair) in s.order[a..b].iter().enumerate() {
                    let t = pair as usize / k;
                    let wt = s.topk_w[pair as usize];
                    for (o, &v) in s.moe_out[t * h..(t + 1) * h].iter_mut().zip(&s.dn[r * h..(r + 1) * h]) {
                        *o += wt * v;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Query heads per attention task: the largest divisor of the GQA group size that still leaves 4 tasks per
/// thread (so a slow or shared core does not hold up the layer), since heads of one task share every K/V row
/// load.
fn heads_per_task(group: usize, n_heads: usize, threads: usize) -> usize {
    (1..=group).rev().find(|&hb| group.is_multiple_of(hb) && n_heads / hb >= 4 * threads).unwrap_or(1)
}

/// Zeroed f32 storage starting on a 64-byte boundary. For the KV cache: a row is `kv heads × d` floats (a
/// multiple of 64 bytes for every head dim of 16·k), so each kv head's slice of a row then starts on a cache line
/// and the attention kernels' 64-byte loads never straddle two (a `Vec<f32>` of this size comes from `mmap` at
/// 16 bytes past a page, and split loads halved the AVX-512 kernel's L1 throughput).
struct LineAlignedF32 {
    lines: Vec<CacheLine>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

impl LineAlignedF32 {
    fn zeroed(len: usize) -> Self {
        LineAlignedF32 { lines: vec![CacheLine([0.0; 16]); len.div_ceil(16)], len }
    }
}

impl std::ops::Deref for LineAlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `CacheLine` is 16 f32s with no padding, so `lines` holds `16 · lines.len() ≥ len` initialised
        // f32s, contiguous and suitably aligned.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for LineAlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as `deref`, through the unique borrow of `lines`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// A mutable slice shared across pool tasks that each write disjoint ranges.
struct SharedMut<'a> {
    ptr: *mut f32,
    len: usize,
    _p: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only obtain disjoint sub-slices (the callers' SAFETY notes say why), so sharing the pointer across
// the pool's threads cannot create overlapping mutable access.
unsafe impl Sync for SharedMut<'_> {}

impl<'a> SharedMut<'a> {
    fn new(s: &'a mut [f32]) -> Self {
        SharedMut { ptr: s.as_mut_ptr(), len: s.len(), _p: std::marker::PhantomData }
    }

    /// # Safety
    /// No two live slices from this value may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        assert!(at + len <= self.len, "SharedMut range {at}+{len} past {}", self.len);
        // SAFETY: in bounds (checked above); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }
}
