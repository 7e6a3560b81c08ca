//! Causal attention on Qwen3-30B-A3B's shape (32 query heads over 4 kv heads, head dim 128), one thread.
//!
//! `prefill`: every head of a 512-token chunk starting at position 0 (positions 1..=512, the work of one layer
//! of a 512-token prefill), called with `HEADS` query heads per call as the engine's tasks do. `decode`: one
//! token over 4096 cached positions. Run with `cargo bench -p moestream-cpu --bench attention`. The scalar
//! reference is not timed: on x86 its `f32::mul_add` is a libm call per element.

use divan::Bencher;
use divan::counter::ItemsCount;
use moestream_cpu::Isa;
use moestream_cpu::attention::{AttnDispatch, AttnShape};

fn main() {
    divan::main();
}

const SHAPE: AttnShape = AttnShape { n_heads: 32, n_kv_heads: 4, head_dim: 128, scale: 0.088_388_35 };

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `n` values starting on a 64-byte boundary, as the engine allocates its KV cache (a 64-byte load that straddles
/// two cache lines costs two L1 accesses).
struct Aligned {
    buf: Vec<f32>,
    at: usize,
    n: usize,
}

impl Aligned {
    fn noise(n: usize, seed: u64) -> Aligned {
        let buf = noise(n + 16, seed);
        let at = (64 - buf.as_ptr() as usize % 64) % 64 / 4;
        Aligned { buf, at, n }
    }

    fn get(&self) -> &[f32] {
        &self.buf[self.at..self.at + self.n]
    }
}

fn table(name: &str) -> Option<AttnDispatch> {
    Isa::ALL.into_iter().find(|i| i.name() == name).and_then(AttnDispatch::new)
}

#[divan::bench(args = ["avx2", "avx512"], consts = [1, 4, 8])]
fn prefill<const HEADS: usize>(bencher: Bencher, isa: &str) {
    let Some(t) = table(isa) else { return };
    let (n, d, row) = (512, SHAPE.head_dim, SHAPE.n_kv_heads * SHAPE.head_dim);
    let (q, k, v) = (noise(n * SHAPE.n_heads * d, 1), Aligned::noise(n * row, 2), Aligned::noise(n * row, 3));
    let (k, v) = (k.get(), v.get());
    let mut scores = vec![0f32; HEADS * n];
    let mut out = vec![0f32; HEADS * d];
    bencher.counter(ItemsCount::new(n)).bench_local(|| {
        for h0 in (0..SHAPE.n_heads).step_by(HEADS) {
            for tok in 0..n {
                let qt = &q[tok * SHAPE.n_heads * d..(tok + 1) * SHAPE.n_heads * d];
                t.attend(&SHAPE, qt, k, v, tok + 1, h0..h0 + HEADS, &mut scores, &mut out);
            }
        }
    });
}

#[divan::bench(args = ["avx2", "avx512"])]
fn decode(bencher: Bencher, isa: &str) {
    let Some(t) = table(isa) else { return };
    let (n_pos, d, row) = (4096, SHAPE.head_dim, SHAPE.n_kv_heads * SHAPE.head_dim);
    let (q, k, v) = (noise(SHAPE.n_heads * d, 1), Aligned::noise(n_pos * row, 2), Aligned::noise(n_pos * row, 3));
    let (k, v) = (k.get(), v.get());
    let mut scores = vec![0f32; SHAPE.n_heads * n_pos];
    let mut out = vec![0f32; SHAPE.n_heads * d];
    bencher.bench_local(|| t.attend(&SHAPE, &q, k, v, n_pos, 0..SHAPE.n_heads, &mut scores, &mut out));
}
