//! Elementwise and small-vector ops of the forward pass: RMSNorm, NeoX RoPE, softmax, SiLU, top-k.
//!
//! All in f32, written as plain loops the compiler vectorises; they are a few percent of a token's time next to
//! the matmuls. They never allocate: tables (RoPE frequencies) and outputs are passed in.

/// `out = w ⊙ x / sqrt(mean(x²) + eps)`; with `zero_centred`, the weight is `1 + w` (Qwen3.5).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// RMSNorm in place, one independent norm per `w.len()`-sized chunk (per-head q/k norms).
pub fn rmsnorm_heads_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for head in x.chunks_exact_mut(d) {
        let ms = head.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &g) in head.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
}

/// `inv_freq[i] = theta^(-2i/rot_dim)` for the first `rot_dim/2` pairs; computed once per model.
pub fn rope_inv_freq(theta: f64, rot_dim: usize) -> Vec<f32> {
    (0..rot_dim / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / rot_dim as f64)) as f32).collect()
}

/// NeoX ("rotate half") RoPE over every head of `x` (`n_heads × head_dim`), rotating the first `2·inv_freq.len()`
/// dims of each head: dim i pairs with dim i + rot/2. Angles are computed in f32 as transformers does
/// (`inv_freq · pos`, then cos/sin).
pub fn rope_neox(x: &mut [f32], head_dim: usize, inv_freq: &[f32], pos: usize) {
    let half = inv_freq.len();
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = pos as f32 * f;
            let (s, c) = a.sin_cos();
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * c - x2 * s;
            head[i + half] = x2 * c + x1 * s;
        }
    }
}

/// Softmax in place (max-subtracted, f32).
pub fn softmax_inplace(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x·sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Greedy choice: the first index of the largest value (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest values of `x` (descending; ties to the lower index, as `torch.topk` on CPU returns them),
/// written to `idx` and `val`. O(n·k), fine for expert counts.
pub fn top_k(x: &[f32], k: usize, idx: &mut [u32], val: &mut [f32]) {
    for j in 0..k {
        let mut best = usize::MAX;
        for (i, &v) in x.iter().enumerate() {
            if idx[..j].contains(&(i as u32)) {
                continue;
            }
            if best == usize::MAX || v > x[best] {
                best = i;
            }
        }
        idx[j] = best as u32;
        val[j] = x[best];
    }
}

/// Causal attention of one query position over `n_pos` cached positions, all heads, GQA.
///
/// `q` is `n_heads × d`; `k_cache`/`v_cache` hold at least `n_pos` rows of `n_kv_heads × d`; `scores` has room
/// for `n_pos`; `out` is `n_heads × d`. Query head h reads kv head `h / (n_heads / n_kv_heads)`.
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    n_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    for h in 0..n_heads {
        attend_head(q, k_cache, v_cache, n_pos, h, n_heads, n_kv_heads, d, scale, scores, &mut out[h * d..(h + 1) * d]);
    }
}

/// `Σ a·b` in 16 independent lanes, then the lanes summed: a plain `.sum()` is one serial chain of dependent adds
/// (strict f32 order forbids LLVM to vectorize it), which made attention scores latency-bound in prefill.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; 16];
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One head of [`attend_one`], so callers can spread heads over threads.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    n_pos: usize,
    h: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let kv = h / (n_heads / n_kv_heads);
    let row = n_kv_heads * d;
    let qh = &q[h * d..(h + 1) * d];
    let scores = &mut scores[..n_pos];
    for (p, s) in scores.iter_mut().enumerate() {
        let kr = &k_cache[p * row + kv * d..p * row + (kv + 1) * d];
        *s = dot(qh, kr) * scale;
    }
    softmax_inplace(scores);
    out.fill(0.0);
    for (p, &w) in scores.iter().enumerate() {
        let vr = &v_cache[p * row + kv * d..p * row + (kv + 1) * d];
        for (o, &v) in out.iter_mut().zip(vr) {
            *o += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64_reference_on_odd_lengths() {
        for n in [0, 1, 15, 16, 17, 33, 128, 131] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 13) as f32 - 6.0) * 0.7).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            let mag: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from((x * y).abs())).sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() <= 1e-6 * mag.max(1.0), "n={n}");
        }
    }

    #[test]
    fn rmsnorm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut o = [0f32; 4];
        rmsnorm(&x, &[1.0; 4], 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_is_a_rotation_and_zero_at_pos_0() {
        let inv = rope_inv_freq(10000.0, 8);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let orig = x.clone();
        rope_neox(&mut x, 8, &inv, 0);
        assert_eq!(x, orig);
        rope_neox(&mut x, 8, &inv, 37);
        for (a, b) in x.chunks(8).zip(orig.chunks(8)) {
            let na: f32 = a.iter().map(|v| v * v).sum();
            let nb: f32 = b.iter().map(|v| v * v).sum();
            assert!((na - nb).abs() < 1e-3 * nb);
        }
    }

    #[test]
    fn top_k_picks_largest_with_low_index_ties() {
        let x = [0.1f32, 0.5, 0.5, -1.0, 0.9];
        let (mut i, mut v) = ([0u32; 3], [0f32; 3]);
        top_k(&x, 3, &mut i, &mut v);
        assert_eq!(i, [4, 1, 2]);
        assert_eq!(v, [0.9, 0.5, 0.5]);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let q = [1.0f32; 8];
        let k = [0.5f32; 4];
        let v = [1.0f32, 2.0, 3.0, 4.0];
        let mut s = [0f32; 1];
        let mut o = [0f32; 8];
        attend_one(&q, &k, &v, 1, 2, 1, 4, 0.5, &mut s, &mut o);
        assert_eq!(o, [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }
}
