//! `moestream bench`: prefill and decode speed of one model with the engine flags given, for people (a table) and
//! scripts (`--json`): prefill tok/s, decode tok/s, time to first token, expert-cache hit rate, routing reuse (the
//! share of a decode token's top-k that repeat the previous token's, per MoE layer), bytes read per token and read
//! latency, over `--repeat` runs, cold and warm reported apart, as medians with min–max spread. Decode is also
//! reported on its own (the prompt's reads excluded): expert misses per decoded token and the time per token that
//! decode spent blocked on expert reads, the part of a bigger-than-memory slowdown that overlap did not hide.
//!
//! A cold run starts from a freshly loaded model (empty expert cache) after dropping the page cache (needs root:
//! without it the run is labelled `cold (page cache kept)`); a warm run repeats the same work on the model the
//! previous run left behind. The prompt is deterministic pseudo-random token ids; each decode step feeds back the
//! argmax (greedy) or, with `--decode-input random`, the next ids of the prompt's sequence, for a fixed number of
//! tokens (end-of-sequence ignored), so every run does the same work. Random input is what llama-bench's `tg`
//! feeds; greedy output of random weights can lock onto one repeated token, and with it the routing.

use std::time::Instant;

use anyhow::Result;
use moestream_models::Qwen3Moe;
use serde::Serialize;

#[derive(Serialize, Clone, Copy)]
struct Sample {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft_s: f64,
    hit_rate: f64,
    routing_reuse: f64,
    read_bytes_per_token: f64,
    read_latency_p50_us: u64,
    read_latency_p99_us: u64,
    decode_misses_per_token: f64,
    decode_stall_ms_per_token: f64,
}

#[derive(Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(xs: impl Iterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = xs.collect();
    v.sort_by(f64::total_cmp);
    let median = match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Spread { median, min: v.first().copied().unwrap_or(f64::NAN), max: v.last().copied().unwrap_or(f64::NAN) }
}

#[derive(Serialize)]
struct Summary {
    runs: usize,
    prefill_tok_s: Spread,
    decode_tok_s: Spread,
    ttft_s: Spread,
    hit_rate: Spread,
    routing_reuse: Spread,
    read_bytes_per_token: Spread,
    read_latency_p50_us: Spread,
    read_latency_p99_us: Spread,
    decode_misses_per_token: Spread,
    decode_stall_ms_per_token: Spread,
    samples: Vec<Sample>,
}

fn summarize(s: &[Sample]) -> Summary {
    Summary {
        runs: s.len(),
        prefill_tok_s: spread(s.iter().map(|x| x.prefill_tok_s)),
        decode_tok_s: spread(s.iter().map(|x| x.decode_tok_s)),
        ttft_s: spread(s.iter().map(|x| x.ttft_s)),
        hit_rate: spread(s.iter().map(|x| x.hit_rate)),
        routing_reuse: spread(s.iter().map(|x| x.routing_reuse)),
        read_bytes_per_token: spread(s.iter().map(|x| x.read_bytes_per_token)),
        read_latency_p50_us: spread(s.iter().map(|x| x.read_latency_p50_us as f64)),
        read_latency_p99_us: spread(s.iter().map(|x| x.read_latency_p99_us as f64)),
        decode_misses_per_token: spread(s.iter().map(|x| x.decode_misses_per_token)),
        decode_stall_ms_per_token: spread(s.iter().map(|x| x.decode_stall_ms_per_token)),
        samples: s.to_vec(),
    }
}

pub struct BenchArgs<'a> {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repeat: usize,
    pub ctx: usize,
    /// The model file's `--routing-skew` label, if any (reported as is).
    pub routing_skew: Option<f32>,
    /// Warm runs use a different prompt than the cold run before them: the expert cache is then warmed by other
    /// work, not primed with exactly the experts the warm run will ask for (whose working set may simply fit).
    pub warm_other_prompt: bool,
    /// Decode steps feed the ids that follow the prompt in its pseudo-random sequence instead of the argmax.
    pub random_decode_input: bool,
    pub load: &'a dyn Fn() -> Result<Qwen3Moe>,
}

/// One run: prefill `prompt`, then `n_gen` tokens, each step fed the argmax or, when `input` is given, its next id
/// (`input` holds at least `n_gen − 1`); statistics from the store counters over the run.
fn one_run(m: &Qwen3Moe, prompt: &[u32], input: Option<&[u32]>, n_gen: usize, ctx: usize) -> Result<Sample> {
    m.reset_store_stats();
    let mut s = m.new_session(ctx);
    let mut logits = Vec::with_capacity(m.config.vocab_size);
    let t0 = Instant::now();
    m.forward(&mut s, prompt, false, &mut logits)?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = moestream_cpu::ops::argmax(&logits);
    let ttft = t0.elapsed().as_secs_f64();
    let p = m.store_stats();
    let (misses0, stall0) = (p.misses, p.stall_us());
    let t1 = Instant::now();
    for i in 1..n_gen {
        if let Some(ids) = input {
            next = ids[i - 1];
        }
        m.forward(&mut s, &[next], false, &mut logits)?;
        next = moestream_cpu::ops::argmax(&logits);
    }
    let decode = t1.elapsed().as_secs_f64();
    let st = m.store_stats();
    let tokens = (prompt.len() + n_gen.saturating_sub(1)) as f64;
    let steps = n_gen.saturating_sub(1).max(1) as f64;
    Ok(Sample {
        prefill_tok_s: prompt.len() as f64 / prefill.max(1e-9),
        decode_tok_s: n_gen.saturating_sub(1) as f64 / decode.max(1e-9),
        ttft_s: ttft,
        hit_rate: st.hit_rate(),
        routing_reuse: s.routing_reuse().rate(),
        read_bytes_per_token: st.bytes_read as f64 / tokens,
        read_latency_p50_us: st.latency_percentile_us(50.0),
        read_latency_p99_us: st.latency_percentile_us(99.0),
        decode_misses_per_token: (st.misses - misses0) as f64 / steps,
        decode_stall_ms_per_token: (st.stall_us() - stall0) as f64 / 1e3 / steps,
    })
}

fn drop_page_cache() -> bool {
    // Dirty pages first, or they stay cached; `sync` the command keeps this crate free of libc.
    let synced = std::process::Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

pub fn run(a: &BenchArgs, json: bool) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens >= 1 && a.gen_tokens >= 2, "--prompt-tokens ≥ 1 and --gen-tokens ≥ 2 are needed");
    anyhow::ensure!(a.repeat >= 1, "--repeat must be at least 1");
    let ctx = a.ctx.max(a.prompt_tokens + a.gen_tokens);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut dropped = true;
    let mut vocab = 0;
    for _ in 0..a.repeat {
        dropped &= drop_page_cache();
        let m = (a.load)()?;
        vocab = m.config.vocab_size;
        // SplitMix-style ids, fixed, spread over the vocabulary (no tokenizer needed); the other prompt starts
        // further along the same sequence, and random decode input continues each prompt's.
        let ids = |from: u64, n: usize| -> Vec<u32> {
            (from..from + n as u64)
                .map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % vocab as u64) as u32)
                .collect()
        };
        let (p, g) = (a.prompt_tokens, a.gen_tokens);
        let run = |from: u64| {
            let input = a.random_decode_input.then(|| ids(from + p as u64, g));
            one_run(&m, &ids(from, p), input.as_deref(), g, ctx)
        };
        cold.push(run(0)?);
        warm.push(run(if a.warm_other_prompt { 1 << 20 } else { 0 })?);
    }
    let cold_label = if dropped { "cold" } else { "cold (page cache kept)" };
    if json {
        let j = serde_json::json!({
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "vocab_size": vocab,
            "page_cache_dropped": dropped,
            "synthetic_routing_skew": a.routing_skew,
            "warm_prompt": if a.warm_other_prompt { "other" } else { "same" },
            "decode_input": if a.random_decode_input { "random" } else { "greedy" },
            "cold": summarize(&cold),
            "warm": summarize(&warm),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let skew = a.routing_skew.map(|s| format!("; synthetic routing skew {s}")).unwrap_or_default();
    let warm_prompt = if a.warm_other_prompt { "warm runs on another prompt" } else { "warm runs repeat the prompt" };
    let input = if a.random_decode_input { "random decode input" } else { "greedy decode" };
    println!(
        "{} prompt tokens, {} generated ({input}), {} repeats; {warm_prompt}; median [min–max]{skew}",
        a.prompt_tokens, a.gen_tokens, a.repeat
    );
    println!(
        "| run | prefill tok/s | decode tok/s | TTFT s | hit rate % | routing reuse % | read MB/token | read p50/p99 µs \
         | decode misses/token | decode stall ms/token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, s) in [(cold_label, summarize(&cold)), ("warm", summarize(&warm))] {
        let f = |x: &Spread, scale: f64, prec: usize| {
            format!("{:.p$} [{:.p$}–{:.p$}]", x.median * scale, x.min * scale, x.max * scale, p = prec)
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {:.0}/{:.0} | {} | {} |",
            f(&s.prefill_tok_s, 1.0, 2),
            f(&s.decode_tok_s, 1.0, 2),
            f(&s.ttft_s, 1.0, 3),
            f(&s.hit_rate, 100.0, 1),
            f(&s.routing_reuse, 100.0, 1),
            f(&s.read_bytes_per_token, 1e-6, 1),
            s.read_latency_p50_us.median,
            s.read_latency_p99_us.median,
            f(&s.decode_misses_per_token, 1.0, 2),
            f(&s.decode_stall_ms_per_token, 1.0, 1),
        );
    }
    Ok(())
}
