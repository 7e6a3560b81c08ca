//! Model architectures: one file per family, each mapping canonical tensor names onto the forward pass over
//! `cpu` ops and `store` weights.
//!
//! Models read no files and own no weight memory: the trunk comes from `store::ResidentWeights`, experts from
//! `store::ExpertStore` slots. What they own is activation scratch and the KV cache of a [`Session`], both sized
//! once so the per-token path does not allocate.

pub mod qwen3_moe;

pub use qwen3_moe::{
    DEFAULT_PREFILL_CHUNK, ModelOptions, MoeKernels, Prefetch, Qwen3Moe, RoutingReuse, Session, SessionSnapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Store(#[from] moestream_store::StoreError),
    #[error(transparent)]
    Format(#[from] moestream_format::FormatError),
    #[error("kernel: {0}")]
    Kernel(#[from] moestream_cpu::MatmulError),
    #[error("{0}")]
    Unsupported(String),
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("context full: {needed} positions needed, the session holds {capacity}")]
    ContextFull { needed: usize, capacity: usize },
    #[error("session state: {0}")]
    Session(String),
}
