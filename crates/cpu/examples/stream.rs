//! Streaming rate of a packed (`Q4_0x16`, or `Q4_Kx16` with `ENC=q4k`) gemv against a plain summing loop over
//! the same bytes, in one
//! process and one time window: this machine's bandwidth drifts by ±20% between runs, so only the ratio of the
//! two is comparable across runs. The working set (default 2 GiB) is far beyond the L3 (300 MiB here), which
//! the 256 MiB `cold` case of `benches/matmul.rs` is not. The summing loop is built for the baseline target
//! (SSE2) and reads less than `bench/membw.c` (`-march=native`), which stays the harness's bandwidth bound.
//!
//! `cargo run --release -p moestream-cpu --example stream -- [ROWS] [COLS] [MIB] [THREADS]`, defaults
//! `1536 2048 2048 2` (a Qwen3-30B-A3B fused gate_up). `ISA=avx2-q8` picks another dispatch table; `ENC=q4k`
//! streams `Q4_Kx16` (random codes and scales, finite f16 `d`/`dmin`; `COLS` a multiple of 256).
use std::time::Instant;

use moestream_cpu::{Dispatch, ThreadPool, WeightView};
use moestream_quant::{Encoding, GgmlType, ggml};

fn arg(i: usize, default: usize) -> usize {
    std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let (rows, cols, mib, threads) = (arg(1, 1536), arg(2, 2048), arg(3, 2048), arg(4, 2));
    let isa = std::env::var("ISA").unwrap_or_else(|_| "avx512-q8".into());
    let Some(d) = Dispatch::supported().find(|d| d.name() == isa) else {
        eprintln!("dispatch table {isa} is not supported here");
        std::process::exit(2);
    };
    if rows % 16 != 0 || cols % 32 != 0 {
        eprintln!("rows must be a multiple of 16 and cols of 32 (got {rows} x {cols})");
        std::process::exit(2);
    }
    let src: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.618).sin()).collect();
    let k_quant = std::env::var("ENC").is_ok_and(|e| e == "q4k");
    if k_quant && cols % 256 != 0 {
        eprintln!("ENC=q4k needs cols to be a multiple of 256 (got {cols})");
        std::process::exit(2);
    }
    let (t, packed) = if k_quant { (GgmlType::Q4K, Encoding::Q4Kx16) } else { (GgmlType::Q4_0, Encoding::Q4_0x16) };
    let mut rowmajor = vec![0u8; t.row_bytes(cols).expect("row size") * rows];
    if k_quant {
        // No K-quant encoder: random bytes, with d = dmin = 2^-8 so every value is finite.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for b in rowmajor.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        for blk in rowmajor.chunks_exact_mut(144) {
            blk[..4].copy_from_slice(&[0x00, 0x1c, 0x00, 0x1c]);
        }
    } else {
        ggml::quantize(t, &src, &mut rowmajor).expect("quantize");
    }
    let mut one = vec![0u8; rowmajor.len()];
    moestream_quant::packed::pack(Encoding::Ggml(t), &rowmajor, &mut one, rows, cols).expect("pack");
    let copies = ((mib << 20) / one.len()).max(1);
    let big = huge_zeroed(copies * one.len());
    let big: &mut [u8] = big;
    for c in big.chunks_exact_mut(one.len()) {
        c.copy_from_slice(&one);
    }
    let views: Vec<WeightView> = big
        .chunks_exact(one.len())
        .map(|data| WeightView { encoding: packed, rows, cols, data, scales: &[], biases: &[] })
        .collect();
    let gbs = |dt: f64| big.len() as f64 / dt / 1e9;
    for pass in 0..3 {
        let t0 = Instant::now();
        let chunk = big.len().div_ceil(threads.max(1));
        let sum = std::thread::scope(|sc| {
            let hs: Vec<_> = big
                .chunks(chunk)
                .map(|c| {
                    sc.spawn(move || {
                        c.chunks_exact(8)
                            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                            .fold(0, u64::wrapping_add)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("summing thread")).fold(0u64, u64::wrapping_add)
        });
        println!("sum  pass {pass}: {:6.2} GB/s (checksum {})", gbs(t0.elapsed().as_secs_f64()), sum & 0xff);
    }
    let pool = ThreadPool::new(threads);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; rows];
    for pass in 0..3 {
        let t0 = Instant::now();
        for v in &views {
            d.gemv(&pool, v, &x, &mut y).expect("valid view");
        }
        println!(
            "gemv pass {pass}: {:6.2} GB/s ({}, {copies} x {} B)",
            gbs(t0.elapsed().as_secs_f64()),
            d.name(),
            one.len()
        );
    }
}

/// Anonymous memory marked `MADV_HUGEPAGE` before first touch, as `moestream_store`'s slot buffers are (this
/// kernel's transparent huge pages are madvise-only): the decode path streams from 2 MiB pages, so the
/// comparison must too. Leaked: the example exits right after.
fn huge_zeroed(len: usize) -> &'static mut [u8] {
    // SAFETY: a fresh private anonymous mapping of `len` bytes, checked for failure, never unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap of {len} bytes failed");
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        std::slice::from_raw_parts_mut(p.cast::<u8>(), len)
    }
}
