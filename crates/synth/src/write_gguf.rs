//! GGUF files that llama.cpp loads as `qwen3moe`.
//!
//! Types follow llama.cpp's converter and quantizer: 1-D tensors (norms) and the router (`ffn_gate_inp`) stay F32,
//! every other matrix takes the file's type.

use moestream_format::config::ModelConfig;
use moestream_format::gguf::{GgufArray, GgufValue, GgufWriter};
use moestream_quant::{FloatType, GgmlType};

use crate::encode::{Target, encode_all};
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
    if t.shape.len() == 1 || t.name.ends_with("ffn_gate_inp.weight") { GgmlType::F32 } else { main }
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
    let a = "qwen3moe";
    let u32v = |x: usize| GgufValue::U32(x as u32);
    let kv: Vec<(String, GgufValue)> = vec![
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
        (format!("{a}.feed_forward_length"), u32v(c.intermediate_size)),
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
    for (k, v) in kv {
        w.add_kv(&k, v)?;
    }
    let shape64 = |t: &PlannedTensor| t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>();
    for t in tensors {
        w.add_tensor(&t.name, &shape64(t), tensor_type(t, main))?;
    }
    let mut d = w.finish_header()?;
    for t in tensors {
        let target = match tensor_type(t, main) {
            GgmlType::F32 => Target::Float(FloatType::F32),
            GgmlType::F16 => Target::Float(FloatType::F16),
            other => Target::Ggml(other),
        };
        let enc = encode_all(t, opts.seed, target)?;
        let mut reader = SliceChain { parts: enc.iter().map(|e| e.data.as_slice()).collect(), at: 0 };
        d.write_tensor_from(&t.name, &mut reader)?;
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
