//! Coalesced reads: with a `moestream pack` sidecar every expert's ranges are adjacent in one file, so a miss is one
//! read request scattered into the slot buffers (except with O_DIRECT when every piece is whole 4 KiB blocks: then
//! each piece is read straight into its slot); without it (GGUF and MLX files as written) a miss stays one read per
//! range. The slot bytes are the same either way, with O_DIRECT on and off.

mod common;

use common::{run_and_check, tiny};
use moestream_format::{TensorIndex, pack};
use moestream_store::{CacheSize, ExpertStore, ReadOptions};
use moestream_synth::SynthFormat;

fn target_tmp() -> tempfile::TempDir {
    // The target directory sits on a disk filesystem (O_DIRECT allowed), unlike /tmp on some machines.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn opts(direct_io: bool, io_threads: usize) -> ReadOptions {
    ReadOptions { direct_io, io_threads, ..ReadOptions::default() }
}

#[test]
fn packed_miss_is_one_read_unpacked_one_per_range() {
    for (format, per_range) in [(SynthFormat::GgufQ4_0, 3), (SynthFormat::MlxQ4, 9)] {
        let dir = target_tmp();
        let plain = tiny(dir.path(), format);
        assert!(plain.pack.is_none());
        for direct in [false, true] {
            let mut store = ExpertStore::open_with(&plain, CacheSize::Slots(3), &opts(direct, 4)).unwrap();
            run_and_check(&mut store, &plain, 24);
            let st = store.stats();
            assert!(st.misses > 0, "{format:?}");
            assert_eq!(st.reads, st.misses * per_range, "{format:?} unpacked direct={direct}");
        }

        pack::write(&plain, &pack::default_path(&plain), false).expect("pack");
        let packed = TensorIndex::open(&plain.root).expect("reopen with the sidecar");
        assert!(packed.pack.is_some(), "{format:?}: sidecar not attached: {:?}", packed.warnings);
        let whole_blocks = packed.tensors.values().filter(|t| t.is_expert_stack()).all(|t| {
            [&t.data, &t.scales, &t.biases]
                .iter()
                .all(|rs| rs.iter().all(|r| r.offset % 4096 == 0 && r.len % 4096 == 0))
        });
        assert_eq!(whole_blocks, format == SynthFormat::GgufQ4_0, "tiny Q4_0 pieces are whole blocks, MLX's are not");
        for (direct, threads) in [(false, 1), (false, 4), (true, 1), (true, 4)] {
            let what = format!("{format:?} packed direct={direct} threads={threads}");
            let mut store = ExpertStore::open_with(&packed, CacheSize::Slots(3), &opts(direct, threads)).unwrap();
            // Slot bytes against the sidecar's ranges, then (same store, more tokens) against the original files'.
            run_and_check(&mut store, &packed, 24);
            run_and_check(&mut store, &plain, 12);
            let st = store.stats();
            assert!(st.misses > 0, "{what}");
            if direct && st.direct_io.iter().all(|&d| d) && whole_blocks {
                // Every piece can land in its slot by O_DIRECT: one read each, no bounce copy.
                assert_eq!(st.reads, st.misses * per_range, "{what}: one in-place read per piece");
                assert_eq!(st.bytes_read_disk, st.bytes_read, "{what}");
                continue;
            }
            assert_eq!(st.reads, st.misses, "{what}: one read per missed expert");
            if direct && st.direct_io.iter().all(|&d| d) {
                assert_eq!(st.reads_direct, st.reads, "{what}");
                assert!(st.bytes_read_disk >= st.bytes_read, "{what}");
            } else {
                assert_eq!(st.bytes_read_disk, st.bytes_read, "{what}");
            }
        }

        // Every expert resident, read at open: still correct through the coalesced path.
        let mut all = ExpertStore::open_with(&packed, CacheSize::All, &opts(true, 4)).unwrap();
        run_and_check(&mut all, &plain, 4);
        assert_eq!(all.stats().misses, 0);
    }
}
