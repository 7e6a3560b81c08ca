//! A warm `ensure` that misses allocates nothing, on the calling thread or the I/O threads: a counting global
//! allocator sees no allocation during a second pass over a routing sequence that keeps missing.
//! (Its own test binary, so no other test allocates concurrently.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use moestream_store::{CacheSize, ExpertStore, ReadOptions};
use moestream_synth::SynthFormat;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator, counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn warm_ensure_with_misses_does_not_allocate() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for format in [SynthFormat::GgufQ4_0, SynthFormat::MlxQ4] {
        let index = common::tiny(dir.path(), format);
        let c = &index.config;
        let seq = common::routing(32, c.num_experts as u32, c.num_experts_per_tok);
        let layers: Vec<usize> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).collect();
        for direct in [false, true] {
            let o = ReadOptions { direct_io: direct, io_threads: 8, ..ReadOptions::default() };
            let mut store = ExpertStore::open_with(&index, CacheSize::Slots(3), &o).unwrap();
            let mut slots = vec![0u32; c.num_experts_per_tok];
            let mut pass = |store: &mut ExpertStore| {
                for experts in &seq {
                    for &l in &layers {
                        store.ensure(l, experts, &mut slots).unwrap();
                    }
                }
            };
            pass(&mut store);
            let misses = store.stats().misses;
            let before = ALLOCS.load(Ordering::SeqCst);
            pass(&mut store);
            let allocs = ALLOCS.load(Ordering::SeqCst) - before;
            assert!(store.stats().misses > misses, "the second pass must miss too");
            assert_eq!(allocs, 0, "{format:?} direct={direct}: allocations during warm ensure calls");
        }
    }
}
