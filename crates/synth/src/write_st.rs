//! HF and MLX safetensors directories.

use std::collections::HashMap;
use std::path::PathBuf;

use moestream_format::config::ModelConfig;
use moestream_format::safetensors::{SafetensorsWriter, StDtype};
use moestream_quant::{FloatType, MlxAffine};

use crate::encode::{Target, encode_all};
use crate::plan::PlannedTensor;
use crate::{ExpertLayout, SynthError, SynthFormat, SynthOptions};

pub(crate) const MLX_GROUP: usize = 64;
pub(crate) const MLX_ROUTER_BITS: u8 = 8;

pub(crate) fn mlx_bits(f: SynthFormat) -> Option<u8> {
    match f {
        SynthFormat::MlxQ4 => Some(4),
        SynthFormat::MlxQ8 => Some(8),
        _ => None,
    }
}

/// Where the decoder's tensors live: `model.` for Qwen3-MoE; for the Qwen3.5 hybrids, the nested text model of
/// the multimodal checkpoint (`model.language_model.` as transformers saves it, `language_model.model.` as
/// mlx-lm's Qwen3.5 model names it).
pub(crate) fn prefix(config: &ModelConfig, mlx: bool) -> &'static str {
    match (config.architecture.is_hybrid(), mlx) {
        (false, _) => "model.",
        (true, false) => "model.language_model.",
        (true, true) => "language_model.model.",
    }
}

/// The tensor name (with `.weight`, or the bare parameter name for GDN's `A_log` and `dt_bias`) of a canonical
/// tensor, under `prefix`; for experts, the projection name.
fn hf_name(canon: &str, prefix: &str) -> String {
    match canon {
        "token_embd.weight" => return format!("{prefix}embed_tokens.weight"),
        "output_norm.weight" => return format!("{prefix}norm.weight"),
        "output.weight" => {
            return if prefix == "language_model.model." { "language_model.lm_head.weight" } else { "lm_head.weight" }
                .into();
        }
        _ => {}
    }
    let rest = canon.strip_prefix("blk.").and_then(|r| r.strip_suffix(".weight")).unwrap_or(canon);
    let (layer, part) = rest.split_once('.').unwrap_or(("0", rest));
    let sub = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate_inp" => "mlp.gate",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_gate_exps" => "gate_proj",
        "ffn_up_exps" => "up_proj",
        "ffn_down_exps" => "down_proj",
        "attn_qkv" => "linear_attn.in_proj_qkv",
        "attn_gate" => "linear_attn.in_proj_z",
        "ssm_beta" => "linear_attn.in_proj_b",
        "ssm_alpha" => "linear_attn.in_proj_a",
        "ssm_conv1d" => "linear_attn.conv1d",
        "ssm_norm" => "linear_attn.norm",
        "ssm_out" => "linear_attn.out_proj",
        "ssm_a_log" => return format!("{prefix}layers.{layer}.linear_attn.A_log"),
        "ssm_dt_bias" => return format!("{prefix}layers.{layer}.linear_attn.dt_bias"),
        "ffn_gate_shexp" => "mlp.shared_expert.gate_proj",
        "ffn_up_shexp" => "mlp.shared_expert.up_proj",
        "ffn_down_shexp" => "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp" => "mlp.shared_expert_gate",
        other => other,
    };
    format!("{prefix}layers.{layer}.{sub}.weight")
}

/// RMSNorms that HF hybrid checkpoints store zero-centred (`w − 1`); the gated norm inside GDN is plain.
fn zero_centred_norm(canon: &str) -> bool {
    ["attn_norm.weight", "ffn_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight"]
        .iter()
        .any(|n| canon.ends_with(n))
        || canon == "output_norm.weight"
}

fn layer_of(canon: &str) -> &str {
    canon.strip_prefix("blk.").and_then(|r| r.split_once('.')).map(|(l, _)| l).unwrap_or("0")
}

/// One safetensors tensor to write, as slices of encoded experts.
struct OutTensor {
    name: String,
    dtype: StDtype,
    shape: Vec<usize>,
}

pub(crate) fn write(
    opts: &SynthOptions,
    config: &ModelConfig,
    tensors: &[PlannedTensor],
    bar: &indicatif::ProgressBar,
) -> Result<Vec<PathBuf>, SynthError> {
    let mlx = mlx_bits(opts.format);
    let prefix = prefix(config, mlx.is_some());
    // HF hybrids store zero-centred norms; MLX conversions (and GGUF) store the effective weight.
    let hf_hybrid = config.architecture.is_hybrid() && mlx.is_none();
    let tensors: Vec<PlannedTensor> = tensors
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if hf_hybrid && zero_centred_norm(&t.name) {
                t.stored_offset = 1.0;
            }
            t
        })
        .collect();
    let tensors = &tensors[..];
    let float = if opts.format == SynthFormat::HfF32 { FloatType::F32 } else { FloatType::BF16 };
    let st_float = if float == FloatType::F32 { StDtype::F32 } else { StDtype::BF16 };

    // First pass: names, dtypes and shapes of every output tensor, grouped per planned tensor, so shards can be
    // cut between planned tensors and each header written before any data.
    let mut groups: Vec<(usize, Target, Vec<OutTensor>)> = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        let (rows, cols) = t.matrix_dims();
        let e = t.experts();
        // Conv kernels stay float, as mlx-lm leaves them (they are not Linear layers); so does anything whose width
        // is not a whole number of groups.
        let quantize = mlx.is_some()
            && t.shape.len() >= 2
            && !t.name.ends_with("ssm_conv1d.weight")
            && cols.is_multiple_of(MLX_GROUP);
        let target = match (quantize, mlx) {
            (true, Some(bits)) => {
                let router = t.name.ends_with("ffn_gate_inp.weight") || t.name.ends_with("ffn_gate_inp_shexp.weight");
                let bits = if router { MLX_ROUTER_BITS } else { bits };
                Target::Mlx(MlxAffine { bits, group_size: MLX_GROUP }, FloatType::BF16)
            }
            _ => Target::Float(float),
        };
        let full = hf_name(&t.name, prefix);
        let module = full.strip_suffix(".weight").unwrap_or(&full).to_string();
        let mut outs = Vec::new();
        let lead: Vec<usize> = if t.is_expert_stack() {
            vec![e, rows]
        } else if t.shape.len() == 1 {
            vec![]
        } else {
            vec![rows]
        };
        match target {
            Target::Mlx(p, _) => {
                let m = if t.is_expert_stack() {
                    format!(
                        "{prefix}layers.{}.mlp.switch_mlp.{}",
                        layer_of(&t.name),
                        module.rsplit('.').next().unwrap_or("")
                    )
                } else {
                    module.clone()
                };
                let with = |c: usize| lead.iter().copied().chain([c]).collect::<Vec<_>>();
                outs.push(OutTensor {
                    name: format!("{m}.weight"),
                    dtype: StDtype::U32,
                    shape: with(cols * p.bits as usize / 32),
                });
                outs.push(OutTensor {
                    name: format!("{m}.scales"),
                    dtype: StDtype::BF16,
                    shape: with(cols / p.group_size),
                });
                outs.push(OutTensor {
                    name: format!("{m}.biases"),
                    dtype: StDtype::BF16,
                    shape: with(cols / p.group_size),
                });
            }
            _ if t.is_expert_stack() => {
                let layer = layer_of(&t.name);
                let proj = module.rsplit('.').next().unwrap_or("");
                match opts.expert_layout {
                    ExpertLayout::PerExpert => {
                        for x in 0..e {
                            outs.push(OutTensor {
                                name: format!("{prefix}layers.{layer}.mlp.experts.{x}.{proj}.weight"),
                                dtype: st_float,
                                shape: vec![rows, cols],
                            });
                        }
                    }
                    ExpertLayout::Fused => match proj {
                        // gate and up are written together under the gate tensor; up contributes nothing of its own.
                        "gate_proj" => outs.push(OutTensor {
                            name: format!("{prefix}layers.{layer}.mlp.experts.gate_up_proj"),
                            dtype: st_float,
                            shape: vec![e, 2 * rows, cols],
                        }),
                        "up_proj" => {}
                        _ => outs.push(OutTensor {
                            name: format!("{prefix}layers.{layer}.mlp.experts.down_proj"),
                            dtype: st_float,
                            shape: vec![e, rows, cols],
                        }),
                    },
                }
            }
            _ => {
                // Depthwise conv kernels keep the framework's layout: PyTorch `[C, 1, K]`, MLX `[C, K, 1]`.
                let shape = match (t.name.ends_with("ssm_conv1d.weight"), mlx.is_some()) {
                    (true, false) => vec![rows, 1, cols],
                    (true, true) => vec![rows, cols, 1],
                    _ => t.shape.clone(),
                };
                outs.push(OutTensor { name: full.clone(), dtype: st_float, shape })
            }
        }
        groups.push((ti, target, outs));
    }

    // Shards: cut between planned tensors once a shard passes the limit.
    let size = |o: &OutTensor| o.shape.iter().product::<usize>() as u64 * o.dtype.size() as u64;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut acc = 0u64;
    for (gi, g) in groups.iter().enumerate() {
        let bytes: u64 = g.2.iter().map(size).sum();
        if acc > 0 && acc + bytes > opts.shard_bytes {
            shards.push(Vec::new());
            acc = 0;
        }
        acc += bytes;
        if let Some(s) = shards.last_mut() {
            s.push(gi);
        }
    }
    let n_shards = shards.len();
    let shard_name = |i: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut files = Vec::new();
    for (si, shard) in shards.iter().enumerate() {
        let path = opts.out.join(shard_name(si));
        let header: Vec<(String, StDtype, Vec<usize>)> = shard
            .iter()
            .flat_map(|&gi| groups[gi].2.iter().map(|o| (o.name.clone(), o.dtype, o.shape.clone())))
            .collect();
        for (n, d, s) in &header {
            weight_map.insert(n.clone(), serde_json::Value::String(shard_name(si)));
            total += s.iter().product::<usize>() as u64 * d.size() as u64;
        }
        let meta = HashMap::from([("format".to_string(), if mlx.is_some() { "mlx" } else { "pt" }.to_string())]);
        let mut w = SafetensorsWriter::create(&path, &header, Some(meta))?;
        for &gi in shard {
            let (ti, target, outs) = &groups[gi];
            let t = &tensors[*ti];
            let enc = encode_all(t, opts.seed, *target)?;
            bar.inc(t.shape.iter().product::<usize>() as u64);
            match target {
                Target::Mlx(..) => {
                    for x in &enc {
                        w.write(&outs[0].name, &x.data)?;
                    }
                    for x in &enc {
                        w.write(&outs[1].name, &x.scales)?;
                    }
                    for x in &enc {
                        w.write(&outs[2].name, &x.biases)?;
                    }
                }
                _ if t.is_expert_stack() && opts.expert_layout == ExpertLayout::Fused => {
                    if t.name.ends_with("ffn_gate_exps.weight") {
                        // Up is planned right after gate; encode it now so the fused slabs interleave.
                        let up_name = t.name.replace("ffn_gate_exps", "ffn_up_exps");
                        let up_t = tensors
                            .iter()
                            .find(|p| p.name == up_name)
                            .ok_or_else(|| SynthError::Invalid(format!("{up_name} missing from the plan")))?;
                        let up = encode_all(up_t, opts.seed, *target)?;
                        for (g, u) in enc.iter().zip(&up) {
                            w.write(&outs[0].name, &g.data)?;
                            w.write(&outs[0].name, &u.data)?;
                        }
                    } else if t.name.ends_with("ffn_up_exps.weight") {
                        // Already written inside gate_up_proj.
                    } else {
                        for x in &enc {
                            w.write(&outs[0].name, &x.data)?;
                        }
                    }
                }
                _ if t.is_expert_stack() => {
                    // Per-expert layout: one output tensor per expert.
                    for (o, x) in outs.iter().zip(&enc) {
                        w.write(&o.name, &x.data)?;
                    }
                }
                _ => {
                    // A plain tensor: its row blocks in order.
                    for x in &enc {
                        w.write(&outs[0].name, &x.data)?;
                    }
                }
            }
        }
        w.finish()?;
        files.push(path);
    }
    if n_shards > 1 {
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = opts.out.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&idx).map_err(|e| SynthError::Invalid(e.to_string()))?;
        std::fs::write(&p, text).map_err(|source| SynthError::Io { path: p.clone(), source })?;
    }
    Ok(files)
}
