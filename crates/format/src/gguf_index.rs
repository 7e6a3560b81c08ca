//! GGUF → [`TensorIndex`]: metadata keys onto [`ModelConfig`], tensor infos onto canonical entries.
//!
//! GGUF tensor names are already our canonical names. What this module adds is the config (GGUF has no
//! config.json, so the `{arch}.*` keys are read instead) and the per-expert ranges of `*_exps` tensors: ggml
//! stores experts outermost (`ne = {H, I, E}`), so expert `e` is the slab at `offset + e·nb[2]`.
//!
//! llama.cpp's hybrids (`qwen35moe`, `qwen3next`) spell three tensors differently from our canonical names, and
//! [`canonical_name`] renames them. Their *contents* also differ from the HF checkpoint (value heads tiled,
//! `ssm_a = −exp(A_log)`, norms +1); the model handles that (docs/llamacpp-qwen35moe-gguf.md).

use std::path::Path;

use moestream_quant::{FloatType, GgmlType};

use crate::FormatError;
use crate::config::{Architecture, LayerAttention, LinearAttentionConfig, ModelConfig};
use crate::gguf::{GgufArray, GgufFile, GgufValue};
use crate::index::{Encoding, FileRange, ModelFormat, TensorEntry, TensorIndex, check_expected, expected_shapes};

pub(crate) fn open_gguf(path: &Path) -> Result<TensorIndex, FormatError> {
    let g = GgufFile::open(path)?;
    let config = config_from_gguf(&g)?;
    let expected = expected_shapes(&config);
    let mut tensors = std::collections::BTreeMap::new();
    let mut mtp = 0usize;
    for t in &g.tensors {
        // MTP blocks (after `num_layers`, see `config_from_gguf`) are not run: leave them out of the index so that
        // neither the trunk nor the expert store loads them.
        let block = t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok());
        if block.is_some_and(|b| b >= config.num_layers) {
            mtp += 1;
            continue;
        }
        let mut shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        // The shared-expert gate is a [1, H] matrix; the converter writes ne {H, 1}, but llama-quantize drops the
        // trailing 1 and writes ne {H}. Both are the same bytes.
        if t.name.ends_with(".ffn_gate_inp_shexp.weight") && shape.len() == 1 {
            shape.insert(0, 1);
        }
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
        let name = if config.architecture.is_hybrid() { canonical_name(&t.name) } else { t.name.clone() };
        tensors.insert(
            name.clone(),
            TensorEntry {
                name,
                source: t.name.clone(),
                shape,
                encoding,
                data,
                scales: Vec::new(),
                biases: Vec::new(),
                stored_shape: Vec::new(),
                data_packed: false,
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
        warnings: if mtp > 0 {
            vec![format!("{mtp} tensors of the MTP (next-token prediction) blocks are not used")]
        } else {
            Vec::new()
        },
    };
    check_expected(&index)?;
    Ok(index)
}

/// llama.cpp's hybrid tensor names → canonical ones. `source` keeps the file's name.
/// - `blk.N.post_attention_norm.weight` (the pre-FFN norm) → `blk.N.ffn_norm.weight`, as qwen3moe GGUFs name it.
/// - `blk.N.ssm_a` (no `.weight`; it holds `−exp(A_log)`, not A_log) → `blk.N.ssm_a.weight`, a name distinct from
///   HF's `ssm_a_log` so that nothing can mistake one for the other.
/// - `blk.N.ssm_dt.bias` → `blk.N.ssm_dt_bias.weight`.
fn canonical_name(name: &str) -> String {
    if let Some(blk) = name.strip_suffix(".post_attention_norm.weight") {
        format!("{blk}.ffn_norm.weight")
    } else if name.starts_with("blk.") && name.ends_with(".ssm_a") {
        format!("{name}.weight")
    } else if let Some(blk) = name.strip_suffix(".ssm_dt.bias") {
        format!("{blk}.ssm_dt_bias.weight")
    } else {
        name.to_string()
    }
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
    // Converted with MTP, block_count also counts the `nextn_predict_layers` MTP blocks at the end; we run only
    // the decoder layers (the MTP tensors stay in the file, unused).
    let num_layers = req("block_count")?.saturating_sub(opt("nextn_predict_layers")?.unwrap_or(0));
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
        // The converter writes the per-layer pattern from HF's `layer_types` as `attention.recurrent_layers`, and
        // `full_attention_interval` only from the config key (default 4, wrong for any other pattern), so the
        // array wins when present.
        let lt = match g.get(&k("attention.recurrent_layers")) {
            Some(GgufValue::Array(GgufArray::Bool(rec))) => {
                if rec.len() < num_layers {
                    return Err(FormatError::invalid(
                        path,
                        format!(
                            "{} has {} entries for {num_layers} layers",
                            k("attention.recurrent_layers"),
                            rec.len()
                        ),
                    ));
                }
                // Entries past block_count describe MTP layers, which we do not run.
                rec[..num_layers]
                    .iter()
                    .map(|&r| if r { LayerAttention::LinearAttention } else { LayerAttention::FullAttention })
                    .collect()
            }
            Some(_) => {
                return Err(FormatError::invalid(
                    path,
                    format!("{} is not a bool array", k("attention.recurrent_layers")),
                ));
            }
            None => LayerAttention::hybrid_pattern(num_layers, opt("full_attention_interval")?.unwrap_or(4).max(1)),
        };
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
