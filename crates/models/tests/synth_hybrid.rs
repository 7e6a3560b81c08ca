//! Synthetic Qwen3.5 hybrids (`synth --preset tiny-qwen3.5-moe`): every safetensors format loads and computes the
//! same model (HF stores the zero-centred norms as `w − 1` and the conv kernel as `[C, 1, K]`, MLX the effective
//! norms and `[C, K, 1]`; a wrong convention moves logits by far more than quantization does); prefill equals
//! token-by-token decode through the recurrent state; and streaming the MLX file through the minimum cache with
//! prefetch is bit-identical to keeping every expert resident.

use moestream_cpu::ops::argmax;
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Prefetch, Qwen3Moe};
use moestream_store::CacheSize;
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

fn prompt() -> Vec<u32> {
    (0..24u32).map(|i| (i * 7919 + 13) % 900).collect()
}

fn logits(m: &Qwen3Moe) -> Vec<f32> {
    let mut s = m.new_session(32);
    let mut out = Vec::new();
    m.forward(&mut s, &prompt(), true, &mut out).expect("prefill");
    out
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn every_format_computes_the_same_hybrid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |format: SynthFormat| {
        let path = dir.path().join(format.name());
        synth(&SynthOptions::new(Preset::TinyQwen35Moe, format, &path)).expect("synth");
        Qwen3Moe::load(&TensorIndex::open(&path).expect("index"), &ModelOptions::default()).expect("load")
    };
    let reference = logits(&load(SynthFormat::HfF32));
    // Measured: bf16 0.073, MLX 8-bit 0.14, 4-bit 0.76 (random-weight hybrids amplify rounding: router flips and the
    // recurrence; the tiny Qwen3-MoE gives 0.013 / 0.017 / 0.33). Reading the norm convention wrong (no +1 for the
    // HF file) gives 17: the bounds sit well between.
    // GGUF is written in llama.cpp's layout (tiled value heads, ssm_a = −exp(A_log), renamed tensors); reading any
    // of it wrong moves logits by O(1), far outside these bounds.
    for (format, bound) in [
        (SynthFormat::HfBf16, 0.2),
        (SynthFormat::MlxQ8, 0.4),
        (SynthFormat::MlxQ4, 2.0),
        (SynthFormat::GgufF16, 0.05),
        (SynthFormat::GgufQ8_0, 0.4),
        (SynthFormat::GgufQ4_0, 2.0),
    ] {
        let e = rel(&logits(&load(format)), &reference);
        eprintln!("{}: {e}", format.name());
        assert!(e < bound, "{}: relative difference {e} from hf-f32", format.name());
    }
}

#[test]
fn hybrid_prefill_equals_decode_and_streams_losslessly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m");
    synth(&SynthOptions::new(Preset::TinyQwen35Moe, SynthFormat::MlxQ4, &path)).expect("synth");
    let index = TensorIndex::open(&path).expect("index");
    let m = Qwen3Moe::load(&index, &ModelOptions::default()).expect("load");
    let batched = logits(&m);
    let v = m.config.vocab_size;
    let mut s = m.new_session(32);
    let mut one = Vec::new();
    for (t, &tok) in prompt().iter().enumerate() {
        m.forward(&mut s, &[tok], false, &mut one).expect("decode");
        let e = rel(&one, &batched[t * v..(t + 1) * v]);
        // Same recurrence, same order; only the MoE sum differs (by expert in prefill, by choice in decode).
        assert!(e < 1e-4, "position {t}: {e}");
    }
    let trace = |opts: ModelOptions| {
        let m = Qwen3Moe::load(&index, &opts).expect("load");
        let mut s = m.new_session(48);
        let mut out = Vec::new();
        m.forward(&mut s, &prompt(), true, &mut out).expect("prefill");
        let mut last = out[out.len() - v..].to_vec();
        for _ in 0..8 {
            let next = argmax(&last);
            m.forward(&mut s, &[next], false, &mut last).expect("decode");
            out.extend_from_slice(&last);
        }
        (out, m.store_stats())
    };
    let (reference, _) = trace(ModelOptions { threads: 2, ..ModelOptions::default() });
    for prefetch in [Prefetch::None, Prefetch::Lookahead] {
        let opts = ModelOptions { threads: 2, expert_cache: CacheSize::Slots(2), prefetch, ..ModelOptions::default() };
        let (got, st) = trace(opts);
        assert!(st.misses > 0);
        assert!(got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{prefetch:?} changed logits");
    }
}

/// A real Qwen3.5 checkpoint also carries the vision tower (`model.visual.*`) and the multi-token-prediction head
/// (`mtp.*`) in its shards. Text-only inference ignores both: the same logits with or without them.
#[test]
fn vision_and_mtp_tensors_are_ignored() {
    use moestream_format::safetensors::{SafetensorsFile, SafetensorsWriter, StDtype};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m");
    synth(&SynthOptions::new(Preset::TinyQwen35Moe, SynthFormat::HfF32, &path)).expect("synth");
    let plain =
        logits(&Qwen3Moe::load(&TensorIndex::open(&path).expect("index"), &ModelOptions::default()).expect("load"));
    // A second shard with tensors named as the released checkpoints name them, and the index that lists both.
    let extra = [
        ("model.visual.blocks.0.attn.qkv.weight", vec![48, 16]),
        ("model.visual.merger.linear_fc1.weight", vec![8, 8]),
        ("mtp.layers.0.mlp.gate.weight", vec![8, 256]),
        ("mtp.fc.weight", vec![256, 512]),
    ];
    let header: Vec<(String, StDtype, Vec<usize>)> =
        extra.iter().map(|(n, s)| (n.to_string(), StDtype::F32, s.clone())).collect();
    let mut w = SafetensorsWriter::create(&path.join("extra.safetensors"), &header, None).expect("create");
    for (n, s) in &extra {
        w.write(n, &vec![0u8; s.iter().product::<usize>() * 4]).expect("write");
    }
    w.finish().expect("finish");
    let mut map = serde_json::Map::new();
    for t in SafetensorsFile::open(&path.join("model.safetensors")).expect("open").tensors {
        map.insert(t.name, "model.safetensors".into());
    }
    for (n, _) in &extra {
        map.insert(n.to_string(), "extra.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(path.join("model.safetensors.index.json"), index.to_string()).expect("index json");
    let with = TensorIndex::open(&path).expect("index with extras");
    assert_eq!(with.files.len(), 2);
    assert!(with.tensors.keys().all(|k| !k.contains("visual") && !k.starts_with("mtp")));
    let got = logits(&Qwen3Moe::load(&with, &ModelOptions::default()).expect("load"));
    assert!(got.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()));
}
