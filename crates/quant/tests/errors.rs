//! Length and parameter validation: every malformed call returns the specific `QuantError`, never panics.

use moestream_quant::{GgmlType, MlxAffine, QuantError, ggml, mlx};

#[test]
fn ggml_dequantize_rejects_bad_lengths() {
    use QuantError::*;
    // (type, src bytes, dst elems, expected error)
    let table: &[(GgmlType, usize, usize, QuantError)] = &[
        // dst not whole blocks: 33 elements of Q4_0.
        (GgmlType::Q4_0, 18, 33, PartialBlock { ty: "Q4_0", elems: 33, block: 32 }),
        (GgmlType::Q6K, 210, 255, PartialBlock { ty: "Q6_K", elems: 255, block: 256 }),
        // src not whole blocks: one byte short of one Q8_0 block, one byte over two Q4_K blocks.
        (GgmlType::Q8_0, 33, 32, ByteLength { ty: "Q8_0", expected: 34, got: 33 }),
        (GgmlType::Q4K, 289, 512, ByteLength { ty: "Q4_K", expected: 288, got: 289 }),
        (GgmlType::F16, 7, 4, ByteLength { ty: "F16", expected: 8, got: 7 }),
        // both whole, but different block counts: dst too short or too long.
        (GgmlType::MXFP4, 34, 32, OutputLength { ty: "MXFP4", expected: 64, got: 32 }),
        (GgmlType::Q5_1, 24, 64, OutputLength { ty: "Q5_1", expected: 32, got: 64 }),
        (GgmlType::BF16, 4, 3, OutputLength { ty: "BF16", expected: 2, got: 3 }),
    ];
    for (ty, src, dst, want) in table {
        let mut out = vec![0.0f32; *dst];
        assert_eq!(ggml::dequantize(*ty, &vec![0u8; *src], &mut out), Err(want.clone()), "{ty} {src} B -> {dst}");
    }
}

#[test]
fn ggml_dequantize_accepts_empty_and_exact() {
    for ty in GgmlType::ALL {
        assert_eq!(ggml::dequantize(ty, &[], &mut []), Ok(()), "{ty}");
        let mut out = vec![1.0f32; ty.block_elems() * 3];
        // All-zero bytes are a valid block of every type, and decode to zeros.
        assert_eq!(ggml::dequantize(ty, &vec![0u8; ty.block_bytes() * 3], &mut out), Ok(()), "{ty}");
        assert!(out.iter().all(|v| *v == 0.0), "{ty}: {out:?}");
    }
}

#[test]
fn ggml_quantize_rejects_bad_lengths_and_missing_encoders() {
    use QuantError::*;
    // (type, src elems, dst bytes, expected error)
    let table: &[(GgmlType, usize, usize, QuantError)] = &[
        (GgmlType::Q4_0, 31, 18, PartialBlock { ty: "Q4_0", elems: 31, block: 32 }),
        (GgmlType::Q8_0, 64, 67, ByteLength { ty: "Q8_0", expected: 68, got: 67 }),
        (GgmlType::MXFP4, 32, 18, ByteLength { ty: "MXFP4", expected: 17, got: 18 }),
        (GgmlType::F32, 3, 8, ByteLength { ty: "F32", expected: 12, got: 8 }),
        (GgmlType::Q4K, 256, 144, NoEncoder("Q4_K")),
        (GgmlType::Q5K, 256, 176, NoEncoder("Q5_K")),
        (GgmlType::Q6K, 256, 210, NoEncoder("Q6_K")),
    ];
    for (ty, src, dst, want) in table {
        let mut out = vec![0u8; *dst];
        assert_eq!(ggml::quantize(*ty, &vec![0.5f32; *src], &mut out), Err(want.clone()), "{ty} {src} -> {dst} B");
    }
}

#[test]
fn mlx_rejects_bad_params_and_lengths() {
    use QuantError::*;
    let p4 = MlxAffine { bits: 4, group_size: 64 };
    // (params, elems, in_features, packed bytes, scales, biases, expected error)
    let table: &[(MlxAffine, usize, usize, usize, usize, usize, QuantError)] = &[
        (MlxAffine { bits: 3, group_size: 64 }, 128, 128, 48, 2, 2, MlxParams { what: "bits", value: 3 }),
        (MlxAffine { bits: 4, group_size: 48 }, 96, 96, 48, 2, 2, MlxParams { what: "group_size", value: 48 }),
        (p4, 96, 96, 48, 1, 1, PartialBlock { ty: "MLX affine in_features", elems: 96, block: 64 }),
        (p4, 192, 128, 96, 3, 3, PartialBlock { ty: "MLX affine rows", elems: 192, block: 128 }),
        (p4, 256, 128, 64, 4, 4, ByteLength { ty: "MLX affine packed", expected: 128, got: 64 }),
        (p4, 256, 128, 128, 2, 4, GroupCount { what: "scales", expected: 4, got: 2 }),
        (p4, 256, 128, 128, 4, 5, GroupCount { what: "biases", expected: 4, got: 5 }),
    ];
    for (p, elems, inf, packed, scales, biases, want) in table {
        let mut dst = vec![0.0f32; *elems];
        let got = mlx::dequantize(*p, &vec![0u8; *packed], &vec![1.0; *scales], &vec![0.0; *biases], *inf, &mut dst);
        assert_eq!(got, Err(want.clone()), "dequantize {p:?} {elems}/{inf}");
        let (mut pk, mut sc, mut bi) = (vec![0u8; *packed], vec![0.0f32; *scales], vec![0.0f32; *biases]);
        let got = mlx::quantize(*p, &vec![0.5; *elems], *inf, &mut pk, &mut sc, &mut bi);
        assert_eq!(got, Err(want.clone()), "quantize {p:?} {elems}/{inf}");
    }
}

/// `Encoding::dequantize` (chunked scale decoding, no allocation) equals `mlx::dequantize` with the scales decoded
/// up front, on rows far wider than its 64-group chunk and with chunks that cross rows.
#[test]
fn encoding_dequantize_matches_mlx_on_wide_rows() {
    use moestream_quant::{Encoding, FloatType, MlxAffine, encode_floats, mlx};
    let p = MlxAffine { bits: 4, group_size: 32 };
    let (rows, cols) = (3, 32 * 100);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 333.0).collect();
    let groups = rows * cols / 32;
    let (mut packed, mut sc, mut bi) = (vec![0u8; p.packed_bytes(w.len())], vec![0f32; groups], vec![0f32; groups]);
    mlx::quantize(p, &w, cols, &mut packed, &mut sc, &mut bi).expect("quantize");
    let (mut scb, mut bib) = (vec![0u8; groups * 2], vec![0u8; groups * 2]);
    encode_floats(FloatType::BF16, &sc, &mut scb).expect("scales");
    encode_floats(FloatType::BF16, &bi, &mut bib).expect("biases");
    let (mut scd, mut bid) = (vec![0f32; groups], vec![0f32; groups]);
    moestream_quant::decode_floats(FloatType::BF16, &scb, &mut scd).expect("decode");
    moestream_quant::decode_floats(FloatType::BF16, &bib, &mut bid).expect("decode");
    let mut want = vec![0f32; w.len()];
    mlx::dequantize(p, &packed, &scd, &bid, cols, &mut want).expect("reference");
    let mut got = vec![0f32; w.len()];
    let enc = Encoding::MlxAffine { params: p, scale_type: FloatType::BF16 };
    enc.dequantize(&packed, &scb, &bib, cols, &mut got).expect("encoding");
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(enc.dequantize(&packed, &scb[2..], &bib, cols, &mut got).is_err(), "short scales must be an error");
}
