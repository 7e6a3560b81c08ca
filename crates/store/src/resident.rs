//! Resident weights (the dense trunk) and the per-layer expert slot buffers.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use moestream_format::{Encoding, ExpertRanges, FileRange, TensorEntry, TensorIndex};
use moestream_quant::packed::packable;

use crate::reader::ReadRequest;
use crate::{AlignedBuf, StoreError};

/// Positioned reads from the index's files, with one open handle per file.
pub(crate) struct Files {
    handles: Vec<File>,
    paths: Vec<std::path::PathBuf>,
}

impl Files {
    pub(crate) fn open(index: &TensorIndex) -> Result<Self, StoreError> {
        let handles = index
            .files
            .iter()
            .map(|p| File::open(p).map_err(|source| StoreError::Open { path: p.clone(), source }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Files { handles, paths: index.files.clone() })
    }

    pub(crate) fn read(&self, r: FileRange, dst: &mut [u8]) -> Result<(), StoreError> {
        let f = &self.handles[r.file as usize];
        f.read_exact_at(dst, r.offset).map_err(|source| StoreError::Read {
            path: self.paths[r.file as usize].clone(),
            offset: r.offset,
            len: r.len,
            source,
        })
    }
}

/// One resident matrix (or vector, as one row) in its stored encoding.
pub struct OwnedWeight {
    pub encoding: Encoding,
    pub rows: usize,
    pub cols: usize,
    pub data: AlignedBuf,
    /// MLX only (empty otherwise): `rows × cols/group` values of the scale type.
    pub scales: AlignedBuf,
    pub biases: AlignedBuf,
}

fn read_all(files: &Files, ranges: &[FileRange]) -> Result<AlignedBuf, StoreError> {
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut buf = AlignedBuf::zeroed(total as usize)?;
    let mut at = 0usize;
    for r in ranges {
        files.read(*r, &mut buf.as_mut_slice()[at..at + r.len as usize])?;
        at += r.len as usize;
    }
    Ok(buf)
}

impl OwnedWeight {
    fn load(files: &Files, t: &TensorEntry) -> Result<Self, StoreError> {
        let (rows, cols) = t.matrix_dims();
        let rows = rows * t.data.len().max(1);
        Ok(OwnedWeight {
            encoding: t.encoding,
            rows,
            cols,
            data: read_all(files, &t.data)?,
            scales: read_all(files, &t.scales)?,
            biases: read_all(files, &t.biases)?,
        })
    }
}

/// The dense trunk: every tensor that is not a routed expert, resident for the life of the model.
pub struct ResidentWeights {
    weights: Vec<OwnedWeight>,
    /// Name → index into `weights`. Models resolve names to `WeightId`s once at load, so the token path does no
    /// string formatting or hashing.
    ids: HashMap<String, WeightId>,
    vectors: HashMap<String, Vec<f32>>,
}

/// A resident 2-D weight, resolved once by name (`ResidentWeights::id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightId(u32);

impl ResidentWeights {
    /// Load every non-expert tensor. 1-D tensors (norms) and conv1d kernels are decoded to f32 instead, since every
    /// op reads them whole.
    pub fn load(index: &TensorIndex) -> Result<Self, StoreError> {
        let files = Files::open(index)?;
        let mut weights = Vec::new();
        let mut ids = HashMap::new();
        let mut vectors = HashMap::new();
        for t in index.tensors.values().filter(|t| !t.is_expert_stack()) {
            // Norms and other per-channel vectors, and depthwise conv kernels: small, and read whole in f32.
            if t.shape.len() == 1 || t.name.ends_with(".ssm_conv1d.weight") {
                vectors.insert(t.name.clone(), index.load_f32(&t.name)?);
            } else {
                ids.insert(t.name.clone(), WeightId(weights.len() as u32));
                weights.push(OwnedWeight::load(&files, t)?);
            }
        }
        Ok(ResidentWeights { weights, ids, vectors })
    }

    pub fn get(&self, name: &str) -> Result<&OwnedWeight, StoreError> {
        self.id(name).map(|id| self.at(id))
    }

    /// The id of 2-D weight `name`, for `at`.
    pub fn id(&self, name: &str) -> Result<WeightId, StoreError> {
        self.ids
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::Layout { tensor: name.into(), msg: "not resident".into() })
    }

    pub fn at(&self, id: WeightId) -> &OwnedWeight {
        &self.weights[id.0 as usize]
    }

    /// Repacks every matrix of an encoding in `set` (`Q4_0`, `Q4_K`, `Q6_K`) with a multiple of 16 rows in its 16-row
    /// form, except `keep`
    /// (weights read by row, such as the token embedding). Returns how many were packed. Load time only: each
    /// matrix is packed into a new buffer, which then replaces the old one.
    pub fn pack(&mut self, keep: &[WeightId], set: moestream_quant::packed::PackSet) -> Result<usize, StoreError> {
        let mut n = 0;
        for (i, w) in self.weights.iter_mut().enumerate() {
            let to = match moestream_quant::packed::packed_form(w.encoding) {
                Some(to) if set.packs(w.encoding) && packable(w.encoding, w.rows, w.cols) => to,
                _ => continue,
            };
            if keep.contains(&WeightId(i as u32)) {
                continue;
            }
            let mut packed = AlignedBuf::zeroed(w.data.len())?;
            moestream_quant::packed::pack(w.encoding, w.data.as_slice(), packed.as_mut_slice(), w.rows, w.cols)
                .map_err(|e| StoreError::Layout {
                    tensor: format!("resident weight #{i}"),
                    msg: format!("packing: {e}"),
                })?;
            w.data = packed;
            w.encoding = to;
            n += 1;
        }
        Ok(n)
    }

    pub fn vector(&self, name: &str) -> Result<&[f32], StoreError> {
        self.vectors
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| StoreError::Layout { tensor: name.into(), msg: "no such 1-D tensor".into() })
    }

    pub fn bytes(&self) -> u64 {
        let w: u64 = self.weights.iter().map(|w| (w.data.len() + w.scales.len() + w.biases.len()) as u64).sum();
        w + self.vectors.values().map(|v| v.len() as u64 * 4).sum::<u64>()
    }
}

/// The stacked slot buffers of one projection: `[slots, rows, row_bytes]` plus MLX scales and biases. The gate+up
/// buffer stacks gate's rows then up's rows in each slot, so one slot is one `[2·I, H]` matrix.
pub struct SlotBuffer {
    /// How the slots hold the weights: the file's encoding, or its packed form.
    pub encoding: Encoding,
    /// How the file (or a packed sidecar) stores them: what a read brings in before any packing or unpacking.
    file_encoding: Encoding,
    pub rows: usize,
    pub cols: usize,
    pub data: AlignedBuf,
    pub scales: AlignedBuf,
    pub biases: AlignedBuf,
    data_stride: usize,
    group_stride: usize,
}

impl SlotBuffer {
    /// A buffer whose slots hold `parts` (one expert of each tensor, stacked by rows) back to back. With `pack`,
    /// parts with a packed form (`Q4_0`, `Q4_K`, `Q6_K`) whose row counts are multiples of 16 are stored packed
    /// (each part on its own, so gate and up stay separate groups).
    pub(crate) fn new(
        parts: &[&TensorEntry],
        cols: usize,
        slots: usize,
        pack: moestream_quant::packed::PackSet,
    ) -> Result<Self, StoreError> {
        let first = parts[0];
        let mut rows = 0;
        let (mut data_stride, mut group_stride) = (0usize, 0usize);
        for t in parts {
            if t.encoding != first.encoding {
                return Err(StoreError::Layout {
                    tensor: t.name.clone(),
                    msg: format!(
                        "encoded as {} but {} is {}; fused gate+up needs one encoding",
                        t.encoding.name(),
                        first.name,
                        first.encoding.name()
                    ),
                });
            }
            let e0 =
                t.expert(0).ok_or_else(|| StoreError::Layout { tensor: t.name.clone(), msg: "no expert 0".into() })?;
            rows += t.matrix_dims().0;
            data_stride += e0.data.len as usize;
            group_stride += e0.scales.map(|r| r.len as usize).unwrap_or(0);
        }
        let all_packable = parts.iter().all(|t| packable(first.encoding, t.matrix_dims().0, cols));
        let packed_form = moestream_quant::packed::packed_form(first.encoding);
        // A packed sidecar holds some parts already in their packed form: the read then lands as is, or is
        // unpacked on the way when the kernels want the file's encoding.
        let stored_packed = first.data_packed;
        if let Some(t) = parts.iter().find(|t| t.data_packed != stored_packed) {
            return Err(StoreError::Layout {
                tensor: t.name.clone(),
                msg: format!(
                    "stored packed = {} but {} is {stored_packed}; fused gate+up needs one form",
                    t.data_packed, first.name
                ),
            });
        }
        let stored = match (stored_packed, packed_form) {
            (false, _) => first.encoding,
            (true, Some(form)) if all_packable => form,
            (true, _) => {
                return Err(StoreError::Layout {
                    tensor: first.name.clone(),
                    msg: format!("stored packed, but {} {:?} has no packed form", first.encoding.name(), first.shape),
                });
            }
        };
        Ok(SlotBuffer {
            encoding: packed_form.filter(|_| pack.packs(first.encoding) && all_packable).unwrap_or(first.encoding),
            file_encoding: stored,
            rows,
            cols,
            data: AlignedBuf::zeroed(data_stride * slots)?,
            scales: AlignedBuf::zeroed(group_stride * slots)?,
            biases: AlignedBuf::zeroed(group_stride * slots)?,
            data_stride,
            group_stride,
        })
    }

    /// Everything that decides where a slot's bytes go and how the kernels read them: buffers with equal layouts
    /// can hold each other's experts.
    pub(crate) fn layout(&self) -> (Encoding, Encoding, usize, usize, usize, usize) {
        (self.encoding, self.file_encoding, self.rows, self.cols, self.data_stride, self.group_stride)
    }

    /// Whether a read changes the bytes on the way into a slot (packs them, or unpacks a packed sidecar's).
    pub(crate) fn converts(&self) -> bool {
        self.encoding != self.file_encoding
    }

    /// (data, scales, biases) of slot `s`: references to this slot's bytes only, since other slots may be
    /// being filled by the expert reader at the same time.
    pub fn slot(&self, s: usize) -> (&[u8], &[u8], &[u8]) {
        let d = self.data.range(s * self.data_stride..(s + 1) * self.data_stride);
        let g = s * self.group_stride..(s + 1) * self.group_stride;
        (d, self.scales.range(g.clone()), self.biases.range(g))
    }

    /// Queue reads of one expert's `parts` (gate and up, or down) into slot `s`: one request per range, each
    /// aimed straight at its place in the slot. Pushes into `out` without growing it past its reserved capacity.
    pub(crate) fn plan_fill(
        &mut self,
        parts: &[ExpertRanges],
        s: usize,
        tag: u32,
        now: Instant,
        out: &mut Vec<ReadRequest>,
    ) {
        let (mut d_at, mut g_at) = (s * self.data_stride, s * self.group_stride);
        let (data, scales, biases) = (self.data.as_mut_ptr(), self.scales.as_mut_ptr(), self.biases.as_mut_ptr());
        debug_assert!((d_at + self.data_stride) <= self.data.len());
        for r in parts {
            // SAFETY (all three `add`s): the offsets stay inside slot `s` of their buffer, by the strides computed in
            // `new` from these same tensors' expert ranges.
            let req = ReadRequest::new(r.data, unsafe { data.add(d_at) }, tag, now);
            out.push(if self.converts() { req.converted(self.file_encoding, self.encoding, self.cols) } else { req });
            d_at += r.data.len as usize;
            if let (Some(sc), Some(bi)) = (r.scales, r.biases) {
                out.push(ReadRequest::new(sc, unsafe { scales.add(g_at) }, tag, now));
                out.push(ReadRequest::new(bi, unsafe { biases.add(g_at) }, tag, now));
                g_at += sc.len as usize;
            }
        }
    }
}
