//! `config.json` → `ModelConfig`: every key spelling we claim to accept, read from real-looking checkpoints under
//! `tests/fixtures/configs/`, then broken configs, each checked for an error that names the file and the field.

use std::path::{Path, PathBuf};

use moestream_format::config::{Architecture, LayerAttention, ModelConfig};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/configs").join(name)
}

fn fixture_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The fields each fixture is checked on; everything a loader of that checkpoint would get wrong first.
#[derive(Debug, PartialEq)]
struct Parsed {
    architecture: Architecture,
    hidden_size: usize,
    num_layers: usize,
    heads: (usize, usize, usize),
    vocab_size: usize,
    experts: (usize, usize),
    moe_intermediate_size: usize,
    shared_expert_intermediate_size: usize,
    norm_topk_prob: bool,
    rope_theta: f64,
    partial_rotary_factor: f64,
    tie_word_embeddings: bool,
    /// Indices of full-attention layers.
    full_attention_layers: Vec<usize>,
    /// (key heads, value heads, key dim, value dim, conv kernel) of Gated DeltaNet.
    linear: Option<(usize, usize, usize, usize, usize)>,
    bos: Option<u32>,
    eos: Vec<u32>,
}

fn parsed(c: &ModelConfig) -> Parsed {
    Parsed {
        architecture: c.architecture,
        hidden_size: c.hidden_size,
        num_layers: c.num_layers,
        heads: (c.num_heads, c.num_kv_heads, c.head_dim),
        vocab_size: c.vocab_size,
        experts: (c.num_experts, c.num_experts_per_tok),
        moe_intermediate_size: c.moe_intermediate_size,
        shared_expert_intermediate_size: c.shared_expert_intermediate_size,
        norm_topk_prob: c.norm_topk_prob,
        rope_theta: c.rope_theta,
        partial_rotary_factor: c.partial_rotary_factor,
        tie_word_embeddings: c.tie_word_embeddings,
        full_attention_layers: (0..c.num_layers)
            .filter(|&i| c.layer_types[i] == LayerAttention::FullAttention)
            .collect(),
        linear: c
            .linear
            .as_ref()
            .map(|l| (l.num_key_heads, l.num_value_heads, l.key_head_dim, l.value_head_dim, l.conv_kernel)),
        bos: c.bos_token_id,
        eos: c.eos_token_ids.clone(),
    }
}

#[test]
fn fixtures_parse_to_the_published_shapes() {
    let every_4th = |n: usize| (0..n).filter(|i| (i + 1) % 4 == 0).collect::<Vec<_>>();
    let cases = [
        (
            // Published Qwen/Qwen3-30B-A3B: `num_experts`, top-level `rope_theta`.
            "qwen3-30b-a3b.json",
            Parsed {
                architecture: Architecture::Qwen3Moe,
                hidden_size: 2048,
                num_layers: 48,
                heads: (32, 4, 128),
                vocab_size: 151_936,
                experts: (128, 8),
                moe_intermediate_size: 768,
                shared_expert_intermediate_size: 0,
                norm_topk_prob: true,
                rope_theta: 1e6,
                partial_rotary_factor: 1.0,
                tie_word_embeddings: false,
                full_attention_layers: (0..48).collect(),
                linear: None,
                bos: Some(151_643),
                eos: vec![151_645],
            },
        ),
        (
            // transformers 5 save of a 235B-A22B-shaped model: `num_local_experts`, `rope_parameters.rope_theta`.
            "qwen3-moe-transformers5.json",
            Parsed {
                architecture: Architecture::Qwen3Moe,
                hidden_size: 4096,
                num_layers: 94,
                heads: (64, 4, 128),
                vocab_size: 151_936,
                experts: (128, 8),
                moe_intermediate_size: 1536,
                shared_expert_intermediate_size: 0,
                norm_topk_prob: true,
                rope_theta: 1e6,
                partial_rotary_factor: 1.0,
                tie_word_embeddings: false,
                full_attention_layers: (0..94).collect(),
                linear: None,
                bos: Some(151_643),
                eos: vec![151_645],
            },
        ),
        (
            // `n_routed_experts`, no head_dim (hidden/heads), integer rope_theta, tied embeddings, eos list.
            "qwen3-moe-n-routed-experts.json",
            Parsed {
                architecture: Architecture::Qwen3Moe,
                hidden_size: 1024,
                num_layers: 24,
                heads: (16, 8, 64),
                vocab_size: 65_536,
                experts: (64, 4),
                moe_intermediate_size: 384,
                shared_expert_intermediate_size: 0,
                norm_topk_prob: false,
                rope_theta: 5e5,
                partial_rotary_factor: 1.0,
                tie_word_embeddings: true,
                full_attention_layers: (0..24).collect(),
                linear: None,
                bos: Some(1),
                eos: vec![2, 3],
            },
        ),
        (
            // Qwen3.5-35B-A3B: text model under `text_config`, explicit `layer_types`, partial RoPE in
            // `rope_parameters`, `norm_topk_prob` absent (always renormalised).
            "qwen3.5-35b-a3b.json",
            Parsed {
                architecture: Architecture::Qwen35Moe,
                hidden_size: 2048,
                num_layers: 40,
                heads: (16, 2, 256),
                vocab_size: 248_320,
                experts: (256, 8),
                moe_intermediate_size: 512,
                shared_expert_intermediate_size: 512,
                norm_topk_prob: true,
                rope_theta: 1e7,
                partial_rotary_factor: 0.25,
                tie_word_embeddings: false,
                full_attention_layers: every_4th(40),
                linear: Some((16, 32, 128, 128, 4)),
                bos: Some(248_044),
                eos: vec![248_044],
            },
        ),
        (
            // Qwen3-Next-80B-A3B: no `layer_types`, derived from `full_attention_interval`; top-level
            // `partial_rotary_factor`.
            "qwen3-next-80b-a3b.json",
            Parsed {
                architecture: Architecture::Qwen3Next,
                hidden_size: 2048,
                num_layers: 48,
                heads: (16, 2, 256),
                vocab_size: 151_936,
                experts: (512, 10),
                moe_intermediate_size: 512,
                shared_expert_intermediate_size: 512,
                norm_topk_prob: true,
                rope_theta: 1e7,
                partial_rotary_factor: 0.25,
                tie_word_embeddings: false,
                full_attention_layers: every_4th(48),
                linear: Some((16, 32, 128, 128, 4)),
                bos: Some(151_643),
                eos: vec![151_645],
            },
        ),
    ];
    for (file, want) in cases {
        let c = ModelConfig::from_file(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(parsed(&c), want, "{file}");
        assert!((0..c.num_layers).all(|i| c.layer_is_moe(i)), "{file}: every layer is MoE");
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let mut v = fixture_json("qwen3-30b-a3b.json");
    v["some_future_field"] = json!({"nested": [1, 2, 3]});
    v["quantization_config"] = json!({"weird": true});
    v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
    let path = Path::new("/models/q/config.json");
    let with = ModelConfig::from_json_str(&v.to_string(), path).expect("extra fields are fine");
    let without = ModelConfig::from_file(&fixture("qwen3-30b-a3b.json")).expect("fixture parses");
    assert_eq!(with, without);
}

/// How a broken config is made from the published 30B-A3B one.
enum Edit {
    Remove(&'static str),
    Set(&'static str, Value),
    Raw(&'static str),
}

#[test]
fn broken_configs_name_the_file_and_the_problem() {
    let cases: Vec<(&str, Vec<Edit>, Vec<&str>)> = vec![
        (
            "no expert count on a MoE config",
            vec![Edit::Remove("num_experts")],
            vec!["missing required field", "num_experts|num_local_experts|n_routed_experts"],
        ),
        ("no hidden_size", vec![Edit::Remove("hidden_size")], vec!["missing required field", "hidden_size"]),
        (
            "malformed JSON",
            vec![Edit::Raw("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 2048,,}")],
            vec!["malformed JSON", "line 1"],
        ),
        (
            "a string where an integer belongs",
            vec![Edit::Set("hidden_size", json!("2048"))],
            vec!["hidden_size", "must be a non-negative integer", "\"2048\""],
        ),
        ("a negative integer", vec![Edit::Set("num_experts", json!(-1))], vec!["num_experts", "non-negative integer"]),
        (
            "a float where an integer belongs",
            vec![Edit::Set("num_hidden_layers", json!(48.5))],
            vec!["num_hidden_layers", "integer"],
        ),
        (
            "unsupported model_type",
            vec![Edit::Set("model_type", json!("llama"))],
            vec!["unsupported model_type `llama`", "qwen3_moe"],
        ),
        ("no model_type at all", vec![Edit::Remove("model_type")], vec!["missing required field", "model_type"]),
        (
            "heads not a multiple of kv heads",
            vec![Edit::Set("num_key_value_heads", json!(5))],
            vec!["num_attention_heads 32", "not a multiple of num_key_value_heads 5"],
        ),
        (
            "top-k above the expert count",
            vec![Edit::Set("num_experts_per_tok", json!(129))],
            vec!["num_experts_per_tok 129", "exceeds the expert count 128"],
        ),
        (
            "mlp_only_layers past the last layer",
            vec![Edit::Set("mlp_only_layers", json!([3, 48]))],
            vec!["mlp_only_layers names layer 48", "has 48"],
        ),
        (
            "mlp_only_layers not a list of numbers",
            vec![Edit::Set("mlp_only_layers", json!(["3"]))],
            vec!["mlp_only_layers", "list of layer numbers"],
        ),
        ("zero experts", vec![Edit::Set("num_experts", json!(0))], vec!["num_experts", "must be positive"]),
        (
            "dense layers without intermediate_size",
            vec![Edit::Set("decoder_sparse_step", json!(2)), Edit::Remove("intermediate_size")],
            vec!["dense MLP", "intermediate_size"],
        ),
        (
            "norm_topk_prob not a bool",
            vec![Edit::Set("norm_topk_prob", json!("yes"))],
            vec!["norm_topk_prob", "true or false"],
        ),
        (
            "rope_theta not a number",
            vec![Edit::Set("rope_theta", json!("1e6"))],
            vec!["rope_theta", "must be a number"],
        ),
        ("not an object", vec![Edit::Raw("[1, 2, 3]")], vec!["not a JSON object"]),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, edits, want) in cases {
        let mut v = fixture_json("qwen3-30b-a3b.json");
        let mut text = None;
        for e in edits {
            match e {
                Edit::Remove(k) => {
                    v.as_object_mut().expect("object").remove(k);
                }
                Edit::Set(k, x) => v[k] = x,
                Edit::Raw(t) => text = Some(t.to_string()),
            }
        }
        let text = text.unwrap_or_else(|| v.to_string());
        let path = dir.path().join("config.json");
        std::fs::write(&path, &text).expect("write config");
        let err = match ModelConfig::from_file(&path) {
            Ok(c) => panic!("{what}: parsed as {c:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&path.display().to_string()), "{what}: error does not name the file: {err}");
        for w in want {
            assert!(err.contains(w), "{what}: error lacks `{w}`: {err}");
        }
    }
}

#[test]
fn broken_nested_config_names_the_file() {
    let mut v = fixture_json("qwen3.5-35b-a3b.json");
    v["text_config"].as_object_mut().expect("object").remove("linear_num_value_heads");
    let path = Path::new("/models/qwen3.5/config.json");
    let err = ModelConfig::from_json_str(&v.to_string(), path).expect_err("missing GDN field").to_string();
    assert!(err.contains("/models/qwen3.5/config.json") && err.contains("linear_num_value_heads"), "{err}");

    let mut v = fixture_json("qwen3.5-35b-a3b.json");
    v["text_config"]["layer_types"] = json!(["linear_attention", "sliding_attention"]);
    let err = ModelConfig::from_json_str(&v.to_string(), path).expect_err("bad layer type").to_string();
    assert!(err.contains("/models/qwen3.5/config.json") && err.contains("sliding_attention"), "{err}");

    let mut v = fixture_json("qwen3.5-35b-a3b.json");
    v["text_config"]["layer_types"] = json!(["linear_attention", "full_attention"]);
    let err = ModelConfig::from_json_str(&v.to_string(), path).expect_err("too few layer types").to_string();
    assert!(err.contains("layer_types has 2 entries for 40 layers"), "{err}");
}

#[test]
fn layer_is_moe_follows_sparse_step_and_mlp_only_layers() {
    let cases: [(usize, Vec<usize>, &str); 4] = [
        // (decoder_sparse_step, mlp_only_layers, expected M/D pattern over 8 layers)
        (1, vec![], "MMMMMMMM"),
        (2, vec![], "DMDMDMDM"),
        (1, vec![0, 7], "DMMMMMMD"),
        (2, vec![3], "DMDDDMDM"),
    ];
    for (step, mlp_only, want) in cases {
        let mut v = fixture_json("qwen3-30b-a3b.json");
        v["num_hidden_layers"] = json!(8);
        v["decoder_sparse_step"] = json!(step);
        v["mlp_only_layers"] = json!(mlp_only);
        let c = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).expect("valid");
        let got: String = (0..8).map(|i| if c.layer_is_moe(i) { 'M' } else { 'D' }).collect();
        assert_eq!(got, want, "step {step}, mlp_only_layers {mlp_only:?}");
    }
}

#[test]
fn parameter_counts_match_published_qwen3_30b_a3b() {
    let c = ModelConfig::from_file(&fixture("qwen3-30b-a3b.json")).expect("fixture parses");
    let p = c.parameter_counts();
    let within = |x: u64, want: f64| ((x as f64 - want) / want).abs() <= 0.01;
    assert!(within(p.total, 30.5e9), "total {}", p.total);
    // The model card says "3.3B activated": that truncates to one decimal. Counting embeddings and lm_head once
    // each, the shapes give 3.35e9 (the card's "3.3B" and "30.5B" come from the same count).
    assert!(within(p.active, 3.35e9), "active {}", p.active);
}

#[test]
fn parameter_counts_of_dense_layers_use_intermediate_size() {
    let mut v = fixture_json("qwen3-30b-a3b.json");
    v["num_hidden_layers"] = json!(2);
    let moe = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).expect("valid");
    v["mlp_only_layers"] = json!([0]);
    let mixed = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).expect("valid");
    let (h, e, k, im, dense) = (2048u64, 128u64, 8u64, 768u64, 6144u64);
    let (pm, px) = (moe.parameter_counts(), mixed.parameter_counts());
    assert_eq!(pm.total - px.total, e * h + e * 3 * h * im - 3 * h * dense);
    assert_eq!(pm.active - px.active, e * h + k * 3 * h * im - 3 * h * dense);
}

#[test]
fn decoder_sparse_step_zero_is_rejected() {
    // transformers computes `(i + 1) % decoder_sparse_step` and fails on 0; `layer_is_moe` instead answers false
    // for every layer, so this 128-expert config reads as a dense model (the misreading the module exists to
    // prevent), because `intermediate_size` happens to be present.
    let mut v = fixture_json("qwen3-30b-a3b.json");
    v["decoder_sparse_step"] = json!(0);
    let path = Path::new("/models/q/config.json");
    match ModelConfig::from_json_str(&v.to_string(), path) {
        Ok(c) => panic!(
            "accepted; MoE layers: {} of {}",
            (0..c.num_layers).filter(|&i| c.layer_is_moe(i)).count(),
            c.num_layers
        ),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("/models/q/config.json") && e.contains("decoder_sparse_step"), "{e}");
        }
    }
}
