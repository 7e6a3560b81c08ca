//! `TensorIndex` over tiny synthetic models in every file family: every tensor the architecture needs is found
//! with its logical shape, expert byte ranges are disjoint and inside their files (and, for stacked layouts, one
//! slab apart), and models whose files disagree with their config fail with an error naming the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moestream_format::gguf::{GgufFile, GgufValue, GgufWriter};
use moestream_format::index::expected_shapes;
use moestream_format::safetensors::{SafetensorsFile, SafetensorsWriter};
use moestream_format::{FileRange, TensorIndex};
use moestream_synth::{ExpertLayout, Preset, SynthFormat, SynthOptions, synth};

/// Synthesize tiny-qwen3-moe in `format` under `dir`; the path to open (directory, or the .gguf file).
fn tiny(dir: &Path, format: SynthFormat, layout: ExpertLayout) -> PathBuf {
    let out = if format.is_gguf() { dir.join("model.gguf") } else { dir.join("model") };
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, format, &out);
    o.expert_layout = layout;
    synth(&o).unwrap_or_else(|e| panic!("synth {}: {e}", format.name()));
    out
}

fn ranges_overlap(mut rs: Vec<FileRange>) -> Option<(FileRange, FileRange)> {
    rs.sort_by_key(|r| (r.file, r.offset));
    rs.windows(2).find(|w| w[0].file == w[1].file && w[0].offset + w[0].len > w[1].offset).map(|w| (w[0], w[1]))
}

#[test]
fn every_format_indexes_every_tensor_with_sane_ranges() {
    let cases: Vec<(SynthFormat, ExpertLayout)> = SynthFormat::ALL
        .into_iter()
        .map(|f| (f, ExpertLayout::PerExpert))
        .chain([(SynthFormat::HfF32, ExpertLayout::Fused), (SynthFormat::HfBf16, ExpertLayout::Fused)])
        .collect();
    for (format, layout) in cases {
        let what = format!("{} {layout:?}", format.name());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = tiny(dir.path(), format, layout);
        let idx = TensorIndex::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        let c = &idx.config;
        assert_eq!((c.num_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok), (2, 256, 8, 2), "{what}");

        let expected = expected_shapes(c);
        let got: BTreeMap<&str, &[usize]> = idx.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice())).collect();
        let want: BTreeMap<&str, &[usize]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        assert_eq!(got, want, "{what}: canonical tensors and shapes");

        let file_len: Vec<u64> = idx.files.iter().map(|f| std::fs::metadata(f).expect("file exists").len()).collect();
        let mut all = Vec::new();
        for t in idx.tensors.values() {
            let rs: Vec<FileRange> = t.data.iter().chain(&t.scales).chain(&t.biases).copied().collect();
            for r in &rs {
                assert!(r.len > 0 && r.offset + r.len <= file_len[r.file as usize], "{what}: {} range {r:?}", t.name);
            }
            all.extend(rs);
            if !t.is_expert_stack() {
                assert_eq!((t.num_experts(), t.data.len()), (0, 1), "{what}: {}", t.name);
                continue;
            }
            assert_eq!(t.num_experts(), 8, "{what}: {}", t.name);
            let experts: Vec<_> = (0..8).map(|e| t.expert(e).expect("expert in range")).collect();
            assert!(t.expert(8).is_none(), "{what}: {}", t.name);
            assert_eq!(experts.iter().map(|x| x.bytes()).sum::<u64>(), t.bytes(), "{what}: {}", t.name);
            let stacked = match format {
                SynthFormat::HfBf16 | SynthFormat::HfF32 => {
                    layout == ExpertLayout::Fused && t.name.contains("ffn_down_exps")
                }
                _ => true,
            };
            if stacked {
                // One tensor on disk: expert e's slab starts e slabs after expert 0's, for every piece.
                for piece in [&t.data, &t.scales, &t.biases] {
                    let Some(first) = piece.first() else { continue };
                    for (e, r) in piece.iter().enumerate() {
                        let want =
                            FileRange { file: first.file, offset: first.offset + e as u64 * first.len, len: first.len };
                        assert_eq!(*r, want, "{what}: {} expert {e}", t.name);
                    }
                }
            }
            // Expert e decodes to exactly its slice of the whole tensor.
            let whole = idx.load_f32(&t.name).expect("load_f32");
            let per = whole.len() / 8;
            for e in [0, 5, 7] {
                let one = idx.load_expert_f32(&t.name, e).expect("load_expert_f32");
                assert_eq!(one.as_slice(), &whole[e * per..(e + 1) * per], "{what}: {} expert {e}", t.name);
            }
            assert!(idx.load_expert_f32(&t.name, 8).is_err(), "{what}: expert 8 of 8");
        }
        assert_eq!(ranges_overlap(all), None, "{what}: ranges of different tensors or experts overlap");

        if let Some(g) = &idx.gguf {
            for t in idx.tensors.values().filter(|t| t.is_expert_stack()) {
                let info = g.tensor(&t.name).expect("in the GGUF");
                assert_eq!(t.data[0].len * 8, info.n_bytes, "{what}: {} slab × experts", t.name);
            }
        }
    }
}

#[test]
fn fused_gate_and_up_are_adjacent_halves_of_each_expert_slab() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny(dir.path(), SynthFormat::HfF32, ExpertLayout::Fused);
    let idx = TensorIndex::open(&path).expect("open");
    for layer in 0..2 {
        let gate = idx.get(&format!("blk.{layer}.ffn_gate_exps.weight")).expect("gate");
        let up = idx.get(&format!("blk.{layer}.ffn_up_exps.weight")).expect("up");
        let slab = 256 * 256 * 4;
        for e in 0..8 {
            let (g, u) = (gate.data[e], up.data[e]);
            assert_eq!((g.len, u.len), (slab, slab), "layer {layer} expert {e}");
            assert_eq!(g.offset + g.len, u.offset, "layer {layer} expert {e}: up follows gate");
            if e + 1 < 8 {
                assert_eq!(u.offset + u.len, gate.data[e + 1].offset, "layer {layer} expert {e}: next gate follows up");
            }
        }
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(&p, v.to_string()).expect("write");
}

fn open_err(path: &Path) -> String {
    match TensorIndex::open(path) {
        Ok(i) => panic!("{}: opened with {} tensors", path.display(), i.tensors.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_has(err: &str, want: &[&str]) {
    for w in want {
        assert!(err.contains(w), "error lacks `{w}`: {err}");
    }
}

#[test]
fn config_hidden_size_disagreeing_with_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny(dir.path(), SynthFormat::HfBf16, ExpertLayout::PerExpert);
    edit_config(&path, |v| v["hidden_size"] = 512.into());
    let err = open_err(&path);
    // The first tensor checked is k_proj ([kv_heads·head_dim, hidden] = [128, 256] on disk).
    assert_has(
        &err,
        &[
            &path.join("model.safetensors").display().to_string(),
            "tensor `model.layers.0.self_attn.k_proj.weight` (as blk.0.attn_k.weight)",
            "has shape [128, 256] BF16",
            "expected [128, 512]",
        ],
    );
}

#[test]
fn hf_model_missing_one_expert_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny(dir.path(), SynthFormat::HfBf16, ExpertLayout::PerExpert);
    let st = path.join("model.safetensors");
    let drop = "model.layers.1.mlp.experts.5.up_proj.weight";
    let f = SafetensorsFile::open(&st).expect("open");
    let bytes = std::fs::read(&st).expect("read");
    let keep: Vec<_> = f.tensors.iter().filter(|t| t.name != drop).collect();
    assert_eq!(keep.len() + 1, f.tensors.len(), "{drop} was in the file");
    let header: Vec<_> = keep.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
    let mut w = SafetensorsWriter::create(&st, &header, None).expect("rewrite");
    for t in &keep {
        w.write(&t.name, &bytes[t.offset as usize..(t.offset + t.len) as usize]).expect("copy");
    }
    w.finish().expect("finish");
    let err = open_err(&path);
    assert_has(&err, &[&path.display().to_string(), "blk.1.ffn_up_exps.weight (expert 5)", "not found"]);
}

#[test]
fn mlx_config_claiming_4_bits_for_the_8_bit_router() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny(dir.path(), SynthFormat::MlxQ4, ExpertLayout::PerExpert);
    // Sanity: as written, the model opens (router 8-bit, the rest 4-bit).
    TensorIndex::open(&path).expect("unedited MLX model opens");
    edit_config(&path, |v| {
        for k in ["quantization", "quantization_config"] {
            v[k]["model.layers.1.mlp.gate"] = serde_json::json!({"group_size": 64, "bits": 4});
        }
    });
    let err = open_err(&path);
    assert_has(
        &err,
        &[
            &path.join("model.safetensors").display().to_string(),
            "tensor `model.layers.1.mlp.gate.weight`",
            "shapes say 8-bit group 64",
            "config.json quantization says 4-bit group 64",
        ],
    );
}

#[test]
fn gguf_expert_count_disagreeing_with_tensor_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny(dir.path(), SynthFormat::GgufQ8_0, ExpertLayout::PerExpert);
    let g = GgufFile::open(&path).expect("open");
    let bytes = std::fs::read(&path).expect("read");
    let bad = dir.path().join("bad.gguf");
    let mut w = GgufWriter::create(&bad).expect("create");
    for (k, v) in &g.metadata {
        let v = if k == "qwen3moe.expert_count" { GgufValue::U32(16) } else { v.clone() };
        w.add_kv(k, v).expect("kv");
    }
    for t in &g.tensors {
        w.add_tensor(&t.name, &t.shape(), t.ty).expect("tensor info");
    }
    let mut d = w.finish_header().expect("header");
    for t in &g.tensors {
        d.write_tensor(&t.name, &bytes[t.offset as usize..(t.offset + t.n_bytes) as usize]).expect("data");
    }
    d.finish().expect("finish");
    let err = open_err(&bad);
    assert_has(&err, &[&bad.display().to_string(), "tensor `blk.0.", "has shape [8,", "the metadata implies [16,"]);
}
