//! MLX affine group quantization (`mx.quantize(..., mode="affine")`), as stored in mlx-community safetensors.
//!
//! A row of `in_features` weights is cut into groups of `group_size`; each group has one scale and one bias and
//! element `j` decodes as `scale[j / group_size] * q[j] + bias[j / group_size]`. Codes are packed into
//! little-endian u32 words, lowest bits first (for 4-bit, element k of a word sits in bits `[4k, 4k+4)`).
//!
//! This module works on f32 scales and biases; files store them as bf16/f16, which the caller converts with
//! [`crate::decode_floats`] / [`crate::encode_floats`]. The encoder reproduces MLX's CPU kernel
//! (`mlx/backend/cpu/quantized.cpp`, `quantize`) operation for operation in f32, so for f32 input its codes,
//! scales and biases are bit-identical to `mx.quantize`. For bf16 input, MLX does the same f32 arithmetic on the
//! widened values and only rounds the final scale and bias to bf16, so feeding the widened weights here and
//! encoding the scales with `encode_floats(BF16, ..)` reproduces it too.
//!
//! Only the power-of-two widths (2, 4, 8 bits) are supported: 3, 5 and 6 bits use MLX's byte-triplet packing,
//! which no checkpoint we read uses.

use crate::QuantError;

/// Parameters of an MLX affine quantization: code width and elements per (scale, bias) group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlxAffine {
    pub bits: u8,
    pub group_size: usize,
}

impl MlxAffine {
    /// Checks `bits` is 2, 4 or 8 and `group_size` is 32, 64 or 128 (the sizes MLX accepts).
    pub fn validate(self) -> Result<(), QuantError> {
        if !matches!(self.bits, 2 | 4 | 8) {
            return Err(QuantError::MlxParams { what: "bits", value: usize::from(self.bits) });
        }
        if !matches!(self.group_size, 32 | 64 | 128) {
            return Err(QuantError::MlxParams { what: "group_size", value: self.group_size });
        }
        Ok(())
    }

    /// Packed bytes for `elems` codes (a whole number of groups, so always whole u32 words).
    #[inline]
    pub fn packed_bytes(self, elems: usize) -> usize {
        elems / 8 * usize::from(self.bits)
    }

    fn n_bins(self) -> f32 {
        f32::from((1u16 << self.bits) - 1)
    }
}

/// Decodes whole rows of `in_features` weights into `dst`, whose length fixes the row count.
///
/// `packed` holds the codes (little-endian u32 words, `dst.len() * bits / 8` bytes); `scales` and `biases` hold
/// one value per group. Scales may be negative.
pub fn dequantize(
    p: MlxAffine,
    packed: &[u8],
    scales: &[f32],
    biases: &[f32],
    in_features: usize,
    dst: &mut [f32],
) -> Result<(), QuantError> {
    let groups = check_shapes(p, dst.len(), in_features, packed.len(), scales.len(), biases.len())?;
    let bits = usize::from(p.bits);
    let mask = (1u16 << bits) - 1;
    let groups_out = dst.chunks_exact_mut(p.group_size).zip(scales.iter().zip(biases)).take(groups);
    for (g, (out, (&scale, &bias))) in groups_out.enumerate() {
        for (k, w) in out.iter_mut().enumerate() {
            let bit = (g * p.group_size + k) * bits;
            let q = (u16::from(packed[bit / 8]) >> (bit % 8)) & mask;
            // Two roundings (no fused multiply-add), as MLX's CPU kernel: `scale * q + bias`.
            *w = scale * f32::from(q) + bias;
        }
    }
    Ok(())
}

/// Encodes whole rows of `in_features` weights, writing codes, one scale and one bias per group.
///
/// Per group, MLX's rule: take the edge (min or max) with the larger magnitude (max on ties), choose
/// `scale = ±max((max - min) / n_bins, 1e-7)` with the sign that puts that edge at a non-positive code, then snap
/// the scale so the edge decodes exactly (`scale = edge / rint(edge / scale)`, `bias = edge`). Codes are
/// `clamp(rint((w - bias) / scale), 0, n_bins)` with ties to even.
pub fn quantize(
    p: MlxAffine,
    src: &[f32],
    in_features: usize,
    packed_out: &mut [u8],
    scales_out: &mut [f32],
    biases_out: &mut [f32],
) -> Result<(), QuantError> {
    let groups = check_shapes(p, src.len(), in_features, packed_out.len(), scales_out.len(), biases_out.len())?;
    let bits = usize::from(p.bits);
    let n_bins = p.n_bins();
    packed_out.fill(0);
    for g in 0..groups {
        let w = &src[g * p.group_size..(g + 1) * p.group_size];
        let (scale, bias) = group_scale_bias(w, n_bins);
        for (k, &x) in w.iter().enumerate() {
            let q = crate::float::round_half_even_small((x - bias) / scale).clamp(0.0, n_bins) as u8;
            let bit = (g * p.group_size + k) * bits;
            packed_out[bit / 8] |= q << (bit % 8);
        }
        scales_out[g] = scale;
        biases_out[g] = bias;
    }
    Ok(())
}

fn group_scale_bias(w: &[f32], n_bins: f32) -> (f32, f32) {
    const EPS: f32 = 1e-7;
    let (mut w_min, mut w_max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in w {
        w_max = w_max.max(x);
        w_min = w_min.min(x);
    }
    let min_is_edge = w_min.abs() > w_max.abs();
    let magnitude = ((w_max - w_min) / n_bins).max(EPS);
    let mut scale = if min_is_edge { magnitude } else { -magnitude };
    let edge = if min_is_edge { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    (scale, bias)
}

/// Validates parameters and buffer sizes for `elems` weights; returns the number of groups.
fn check_shapes(
    p: MlxAffine,
    elems: usize,
    in_features: usize,
    packed: usize,
    scales: usize,
    biases: usize,
) -> Result<usize, QuantError> {
    p.validate()?;
    if in_features == 0 || !in_features.is_multiple_of(p.group_size) {
        return Err(QuantError::PartialBlock { ty: "MLX affine in_features", elems: in_features, block: p.group_size });
    }
    if !elems.is_multiple_of(in_features) {
        return Err(QuantError::PartialBlock { ty: "MLX affine rows", elems, block: in_features });
    }
    let expected = p.packed_bytes(elems);
    if packed != expected {
        return Err(QuantError::ByteLength { ty: "MLX affine packed", expected, got: packed });
    }
    let groups = elems / p.group_size;
    if scales != groups {
        return Err(QuantError::GroupCount { what: "scales", expected: groups, got: scales });
    }
    if biases != groups {
        return Err(QuantError::GroupCount { what: "biases", expected: groups, got: biases });
    }
    Ok(groups)
}
