//! Shared helpers for the store's integration tests: a tiny synthetic model, and the expected bytes of an expert's
//! slots read back through `TensorIndex::read_range` (plain buffered reads, independent of the store's reader).

#![allow(dead_code)]

use std::path::Path;

use moestream_format::{ExpertRanges, TensorIndex};
use moestream_store::ExpertStore;
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

pub fn tiny(dir: &Path, format: SynthFormat) -> TensorIndex {
    let out = if format.is_gguf() { dir.join("tiny.gguf") } else { dir.join("tiny") };
    let s = synth(&SynthOptions::new(Preset::TinyQwen3Moe, format, &out)).expect("synth");
    TensorIndex::open(&s.path).expect("open index")
}

pub fn ranges(index: &TensorIndex, layer: usize, x: u32) -> [ExpertRanges; 3] {
    let r = |p: &str| index.get(&format!("blk.{layer}.{p}.weight")).unwrap().expert(x as usize).unwrap();
    [r("ffn_gate_exps"), r("ffn_up_exps"), r("ffn_down_exps")]
}

fn read(index: &TensorIndex, parts: &[ExpertRanges]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (mut d, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
    let get = |r: moestream_format::FileRange, out: &mut Vec<u8>| {
        let at = out.len();
        out.resize(at + r.len as usize, 0);
        index.read_range(r, &mut out[at..]).unwrap();
    };
    for p in parts {
        get(p.data, &mut d);
        if let (Some(sc), Some(bi)) = (p.scales, p.biases) {
            get(sc, &mut s);
            get(bi, &mut b);
        }
    }
    (d, s, b)
}

/// Assert that slot `slots[j]` of `layer` holds exactly expert `experts[j]`'s bytes from the file.
pub fn check_slots(store: &ExpertStore, index: &TensorIndex, layer: usize, experts: &[u32], slots: &[u32]) {
    let l = store.layer(layer).expect("MoE layer");
    for (&x, &s) in experts.iter().zip(slots) {
        let [g, u, d] = ranges(index, layer, x);
        let (gu, dn) = (read(index, &[g, u]), read(index, &[d]));
        let (a, b, c) = l.gate_up.slot(s as usize);
        assert!(a == gu.0 && b == gu.1 && c == gu.2, "layer {layer} expert {x} in slot {s}: gate+up bytes differ");
        let (a, b, c) = l.down.slot(s as usize);
        assert!(a == dn.0 && b == dn.1 && c == dn.2, "layer {layer} expert {x} in slot {s}: down bytes differ");
    }
}

/// A deterministic routing sequence over `e` experts, `k` distinct per token, that misses often with few slots.
pub fn routing(tokens: usize, e: u32, k: usize) -> Vec<Vec<u32>> {
    (0..tokens as u32)
        .map(|t| {
            let mut v = Vec::with_capacity(k);
            let mut x = (t * 5 + t / 3) % e;
            while v.len() < k {
                if !v.contains(&x) {
                    v.push(x);
                }
                x = (x + 3) % e;
            }
            v
        })
        .collect()
}

/// Run `routing` through every MoE layer, checking the slots' bytes after each call.
pub fn run_and_check(store: &mut ExpertStore, index: &TensorIndex, tokens: usize) {
    let c = &index.config;
    let seq = routing(tokens, c.num_experts as u32, c.num_experts_per_tok);
    let mut slots = vec![0u32; c.num_experts_per_tok];
    for experts in &seq {
        for l in (0..c.num_layers).filter(|&l| c.layer_is_moe(l)) {
            store.ensure(l, experts, &mut slots).expect("ensure");
            check_slots(store, index, l, experts, &slots);
        }
    }
}
