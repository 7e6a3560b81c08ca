//! The engine: sessions, the sampler, the generation loop and the scheduler, on one OS thread that owns the
//! model's forward passes.
//!
//! Callers hand in prompt token ids and sampling knobs ([`GenerationRequest`]) and get back a stream of
//! [`Event`]s (text deltas, then a finish with its reason and usage). This crate knows nothing of HTTP or JSON
//! wire types (that is `server`), of chat templates (that is `chat`), or of weight memory (that is `models` and
//! `store`).

pub mod metrics;
pub mod rng;
pub mod sampler;
pub mod scheduler;
pub mod stop;

pub use metrics::{EngineMetrics, TTFT_BUCKETS_S};
pub use moestream_store::StoreStats;
pub use sampler::{Sampler, SamplingParams, argmax};
pub use scheduler::{
    Completed, Engine, EngineInfo, EngineOptions, Event, FinishReason, Generation, GenerationRequest, Usage,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Too many requests are waiting; the caller should retry later (HTTP 429).
    #[error("the server is busy: {queued} requests are already waiting; retry later")]
    QueueFull { queued: usize },
    /// The request is malformed; `param` names the field at fault.
    #[error("{param}: {message}")]
    InvalidRequest { param: &'static str, message: String },
    #[error("the prompt has {prompt} tokens but the context holds {ctx} (prompt and output together)")]
    ContextLength { prompt: usize, ctx: usize },
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The generation failed while running (a read error, for example).
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("the engine has stopped")]
    Stopped,
}
