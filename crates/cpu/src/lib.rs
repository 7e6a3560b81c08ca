//! CPU compute for moestream: a persistent thread pool and matrix-vector kernels over quantized weights,
//! including the gathered MoE matmuls that run all of a token's experts in one pass, and causal attention over an
//! f32 KV cache.
//!
//! It owns threads and arithmetic. It must not open files, own weight memory or know about models: weights
//! arrive as borrowed [`WeightView`]s over bytes someone else (the resident set, the expert store) holds, and
//! the per-call paths do not allocate.

pub mod attention;
pub mod gdn;
pub mod matmul;
pub mod ops;
pub mod pool;

pub use matmul::{
    Activations, Dispatch, Isa, MatmulError, WeightView, gathered_down, gathered_gate_up, gathered_gate_up_split, gemm,
    gemv, sum_parts,
};
pub use pool::ThreadPool;
