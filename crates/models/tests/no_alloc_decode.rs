//! The per-token path allocates nothing: after a warm-up, greedy decode steps (streaming experts at the minimum
//! cache, with and without prefetch, and with every expert resident) make no heap allocation on any thread, as
//! a counting global allocator sees it. (Its own test binary, so no other test allocates concurrently.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use moestream_cpu::ops::argmax;
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Prefetch, Qwen3Moe};
use moestream_store::CacheSize;
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

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
fn warm_decode_steps_do_not_allocate() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("m.gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ4_0, &path)).expect("synth");
    let index = TensorIndex::open(&path).expect("index");
    let k = index.config.num_experts_per_tok;
    // q8: the packed Q4_0x16 path where the CPU has it (experts packed by the I/O threads on the way in).
    for (cache, prefetch, q8) in [
        (CacheSize::All, Prefetch::None, false),
        (CacheSize::Slots(k), Prefetch::None, false),
        (CacheSize::Slots(k + 1), Prefetch::Lookahead, false),
        (CacheSize::Slots(k), Prefetch::Prev, false),
        (CacheSize::All, Prefetch::None, true),
        (CacheSize::Slots(k), Prefetch::None, true),
    ] {
        let opts =
            ModelOptions { threads: 2, expert_cache: cache, prefetch, q8_activations: q8, ..ModelOptions::default() };
        let m = Qwen3Moe::load(&index, &opts).expect("load");
        let mut s = m.new_session(64);
        let mut logits = Vec::with_capacity(m.config.vocab_size);
        m.forward(&mut s, &[1, 2, 3, 4], false, &mut logits).expect("prefill");
        let mut step = |logits: &mut Vec<f32>| {
            let next = argmax(logits);
            m.forward(&mut s, &[next], false, logits).expect("decode");
        };
        step(&mut logits);
        let misses = m.store_stats().misses;
        let before = ALLOCS.load(Ordering::SeqCst);
        for _ in 0..16 {
            step(&mut logits);
        }
        let allocs = ALLOCS.load(Ordering::SeqCst) - before;
        // store_stats() clones (allocates), so read it only after counting.
        let st = m.store_stats();
        assert_eq!(allocs, 0, "{cache:?} {prefetch:?} q8 {q8}: {allocs} allocations in 16 decode steps");
        if cache != CacheSize::All {
            assert!(st.misses > misses, "{cache:?} {prefetch:?}: the counted steps never missed");
        }
    }
}
