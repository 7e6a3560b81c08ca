//! One seed, every format: synth draws values from (seed, tensor, expert) only, so each format must decode to the
//! `hf-f32` values within that format's own rounding or quantization error, and never worse. Plus determinism,
//! what `layers` changes, and the real Qwen3-30B-A3B widths (parameter counts, and a one-layer real-width file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moestream_format::{Encoding, TensorIndex};
use moestream_quant::{FloatType, GgmlType};
use moestream_synth::{ExpertLayout, Preset, SynthFormat, SynthOptions, plan, preset_config, synth};

fn out_path(dir: &Path, format: SynthFormat) -> PathBuf {
    if format.is_gguf() { dir.join("model.gguf") } else { dir.join("model") }
}

fn tiny(dir: &Path, format: SynthFormat, layout: ExpertLayout, seed: u64, layers: Option<usize>) -> PathBuf {
    let out = out_path(dir, format);
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, format, &out);
    o.expert_layout = layout;
    o.seed = seed;
    o.layers = layers;
    synth(&o).unwrap_or_else(|e| panic!("synth {}: {e}", format.name()));
    out
}

fn open(path: &Path) -> TensorIndex {
    TensorIndex::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The largest error a value of `reference` may take in `encoding`, for the block/group `block` it sits in.
/// Blocks and groups run along rows, and every tiny-model row is a whole number of them, so they are consecutive
/// runs of the flattened tensor.
fn block_len(encoding: Encoding) -> usize {
    match encoding {
        Encoding::Ggml(GgmlType::Q8_0) | Encoding::Ggml(GgmlType::Q4_0) => 32,
        Encoding::MlxAffine { params, .. } => params.group_size,
        _ => 1,
    }
}

fn bound(encoding: Encoding, x: f32, block: &[f32]) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    // Slack for the f32 arithmetic of dequantization itself.
    let slack = 1e-6 * amax.max(x.abs());
    slack
        + match encoding {
            Encoding::Float(FloatType::F32) => 0.0,
            // Round to nearest: half an ulp, at most 2^-8 (bf16, 8 significant bits) or 2^-11 (f16, 11) of |x|;
            // f16 subnormals have a fixed ulp of 2^-24.
            Encoding::Float(FloatType::BF16) => x.abs() * 2f32.powi(-8),
            Encoding::Float(FloatType::F16) => (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
            // d = amax/127, |Δ| ≤ d/2 with d exact; d is stored as f16 (relative error ≤ 2^-11), which moves
            // q·d by up to 127·d·2^-11 = (d/2)·ε with ε = 127·2^-10.
            Encoding::Ggml(GgmlType::Q8_0) => amax / 127.0 / 2.0 * (1.0 + 127.0 * 2f32.powi(-10)),
            // Step d = amax/8. The value at -d·8 clamps to 7·d, one full step away, so the bound is one step
            // (plus the f16 rounding of d, ≤ 8·d·2^-11).
            Encoding::Ggml(GgmlType::Q4_0) => amax / 8.0 * (1.0 + 2f32.powi(-8)),
            // One step of the group, step = (max − min)/(2^bits − 1), if scale and bias were exact: the encoder (as
            // mlx's) makes the larger-magnitude edge exact with scale = edge/round(edge/step), which can shrink the
            // covered range so that the other edge clamps, up to levels/(levels + 1) of a step away. Scale and bias
            // are computed in f32 and stored as bf16 after q was chosen: the bias (the edge, |edge| = amax) moves
            // by up to amax·2^-8 and q·scale by up to levels·step·2^-8. That is ≈1.09 steps at 4 bits, and can
            // pass 2 steps at 8 bits (the 8-bit router of mlx-q4 reaches 1.3 steps with seed 7).
            Encoding::MlxAffine { params, .. } => {
                let (lo, hi) = block.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                let levels = ((1u32 << params.bits) - 1) as f32;
                let step = (hi - lo) / levels;
                step * (1.0 + levels * 2f32.powi(-8)) + amax * 2f32.powi(-8)
            }
            other => panic!("no error bound for {}", other.name()),
        }
}

/// Worst |Δ|/bound over a tensor, with its position.
fn worst(reference: &[f32], got: &[f32], encoding: Encoding) -> (f32, usize) {
    assert_eq!(reference.len(), got.len());
    let n = block_len(encoding);
    let mut w = (0f32, 0usize);
    for (bi, (rb, gb)) in reference.chunks(n).zip(got.chunks(n)).enumerate() {
        for (j, (&r, &g)) in rb.iter().zip(gb).enumerate() {
            let b = bound(encoding, r, rb);
            let ratio = if b > 0.0 {
                (r - g).abs() / b
            } else if r == g {
                0.0
            } else {
                f32::INFINITY
            };
            if ratio > w.0 || ratio.is_nan() {
                w = (ratio, bi * n + j);
            }
        }
    }
    w
}

#[test]
fn every_format_decodes_to_the_f32_values_within_its_error() {
    let ref_dir = tempfile::tempdir().expect("tempdir");
    let reference = open(&tiny(ref_dir.path(), SynthFormat::HfF32, ExpertLayout::PerExpert, 7, None));
    let ref_vals: BTreeMap<&str, Vec<f32>> =
        reference.tensors.keys().map(|n| (n.as_str(), reference.load_f32(n).expect("load"))).collect();

    for format in SynthFormat::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = open(&tiny(dir.path(), format, ExpertLayout::PerExpert, 7, None));
        assert_eq!(
            idx.tensors.keys().collect::<Vec<_>>(),
            reference.tensors.keys().collect::<Vec<_>>(),
            "{}",
            format.name()
        );
        let mut report = Vec::new();
        for (name, t) in &idx.tensors {
            let got = idx.load_f32(name).expect("load");
            let (ratio, at) = worst(&ref_vals[name.as_str()], &got, t.encoding);
            report.push(format!("{name} {} worst {ratio:.3} at {at}", t.encoding.name()));
            assert!(
                ratio <= 1.0,
                "{}: {name} ({}) element {at}: f32 {} decoded {} is {ratio:.3}× the bound",
                format.name(),
                t.encoding.name(),
                ref_vals[name.as_str()][at],
                got[at]
            );
        }
        eprintln!("{}:\n  {}", format.name(), report.join("\n  "));
    }
}

#[test]
fn per_expert_and_fused_hf_layouts_decode_bit_identically() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    for format in [SynthFormat::HfF32, SynthFormat::HfBf16] {
        let per = open(&tiny(a.path(), format, ExpertLayout::PerExpert, 3, None));
        let fused = open(&tiny(b.path(), format, ExpertLayout::Fused, 3, None));
        assert_eq!(per.tensors.keys().collect::<Vec<_>>(), fused.tensors.keys().collect::<Vec<_>>());
        for name in per.tensors.keys() {
            let (x, y) = (per.load_f32(name).expect("load"), fused.load_f32(name).expect("load"));
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{}: {name} differs between layouts",
                format.name()
            );
        }
    }
}

/// Every file under `path` (or the file itself), relative path → bytes.
fn contents(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    if path.is_file() {
        return BTreeMap::from([(PathBuf::new(), std::fs::read(path).expect("read"))]);
    }
    std::fs::read_dir(path)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .map(|p| (p.strip_prefix(path).expect("under").to_path_buf(), std::fs::read(&p).expect("read")))
        .collect()
}

#[test]
fn same_seed_same_bytes_different_seed_different_weights() {
    for format in [SynthFormat::HfBf16, SynthFormat::MlxQ4, SynthFormat::GgufQ4_0] {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
        let a = contents(&tiny(dirs[0].path(), format, ExpertLayout::PerExpert, 11, None));
        let b = contents(&tiny(dirs[1].path(), format, ExpertLayout::PerExpert, 11, None));
        let c = contents(&tiny(dirs[2].path(), format, ExpertLayout::PerExpert, 12, None));
        assert!(a == b, "{}: two synths with seed 11 differ", format.name());
        assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>(), "{}", format.name());
        for (file, bytes) in &a {
            let weights = file.as_os_str().is_empty() || file.extension().is_some_and(|x| x == "safetensors");
            // Weight files differ with the seed, side files (config, tokenizer) do not.
            assert_eq!(bytes != &c[file], weights, "{}: {}", format.name(), file.display());
        }
    }
}

#[test]
fn layers_changes_only_the_layer_count() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let two = open(&tiny(a.path(), SynthFormat::HfBf16, ExpertLayout::PerExpert, 5, None));
    let three = open(&tiny(b.path(), SynthFormat::HfBf16, ExpertLayout::PerExpert, 5, Some(3)));
    assert_eq!((two.config.num_layers, three.config.num_layers), (2, 3));
    let mut c3 = three.config.clone();
    c3.num_layers = 2;
    c3.layer_types.truncate(2);
    assert_eq!(c3, two.config, "only the layer count differs");

    let extra: Vec<_> = three.tensors.keys().filter(|n| !two.tensors.contains_key(*n)).collect();
    assert!(extra.iter().all(|n| n.starts_with("blk.2.")), "{extra:?}");
    assert_eq!(extra.len(), two.tensors.keys().filter(|n| n.starts_with("blk.1.")).count());
    assert!(two.tensors.keys().all(|n| three.tensors.contains_key(n)));
    for name in two.tensors.keys() {
        assert_eq!(two.load_f32(name).expect("load"), three.load_f32(name).expect("load"), "{name}");
    }
}

#[test]
fn real_width_parameter_counts() {
    let p = preset_config(Preset::Qwen3_30bA3b, Some(48)).parameter_counts();
    let within = |x: u64, want: f64| ((x as f64 - want) / want).abs() <= 0.01;
    assert!(within(p.total, 30.5e9), "total {}", p.total);
    // Qwen's card says "3.3B activated", truncated to one decimal; the shapes give 3.35e9.
    assert!(within(p.active, 3.35e9), "active {}", p.active);
    assert_eq!(preset_config(Preset::Qwen3_30bA3b, None), preset_config(Preset::Qwen3_30bA3b, Some(48)));
}

#[test]
fn one_real_width_layer_in_gguf_q4_0_holds_every_parameter() {
    let c = preset_config(Preset::Qwen3_30bA3b, Some(1));
    let want = c.parameter_counts().total;
    let planned: u64 = plan(&c).iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    assert_eq!(planned, want, "plan() and parameter_counts() agree");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(dir.path(), SynthFormat::GgufQ4_0);
    let start = std::time::Instant::now();
    let mut opts = SynthOptions::new(Preset::Qwen3_30bA3b, SynthFormat::GgufQ4_0, &out);
    opts.layers = Some(1);
    let summary = synth(&opts).expect("synth");
    eprintln!("1-layer real-width gguf-q4_0: {} bytes in {:.1?}", summary.bytes, start.elapsed());
    let idx = open(&out);
    let total: u64 = idx.tensors.values().map(|t| t.elements()).sum();
    assert_eq!(total, want);
}

/// The Qwen3.5 presets have the published sizes: 35B-A3B (35 B total, "3B" active) and 122B-A10B (122 B, "10B").
/// Totals within 5 %; the active figure in the names is rounded (Qwen3-30B-A3B's shapes give 3.35 B), so only the
/// rounded value is asserted: 3.45 B and 9.77 B from these shapes (the shared expert's width is not published
/// beside the names; we take it equal to a routed expert's).
#[test]
fn qwen35_preset_parameter_counts() {
    for (preset, total, active) in [(Preset::Qwen35_35bA3b, 35e9, 3e9), (Preset::Qwen35_122bA10b, 122e9, 10e9)] {
        let p = preset_config(preset, None).parameter_counts();
        let within = |x: u64, want: f64| ((x as f64 - want) / want).abs() <= 0.05;
        assert!(within(p.total, total), "{}: total {}", preset.name(), p.total);
        assert_eq!((p.active as f64 / 1e9).round(), active / 1e9, "{}: active {}", preset.name(), p.active);
    }
}
