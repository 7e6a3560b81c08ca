//! `moestream info` plans what `run` then allocates: for a synthetic hybrid at a 6-of-8-slot cache and 4096 positions, the planned
//! expert-cache and KV+state bytes equal the ones `run` reports, and the uniform-routing read estimate follows
//! from the plan. A budget below top-k is reported, not failed.

mod common;

use std::process::Command;

use common::{mb_after, memory_line, synth};

#[test]
fn info_plans_what_run_allocates() {
    let bin = env!("CARGO_BIN_EXE_moestream");
    let dir = tempfile::tempdir().expect("tempdir");
    let model = synth(&dir.path().join("m"), &["--preset", "tiny-qwen3.5-moe", "--format", "mlx-q4"]);
    let out = Command::new(bin)
        .args(["info", "--cache-slots", "6", "--ctx", "4096", "--json"])
        .arg(&model)
        .output()
        .expect("info");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(plan["slots_per_layer"], 6);
    assert_eq!((plan["full_attention_layers"].as_u64(), plan["linear_attention_layers"].as_u64()), (Some(1), Some(3)));
    let per = plan["bytes_per_expert"].as_f64().unwrap();
    let misses = plan["expected_misses_per_token"].as_f64().unwrap();
    // 4 MoE layers × top-2 × (1 − 6/8).
    assert!((misses - 2.0).abs() < 1e-9, "{plan}");
    assert!((plan["expected_read_bytes_per_token"].as_f64().unwrap() - 2.0 * per).abs() < 1.0);

    let out = Command::new(bin)
        .args(["run", "--tokens", "1,2,3", "-n", "2", "--cache-slots", "6", "--ctx", "4096", "--model"])
        .arg(&model)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = memory_line(&err);
    let mb = |key: &str| mb_after(line, key);
    // `run` prints MB with one decimal.
    let close = |planned: &serde_json::Value, reported: f64| (planned.as_f64().unwrap() / 1e6 - reported).abs() <= 0.06;
    assert!(mb("expert slots") > 1.0 && mb("KV") > 1.0, "{line}");
    assert!(close(&plan["bytes_expert_cache"], mb("expert slots")), "{plan} vs {line}");
    assert!(close(&plan["bytes_kv_and_state"], mb("KV")), "{plan} vs {line}");

    // The hybrid's MoE layers store their experts alike, so a byte budget is one pool shared by all four; a slot
    // count, or `--per-layer-slots`, gives each layer its own.
    let budget = format!("{}", 4 * 5 * per as u64);
    for (flags, shared) in [(vec![], true), (vec!["--per-layer-slots"], false)] {
        let out = Command::new(bin)
            .args(["info", "--expert-cache", &budget, "--json"])
            .args(&flags)
            .arg(&model)
            .output()
            .expect("info");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(p["slots_per_layer"], 5, "{p}");
        assert_eq!(p["shared_pool"], shared, "{flags:?}: {p}");
        assert_eq!(p["pool_slots"], if shared { 20 } else { 5 }, "{flags:?}: {p}");
    }
    assert_eq!(plan["shared_pool"], false, "a slot count is per layer: {plan}");

    let out = Command::new(bin).args(["info", "--cache-slots", "1"]).arg(&model).output().expect("info");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("too small"));
}
