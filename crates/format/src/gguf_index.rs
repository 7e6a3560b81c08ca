//! GGUF → [`TensorIndex`]: metadata keys onto [`ModelConfig`], tensor infos onto canonical entries.
//!
//! GGUF tensor names are already our canonical names. What this module adds is the config (GGUF has no
//! config.json, so the `{arch}.*` keys are read instead) and the per-expert ranges of `*_exps` tensors: ggml
//! stores experts outermost (`ne = {H, I, E}`), so expert `e` is the slab at `offset + e·nb[2]`.

use std::path::Path;

use moestream_quant::{FloatType, GgmlType};

use crate::FormatError;
use crate::config::{Architecture, LayerAttention, LinearAttentionConfig, ModelConfig};
use crate::gguf::GgufFile;
use crate::index::{Encoding, FileRange, ModelFormat, TensorEntry, TensorIndex, check_expected, expected_shapes};

pub(crate) fn open_gguf(path: &Path) -> Result<TensorIndex, FormatError> {
    let g = GgufFile::open(path)?;
    let config = config_from_gguf(&g)?;
    let expected = expected_shapes(&config);
    let mut tensors = std::collections::BTreeMap::new();
    for t in &g.tensors {
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        if config.architecture == Architecture::Qwen3Moe {
            match expected.get(&t.name) {
                Some(want) if *want != shape => {
                    return Err(FormatError::invalid(
                        path,
                        format!("tensor `{}` has shape {shape:?}, the metadata implies {want:?}", t.name),
                    ));
                }
                _ => {}
            }
        }
        let encoding = match t.ty {
            GgmlType::F32 => Encoding::Float(FloatType::F32),
            GgmlType::F16 => Encoding::Float(FloatType::F16),
            GgmlType::BF16 => Encoding::Float(FloatType::BF16),
            other => Encoding::Ggml(other),
        };
        let data = if t.name.contains("_exps.") && shape.len() == 3 {
            let e = shape[0] as u64;
            let slab = t.n_bytes / e;
            (0..e).map(|i| FileRange { file: 0, offset: t.offset + i * slab, len: slab }).collect()
        } else {
            vec![FileRange { file: 0, offset: t.offset, len: t.n_bytes }]
        };
        tensors.insert(
            t.name.clone(),
            TensorEntry {
                name: t.name.clone(),
                source: t.name.clone(),
                shape,
                encoding,
                data,
                scales: Vec::new(),
                biases: Vec::new(),
                stored_shape: Vec::new(),
            },
        );
    }
    let index = TensorIndex {
        format: ModelFormat::Gguf,
        root: path.to_path_buf(),
        files: vec![path.to_path_buf()],
        config,
        tensors,
        gguf: Some(g),
        pack: None,
        warnings: Vec::new(),
    };
    check_expected(&index)?;
    Ok(index)
}

fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig, FormatError> {
    let path = &g.path;
    let arch_name = g.get_str("general.architecture")?;
    let architecture = match arch_name {
        "qwen3moe" => Architecture::Qwen3Moe,
        "qwen35moe" => Architecture::Qwen35Moe,
        "qwen3next" => Architecture::Qwen3Next,
        other => {
            return Err(FormatError::invalid(
                path,
                format!("unsupported general.architecture `{other}` (supported: qwen3moe, qwen35moe, qwen3next)"),
            ));
        }
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let req = |s: &str| -> Result<usize, FormatError> { get_usize(g, &k(s)) };
    let opt = |s: &str| -> Result<Option<usize>, FormatError> {
        if g.get(&k(s)).is_some() { get_usize(g, &k(s)).map(Some) } else { Ok(None) }
    };
    let optf = |s: &str| -> Result<Option<f64>, FormatError> {
        if g.get(&k(s)).is_some() { g.get_f64(&k(s)).map(Some) } else { Ok(None) }
    };
    let hidden_size = req("embedding_length")?;
    let num_layers = req("block_count")?;
    let num_heads = req("attention.head_count")?;
    let num_kv_heads = opt("attention.head_count_kv")?.unwrap_or(num_heads);
    let head_dim = match opt("attention.key_length")? {
        Some(d) => d,
        None => hidden_size.checked_div(num_heads).unwrap_or(0),
    };
    let vocab_size = match g.tensors.iter().find(|t| t.name == "token_embd.weight") {
        Some(t) => t.shape()[0] as usize,
        None => return Err(FormatError::MissingTensor { path: path.clone(), tensor: "token_embd.weight".into() }),
    };
    let tie_word_embeddings = !g.tensors.iter().any(|t| t.name == "output.weight");
    let partial_rotary_factor = match (opt("rope.dimension_count")?, head_dim) {
        (Some(r), d) if d > 0 => r as f64 / d as f64,
        _ => 1.0,
    };
    let (layer_types, linear) = if architecture.is_hybrid() {
        let interval = opt("full_attention_interval")?.unwrap_or(4).max(1);
        let lt = LayerAttention::hybrid_pattern(num_layers, interval);
        let lin = LinearAttentionConfig {
            num_key_heads: req("ssm.group_count")?,
            num_value_heads: req("ssm.time_step_rank")?,
            key_head_dim: req("ssm.state_size")?,
            value_head_dim: req("ssm.inner_size")? / req("ssm.time_step_rank")?.max(1),
            conv_kernel: opt("ssm.conv_kernel")?.unwrap_or(4),
        };
        (lt, Some(lin))
    } else {
        (vec![LayerAttention::FullAttention; num_layers], None)
    };
    let eos = if g.get("tokenizer.ggml.eos_token_id").is_some() {
        vec![get_usize(g, "tokenizer.ggml.eos_token_id")? as u32]
    } else {
        Vec::new()
    };
    let bos = if g.get("tokenizer.ggml.bos_token_id").is_some() {
        Some(get_usize(g, "tokenizer.ggml.bos_token_id")? as u32)
    } else {
        None
    };
    let cfg = ModelConfig {
        architecture,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        intermediate_size: opt("feed_forward_length")?.unwrap_or(0),
        moe_intermediate_size: req("expert_feed_forward_length")?,
        num_experts: req("expert_count")?,
        num_experts_per_tok: req("expert_used_count")?,
        // llama.cpp's qwen3moe graph always renormalises the top-k weights.
        norm_topk_prob: match g.get(&k("expert_weights_norm")) {
            Some(_) => g.get_bool(&k("expert_weights_norm"))?,
            None => true,
        },
        decoder_sparse_step: 1,
        // GGUF has no mlp_only_layers key; a layer without a router is a dense-MLP layer.
        mlp_only_layers: (0..num_layers)
            .filter(|i| !g.tensors.iter().any(|t| t.name == format!("blk.{i}.ffn_gate_inp.weight")))
            .collect(),
        shared_expert_intermediate_size: opt("expert_shared_feed_forward_length")?.unwrap_or(0),
        rms_norm_eps: optf("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        rope_theta: optf("rope.freq_base")?.unwrap_or(10000.0),
        partial_rotary_factor,
        max_position_embeddings: opt("context_length")?.unwrap_or(32768),
        tie_word_embeddings,
        layer_types,
        linear,
        bos_token_id: bos,
        eos_token_ids: eos,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

fn get_usize(g: &GgufFile, key: &str) -> Result<usize, FormatError> {
    let v = g.get_u64(key)?;
    usize::try_from(v).map_err(|_| FormatError::invalid(&g.path, format!("`{key}` = {v} does not fit in memory")))
}
