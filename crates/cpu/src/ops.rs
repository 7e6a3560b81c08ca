//! Elementwise and small-vector ops of the forward pass: RMSNorm, NeoX RoPE, softmax, SiLU, top-k (attention has
//! its own module, `attention`).
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

/// `cs = [cos(pos·f_0), …, cos(pos·f_{m-1}), sin(pos·f_0), …]` for the `m = inv_freq.len()` frequencies: one
/// token's angles, computed once and shared by every head of every layer through [`rope_neox_with`] (computing
/// them per head was ~1% of a decode token: 36 heads × 48 layers × 64 `sincosf`).
pub fn rope_cos_sin(inv_freq: &[f32], pos: usize, cs: &mut [f32]) {
    let m = inv_freq.len();
    let (cos, sin) = cs[..2 * m].split_at_mut(m);
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        (*s, *c) = (pos as f32 * f).sin_cos();
    }
}

/// [`rope_neox`] with the angles from [`rope_cos_sin`]: the same values, bit for bit.
pub fn rope_neox_with(x: &mut [f32], head_dim: usize, cs: &[f32]) {
    let half = cs.len() / 2;
    let (cos, sin) = cs.split_at(half);
    for head in x.chunks_exact_mut(head_dim) {
        let (lo, hi) = head[..2 * half].split_at_mut(half);
        for (((x1, x2), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
            (*x1, *x2) = (*x1 * c - *x2 * s, *x2 * c + *x1 * s);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut o = [0f32; 4];
        rmsnorm(&x, &[1.0; 4], 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_with_a_token_table_equals_rope() {
        let inv = rope_inv_freq(1e6, 96);
        let mut x: Vec<f32> = (0..3 * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for pos in [0usize, 1, 17, 4095, 262_143] {
            let mut want = x.clone();
            rope_neox(&mut want, 128, &inv, pos);
            let mut cs = vec![f32::NAN; 2 * inv.len()];
            rope_cos_sin(&inv, pos, &mut cs);
            rope_neox_with(&mut x, 128, &cs);
            assert_eq!(
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "pos {pos}"
            );
            // Dims past the rotary part are untouched.
            assert_eq!(x[96..128], want[96..128]);
        }
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
}
