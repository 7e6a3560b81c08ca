//! gemv throughput on Qwen3-30B-A3B expert shapes, in weight bytes per second.
//!
//! Shapes: fused gate_up `[1536, 2048]` and down `[2048, 768]` (moe_intermediate 768, hidden 2048). `hot` reuses
//! one matrix (it stays in L2/L3, so this measures the kernel); `cold` cycles through enough copies (≥ 256 MiB) that
//! every call streams from DRAM, which is what a decode step over k experts sees. Run with
//! `cargo bench -p moestream-cpu --bench matmul`.

use divan::Bencher;
use divan::counter::BytesCount;
use moestream_cpu::{Dispatch, ThreadPool, WeightView};
use moestream_quant::{Encoding, FloatType, GgmlType, MlxAffine, encode_floats, ggml, mlx};

fn main() {
    divan::main();
}

const ENCODINGS: [&str; 8] = ["Q4_0", "Q4_0x16", "Q4_K", "Q4_Kx16", "Q6_K", "Q6_Kx16", "Q8_0", "MLX_Q4_G64"];
const SHAPES: [(&str, usize, usize); 2] = [("gate_up", 1536, 2048), ("down", 2048, 768)];

fn encoding(name: &str) -> Encoding {
    match name {
        "Q4_0" => Encoding::Ggml(GgmlType::Q4_0),
        "Q4_0x16" => Encoding::Q4_0x16,
        "Q4_K" => Encoding::Ggml(GgmlType::Q4K),
        "Q4_Kx16" => Encoding::Q4Kx16,
        "Q6_Kx16" => Encoding::Q6Kx16,
        "Q6_K" => Encoding::Ggml(GgmlType::Q6K),
        "Q8_0" => Encoding::Ggml(GgmlType::Q8_0),
        _ => Encoding::MlxAffine { params: MlxAffine { bits: 4, group_size: 64 }, scale_type: FloatType::BF16 },
    }
}

struct Owned {
    data: Vec<u8>,
    scales: Vec<u8>,
    biases: Vec<u8>,
}

/// Deterministic pseudo-random weights, one set per `seed` (values only matter in that they are finite and normal).
fn make(enc: Encoding, rows: usize, cols: usize, seed: u64) -> Owned {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let src: Vec<f32> = (0..rows * cols).map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect();
    match enc {
        // No encoder for K-quants here: random codes and scales, with finite f16 super-block scales.
        Encoding::Ggml(GgmlType::Q4K) => {
            let mut data: Vec<u8> = (0..rows * cols / 256 * 144).map(|_| next() as u8).collect();
            for b in data.chunks_exact_mut(144) {
                b[0..4].copy_from_slice(&[0x00, 0x1c, 0x00, 0x1c]); // d = dmin = 2^-8 as f16
            }
            Owned { data, scales: vec![], biases: vec![] }
        }
        Encoding::Ggml(GgmlType::Q6K) => {
            let mut data: Vec<u8> = (0..rows * cols / 256 * 210).map(|_| next() as u8).collect();
            for b in data.chunks_exact_mut(210) {
                b[208..210].copy_from_slice(&[0x00, 0x1c]); // d = 2^-8 as f16
            }
            Owned { data, scales: vec![], biases: vec![] }
        }
        Encoding::Ggml(t) => {
            let mut data = vec![0u8; t.row_bytes(cols).expect("fits") * rows];
            ggml::quantize(t, &src, &mut data).expect("quantize");
            Owned { data, scales: vec![], biases: vec![] }
        }
        Encoding::MlxAffine { params, scale_type } => {
            let groups = rows * cols / params.group_size;
            let mut data = vec![0u8; params.packed_bytes(rows * cols)];
            let (mut s, mut b) = (vec![0f32; groups], vec![0f32; groups]);
            mlx::quantize(params, &src, cols, &mut data, &mut s, &mut b).expect("mlx quantize");
            let (mut scales, mut biases) = (vec![0u8; groups * 2], vec![0u8; groups * 2]);
            encode_floats(scale_type, &s, &mut scales).expect("scales");
            encode_floats(scale_type, &b, &mut biases).expect("biases");
            Owned { data, scales, biases }
        }
        Encoding::Q4_0x16 | Encoding::Q4Kx16 | Encoding::Q6Kx16 => {
            let source = Encoding::Ggml(match enc {
                Encoding::Q4Kx16 => GgmlType::Q4K,
                Encoding::Q6Kx16 => GgmlType::Q6K,
                _ => GgmlType::Q4_0,
            });
            let rowmajor = make(source, rows, cols, seed);
            let mut data = vec![0u8; rowmajor.data.len()];
            moestream_quant::packed::pack(source, &rowmajor.data, &mut data, rows, cols).expect("pack");
            Owned { data, scales: vec![], biases: vec![] }
        }
        Encoding::Float(_) => unreachable!("not benchmarked"),
    }
}

fn cases() -> Vec<String> {
    let mut v = Vec::new();
    for d in Dispatch::supported() {
        for e in ENCODINGS {
            for (s, _, _) in SHAPES {
                v.push(format!("{}/{e}/{s}", d.name()));
            }
        }
    }
    v
}

fn run(bencher: Bencher, case: &str, copies_for_bytes: usize) {
    run_n(bencher, case, copies_for_bytes, 1);
}

fn run_n(bencher: Bencher, case: &str, copies_for_bytes: usize, n: usize) {
    let mut parts = case.split('/');
    let (isa, enc, shape) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let d = Dispatch::supported().find(|d| d.name() == isa).expect("supported table");
    let enc = encoding(enc);
    let &(_, rows, cols) = SHAPES.iter().find(|s| s.0 == shape).expect("shape");
    let w = make(enc, rows, cols, 0);
    let bytes = w.data.len() + w.scales.len() + w.biases.len();
    // Enough copies that the working set is far larger than any cache. Each its own random weights: byte-identical
    // clones read at 31–37 GB/s on a 2-core AMD VM whose memory gives 17–19 (the host may merge identical pages, so
    // the "copies" shared cache lines); distinct ones at 12–16.
    let copies = copies_for_bytes.div_ceil(bytes).max(1);
    let store: Vec<Owned> = std::iter::once(w).chain((1..copies).map(|c| make(enc, rows, cols, c as u64))).collect();
    let views: Vec<WeightView> = store
        .iter()
        .map(|o| WeightView { encoding: enc, rows, cols, data: &o.data, scales: &o.scales, biases: &o.biases })
        .collect();
    let pool = ThreadPool::new(2);
    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; n * rows];
    let mut i = 0;
    // Bytes × tokens: for n > 1 the rate is weight bytes applied per second (gemm work), not bytes streamed.
    bencher.counter(BytesCount::new(bytes * n)).bench_local(|| {
        if n == 1 {
            d.gemv(&pool, &views[i], &x, &mut y).expect("valid");
        } else {
            d.gemm(&pool, &views[i], &x, n, &mut y).expect("valid");
        }
        i = (i + 1) % views.len();
    });
}

/// One matrix, reused: cache-resident.
#[divan::bench(args = cases(), max_time = 1.0)]
fn hot(bencher: Bencher, case: &str) {
    run(bencher, case, 0);
}

/// 256 MiB of copies, cycled: every call streams its weights from DRAM.
#[divan::bench(args = cases(), max_time = 1.0)]
fn cold(bencher: Bencher, case: &str) {
    run(bencher, case, 256 << 20);
}

/// Prefill-like: one matrix × 32 tokens (an expert's share of a 512-token prompt), cache-resident. Q4_0, Q4_K
/// and their packed forms on the q8 tables only: the comparison the packed layouts exist for.
#[divan::bench(
    args = cases().into_iter().filter(|c| c.contains("-q8/Q4_0") || c.contains("-q8/Q4_K")).collect::<Vec<_>>(),
    max_time = 1.0
)]
fn gemm32(bencher: Bencher, case: &str) {
    run_n(bencher, case, 0, 32);
}
