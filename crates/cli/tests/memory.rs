//! Memory honesty: with an expert budget B, the process's peak RSS (the kernel's VmHWM) stays within
//! trunk + B + KV + a small fixed overhead. Uses a one-layer model of Qwen3-30B-A3B's real width (0.7 GB:
//! a 350 MB trunk and 340 MB of experts) and a 64 MiB budget, so holding every expert would break the bound.

mod common;

use std::process::Command;

use common::{mb_after, memory_line, synth};

#[test]
fn peak_rss_stays_within_trunk_plus_budget_plus_kv() {
    let bin = env!("CARGO_BIN_EXE_moestream");
    let dir = tempfile::tempdir().expect("tempdir");
    let model =
        synth(&dir.path().join("m.gguf"), &["--preset", "qwen3-30b-a3b", "--layers", "1", "--format", "gguf-q4_0"]);
    let out = Command::new(bin)
        .args(["run", "--tokens", "1,2,3,4,5,6,7,8", "-n", "8", "--threads", "2", "--expert-cache", "64MiB", "--model"])
        .arg(&model)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = memory_line(&err);
    let peak = mb_after(line, "peak RSS");
    let trunk = mb_after(line, "trunk");
    let slots = mb_after(line, "expert slots");
    let kv = mb_after(line, "KV");
    assert!(slots <= 64.0 * 1.048_576 + 1.0, "slots {slots} MB exceed the 64 MiB budget: {line}");
    // Fixed overhead: the binary, thread stacks, activation scratch, one logits row. Measured 37 MB.
    assert!(peak <= trunk + slots + kv + 100.0, "{line}");
    // And the bound is meaningful: holding all 340 MB of experts would exceed it.
    assert!(trunk + 340.0 + kv > trunk + slots + kv + 100.0);
}
