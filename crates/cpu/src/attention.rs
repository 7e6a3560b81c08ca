//! Causal softmax attention of one query token over a position-major f32 K/V cache, with GQA.
//!
//! This module owns the attention arithmetic: a portable reference and SIMD kernels (`x86`: AVX2, AVX-512)
//! chosen once per process ([`AttnDispatch::best`]). Callers own the cache, the scratch and the split over
//! threads; a call covers any run of query heads of one token, and the SIMD kernels walk the heads of one kv
//! head together so each K/V row is read from L1 once per tile for the whole group.
//!
//! Every (token, head) output is a fixed function of `(q, K rows, V rows, n_pos)`: the same operations in the same
//! order whichever heads share a call, however positions are tiled, and on every table (the SIMD tables are
//! tested bit for bit against the reference). That is what keeps prefill equal to decode and results independent
//! of the thread count. The function, per head (`⊕` is a fused multiply-add, rounded once):
//! - score `s_p = dot(q, k_p) · scale`, where `dot` keeps 16 partial sums (element `j` goes to lane `j mod 16`,
//!   `lane ⊕= q_j·k_j` in `j` order) folded as halves: lanes `i + 8`, then `i + 4`, `i + 2`, `i + 1` added into `i`;
//! - `e_p = exp(s_p − max s)` by [`exp_nonpos`], a polynomial both tables evaluate identically (libm's `expf` is
//!   neither vectorizable nor the same on every platform);
//! - `Σ e` in 16 lanes (position `p` to lane `p mod 16`, in `p` order), folded like `dot`; weights
//!   `w_p = e_p · (1/Σ e)`;
//! - `out_j = Σ_p w_p ⊕ v_p,j` in `p` order, starting from 0.
//!
//! The reference uses `f32::mul_add` where the kernels use FMA, so on an x86 CPU without FMA (pre-Haswell) the
//! reference runs on libm's software `fmaf` and is slow; every x86 CPU with AVX2 takes a SIMD table.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;
use std::sync::OnceLock;

use crate::matmul::Isa;

/// The head layout of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies every score (usually `1/√head_dim`).
    pub scale: f32,
}

impl AttnShape {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// One kv head's share of a call: `n_h` query heads that all read the same K/V rows.
struct Group<'a> {
    /// `n_h × d` query values.
    q: &'a [f32],
    /// The kv head's first K value; position `p`'s `d` values start at `p · row`.
    k: &'a [f32],
    /// As `k`, for V.
    v: &'a [f32],
    /// Floats between consecutive positions of the cache (`n_kv_heads · d`).
    row: usize,
    n_pos: usize,
    d: usize,
    scale: f32,
}

/// Attention for one group. `scores` holds `n_h × n_pos` floats (head `i` at `i · n_pos`), `out` `n_h × d`.
///
/// # Safety
/// `Group`'s slices hold what its fields say (checked by [`AttnDispatch::attend`]), `n_pos ≥ 1`, and the CPU
/// has the table's ISA.
type GroupFn = unsafe fn(g: &Group<'_>, scores: &mut [f32], out: &mut [f32]);

/// An attention kernel table for one [`Isa`]. Cheap to copy.
#[derive(Clone, Copy)]
pub struct AttnDispatch {
    isa: Isa,
    group: GroupFn,
}

impl std::fmt::Debug for AttnDispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnDispatch").field("isa", &self.isa).finish()
    }
}

impl AttnDispatch {
    /// The table for `isa`, or `None` when this CPU does not support it or there is no attention kernel for it
    /// (NEON: the reference serves aarch64 for now).
    pub fn new(isa: Isa) -> Option<AttnDispatch> {
        if !isa.is_supported() {
            return None;
        }
        let group: GroupFn = match isa {
            Isa::Scalar => group_scalar,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2::group,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512::group,
            _ => return None,
        };
        Some(AttnDispatch { isa, group })
    }

    /// The fastest supported table, detected once per process.
    pub fn best() -> AttnDispatch {
        static BEST: OnceLock<AttnDispatch> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2].into_iter().find_map(AttnDispatch::new).unwrap_or_else(AttnDispatch::scalar)
        })
    }

    /// The reference, available everywhere.
    pub fn scalar() -> AttnDispatch {
        AttnDispatch { isa: Isa::Scalar, group: group_scalar }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Causal attention of one token's query heads `heads` over the first `n_pos` cached positions.
    ///
    /// `q` is the token's `n_heads × d` queries; `k_cache`/`v_cache` hold at least `n_pos` rows of
    /// `n_kv_heads × d`; `scores` has room for `heads.len() × n_pos`; `out` receives `heads.len() × d`. With
    /// `n_pos == 0` the output is zero.
    ///
    /// # Panics
    /// When a slice is shorter than the shape requires, `heads` is out of range, or `n_kv_heads` does not divide
    /// `n_heads`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        shape: &AttnShape,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        n_pos: usize,
        heads: Range<usize>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let AttnShape { n_heads, n_kv_heads, head_dim: d, scale } = *shape;
        assert!(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "{n_heads} query heads over {n_kv_heads} kv heads");
        assert!(heads.end <= n_heads && q.len() >= n_heads * d, "heads {heads:?} of {n_heads} × {d}");
        let out = &mut out[..heads.len() * d];
        if n_pos == 0 {
            out.fill(0.0);
            return;
        }
        let (r, row) = (shape.group(), n_kv_heads * d);
        let kv_len = (n_pos - 1) * row + d;
        let mut h = heads.start;
        while h < heads.end {
            // The heads of `heads` that read kv head `kv`.
            let kv = h / r;
            let end = heads.end.min((kv + 1) * r);
            let n_h = end - h;
            let g = Group {
                q: &q[h * d..end * d],
                k: &k_cache[kv * d..kv * d + kv_len],
                v: &v_cache[kv * d..kv * d + kv_len],
                row,
                n_pos,
                d,
                scale,
            };
            let at = (h - heads.start) * d;
            // SAFETY: the slices above hold what `Group` documents (slicing panics otherwise), `scores` and `out`
            // are sliced to the group's size, `n_pos ≥ 1`, and `new` only builds tables the CPU supports.
            unsafe { (self.group)(&g, &mut scores[..n_h * n_pos], &mut out[at..at + n_h * d]) };
            h = end;
        }
    }
}

/// Every head of one token ([`AttnDispatch::attend`] over `0..n_heads` with the best table): `out` is
/// `n_heads × d`, `scores` has room for `n_heads × n_pos`.
pub fn attend_one(
    shape: &AttnShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    n_pos: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    AttnDispatch::best().attend(shape, q, k_cache, v_cache, n_pos, 0..shape.n_heads, scores, out);
}

/// Lanes of the partial sums in `dot` and `Σ e`; 16 so an AVX-512 register holds them all.
const LANES: usize = 16;

/// `l[0] + … + l[15]`, folded as halves (the order the SIMD kernels reduce a register in).
#[inline]
fn fold_lanes(mut l: [f32; LANES]) -> f32 {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            l[i] += l[i + w];
        }
    }
    l[0]
}

/// `q · k` with the module's lane order.
#[inline]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (qc, kc) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (qt, kt) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for i in 0..LANES {
            acc[i] = a[i].mul_add(b[i], acc[i]);
        }
    }
    for i in 0..qt.len() {
        acc[i] = qt[i].mul_add(kt[i], acc[i]);
    }
    fold_lanes(acc)
}

/// Lower clamp of [`exp_nonpos`]: `e^-87` is still normal, so `2^n` below stays a normal float.
const EXP_LO: f32 = -87.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `1.5 · 2²³`: adding it rounds to an integer (ties to even) and leaves that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// `ln 2` split in two (Cephes): `LN2_HI` has few mantissa bits, so `n · LN2_HI` is exact for `|n| < 2⁹`.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` polynomial for `e^r` on `|r| ≤ ln2 / 2`: `1 + r + r²·P(r)`, `P` highest degree first.
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// `e^x` for `x ≤ 0` (within ~2 ulp; `x < -87` gives `e^-87`; NaN stays NaN), written with the same operations
/// the SIMD kernels apply lane-wise.
#[inline]
fn exp_nonpos(x: f32) -> f32 {
    // `max(EXP_LO, x)` as `vmaxps` computes it, so a NaN `x` passes through.
    let x = if EXP_LO > x { EXP_LO } else { x };
    let t = x.mul_add(LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let r2 = r * r;
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r2, r) + 1.0;
    y * f32::from_bits(exp_bits(t.to_bits()))
}

/// The bits of `2^n` from the bits of `t = ROUND_MAGIC + n`.
#[inline]
fn exp_bits(t: u32) -> u32 {
    (t.wrapping_sub(ROUND_MAGIC.to_bits()).wrapping_add(127)) << 23
}

/// The reference [`GroupFn`]: one head at a time, straight from the definition in the module doc.
unsafe fn group_scalar(g: &Group<'_>, scores: &mut [f32], out: &mut [f32]) {
    let (n_pos, d, row) = (g.n_pos, g.d, g.row);
    for ((qh, s), o) in g.q.chunks_exact(d).zip(scores.chunks_exact_mut(n_pos)).zip(out.chunks_exact_mut(d)) {
        for (p, sp) in s.iter_mut().enumerate() {
            *sp = dot(qh, &g.k[p * row..p * row + d]) * g.scale;
        }
        softmax_lanes(s);
        o.fill(0.0);
        for (p, &w) in s.iter().enumerate() {
            for (oj, &vj) in o.iter_mut().zip(&g.v[p * row..p * row + d]) {
                *oj = w.mul_add(vj, *oj);
            }
        }
    }
}

/// Softmax in place with [`exp_nonpos`] and the lane-ordered sum.
fn softmax_lanes(s: &mut [f32]) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0f32; LANES];
    for (p, sp) in s.iter_mut().enumerate() {
        *sp = exp_nonpos(*sp - m);
        acc[p % LANES] += *sp;
    }
    let inv = 1.0 / fold_lanes(acc);
    s.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in `[-amp, amp)` (xorshift), so failures reproduce.
    fn noise(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    struct Case {
        shape: AttnShape,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        n_pos: usize,
    }

    /// Odd position counts around the kernels' tile and block edges, head dims with and without a partial
    /// 16-lane chunk, and GQA groups of 1, 3 and 8.
    fn cases() -> Vec<Case> {
        let mut out = Vec::new();
        let mut seed = 1;
        for (n_heads, n_kv_heads) in [(8, 1), (6, 2), (4, 4)] {
            for d in [64, 128, 72, 8, 200] {
                for n_pos in [1, 2, 15, 17, 100, 513] {
                    seed += 1;
                    // q, k uniform in ±3: scaled scores have a standard deviation of 3 for any d, so the
                    // softmax is far from uniform.
                    let amp = 3.0;
                    let row = n_kv_heads * d;
                    out.push(Case {
                        shape: AttnShape { n_heads, n_kv_heads, head_dim: d, scale: 1.0 / (d as f32).sqrt() },
                        q: noise(n_heads * d, seed, amp),
                        k: noise(n_pos * row, seed + 1000, amp),
                        v: noise(n_pos * row, seed + 2000, 1.0),
                        n_pos,
                    });
                }
            }
        }
        out
    }

    fn run(t: &AttnDispatch, c: &Case, heads: Range<usize>) -> Vec<f32> {
        let mut scores = vec![f32::NAN; heads.len() * c.n_pos];
        let mut out = vec![f32::NAN; heads.len() * c.shape.head_dim];
        t.attend(&c.shape, &c.q, &c.k, &c.v, c.n_pos, heads, &mut scores, &mut out);
        out
    }

    #[test]
    fn simd_tables_match_the_reference_bit_for_bit() {
        let tables: Vec<AttnDispatch> = Isa::ALL.into_iter().filter_map(AttnDispatch::new).collect();
        eprintln!("attention tables: {:?}", tables.iter().map(|t| t.isa().name()).collect::<Vec<_>>());
        for c in cases() {
            let want = run(&AttnDispatch::scalar(), &c, 0..c.shape.n_heads);
            for t in &tables {
                let got = run(t, &c, 0..c.shape.n_heads);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{} {:?} n_pos {} out[{i}]: {g} vs reference {w}",
                        t.isa().name(),
                        c.shape,
                        c.n_pos
                    );
                }
            }
        }
    }

    /// Splitting the heads over calls (as the engine does over threads) must not change a head's output.
    #[test]
    fn head_ranges_do_not_change_results() {
        for t in Isa::ALL.into_iter().filter_map(AttnDispatch::new) {
            for c in cases().into_iter().filter(|c| c.shape.group() > 1 && c.n_pos > 16) {
                let whole = run(&t, &c, 0..c.shape.n_heads);
                let d = c.shape.head_dim;
                for h in 0..c.shape.n_heads {
                    let one = run(&t, &c, h..h + 1);
                    assert_eq!(one, whole[h * d..(h + 1) * d], "{} head {h} {:?}", t.isa().name(), c.shape);
                }
                // A range that straddles kv heads.
                let mid = run(&t, &c, 1..c.shape.n_heads - 1);
                assert_eq!(mid, whole[d..(c.shape.n_heads - 1) * d], "{} {:?}", t.isa().name(), c.shape);
            }
        }
    }

    #[test]
    fn every_table_matches_an_f64_reference() {
        for t in Isa::ALL.into_iter().filter_map(AttnDispatch::new) {
            for c in cases() {
                let got = run(&t, &c, 0..c.shape.n_heads);
                let AttnShape { n_heads, n_kv_heads, head_dim: d, scale } = c.shape;
                let row = n_kv_heads * d;
                for h in 0..n_heads {
                    let kv = h / (n_heads / n_kv_heads);
                    let qh = &c.q[h * d..(h + 1) * d];
                    let at = |buf: &[f32], p: usize, j: usize| f64::from(buf[p * row + kv * d + j]);
                    let s: Vec<f64> = (0..c.n_pos)
                        .map(|p| (0..d).map(|j| f64::from(qh[j]) * at(&c.k, p, j)).sum::<f64>() * f64::from(scale))
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for j in 0..d {
                        let want: f64 = (0..c.n_pos).map(|p| e[p] / sum * at(&c.v, p, j)).sum();
                        let g = f64::from(got[h * d + j]);
                        // f32 rounding of scores (~d·ε·|s|), exp (~2 ulp) and the weighted sum (~n_pos·ε) on
                        // values of magnitude ≤ 1.
                        let tol = 2e-5 + 1e-7 * (d + c.n_pos) as f64;
                        assert!(
                            (g - want).abs() <= tol,
                            "{} {:?} n_pos {} head {h} dim {j}: {g} vs {want}",
                            t.isa().name(),
                            c.shape,
                            c.n_pos
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn exp_nonpos_is_close_to_f64_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let got = f64::from(exp_nonpos(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3.0 * f64::from(f32::EPSILON), "max relative error {worst:e}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert!(exp_nonpos(-1000.0) > 0.0 && exp_nonpos(-1000.0) < 1e-37);
        assert!(exp_nonpos(f32::NAN).is_nan());
    }

    #[test]
    fn one_position_returns_its_value_and_none_returns_zero() {
        let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 4, scale: 0.5 };
        let (q, k, v) = ([1.0f32; 8], [0.5f32; 4], [1.0f32, 2.0, 3.0, 4.0]);
        for t in Isa::ALL.into_iter().filter_map(AttnDispatch::new) {
            let (mut s, mut o) = ([0f32; 2], [f32::NAN; 8]);
            t.attend(&shape, &q, &k, &v, 1, 0..2, &mut s, &mut o);
            assert_eq!(o, [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], "{}", t.isa().name());
            let mut o = [f32::NAN; 8];
            t.attend(&shape, &q, &k, &v, 0, 0..2, &mut s, &mut o);
            assert_eq!(o, [0.0; 8], "{}", t.isa().name());
        }
    }
}
