//! `moestream`: the command-line front end. Each subcommand parses flags, calls a library crate and prints; the
//! logic lives in the crates (`format`, `synth`, …), so that tests and the server reach the same code.

mod bench;
mod info;
mod inspect;
mod serve;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "moestream", version, about = "Run Mixture-of-Experts LLMs bigger than memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic random-weight model of a real shape.
    Synth {
        /// tiny-qwen3-moe | qwen3-30b-a3b
        #[arg(long)]
        preset: String,
        /// hf-bf16 | hf-f32 | mlx-q4 | mlx-q8 | gguf-q4_0 | gguf-q8_0 | gguf-f16
        #[arg(long)]
        format: String,
        /// Output directory (HF/MLX) or .gguf file.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep the preset's width but use this many layers.
        #[arg(long)]
        layers: Option<usize>,
        /// HF expert layout: per-expert (published Qwen3 checkpoints) or fused (transformers 5 gate_up_proj).
        #[arg(long, default_value = "per-expert")]
        expert_layout: String,
        /// Largest safetensors shard, in MiB.
        #[arg(long, default_value_t = 4096)]
        shard_mib: u64,
        /// synthetic (a small byte-level BPE) | qwen3 (Qwen3's real tokenizer and chat template; the vocabulary
        /// grows to 151,936).
        #[arg(long, default_value = "synthetic")]
        tokenizer: String,
        /// Expert popularity: 0 (default) leaves routing to the random weights; S > 0 gives each MoE layer
        /// Zipf-like popular experts through the weights alone. On the qwen3-30b-a3b shape with random decode
        /// input, 1 repeats 63% of a token's top-8 at the next token, 0 repeats 47% (deep random layers converge;
        /// uniform would be 6%). Recorded in the file (`moestream.routing_skew`).
        #[arg(long, default_value_t = 0.0)]
        routing_skew: f32,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Describe a model: architecture, sizes, quant types, resident vs expert bytes.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also list every tensor.
        #[arg(long)]
        tensors: bool,
    },
    /// Dry run: the memory plan and the expected expert reads per decode token for an expert budget, from the
    /// model's index alone (no weights are loaded).
    Info {
        model: PathBuf,
        /// Expert cache budget: `all`, or a size such as `6GiB` (split over the MoE layers).
        #[arg(long, default_value = "all")]
        expert_cache: String,
        /// Expert slots per MoE layer, instead of a byte budget.
        #[arg(long, env = "MLX_MOE_CACHE_SLOTS")]
        cache_slots: Option<usize>,
        /// Plan a byte budget as each MoE layer's own slots (the engine flag of the same name), not one shared pool.
        #[arg(long)]
        per_layer_slots: bool,
        /// Context positions to size the KV cache for.
        #[arg(long, default_value_t = 4096)]
        ctx: usize,
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode: tok/s, time to first token, expert-cache hit rate, bytes read per token and read
    /// latency, cold (fresh model, page cache dropped when root) and warm, median and spread over repeats.
    Bench {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// What each warm run decodes: `same` repeats the cold run's prompt (the expert cache then holds exactly
        /// what it will ask for, if its working set fits), `other` starts from a different prompt (a cache warmed
        /// by other work).
        #[arg(long, default_value = "same", value_parser = ["same", "other"])]
        warm_prompt: String,
        /// The token fed at each decode step: `greedy` feeds back the argmax, `random` feeds the next ids of the
        /// prompt's pseudo-random sequence whatever the logits say (llama-bench's `tg` feeds random ids too).
        /// Greedy decoding of random weights can settle into repeating one token, which makes routing repeat
        /// itself; `random` keeps a fixed, varied input for comparisons across engines and files.
        #[arg(long, default_value = "greedy", value_parser = ["greedy", "random"])]
        decode_input: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Print the logits of every position of a token sequence as JSON: {"tokens": [...], "logits": [[...], ...]}.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Generate greedily from a prompt, streaming text (or ids when the model has no tokenizer); ends with tok/s.
    Run {
        #[arg(long)]
        model: PathBuf,
        /// Prompt text (needs the model's tokenizer).
        #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
        prompt: Option<String>,
        /// Comma-separated prompt token ids.
        #[arg(long, value_delimiter = ',')]
        tokens: Vec<u32>,
        /// Tokens to generate.
        #[arg(short = 'n', long, default_value_t = 32)]
        n: usize,
        /// Write the routing trace (every token's top-k expert ids per MoE layer) as JSON, for cache studies.
        #[arg(long)]
        trace_out: Option<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Write the expert-major sidecar: each (layer, expert) one aligned slab, so that a miss is one read.
    Pack {
        model: PathBuf,
        /// Default: X.gguf.moestream-pack next to a GGUF, DIR/model.moestream-pack in a safetensors directory
        /// (the only places `open` looks).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// How expert data is stored: `packed` (Q4_0/Q4_K/Q6_K in the 16-row form the x86 int8 kernels read, so a
        /// miss is read straight into its slot), `file` (the model's bytes), or `auto` (packed where this
        /// machine's kernels use the packed form).
        #[arg(long, default_value = "auto", value_parser = ["auto", "packed", "file"])]
        layout: String,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions, streaming).
    Serve(serve::ServeArgs),
    /// Print the token ids of TEXT under the model's tokenizer.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        /// JSON `{"tokens": [...], "pieces": [...]}` instead of space-separated ids.
        #[arg(long)]
        json: bool,
        text: String,
    },
    /// Dequantize one tensor (or one expert of a stack) to raw little-endian f32, for checks against other tools.
    Dequant {
        model: PathBuf,
        /// Canonical (GGUF-style) tensor name, e.g. blk.0.ffn_gate_exps.weight.
        tensor: String,
        #[arg(long)]
        expert: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct EngineArgs {
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Lossy: route each token to N experts instead of the model's top-k.
    #[arg(long, env = "SWIFTLM_TOP_K")]
    top_k: Option<usize>,
    /// Quantize activations to 8 bits for integer dot products (faster on 4-bit weights, slightly different
    /// logits; llama.cpp always does this).
    #[arg(long)]
    q8_activations: bool,
    /// With --q8-activations: keep Q4_0, Q4_K and Q6_K matrices row-major instead of regrouping them 16 rows at a
    /// time for the packed kernels (AVX-512 VNNI / AMX: all three; AVX2: Q4_0) (for comparison; same values, summed
    /// in another order).
    #[arg(long)]
    no_pack: bool,
    /// Prompt tokens per prefill pass: each pass reads every expert its tokens use once, so longer passes give
    /// the int8 GEMMs more tokens per expert; the session's scratch grows with it.
    #[arg(long, default_value_t = moestream_models::DEFAULT_PREFILL_CHUNK as u32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    prefill_chunk: u32,
    /// Expert cache size: `all` (every expert resident) or a byte budget such as `6GiB`, `512MiB`, split evenly
    /// over the MoE layers. The minimum is top-k slots per layer.
    #[arg(long, default_value = "all")]
    expert_cache: String,
    /// Expert slots per MoE layer (overrides --expert-cache).
    #[arg(long, env = "MLX_MOE_CACHE_SLOTS")]
    cache_slots: Option<usize>,
    /// Decode a token's experts with k per-expert calls instead of one gathered call per projection (for
    /// comparison; same results). `MLX_MOE_STACKED=0` does the same.
    #[arg(long)]
    no_stacked: bool,
    /// Walk gate and up separately instead of as one fused `[2·I, H]` matrix (same results).
    /// `MLX_MOE_FUSE_GATEUP=0` does the same.
    #[arg(long)]
    no_fuse_gate_up: bool,
    /// Read experts with O_DIRECT (the default where the filesystem allows it; otherwise buffered, with a warning).
    #[arg(long, overrides_with = "no_direct_io")]
    direct_io: bool,
    /// Read experts through the page cache instead.
    #[arg(long, overrides_with = "direct_io")]
    no_direct_io: bool,
    /// Concurrent expert reads (queue depth).
    #[arg(long, default_value_t = 8)]
    io_threads: usize,
    /// Split an `--expert-cache` byte budget evenly over the MoE layers instead of one slot pool that all layers
    /// share (the default: a miss evicts the least useful expert of any layer).
    #[arg(long)]
    per_layer_slots: bool,
    /// Expert cache eviction: `lfu:HALF_LIFE` (LFU with aging, half-life in tokens; the default `lfu:16`) or
    /// `lru`.
    #[arg(long, default_value = "lfu:16")]
    eviction: String,
    /// Context capacity of the session (KV cache positions).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Decode-time expert prefetch for the next MoE layer: `none`, `prev` (the previous token's experts) or
    /// `lookahead` (the next router applied early). Never changes outputs.
    #[arg(long, default_value = "none")]
    prefetch: String,
}

impl EngineArgs {
    fn load(&self, model: &std::path::Path) -> Result<moestream_models::Qwen3Moe> {
        let index = moestream_format::TensorIndex::open(model)?;
        self.load_index(&index, model)
    }

    fn load_index(
        &self,
        index: &moestream_format::TensorIndex,
        model: &std::path::Path,
    ) -> Result<moestream_models::Qwen3Moe> {
        index.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
        let mut opts = moestream_models::ModelOptions::default();
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        opts.top_k = self.top_k;
        opts.q8_activations = self.q8_activations;
        opts.pack = !self.no_pack;
        opts.prefill_chunk = self.prefill_chunk as usize;
        let env_off = |name: &str| std::env::var(name).is_ok_and(|v| matches!(v.trim(), "0" | "false" | "no" | "off"));
        opts.moe_kernels = moestream_models::MoeKernels {
            stacked: !(self.no_stacked || env_off("MLX_MOE_STACKED")),
            fuse_gate_up: !(self.no_fuse_gate_up || env_off("MLX_MOE_FUSE_GATEUP")),
        };
        opts.read = moestream_store::ReadOptions {
            direct_io: !self.no_direct_io,
            io_threads: self.io_threads.max(1),
            ..moestream_store::ReadOptions::default()
        };
        opts.shared_expert_pool = !self.per_layer_slots;
        opts.eviction = moestream_store::EvictionPolicy::parse(&self.eviction)
            .with_context(|| format!("--eviction `{}`: expected `lru` or `lfu:N`", self.eviction))?;
        opts.prefetch = moestream_models::Prefetch::parse(&self.prefetch)
            .with_context(|| format!("--prefetch `{}`: expected none, prev or lookahead", self.prefetch))?;
        opts.expert_cache = match self.cache_slots {
            Some(n) => moestream_store::CacheSize::Slots(n),
            None => parse_cache_size(&self.expert_cache)?,
        };
        let m =
            moestream_models::Qwen3Moe::load(index, &opts).with_context(|| format!("loading {}", model.display()))?;
        if let Some(k) = self.top_k.filter(|&k| k != m.config.num_experts_per_tok) {
            eprintln!(
                "warning: --top-k {k} overrides the model's top-{}: outputs are approximate (lossy)",
                m.config.num_experts_per_tok
            );
        }
        Ok(m)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// "routing reuse NN% (uniform k/E NN%)", with the synthetic skew when the file records one.
fn routing_reuse_text(m: &moestream_models::Qwen3Moe, r: moestream_models::RoutingReuse, skew: Option<f32>) -> String {
    let uniform = 100.0 * m.top_k() as f64 / m.config.num_experts.max(1) as f64;
    let reuse = if r.choices == 0 { "n/a".to_string() } else { format!("{:.1}%", 100.0 * r.rate()) };
    let skew = skew.map(|s| format!(", synthetic routing skew {s}")).unwrap_or_default();
    format!("routing reuse {reuse} (uniform {uniform:.1}%{skew})")
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // Library crates log through `tracing`; RUST_LOG=debug shows, for example, cancelled requests.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    match cli.command {
        Command::Synth {
            preset,
            format,
            out,
            seed,
            layers,
            expert_layout,
            shard_mib,
            tokenizer,
            routing_skew,
            quiet,
        } => {
            let preset = moestream_synth::Preset::from_name(&preset).with_context(|| {
                let names: Vec<_> = moestream_synth::Preset::ALL.iter().map(|p| p.name()).collect();
                format!("unknown preset `{preset}` (known: {})", names.join(", "))
            })?;
            let format = moestream_synth::SynthFormat::from_name(&format).with_context(|| {
                let names: Vec<_> = moestream_synth::SynthFormat::ALL.iter().map(|f| f.name()).collect();
                format!("unknown format `{format}` (known: {})", names.join(", "))
            })?;
            let expert_layout = match expert_layout.as_str() {
                "per-expert" => moestream_synth::ExpertLayout::PerExpert,
                "fused" => moestream_synth::ExpertLayout::Fused,
                other => bail!("unknown expert layout `{other}` (known: per-expert, fused)"),
            };
            let tokenizer = moestream_synth::SynthTokenizer::from_name(&tokenizer).with_context(|| {
                let names: Vec<_> = moestream_synth::SynthTokenizer::ALL.iter().map(|t| t.name()).collect();
                format!("unknown tokenizer `{tokenizer}` (known: {})", names.join(", "))
            })?;
            if shard_mib == 0 {
                bail!("--shard-mib must be positive");
            }
            let mut opts = moestream_synth::SynthOptions::new(preset, format, out);
            opts.seed = seed;
            opts.layers = layers;
            opts.expert_layout = expert_layout;
            opts.shard_bytes = shard_mib << 20;
            opts.tokenizer = tokenizer;
            opts.routing_skew = routing_skew;
            opts.progress = !quiet;
            let t0 = std::time::Instant::now();
            let s = moestream_synth::synth(&opts).with_context(|| format!("synth {}", opts.out.display()))?;
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "wrote {} ({} {}, {} layers, {} tensors, {:.2} GB in {} file(s), {:.1}s, {:.0} MB/s); weights are random",
                s.path.display(),
                preset.name(),
                format.name(),
                s.config.num_layers,
                s.tensors,
                s.bytes as f64 / 1e9,
                s.files.len(),
                secs,
                s.bytes as f64 / 1e6 / secs.max(1e-9)
            );
        }
        Command::Inspect { model, json, tensors } => inspect::run(&model, json, tensors)?,
        Command::Bench { model, prompt_tokens, gen_tokens, repeat, warm_prompt, decode_input, json, engine } => {
            let load = || engine.load(&model);
            let routing_skew = moestream_format::TensorIndex::open(&model)?.synthetic_routing_skew();
            let args = bench::BenchArgs {
                prompt_tokens,
                gen_tokens,
                repeat,
                ctx: engine.ctx,
                routing_skew,
                warm_other_prompt: warm_prompt == "other",
                random_decode_input: decode_input == "random",
                load: &load,
            };
            bench::run(&args, json)?
        }
        Command::Info { model, expert_cache, cache_slots, per_layer_slots, ctx, json } => {
            let size = match cache_slots {
                Some(n) => moestream_store::CacheSize::Slots(n),
                None => parse_cache_size(&expert_cache)?,
            };
            info::run(&model, size, per_layer_slots, ctx, json)?
        }
        Command::Logits { model, tokens, engine } => {
            let m = engine.load(&model)?;
            let mut sess = m.new_session(engine.ctx.max(tokens.len()));
            let mut out = Vec::new();
            m.forward(&mut sess, &tokens, true, &mut out)?;
            let v = m.config.vocab_size;
            let rows: Vec<&[f32]> = out.chunks(v).collect();
            println!("{}", serde_json::json!({"tokens": tokens, "logits": rows}));
        }
        Command::Run { model, prompt, tokens, n, trace_out, engine } => {
            use std::io::Write;
            let index = moestream_format::TensorIndex::open(&model)?;
            let tok = moestream_chat::Tokenizer::from_index(&index)?;
            let tokens = match (&prompt, &tok) {
                (Some(p), Some(t)) => t.encode(p)?,
                (Some(_), None) => bail!("{} has no tokenizer: pass --tokens instead of --prompt", model.display()),
                (None, _) => tokens,
            };
            if tokens.is_empty() {
                bail!("the prompt is empty");
            }
            let m = engine.load(&model)?;
            let mut sess = m.new_session(engine.ctx.max(tokens.len() + n));
            if trace_out.is_some() {
                sess.enable_trace();
            }
            let mut logits = Vec::with_capacity(m.config.vocab_size);
            let t0 = std::time::Instant::now();
            m.forward(&mut sess, &tokens, false, &mut logits)?;
            let prefill = t0.elapsed().as_secs_f64();
            let after_prefill = m.store_stats();
            let t1 = std::time::Instant::now();
            let mut out = std::io::stdout().lock();
            let mut stream = moestream_chat::StreamDecoder::new();
            for i in 0..n {
                let next = moestream_cpu::ops::argmax(&logits);
                match &tok {
                    Some(t) => write!(out, "{}", stream.push(t, next)?)?,
                    None => write!(out, "{next}{}", if i + 1 < n { "," } else { "" })?,
                }
                out.flush()?;
                if i + 1 < n {
                    m.forward(&mut sess, &[next], false, &mut logits)?;
                }
            }
            if let Some(t) = &tok {
                write!(out, "{}", stream.finish(t)?)?;
            }
            writeln!(out)?;
            let decode = t1.elapsed().as_secs_f64();
            if let (Some(p), Some(tr)) = (&trace_out, sess.trace()) {
                let c = &m.config;
                let moe_layers = (0..c.num_layers).filter(|&l| c.layer_is_moe(l)).count();
                let j = serde_json::json!({
                    "model": model.display().to_string(),
                    "num_experts": c.num_experts,
                    "top_k": m.top_k(),
                    "moe_layers": moe_layers,
                    "prompt_tokens": tokens.len(),
                    "layout": "tokens × moe_layers × top_k",
                    "experts": tr,
                });
                std::fs::write(p, j.to_string()).with_context(|| format!("writing {}", p.display()))?;
            }
            let st = m.store_stats();
            eprintln!(
                "memory: peak RSS {:.1} MB = trunk {:.1} MB + expert slots {:.1} MB + KV {:.1} MB + {:.1} MB other",
                peak_rss_bytes() as f64 / 1e6,
                m.resident_bytes() as f64 / 1e6,
                m.expert_bytes() as f64 / 1e6,
                sess.kv_bytes() as f64 / 1e6,
                (peak_rss_bytes() as f64 - (m.resident_bytes() + m.expert_bytes() + sess.kv_bytes()) as f64) / 1e6,
            );
            let direct = st.direct_io.iter().filter(|&&d| d).count();
            eprintln!(
                "expert cache: {} slots/layer{} ({:.2} GB, {} eviction); hit rate {:.1}% ({} hits, {} misses); {}; \
                 read {:.1} MB ({:.1} MB from disk) in {} reads, {} batches, O_DIRECT on {}/{} files; expert read \
                 latency p50 {} us, p99 {} us",
                m.slots_per_layer(),
                if m.expert_pool_shared() { " on average, one pool shared by all layers" } else { "" },
                m.expert_bytes() as f64 / 1e9,
                engine.eviction,
                100.0 * st.hit_rate(),
                st.hits,
                st.misses,
                routing_reuse_text(&m, sess.routing_reuse(), index.synthetic_routing_skew()),
                st.bytes_read as f64 / 1e6,
                st.bytes_read_disk as f64 / 1e6,
                st.reads,
                st.read_batches,
                direct,
                st.direct_io.len(),
                st.latency_percentile_us(50.0),
                st.latency_percentile_us(99.0),
            );
            let steps = n.saturating_sub(1).max(1) as f64;
            eprintln!(
                "decode I/O stall per token: {:.1} ms on demand reads + {:.1} ms waiting for prefetch ({:.1} ms of \
                 {:.1} ms per token)",
                (st.read_wait_us - after_prefill.read_wait_us) as f64 / 1e3 / steps,
                (st.prefetch_wait_us - after_prefill.prefetch_wait_us) as f64 / 1e3 / steps,
                (st.stall_us() - after_prefill.stall_us()) as f64 / 1e3 / steps,
                decode * 1e3 / steps,
            );
            if engine.prefetch != "none" {
                eprintln!(
                    "prefetch {}: {} experts read ahead ({:.1} MB), {} used, {} wasted; {} withdrawn before their \
                     read started, {} guesses dropped (the previous one still on the disk); waited {:.1} ms on \
                     prefetch",
                    engine.prefetch,
                    st.prefetch_reads,
                    st.prefetch_bytes as f64 / 1e6,
                    st.prefetch_hits,
                    st.prefetch_wasted,
                    st.prefetch_cancelled,
                    st.prefetch_skipped,
                    st.prefetch_wait_us as f64 / 1e3,
                );
            }
            eprintln!(
                "prefill {} tokens: {:.2} tok/s; decode {} tokens: {:.2} tok/s{}",
                tokens.len(),
                tokens.len() as f64 / prefill.max(1e-9),
                n,
                (n.saturating_sub(1)) as f64 / decode.max(1e-9),
                if engine.top_k.is_some() { " (lossy --top-k)" } else { "" }
            );
        }
        Command::Pack { model, out, quiet, layout } => {
            use moestream_format::pack::Layout;
            let index = moestream_format::TensorIndex::open_without_pack(&model)?;
            let out = out.unwrap_or_else(|| moestream_format::pack::default_path(&index));
            let auto = inspect::auto_layout(&index);
            let layout = match layout.as_str() {
                "packed" => Layout::Packed,
                "file" => Layout::File,
                _ => auto,
            };
            if layout == Layout::Packed && auto != Layout::Packed {
                eprintln!(
                    "warning: this machine's kernels read some of this model's experts row-major, so their misses from a packed sidecar are \
                     unpacked on the way in; `--layout file` (or auto) reads faster here"
                );
            }
            let t0 = std::time::Instant::now();
            let s = moestream_format::pack::write_with(&index, &out, !quiet, layout)?;
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "wrote {} (layout {}, {:.2} GB: {} slabs in {} MoE layers, {:.2} GB of experts, {:.1}s, {:.0} MB/s)",
                s.path.display(),
                layout.name(),
                s.bytes as f64 / 1e9,
                s.slabs,
                s.layers,
                s.payload_bytes as f64 / 1e9,
                secs,
                s.bytes as f64 / 1e6 / secs.max(1e-9)
            );
        }
        Command::Serve(args) => serve::run(args)?,
        Command::Tokenize { model, json, text } => {
            let index = moestream_format::TensorIndex::open(&model)?;
            let tok = moestream_chat::Tokenizer::from_index(&index)?
                .with_context(|| format!("{} has no tokenizer", model.display()))?;
            let ids = tok.encode(&text)?;
            if json {
                let pieces = ids.iter().map(|&i| tok.decode(&[i])).collect::<Result<Vec<_>, _>>()?;
                println!("{}", serde_json::json!({"tokens": ids, "pieces": pieces}));
            } else {
                let s: Vec<String> = ids.iter().map(u32::to_string).collect();
                println!("{}", s.join(" "));
            }
        }
        Command::Dequant { model, tensor, expert, out } => {
            let index = moestream_format::TensorIndex::open(&model)?;
            let vals = match expert {
                Some(e) => index.load_expert_f32(&tensor, e)?,
                None => index.load_f32(&tensor)?,
            };
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
        }
    }
    Ok(())
}

/// `all`, or a size with an optional unit (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB; decimal or binary).
fn parse_cache_size(s: &str) -> Result<moestream_store::CacheSize> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(moestream_store::CacheSize::All);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("--expert-cache `{s}`: expected `all` or a size like 6GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "gb" | "g" => 1e9,
        "gib" => (1u64 << 30) as f64,
        "tb" | "t" => 1e12,
        "tib" => (1u64 << 40) as f64,
        other => bail!("--expert-cache `{s}`: unknown unit `{other}`"),
    };
    if !(v.is_finite() && v > 0.0) {
        bail!("--expert-cache `{s}` must be positive");
    }
    Ok(moestream_store::CacheSize::Bytes((v * mult) as u64))
}

/// Peak resident set size of this process (`VmHWM`), 0 where /proc is unavailable.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
