//! The expert reader: identical slot bytes for every read mode (O_DIRECT on/off, 1 or 8 I/O threads, GGUF and MLX
//! layouts), the buffered fallback where O_DIRECT is refused, and failure handling on a truncated file.

mod common;

use common::{check_slots, ranges, run_and_check, tiny};
use moestream_store::{CacheSize, ExpertStore, ReadOptions, StoreError};
use moestream_synth::SynthFormat;

fn target_tmp() -> tempfile::TempDir {
    // The target directory sits on a disk filesystem (O_DIRECT allowed), unlike /tmp on some machines.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn opts(direct_io: bool, io_threads: usize) -> ReadOptions {
    ReadOptions { direct_io, io_threads, ..ReadOptions::default() }
}

#[test]
fn slots_match_file_bytes_for_every_read_mode() {
    for format in [SynthFormat::GgufQ8_0, SynthFormat::GgufQ4_0, SynthFormat::MlxQ4] {
        let dir = target_tmp();
        let index = tiny(dir.path(), format);
        for (direct, threads) in [(false, 1), (false, 8), (true, 1), (true, 8)] {
            let mut store = ExpertStore::open_with(&index, CacheSize::Slots(3), &opts(direct, threads)).unwrap();
            run_and_check(&mut store, &index, 24);
            let st = store.stats();
            let what = format!("{format:?} direct={direct} threads={threads}");
            assert!(st.misses > 0 && st.read_batches > 0, "{what}");
            assert_eq!(st.direct_io, vec![direct; index.files.len()], "{what}");
            if direct {
                assert_eq!(st.reads_direct, st.reads, "{what}");
                assert!(st.bytes_read_disk >= st.bytes_read, "{what}");
            } else {
                assert_eq!((st.reads_direct, st.bytes_read_disk), (0, st.bytes_read), "{what}");
            }
        }
    }
}

#[test]
fn cache_all_preloads_every_expert_in_its_own_slot() {
    let dir = target_tmp();
    let index = tiny(dir.path(), SynthFormat::GgufQ4_0);
    let store = ExpertStore::open_with(&index, CacheSize::All, &opts(true, 8)).unwrap();
    let all: Vec<u32> = (0..index.config.num_experts as u32).collect();
    for l in 0..index.config.num_layers {
        check_slots(&store, &index, l, &all, &all);
    }
}

#[test]
fn refused_direct_io_falls_back_to_buffered_reads() {
    let dir = target_tmp();
    let index = tiny(dir.path(), SynthFormat::GgufQ8_0);
    let o = ReadOptions { simulate_direct_einval: true, ..opts(true, 8) };
    let mut store = ExpertStore::open_with(&index, CacheSize::Slots(3), &o).unwrap();
    run_and_check(&mut store, &index, 16);
    let st = store.stats();
    assert_eq!(st.direct_io, vec![false]);
    assert_eq!((st.reads_direct, st.bytes_read_disk), (0, st.bytes_read));
    assert!(st.reads > 0);
}

#[test]
fn tmpfs_reads_are_right_with_or_without_direct_io() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let index = tiny(dir.path(), SynthFormat::GgufQ8_0);
    let mut store = ExpertStore::open(&index, CacheSize::Slots(3)).unwrap();
    run_and_check(&mut store, &index, 16);
    // Kernels since 6.6 accept O_DIRECT on tmpfs; older ones refuse it and the file falls back.
    let st = store.stats();
    assert_eq!(st.reads_direct > 0, st.direct_io[0]);
}

#[test]
fn truncated_file_fails_the_call_and_a_later_call_rereads() {
    for direct in [false, true] {
        let dir = target_tmp();
        let index = tiny(dir.path(), SynthFormat::GgufQ8_0);
        let file = index.files[0].clone();
        let original = std::fs::read(&file).unwrap();
        let c = &index.config;
        let layer = (0..c.num_layers).rfind(|&l| c.layer_is_moe(l)).unwrap();
        let end = |x: u32| ranges(&index, layer, x).iter().flat_map(|r| r.iter()).map(|r| r.offset + r.len).max();
        // `bad` is the expert whose bytes reach furthest into the file; cut the file in the middle of its last range.
        let bad = (0..c.num_experts as u32).max_by_key(|&x| end(x)).unwrap();
        let last = ranges(&index, layer, bad).iter().flat_map(|r| r.iter()).max_by_key(|r| r.offset).unwrap();
        let cut = last.offset + last.len / 2;
        let good = (0..c.num_experts as u32).find(|&x| end(x).unwrap() <= cut).expect("an expert before the cut");

        let mut store = ExpertStore::open_with(&index, CacheSize::Slots(3), &opts(direct, 8)).unwrap();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(cut).unwrap();
        let experts = [good, bad];
        let mut slots = [0u32; 2];
        let err = store.ensure(layer, &experts, &mut slots).unwrap_err();
        let msg = err.to_string();
        match &err {
            StoreError::Read { path, offset, len, .. } => {
                assert_eq!(path, &file);
                assert!(offset + len > cut, "{msg}");
                assert!(msg.contains(&file.display().to_string()) && msg.contains(&format!("offset {offset}")));
            }
            e => panic!("want a read error, got {e}"),
        }
        assert_eq!(store.stats().misses, 2);

        std::fs::write(&file, &original).unwrap();
        store.ensure(layer, &experts, &mut slots).unwrap();
        check_slots(&store, &index, layer, &experts, &slots);
        // `good` was cached by the failed call; `bad` was not, and was read again.
        let st = store.stats();
        assert_eq!((st.hits, st.misses), (1, 3), "direct={direct}");
        // And the cache stays usable.
        run_and_check(&mut store, &index, 12);
    }
}
