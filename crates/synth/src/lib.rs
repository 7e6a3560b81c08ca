//! Deterministic random-weight models of real shapes, in every file family we read.
//!
//! `synth` exists so that tests and benchmarks never download: a preset gives the config (tiny, or the real
//! widths of Qwen3-30B-A3B, optionally with fewer layers), [`plan`] lists the tensors, and a writer per format
//! streams them to disk one tensor (or one expert) at a time, so a 17 GB model is written with memory bounded by
//! its largest tensor. Values depend only on (seed, tensor name, expert), never on the format, so `hf-f32` and
//! `gguf-q8_0` of one seed hold the same underlying weights, which tests exploit.
//!
//! The byte layouts themselves belong to `moestream-format` (writers) and `moestream-quant` (encoders).

mod encode;
pub mod plan;
pub mod rng;
pub mod tokenizer;
mod write_gguf;
mod write_st;

use std::path::{Path, PathBuf};

use moestream_format::FormatError;
use moestream_format::config::ModelConfig;
use serde_json::json;

pub use plan::{PlannedTensor, Preset, RoutingSkew, plan, plan_skewed};
pub use tokenizer::{SynthTokenizer, SynthVocab};

/// Output file families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    HfBf16,
    HfF32,
    MlxQ4,
    MlxQ8,
    GgufQ4_0,
    GgufQ8_0,
    GgufF16,
}

impl SynthFormat {
    pub const ALL: [SynthFormat; 7] = [
        SynthFormat::HfBf16,
        SynthFormat::HfF32,
        SynthFormat::MlxQ4,
        SynthFormat::MlxQ8,
        SynthFormat::GgufQ4_0,
        SynthFormat::GgufQ8_0,
        SynthFormat::GgufF16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SynthFormat::HfBf16 => "hf-bf16",
            SynthFormat::HfF32 => "hf-f32",
            SynthFormat::MlxQ4 => "mlx-q4",
            SynthFormat::MlxQ8 => "mlx-q8",
            SynthFormat::GgufQ4_0 => "gguf-q4_0",
            SynthFormat::GgufQ8_0 => "gguf-q8_0",
            SynthFormat::GgufF16 => "gguf-f16",
        }
    }

    pub fn from_name(s: &str) -> Option<SynthFormat> {
        SynthFormat::ALL.into_iter().find(|f| f.name() == s)
    }

    pub fn is_gguf(self) -> bool {
        matches!(self, SynthFormat::GgufQ4_0 | SynthFormat::GgufQ8_0 | SynthFormat::GgufF16)
    }
}

/// How HF checkpoints store experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertLayout {
    /// `mlp.experts.{e}.{gate,up,down}_proj.weight`, as published Qwen3 checkpoints.
    #[default]
    PerExpert,
    /// `mlp.experts.gate_up_proj` `[E, 2I, H]` (gate first) and `mlp.experts.down_proj` `[E, H, I]`, as
    /// transformers 5 saves.
    Fused,
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    pub format: SynthFormat,
    /// A directory for HF/MLX, a `.gguf` file path for GGUF.
    pub out: PathBuf,
    pub seed: u64,
    pub layers: Option<usize>,
    pub expert_layout: ExpertLayout,
    /// Largest safetensors shard before a new one starts.
    pub shard_bytes: u64,
    /// Qwen3's real tokenizer raises the vocabulary (and so the embedding) to 151,936 rows.
    pub tokenizer: SynthTokenizer,
    /// `--routing-skew`: 0 writes today's near-uniform routers (byte-identical files); S > 0 gives experts a
    /// Zipf-like popularity per layer ([`RoutingSkew`]). On the Qwen3-30B-A3B shape 1 repeats 63% of a decode
    /// token's top-8 at the next token (random decode input; unskewed 47%, papers report ~45% for the trained
    /// model), so a skewed file is a more cache-friendly case than a trained model, not a model of one.
    pub routing_skew: f32,
    pub progress: bool,
}

impl SynthOptions {
    pub fn new(preset: Preset, format: SynthFormat, out: impl Into<PathBuf>) -> Self {
        SynthOptions {
            preset,
            format,
            out: out.into(),
            seed: 0,
            layers: None,
            expert_layout: ExpertLayout::PerExpert,
            shard_bytes: 4 << 30,
            tokenizer: SynthTokenizer::Synthetic,
            routing_skew: 0.0,
            progress: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Where a skewed synthetic model records its `--routing-skew`: a GGUF metadata key and a config.json field
/// (absent when the skew is 0). `moestream_format::TensorIndex::synthetic_routing_skew` reads them back.
pub const ROUTING_SKEW_GGUF: &str = moestream_format::ROUTING_SKEW_GGUF;
pub const ROUTING_SKEW_JSON: &str = moestream_format::ROUTING_SKEW_JSON;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io { path: path.to_path_buf(), source }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
    pub tensors: usize,
}

/// The config a preset resolves to (with `layers` applied).
pub fn preset_config(preset: Preset, layers: Option<usize>) -> ModelConfig {
    preset.config(layers, &SynthVocab::new(preset.vocab_size()))
}

/// Write a synthetic model.
pub fn synth(opts: &SynthOptions) -> Result<SynthSummary, SynthError> {
    if opts.layers == Some(0) {
        return Err(SynthError::Invalid("--layers must be at least 1".into()));
    }
    let vocab = opts.tokenizer.vocab(opts.preset.vocab_size())?;
    let mut config = opts.preset.config(opts.layers, &vocab);
    config.vocab_size = vocab.tokens.len();
    config.validate(&opts.out)?;
    if !(opts.routing_skew.is_finite() && opts.routing_skew >= 0.0) {
        return Err(SynthError::Invalid(format!("--routing-skew must be ≥ 0, not {}", opts.routing_skew)));
    }
    let tensors = plan_skewed(&config, opts.routing_skew);
    let total: u64 = tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let bar = progress_bar(opts.progress, total);
    let files = if opts.format.is_gguf() {
        if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        write_gguf::write(opts, &config, &vocab, &tensors, &bar)?;
        vec![opts.out.clone()]
    } else {
        std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
        write_side_files(&opts.out, &config, &vocab, opts.format, opts.routing_skew)?;
        write_st::write(opts, &config, &tensors, &bar)?
    };
    bar.finish_and_clear();
    let bytes = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    Ok(SynthSummary { path: opts.out.clone(), config, files, bytes, tensors: tensors.len() })
}

fn progress_bar(show: bool, total_elems: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_elems);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {percent}% of {human_len} weights, eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// The Qwen3.5 layout of config.json: the text model's fields nested under `text_config` (with the hybrid
/// fields), the quantization block and a few identity fields at the top, as the released checkpoints have it.
fn hybrid_config(c: &ModelConfig, flat: serde_json::Value) -> serde_json::Value {
    let mut text = flat;
    let la = c.linear.as_ref();
    let layer_types: Vec<&str> = c
        .layer_types
        .iter()
        .map(|t| match t {
            moestream_format::config::LayerAttention::FullAttention => "full_attention",
            moestream_format::config::LayerAttention::LinearAttention => "linear_attention",
        })
        .collect();
    let top_q = text.as_object_mut().and_then(|o| {
        o.remove("architectures");
        let q = o.remove("quantization");
        o.remove("quantization_config");
        q
    });
    for (k, v) in [
        ("model_type", json!("qwen3_5_moe_text")),
        ("layer_types", json!(layer_types)),
        ("linear_num_key_heads", json!(la.map(|l| l.num_key_heads))),
        ("linear_num_value_heads", json!(la.map(|l| l.num_value_heads))),
        ("linear_key_head_dim", json!(la.map(|l| l.key_head_dim))),
        ("linear_value_head_dim", json!(la.map(|l| l.value_head_dim))),
        ("linear_conv_kernel_dim", json!(la.map(|l| l.conv_kernel))),
        ("shared_expert_intermediate_size", json!(c.shared_expert_intermediate_size)),
        (
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": c.rope_theta,
                                   "partial_rotary_factor": c.partial_rotary_factor}),
        ),
        ("full_attention_interval", json!(4)),
    ] {
        text[k] = v;
    }
    let mut root = json!({
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "tie_word_embeddings": c.tie_word_embeddings,
        "text_config": text,
        "moestream_synthetic": "random weights: this model's output is meaningless",
    });
    if let Some(q) = top_q {
        root["quantization"] = q.clone();
        root["quantization_config"] = q;
    }
    root
}

/// config.json, tokenizer files and generation_config.json for HF/MLX directories.
fn write_side_files(
    dir: &Path,
    c: &ModelConfig,
    vocab: &SynthVocab,
    format: SynthFormat,
    routing_skew: f32,
) -> Result<(), SynthError> {
    let dtype = match format {
        SynthFormat::HfF32 => "float32",
        _ => "bfloat16",
    };
    let mut cfg = json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": c.architecture.model_type(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "norm_topk_prob": c.norm_topk_prob,
        "decoder_sparse_step": c.decoder_sparse_step,
        "mlp_only_layers": c.mlp_only_layers,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": false,
        "use_cache": true,
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": c.num_layers,
        "rope_scaling": null,
        "torch_dtype": dtype,
        "moestream_synthetic": "random weights: this model's output is meaningless",
    });
    if let Some(bits) = write_st::mlx_bits(format) {
        let q = json!({
            "group_size": write_st::MLX_GROUP,
            "bits": bits,
            // The router stays at 8 bits, as mlx-lm's Qwen3-MoE quant predicate keeps it; this also exercises
            // the per-module override path of readers.
            "mode": "affine",
        });
        let mut q = q.as_object().cloned().unwrap_or_default();
        let prefix = write_st::prefix(c, true);
        for i in 0..c.num_layers {
            if c.layer_is_moe(i) {
                let router = json!({"group_size": write_st::MLX_GROUP, "bits": write_st::MLX_ROUTER_BITS});
                q.insert(format!("{prefix}layers.{i}.mlp.gate"), router.clone());
                if c.shared_expert_intermediate_size > 0 {
                    q.insert(format!("{prefix}layers.{i}.mlp.shared_expert_gate"), router);
                }
            }
        }
        cfg["quantization"] = serde_json::Value::Object(q.clone());
        cfg["quantization_config"] = serde_json::Value::Object(q);
    }
    if c.architecture.is_hybrid() {
        cfg = hybrid_config(c, cfg);
    }
    // Only when set, so that skew 0 writes the same files as before the option existed.
    if routing_skew > 0.0 {
        cfg[ROUTING_SKEW_JSON] = json!(routing_skew);
    }
    let write_json = |name: &str, v: &serde_json::Value| -> Result<(), SynthError> {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| SynthError::Invalid(e.to_string()))?;
        std::fs::write(&p, text).map_err(io_err(&p))
    };
    write_json("config.json", &cfg)?;
    let (tokenizer_json, tokenizer_config_json) = vocab.hf_files()?;
    for (name, bytes) in [("tokenizer.json", tokenizer_json), ("tokenizer_config.json", tokenizer_config_json)] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(io_err(&p))?;
    }
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": c.bos_token_id, "eos_token_id": [vocab.im_end, vocab.endoftext],
                "do_sample": false, "temperature": 1.0}),
    )?;
    Ok(())
}
