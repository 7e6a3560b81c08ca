//! Kernels for `Q4_0x16`, `Q4_Kx16` and `Q6_Kx16` weights (ggml `Q4_0` / `Q4_K` / `Q6_K` regrouped 16 rows at a
//! time, layouts in `moestream_quant::packed`): 16 rows × 1 token (decode), 16 rows × 4 tokens (K-form prefill) and
//! 16 rows × up to 16 tokens per AMX tile (`Q4_0x16` prefill).
//!
//! Why a layout of our own: in ggml's row-major `Q4_0` a row's block dot lands in SIMD lanes that must be summed
//! across, and each block scale is applied per (row, token) pair: ~8 multiply-adds per vector op. With 16 rows
//! interleaved 4 codes at a time, one `vpdpbusd` does 4 codes × 16 rows with one broadcast activation word, the 16
//! scales are one vector, and the same 64-byte chunks are an AMX `tdpbssd` B tile (16 columns × 4 codes): a tile
//! op is 16 rows × 16 tokens × 32 codes.
//!
//! Every kernel here computes, per (row, token), exactly this — the one order that makes them interchangeable bit
//! for bit, so prefill (AMX) equals decode (VNNI) equals the scalar reference:
//! ```text
//! acc = 0
//! for each 32-block b:  isum = Σ (q − 8)·x_q   (exact i32)
//!                       acc  = fma(f32(isum), f32(d_w) · d_x, acc)
//! ```
//!
//! `Q4_Kx16` kernels likewise compute, per (row, token), exactly this (ggml's `Q8_K` activation scheme: one `d_x`
//! per 256, integer block sums `qsum_j`), which is what makes them interchangeable:
//! ```text
//! acc = macc = 0
//! for each 256-super-block s:  S = Σ_j sc_j · Σ q·x_q     M = Σ_j mn_j · qsum_j   (exact i32, j = 0..8)
//!                              acc  = fma(f32(S), f32(d) · d_x, acc)
//!                              macc = fma(f32(M), f32(dmin) · d_x, macc)
//! result = acc − macc
//! ```
//! `Q6_Kx16` kernels compute, per (row, token) (the same `Q8_K` activation scheme; `X_j` is the sum of the 16
//! activation codes of sub-block `j`):
//! ```text
//! acc = 0
//! for each 256-super-block s:  S = Σ_j sc_j · (Σ q·x_q − 32·X_j)   (exact i32, j = 0..16, q = the 6-bit code)
//!                              acc = fma(f32(S), f32(d) · d_x, acc)
//! ```
//! Why a `Q4_K` layout of our own: in ggml's row-major blocks every 32-element sub-block needs its own scale
//! broadcast and lane shuffle per row (the row-major q8 kernel streams ~11 GB/s per core from cache, i.e. it is
//! compute-bound on this machine's ~10 GB/s per core); interleaved, one 64-byte load feeds 16 rows, the 6-bit
//! scales of 16 rows unpack in a few 32-bit lane ops, and one `vpmulld` applies 16 rows' sub-block scales.
//!
//! It owns arithmetic only; shapes, tasks and the choice of kernel live in `matmul`.

use moestream_quant::packed::{GROUP, GROUP_BLOCK, K_GROUP_BLOCK, Q6_GROUP_BLOCK};
use moestream_quant::{Encoding, FloatType, decode_floats};

use super::Q8Block;

/// The scalar reference: `out[i]` = row `i` of the 16-row group `g` (`nb` block columns) · one token's q8 blocks.
pub(crate) fn dot16_scalar(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP]) {
    let mut acc = [0f32; GROUP];
    let mut d = [0f32; GROUP];
    for (blk, xb) in g.chunks_exact(GROUP_BLOCK).zip(q8) {
        decode_floats(FloatType::F16, &blk[..2 * GROUP], &mut d).expect("16 f16 scales");
        let codes = &blk[2 * GROUP..];
        for (r, a) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for c in 0..4 {
                for i in 0..4 {
                    let q = codes[64 * c + 4 * r + i];
                    isum += (i32::from(q & 15) - 8) * i32::from(xb.qs[4 * c + i]);
                    isum += (i32::from(q >> 4) - 8) * i32::from(xb.qs[16 + 4 * c + i]);
                }
            }
            *a = (isum as f32).mul_add(d[r] * xb.d, *a);
        }
    }
    *out = acc;
}

/// Exact-f32 activations (no q8 table), either packed form (`enc`): dequantize a block (`Q4_0x16`) or
/// super-block (`Q4_Kx16`) column and dot per row in column order, the order of the scalar row-major reference, so
/// the two agree bit for bit. Only for completeness — packed weights are made for the q8 tables — so it favours
/// obviousness over speed.
pub(crate) fn dot16_f32(enc: Encoding, g: &[u8], x: &[f32], out: &mut [f32; GROUP]) {
    type Dequant = fn(&[u8], usize, &mut [f32]) -> Result<(), moestream_quant::QuantError>;
    let (elems, col_bytes, dequant): (usize, usize, Dequant) = match enc {
        Encoding::Q4Kx16 => (256, K_GROUP_BLOCK, moestream_quant::packed::dequantize_q4_kx16),
        Encoding::Q6Kx16 => (256, Q6_GROUP_BLOCK, moestream_quant::packed::dequantize_q6_kx16),
        _ => (32, GROUP_BLOCK, moestream_quant::packed::dequantize_q4_0x16),
    };
    let mut acc = [0f32; GROUP];
    let mut buf = [0f32; GROUP * 256];
    let vals = &mut buf[..GROUP * elems];
    for (col, xs) in g.chunks_exact(col_bytes).zip(x.chunks_exact(elems)) {
        dequant(col, elems, vals).expect("one whole column of a validated view");
        for (r, a) in acc.iter_mut().enumerate() {
            for (w, v) in vals[elems * r..elems * (r + 1)].iter().zip(xs) {
                *a += w * v;
            }
        }
    }
    *out = acc;
}

/// The `Q4_Kx16` scalar reference: `out[i]` = row `i` of the 16-row group `g` (`q8.len() / 8` super-block
/// columns) · one token's q8 blocks (8 per super-block, one shared `d`).
pub(crate) fn dot16k_scalar(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP]) {
    let (mut acc, mut macc) = ([0f32; GROUP], [0f32; GROUP]);
    let (mut d, mut dmin) = ([0f32; GROUP], [0f32; GROUP]);
    for (col, xs) in g.chunks_exact(K_GROUP_BLOCK).zip(q8.chunks_exact(8)) {
        decode_floats(FloatType::F16, &col[..2 * GROUP], &mut d).expect("16 f16 d");
        decode_floats(FloatType::F16, &col[2 * GROUP..4 * GROUP], &mut dmin).expect("16 f16 dmin");
        let dx = xs[0].d;
        for r in 0..GROUP {
            let mut packed = [0u8; 12];
            for w in 0..3 {
                packed[4 * w..4 * w + 4].copy_from_slice(&col[64 + 64 * w + 4 * r..64 + 64 * w + 4 * r + 4]);
            }
            let (sc, mn) = moestream_quant::ggml::scale_min_k4(&packed);
            let (mut sum, mut mins) = (0i32, 0i32);
            for (j, xb) in xs.iter().enumerate() {
                let sub = &col[256 + 256 * j..512 + 256 * j];
                let mut isum = 0i32;
                for c in 0..4 {
                    for i in 0..4 {
                        let q = sub[64 * c + 4 * r + i];
                        isum += i32::from(q & 15) * i32::from(xb.qs[4 * c + i]);
                        isum += i32::from(q >> 4) * i32::from(xb.qs[16 + 4 * c + i]);
                    }
                }
                sum += i32::from(sc[j]) * isum;
                mins += i32::from(mn[j]) * xb.qsum;
            }
            acc[r] = (sum as f32).mul_add(d[r] * dx, acc[r]);
            macc[r] = (mins as f32).mul_add(dmin[r] * dx, macc[r]);
        }
    }
    for (o, (a, m)) in out.iter_mut().zip(acc.iter().zip(&macc)) {
        *o = a - m;
    }
}

/// The `Q6_Kx16` scalar reference: `out[i]` = row `i` of the 16-row group `g` (`q8.len() / 8` super-block
/// columns) · one token's q8 blocks (8 per super-block, one shared `d`).
pub(crate) fn dot16q6_scalar(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP]) {
    let mut acc = [0f32; GROUP];
    let mut d = [0f32; GROUP];
    for (col, xs) in g.chunks_exact(Q6_GROUP_BLOCK).zip(q8.chunks_exact(8)) {
        decode_floats(FloatType::F16, &col[..2 * GROUP], &mut d).expect("16 f16 d");
        let dx = xs[0].d;
        for r in 0..GROUP {
            let mut sum = 0i32;
            for (b, xb) in xs.iter().enumerate() {
                let blk = &col[288 + 384 * b..288 + 384 * (b + 1)];
                for h in 0..2 {
                    let (mut qx, mut xsum) = (0i32, 0i32);
                    for c in 0..4 {
                        for i in 0..4 {
                            let lo4 = (blk[64 * c + 4 * r + i] >> (4 * h)) & 15;
                            let hi2 = (blk[256 + 64 * h + 4 * r + i] >> (2 * c)) & 3;
                            let x = i32::from(xb.qs[16 * h + 4 * c + i]);
                            qx += i32::from(lo4 | (hi2 << 4)) * x;
                            xsum += x;
                        }
                    }
                    let sc = i32::from(col[32 + 16 * (2 * b + h) + r] as i8);
                    sum += sc * (qx - 32 * xsum);
                }
            }
            acc[r] = (sum as f32).mul_add(d[r] * dx, acc[r]);
        }
    }
    *out = acc;
}

/// One AMX A tile's worth of activations: 16 tokens' codes of one 32-block, rows 32 bytes apart and 64-byte
/// aligned (a tile load from a token-major `Q8Block` array reads 16 misaligned rows 44·nb bytes apart, measured
/// at twice the cost of the tile op itself), and their 16 scales. Rows past the last token are zero.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct ATile {
    qs: [[i8; 32]; GROUP],
    d: [f32; GROUP],
}

#[cfg(target_arch = "x86_64")]
impl ATile {
    pub(crate) const ZERO: ATile = ATile { qs: [[0; 32]; GROUP], d: [0.0; GROUP] };
}

/// Regroups `n` tokens' q8 blocks (`n × nb`, token-major) into `ceil(n/16) × nb` tiles, tile-major then block.
/// `out` holds at least that many tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) fn pack_tiles(q8: &[Q8Block], n: usize, nb: usize, out: &mut [ATile]) {
    for (tt, tiles) in out.chunks_exact_mut(nb).take(n.div_ceil(GROUP)).enumerate() {
        for (b, tile) in tiles.iter_mut().enumerate() {
            for i in 0..GROUP {
                let t = tt * GROUP + i;
                let (qs, d) = if t < n { (q8[t * nb + b].qs, q8[t * nb + b].d) } else { ([0; 32], 0.0) };
                (tile.qs[i], tile.d[i]) = (qs, d);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{ATile, GROUP, GROUP_BLOCK, K_GROUP_BLOCK, Q6_GROUP_BLOCK, Q8Block};

    /// Block columns ahead that [`dot16`] prefetches into L1 (4.6 KiB). On the 16-layer 30B-shaped decode A/B, with
    /// 128 KiB tasks: 8 → 12 gave +11% (median of 6 alternating pairs); 12, 16 and 24 were within noise of each
    /// other.
    const PREFETCH: usize = 16;
    /// Block columns ahead that [`dot16`] also prefetches into L2 only (13.5 KiB): one core streams ~10 GB/s here,
    /// latency-bound, and the L1 prefetches alone keep too few lines in flight (L1 has 16 fill buffers, L2 tracks
    /// ~48 misses). `examples/stream.rs`, 3 alternating rounds: L1 only 17.3–20.2 GB/s; plus L2 at 32, 48, 64
    /// columns 18.0–21.8, 20.0–21.2, 20.2–21.1; at 96 13.8–20.4 (past the next group, often the wrong bytes).
    const FAR_PREFETCH: usize = 48;

    /// AVX-512 VNNI: 16 rows × one token. Same contract and result as [`super::dot16_scalar`]. `next` is where
    /// the caller reads next (the following group of its task, or the next expert's): the prefetch runs on into
    /// it instead of past this group's end, so a task's stream has no cold start at each group. It is only a
    /// prefetch hint: any address is safe, a wrong one only wastes bandwidth.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI; `g` holds `q8.len()` block columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(crate) unsafe fn dot16(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP], next: *const u8) {
        let mut res = [[0f32; GROUP]; 1];
        // SAFETY: guaranteed by the caller.
        unsafe { dot16_t::<1>(g, [q8], &mut res, next) };
        *out = res[0];
    }

    /// [`dot16`] for 4 tokens at once (prefill without AMX): each 64-byte code chunk is loaded and split into
    /// nibbles once for the 4 tokens; per (row, token) the arithmetic is unchanged, so the results equal 4
    /// [`dot16`] calls bit for bit.
    ///
    /// # Safety
    /// As [`dot16`], for each of the 4 tokens' blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(crate) unsafe fn dot16x4(g: &[u8], q8: [&[Q8Block]; 4], out: &mut [[f32; GROUP]; 4]) {
        // SAFETY: guaranteed by the caller; the null `next` is never prefetched for T > 1.
        unsafe { dot16_t::<4>(g, q8, out, std::ptr::null()) };
    }

    /// The `Q4_0x16` VNNI kernel over T tokens. Two accumulator chains per token (low and high nibbles; integers,
    /// so the split does not change the sum): with one, each token's 8 `vpdpbusd` per block ran back to back on one
    /// register and the 4-token kernel waited on their latency (perf annotate, Zen 4).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn dot16_t<const T: usize>(g: &[u8], q8: [&[Q8Block]; T], out: &mut [[f32; GROUP]; T], next: *const u8) {
        let nb = q8[0].len();
        debug_assert!(g.len() >= nb * GROUP_BLOCK && q8.iter().all(|x| x.len() == nb));
        let low = _mm512_set1_epi8(15);
        let mut acc = [_mm512_setzero_ps(); T];
        let p = g.as_ptr();
        for b in 0..nb {
            // SAFETY: block column b of the group is in bounds (the caller's contract); block b of every token.
            let (blk, xb) = unsafe { (p.add(b * GROUP_BLOCK), q8.map(|x| x.get_unchecked(b))) };
            if T == 1 {
                // Decode streams each group from DRAM once: ask for the bytes PREFETCH columns ahead, running on
                // into `next` near the group's end. A prefetch never faults.
                let ahead = column_ahead(p, next, b, nb, PREFETCH, GROUP_BLOCK);
                for l in 0..5 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l).cast());
                }
                let far = column_ahead(p, next, b, nb, FAR_PREFETCH, GROUP_BLOCK);
                for l in 0..5 {
                    _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(64 * l).cast());
                }
            }
            let mut lo_acc = xb.map(|x| _mm512_set1_epi32(-8 * x.qsum));
            let mut hi_acc = [_mm512_setzero_si512(); T];
            for c in 0..4 {
                // SAFETY: chunk c of the block column.
                let w = unsafe { _mm512_loadu_si512(blk.add(32 + 64 * c).cast()) };
                let lo = _mm512_and_si512(w, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
                for ((sl, sh), x) in lo_acc.iter_mut().zip(&mut hi_acc).zip(&xb) {
                    // SAFETY: words c and 4 + c of the token's 32 code bytes.
                    let (xl, xh) = unsafe {
                        let x = x.qs.as_ptr().cast::<i32>();
                        (x.add(c).read_unaligned(), x.add(4 + c).read_unaligned())
                    };
                    *sl = _mm512_dpbusd_epi32(*sl, lo, _mm512_set1_epi32(xl));
                    *sh = _mm512_dpbusd_epi32(*sh, hi, _mm512_set1_epi32(xh));
                }
            }
            // SAFETY: the block column starts with 16 f16 scales.
            let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.cast()) });
            for (((a, sl), sh), x) in acc.iter_mut().zip(lo_acc).zip(hi_acc).zip(&xb) {
                let isum = _mm512_add_epi32(sl, sh);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(x.d)), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: `o` is 16 f32.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
        }
    }

    /// AVX2 (no VNNI): `Q4_0x16`, 16 rows × one token, as two 8-row halves of 256 bits. Same contract and result
    /// as [`super::dot16_scalar`]; `next` as for [`dot16`]. `vpdpbusd` (4 codes × one activation word per row lane)
    /// is done exactly with `maddubs` (nibble × activation byte, pairs summed: |·| ≤ 2·15·128) summed in i16 over
    /// the block's 4 chunks and both nibbles (|·| ≤ 8·3840 = 30720 < 2¹⁵, no saturation), then one `madd` by 1
    /// into i32 per block and half; per row that is the exact block sum of the scalar reference, then the same
    /// `fma(f32(isum), d_w·d_x, acc)`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `g` holds `q8.len()` block columns.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot16_avx2(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP], next: *const u8) {
        let nb = q8.len();
        debug_assert!(g.len() >= nb * GROUP_BLOCK);
        let low = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        let p = g.as_ptr();
        for (b, xb) in q8.iter().enumerate() {
            // SAFETY: block column b of the group is in bounds (the caller's contract).
            let blk = unsafe { p.add(b * GROUP_BLOCK) };
            // As in `dot16`: the next columns in L1, further ones in L2, running on into `next`. Never faults.
            let ahead = column_ahead(p, next, b, nb, PREFETCH, GROUP_BLOCK);
            let far = column_ahead(p, next, b, nb, FAR_PREFETCH, GROUP_BLOCK);
            for l in 0..5 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l).cast());
                _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(64 * l).cast());
            }
            let x = xb.qs.as_ptr().cast::<i32>();
            let mut s16 = [_mm256_setzero_si256(); 2];
            for c in 0..4 {
                // SAFETY: words c and 4 + c of the block's 32 code bytes.
                let (xl, xh) = unsafe {
                    (_mm256_set1_epi32(x.add(c).read_unaligned()), _mm256_set1_epi32(x.add(4 + c).read_unaligned()))
                };
                for (h, s) in s16.iter_mut().enumerate() {
                    // SAFETY: chunk c of the block column, rows 8h..8h+8 (4 code bytes each).
                    let w = unsafe { _mm256_loadu_si256(blk.add(32 + 64 * c + 32 * h).cast()) };
                    let a = _mm256_maddubs_epi16(_mm256_and_si256(w, low), xl);
                    let z = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16::<4>(w), low), xh);
                    *s = _mm256_add_epi16(*s, _mm256_add_epi16(a, z));
                }
            }
            let (corr, dx) = (_mm256_set1_epi32(-8 * xb.qsum), _mm256_set1_ps(xb.d));
            for (h, (a, s)) in acc.iter_mut().zip(s16).enumerate() {
                // SAFETY: the block column starts with 16 f16 scales; rows 8h..8h+8.
                let dw = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())) };
                let isum = _mm256_add_epi32(_mm256_madd_epi16(s, ones), corr);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx), *a);
            }
        }
        // SAFETY: `out` is 16 f32.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        }
    }

    /// [`dot16_avx2`] for 4 tokens at once (prefill): each code vector is unpacked once for the 4; per (row,
    /// token) the arithmetic is unchanged, so the results equal 4 [`dot16_avx2`] calls bit for bit.
    ///
    /// # Safety
    /// As [`dot16_avx2`], for each of the 4 tokens' blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot16x4_avx2(g: &[u8], q8: [&[Q8Block]; 4], out: &mut [[f32; GROUP]; 4]) {
        debug_assert!(g.len() >= q8[0].len() * GROUP_BLOCK);
        for h in 0..2 {
            // SAFETY: guaranteed by the caller.
            unsafe { dot8x4_avx2(g, h, q8, out) };
        }
    }

    /// Rows `8h..8h+8` of [`dot16x4_avx2`]. One half at a time because both at once need 8 f32 and 8 i16
    /// accumulators besides the codes and activations: more than AVX2's 16 registers, and the compiler spilled to
    /// the stack in the inner loop (`gemm32` bench, AMD EPYC Zen 3: 48 → 53–63 GB/s median from this alone).
    /// The second half re-reads the group, now from L1/L2. Per (row, token) the arithmetic is [`dot16_avx2`]'s:
    /// exact i16 sums, one `madd`, the same `fma`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8x4_avx2(g: &[u8], h: usize, q8: [&[Q8Block]; 4], out: &mut [[f32; GROUP]; 4]) {
        let nb = q8[0].len();
        let low = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let p = g.as_ptr();
        for b in 0..nb {
            // SAFETY: block column b of the group is in bounds (the caller's contract).
            let blk = unsafe { p.add(b * GROUP_BLOCK) };
            let mut s16 = [_mm256_setzero_si256(); 4];
            for c in 0..4 {
                // SAFETY: chunk c of the block column, rows 8h..8h+8 (4 code bytes each).
                let w = unsafe { _mm256_loadu_si256(blk.add(32 + 64 * c + 32 * h).cast()) };
                let lo = _mm256_and_si256(w, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), low);
                for (s, x) in s16.iter_mut().zip(&q8) {
                    // SAFETY: block b of this token exists (every q8[t].len() == nb); words c and 4 + c of its codes.
                    let (xl, xh) = unsafe {
                        let x = x.get_unchecked(b).qs.as_ptr().cast::<i32>();
                        (_mm256_set1_epi32(x.add(c).read_unaligned()), _mm256_set1_epi32(x.add(4 + c).read_unaligned()))
                    };
                    let a = _mm256_maddubs_epi16(lo, xl);
                    let z = _mm256_maddubs_epi16(hi, xh);
                    *s = _mm256_add_epi16(*s, _mm256_add_epi16(a, z));
                }
            }
            // SAFETY: the block column starts with 16 f16 scales; rows 8h..8h+8.
            let dw = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())) };
            for ((a, s), x) in acc.iter_mut().zip(&s16).zip(&q8) {
                // SAFETY: as above.
                let xb = unsafe { x.get_unchecked(b) };
                // Σ(q − 8)·x = Σq·x − 8·qsum: a broadcast load and a shift, fewer ops than splatting −8·qsum.
                let eight = _mm256_slli_epi32::<3>(_mm256_set1_epi32(xb.qsum));
                let isum = _mm256_sub_epi32(_mm256_madd_epi16(*s, ones), eight);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(xb.d)), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: `o` is 16 f32; lanes 8h..8h+8.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), a) };
        }
    }

    /// Where column `i + dist` of a group of `n` columns of `col_bytes` starting at `base` is, running on into
    /// `next` (where the caller reads after this group) past the group's end. Prefetch addresses only: never
    /// dereferenced, so `wrapping_add` and any address are fine.
    #[inline]
    fn column_ahead(base: *const u8, next: *const u8, i: usize, n: usize, dist: usize, col_bytes: usize) -> *const u8 {
        if i + dist < n {
            base.wrapping_add((i + dist) * col_bytes)
        } else {
            next.wrapping_add((i + dist - n) * col_bytes)
        }
    }

    /// `Q4_Kx16` super-block columns ahead that [`dot16k`] prefetches into L1 and into L2 only: 4.5 and 13.5 KiB, as
    /// [`dot16`]'s [`PREFETCH`] and [`FAR_PREFETCH`].
    const K_PREFETCH: usize = 2;
    const K_FAR_PREFETCH: usize = 6;
    /// The same for `Q6_Kx16` (3360-byte columns): 3.3 and 13.1 KiB.
    const Q6_PREFETCH: usize = 1;
    const Q6_FAR_PREFETCH: usize = 4;

    /// AVX-512 VNNI: `Q4_Kx16`, 16 rows × one token. Same contract and result as [`super::dot16k_scalar`]; `next`
    /// as for [`dot16`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI; `g` holds `q8.len() / 8` super-block columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(crate) unsafe fn dot16k(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP], next: *const u8) {
        let mut res = [[0f32; GROUP]; 1];
        // SAFETY: guaranteed by the caller.
        unsafe { dot16k_t::<1>(g, [q8], &mut res, next) };
        *out = res[0];
    }

    /// [`dot16k`] for 4 tokens at once (prefill): each code vector is unpacked once for the 4, the per-(row, token)
    /// arithmetic is unchanged, so the results equal 4 [`dot16k`] calls bit for bit.
    ///
    /// # Safety
    /// As [`dot16k`], for each of the 4 tokens' blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(crate) unsafe fn dot16k4(g: &[u8], q8: [&[Q8Block]; 4], out: &mut [[f32; GROUP]; 4]) {
        // SAFETY: guaranteed by the caller; the null `next` is never prefetched for T > 1.
        unsafe { dot16k_t::<4>(g, q8, out, std::ptr::null()) };
    }

    /// The `Q4_Kx16` kernel over T tokens. Per super-block column: ggml's 32-bit scale/min unpacking on 16 rows'
    /// words at once; the mins term as 4 `vpdpwssd` (mins paired as i16, `qsum` pairs broadcast); per sub-block 8
    /// `vpdpbusd` (low and high nibbles, two chains) and one `vpmulld` by the 16 rows' scales.
    // Index loops: the indices are the layout (sub-block, chunk and token numbers), not just positions.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn dot16k_t<const T: usize>(g: &[u8], q8: [&[Q8Block]; T], out: &mut [[f32; GROUP]; T], next: *const u8) {
        let nsb = q8[0].len() / 8;
        debug_assert!(g.len() >= nsb * K_GROUP_BLOCK);
        let low = _mm512_set1_epi8(15);
        let (km1, km2, km3) =
            (_mm512_set1_epi32(0x3f3f_3f3f), _mm512_set1_epi32(0x0f0f_0f0f), _mm512_set1_epi32(0x0303_0303));
        let (byte, pair16) = (_mm512_set1_epi32(0xff), _mm512_set1_epi32(0x00ff_00ff));
        let mut acc = [_mm512_setzero_ps(); T];
        let mut macc = [_mm512_setzero_ps(); T];
        let p = g.as_ptr();
        for s in 0..nsb {
            // SAFETY: super-block column s of the group is in bounds (the caller's contract).
            let col = unsafe { p.add(s * K_GROUP_BLOCK) };
            // Decode streams the group once: 9 steps (header, 8 sub-blocks) of 256 bytes each ask for the same
            // 256 bytes K_PREFETCH columns ahead, running on into `next` at the group's end. Never faults.
            let ahead = column_ahead(p, next, s, nsb, K_PREFETCH, K_GROUP_BLOCK);
            let far = column_ahead(p, next, s, nsb, K_FAR_PREFETCH, K_GROUP_BLOCK);
            let prefetch = |h: usize| {
                if T == 1 {
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(256 * h + 64 * l).cast());
                        _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(256 * h + 64 * l).cast());
                    }
                }
            };
            prefetch(0);
            // SAFETY (loads of this block): the 256-byte header of column s.
            let (d, dmin, w0, w1, w2) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(col.cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(col.add(32).cast())),
                    _mm512_loadu_si512(col.add(64).cast()),
                    _mm512_loadu_si512(col.add(128).cast()),
                    _mm512_loadu_si512(col.add(192).cast()),
                )
            };
            // ggml's `utmp` unpacking, 16 rows per operation: scales 0–3 / 4–7, mins 0–3 / 4–7, one byte each.
            let sc = [
                _mm512_and_si512(w0, km1),
                _mm512_or_si512(
                    _mm512_and_si512(w2, km2),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(w0), km3)),
                ),
            ];
            let m_lo = _mm512_and_si512(w1, km1);
            let m_hi = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<4>(w2), km2),
                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(w1), km3)),
            );
            // Mins as i16 pairs (0, 2), (1, 3), (4, 6), (5, 7) per row.
            let mins = [
                _mm512_and_si512(m_lo, pair16),
                _mm512_and_si512(_mm512_srli_epi32::<8>(m_lo), pair16),
                _mm512_and_si512(m_hi, pair16),
                _mm512_and_si512(_mm512_srli_epi32::<8>(m_hi), pair16),
            ];
            let mut isc = [_mm512_setzero_si512(); T];
            let mut imn = [_mm512_setzero_si512(); T];
            let mut xs = [std::ptr::null::<Q8Block>(); T];
            for t in 0..T {
                // SAFETY: blocks 8s..8s+8 of token t exist (q8[t].len() == 8·nsb, the caller's contract).
                xs[t] = unsafe { q8[t].as_ptr().add(8 * s) };
                // SAFETY: as above.
                let qs = |j: usize| unsafe { (*xs[t].add(j)).qsum };
                let pair = |a: usize, b: usize| ((qs(a) as u32 & 0xffff) | ((qs(b) as u32) << 16)) as i32;
                for (m, (a, b)) in mins.iter().zip([(0, 2), (1, 3), (4, 6), (5, 7)]) {
                    imn[t] = _mm512_dpwssd_epi32(imn[t], *m, _mm512_set1_epi32(pair(a, b)));
                }
            }
            for j in 0..8 {
                prefetch(1 + j);
                let scj = match j % 4 {
                    0 => _mm512_and_si512(sc[j / 4], byte),
                    1 => _mm512_and_si512(_mm512_srli_epi32::<8>(sc[j / 4]), byte),
                    2 => _mm512_and_si512(_mm512_srli_epi32::<16>(sc[j / 4]), byte),
                    _ => _mm512_srli_epi32::<24>(sc[j / 4]),
                };
                // SAFETY: sub-block j of column s.
                let sub = unsafe { col.add(256 + 256 * j) };
                let mut lo_acc = [_mm512_setzero_si512(); T];
                let mut hi_acc = [_mm512_setzero_si512(); T];
                for c in 0..4 {
                    // SAFETY: chunk c of sub-block j.
                    let w = unsafe { _mm512_loadu_si512(sub.add(64 * c).cast()) };
                    let lo = _mm512_and_si512(w, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                    for t in 0..T {
                        // SAFETY: block 8s + j of token t; words c and 4 + c of its 32 code bytes.
                        let (xl, xh) = unsafe {
                            let x = (*xs[t].add(j)).qs.as_ptr().cast::<i32>();
                            (x.add(c).read_unaligned(), x.add(4 + c).read_unaligned())
                        };
                        lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, _mm512_set1_epi32(xl));
                        hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], hi, _mm512_set1_epi32(xh));
                    }
                }
                for t in 0..T {
                    isc[t] = _mm512_add_epi32(isc[t], _mm512_mullo_epi32(_mm512_add_epi32(lo_acc[t], hi_acc[t]), scj));
                }
            }
            for t in 0..T {
                // SAFETY: block 8s of token t, as above.
                let dx = _mm512_set1_ps(unsafe { (*xs[t]).d });
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isc[t]), _mm512_mul_ps(d, dx), acc[t]);
                macc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imn[t]), _mm512_mul_ps(dmin, dx), macc[t]);
            }
        }
        for t in 0..T {
            // SAFETY: `out[t]` is 16 f32.
            unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_sub_ps(acc[t], macc[t])) };
        }
    }

    /// AVX-512 VNNI `Q6_Kx16`: 16 rows × one token. Same contract and result as [`super::dot16q6_scalar`]; `next`
    /// as for [`dot16`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI; `g` holds `q8.len() / 8` super-block columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(crate) unsafe fn dot16q6(g: &[u8], q8: &[Q8Block], out: &mut [f32; GROUP], next: *const u8) {
        let mut res = [[0f32; GROUP]; 1];
        // SAFETY: guaranteed by the caller.
        unsafe { dot16q6_t::<1>(g, [q8], &mut res, next) };
        *out = res[0];
    }

    /// [`dot16q6`] for 4 tokens at once (prefill), bit-identical per token.
    ///
    /// # Safety
    /// As [`dot16q6`], for each of the 4 tokens' blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(crate) unsafe fn dot16q6x4(g: &[u8], q8: [&[Q8Block]; 4], out: &mut [[f32; GROUP]; 4]) {
        // SAFETY: guaranteed by the caller; the null `next` is never prefetched for T > 1.
        unsafe { dot16q6_t::<4>(g, q8, out, std::ptr::null()) };
    }

    /// The `Q6_Kx16` kernel over T tokens. Per 32-block: 4 chunks, each one 64-byte load of low nibbles and the
    /// chunk's 2 high bits of 16 rows from two shared words (shifted into bits 4–5 and masked), 2 `vpdpbusd` per
    /// token (elements `4c..` and `16 + 4c..`: one accumulator per 16-element sub-block); then per sub-block the
    /// `−32·X_j` offset and one `vpmulld` by the 16 rows' scales.
    // Index loops: the indices are the layout (block, chunk and token numbers), not just positions.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn dot16q6_t<const T: usize>(g: &[u8], q8: [&[Q8Block]; T], out: &mut [[f32; GROUP]; T], next: *const u8) {
        let nsb = q8[0].len() / 8;
        debug_assert!(g.len() >= nsb * Q6_GROUP_BLOCK);
        let (low, two) = (_mm512_set1_epi8(15), _mm512_set1_epi8(0x30));
        let mut acc = [_mm512_setzero_ps(); T];
        let p = g.as_ptr();
        for s in 0..nsb {
            // SAFETY: super-block column s of the group is in bounds (the caller's contract).
            let col = unsafe { p.add(s * Q6_GROUP_BLOCK) };
            // As `dot16k_t`: each of 9 steps (header, 8 blocks) asks for the same span Q6_PREFETCH columns ahead
            // (and Q6_FAR_PREFETCH into L2), running on into `next`. Never faults.
            let ahead = column_ahead(p, next, s, nsb, Q6_PREFETCH, Q6_GROUP_BLOCK);
            let far = column_ahead(p, next, s, nsb, Q6_FAR_PREFETCH, Q6_GROUP_BLOCK);
            let prefetch = |at: usize, lines: usize| {
                if T == 1 {
                    for l in 0..lines {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(at + 64 * l).cast());
                        _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(at + 64 * l).cast());
                    }
                }
            };
            prefetch(0, 5);
            // SAFETY: the 16 f16 d at the column start.
            let d = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(col.cast())) };
            let mut isc = [_mm512_setzero_si512(); T];
            for b in 0..8 {
                prefetch(288 + 384 * b, 6);
                // SAFETY: block b of column s and its two sub-blocks' scale rows.
                let (blk, sc) = unsafe {
                    let sc = |j: usize| _mm512_cvtepi8_epi32(_mm_loadu_si128(col.add(32 + 16 * j).cast()));
                    (col.add(288 + 384 * b), [sc(2 * b), sc(2 * b + 1)])
                };
                // SAFETY: the two high-bit words of block b.
                let (qh0, qh1) =
                    unsafe { (_mm512_loadu_si512(blk.add(256).cast()), _mm512_loadu_si512(blk.add(320).cast())) };
                let mut lo_acc = [_mm512_setzero_si512(); T];
                let mut hi_acc = [_mm512_setzero_si512(); T];
                for c in 0..4 {
                    // Bits 2c..2c+2 of each byte to bits 4..6 (16-bit lane shifts: the masked bits stay in their
                    // own byte for shifts of at most 4).
                    let up = |v: __m512i| match c {
                        0 => _mm512_slli_epi16::<4>(v),
                        1 => _mm512_slli_epi16::<2>(v),
                        2 => v,
                        _ => _mm512_srli_epi16::<2>(v),
                    };
                    // SAFETY: chunk c of block b.
                    let w = unsafe { _mm512_loadu_si512(blk.add(64 * c).cast()) };
                    let lo = _mm512_or_si512(_mm512_and_si512(w, low), _mm512_and_si512(up(qh0), two));
                    let hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(w), low),
                        _mm512_and_si512(up(qh1), two),
                    );
                    for t in 0..T {
                        // SAFETY: block 8s + b of token t; words c and 4 + c of its 32 code bytes.
                        let (xl, xh) = unsafe {
                            let x = q8[t].as_ptr().add(8 * s + b);
                            let x = (*x).qs.as_ptr().cast::<i32>();
                            (x.add(c).read_unaligned(), x.add(4 + c).read_unaligned())
                        };
                        lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, _mm512_set1_epi32(xl));
                        hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], hi, _mm512_set1_epi32(xh));
                    }
                }
                for t in 0..T {
                    // SAFETY: block 8s + b of token t.
                    let xb = unsafe { &*q8[t].as_ptr().add(8 * s + b) };
                    // X of the first 16 codes: unsigned byte sums of (x + 128), minus 16·128.
                    // SAFETY: 16 of the block's 32 code bytes.
                    let v = unsafe { _mm_loadu_si128(xb.qs.as_ptr().cast()) };
                    let sad = _mm_sad_epu8(_mm_xor_si128(v, _mm_set1_epi8(-128)), _mm_setzero_si128());
                    let x_lo = _mm_cvtsi128_si32(sad) + _mm_extract_epi16::<4>(sad) - 16 * 128;
                    let x_hi = xb.qsum - x_lo;
                    let lo = _mm512_sub_epi32(lo_acc[t], _mm512_set1_epi32(32 * x_lo));
                    let hi = _mm512_sub_epi32(hi_acc[t], _mm512_set1_epi32(32 * x_hi));
                    isc[t] = _mm512_add_epi32(
                        isc[t],
                        _mm512_add_epi32(_mm512_mullo_epi32(lo, sc[0]), _mm512_mullo_epi32(hi, sc[1])),
                    );
                }
            }
            for t in 0..T {
                // SAFETY: block 8s of token t.
                let dx = _mm512_set1_ps(unsafe { (*q8[t].as_ptr().add(8 * s)).d });
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isc[t]), _mm512_mul_ps(d, dx), acc[t]);
            }
        }
        for t in 0..T {
            // SAFETY: `out[t]` is 16 f32.
            unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]) };
        }
    }

    /// Whether AMX-INT8 tiles can be used: the CPU has them and the kernel granted this process the tile state
    /// (Linux needs `ARCH_REQ_XCOMP_PERM` once per process before any thread touches a tile register).
    pub(crate) fn has_amx() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var_os("MOESTREAM_NO_AMX").is_some() || !super::super::x86::has_avx512_vnni() {
                return false;
            }
            // CPUID.(7,0).EDX: bit 24 AMX-TILE, bit 25 AMX-INT8.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (3 << 24) != 3 << 24 {
                return false;
            }
            request_tile_permission()
        })
    }

    #[cfg(target_os = "linux")]
    fn request_tile_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; it only changes which register state the process may use.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_permission() -> bool {
        false
    }

    /// The 64-byte tile configuration, palette 1, two sets used alternately by consecutive blocks (so one block's
    /// tile op runs while the previous block's sums are scaled): tmm0/tmm3 = C (16 tokens × 16 i32), tmm1/tmm4 = A
    /// (16 tokens × 32 codes), tmm2/tmm5 = B (8 rows of 16 columns × 4 codes).
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    const CFG: TileCfg = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let shapes = [(64u16, 16u8), (32, 16), (64, 8)];
        let mut i = 0;
        while i < 6 {
            let (colsb, rows) = shapes[i % 3];
            c[16 + 2 * i] = colsb as u8;
            c[17 + 2 * i] = (colsb >> 8) as u8;
            c[48 + i] = rows;
            i += 1;
        }
        TileCfg(c)
    };

    /// Loads the tile configuration [`gemm16`] expects. Once per task, before its first `gemm16`.
    ///
    /// # Safety
    /// [`has_amx`] returned true.
    pub(crate) unsafe fn configure() {
        // SAFETY: a valid palette-1 configuration; the process holds the tile permission (`has_amx`).
        unsafe { asm!("ldtilecfg [{0}]", in(reg) CFG.0.as_ptr(), options(nostack, readonly)) };
    }

    #[repr(C, align(64))]
    struct Buf<const N: usize>([u8; N]);

    /// Codes of block column `blk` as a signed B tile (`q − 8`): chunk c's low nibbles are tile row c, its high
    /// nibbles row 4 + c.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn unpack_b(blk: *const u8, out: *mut u8) {
        let low = _mm512_set1_epi8(15);
        let eight = _mm512_set1_epi8(8);
        for c in 0..4 {
            // SAFETY: chunk c of the column; rows c and 4 + c of the 512-byte tile buffer (caller's contract).
            unsafe {
                let w = _mm512_loadu_si512(blk.add(32 + 64 * c).cast());
                let lo = _mm512_sub_epi8(_mm512_and_si512(w, low), eight);
                let hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(w, 4), low), eight);
                _mm512_store_si512(out.add(64 * c).cast(), lo);
                _mm512_store_si512(out.add(64 * (4 + c)).cast(), hi);
            }
        }
    }

    /// AMX: 16 rows of group `g` (`nb` block columns) × `n` tokens given as [`ATile`]s (`ceil(n/16) × nb`, from
    /// `pack_tiles`). Writes `out[t·ld .. t·ld + 16]` for each token `t < n`. Bit-identical per (row, token) to
    /// [`super::dot16_scalar`]: the tile op yields each block's exact integer sum, and the scale is applied per
    /// block in the same order.
    ///
    /// # Safety
    /// [`has_amx`] returned true and [`configure`] ran on this thread since its last [`release`]; `g` holds `nb`
    /// block columns; `tiles` holds `ceil(n/16)·nb` tiles; `out` may be written at `t·ld + i` for `t < n`,
    /// `i < 16`, and nobody else touches those floats during the call (other tasks write the floats in between,
    /// which is why this is a pointer and not a slice).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(crate) unsafe fn gemm16(g: &[u8], nb: usize, tiles: &[ATile], n: usize, out: *mut f32, ld: usize) {
        debug_assert!(g.len() >= nb * GROUP_BLOCK && tiles.len() >= n.div_ceil(GROUP) * nb);
        // B tiles are unpacked a chunk of columns ahead of their tile loads: a tile load right after the vector
        // stores that wrote its buffer waits for them to reach L1 (measured: most of the kernel's time).
        const CHUNK: usize = 64;
        let mut bbuf = Buf::<{ 512 * CHUNK }>([0; 512 * CHUNK]);
        let mut cbuf = [Buf::<1024>([0; 1024]), Buf::<1024>([0; 1024])];
        let gp = g.as_ptr();
        for c0 in (0..nb).step_by(CHUNK) {
            let cn = CHUNK.min(nb - c0);
            for j in 0..cn {
                // SAFETY: column c0 + j < nb of the group; slot j of the chunk buffer.
                unsafe { unpack_b(gp.add((c0 + j) * GROUP_BLOCK), bbuf.0.as_mut_ptr().add(512 * j)) };
            }
            for (tt, row) in tiles.chunks_exact(nb).take(n.div_ceil(GROUP)).enumerate() {
                let live = (n - tt * GROUP).min(GROUP);
                // Issue column c0 + j's tile op into set j % 2 (not stored yet).
                // SAFETY (both closures' asm): A is a whole aligned tile of `row`, B one of the chunk's unpacked
                // tiles, the shapes are the configured ones.
                let issue = |j: usize| unsafe {
                    let bb = bbuf.0.as_ptr().add(512 * j);
                    let a = row[c0 + j].qs.as_ptr();
                    if j.is_multiple_of(2) {
                        asm!("tilezero tmm0", "tileloadd tmm1, [{a} + {sa}*1]", "tileloadd tmm2, [{b} + {sb}*1]",
                            "tdpbssd tmm0, tmm1, tmm2", a = in(reg) a, sa = in(reg) 32usize, b = in(reg) bb,
                            sb = in(reg) 64usize, options(nostack));
                    } else {
                        asm!("tilezero tmm3", "tileloadd tmm4, [{a} + {sa}*1]", "tileloadd tmm5, [{b} + {sb}*1]",
                            "tdpbssd tmm3, tmm4, tmm5", a = in(reg) a, sa = in(reg) 32usize, b = in(reg) bb,
                            sb = in(reg) 64usize, options(nostack));
                    }
                };
                // SAFETY: stores set j % 2's C tile (16 rows of 64 bytes) into its buffer.
                let store = |j: usize, cbuf: &mut [Buf<1024>; 2]| unsafe {
                    let c = cbuf[j % 2].0.as_mut_ptr();
                    if j.is_multiple_of(2) {
                        asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) c, s = in(reg) 64usize, options(nostack));
                    } else {
                        asm!("tilestored [{c} + {s}*1], tmm3", c = in(reg) c, s = in(reg) 64usize, options(nostack));
                    }
                };
                // The running sums carry over from the previous chunk through `out` (same values, same order).
                let mut acc = [_mm512_setzero_ps(); 16];
                if c0 > 0 {
                    for (i, a) in acc.iter_mut().enumerate().take(live) {
                        // SAFETY: token tt·16 + i < n's 16 floats, written by the previous chunk.
                        *a = unsafe { _mm512_loadu_ps(out.add((tt * GROUP + i) * ld)) };
                    }
                }
                issue(0);
                store(0, &mut cbuf);
                for j in 0..cn {
                    if j + 1 < cn {
                        issue(j + 1);
                    }
                    // SAFETY: column c0 + j's 16 f16 scales.
                    let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(gp.add((c0 + j) * GROUP_BLOCK).cast()) });
                    let cb = cbuf[j % 2].0.as_ptr();
                    let dx = &row[c0 + j].d;
                    for (i, a) in acc.iter_mut().enumerate() {
                        // SAFETY: row i of the C buffer.
                        let isum = unsafe { _mm512_load_si512(cb.add(64 * i).cast()) };
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(dx[i])), *a);
                    }
                    if j + 1 < cn {
                        store(j + 1, &mut cbuf);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(live) {
                    // SAFETY: token tt·16 + i < n's 16 floats, which the caller lends us.
                    unsafe { _mm512_storeu_ps(out.add((tt * GROUP + i) * ld), *a) };
                }
            }
        }
    }

    /// Returns the tiles to their initial state, so context switches do not save 8 KiB of tile data. Once per task
    /// (not per group: a release costs more than a configuration).
    ///
    /// # Safety
    /// [`has_amx`] returned true.
    pub(crate) unsafe fn release() {
        // SAFETY: guaranteed by the caller.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::quantize_q8;
    use moestream_quant::{GgmlType, ggml, packed::pack_q4_0x16};

    /// A pseudo-random packed group of `nb` block columns and `n` tokens' q8 blocks (values of both signs, some
    /// zero blocks, scales over a wide range).
    fn case(nb: usize, n: usize, seed: u64) -> (Vec<u8>, Vec<Q8Block>, Vec<f32>) {
        let mut s = seed;
        let mut rnd = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let cols = 32 * nb;
        let w: Vec<f32> = (0..GROUP * cols).map(|i| rnd() * (1.0 + (i / 32 % 7) as f32)).collect();
        let mut rows = vec![0u8; GROUP * nb * 18];
        ggml::quantize(GgmlType::Q4_0, &w, &mut rows).unwrap();
        let mut g = vec![0u8; rows.len()];
        pack_q4_0x16(&rows, &mut g, GROUP, cols).unwrap();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| if i / 32 % 5 == 3 { 0.0 } else { rnd() * 10f32.powi((i / 32 % 4) as i32 - 2) })
            .collect();
        let mut q8 = vec![Q8Block::ZERO; n * nb];
        quantize_q8(&x, &mut q8, 1);
        let mut deq = vec![0f32; GROUP * cols];
        ggml::dequantize(GgmlType::Q4_0, &rows, &mut deq).unwrap();
        (g, q8, deq)
    }

    #[test]
    fn scalar_is_close_to_the_f64_dot_of_the_dequantized_rows() {
        for nb in [1, 3, 8] {
            let (g, q8, deq) = case(nb, 1, nb as u64);
            let mut out = [0f32; GROUP];
            dot16_scalar(&g, &q8, &mut out);
            for (r, &got) in out.iter().enumerate() {
                let (mut want, mut mag) = (0f64, 0f64);
                for (c, w) in deq[r * 32 * nb..(r + 1) * 32 * nb].iter().enumerate() {
                    let xb = &q8[c / 32];
                    let x = f64::from(xb.d) * f64::from(xb.qs[c % 32]);
                    want += f64::from(*w) * x;
                    mag += (f64::from(*w) * x).abs();
                }
                assert!((f64::from(got) - want).abs() <= 1e-5 * mag.max(1e-6), "nb {nb} row {r}: {got} vs {want}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_equals_the_scalar_reference_bit_for_bit() {
        if !crate::matmul::x86::has_avx2() {
            eprintln!("skipped: no AVX2");
            return;
        }
        for (nb, n) in [(1, 4), (2, 5), (3, 8), (7, 17), (64, 4), (65, 3), (130, 9)] {
            let (g, q8, _) = case(nb, n, (nb * 31 + n) as u64);
            for t in 0..n {
                let (mut want, mut got) = ([0f32; GROUP], [0f32; GROUP]);
                dot16_scalar(&g, &q8[t * nb..(t + 1) * nb], &mut want);
                // SAFETY: AVX2 checked above; `g` has nb columns; `next` is only prefetched.
                unsafe { x86::dot16_avx2(&g, &q8[t * nb..(t + 1) * nb], &mut got, g.as_ptr()) };
                assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "nb {nb} token {t}");
            }
            for t0 in (0..n.saturating_sub(3)).step_by(4) {
                let acts = std::array::from_fn(|i| &q8[(t0 + i) * nb..(t0 + i + 1) * nb]);
                let mut got = [[0f32; GROUP]; 4];
                // SAFETY: as above, for each of the 4 tokens.
                unsafe { x86::dot16x4_avx2(&g, acts, &mut got) };
                for (i, row) in got.iter().enumerate() {
                    let mut want = [0f32; GROUP];
                    dot16_scalar(&g, acts[i], &mut want);
                    assert_eq!(row.map(f32::to_bits), want.map(f32::to_bits), "nb {nb} token {}", t0 + i);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_and_amx_equal_the_scalar_reference_bit_for_bit() {
        if !crate::matmul::x86::has_avx512_vnni() {
            eprintln!("skipped: no AVX-512 VNNI");
            return;
        }
        let amx = x86::has_amx();
        for (nb, n) in [(1, 1), (2, 5), (3, 16), (7, 17), (64, 33), (5, 40), (65, 3), (130, 18)] {
            let (g, q8, _) = case(nb, n, (nb * 100 + n) as u64);
            let mut want = vec![0f32; n * GROUP];
            for t in 0..n {
                let mut o = [0f32; GROUP];
                dot16_scalar(&g, &q8[t * nb..(t + 1) * nb], &mut o);
                want[t * GROUP..(t + 1) * GROUP].copy_from_slice(&o);
                let mut v = [0f32; GROUP];
                // SAFETY: AVX-512 VNNI checked above; g holds nb columns.
                unsafe { x86::dot16(&g, &q8[t * nb..(t + 1) * nb], &mut v, g.as_ptr()) };
                assert_eq!(v.map(f32::to_bits), o.map(f32::to_bits), "vnni nb {nb} token {t}");
            }
            // Four tokens at a time, the last call of an odd count repeating a token as `group_gemm` does.
            for t0 in (0..n).step_by(4) {
                let ts: [usize; 4] = std::array::from_fn(|i| (t0 + i).min(n - 1));
                let mut got = [[0f32; GROUP]; 4];
                // SAFETY: AVX-512 VNNI checked above; g holds nb columns, each token nb blocks.
                unsafe { x86::dot16x4(&g, ts.map(|t| &q8[t * nb..(t + 1) * nb]), &mut got) };
                for (t, r) in ts.into_iter().zip(got) {
                    assert_eq!(
                        r.map(f32::to_bits)[..],
                        want[t * GROUP..(t + 1) * GROUP].iter().map(|v| v.to_bits()).collect::<Vec<_>>()[..],
                        "vnni 4-token nb {nb} token {t}"
                    );
                }
            }
            if amx {
                // Every other float of a wider output is the caller's: the kernel must leave it alone.
                let ld = 2 * GROUP;
                let mut got = vec![f32::NAN; n * ld];
                let mut tiles = vec![ATile::ZERO; n.div_ceil(GROUP) * nb];
                pack_tiles(&q8, n, nb, &mut tiles);
                // SAFETY: AMX granted; g holds nb columns, tiles the n tokens, got n rows of ld floats.
                unsafe {
                    x86::configure();
                    x86::gemm16(&g, nb, &tiles, n, got.as_mut_ptr(), ld);
                    x86::release();
                }
                for t in 0..n {
                    let row = &got[t * ld..(t + 1) * ld];
                    assert_eq!(
                        row[..GROUP].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want[t * GROUP..(t + 1) * GROUP].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "amx nb {nb} n {n} token {t}"
                    );
                    assert!(row[GROUP..].iter().all(|v| v.is_nan()), "amx wrote outside its columns");
                }
            } else {
                eprintln!("AMX part skipped: no AMX-INT8 or no tile permission");
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod timing {
    use super::*;

    /// Not a test: `cargo test --release -p moestream-cpu --lib gemm16_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gemm16_timing() {
        if !x86::has_amx() {
            return;
        }
        let (nb, n): (usize, usize) = (64, 32);
        let g = vec![0x5au8; nb * GROUP_BLOCK];
        let tiles = vec![ATile::ZERO; n.div_ceil(GROUP) * nb];
        let mut out = vec![0f32; n * GROUP];
        let iters = 20_000;
        let t = std::time::Instant::now();
        // SAFETY: AMX granted; shapes as documented.
        unsafe {
            x86::configure();
            for _ in 0..iters {
                x86::gemm16(&g, nb, &tiles, n, out.as_mut_ptr(), GROUP);
            }
            x86::release();
        }
        let per = t.elapsed().as_secs_f64() / (iters * nb * n.div_ceil(GROUP)) as f64;
        eprintln!("gemm16: {:.1} ns per 16x16x32 tile op", per * 1e9);
    }
}
