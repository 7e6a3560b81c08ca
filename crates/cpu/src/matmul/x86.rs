//! x86-64 row dot kernels: AVX2 (8 lanes) and AVX-512 (16 lanes), exact f32 accumulation.
//!
//! Owns nothing but arithmetic on one validated row; shapes, threads and the choice of table live in `matmul`.
//! Layout knowledge is duplicated from `moestream_quant` on purpose (a kernel must unpack in registers), and every
//! kernel is tested against that crate's reference decode in `tests/matmul.rs`.
//!
//! The kernels are written once, in `kernels!`, over a handful of per-ISA primitives (`dot16_i8`: widen 16
//! signed codes to f32 and multiply-accumulate with 16 activations; `sum16`; float loads). Unpacking nibbles and
//! bit planes into 16- or 32-byte code vectors uses AVX2/SSE integer ops that both ISAs have. Per block the
//! codes are dotted with `x` first and the block scale applied once (`d·Σq·x`), and per-group offsets are folded
//! as `offset·Σx`, which is what makes the f32 path cheap enough to stay memory-bound.
//!
//! Encodings without a kernel here (Q4_1, Q5_0, Q5_1, Q5_K, MXFP4, MLX 2-bit) fall back to the scalar reference.

pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// AVX-512 plus VNNI (`vpdpbusd`), for the q8-activation table.
pub(super) fn has_avx512_vnni() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512vnni")
}

pub(super) fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

use moestream_quant::ggml::scale_min_k4;

/// The rows a decode walk reads after this call's, for the 4-row kernels: `gemv` walks consecutive rows (r..r+4,
/// then r+4..r+8) and `gathered_gate_up` two runs of two (gate rows i, i+1 and up rows i, i+1, then i+2, i+3).
/// Returns where each run's next rows start and how many rows a run has, or no runs for any other pattern (gemm
/// tiles, a band's clamped last call). Never dereferenced: only prefetched.
#[inline]
fn next_runs<const R: usize>(w: &[&[u8]; R]) -> ([*const u8; 2], usize, usize) {
    let len = w[0].len();
    let after = |r: usize, n: usize| w[r].as_ptr().wrapping_add(n * len);
    let follows = |r: usize| w[r].as_ptr() == w[r - 1].as_ptr().wrapping_add(len);
    let none = [std::ptr::null(); 2];
    if R > 1 && (1..R).all(follows) {
        ([after(0, R), std::ptr::null()], 1, R)
    } else if R == 4 && follows(1) && follows(3) {
        ([after(0, 2), after(2, 2)], 2, 2)
    } else {
        (none, 0, 0)
    }
}

/// Prefetches the next rows of each run in step with the walk over this call's rows: when a step has consumed
/// bytes `off..off + len` of every row, the same share of each run's next rows is requested into L1, and the
/// share two calls ahead into L2, so the next call's rows are in flight by the time this one ends. The hardware
/// streamer does not do this by itself: each row is a short stream (1–2 KiB) and four run side by side, and
/// without it a Zen 3 core stalled on loads at about 4 GB/s, a third of what one core can stream.
#[inline]
fn prefetch_runs(runs: &([*const u8; 2], usize, usize), off: usize, len: usize, row_len: usize) {
    use core::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
    let (starts, n, rows) = *runs;
    for &next in &starts[..n] {
        let far = rows * row_len;
        // Prefetch never faults, whatever the address; wrapping_add keeps the pointer arithmetic defined.
        for at in (rows * off..rows * (off + len)).step_by(64) {
            // SAFETY: prefetch is a hint; SSE is part of x86-64.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at).cast());
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(far + at).cast());
            }
        }
    }
}

use super::Q8Block;

/// AVX-512 form of `quantize_q8_scalar`, bit for bit: the same `v·(1/d)` products, the same half-away rounding
/// (truncate, then step by the exact remainder), `xsum` reduced in the same pairwise order.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `x.len() == 32·out.len()` and `out.len()` is a multiple of `group`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_q8_avx512(x: &[f32], out: &mut [Q8Block], group: usize) {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), 32 * out.len());
    for (bs, xs) in out.chunks_mut(group).zip(x.chunks(32 * group)) {
        let mut m = _mm512_setzero_ps();
        for v in xs.chunks_exact(16) {
            // SAFETY: 16 floats.
            m = _mm512_max_ps(m, _mm512_abs_ps(unsafe { _mm512_loadu_ps(v.as_ptr()) }));
        }
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let idv = _mm512_set1_ps(id);
        for (b, xb) in bs.iter_mut().zip(xs.chunks_exact(32)) {
            // SAFETY: 32 floats.
            let (lo, hi) = unsafe { (_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))) };
            let round = |v: __m512| {
                let r = _mm512_mul_ps(v, idv);
                let t = _mm512_cvttps_epi32(r);
                let f = _mm512_sub_ps(r, _mm512_cvtepi32_ps(t));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, _mm512_set1_ps(0.5));
                let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_set1_ps(-0.5));
                let t = _mm512_mask_add_epi32(t, up, t, _mm512_set1_epi32(1));
                _mm512_mask_sub_epi32(t, down, t, _mm512_set1_epi32(1))
            };
            let (ql, qh) = (round(lo), round(hi));
            // SAFETY: qs is 32 bytes; each store writes 16.
            unsafe {
                _mm_storeu_si128(b.qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(ql));
                _mm_storeu_si128(b.qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qh));
            }
            b.qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
            // x[i] + x[i+16], then halves: 8, 4, 2, 1 (the scalar reference's order).
            let s = _mm512_add_ps(lo, hi);
            let s = _mm256_add_ps(
                _mm512_castps512_ps256(s),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s))),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            b.d = d;
            b.xsum = _mm_cvtss_f32(s);
        }
    }
}

/// AVX2 form of `quantize_q8_scalar`, bit for bit, as [`quantize_q8_avx512`]: on a 2-core AVX2 machine the
/// scalar quantizer took ~6.5% of a 512-token prefill's samples (perf), two thirds of what attention took.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x.len() == 32·out.len()` and `out.len()` is a multiple of `group`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_q8_avx2(x: &[f32], out: &mut [Q8Block], group: usize) {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), 32 * out.len());
    let sign = _mm256_set1_ps(-0.0);
    for (bs, xs) in out.chunks_mut(group).zip(x.chunks(32 * group)) {
        let mut m = _mm256_setzero_ps();
        for v in xs.chunks_exact(8) {
            // SAFETY: 8 floats.
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(v.as_ptr()) }));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let idv = _mm256_set1_ps(id);
        let round = |v: __m256| {
            let r = _mm256_mul_ps(v, idv);
            let t = _mm256_cvttps_epi32(r);
            let f = _mm256_sub_ps(r, _mm256_cvtepi32_ps(t));
            // Compare masks are −1 where true: subtracting `up` steps up, adding `down` steps down.
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, _mm256_set1_ps(0.5)));
            let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, _mm256_set1_ps(-0.5)));
            _mm256_add_epi32(_mm256_sub_epi32(t, up), down)
        };
        for (b, xb) in bs.iter_mut().zip(xs.chunks_exact(32)) {
            // SAFETY: 32 floats.
            let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * i)) });
            let q = v.map(round);
            // |q| ≤ 127: the saturating packs are exact; the permute undoes their per-lane interleave.
            let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: qs is 32 bytes.
            unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), p) };
            let qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let qs = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256::<1>(qs));
            let qs = _mm_add_epi32(qs, _mm_shuffle_epi32::<0b01_00_11_10>(qs));
            b.qsum = _mm_cvtsi128_si32(_mm_add_epi32(qs, _mm_shuffle_epi32::<0b10_11_00_01>(qs)));
            // x[i] + x[i+16] (i < 8, then 8..16), then halves: 8, 4, 2, 1 (the scalar reference's order).
            let s = _mm256_add_ps(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            b.d = d;
            b.xsum = _mm_cvtss_f32(s);
        }
    }
}

/// Every f16 bit pattern as f32 (256 KiB, built at compile time), for block scales: ggml's approach. F16C's
/// one-lane `vcvtph2ps` is lowered by LLVM into a false dependency on the accumulator (measured: q8 Q8_0 gemv at
/// 6.8 GB/s instead of 14), and the branchy integer decoder costs ~10 ops per block.
static F16_TABLE: [f32; 65536] = {
    let mut t = [0f32; 65536];
    let mut h = 0usize;
    while h < 65536 {
        t[h] = f16_const(h as u32);
        h += 1;
    }
    t
};

/// f16 bits → f32, exact (subnormals, infinities and NaN payloads included); usable in const context.
const fn f16_const(h: u32) -> f32 {
    let sign = (h & 0x8000) << 16;
    let (exp, man) = ((h >> 10) & 0x1f, h & 0x3ff);
    if exp == 0 {
        // Zero or subnormal: man · 2⁻²⁴, exact.
        let v = man as f32 * (1.0 / 16_777_216.0);
        if sign != 0 { -v } else { v }
    } else if exp == 0x1f {
        f32::from_bits(sign | 0x7f80_0000 | (man << 13))
    } else {
        f32::from_bits(sign | ((exp + 112) << 23) | (man << 13))
    }
}

/// The 8 six-bit scales and 8 mins of a Q4_K super-block from its 12 packed bytes, as 8 bytes each (the layout
/// [`scale_min_k4`] decodes one at a time), in 32-bit integer ops: ggml's `utmp` unpacking.
#[inline]
fn k4_scales_mins(p: *const u8) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    // SAFETY: callers pass a pointer to the 12 scale bytes of a Q4_K block inside a validated view.
    let u = |i: usize| unsafe { p.add(4 * i).cast::<u32>().read_unaligned() };
    let (a, b, c) = (u(0), u(1), u(2));
    let scales = u64::from(a & LOW6) | u64::from((c & LOW4) | (((a >> 6) & LOW2) << 4)) << 32;
    let mins = u64::from(b & LOW6) | u64::from(((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4)) << 32;
    (scales, mins)
}

/// Shuffle control (per 128-bit half, as one i16 lane pattern) broadcasting i16 lane `j` (0..8).
#[inline]
const fn k4_pick(j: usize) -> i16 {
    let lo = 2 * j as i16;
    ((lo + 1) << 8) | lo
}

macro_rules! kernels {
    ($feat:literal) => {
        use moestream_quant::{Encoding, FloatType, GgmlType};

        use super::super::{Act, Q8Block, RowRef, scalar};
        use super::{k4_pick, k4_scales_mins, scale_min_k4};

        /// Scalar f16 → f32 in integer ops. Not F16C: LLVM lowers a one-lane `vcvtph2ps` to `vpinsrw` into
        /// whatever register is free, which made the loop-carried accumulator an input of every block's scale
        /// (measured: q8 Q8_0 gemv at 6.8 GB/s instead of 14).
        #[inline]
        #[target_feature(enable = $feat)]
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

        /// Block scales through [`super::F16_TABLE`]: one load instead of `f16`'s branches, on the per-block path.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn f16_at(p: *const u8) -> f32 {
            // SAFETY: the caller guarantees two readable bytes; every u16 indexes the 65,536-entry table.
            unsafe { *super::F16_TABLE.get_unchecked(usize::from(p.cast::<u16>().read_unaligned())) }
        }

        /// Value `i` of a little-endian float array (MLX scales and biases).
        #[inline]
        #[target_feature(enable = $feat)]
        fn float_at(ft: FloatType, b: &[u8], i: usize) -> f32 {
            match ft {
                FloatType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
                FloatType::F16 => f16(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])),
                FloatType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])) << 16),
            }
        }

        /// Entry point stored in the dispatch table.
        ///
        /// # Safety
        /// `row` comes from a validated view, `x.len()` is its column count, and the CPU has `$feat`.
        #[target_feature(enable = $feat)]
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

        macro_rules! float_kernel {
            ($name:ident, $size:literal, $load:ident, $one:expr) => {
                /// # Safety
                /// `w` holds `x.len()` values of this float type.
                #[target_feature(enable = $feat)]
                unsafe fn $name(w: &[u8], x: &[f32]) -> f32 {
                    // SAFETY: every load below reads within `w` (`$size` bytes per column) and `x`.
                    unsafe {
                        let n = x.len();
                        let (wp, xp) = (w.as_ptr(), x.as_ptr());
                        let (mut a0, mut a1) = (zero(), zero());
                        let mut c = 0;
                        // Two accumulators hide the FMA latency.
                        while c + 2 * LANES <= n {
                            a0 = fma($load(wp.add($size * c)), load_f32(xp.add(c)), a0);
                            a1 = fma($load(wp.add($size * (c + LANES))), load_f32(xp.add(c + LANES)), a1);
                            c += 2 * LANES;
                        }
                        if c + LANES <= n {
                            a0 = fma($load(wp.add($size * c)), load_f32(xp.add(c)), a0);
                            c += LANES;
                        }
                        let mut s = hsum(add(a0, a1));
                        let one: fn(&[u8]) -> f32 = $one;
                        while c < n {
                            s += one(&w[$size * c..$size * (c + 1)]) * x[c];
                            c += 1;
                        }
                        s
                    }
                }
            };
        }

        float_kernel!(dot_f32, 4, load_f32_bytes, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        float_kernel!(dot_f16, 2, load_f16, |b| half_to_f32(u16::from_le_bytes([b[0], b[1]])));
        float_kernel!(dot_bf16, 2, load_bf16, |b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16));

        /// Scalar f16 for the tail of a row: rare (at most LANES-1 columns), so no feature-gated call needed.
        pub(super) fn half_to_f32(bits: u16) -> f32 {
            let sign = if bits & 0x8000 != 0 { -1.0f32 } else { 1.0 };
            let exp = i32::from((bits >> 10) & 0x1f);
            let man = f32::from(bits & 0x3ff);
            match exp {
                0 => sign * man * (2.0f32).powi(-24),
                31 => {
                    if man == 0.0 {
                        sign * f32::INFINITY
                    } else {
                        f32::NAN
                    }
                }
                _ => sign * (1.0 + man / 1024.0) * (2.0f32).powi(exp - 15),
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load_f32_bytes(p: *const u8) -> V {
            // SAFETY: the caller guarantees LANES·4 readable bytes.
            unsafe { load_f32(p.cast()) }
        }

        /// Q8_0: 34-byte blocks, f16 d then 32 signed codes.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q8_0(w: &[u8], x: &[f32]) -> f32 {
            // SAFETY: `w` holds x.len()/32 blocks of 34 bytes.
            unsafe {
                let (mut wp, mut xp) = (w.as_ptr(), x.as_ptr());
                let (mut a0, mut a1) = (zero(), zero());
                for b in 0..x.len() / 32 {
                    let d = f16_at(wp);
                    let q0 = _mm_loadu_si128(wp.add(2).cast());
                    let q1 = _mm_loadu_si128(wp.add(18).cast());
                    let t = dot16_i8(q1, xp.add(16), dot16_i8(q0, xp, zero()));
                    if b % 2 == 0 {
                        a0 = fma(splat(d), t, a0);
                    } else {
                        a1 = fma(splat(d), t, a1);
                    }
                    wp = wp.add(34);
                    xp = xp.add(32);
                }
                hsum(add(a0, a1))
            }
        }

        /// Q4_0: 18-byte blocks, f16 d then 16 bytes: low nibbles are elements 0..16, high 16..32, offset 8.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q4_0(w: &[u8], x: &[f32]) -> f32 {
            // SAFETY: `w` holds x.len()/32 blocks of 18 bytes.
            unsafe {
                let (mut wp, mut xp) = (w.as_ptr(), x.as_ptr());
                let (m4, e8) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
                let (mut a0, mut a1) = (zero(), zero());
                for b in 0..x.len() / 32 {
                    let d = f16_at(wp);
                    let qs = _mm_loadu_si128(wp.add(2).cast());
                    let lo = _mm_sub_epi8(_mm_and_si128(qs, m4), e8);
                    let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(qs), m4), e8);
                    let t = dot16_i8(hi, xp.add(16), dot16_i8(lo, xp, zero()));
                    if b % 2 == 0 {
                        a0 = fma(splat(d), t, a0);
                    } else {
                        a1 = fma(splat(d), t, a1);
                    }
                    wp = wp.add(18);
                    xp = xp.add(32);
                }
                hsum(add(a0, a1))
            }
        }

        /// Q4_K: 144-byte super-blocks of 256: d, dmin, 12 scale bytes, then 4 chunks of 32 bytes; chunk c holds
        /// sub-block 2c in its low nibbles and 2c+1 in its high nibbles. `w = (d·sc)·q − dmin·m`.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q4_k(w: &[u8], x: &[f32]) -> f32 {
            // SAFETY: `w` holds x.len()/256 blocks of 144 bytes.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let (mut acc, mut mins) = (zero(), zero());
                for (blk, xb) in w.chunks_exact(144).zip(x.chunks_exact(256)) {
                    let d = f16_at(blk.as_ptr());
                    let dmin = f16_at(blk.as_ptr().add(2));
                    let (sc, mn) = scale_min_k4(&blk[4..16]);
                    let qs = blk.as_ptr().add(16);
                    for c in 0..4 {
                        let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                        let lo = _mm256_and_si256(q, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                        let x0 = xb.as_ptr().add(64 * c);
                        let x1 = x0.add(32);
                        let tl = dot16_u8(_mm256_castsi256_si128(lo), x0, zero());
                        let tl = dot16_u8(_mm256_extracti128_si256::<1>(lo), x0.add(16), tl);
                        let th = dot16_u8(_mm256_castsi256_si128(hi), x1, zero());
                        let th = dot16_u8(_mm256_extracti128_si256::<1>(hi), x1.add(16), th);
                        acc = fma(splat(d * f32::from(sc[2 * c])), tl, acc);
                        acc = fma(splat(d * f32::from(sc[2 * c + 1])), th, acc);
                        let sl = sum16(x0.add(16), sum16(x0, zero()));
                        let sh = sum16(x1.add(16), sum16(x1, zero()));
                        mins = fma(splat(dmin * f32::from(mn[2 * c])), sl, mins);
                        mins = fma(splat(dmin * f32::from(mn[2 * c + 1])), sh, mins);
                    }
                }
                hsum(acc) - hsum(mins)
            }
        }

        /// Q6_K's high bits `(v & 3) << 4` (a fn, not a closure: closures do not inherit target features).
        #[inline]
        #[target_feature(enable = $feat)]
        fn q6_high(v: __m256i) -> __m256i {
            _mm256_slli_epi16::<4>(_mm256_and_si256(v, _mm256_set1_epi8(3)))
        }

        /// The codes (unsigned, 0..63) of half `h` of the Q6_K super-block at `bp`, as four 32-element quarters in
        /// element order (the layout `dot_q6_k` describes). Shared by the exact and the q8 kernels.
        ///
        /// # Safety
        /// `bp` points at a whole 210-byte super-block.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn q6_quarters(bp: *const u8, h: usize) -> [__m256i; 4] {
            // SAFETY: ql[128] and qh[64] are inside the block.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let a = _mm256_loadu_si256(bp.add(64 * h).cast());
                let b = _mm256_loadu_si256(bp.add(64 * h + 32).cast());
                let qh = _mm256_loadu_si256(bp.add(128 + 32 * h).cast());
                [
                    _mm256_or_si256(_mm256_and_si256(a, m4), q6_high(qh)),
                    _mm256_or_si256(_mm256_and_si256(b, m4), q6_high(_mm256_srli_epi16::<2>(qh))),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(a), m4),
                        q6_high(_mm256_srli_epi16::<4>(qh)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(b), m4),
                        q6_high(_mm256_srli_epi16::<6>(qh)),
                    ),
                ]
            }
        }

        /// Q6_K: 210-byte super-blocks: ql[128], qh[64], i8 scales[16], f16 d last. In half h, the 32 elements
        /// of quarter k take low nibbles from ql[64h..] (k = 0, 2) or ql[64h+32..] (k = 1, 3), low for k < 2 and
        /// high for k ≥ 2, and bits 2k..2k+2 of qh[32h..32h+32]; one scale per 16 elements.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q6_k(w: &[u8], x: &[f32]) -> f32 {
            // SAFETY: `w` holds x.len()/256 blocks of 210 bytes.
            unsafe {
                let e32 = _mm256_set1_epi8(32);
                let (mut a0, mut a1) = (zero(), zero());
                for (blk, xb) in w.chunks_exact(210).zip(x.chunks_exact(256)) {
                    let bp = blk.as_ptr();
                    let d = f16_at(bp.add(208));
                    let sc = &blk[192..208];
                    for h in 0..2 {
                        for (k, q) in q6_quarters(bp, h).into_iter().enumerate() {
                            let q = _mm256_sub_epi8(q, e32);
                            let xp = xb.as_ptr().add(128 * h + 32 * k);
                            let s = 8 * h + 2 * k;
                            let t0 = dot16_i8(_mm256_castsi256_si128(q), xp, zero());
                            let t1 = dot16_i8(_mm256_extracti128_si256::<1>(q), xp.add(16), zero());
                            a0 = fma(splat(d * f32::from(sc[s] as i8)), t0, a0);
                            a1 = fma(splat(d * f32::from(sc[s + 1] as i8)), t1, a1);
                        }
                    }
                }
                hsum(add(a0, a1))
            }
        }

        /// MLX 4-bit: byte i holds element 2i (low nibble) and 2i+1 (high nibble); per group
        /// `scale·Σq·x + bias·Σx`.
        #[target_feature(enable = $feat)]
        unsafe fn dot_mlx4(row: &RowRef<'_>, gs: usize, st: FloatType, x: &[f32]) -> f32 {
            // SAFETY: `row.data` holds x.len()/2 bytes; scales and biases one value per group.
            unsafe {
                let m4 = _mm_set1_epi8(0x0f);
                let mut acc = zero();
                let (mut wp, mut xp) = (row.data.as_ptr(), x.as_ptr());
                for g in 0..x.len() / gs {
                    let (mut tq, mut tx) = (zero(), zero());
                    for _ in 0..gs / 32 {
                        let v = _mm_loadu_si128(wp.cast());
                        let lo = _mm_and_si128(v, m4);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m4);
                        tq = dot16_u8(_mm_unpacklo_epi8(lo, hi), xp, tq);
                        tq = dot16_u8(_mm_unpackhi_epi8(lo, hi), xp.add(16), tq);
                        tx = sum16(xp.add(16), sum16(xp, tx));
                        wp = wp.add(16);
                        xp = xp.add(32);
                    }
                    acc = fma(splat(float_at(st, row.scales, g)), tq, acc);
                    acc = fma(splat(float_at(st, row.biases, g)), tx, acc);
                }
                hsum(acc)
            }
        }

        /// MLX 8-bit: one byte per element in order; per group `scale·Σq·x + bias·Σx`.
        #[target_feature(enable = $feat)]
        unsafe fn dot_mlx8(row: &RowRef<'_>, gs: usize, st: FloatType, x: &[f32]) -> f32 {
            // SAFETY: `row.data` holds x.len() bytes; scales and biases one value per group.
            unsafe {
                let mut acc = zero();
                let (mut wp, mut xp) = (row.data.as_ptr(), x.as_ptr());
                for g in 0..x.len() / gs {
                    let (mut tq, mut tx) = (zero(), zero());
                    for _ in 0..gs / 16 {
                        tq = dot16_u8(_mm_loadu_si128(wp.cast()), xp, tq);
                        tx = sum16(xp, tx);
                        wp = wp.add(16);
                        xp = xp.add(16);
                    }
                    acc = fma(splat(float_at(st, row.scales, g)), tq, acc);
                    acc = fma(splat(float_at(st, row.biases, g)), tx, acc);
                }
                hsum(acc)
            }
        }
    };
}

/// Integer-dot kernels over q8 activations (`Act::q8`), for the encodings where widening to f32 is the
/// bottleneck. 256-bit on both ISAs: the gain of AVX-512 here is `vpdpbusd`, not width.
macro_rules! q8_kernels {
    ($feat:literal) => {
        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum8(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load_q8(b: &Q8Block) -> __m256i {
            // SAFETY: `qs` is 32 bytes.
            unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) }
        }

        /// Entry point of the q8 table: q8 kernels where they exist and `act.q8` is present, else f32.
        ///
        /// # Safety
        /// As `row_dot`, plus `act.q8` is empty or holds the blocks of `act.x`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn row_dot_q8(row: &RowRef<'_>, act: &Act<'_>) -> f32 {
            // SAFETY: validation guarantees each kernel's byte count; `act.q8` has x.len()/32 blocks.
            unsafe {
                if act.q8.is_empty() {
                    return row_dot(row, act);
                }
                match row.encoding {
                    Encoding::Ggml(GgmlType::Q8_0) => tile_q8_0([row.data], &[act.q8])[0][0],
                    Encoding::Ggml(GgmlType::Q4_0) => tile_q4_0([row.data], &[act.q8])[0][0],
                    Encoding::Ggml(GgmlType::Q4K) => tile_q4_k([row.data], &[act.q8])[0][0],
                    Encoding::Ggml(GgmlType::Q6K) => tile_q6_k([row.data], &[act.q8])[0][0],
                    Encoding::MlxAffine { params, scale_type } if params.bits == 4 => {
                        tile_mlx4(&[*row], params.group_size, scale_type, &[act.q8])[0][0]
                    }
                    _ => row_dot(row, act),
                }
            }
        }

        /// Tile entry of the q8 table: `out[r][t] = rows[r] · acts[t]` for 4 rows × 4 token activations, each
        /// value bit-identical to `row_dot_q8` on the same pair (same per-pair operation order), so prefill
        /// (`gemm`) and decode (`gemv`) agree exactly. Unpacks each weight block once for 4 tokens and loads each
        /// activation block once for 4 rows. Returns false, computing nothing, for encodings without a tile.
        ///
        /// # Safety
        /// The rows come from one validated view; every `acts[t]` holds the q8 blocks of that view's column count.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn tile_q8(rows: &[RowRef<'_>; 4], acts: &[&[Q8Block]; 4], out: &mut [[f32; 4]; 4]) -> bool {
            // SAFETY: guaranteed by the caller.
            let Some(res) = (unsafe { tile_rows4(rows, acts) }) else { return false };
            *out = res;
            true
        }

        /// Four rows × one activation: the decode form of [`tile_q8`] (one activation load per 4 rows, one call
        /// per 4 rows), bit-identical per row to `row_dot_q8`. Returns false for encodings without a tile.
        ///
        /// # Safety
        /// As [`tile_q8`], with `act` the q8 blocks of the view's column count.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn rows4_q8(rows: &[RowRef<'_>; 4], act: &[Q8Block], out: &mut [f32; 4]) -> bool {
            // SAFETY: guaranteed by the caller.
            let Some(res) = (unsafe { tile_rows4(rows, &[act]) }) else { return false };
            for (o, r) in out.iter_mut().zip(res) {
                *o = r[0];
            }
            true
        }

        /// The encoding's tile kernel over 4 rows × T tokens, or `None` for encodings without one.
        ///
        /// # Safety
        /// As [`tile_q8`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn tile_rows4<const T: usize>(rows: &[RowRef<'_>; 4], acts: &[&[Q8Block]; T]) -> Option<[[f32; T]; 4]> {
            let d = [rows[0].data, rows[1].data, rows[2].data, rows[3].data];
            // SAFETY: as for `row_dot_q8`, per row and per activation.
            unsafe {
                Some(match rows[0].encoding {
                    Encoding::Ggml(GgmlType::Q4_0) => tile_q4_0(d, acts),
                    Encoding::Ggml(GgmlType::Q8_0) => tile_q8_0(d, acts),
                    Encoding::Ggml(GgmlType::Q4K) => tile_q4_k(d, acts),
                    Encoding::Ggml(GgmlType::Q6K) => tile_q6_k(d, acts),
                    Encoding::MlxAffine { params, scale_type } if params.bits == 4 => {
                        tile_mlx4(rows, params.group_size, scale_type, acts)
                    }
                    _ => return None,
                })
            }
        }

        /// Block `b` of every token's activations, with its codes loaded.
        ///
        /// # Safety
        /// `b` is below every `q8[t].len()`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn block_acts<'a, const T: usize>(
            q8: &[&'a [Q8Block]; T],
            b: usize,
        ) -> ([&'a Q8Block; T], [__m256i; T]) {
            // SAFETY: guaranteed by the caller.
            unsafe {
                let mut xb = [q8[0].get_unchecked(b); T];
                let mut xv = [_mm256_setzero_si256(); T];
                for t in 0..T {
                    xb[t] = q8[t].get_unchecked(b);
                    xv[t] = load_q8(xb[t]);
                }
                (xb, xv)
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum_tile<const R: usize, const T: usize>(acc: [[__m256; T]; R]) -> [[f32; T]; R] {
            // Loops, not `map`: closures do not inherit target features, and these would be calls.
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = hsum8(acc[r][t]);
                }
            }
            out
        }

        /// Q4_0 × q8, 256-bit: `Σ(q−8)·x = Σq·x − 8·Σx`, the correction exact in integers (one lane). The AVX2
        /// table's Q4_0 kernel; AVX-512 has a 512-bit one.
        #[allow(dead_code)]
        #[target_feature(enable = $feat)]
        unsafe fn tile_q4_0_ymm<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
            // SAFETY: every `w[r]` holds q8[t].len() blocks of 18 bytes (one view, one column count).
            unsafe {
                let m4 = _mm_set1_epi8(0x0f);
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let runs = if T == 1 { super::next_runs(&w) } else { ([std::ptr::null(); 2], 0, 0) };
                for b in 0..q8[0].len() {
                    super::prefetch_runs(&runs, 18 * b, 18, w[0].len());
                    let (xb, xv) = block_acts(q8, b);
                    for r in 0..R {
                        let blk = w[r].as_ptr().add(18 * b);
                        let dw = f16_at(blk);
                        let qs = _mm_loadu_si128(blk.add(2).cast());
                        let q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(qs), m4), _mm_and_si128(qs, m4));
                        for t in 0..T {
                            let d = dw * xb[t].d;
                            let i = dot32(q, xv[t]);
                            let i = _mm256_sub_epi32(i, _mm256_zextsi128_si256(_mm_cvtsi32_si128(8 * xb[t].qsum)));
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(d), acc[r][t]);
                        }
                    }
                }
                hsum_tile(acc)
            }
        }

        /// Q8_0 × q8: signed × signed via `|w|` and `sign(x, w)` (u8 × i8 is what the instruction takes).
        #[target_feature(enable = $feat)]
        unsafe fn tile_q8_0<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
            // SAFETY: every `w[r]` holds q8[t].len() blocks of 34 bytes.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let runs = if T == 1 { super::next_runs(&w) } else { ([std::ptr::null(); 2], 0, 0) };
                for b in 0..q8[0].len() {
                    super::prefetch_runs(&runs, 34 * b, 34, w[0].len());
                    let (xb, xv) = block_acts(q8, b);
                    for r in 0..R {
                        let blk = w[r].as_ptr().add(34 * b);
                        let dw = f16_at(blk);
                        let wq = _mm256_loadu_si256(blk.add(2).cast());
                        let aw = _mm256_abs_epi8(wq);
                        for t in 0..T {
                            let d = dw * xb[t].d;
                            let i = dot32(aw, _mm256_sign_epi8(xv[t], wq));
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(d), acc[r][t]);
                        }
                    }
                }
                hsum_tile(acc)
            }
        }

        /// Q4_K × q8 (ggml's `Q8_K` scheme): the 8 q8 blocks of a super-block share one scale `d_x` (see
        /// `with_q8`), so `Σ_j sc_j·Σ q·x_q` is summed in integers (`maddubs` per 32 codes, then `madd` with the
        /// sub-block scale, ≤ 3.9·10⁶ per lane) and converted once; the mins term is `Σ_j mn_j·qsum_j`, also
        /// integer. Per super-block and row: two float FMAs instead of two per 32 values.
        #[target_feature(enable = $feat)]
        #[allow(dead_code)]
        unsafe fn tile_q4_k_ymm<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
            // SAFETY: every `w[r]` holds q8[t].len()/8 blocks of 144 bytes; q8[t] comes in groups of 8.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let mut macc = [[_mm_setzero_ps(); T]; R];
                let runs = if T == 1 { super::next_runs(&w) } else { ([std::ptr::null(); 2], 0, 0) };
                for sb in 0..q8[0].len() / 8 {
                    super::prefetch_runs(&runs, 144 * sb, 144, w[0].len());
                    let mut dx = [0f32; T];
                    let mut qsums = [_mm_setzero_si128(); T];
                    for t in 0..T {
                        let xb = q8[t].as_ptr().add(8 * sb);
                        dx[t] = (*xb).d;
                        qsums[t] = qsums8(xb);
                    }
                    for r in 0..R {
                        let bp = w[r].as_ptr().add(144 * sb);
                        let d = f16_at(bp);
                        let dmin = f16_at(bp.add(2));
                        let (sc, mn) = k4_scales_mins(bp.add(4));
                        let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                        let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                        let qs = bp.add(16);
                        let mut isum = [_mm256_setzero_si256(); T];
                        for c in 0..4 {
                            let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                            let (ql, qh) = (_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4));
                            let s_lo = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(k4_pick(2 * c)));
                            let s_hi = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(k4_pick(2 * c + 1)));
                            for t in 0..T {
                                let xb = q8[t].as_ptr().add(8 * sb + 2 * c);
                                let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(ql, load_q8(&*xb)), s_lo);
                                let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(qh, load_q8(&*xb.add(1))), s_hi);
                                isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(lo, hi));
                            }
                        }
                        for t in 0..T {
                            acc[r][t] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * dx[t]), acc[r][t]);
                            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mn16, qsums[t]));
                            macc[r][t] = _mm_fmadd_ps(m, _mm_set1_ps(dmin * dx[t]), macc[r][t]);
                        }
                    }
                }
                let mut sums = hsum_tile(acc);
                for r in 0..R {
                    for t in 0..T {
                        sums[r][t] -= hsum4(macc[r][t]);
                    }
                }
                sums
            }
        }

        /// The code sums of 8 consecutive q8 blocks as 8 i16 lanes (each |qsum| ≤ 32·127).
        ///
        /// # Safety
        /// `xb` points at 8 readable blocks.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn qsums8(xb: *const Q8Block) -> __m128i {
            // SAFETY: guaranteed by the caller.
            unsafe {
                let q = |i: usize| (*xb.add(i)).qsum as i16;
                _mm_setr_epi16(q(0), q(1), q(2), q(3), q(4), q(5), q(6), q(7))
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum4(v: __m128) -> f32 {
            let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }

        /// Q6_K × q8 (ggml's `Q8_K` scheme, as `tile_q4_k`): codes unpacked unsigned (0..63) in element order
        /// (the layout `dot_q6_k` describes); per 32 codes `maddubs(q, x) − maddubs(32, x)` is `Σ(q−32)·x` per
        /// pair in i16 (|·| ≤ 8128), `madd` with the two 16-element scales makes it i32 (≤ 1.7·10⁷ per lane per
        /// super-block), and `d·d_x` is applied once per super-block.
        #[target_feature(enable = $feat)]
        #[allow(dead_code)]
        unsafe fn tile_q6_k_ymm<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
            // SAFETY: every `w[r]` holds q8[t].len()/8 blocks of 210 bytes; q8[t] comes in groups of 8.
            unsafe {
                let e32 = _mm256_set1_epi8(32);
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let runs = if T == 1 { super::next_runs(&w) } else { ([std::ptr::null(); 2], 0, 0) };
                for sb in 0..q8[0].len() / 8 {
                    super::prefetch_runs(&runs, 210 * sb, 210, w[0].len());
                    // 32·Σx per pair of activations of each q8 block of this super-block, shared by all rows.
                    let mut xs = [[_mm256_setzero_si256(); 8]; T];
                    let mut dx = [0f32; T];
                    for t in 0..T {
                        dx[t] = q8[t].get_unchecked(8 * sb).d;
                        for b in 0..8 {
                            xs[t][b] = _mm256_maddubs_epi16(e32, load_q8(q8[t].get_unchecked(8 * sb + b)));
                        }
                    }
                    for r in 0..R {
                        let bp = w[r].as_ptr().add(210 * sb);
                        let d = f16_at(bp.add(208));
                        // The 16 scales as i16, each 128-bit half holding scales 0..8 (`lo`) or 8..16 (`hi`).
                        let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(192).cast()));
                        let halves =
                            [_mm256_permute2x128_si256::<0x00>(sc, sc), _mm256_permute2x128_si256::<0x11>(sc, sc)];
                        let mut isum = [_mm256_setzero_si256(); T];
                        for h in 0..2 {
                            for (k, q) in q6_quarters(bp, h).into_iter().enumerate() {
                                // Scale 2k of this half for the first 16 codes, 2k+1 for the last 16.
                                let scv = _mm256_shuffle_epi8(halves[h], q6_pick(k));
                                let b = 4 * h + k;
                                for t in 0..T {
                                    let xb = q8[t].get_unchecked(8 * sb + b);
                                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, load_q8(xb)), xs[t][b]);
                                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, scv));
                                }
                            }
                        }
                        for t in 0..T {
                            acc[r][t] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * dx[t]), acc[r][t]);
                        }
                    }
                }
                hsum_tile(acc)
            }
        }

        /// Shuffle control selecting i16 lane `2k` of each 128-bit half in the low half and lane `2k+1` in the
        /// high half (the two 16-code scales of Q6_K quarter `k`).
        #[inline]
        #[target_feature(enable = $feat)]
        fn q6_pick(k: usize) -> __m256i {
            let (a, b) = (4 * k as i16, 4 * k as i16 + 2);
            _mm256_set_m128i(_mm_set1_epi16(((b + 1) << 8) | b), _mm_set1_epi16(((a + 1) << 8) | a))
        }

        /// MLX 4-bit × q8: nibbles re-interleaved into element order; biases use the exact f32 block sums.
        #[target_feature(enable = $feat)]
        unsafe fn tile_mlx4<const R: usize, const T: usize>(
            rows: &[RowRef<'_>; R],
            gs: usize,
            st: FloatType,
            q8: &[&[Q8Block]; T],
        ) -> [[f32; T]; R] {
            // SAFETY: every row holds 16 bytes per q8 block; scales and biases one value per group.
            unsafe {
                let m4 = _mm_set1_epi8(0x0f);
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let mut off = [[0f32; T]; R];
                let per_group = gs / 32;
                for g in 0..q8[0].len() / per_group {
                    let mut xsum = [0f32; T];
                    for t in 0..T {
                        for xb in &q8[t][g * per_group..(g + 1) * per_group] {
                            xsum[t] += xb.xsum;
                        }
                    }
                    for r in 0..R {
                        let scale = float_at(st, rows[r].scales, g);
                        let codes = rows[r].data.as_ptr().add(16 * per_group * g);
                        for k in 0..per_group {
                            let v = _mm_loadu_si128(codes.add(16 * k).cast());
                            let lo = _mm_and_si128(v, m4);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m4);
                            let q = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
                            for t in 0..T {
                                let xb = q8[t].get_unchecked(g * per_group + k);
                                let i = dot32(q, load_q8(xb));
                                acc[r][t] =
                                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(scale * xb.d), acc[r][t]);
                            }
                        }
                        let bias = float_at(st, rows[r].biases, g);
                        for t in 0..T {
                            off[r][t] += bias * xsum[t];
                        }
                    }
                }
                let mut sums = hsum_tile(acc);
                for r in 0..R {
                    for t in 0..T {
                        sums[r][t] += off[r][t];
                    }
                }
                sums
            }
        }
    };
}

/// 8-lane kernels: AVX2 + FMA + F16C (Haswell and later).
pub(super) mod avx2 {
    use core::arch::x86_64::*;

    use self::{tile_q4_0_ymm as tile_q4_0, tile_q4_k_ymm as tile_q4_k, tile_q6_k_ymm as tile_q6_k};

    type V = __m256;
    const LANES: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn zero() -> V {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn splat(a: f32) -> V {
        _mm256_set1_ps(a)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn add(a: V, b: V) -> V {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: V) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f32(p: *const f32) -> V {
        // SAFETY: the caller guarantees 8 readable floats.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const u8) -> V {
        // SAFETY: the caller guarantees 16 readable bytes.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_bf16(p: *const u8) -> V {
        // SAFETY: the caller guarantees 16 readable bytes.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }
    /// `acc + Σ c[i]·x[i]` lane-wise for 16 signed codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot16_i8(c: __m128i, x: *const f32, acc: V) -> V {
        let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
        let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(c)));
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe { fma(b, load_f32(x.add(8)), fma(a, load_f32(x), acc)) }
    }
    /// `acc + Σ c[i]·x[i]` lane-wise for 16 unsigned codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot16_u8(c: __m128i, x: *const f32, acc: V) -> V {
        let a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
        let b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(c)));
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe { fma(b, load_f32(x.add(8)), fma(a, load_f32(x), acc)) }
    }
    /// `acc + x[0..16]` lane-wise.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum16(x: *const f32, acc: V) -> V {
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe { add(acc, add(load_f32(x), load_f32(x.add(8)))) }
    }

    /// 8 lanes of `Σ_{4 bytes} w·x` for 32 unsigned `w` (≤ 128) and signed `x`; `maddubs` cannot saturate here:
    /// two products of |128·127| sum to 32512 < 32767.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot32(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    kernels!("avx2,fma,f16c");
    q8_kernels!("avx2,fma,f16c");
}

/// 16-lane kernels: AVX-512 F/BW/VL on top of the AVX2 set (Skylake-SP, Zen 4 and later).
pub(super) mod avx512 {
    use core::arch::x86_64::*;

    type V = __m512;
    const LANES: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn zero() -> V {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn splat(a: f32) -> V {
        _mm512_set1_ps(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn add(a: V, b: V) -> V {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn hsum(v: V) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load_f32(p: *const f32) -> V {
        // SAFETY: the caller guarantees 16 readable floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load_f16(p: *const u8) -> V {
        // SAFETY: the caller guarantees 32 readable bytes.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load_bf16(p: *const u8) -> V {
        // SAFETY: the caller guarantees 32 readable bytes.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn dot16_i8(c: __m128i, x: *const f32, acc: V) -> V {
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe { fma(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), load_f32(x), acc) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn dot16_u8(c: __m128i, x: *const f32, acc: V) -> V {
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe { fma(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)), load_f32(x), acc) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn sum16(x: *const f32, acc: V) -> V {
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe { add(acc, load_f32(x)) }
    }

    /// 8 lanes of `Σ_{4 bytes} w·x` for 32 unsigned `w` and signed `x`, one `vpdpbusd`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn dot32(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }

    kernels!("avx512f,avx512bw,avx512vl,avx2,fma,f16c");
    q8_kernels!("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c");

    /// Two q8 blocks' codes as one 512-bit vector `[a, b]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn pair_q8(a: &Q8Block, b: &Q8Block) -> __m512i {
        // SAFETY: both are whole blocks.
        unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load_q8(a)), load_q8(b)) }
    }

    /// `vpermw` control: each 64-bit lane `i` (four i16 lanes) selects source lane `src[i]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn i16_lanes(src: [usize; 8]) -> __m512i {
        let l = |i: usize| 0x0001_0001_0001_0001 * src[i] as i64;
        _mm512_set_epi64(l(7), l(6), l(5), l(4), l(3), l(2), l(1), l(0))
    }

    /// Q4_K × q8 (ggml's `Q8_K` scheme), 512-bit: the 256-bit kernel's integer sums two sub-blocks per step.
    /// 64 code bytes hold sub-blocks `[4p, 4p+2]` (low nibbles) and `[4p+1, 4p+3]` (high nibbles); `maddubs`
    /// then `vpdpwssd` with the sub-block scales in 16-lane halves (≤ 3.9·10⁶ per lane), one float FMA per
    /// super-block with `d·d_x`, and the mins `Σ mn_j·qsum_j` in integers.
    // Index loops: the indices are the layout (sub-block numbers), not just positions.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile_q4_k<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
        // SAFETY: every `w[r]` holds q8[t].len()/8 blocks of 144 bytes; q8[t] comes in groups of 8.
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut macc = [[_mm_setzero_ps(); T]; R];
            let pf = next_rows(&w);
            for sb in 0..q8[0].len() / 8 {
                let mut dx = [0f32; T];
                let mut qsums = [_mm_setzero_si128(); T];
                // Activations of sub-blocks [4p, 4p+2] and [4p+1, 4p+3], matching the code halves.
                let mut xv = [[[_mm512_setzero_si512(); 2]; 2]; T];
                for t in 0..T {
                    let xb = q8[t].as_ptr().add(8 * sb);
                    dx[t] = (*xb).d;
                    qsums[t] = qsums8(xb);
                    for p in 0..2 {
                        xv[t][p][0] = pair_q8(&*xb.add(4 * p), &*xb.add(4 * p + 2));
                        xv[t][p][1] = pair_q8(&*xb.add(4 * p + 1), &*xb.add(4 * p + 3));
                    }
                }
                if T == 1 && !pf.is_null() {
                    prefetch_span(pf, 144 * R * sb, 144 * R, 2 * R * w[0].len());
                }
                for r in 0..R {
                    let bp = w[r].as_ptr().add(144 * sb);
                    let d = f16_at(bp);
                    let dmin = f16_at(bp.add(2));
                    let (sc, mn) = k4_scales_mins(bp.add(4));
                    let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                    let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                    let mut isum = [_mm512_setzero_si512(); T];
                    for p in 0..2 {
                        let v = _mm512_loadu_si512(bp.add(16 + 64 * p).cast());
                        let q = [_mm512_and_si512(v, m4), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4)];
                        for n in 0..2 {
                            // Sub-block 4p+n's scale for the first 32 codes, 4p+n+2's for the last 32.
                            let (a, b) = (4 * p + n, 4 * p + n + 2);
                            let scv = _mm512_permutexvar_epi16(i16_lanes([a, a, a, a, b, b, b, b]), sc16);
                            for t in 0..T {
                                let prod = _mm512_maddubs_epi16(q[n], xv[t][p][n]);
                                isum[t] = _mm512_dpwssd_epi32(isum[t], prod, scv);
                            }
                        }
                    }
                    for t in 0..T {
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_set1_ps(d * dx[t]), acc[r][t]);
                        let m = _mm_cvtepi32_ps(_mm_madd_epi16(mn16, qsums[t]));
                        macc[r][t] = _mm_fmadd_ps(m, _mm_set1_ps(dmin * dx[t]), macc[r][t]);
                    }
                }
            }
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = _mm512_reduce_add_ps(acc[r][t]) - hsum4(macc[r][t]);
                }
            }
            out
        }
    }

    /// Q6_K × q8 (ggml's `Q8_K` scheme), 512-bit: the 256-bit kernel's sums two quarters per step. Half h's
    /// 64 low-nibble bytes `[a, b]` and its 32 high-bit bytes, duplicated and shifted by `[0, 2]`, give quarters
    /// `[0, 1]` (low nibbles | bits 0–1 or 2–3) and `[2, 3]` (high nibbles | bits 4–5 or 6–7) of the element-order
    /// layout; `maddubs(q, x) − maddubs(32, x)` then `vpdpwssd` with one scale per 16 codes.
    // Index loops: the indices are the layout (sub-block numbers), not just positions.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile_q6_k<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
        // SAFETY: every `w[r]` holds q8[t].len()/8 blocks of 210 bytes; q8[t] comes in groups of 8.
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let m30 = _mm512_set1_epi8(0x30);
            let e32 = _mm512_set1_epi8(32);
            let shift = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let pf = next_rows(&w);
            for sb in 0..q8[0].len() / 8 {
                let mut dx = [0f32; T];
                // Per half h: activations of quarters [0, 1] and [2, 3], and 32·Σx per pair of each.
                let mut xv = [[[_mm512_setzero_si512(); 2]; 2]; T];
                let mut xs = [[[_mm512_setzero_si512(); 2]; 2]; T];
                for t in 0..T {
                    let xb = q8[t].as_ptr().add(8 * sb);
                    dx[t] = (*xb).d;
                    for h in 0..2 {
                        for n in 0..2 {
                            let b = 4 * h + 2 * n;
                            xv[t][h][n] = pair_q8(&*xb.add(b), &*xb.add(b + 1));
                            xs[t][h][n] = _mm512_maddubs_epi16(e32, xv[t][h][n]);
                        }
                    }
                }
                if T == 1 && !pf.is_null() {
                    prefetch_span(pf, 210 * R * sb, 210 * R, 2 * R * w[0].len());
                }
                for r in 0..R {
                    let bp = w[r].as_ptr().add(210 * sb);
                    let d = f16_at(bp.add(208));
                    let sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(192).cast())));
                    let mut isum = [_mm512_setzero_si512(); T];
                    for h in 0..2 {
                        let ab = _mm512_loadu_si512(bp.add(64 * h).cast());
                        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(bp.add(128 + 32 * h).cast()));
                        let qh = _mm512_srlv_epi64(qh, shift);
                        let q = [
                            _mm512_or_si512(
                                _mm512_and_si512(ab, m4),
                                _mm512_and_si512(_mm512_slli_epi16::<4>(qh), m30),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(ab), m4),
                                _mm512_and_si512(qh, m30),
                            ),
                        ];
                        for n in 0..2 {
                            // Scales 8h+4n .. 8h+4n+4, one per 16 codes.
                            let f = 8 * h + 4 * n;
                            let scv = _mm512_permutexvar_epi16(
                                i16_lanes([f, f, f + 1, f + 1, f + 2, f + 2, f + 3, f + 3]),
                                sc16,
                            );
                            for t in 0..T {
                                let prod = _mm512_sub_epi16(_mm512_maddubs_epi16(q[n], xv[t][h][n]), xs[t][h][n]);
                                isum[t] = _mm512_dpwssd_epi32(isum[t], prod, scv);
                            }
                        }
                    }
                    for t in 0..T {
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_set1_ps(d * dx[t]), acc[r][t]);
                    }
                }
            }
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
                }
            }
            out
        }
    }

    /// Where the next group of rows starts when `w` are consecutive rows of one matrix (the decode walk), else
    /// null. Never dereferenced here: only prefetched.
    #[inline]
    fn next_rows<const R: usize>(w: &[&[u8]; R]) -> *const u8 {
        let len = w[0].len();
        let base = w[0].as_ptr();
        let consecutive = (1..R).all(|r| w[r].as_ptr() == base.wrapping_add(r * len));
        if consecutive { base.wrapping_add(R * len) } else { std::ptr::null() }
    }

    /// Prefetches the next row group in step with the walk over this one: when a step has consumed bytes
    /// `off..off + len` of this group (summed over its rows), the same bytes of the next group are requested, so the
    /// whole next group is in flight by the time this one ends. The hardware streamer does not do this by itself:
    /// each row is a short stream (1–2 KiB) and four run side by side.
    ///
    /// The same span of the group after the one after next (`far`, two groups further) is also requested into L2
    /// only, as the packed kernels do (`packed::x86::FAR_PREFETCH`): L1's fill buffers alone keep too few lines
    /// in flight for one core to reach its share of the bandwidth.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn prefetch_span(next: *const u8, off: usize, len: usize, far: usize) {
        // Prefetch never faults, whatever the address; wrapping_add keeps the pointer arithmetic defined.
        for at in (off..off + len).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at).cast());
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(far + at).cast());
        }
    }

    /// `[a ×8, b ×8]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn halves(a: f32, b: f32) -> __m512 {
        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b))
    }

    /// Q4_0 × q8, two blocks per 512-bit step: codes of blocks b and b+1 as `[lo₀, hi₀, lo₁, hi₁]` (one
    /// permute and one variable shift), one `vpdpbusd` per row and token starting from `−8·qsum` in lanes 0 and 8
    /// (exact), then `cvt` and one FMA with `[d_w·d_x]` per half. Per block the f32 operations are those of the
    /// 256-bit kernel; only the lane layout of the accumulator (and so the final sum's order) differs. An odd last
    /// block runs 256-bit.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile_q4_0<const R: usize, const T: usize>(w: [&[u8]; R], q8: &[&[Q8Block]; T]) -> [[f32; T]; R] {
        // SAFETY: every `w[r]` holds q8[t].len() blocks of 18 bytes (one view, one column count).
        unsafe {
            let nb = q8[0].len();
            let m4 = _mm512_set1_epi8(0x0f);
            let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
            let dup = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let pf = next_rows(&w);
            let mut b = 0;
            while b + 2 <= nb {
                if T == 1 && !pf.is_null() {
                    prefetch_span(pf, 18 * R * b, 36 * R, 2 * R * w[0].len());
                }
                // Loops, not `array::from_fn`: closures do not inherit target features and were not inlined.
                let mut xv = [_mm512_setzero_si512(); T];
                let mut xd = [_mm512_setzero_ps(); T];
                let mut corr = [_mm512_setzero_si512(); T];
                for t in 0..T {
                    let (x0, x1) = (q8[t].get_unchecked(b), q8[t].get_unchecked(b + 1));
                    xv[t] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load_q8(x0)), load_q8(x1));
                    xd[t] = halves(x0.d, x1.d);
                    corr[t] =
                        _mm512_mask_set1_epi32(_mm512_maskz_set1_epi32(0x0001, -8 * x0.qsum), 0x0100, -8 * x1.qsum);
                }
                for r in 0..R {
                    let p = w[r].as_ptr().add(18 * b);
                    let dw = halves(f16_at(p), f16_at(p.add(18)));
                    let v = _mm256_set_m128i(_mm_loadu_si128(p.add(20).cast()), _mm_loadu_si128(p.add(2).cast()));
                    let q = _mm512_permutexvar_epi64(dup, _mm512_castsi256_si512(v));
                    let q = _mm512_and_si512(_mm512_srlv_epi64(q, shift), m4);
                    for t in 0..T {
                        let i = _mm512_dpbusd_epi32(corr[t], q, xv[t]);
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dw, xd[t]), acc[r][t]);
                    }
                }
                b += 2;
            }
            let mut tail = [[_mm256_setzero_ps(); T]; R];
            if b < nb {
                let m4 = _mm_set1_epi8(0x0f);
                for r in 0..R {
                    let blk = w[r].as_ptr().add(18 * b);
                    let dw = f16_at(blk);
                    let qs = _mm_loadu_si128(blk.add(2).cast());
                    let q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(qs), m4), _mm_and_si128(qs, m4));
                    for t in 0..T {
                        let xb = q8[t].get_unchecked(b);
                        let i = dot32(q, load_q8(xb));
                        let i = _mm256_sub_epi32(i, _mm256_zextsi128_si256(_mm_cvtsi32_si128(8 * xb.qsum)));
                        tail[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(dw * xb.d), tail[r][t]);
                    }
                }
            }
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = _mm512_reduce_add_ps(acc[r][t]) + hsum8(tail[r][t]);
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use moestream_quant::{FloatType, decode_floats};

    /// The word-parallel Q4_K scale unpacking against the one-at-a-time reference, on random and extreme bytes.
    #[test]
    fn k4_scales_mins_match_scale_min_k4() {
        let mut state = 0x1234_5678_9abc_def1u64;
        for i in 0..10_000 {
            let mut b = [0u8; 12];
            for v in &mut b {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = match i {
                    0 => 0,
                    1 => 0xff,
                    _ => state as u8,
                };
            }
            let (sc, mn) = super::k4_scales_mins(b.as_ptr());
            let (want_sc, want_mn) = moestream_quant::ggml::scale_min_k4(&b);
            assert_eq!(sc.to_le_bytes(), want_sc, "scales of {b:?}");
            assert_eq!(mn.to_le_bytes(), want_mn, "mins of {b:?}");
        }
    }

    /// Both hand-written f16 decoders against `quant`'s, on every bit pattern (subnormals, infinities, NaNs).
    #[test]
    fn f16_decoders_match_quant_on_all_bit_patterns() {
        for h in 0..=u16::MAX {
            let mut want = [0f32];
            decode_floats(FloatType::F16, &h.to_le_bytes(), &mut want).expect("one f16");
            let same = |got: f32| got.to_bits() == want[0].to_bits() || (got.is_nan() && want[0].is_nan());
            assert!(same(super::avx2::half_to_f32(h)), "tail decoder, bits {h:#06x}");
            assert!(same(super::F16_TABLE[usize::from(h)]), "block-scale table, bits {h:#06x}");
            if super::has_avx2() {
                // SAFETY: AVX2/FMA/F16C detected just above.
                assert!(same(unsafe { super::avx2::f16(h) }), "block-scale decoder, bits {h:#06x}");
            }
        }
    }
}
