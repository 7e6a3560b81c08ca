//! `moestream serve`: load a model (or make the default synthetic one), start the engine thread and the HTTP
//! server. Flags and printing only; the engine and the routes live in `moestream-engine` and `moestream-server`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::EngineArgs;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// GGUF file or safetensors directory. Without it, a small synthetic model with random weights is made once
    /// in the user cache directory and served (for trying the API, not for answers).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the `listening on` line says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "MOESTREAM_API_KEY")]
    pub api_key: Option<String>,
    /// Allow cross-origin requests from any origin (browser clients).
    #[arg(long)]
    pub cors: bool,
    /// Requests generating at once, each with its own KV cache of --ctx positions; others wait in the queue.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests that may wait for a free slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 64)]
    pub max_queued: usize,
    /// The model id in responses and /v1/models (default: the model's file or directory name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Where the default synthetic model lives.
fn default_model_path() -> Result<PathBuf> {
    let base = dirs::cache_dir().context("no user cache directory (set XDG_CACHE_HOME or HOME)")?;
    Ok(base.join("moestream").join("default-model").join("tiny-qwen3-moe-q8_0-qwen3-tokenizer.gguf"))
}

/// The default model: reused when it opens cleanly, else written again (to a temporary name, then renamed, so
/// an interrupted write is never mistaken for a model).
fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path()?;
    if moestream_format::TensorIndex::open(&path).is_ok() {
        return Ok(path);
    }
    let dir = path.parent().context("default model path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".partial-{}.gguf", std::process::id()));
    eprintln!("writing the default synthetic model to {} (once)", path.display());
    let mut opts = moestream_synth::SynthOptions::new(
        moestream_synth::Preset::TinyQwen3Moe,
        moestream_synth::SynthFormat::GgufQ8_0,
        &tmp,
    );
    // Qwen3's real tokenizer and chat template, so prompts, tools and thinking go through the real code paths.
    opts.tokenizer = moestream_synth::SynthTokenizer::Qwen3;
    moestream_synth::synth(&opts).with_context(|| format!("synth {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(path)
}

fn spinner(msg: String) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
        pb.set_style(style);
    }
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb.set_message(msg);
    pb
}

pub fn run(a: ServeArgs) -> Result<()> {
    let (model_path, synthetic) = match &a.model {
        Some(p) => (p.clone(), false),
        None => (ensure_default_model()?, true),
    };
    if synthetic {
        eprintln!(
            "no --model given: serving the synthetic tiny-qwen3-moe (Qwen3 tokenizer and chat template) at {}. ITS \
             WEIGHTS ARE RANDOM: the API works, the answers are meaningless.",
            model_path.display()
        );
    }
    let pb = spinner(format!("opening {}", model_path.display()));
    let index = moestream_format::TensorIndex::open(&model_path)?;
    let (tokenizer, template) = match moestream_chat::Tokenizer::from_index(&index)? {
        Some(t) => (t, moestream_chat::ChatTemplate::from_index(&index)?),
        None => embedded_qwen3(&model_path, index.config.vocab_size)?,
    };
    let generation = moestream_format::generation::GenerationConfig::read(&index.root)?;
    if template.is_none() {
        eprintln!("warning: {} has no chat template; chat prompts use plain ChatML", model_path.display());
    }
    pb.set_message(format!("loading trunk and expert cache of {}", model_path.display()));
    let model = a.engine.load_index(&index, &model_path)?;
    pb.set_message(format!("allocating {} sessions of {} positions", a.parallel, a.engine.ctx));
    let opts = moestream_engine::EngineOptions {
        parallel: a.parallel,
        max_queued: a.max_queued,
        ctx: a.engine.ctx,
        extra_eos: generation.eos_token_ids,
        ..Default::default()
    };
    let engine = Arc::new(moestream_engine::Engine::start(model, tokenizer, opts)?);
    pb.finish_and_clear();
    let i = engine.info();
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "memory plan: trunk {:.0} MB + expert cache {:.0} MB ({} slots/layer) + KV {:.0} MB ({} sessions × {} \
         positions) = {:.0} MB",
        mb(i.trunk_bytes),
        mb(i.expert_bytes),
        i.slots_per_layer,
        mb(i.kv_bytes),
        i.parallel,
        i.ctx,
        mb(i.trunk_bytes + i.expert_bytes + i.kv_bytes)
    );
    let name = a.model_name.clone().unwrap_or_else(|| model_name(&model_path));
    let server_opts = moestream_server::ServerOptions {
        model_name: name.clone(),
        api_key: a.api_key.clone(),
        cors: a.cors,
        max_body_bytes: a.max_body_bytes,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        // The engine and compute threads do the heavy work; the runtime only moves bytes.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        // Scripts (and tests/python) read this line to find the port.
        println!("listening on http://{local} (model `{name}`; OpenAI API under /v1)");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        moestream_server::serve(listener, moestream_server::router(engine, template, server_opts)).await?;
        anyhow::Ok(())
    })
}

/// Qwen3's tokenizer and chat template, built into the binary (`assets/qwen3-tokenizer/`), for a Qwen3 checkpoint
/// that ships weights only. Refused when the model's vocabulary is smaller than the tokenizer's.
fn embedded_qwen3(
    model: &Path,
    vocab: usize,
) -> Result<(moestream_chat::Tokenizer, Option<moestream_chat::ChatTemplate>)> {
    let tok = moestream_chat::Tokenizer::from_json_bytes(moestream_synth::tokenizer::QWEN3_TOKENIZER_JSON)?;
    if vocab < tok.vocab_size() {
        anyhow::bail!(
            "{} has no tokenizer, and its vocabulary ({vocab}) is smaller than Qwen3's ({}), so the built-in Qwen3 \
             tokenizer cannot stand in",
            model.display(),
            tok.vocab_size()
        );
    }
    eprintln!("warning: {} has no tokenizer; using the built-in Qwen3 tokenizer and chat template", model.display());
    let cfg = std::str::from_utf8(moestream_synth::tokenizer::QWEN3_TOKENIZER_CONFIG_JSON)
        .context("built-in tokenizer_config.json is not UTF-8")?;
    let template = moestream_chat::ChatTemplate::from_tokenizer_config(cfg, "<built-in qwen3 tokenizer_config.json>")?;
    Ok((tok, template))
}

fn model_name(p: &Path) -> String {
    let base = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    base.strip_suffix(".gguf").map(str::to_string).unwrap_or(base)
}
