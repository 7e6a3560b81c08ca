//! `Q4_0x16`, `Q4_Kx16` and `Q6_Kx16` (16-row regrouped `Q4_0` / `Q4_K` / `Q6_K`) through every table and entry
//! point.
//!
//! The packed kernels promise one per-(row, token) arithmetic (exact integer block sums, then one FMA per block
//! with `d_w·d_x`; for the K forms one per super-block, plus one for `Q4_Kx16`'s mins), so: every q8 table —
//! the scalar group kernel (tables without one), AVX-512 VNNI (1 and 4 tokens), AMX — gives the same bits; `gemm` equals `gemv` per token; the gathered ops equal composed `gemv`s; thread counts do not
//! matter. Against the f64 reference the bound is the one `tests/matmul.rs` states for q8 tables.

#[allow(dead_code)] // shared with tests/matmul.rs, which uses all of it
mod common;

use common::{Rng, make_weight};
use moestream_cpu::{Activations, Dispatch, MatmulError, ThreadPool, WeightView};
use moestream_quant::{Encoding, GgmlType};

/// Each packed encoding with the column counts to test it at (odd block counts) and its row-major source.
fn packed() -> [(Encoding, Encoding, Vec<usize>); 3] {
    [
        (Encoding::Q4_0x16, Encoding::Ggml(GgmlType::Q4_0), vec![32, 96, 224, 512]),
        (Encoding::Q4Kx16, Encoding::Ggml(GgmlType::Q4K), vec![256, 768, 1280]),
        (Encoding::Q6Kx16, Encoding::Ggml(GgmlType::Q6K), vec![256, 768, 1280]),
    ]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Every supported table, plus each AMX table without AMX (to compare the two prefill paths).
fn tables() -> Vec<Dispatch> {
    let mut v: Vec<Dispatch> = Dispatch::supported().collect();
    v.extend(Dispatch::supported().filter(|d| d.uses_amx()).map(Dispatch::without_amx));
    v
}

#[test]
fn gemv_matches_reference_and_every_q8_table_agrees() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0x51);
    for (p, _, cols_list) in packed() {
        for (cols, rows) in cols_list.into_iter().flat_map(|c| [(c, 16), (c, 48)]) {
            let w = make_weight(p, rows, cols, &mut rng);
            let x = rng.vec(cols);
            let (want, scale) = w.reference(&x);
            // q8 rounding bound: Σ_c |W[r,c]|·(max|x| over c's 32-block, or 256-group for Q4_K)/127/2, with 1%
            // for rounding of x/d.
            let block = if p == Encoding::Q4_0x16 { 32 } else { 256 };
            let half: Vec<f64> = x
                .chunks_exact(block)
                .flat_map(|b| {
                    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    std::iter::repeat_n(f64::from(m) / 127.0 / 2.0 * 1.01, block)
                })
                .collect();
            let mut q8_bits: Option<Vec<u32>> = None;
            for d in tables() {
                let mut y = vec![f32::NAN; rows];
                d.gemv(&pool, &w.view(), &x, &mut y).expect("valid");
                let q8 = d.activations() == Activations::Q8;
                for r in 0..rows {
                    let q8_term: f64 = if q8 {
                        w.dense[r * cols..(r + 1) * cols].iter().zip(&half).map(|(v, h)| f64::from(v.abs()) * h).sum()
                    } else {
                        0.0
                    };
                    let allowed = 1e-5 * scale[r] + q8_term;
                    let err = (f64::from(y[r]) - want[r]).abs();
                    let name = p.name();
                    assert!(
                        err <= allowed,
                        "{} {name} [{rows}, {cols}] row {r}: error {err:e} > {allowed:e}",
                        d.name()
                    );
                }
                if q8 {
                    match &q8_bits {
                        None => q8_bits = Some(bits(&y)),
                        Some(b) => {
                            assert_eq!(&bits(&y), b, "{} {} differs from the first q8 table", d.name(), p.name())
                        }
                    }
                }
            }
        }
    }
}

/// `gemv_many` puts weights of one encoding in one pool run (task indices offset per weight) and splits runs at
/// encoding changes; every output must equal that weight's own `gemv` bit for bit, whatever the mix.
#[test]
fn gemv_many_equals_one_gemv_per_weight() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    let mut rng = Rng(0x77);
    let q4k = Encoding::Ggml(GgmlType::Q4K);
    let q6k = Encoding::Ggml(GgmlType::Q6K);
    // Attention-like mixes at 256 and 512 columns: Q4_0 all packed; Q4_K_M's Q6_K v between packed q and k and
    // a trailing packed o; an odd row count on row-major weights; more weights than one run takes (5 > 4).
    let mixes: [(usize, Vec<(Encoding, usize)>); 5] = [
        (512, vec![(Encoding::Q4_0x16, 64), (Encoding::Q4_0x16, 16), (Encoding::Q4_0x16, 16)]),
        (256, vec![(Encoding::Q4Kx16, 48), (Encoding::Q4Kx16, 16), (q6k, 16), (Encoding::Q4Kx16, 32)]),
        (512, vec![(Encoding::Q4Kx16, 32), (Encoding::Q4Kx16, 16), (Encoding::Q6Kx16, 16), (Encoding::Q6Kx16, 32)]),
        (256, vec![(q6k, 7), (q4k, 33), (q4k, 5)]),
        (512, vec![(Encoding::Q4_0x16, 16); 5]),
    ];
    for (cols, mix) in mixes {
        let ws: Vec<_> = mix.iter().map(|&(e, rows)| make_weight(e, rows, cols, &mut rng)).collect();
        let views: Vec<WeightView> = ws.iter().map(|w| w.view()).collect();
        let x = rng.vec(cols);
        for d in tables() {
            for pool in &pools {
                let mut outs: Vec<Vec<f32>> = views.iter().map(|v| vec![f32::NAN; v.rows]).collect();
                let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                d.gemv_many(pool, &views, &x, &mut ys).expect("valid");
                for (i, v) in views.iter().enumerate() {
                    let mut want = vec![f32::NAN; v.rows];
                    d.gemv(pool, v, &x, &mut want).expect("valid");
                    assert_eq!(bits(&outs[i]), bits(&want), "{} weight {i} ({})", d.name(), v.encoding.name());
                }
            }
        }
        // A wrong output length names the output, and nothing else is computed.
        let mut short = vec![0f32; views[1].rows - 1];
        let mut first = vec![f32::NAN; views[0].rows];
        let err = Dispatch::best().gemv_many(&pools[1], &views[..2], &x, &mut [&mut first, &mut short]);
        assert_eq!(err, Err(MatmulError::Len { what: "y", expected: views[1].rows, got: views[1].rows - 1 }));
        assert!(first.iter().all(|v| v.is_nan()), "a refused call wrote output");
        assert_eq!(
            Dispatch::best().gemv_many(&pools[1], &views[..2], &x, &mut [&mut first]),
            Err(MatmulError::Len { what: "outputs", expected: 2, got: 1 })
        );
    }
}

#[test]
fn packed_equals_row_major_values_in_exact_f32() {
    // The exact tables dequantize packed groups: same values as the Q4_0 rows, summed in the same column order.
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0x52);
    for (p, source, cols_list) in packed() {
        let cols = cols_list[1];
        let w = make_weight(p, 32, cols, &mut rng);
        let mut rowmajor = vec![0u8; w.data.len()];
        match p {
            Encoding::Q4Kx16 => moestream_quant::packed::unpack_q4_kx16(&w.data, &mut rowmajor, 32, cols),
            Encoding::Q6Kx16 => moestream_quant::packed::unpack_q6_kx16(&w.data, &mut rowmajor, 32, cols),
            _ => moestream_quant::packed::unpack_q4_0x16(&w.data, &mut rowmajor, 32, cols),
        }
        .expect("unpack");
        let q4 = WeightView { encoding: source, data: &rowmajor, ..w.view() };
        let x = rng.vec(cols);
        let d = Dispatch::scalar();
        let (mut a, mut b) = (vec![0f32; 32], vec![0f32; 32]);
        d.gemv(&pool, &w.view(), &x, &mut a).expect("valid");
        d.gemv(&pool, &q4, &x, &mut b).expect("valid");
        assert_eq!(bits(&a), bits(&b), "{}", p.name());
    }
}

#[test]
fn gemm_equals_gemv_per_token() {
    let pool = ThreadPool::new(3);
    let mut rng = Rng(0x53);
    for (p, cols) in packed().into_iter().flat_map(|(p, _, c)| [(p, c[0]), (p, c[2])]) {
        let w = make_weight(p, 48, cols, &mut rng);
        for d in tables() {
            for n in [0, 1, 2, 5, 16, 17, 33] {
                let x = rng.vec(n * cols);
                let mut y = vec![f32::NAN; n * 48];
                d.gemm(&pool, &w.view(), &x, n, &mut y).expect("valid");
                for t in 0..n {
                    let mut yt = vec![0f32; 48];
                    d.gemv(&pool, &w.view(), &x[t * cols..(t + 1) * cols], &mut yt).expect("valid");
                    let (name, enc) = (d.name(), p.name());
                    assert_eq!(bits(&y[t * 48..(t + 1) * 48]), bits(&yt), "{name} {enc} cols {cols} n={n} t={t}");
                }
            }
        }
    }
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

#[test]
fn gathered_ops_equal_composed_gemv_at_any_thread_count() {
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    let mut rng = Rng(0x54);
    // Q4_K: the down projection's columns (inter) must be whole 256-element super-blocks.
    for (p, hidden, inter) in [(Encoding::Q4_0x16, 96, 32), (Encoding::Q4Kx16, 256, 256), (Encoding::Q6Kx16, 256, 256)]
    {
        for d in tables() {
            for k in [1, 3, 8] {
                let pool = &pools[k % 3];
                let gate_up: Vec<_> = (0..k).map(|_| make_weight(p, 2 * inter, hidden, &mut rng)).collect();
                let x = rng.vec(hidden);
                let mut want = vec![0f32; k * inter];
                for (j, w) in gate_up.iter().enumerate() {
                    let mut y = vec![0f32; 2 * inter];
                    d.gemv(pool, &w.view(), &x, &mut y).expect("valid");
                    for i in 0..inter {
                        want[j * inter + i] = silu(y[i]) * y[inter + i];
                    }
                }
                let views: Vec<WeightView> = gate_up.iter().map(|w| w.view()).collect();
                let mut got = vec![f32::NAN; k * inter];
                d.gathered_gate_up(pool, &views, &x, &mut got).expect("valid");
                assert_eq!(bits(&got), bits(&want), "fused {} k={k}", d.name());

                // Halves of a packed [2I, H] matrix are whole groups, so they are packed [I, H] matrices themselves.
                let half = |v: &WeightView<'static>, second: bool| {
                    let n = v.data.len() / 2;
                    WeightView { rows: inter, data: if second { &v.data[n..] } else { &v.data[..n] }, ..*v }
                };
                let leaked: Vec<WeightView<'static>> = gate_up
                    .iter()
                    .map(|w| WeightView { data: w.data.clone().leak(), scales: &[], biases: &[], ..w.view() })
                    .collect();
                let gate: Vec<_> = leaked.iter().map(|v| half(v, false)).collect();
                let up: Vec<_> = leaked.iter().map(|v| half(v, true)).collect();
                let mut split = vec![f32::NAN; k * inter];
                d.gathered_gate_up_split(pool, &gate, &up, &x, &mut split).expect("valid");
                assert_eq!(bits(&split), bits(&want), "split {} k={k}", d.name());

                let down: Vec<_> = (0..k).map(|_| make_weight(p, hidden, inter, &mut rng)).collect();
                let h = rng.vec(k * inter);
                let weights = rng.vec(k);
                let mut want = vec![0f32; hidden];
                for (j, w) in down.iter().enumerate() {
                    let mut y = vec![0f32; hidden];
                    d.gemv(pool, &w.view(), &h[j * inter..(j + 1) * inter], &mut y).expect("valid");
                    for r in 0..hidden {
                        want[r] += weights[j] * y[r];
                    }
                }
                let views: Vec<WeightView> = down.iter().map(|w| w.view()).collect();
                let mut got = vec![f32::NAN; hidden];
                d.gathered_down(pool, &views, &h, &weights, &mut got).expect("valid");
                assert_eq!(bits(&got), bits(&want), "down {} k={k}", d.name());

                let mut parts = vec![f32::NAN; k * hidden];
                d.gathered_down_parts(pool, &views, &h, &mut parts).expect("valid");
                let at: Vec<usize> = (0..k).collect();
                let mut summed = vec![f32::NAN; hidden];
                moestream_cpu::sum_parts(&parts, &at, &weights, &mut summed).expect("valid");
                assert_eq!(bits(&summed), bits(&want), "down parts {} k={k}", d.name());
            }
        }
    }
}

#[test]
fn bad_packed_shapes_are_errors_not_panics() {
    let pool = ThreadPool::new(2);
    let bytes = vec![0u8; 4096];
    let view = |encoding, rows, cols, data: usize| WeightView {
        encoding,
        rows,
        cols,
        data: &bytes[..data],
        scales: &[],
        biases: &[],
    };
    const P: Encoding = Encoding::Q4_0x16;
    let eight = view(P, 8, 64, 8 * 36);
    let want = MatmulError::PackedRows { encoding: P, what: "the row count", rows: 8, cols: 64 };
    assert_eq!(eight.validate(), Err(want.clone()));
    assert_eq!(moestream_cpu::gemv(&pool, &eight, &[0.0; 64], &mut [0.0; 8]), Err(want));

    // A fused [2I, H] view whose halves are not whole groups.
    let odd_halves = view(P, 48, 64, 48 * 36);
    assert_eq!(
        moestream_cpu::gathered_gate_up(&pool, &[odd_halves], &[0.0; 64], &mut [0.0; 24]),
        Err(MatmulError::PackedRows { encoding: P, what: "each half of gate_up", rows: 48, cols: 64 })
    );

    let packed = view(P, 16, 64, 16 * 36);
    let rowmajor = view(Encoding::Ggml(GgmlType::Q4_0), 16, 64, 16 * 36);
    assert_eq!(
        moestream_cpu::gathered_down(&pool, &[packed, rowmajor], &[0.0; 128], &[1.0, 1.0], &mut [0.0; 16]),
        Err(MatmulError::MixedPacking { what: "down", slot: 1, got: "Q4_0".into(), first: "Q4_0x16".into() })
    );

    // Q4_Kx16: a partial group, a column count that is not whole super-blocks, and the two packed forms mixed.
    let k = Encoding::Q4Kx16;
    let eight = view(k, 8, 256, 8 * 144);
    assert_eq!(
        eight.validate(),
        Err(MatmulError::PackedRows { encoding: k, what: "the row count", rows: 8, cols: 256 })
    );
    assert_eq!(view(k, 16, 96, 16 * 54).validate(), Err(MatmulError::Cols { encoding: k, cols: 96 }));
    let (k16, q16) = (view(k, 16, 256, 16 * 144), view(P, 16, 256, 16 * 144));
    assert_eq!(
        moestream_cpu::gathered_down(&pool, &[k16, q16], &[0.0; 512], &[1.0, 1.0], &mut [0.0; 16]),
        Err(MatmulError::MixedPacking { what: "down", slot: 1, got: "Q4_0x16".into(), first: "Q4_Kx16".into() })
    );
}
