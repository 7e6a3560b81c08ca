//! The engine thread: a bounded request queue, up to `parallel` active requests each with its own [`Session`],
//! served round robin one unit of work at a time (a prompt chunk or one decode token), so a long prompt delays
//! others by at most one chunk. Events go back on an unbounded channel per request; a dropped receiver (the
//! client went away) cancels the request at its next unit of work.
//!
//! Sessions (KV cache and scratch, sized by `ctx`) are allocated once at start and reused, so memory is fixed
//! up front and the per-token path does not allocate. No continuous batching: each unit of work is one
//! request's forward pass.
//!
//! **Prompt cache.** An idle session keeps the state of everything it last processed (`history`: the prompt and
//! the output tokens fed back). A new request goes to the idle session that can reuse the longest prefix of its
//! prompt, and only the rest is computed: the whole history when the prompt extends it (the next turn of a
//! chat), or, for attention-only models, the common prefix (the KV cache is cut back). Hybrid models keep a
//! recurrent state that cannot be cut back, so their sessions also keep a snapshot taken at the end of the last
//! prompt (SwiftLM turns prompt caching off for hybrids; we keep it). At least one prompt token is always
//! computed, for the logits that choose the first output token.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use moestream_chat::{Specials, StreamDecoder, Tokenizer};
use moestream_models::{Qwen3Moe, Session, SessionSnapshot};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::EngineError;
use crate::metrics::{Counters, EngineMetrics};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::{StopCheck, StopMatcher};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests generating at once (each holds a session of `ctx` positions).
    pub parallel: usize,
    /// Requests that may wait for a session; one more is refused with [`EngineError::QueueFull`].
    pub max_queued: usize,
    /// KV positions per session: prompt plus output.
    pub ctx: usize,
    /// Prompt tokens per unit of work (the fairness quantum between requests).
    pub prefill_chunk: usize,
    /// End-of-sequence ids beyond the model config's (e.g. from `generation_config.json`).
    pub extra_eos: Vec<u32>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { parallel: 4, max_queued: 64, ctx: 4096, prefill_chunk: 256, extra_eos: Vec::new() }
    }
}

/// One generation: prompt token ids and how to continue them.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Output tokens at most; `None` means until the context is full.
    pub max_tokens: Option<usize>,
    /// Stop strings, matched on the output text; the match is not emitted.
    pub stop: Vec<String>,
    /// Generate through end-of-sequence tokens (fixed-length outputs for benchmarks and tests).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Tokens sampled, including a final end-of-sequence token.
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New output text (never empty, never half a UTF-8 character, never part of a stop string).
    Text(String),
    /// The last event of a successful generation.
    Finish { reason: FinishReason, usage: Usage },
    /// The last event of a failed generation.
    Error(String),
}

/// Model facts the server reports and the memory plan printed at start.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub vocab_size: usize,
    pub ctx: usize,
    pub parallel: usize,
    pub max_queued: usize,
    pub eos_ids: Vec<u32>,
    /// Resident trunk bytes.
    pub trunk_bytes: u64,
    /// Expert slot cache bytes.
    pub expert_bytes: u64,
    /// KV cache bytes over all sessions.
    pub kv_bytes: u64,
    pub slots_per_layer: usize,
}

/// The receiving end of one generation. Dropping it cancels the generation.
pub struct Generation {
    pub id: u64,
    pub prompt_tokens: usize,
    rx: UnboundedReceiver<Event>,
}

/// A whole generation's result (see [`Generation::collect`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

impl Generation {
    /// The next event; `None` after the last one (or when the engine stopped).
    pub async fn next_event(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// As [`Generation::next_event`], for threads outside an async runtime.
    pub fn blocking_next_event(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// A generation that replays `events` (then ends), for testing code that consumes generations without a
    /// model.
    pub fn scripted(events: Vec<Event>) -> Self {
        let (tx, rx) = unbounded_channel();
        let prompt_tokens = events
            .iter()
            .find_map(|e| match e {
                Event::Finish { usage, .. } => Some(usage.prompt_tokens),
                _ => None,
            })
            .unwrap_or(0);
        for e in events {
            let _ = tx.send(e);
        }
        Generation { id: 0, prompt_tokens, rx }
    }

    /// Wait for the whole output.
    pub async fn collect(mut self) -> Result<Completed, EngineError> {
        let mut text = String::new();
        while let Some(e) = self.next_event().await {
            match e {
                Event::Text(t) => text.push_str(&t),
                Event::Finish { reason, usage } => return Ok(Completed { text, reason, usage }),
                Event::Error(m) => return Err(EngineError::Generation(m)),
            }
        }
        Err(EngineError::Stopped)
    }
}

struct Pending {
    id: u64,
    req: GenerationRequest,
    tx: UnboundedSender<Event>,
    submitted: Instant,
}

struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    wake: Condvar,
    stopped: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        // The queue is a plain VecDeque: a panic elsewhere cannot leave it half-updated.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine: owns the model on its own OS thread. Dropping it stops the thread.
pub struct Engine {
    shared: Arc<Shared>,
    model: Arc<Qwen3Moe>,
    tokenizer: Arc<Tokenizer>,
    info: EngineInfo,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Allocate `parallel` sessions of `ctx` positions and start the engine thread.
    pub fn start(model: Qwen3Moe, tokenizer: Tokenizer, opts: EngineOptions) -> Result<Engine, EngineError> {
        if opts.parallel == 0 {
            return Err(EngineError::Config("parallel must be at least 1".into()));
        }
        if opts.ctx < 2 {
            return Err(EngineError::Config(format!("ctx {} is too small (at least 2)", opts.ctx)));
        }
        let mut eos = model.config.eos_token_ids.clone();
        eos.extend(&opts.extra_eos);
        // Chat models end turns with these even where the config names only one.
        eos.extend(["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| tokenizer.token_id(t)));
        eos.sort_unstable();
        eos.dedup();
        let sessions: Vec<Session> = (0..opts.parallel).map(|_| model.new_session(opts.ctx)).collect();
        // A fresh session's state, restored into a session before each request: hybrids carry conv and recurrent
        // state that setting `pos = 0` would leak from one request into the next.
        let empty = sessions[0].snapshot();
        let info = EngineInfo {
            vocab_size: model.config.vocab_size,
            ctx: opts.ctx,
            parallel: opts.parallel,
            max_queued: opts.max_queued,
            eos_ids: eos.clone(),
            trunk_bytes: model.resident_bytes(),
            expert_bytes: model.expert_bytes(),
            kv_bytes: sessions.iter().map(Session::kv_bytes).sum(),
            slots_per_layer: model.slots_per_layer(),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let worker = Worker {
            shared: shared.clone(),
            model: model.clone(),
            tokenizer: tokenizer.clone(),
            eos,
            rewindable: !model.config.architecture.is_hybrid(),
            sessions: sessions
                .into_iter()
                .map(|session| Slot { session, history: Vec::with_capacity(opts.ctx), prompt_snap: None })
                .collect(),
            empty,
            active: Vec::with_capacity(opts.parallel),
            chunk: opts.prefill_chunk.max(1),
            vocab: model.config.vocab_size,
            ctx: opts.ctx,
        };
        let thread = std::thread::Builder::new()
            .name("moestream-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::Config(format!("spawning the engine thread: {e}")))?;
        Ok(Engine { shared, model, tokenizer, info, next_id: AtomicU64::new(1), thread: Some(thread) })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Counters since start, with the expert store's statistics.
    pub fn metrics(&self) -> EngineMetrics {
        let mut m = self.shared.counters.snapshot();
        m.store = Some(self.model.store_stats());
        m
    }

    /// Queue a generation. Fails at once on invalid input, a full queue or a stopped engine; never blocks.
    pub fn submit(&self, req: GenerationRequest) -> Result<Generation, EngineError> {
        let invalid = |param: &'static str, message: String| EngineError::InvalidRequest { param, message };
        req.sampling.validate().map_err(|(p, m)| invalid(p, m))?;
        if req.prompt.is_empty() {
            return Err(invalid("prompt", "the prompt is empty".into()));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(invalid(
                "prompt",
                format!("token id {t} is outside the vocabulary of {}", self.info.vocab_size),
            ));
        }
        if req.prompt.len() >= self.info.ctx {
            return Err(EngineError::ContextLength { prompt: req.prompt.len(), ctx: self.info.ctx });
        }
        if req.max_tokens == Some(0) {
            return Err(invalid("max_tokens", "must be at least 1".into()));
        }
        let c = &self.shared.counters;
        let (tx, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Relaxed);
        let prompt_tokens = req.prompt.len();
        {
            let mut q = self.shared.lock();
            if self.shared.stopped.load(Relaxed) {
                return Err(EngineError::Stopped);
            }
            // Active requests are counted under the same lock the engine admits under, so the bound is exact.
            if q.len() + c.active.load(Relaxed) as usize >= self.info.parallel + self.info.max_queued {
                c.rejected.fetch_add(1, Relaxed);
                return Err(EngineError::QueueFull { queued: q.len() });
            }
            q.push_back(Pending { id, req, tx, submitted: Instant::now() });
            c.queued.store(q.len() as u64, Relaxed);
            c.requests.fetch_add(1, Relaxed);
        }
        self.shared.wake.notify_one();
        Ok(Generation { id, prompt_tokens, rx })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        {
            let _q = self.shared.lock();
            self.shared.stopped.store(true, Relaxed);
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An idle (or active) session with what its state holds; see the module doc.
struct Slot {
    session: Session,
    /// The tokens whose state `session` holds, in order (`session.pos == history.len()`).
    history: Vec<u32>,
    /// Hybrids: the last prompt and the state right after it.
    prompt_snap: Option<(Vec<u32>, SessionSnapshot)>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Active {
    id: u64,
    tx: UnboundedSender<Event>,
    session: Session,
    history: Vec<u32>,
    prompt_snap: Option<(Vec<u32>, SessionSnapshot)>,
    prompt: Vec<u32>,
    prefilled: usize,
    sampler: Sampler,
    logits: Vec<f32>,
    decoder: StreamDecoder,
    stop: StopMatcher,
    max_new: usize,
    generated: usize,
    submitted: Instant,
    first_token: bool,
    ignore_eos: bool,
    /// A stop string ended the output (so nothing after it may be emitted).
    stop_hit: bool,
}

enum Outcome {
    Finished(FinishReason),
    Cancelled,
    Failed(String),
}

struct Worker {
    shared: Arc<Shared>,
    model: Arc<Qwen3Moe>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    sessions: Vec<Slot>,
    /// The state of a new session (see `Engine::start`).
    empty: SessionSnapshot,
    /// Whether sessions can be cut back to a prefix (no recurrent state).
    rewindable: bool,
    active: Vec<Active>,
    chunk: usize,
    vocab: usize,
    ctx: usize,
}

impl Worker {
    fn run(mut self) {
        let shared = self.shared.clone();
        // A bug must not leave clients waiting forever: on a panic, mark the engine stopped and drop every
        // request's sender, so each receiver sees the end of its stream.
        if std::panic::catch_unwind(AssertUnwindSafe(|| self.serve())).is_err() {
            tracing::error!("engine thread panicked; the engine is stopped");
        }
        let mut q = shared.lock();
        shared.stopped.store(true, Relaxed);
        q.clear();
    }

    fn serve(&mut self) {
        let shared = self.shared.clone();
        let c = &shared.counters;
        loop {
            {
                let mut q = shared.lock();
                loop {
                    if shared.stopped.load(Relaxed) {
                        return;
                    }
                    while !self.sessions.is_empty()
                        && let Some(p) = q.pop_front()
                    {
                        if p.tx.is_closed() {
                            c.cancelled.fetch_add(1, Relaxed);
                            continue;
                        }
                        let Some(slot) = self.take_slot(&p.req.prompt) else { break };
                        let a = self.admit(p, slot);
                        self.active.push(a);
                        c.active.store(self.active.len() as u64, Relaxed);
                    }
                    c.queued.store(q.len() as u64, Relaxed);
                    if !self.active.is_empty() {
                        break;
                    }
                    q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            }
            // One unit of work per active request, in admission order.
            let mut i = 0;
            while i < self.active.len() {
                match self.step(i) {
                    None => i += 1,
                    Some(outcome) => {
                        let a = self.active.remove(i);
                        self.finish(a, outcome);
                    }
                }
            }
        }
    }

    /// How many leading tokens of `prompt` `slot` could serve without recomputing them (see the module doc).
    fn reusable(&self, slot: &Slot, prompt: &[u32]) -> usize {
        let max = prompt.len().saturating_sub(1);
        let live = common_prefix(&slot.history, prompt);
        let mut best = if live == slot.history.len() || self.rewindable { live.min(max) } else { 0 };
        if let Some((p, _)) = &slot.prompt_snap
            && p.len() <= max
            && prompt.starts_with(p)
        {
            best = best.max(p.len());
        }
        best
    }

    /// The idle session that reuses the longest prefix of `prompt` (the most recently used on ties).
    fn take_slot(&mut self, prompt: &[u32]) -> Option<Slot> {
        let best = (0..self.sessions.len()).max_by_key(|&i| (self.reusable(&self.sessions[i], prompt), i))?;
        Some(self.sessions.swap_remove(best))
    }

    /// Bring `slot` to the state after `prompt[..n]` for the longest reusable `n` (0: a fresh session), and
    /// return `n`.
    fn reuse(&self, slot: &mut Slot, prompt: &[u32]) -> usize {
        let n = self.reusable(slot, prompt);
        let live = common_prefix(&slot.history, prompt).min(n);
        // The session already holds the prefix: continue (cut back first if it holds more and can be cut).
        let mut restored = n > 0 && live == n && slot.session.rewind(n).is_ok();
        if restored {
            slot.history.truncate(n);
        } else if let Some((p, snap)) = slot.prompt_snap.as_ref().filter(|(p, _)| n > 0 && p.len() == n) {
            restored = slot.session.restore(snap).is_ok();
            if restored {
                slot.history.clear();
                slot.history.extend_from_slice(p);
            }
        }
        if restored {
            return n;
        }
        if let Err(e) = slot.session.restore(&self.empty) {
            // Cannot happen (the snapshot comes from a session of this model); keep serving regardless.
            tracing::error!("resetting a session: {e}");
            slot.session.pos = 0;
        }
        slot.history.clear();
        0
    }

    fn admit(&self, p: Pending, mut slot: Slot) -> Active {
        let cached = self.reuse(&mut slot, &p.req.prompt);
        self.shared.counters.prompt_tokens_cached.fetch_add(cached as u64, Relaxed);
        let Slot { session, history, prompt_snap } = slot;
        let room = self.ctx.saturating_sub(p.req.prompt.len());
        let max_new = p.req.max_tokens.unwrap_or(room).min(room).max(1);
        self.shared.counters.prompt_tokens.fetch_add(p.req.prompt.len() as u64, Relaxed);
        Active {
            id: p.id,
            sampler: Sampler::new(p.req.sampling, self.vocab, &p.req.prompt, max_new),
            tx: p.tx,
            session,
            history,
            prompt_snap,
            prompt: p.req.prompt,
            prefilled: cached,
            logits: Vec::with_capacity(self.vocab),
            // Special tokens (`<|im_end|>`) are control, not text; Qwen3's `<think>` and `<tool_call>` are not
            // special and stay for the server's output parser.
            decoder: StreamDecoder::with_specials(Specials::Skip),
            stop: StopMatcher::new(&p.req.stop),
            max_new,
            generated: 0,
            submitted: p.submitted,
            first_token: false,
            ignore_eos: p.req.ignore_eos,
            stop_hit: false,
        }
    }

    /// One unit of work for active request `i`: a prompt chunk (sampling the first token when the prompt is
    /// done) or one decode token. `Some` when the request is over.
    fn step(&mut self, i: usize) -> Option<Outcome> {
        let c = &self.shared.counters;
        let a = &mut self.active[i];
        if a.tx.is_closed() {
            return Some(Outcome::Cancelled);
        }
        if a.prefilled < a.prompt.len() {
            let t0 = Instant::now();
            let end = (a.prefilled + self.chunk).min(a.prompt.len());
            if let Err(e) = self.model.forward(&mut a.session, &a.prompt[a.prefilled..end], false, &mut a.logits) {
                return Some(Outcome::Failed(e.to_string()));
            }
            a.history.extend_from_slice(&a.prompt[a.prefilled..end]);
            a.prefilled = end;
            c.prefill_us.fetch_add(t0.elapsed().as_micros() as u64, Relaxed);
            if a.prefilled < a.prompt.len() {
                return None;
            }
            if !self.rewindable && a.prompt_snap.as_ref().is_none_or(|(p, _)| *p != a.prompt) {
                // Once per request, not per token: the state a later prompt with this prefix can start from.
                a.prompt_snap = Some((a.prompt.clone(), a.session.snapshot()));
            }
        }
        let t0 = Instant::now();
        let tok = a.sampler.sample(&mut a.logits);
        a.sampler.accept(tok);
        a.generated += 1;
        c.generated_tokens.fetch_add(1, Relaxed);
        if !a.first_token {
            a.first_token = true;
            c.observe_ttft(a.submitted.elapsed().as_secs_f64());
        }
        if !a.ignore_eos && self.eos.contains(&tok) {
            return Some(Outcome::Finished(FinishReason::Stop));
        }
        let delta = match a.decoder.push(&self.tokenizer, tok) {
            Ok(d) => d,
            Err(e) => return Some(Outcome::Failed(e.to_string())),
        };
        match a.stop.push(&delta) {
            StopCheck::Continue(text) => send_text(&a.tx, text),
            StopCheck::Stop(text) => {
                send_text(&a.tx, text);
                a.stop_hit = true;
                return Some(Outcome::Finished(FinishReason::Stop));
            }
        }
        if a.generated >= a.max_new {
            return Some(Outcome::Finished(FinishReason::Length));
        }
        if let Err(e) = self.model.forward(&mut a.session, &[tok], false, &mut a.logits) {
            return Some(Outcome::Failed(e.to_string()));
        }
        a.history.push(tok);
        c.decode_us.fetch_add(t0.elapsed().as_micros() as u64, Relaxed);
        c.decode_tokens.fetch_add(1, Relaxed);
        None
    }

    fn finish(&mut self, mut a: Active, outcome: Outcome) {
        let c = &self.shared.counters;
        let usage = Usage { prompt_tokens: a.prompt.len(), completion_tokens: a.generated };
        match outcome {
            Outcome::Finished(mut reason) => {
                // Bytes the decoder held (an incomplete character at the very end) still go through the stop
                // matcher, unless a stop string already ended the output.
                if reason == FinishReason::Length || !a.stop_hit {
                    match a.decoder.finish(&self.tokenizer).map(|t| a.stop.push(&t)) {
                        Ok(StopCheck::Continue(t)) => send_text(&a.tx, t),
                        Ok(StopCheck::Stop(t)) => {
                            send_text(&a.tx, t);
                            reason = FinishReason::Stop;
                        }
                        Err(e) => tracing::warn!(id = a.id, "decoding the output's tail: {e}"),
                    }
                }
                send_text(&a.tx, a.stop.flush());
                let _ = a.tx.send(Event::Finish { reason, usage });
                match reason {
                    FinishReason::Stop => c.finished_stop.fetch_add(1, Relaxed),
                    FinishReason::Length => c.finished_length.fetch_add(1, Relaxed),
                };
            }
            Outcome::Cancelled => {
                tracing::debug!(id = a.id, generated = a.generated, "request cancelled: client went away");
                c.cancelled.fetch_add(1, Relaxed);
            }
            Outcome::Failed(msg) => {
                tracing::warn!(id = a.id, "generation failed: {msg}");
                let _ = a.tx.send(Event::Error(msg));
                c.failed.fetch_add(1, Relaxed);
                // The state may be half-updated: forget it, so the next request starts fresh.
                a.history.clear();
                a.prompt_snap = None;
            }
        }
        self.sessions.push(Slot { session: a.session, history: a.history, prompt_snap: a.prompt_snap });
        c.active.store(self.active.len() as u64, Relaxed);
    }
}

fn send_text(tx: &UnboundedSender<Event>, text: String) {
    if !text.is_empty() {
        // A closed receiver is noticed (and the request cancelled) at the next unit of work.
        let _ = tx.send(Event::Text(text));
    }
}
