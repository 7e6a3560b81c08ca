//! Parity with HF transformers: tiny random Qwen3-MoE checkpoints and float64 reference logits made by
//! `scripts/reference/make_hf_fixtures.py` (transformers 5.17, see docs/reference-fixtures.md).
//!
//! Bounds: max |Δlogit| / max |logit| < 1e-4 at every prompt position (prefill, batched) and at every greedy step
//! (decode, one token at a time through the gathered kernels); the 8 greedy tokens must be identical. Our
//! arithmetic is f32 throughout, against a float64 reference; the fixtures were generated with a top-1/top-2
//! gap > 1e-3 at every greedy step, so an f32 engine can match the choices exactly.

use std::path::{Path, PathBuf};

use moestream_cpu::ops::argmax;
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Qwen3Moe};
use serde_json::Value;

const CASES: [&str; 5] =
    ["qwen3moe_gqa_headdim", "qwen3moe_no_norm_topk", "qwen3moe_tied", "qwen3moe_sparse_step", "qwen3moe_fused_layout"];

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf").join(case)
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p).expect("fixture").chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn rel_err(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let max_ref = theirs.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let max_diff = ours.iter().zip(theirs).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    max_diff / max_ref
}

fn check(case: &str, threads: usize) {
    check_with(case, ModelOptions { threads, ..ModelOptions::default() });
}

fn check_with(case: &str, opts: ModelOptions) {
    let d = dir(case);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).expect("reference")).expect("json");
    let prompt: Vec<u32> =
        r["prompt_tokens"].as_array().expect("prompt").iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let greedy: Vec<u32> =
        r["greedy_tokens"].as_array().expect("greedy").iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let reference = read_f32(&d.join(r["logits_file"].as_str().expect("logits_file")));
    let index = TensorIndex::open(&d).expect("index");
    let m = Qwen3Moe::load(&index, &opts).expect("load");
    let v = m.config.vocab_size;

    let mut sess = m.new_session(prompt.len() + greedy.len() + 1);
    let mut logits = Vec::new();
    m.forward(&mut sess, &prompt, true, &mut logits).expect("prefill");
    for (t, (ours, theirs)) in logits.chunks(v).zip(reference.chunks(v)).enumerate() {
        let e = rel_err(ours, theirs);
        assert!(e < 1e-4, "{case}: prompt position {t}: relative error {e:.3e}");
    }

    // Greedy decode, one token at a time (the gathered decode path), against transformers' generate().
    let greedy_ref = read_f32(&d.join("greedy_logits.f32"));
    let mut last = logits[(prompt.len() - 1) * v..].to_vec();
    let mut got = Vec::new();
    for step in 0..greedy.len() {
        let e = rel_err(&last, &greedy_ref[step * v..(step + 1) * v]);
        assert!(e < 1e-4, "{case}: greedy step {step}: relative error {e:.3e}");
        let next = argmax(&last);
        got.push(next);
        m.forward(&mut sess, &[next], false, &mut last).expect("decode");
    }
    assert_eq!(got, greedy, "{case}: greedy continuation");
}

#[test]
fn qwen3_moe_matches_transformers_every_case() {
    for case in CASES {
        check(case, 2);
    }
}

/// The hybrids (Gated DeltaNet + gated attention + shared expert, zero-centred norms), in four layer patterns
/// (period 2 and 3, two linear layers in a row, a dense first layer), 1 to 3 value heads per key head, per-expert
/// and fused expert layouts, conv kernels of 3 and 4: a 71–75-token prompt as one
/// prefill chunk and as three (conv and recurrent state carried across chunks), then decode one token at a time
/// through the recurrent state; and streaming experts through the minimum cache with prefetch.
#[test]
fn hybrids_match_transformers() {
    for case in ["qwen35moe_small", "qwen3next_small", "qwen35moe_r3_fused_layout", "qwen3next_dense_first"] {
        check(case, 2);
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

#[test]
fn results_do_not_depend_on_thread_count() {
    check("qwen3moe_gqa_headdim", 1);
    check("qwen3moe_sparse_step", 3);
}
