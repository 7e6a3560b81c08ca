//! `/metrics`: the engine's counters and the expert store's statistics as Prometheus text (version 0.0.4).
//! Names start with `moestream_` and sort by subsystem (`moestream_expert_cache_*`, `moestream_requests_*`).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use moestream_engine::{EngineMetrics, TTFT_BUCKETS_S};

use crate::SharedState;

pub async fn render(State(s): State<SharedState>) -> impl IntoResponse {
    let m = s.engine.metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text(&m))
}

/// The exposition text of one snapshot.
pub fn text(m: &EngineMetrics) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    metric("moestream_requests_total", "counter", "Requests accepted into the queue.", &[("", m.requests as f64)]);
    metric(
        "moestream_requests_rejected_total",
        "counter",
        "Requests refused with 429 because the queue was full.",
        &[("", m.requests_rejected as f64)],
    );
    metric(
        "moestream_requests_cancelled_total",
        "counter",
        "Requests whose client disconnected before they finished.",
        &[("", m.requests_cancelled as f64)],
    );
    metric(
        "moestream_requests_failed_total",
        "counter",
        "Requests that ended with an error.",
        &[("", m.requests_failed as f64)],
    );
    metric(
        "moestream_requests_finished_total",
        "counter",
        "Requests finished, by finish reason.",
        &[("{reason=\"stop\"}", m.finished_stop as f64), ("{reason=\"length\"}", m.finished_length as f64)],
    );
    metric(
        "moestream_requests_active",
        "gauge",
        "Requests generating now (each holds a session).",
        &[("", m.active as f64)],
    );
    metric(
        "moestream_requests_queued",
        "gauge",
        "Requests waiting for a session (queue depth).",
        &[("", m.queued as f64)],
    );
    metric("moestream_prompt_tokens_total", "counter", "Prompt tokens processed.", &[("", m.prompt_tokens as f64)]);
    metric(
        "moestream_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens reused from a session's cached state instead of recomputed.",
        &[("", m.prompt_tokens_cached as f64)],
    );
    metric("moestream_generated_tokens_total", "counter", "Tokens generated.", &[("", m.generated_tokens as f64)]);
    metric(
        "moestream_decode_tokens_per_second",
        "gauge",
        "Decode throughput over the engine's decode time since start (all requests).",
        &[("", m.decode_tokens_per_second())],
    );
    metric(
        "moestream_prefill_tokens_per_second",
        "gauge",
        "Prompt throughput over the engine's prefill time since start.",
        &[("", m.prefill_tokens_per_second())],
    );
    let mut cum = 0u64;
    let mut buckets: Vec<(String, f64)> = Vec::new();
    for (i, n) in m.ttft_buckets.iter().enumerate() {
        cum += n;
        let le = TTFT_BUCKETS_S.get(i).map_or("+Inf".to_string(), |e| e.to_string());
        buckets.push((format!("_bucket{{le=\"{le}\"}}"), cum as f64));
    }
    buckets.push(("_sum".into(), m.ttft_sum_seconds));
    buckets.push(("_count".into(), m.ttft_count as f64));
    let samples: Vec<(&str, f64)> = buckets.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "moestream_time_to_first_token_seconds",
        "histogram",
        "From request arrival to its first generated token.",
        &samples,
    );
    if let Some(st) = &m.store {
        metric(
            "moestream_expert_cache_hits_total",
            "counter",
            "Expert lookups served from the slot cache.",
            &[("", st.hits as f64)],
        );
        metric(
            "moestream_expert_cache_misses_total",
            "counter",
            "Expert lookups that read from disk.",
            &[("", st.misses as f64)],
        );
        metric("moestream_expert_cache_hit_ratio", "gauge", "Hits over lookups since start.", &[("", st.hit_rate())]);
        metric(
            "moestream_expert_bytes_read_total",
            "counter",
            "Expert bytes read from model files.",
            &[("", st.bytes_read as f64)],
        );
        metric(
            "moestream_expert_read_latency_seconds",
            "gauge",
            "Expert read latency quantiles (log2 buckets).",
            &[
                ("{quantile=\"0.5\"}", st.latency_percentile_us(50.0) as f64 / 1e6),
                ("{quantile=\"0.9\"}", st.latency_percentile_us(90.0) as f64 / 1e6),
                ("{quantile=\"0.99\"}", st.latency_percentile_us(99.0) as f64 / 1e6),
            ],
        );
    }
    o
}
