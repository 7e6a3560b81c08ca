//! Weight encodings and their scalar reference codecs.
//!
//! This crate owns the bit layouts: GGUF block types (`ggml`), MLX affine groups (`mlx`) and plain floats.
//! Every decoder here is the *reference* that later SIMD kernels are tested against, so each one is written
//! for obviousness, not speed. It knows nothing about models, files or tensor names.

pub mod float;
pub mod ggml;
pub mod mlx;

pub use float::{FloatType, decode_floats, encode_floats};
pub use ggml::GgmlType;
pub use mlx::MlxAffine;

/// How a tensor's elements are stored: the one description of a weight's bit layout that the index, the
/// store and the kernels share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float(FloatType),
    /// A GGUF block type (never F32/F16/BF16: those are `Float`).
    Ggml(GgmlType),
    /// MLX affine groups: packed u32 words plus per-group scales and biases of `scale_type`.
    MlxAffine {
        params: MlxAffine,
        scale_type: FloatType,
    },
}

impl Encoding {
    /// Bytes of one row of `cols` elements, or `None` when `cols` does not fit the encoding's blocks or groups.
    /// For MLX this counts the packed codes only; scales and biases are separate buffers.
    pub fn row_bytes(&self, cols: usize) -> Option<usize> {
        match self {
            Encoding::Float(f) => cols.checked_mul(f.size()),
            Encoding::Ggml(t) => t.row_bytes(cols),
            Encoding::MlxAffine { params, .. } => {
                cols.is_multiple_of(params.group_size).then(|| params.packed_bytes(cols))
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Encoding::Float(f) => f.name().to_string(),
            Encoding::Ggml(t) => t.name().to_string(),
            Encoding::MlxAffine { params, .. } => format!("MLX_Q{}_G{}", params.bits, params.group_size),
        }
    }
}

/// Errors from decoding or encoding a buffer. They carry sizes, never file names: the caller knows the file.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{ty}: {elems} elements is not a whole number of {block}-element blocks")]
    PartialBlock { ty: &'static str, elems: usize, block: usize },
    #[error("{ty}: expected {expected} bytes, got {got}")]
    ByteLength { ty: &'static str, expected: usize, got: usize },
    #[error("{ty}: output holds {got} elements, input has {expected}")]
    OutputLength { ty: &'static str, expected: usize, got: usize },
    #[error("{0} has no encoder")]
    NoEncoder(&'static str),
    #[error("MLX affine: expected {expected} {what}, got {got}")]
    GroupCount { what: &'static str, expected: usize, got: usize },
    #[error("MLX affine: unsupported {what} {value}")]
    MlxParams { what: &'static str, value: usize },
}
