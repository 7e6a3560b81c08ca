//! x86-64 attention kernels: AVX-512 and AVX2, one body (`kernels!`) over per-ISA primitives on a 16-lane value
//! `W` (one `zmm`, or two `ymm` halves holding lanes 0–7 and 8–15).
//!
//! The body performs the reference's operations in the reference's order (the parent module doc); what the ISA
//! changes is only scheduling: how many positions share a pass over the query (`POS` score accumulators, folded
//! together by one shuffle tree in `store_scores`) and how many output dims stay in registers over the positions
//! (`VCHUNKS` × 16). Lanes past a partial chunk are loaded as zeros, and `fma(0, 0, acc)` returns `acc` exactly:
//! an accumulator that starts at +0 never becomes −0 under round-to-nearest, so adding +0 cannot flip its sign.
//!
//! Nothing assumes alignment, but a 64-byte load that straddles two cache lines costs two L1 accesses, so the
//! engine allocates its KV cache on a 64-byte boundary (measured: twice the L1 throughput of a 16-byte-aligned
//! cache).

/// Floats of K (or V) rows per position tile (16 positions at head dim 128). Small, because the cache's row stride
/// (`n_kv_heads · d` floats, 2 KiB for Qwen3-30B-A3B) is a power of two that maps all rows of a tile onto a few
/// L1 sets: at 16 positions a tile stays in L1 while every head of the group reads it. Measured on the
/// `attention` bench (8 heads per call, unaligned cache): 42 ms at 16 positions, 46 at 8, 55 at 24, 79 at 64.
const TILE_FLOATS: usize = 2048;

/// Positions per tile for head dim `d`, a multiple of 16 so only the last tile has a partial score pass.
fn tile_positions(d: usize) -> usize {
    (TILE_FLOATS / d / 16).max(1) * 16
}

macro_rules! kernels {
    ($feat:literal) => {
        use super::super::{EXP_LO, EXP_P, Group, LN2_HI, LN2_LO, LOG2E, ROUND_MAGIC};
        use super::tile_positions;

        /// `l[0] + … + l[7]` folded as halves (`i + 4`, `i + 2`, `i + 1` into `i`): the tail of the 16-lane fold.
        #[inline]
        #[target_feature(enable = $feat)]
        fn fold8(v: __m256) -> f32 {
            let v4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
            _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps::<1>(v2, v2)))
        }

        /// `exp_nonpos` lane by lane.
        #[inline]
        #[target_feature(enable = $feat)]
        fn exp(x: W) -> W {
            let x = max(splat(EXP_LO), x);
            let t = fma(x, splat(LOG2E), splat(ROUND_MAGIC));
            let n = sub(t, splat(ROUND_MAGIC));
            let r = fma(n, splat(-LN2_HI), x);
            let r = fma(n, splat(-LN2_LO), r);
            let r2 = mul(r, r);
            let mut p = splat(EXP_P[0]);
            for &c in &EXP_P[1..] {
                p = fma(p, r, splat(c));
            }
            let y = add(fma(p, r2, r), splat(1.0));
            mul(y, pow2(t))
        }

        /// Scores of positions `p0..p1` for one head, `POS` positions per pass over `q`.
        ///
        /// # Safety
        /// `q` holds `d` floats; `k` holds `d` floats at `p · row` for every `p < p1`; `s` has room for `p1`.
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn scores_span(
            q: *const f32,
            k: *const f32,
            row: usize,
            d: usize,
            d_tail: M,
            (p0, p1): (usize, usize),
            scale: f32,
            s: *mut f32,
        ) {
            let full = d / 16 * 16;
            let mut p = p0;
            while p < p1 {
                let n = (p1 - p).min(POS);
                // Positions past `p1` reread the last row; their scores are not stored.
                let rows: [*const f32; POS] = std::array::from_fn(|i| k.wrapping_add((p + i).min(p1 - 1) * row));
                let mut acc = [zero(); POS];
                // SAFETY: every row pointer is a position below `p1`; loads stay within its `d` floats (the last
                // chunk masked to `d_tail`), and `s + p` has room for the `n` scores stored.
                unsafe {
                    let mut j = 0;
                    while j < full {
                        let qv = load(q.add(j));
                        for i in 0..POS {
                            acc[i] = fma(qv, load(rows[i].add(j)), acc[i]);
                        }
                        j += 16;
                    }
                    if j < d {
                        let qv = load_m(q.add(j), d_tail);
                        for i in 0..POS {
                            acc[i] = fma(qv, load_m(rows[i].add(j), d_tail), acc[i]);
                        }
                    }
                    store_scores(acc, scale, s.add(p), n);
                }
                p += POS;
            }
        }

        /// Scores to softmax weights in place, over `n ≥ 1` floats.
        ///
        /// # Safety
        /// `s` holds `n` floats.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn softmax(s: *mut f32, n: usize) {
            let full = n / 16 * 16;
            let tail = mask((n - full).max(1));
            // SAFETY: full chunks lie below `full ≤ n`, the partial one is masked to `n - full` floats.
            unsafe {
                let mut mv = splat(f32::NEG_INFINITY);
                for j in (0..full).step_by(16) {
                    mv = max(mv, load(s.add(j)));
                }
                let mut m = max_lanes(mv);
                for j in full..n {
                    m = m.max(*s.add(j));
                }
                let m = splat(m);
                let mut sum = zero();
                for j in (0..full).step_by(16) {
                    let e = exp(sub(load(s.add(j)), m));
                    store(s.add(j), e);
                    sum = add(sum, e);
                }
                if full < n {
                    let e = keep(exp(sub(load_m(s.add(full), tail), m)), tail);
                    store_m(s.add(full), e, tail);
                    sum = add(sum, e);
                }
                let inv = splat(1.0 / sum_lanes(sum));
                for j in (0..full).step_by(16) {
                    store(s.add(j), mul(load(s.add(j)), inv));
                }
                if full < n {
                    store_m(s.add(full), mul(load_m(s.add(full), tail), inv), tail);
                }
            }
        }

        /// `out[0..16·C] += Σ_p w_p · v_p` for `p` in `p0..p1`, in `p` order, with the `C·16` sums in registers;
        /// the last chunk is masked to `last` when `partial`.
        ///
        /// # Safety
        /// `w` holds `p1` floats; `v` holds the block's floats at `p · row` for every `p < p1`; `out` holds them.
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn weighted_block<const C: usize>(
            w: *const f32,
            v: *const f32,
            row: usize,
            (p0, p1): (usize, usize),
            last: M,
            partial: bool,
            out: *mut f32,
        ) {
            // SAFETY: as documented; chunk `C - 1` is masked when the block ends inside it.
            unsafe {
                let ld = |p: *const f32, c: usize| {
                    if c + 1 < C || !partial { load(p.add(16 * c)) } else { load_m(p.add(16 * c), last) }
                };
                let mut acc: [W; C] = std::array::from_fn(|c| ld(out, c));
                for p in p0..p1 {
                    let wp = splat(*w.add(p));
                    let vp = v.add(p * row);
                    for c in 0..C {
                        acc[c] = fma(wp, ld(vp, c), acc[c]);
                    }
                }
                for (c, &a) in acc.iter().enumerate() {
                    if c + 1 < C || !partial {
                        store(out.add(16 * c), a);
                    } else {
                        store_m(out.add(16 * c), a, last);
                    }
                }
            }
        }

        /// Entry point stored in the dispatch table (`GroupFn`).
        ///
        /// # Safety
        /// As `GroupFn`, and the CPU has `$feat`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn group(g: &Group<'_>, scores: &mut [f32], out: &mut [f32]) {
            let (n_pos, d, row) = (g.n_pos, g.d, g.row);
            let n_h = g.q.len() / d;
            out.fill(0.0);
            let (q, k, v, s, o) = (g.q.as_ptr(), g.k.as_ptr(), g.v.as_ptr(), scores.as_mut_ptr(), out.as_mut_ptr());
            let tile = tile_positions(d);
            let d_tail = mask(if d % 16 == 0 { 16 } else { d % 16 });
            let tiles = || (0..n_pos).step_by(tile).map(move |p0| (p0, (p0 + tile).min(n_pos)));
            // SAFETY: `Group` guarantees `n_h × d` queries, `n_pos` K and V rows of `d` floats `row` apart, `n_h ×
            // n_pos` scores and `n_h × d` outputs; every pointer below stays within them.
            unsafe {
                for span in tiles() {
                    for h in 0..n_h {
                        scores_span(q.add(h * d), k, row, d, d_tail, span, g.scale, s.add(h * n_pos));
                    }
                }
                for h in 0..n_h {
                    softmax(s.add(h * n_pos), n_pos);
                }
                let block = 16 * VCHUNKS;
                for span in tiles() {
                    for h in 0..n_h {
                        for db in (0..d).step_by(block) {
                            let width = (d - db).min(block);
                            let chunks = width.div_ceil(16);
                            let last_n = width - 16 * (chunks - 1);
                            let (last, partial) = (mask(last_n), last_n < 16);
                            let (w, vb, ob) = (s.add(h * n_pos), v.add(db), o.add(h * d + db));
                            match chunks {
                                1 => weighted_block::<1>(w, vb, row, span, last, partial, ob),
                                2 => weighted_block::<2>(w, vb, row, span, last, partial, ob),
                                3 => weighted_block::<3>(w, vb, row, span, last, partial, ob),
                                4 => weighted_block::<4>(w, vb, row, span, last, partial, ob),
                                5 => weighted_block::<5>(w, vb, row, span, last, partial, ob),
                                6 => weighted_block::<6>(w, vb, row, span, last, partial, ob),
                                7 => weighted_block::<7>(w, vb, row, span, last, partial, ob),
                                8 => weighted_block::<8>(w, vb, row, span, last, partial, ob),
                                _ => unreachable!("VCHUNKS ≤ 8"),
                            }
                        }
                    }
                }
            }
        }
    };
}

/// AVX2 + FMA: `W` is two `ymm`; 4 positions per score pass and 64 output dims per register block (8 `ymm`
/// accumulators each, of 16 registers).
pub(super) mod avx2 {
    use core::arch::x86_64::*;

    /// Lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    struct W(__m256, __m256);
    /// All-ones lanes are loaded and stored.
    type M = (__m256i, __m256i);
    const POS: usize = 4;
    const VCHUNKS: usize = 4;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zero() -> W {
        W(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn splat(a: f32) -> W {
        W(_mm256_set1_ps(a), _mm256_set1_ps(a))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fma(a: W, b: W, c: W) -> W {
        W(_mm256_fmadd_ps(a.0, b.0, c.0), _mm256_fmadd_ps(a.1, b.1, c.1))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn add(a: W, b: W) -> W {
        W(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sub(a: W, b: W) -> W {
        W(_mm256_sub_ps(a.0, b.0), _mm256_sub_ps(a.1, b.1))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul(a: W, b: W) -> W {
        W(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1))
    }
    /// `vmaxps`: `b` when either is NaN.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn max(a: W, b: W) -> W {
        W(_mm256_max_ps(a.0, b.0), _mm256_max_ps(a.1, b.1))
    }
    /// The first `n` (1..=16) lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mask(n: usize) -> M {
        let n = _mm256_set1_epi32(n as i32);
        (
            _mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
            _mm256_cmpgt_epi32(n, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)),
        )
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> W {
        // SAFETY: the caller guarantees 16 readable floats.
        unsafe { W(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }
    /// Masked-off lanes read as +0 and are not accessed.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_m(p: *const f32, m: M) -> W {
        // SAFETY: the caller guarantees the masked-on floats are readable; `vmaskmovps` does not touch the others
        // (the high half's address may lie past the buffer, hence `wrapping_add`).
        unsafe { W(_mm256_maskload_ps(p, m.0), _mm256_maskload_ps(p.wrapping_add(8), m.1)) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: W) {
        // SAFETY: the caller guarantees 16 writable floats.
        unsafe {
            _mm256_storeu_ps(p, v.0);
            _mm256_storeu_ps(p.add(8), v.1);
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_m(p: *mut f32, v: W, m: M) {
        // SAFETY: as `load_m`, for writes.
        unsafe {
            _mm256_maskstore_ps(p, m.0, v.0);
            _mm256_maskstore_ps(p.wrapping_add(8), m.1, v.1);
        }
    }
    /// Masked-off lanes set to +0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn keep(v: W, m: M) -> W {
        W(_mm256_and_ps(v.0, _mm256_castsi256_ps(m.0)), _mm256_and_ps(v.1, _mm256_castsi256_ps(m.1)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn max_lanes(v: W) -> f32 {
        let m = _mm256_max_ps(v.0, v.1);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_lanes(v: W) -> f32 {
        fold8(_mm256_add_ps(v.0, v.1))
    }
    /// `2^n` from `t = ROUND_MAGIC + n`, as `exp_bits`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn pow2(t: W) -> W {
        let f = |t: __m256| {
            let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND_MAGIC.to_bits() as i32));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127))))
        };
        W(f(t.0), f(t.1))
    }
    /// Folds 4 accumulators (the 16-lane fold of each, batched through shuffles), scales, and stores the first
    /// `n` scores.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_scores(a: [W; POS], scale: f32, out: *mut f32, n: usize) {
        let v8: [__m256; POS] = std::array::from_fn(|i| _mm256_add_ps(a[i].0, a[i].1));
        // [a v4 | b v4]
        let quarter = |a: __m256, b: __m256| {
            _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b))
        };
        let (c01, c23) = (quarter(v8[0], v8[1]), quarter(v8[2], v8[3]));
        // Half L: [a_L v2[0], a_L v2[1], a_{L+2} v2[0], a_{L+2} v2[1]].
        let d = _mm256_add_ps(_mm256_shuffle_ps::<0x44>(c01, c23), _mm256_shuffle_ps::<0xee>(c01, c23));
        // Half L: [s_L, s_{L+2}, s_L, s_{L+2}].
        let e = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(d, d), _mm256_shuffle_ps::<0xdd>(d, d));
        let s = _mm_unpacklo_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps::<1>(e));
        let s = _mm_mul_ps(s, _mm_set1_ps(scale));
        let m = _mm_cmpgt_epi32(_mm_set1_epi32(n as i32), _mm_setr_epi32(0, 1, 2, 3));
        // SAFETY: the caller guarantees `n` writable floats; masked-off lanes are not touched.
        unsafe { _mm_maskstore_ps(out, m, s) }
    }

    kernels!("avx2,fma");
}

/// AVX-512 F/VL: 8 positions per score pass, 128 output dims per register block.
pub(super) mod avx512 {
    use core::arch::x86_64::*;

    type W = __m512;
    type M = __mmask16;
    const POS: usize = 8;
    const VCHUNKS: usize = 8;

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn zero() -> W {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn splat(a: f32) -> W {
        _mm512_set1_ps(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn fma(a: W, b: W, c: W) -> W {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn add(a: W, b: W) -> W {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn sub(a: W, b: W) -> W {
        _mm512_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn mul(a: W, b: W) -> W {
        _mm512_mul_ps(a, b)
    }
    /// `vmaxps`: `b` when either is NaN.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn max(a: W, b: W) -> W {
        _mm512_max_ps(a, b)
    }
    /// The first `n` (1..=16) lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn mask(n: usize) -> M {
        ((1u32 << n) - 1) as M
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn load(p: *const f32) -> W {
        // SAFETY: the caller guarantees 16 readable floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    /// Masked-off lanes read as +0 and are not accessed.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn load_m(p: *const f32, m: M) -> W {
        // SAFETY: the caller guarantees the masked-on floats are readable; masked lanes do not fault.
        unsafe { _mm512_maskz_loadu_ps(m, p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn store(p: *mut f32, v: W) {
        // SAFETY: the caller guarantees 16 writable floats.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn store_m(p: *mut f32, v: W, m: M) {
        // SAFETY: as `load_m`, for writes.
        unsafe { _mm512_mask_storeu_ps(p, m, v) }
    }
    /// Masked-off lanes set to +0.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn keep(v: W, m: M) -> W {
        _mm512_maskz_mov_ps(m, v)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn max_lanes(v: W) -> f32 {
        _mm512_reduce_max_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn sum_lanes(v: W) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        fold8(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
    }
    /// `2^n` from `t = ROUND_MAGIC + n`, as `exp_bits`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn pow2(t: W) -> W {
        let n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(ROUND_MAGIC.to_bits() as i32));
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127))))
    }
    /// Folds 8 accumulators (the 16-lane fold of each, batched through shuffles), scales, and stores the first
    /// `n` scores.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn store_scores(a: [W; POS], scale: f32, out: *mut f32, n: usize) {
        // [a v8 | b v8]
        let half = |a: W, b: W| _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xee>(a, b));
        // [a v4 | b v4 | c v4 | d v4] from [a v8 | b v8] and [c v8 | d v8].
        let quarter =
            |a: W, b: W| _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xdd>(a, b));
        let c0 = quarter(half(a[0], a[1]), half(a[2], a[3]));
        let c1 = quarter(half(a[4], a[5]), half(a[6], a[7]));
        // Quarter k: [a_k v2[0], a_k v2[1], a_{k+4} v2[0], a_{k+4} v2[1]].
        let d = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(c0, c1), _mm512_shuffle_ps::<0xee>(c0, c1));
        // Quarter k: [s_k, s_{k+4}, s_k, s_{k+4}].
        let e = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(d, d), _mm512_shuffle_ps::<0xdd>(d, d));
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        let s = _mm512_castps512_ps256(_mm512_permutexvar_ps(order, e));
        let s = _mm256_mul_ps(s, _mm256_set1_ps(scale));
        // SAFETY: the caller guarantees `n` writable floats; masked-off lanes are not touched.
        unsafe { _mm256_mask_storeu_ps(out, ((1u32 << n) - 1) as __mmask8, s) }
    }

    kernels!("avx512f,avx512vl,avx2,fma");
}
