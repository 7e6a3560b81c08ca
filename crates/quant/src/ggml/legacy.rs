//! The 32-element "legacy" blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Each function handles exactly one block; `ggml::{quantize,dequantize}` have already checked lengths, so slices
//! here are always `32` elements and the type's block size in bytes. Encoders copy gguf-py's numpy arithmetic
//! step for step (f32 throughout, `trunc(x + 0.5)` / `trunc(x + 8.5)` for the 4/5-bit types, round-half-away for
//! Q8_0), because a different but "equivalent" formula rounds differently on ties.

use crate::float::{f16_bytes, f16_le};

const QK: usize = 32;
const HALF: usize = QK / 2;

// `x as u8` truncates toward zero and saturates (NaN → 0), exactly `trunc` then cast; calling `trunc` instead
// costs a libm call per weight on baseline x86-64 (no SSE4.1), which was 17% of `synth`'s time.

/// `1/d`, or 0 for an all-zero block so every code lands on the zero point instead of NaN.
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// The element with the largest magnitude, keeping its sign; the first one on ties, as numpy's `argmax`.
fn signed_absmax(x: &[f32]) -> f32 {
    // Two passes (a max that vectorises, then the first element reaching it) instead of one branchy pass: same
    // answer, and the quantizers are most of `synth`'s time. `if a > m` (not `f32::max`) compiles to maxps.
    // Eight independent lanes: max is exact, so the lane order cannot change the answer, and it lets the
    // compiler use packed max instead of a serial chain.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = if v.abs() > *l { v.abs() } else { *l };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, v| if v.abs() > m { v.abs() } else { m });
    let amax = lanes.iter().fold(tail, |m, &v| if v > m { v } else { m });
    x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// Low nibbles hold elements 0..16, high nibbles 16..32 (ggml's split, not interleaved pairs).
fn pack_nibbles(q: &[u8; QK], qs: &mut [u8]) {
    for j in 0..HALF {
        qs[j] = (q[j] & 0x0f) | ((q[j + HALF] & 0x0f) << 4);
    }
}

/// Bit j of the little-endian u32 `qh` is bit 4 of element j.
fn pack_high_bits(q: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= u32::from((v >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

/// The 5-bit codes of a Q5 block: low nibble from `qs`, fifth bit from `qh`.
fn unpack_q5(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for j in 0..HALF {
        q[j] = qs[j] & 0x0f;
        q[j + HALF] = qs[j] >> 4;
    }
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) as u8) << 4;
    }
    q
}

pub(super) fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    for (j, &byte) in b[2..2 + HALF].iter().enumerate() {
        y[j] = d * f32::from(i16::from(byte & 0x0f) - 8);
        y[j + HALF] = d * f32::from(i16::from(byte >> 4) - 8);
    }
}

pub(super) fn quant_q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    let mut q = [0u8; QK];
    if x.iter().fold(id.is_finite(), |ok, v| ok & v.is_finite()) {
        // Fast path, same codes: for finite input `v·id + 8.5` lies in [0.5, 16.5], so `trunc(min(·, 15.5))` equals
        // `min(trunc(·), 15)` and the conversion cannot overflow. Written with plain compares so it vectorises;
        // the general path's saturating casts did not (half of `synth`'s time).
        for (qj, &v) in q.iter_mut().zip(x) {
            let t = v * id + 8.5;
            let t = if t < 15.5 { t } else { 15.5 };
            // SAFETY: t is finite and in [0.5, 15.5] (see above), so it fits an i32.
            *qj = unsafe { t.to_int_unchecked::<i32>() } as u8;
        }
    } else {
        for (qj, &v) in q.iter_mut().zip(x) {
            // `as u8` saturates (NaN -> 0) where numpy's cast is undefined; finite inputs land in 0..=16.
            *qj = ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        }
    }
    b[0..2].copy_from_slice(&f16_bytes(d));
    pack_nibbles(&q, &mut b[2..]);
}

pub(super) fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    let m = f16_le(b[2], b[3]);
    for (j, &byte) in b[4..4 + HALF].iter().enumerate() {
        y[j] = d * f32::from(byte & 0x0f) + m;
        y[j + HALF] = d * f32::from(byte >> 4) + m;
    }
}

pub(super) fn quant_q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let mut q = [0u8; QK];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = (((v - min) * id + 0.5) as u8).min(15);
    }
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(min));
    pack_nibbles(&q, &mut b[4..]);
}

pub(super) fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    let q = unpack_q5(&b[2..6], &b[6..6 + HALF]);
    for (yj, &v) in y.iter_mut().zip(&q) {
        *yj = d * f32::from(i16::from(v) - 16);
    }
}

pub(super) fn quant_q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    let mut q = [0u8; QK];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = ((v * id + 16.5) as u8).min(31);
    }
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..6].copy_from_slice(&pack_high_bits(&q));
    pack_nibbles(&q, &mut b[6..]);
}

pub(super) fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    let m = f16_le(b[2], b[3]);
    let q = unpack_q5(&b[4..8], &b[8..8 + HALF]);
    for (yj, &v) in y.iter_mut().zip(&q) {
        *yj = d * f32::from(v) + m;
    }
}

pub(super) fn quant_q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let mut q = [0u8; QK];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = (((v - min) * id + 0.5) as u8).min(31);
    }
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(min));
    b[4..8].copy_from_slice(&pack_high_bits(&q));
    pack_nibbles(&q, &mut b[8..]);
}

pub(super) fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    for (yj, &byte) in y.iter_mut().zip(&b[2..2 + QK]) {
        *yj = f32::from(byte as i8) * d;
    }
}

pub(super) fn quant_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f16_bytes(d));
    for (bj, &v) in b[2..].iter_mut().zip(x) {
        // f32::round is round-half-away-from-zero, the same as ggml's roundf and gguf-py's np_roundf.
        *bj = crate::float::round_half_away_small(v * id) as i8 as u8;
    }
}
