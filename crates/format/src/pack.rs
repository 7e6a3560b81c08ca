//! The expert-major sidecar (`moestream pack`): every (MoE layer, expert) as one 4096-aligned slab holding that
//! expert's gate, up and down (and their MLX scales and biases) back to back, so that a cache miss is one read.
//!
//! Name: `X.gguf` → `X.gguf.moestream-pack`; a safetensors directory `DIR` → `DIR/model.moestream-pack`.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0   magic  b"MOESPACK"
//! 8   u32    version (2; version 1 files, which never store packed pieces, are still read)
//! 12  u32    reserved (0)
//! 16  u64    json_len
//! 24  JSON   PackHeader (json_len bytes), then zeros up to the next multiple of 4096 = data_offset
//! data_offset + layer.offset + e·layer.slab_len: the slab of expert e of that layer, slab_len a multiple of 4096
//! ```
//!
//! Inside a slab the pieces follow [`PIECE_ORDER`] (gate/up/down data, then scales, then biases; absent pieces
//! skipped) with no gaps, then zeros to the slab end. The file is exactly `data_offset + data_len` bytes.
//!
//! **Layout `packed`** (version 2): data pieces whose encoding has a 16-row packed form (`Q4_0`, `Q4_K`, `Q6_K`
//! with whole groups, see `moestream_quant::packed`) are stored in that form (`PieceDesc::packed`), the bytes the
//! x86 int8 kernels read. A miss then needs no packing on the I/O thread, and where the pieces are whole 4 KiB
//! blocks (Qwen3-30B-A3B's Q4_0 experts are 216 of them) an O_DIRECT read lands straight in the slot: no bounce
//! copy either. The store unpacks such pieces on the way in when its kernels want the file encoding. Layout `file`
//! keeps the model's bytes as they are.
//!
//! The JSON names every source file with its size, mtime and a hash of its first and last 4 KiB, and every piece
//! with its tensor, shape, encoding and length. [`TensorIndex::open`] uses the sidecar only when all of that
//! still matches the model; otherwise it ignores it and records a warning. Copying a model without keeping mtimes
//! (`cp` without `-p`) therefore makes its sidecar stale: run `moestream pack` again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::FormatError;
use crate::index::{FileId, FileRange, ModelFormat, TensorEntry, TensorIndex};

pub const MAGIC: [u8; 8] = *b"MOESPACK";
pub const VERSION: u32 = 2;
/// Alignment of the data region and of every slab.
pub const ALIGN: u64 = 4096;
/// Bytes before the JSON: magic, version, reserved, json_len.
pub const FIXED_HEADER: u64 = 24;
/// Bytes hashed at each end of a source file for its fingerprint.
const FINGERPRINT_SPAN: u64 = 4096;
/// A header larger than this is corrupt, not a model.
const MAX_JSON: u64 = 64 << 20;

/// The three stacked projections of a MoE layer, in slab order.
pub const PROJECTIONS: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

/// Which of an expert's ranges a piece is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PieceKind {
    Data,
    Scales,
    Biases,
}

/// The fixed piece order inside a slab: (kind, projection index into [`PROJECTIONS`]).
pub const PIECE_ORDER: [(PieceKind, usize); 9] = [
    (PieceKind::Data, 0),
    (PieceKind::Data, 1),
    (PieceKind::Data, 2),
    (PieceKind::Scales, 0),
    (PieceKind::Scales, 1),
    (PieceKind::Scales, 2),
    (PieceKind::Biases, 0),
    (PieceKind::Biases, 1),
    (PieceKind::Biases, 2),
];

/// A cheap identity of one source file: a stale sidecar is one whose sources no longer match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFingerprint {
    /// File name only, so that a model directory can move (with `cp -p` / `mv`).
    pub name: String,
    pub size: u64,
    pub mtime_ns: u64,
    /// FNV-1a 64 of the size, the first 4 KiB and the last 4 KiB, as 16 hex digits.
    pub head_tail_fnv1a: String,
}

/// One piece of every expert slab of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceDesc {
    pub tensor: String,
    pub kind: PieceKind,
    pub shape: Vec<usize>,
    pub encoding: String,
    /// Offset inside the slab.
    pub offset: u64,
    pub len: u64,
    /// The bytes are the packed form of `encoding` (layout `packed`; data pieces only).
    #[serde(default)]
    pub packed: bool,
}

/// How `write_with` stores expert data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The model file's bytes, unchanged.
    File,
    /// Packable data pieces in their 16-row packed form.
    Packed,
}

impl Layout {
    /// The name `moestream pack --layout` and `inspect` use.
    pub fn name(self) -> &'static str {
        match self {
            Layout::File => "file",
            Layout::Packed => "packed",
        }
    }
}

/// One MoE layer: `experts` slabs of `slab_len` bytes from `offset` (relative to the data region).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    pub layer: usize,
    pub experts: usize,
    pub offset: u64,
    pub slab_len: u64,
    pub pieces: Vec<PieceDesc>,
}

/// The JSON description at the start of a sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackHeader {
    pub version: u32,
    pub model_format: String,
    pub align: u64,
    pub sources: Vec<SourceFingerprint>,
    pub layers: Vec<LayerDesc>,
    /// Bytes from the data offset to the end of the file.
    pub data_len: u64,
}

/// What [`write`] wrote.
#[derive(Debug, Clone)]
pub struct PackSummary {
    pub path: PathBuf,
    /// File size, header and padding included.
    pub bytes: u64,
    /// Expert bytes copied (without padding).
    pub payload_bytes: u64,
    pub layers: usize,
    pub slabs: u64,
}

/// Where `open` looks for the sidecar of a model.
pub fn default_path(index: &TensorIndex) -> PathBuf {
    sidecar_path(&index.root, index.format)
}

fn sidecar_path(root: &Path, format: ModelFormat) -> PathBuf {
    match format {
        ModelFormat::Gguf => {
            let mut s = root.as_os_str().to_owned();
            s.push(".moestream-pack");
            PathBuf::from(s)
        }
        ModelFormat::HfSafetensors | ModelFormat::MlxSafetensors => root.join("model.moestream-pack"),
    }
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Size, mtime and head/tail hash of one file.
pub fn fingerprint(path: &Path) -> Result<SourceFingerprint, FormatError> {
    let f = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let meta = f.metadata().map_err(|e| FormatError::io(path, e))?;
    let size = meta.len();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let span = size.min(FINGERPRINT_SPAN);
    let mut buf = vec![0u8; span as usize];
    let mut h = fnv1a(0xcbf2_9ce4_8422_2325, &size.to_le_bytes());
    for off in [0, size - span] {
        f.read_exact_at(&mut buf, off).map_err(|e| FormatError::io(path, e))?;
        h = fnv1a(h, &buf);
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(SourceFingerprint { name, size, mtime_ns, head_tail_fnv1a: format!("{h:016x}") })
}

fn format_name(f: ModelFormat) -> String {
    match f {
        ModelFormat::Gguf => "gguf",
        ModelFormat::HfSafetensors => "hf-safetensors",
        ModelFormat::MlxSafetensors => "mlx-safetensors",
    }
    .to_string()
}

fn ranges_of(t: &TensorEntry, kind: PieceKind) -> &[FileRange] {
    match kind {
        PieceKind::Data => &t.data,
        PieceKind::Scales => &t.scales,
        PieceKind::Biases => &t.biases,
    }
}

/// The MoE layers of an index (those with a `blk.N.ffn_gate_exps.weight`), ascending.
fn moe_layers(index: &TensorIndex) -> Vec<usize> {
    let mut v: Vec<usize> = index
        .tensors
        .keys()
        .filter_map(|n| n.strip_prefix("blk.")?.strip_suffix(".ffn_gate_exps.weight")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// The header `write_with` would produce for this index (sources fingerprinted now).
pub fn plan(index: &TensorIndex, layout: Layout) -> Result<PackHeader, FormatError> {
    let bad = |msg: String| FormatError::invalid(&index.root, msg);
    let mut layers = Vec::new();
    let mut offset = 0u64;
    for layer in moe_layers(index) {
        let projs: Vec<&TensorEntry> =
            PROJECTIONS.iter().map(|p| index.get(&format!("blk.{layer}.{p}.weight"))).collect::<Result<_, _>>()?;
        let experts = projs[0].num_experts();
        if experts == 0 {
            return Err(bad(format!("layer {layer}: no experts")));
        }
        let mut pieces = Vec::new();
        let mut used = 0u64;
        for (kind, p) in PIECE_ORDER {
            let t = projs[p];
            let rs = ranges_of(t, kind);
            if rs.is_empty() {
                continue;
            }
            if rs.len() != experts {
                return Err(bad(format!("{}: {} {kind:?} ranges for {experts} experts", t.name, rs.len())));
            }
            let len = rs[0].len;
            if let Some(r) = rs.iter().find(|r| r.len != len) {
                return Err(bad(format!("{}: experts differ in size ({} and {} bytes)", t.name, len, r.len)));
            }
            let (rows, cols) = t.matrix_dims();
            let packed = layout == Layout::Packed
                && kind == PieceKind::Data
                && moestream_quant::packed::packable(t.encoding, rows, cols);
            pieces.push(PieceDesc {
                tensor: t.name.clone(),
                kind,
                shape: t.shape.clone(),
                encoding: t.encoding.name(),
                offset: used,
                len,
                packed,
            });
            used += len;
        }
        let slab_len = round_up(used, ALIGN);
        layers.push(LayerDesc { layer, experts, offset, slab_len, pieces });
        offset += slab_len * experts as u64;
    }
    if layers.is_empty() {
        return Err(bad("no MoE layers to pack".into()));
    }
    let sources = index.files.iter().map(|f| fingerprint(f)).collect::<Result<_, _>>()?;
    Ok(PackHeader {
        version: VERSION,
        model_format: format_name(index.format),
        align: ALIGN,
        sources,
        layers,
        data_len: offset,
    })
}

/// The bytes before the data region: fixed header, JSON, zero padding to [`ALIGN`].
fn encode_header(h: &PackHeader) -> Vec<u8> {
    let json = serde_json::to_vec(h).expect("the pack header serializes");
    let mut out = Vec::with_capacity(round_up(FIXED_HEADER + json.len() as u64, ALIGN) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(round_up(out.len() as u64, ALIGN) as usize, 0);
    out
}

/// Read and parse a sidecar's header; returns it with the data offset. Checks the magic, version and that the
/// file is exactly as long as the header says.
pub fn read_header(path: &Path) -> Result<(PackHeader, u64), FormatError> {
    let f = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| FormatError::io(path, e))?.len();
    let truncated = |what: &str, end: u64| FormatError::Truncated {
        path: path.to_path_buf(),
        what: what.into(),
        start: 0,
        end,
        file_len,
    };
    if file_len < FIXED_HEADER {
        return Err(truncated("the fixed header", FIXED_HEADER));
    }
    let mut fixed = [0u8; FIXED_HEADER as usize];
    f.read_exact_at(&mut fixed, 0).map_err(|e| FormatError::io(path, e))?;
    if fixed[..8] != MAGIC {
        return Err(FormatError::invalid(path, format!("bad magic {:?}, not a moestream pack", &fixed[..8])));
    }
    let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
    if !(1..=VERSION).contains(&version) {
        return Err(FormatError::invalid(path, format!("pack version {version}, this build reads 1 to {VERSION}")));
    }
    let json_len = u64::from_le_bytes(fixed[16..24].try_into().expect("8 bytes"));
    if json_len > MAX_JSON {
        return Err(FormatError::invalid(path, format!("header of {json_len} bytes is implausible")));
    }
    if FIXED_HEADER + json_len > file_len {
        return Err(truncated("the JSON header", FIXED_HEADER + json_len));
    }
    let mut json = vec![0u8; json_len as usize];
    f.read_exact_at(&mut json, FIXED_HEADER).map_err(|e| FormatError::io(path, e))?;
    let h: PackHeader =
        serde_json::from_slice(&json).map_err(|e| FormatError::Json { path: path.to_path_buf(), source: e })?;
    let data_offset = round_up(FIXED_HEADER + json_len, ALIGN);
    let end = data_offset.checked_add(h.data_len).ok_or_else(|| FormatError::invalid(path, "data_len overflows"))?;
    if file_len < end {
        return Err(truncated("the expert slabs", end));
    }
    if file_len != end {
        return Err(FormatError::invalid(path, format!("{file_len} bytes, the header describes {end}")));
    }
    Ok((h, data_offset))
}

/// [`write_with`] in layout [`Layout::File`].
pub fn write(index: &TensorIndex, out: &Path, progress: bool) -> Result<PackSummary, FormatError> {
    write_with(index, out, progress, Layout::File)
}

/// Write the sidecar of `index` to `out` (via `out.tmp`, renamed when complete and synced). Streams one slab at a
/// time through a small pool of buffers: a reader thread fills slabs while this thread writes them.
pub fn write_with(index: &TensorIndex, out: &Path, progress: bool, layout: Layout) -> Result<PackSummary, FormatError> {
    if let Some(p) = &index.pack {
        return Err(FormatError::invalid(
            p,
            "this index already reads experts from a pack; open the model with TensorIndex::open_without_pack",
        ));
    }
    let header = plan(index, layout)?;
    let head = encode_header(&header);
    let total = head.len() as u64 + header.data_len;
    let slabs: u64 = header.layers.iter().map(|l| l.experts as u64).sum();
    let payload: u64 =
        header.layers.iter().map(|l| l.experts as u64 * l.pieces.iter().map(|p| p.len).sum::<u64>()).sum();

    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = write_file(index, &header, &head, &tmp, progress, payload);
    let result = result.and_then(|()| {
        // A model rewritten while we read it would give a sidecar that matches neither version.
        let now: Vec<SourceFingerprint> = index.files.iter().map(|f| fingerprint(f)).collect::<Result<_, _>>()?;
        if now != header.sources {
            return Err(FormatError::invalid(&index.root, "the model files changed while packing; not writing"));
        }
        std::fs::rename(&tmp, out).map_err(|e| FormatError::io(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    Ok(PackSummary {
        path: out.to_path_buf(),
        bytes: total,
        payload_bytes: payload,
        layers: header.layers.len(),
        slabs,
    })
}

fn write_file(
    index: &TensorIndex,
    header: &PackHeader,
    head: &[u8],
    tmp: &Path,
    progress: bool,
    payload: u64,
) -> Result<(), FormatError> {
    let sources: Vec<File> =
        index.files.iter().map(|p| File::open(p).map_err(|e| FormatError::io(p, e))).collect::<Result<_, _>>()?;
    let mut out = File::create(tmp).map_err(|e| FormatError::io(tmp, e))?;
    out.write_all(head).map_err(|e| FormatError::io(tmp, e))?;

    let bar = if progress { indicatif::ProgressBar::new(payload) } else { indicatif::ProgressBar::hidden() };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} experts, {bytes_per_sec}, eta {eta}",
    ) {
        bar.set_style(style);
    }

    const BUFFERS: usize = 4;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, u64)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(Vec::new());
    }
    let result = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<(), FormatError> {
            for l in &header.layers {
                let projs: Vec<&TensorEntry> = l.pieces.iter().map(|p| &index.tensors[&p.tensor]).collect();
                // Packed pieces are read here first, then packed into the slab.
                let mut staging = Vec::new();
                for e in 0..l.experts {
                    let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
                    buf.resize(l.slab_len as usize, 0);
                    let mut used = 0usize;
                    for (p, t) in l.pieces.iter().zip(&projs) {
                        let r = ranges_of(t, p.kind)[e];
                        let dst = &mut buf[used..used + r.len as usize];
                        let into = if p.packed {
                            staging.resize(dst.len(), 0);
                            &mut staging[..]
                        } else {
                            &mut dst[..]
                        };
                        sources[r.file as usize].read_exact_at(into, r.offset).map_err(|err| {
                            FormatError::invalid(
                                index.file_path(r.file),
                                format!("reading {} bytes at offset {}: {err}", r.len, r.offset),
                            )
                        })?;
                        if p.packed {
                            let (rows, cols) = t.matrix_dims();
                            moestream_quant::packed::pack(t.encoding, &staging, dst, rows, cols).map_err(|err| {
                                FormatError::invalid(
                                    index.file_path(r.file),
                                    format!("packing {} expert {e}: {err}", t.name),
                                )
                            })?;
                        }
                        used += r.len as usize;
                    }
                    buf[used..].fill(0);
                    if full_tx.send((buf, used as u64)).is_err() {
                        return Ok(()); // the writer failed; it reports why
                    }
                }
            }
            Ok(())
        });
        let mut written = Ok(());
        for (buf, used) in full_rx.iter() {
            if let Err(e) = out.write_all(&buf) {
                written = Err(FormatError::io(tmp, e));
                break;
            }
            bar.inc(used);
            let _ = free_tx.send(buf);
        }
        drop(full_rx);
        drop(free_tx);
        let read = reader.join().unwrap_or_else(|_| Err(FormatError::invalid(tmp, "pack reader thread panicked")));
        read.and(written)
    });
    bar.finish_and_clear();
    result?;
    out.sync_all().map_err(|e| FormatError::io(tmp, e))
}

/// Use the default sidecar of `index` if there is one: on success the `_exps` ranges point into it; if it is
/// stale or corrupt the index is left as it was and a warning says why.
pub(crate) fn attach_if_present(index: &mut TensorIndex) {
    let path = default_path(index);
    if !path.exists() {
        return;
    }
    if let Err(why) = attach(index, &path) {
        index.warnings.push(format!(
            "ignoring pack sidecar {}: {why}; reading experts from the model files (run `moestream pack {}` to \
             rebuild it)",
            path.display(),
            index.root.display()
        ));
    }
}

/// Point the `_exps` ranges of `index` into the sidecar at `path`, after checking that it matches the model.
/// Nothing changes on error.
pub fn attach(index: &mut TensorIndex, path: &Path) -> Result<(), String> {
    if index.pack.is_some() {
        return Err("the index already uses a pack".into());
    }
    let (h, data_offset) = read_header(path).map_err(|e| e.to_string())?;
    // Sources: same files, same sizes, mtimes and head/tail hashes.
    if h.model_format != format_name(index.format) {
        return Err(format!("written for a {} model, this is {}", h.model_format, format_name(index.format)));
    }
    if h.align != ALIGN {
        return Err(format!("alignment {} (expected {ALIGN})", h.align));
    }
    if h.sources.len() != index.files.len() {
        return Err(format!("written for {} source files, the model has {}", h.sources.len(), index.files.len()));
    }
    for (want, file) in h.sources.iter().zip(&index.files) {
        let now = fingerprint(file).map_err(|e| e.to_string())?;
        if now != *want {
            let what = if now.name != want.name {
                format!("source file {} is now {}", want.name, now.name)
            } else if now.size != want.size {
                format!("{} changed size ({} → {} bytes)", want.name, want.size, now.size)
            } else if now.mtime_ns != want.mtime_ns {
                format!("{} was modified after packing (mtime changed)", want.name)
            } else {
                format!("{} changed content (head/tail hash differs)", want.name)
            };
            return Err(format!("stale: {what}"));
        }
    }
    // Shapes: the sidecar covers exactly this index's expert tensors, piece for piece.
    let file: FileId = index.files.len() as FileId;
    let mut tensors = index.tensors.clone();
    let mut covered = std::collections::BTreeSet::new();
    let mut prev_end = 0u64;
    for l in &h.layers {
        if l.slab_len % ALIGN != 0 || l.offset % ALIGN != 0 || l.offset < prev_end {
            return Err(format!("layer {}: misaligned or overlapping slabs", l.layer));
        }
        let end = l
            .slab_len
            .checked_mul(l.experts as u64)
            .and_then(|n| n.checked_add(l.offset))
            .filter(|&end| end <= h.data_len)
            .ok_or_else(|| format!("layer {}: slabs run past the data region", l.layer))?;
        prev_end = end;
        let mut used = 0u64;
        let mut seen = std::collections::BTreeSet::new();
        for p in &l.pieces {
            if p.offset != used {
                return Err(format!("layer {}: {} {:?} is not packed back to back", l.layer, p.tensor, p.kind));
            }
            used += p.len;
            let t = tensors.get_mut(&p.tensor).ok_or_else(|| format!("the model has no tensor {}", p.tensor))?;
            if !t.is_expert_stack() || !p.tensor.starts_with(&format!("blk.{}.", l.layer)) {
                return Err(format!("{} is not an expert tensor of layer {}", p.tensor, l.layer));
            }
            if t.shape != p.shape || t.encoding.name() != p.encoding || t.num_experts() != l.experts {
                return Err(format!(
                    "{}: packed as {:?} {} with {} experts, the model has {:?} {} with {}",
                    p.tensor,
                    p.shape,
                    p.encoding,
                    l.experts,
                    t.shape,
                    t.encoding.name(),
                    t.num_experts()
                ));
            }
            let (rows, cols) = t.matrix_dims();
            if p.packed && (p.kind != PieceKind::Data || !moestream_quant::packed::packable(t.encoding, rows, cols)) {
                return Err(format!(
                    "{} {:?}: marked packed, but {} {:?} has no packed form",
                    p.tensor, p.kind, p.encoding, p.shape
                ));
            }
            if p.kind == PieceKind::Data {
                t.data_packed = p.packed;
            }
            let ranges = match p.kind {
                PieceKind::Data => &mut t.data,
                PieceKind::Scales => &mut t.scales,
                PieceKind::Biases => &mut t.biases,
            };
            if ranges.len() != l.experts || ranges.iter().any(|r| r.len != p.len) {
                return Err(format!("{} {:?}: packed {} bytes per expert, the model differs", p.tensor, p.kind, p.len));
            }
            if !seen.insert((p.tensor.clone(), p.kind)) {
                return Err(format!("{} {:?} packed twice", p.tensor, p.kind));
            }
            for (e, r) in ranges.iter_mut().enumerate() {
                *r = FileRange { file, offset: data_offset + l.offset + e as u64 * l.slab_len + p.offset, len: p.len };
            }
        }
        if used > l.slab_len {
            return Err(format!("layer {}: pieces overflow the slab", l.layer));
        }
        covered.extend(seen);
    }
    for t in index.tensors.values().filter(|t| t.is_expert_stack()) {
        for kind in [PieceKind::Data, PieceKind::Scales, PieceKind::Biases] {
            if !ranges_of(t, kind).is_empty() && !covered.contains(&(t.name.clone(), kind)) {
                return Err(format!("{} {kind:?} is not in the pack", t.name));
            }
        }
    }
    index.tensors = tensors;
    index.files.push(path.to_path_buf());
    index.pack = Some(path.to_path_buf());
    Ok(())
}
