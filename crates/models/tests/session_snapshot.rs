//! Prompt-cache support: a session snapshot taken after a prefix, restored into the same session after it moved on
//! or into a fresh one, continues bit-identically — for Qwen3-MoE (KV cache only) and for the hybrids (KV plus the
//! Gated DeltaNet conv and recurrent state). Attention-only sessions can also rewind; hybrids refuse to.

use std::path::Path;

use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Qwen3Moe};

fn model(case: &str) -> Qwen3Moe {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf").join(case);
    Qwen3Moe::load(&TensorIndex::open(&dir).expect("index"), &ModelOptions { threads: 2, ..ModelOptions::default() })
        .expect("load")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn snapshots_restore_bit_identically() {
    for case in ["qwen3moe_gqa_headdim", "qwen35moe_small", "qwen3next_small"] {
        let m = model(case);
        let prefix: Vec<u32> = (0..20u32).map(|i| (i * 37 + 3) % 200).collect();
        let cont: Vec<u32> = (0..6u32).map(|i| (i * 53 + 11) % 200).collect();
        let other: Vec<u32> = (0..9u32).map(|i| (i * 29 + 7) % 200).collect();
        let mut s = m.new_session(64);
        let mut out = Vec::new();
        m.forward(&mut s, &prefix, false, &mut out).expect("prefix");
        let snap = s.snapshot();
        assert_eq!(snap.pos, prefix.len());
        let mut want = Vec::new();
        m.forward(&mut s, &cont, true, &mut want).expect("continue");
        // Move on with something else, then come back.
        m.forward(&mut s, &other, false, &mut out).expect("other");
        s.restore(&snap).expect("restore");
        let mut got = Vec::new();
        m.forward(&mut s, &cont, true, &mut got).expect("continue again");
        assert_eq!(bits(&got), bits(&want), "{case}: restored in place");
        // Into a fresh session.
        let mut fresh = m.new_session(64);
        fresh.restore(&snap).expect("restore fresh");
        let mut got = Vec::new();
        m.forward(&mut fresh, &cont, true, &mut got).expect("continue fresh");
        assert_eq!(bits(&got), bits(&want), "{case}: restored into a fresh session");
        // Rewind: positional KV can be cut back; a recurrent state cannot.
        let mut r = m.new_session(64);
        m.forward(&mut r, &prefix, false, &mut out).expect("prefix");
        m.forward(&mut r, &other, false, &mut out).expect("other");
        let hybrid = case != "qwen3moe_gqa_headdim";
        match r.rewind(prefix.len()) {
            Ok(()) => {
                assert!(!hybrid, "{case}: a hybrid rewound");
                let mut got = Vec::new();
                m.forward(&mut r, &cont, true, &mut got).expect("after rewind");
                assert_eq!(bits(&got), bits(&want), "{case}: rewound");
            }
            Err(e) => assert!(hybrid && e.to_string().contains("snapshot"), "{case}: {e}"),
        }
    }
}

#[test]
fn a_snapshot_from_another_model_is_refused() {
    let a = model("qwen35moe_small");
    let b = model("qwen3moe_gqa_headdim");
    let mut s = a.new_session(16);
    let mut out = Vec::new();
    a.forward(&mut s, &[1, 2, 3], false, &mut out).expect("forward");
    let snap = s.snapshot();
    let mut other = b.new_session(16);
    let e = other.restore(&snap).expect_err("refused").to_string();
    assert!(e.contains("different model"), "{e}");
    // Too long for the receiving session.
    let mut small = a.new_session(2);
    assert!(small.restore(&snap).is_err());
}
