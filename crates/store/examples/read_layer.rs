//! Read throughput of expert misses, for each read mode: `cargo run --release -p moestream-store --example
//! read_layer -- MODEL [TOKENS]`. Per mode it drops the page cache (needs root; skipped with a note otherwise), opens
//! the store with top-k slots per layer, and for TOKENS tokens calls `ensure` on every MoE layer with k experts none
//! of which is resident, so each call is one layer's worth of misses read as one batch.

use std::time::Instant;

use moestream_format::TensorIndex;
use moestream_store::{CacheSize, ExpertStore, ReadOptions};

fn drop_page_cache() -> bool {
    std::process::Command::new("sync").status().is_ok_and(|s| s.success())
        && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().ok_or("usage: read_layer MODEL [TOKENS]")?;
    let tokens: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(16);
    let index = TensorIndex::open(model.as_ref())?;
    let c = &index.config;
    let (e, k) = (c.num_experts, c.num_experts_per_tok);
    let layers: Vec<usize> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).collect();
    println!("| direct | io threads | first layer batch MB/s | all batches MB/s | disk MB / useful MB | batches |");
    println!("|---|---|---|---|---|---|");
    for (direct, threads) in [(false, 1), (false, 8), (true, 1), (true, 8)] {
        let dropped = drop_page_cache();
        let o = ReadOptions { direct_io: direct, io_threads: threads, ..ReadOptions::default() };
        let mut store = ExpertStore::open_with(&index, CacheSize::Slots(k), &o)?;
        let mut slots = vec![0u32; k];
        let (mut first, mut total) = (0f64, 0f64);
        for t in 0..tokens {
            // Token t uses experts (t·k + j)·37 mod e, j < k: never resident with k slots, and scattered over the
            // stack (37 is coprime with the usual power-of-two expert counts) so readahead does not serve them.
            let experts: Vec<u32> = (0..k).map(|j| (((t * k + j) * 37) % e) as u32).collect();
            for &l in &layers {
                let t0 = Instant::now();
                store.ensure(l, &experts, &mut slots)?;
                let dt = t0.elapsed().as_secs_f64();
                if total == 0.0 {
                    first = store.stats().bytes_read as f64 / dt;
                }
                total += dt;
            }
        }
        let st = store.stats();
        println!(
            "| {}{} | {threads} | {:.0} | {:.0} | {:.1} / {:.1} | {} |",
            if st.direct_io.iter().all(|&d| d) { "on" } else { "off" },
            if dropped { "" } else { " (page cache NOT dropped)" },
            first / 1e6,
            st.bytes_read as f64 / total / 1e6,
            st.bytes_read_disk as f64 / 1e6,
            st.bytes_read as f64 / 1e6,
            st.read_batches,
        );
    }
    Ok(())
}
