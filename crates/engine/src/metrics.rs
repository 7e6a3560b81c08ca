//! Engine counters: lock-free atomics that the engine thread bumps and any thread snapshots. Rendering (the
//! Prometheus text) is the server's job; this module only counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper edges (seconds) of the time-to-first-token histogram buckets; a last, unbounded bucket follows.
pub const TTFT_BUCKETS_S: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens not recomputed because a session already held their state (the prompt cache).
    pub prompt_tokens_cached: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub active: AtomicU64,
    pub queued: AtomicU64,
    pub prefill_us: AtomicU64,
    pub decode_us: AtomicU64,
    /// Decode steps (tokens after each request's first), the numerator of decode tok/s.
    pub decode_tokens: AtomicU64,
    pub ttft_count: AtomicU64,
    pub ttft_sum_us: AtomicU64,
    pub ttft_buckets: [AtomicU64; TTFT_BUCKETS_S.len() + 1],
}

impl Counters {
    pub fn observe_ttft(&self, secs: f64) {
        let b = TTFT_BUCKETS_S.iter().position(|&e| secs <= e).unwrap_or(TTFT_BUCKETS_S.len());
        self.ttft_buckets[b].fetch_add(1, Relaxed);
        self.ttft_count.fetch_add(1, Relaxed);
        self.ttft_sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    pub fn snapshot(&self) -> EngineMetrics {
        let g = |a: &AtomicU64| a.load(Relaxed);
        EngineMetrics {
            requests: g(&self.requests),
            requests_rejected: g(&self.rejected),
            requests_cancelled: g(&self.cancelled),
            requests_failed: g(&self.failed),
            finished_stop: g(&self.finished_stop),
            finished_length: g(&self.finished_length),
            prompt_tokens: g(&self.prompt_tokens),
            prompt_tokens_cached: g(&self.prompt_tokens_cached),
            generated_tokens: g(&self.generated_tokens),
            active: g(&self.active),
            queued: g(&self.queued),
            prefill_seconds: g(&self.prefill_us) as f64 / 1e6,
            decode_seconds: g(&self.decode_us) as f64 / 1e6,
            decode_tokens: g(&self.decode_tokens),
            ttft_count: g(&self.ttft_count),
            ttft_sum_seconds: g(&self.ttft_sum_us) as f64 / 1e6,
            ttft_buckets: self.ttft_buckets.iter().map(g).collect(),
            store: None,
        }
    }
}

/// A point-in-time copy of the engine's counters (totals since start) and the expert store's statistics.
#[derive(Debug, Clone, Default)]
pub struct EngineMetrics {
    /// Requests accepted into the queue.
    pub requests: u64,
    /// Requests refused because the queue was full.
    pub requests_rejected: u64,
    /// Requests whose client went away before they finished.
    pub requests_cancelled: u64,
    /// Requests that ended with an engine error.
    pub requests_failed: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those served from the prompt cache instead of being recomputed.
    pub prompt_tokens_cached: u64,
    pub generated_tokens: u64,
    /// Requests holding a session now.
    pub active: u64,
    /// Requests waiting for a session.
    pub queued: u64,
    /// Engine-thread time spent in prompt chunks / decode steps.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub decode_tokens: u64,
    pub ttft_count: u64,
    pub ttft_sum_seconds: f64,
    /// Per bucket of [`TTFT_BUCKETS_S`] (plus the unbounded last one), non-cumulative counts.
    pub ttft_buckets: Vec<u64>,
    /// The expert cache's statistics (hits, misses, bytes read, read latency histogram).
    pub store: Option<moestream_store::StoreStats>,
}

impl EngineMetrics {
    /// Decode throughput over the engine thread's decode time (all requests together).
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.decode_seconds > 0.0 { self.decode_tokens as f64 / self.decode_seconds } else { 0.0 }
    }

    pub fn prefill_tokens_per_second(&self) -> f64 {
        if self.prefill_seconds > 0.0 { self.prompt_tokens as f64 / self.prefill_seconds } else { 0.0 }
    }
}
