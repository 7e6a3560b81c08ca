//! Prints a GGUF header as JSON, for `tests/python/test_gguf_writer.py` to compare with what gguf-py wrote.
//!
//! Usage: `cargo run -q -p moestream-format --example gguf_dump -- FILE.gguf`
//!
//! Output: `{"version", "alignment", "data_offset", "file_len", "metadata": [{"key", "type", "value"}],
//! "tensors": [{"name", "ne", "shape", "type", "type_id", "offset", "n_bytes"}]}`. Array values are JSON lists
//! (nested for nested arrays) and their `type` is `array[ELEM]`; `offset` is absolute.

use moestream_format::gguf::{GgufArray, GgufFile, GgufValue};
use serde_json::{Value, json};

fn array_json(a: &GgufArray) -> Value {
    match a {
        GgufArray::U8(v) => json!(v),
        GgufArray::I8(v) => json!(v),
        GgufArray::U16(v) => json!(v),
        GgufArray::I16(v) => json!(v),
        GgufArray::U32(v) => json!(v),
        GgufArray::I32(v) => json!(v),
        GgufArray::F32(v) => json!(v),
        GgufArray::Bool(v) => json!(v),
        GgufArray::String(v) => json!(v),
        GgufArray::Array(v) => Value::Array(v.iter().map(array_json).collect()),
        GgufArray::U64(v) => json!(v),
        GgufArray::I64(v) => json!(v),
        GgufArray::F64(v) => json!(v),
    }
}

fn value_json(v: &GgufValue) -> Value {
    match v {
        GgufValue::U8(x) => json!(x),
        GgufValue::I8(x) => json!(x),
        GgufValue::U16(x) => json!(x),
        GgufValue::I16(x) => json!(x),
        GgufValue::U32(x) => json!(x),
        GgufValue::I32(x) => json!(x),
        GgufValue::F32(x) => json!(x),
        GgufValue::Bool(x) => json!(x),
        GgufValue::String(x) => json!(x),
        GgufValue::Array(a) => array_json(a),
        GgufValue::U64(x) => json!(x),
        GgufValue::I64(x) => json!(x),
        GgufValue::F64(x) => json!(x),
    }
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
    let path: std::path::PathBuf = std::env::args_os().nth(1).ok_or("usage: gguf_dump FILE.gguf")?.into();
    let f = GgufFile::open(&path)?;
    let metadata: Vec<Value> = f
        .metadata
        .iter()
        .map(|(k, v)| {
            let ty = match v {
                GgufValue::Array(a) => format!("array[{}]", a.elem_type()),
                v => v.value_type().to_string(),
            };
            json!({"key": k, "type": ty, "value": value_json(v)})
        })
        .collect();
    let tensors: Vec<Value> = f
        .tensors
        .iter()
        .map(|t| {
            json!({"name": t.name, "ne": t.ne, "shape": t.shape(), "type": t.ty.name(), "type_id": t.ty as u32,
                   "offset": t.offset, "n_bytes": t.n_bytes})
        })
        .collect();
    let out = json!({"version": f.version, "alignment": f.alignment, "data_offset": f.data_offset,
                     "file_len": f.file_len, "metadata": metadata, "tensors": tensors});
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
