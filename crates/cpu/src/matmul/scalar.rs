//! The portable reference row dot: decode a block (or group) with `moestream_quant`'s reference decoders into a
//! stack buffer, then multiply-accumulate in f32 in column order.
//!
//! It owns no layout knowledge of its own (that lives in `quant`), which is what makes it the reference every
//! SIMD kernel is tested against, and the fallback for encodings with no SIMD kernel. It must stay obvious.

use moestream_quant::{Encoding, FloatType, GgmlType, decode_floats, ggml, mlx};

use super::RowRef;

/// Largest block or group we decode at once: a K-quant super-block (256) or an MLX group (≤ 128).
const BUF: usize = 256;

/// `Σ_c W[c]·x[c]` for one validated row.
pub(crate) fn row_dot(row: &RowRef<'_>, x: &[f32]) -> f32 {
    let mut buf = [0f32; BUF];
    let mut acc = 0f32;
    let mut dot = |w: &[f32], x: &[f32]| w.iter().zip(x).for_each(|(w, x)| acc += w * x);
    // The `expect`s below cannot fire: `WeightView::validate` checked every length before any kernel runs.
    const VALID: &str = "row validated by WeightView::validate";
    match float_type(row.encoding) {
        Some(ft) => {
            for (bytes, x) in row.data.chunks(BUF * ft.size()).zip(x.chunks(BUF)) {
                let w = &mut buf[..x.len()];
                decode_floats(ft, bytes, w).expect(VALID);
                dot(w, x);
            }
        }
        None => match row.encoding {
            Encoding::Ggml(t) => {
                let (be, bb) = (t.block_elems(), t.block_bytes());
                for (block, x) in row.data.chunks_exact(bb).zip(x.chunks_exact(be)) {
                    ggml::dequantize(t, block, &mut buf[..be]).expect(VALID);
                    dot(&buf[..be], x);
                }
            }
            Encoding::MlxAffine { params, scale_type } => {
                let gs = params.group_size;
                let gb = params.packed_bytes(gs);
                let sz = scale_type.size();
                for (g, (packed, x)) in row.data.chunks_exact(gb).zip(x.chunks_exact(gs)).enumerate() {
                    let (mut s, mut b) = ([0f32], [0f32]);
                    decode_floats(scale_type, &row.scales[g * sz..(g + 1) * sz], &mut s).expect(VALID);
                    decode_floats(scale_type, &row.biases[g * sz..(g + 1) * sz], &mut b).expect(VALID);
                    mlx::dequantize(params, packed, &s, &b, gs, &mut buf[..gs]).expect(VALID);
                    dot(&buf[..gs], x);
                }
            }
            Encoding::Float(_) => unreachable!("handled by float_type"),
            Encoding::Q4_0x16 | Encoding::Q4Kx16 | Encoding::Q6Kx16 => {
                unreachable!("packed views are walked by group in `matmul`, never by row")
            }
        },
    }
    acc
}

/// The plain float type behind `Float(_)` and the float-typed `Ggml(_)` ids, which are the same layout.
pub(crate) fn float_type(e: Encoding) -> Option<FloatType> {
    match e {
        Encoding::Float(ft) => Some(ft),
        Encoding::Ggml(GgmlType::F32) => Some(FloatType::F32),
        Encoding::Ggml(GgmlType::F16) => Some(FloatType::F16),
        Encoding::Ggml(GgmlType::BF16) => Some(FloatType::BF16),
        _ => None,
    }
}
