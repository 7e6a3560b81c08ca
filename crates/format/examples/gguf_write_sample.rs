//! Writes a small GGUF file with known contents, for `tests/python/test_gguf_writer.py` to read with gguf-py.
//!
//! Usage: `cargo run -q -p moestream-format --example gguf_write_sample -- OUT.gguf`
//!
//! The file holds exactly what [`metadata`] and [`TENSORS`] list, in that order. Byte `j` of tensor number `k`
//! (0-based, in [`TENSORS`] order) is `(j * 7 + k * 13) % 251`. The Python test restates all of this by hand, so
//! a change here must be made there too.

use std::path::PathBuf;

use moestream_format::gguf::{GgmlType, GgufArray, GgufValue, GgufWriter};

/// (name, shape outermost first, type)
const TENSORS: &[(&str, &[u64], GgmlType)] = &[
    ("token_embd.weight", &[4, 64], GgmlType::F16),
    ("output_norm.weight", &[64], GgmlType::F32),
    ("blk.0.ffn_gate_exps.weight", &[2, 3, 64], GgmlType::Q8_0),
    ("blk.0.ffn_down_exps.weight", &[2, 64, 96], GgmlType::Q4_0),
    ("blk.0.attn_q.weight", &[2, 256], GgmlType::Q4K),
    ("blk.0.attn_v.weight", &[1, 256], GgmlType::Q6K),
    ("blk.0.ffn_gate_inp.weight", &[2, 64], GgmlType::BF16),
];

fn metadata() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("general.architecture", GgufValue::String("qwen3moe".into())),
        ("general.name", GgufValue::String("moestream sample ✓".into())),
        ("qwen3moe.block_count", GgufValue::U32(1)),
        ("qwen3moe.expert_count", GgufValue::U32(2)),
        ("qwen3moe.rope.freq_base", GgufValue::F32(1_000_000.0)),
        ("qwen3moe.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-6)),
        ("test.u8", GgufValue::U8(200)),
        ("test.i8", GgufValue::I8(-100)),
        ("test.u16", GgufValue::U16(60000)),
        ("test.i16", GgufValue::I16(-30000)),
        ("test.i32", GgufValue::I32(-123456)),
        ("test.u64", GgufValue::U64(1 << 40)),
        ("test.i64", GgufValue::I64(-(1 << 40))),
        ("test.f64", GgufValue::F64(0.125)),
        ("test.bool", GgufValue::Bool(true)),
        ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufArray::String(vec!["a".into(), "Ġb".into(), "<|im_end|>".into()])),
        ),
        ("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(vec![1, 1, 3]))),
        ("tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(vec!["Ġ b".into()]))),
        ("test.f32_array", GgufValue::Array(GgufArray::F32(vec![0.5, -1.0, 2.0]))),
        ("test.u64_array", GgufValue::Array(GgufArray::U64(vec![1, 2, 3]))),
        ("test.bool_array", GgufValue::Array(GgufArray::Bool(vec![true, false]))),
        (
            "test.nested_array",
            GgufValue::Array(GgufArray::Array(vec![GgufArray::U32(vec![1, 2]), GgufArray::U32(vec![3])])),
        ),
    ]
}

/// Errors are printed with Display (`path: problem`), not Debug, so they read as the library reports them.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let out: PathBuf = std::env::args_os().nth(1).ok_or("usage: gguf_write_sample OUT.gguf")?.into();
    let mut w = GgufWriter::create(&out)?;
    for (k, v) in metadata() {
        w.add_kv(k, v)?;
    }
    for (name, shape, ty) in TENSORS {
        w.add_tensor(name, shape, *ty)?;
    }
    let mut d = w.finish_header()?;
    let sizes: Vec<u64> = d.tensors().iter().map(|t| t.n_bytes).collect();
    for (k, ((name, _, _), n)) in TENSORS.iter().zip(sizes).enumerate() {
        let bytes: Vec<u8> = (0..n).map(|j| ((j * 7 + k as u64 * 13) % 251) as u8).collect();
        d.write_tensor(name, &bytes)?;
    }
    d.finish()?;
    Ok(())
}
