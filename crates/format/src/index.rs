//! The unified tensor index: canonical tensor name → (file, byte ranges, encoding, logical shape).
//!
//! Every file family is mapped onto GGUF's tensor names (`token_embd.weight`, `blk.N.attn_q.weight`,
//! `blk.N.ffn_gate_exps.weight`, …), because they are short, architecture-neutral and already what llama.cpp
//! users know. Shapes are logical and outermost first (`[E, I, H]` for a stacked expert projection), whatever
//! the packing on disk.
//!
//! The index is what streaming stands on: for a stacked expert tensor it gives each expert's byte range, and for
//! MLX the ranges of its scales and biases too, whether the experts are one stacked tensor (GGUF, MLX, HF fused
//! `gate_up_proj`, where gate and up are the two halves of one slab) or one tensor per expert (HF). It checks every
//! tensor against the shapes the config implies, so a wrong file fails here, naming the tensor, not as garbage
//! logits later.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use moestream_quant::Encoding;
use moestream_quant::{FloatType, MlxAffine};

use crate::FormatError;
use crate::config::{Architecture, LayerAttention, ModelConfig};
use crate::mlx::MlxQuantization;
use crate::safetensors::{SafetensorsSet, StDtype, StTensor};

pub type FileId = u32;

/// A byte range in one of the index's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileRange {
    pub file: FileId,
    pub offset: u64,
    pub len: u64,
}

/// Which file family a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    Gguf,
    HfSafetensors,
    MlxSafetensors,
}

/// One canonical tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// Where it came from, for error messages (`model.layers.3.mlp.experts.gate_up_proj (first half)`).
    pub source: String,
    /// Logical shape, outermost first. Stacked experts have the expert count first.
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    /// One range for a plain tensor; one per expert for a stacked expert tensor.
    pub data: Vec<FileRange>,
    /// MLX only: per-group scales and biases, with the same cardinality as `data`.
    pub scales: Vec<FileRange>,
    pub biases: Vec<FileRange>,
    /// The shape as the file stores it, where it differs from `shape` only by unit dimensions (a conv1d kernel:
    /// HF `[C, 1, K]`, MLX `[C, K, 1]`, GGUF `[C, K]`, all indexed as `[C, K]`). Models read conventions off it
    /// (whether an HF-layout checkpoint still has zero-centred norms). Empty when equal to `shape`.
    pub stored_shape: Vec<usize>,
    /// `data` holds the bytes in the packed form of `encoding` (`moestream_quant::packed::packed_form`), not in
    /// `encoding` itself: set on expert tensors whose ranges point into a sidecar written packed
    /// (`moestream pack`, layout `packed`). False for every range into a model file.
    pub data_packed: bool,
}

/// The byte ranges of one expert of one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertRanges {
    pub data: FileRange,
    pub scales: Option<FileRange>,
    pub biases: Option<FileRange>,
}

impl ExpertRanges {
    pub fn iter(&self) -> impl Iterator<Item = FileRange> {
        [Some(self.data), self.scales, self.biases].into_iter().flatten()
    }
    pub fn bytes(&self) -> u64 {
        self.iter().map(|r| r.len).sum()
    }
}

impl TensorEntry {
    /// Stacked expert tensors are the `_exps` ones; their first dimension is the expert count.
    pub fn is_expert_stack(&self) -> bool {
        self.name.contains("_exps.")
    }

    pub fn num_experts(&self) -> usize {
        if self.is_expert_stack() { self.data.len() } else { 0 }
    }

    pub fn expert(&self, e: usize) -> Option<ExpertRanges> {
        if !self.is_expert_stack() {
            return None;
        }
        Some(ExpertRanges {
            data: *self.data.get(e)?,
            scales: self.scales.get(e).copied(),
            biases: self.biases.get(e).copied(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.data.iter().chain(&self.scales).chain(&self.biases).map(|r| r.len).sum()
    }

    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Rows and columns of one matrix (one expert's, for a stack); a vector is one row.
    pub fn matrix_dims(&self) -> (usize, usize) {
        let s = if self.is_expert_stack() { &self.shape[1..] } else { &self.shape[..] };
        match s {
            [cols] => (1, *cols),
            [rows, cols] => (*rows, *cols),
            _ => (s[..s.len() - 1].iter().product(), s[s.len() - 1]),
        }
    }
}

/// GGUF metadata key of a synthetic model's routing skew (`moestream synth --routing-skew`).
pub const ROUTING_SKEW_GGUF: &str = "moestream.routing_skew";
/// config.json field of the same.
pub const ROUTING_SKEW_JSON: &str = "moestream_routing_skew";

/// A model's tensors, config and files.
#[derive(Debug, Clone)]
pub struct TensorIndex {
    pub format: ModelFormat,
    /// The model path as given (a directory for safetensors, the file for GGUF).
    pub root: PathBuf,
    pub files: Vec<PathBuf>,
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Set for GGUF models, whose tokenizer and template live in the metadata.
    pub gguf: Option<crate::gguf::GgufFile>,
    /// The expert-major sidecar (`moestream pack`) the `_exps` ranges point into, when one is in use.
    pub pack: Option<PathBuf>,
    /// Problems that did not stop the open (a stale or corrupt sidecar that was ignored); the CLI prints them.
    pub warnings: Vec<String>,
}

impl TensorIndex {
    /// Open a GGUF file or a safetensors checkpoint directory (HF or MLX). If the model has a pack sidecar
    /// ([`crate::pack`]) that matches it, expert ranges point into the sidecar; a stale or corrupt one is ignored
    /// with a line in `warnings`.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let mut index = Self::open_without_pack(path)?;
        crate::pack::attach_if_present(&mut index);
        Ok(index)
    }

    /// Open the model's own files only, ignoring any pack sidecar.
    pub fn open_without_pack(path: &Path) -> Result<Self, FormatError> {
        if path.is_dir() {
            Self::open_safetensors_dir(path)
        } else if path.is_file() {
            crate::gguf_index::open_gguf(path)
        } else {
            Err(FormatError::invalid(path, "no such file or directory"))
        }
    }

    pub fn get(&self, name: &str) -> Result<&TensorEntry, FormatError> {
        self.tensors
            .get(name)
            .ok_or_else(|| FormatError::MissingTensor { path: self.root.clone(), tensor: name.into() })
    }

    /// The `--routing-skew` a `moestream synth` model was written with, when it is above 0: the GGUF key
    /// [`ROUTING_SKEW_GGUF`] or the config.json field [`ROUTING_SKEW_JSON`]. `None` for every other model
    /// (including a config.json that cannot be read now: this is a label, not part of the model).
    pub fn synthetic_routing_skew(&self) -> Option<f32> {
        if let Some(g) = &self.gguf {
            return g.get_f32(ROUTING_SKEW_GGUF).ok();
        }
        let text = std::fs::read_to_string(self.root.join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get(ROUTING_SKEW_JSON)?.as_f64().map(|x| x as f32)
    }

    pub fn file_path(&self, id: FileId) -> &Path {
        &self.files[id as usize]
    }

    /// Read one range into `buf` (exactly `range.len` bytes). Plain positioned reads: I/O policy belongs to `store`.
    pub fn read_range(&self, range: FileRange, buf: &mut [u8]) -> Result<(), FormatError> {
        use std::os::unix::fs::FileExt;
        let path = self
            .files
            .get(range.file as usize)
            .ok_or_else(|| FormatError::invalid(&self.root, format!("file id {} out of range", range.file)))?;
        if buf.len() as u64 != range.len {
            return Err(FormatError::invalid(
                path,
                format!("read of {} bytes into a {}-byte buffer", range.len, buf.len()),
            ));
        }
        let f = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
        f.read_exact_at(buf, range.offset).map_err(|e| {
            FormatError::invalid(path, format!("reading {} bytes at offset {}: {e}", range.len, range.offset))
        })
    }

    /// Dequantize a whole tensor (every expert, for a stack) to f32, in logical row-major order.
    pub fn load_f32(&self, name: &str) -> Result<Vec<f32>, FormatError> {
        let t = self.get(name)?;
        let mut out = vec![0f32; t.elements() as usize];
        let per = out.len() / t.data.len().max(1);
        for (i, chunk) in out.chunks_mut(per.max(1)).enumerate() {
            self.decode_part(t, i, chunk)?;
        }
        Ok(out)
    }

    /// Dequantize expert `e` of a stacked tensor to f32 (`[rows, cols]` row-major).
    pub fn load_expert_f32(&self, name: &str, e: usize) -> Result<Vec<f32>, FormatError> {
        let t = self.get(name)?;
        if e >= t.num_experts() {
            return Err(FormatError::invalid(&self.root, format!("{name}: no expert {e} (has {})", t.num_experts())));
        }
        let (r, c) = t.matrix_dims();
        let mut out = vec![0f32; r * c];
        self.decode_part(t, e, &mut out)?;
        Ok(out)
    }

    fn decode_part(&self, t: &TensorEntry, i: usize, out: &mut [f32]) -> Result<(), FormatError> {
        let read = |r: FileRange| -> Result<Vec<u8>, FormatError> {
            let mut b = vec![0u8; r.len as usize];
            self.read_range(r, &mut b)?;
            Ok(b)
        };
        let data = read(t.data[i])?;
        let (scales, biases) = match (t.scales.get(i), t.biases.get(i)) {
            (Some(&s), Some(&b)) => (read(s)?, read(b)?),
            _ => (Vec::new(), Vec::new()),
        };
        t.encoding
            .dequantize(&data, &scales, &biases, t.matrix_dims().1, out)
            .map_err(|e| FormatError::invalid(self.file_path(t.data[i].file), format!("tensor {}: {e}", t.name)))
    }

    fn open_safetensors_dir(dir: &Path) -> Result<Self, FormatError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let set = SafetensorsSet::open_dir(dir)?;
        let mlx = MlxQuantization::from_config_file(&dir.join("config.json"))?;
        let files: Vec<PathBuf> = set.files.iter().map(|f| f.path.clone()).collect();
        let mut b = Builder::new(&config);
        for (fid, f) in set.files.iter().enumerate() {
            for t in &f.tensors {
                b.add(fid as FileId, &f.path, t)?;
            }
        }
        let is_mlx = b.parts.values().any(|p| p.scales.is_some());
        let tensors = b.finish(dir, &files, mlx.as_ref())?;
        let format = if is_mlx { ModelFormat::MlxSafetensors } else { ModelFormat::HfSafetensors };
        let index = TensorIndex {
            format,
            root: dir.to_path_buf(),
            files,
            config,
            tensors,
            gguf: None,
            pack: None,
            warnings: Vec::new(),
        };
        check_expected(&index)?;
        Ok(index)
    }
}

/// Which piece of a canonical tensor one source tensor supplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Weight,
    Scales,
    Biases,
}

/// How a source tensor maps onto experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExpertSlot {
    None,
    /// Tensor of one expert (HF per-expert layout).
    One(usize),
    /// Stacked over experts (MLX switch_mlp, HF fused down_proj).
    Stacked,
    /// HF fused gate_up_proj [E, 2I, H]: this canonical tensor is half `0` (gate) or `1` (up) of each slab.
    FusedHalf(usize),
}

struct SourceRef {
    file: FileId,
    path: PathBuf,
    tensor: StTensor,
    slot: ExpertSlot,
    /// `tensor.shape` before any unit dimensions were squeezed out.
    stored_shape: Vec<usize>,
}

#[derive(Default)]
struct PartialEntry {
    weight: Vec<SourceRef>,
    scales: Option<Vec<SourceRef>>,
    biases: Option<Vec<SourceRef>>,
}

struct Builder<'c> {
    config: &'c ModelConfig,
    parts: BTreeMap<String, PartialEntry>,
}

/// Map an HF or MLX tensor name to (canonical name, piece, expert slot). `None` for tensors text-only inference
/// does not use (vision tower, MTP head).
fn map_hf_name(name: &str) -> Option<Vec<(String, Piece, ExpertSlot)>> {
    let (stem, piece) = if let Some(s) = name.strip_suffix(".scales") {
        (s, Piece::Scales)
    } else if let Some(s) = name.strip_suffix(".biases") {
        (s, Piece::Biases)
    } else if let Some(s) = name.strip_suffix(".weight") {
        (s, Piece::Weight)
    } else {
        // Fused expert tensors carry no `.weight` suffix in transformers 5.
        (name, Piece::Weight)
    };
    if stem == "lm_head" || stem == "model.lm_head" || stem == "language_model.lm_head" {
        return Some(vec![("output.weight".into(), piece, ExpertSlot::None)]);
    }
    let rest =
        ["model.language_model.", "language_model.model.", "model."].iter().find_map(|p| stem.strip_prefix(p))?;
    let one = |n: &str, slot| Some(vec![(format!("{n}.weight"), piece, slot)]);
    match rest {
        "embed_tokens" => return one("token_embd", ExpertSlot::None),
        "norm" => return one("output_norm", ExpertSlot::None),
        _ => {}
    }
    let rest = rest.strip_prefix("layers.")?;
    let (layer, sub) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |n: &str, slot| Some(vec![(format!("blk.{layer}.{n}.weight"), piece, slot)]);
    match sub {
        "input_layernorm" => return blk("attn_norm", ExpertSlot::None),
        "post_attention_layernorm" => return blk("ffn_norm", ExpertSlot::None),
        "self_attn.q_proj" => return blk("attn_q", ExpertSlot::None),
        "self_attn.k_proj" => return blk("attn_k", ExpertSlot::None),
        "self_attn.v_proj" => return blk("attn_v", ExpertSlot::None),
        "self_attn.o_proj" => return blk("attn_output", ExpertSlot::None),
        "self_attn.q_norm" => return blk("attn_q_norm", ExpertSlot::None),
        "self_attn.k_norm" => return blk("attn_k_norm", ExpertSlot::None),
        "mlp.gate" => return blk("ffn_gate_inp", ExpertSlot::None),
        // Hybrid (Qwen3.5 / Qwen3-Next) layers, under llama.cpp's qwen35moe / qwen3next names where one exists.
        "linear_attn.in_proj_qkv" => return blk("attn_qkv", ExpertSlot::None),
        "linear_attn.in_proj_z" => return blk("attn_gate", ExpertSlot::None),
        "linear_attn.in_proj_b" => return blk("ssm_beta", ExpertSlot::None),
        "linear_attn.in_proj_a" => return blk("ssm_alpha", ExpertSlot::None),
        "linear_attn.in_proj_qkvz" => return blk("ssm_in", ExpertSlot::None),
        "linear_attn.in_proj_ba" => return blk("ssm_ba", ExpertSlot::None),
        "linear_attn.conv1d" => return blk("ssm_conv1d", ExpertSlot::None),
        "linear_attn.norm" => return blk("ssm_norm", ExpertSlot::None),
        "linear_attn.out_proj" => return blk("ssm_out", ExpertSlot::None),
        // GGUF stores −exp(A_log) as `ssm_a` and the bias as `ssm_dt.bias`; the HF originals keep their own names.
        "linear_attn.A_log" => return blk("ssm_a_log", ExpertSlot::None),
        "linear_attn.dt_bias" => return blk("ssm_dt_bias", ExpertSlot::None),
        "mlp.shared_expert.gate_proj" => return blk("ffn_gate_shexp", ExpertSlot::None),
        "mlp.shared_expert.up_proj" => return blk("ffn_up_shexp", ExpertSlot::None),
        "mlp.shared_expert.down_proj" => return blk("ffn_down_shexp", ExpertSlot::None),
        "mlp.shared_expert_gate" => return blk("ffn_gate_inp_shexp", ExpertSlot::None),
        "mlp.gate_proj" => return blk("ffn_gate", ExpertSlot::None),
        "mlp.up_proj" => return blk("ffn_up", ExpertSlot::None),
        "mlp.down_proj" => return blk("ffn_down", ExpertSlot::None),
        "mlp.switch_mlp.gate_proj" => return blk("ffn_gate_exps", ExpertSlot::Stacked),
        "mlp.switch_mlp.up_proj" => return blk("ffn_up_exps", ExpertSlot::Stacked),
        "mlp.switch_mlp.down_proj" => return blk("ffn_down_exps", ExpertSlot::Stacked),
        "mlp.experts.down_proj" => return blk("ffn_down_exps", ExpertSlot::Stacked),
        "mlp.experts.gate_up_proj" => {
            return Some(vec![
                (format!("blk.{layer}.ffn_gate_exps.weight"), piece, ExpertSlot::FusedHalf(0)),
                (format!("blk.{layer}.ffn_up_exps.weight"), piece, ExpertSlot::FusedHalf(1)),
            ]);
        }
        _ => {}
    }
    if let Some(e) = sub.strip_prefix("mlp.experts.") {
        let (e, proj) = e.split_once('.')?;
        let e: usize = e.parse().ok()?;
        let canon = match proj {
            "gate_proj" => "ffn_gate_exps",
            "up_proj" => "ffn_up_exps",
            "down_proj" => "ffn_down_exps",
            _ => return None,
        };
        return blk(canon, ExpertSlot::One(e));
    }
    None
}

impl<'c> Builder<'c> {
    fn new(config: &'c ModelConfig) -> Self {
        Builder { config, parts: BTreeMap::new() }
    }

    fn add(&mut self, file: FileId, path: &Path, t: &StTensor) -> Result<(), FormatError> {
        let Some(mapped) = map_hf_name(&t.name) else {
            // Vision tower, MTP head and anything unknown: text-only inference does not read them.
            return Ok(());
        };
        for (canon, piece, slot) in mapped {
            let mut tensor = t.clone();
            if canon.ends_with(".ssm_conv1d.weight") {
                // Depthwise conv kernels come as [C, 1, K] (HF) or [C, K, 1] (MLX): the same bytes as [C, K].
                tensor.shape.retain(|&d| d != 1);
            }
            let entry = self.parts.entry(canon).or_default();
            let r = SourceRef { file, path: path.to_path_buf(), tensor, slot, stored_shape: t.shape.clone() };
            match piece {
                Piece::Weight => entry.weight.push(r),
                Piece::Scales => entry.scales.get_or_insert_with(Vec::new).push(r),
                Piece::Biases => entry.biases.get_or_insert_with(Vec::new).push(r),
            }
        }
        Ok(())
    }

    fn finish(
        self,
        root: &Path,
        _files: &[PathBuf],
        mlx: Option<&MlxQuantization>,
    ) -> Result<BTreeMap<String, TensorEntry>, FormatError> {
        let expected = expected_shapes(self.config);
        let mut out = BTreeMap::new();
        for (name, p) in self.parts {
            let Some(shape) = expected.get(&name).cloned() else {
                // A tensor the architecture does not use (e.g. a dense MLP on a layer the config makes MoE).
                // Hybrid architectures are indexed only partly until their issue lands; skip what we don't know.
                let src = &p.weight.first().map(|s| (s.path.clone(), s.tensor.name.clone()));
                if let Some((path, tname)) = src {
                    return Err(FormatError::invalid(
                        path,
                        format!(
                            "tensor `{tname}` (as {name}) is not part of this {} config",
                            self.config.architecture.model_type()
                        ),
                    ));
                }
                continue;
            };
            let entry = build_entry(root, &name, shape, p, mlx)?;
            out.insert(name, entry);
        }
        Ok(out)
    }
}

fn st_float(d: StDtype) -> Option<FloatType> {
    match d {
        StDtype::F32 => Some(FloatType::F32),
        StDtype::F16 => Some(FloatType::F16),
        StDtype::BF16 => Some(FloatType::BF16),
        _ => None,
    }
}

/// Turn the source pieces of one canonical tensor into ranges, checking shapes against `shape`.
fn build_entry(
    root: &Path,
    name: &str,
    shape: Vec<usize>,
    p: PartialEntry,
    mlx: Option<&MlxQuantization>,
) -> Result<TensorEntry, FormatError> {
    let stack = name.contains("_exps.");
    let experts = if stack { shape[0] } else { 1 };
    let (rows, cols) = if stack {
        (shape[1], shape[2])
    } else if shape.len() == 1 {
        (1, shape[0])
    } else {
        (shape[0], shape[1])
    };
    let first =
        p.weight.first().ok_or_else(|| FormatError::MissingTensor { path: root.into(), tensor: name.into() })?;
    let source = first.tensor.name.clone();
    let stored_shape = if first.stored_shape != first.tensor.shape { first.stored_shape.clone() } else { Vec::new() };
    let mismatch = |s: &SourceRef, want: String| {
        FormatError::invalid(
            &s.path,
            format!(
                "tensor `{}` (as {name}) has shape {:?} {}, expected {want}",
                s.tensor.name,
                s.tensor.shape,
                s.tensor.dtype.name()
            ),
        )
    };

    // Encoding: float weights, or MLX affine when scales are present.
    let encoding = match (&p.scales, &p.biases) {
        (None, None) => {
            let ft = st_float(first.tensor.dtype).ok_or_else(|| FormatError::UnknownDtype {
                path: first.path.clone(),
                tensor: first.tensor.name.clone(),
                dtype: format!("{} without MLX scales/biases", first.tensor.dtype.name()),
            })?;
            Encoding::Float(ft)
        }
        (Some(sc), Some(bi)) => {
            let s0 = sc
                .first()
                .ok_or_else(|| FormatError::MissingTensor { path: root.into(), tensor: format!("{name} scales") })?;
            let b0 = bi
                .first()
                .ok_or_else(|| FormatError::MissingTensor { path: root.into(), tensor: format!("{name} biases") })?;
            if first.tensor.dtype != StDtype::U32 {
                return Err(mismatch(first, "packed U32 weights next to MLX scales".into()));
            }
            let wcols = *first.tensor.shape.last().unwrap_or(&0);
            let scols = *s0.tensor.shape.last().unwrap_or(&0);
            // The robust reading: bits from the packed width, group from the scale count (config only cross-checks).
            if wcols == 0 || scols == 0 || (wcols * 32) % cols != 0 || cols % scols != 0 {
                return Err(mismatch(first, format!("a packing of {cols} input features")));
            }
            let bits = wcols * 32 / cols;
            let group = cols / scols;
            let params = MlxAffine { bits: bits as u8, group_size: group };
            params
                .validate()
                .map_err(|e| FormatError::invalid(&first.path, format!("tensor `{}`: {e}", first.tensor.name)))?;
            if let Some(q) = mlx
                && let Some((cb, cg)) = q.params_for(name_to_module(&source))
                && (cb, cg) != (bits, group)
            {
                return Err(FormatError::invalid(
                    &first.path,
                    format!(
                        "tensor `{}`: shapes say {bits}-bit group {group}, config.json quantization says {cb}-bit group {cg}",
                        first.tensor.name
                    ),
                ));
            }
            let scale_type = st_float(s0.tensor.dtype).ok_or_else(|| FormatError::UnknownDtype {
                path: s0.path.clone(),
                tensor: s0.tensor.name.clone(),
                dtype: s0.tensor.dtype.name().into(),
            })?;
            if st_float(b0.tensor.dtype) != Some(scale_type) {
                return Err(mismatch(b0, format!("biases of the scales' dtype {}", scale_type.name())));
            }
            Encoding::MlxAffine { params, scale_type }
        }
        _ => {
            return Err(FormatError::invalid(
                &first.path,
                format!("tensor `{source}` has MLX scales without biases or biases without scales"),
            ));
        }
    };

    // Per-piece stored row width, in elements of the piece's dtype.
    let piece_cols = |piece: Piece| -> usize {
        match (encoding, piece) {
            (Encoding::MlxAffine { params, .. }, Piece::Weight) => cols * params.bits as usize / 32,
            (Encoding::MlxAffine { params, .. }, _) => cols / params.group_size,
            _ => cols,
        }
    };
    let ranges = |srcs: &[SourceRef], piece: Piece| -> Result<Vec<FileRange>, FormatError> {
        let pc = piece_cols(piece);
        let want_one: Vec<usize> = if shape.len() == 1 { vec![pc] } else { vec![rows, pc] };
        let mut per_expert: Vec<Option<FileRange>> = vec![None; experts];
        for s in srcs {
            let t = &s.tensor;
            let esize = t.dtype.size() as u64;
            let slab = (rows * pc) as u64 * esize;
            match s.slot {
                ExpertSlot::None => {
                    if t.shape != want_one {
                        return Err(mismatch(s, format!("{want_one:?}")));
                    }
                    per_expert[0] = Some(FileRange { file: s.file, offset: t.offset, len: t.len });
                }
                ExpertSlot::One(e) => {
                    if e >= experts {
                        return Err(FormatError::invalid(
                            &s.path,
                            format!("tensor `{}`: expert {e} but the config has {experts}", t.name),
                        ));
                    }
                    if t.shape != want_one {
                        return Err(mismatch(s, format!("{want_one:?}")));
                    }
                    if per_expert[e].is_some() {
                        return Err(FormatError::invalid(
                            &s.path,
                            format!("tensor `{}`: expert {e} appears twice", t.name),
                        ));
                    }
                    per_expert[e] = Some(FileRange { file: s.file, offset: t.offset, len: t.len });
                }
                ExpertSlot::Stacked => {
                    let want = vec![experts, rows, pc];
                    if t.shape != want {
                        return Err(mismatch(s, format!("{want:?}")));
                    }
                    for (e, slot) in per_expert.iter_mut().enumerate() {
                        *slot = Some(FileRange { file: s.file, offset: t.offset + e as u64 * slab, len: slab });
                    }
                }
                ExpertSlot::FusedHalf(h) => {
                    let want = vec![experts, 2 * rows, pc];
                    if t.shape != want {
                        return Err(mismatch(s, format!("{want:?} (gate and up fused)")));
                    }
                    for (e, slot) in per_expert.iter_mut().enumerate() {
                        let off = t.offset + (2 * e as u64 + h as u64) * slab;
                        *slot = Some(FileRange { file: s.file, offset: off, len: slab });
                    }
                }
            }
        }
        per_expert
            .into_iter()
            .enumerate()
            .map(|(e, r)| {
                r.ok_or_else(|| FormatError::MissingTensor {
                    path: root.into(),
                    tensor: if stack { format!("{name} (expert {e})") } else { name.to_string() },
                })
            })
            .collect()
    };
    let data = ranges(&p.weight, Piece::Weight)?;
    let scales = match &p.scales {
        Some(s) => ranges(s, Piece::Scales)?,
        None => Vec::new(),
    };
    let biases = match &p.biases {
        Some(b) => ranges(b, Piece::Biases)?,
        None => Vec::new(),
    };
    let source = if p.weight.len() > 1 { format!("{source} (+{} more)", p.weight.len() - 1) } else { source };
    Ok(TensorEntry {
        name: name.to_string(),
        source,
        shape,
        encoding,
        data,
        scales,
        biases,
        stored_shape,
        data_packed: false,
    })
}

/// The MLX module path of a source tensor name (`model.layers.0.mlp.gate.weight` → `model.layers.0.mlp.gate`).
fn name_to_module(source: &str) -> &str {
    source.strip_suffix(".weight").unwrap_or(source)
}

/// Every tensor the architecture needs, with its logical shape. Optional ones (tied `output.weight`) are included
/// and only checked when present.
pub fn expected_shapes(c: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let (h, d, v) = (c.hidden_size, c.head_dim, c.vocab_size);
    m.insert("token_embd.weight".to_string(), vec![v, h]);
    m.insert("output_norm.weight".to_string(), vec![h]);
    m.insert("output.weight".to_string(), vec![v, h]);
    for i in 0..c.num_layers {
        let mut put = |n: &str, s: Vec<usize>| m.insert(format!("blk.{i}.{n}.weight"), s);
        put("attn_norm", vec![h]);
        put("ffn_norm", vec![h]);
        let full = c.layer_types.get(i) != Some(&LayerAttention::LinearAttention);
        if full {
            // Hybrids gate attention per head: q_proj gives a query and a gate of d each.
            let q_rows = if c.architecture.is_hybrid() { 2 * c.num_heads * d } else { c.num_heads * d };
            put("attn_q", vec![q_rows, h]);
            put("attn_k", vec![c.num_kv_heads * d, h]);
            put("attn_v", vec![c.num_kv_heads * d, h]);
            put("attn_output", vec![h, c.num_heads * d]);
            put("attn_q_norm", vec![d]);
            put("attn_k_norm", vec![d]);
        } else if let Some(la) = &c.linear {
            let (hk, hv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
            let conv = 2 * hk * dk + hv * dv;
            if c.architecture == Architecture::Qwen3Next {
                put("ssm_in", vec![2 * hk * dk + 2 * hv * dv, h]);
                put("ssm_ba", vec![2 * hv, h]);
            } else {
                put("attn_qkv", vec![conv, h]);
                put("attn_gate", vec![hv * dv, h]);
                put("ssm_beta", vec![hv, h]);
                put("ssm_alpha", vec![hv, h]);
            }
            put("ssm_conv1d", vec![conv, la.conv_kernel]);
            put("ssm_a_log", vec![hv]);
            put("ssm_dt_bias", vec![hv]);
            put("ssm_norm", vec![dv]);
            put("ssm_out", vec![h, hv * dv]);
        }
        if c.layer_is_moe(i) && c.shared_expert_intermediate_size > 0 {
            let is = c.shared_expert_intermediate_size;
            put("ffn_gate_shexp", vec![is, h]);
            put("ffn_up_shexp", vec![is, h]);
            put("ffn_down_shexp", vec![h, is]);
            put("ffn_gate_inp_shexp", vec![1, h]);
        }
        if c.layer_is_moe(i) {
            let (e, im) = (c.num_experts, c.moe_intermediate_size);
            put("ffn_gate_inp", vec![e, h]);
            put("ffn_gate_exps", vec![e, im, h]);
            put("ffn_up_exps", vec![e, im, h]);
            put("ffn_down_exps", vec![e, h, im]);
        } else {
            let im = c.intermediate_size;
            put("ffn_gate", vec![im, h]);
            put("ffn_up", vec![im, h]);
            put("ffn_down", vec![h, im]);
        }
    }
    m
}

/// After building: every required tensor is present.
pub(crate) fn check_expected(index: &TensorIndex) -> Result<(), FormatError> {
    if index.gguf.is_some() && index.config.architecture.is_hybrid() {
        // GGUF hybrids (qwen35moe, qwen3next) use llama.cpp's own tensor set, which this table does not describe.
        return Ok(());
    }
    for name in expected_shapes(&index.config).keys() {
        if name == "output.weight" && index.config.tie_word_embeddings {
            continue;
        }
        if !index.tensors.contains_key(name) {
            return Err(FormatError::MissingTensor { path: index.root.clone(), tensor: name.clone() });
        }
    }
    Ok(())
}
