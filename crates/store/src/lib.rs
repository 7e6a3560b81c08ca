//! Weight memory: the resident trunk and the expert slot cache.
//!
//! `store` owns every byte of weight memory the engine computes from, and is (with `format`) the only crate that
//! opens model files. Models ask it for views; they never allocate weights themselves. Experts live in one
//! stacked buffer per projection per MoE layer, `[slots, rows, row_bytes]`, with gate and up fused into one
//! `[slots, 2·I, H]` buffer so the gathered kernel walks gate and up of an expert as one matrix.
//!
//! The expert cache may hold fewer slots than experts: `ExpertStore::ensure` reads missing experts into least
//! recently used slots (see `cache`), all misses of one call as one concurrent batch of reads (see `reader`).

mod aligned;
mod cache;
pub mod policy;
mod reader;
mod resident;

pub use aligned::AlignedBuf;
pub use cache::{CachePlan, CacheSize, EMPTY_SLOT, ExpertLayer, ExpertStore, StoreStats};
pub use policy::EvictionPolicy;
pub use reader::{BLOCK, ReadOptions};
pub use resident::{OwnedWeight, ResidentWeights, SlotBuffer, WeightId};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Format(#[from] moestream_format::FormatError),
    #[error("{path}: reading {len} bytes at offset {offset}: {source}")]
    Read { path: PathBuf, offset: u64, len: u64, source: std::io::Error },
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("tensor {tensor}: {msg}")]
    Layout { tensor: String, msg: String },
    #[error("expert cache: {0}")]
    Budget(String),
    #[error("cannot allocate {bytes} bytes of weight memory")]
    Alloc { bytes: usize },
}
