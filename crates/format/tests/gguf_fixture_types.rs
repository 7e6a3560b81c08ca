//! Every GGUF type we decode, read from files that other tools wrote, against those tools' own dequantization:
//! - `tests/fixtures/gguf-types/`: one tensor per type gguf-py quantizes, written by gguf-py's GGUFWriter
//!   (scripts/fixtures/make_gguf_types_fixture.py), references from `gguf.quants.dequantize`;
//! - `tests/fixtures/kquant/`: tiny qwen3moe models quantized by llama.cpp's `llama-quantize` (K-quants),
//!   references from gguf-py, themselves checked against llama.cpp's dequantization when generated.
//!
//! Comparisons are bit-exact: both sides decode the same bytes with the same f32 arithmetic.

use std::path::{Path, PathBuf};

use moestream_format::gguf::GgufFile;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn tensor_bytes(g: &GgufFile, name: &str) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let t = g.tensor(name).unwrap_or_else(|| panic!("{name} missing from {}", g.path.display()));
    let f = std::fs::File::open(&g.path).expect("open fixture");
    let mut buf = vec![0u8; t.n_bytes as usize];
    f.read_exact_at(&mut buf, t.offset).expect("read tensor");
    buf
}

fn assert_bits_equal(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{what}[{i}]: ours {a} gguf-py {b}");
    }
}

#[test]
fn gguf_py_written_file_every_quantizable_type() {
    let dir = fixtures().join("gguf-types");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"))
        .expect("manifest json");
    let g = GgufFile::open(&dir.join(m["file"].as_str().expect("file"))).expect("our reader opens gguf-py's file");
    let mut seen = Vec::new();
    for t in m["tensors"].as_array().expect("tensors") {
        let name = t["name"].as_str().expect("name");
        let info = g.tensor(name).expect("tensor present");
        assert_eq!(info.ty.name(), t["type"].as_str().expect("type"), "{name}: type");
        let shape: Vec<u64> = t["shape"].as_array().expect("shape").iter().filter_map(Value::as_u64).collect();
        assert_eq!(info.shape(), shape, "{name}: shape");
        let reference = read_f32(&dir.join(t["ref"].as_str().expect("ref")));
        let mut ours = vec![0f32; reference.len()];
        moestream_quant::ggml::dequantize(info.ty, &tensor_bytes(&g, name), &mut ours).expect("dequantize");
        assert_bits_equal(name, &ours, &reference);
        seen.push(info.ty.name());
    }
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"] {
        assert!(seen.contains(&ty), "fixture lacks {ty}");
    }
}

#[test]
fn llama_quantize_written_k_quants() {
    let dir = fixtures().join("kquant");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"))
        .expect("manifest json");
    let mut covered = Vec::new();
    for f in m["files"].as_array().expect("files") {
        let path = dir.join(f["file"].as_str().expect("file"));
        let present: Vec<&str> =
            f["k_types_present"].as_array().expect("k_types_present").iter().filter_map(Value::as_str).collect();
        if present.iter().any(|t| matches!(*t, "Q2_K" | "Q3_K")) {
            // Types we do not decode: the file must be refused with an error that names a tensor and the type id.
            let err = GgufFile::open(&path).expect_err("Q2_K/Q3_K are not supported").to_string();
            assert!(err.contains(&path.display().to_string()) && err.contains("unknown dtype"), "{err}");
            continue;
        }
        let g = GgufFile::open(&path).expect("our reader opens the file");
        for r in f["references"].as_array().expect("references") {
            let name = r["tensor"].as_str().expect("tensor");
            let ty_name = r["ggml_type"].as_str().expect("type");
            let info = g.tensor(name).expect("tensor present");
            assert_eq!(info.ty.name(), ty_name, "{name}");
            let reference = read_f32(&dir.join(r["ref_file"].as_str().expect("ref_file")));
            let ne0 = info.ne[0] as usize;
            let row_bytes = info.ty.row_bytes(ne0).expect("whole blocks");
            let rows = r["ref_rows"].as_u64().expect("ref_rows") as usize;
            let bytes = tensor_bytes(&g, name);
            let mut ours = vec![0f32; rows * ne0];
            moestream_quant::ggml::dequantize(info.ty, &bytes[..rows * row_bytes], &mut ours).expect("dequantize");
            assert_bits_equal(&format!("{} {name}", f["file"]), &ours, &reference);
            covered.push(ty_name.to_string());
        }
    }
    for ty in ["Q4_K", "Q5_K", "Q6_K"] {
        assert!(covered.iter().any(|c| c == ty), "no llama-quantize fixture covers {ty}");
    }
}
