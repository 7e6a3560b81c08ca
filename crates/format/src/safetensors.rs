//! safetensors files, single or sharded, read through the `safetensors` crate.
//!
//! We read only the header (8-byte length + JSON) with one positioned read and let the crate validate it
//! (offsets contiguous, sizes consistent with dtype and shape). What the crate cannot know is the file length,
//! so a truncated download is caught here. Tensor bytes are never read by this module: it returns byte ranges
//! for the tensor index, and the store reads them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use crate::FormatError;

/// Header size cap; the crate enforces 100 MB, we refuse to even allocate past it.
const MAX_HEADER: u64 = 100_000_000;

/// Element types a checkpoint may hold. MLX packs quantized weights as U32; U8 appears in some packings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    U32,
    U8,
}

impl StDtype {
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 | StDtype::U32 => 4,
            StDtype::F16 | StDtype::BF16 => 2,
            StDtype::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::U32 => "U32",
            StDtype::U8 => "U8",
        }
    }

    fn from_crate(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(StDtype::F32),
            Dtype::F16 => Some(StDtype::F16),
            Dtype::BF16 => Some(StDtype::BF16),
            Dtype::U32 => Some(StDtype::U32),
            Dtype::U8 => Some(StDtype::U8),
            _ => None,
        }
    }
}

/// One tensor of a safetensors file: where its bytes are, absolute in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StTensor {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub tensors: Vec<StTensor>,
    pub metadata: BTreeMap<String, String>,
    pub file_len: u64,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let mut f = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let file_len = f.metadata().map_err(|e| FormatError::io(path, e))?.len();
        let truncated = |what: &str, end: u64| FormatError::Truncated {
            path: path.to_path_buf(),
            what: what.into(),
            start: 0,
            end,
            file_len,
        };
        if file_len < 8 {
            return Err(truncated("the 8-byte header length", 8));
        }
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| FormatError::io(path, e))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(FormatError::invalid(path, format!("header length {n} exceeds the {MAX_HEADER}-byte limit")));
        }
        if 8 + n > file_len {
            return Err(truncated(&format!("the {n}-byte JSON header"), 8 + n));
        }
        let mut buf = vec![0u8; 8 + n as usize];
        buf[..8].copy_from_slice(&n.to_le_bytes());
        f.read_exact(&mut buf[8..]).map_err(|e| FormatError::io(path, e))?;
        let text = std::str::from_utf8(&buf[8..])
            .map_err(|e| FormatError::invalid(path, format!("header is not UTF-8: {e}")))?;
        // A pass over the raw JSON first, so that malformed JSON and unknown dtypes are reported with the tensor
        // name; the crate's own errors for these are less specific.
        let raw: Value =
            serde_json::from_str(text).map_err(|source| FormatError::Json { path: path.to_path_buf(), source })?;
        let obj = raw.as_object().ok_or_else(|| FormatError::invalid(path, "header is not a JSON object"))?;
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info.get("dtype").and_then(Value::as_str).unwrap_or("<missing>");
            let size = match dtype {
                "F32" | "U32" => 4u64,
                "F16" | "BF16" => 2,
                "U8" => 1,
                _ => {
                    return Err(FormatError::UnknownDtype {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                        dtype: dtype.into(),
                    });
                }
            };
            // The crate checks this too, but its error names neither the tensor nor the sizes.
            let shape: Option<Vec<u64>> =
                info.get("shape").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_u64).collect());
            let offs: Option<Vec<u64>> = info
                .get("data_offsets")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect());
            if let (Some(shape), Some(offs)) = (shape, offs) {
                let expected = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
                if let (Some(expected), [s, e]) = (expected, offs.as_slice()) {
                    let got = e.saturating_sub(*s);
                    if expected != got {
                        return Err(FormatError::SizeMismatch {
                            path: path.to_path_buf(),
                            tensor: name.clone(),
                            shape,
                            dtype: dtype.into(),
                            expected,
                            got,
                        });
                    }
                }
            }
        }
        let meta: safetensors::tensor::Metadata = serde_json::from_str(text)
            .map_err(|e| FormatError::invalid(path, format!("invalid safetensors header: {e}")))?;
        let data_start = 8 + n;
        let data_end = data_start + meta.data_len() as u64;
        if data_end > file_len {
            return Err(FormatError::Truncated {
                path: path.to_path_buf(),
                what: "tensor data".into(),
                start: data_start,
                end: data_end,
                file_len,
            });
        }
        if data_end < file_len {
            // The format has no trailing section; extra bytes mean a wrong header or a mis-joined file.
            return Err(FormatError::invalid(
                path,
                format!(
                    "header describes {} bytes of tensor data but the file holds {} after the header",
                    data_end - data_start,
                    file_len - data_start
                ),
            ));
        }
        let infos = meta.tensors();
        let mut tensors = Vec::with_capacity(infos.len());
        for name in meta.offset_keys() {
            let Some(info) = infos.get(&name) else { continue };
            let dtype = StDtype::from_crate(info.dtype).ok_or_else(|| FormatError::UnknownDtype {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("{:?}", info.dtype),
            })?;
            let (s, e) = info.data_offsets;
            tensors.push(StTensor {
                name,
                dtype,
                shape: info.shape.clone(),
                offset: data_start + s as u64,
                len: (e - s) as u64,
            });
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), tensors, metadata, file_len })
    }
}

/// All safetensors files of a checkpoint directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names (every shard must exist, and every tensor it maps must be in its shard).
#[derive(Debug, Clone)]
pub struct SafetensorsSet {
    pub files: Vec<SafetensorsFile>,
}

impl SafetensorsSet {
    pub fn open_dir(dir: &Path) -> Result<Self, FormatError> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| FormatError::io(&index, e))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|source| FormatError::Json { path: index.clone(), source })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| FormatError::MissingField { path: index.clone(), field: "weight_map".into() })?;
            let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    FormatError::invalid(&index, format!("weight_map entry for `{tensor}` is not a file name"))
                })?;
                if shard.contains('/') || shard.contains('\\') || shard == ".." {
                    return Err(FormatError::invalid(&index, format!("shard name `{shard}` is not a plain file name")));
                }
                shards.entry(shard.to_string()).or_default().push(tensor.clone());
            }
            let mut files = Vec::with_capacity(shards.len());
            for (shard, names) in shards {
                let p = dir.join(&shard);
                if !p.exists() {
                    return Err(FormatError::invalid(
                        &index,
                        format!("shard `{shard}` (holding {} tensors, e.g. `{}`) is missing", names.len(), names[0]),
                    ));
                }
                let file = SafetensorsFile::open(&p)?;
                for n in &names {
                    if !file.tensors.iter().any(|t| &t.name == n) {
                        return Err(FormatError::MissingTensor { path: p.clone(), tensor: n.clone() });
                    }
                }
                files.push(file);
            }
            return Ok(SafetensorsSet { files });
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(SafetensorsSet { files: vec![SafetensorsFile::open(&single)?] });
        }
        // Some exports use other names; take every *.safetensors in the directory, sorted.
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| FormatError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(FormatError::invalid(
                dir,
                "no model.safetensors, index or *.safetensors file in the directory",
            ));
        }
        let files = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(SafetensorsSet { files })
    }
}

/// Streaming safetensors writer: the header is fixed up front from names, dtypes and shapes (serialised by the
/// `safetensors` crate's own `Metadata`, so the JSON is the crate's), then tensor bytes are written in the order
/// given, in as many chunks as the caller likes. The crate's `serialize_to_file` needs every tensor's bytes in
/// memory in its own sorted order; synthetic 17 GB models need neither.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    /// (name, expected bytes) in write order.
    plan: Vec<(String, u64)>,
    current: usize,
    written_in_current: u64,
}

impl SafetensorsWriter {
    pub fn create(
        path: &Path,
        tensors: &[(String, StDtype, Vec<usize>)],
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, FormatError> {
        use std::io::Write;
        let mut infos = Vec::with_capacity(tensors.len());
        let mut plan = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (name, dtype, shape) in tensors {
            let n = shape.iter().product::<usize>() * dtype.size();
            let dtype = match dtype {
                StDtype::F32 => Dtype::F32,
                StDtype::F16 => Dtype::F16,
                StDtype::BF16 => Dtype::BF16,
                StDtype::U32 => Dtype::U32,
                StDtype::U8 => Dtype::U8,
            };
            infos.push((
                name.clone(),
                safetensors::tensor::TensorInfo { dtype, shape: shape.clone(), data_offsets: (offset, offset + n) },
            ));
            plan.push((name.clone(), n as u64));
            offset += n;
        }
        let meta = safetensors::tensor::Metadata::new(metadata, infos)
            .map_err(|e| FormatError::invalid(path, format!("cannot build safetensors header: {e}")))?;
        let mut header = serde_json::to_string(&meta)
            .map_err(|e| FormatError::invalid(path, format!("cannot serialise safetensors header: {e}")))?
            .into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        let f = File::create(path).map_err(|e| FormatError::io(path, e))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, f);
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(|e| FormatError::io(path, e))?;
        out.write_all(&header).map_err(|e| FormatError::io(path, e))?;
        Ok(SafetensorsWriter { path: path.to_path_buf(), out, plan, current: 0, written_in_current: 0 })
    }

    /// Append bytes of tensor `name`, which must be the tensor currently being written (or the next one once the
    /// current one is complete).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        use std::io::Write;
        if self.current < self.plan.len() && self.written_in_current == self.plan[self.current].1 {
            self.current += 1;
            self.written_in_current = 0;
        }
        let Some((want, len)) = self.plan.get(self.current) else {
            return Err(FormatError::invalid(&self.path, format!("write of `{name}` after the last tensor")));
        };
        if want != name {
            return Err(FormatError::invalid(&self.path, format!("wrote `{name}` while `{want}` is due")));
        }
        if self.written_in_current + bytes.len() as u64 > *len {
            return Err(FormatError::invalid(&self.path, format!("tensor `{name}` overflows its {len} bytes")));
        }
        self.out.write_all(bytes).map_err(|e| FormatError::io(&self.path, e))?;
        self.written_in_current += bytes.len() as u64;
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), FormatError> {
        use std::io::Write;
        let done = self.plan.is_empty()
            || (self.current + 1 == self.plan.len() && self.written_in_current == self.plan[self.current].1);
        if !done {
            let name = self.plan.get(self.current).map(|p| p.0.as_str()).unwrap_or("?");
            return Err(FormatError::invalid(&self.path, format!("finished before tensor `{name}` was complete")));
        }
        self.out.flush().map_err(|e| FormatError::io(&self.path, e))
    }
}
