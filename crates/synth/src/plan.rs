//! What a synthetic model contains: presets → config, config → the list of canonical tensors with their logical
//! shapes and how to fill them.

use moestream_format::config::{Architecture, LayerAttention, LinearAttentionConfig, ModelConfig};

use crate::rng::SplitMix64;

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// RMSNorm weights: near 1, so activations keep their scale.
    Norm,
    /// A linear layer: variance 1/fan_in, so activations neither explode nor vanish through depth.
    Linear { fan_in: usize },
    /// Router: wider than a plain linear so that softmax over experts is not flat and top-k varies by token.
    /// With `skew` > 0 (`--routing-skew`), each row also gets a component along the embeddings' shared direction
    /// whose size follows a Zipf-like profile over a per-layer permutation of the experts (see [`RoutingSkew`]).
    Router { fan_in: usize, skew: RoutingSkew },
    /// Token embeddings; with `--routing-skew` every row also carries the shared component [`shared_direction`].
    Embedding { shared: f32 },
    /// The output projection with the shared direction projected out of every row, so that `--routing-skew`
    /// skews routing without also biasing which tokens are sampled.
    Unembedding { fan_in: usize },
    /// Uniform on `[lo, hi)` (Gated DeltaNet's `A_log` and `dt_bias`).
    Range { lo: f32, hi: f32 },
}

#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Canonical (GGUF-style) name.
    pub name: String,
    /// Logical shape, outermost first; stacked experts have the expert count first.
    pub shape: Vec<usize>,
    pub fill: Fill,
    /// Subtracted from every generated value: a writer's storage convention (HF hybrids store RMSNorm weights
    /// zero-centred, `w − 1`), so the model's effective weights are the same in every format.
    pub stored_offset: f32,
}

impl PlannedTensor {
    pub fn is_expert_stack(&self) -> bool {
        self.name.contains("_exps.")
    }
    /// (rows, cols) of one matrix (one expert's for a stack).
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            [_, r, c] => (*r, *c),
            _ => (0, 0),
        }
    }
    pub fn experts(&self) -> usize {
        if self.is_expert_stack() { self.shape[0] } else { 1 }
    }

    /// Generation units: one per expert for a stack; for a plain tensor, blocks of [`UNIT_ROWS`] rows, each with
    /// its own stream, so big trunk tensors (a 151936-row embedding) are generated on every core too.
    pub fn units(&self) -> usize {
        if self.is_expert_stack() { self.shape[0] } else { self.matrix_dims().0.div_ceil(UNIT_ROWS) }
    }

    /// Rows of unit `u`.
    pub fn unit_rows(&self, u: usize) -> usize {
        let rows = self.matrix_dims().0;
        if self.is_expert_stack() { rows } else { UNIT_ROWS.min(rows - u * UNIT_ROWS) }
    }

    /// The values of unit `u` (an expert, or a row block), row-major `[unit_rows, cols]`.
    pub fn generate(&self, seed: u64, u: usize, out: &mut [f32]) {
        let mut rng = SplitMix64::for_tensor(seed, &self.name, u);
        // Uniform on [-a, a) has variance a²/3.
        match self.fill {
            Fill::Norm => {
                rng.fill_uniform(out, 0.1);
                out.iter_mut().for_each(|x| *x += 1.0);
            }
            Fill::Linear { fan_in } => rng.fill_uniform(out, (3.0 / fan_in as f32).sqrt()),
            Fill::Router { fan_in, skew } => {
                rng.fill_uniform(out, ROUTER_SCALE * (3.0 / fan_in as f32).sqrt());
                if skew.strength > 0.0 {
                    skew.apply(seed, &self.name, out, fan_in);
                }
            }
            Fill::Embedding { shared } => {
                rng.fill_uniform(out, 1.0);
                if shared != 0.0 {
                    let c = shared_component(seed, self.matrix_dims().1);
                    for row in out.chunks_mut(c.len()) {
                        row.iter_mut().zip(&c).for_each(|(x, c)| *x += shared * c);
                    }
                }
            }
            Fill::Unembedding { fan_in } => {
                rng.fill_uniform(out, (3.0 / fan_in as f32).sqrt());
                let u = shared_direction(seed, fan_in);
                out.chunks_mut(fan_in).for_each(|row| project_out(row, &u));
            }
            Fill::Range { lo, hi } => {
                rng.fill_uniform(out, (hi - lo) / 2.0);
                out.iter_mut().for_each(|x| *x += (hi + lo) / 2.0);
            }
        }
        if self.stored_offset != 0.0 {
            out.iter_mut().for_each(|x| *x -= self.stored_offset);
        }
    }
}

/// The router's uniform half-width in units of a plain linear's: router logits have a standard deviation of
/// this value over tokens when the normalised hidden state has unit RMS.
const ROUTER_SCALE: f32 = 4.0;

/// Skewed routing (`--routing-skew S`, issue 7): gives every MoE layer Zipf-like popular experts. With S > 0
/// every token embedding carries one shared component `c` (as large as the token's own part), and router row e
/// of MoE layer l becomes `noise_e − (noise_e·u)u + γ·z_e·u` with `u = c/|c|`: the normalised hidden state's
/// projection on `u` is nearly the same for every token, so `γ·z_e·(u·x̂)` acts as a per-expert logit bias, while
/// the noise part still varies by token. `z_e = −(ln r_e − mean)` for expert e's rank `r_e` in a per-layer random
/// permutation (Zipf-like: under Gumbel noise, top-1 popularity would be exactly ∝ 1/r), scaled so that the bias
/// is `S` in units of the token-varying logit noise at the embedding.
///
/// γ is the same at every depth. An earlier version grew it with depth, assuming each sub-layer adds
/// token-specific variance that dilutes `c`; on the 48-layer Qwen3-30B-A3B shape that over-skewed every layer
/// (88% reuse) and greedy decoding locked onto one repeated token. Deep random layers do the opposite: their
/// residual streams converge, so the unskewed file already repeats 47% of a token's top-8 at the next token
/// with random decode input (BENCHMARKS, "routing skew").
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RoutingSkew {
    /// Bias size per unit of `z`, in units of the token-varying router-logit noise (0 = no skew).
    pub strength: f32,
}

/// The embeddings' shared component relative to their token-specific part (both uniform on [−1, 1)).
pub const SHARED_SCALE: f32 = 1.0;

/// Bias per unit of `--routing-skew`, in units of the token-varying noise. Measured on the Qwen3-30B-A3B shape
/// (gguf-q4_0, `bench --decode-input random`, 8 + 64 tokens): skew 1 repeats 63% of a token's top-8 (of 128) at
/// the next token over 48 layers, against 47% unskewed; uniform routing would give 6%.
const SKEW_UNIT: f32 = 0.8;

impl RoutingSkew {
    /// The skew of every MoE layer for `--routing-skew s`.
    pub fn new(s: f32) -> RoutingSkew {
        if s <= 0.0 {
            return RoutingSkew::default();
        }
        RoutingSkew { strength: s * SKEW_UNIT }
    }

    /// Rewrite router rows `out` (`[experts, fan_in]`) of tensor `name`.
    fn apply(self, seed: u64, name: &str, out: &mut [f32], fan_in: usize) {
        let u = shared_direction(seed, fan_in);
        let experts = out.len() / fan_in;
        // Ranks: a permutation per layer, so each layer has its own popular experts.
        let mut rank: Vec<usize> = (0..experts).collect();
        let mut rng = SplitMix64::for_tensor(seed, &format!("{name}/routing-skew"), 0);
        for i in (1..experts).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            rank.swap(i, j);
        }
        let mean_ln = (1..=experts).map(|r| (r as f32).ln()).sum::<f32>() / experts as f32;
        // u·x̂ ≈ √fan_in·cos θ and the token-varying noise is ROUTER_SCALE·sin θ, so a bias of `strength·z` in
        // noise units needs γ = strength·ROUTER_SCALE·tan θ / √fan_in along u; at the embedding tan θ is
        // 1/SHARED_SCALE (the shared and the token's own part are equally large).
        let gamma = self.strength * ROUTER_SCALE / SHARED_SCALE / (fan_in as f32).sqrt();
        for (e, row) in out.chunks_mut(fan_in).enumerate() {
            project_out(row, &u);
            let z = -((rank[e] + 1) as f32).ln() + mean_ln;
            row.iter_mut().zip(&u).for_each(|(x, u)| *x += gamma * z * u);
        }
    }
}

/// The embeddings' shared component `c` (uniform on [−1, 1), its own stream).
pub fn shared_component(seed: u64, hidden: usize) -> Vec<f32> {
    let mut c = vec![0f32; hidden];
    SplitMix64::for_tensor(seed, "moestream.routing_skew.shared", 0).fill_uniform(&mut c, 1.0);
    c
}

/// `c / |c|`.
pub fn shared_direction(seed: u64, hidden: usize) -> Vec<f32> {
    let mut u = shared_component(seed, hidden);
    let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    u.iter_mut().for_each(|x| *x /= norm);
    u
}

/// `row −= (row·u)·u` for a unit vector `u`.
fn project_out(row: &mut [f32], u: &[f32]) {
    let d: f32 = row.iter().zip(u).map(|(x, u)| x * u).sum();
    row.iter_mut().zip(u).for_each(|(x, u)| *x -= d * u);
}

/// Rows per generation unit of a plain tensor.
pub const UNIT_ROWS: usize = 1024;

/// Named model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 2 layers, hidden 256, 8 experts top-2: a few MB, for tests.
    TinyQwen3Moe,
    /// Qwen3-30B-A3B's real shapes: 48 layers, hidden 2048, 128 experts top-8, moe_intermediate 768.
    Qwen3_30bA3b,
    /// The Qwen3.5 hybrid (Gated DeltaNet + gated attention every 4th layer + shared expert), tiny: 4 layers,
    /// hidden 256, 8 experts top-2.
    TinyQwen35Moe,
    /// Qwen3.5-35B-A3B's real shapes: 40 layers, hidden 2048, 16/2 heads of 256, GDN 16 key / 32 value heads of
    /// 128, 256 experts top-8 + 1 shared, moe_intermediate 512, vocab 248320.
    Qwen35_35bA3b,
    /// Qwen3.5-122B-A10B's real shapes: 48 layers, hidden 3072, 32/2 heads of 256, GDN 16 key / 64 value heads of
    /// 128, 256 experts top-8 + 1 shared, moe_intermediate 1024, vocab 248320.
    Qwen35_122bA10b,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Preset::TinyQwen3Moe,
        Preset::Qwen3_30bA3b,
        Preset::TinyQwen35Moe,
        Preset::Qwen35_35bA3b,
        Preset::Qwen35_122bA10b,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::TinyQwen3Moe => "tiny-qwen3-moe",
            Preset::Qwen3_30bA3b => "qwen3-30b-a3b",
            Preset::TinyQwen35Moe => "tiny-qwen3.5-moe",
            Preset::Qwen35_35bA3b => "qwen3.5-35b-a3b",
            Preset::Qwen35_122bA10b => "qwen3.5-122b-a10b",
        }
    }

    pub fn is_hybrid(self) -> bool {
        matches!(self, Preset::TinyQwen35Moe | Preset::Qwen35_35bA3b | Preset::Qwen35_122bA10b)
    }

    pub fn from_name(s: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The config of this preset, optionally cut to `layers` layers (keeping the real width).
    pub fn config(self, layers: Option<usize>, vocab: &crate::tokenizer::SynthVocab) -> ModelConfig {
        let mut c = match self {
            Preset::TinyQwen3Moe => ModelConfig {
                architecture: Architecture::Qwen3Moe,
                hidden_size: 256,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 64,
                vocab_size: TINY_VOCAB,
                intermediate_size: 512,
                moe_intermediate_size: 256,
                num_experts: 8,
                num_experts_per_tok: 2,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: Vec::new(),
                shared_expert_intermediate_size: 0,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                partial_rotary_factor: 1.0,
                max_position_embeddings: 4096,
                tie_word_embeddings: false,
                layer_types: Vec::new(),
                linear: None,
                bos_token_id: None,
                eos_token_ids: Vec::new(),
            },
            Preset::Qwen3_30bA3b => ModelConfig {
                architecture: Architecture::Qwen3Moe,
                hidden_size: 2048,
                num_layers: 48,
                num_heads: 32,
                num_kv_heads: 4,
                head_dim: 128,
                vocab_size: 151_936,
                intermediate_size: 6144,
                moe_intermediate_size: 768,
                num_experts: 128,
                num_experts_per_tok: 8,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: Vec::new(),
                shared_expert_intermediate_size: 0,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                partial_rotary_factor: 1.0,
                max_position_embeddings: 40960,
                tie_word_embeddings: false,
                layer_types: Vec::new(),
                linear: None,
                bos_token_id: None,
                eos_token_ids: Vec::new(),
            },
            Preset::TinyQwen35Moe => hybrid(256, 4, (4, 2, 64), (2, 4, 64), 8, 2, 128, TINY_VOCAB, 4096),
            Preset::Qwen35_35bA3b => hybrid(2048, 40, (16, 2, 256), (16, 32, 128), 256, 8, 512, 248_320, 262_144),
            Preset::Qwen35_122bA10b => hybrid(3072, 48, (32, 2, 256), (16, 64, 128), 256, 8, 1024, 248_320, 262_144),
        };
        if let Some(l) = layers {
            c.num_layers = l;
        }
        c.layer_types = if c.architecture.is_hybrid() {
            // Every 4th layer is full attention; a model cut to fewer than 4 layers keeps its last one full, so
            // short real-width files still have both kinds.
            let mut t = LayerAttention::hybrid_pattern(c.num_layers, 4);
            if c.num_layers < 4
                && let Some(last) = t.last_mut()
            {
                *last = LayerAttention::FullAttention;
            }
            t
        } else {
            vec![LayerAttention::FullAttention; c.num_layers]
        };
        c.bos_token_id = Some(vocab.endoftext);
        c.eos_token_ids = vec![vocab.im_end];
        c
    }

    pub fn vocab_size(self) -> usize {
        match self {
            Preset::TinyQwen3Moe | Preset::TinyQwen35Moe => TINY_VOCAB,
            Preset::Qwen3_30bA3b => 151_936,
            Preset::Qwen35_35bA3b | Preset::Qwen35_122bA10b => 248_320,
        }
    }
}

/// A Qwen3.5-MoE text config: `(heads, kv heads, head_dim)` of full attention, `(key heads, value heads, dim)` of
/// Gated DeltaNet (key and value heads share one dim here, as in the released models), θ 1e7, partial RoPE 0.25,
/// one shared expert as wide as a routed one.
#[allow(clippy::too_many_arguments)]
fn hybrid(
    hidden: usize,
    layers: usize,
    (nh, nkv, d): (usize, usize, usize),
    (hk, hv, dl): (usize, usize, usize),
    experts: usize,
    top_k: usize,
    moe_i: usize,
    vocab: usize,
    max_pos: usize,
) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen35Moe,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        vocab_size: vocab,
        intermediate_size: 0,
        moe_intermediate_size: moe_i,
        num_experts: experts,
        num_experts_per_tok: top_k,
        norm_topk_prob: true,
        decoder_sparse_step: 1,
        mlp_only_layers: Vec::new(),
        shared_expert_intermediate_size: moe_i,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000_000.0,
        partial_rotary_factor: 0.25,
        max_position_embeddings: max_pos,
        tie_word_embeddings: false,
        layer_types: Vec::new(),
        linear: Some(LinearAttentionConfig {
            num_key_heads: hk,
            num_value_heads: hv,
            key_head_dim: dl,
            value_head_dim: dl,
            conv_kernel: 4,
        }),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    }
}

const TINY_VOCAB: usize = 1024;

/// Every tensor of a Qwen3-MoE or Qwen3.5-MoE model, in canonical names, in a fixed order (trunk first, then layer by layer).
pub fn plan(c: &ModelConfig) -> Vec<PlannedTensor> {
    plan_skewed(c, 0.0)
}

/// [`plan`] with `--routing-skew` `skew` (0 gives exactly [`plan`]'s tensors).
pub fn plan_skewed(c: &ModelConfig, skew: f32) -> Vec<PlannedTensor> {
    let (h, d, v) = (c.hidden_size, c.head_dim, c.vocab_size);
    let t = |name: String, shape: Vec<usize>, fill| PlannedTensor { name, shape, fill, stored_offset: 0.0 };
    let shared = if skew > 0.0 { SHARED_SCALE } else { 0.0 };
    let mut out = vec![t("token_embd.weight".into(), vec![v, h], Fill::Embedding { shared })];
    for i in 0..c.num_layers {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        out.push(t(b("attn_norm"), vec![h], Fill::Norm));
        match (&c.linear, c.layer_types.get(i)) {
            (Some(la), Some(LayerAttention::LinearAttention)) => {
                let (hk, hv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
                let conv = 2 * hk * dk + hv * dv;
                out.push(t(b("attn_qkv"), vec![conv, h], Fill::Linear { fan_in: h }));
                out.push(t(b("attn_gate"), vec![hv * dv, h], Fill::Linear { fan_in: h }));
                out.push(t(b("ssm_beta"), vec![hv, h], Fill::Linear { fan_in: h }));
                out.push(t(b("ssm_alpha"), vec![hv, h], Fill::Linear { fan_in: h }));
                out.push(t(b("ssm_conv1d"), vec![conv, la.conv_kernel], Fill::Linear { fan_in: la.conv_kernel }));
                // A = exp(A_log) in [1, 4.5] and dt_bias near 0: per-token decay e^g between about 0.1 and 0.6,
                // so the state neither freezes nor forgets at once.
                out.push(t(b("ssm_a_log"), vec![hv], Fill::Range { lo: 0.0, hi: 1.5 }));
                out.push(t(b("ssm_dt_bias"), vec![hv], Fill::Range { lo: -1.0, hi: 1.0 }));
                out.push(t(b("ssm_norm"), vec![dv], Fill::Norm));
                out.push(t(b("ssm_out"), vec![h, hv * dv], Fill::Linear { fan_in: hv * dv }));
            }
            _ => {
                // Hybrids gate attention per head: q_proj also yields a gate as wide as the query.
                let q_rows = if c.architecture.is_hybrid() { 2 * c.num_heads * d } else { c.num_heads * d };
                out.push(t(b("attn_q"), vec![q_rows, h], Fill::Linear { fan_in: h }));
                out.push(t(b("attn_k"), vec![c.num_kv_heads * d, h], Fill::Linear { fan_in: h }));
                out.push(t(b("attn_v"), vec![c.num_kv_heads * d, h], Fill::Linear { fan_in: h }));
                out.push(t(b("attn_output"), vec![h, c.num_heads * d], Fill::Linear { fan_in: c.num_heads * d }));
                out.push(t(b("attn_q_norm"), vec![d], Fill::Norm));
                out.push(t(b("attn_k_norm"), vec![d], Fill::Norm));
            }
        }
        out.push(t(b("ffn_norm"), vec![h], Fill::Norm));
        if c.layer_is_moe(i) {
            let (e, im) = (c.num_experts, c.moe_intermediate_size);
            out.push(t(b("ffn_gate_inp"), vec![e, h], Fill::Router { fan_in: h, skew: RoutingSkew::new(skew) }));
            out.push(t(b("ffn_gate_exps"), vec![e, im, h], Fill::Linear { fan_in: h }));
            out.push(t(b("ffn_up_exps"), vec![e, im, h], Fill::Linear { fan_in: h }));
            out.push(t(b("ffn_down_exps"), vec![e, h, im], Fill::Linear { fan_in: im }));
            if c.shared_expert_intermediate_size > 0 {
                let is = c.shared_expert_intermediate_size;
                out.push(t(b("ffn_gate_shexp"), vec![is, h], Fill::Linear { fan_in: h }));
                out.push(t(b("ffn_up_shexp"), vec![is, h], Fill::Linear { fan_in: h }));
                out.push(t(b("ffn_down_shexp"), vec![h, is], Fill::Linear { fan_in: is }));
                out.push(t(b("ffn_gate_inp_shexp"), vec![1, h], Fill::Linear { fan_in: h }));
            }
        } else {
            let im = c.intermediate_size;
            out.push(t(b("ffn_gate"), vec![im, h], Fill::Linear { fan_in: h }));
            out.push(t(b("ffn_up"), vec![im, h], Fill::Linear { fan_in: h }));
            out.push(t(b("ffn_down"), vec![h, im], Fill::Linear { fan_in: im }));
        }
    }
    out.push(t("output_norm.weight".into(), vec![h], Fill::Norm));
    if !c.tie_word_embeddings {
        let fill = if skew > 0.0 { Fill::Unembedding { fan_in: h } } else { Fill::Linear { fan_in: h } };
        out.push(t("output.weight".into(), vec![v, h], fill));
    }
    out
}
