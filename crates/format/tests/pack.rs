//! The expert-major pack sidecar over tiny synthetic models (GGUF Q4_0, MLX 4-bit, HF bf16): reading through the
//! packed index gives the same bytes as the model files, each expert is one aligned slab of adjacent ranges, and a
//! stale, truncated or foreign sidecar is ignored with a warning that names it.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use moestream_format::pack::{self, ALIGN};
use moestream_format::{FileRange, TensorIndex};
use moestream_synth::{ExpertLayout, Preset, SynthFormat, SynthOptions, synth};

const FORMATS: [SynthFormat; 3] = [SynthFormat::GgufQ4_0, SynthFormat::MlxQ4, SynthFormat::HfBf16];

fn tiny(dir: &Path, format: SynthFormat) -> PathBuf {
    let out = if format.is_gguf() { dir.join("model.gguf") } else { dir.join("model") };
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, format, &out);
    o.expert_layout = ExpertLayout::PerExpert;
    synth(&o).unwrap_or_else(|e| panic!("synth {}: {e}", format.name()));
    out
}

fn read(idx: &TensorIndex, r: FileRange) -> Vec<u8> {
    let mut b = vec![0u8; r.len as usize];
    idx.read_range(r, &mut b).unwrap_or_else(|e| panic!("read {r:?}: {e}"));
    b
}

/// Synthesize, pack to the default path, and open both ways.
fn packed(dir: &Path, format: SynthFormat) -> (PathBuf, PathBuf, TensorIndex, TensorIndex) {
    let model = tiny(dir, format);
    let plain = TensorIndex::open_without_pack(&model).expect("open without pack");
    let side = pack::default_path(&plain);
    let s = pack::write(&plain, &side, false).unwrap_or_else(|e| panic!("{}: pack: {e}", format.name()));
    assert_eq!(s.bytes, std::fs::metadata(&side).expect("sidecar exists").len(), "{}", format.name());
    assert_eq!(s.slabs, 2 * 8, "{}: tiny model has 2 MoE layers × 8 experts", format.name());
    let idx = TensorIndex::open(&model).expect("open with pack");
    (model, side, plain, idx)
}

#[test]
fn sidecar_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = TensorIndex::open(&tiny(dir.path(), SynthFormat::GgufQ4_0)).expect("open");
    assert_eq!(pack::default_path(&g), dir.path().join("model.gguf.moestream-pack"));
    let m = TensorIndex::open(&tiny(dir.path(), SynthFormat::MlxQ4)).expect("open");
    assert_eq!(pack::default_path(&m), dir.path().join("model").join("model.moestream-pack"));
}

#[test]
fn packed_index_reads_the_same_bytes_in_one_slab_per_expert() {
    for format in FORMATS {
        let what = format.name();
        let dir = tempfile::tempdir().expect("tempdir");
        let (_model, side, plain, idx) = packed(dir.path(), format);
        assert!(idx.warnings.is_empty(), "{what}: {:?}", idx.warnings);
        assert_eq!(idx.pack.as_deref(), Some(side.as_path()), "{what}");
        assert_eq!(plain.pack, None, "{what}");
        let pack_id = (idx.files.len() - 1) as u32;
        assert_eq!(idx.files[pack_id as usize], side, "{what}");
        assert_eq!(&idx.files[..pack_id as usize], &plain.files[..], "{what}");
        let side_len = std::fs::metadata(&side).expect("sidecar").len();

        let mut experts_checked = 0;
        for layer in 0..idx.config.num_layers {
            let names: Vec<String> = pack::PROJECTIONS.iter().map(|p| format!("blk.{layer}.{p}.weight")).collect();
            if !idx.tensors.contains_key(&names[0]) {
                continue;
            }
            let e_count = idx.get(&names[0]).expect("gate").num_experts();
            for e in 0..e_count {
                // Every piece reads the same bytes both ways.
                let mut ranges = Vec::new();
                for n in &names {
                    let (a, b) = (
                        plain.get(n).expect("plain").expert(e).expect("e"),
                        idx.get(n).expect("p").expert(e).expect("e"),
                    );
                    assert_eq!(a.scales.is_some(), b.scales.is_some(), "{what} {n}");
                    for (ra, rb) in a.iter().zip(b.iter()) {
                        assert_eq!(rb.file, pack_id, "{what} {n} expert {e}: not in the pack");
                        assert_eq!(read(&plain, ra), read(&idx, rb), "{what} {n} expert {e}: bytes differ");
                    }
                    ranges.push(b);
                }
                // In slab order, the ranges are back to back inside one aligned slab.
                let order: Vec<FileRange> = [0, 1, 2]
                    .iter()
                    .map(|&p| ranges[p].data)
                    .chain([0, 1, 2].iter().filter_map(|&p| ranges[p].scales))
                    .chain([0, 1, 2].iter().filter_map(|&p| ranges[p].biases))
                    .collect();
                assert_eq!(order.len(), if format == SynthFormat::MlxQ4 { 9 } else { 3 }, "{what}");
                for w in order.windows(2) {
                    assert_eq!(w[0].offset + w[0].len, w[1].offset, "{what} layer {layer} expert {e}: not adjacent");
                }
                let start = order[0].offset;
                let end = order.last().map(|r| r.offset + r.len).expect("ranges");
                assert_eq!(start % ALIGN, 0, "{what} layer {layer} expert {e}: slab not aligned");
                assert!(end.div_ceil(ALIGN) * ALIGN <= side_len, "{what}: slab past the end");
                // The next aligned boundary after the slab start bounds it: one slab, no other expert inside.
                let slab_end = start + (end - start).div_ceil(ALIGN) * ALIGN;
                assert!(end <= slab_end, "{what}");
                experts_checked += 1;
            }
            // Slabs of one layer do not overlap and follow each other.
            let gate = &idx.get(&names[0]).expect("gate").data;
            for w in gate.windows(2) {
                assert!(w[1].offset >= w[0].offset + ALIGN && (w[1].offset - w[0].offset) % ALIGN == 0, "{what}");
            }
        }
        assert_eq!(experts_checked, 16, "{what}");

        // Dequantized experts agree too (the decode path reads through the pack).
        let n = "blk.1.ffn_down_exps.weight";
        assert_eq!(plain.load_expert_f32(n, 5).expect("plain"), idx.load_expert_f32(n, 5).expect("packed"), "{what}");

        // Everything that is not a routed expert is untouched.
        for (name, t) in &plain.tensors {
            if !t.is_expert_stack() {
                assert_eq!(Some(t), idx.tensors.get(name), "{what} {name}");
            }
        }
    }
}

fn assert_ignored(model: &Path, side: &Path, plain: &TensorIndex, what: &str, because: &str) {
    let idx = TensorIndex::open(model).unwrap_or_else(|e| panic!("{what}: open must not fail: {e}"));
    assert_eq!(idx.pack, None, "{what}: stale/corrupt sidecar was used");
    assert_eq!(idx.files, plain.files, "{what}");
    assert_eq!(idx.warnings.len(), 1, "{what}: {:?}", idx.warnings);
    let w = &idx.warnings[0];
    assert!(w.contains(&side.display().to_string()), "{what}: warning does not name the sidecar: {w}");
    assert!(w.contains(because), "{what}: warning does not say `{because}`: {w}");
    for (name, t) in &plain.tensors {
        assert_eq!(Some(t), idx.tensors.get(name), "{what} {name}");
    }
}

/// The model file holding expert 3 of layer 0's up projection, and that range.
fn an_expert_range(plain: &TensorIndex) -> (PathBuf, FileRange) {
    let r = plain.get("blk.0.ffn_up_exps.weight").expect("up").expert(3).expect("e3").data;
    (plain.file_path(r.file).to_path_buf(), r)
}

#[test]
fn stale_sidecar_is_ignored_with_a_warning() {
    for format in FORMATS {
        let what = format.name();
        // One byte of an expert rewritten in place (same size, same head and tail: only the mtime tells).
        let dir = tempfile::tempdir().expect("tempdir");
        let (model, side, plain, _) = packed(dir.path(), format);
        let (file, r) = an_expert_range(&plain);
        std::thread::sleep(std::time::Duration::from_millis(50)); // past the filesystem's timestamp granularity
        let before = std::fs::metadata(&file).and_then(|m| m.modified()).expect("mtime");
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).expect("open model for writing");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, r.offset + 7).expect("read");
        f.write_all_at(&[b[0] ^ 0xff], r.offset + 7).expect("write");
        drop(f);
        let after = std::fs::metadata(&file).and_then(|m| m.modified()).expect("mtime");
        assert_ne!(before, after, "{what}: the filesystem did not update the mtime; the test premise fails");
        assert_ignored(&model, &side, &plain, &format!("{what} byte rewritten"), "modified after packing");

        // The model grew: size mismatch. GGUF tolerates trailing bytes; a safetensors file gets 8 spaces of
        // header padding instead, which moves every tensor (a packed index would now read the wrong bytes).
        let dir = tempfile::tempdir().expect("tempdir");
        let (model, side, plain, _) = packed(dir.path(), format);
        let (file, _) = an_expert_range(&plain);
        let mut bytes = std::fs::read(&file).expect("read model");
        if format.is_gguf() {
            bytes.extend_from_slice(&[0u8; 64]);
        } else {
            let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
            let mut grown = (n as u64 + 8).to_le_bytes().to_vec();
            grown.extend_from_slice(&bytes[8..8 + n]);
            grown.extend_from_slice(b"        ");
            grown.extend_from_slice(&bytes[8 + n..]);
            bytes = grown;
        }
        std::fs::write(&file, &bytes).expect("rewrite model");
        let plain = TensorIndex::open_without_pack(&model).expect("model still opens");
        assert_ignored(&model, &side, &plain, &format!("{what} size changed"), "changed size");
    }
}

#[test]
fn corrupt_sidecars_are_ignored_with_a_warning() {
    for format in FORMATS {
        let what = format.name();
        let dir = tempfile::tempdir().expect("tempdir");
        let (model, side, plain, _) = packed(dir.path(), format);
        let good = std::fs::read(&side).expect("sidecar");

        // Truncated in the slabs.
        std::fs::write(&side, &good[..good.len() - 100]).expect("truncate");
        assert_ignored(&model, &side, &plain, &format!("{what} truncated"), "truncated");
        // Truncated inside the header.
        std::fs::write(&side, &good[..100]).expect("truncate");
        assert_ignored(&model, &side, &plain, &format!("{what} truncated header"), "truncated");
        // Empty file.
        std::fs::write(&side, b"").expect("truncate");
        assert_ignored(&model, &side, &plain, &format!("{what} empty"), "truncated");
        // Bad magic.
        let mut bad = good.clone();
        bad[..8].copy_from_slice(b"NOTAPACK");
        std::fs::write(&side, &bad).expect("write");
        assert_ignored(&model, &side, &plain, &format!("{what} bad magic"), "bad magic");
        // Garbage JSON.
        let mut bad = good.clone();
        bad[24] = b'#';
        std::fs::write(&side, &bad).expect("write");
        assert_ignored(&model, &side, &plain, &format!("{what} bad json"), "JSON");
        // Extra bytes at the end.
        let mut bad = good.clone();
        bad.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&side, &bad).expect("write");
        assert_ignored(&model, &side, &plain, &format!("{what} too long"), "the header describes");

        // Restored, it is used again.
        std::fs::write(&side, &good).expect("restore");
        let idx = TensorIndex::open(&model).expect("open");
        assert_eq!(idx.pack.as_deref(), Some(side.as_path()), "{what}: {:?}", idx.warnings);
    }
}

#[test]
fn a_sidecar_from_another_model_is_ignored() {
    // A pack of a 1-layer model copied next to a 2-layer one: the fingerprint (and shapes) disagree.
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.gguf");
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ4_0, &a);
    o.layers = Some(1);
    synth(&o).expect("synth");
    let b = tiny(dir.path(), SynthFormat::GgufQ4_0);
    let pa = TensorIndex::open_without_pack(&a).expect("open a");
    let pb = TensorIndex::open_without_pack(&b).expect("open b");
    let side_b = pack::default_path(&pb);
    pack::write(&pa, &side_b, false).expect("pack a into b's sidecar path");
    assert_ignored(&b, &side_b, &pb, "foreign", "stale");
}

#[test]
fn packing_a_packed_index_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, side, _, idx) = packed(dir.path(), SynthFormat::GgufQ4_0);
    assert!(pack::write(&idx, &side, false).is_err());
    // The sidecar is still intact and used.
    let again = TensorIndex::open(&idx.root).expect("open");
    assert!(again.pack.is_some() && again.warnings.is_empty(), "{:?}", again.warnings);
}

/// Layout `packed`: GGUF Q4_0 data pieces are stored as `Q4_0x16` (the bytes `moestream_quant::packed::pack`
/// makes of the file's rows), marked `packed` in the header and `data_packed` in the index; MLX data (no packed
/// form) stays as the file has it.
#[test]
fn packed_layout_stores_packable_experts_in_their_16_row_form() {
    for format in [SynthFormat::GgufQ4_0, SynthFormat::MlxQ4] {
        let what = format.name();
        let dir = tempfile::tempdir().expect("tempdir");
        let model = tiny(dir.path(), format);
        let plain = TensorIndex::open_without_pack(&model).expect("open without pack");
        let side = pack::default_path(&plain);
        pack::write_with(&plain, &side, false, pack::Layout::Packed).expect("pack");
        let (h, _) = pack::read_header(&side).expect("header");
        assert_eq!(h.version, pack::VERSION);
        let gguf = format.is_gguf();
        for p in h.layers.iter().flat_map(|l| &l.pieces) {
            assert_eq!(p.packed, gguf && p.kind == pack::PieceKind::Data, "{what}: {} {:?}", p.tensor, p.kind);
        }
        let idx = TensorIndex::open(&model).expect("open with pack");
        assert!(idx.warnings.is_empty(), "{what}: {:?}", idx.warnings);
        let mut checked = 0;
        for (name, t) in idx.tensors.iter().filter(|(_, t)| t.is_expert_stack()) {
            let p = &plain.tensors[name];
            assert_eq!(t.data_packed, gguf, "{what}: {name}");
            let (rows, cols) = t.matrix_dims();
            for (e, (&r, &q)) in t.data.iter().zip(&p.data).enumerate() {
                let file = read(&plain, q);
                let mut want = file.clone();
                if gguf {
                    moestream_quant::packed::pack(t.encoding, &file, &mut want, rows, cols).expect("pack");
                    assert_ne!(want, file, "{what}: packing must move bytes");
                }
                assert_eq!(read(&idx, r), want, "{what}: {name} expert {e}");
                checked += 1;
            }
        }
        assert!(checked > 0, "{what}");
    }
}

/// A header that marks a piece packed whose encoding has no packed form is refused (the sidecar is ignored).
#[test]
fn a_packed_mark_on_an_unpackable_piece_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny(dir.path(), SynthFormat::MlxQ4);
    let plain = TensorIndex::open_without_pack(&model).expect("open without pack");
    let side = pack::default_path(&plain);
    pack::write_with(&plain, &side, false, pack::Layout::File).expect("pack");
    let mut idx = TensorIndex::open_without_pack(&model).expect("open without pack");
    let bytes = std::fs::read(&side).expect("read sidecar");
    let text = String::from_utf8_lossy(&bytes);
    let at = text.find("\"packed\":false").expect("the header marks pieces");
    let mut bad = bytes.clone();
    bad[at..at + 14].copy_from_slice(b"\"packed\":true ");
    std::fs::write(&side, &bad).expect("write");
    let err = pack::attach(&mut idx, &side).expect_err("a packed mark on MLX data must be refused");
    assert!(err.contains("marked packed"), "{err}");
    assert!(idx.pack.is_none());
}
