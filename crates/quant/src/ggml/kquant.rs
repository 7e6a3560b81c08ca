//! The 256-element K-quant super-blocks: Q4_K, Q5_K, Q6_K (decode only).
//!
//! Layouts, in file order:
//! - Q4_K (144 B): f16 d, f16 dmin, 12 bytes of packed 6-bit (scale, min) pairs for 8 sub-blocks of 32, 128 bytes
//!   of nibbles. Byte chunk c (32 bytes) holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
//! - Q5_K (176 B): as Q4_K, with 32 bytes of high bits after the scales: bit s of `qh[i]` is the fifth bit of
//!   element i of sub-block s.
//! - Q6_K (210 B): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales (one per 16
//!   elements), and f16 d *last*.
//!
//! Products are formed as `(d * sc) * q - (dmin * m)` in f32, the order gguf-py and ggml use, so results match
//! bit for bit.

use crate::float::f16_le;

const QK_K: usize = 256;

/// Unpacks the 12-byte Q4_K/Q5_K scale field into 8 (scale, min) pairs of 6 bits each.
///
/// Bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4; scales and mins 4..8 take their low
/// 4 bits from bytes 8..12 (scale low nibble, min high nibble) and their top 2 bits from the spare top bits of
/// bytes 0..4 and 4..8.
#[inline]
pub fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for i in 0..4 {
        sc[i] = s[i] & 0x3f;
        mn[i] = s[i + 4] & 0x3f;
        sc[i + 4] = (s[i + 8] & 0x0f) | ((s[i] >> 2) & 0x30);
        mn[i + 4] = (s[i + 8] >> 4) | ((s[i + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

pub(super) fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..16 + QK_K / 2];
    for s in 0..8 {
        let dl = d * f32::from(sc[s]);
        let ml = dmin * f32::from(mn[s]);
        let chunk = &qs[(s / 2) * 32..(s / 2) * 32 + 32];
        let shift = 4 * (s % 2);
        for (i, &byte) in chunk.iter().enumerate() {
            y[s * 32 + i] = dl * f32::from((byte >> shift) & 0x0f) - ml;
        }
    }
}

pub(super) fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qh = &b[16..16 + QK_K / 8];
    let qs = &b[48..48 + QK_K / 2];
    for s in 0..8 {
        let dl = d * f32::from(sc[s]);
        let ml = dmin * f32::from(mn[s]);
        let chunk = &qs[(s / 2) * 32..(s / 2) * 32 + 32];
        let shift = 4 * (s % 2);
        for (i, &byte) in chunk.iter().enumerate() {
            let q = ((byte >> shift) & 0x0f) | (((qh[i] >> s) & 1) << 4);
            y[s * 32 + i] = dl * f32::from(q) - ml;
        }
    }
}

pub(super) fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..QK_K / 2];
    let qh = &b[QK_K / 2..QK_K / 2 + QK_K / 4];
    let scales = &b[192..208];
    let d = f16_le(b[208], b[209]);
    // Each 128-element half uses 64 bytes of `ql` (low nibbles: elements 0..64, high: 64..128) and 32 bytes of
    // `qh` (bits 2k..2k+2 of byte i: element 32k + i).
    for (e, yv) in y.iter_mut().enumerate().take(QK_K) {
        let (h, r) = (e / 128, e % 128);
        let low = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
        let high = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = i16::from(low | (high << 4)) - 32;
        let dl = d * f32::from(scales[e / 16] as i8);
        *yv = dl * f32::from(q);
    }
}
