//! Synthetic weights must not be degenerate: routing has to spread over the experts (a model that sends every
//! token to the same few experts would make every cache benchmark meaningless), and prefill (tokens grouped by
//! expert) must agree with token-by-token decode.

use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Qwen3Moe};
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % 900).collect()
}

#[test]
fn synthetic_routing_spreads_over_experts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &path)).expect("synth");
    let m = Qwen3Moe::load(&TensorIndex::open(&path).expect("index"), &ModelOptions::default()).expect("load");
    let mut s = m.new_session(128);
    let mut out = Vec::new();
    m.forward(&mut s, &prompt(96), false, &mut out).expect("forward");
    let e = m.config.num_experts;
    for (l, counts) in s.expert_counts().chunks(e).enumerate() {
        let total: u64 = counts.iter().sum();
        assert_eq!(total, 96 * m.top_k() as u64, "layer {l}");
        let used = counts.iter().filter(|&&c| c > 0).count();
        let max_share = *counts.iter().max().unwrap_or(&0) as f64 / total as f64;
        // Uniform routing would give each of 8 experts 1/8 of the choices; demand every expert used and none
        // taking more than 3/8.
        assert_eq!(used, e, "layer {l}: only {used} of {e} experts used: {counts:?}");
        assert!(max_share < 0.375, "layer {l}: one expert takes {max_share:.2} of choices: {counts:?}");
    }
}

#[test]
fn prefill_and_decode_agree_on_synthetic_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in [SynthFormat::GgufQ4_0, SynthFormat::MlxQ4, SynthFormat::HfBf16] {
        let path = dir.path().join(format.name());
        synth(&SynthOptions::new(Preset::TinyQwen3Moe, format, &path)).expect("synth");
        let m = Qwen3Moe::load(&TensorIndex::open(&path).expect("index"), &ModelOptions::default()).expect("load");
        let p = prompt(20);
        let mut a = m.new_session(32);
        let mut batched = Vec::new();
        m.forward(&mut a, &p, true, &mut batched).expect("prefill");
        let mut b = m.new_session(32);
        let mut one = Vec::new();
        let v = m.config.vocab_size;
        for (t, &tok) in p.iter().enumerate() {
            m.forward(&mut b, &[tok], false, &mut one).expect("decode");
            let want = &batched[t * v..(t + 1) * v];
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = one.iter().zip(want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // Same weights and kernels; only the MoE summation order differs (by expert vs by choice).
            assert!(diff <= 1e-4 * scale, "{}: position {t}: {diff} vs scale {scale}", format.name());
        }
    }
}

#[test]
fn routing_trace_is_token_major_for_prefill_and_decode_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &path)).expect("synth");
    let m = Qwen3Moe::load(&TensorIndex::open(&path).expect("index"), &ModelOptions::default()).expect("load");
    let p = prompt(12);
    let mut out = Vec::new();
    let mut a = m.new_session(16);
    a.enable_trace();
    m.forward(&mut a, &p, false, &mut out).expect("prefill");
    let mut b = m.new_session(16);
    b.enable_trace();
    for &t in &p {
        m.forward(&mut b, &[t], false, &mut out).expect("decode");
    }
    let (ta, tb) = (a.trace().expect("trace"), b.trace().expect("trace"));
    assert_eq!(ta.len(), 12 * m.config.num_layers * m.top_k());
    assert_eq!(ta, tb);
}
