//! Gated DeltaNet (the linear-attention layers of Qwen3.5 and Qwen3-Next), one token at a time: the depthwise
//! causal conv1d step, the L2 norm, the β and g gates, the delta-rule recurrence over an f32 state per value head,
//! and the gated RMSNorm.
//!
//! Plain f32 loops. Per token they touch the recurrent state (dk·dv floats per value head) a few times, which is
//! small next to the layer's projections; prefill runs the same recurrence token by token (the chunked form would
//! change the summation order, and ours must match a decode step bit for bit). The caller owns every buffer: these
//! functions never allocate and keep no state of their own.

/// One step of a depthwise causal conv1d with SiLU, in place over `x` (`C` channels).
///
/// `w` is `[C, K]` (tap `K−1` multiplies the current input), `state` is `[C, K−1]`: each channel's previous `K−1`
/// inputs, oldest first, zeros at the start of a sequence. The state is shifted to take in `x`.
pub fn conv1d_silu_step(x: &mut [f32], w: &[f32], state: &mut [f32], kernel: usize) {
    let h = kernel - 1;
    for (c, v) in x.iter_mut().enumerate() {
        let wc = &w[c * kernel..(c + 1) * kernel];
        let st = &mut state[c * h..(c + 1) * h];
        let mut acc = 0f32;
        for j in 0..h {
            acc += st[j] * wc[j];
        }
        acc += *v * wc[h];
        if h > 0 {
            st.copy_within(1.., 0);
            st[h - 1] = *v;
        }
        *v = acc / (1.0 + (-acc).exp());
    }
}

/// `x / sqrt(Σx² + eps)` in place (the FLA/transformers `l2norm`, eps inside the root).
pub fn l2norm_inplace(x: &mut [f32], eps: f32) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + eps).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `log(1 + e^x)`, linear above 20 as torch's `softplus` is.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One delta-rule step for one value head: `S ← e^g·S; δ = β·(v − Sᵀk); S ← S + k·δᵀ; o = Sᵀq`.
///
/// `state` is `S`, `[dk, dv]` row-major; `q` and `k` have `dk` entries (already L2-normalised, `q` scaled), `v`
/// and `out` have `dv`.
pub fn delta_rule_step(state: &mut [f32], q: &[f32], k: &[f32], v: &[f32], g: f32, beta: f32, out: &mut [f32]) {
    let dv = v.len();
    let decay = g.exp();
    // δ = β(v − (e^g S)ᵀk), accumulated in `out`, which is free until the last loop.
    out.copy_from_slice(v);
    for (i, &ki) in k.iter().enumerate() {
        let row = &mut state[i * dv..(i + 1) * dv];
        for (s, o) in row.iter_mut().zip(out.iter_mut()) {
            *s *= decay;
            *o -= *s * ki;
        }
    }
    out.iter_mut().for_each(|o| *o *= beta);
    // S += k δᵀ, then o = Sᵀq, row by row so S is walked once more.
    let mut delta = [0f32; 512];
    let delta = if dv <= delta.len() {
        delta[..dv].copy_from_slice(out);
        &delta[..dv]
    } else {
        // Value heads above 512 dims do not exist in the models we run; stay correct anyway (one extra pass).
        return delta_rule_step_wide(state, q, k, out);
    };
    out.fill(0.0);
    for (i, (&ki, &qi)) in k.iter().zip(q).enumerate() {
        let row = &mut state[i * dv..(i + 1) * dv];
        for ((s, &d), o) in row.iter_mut().zip(delta).zip(out.iter_mut()) {
            *s += ki * d;
            *o += *s * qi;
        }
    }
}

/// The tail of [`delta_rule_step`] for `dv > 512`: `out` holds δ on entry and `Sᵀq` on return.
fn delta_rule_step_wide(state: &mut [f32], q: &[f32], k: &[f32], out: &mut [f32]) {
    let dv = out.len();
    for (i, &ki) in k.iter().enumerate() {
        for (s, &d) in state[i * dv..(i + 1) * dv].iter_mut().zip(out.iter()) {
            *s += ki * d;
        }
    }
    out.fill(0.0);
    for (i, &qi) in q.iter().enumerate() {
        for (o, &s) in out.iter_mut().zip(&state[i * dv..(i + 1) * dv]) {
            *o += s * qi;
        }
    }
}

/// Gated RMSNorm in place, per `w.len()`-sized head: `o ← w ⊙ o/rms(o) ⊙ silu(z)` (plain `w`, not `1 + w`).
pub fn rmsnorm_gated_inplace(o: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    for (head, zh) in o.chunks_exact_mut(d).zip(z.chunks_exact(d)) {
        let ms = head.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((v, &g), &zz) in head.iter_mut().zip(w).zip(zh) {
            *v = g * (*v * inv) * (zz / (1.0 + (-zz).exp()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recurrence written out with explicit matrices, in f64, for a few steps.
    fn check_matrix_form(dk: usize, dv: usize) {
        let mut s = vec![0f32; dk * dv];
        let mut s64 = vec![0f64; dk * dv];
        let mut out = vec![0f32; dv];
        for t in 0..4 {
            let f = |i: usize, m: f32| ((i as f32 * 0.7 + t as f32 * 1.3 + m).sin()) * 0.5;
            let q: Vec<f32> = (0..dk).map(|i| f(i, 0.1)).collect();
            let k: Vec<f32> = (0..dk).map(|i| f(i, 2.0)).collect();
            let v: Vec<f32> = (0..dv).map(|i| f(i, 4.0)).collect();
            let (g, beta) = (-0.3 - 0.1 * t as f32, 0.6);
            delta_rule_step(&mut s, &q, &k, &v, g, beta, &mut out);
            s64.iter_mut().for_each(|x| *x *= (g as f64).exp());
            let delta: Vec<f64> = (0..dv)
                .map(|j| beta as f64 * (v[j] as f64 - (0..dk).map(|i| s64[i * dv + j] * k[i] as f64).sum::<f64>()))
                .collect();
            for i in 0..dk {
                for j in 0..dv {
                    s64[i * dv + j] += k[i] as f64 * delta[j];
                }
            }
            for j in 0..dv {
                let o: f64 = (0..dk).map(|i| s64[i * dv + j] * q[i] as f64).sum();
                assert!((out[j] as f64 - o).abs() < 1e-5, "{dk}x{dv} step {t} out[{j}]: {} vs {o}", out[j]);
            }
        }
    }

    #[test]
    fn delta_rule_matches_the_matrix_form() {
        check_matrix_form(3, 5);
        check_matrix_form(16, 24);
        // Above the stack buffer: the wide path.
        check_matrix_form(2, 600);
    }

    #[test]
    fn conv_step_equals_a_causal_convolution() {
        let (c, kern) = (3, 4);
        let w: Vec<f32> = (0..c * kern).map(|i| (i as f32 * 0.37).sin()).collect();
        let xs: Vec<Vec<f32>> = (0..6).map(|t| (0..c).map(|ch| (t * 3 + ch) as f32 * 0.1 - 0.5).collect()).collect();
        let mut state = vec![0f32; c * (kern - 1)];
        for (t, x) in xs.iter().enumerate() {
            let mut y = x.clone();
            conv1d_silu_step(&mut y, &w, &mut state, kern);
            for ch in 0..c {
                // y_t = Σ_j w[K−1−j] · x_{t−j}, zero before the start.
                let acc: f32 = (0..kern).filter(|&j| j <= t).map(|j| w[ch * kern + kern - 1 - j] * xs[t - j][ch]).sum();
                let want = acc / (1.0 + (-acc).exp());
                assert!((y[ch] - want).abs() < 1e-6, "t {t} ch {ch}");
            }
        }
    }
}
