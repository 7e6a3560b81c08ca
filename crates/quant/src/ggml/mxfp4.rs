//! MXFP4 (OCP microscaling FP4): 32 elements, one E8M0 shared exponent byte, then 16 bytes of E2M1 nibbles.
//!
//! Elements 0..16 sit in the low nibbles, 16..32 in the high nibbles. ggml stores the E2M1 values doubled
//! (integers -12..12) and halves the scale instead (`ggml_e8m0_to_fp32_half`), so decoding is one exact f32
//! multiply. The encoder mirrors gguf-py: exponent from `floor(log2(amax)) - 2`, then each element takes the
//! table entry with the smallest absolute error, the lowest index on ties.

/// E2M1 values times two, indexed by the 4-bit code (bit 3 is the sign).
const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of 2^(e - 127), as a bit pattern: the doubled table above is compensated here. e = 0 and 1 land in the
/// subnormal range, so they are built from the mantissa.
fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 { 0x0020_0000u32 << e } else { u32::from(e - 1) << 23 };
    f32::from_bits(bits)
}

pub(super) fn dequant(b: &[u8], y: &mut [f32]) {
    let d = e8m0_to_f32_half(b[0]);
    for (j, &byte) in b[1..17].iter().enumerate() {
        y[j] = d * f32::from(KVALUES[usize::from(byte & 0x0f)]);
        y[j + 16] = d * f32::from(KVALUES[usize::from(byte >> 4)]);
    }
}

pub(super) fn quant(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // f32 log2 as numpy's, not an exact exponent read: just below a power of two, log2 rounds up to the integer
    // and gguf-py then picks the larger exponent. Clamped because numpy's out-of-range uint8 cast is undefined
    // (only reachable for amax < 2^-125).
    let e = if amax > 0.0 { (amax.log2().floor() - 2.0 + 127.0).clamp(0.0, 255.0) as u8 } else { 0 };
    let d = e8m0_to_f32_half(e);
    let mut q = [0u8; 32];
    for (qj, &v) in q.iter_mut().zip(x) {
        let mut best = 0usize;
        let mut best_err = f32::INFINITY;
        for (k, &kv) in KVALUES.iter().enumerate() {
            let err = (d * f32::from(kv) - v).abs();
            if err < best_err {
                best_err = err;
                best = k;
            }
        }
        *qj = best as u8;
    }
    b[0] = e;
    for j in 0..16 {
        b[1 + j] = q[j] | (q[j + 16] << 4);
    }
}
