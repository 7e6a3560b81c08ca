//! Model files: readers for GGUF, safetensors (HF and MLX) and config.json, and the unified tensor index.
//!
//! This crate owns every byte layout on disk and is one of two crates allowed to open model files (the other is
//! `store`). It answers "where are the bytes of tensor X, expert e, and how are they encoded" and nothing more: it
//! runs no I/O policy (caching, prefetch, direct I/O) and no math beyond size arithmetic and calling the reference
//! decoders of `moestream-quant` for whole-tensor loads. It also holds the writers that `synth` uses, so that one
//! module knows each format in both directions.

pub mod config;
pub mod error;
pub mod generation;
pub mod gguf;
mod gguf_index;
pub mod index;
pub mod mlx;
pub mod pack;
pub mod safetensors;

pub use config::{Architecture, LayerAttention, ModelConfig};
pub use error::FormatError;
pub use index::{
    Encoding, ExpertRanges, FileRange, ModelFormat, ROUTING_SKEW_GGUF, ROUTING_SKEW_JSON, TensorEntry, TensorIndex,
};
