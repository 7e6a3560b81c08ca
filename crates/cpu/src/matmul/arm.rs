//! aarch64 row dot kernels: NEON (baseline on every aarch64 CPU, Apple silicon included), exact f32
//! accumulation, plus an optional q8-activation table on CPUs with the `dotprod` extension (`sdot`).
//!
//! Owns nothing but arithmetic on one validated row; shapes, threads and the choice of table live in `matmul`.
//! Layout knowledge is duplicated from `moestream_quant` on purpose (a kernel must unpack in registers), and every
//! kernel is tested against that crate's reference decode in `tests/matmul.rs` (on x86 hosts, under
//! `scripts/check-aarch64.sh`'s qemu).
//!
//! Same structure as `x86.rs`: a 16-lane accumulator ([`V`], four independent `float32x4_t` so the FMAs do not
//! form one dependency chain), `dot16_i8` / `dot16_u8` (widen 16 codes to f32 and multiply-accumulate with 16
//! activations) and `sum16`. Per block the codes are dotted with `x` first and the block scale applied once
//! (`d·Σq·x`), and per-group offsets are folded as `offset·Σx`.
//!
//! f16 weights are widened with integer NEON ops (exact, subnormals included), not `fcvtl`: the `float16x4_t`
//! intrinsics are not stable Rust. Encodings without a kernel here (Q4_1, Q5_0, Q5_1, Q5_K, MXFP4, MLX 2-bit)
//! fall back to the scalar reference.

use core::arch::aarch64::*;

use moestream_quant::{Encoding, FloatType, GgmlType};

use super::{Act, Q8Block, RowRef, scalar};

/// `sdot` (Armv8.2 dotprod: Apple M1 and later, Neoverse N1 and later), for the q8-activation table.
pub(super) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

use moestream_quant::ggml::scale_min_k4;

/// Scalar f16 → f32 in integer ops (block scales, MLX scales, row tails). Exact, subnormals included.
#[inline]
pub(super) fn f16(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let (exp, man) = ((h >> 10) & 0x1f, h & 0x3ff);
    match exp {
        0 => {
            // Zero or subnormal: man · 2⁻²⁴, exact.
            let v = man as f32 * (1.0 / 16_777_216.0);
            if sign != 0 { -v } else { v }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// # Safety
/// Two readable bytes at `p`.
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: guaranteed by the caller.
    f16(unsafe { p.cast::<u16>().read_unaligned() })
}

/// Four f16 (zero-extended to u32 lanes) → f32, the vector form of [`f16`].
#[inline]
#[target_feature(enable = "neon")]
fn f16x4(h: uint32x4_t) -> float32x4_t {
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let em = vandq_u32(h, vdupq_n_u32(0x7fff));
    let exp = vandq_u32(h, vdupq_n_u32(0x7c00));
    // Normal: rebias the exponent by 127 − 15; infinity / NaN (exponent 31) get it twice, reaching 255.
    let norm = vaddq_u32(vshlq_n_u32::<13>(em), vdupq_n_u32(112 << 23));
    let norm = vaddq_u32(norm, vandq_u32(vceqq_u32(exp, vdupq_n_u32(0x7c00)), vdupq_n_u32(112 << 23)));
    // Zero or subnormal (exponent 0, so em is the mantissa): man · 2⁻²⁴, exact in f32.
    let sub = vreinterpretq_u32_f32(vmulq_n_f32(vcvtq_f32_u32(em), 1.0 / 16_777_216.0));
    let bits = vbslq_u32(vceqq_u32(exp, vdupq_n_u32(0)), sub, norm);
    vreinterpretq_f32_u32(vorrq_u32(bits, sign))
}

/// Value `i` of a little-endian float array (MLX scales and biases).
#[inline]
#[target_feature(enable = "neon")]
fn float_at(ft: FloatType, b: &[u8], i: usize) -> f32 {
    match ft {
        FloatType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        FloatType::F16 => f16(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])),
        FloatType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])) << 16),
    }
}

/// 16 f32 lanes as four independent accumulators.
#[derive(Clone, Copy)]
struct V([float32x4_t; 4]);

impl V {
    #[inline]
    #[target_feature(enable = "neon")]
    fn zero() -> V {
        V([vdupq_n_f32(0.0); 4])
    }

    /// `self + s·t` lane-wise.
    #[inline]
    #[target_feature(enable = "neon")]
    fn fma_s(self, s: f32, t: V) -> V {
        let [a0, a1, a2, a3] = self.0;
        let [t0, t1, t2, t3] = t.0;
        V([vfmaq_n_f32(a0, t0, s), vfmaq_n_f32(a1, t1, s), vfmaq_n_f32(a2, t2, s), vfmaq_n_f32(a3, t3, s)])
    }

    /// `self + w·x` lane-wise.
    #[inline]
    #[target_feature(enable = "neon")]
    fn fma(self, w: V, x: V) -> V {
        let ([a0, a1, a2, a3], [w0, w1, w2, w3], [x0, x1, x2, x3]) = (self.0, w.0, x.0);
        V([vfmaq_f32(a0, w0, x0), vfmaq_f32(a1, w1, x1), vfmaq_f32(a2, w2, x2), vfmaq_f32(a3, w3, x3)])
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn add(self, t: V) -> V {
        let ([a0, a1, a2, a3], [t0, t1, t2, t3]) = (self.0, t.0);
        V([vaddq_f32(a0, t0), vaddq_f32(a1, t1), vaddq_f32(a2, t2), vaddq_f32(a3, t3)])
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn sum(self) -> f32 {
        let [a0, a1, a2, a3] = self.0;
        vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)))
    }
}

/// 16 activations.
///
/// # Safety
/// 16 readable floats at `x`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_x(x: *const f32) -> V {
    // SAFETY: guaranteed by the caller.
    unsafe { V([vld1q_f32(x), vld1q_f32(x.add(4)), vld1q_f32(x.add(8)), vld1q_f32(x.add(12))]) }
}

/// `acc + Σ c[i]·x[i]` lane-wise for 16 signed codes.
///
/// # Safety
/// 16 readable floats at `x`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot16_i8(c: int8x16_t, x: *const f32, acc: V) -> V {
    let (l, h) = (vmovl_s8(vget_low_s8(c)), vmovl_high_s8(c));
    let w = V([
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(l))),
        vcvtq_f32_s32(vmovl_high_s16(l)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))),
        vcvtq_f32_s32(vmovl_high_s16(h)),
    ]);
    // SAFETY: guaranteed by the caller.
    acc.fma(w, unsafe { load_x(x) })
}

/// `acc + Σ c[i]·x[i]` lane-wise for 16 unsigned codes.
///
/// # Safety
/// 16 readable floats at `x`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot16_u8(c: uint8x16_t, x: *const f32, acc: V) -> V {
    let (l, h) = (vmovl_u8(vget_low_u8(c)), vmovl_high_u8(c));
    let w = V([
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(l))),
        vcvtq_f32_u32(vmovl_high_u16(l)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))),
        vcvtq_f32_u32(vmovl_high_u16(h)),
    ]);
    // SAFETY: guaranteed by the caller.
    acc.fma(w, unsafe { load_x(x) })
}

/// `acc + x[0..16]` lane-wise.
///
/// # Safety
/// 16 readable floats at `x`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn sum16(x: *const f32, acc: V) -> V {
    // SAFETY: guaranteed by the caller.
    acc.add(unsafe { load_x(x) })
}

/// 16 bytes at `p`.
///
/// # Safety
/// 16 readable bytes at `p`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_u8(p: *const u8) -> uint8x16_t {
    // SAFETY: guaranteed by the caller.
    unsafe { vld1q_u8(p) }
}

/// Entry point of the exact table.
///
/// # Safety
/// `row` comes from a validated view and `act.x.len()` is its column count.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn row_dot(row: &RowRef<'_>, act: &Act<'_>) -> f32 {
    let x = act.x;
    // SAFETY: validation guarantees each kernel's byte count for `x.len()` columns.
    unsafe {
        match scalar::float_type(row.encoding) {
            Some(FloatType::F32) => return dot_f32(row.data, x),
            Some(FloatType::F16) => return dot_f16(row.data, x),
            Some(FloatType::BF16) => return dot_bf16(row.data, x),
            None => {}
        }
        match row.encoding {
            Encoding::Ggml(GgmlType::Q8_0) => dot_q8_0(row.data, x),
            Encoding::Ggml(GgmlType::Q4_0) => dot_q4_0(row.data, x),
            Encoding::Ggml(GgmlType::Q4K) => dot_q4_k(row.data, x),
            Encoding::Ggml(GgmlType::Q6K) => dot_q6_k(row.data, x),
            Encoding::MlxAffine { params, scale_type } if params.bits == 4 => {
                dot_mlx4(row, params.group_size, scale_type, x)
            }
            Encoding::MlxAffine { params, scale_type } if params.bits == 8 => {
                dot_mlx8(row, params.group_size, scale_type, x)
            }
            _ => scalar::row_dot(row, x),
        }
    }
}

/// Dense float rows: 16 columns per step (`load` turns the 16 values at a byte pointer into a [`V`]), then a
/// scalar tail.
///
/// # Safety
/// `w` holds `x.len()` values of `size` bytes; `load` reads `16·size` bytes (the callers' closures wrap an unsafe load; the pointers passed are in bounds).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot_floats(
    w: &[u8],
    x: &[f32],
    size: usize,
    load: impl Fn(*const u8) -> V,
    one: impl Fn(&[u8]) -> f32,
) -> f32 {
    let n = x.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = V::zero();
    let mut c = 0;
    while c + 16 <= n {
        // SAFETY: columns c..c+16 are in `w` and `x`.
        acc = acc.fma(load(unsafe { wp.add(size * c) }), unsafe { load_x(xp.add(c)) });
        c += 16;
    }
    let mut s = acc.sum();
    while c < n {
        s += one(&w[size * c..size * (c + 1)]) * x[c];
        c += 1;
    }
    s
}

/// # Safety
/// `w` holds `x.len()` little-endian f32.
#[target_feature(enable = "neon")]
unsafe fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    /// # Safety
    /// 64 readable bytes at `p`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load(p: *const u8) -> V {
        // SAFETY: guaranteed by the caller; byte loads have no alignment requirement.
        unsafe {
            V([
                vreinterpretq_f32_u8(vld1q_u8(p)),
                vreinterpretq_f32_u8(vld1q_u8(p.add(16))),
                vreinterpretq_f32_u8(vld1q_u8(p.add(32))),
                vreinterpretq_f32_u8(vld1q_u8(p.add(48))),
            ])
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { dot_floats(w, x, 4, |p| load(p), |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])) }
}

/// # Safety
/// `w` holds `x.len()` little-endian f16.
#[target_feature(enable = "neon")]
unsafe fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    /// # Safety
    /// 32 readable bytes at `p`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load(p: *const u8) -> V {
        // SAFETY: guaranteed by the caller.
        let (a, b) = unsafe { (vreinterpretq_u16_u8(vld1q_u8(p)), vreinterpretq_u16_u8(vld1q_u8(p.add(16)))) };
        V([
            f16x4(vmovl_u16(vget_low_u16(a))),
            f16x4(vmovl_high_u16(a)),
            f16x4(vmovl_u16(vget_low_u16(b))),
            f16x4(vmovl_high_u16(b)),
        ])
    }
    // SAFETY: forwarded from the caller.
    unsafe { dot_floats(w, x, 2, |p| load(p), |b| f16(u16::from_le_bytes([b[0], b[1]]))) }
}

/// # Safety
/// `w` holds `x.len()` little-endian bf16.
#[target_feature(enable = "neon")]
unsafe fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    /// # Safety
    /// 32 readable bytes at `p`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load(p: *const u8) -> V {
        // SAFETY: guaranteed by the caller.
        let (a, b) = unsafe { (vreinterpretq_u16_u8(vld1q_u8(p)), vreinterpretq_u16_u8(vld1q_u8(p.add(16)))) };
        V([
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(a))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(a)),
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(b))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(b)),
        ])
    }
    // SAFETY: forwarded from the caller.
    unsafe { dot_floats(w, x, 2, |p| load(p), |b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)) }
}

/// Q8_0: 34-byte blocks, f16 d then 32 signed codes.
///
/// # Safety
/// `w` holds x.len()/32 blocks of 34 bytes.
#[target_feature(enable = "neon")]
unsafe fn dot_q8_0(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = V::zero();
    for (blk, xb) in w.chunks_exact(34).zip(x.chunks_exact(32)) {
        let (bp, xp) = (blk.as_ptr(), xb.as_ptr());
        // SAFETY: a block is 34 bytes and its activations 32 floats.
        unsafe {
            let d = f16_at(bp);
            let q0 = vreinterpretq_s8_u8(load_u8(bp.add(2)));
            let q1 = vreinterpretq_s8_u8(load_u8(bp.add(18)));
            acc = acc.fma_s(d, dot16_i8(q1, xp.add(16), dot16_i8(q0, xp, V::zero())));
        }
    }
    acc.sum()
}

/// Q4_0: 18-byte blocks, f16 d then 16 bytes: low nibbles are elements 0..16, high 16..32, offset 8.
///
/// # Safety
/// `w` holds x.len()/32 blocks of 18 bytes.
#[target_feature(enable = "neon")]
unsafe fn dot_q4_0(w: &[u8], x: &[f32]) -> f32 {
    let (m4, e8) = (vdupq_n_u8(0x0f), vdupq_n_s8(8));
    let mut acc = V::zero();
    for (blk, xb) in w.chunks_exact(18).zip(x.chunks_exact(32)) {
        let (bp, xp) = (blk.as_ptr(), xb.as_ptr());
        // SAFETY: a block is 18 bytes and its activations 32 floats.
        unsafe {
            let d = f16_at(bp);
            let qs = load_u8(bp.add(2));
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(qs, m4)), e8);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs)), e8);
            acc = acc.fma_s(d, dot16_i8(hi, xp.add(16), dot16_i8(lo, xp, V::zero())));
        }
    }
    acc.sum()
}

/// Q4_K: 144-byte super-blocks of 256: d, dmin, 12 scale bytes, then 4 chunks of 32 bytes; chunk c holds
/// sub-block 2c in its low nibbles and 2c+1 in its high nibbles. `w = (d·sc)·q − dmin·m`.
///
/// # Safety
/// `w` holds x.len()/256 blocks of 144 bytes.
#[target_feature(enable = "neon")]
unsafe fn dot_q4_k(w: &[u8], x: &[f32]) -> f32 {
    let m4 = vdupq_n_u8(0x0f);
    let (mut acc, mut mins) = (V::zero(), V::zero());
    for (blk, xb) in w.chunks_exact(144).zip(x.chunks_exact(256)) {
        // SAFETY: a super-block is 144 bytes and its activations 256 floats.
        unsafe {
            let d = f16_at(blk.as_ptr());
            let dmin = f16_at(blk.as_ptr().add(2));
            let (sc, mn) = scale_min_k4(&blk[4..16]);
            let qs = blk.as_ptr().add(16);
            for c in 0..4 {
                let (q0, q1) = (load_u8(qs.add(32 * c)), load_u8(qs.add(32 * c + 16)));
                let x0 = xb.as_ptr().add(64 * c);
                let x1 = x0.add(32);
                let tl = dot16_u8(vandq_u8(q1, m4), x0.add(16), dot16_u8(vandq_u8(q0, m4), x0, V::zero()));
                let th = dot16_u8(vshrq_n_u8::<4>(q1), x1.add(16), dot16_u8(vshrq_n_u8::<4>(q0), x1, V::zero()));
                acc = acc.fma_s(d * f32::from(sc[2 * c]), tl);
                acc = acc.fma_s(d * f32::from(sc[2 * c + 1]), th);
                let sl = sum16(x0.add(16), sum16(x0, V::zero()));
                let sh = sum16(x1.add(16), sum16(x1, V::zero()));
                mins = mins.fma_s(dmin * f32::from(mn[2 * c]), sl);
                mins = mins.fma_s(dmin * f32::from(mn[2 * c + 1]), sh);
            }
        }
    }
    acc.sum() - mins.sum()
}

/// Q6_K: 210-byte super-blocks: ql[128], qh[64], i8 scales[16], f16 d last. In half h, the 32 elements of
/// quarter k take low nibbles from ql[64h..] (k = 0, 2) or ql[64h+32..] (k = 1, 3), low for k < 2 and high for
/// k ≥ 2, and bits 2k..2k+2 of qh[32h..32h+32]; one scale per 16 elements. Done here in 16-byte slices j.
///
/// # Safety
/// `w` holds x.len()/256 blocks of 210 bytes.
#[target_feature(enable = "neon")]
unsafe fn dot_q6_k(w: &[u8], x: &[f32]) -> f32 {
    let (m4, m3, e32) = (vdupq_n_u8(0x0f), vdupq_n_u8(3), vdupq_n_s8(32));
    let mut acc = V::zero();
    for (blk, xb) in w.chunks_exact(210).zip(x.chunks_exact(256)) {
        let bp = blk.as_ptr();
        // SAFETY: a super-block is 210 bytes and its activations 256 floats.
        unsafe {
            let d = f16_at(bp.add(208));
            let sc = &blk[192..208];
            for h in 0..2 {
                for j in 0..2 {
                    let a = load_u8(bp.add(64 * h + 16 * j));
                    let b = load_u8(bp.add(64 * h + 32 + 16 * j));
                    let qh = load_u8(bp.add(128 + 32 * h + 16 * j));
                    let high = |v: uint8x16_t| vshlq_n_u8::<4>(vandq_u8(v, m3));
                    let quarters = [
                        vorrq_u8(vandq_u8(a, m4), high(qh)),
                        vorrq_u8(vandq_u8(b, m4), high(vshrq_n_u8::<2>(qh))),
                        vorrq_u8(vshrq_n_u8::<4>(a), high(vshrq_n_u8::<4>(qh))),
                        vorrq_u8(vshrq_n_u8::<4>(b), high(vshrq_n_u8::<6>(qh))),
                    ];
                    for (k, q) in quarters.into_iter().enumerate() {
                        let q = vsubq_s8(vreinterpretq_s8_u8(q), e32);
                        let t = dot16_i8(q, xb.as_ptr().add(128 * h + 32 * k + 16 * j), V::zero());
                        acc = acc.fma_s(d * f32::from(sc[8 * h + 2 * k + j] as i8), t);
                    }
                }
            }
        }
    }
    acc.sum()
}

/// MLX 4-bit: byte i holds element 2i (low nibble) and 2i+1 (high nibble); per group `scale·Σq·x + bias·Σx`.
///
/// # Safety
/// `row.data` holds x.len()/2 bytes; scales and biases one value per group; `gs` is a multiple of 32.
#[target_feature(enable = "neon")]
unsafe fn dot_mlx4(row: &RowRef<'_>, gs: usize, st: FloatType, x: &[f32]) -> f32 {
    let m4 = vdupq_n_u8(0x0f);
    let mut acc = V::zero();
    for (g, (codes, xg)) in row.data.chunks_exact(gs / 2).zip(x.chunks_exact(gs)).enumerate() {
        let (mut tq, mut tx) = (V::zero(), V::zero());
        for (v, xs) in codes.chunks_exact(16).zip(xg.chunks_exact(32)) {
            let xp = xs.as_ptr();
            // SAFETY: 16 code bytes and their 32 activations.
            unsafe {
                let v = load_u8(v.as_ptr());
                let (lo, hi) = (vandq_u8(v, m4), vshrq_n_u8::<4>(v));
                tq = dot16_u8(vzip1q_u8(lo, hi), xp, tq);
                tq = dot16_u8(vzip2q_u8(lo, hi), xp.add(16), tq);
                tx = sum16(xp.add(16), sum16(xp, tx));
            }
        }
        acc = acc.fma_s(float_at(st, row.scales, g), tq);
        acc = acc.fma_s(float_at(st, row.biases, g), tx);
    }
    acc.sum()
}

/// MLX 8-bit: one byte per element in order; per group `scale·Σq·x + bias·Σx`.
///
/// # Safety
/// `row.data` holds x.len() bytes; scales and biases one value per group; `gs` is a multiple of 16.
#[target_feature(enable = "neon")]
unsafe fn dot_mlx8(row: &RowRef<'_>, gs: usize, st: FloatType, x: &[f32]) -> f32 {
    let mut acc = V::zero();
    for (g, (codes, xg)) in row.data.chunks_exact(gs).zip(x.chunks_exact(gs)).enumerate() {
        let (mut tq, mut tx) = (V::zero(), V::zero());
        for (v, xs) in codes.chunks_exact(16).zip(xg.chunks_exact(16)) {
            // SAFETY: 16 code bytes and their 16 activations.
            unsafe {
                tq = dot16_u8(load_u8(v.as_ptr()), xs.as_ptr(), tq);
                tx = sum16(xs.as_ptr(), tx);
            }
        }
        acc = acc.fma_s(float_at(st, row.scales, g), tq);
        acc = acc.fma_s(float_at(st, row.biases, g), tx);
    }
    acc.sum()
}

/// The 32 codes of a q8 activation block as two signed vectors.
///
/// # Safety
/// None beyond NEON (always present); `qs` is 32 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_q8(b: &Q8Block) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` is 32 bytes.
    unsafe { (vld1q_s8(b.qs.as_ptr()), vld1q_s8(b.qs.as_ptr().add(16))) }
}

/// `Σ w·x` over 32 signed bytes (two `sdot`s) in 4 i32 lanes. Codes are ≤ 127 in magnitude, so no overflow.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot32(w: (int8x16_t, int8x16_t), x: (int8x16_t, int8x16_t)) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    // `vdotq_s32` is not stable Rust (stdarch_neon_dotprod), so `sdot` is written out; the caller guarantees
    // the CPU has it.
    // SAFETY: register-only arithmetic; `dotprod` is enabled for this function.
    unsafe {
        core::arch::asm!(
            "sdot {acc:v}.4s, {w0:v}.16b, {x0:v}.16b",
            "sdot {acc:v}.4s, {w1:v}.16b, {x1:v}.16b",
            acc = inout(vreg) acc,
            w0 = in(vreg) w.0,
            x0 = in(vreg) x.0,
            w1 = in(vreg) w.1,
            x1 = in(vreg) x.1,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Entry point of the q8 table: `sdot` kernels where they exist and `act.q8` is present, else the exact ones.
///
/// # Safety
/// As `row_dot`, plus `act.q8` is empty or holds the blocks of `act.x`, and the CPU has `dotprod`.
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn row_dot_q8(row: &RowRef<'_>, act: &Act<'_>) -> f32 {
    // SAFETY: validation guarantees each kernel's byte count; `act.q8` has x.len()/32 blocks.
    unsafe {
        if act.q8.is_empty() {
            return row_dot(row, act);
        }
        match row.encoding {
            Encoding::Ggml(GgmlType::Q8_0) => q8_q8_0(row.data, act.q8),
            Encoding::Ggml(GgmlType::Q4_0) => q8_q4_0(row.data, act.q8),
            Encoding::Ggml(GgmlType::Q4K) => q8_q4_k(row.data, act.q8),
            Encoding::MlxAffine { params, scale_type } if params.bits == 4 => {
                q8_mlx4(row, params.group_size, scale_type, act.q8)
            }
            _ => row_dot(row, act),
        }
    }
}

/// Q8_0 × q8: signed × signed, which `sdot` takes directly.
///
/// # Safety
/// `w` holds q8.len() blocks of 34 bytes.
#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_q8_0(w: &[u8], q8: &[Q8Block]) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for (blk, xb) in w.chunks_exact(34).zip(q8) {
        // SAFETY: a block is 34 bytes.
        unsafe {
            let d = f16_at(blk.as_ptr()) * xb.d;
            let wq =
                (vreinterpretq_s8_u8(load_u8(blk.as_ptr().add(2))), vreinterpretq_s8_u8(load_u8(blk.as_ptr().add(18))));
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot32(wq, load_q8(xb))), d);
        }
    }
    vaddvq_f32(acc)
}

/// Q4_0 × q8: codes re-centred to −8..7 in i8 before the dot, so no correction term.
///
/// # Safety
/// `w` holds q8.len() blocks of 18 bytes.
#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_q4_0(w: &[u8], q8: &[Q8Block]) -> f32 {
    let (m4, e8) = (vdupq_n_u8(0x0f), vdupq_n_s8(8));
    let mut acc = vdupq_n_f32(0.0);
    for (blk, xb) in w.chunks_exact(18).zip(q8) {
        // SAFETY: a block is 18 bytes.
        unsafe {
            let d = f16_at(blk.as_ptr()) * xb.d;
            let qs = load_u8(blk.as_ptr().add(2));
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(qs, m4)), e8);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs)), e8);
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot32((lo, hi), load_q8(xb))), d);
        }
    }
    vaddvq_f32(acc)
}

/// Q4_K × q8: q8 blocks line up with the 32-element sub-blocks; mins use the exact f32 block sums.
///
/// # Safety
/// `w` holds q8.len()/8 blocks of 144 bytes.
#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_q4_k(w: &[u8], q8: &[Q8Block]) -> f32 {
    let m4 = vdupq_n_u8(0x0f);
    let mut acc = vdupq_n_f32(0.0);
    let mut mins = 0f32;
    for (blk, xbs) in w.chunks_exact(144).zip(q8.chunks_exact(8)) {
        // SAFETY: a super-block is 144 bytes.
        unsafe {
            let d = f16_at(blk.as_ptr());
            let dmin = f16_at(blk.as_ptr().add(2));
            let (sc, mn) = scale_min_k4(&blk[4..16]);
            let qs = blk.as_ptr().add(16);
            for c in 0..4 {
                let (q0, q1) = (load_u8(qs.add(32 * c)), load_u8(qs.add(32 * c + 16)));
                let (x0, x1) = (&xbs[2 * c], &xbs[2 * c + 1]);
                let lo = (vreinterpretq_s8_u8(vandq_u8(q0, m4)), vreinterpretq_s8_u8(vandq_u8(q1, m4)));
                let hi = (vreinterpretq_s8_u8(vshrq_n_u8::<4>(q0)), vreinterpretq_s8_u8(vshrq_n_u8::<4>(q1)));
                let s0 = d * f32::from(sc[2 * c]) * x0.d;
                let s1 = d * f32::from(sc[2 * c + 1]) * x1.d;
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot32(lo, load_q8(x0))), s0);
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot32(hi, load_q8(x1))), s1);
                mins += dmin * f32::from(mn[2 * c]) * x0.xsum + dmin * f32::from(mn[2 * c + 1]) * x1.xsum;
            }
        }
    }
    vaddvq_f32(acc) - mins
}

/// MLX 4-bit × q8: nibbles re-interleaved into element order; biases use the exact f32 block sums.
///
/// # Safety
/// `row.data` holds 16 bytes per q8 block; scales and biases one value per group; `gs` is a multiple of 32.
#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_mlx4(row: &RowRef<'_>, gs: usize, st: FloatType, q8: &[Q8Block]) -> f32 {
    let m4 = vdupq_n_u8(0x0f);
    let mut acc = vdupq_n_f32(0.0);
    let mut off = 0f32;
    let per_group = gs / 32;
    for (g, (codes, xbs)) in row.data.chunks_exact(16 * per_group).zip(q8.chunks_exact(per_group)).enumerate() {
        let scale = float_at(st, row.scales, g);
        let mut xsum = 0f32;
        for (v, xb) in codes.chunks_exact(16).zip(xbs) {
            // SAFETY: 16 code bytes.
            unsafe {
                let v = load_u8(v.as_ptr());
                let (lo, hi) = (vandq_u8(v, m4), vshrq_n_u8::<4>(v));
                let q = (vreinterpretq_s8_u8(vzip1q_u8(lo, hi)), vreinterpretq_s8_u8(vzip2q_u8(lo, hi)));
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot32(q, load_q8(xb))), scale * xb.d);
            }
            xsum += xb.xsum;
        }
        off += float_at(st, row.biases, g) * xsum;
    }
    vaddvq_f32(acc) + off
}

#[cfg(test)]
mod tests {
    use core::arch::aarch64::*;

    use moestream_quant::{FloatType, decode_floats};

    /// Both f16 decoders (scalar for scales and tails, NEON for F16 rows) against `quant`'s, on every bit
    /// pattern (subnormals, infinities, NaNs).
    #[test]
    fn f16_decoders_match_quant_on_all_bit_patterns() {
        for h in 0..=u16::MAX {
            let mut want = [0f32];
            decode_floats(FloatType::F16, &h.to_le_bytes(), &mut want).expect("one f16");
            let same = |got: f32| got.to_bits() == want[0].to_bits() || (got.is_nan() && want[0].is_nan());
            assert!(same(super::f16(h)), "scalar decoder, bits {h:#06x}");
            // SAFETY: NEON is baseline on aarch64.
            let (l0, l3) = unsafe {
                let v = super::f16x4(vdupq_n_u32(u32::from(h)));
                (vgetq_lane_f32::<0>(v), vgetq_lane_f32::<3>(v))
            };
            assert!(same(l0) && same(l3), "NEON decoder, bits {h:#06x}");
        }
    }
}
