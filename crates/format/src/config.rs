//! `config.json` → [`ModelConfig`], the architecture facts every other crate reads.
//!
//! Checkpoints spell the same fact several ways (transformers 5 writes `num_local_experts` and
//! `rope_parameters`, published Qwen checkpoints write `num_experts` and `rope_theta`, others `n_routed_experts`),
//! and Qwen3.5 nests the text model under `text_config`. This module accepts every spelling we know and fails
//! loudly when a MoE config names no expert count: reading a MoE as dense is how other engines got OOM-killed.
//! Unknown fields are ignored. GGUF metadata is mapped onto the same struct by the GGUF side of the index.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::FormatError;

/// The model families we run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Architecture {
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    #[serde(rename = "qwen3_5_moe")]
    Qwen35Moe,
    #[serde(rename = "qwen3_next")]
    Qwen3Next,
}

impl Architecture {
    pub fn from_model_type(s: &str) -> Option<Self> {
        match s {
            "qwen3_moe" => Some(Architecture::Qwen3Moe),
            "qwen3_5_moe" | "qwen3_5_moe_text" => Some(Architecture::Qwen35Moe),
            "qwen3_next" => Some(Architecture::Qwen3Next),
            _ => None,
        }
    }

    /// The name HF uses in `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Qwen35Moe => "qwen3_5_moe",
            Architecture::Qwen3Next => "qwen3_next",
        }
    }

    /// Hybrid models interleave Gated DeltaNet layers with full attention and add a shared expert.
    pub fn is_hybrid(self) -> bool {
        matches!(self, Architecture::Qwen35Moe | Architecture::Qwen3Next)
    }
}

/// What the attention part of a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerAttention {
    FullAttention,
    LinearAttention,
}

impl LayerAttention {
    /// Qwen3.5/Qwen3-Next's default pattern: layer i is full attention iff (i+1) is a multiple of `interval`.
    pub fn hybrid_pattern(num_layers: usize, interval: usize) -> Vec<LayerAttention> {
        (0..num_layers)
            .map(|i| {
                if (i + 1).is_multiple_of(interval.max(1)) {
                    LayerAttention::FullAttention
                } else {
                    LayerAttention::LinearAttention
                }
            })
            .collect()
    }
}

/// Gated DeltaNet ("linear attention") geometry of the hybrid models.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinearAttentionConfig {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    pub conv_kernel: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Width of the dense MLP of non-MoE layers (0 when every layer is MoE and the config omits it).
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub shared_expert_intermediate_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Fraction of head_dim that RoPE rotates (1.0 for Qwen3-MoE, 0.25 for Qwen3.5).
    pub partial_rotary_factor: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub layer_types: Vec<LayerAttention>,
    pub linear: Option<LinearAttentionConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Whether layer `i` routes through experts (true) or has a dense MLP of `intermediate_size`.
    pub fn layer_is_moe(&self, i: usize) -> bool {
        self.num_experts > 0
            && !self.mlp_only_layers.contains(&i)
            && self.decoder_sparse_step > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    pub fn from_file(path: &Path) -> Result<Self, FormatError> {
        let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse config text; `path` is only used to name the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, FormatError> {
        let root: Value =
            serde_json::from_str(text).map_err(|source| FormatError::Json { path: path.to_path_buf(), source })?;
        if !root.is_object() {
            return Err(FormatError::invalid(path, "config.json is not a JSON object"));
        }
        let r = Reader { path: path.to_path_buf(), root: &root };
        let top_type = r.str_at(&root, "model_type");
        let text = match root.get("text_config") {
            Some(tc) if tc.is_object() => tc,
            _ => &root,
        };
        let t = Reader { path: path.to_path_buf(), root: text };
        let model_type = t
            .str_at(text, "model_type")
            .or(top_type)
            .ok_or_else(|| FormatError::MissingField { path: path.to_path_buf(), field: "model_type".into() })?;
        let architecture = Architecture::from_model_type(model_type).ok_or_else(|| {
            FormatError::invalid(
                path,
                format!("unsupported model_type `{model_type}` (supported: qwen3_moe, qwen3_5_moe, qwen3_next)"),
            )
        })?;

        let hidden_size = t.req_usize(&["hidden_size"])?;
        let num_layers = t.req_usize(&["num_hidden_layers"])?;
        let num_heads = t.req_usize(&["num_attention_heads"])?;
        let num_kv_heads = t.opt_usize(&["num_key_value_heads"])?.unwrap_or(num_heads);
        let head_dim = match t.opt_usize(&["head_dim"])? {
            Some(d) => d,
            None => hidden_size.checked_div(num_heads).unwrap_or(0),
        };
        let vocab_size = t.req_usize(&["vocab_size"])?;
        let num_experts = t.req_usize(&["num_experts", "num_local_experts", "n_routed_experts"])?;
        let num_experts_per_tok = t.req_usize(&["num_experts_per_tok", "moe_top_k", "num_experts_per_token"])?;
        let moe_intermediate_size = t.req_usize(&["moe_intermediate_size"])?;
        let intermediate_size = t.opt_usize(&["intermediate_size"])?.unwrap_or(0);
        // Qwen3.5 always renormalises top-k; Qwen3-MoE and Qwen3-Next read the flag (HF default false).
        let norm_topk_prob = match architecture {
            Architecture::Qwen35Moe => t.opt_bool("norm_topk_prob")?.unwrap_or(true),
            _ => t.opt_bool("norm_topk_prob")?.unwrap_or(false),
        };
        let decoder_sparse_step = t.opt_usize(&["decoder_sparse_step"])?.unwrap_or(1);
        let mlp_only_layers = match text.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| FormatError::invalid(path, "`mlp_only_layers` must be a list of layer numbers"))?,
            Some(_) => return Err(FormatError::invalid(path, "`mlp_only_layers` must be a list of layer numbers")),
        };
        let shared_expert_intermediate_size = t.opt_usize(&["shared_expert_intermediate_size"])?.unwrap_or(0);
        let rms_norm_eps = t.opt_f64(text, "rms_norm_eps")?.unwrap_or(1e-6);
        let rope = text.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope {
            Some(rp) => t.opt_f64(rp, "rope_theta")?,
            None => None,
        }
        .or(t.opt_f64(text, "rope_theta")?)
        .unwrap_or(10000.0);
        let default_partial = if architecture.is_hybrid() { 0.25 } else { 1.0 };
        let partial_rotary_factor = match rope {
            Some(rp) => t.opt_f64(rp, "partial_rotary_factor")?,
            None => None,
        }
        .or(t.opt_f64(text, "partial_rotary_factor")?)
        .unwrap_or(default_partial);
        let max_position_embeddings = t.opt_usize(&["max_position_embeddings"])?.unwrap_or(32768);
        // Nested configs keep tie_word_embeddings at either level; the text level wins.
        let tie_word_embeddings = match t.opt_bool("tie_word_embeddings")? {
            Some(b) => Some(b),
            None => r.opt_bool("tie_word_embeddings")?,
        }
        .unwrap_or(false);

        let (layer_types, linear) = if architecture.is_hybrid() {
            let layer_types = match text.get("layer_types") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| match v.as_str() {
                        Some("full_attention") => Ok(LayerAttention::FullAttention),
                        Some("linear_attention") => Ok(LayerAttention::LinearAttention),
                        other => Err(FormatError::invalid(path, format!("layer_types: unknown entry {other:?}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => {
                    let interval = t.opt_usize(&["full_attention_interval"])?.unwrap_or(4);
                    if interval == 0 {
                        return Err(FormatError::invalid(path, "`full_attention_interval` must be at least 1"));
                    }
                    LayerAttention::hybrid_pattern(num_layers, interval)
                }
            };
            let linear = LinearAttentionConfig {
                num_key_heads: t.req_usize(&["linear_num_key_heads"])?,
                num_value_heads: t.req_usize(&["linear_num_value_heads"])?,
                key_head_dim: t.req_usize(&["linear_key_head_dim"])?,
                value_head_dim: t.req_usize(&["linear_value_head_dim"])?,
                conv_kernel: t.opt_usize(&["linear_conv_kernel_dim"])?.unwrap_or(4),
            };
            (layer_types, Some(linear))
        } else {
            (vec![LayerAttention::FullAttention; num_layers], None)
        };

        let bos_token_id = t.opt_u32_any(text, "bos_token_id").or_else(|| r.opt_u32_any(&root, "bos_token_id"));
        let eos_token_ids = t.u32_list(text, "eos_token_id");
        let eos_token_ids = if eos_token_ids.is_empty() { r.u32_list(&root, "eos_token_id") } else { eos_token_ids };

        let cfg = ModelConfig {
            architecture,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            intermediate_size,
            moe_intermediate_size,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob,
            decoder_sparse_step,
            mlp_only_layers,
            shared_expert_intermediate_size,
            rms_norm_eps,
            rope_theta,
            partial_rotary_factor,
            max_position_embeddings,
            tie_word_embeddings,
            layer_types,
            linear,
            bos_token_id,
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Cross-field checks that catch a config which would otherwise produce wrong shapes much later.
    pub fn validate(&self, path: &Path) -> Result<(), FormatError> {
        let bad = |msg: String| Err(FormatError::invalid(path, msg));
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if self.decoder_sparse_step == 0 {
            // transformers divides by it; reading 0 as "no MoE layers" would load a MoE as dense.
            return bad("`decoder_sparse_step` must be at least 1".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return bad(format!(
                "num_experts_per_tok {} exceeds the expert count {}",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        if self.layer_types.len() != self.num_layers {
            return bad(format!("layer_types has {} entries for {} layers", self.layer_types.len(), self.num_layers));
        }
        if let Some(&l) = self.mlp_only_layers.iter().find(|&&l| l >= self.num_layers) {
            return bad(format!("mlp_only_layers names layer {l} but the model has {}", self.num_layers));
        }
        let has_dense = (0..self.num_layers).any(|i| !self.layer_is_moe(i));
        if has_dense && self.intermediate_size == 0 {
            return bad("some layers have a dense MLP but `intermediate_size` is missing".into());
        }
        if let Some(l) = &self.linear
            && (l.num_key_heads == 0 || l.num_value_heads % l.num_key_heads != 0)
        {
            return bad(format!(
                "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                l.num_value_heads, l.num_key_heads
            ));
        }
        Ok(())
    }

    /// Parameter counts (total, active per token) from the shapes alone; embeddings count once when tied.
    pub fn parameter_counts(&self) -> ParameterCounts {
        let h = self.hidden_size as u64;
        let d = self.head_dim as u64;
        let (hq, hkv) = (self.num_heads as u64, self.num_kv_heads as u64);
        let embed = self.vocab_size as u64 * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        let mut total = embed + lm_head + h;
        let mut active = embed + lm_head + h;
        for i in 0..self.num_layers {
            let norms = 2 * h;
            let attn = match (self.layer_types[i], &self.linear) {
                (LayerAttention::LinearAttention, Some(l)) => {
                    let (kh, vh) = (l.num_key_heads as u64, l.num_value_heads as u64);
                    let (dk, dv) = (l.key_head_dim as u64, l.value_head_dim as u64);
                    let qkv = 2 * kh * dk + vh * dv;
                    qkv * h + vh * dv * h + 2 * vh * h + qkv * l.conv_kernel as u64 + 2 * vh + dv + vh * dv * h
                }
                _ => {
                    // Hybrid models gate attention: q_proj emits query and gate.
                    let q_out = if self.architecture.is_hybrid() { 2 * hq * d } else { hq * d };
                    q_out * h + 2 * hkv * d * h + hq * d * h + 2 * d
                }
            };
            let (ffn_total, ffn_active) = if self.layer_is_moe(i) {
                let e = self.num_experts as u64;
                let k = self.num_experts_per_tok as u64;
                let per_expert = 3 * h * self.moe_intermediate_size as u64;
                let shared = if self.shared_expert_intermediate_size > 0 {
                    3 * h * self.shared_expert_intermediate_size as u64 + h
                } else {
                    0
                };
                let router = e * h;
                (router + e * per_expert + shared, router + k * per_expert + shared)
            } else {
                let dense = 3 * h * self.intermediate_size as u64;
                (dense, dense)
            };
            total += norms + attn + ffn_total;
            active += norms + attn + ffn_active;
        }
        ParameterCounts { total, active }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParameterCounts {
    pub total: u64,
    pub active: u64,
}

/// Field access that names the missing or mistyped key in its errors.
struct Reader<'a> {
    path: PathBuf,
    root: &'a Value,
}

impl Reader<'_> {
    fn str_at<'v>(&self, obj: &'v Value, key: &str) -> Option<&'v str> {
        obj.get(key).and_then(Value::as_str)
    }

    fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>, FormatError> {
        for k in keys {
            match self.root.get(*k) {
                None | Some(Value::Null) => continue,
                Some(v) => {
                    return v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                        FormatError::invalid(&self.path, format!("`{k}` must be a non-negative integer, got {v}"))
                    });
                }
            }
        }
        Ok(None)
    }

    fn req_usize(&self, keys: &[&str]) -> Result<usize, FormatError> {
        self.opt_usize(keys)?
            .ok_or_else(|| FormatError::MissingField { path: self.path.clone(), field: keys.join("|") })
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, FormatError> {
        match self.root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(FormatError::invalid(&self.path, format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn opt_f64(&self, obj: &Value, key: &str) -> Result<Option<f64>, FormatError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| FormatError::invalid(&self.path, format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn opt_u32_any(&self, obj: &Value, key: &str) -> Option<u32> {
        obj.get(key).and_then(Value::as_u64).and_then(|x| u32::try_from(x).ok())
    }

    /// `eos_token_id` may be one id or a list.
    fn u32_list(&self, obj: &Value, key: &str) -> Vec<u32> {
        match obj.get(key) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).filter_map(|x| u32::try_from(x).ok()).collect(),
            Some(v) => v.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
            None => Vec::new(),
        }
    }
}
