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

/// Reuse of a sequence of top-k sets (`[token][layer][k]`), counted as `Session::routing_reuse` should count it
/// for tokens `from..`: each choice that appears in the previous token's set at the same layer.
fn reuse_from_trace(trace: &[u32], layers: usize, k: usize, from: usize) -> (u64, u64) {
    let tokens = trace.len() / (layers * k);
    let (mut repeated, mut choices) = (0, 0);
    for t in from.max(1)..tokens {
        for l in 0..layers {
            let set = |t: usize| &trace[(t * layers + l) * k..(t * layers + l + 1) * k];
            repeated += set(t).iter().filter(|e| set(t - 1).contains(e)).count() as u64;
            choices += k as u64;
        }
    }
    (repeated, choices)
}

#[test]
fn routing_reuse_counts_decode_tokens_against_the_previous_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &path)).expect("synth");
    let m = Qwen3Moe::load(&TensorIndex::open(&path).expect("index"), &ModelOptions::default()).expect("load");
    let (layers, k) = (m.config.num_layers, m.top_k());
    let p = prompt(40);
    let mut s = m.new_session(64);
    s.enable_trace();
    let mut out = Vec::new();
    // A prefill chunk counts nothing; the first decode token is compared with the chunk's last token.
    m.forward(&mut s, &p[..8], false, &mut out).expect("prefill");
    assert_eq!(s.routing_reuse().choices, 0);
    for &t in &p[8..] {
        m.forward(&mut s, &[t], false, &mut out).expect("decode");
    }
    let r = s.routing_reuse();
    let (repeated, choices) = reuse_from_trace(s.trace().expect("trace"), layers, k, 8);
    assert_eq!((r.repeated, r.choices), (repeated, choices));
    assert_eq!(choices, (32 * layers * k) as u64);
    // A rewind forgets the previous token: the next decode token is not counted.
    s.rewind(20).expect("rewind");
    m.forward(&mut s, &[p[0]], false, &mut out).expect("decode");
    assert_eq!(s.routing_reuse().choices, choices);
}

/// Decode `tokens` one by one on a fresh session of `path`; reuse, and per layer the experts used and the
/// largest share of choices one expert took.
fn decode_routing(path: &std::path::Path, tokens: &[u32]) -> (f64, Vec<(usize, f64)>) {
    let m = Qwen3Moe::load(&TensorIndex::open(path).expect("index"), &ModelOptions::default()).expect("load");
    let mut s = m.new_session(tokens.len());
    let mut out = Vec::new();
    for &t in tokens {
        m.forward(&mut s, &[t], false, &mut out).expect("decode");
    }
    let e = m.config.num_experts;
    let spread = s
        .expert_counts()
        .chunks(e)
        .map(|c| {
            let total: u64 = c.iter().sum();
            (c.iter().filter(|&&n| n > 0).count(), *c.iter().max().unwrap_or(&0) as f64 / total as f64)
        })
        .collect();
    (s.routing_reuse().rate(), spread)
}

#[test]
fn routing_skew_raises_reuse_without_collapsing_onto_few_experts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = prompt(120);
    let mut reuse = Vec::new();
    let runs = [
        (0.0, SynthFormat::GgufQ4_0),
        (1.0, SynthFormat::GgufQ4_0),
        (2.0, SynthFormat::GgufQ4_0),
        (2.0, SynthFormat::MlxQ4),
    ];
    for (skew, format) in runs {
        let path = dir.path().join(format!("{skew}-{}", format.name()));
        let mut o = SynthOptions::new(Preset::TinyQwen3Moe, format, &path);
        o.routing_skew = skew;
        synth(&o).expect("synth");
        let skew_label = TensorIndex::open(&path).expect("index").synthetic_routing_skew();
        assert_eq!(skew_label, (skew > 0.0).then_some(skew), "{}", path.display());
        let (r, spread) = decode_routing(&path, &tokens);
        eprintln!("skew {skew} {}: reuse {r:.3}, per layer (experts used, top share) {spread:?}", format.name());
        for (l, &(used, max_share)) in spread.iter().enumerate() {
            // Top-2 of 8: uniform gives each expert 1/8 of the choices. Skewed, popular experts may take up to
            // half of them, but most experts stay in use.
            assert!(used >= 6, "skew {skew}, layer {l}: {used} experts used");
            assert!(max_share < 0.5, "skew {skew}, layer {l}: one expert takes {max_share:.2}");
        }
        reuse.push(r);
    }
    // Uniform reuse is k/E = 25% for top-2 of 8 (at 128 experts, skew 1 gives about 45%; top-2 of 8 needs more).
    assert!(reuse[0] < 0.33, "skew 0 reuse {:.3}", reuse[0]);
    assert!(reuse[1] > reuse[0] + 0.05, "skew 1 reuse {:.3} vs skew 0 {:.3}", reuse[1], reuse[0]);
    for &r in &reuse[2..] {
        assert!((0.4..0.8).contains(&r), "skew 2 reuse {r:.3} (skew 0: {:.3})", reuse[0]);
    }
}
