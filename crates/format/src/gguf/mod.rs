//! GGUF v3 (and v2, which has the same layout): a bounds-checked header reader and a streaming writer.
//!
//! This module owns the GGUF byte layout in both directions. [`GgufFile::open`] parses the header (metadata and
//! tensor infos) with buffered reads and answers where each tensor's bytes are; it never maps or reads the tensor
//! data itself, which is `store`'s job. [`GgufWriter`] writes the header, then streams tensor data through a large
//! buffer, so `synth` can write a 17 GB model without holding it.
//!
//! It is hand-written rather than taken from a crate because we need both properties at once and found no crate
//! that gives them: every count, length and offset in a hostile or truncated header is checked against the bytes
//! the file actually has before anything is allocated, with an error that names the file and the field; and the
//! writer streams tensor data instead of building the file in memory.
//!
//! Deliberate strictness beyond gguf-py: strings (keys, values, tensor names) must be UTF-8, bools must be 0 or 1,
//! tensors may not overlap, and tensor names follow ggml's 63-byte limit. Counts and lengths have fixed caps
//! (see the `GGUF_MAX_*` constants) far above any real model, so a hostile header cannot make us allocate
//! gigabytes inside a multi-GB file whose remaining bytes would otherwise "fit" the claim.
//!
//! Block geometry (elements and bytes per block) comes from [`moestream_quant::GgmlType`]; this module only does
//! the size arithmetic on top of it. Layout facts follow ggml's `gguf.cpp` and gguf-py (`gguf_reader.py`,
//! `gguf_writer.py`, `constants.py`), which `tests/python/test_gguf_writer.py` checks us against.

mod read;
mod value;
mod write;

pub use moestream_quant::GgmlType;
pub use read::{GGUF_MAX_ARRAY_DEPTH, GGUF_MAX_ARRAY_LEN, GGUF_MAX_KV, GGUF_MAX_STRING_LEN, GGUF_MAX_TENSORS};
pub use value::{GgufArray, GgufValue, GgufValueType};
pub use write::{GgufDataWriter, GgufWriter};

use std::path::PathBuf;

/// "GGUF" as stored at offset 0.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version the writer emits. The reader also accepts 2, whose layout is identical for little-endian files.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment. ggml requires it to be a `u32` power of two.
pub const GGUF_KEY_ALIGNMENT: &str = "general.alignment";
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const GGUF_MAX_DIMS: usize = 4;
/// ggml rejects tensor names of `GGML_MAX_NAME` (64) bytes or more, since it stores them in a `char[64]`.
pub const GGUF_MAX_TENSOR_NAME: usize = 63;

/// One tensor's header entry, with its absolute byte range already checked against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions innermost first, as GGUF and ggml store them (`ne[0]` is the contiguous row length).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute offset of the first byte in the file (the data section start plus the stored relative offset).
    pub offset: u64,
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Dimensions outermost first, as numpy and safetensors write them.
    pub fn shape(&self) -> Vec<u64> {
        self.ne.iter().rev().copied().collect()
    }

    /// Number of elements (the product of `ne`; cannot overflow, the reader checked it).
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// A parsed GGUF header. Tensor data stays on disk: use `offset` and `n_bytes` of each [`GgufTensorInfo`].
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Key-value metadata in file order. Keys are unique (the reader rejects duplicates).
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order. Names are unique.
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section (the end of the header, rounded up to `alignment`).
    pub data_offset: u64,
    pub file_len: u64,
}

/// Byte size of a tensor of `ne` (innermost first) elements of `ty`, or a message saying why it has none:
/// a dimension count outside 1..=4, a zero dimension, a row that is not whole blocks, or an overflow.
///
/// Zero dimensions are rejected although ggml's reader only checks `ne >= 0`: its own overflow check divides by
/// `ne[1..]`, so a zero there is not a tensor ggml can load either.
pub(crate) fn tensor_n_bytes(ne: &[u64], ty: GgmlType) -> Result<u64, String> {
    if ne.is_empty() || ne.len() > GGUF_MAX_DIMS {
        return Err(format!("has {} dimensions, GGUF allows 1..={GGUF_MAX_DIMS}", ne.len()));
    }
    if let Some(d) = ne.iter().position(|&n| n == 0) {
        return Err(format!("dimension ne[{d}] is 0"));
    }
    // ggml keeps ne and the element count in i64.
    let mut elems: u64 = 1;
    for &n in ne {
        elems = elems
            .checked_mul(n)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| format!("element count of ne {ne:?} overflows i64"))?;
    }
    let block = ty.block_elems() as u64;
    if !ne[0].is_multiple_of(block) {
        return Err(format!("ne[0] = {} is not a multiple of the {ty} block of {block} elements", ne[0]));
    }
    (elems / block)
        .checked_mul(ty.block_bytes() as u64)
        .ok_or_else(|| format!("byte size of ne {ne:?} as {ty} overflows u64"))
}

pub(crate) fn align_up(x: u64, alignment: u64) -> Option<u64> {
    debug_assert!(alignment.is_power_of_two());
    x.checked_add(alignment - 1).map(|v| v & !(alignment - 1))
}
