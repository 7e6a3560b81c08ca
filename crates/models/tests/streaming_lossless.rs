//! Streaming never changes outputs: logits of a prefill and of token-by-token greedy decode are bit-identical for
//! every expert-cache size from the minimum (top-k slots per layer) to every expert resident, in every file family.

use moestream_cpu::ops::argmax;
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, MoeKernels, Prefetch, Qwen3Moe};
use moestream_store::{CacheSize, EvictionPolicy, ReadOptions};
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

/// Prefill logits (all positions) followed by the logits of 8 greedy decode steps.
fn trace(m: &Qwen3Moe) -> Vec<f32> {
    let prompt: Vec<u32> = (0..24u32).map(|i| (i * 7919 + 13) % 900).collect();
    let mut s = m.new_session(64);
    let mut all = Vec::new();
    m.forward(&mut s, &prompt, true, &mut all).expect("prefill");
    let v = m.config.vocab_size;
    let mut last = all[all.len() - v..].to_vec();
    for _ in 0..8 {
        let next = argmax(&last);
        m.forward(&mut s, &[next], false, &mut last).expect("decode");
        all.extend_from_slice(&last);
    }
    all
}

#[test]
fn every_cache_size_gives_identical_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in [SynthFormat::GgufQ4_0, SynthFormat::MlxQ4, SynthFormat::HfBf16] {
        let path = dir.path().join(format.name());
        synth(&SynthOptions::new(Preset::TinyQwen3Moe, format, &path)).expect("synth");
        let index = TensorIndex::open(&path).expect("index");
        let load = |c: CacheSize| {
            Qwen3Moe::load(&index, &ModelOptions { threads: 2, expert_cache: c, ..ModelOptions::default() })
                .expect("load")
        };
        let reference = trace(&load(CacheSize::All));
        let k = index.config.num_experts_per_tok;
        for slots in [k, k + 1, 5, index.config.num_experts] {
            let m = load(CacheSize::Slots(slots));
            let got = trace(&m);
            assert!(
                got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: {slots} slots/layer changed the logits",
                format.name()
            );
            let st = m.store_stats();
            if slots < index.config.num_experts {
                assert!(st.misses > 0 && st.bytes_read > 0, "{}: {slots} slots never missed: {st:?}", format.name());
            } else {
                assert_eq!(st.misses, 0, "{}: all experts resident but missed", format.name());
            }
        }
        // Every decode kernel mode (stacked or per-expert, fused gate+up or split), at the smallest cache too.
        for stacked in [true, false] {
            for fuse_gate_up in [true, false] {
                for c in [CacheSize::All, CacheSize::Slots(k)] {
                    let opts = ModelOptions {
                        threads: 2,
                        expert_cache: c,
                        moe_kernels: MoeKernels { stacked, fuse_gate_up },
                        ..ModelOptions::default()
                    };
                    let got = trace(&Qwen3Moe::load(&index, &opts).expect("load"));
                    assert!(
                        got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{}: stacked={stacked} fuse={fuse_gate_up} {c:?} changed the logits",
                        format.name()
                    );
                }
            }
        }
        // Eviction policy and read path change what is read when, never the results.
        for eviction in [EvictionPolicy::Lru, EvictionPolicy::LfuAging { half_life: 4 }] {
            for direct_io in [true, false] {
                let opts = ModelOptions {
                    threads: 2,
                    expert_cache: CacheSize::Slots(k + 1),
                    eviction,
                    read: ReadOptions { direct_io, io_threads: 3, ..ReadOptions::default() },
                    ..ModelOptions::default()
                };
                let got = trace(&Qwen3Moe::load(&index, &opts).expect("load"));
                assert!(
                    got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}: {eviction:?} direct_io={direct_io} changed the logits",
                    format.name()
                );
            }
        }
        // Prefetch reads guesses early; `ensure` still decides what is used, so a wrong guess changes nothing.
        for prefetch in [Prefetch::Prev, Prefetch::Lookahead] {
            for slots in [k, k + 1, index.config.num_experts] {
                let opts = ModelOptions {
                    threads: 2,
                    expert_cache: CacheSize::Slots(slots),
                    prefetch,
                    ..ModelOptions::default()
                };
                let m = Qwen3Moe::load(&index, &opts).expect("load");
                let got = trace(&m);
                assert!(
                    got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}: prefetch {prefetch:?} at {slots} slots changed the logits",
                    format.name()
                );
                let st = m.store_stats();
                if slots < index.config.num_experts {
                    assert!(st.prefetch_reads > 0, "{}: {prefetch:?} at {slots} slots never read ahead", format.name());
                    assert!(st.prefetch_hits + st.prefetch_wasted <= st.prefetch_reads, "{st:?}");
                } else {
                    assert_eq!(st.prefetch_reads, 0, "{}: everything resident, yet prefetched", format.name());
                }
            }
        }
        // A byte budget resolves to slots the same way.
        let per_slot = load(CacheSize::Slots(k)).expert_bytes() / k as u64;
        let m = load(CacheSize::Bytes(per_slot * (k as u64 + 1)));
        assert_eq!(m.slots_per_layer(), k + 1);
        // A byte budget is one slot pool for all MoE layers (a miss may evict another layer's expert): still
        // bit-identical, from the minimum up, with prefetch too (a guess only takes its own layer's slots).
        for (slots, prefetch) in
            [(k, Prefetch::None), (k + 1, Prefetch::None), (5, Prefetch::Lookahead), (k + 1, Prefetch::Prev)]
        {
            let opts = ModelOptions {
                threads: 2,
                expert_cache: CacheSize::Bytes(per_slot * slots as u64),
                prefetch,
                ..ModelOptions::default()
            };
            let m = Qwen3Moe::load(&index, &opts).expect("load");
            assert!(m.expert_pool_shared(), "{}: a byte budget was not shared", format.name());
            let got = trace(&m);
            assert!(
                got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: a shared pool of {slots} slots/layer ({prefetch:?}) changed the logits",
                format.name()
            );
            assert!(m.store_stats().misses > 0, "{}: a shared pool of {slots} slots/layer never missed", format.name());
        }
    }
}

#[test]
fn a_cache_below_top_k_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &path)).expect("synth");
    let index = TensorIndex::open(&path).expect("index");
    for c in [CacheSize::Slots(1), CacheSize::Bytes(1000)] {
        let err = match Qwen3Moe::load(&index, &ModelOptions { expert_cache: c, ..ModelOptions::default() }) {
            Ok(_) => panic!("{c:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("minimum of top-k = 2") && err.contains("GiB"), "{err}");
    }
}

/// The same at Qwen3-30B-A3B's real width (128 experts, top-8, two layers so prefetch has a next layer): a
/// 6-token prefill and 4 decode steps are bit-identical with every expert resident, with the minimum cache of 8
/// slots, per-expert calls and split gate/up, LRU, and each prefetch mode; for GGUF Q4_0 and MLX 4-bit.
#[test]
fn real_width_streaming_is_lossless() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in [SynthFormat::GgufQ4_0, SynthFormat::MlxQ4] {
        let path = dir.path().join(format.name());
        let mut o = SynthOptions::new(Preset::Qwen3_30bA3b, format, &path);
        o.layers = Some(2);
        synth(&o).expect("synth");
        let index = TensorIndex::open(&path).expect("index");
        let run = |opts: ModelOptions| {
            let m = Qwen3Moe::load(&index, &ModelOptions { threads: 2, ..opts }).expect("load");
            let prompt: Vec<u32> = (0..6u32).map(|i| i * 20011 % 150_000).collect();
            let mut s = m.new_session(16);
            let mut out = Vec::new();
            m.forward(&mut s, &prompt, true, &mut out).expect("prefill");
            let v = m.config.vocab_size;
            let mut last = out[out.len() - v..].to_vec();
            for _ in 0..4 {
                let next = argmax(&last);
                m.forward(&mut s, &[next], false, &mut last).expect("decode");
                out.extend_from_slice(&last);
            }
            (out, m.store_stats())
        };
        let (reference, _) = run(ModelOptions::default());
        let min = || ModelOptions { expert_cache: CacheSize::Slots(8), ..ModelOptions::default() };
        let variants = [
            min(),
            ModelOptions {
                moe_kernels: MoeKernels { stacked: false, fuse_gate_up: false },
                eviction: EvictionPolicy::Lru,
                ..min()
            },
            ModelOptions { prefetch: Prefetch::Prev, ..min() },
            ModelOptions { prefetch: Prefetch::Lookahead, expert_cache: CacheSize::Slots(12), ..min() },
        ];
        for opts in variants {
            let label = format!(
                "{} {:?} {:?} {:?} {:?}",
                format.name(),
                opts.expert_cache,
                opts.moe_kernels,
                opts.eviction,
                opts.prefetch
            );
            let prefetching = opts.prefetch != Prefetch::None;
            let (got, st) = run(opts);
            assert!(st.misses > 0, "{label}: never missed");
            assert!(!prefetching || st.prefetch_reads > 0, "{label}: never read ahead");
            assert!(got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{label} changed the logits");
        }
    }
}

/// The hybrids (Qwen3.5-MoE, Qwen3-Next; the transformers fixtures, 8 experts top-2): a 40-token prefill in chunks
/// of 16 and 8 decode steps are bit-identical with every expert resident and at 2, 3 and 5 slots, in every kernel
/// mode and prefetch mode.
#[test]
fn hybrid_streaming_is_lossless() {
    for case in ["qwen35moe_small", "qwen3next_small"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf").join(case);
        let index = TensorIndex::open(&dir).expect("index");
        let run = |opts: ModelOptions| {
            let m = Qwen3Moe::load(&index, &ModelOptions { threads: 2, prefill_chunk: 16, ..opts }).expect("load");
            let prompt: Vec<u32> = (0..40u32).map(|i| (i * 97 + 5) % 256).collect();
            let mut s = m.new_session(64);
            let mut out = Vec::new();
            m.forward(&mut s, &prompt, true, &mut out).expect("prefill");
            let mut last = out[out.len() - 256..].to_vec();
            for _ in 0..8 {
                let next = argmax(&last);
                m.forward(&mut s, &[next], false, &mut last).expect("decode");
                out.extend_from_slice(&last);
            }
            (out, m.store_stats())
        };
        let (reference, _) = run(ModelOptions::default());
        for slots in [2, 3, 5] {
            for (stacked, fuse_gate_up) in [(true, true), (true, false), (false, false)] {
                for prefetch in [Prefetch::None, Prefetch::Prev, Prefetch::Lookahead] {
                    let opts = ModelOptions {
                        expert_cache: CacheSize::Slots(slots),
                        moe_kernels: MoeKernels { stacked, fuse_gate_up },
                        prefetch,
                        ..ModelOptions::default()
                    };
                    let (got, st) = run(opts);
                    let label = format!("{case}: {slots} slots stacked={stacked} fuse={fuse_gate_up} {prefetch:?}");
                    assert!(st.misses > 0, "{label}: never missed");
                    assert!(
                        got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{label} changed the logits"
                    );
                }
            }
        }
    }
}

/// q8 activations on GGUF Q4_0, where the store packs each expert as `Q4_0x16` on its way from the staging buffer
/// into the slot (buffered and O_DIRECT reads) and the trunk is packed at load: every cache size, read path and
/// kernel mode gives the logits of every expert resident, at tiny and at real width (2 layers).
#[test]
fn q8_packed_streaming_is_lossless() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (preset, layers) in [(Preset::TinyQwen3Moe, None), (Preset::Qwen3_30bA3b, Some(2))] {
        let path = dir.path().join(format!("{preset:?}"));
        let mut o = SynthOptions::new(preset, SynthFormat::GgufQ4_0, &path);
        o.layers = layers;
        synth(&o).expect("synth");
        let index = TensorIndex::open(&path).expect("index");
        let q8 = |opts: ModelOptions| ModelOptions { threads: 2, q8_activations: true, ..opts };
        let reference = q8_streaming_matches_resident(&index, &format!("{preset:?}"));
        // Packing changes summation order, not values: the row-major q8 prefill is f32 noise away. Tiny width
        // only: at real width a 1e-7 difference now and then moves an activation across a q8 rounding boundary
        // (one code step, 1/254 of the block's max), which compounds to ~1e-2 in the logits without any kernel
        // being wrong (measured: 2 of 24 positions at 2e-6, the rest 1e-2 to 7e-2 of max |logit|). At tiny width
        // it happens at a few positions (AVX2: 2.5e-3 of max |logit| at some of 24; AVX-512: none), so most
        // positions must agree to f32 noise and every one within 1% of max |logit|; a wrong nibble, scale or
        // offset moves every position by the weight error.
        if layers.is_none() {
            let opts = q8(ModelOptions { pack: false, ..ModelOptions::default() });
            let plain = trace(&Qwen3Moe::load(&index, &opts).expect("load"));
            let v = index.config.vocab_size;
            let (reference, plain) = (&reference[..24 * v], &plain[..24 * v]);
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let per_pos: Vec<f32> = reference
                .chunks(v)
                .zip(plain.chunks(v))
                .map(|(a, b)| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale)
                .collect();
            let noisy = per_pos.iter().filter(|&&d| d > 1e-4).count();
            let worst = per_pos.iter().copied().fold(0f32, f32::max);
            assert!(
                worst <= 1e-2 && noisy * 4 <= per_pos.len(),
                "{preset:?}: packed vs row-major, per position / max |logit| {scale}: {per_pos:?}"
            );
            assert_ne!(reference, plain, "{preset:?}: packing had no effect; is it applied?");
        }
    }
}

/// q8 activations with packing (the default) on GGUF Q4_K_M from llama.cpp's `llama-quantize` (the
/// synth_w256-q4_k_m fixture: Q4_K gate/up experts and Q6_K down experts, packed as `Q4_Kx16` / `Q6_Kx16` on the
/// way into the slot): streaming gives the logits of every expert resident.
#[test]
fn q8_packed_q4_k_streaming_is_lossless() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/synth_w256-q4_k_m.gguf");
    let index = TensorIndex::open(&path).expect("index");
    q8_streaming_matches_resident(&index, "synth_w256-q4_k_m");
}

/// Every cache size, read path and kernel mode with q8 activations (packing on) gives the logits of every expert
/// resident; returns those.
fn q8_streaming_matches_resident(index: &TensorIndex, name: &str) -> Vec<f32> {
    let q8 = |opts: ModelOptions| ModelOptions { threads: 2, q8_activations: true, ..opts };
    let reference = trace(&Qwen3Moe::load(index, &q8(ModelOptions::default())).expect("load"));
    let k = index.config.num_experts_per_tok;
    let mut variants = Vec::new();
    for direct_io in [true, false] {
        for slots in [k, k + 1] {
            variants.push(ModelOptions {
                expert_cache: CacheSize::Slots(slots),
                read: ReadOptions { direct_io, io_threads: 3, ..ReadOptions::default() },
                ..ModelOptions::default()
            });
        }
    }
    variants.push(ModelOptions {
        expert_cache: CacheSize::Slots(k),
        moe_kernels: MoeKernels { stacked: false, fuse_gate_up: false },
        ..ModelOptions::default()
    });
    variants.push(ModelOptions {
        expert_cache: CacheSize::Slots(k + 1),
        prefetch: Prefetch::Lookahead,
        ..ModelOptions::default()
    });
    for opts in variants {
        let label = format!("{name} {:?} {:?} {:?}", opts.expert_cache, opts.read, opts.moe_kernels);
        let m = Qwen3Moe::load(index, &q8(opts)).expect("load");
        let got = trace(&m);
        assert!(m.store_stats().misses > 0, "{label}: never missed");
        assert!(got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{label} changed the logits");
    }
    reference
}

/// A sidecar written in layout `packed` (`moestream pack`): Q4_0 experts stored as `Q4_0x16`, read straight into
/// the slots (O_DIRECT in place where the pieces are whole 4 KiB blocks, as at real width) or unpacked on the way
/// when the kernels read row-major. Either way the logits are bit-identical to the model without a sidecar.
#[test]
fn packed_sidecar_streaming_is_lossless() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    for (preset, layers) in [(Preset::TinyQwen3Moe, None), (Preset::Qwen3_30bA3b, Some(1))] {
        let path = dir.path().join(format!("{preset:?}.gguf"));
        let mut o = SynthOptions::new(preset, SynthFormat::GgufQ4_0, &path);
        o.layers = layers;
        synth(&o).expect("synth");
        let plain = TensorIndex::open(&path).expect("index");
        assert!(plain.pack.is_none());
        let q8 = |pack: bool, opts: ModelOptions| ModelOptions { threads: 2, q8_activations: true, pack, ..opts };
        let want_packed = trace(&Qwen3Moe::load(&plain, &q8(true, ModelOptions::default())).expect("load"));
        let want_plain = trace(&Qwen3Moe::load(&plain, &q8(false, ModelOptions::default())).expect("load"));
        moestream_format::pack::write_with(
            &plain,
            &moestream_format::pack::default_path(&plain),
            false,
            moestream_format::pack::Layout::Packed,
        )
        .expect("pack");
        let index = TensorIndex::open(&path).expect("index with the sidecar");
        assert!(index.pack.is_some(), "{preset:?}: sidecar not attached: {:?}", index.warnings);
        let k = index.config.num_experts_per_tok;
        let blocks = index
            .tensors
            .values()
            .filter(|t| t.is_expert_stack())
            .all(|t| t.data.iter().all(|r| r.offset % 4096 == 0 && r.len % 4096 == 0));
        assert!(blocks || layers.is_none(), "{preset:?}: real-width Q4_0 experts are whole 4 KiB blocks");
        for pack in [true, false] {
            for direct_io in [true, false] {
                for cache in [CacheSize::Slots(k), CacheSize::All] {
                    let label = format!("{preset:?} pack={pack} direct={direct_io} {cache:?}");
                    let opts = ModelOptions {
                        expert_cache: cache,
                        read: ReadOptions { direct_io, io_threads: 3, ..ReadOptions::default() },
                        ..ModelOptions::default()
                    };
                    let m = Qwen3Moe::load(&index, &q8(pack, opts)).expect("load");
                    m.reset_store_stats();
                    let got = trace(&m);
                    let want = if pack { &want_packed } else { &want_plain };
                    assert!(
                        got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{label} changed the logits"
                    );
                    let st = m.store_stats();
                    if cache == CacheSize::All {
                        continue;
                    }
                    assert!(st.misses > 0, "{label}: never missed");
                    // Packed and direct with whole-block pieces: every piece lands in place, one read each (gate,
                    // up, down), no bytes beyond the pieces. Otherwise a miss is one coalesced read.
                    let in_place = blocks && pack && direct_io && st.direct_io.iter().all(|&d| d);
                    let per_miss = if in_place { 3 } else { 1 };
                    assert_eq!(st.reads, st.misses * per_miss, "{label}");
                    if in_place {
                        assert_eq!(st.bytes_read_disk, st.bytes_read, "{label}");
                    }
                }
            }
        }
    }
}
