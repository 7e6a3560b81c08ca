//! Parity with mlx-lm on MLX 4-bit files: tiny HF fixtures (`tests/fixtures/hf/`) converted by mlx-lm itself
//! (`scripts/reference/make_mlx_fixtures.py`, mlx 0.32.4, mlx-lm 0.32.2): affine q4 with group 32 wherever 32
//! divides a Linear's input (embedding and lm_head included), the routers and the hybrids' shared-expert gate 8-bit
//! with group 64 (the models' `quant_predicate`, recorded as per-module overrides in the config's `quantization`
//! block). Scales, biases and norms are float32, except in `*-q4-bf16`, where everything was cast to bfloat16
//! before quantizing (as `convert(dtype="bfloat16")` does; the hybrids keep `A_log` float32). The references are
//! mlx-lm's own logits computed in float32 from the files as written (for bf16, from the exactly upcast bf16
//! values), the greedy tokens those of mlx-lm's cached generation loop.
//!
//! Hybrids (Qwen3.5-MoE `qwen35moe_small`, `qwen35moe_r3_fused_layout`, and its bf16 variant; Qwen3-Next
//! `qwen3next_small`): the files are what mlx-lm's qwen3_5_moe / qwen3_next write, names
//! `language_model.model.*` (Qwen3.5) or `model.*` (Qwen3-Next), experts as `mlp.switch_mlp.*`, GDN projections
//! (`in_proj_qkv/z/b/a`, `in_proj_qkvz/ba`) 4-bit, conv1d float as `[C, K, 1]`, norms already holding the +1
//! (so the loader must not add it again; it tells from the conv layout). What mlx-lm's quantizer leaves in float
//! because 32 does not divide the input: the experts' `down_proj` (moe_intermediate 16) and, in the r3 case,
//! `linear_attn.out_proj` (input 72). `qwen3next_dense_first` is not here: mlx-lm places full attention by
//! `full_attention_interval` only and cannot express its layer pattern. The engine needed no change for these.
//!
//! Tolerance: max |Δlogit| / max |logit| < TOL = 1e-4 at every prompt position (batched prefill) and every greedy
//! step (one token at a time through our gathered decode path). Both engines dequantize the same codes with the
//! same scales and biases, so what is left is f32 arithmetic order (MLX's quantized-matmul kernels, fused
//! RMSNorm/RoPE/SDPA and its expert gather against ours). Measured on the dev box: qwen3_moe 7.9e-7 … 1.4e-6
//! (worst: `qwen3moe_tied-q4`), i.e. a few f32 ulps of the largest logit after 3–4 layers; hybrids 2.8e-6
//! (`qwen3next_small-q4`), 5.5e-6 (`qwen35moe_small-q4`), 7.2e-6 (its bf16 variant), 1.06e-5
//! (`qwen35moe_r3_fused_layout-q4`). The hybrids' larger figure is f32 round-off through the 72–75-token GDN
//! recurrence: mlx-lm's own float32 model is as far (3.6e-6 … 9.6e-6) from transformers' float64 logits of the
//! unquantized checkpoints. Every figure is the same for 1, 2 and 3 threads, for prefill in one chunk, in chunks of
//! 32 and of 7, and with the experts streamed through a 2-slot cache. 1e-4 keeps ~100× margin for qwen3_moe and
//! ~10× for the hybrids, yet sits more than three orders of magnitude below the quantization error itself: our q4
//! logits are 0.40–0.64 (qwen3_moe) and 0.81–1.65 (hybrids) relative away from transformers' float64 logits of the
//! unquantized checkpoints (mlx-lm's are as far, by the same amount), so any slip in reading the MLX encoding
//! (nibble order, group size, bias sign, the 8-bit overrides, bf16 scales, a norm +1 applied twice) lands far
//! outside TOL. The test asserts that separation (> 100·TOL) as well. For scale, MLX's own bf16 *arithmetic* on the
//! qwen3_moe bf16 file moves the logits by 2–5 % (29 % at positions where a router choice flips): that is not what we
//! compare against.
//!
//! Greedy: our 8 tokens must equal mlx-lm's wherever the reference top-1/top-2 gap exceeds 2·TOL·max|logit| (then
//! the argmax cannot differ between two engines within TOL). The test asserts that this gap condition holds at
//! every step of every fixture (smallest gap 0.017 logits, bound at most 1.8e-3), so all 8 tokens are compared.

use std::path::{Path, PathBuf};

use moestream_cpu::ops::argmax;
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Qwen3Moe};
use moestream_quant::{Encoding, FloatType, MlxAffine};
use serde_json::Value;

/// ~100× the measured worst for qwen3_moe (1.4e-6), ~10× for the hybrids (1.06e-5); see the module docs.
const TOL: f64 = 1e-4;

/// (fixture directory under tests/fixtures/mlx, the type mlx-lm stored scales, biases and norms in)
const CASES: [(&str, FloatType); 9] = [
    ("qwen3moe_gqa_headdim-q4", FloatType::F32),
    ("qwen3moe_no_norm_topk-q4", FloatType::F32),
    ("qwen3moe_gqa_headdim-q4-bf16", FloatType::BF16),
    ("qwen3moe_tied-q4", FloatType::F32),
    ("qwen3moe_sparse_step-q4", FloatType::F32),
    ("qwen35moe_small-q4", FloatType::F32),
    ("qwen3next_small-q4", FloatType::F32),
    ("qwen35moe_r3_fused_layout-q4", FloatType::F32),
    ("qwen35moe_small-q4-bf16", FloatType::BF16),
];

/// The hybrid cases (Gated DeltaNet + gated attention + shared expert).
const HYBRIDS: [&str; 4] =
    ["qwen35moe_small-q4", "qwen3next_small-q4", "qwen35moe_r3_fused_layout-q4", "qwen35moe_small-q4-bf16"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p).expect("fixture").chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference")).expect("json")
}

fn tokens(v: &Value) -> Vec<u32> {
    v.as_array().expect("token list").iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0f64, |m, &v| m.max((v as f64).abs()))
}

fn rel_err(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let max_diff = ours.iter().zip(theirs).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    max_diff / max_abs(theirs)
}

fn top_gap(x: &[f32]) -> f64 {
    let mut s: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

/// Returns (worst ours-vs-mlx over prompt and greedy steps, worst ours-vs-HF-f64 over the prompt).
fn check(case: &str, threads: usize) -> (f64, f64) {
    check_with(case, ModelOptions { threads, ..ModelOptions::default() })
}

fn check_with(case: &str, opts: ModelOptions) -> (f64, f64) {
    let d = fixtures().join("mlx").join(case);
    let r = read_json(&d.join("reference.json"));
    let prompt = tokens(&r["prompt_tokens"]);
    let greedy = tokens(&r["greedy_tokens"]);
    let reference = read_f32(&d.join(r["logits_file"].as_str().expect("logits_file")));
    let greedy_ref = read_f32(&d.join(r["greedy_logits_file"].as_str().expect("greedy_logits_file")));

    let index = TensorIndex::open(&d).expect("index");
    let m = Qwen3Moe::load(&index, &opts).expect("load");
    let v = m.config.vocab_size;
    assert_eq!(reference.len(), prompt.len() * v, "{case}: logits shape");

    let mut worst = 0f64;
    let mut sess = m.new_session(prompt.len() + greedy.len());
    let mut logits = Vec::new();
    m.forward(&mut sess, &prompt, true, &mut logits).expect("prefill");
    for (t, (ours, theirs)) in logits.chunks(v).zip(reference.chunks(v)).enumerate() {
        let e = rel_err(ours, theirs);
        worst = worst.max(e);
        assert!(e < TOL, "{case}: prompt position {t}: relative error vs mlx-lm {e:.3e}");
    }

    // The quantization error itself, for scale: ours (q4) against transformers' float64 logits of the unquantized
    // checkpoint. It must dwarf the engine difference, or the bound above would not discriminate.
    let hf = fixtures().join("../..").join(r["source"].as_str().expect("source"));
    let hf_ref = read_f32(&hf.join(read_json(&hf.join("reference.json"))["logits_file"].as_str().expect("file")));
    let vs_hf = logits.chunks(v).zip(hf_ref.chunks(v)).fold(0f64, |m, (a, b)| m.max(rel_err(a, b)));
    assert!(vs_hf > 100.0 * TOL, "{case}: q4 logits only {vs_hf:.3e} from the float reference");

    // Greedy decode, one token at a time, against mlx-lm's cached greedy loop.
    let mut last = logits[(prompt.len() - 1) * v..].to_vec();
    let mut got = Vec::new();
    for step in 0..greedy.len() {
        let theirs = &greedy_ref[step * v..(step + 1) * v];
        let e = rel_err(&last, theirs);
        worst = worst.max(e);
        assert!(e < TOL, "{case}: greedy step {step}: relative error vs mlx-lm {e:.3e}");
        // Both engines are within TOL·max|logit| of each other, so a reference gap above twice that fixes the
        // argmax for both; the fixtures satisfy it at every step, so every token is compared.
        let gap = top_gap(theirs);
        assert!(gap > 2.0 * TOL * max_abs(theirs), "{case}: greedy step {step}: top-1/top-2 gap {gap:.3e} too small");
        let next = argmax(&last);
        got.push(next);
        m.forward(&mut sess, &[next], false, &mut last).expect("decode");
    }
    assert_eq!(got, greedy, "{case}: greedy continuation vs mlx-lm");
    eprintln!(
        "{case} threads={} prefill_chunk={}: ours vs mlx-lm {worst:.3e}, ours vs HF f64 {vs_hf:.3e}",
        opts.threads, opts.prefill_chunk
    );
    (worst, vs_hf)
}

#[test]
fn qwen3_moe_q4_matches_mlx_lm_every_case() {
    for (case, _) in CASES {
        check(case, 2);
    }
}

#[test]
fn mlx_q4_results_do_not_depend_on_thread_count() {
    for threads in [1, 3] {
        check("qwen3moe_gqa_headdim-q4", threads);
        check("qwen3moe_gqa_headdim-q4-bf16", threads);
        check("qwen35moe_small-q4", threads);
    }
}

/// The hybrids as `hf_parity` runs them: the prompt in three prefill chunks (conv and recurrent state carried
/// across), and in chunks of 7 with the quantized experts streamed through a 2-slot cache with lookahead prefetch.
#[test]
fn mlx_q4_hybrids_match_mlx_lm_chunked_and_streamed() {
    for case in HYBRIDS {
        check_with(case, ModelOptions { threads: 2, prefill_chunk: 32, ..ModelOptions::default() });
        check_with(
            case,
            ModelOptions {
                threads: 1,
                prefill_chunk: 7,
                expert_cache: moestream_store::CacheSize::Slots(2),
                prefetch: moestream_models::Prefetch::Lookahead,
                ..ModelOptions::default()
            },
        );
    }
}

/// What `moestream inspect --tensors` prints for these files (it reads the same index), which is mlx-lm's
/// `quantize_model` rule: every Linear and the embedding MLX affine 4-bit group 32 when 32 divides its input width,
/// else left in float (the hybrids' expert `down_proj`, input 16, and `out_proj` of `qwen35moe_r3_fused_layout`,
/// input 72); the routers and the shared-expert gate 8-bit group 64 (the models' `quant_predicate`, recorded as
/// per-module overrides in the config, which the tensor shapes confirm); scales/biases, norms, the conv1d kernel
/// and `dt_bias` in the checkpoint's float type; `A_log` always float32 (the hybrids' `cast_predicate` keeps it).
#[test]
fn mlx_fixture_encodings_are_what_mlx_lm_wrote() {
    let q4 = |float| Encoding::MlxAffine { params: MlxAffine { bits: 4, group_size: 32 }, scale_type: float };
    let q8 = |float| Encoding::MlxAffine { params: MlxAffine { bits: 8, group_size: 64 }, scale_type: float };
    for (case, float) in CASES {
        let index = TensorIndex::open(&fixtures().join("mlx").join(case)).expect("index");
        for (name, t) in &index.tensors {
            let want = if name.ends_with("ssm_a_log.weight") {
                Encoding::Float(FloatType::F32)
            } else if name.ends_with("norm.weight")
                || name.ends_with("ssm_conv1d.weight")
                || name.ends_with("ssm_dt_bias.weight")
            {
                Encoding::Float(float)
            } else if name.ends_with("ffn_gate_inp.weight") || name.ends_with("ffn_gate_inp_shexp.weight") {
                q8(float)
            } else if t.matrix_dims().1 % 32 == 0 {
                q4(float)
            } else {
                Encoding::Float(float)
            };
            assert_eq!(t.encoding, want, "{case}: {name} ({})", t.source);
        }
        let routers = index.tensors.values().filter(|t| t.encoding.name() == "MLX_Q8_G64").count();
        let moe_layers = index.tensors.keys().filter(|n| n.ends_with("ffn_gate_exps.weight")).count();
        let shared = index.tensors.keys().filter(|n| n.ends_with("ffn_gate_inp_shexp.weight")).count();
        assert!(
            moe_layers > 0 && routers == moe_layers + shared,
            "{case}: {routers} 8-bit routers, {moe_layers} MoE layers"
        );
    }
}
