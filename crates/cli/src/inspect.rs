//! `moestream inspect`: a summary of a model from its tensor index, for people (table) and scripts (`--json`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use moestream_format::TensorIndex;
use serde::Serialize;

#[derive(Serialize)]
struct Summary<'a> {
    path: String,
    format: moestream_format::ModelFormat,
    architecture: &'a str,
    layers: usize,
    moe_layers: usize,
    hidden_size: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    experts: usize,
    experts_per_token: usize,
    moe_intermediate_size: usize,
    params_total: u64,
    params_active: u64,
    /// Encoding name → bytes stored in it.
    bytes_by_type: BTreeMap<String, u64>,
    bytes_total: u64,
    /// Dense trunk: everything that is not a routed expert.
    bytes_resident: u64,
    bytes_experts: u64,
    /// One expert of one layer: gate + up + down with their scales/biases.
    bytes_per_expert: u64,
    /// Routed expert bytes one token touches: top-k experts in every MoE layer.
    bytes_routed_per_token: u64,
    /// The pack sidecar experts are read from, if one is in use.
    pack: Option<String>,
    /// The sidecar's layout: `packed` when it stores experts in their 16-row form, else `file`.
    pack_layout: Option<&'static str>,
    /// The layout `moestream pack --layout auto` writes on this machine: `packed` where its kernels read the 16-row
    /// form (AVX-512 VNNI), else `file` (a packed sidecar would be unpacked on every read).
    pack_layout_auto: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tensors: Vec<TensorRow>,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    source: String,
    encoding: String,
    shape: Vec<usize>,
    bytes: u64,
}

/// The sidecar layout `moestream pack --layout auto` writes for `index` on this machine: `packed` when this
/// machine's kernels read the packed form of every expert encoding that has one (AVX-512 VNNI: `Q4_0`, `Q4_K`,
/// `Q6_K`; AVX2: `Q4_0`), else `file`: a part stored packed but read row-major is unpacked on every read.
pub fn auto_layout(index: &TensorIndex) -> moestream_format::pack::Layout {
    use moestream_format::pack::Layout;
    let set = moestream_cpu::Dispatch::best().pack_set();
    let mut packable = index
        .tensors
        .values()
        .filter(|t| t.is_expert_stack() && moestream_quant::packed::packed_form(t.encoding).is_some())
        .peekable();
    let any = packable.peek().is_some();
    if any && packable.all(|t| set.packs(t.encoding)) { Layout::Packed } else { Layout::File }
}

pub fn run(model: &Path, json: bool, list: bool) -> Result<()> {
    let index = TensorIndex::open(model)?;
    index.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    let c = &index.config;
    let mut by_type = BTreeMap::new();
    let (mut resident, mut experts) = (0u64, 0u64);
    let mut per_expert_by_layer: BTreeMap<String, u64> = BTreeMap::new();
    for t in index.tensors.values() {
        *by_type.entry(t.encoding.name()).or_insert(0) += t.bytes();
        if t.is_expert_stack() {
            experts += t.bytes();
            let layer = t.name.split('.').nth(1).unwrap_or("").to_string();
            *per_expert_by_layer.entry(layer).or_insert(0) += t.expert(0).map(|r| r.bytes()).unwrap_or(0);
        } else {
            resident += t.bytes();
        }
    }
    let moe_layers = (0..c.num_layers).filter(|&i| c.layer_is_moe(i)).count();
    let bytes_per_expert = per_expert_by_layer.values().copied().max().unwrap_or(0);
    let routed: u64 = per_expert_by_layer.values().map(|b| b * c.num_experts_per_tok as u64).sum();
    let pc = c.parameter_counts();
    let s = Summary {
        path: model.display().to_string(),
        format: index.format,
        architecture: c.architecture.model_type(),
        layers: c.num_layers,
        moe_layers,
        hidden_size: c.hidden_size,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        vocab_size: c.vocab_size,
        experts: c.num_experts,
        experts_per_token: c.num_experts_per_tok,
        moe_intermediate_size: c.moe_intermediate_size,
        params_total: pc.total,
        params_active: pc.active,
        bytes_total: resident + experts,
        bytes_by_type: by_type,
        bytes_resident: resident,
        bytes_experts: experts,
        bytes_per_expert,
        bytes_routed_per_token: routed,
        pack: index.pack.as_ref().map(|p| p.display().to_string()),
        pack_layout: index.pack.as_ref().map(|_| {
            let packed = index.tensors.values().any(|t| t.data_packed);
            if packed { moestream_format::pack::Layout::Packed } else { moestream_format::pack::Layout::File }.name()
        }),
        pack_layout_auto: auto_layout(&index).name(),
        tensors: if list {
            index
                .tensors
                .values()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    source: t.source.clone(),
                    encoding: t.encoding.name(),
                    shape: t.shape.clone(),
                    bytes: t.bytes(),
                })
                .collect()
        } else {
            Vec::new()
        },
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let gb = |b: u64| format!("{:.3} GB", b as f64 / 1e9);
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    println!("model         {}", s.path);
    println!("format        {:?}", s.format);
    match (&s.pack, s.pack_layout) {
        (Some(p), Some(l)) => println!("pack          {p} (layout {l})"),
        _ => println!("pack          none (experts read from the model files)"),
    }
    println!("architecture  {}", s.architecture);
    println!("layers        {} ({} MoE)", s.layers, s.moe_layers);
    println!(
        "hidden        {}   heads {}/{} × {}   vocab {}",
        s.hidden_size, s.heads, s.kv_heads, s.head_dim, s.vocab_size
    );
    println!(
        "experts       {} per layer, top-{}, intermediate {}",
        s.experts, s.experts_per_token, s.moe_intermediate_size
    );
    println!("parameters    {:.3} B total, {:.3} B active", s.params_total as f64 / 1e9, s.params_active as f64 / 1e9);
    println!(
        "bytes         {} total = {} resident trunk + {} experts",
        gb(s.bytes_total),
        gb(s.bytes_resident),
        gb(s.bytes_experts)
    );
    println!("per expert    {} (gate+up+down of one expert in one layer)", mb(s.bytes_per_expert));
    println!(
        "per token     {} of routed experts (top-{} × {} layers)",
        mb(s.bytes_routed_per_token),
        s.experts_per_token,
        s.moe_layers
    );
    println!("by type");
    for (k, v) in &s.bytes_by_type {
        println!("  {k:<14} {}", gb(*v));
    }
    for t in &s.tensors {
        println!("  {:<36} {:<12} {:?} {} ← {}", t.name, t.encoding, t.shape, t.bytes, t.source);
    }
    Ok(())
}
