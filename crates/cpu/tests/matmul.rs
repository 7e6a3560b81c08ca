//! Every kernel table this CPU supports against the `moestream_quant` reference decode, on odd shapes.
//!
//! Bound: `|y - ref| ≤ 1e-5 · Σ_c (|W[r,c]| + |offset[r,c]|)·|x[c]|`, ref computed in f64. All paths are exact-f32
//! (no activation quantization): they decode every weight exactly (or with the same f32 products as the reference)
//! and differ only in summation order and in folding per-group scales and offsets (`d·Σqx`, `bias·Σx`). Each of
//! those roundings is ≤ 2⁻²⁴ relative to the magnitude of the terms it sums, and the terms are bounded by
//! `(|w| + |offset|)·|x|`; with ≤ 768 columns summed in 8–16 lanes, the observed worst is ~1.5e-7 (printed by
//! the test), so 1e-5 leaves margin without hiding a wrong block: a code offset off by one in one Q6_K kernel shows up as 2e-3.
//!
//! q8-activation tables (`Activations::Q8`) add the activation rounding: `|x − d_b·q| ≤ d_b/2` per element, with
//! `d_b = max|x|/127` over its 32-block (over its 256-group for Q4_K and Q6_K weights, quantized ggml-`Q8_K`
//! style), so their bound is the one above plus `Σ_c |W[r,c]|·d_b(c)/2`.
//!
//! Normalising by `|y|` instead would fail on rows whose terms cancel, which says nothing about the kernel.

mod common;

use common::{Rng, encodings_and_cols, make_weight};
use moestream_cpu::{Activations, Dispatch, MatmulError, ThreadPool, WeightView};
use moestream_quant::{Encoding, FloatType, GgmlType, QuantError};

const BOUND: f64 = 1e-5;

#[test]
fn gemv_matches_reference_for_every_encoding_and_isa() {
    let pool = ThreadPool::new(2);
    let dispatches: Vec<Dispatch> = Dispatch::supported().collect();
    println!("testing {:?}", dispatches.iter().map(|d| d.name()).collect::<Vec<_>>());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut observed = vec![0f64; dispatches.len()];
    for (encoding, cols_list) in encodings_and_cols() {
        for &cols in &cols_list {
            for rows in [1, 3, 17, 33] {
                let w = make_weight(encoding, rows, cols, &mut rng);
                let x = rng.vec(cols);
                let (want, scale) = w.reference(&x);
                let q8_term = q8_rounding(&w, &x);
                for (d, seen) in dispatches.iter().zip(observed.iter_mut()) {
                    let mut y = vec![f32::NAN; rows];
                    d.gemv(&pool, &w.view(), &x, &mut y).expect("valid shapes");
                    let q8 = d.activations() == Activations::Q8;
                    for r in 0..rows {
                        let err = (f64::from(y[r]) - want[r]).abs();
                        let allowed = BOUND * scale[r] + if q8 { q8_term[r] } else { 0.0 };
                        *seen = seen.max(err / allowed.max(1e-30));
                        assert!(
                            err <= allowed,
                            "{} {}: [{rows}, {cols}] row {r} error {err:e} > {allowed:e}",
                            d.name(),
                            encoding.name()
                        );
                    }
                }
            }
        }
    }
    for (d, worst) in dispatches.iter().zip(&observed) {
        println!("{}: worst error / allowed = {worst:.3}", d.name());
    }
}

/// `Σ_c |W[r,c]|·d_b(c)/2` per row when `cols` is whole 32-blocks (else q8 is not used), times 1.01 for the f32
/// rounding of `x/d` itself. The scale's block is 256 values for K-quant weights, 32 otherwise.
fn q8_rounding(w: &common::Weight, x: &[f32]) -> Vec<f64> {
    if !w.cols.is_multiple_of(32) {
        return vec![0.0; w.rows];
    }
    let block = if matches!(w.encoding, Encoding::Ggml(GgmlType::Q4K | GgmlType::Q6K)) { 256 } else { 32 };
    let half_step: Vec<f64> = x
        .chunks_exact(block)
        .flat_map(|b| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            std::iter::repeat_n(f64::from(amax) / 127.0 / 2.0 * 1.01, block)
        })
        .collect();
    w.dense
        .chunks_exact(w.cols)
        .map(|row| row.iter().zip(&half_step).map(|(&v, &h)| f64::from(v.abs()) * h).sum())
        .collect()
}

#[test]
fn gemm_equals_gemv_per_token() {
    let pool = ThreadPool::new(3);
    let mut rng = Rng(7);
    for (encoding, cols_list) in encodings_and_cols() {
        let cols = cols_list[cols_list.len() - 1];
        let w = make_weight(encoding, 19, cols, &mut rng);
        for d in Dispatch::supported() {
            for n in [0, 1, 2, 3, 4, 5, 8, 13] {
                let x = rng.vec(n * cols);
                let mut y = vec![f32::NAN; n * 19];
                d.gemm(&pool, &w.view(), &x, n, &mut y).expect("valid shapes");
                for t in 0..n {
                    let mut yt = vec![0f32; 19];
                    d.gemv(&pool, &w.view(), &x[t * cols..(t + 1) * cols], &mut yt).expect("valid shapes");
                    assert_eq!(&y[t * 19..(t + 1) * 19], &yt[..], "{} {} n={n} t={t}", d.name(), encoding.name());
                }
            }
        }
    }
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// The encodings the gathered tests run on: the ones MoE checkpoints use for experts.
fn expert_encodings() -> Vec<Encoding> {
    vec![
        Encoding::Ggml(GgmlType::Q4_0),
        Encoding::Ggml(GgmlType::Q8_0),
        Encoding::Ggml(GgmlType::Q4K),
        Encoding::Ggml(GgmlType::Q6K),
        Encoding::Float(FloatType::BF16),
        common::mlx(4, 64, FloatType::BF16),
        common::mlx(8, 32, FloatType::F16),
    ]
}

/// Gathered ops are built from the same row dots as `gemv`, so they must equal the composed result bit for bit.
#[test]
fn gathered_ops_equal_composed_gemv() {
    let pool = ThreadPool::new(3);
    let mut rng = Rng(11);
    let (hidden, inter) = (256, 256);
    for encoding in expert_encodings() {
        for d in Dispatch::supported() {
            for k in 1..=8 {
                let gate_up: Vec<_> = (0..k).map(|_| make_weight(encoding, 2 * 25, hidden, &mut rng)).collect();
                let i_rows = 25;
                let x = rng.vec(hidden);
                // Composed: gemv per expert, then silu·mul.
                let mut want = vec![0f32; k * i_rows];
                for (j, w) in gate_up.iter().enumerate() {
                    let mut y = vec![0f32; 2 * i_rows];
                    d.gemv(&pool, &w.view(), &x, &mut y).expect("valid");
                    for i in 0..i_rows {
                        want[j * i_rows + i] = silu(y[i]) * y[i_rows + i];
                    }
                }
                let views: Vec<WeightView> = gate_up.iter().map(|w| w.view()).collect();
                let mut got = vec![f32::NAN; k * i_rows];
                d.gathered_gate_up(&pool, &views, &x, &mut got).expect("valid");
                assert_eq!(got, want, "fused {} {} k={k}", d.name(), encoding.name());

                // Split: the same matrices cut into separate gate and up views.
                let rb = encoding.row_bytes(hidden).expect("fits");
                let sb = views[0].scales.len() / (2 * i_rows);
                let half = |v: &WeightView<'static>, second: bool| -> WeightView<'static> {
                    let o = usize::from(second) * i_rows;
                    WeightView {
                        rows: i_rows,
                        data: &v.data[o * rb..(o + i_rows) * rb],
                        scales: &v.scales[o * sb..(o + i_rows) * sb],
                        biases: &v.biases[o * sb..(o + i_rows) * sb],
                        ..*v
                    }
                };
                let leaked: Vec<WeightView<'static>> = gate_up
                    .iter()
                    .map(|w| WeightView {
                        data: w.data.clone().leak(),
                        scales: w.scales.clone().leak(),
                        biases: w.biases.clone().leak(),
                        ..w.view()
                    })
                    .collect();
                let gate: Vec<_> = leaked.iter().map(|v| half(v, false)).collect();
                let up: Vec<_> = leaked.iter().map(|v| half(v, true)).collect();
                let mut split = vec![f32::NAN; k * i_rows];
                d.gathered_gate_up_split(&pool, &gate, &up, &x, &mut split).expect("valid");
                assert_eq!(split, want, "split {} {} k={k}", d.name(), encoding.name());

                // Down: [H, I] per expert, weighted sum in expert order.
                let down: Vec<_> = (0..k).map(|_| make_weight(encoding, 37, inter, &mut rng)).collect();
                let h = rng.vec(k * inter);
                let weights = rng.vec(k);
                let mut want = vec![0f32; 37];
                for (j, w) in down.iter().enumerate() {
                    let mut y = vec![0f32; 37];
                    d.gemv(&pool, &w.view(), &h[j * inter..(j + 1) * inter], &mut y).expect("valid");
                    for r in 0..37 {
                        want[r] += weights[j] * y[r];
                    }
                }
                let views: Vec<WeightView> = down.iter().map(|w| w.view()).collect();
                let mut got = vec![f32::NAN; 37];
                d.gathered_down(&pool, &views, &h, &weights, &mut got).expect("valid");
                assert_eq!(got, want, "down {} {} k={k}", d.name(), encoding.name());

                // Parts: the odd experts first, then the even ones (as decode computes resident experts before
                // the ones being read), summed afterwards in expert order.
                let order: Vec<usize> = (1..k).step_by(2).chain((0..k).step_by(2)).collect();
                let cut = k / 2;
                let (mut hp, mut at) = (vec![0f32; k * inter], vec![0usize; k]);
                let vp: Vec<WeightView> = order.iter().map(|&j| views[j]).collect();
                for (p, &j) in order.iter().enumerate() {
                    hp[p * inter..(p + 1) * inter].copy_from_slice(&h[j * inter..(j + 1) * inter]);
                    at[j] = p;
                }
                let mut parts = vec![f32::NAN; k * 37];
                let (p0, p1) = parts.split_at_mut(cut * 37);
                d.gathered_down_parts(&pool, &vp[..cut], &hp[..cut * inter], p0).expect("valid");
                d.gathered_down_parts(&pool, &vp[cut..], &hp[cut * inter..], p1).expect("valid");
                let mut summed = vec![f32::NAN; 37];
                moestream_cpu::sum_parts(&parts, &at, &weights, &mut summed).expect("valid");
                assert_eq!(summed, want, "down parts {} {} k={k}", d.name(), encoding.name());
            }
        }
    }
}

/// Each output element is owned by one task with a fixed summation order, so thread count cannot change bits.
#[test]
fn thread_count_does_not_change_bits() {
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    let mut rng = Rng(3);
    for encoding in expert_encodings() {
        let w = make_weight(encoding, 301, 512, &mut rng);
        let down: Vec<_> = (0..8).map(|_| make_weight(encoding, 300, 256, &mut rng)).collect();
        let views: Vec<WeightView> = down.iter().map(|w| w.view()).collect();
        let (x, h, weights) = (rng.vec(512), rng.vec(8 * 256), rng.vec(8));
        for d in Dispatch::supported() {
            let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
            for pool in &pools {
                let mut y = vec![0f32; 301];
                d.gemv(pool, &w.view(), &x, &mut y).expect("valid");
                let mut o = vec![0f32; 300];
                d.gathered_down(pool, &views, &h, &weights, &mut o).expect("valid");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                match &first {
                    None => first = Some((y, o)),
                    Some((y1, o1)) => {
                        assert_eq!(bits(&y), bits(y1), "gemv {} {}", d.name(), encoding.name());
                        assert_eq!(bits(&o), bits(o1), "down {} {}", d.name(), encoding.name());
                    }
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let pool = ThreadPool::new(2);
    let q4 = Encoding::Ggml(GgmlType::Q4_0);
    let m4 = common::mlx(4, 64, FloatType::BF16);
    let bytes = vec![0u8; 4096];
    let view = |encoding, rows, cols, data: usize, side: usize| WeightView {
        encoding,
        rows,
        cols,
        data: &bytes[..data],
        scales: &bytes[..side],
        biases: &bytes[..side],
    };
    let table: Vec<(WeightView, MatmulError)> = vec![
        (view(q4, 2, 33, 0, 0), MatmulError::Cols { encoding: q4, cols: 33 }),
        (
            view(q4, 2, 64, 71, 0),
            MatmulError::Bytes { encoding: q4, what: "data", rows: 2, cols: 64, expected: 72, got: 71 },
        ),
        (
            view(q4, 2, 64, 72, 2),
            MatmulError::Bytes { encoding: q4, what: "scales", rows: 2, cols: 64, expected: 0, got: 2 },
        ),
        (
            view(m4, 3, 128, 192, 10),
            MatmulError::Bytes { encoding: m4, what: "scales", rows: 3, cols: 128, expected: 12, got: 10 },
        ),
        (
            view(common::mlx(4, 48, FloatType::F16), 1, 96, 48, 4),
            MatmulError::Params {
                encoding: common::mlx(4, 48, FloatType::F16),
                source: QuantError::MlxParams { what: "group_size", value: 48 },
            },
        ),
        (
            view(Encoding::Ggml(GgmlType::Q6K), 1, usize::MAX / 2 - 127, 0, 0),
            MatmulError::Cols { encoding: Encoding::Ggml(GgmlType::Q6K), cols: usize::MAX / 2 - 127 },
        ),
    ];
    for (w, want) in &table {
        assert_eq!(w.validate().as_ref(), Err(want), "{want}");
        let x = vec![0f32; w.cols.min(4096)];
        let mut y = vec![0f32; w.rows];
        assert_eq!(moestream_cpu::gemv(&pool, w, &x, &mut y).as_ref(), Err(want));
    }

    let ok = view(q4, 2, 64, 72, 0);
    let mut y = vec![0f32; 2];
    assert_eq!(
        moestream_cpu::gemv(&pool, &ok, &[0.0; 63], &mut y),
        Err(MatmulError::Len { what: "x", expected: 64, got: 63 })
    );
    assert_eq!(
        moestream_cpu::gemm(&pool, &ok, &[0.0; 128], 2, &mut y),
        Err(MatmulError::Len { what: "y", expected: 4, got: 2 })
    );
    let odd = view(q4, 3, 64, 108, 0);
    let mut out = vec![0f32; 1];
    assert_eq!(
        moestream_cpu::gathered_gate_up(&pool, &[odd], &[0.0; 64], &mut out),
        Err(MatmulError::OddGateUp { rows: 3 })
    );
    let other = view(q4, 4, 64, 144, 0);
    let mut out = vec![0f32; 2];
    assert_eq!(
        moestream_cpu::gathered_down(&pool, &[ok, other], &[0.0; 128], &[1.0, 1.0], &mut out),
        Err(MatmulError::SlotShape { what: "down", slot: 1, rows: 4, cols: 64, expected_rows: 2, expected_cols: 64 })
    );
    assert_eq!(
        moestream_cpu::gathered_down(&pool, &[ok], &[0.0; 64], &[1.0, 1.0], &mut out),
        Err(MatmulError::Len { what: "weights", expected: 1, got: 2 })
    );
}
