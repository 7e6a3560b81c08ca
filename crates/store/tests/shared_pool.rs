//! A byte budget is one slot pool shared by all MoE layers: a busy layer may hold more than an even split while
//! quiet layers hold fewer, every slot still holds exactly its expert's bytes, and an explicit per-layer split (or a
//! slot count) keeps each layer to its own slots.

mod common;

use common::{check_slots, tiny};
use moestream_store::{CachePlan, CacheSize, EvictionPolicy, ExpertStore, ReadOptions};
use moestream_synth::SynthFormat;

fn target_tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Decode-like calls: `busy` cycles through `wide` distinct experts (k per call), every other MoE layer asks for
/// the same k experts each time. Returns the store's stats after `rounds` passes, counted from the second pass.
fn run(store: &mut ExpertStore, index: &moestream_format::TensorIndex, busy: usize, wide: u32, rounds: usize) {
    let c = &index.config;
    let k = c.num_experts_per_tok;
    let layers: Vec<usize> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).collect();
    let mut slots = vec![0u32; k];
    let calls = wide as usize / k;
    for round in 0..rounds {
        if round == 1 {
            store.reset_stats();
        }
        for t in 0..calls {
            for &l in &layers {
                let experts: Vec<u32> = if l == busy {
                    (0..k as u32).map(|j| (t * k) as u32 + j).collect()
                } else {
                    (0..k as u32).collect()
                };
                store.ensure(l, &experts, &mut slots).unwrap();
                check_slots(store, index, l, &experts, &slots);
            }
        }
    }
}

#[test]
fn a_busy_layer_borrows_slots_that_quiet_layers_do_not_use() {
    for (format, direct) in [(SynthFormat::GgufQ4_0, true), (SynthFormat::MlxQ4, false), (SynthFormat::GgufQ8_0, true)]
    {
        let dir = target_tmp();
        let index = tiny(dir.path(), format);
        let c = &index.config;
        let (k, e) = (c.num_experts_per_tok, c.num_experts);
        let moe = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).count();
        assert!(moe >= 2, "the tiny model needs two MoE layers for this test");
        let busy = (0..c.num_layers).find(|&l| c.layer_is_moe(l)).unwrap();
        let read = ReadOptions { direct_io: direct, io_threads: 4, ..ReadOptions::default() };
        let slot_bytes = ExpertStore::open_with(&index, CacheSize::Slots(k), &read).unwrap().bytes() / (k * moe) as u64;
        // Even split: k + 1 slots per layer. The busy layer cycles through 2k experts, more than its share; the pool
        // (moe · (k + 1) slots) less what the quiet layers keep (k each) holds all of them when that is ≥ 2k.
        let per_layer = k + 1;
        let budget = CacheSize::Bytes(slot_bytes * (per_layer * moe) as u64);
        let wide = (2 * k).min(e) as u32;
        let room = moe * per_layer - (moe - 1) * k;
        let lfu = EvictionPolicy::default_for_cache();

        // The dry run's rule (`moestream info`) says what the store then does, either way.
        let plan = CachePlan::new(&index, budget).unwrap();
        assert!(plan.shares_pool(&index, budget, true) && !plan.shares_pool(&index, budget, false));
        let mut even = ExpertStore::open_with_sharing(&index, budget, &read, lfu, false).unwrap();
        assert!(!even.shared());
        assert_eq!(even.slots_per_layer(), per_layer);
        run(&mut even, &index, busy, wide, 3);
        let even_busy = even.stats().per_layer[busy].1;
        assert!(even_busy > 0, "{format:?}: {wide} experts in {per_layer} slots never missed");

        let mut shared = ExpertStore::open_with_sharing(&index, budget, &read, lfu, true).unwrap();
        assert!(shared.shared(), "{format:?}: one slot layout in every layer, yet not shared");
        assert_eq!(shared.slots_per_layer(), per_layer, "the even split is still what one call may ask for");
        assert_eq!(shared.bytes(), even.bytes(), "{format:?}: sharing must not change the memory used");
        run(&mut shared, &index, busy, wide, 3);
        let st = shared.stats();
        if room >= wide as usize {
            assert_eq!(st.per_layer[busy].1, 0, "{format:?}: the pool holds all {wide} busy experts: {st:?}");
        } else {
            assert!(st.per_layer[busy].1 < even_busy, "{format:?}: sharing did not help the busy layer: {st:?}");
        }
        // The quiet layers keep their k experts: nothing evicts what is used every call.
        for (l, &(_, misses)) in st.per_layer.iter().enumerate() {
            if l != busy {
                assert_eq!(misses, 0, "{format:?}: quiet layer {l} lost an expert it uses every call");
            }
        }
    }
}

#[test]
fn slot_counts_and_all_resident_are_never_shared() {
    let dir = target_tmp();
    let index = tiny(dir.path(), SynthFormat::GgufQ4_0);
    let k = index.config.num_experts_per_tok;
    let read = ReadOptions::default();
    for size in [CacheSize::Slots(k + 1), CacheSize::All] {
        let s = ExpertStore::open_with_sharing(&index, size, &read, EvictionPolicy::default_for_cache(), true).unwrap();
        assert!(!s.shared(), "{size:?} was shared");
        assert!(!CachePlan::new(&index, size).unwrap().shares_pool(&index, size, true), "{size:?} planned as shared");
    }
}

#[test]
fn a_prefill_wave_takes_only_the_surplus_of_other_layers() {
    // Four MoE layers, 8 experts, top-2, four slots per layer's share (16 in the pool).
    let dir = target_tmp();
    let out = dir.path().join("four.gguf");
    let mut o = moestream_synth::SynthOptions::new(moestream_synth::Preset::TinyQwen3Moe, SynthFormat::GgufQ4_0, &out);
    o.layers = Some(4);
    let index = moestream_format::TensorIndex::open(&moestream_synth::synth(&o).unwrap().path).unwrap();
    let c = &index.config;
    let k = c.num_experts_per_tok;
    assert_eq!((c.num_experts, k), (8, 2));
    let layers: Vec<usize> = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).collect();
    assert_eq!(layers.len(), 4);
    let read = ReadOptions { direct_io: true, io_threads: 4, ..ReadOptions::default() };
    let slot_bytes = ExpertStore::open_with(&index, CacheSize::Slots(k), &read).unwrap().bytes() / (k * 4) as u64;
    let budget = CacheSize::Bytes(slot_bytes * 16);
    let mut store = ExpertStore::open_with_sharing(&index, budget, &read, EvictionPolicy::Lru, true).unwrap();
    assert!(store.shared() && store.slots_per_layer() == 4);
    let mut slots = vec![0u32; 4];
    let prefill = |store: &mut ExpertStore, slots: &mut [u32]| {
        for &l in &layers {
            store.ensure(l, &[0, 1, 2, 3], slots).unwrap();
            check_slots(store, &index, l, &[0, 1, 2, 3], slots);
        }
    };
    prefill(&mut store, &mut slots);
    // One decode token on new experts: its misses take the least recently used slots of any layer, which strips
    // the first two layers the prefill passed of their prefill experts and gives the last two more than their
    // share.
    for &l in &layers {
        store.ensure(l, &[4, 5], &mut slots[..2]).unwrap();
        check_slots(&store, &index, l, &[4, 5], &slots[..2]);
    }
    store.reset_stats();
    prefill(&mut store, &mut slots);
    // The second prefill refills the first layers from the others' surplus only: the last two layers still find
    // the two prefill experts the decode token left them. (Waves free to take any layer's least recently used
    // slots would strip each next layer in turn.)
    let st = store.stats();
    for &l in &layers[2..] {
        assert!(st.per_layer[l].0 >= 2, "layer {l} lost its share to an earlier layer's wave: {:?}", st.per_layer);
    }
}
