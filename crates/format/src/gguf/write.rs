//! The streaming writer. [`GgufWriter`] collects metadata and tensor infos (small), writes the header once every
//! tensor is known, and hands over a [`GgufDataWriter`] that takes each tensor's bytes in order and writes them
//! straight through a large buffer. It never holds tensor data beyond the one slice it is given.
//!
//! The layout matches ggml's `gguf_write_to_file` and gguf-py's `GGUFWriter`: header, padding to the alignment,
//! then each tensor followed by padding to the alignment (the last one too, as ggml expects the data section to
//! be a whole number of aligned tensors).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::read::{GGUF_MAX_ARRAY_DEPTH, GGUF_MAX_ARRAY_LEN, GGUF_MAX_STRING_LEN};
use super::value::{GgufArray, GgufValue};
use super::{
    GGUF_DEFAULT_ALIGNMENT, GGUF_KEY_ALIGNMENT, GGUF_MAGIC, GGUF_MAX_TENSOR_NAME, GGUF_VERSION, GgmlType,
    GgufTensorInfo, align_up, tensor_n_bytes,
};
use crate::FormatError;

/// Write buffer. Tensor slices larger than this bypass it (BufWriter writes them directly); smaller ones, such as
/// norms and per-expert slabs of tiny test models, are batched into few large writes.
const WRITE_BUFFER: usize = 8 << 20;
const ZEROS: [u8; 4096] = [0; 4096];

/// First phase of writing a GGUF file: metadata and tensor infos.
pub struct GgufWriter {
    path: PathBuf,
    out: BufWriter<File>,
    metadata: Vec<(String, GgufValue)>,
    keys: HashSet<String>,
    /// (name, ne innermost first, type, n_bytes)
    tensors: Vec<(String, Vec<u64>, GgmlType, u64)>,
    names: HashSet<String>,
    alignment: u64,
}

/// Second phase: tensor data, in the order the tensors were added.
pub struct GgufDataWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensors: Vec<GgufTensorInfo>,
    next: usize,
    pos: u64,
    alignment: u64,
    /// Set once a write fails part-way: the file's layout is then unknown, so every later call is refused.
    failed: bool,
}

impl GgufWriter {
    /// Creates (or truncates) the file at `path`. Nothing is written until [`GgufWriter::finish_header`].
    pub fn create(path: &Path) -> Result<GgufWriter, FormatError> {
        let file = File::create(path).map_err(|e| FormatError::io(path, e))?;
        Ok(GgufWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            alignment: GGUF_DEFAULT_ALIGNMENT,
        })
    }

    fn invalid(&self, msg: String) -> FormatError {
        FormatError::invalid(&self.path, msg)
    }

    /// Adds a metadata key. Rejects duplicates, values our reader would refuse, and a `general.alignment` that is
    /// not a u32 power of two (ggml reads it as u32 and aborts on any other type).
    pub fn add_kv(&mut self, key: &str, value: GgufValue) -> Result<(), FormatError> {
        if self.keys.contains(key) {
            return Err(self.invalid(format!("duplicate key `{key}`")));
        }
        check_len(key.len() as u64, GGUF_MAX_STRING_LEN, "string").map_err(|m| self.invalid(format!("key: {m}")))?;
        check_value(&value, 0).map_err(|m| self.invalid(format!("key `{key}`: {m}")))?;
        if key == GGUF_KEY_ALIGNMENT {
            match value {
                GgufValue::U32(a) if a.is_power_of_two() => self.alignment = u64::from(a),
                ref v => {
                    return Err(self.invalid(format!("`{key}` must be a u32 power of two, got {v:?}")));
                }
            }
        }
        self.keys.insert(key.to_string());
        self.metadata.push((key.to_string(), value));
        Ok(())
    }

    /// Adds a tensor info. `shape` is outermost first (numpy order); it is stored reversed as ggml's `ne`.
    pub fn add_tensor(&mut self, name: &str, shape: &[u64], ty: GgmlType) -> Result<(), FormatError> {
        if name.len() > GGUF_MAX_TENSOR_NAME {
            return Err(self.invalid(format!(
                "tensor `{name}`: name is {} bytes, ggml allows at most {GGUF_MAX_TENSOR_NAME}",
                name.len()
            )));
        }
        if self.names.contains(name) {
            return Err(self.invalid(format!("duplicate tensor name `{name}`")));
        }
        let ne: Vec<u64> = shape.iter().rev().copied().collect();
        let n_bytes = tensor_n_bytes(&ne, ty).map_err(|m| self.invalid(format!("tensor `{name}`: {m}")))?;
        self.names.insert(name.to_string());
        self.tensors.push((name.to_string(), ne, ty, n_bytes));
        Ok(())
    }

    /// Writes the header and the padding after it; returns the writer for tensor data.
    pub fn finish_header(mut self) -> Result<GgufDataWriter, FormatError> {
        let path = self.path.clone();
        let io = |e| FormatError::io(&path, e);
        let mut h: Vec<u8> = Vec::new();
        h.extend_from_slice(&GGUF_MAGIC);
        h.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut h, key);
            h.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut h, value);
        }
        let mut rel = 0u64;
        let mut rel_offsets = Vec::with_capacity(self.tensors.len());
        for (name, ne, ty, n_bytes) in &self.tensors {
            put_str(&mut h, name);
            h.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for n in ne {
                h.extend_from_slice(&n.to_le_bytes());
            }
            h.extend_from_slice(&(*ty as u32).to_le_bytes());
            h.extend_from_slice(&rel.to_le_bytes());
            rel_offsets.push(rel);
            rel = rel
                .checked_add(*n_bytes)
                .and_then(|end| align_up(end, self.alignment))
                .ok_or_else(|| self.invalid(format!("tensor `{name}`: data section size overflows u64")))?;
        }
        let header_len = h.len() as u64;
        let data_offset = align_up(header_len, self.alignment).ok_or_else(|| self.invalid("header too long".into()))?;
        // Checked once here so the per-tensor absolute offsets below cannot overflow.
        data_offset.checked_add(rel).ok_or_else(|| self.invalid("file size overflows u64".into()))?;
        self.out.write_all(&h).map_err(io)?;
        write_zeros(&mut self.out, data_offset - header_len).map_err(io)?;
        let tensors = self
            .tensors
            .into_iter()
            .zip(rel_offsets)
            .map(|((name, ne, ty, n_bytes), rel)| GgufTensorInfo { name, ne, ty, offset: data_offset + rel, n_bytes })
            .collect();
        Ok(GgufDataWriter {
            path: self.path,
            out: self.out,
            tensors,
            next: 0,
            pos: data_offset,
            alignment: self.alignment,
            failed: false,
        })
    }
}

impl GgufDataWriter {
    /// The tensor layout being written (absolute offsets), in write order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor that must be written next, checked against `name`.
    fn expect_next(&self, name: &str) -> Result<usize, FormatError> {
        if self.failed {
            return Err(FormatError::invalid(
                &self.path,
                format!("tensor `{name}`: an earlier write to this file failed part-way; start the file again"),
            ));
        }
        match self.tensors.get(self.next) {
            Some(t) if t.name == name => Ok(self.next),
            Some(t) => Err(FormatError::invalid(
                &self.path,
                format!("tensor `{name}` written out of order: `{}` comes next", t.name),
            )),
            None => Err(FormatError::invalid(
                &self.path,
                format!("tensor `{name}`: all {} tensors are already written", self.tensors.len()),
            )),
        }
    }

    fn size_mismatch(&self, i: usize, got: u64) -> FormatError {
        let t = &self.tensors[i];
        FormatError::SizeMismatch {
            path: self.path.clone(),
            tensor: t.name.clone(),
            shape: t.shape(),
            dtype: t.ty.name().to_string(),
            expected: t.n_bytes,
            got,
        }
    }

    /// Writes the next tensor's bytes, which must be exactly its encoded size, then the alignment padding.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        let i = self.expect_next(name)?;
        if bytes.len() as u64 != self.tensors[i].n_bytes {
            return Err(self.size_mismatch(i, bytes.len() as u64));
        }
        self.failed = true; // cleared below once the bytes and padding are all out
        self.out.write_all(bytes).map_err(|e| FormatError::io(&self.path, e))?;
        self.end_tensor(i)
    }

    /// Like [`GgufDataWriter::write_tensor`], but copies the bytes from `src`, for tensors too large to hold.
    /// `src` must yield at least the tensor's size; bytes after it are left unread.
    pub fn write_tensor_from(&mut self, name: &str, src: &mut impl Read) -> Result<(), FormatError> {
        let i = self.expect_next(name)?;
        let want = self.tensors[i].n_bytes;
        self.failed = true; // cleared by end_tensor once the bytes and padding are all out
        let got = std::io::copy(&mut src.take(want), &mut self.out).map_err(|e| FormatError::io(&self.path, e))?;
        if got != want {
            return Err(self.size_mismatch(i, got));
        }
        self.end_tensor(i)
    }

    fn end_tensor(&mut self, i: usize) -> Result<(), FormatError> {
        let t = &self.tensors[i];
        debug_assert_eq!(self.pos, t.offset);
        let end = t.offset + t.n_bytes;
        let next = self.tensors.get(i + 1).map_or(end.next_multiple_of(self.alignment), |n| n.offset);
        write_zeros(&mut self.out, next - end).map_err(|e| FormatError::io(&self.path, e))?;
        self.pos = next;
        self.next += 1;
        self.failed = false;
        Ok(())
    }

    /// Flushes and closes the file after checking that every tensor was written. Returns the file length.
    pub fn finish(mut self) -> Result<u64, FormatError> {
        if self.failed {
            return Err(FormatError::invalid(&self.path, "an earlier write failed part-way; the file is incomplete"));
        }
        if self.next != self.tensors.len() {
            let missing: Vec<&str> = self.tensors[self.next..].iter().map(|t| t.name.as_str()).collect();
            return Err(FormatError::invalid(
                &self.path,
                format!("finished with {} tensors unwritten: {}", missing.len(), missing.join(", ")),
            ));
        }
        self.out.flush().map_err(|e| FormatError::io(&self.path, e))?;
        Ok(self.pos)
    }
}

fn write_zeros(out: &mut impl Write, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn check_len(len: u64, max: u64, what: &str) -> Result<(), String> {
    if len > max { Err(format!("{what} of length {len} exceeds the reader's limit of {max}")) } else { Ok(()) }
}

/// Rejects values that our own reader would refuse, so a file we write is always one we can open.
fn check_value(v: &GgufValue, depth: u32) -> Result<(), String> {
    match v {
        GgufValue::String(s) => check_len(s.len() as u64, GGUF_MAX_STRING_LEN, "string"),
        GgufValue::Array(a) => check_array(a, depth + 1),
        _ => Ok(()),
    }
}

fn check_array(a: &GgufArray, depth: u32) -> Result<(), String> {
    if depth > GGUF_MAX_ARRAY_DEPTH {
        return Err(format!("arrays nested deeper than {GGUF_MAX_ARRAY_DEPTH} levels"));
    }
    check_len(a.len() as u64, GGUF_MAX_ARRAY_LEN, "array")?;
    match a {
        GgufArray::String(v) => v.iter().try_for_each(|s| check_len(s.len() as u64, GGUF_MAX_STRING_LEN, "string")),
        GgufArray::Array(v) => v.iter().try_for_each(|a| check_array(a, depth + 1)),
        _ => Ok(()),
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => h.push(u8::from(*x)),
        GgufValue::String(s) => put_str(h, s),
        GgufValue::Array(a) => put_array(h, a),
        GgufValue::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
    }
}

/// An array is its element type id, its length, then the elements without per-element type ids. An element
/// that is itself an array is written the same way (type id, length, elements).
fn put_array(h: &mut Vec<u8>, a: &GgufArray) {
    h.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    h.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                h.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => h.extend_from_slice(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::Bool(v) => h.extend(v.iter().map(|&b| u8::from(b))),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(h, s)),
        GgufArray::Array(v) => v.iter().for_each(|a| put_array(h, a)),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F64(v) => each!(v),
    }
}
