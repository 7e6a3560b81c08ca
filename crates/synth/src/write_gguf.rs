//! GGUF files that llama.cpp loads as `qwen3moe`, or as `qwen35moe` for the Qwen3.5 presets.
//!
//! Types follow llama.cpp's converter and quantizer: 1-D tensors (norms) and the router (`ffn_gate_inp`) stay F32,
//! every other matrix takes the file's type (hybrids: the conv kernel and the shared-expert gate stay F32 too).
//!
//! Hybrids are written the way llama.cpp's `convert_hf_to_gguf.py` writes Qwen3.5 (docs/llamacpp-qwen35moe-gguf.md):
//! `post_attention_norm`, `ssm_a` = −exp(A_log), `ssm_dt.bias`, effective (not zero-centred) norms, and value heads
//! in llama.cpp's tiled order, so the file computes the same model as the HF and MLX outputs of the same seed.

use moestream_format::config::ModelConfig;
use moestream_format::gguf::{GgufArray, GgufValue, GgufWriter};
use moestream_quant::{FloatType, GgmlType};

use crate::encode::{Target, encode_all, encode_values};
use crate::plan::PlannedTensor;
use crate::tokenizer::SynthVocab;
use crate::{SynthError, SynthFormat, SynthOptions};

/// llama.cpp's `llama_ftype` for the file's dominant type.
fn file_type(f: SynthFormat) -> (GgmlType, u32) {
    match f {
        SynthFormat::GgufQ4_0 => (GgmlType::Q4_0, 2),
        SynthFormat::GgufQ8_0 => (GgmlType::Q8_0, 7),
        _ => (GgmlType::F16, 1),
    }
}

pub(crate) fn tensor_type(t: &PlannedTensor, main: GgmlType) -> GgmlType {
    if t.shape.len() == 1
        || t.name.ends_with("ffn_gate_inp.weight")
        || t.name.ends_with("ffn_gate_inp_shexp.weight")
        || t.name.ends_with("ssm_conv1d.weight")
    {
        GgmlType::F32
    } else {
        main
    }
}

/// The file's name for canonical tensor `canon` (llama.cpp's hybrids spell three differently).
fn file_name(c: &ModelConfig, canon: &str) -> String {
    if !c.architecture.is_hybrid() {
        return canon.to_string();
    }
    if let Some(blk) = canon.strip_suffix(".ffn_norm.weight") {
        format!("{blk}.post_attention_norm.weight")
    } else if let Some(blk) = canon.strip_suffix(".ssm_a_log.weight") {
        format!("{blk}.ssm_a")
    } else if let Some(blk) = canon.strip_suffix(".ssm_dt_bias.weight") {
        format!("{blk}.ssm_dt.bias")
    } else {
        canon.to_string()
    }
}

/// Hybrids: rewrite the whole tensor `vals` (row-major `[rows, cols]`) as llama.cpp's converter would. Returns
/// false for tensors it leaves alone (which then stream unit by unit).
fn llama_layout(c: &ModelConfig, t: &PlannedTensor, vals: &mut [f32]) -> bool {
    let Some(la) = c.linear.as_ref().filter(|_| c.architecture.is_hybrid()) else { return false };
    let (hk, hv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
    let r = hv / hk.max(1);
    // Tiled value head j' = v·Hk + k holds grouped head k·r + v (conversion/qwen.py `_reorder_v_heads`).
    let src = |j: usize| (j % hk) * r + j / hk;
    let cols = t.matrix_dims().1;
    // Blocks of `rows_per` rows starting at row `at`, one per value head.
    let rows = |vals: &mut [f32], at: usize, rows_per: usize| {
        let n = rows_per * cols;
        let old = vals[at * cols..at * cols + hv * n].to_vec();
        for j in 0..hv {
            vals[at * cols + j * n..at * cols + (j + 1) * n].copy_from_slice(&old[src(j) * n..(src(j) + 1) * n]);
        }
    };
    let name = t.name.as_str();
    let suffix = |s: &str| name.ends_with(s);
    if suffix(".attn_qkv.weight") || suffix(".ssm_conv1d.weight") {
        rows(vals, 2 * hk * dk, dv);
    } else if suffix(".attn_gate.weight") {
        rows(vals, 0, dv);
    } else if suffix(".ssm_beta.weight") || suffix(".ssm_alpha.weight") || suffix(".ssm_dt_bias.weight") {
        // 1-D tensors are one row of hv columns here: permute as [hv, 1].
        if t.shape.len() == 1 {
            let old = vals.to_vec();
            (0..hv).for_each(|j| vals[j] = old[src(j)]);
        } else {
            rows(vals, 0, 1);
        }
    } else if suffix(".ssm_a_log.weight") {
        let old = vals.to_vec();
        (0..hv).for_each(|j| vals[j] = -old[src(j)].exp());
    } else if suffix(".ssm_out.weight") {
        for row in vals.chunks_mut(cols) {
            let old = row.to_vec();
            for j in 0..hv {
                row[j * dv..(j + 1) * dv].copy_from_slice(&old[src(j) * dv..(src(j) + 1) * dv]);
            }
        }
    } else {
        return false;
    }
    true
}

pub(crate) fn write(
    opts: &SynthOptions,
    c: &ModelConfig,
    vocab: &SynthVocab,
    tensors: &[PlannedTensor],
    bar: &indicatif::ProgressBar,
) -> Result<(), SynthError> {
    let (main, ftype) = file_type(opts.format);
    let mut w = GgufWriter::create(&opts.out)?;
    let a = if c.architecture.is_hybrid() { "qwen35moe" } else { "qwen3moe" };
    let u32v = |x: usize| GgufValue::U32(x as u32);
    let mut kv: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::String(a.into())),
        (
            "general.name".into(),
            GgufValue::String(format!("moestream synthetic {} (random weights)", opts.preset.name())),
        ),
        ("general.file_type".into(), GgufValue::U32(ftype)),
        ("general.quantization_version".into(), GgufValue::U32(2)),
        (format!("{a}.block_count"), u32v(c.num_layers)),
        (format!("{a}.context_length"), u32v(c.max_position_embeddings)),
        (format!("{a}.embedding_length"), u32v(c.hidden_size)),
        (format!("{a}.attention.head_count"), u32v(c.num_heads)),
        (format!("{a}.attention.head_count_kv"), u32v(c.num_kv_heads)),
        (format!("{a}.attention.key_length"), u32v(c.head_dim)),
        (format!("{a}.attention.value_length"), u32v(c.head_dim)),
        (format!("{a}.rope.freq_base"), GgufValue::F32(c.rope_theta as f32)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), GgufValue::F32(c.rms_norm_eps as f32)),
        (format!("{a}.expert_count"), u32v(c.num_experts)),
        (format!("{a}.expert_used_count"), u32v(c.num_experts_per_tok)),
        (format!("{a}.expert_feed_forward_length"), u32v(c.moe_intermediate_size)),
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(GgufArray::String(vocab.tokens.clone()))),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(GgufArray::I32(vocab.types.clone()))),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(vocab.merges.iter().map(|(x, y)| format!("{x} {y}")).collect())),
        ),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(vocab.im_end)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(vocab.endoftext)),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(vocab.endoftext)),
        ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(false)),
        ("tokenizer.chat_template".into(), GgufValue::String(vocab.chat_template.clone())),
    ];
    match c.linear.as_ref().filter(|_| c.architecture.is_hybrid()) {
        Some(la) => {
            let rot = (c.head_dim as f64 * c.partial_rotary_factor) as usize;
            let recurrent =
                c.layer_types.iter().map(|&l| l == moestream_format::config::LayerAttention::LinearAttention).collect();
            kv.extend([
                (format!("{a}.expert_shared_feed_forward_length"), u32v(c.shared_expert_intermediate_size)),
                (format!("{a}.ssm.conv_kernel"), u32v(la.conv_kernel)),
                (format!("{a}.ssm.state_size"), u32v(la.key_head_dim)),
                (format!("{a}.ssm.group_count"), u32v(la.num_key_heads)),
                (format!("{a}.ssm.time_step_rank"), u32v(la.num_value_heads)),
                (format!("{a}.ssm.inner_size"), u32v(la.value_head_dim * la.num_value_heads)),
                (format!("{a}.attention.recurrent_layers"), GgufValue::Array(GgufArray::Bool(recurrent))),
                (format!("{a}.full_attention_interval"), u32v(4)),
                (format!("{a}.rope.dimension_count"), u32v(rot)),
                // Interleaved MRoPE sections, the converter's default; for text all position ids are equal.
                (format!("{a}.rope.dimension_sections"), GgufValue::Array(GgufArray::I32(vec![11, 11, 10, 0]))),
            ]);
        }
        None => kv.push((format!("{a}.feed_forward_length"), u32v(c.intermediate_size))),
    }
    if opts.routing_skew > 0.0 {
        kv[1].1 = GgufValue::String(format!(
            "moestream synthetic {} (random weights, synthetic routing skew {})",
            opts.preset.name(),
            opts.routing_skew
        ));
        kv.push((crate::ROUTING_SKEW_GGUF.into(), GgufValue::F32(opts.routing_skew)));
    }
    for (k, v) in kv {
        w.add_kv(&k, v)?;
    }
    let shape64 = |t: &PlannedTensor| t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>();
    for t in tensors {
        w.add_tensor(&file_name(c, &t.name), &shape64(t), tensor_type(t, main))?;
    }
    let mut d = w.finish_header()?;
    for t in tensors {
        let target = match tensor_type(t, main) {
            GgmlType::F32 => Target::Float(FloatType::F32),
            GgmlType::F16 => Target::Float(FloatType::F16),
            other => Target::Ggml(other),
        };
        // Hybrid GDN tensors are small: generate them whole, rearrange, encode.
        let mut whole = Vec::new();
        if c.architecture.is_hybrid() && !t.is_expert_stack() {
            let (rows, cols) = t.matrix_dims();
            whole = vec![0f32; rows * cols];
            let mut at = 0;
            for u in 0..t.units() {
                let n = t.unit_rows(u) * cols;
                t.generate(opts.seed, u, &mut whole[at..at + n]);
                at += n;
            }
            if !llama_layout(c, t, &mut whole) {
                whole.clear();
            }
        }
        let enc =
            if whole.is_empty() { encode_all(t, opts.seed, target)? } else { vec![encode_values(t, &whole, target)?] };
        let mut reader = SliceChain { parts: enc.iter().map(|e| e.data.as_slice()).collect(), at: 0 };
        d.write_tensor_from(&file_name(c, &t.name), &mut reader)?;
        bar.inc(t.shape.iter().product::<usize>() as u64);
    }
    d.finish()?;
    Ok(())
}

/// Reads a list of byte slices back to back, so experts encoded separately stream as one tensor.
struct SliceChain<'a> {
    parts: Vec<&'a [u8]>,
    at: usize,
}

impl std::io::Read for SliceChain<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at < self.parts.len() {
            let p = &mut self.parts[self.at];
            if p.is_empty() {
                self.at += 1;
                continue;
            }
            let n = p.len().min(buf.len());
            buf[..n].copy_from_slice(&p[..n]);
            *p = &p[n..];
            return Ok(n);
        }
        Ok(0)
    }
}
