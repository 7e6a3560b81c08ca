//! The engine end to end on a tiny synthetic model: it generates what the model's argmax says, honours every
//! request knob, isolates concurrent requests, refuses when the queue is full and cancels dropped requests.

use std::time::{Duration, Instant};

use moestream_chat::Tokenizer;
use moestream_engine::{
    Engine, EngineError, EngineOptions, Event, FinishReason, Generation, GenerationRequest, SamplingParams,
};
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Qwen3Moe};
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &path);
    o.progress = false;
    synth(&o).expect("synth");
    Fixture { _dir: dir, path }
}

fn load(f: &Fixture) -> (Qwen3Moe, Tokenizer) {
    let index = TensorIndex::open(&f.path).expect("index");
    let opts = ModelOptions { threads: 1, ..ModelOptions::default() };
    let m = Qwen3Moe::load(&index, &opts).expect("load");
    let t = Tokenizer::from_index(&index).expect("tokenizer").expect("synth models ship a tokenizer");
    (m, t)
}

fn engine(f: &Fixture, opts: EngineOptions) -> Engine {
    let (m, t) = load(f);
    Engine::start(m, t, opts).expect("start")
}

fn greedy(prompt: &[u32], n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens: Some(n),
        stop: Vec::new(),
        ignore_eos: false,
    }
}

/// All events of a generation, blocking, with a deadline so a hang fails instead of stalling the suite.
fn drain(mut g: Generation) -> (String, Event) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    loop {
        assert!(Instant::now() < deadline, "generation did not finish");
        match g.blocking_next_event() {
            Some(Event::Text(t)) => {
                assert!(!t.is_empty(), "empty text events are never sent");
                text.push_str(&t)
            }
            Some(e) => return (text, e),
            None => panic!("stream ended without a finish event"),
        }
    }
}

const PROMPT: [u32; 6] = [300, 17, 512, 44, 901, 5];

#[test]
fn greedy_matches_the_models_argmax_and_chunked_prefill_agrees() {
    let f = fixture();
    let (m, tok) = load(&f);
    // Reference: the model's own argmax loop, EOS ignored, decoded with the same tokenizer.
    let mut s = m.new_session(64);
    let mut logits = Vec::new();
    m.forward(&mut s, &PROMPT, false, &mut logits).expect("forward");
    let mut ids = Vec::new();
    for _ in 0..12 {
        let t = moestream_engine::argmax(&logits);
        ids.push(t);
        m.forward(&mut s, &[t], false, &mut logits).expect("forward");
    }
    drop(m);
    let e = engine(&f, EngineOptions { ctx: 64, prefill_chunk: 2, ..Default::default() });
    let eos = e.info().eos_ids.clone();
    let n_before_eos = ids.iter().position(|t| eos.contains(t)).unwrap_or(ids.len());
    let want = tok.decode(&ids[..n_before_eos]).expect("decode");
    let (text, fin) = drain(e.submit(greedy(&PROMPT, 12)).expect("submit"));
    assert_eq!(text, want);
    let reason = if n_before_eos < ids.len() { FinishReason::Stop } else { FinishReason::Length };
    match fin {
        Event::Finish { reason: r, usage } => {
            assert_eq!(r, reason);
            assert_eq!(usage.prompt_tokens, PROMPT.len());
            assert_eq!(usage.completion_tokens, (n_before_eos + 1).min(12));
        }
        other => panic!("{other:?}"),
    }
    let m = e.metrics();
    assert_eq!(m.requests, 1);
    assert_eq!(m.prompt_tokens, PROMPT.len() as u64);
    assert_eq!(m.ttft_count, 1);
    assert!(m.store.is_some_and(|s| s.hits + s.misses > 0));
}

#[test]
fn seeds_are_reproducible_and_distinct() {
    let f = fixture();
    let e = engine(&f, EngineOptions { ctx: 64, ..Default::default() });
    let run = |seed| {
        let mut r = greedy(&PROMPT, 24);
        r.sampling = SamplingParams { temperature: 1.5, seed: Some(seed), ..Default::default() };
        drain(e.submit(r).expect("submit")).0
    };
    let a = run(1);
    assert_eq!(a, run(1));
    // 24 draws at temperature 1.5 over a random model's vocabulary: distinct seeds agreeing is vanishingly rare.
    assert_ne!(a, run(2));
}

#[test]
fn stop_strings_cut_the_output() {
    let f = fixture();
    let e = engine(&f, EngineOptions { ctx: 64, ..Default::default() });
    let (full, _) = drain(e.submit(greedy(&PROMPT, 24)).expect("submit"));
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "the tiny model's greedy output is too short to test with: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = full.find(&stop).expect("stop is in the text");
    let mut r = greedy(&PROMPT, 24);
    r.stop = vec!["never-in-the-output-Ω".into(), stop.clone()];
    let (text, fin) = drain(e.submit(r).expect("submit"));
    assert_eq!(text, full[..cut], "stop {stop:?}");
    assert!(matches!(fin, Event::Finish { reason: FinishReason::Stop, .. }), "{fin:?}");
}

#[test]
fn concurrent_requests_are_isolated() {
    let f = fixture();
    let e = engine(&f, EngineOptions { ctx: 64, parallel: 2, prefill_chunk: 3, ..Default::default() });
    let other: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 900).collect();
    let (solo_a, _) = drain(e.submit(greedy(&PROMPT, 16)).expect("submit"));
    let (solo_b, _) = drain(e.submit(greedy(&other, 16)).expect("submit"));
    // Submitted together, interleaved token by token on two sessions: same outputs.
    let ga = e.submit(greedy(&PROMPT, 16)).expect("submit");
    let gb = e.submit(greedy(&other, 16)).expect("submit");
    let hb = std::thread::spawn(move || drain(gb).0);
    assert_eq!(drain(ga).0, solo_a);
    assert_eq!(hb.join().expect("thread"), solo_b);
}

#[test]
fn full_queue_is_refused_and_dropped_requests_cancel() {
    let f = fixture();
    let e = engine(&f, EngineOptions { ctx: 2048, parallel: 1, max_queued: 1, ..Default::default() });
    let long = |n| GenerationRequest { ignore_eos: true, ..greedy(&PROMPT, n) };
    let mut a = e.submit(long(2000)).expect("first is admitted");
    let b = e.submit(long(2000)).expect("second waits");
    match e.submit(long(10)) {
        Err(EngineError::QueueFull { .. }) => {}
        other => panic!("expected QueueFull, got {:?}", other.map(|g| g.id)),
    }
    assert_eq!(e.metrics().requests_rejected, 1);
    // Wait for the first token of `a`, then drop both: the engine must stop generating.
    let _ = a.blocking_next_event();
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(30);
    while e.metrics().active + e.metrics().queued > 0 || e.metrics().requests_cancelled < 2 {
        assert!(Instant::now() < deadline, "cancelled requests still running: {:?}", e.metrics());
        std::thread::sleep(Duration::from_millis(5));
    }
    let gen_after = e.metrics().generated_tokens;
    assert!(gen_after < 2000, "the dropped request ran to the end");
    // The engine still serves.
    let (_, fin) = drain(e.submit(greedy(&PROMPT, 3)).expect("submit"));
    assert!(matches!(fin, Event::Finish { .. }));
}

#[test]
fn invalid_requests_fail_at_submit() {
    let f = fixture();
    let e = engine(&f, EngineOptions { ctx: 16, ..Default::default() });
    let param = |r: GenerationRequest| match e.submit(r) {
        Err(EngineError::InvalidRequest { param, .. }) => param,
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(param(greedy(&[], 4)), "prompt");
    assert_eq!(param(greedy(&[1_000_000], 4)), "prompt");
    assert_eq!(param(greedy(&PROMPT, 0)), "max_tokens");
    let mut r = greedy(&PROMPT, 4);
    r.sampling.top_p = 2.0;
    assert_eq!(param(r), "top_p");
    assert!(matches!(e.submit(greedy(&[1; 16], 4)), Err(EngineError::ContextLength { prompt: 16, ctx: 16 })));
    // Output is capped by the context: 10 prompt tokens leave room for 6.
    let (_, fin) = drain(e.submit(greedy(&[7; 10], 100)).expect("submit"));
    match fin {
        Event::Finish { reason, usage } => {
            assert!(usage.completion_tokens <= 6);
            assert!(reason == FinishReason::Length || usage.completion_tokens < 6);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn reused_sessions_start_clean_on_hybrids() {
    // Qwen3.5-MoE carries Gated DeltaNet conv and recurrent state besides the KV cache: a session reused for the
    // next request must not remember the previous one.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hybrid");
    let mut o = SynthOptions::new(Preset::TinyQwen35Moe, SynthFormat::HfBf16, &path);
    o.progress = false;
    synth(&o).expect("synth");
    let index = TensorIndex::open(&path).expect("index");
    let m = Qwen3Moe::load(&index, &ModelOptions { threads: 1, ..ModelOptions::default() }).expect("load");
    let t = Tokenizer::from_index(&index).expect("tokenizer").expect("synth models ship a tokenizer");
    let e = Engine::start(m, t, EngineOptions { ctx: 64, parallel: 1, ..Default::default() }).expect("start");
    let other: Vec<u32> = (0..12).map(|i| (i * 53 + 7) % 900).collect();
    let first = drain(e.submit(greedy(&PROMPT, 10)).expect("submit")).0;
    let _ = drain(e.submit(greedy(&other, 10)).expect("submit"));
    assert_eq!(drain(e.submit(greedy(&PROMPT, 10)).expect("submit")).0, first);
}

#[test]
fn the_prompt_cache_reuses_prefixes_and_changes_nothing() {
    // Attention-only (the KV cache is cut back to the common prefix) and hybrid (the recurrent state cannot be
    // cut back: the session's live state or its end-of-prompt snapshot is reused). Every answer must equal what a
    // fresh engine gives for the same prompt.
    let dir = tempfile::tempdir().expect("tempdir");
    for (preset, format) in
        [(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0), (Preset::TinyQwen35Moe, SynthFormat::HfBf16)]
    {
        let path = dir.path().join(preset.name());
        let mut o = SynthOptions::new(preset, format, &path);
        o.progress = false;
        synth(&o).expect("synth");
        let index = TensorIndex::open(&path).expect("index");
        let start = |chunk: usize| {
            let m = Qwen3Moe::load(&index, &ModelOptions { threads: 1, ..ModelOptions::default() }).expect("load");
            let t = Tokenizer::from_index(&index).expect("tokenizer").expect("tokenizer");
            Engine::start(m, t, EngineOptions { ctx: 96, parallel: 1, prefill_chunk: chunk, ..Default::default() })
                .expect("start")
        };
        let base: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 900).collect();
        let ext: Vec<u32> = base.iter().copied().chain((0..8).map(|i| (i * 71 + 5) % 900)).collect();
        let turn: Vec<u32> = ext.iter().copied().chain([42, 43, 44]).collect();
        let fresh = |p: &[u32]| drain(start(256).submit(greedy(p, 10)).expect("submit")).0;
        let e = start(7);
        let cached = |e: &Engine| e.metrics().prompt_tokens_cached;
        let run = |p: &[u32]| {
            let before = cached(&e);
            let text = drain(e.submit(greedy(p, 10)).expect("submit")).0;
            (text, cached(&e) - before)
        };
        let name = preset.name();
        assert_eq!(run(&base), (fresh(&base), 0), "{name}: first request");
        // A longer prompt with the first as its prefix: the 20 tokens are not recomputed.
        assert_eq!(run(&ext), (fresh(&ext), base.len() as u64), "{name}: extended prompt");
        // The same prompt again: attention reuses all but its last token; a hybrid's state has moved past the
        // prompt (output tokens were fed back) and its snapshot covers the whole prompt, so it starts over.
        let again = if preset.is_hybrid() { 0 } else { ext.len() as u64 - 1 };
        assert_eq!(run(&ext), (fresh(&ext), again), "{name}: same prompt");
        // The next turn: the previous prompt is a prefix.
        assert_eq!(run(&turn), (fresh(&turn), ext.len() as u64), "{name}: next turn");
        // Unrelated: nothing to reuse.
        let other: Vec<u32> = (0..9).map(|i| (i * 13 + 600) % 900).collect();
        assert_eq!(run(&other), (fresh(&other), 0), "{name}: unrelated prompt");
    }
}
