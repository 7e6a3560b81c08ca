//! GGUF tensor types: ids as ggml numbers them, their block geometry, and the scalar reference codecs.
//!
//! `dequantize` covers every type in [`GgmlType::ALL`]; `quantize` covers the types gguf-py can quantize
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4). Both are bit-exact with gguf-py's numpy `gguf.quants`
//! (which is written to match ggml's `quantize_row_*_ref`; we test against gguf-py, not against ggml's C): the
//! fixtures under `tests/fixtures/quant/` are produced by gguf-py and checked byte for byte, including hand-picked
//! rounding ties. Arithmetic is done in f32 in the same order as gguf-py so results do not drift by an ulp.
//! Encoders promise this for finite inputs; NaN and infinity get a defined but unchecked code. K-quant *encoders* are not here (they need
//! llama-quantize's search); asking for one returns [`QuantError::NoEncoder`].
//!
//! The block layouts live in three submodules: `legacy` (Q4_0..Q8_0), `kquant` (Q4_K, Q5_K, Q6_K) and `mxfp4`.

mod kquant;

/// The Q4_K/Q5_K 12-byte scale field as 8 (scale, min) pairs; shared with the SIMD kernels in `moestream-cpu`.
pub use kquant::scale_min_k4;
mod legacy;
mod mxfp4;

use crate::QuantError;
use crate::float::{FloatType, decode_floats, encode_floats};

/// A ggml tensor type. The discriminant is the id stored in GGUF tensor infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    BF16 = 30,
    MXFP4 = 39,
}

impl GgmlType {
    pub const ALL: [GgmlType; 12] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::BF16,
        GgmlType::MXFP4,
    ];

    /// The type for a GGUF id, or `None` for ids we do not decode (the caller names the tensor in its error).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| *t as u32 == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
            GgmlType::MXFP4 => "MXFP4",
        }
    }

    /// Elements per block (1 for plain floats).
    #[inline]
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::MXFP4 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    #[inline]
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::MXFP4 => 17,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes for a row of `elems` elements, or `None` when `elems` is not a whole number of blocks.
    #[inline]
    pub fn row_bytes(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes `src` (whole blocks of `ty`) into `dst`, one f32 per element.
///
/// Errors: `dst.len()` not a whole number of blocks ([`QuantError::PartialBlock`]), `src.len()` not a whole number
/// of blocks ([`QuantError::ByteLength`], `expected` is the size `dst` implies), or both whole but for different
/// block counts ([`QuantError::OutputLength`]).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_dequant_lengths(ty, src.len(), dst.len())?;
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let each = |dst: &mut [f32], f: fn(&[u8], &mut [f32])| {
        src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)).for_each(|(b, y)| f(b, y))
    };
    match ty {
        GgmlType::F32 => decode_floats(FloatType::F32, src, dst)?,
        GgmlType::F16 => decode_floats(FloatType::F16, src, dst)?,
        GgmlType::BF16 => decode_floats(FloatType::BF16, src, dst)?,
        GgmlType::Q4_0 => each(dst, legacy::dequant_q4_0),
        GgmlType::Q4_1 => each(dst, legacy::dequant_q4_1),
        GgmlType::Q5_0 => each(dst, legacy::dequant_q5_0),
        GgmlType::Q5_1 => each(dst, legacy::dequant_q5_1),
        GgmlType::Q8_0 => each(dst, legacy::dequant_q8_0),
        GgmlType::Q4K => each(dst, kquant::dequant_q4_k),
        GgmlType::Q5K => each(dst, kquant::dequant_q5_k),
        GgmlType::Q6K => each(dst, kquant::dequant_q6_k),
        GgmlType::MXFP4 => each(dst, mxfp4::dequant),
    }
    Ok(())
}

/// Encodes `src` into whole blocks of `ty` in `dst`, bit-exact with gguf-py (and so with ggml's reference
/// quantizers) for finite inputs.
///
/// Errors: no encoder for `ty` ([`QuantError::NoEncoder`]: the K-quants), `src.len()` not a whole number of blocks
/// ([`QuantError::PartialBlock`]), `dst.len()` not the matching byte count ([`QuantError::ByteLength`]).
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    if matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
        return Err(QuantError::NoEncoder(ty.name()));
    }
    let be = ty.block_elems();
    let expected =
        ty.row_bytes(src.len()).ok_or(QuantError::PartialBlock { ty: ty.name(), elems: src.len(), block: be })?;
    if dst.len() != expected {
        return Err(QuantError::ByteLength { ty: ty.name(), expected, got: dst.len() });
    }
    let bb = ty.block_bytes();
    let each = |dst: &mut [u8], f: fn(&[f32], &mut [u8])| {
        src.chunks_exact(be).zip(dst.chunks_exact_mut(bb)).for_each(|(x, b)| f(x, b))
    };
    match ty {
        GgmlType::F32 => encode_floats(FloatType::F32, src, dst)?,
        GgmlType::F16 => encode_floats(FloatType::F16, src, dst)?,
        GgmlType::BF16 => encode_floats(FloatType::BF16, src, dst)?,
        GgmlType::Q4_0 => each(dst, legacy::quant_q4_0),
        GgmlType::Q4_1 => each(dst, legacy::quant_q4_1),
        GgmlType::Q5_0 => each(dst, legacy::quant_q5_0),
        GgmlType::Q5_1 => each(dst, legacy::quant_q5_1),
        GgmlType::Q8_0 => each(dst, legacy::quant_q8_0),
        GgmlType::MXFP4 => each(dst, mxfp4::quant),
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => return Err(QuantError::NoEncoder(ty.name())),
    }
    Ok(())
}

fn check_dequant_lengths(ty: GgmlType, src_bytes: usize, dst_elems: usize) -> Result<(), QuantError> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let expected =
        ty.row_bytes(dst_elems).ok_or(QuantError::PartialBlock { ty: ty.name(), elems: dst_elems, block: be })?;
    if !src_bytes.is_multiple_of(bb) {
        return Err(QuantError::ByteLength { ty: ty.name(), expected, got: src_bytes });
    }
    if src_bytes != expected {
        return Err(QuantError::OutputLength { ty: ty.name(), expected: src_bytes / bb * be, got: dst_elems });
    }
    Ok(())
}
