//! The header parser. Every read goes through [`HeaderReader`], which knows the file length and refuses to read
//! or allocate past it, so a hostile count or length fails with `Truncated` before any allocation it implies.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::value::{GgufArray, GgufValue, GgufValueType};
use super::{
    GGUF_DEFAULT_ALIGNMENT, GGUF_KEY_ALIGNMENT, GGUF_MAGIC, GGUF_MAX_TENSOR_NAME, GgmlType, GgufFile, GgufTensorInfo,
    align_up, tensor_n_bytes,
};
use crate::FormatError;

/// Longest string we accept. The longest real ones are chat templates of tens of KiB; 64 MiB keeps a hostile
/// length from allocating gigabytes inside a multi-GB file whose remaining bytes would otherwise "fit" it.
pub const GGUF_MAX_STRING_LEN: u64 = 64 << 20;
/// Most elements in one array. Real vocabularies have ~150k-260k tokens; the cap bounds allocation as above
/// (at most 128 MiB for an array of 8-byte elements).
pub const GGUF_MAX_ARRAY_LEN: u64 = 1 << 24;
/// Deepest array nesting accepted (an array of arrays is depth 2). ggml itself reads no nested arrays; the cap
/// keeps a hostile file from recursing without bound.
pub const GGUF_MAX_ARRAY_DEPTH: u32 = 4;
/// Most tensor infos and key-values in one header. The largest MoE GGUFs have a few thousand tensors.
pub const GGUF_MAX_TENSORS: u64 = 1 << 20;
pub const GGUF_MAX_KV: u64 = 1 << 20;

/// Smallest possible tensor info: name length, n_dims, one ne, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Smallest possible key-value: key length, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Most elements reserved up front for a list whose length comes from the header.
const PREALLOC_MAX: usize = 1 << 16;
/// Header buffer: large enough that a 150k-entry vocabulary costs a few hundred reads, not 300k.
const READ_BUFFER: usize = 1 << 20;

struct HeaderReader<'p> {
    path: &'p Path,
    r: BufReader<File>,
    pos: u64,
    file_len: u64,
}

impl<'p> HeaderReader<'p> {
    fn remaining(&self) -> u64 {
        self.file_len - self.pos
    }

    /// Fails with `Truncated` unless `n` more bytes exist. `what` is only formatted on failure.
    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Result<(), FormatError> {
        if n > self.remaining() {
            return Err(FormatError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                start: self.pos,
                end: self.pos.saturating_add(n),
                file_len: self.file_len,
            });
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<(), FormatError> {
        self.need(buf.len() as u64, what)?;
        self.r.read_exact(buf).map_err(|e| FormatError::io(self.path, e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], FormatError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// `n` bytes into a fresh vector; the caller has already bounded `n`.
    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>, FormatError> {
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v, what)?;
        Ok(v)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, FormatError> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > GGUF_MAX_STRING_LEN {
            return Err(self
                .invalid(format!("{}: string length {len} exceeds the limit of {GGUF_MAX_STRING_LEN} bytes", what())));
        }
        let bytes = self.bytes(len, &|| format!("{} ({len}-byte string)", what()))?;
        String::from_utf8(bytes).map_err(|e| self.invalid(format!("{}: string is not UTF-8: {e}", what())))
    }

    fn invalid(&self, msg: String) -> FormatError {
        FormatError::invalid(self.path, msg)
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufValueType, FormatError> {
        let id = self.u32(&|| format!("value type of {}", what()))?;
        GgufValueType::from_id(id).ok_or_else(|| self.invalid(format!("{}: unknown value type id {id}", what())))
    }

    fn value(&mut self, ty: GgufValueType, what: &dyn Fn() -> String) -> Result<GgufValue, FormatError> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            GgufValueType::Bool => {
                let [b] = self.array(what)?;
                GgufValue::Bool(self.bool_byte(b, what)?)
            }
            GgufValueType::String => GgufValue::String(self.string(what)?),
            GgufValueType::Array => GgufValue::Array(self.array_value(1, what)?),
        })
    }

    /// Only 0 and 1 are booleans; anything else is corruption, and accepting it would not round-trip.
    fn bool_byte(&self, b: u8, what: &dyn Fn() -> String) -> Result<bool, FormatError> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid(format!("{}: bool byte is {b}, expected 0 or 1", what()))),
        }
    }

    /// An array's element type, length and elements. `depth` is 1 for an array that is itself a KV value.
    fn array_value(&mut self, depth: u32, what: &dyn Fn() -> String) -> Result<GgufArray, FormatError> {
        let ty = self.value_type(&|| format!("array element type of {}", what()))?;
        let len = self.u64(&|| format!("array length of {}", what()))?;
        if len > GGUF_MAX_ARRAY_LEN {
            return Err(self.invalid(format!(
                "{}: array length {len} exceeds the limit of {GGUF_MAX_ARRAY_LEN} elements",
                what()
            )));
        }
        // Each element takes at least `min_size` bytes, so a length the file cannot hold fails here, before
        // anything of that length is allocated.
        let min = len * ty.min_size();
        self.need(min, &|| format!("{} (array of {len} {ty}, at least {min} bytes)", what()))?;
        let n = len as usize;
        // Reserve by what was read, not by what the header claims: a claimed count only costs memory once
        // its elements have actually been parsed.
        let reserve = n.min(PREALLOC_MAX);
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let raw = self.bytes(min, what)?;
                GgufArray::$variant(
                    raw.chunks_exact(W)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunks_exact yields W bytes")))
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            GgufValueType::U8 => GgufArray::U8(self.bytes(min, what)?),
            GgufValueType::I8 => fixed!(I8, i8),
            GgufValueType::U16 => fixed!(U16, u16),
            GgufValueType::I16 => fixed!(I16, i16),
            GgufValueType::U32 => fixed!(U32, u32),
            GgufValueType::I32 => fixed!(I32, i32),
            GgufValueType::F32 => fixed!(F32, f32),
            GgufValueType::U64 => fixed!(U64, u64),
            GgufValueType::I64 => fixed!(I64, i64),
            GgufValueType::F64 => fixed!(F64, f64),
            GgufValueType::Bool => {
                let raw = self.bytes(min, what)?;
                GgufArray::Bool(raw.into_iter().map(|b| self.bool_byte(b, what)).collect::<Result<_, _>>()?)
            }
            GgufValueType::String => {
                let mut v = Vec::with_capacity(reserve);
                for i in 0..n {
                    v.push(self.string(&|| format!("{}[{i}]", what()))?);
                }
                GgufArray::String(v)
            }
            GgufValueType::Array => {
                if depth >= GGUF_MAX_ARRAY_DEPTH {
                    return Err(
                        self.invalid(format!("{}: arrays nested deeper than {GGUF_MAX_ARRAY_DEPTH} levels", what()))
                    );
                }
                let mut v = Vec::with_capacity(reserve);
                for i in 0..n {
                    v.push(self.array_value(depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

impl GgufFile {
    /// Parses and validates the header of the GGUF file at `path`. Reads only the header, through a buffer.
    pub fn open(path: &Path) -> Result<GgufFile, FormatError> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
        let mut h = HeaderReader { path, r: BufReader::with_capacity(READ_BUFFER, file), pos: 0, file_len };

        let magic: [u8; 4] = h.array(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(h.invalid(format!("bad magic {magic:02x?}, expected \"GGUF\" (not a GGUF file)")));
        }
        let version = h.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(
                    h.invalid("GGUF version 1 is not supported (it has 32-bit lengths); expected 2 or 3".into())
                );
            }
            v if matches!(v.swap_bytes(), 2 | 3) => {
                return Err(h.invalid(format!(
                    "GGUF version {v} looks like a big-endian file (version {}); only little-endian is supported",
                    v.swap_bytes()
                )));
            }
            v => return Err(h.invalid(format!("unsupported GGUF version {v}, expected 2 or 3"))),
        }
        let n_tensors = h.u64(&|| "n_tensors".into())?;
        let n_kv = h.u64(&|| "n_kv".into())?;
        if n_tensors > GGUF_MAX_TENSORS {
            return Err(h.invalid(format!("n_tensors = {n_tensors} exceeds the limit of {GGUF_MAX_TENSORS}")));
        }
        if n_kv > GGUF_MAX_KV {
            return Err(h.invalid(format!("n_kv = {n_kv} exceeds the limit of {GGUF_MAX_KV}")));
        }
        // Both are capped at 2^20 above, so this cannot overflow.
        let min_header = n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES;
        h.need(min_header, &|| {
            format!("{n_tensors} tensor infos and {n_kv} key-values (at least {min_header} bytes)")
        })?;

        let mut metadata = Vec::with_capacity((n_kv as usize).min(PREALLOC_MAX));
        let mut keys = HashSet::with_capacity((n_kv as usize).min(PREALLOC_MAX));
        for i in 0..n_kv {
            let key = h.string(&|| format!("key of key-value {i}"))?;
            if !keys.insert(key.clone()) {
                return Err(h.invalid(format!("duplicate key `{key}`")));
            }
            let what = || format!("key `{key}`");
            let ty = h.value_type(&what)?;
            let value = h.value(ty, &what)?;
            metadata.push((key, value));
        }

        // ggml requires a u32 here and gguf-py takes any integer; the value is what decides the layout, so we
        // accept any width (our writer always emits u32).
        let alignment = match metadata.iter().find(|(k, _)| k == GGUF_KEY_ALIGNMENT) {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_integer() {
                Some(a) if a > 0 && a <= u32::MAX as i128 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(h.invalid(format!(
                        "`{GGUF_KEY_ALIGNMENT}` is {v:?}, expected a power of two that fits in u32"
                    )));
                }
            },
        };

        // (name, ne, ty, relative offset, n_bytes) until the data section start is known.
        let mut infos = Vec::with_capacity((n_tensors as usize).min(PREALLOC_MAX));
        let mut names = HashSet::with_capacity((n_tensors as usize).min(PREALLOC_MAX));
        for i in 0..n_tensors {
            let name = h.string(&|| format!("name of tensor info {i}"))?;
            if name.len() > GGUF_MAX_TENSOR_NAME {
                return Err(h.invalid(format!(
                    "tensor `{name}`: name is {} bytes, ggml allows at most {GGUF_MAX_TENSOR_NAME}",
                    name.len()
                )));
            }
            if !names.insert(name.clone()) {
                return Err(h.invalid(format!("duplicate tensor name `{name}`")));
            }
            let what = || format!("tensor `{name}`");
            let n_dims = h.u32(&what)?;
            if !(1..=super::GGUF_MAX_DIMS as u32).contains(&n_dims) {
                return Err(h.invalid(format!("tensor `{name}`: n_dims = {n_dims}, expected 1..=4")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(h.u64(&what)?);
            }
            let type_id = h.u32(&what)?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| FormatError::UnknownDtype {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("ggml type id {type_id}"),
            })?;
            let rel_offset = h.u64(&what)?;
            let n_bytes = tensor_n_bytes(&ne, ty).map_err(|m| h.invalid(format!("tensor `{name}`: {m}")))?;
            infos.push((name, ne, ty, rel_offset, n_bytes));
        }

        let header_end = h.pos;
        let data_offset = align_up(header_end, alignment)
            .ok_or_else(|| h.invalid(format!("data section start overflows (header ends at {header_end})")))?;

        let mut tensors = Vec::with_capacity(infos.len());
        for (name, ne, ty, rel, n_bytes) in infos {
            if !rel.is_multiple_of(alignment) {
                return Err(
                    h.invalid(format!("tensor `{name}`: offset {rel} is not a multiple of the alignment {alignment}"))
                );
            }
            let range = data_offset.checked_add(rel).and_then(|start| Some((start, start.checked_add(n_bytes)?)));
            match range {
                Some((start, end)) if end <= file_len => {
                    tensors.push(GgufTensorInfo { name, ne, ty, offset: start, n_bytes })
                }
                _ => {
                    return Err(FormatError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("tensor `{name}` ({ty}, ne {ne:?}, {n_bytes} bytes at data offset {rel})"),
                        start: data_offset.saturating_add(rel),
                        end: data_offset.saturating_add(rel).saturating_add(n_bytes),
                        file_len,
                    });
                }
            }
        }

        // Overlapping tensors would make writes to one corrupt another; ggml's writer lays them out back to back.
        let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(h.invalid(format!(
                    "tensors `{}` (bytes {}..{}) and `{}` (from byte {}) overlap",
                    w[0].name,
                    w[0].offset,
                    w[0].offset + w[0].n_bytes,
                    w[1].name,
                    w[1].offset
                )));
            }
        }

        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, alignment, data_offset, file_len })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor info named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, FormatError> {
        self.get(key).ok_or_else(|| FormatError::MissingField { path: self.path.clone(), field: key.to_string() })
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &GgufValue) -> FormatError {
        FormatError::invalid(&self.path, format!("key `{key}`: expected {expected}, found {}", found.describe()))
    }

    /// An integer of any width that fits in `T` (converters write the same key as u32 or i32 or u64).
    fn get_int<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<T, FormatError> {
        let v = self.require(key)?;
        match v.as_integer() {
            Some(i) => T::try_from(i).map_err(|_| {
                FormatError::invalid(&self.path, format!("key `{key}`: value {i} does not fit in {expected}"))
            }),
            None => Err(self.wrong_type(key, expected, v)),
        }
    }

    pub fn get_u32(&self, key: &str) -> Result<u32, FormatError> {
        self.get_int(key, "u32")
    }
    pub fn get_u64(&self, key: &str) -> Result<u64, FormatError> {
        self.get_int(key, "u64")
    }
    pub fn get_i32(&self, key: &str) -> Result<i32, FormatError> {
        self.get_int(key, "i32")
    }
    pub fn get_i64(&self, key: &str) -> Result<i64, FormatError> {
        self.get_int(key, "i64")
    }

    /// An f32, or an f64 narrowed to f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, FormatError> {
        self.get_f64(key).map(|v| v as f32)
    }

    /// An f64 or an f32.
    pub fn get_f64(&self, key: &str) -> Result<f64, FormatError> {
        match self.require(key)? {
            GgufValue::F32(v) => Ok(f64::from(*v)),
            GgufValue::F64(v) => Ok(*v),
            v => Err(self.wrong_type(key, "a float", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, FormatError> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, "bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, FormatError> {
        match self.require(key)? {
            GgufValue::String(s) => Ok(s),
            v => Err(self.wrong_type(key, "string", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&GgufArray, FormatError> {
        match self.require(key)? {
            GgufValue::Array(a) => Ok(a),
            v => Err(self.wrong_type(key, "array", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String], FormatError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::String(a)) => Ok(a),
            v => Err(self.wrong_type(key, "array of string", v)),
        }
    }

    /// An integer array of any width whose elements all fit in i64 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, FormatError> {
        let v = self.require(key)?;
        match v {
            GgufValue::Array(a) => {
                a.to_i64_vec().ok_or_else(|| self.wrong_type(key, "array of integers fitting i64", v))
            }
            _ => Err(self.wrong_type(key, "array of integers", v)),
        }
    }
}
