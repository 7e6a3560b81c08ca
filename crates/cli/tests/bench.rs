//! `moestream bench --json` on a tiny model: every run is reported, cold and warm apart, with medians inside their
//! spread; with every expert resident nothing is read after load; a cache of top-k slots misses on cold runs, and
//! while decoding.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_moestream");

/// A tiny Q4_0 model in `dir`.
fn tiny(dir: &std::path::Path) -> std::path::PathBuf {
    common::synth(&dir.join("m.gguf"), &["--preset", "tiny-qwen3-moe", "--format", "gguf-q4_0"])
}

/// `moestream bench ARGS --json --model MODEL`, which must succeed.
fn bench(model: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN).arg("bench").args(args).args(["--json", "--model"]).arg(model).output().expect("bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// One cold and one warm run of 8 + 32 tokens through 3 slots per layer, plus `extra` flags.
fn short_bench(model: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let args = ["--prompt-tokens", "8", "--gen-tokens", "32", "--repeat", "1", "--threads", "2", "--cache-slots", "3"];
    bench(model, &[&args[..], extra].concat())
}

#[test]
fn bench_reports_cold_and_warm_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny(dir.path());
    let run = |cache: &str| {
        bench(
            &model,
            &["--prompt-tokens", "24", "--gen-tokens", "6", "--repeat", "2", "--threads", "2", "--cache-slots", cache],
        )
    };
    let (all, small) = (run("8"), run("2"));
    for j in [&all, &small] {
        for run in ["cold", "warm"] {
            let r = &j[run];
            assert_eq!(r["runs"], 2, "{j}");
            assert_eq!(r["samples"].as_array().map(Vec::len), Some(2));
            for k in ["prefill_tok_s", "decode_tok_s", "ttft_s"] {
                let (lo, med, hi) =
                    (r[k]["min"].as_f64().unwrap(), r[k]["median"].as_f64().unwrap(), r[k]["max"].as_f64().unwrap());
                assert!(lo > 0.0 && lo <= med && med <= hi, "{run} {k}: {}", r[k]);
            }
        }
    }
    // Routing reuse is a share of decode choices, one per run (its exact count is tested in models).
    for j in [&all, &small] {
        let r = &j["warm"]["routing_reuse"];
        assert!(r["min"].as_f64().is_some_and(|x| x >= 0.0) && r["max"].as_f64().is_some_and(|x| x <= 1.0), "{r}");
        assert_eq!(j["synthetic_routing_skew"], serde_json::Value::Null);
    }
    // 8 of 8 slots: everything was read at load, so runs read nothing and always hit.
    assert_eq!(all["cold"]["read_bytes_per_token"]["max"], 0.0);
    assert_eq!(all["warm"]["hit_rate"]["min"], 1.0);
    // 2 of 8 slots (top-k): a fresh model must read.
    assert!(small["cold"]["read_bytes_per_token"]["min"].as_f64().unwrap() > 0.0);
    assert!(small["cold"]["hit_rate"]["max"].as_f64().unwrap() < 1.0);
    // Decode alone: nothing to miss or wait for with every expert resident; a top-k cache misses while decoding
    // (every token's experts differ somewhere on random weights), and its stall is a time, never negative.
    for run in ["cold", "warm"] {
        assert_eq!(all[run]["decode_misses_per_token"]["max"], 0.0, "{all}");
        assert_eq!(all[run]["decode_stall_ms_per_token"]["max"], 0.0, "{all}");
        assert!(small[run]["decode_misses_per_token"]["min"].as_f64().unwrap() > 0.0, "{small}");
        assert!(small[run]["decode_stall_ms_per_token"]["min"].as_f64().unwrap() >= 0.0, "{small}");
    }
}

#[test]
fn warm_runs_can_start_from_another_prompt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny(dir.path());
    let run = |warm: &str| short_bench(&model, &["--warm-prompt", warm]);
    // Routing reuse is a function of the tokens decoded: a warm run on the same prompt repeats the cold run's
    // exactly, one on another prompt does not.
    let reuse = |j: &serde_json::Value, r: &str| j[r]["routing_reuse"]["median"].as_f64().unwrap();
    let same = run("same");
    assert_eq!(same["warm_prompt"], "same");
    assert_eq!(reuse(&same, "cold"), reuse(&same, "warm"), "{same}");
    let other = run("other");
    assert_eq!(other["warm_prompt"], "other");
    assert_eq!(reuse(&other, "cold"), reuse(&same, "cold"), "the cold run does not change");
    assert_ne!(reuse(&other, "cold"), reuse(&other, "warm"), "{other}");
    let bad = Command::new(BIN).args(["bench", "--warm-prompt", "later", "--model"]).arg(&model).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--warm-prompt"));
}

#[test]
fn decode_input_can_be_random_ids_instead_of_the_argmax() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny(dir.path());
    let run = |input: &str| short_bench(&model, &["--decode-input", input]);
    let reuse = |j: &serde_json::Value| j["cold"]["routing_reuse"]["median"].as_f64().unwrap();
    let (greedy, random) = (run("greedy"), run("random"));
    assert_eq!(greedy["decode_input"], "greedy");
    assert_eq!(random["decode_input"], "random");
    // Other tokens route differently; the ids are fixed, so a second run routes the same.
    assert_ne!(reuse(&greedy), reuse(&random), "{greedy} {random}");
    assert_eq!(reuse(&random), reuse(&run("random")));
    let bad = Command::new(BIN).args(["bench", "--decode-input", "sampled", "--model"]).arg(&model).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--decode-input"));
}
