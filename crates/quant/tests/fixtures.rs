//! Checks every codec against references produced by other implementations (gguf-py's numpy `gguf.quants`,
//! MLX's `mx.quantize` / `mx.dequantize`), committed under `tests/fixtures/quant/` by
//! `scripts/fixtures/make_quant_fixtures.py`. Nothing here compares the crate with itself.
//!
//! All comparisons are bit-exact (`to_bits`, so -0.0 vs 0.0 and NaN payloads count): our decoders do the same f32
//! operations in the same order as the references, and none of them fuse multiply-adds. The one tolerance is
//! MLX's bf16 dequantization, explained at its assertion.

use std::path::PathBuf;

use moestream_quant::{FloatType, GgmlType, MlxAffine, decode_floats, encode_floats, ggml, mlx};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant")
}

fn read(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_f32(name: &str) -> Vec<f32> {
    read(name).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// One manifest line: a flat JSON object of string and integer fields (the generator writes one per line).
struct Case(String);

impl Case {
    fn raw(&self, key: &str) -> &str {
        let pat = format!("\"{key}\": ");
        let start = self.0.find(&pat).unwrap_or_else(|| panic!("no {key} in {}", self.0)) + pat.len();
        let rest = &self.0[start..];
        if let Some(s) = rest.strip_prefix('"') {
            &s[..s.find('"').expect("unterminated string")]
        } else {
            &rest[..rest.find([',', '}']).expect("unterminated number")]
        }
    }
    fn str(&self, key: &str) -> &str {
        self.raw(key)
    }
    fn num(&self, key: &str) -> usize {
        self.raw(key).parse().unwrap_or_else(|e| panic!("{key} in {}: {e}", self.0))
    }
}

fn cases(kind: &str) -> Vec<Case> {
    let text = String::from_utf8(read("manifest.json")).expect("manifest is UTF-8");
    let kind = format!("\"kind\": \"{kind}\"");
    let out: Vec<Case> = text.lines().filter(|l| l.contains(&kind)).map(|l| Case(l.to_string())).collect();
    assert!(!out.is_empty(), "no {kind} cases in manifest");
    out
}

fn ggml_type(name: &str) -> GgmlType {
    GgmlType::ALL.into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("unknown type {name}"))
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: got {g:e}, want {w:e}");
    }
}

#[test]
fn ggml_dequantize_matches_gguf_py() {
    let mut seen = Vec::new();
    for case in cases("gguf") {
        let name = case.str("name");
        let ty = ggml_type(case.str("type"));
        let bytes = read(case.str("quant"));
        let want = read_f32(case.str("dequant"));
        let mut got = vec![f32::NAN; case.num("elems")];
        ggml::dequantize(ty, &bytes, &mut got).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_bits_eq(name, &got, &want);
        seen.push(ty);
    }
    // F32 is the identity on bytes; every other decoder must have met at least one gguf-py fixture.
    for ty in GgmlType::ALL {
        assert!(seen.contains(&ty), "no gguf-py fixture for {ty}");
    }
}

#[test]
fn ggml_quantize_matches_gguf_py_bytes() {
    let mut checked = 0;
    for case in cases("gguf") {
        let input = case.str("input");
        if input.is_empty() {
            continue; // K-quant fixtures are hand-built bytes: gguf-py has no encoder to compare with.
        }
        let name = case.str("name");
        let ty = ggml_type(case.str("type"));
        let x = read_f32(input);
        let want = read(case.str("quant"));
        let mut got = vec![0xAAu8; want.len()];
        ggml::quantize(ty, &x, &mut got).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
            let block = i / ty.block_bytes();
            panic!("{name}: byte {i} (block {block}) got {:#04x}, want {:#04x}", got[i], want[i]);
        }
        checked += 1;
    }
    assert!(checked >= 9 * 3, "too few encoder fixtures: {checked}");
}

fn mlx_scales(case: &Case, file: &str) -> Vec<f32> {
    let bytes = read(case.str(file));
    let ft = if case.str("float") == "BF16" { FloatType::BF16 } else { FloatType::F32 };
    let mut out = vec![0.0; bytes.len() / ft.size()];
    decode_floats(ft, &bytes, &mut out).expect("scale bytes");
    out
}

#[test]
fn mlx_dequantize_matches_mlx() {
    for case in cases("mlx") {
        let name = case.str("name");
        let p = MlxAffine { bits: case.num("bits") as u8, group_size: case.num("group") };
        let cols = case.num("cols");
        let (scales, biases) = (mlx_scales(&case, "scales"), mlx_scales(&case, "biases"));
        let packed = read(case.str("packed"));
        let mut got = vec![f32::NAN; case.num("rows") * cols];
        mlx::dequantize(p, &packed, &scales, &biases, cols, &mut got).unwrap_or_else(|e| panic!("{name}: {e}"));
        if case.str("float") == "F32" {
            assert_bits_eq(name, &got, &read_f32(case.str("dequant")));
        } else {
            // MLX evaluates `scale * q + bias` in bf16 arithmetic, rounding the product and then the sum to bf16
            // (an emulation of exactly that matched all fixture elements when this was written); we stay in f32.
            // Each of its two roundings is at most half a bf16 ulp, i.e. 2^-8 relative (8 significant bits), of
            // the product and of the result, so |ours - mlx| <= (|scale*q| + |mlx|) * 2^-8.
            let want_bytes = read(case.str("dequant"));
            let mut want = vec![0.0; got.len()];
            decode_floats(FloatType::BF16, &want_bytes, &mut want).expect("bf16 dequant");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let product = g - biases[i / p.group_size];
                let tol = (product.abs() + w.abs()) * 2f32.powi(-8);
                assert!((g - w).abs() <= tol, "{name}: element {i}: got {g:e}, mlx {w:e}, tol {tol:e}");
            }
        }
    }
}

#[test]
fn mlx_quantize_matches_mlx() {
    for case in cases("mlx") {
        let name = case.str("name");
        let p = MlxAffine { bits: case.num("bits") as u8, group_size: case.num("group") };
        let cols = case.num("cols");
        let x = read_f32(case.str("input"));
        let want_packed = read(case.str("packed"));
        let groups = x.len() / p.group_size;
        let (mut packed, mut scales, mut biases) =
            (vec![0u8; p.packed_bytes(x.len())], vec![0.0; groups], vec![0.0; groups]);
        mlx::quantize(p, &x, cols, &mut packed, &mut scales, &mut biases).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(packed, want_packed, "{name}: packed codes");
        assert!(scales.iter().any(|s| *s < 0.0) && scales.iter().any(|s| *s > 0.0), "{name}: want both scale signs");
        if case.str("float") == "F32" {
            assert_bits_eq(&format!("{name} scales"), &scales, &mlx_scales(&case, "scales"));
            assert_bits_eq(&format!("{name} biases"), &biases, &mlx_scales(&case, "biases"));
        } else {
            // MLX on bf16 weights: same f32 arithmetic on the widened weights, then one round-to-nearest-even
            // to bf16 for storage. So our f32 scales, encoded as bf16, must equal MLX's bytes exactly.
            for (what, ours) in [("scales", &scales), ("biases", &biases)] {
                let mut bytes = vec![0u8; ours.len() * 2];
                encode_floats(FloatType::BF16, ours, &mut bytes).expect("bf16 encode");
                assert_eq!(bytes, read(case.str(what)), "{name}: bf16 {what}");
            }
        }
    }
}
