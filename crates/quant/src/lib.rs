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
