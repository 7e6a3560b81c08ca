//! Plain float storage types (f32, f16, bf16) and their byte codecs.
//!
//! Shared by GGUF (F32/F16/BF16 tensors) and MLX (weights, scales and biases are stored as one of these).
//! Rounding follows ggml: f32 to f16 is round-to-nearest-even (IEEE), f32 to bf16 is round-to-nearest-even with
//! NaN forced quiet (`ggml_compute_fp32_to_bf16`, mirrored by gguf-py), so encoded bytes match what those tools
//! write.

use crate::QuantError;

/// A plain float storage type, always little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "F32",
            FloatType::F16 => "F16",
            FloatType::BF16 => "BF16",
        }
    }

    /// Bytes per element.
    #[inline]
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }
}

/// Decodes `dst.len()` little-endian floats of type `ft` from `src`, which must hold exactly that many.
pub fn decode_floats(ft: FloatType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_bytes(ft, src.len(), dst.len())?;
    match ft {
        FloatType::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        FloatType::F16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        FloatType::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
    Ok(())
}

/// Encodes `src` as little-endian floats of type `ft` into `dst`, which must be exactly `src.len() * size` bytes.
pub fn encode_floats(ft: FloatType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_bytes(ft, dst.len(), src.len())?;
    match ft {
        FloatType::F32 => {
            for (b, x) in dst.chunks_exact_mut(4).zip(src) {
                b.copy_from_slice(&x.to_le_bytes());
            }
        }
        FloatType::F16 => {
            for (b, x) in dst.chunks_exact_mut(2).zip(src) {
                b.copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        FloatType::BF16 => {
            for (b, x) in dst.chunks_exact_mut(2).zip(src) {
                b.copy_from_slice(&f32_to_bf16(*x).to_le_bytes());
            }
        }
    }
    Ok(())
}

fn check_bytes(ft: FloatType, bytes: usize, elems: usize) -> Result<(), QuantError> {
    let expected = elems.checked_mul(ft.size()).ok_or(QuantError::ByteLength {
        ty: ft.name(),
        expected: usize::MAX,
        got: bytes,
    })?;
    if bytes != expected {
        return Err(QuantError::ByteLength { ty: ft.name(), expected, got: bytes });
    }
    Ok(())
}

pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// ggml's `ggml_compute_fp32_to_bf16`. `half::bf16::from_f32` also rounds to nearest-even, but keeps NaN payloads
/// differently, and the bytes must match what ggml and gguf-py write.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        // Quiet the NaN, keep sign and high payload bits.
        n = (n & 0xffff_0000) | (64 << 16);
    }
    // Round to nearest, ties to even. u64 so the carry out of an all-ones mantissa cannot wrap.
    let rounded = (u64::from(n) + 0x7fff + u64::from((n >> 16) & 1)) >> 16;
    rounded as u16
}

/// ggml's `GGML_FP16_TO_FP32` on a little-endian pair of bytes.
pub(crate) fn f16_le(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// f32 to f16 bytes, round-to-nearest-even as numpy's `astype(np.float16)` and ggml's `GGML_FP32_TO_FP16`.
pub(crate) fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

/// `x.round()` (half away from zero) without a libm call, exact for |x| < 2^23 (and NaN → NaN). Baseline x86-64
/// has no rounding instruction, so `f32::round` is a function call per element in the encoders' inner loops.
#[inline]
pub(crate) fn round_half_away_small(x: f32) -> f32 {
    if x.is_nan() || x.abs() >= 8_388_608.0 {
        return x.round();
    }
    let t = (x as i32) as f32; // truncation toward zero
    let frac = x - t; // exact: x and t share sign and exponent range
    let r = if frac >= 0.5 {
        t + 1.0
    } else if frac <= -0.5 {
        t - 1.0
    } else {
        t
    };
    r.copysign(x) // keeps -0.0 for small negatives, as `round` does
}

/// `x.round_ties_even()` without a libm call, exact for |x| < 2^23 (NaN and larger values take the slow path).
#[inline]
pub(crate) fn round_half_even_small(x: f32) -> f32 {
    if x.is_nan() || x.abs() >= 8_388_608.0 {
        return x.round_ties_even();
    }
    let ti = x as i32;
    let t = ti as f32;
    let frac = x - t;
    let odd = ti & 1 != 0;
    let r = if frac > 0.5 || (frac == 0.5 && odd) {
        t + 1.0
    } else if frac < -0.5 || (frac == -0.5 && odd) {
        t - 1.0
    } else {
        t
    };
    r.copysign(x)
}

#[cfg(test)]
mod fast_round_tests {
    #[test]
    fn fast_rounding_matches_std() {
        let mut vals = vec![0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, -127.5];
        let mut s = 0x1234_5678u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            vals.push(f32::from_bits(s) % 300.0);
            vals.push((s % 2000) as f32 / 4.0 - 250.0);
        }
        for v in vals.into_iter().filter(|v| v.is_finite()) {
            assert_eq!(super::round_half_away_small(v).to_bits(), v.round().to_bits(), "{v}");
            assert_eq!(super::round_half_even_small(v).to_bits(), v.round_ties_even().to_bits(), "{v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        // 1 + 2^-8 is exactly half-way between two bf16 values: ties go to the even (1.0).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        // Half-way above an odd mantissa rounds up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        // A signalling NaN whose payload sits only in the low half must stay NaN, not become infinity.
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16(f32::from_bits(0xffff_ffff)), 0xffff);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = [0.0f32; 3];
        assert_eq!(
            decode_floats(FloatType::BF16, &[0; 5], &mut out),
            Err(QuantError::ByteLength { ty: "BF16", expected: 6, got: 5 })
        );
        let mut bytes = [0u8; 11];
        assert_eq!(
            encode_floats(FloatType::F32, &[1.0; 3], &mut bytes),
            Err(QuantError::ByteLength { ty: "F32", expected: 12, got: 11 })
        );
    }
}
