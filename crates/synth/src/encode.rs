//! Generate and encode one planned tensor: f32 values from the seed, then the target encoding.

use moestream_quant::{FloatType, GgmlType, MlxAffine};

use crate::SynthError;
use crate::plan::PlannedTensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Float(FloatType),
    Ggml(GgmlType),
    Mlx(MlxAffine, FloatType),
}

/// Encoded bytes of one expert (or of a whole plain tensor).
pub(crate) struct Encoded {
    pub data: Vec<u8>,
    /// MLX only.
    pub scales: Vec<u8>,
    pub biases: Vec<u8>,
}

fn quant_err(t: &PlannedTensor) -> impl FnOnce(moestream_quant::QuantError) -> SynthError + '_ {
    move |e| SynthError::Invalid(format!("encoding {}: {e}", t.name))
}

/// Encode unit `u` of `t`; `vals` is the caller's reusable scratch (reusing it avoids page-faulting fresh memory
/// for every expert, which was a tenth of synth's time).
fn encode_one(
    t: &PlannedTensor,
    seed: u64,
    u: usize,
    target: Target,
    vals: &mut Vec<f32>,
) -> Result<Encoded, SynthError> {
    let cols = t.matrix_dims().1;
    let rows = t.unit_rows(u);
    vals.resize(rows * cols, 0.0);
    let vals = &mut vals[..rows * cols];
    t.generate(seed, u, vals);
    encode_values(t, vals, target)
}

/// Encode `vals` (row-major, `t`'s columns) as `target`.
pub(crate) fn encode_values(t: &PlannedTensor, vals: &[f32], target: Target) -> Result<Encoded, SynthError> {
    let cols = t.matrix_dims().1;
    let rows = vals.len() / cols.max(1);
    let empty = || Encoded { data: Vec::new(), scales: Vec::new(), biases: Vec::new() };
    match target {
        Target::Float(ft) => {
            let mut out = empty();
            out.data = vec![0u8; vals.len() * ft.size()];
            moestream_quant::encode_floats(ft, vals, &mut out.data).map_err(quant_err(t))?;
            Ok(out)
        }
        Target::Ggml(ty) => {
            let row = ty.row_bytes(cols).ok_or_else(|| {
                SynthError::Invalid(format!("{}: {cols} columns is not a whole number of {ty} blocks", t.name))
            })?;
            let mut out = empty();
            out.data = vec![0u8; row * rows];
            moestream_quant::ggml::quantize(ty, vals, &mut out.data).map_err(quant_err(t))?;
            Ok(out)
        }
        Target::Mlx(p, sft) => {
            let groups = vals.len() / p.group_size;
            let mut packed = vec![0u8; p.packed_bytes(vals.len())];
            let mut scales = vec![0f32; groups];
            let mut biases = vec![0f32; groups];
            moestream_quant::mlx::quantize(p, vals, cols, &mut packed, &mut scales, &mut biases)
                .map_err(quant_err(t))?;
            let mut out = empty();
            out.data = packed;
            out.scales = vec![0u8; groups * sft.size()];
            out.biases = vec![0u8; groups * sft.size()];
            moestream_quant::encode_floats(sft, &scales, &mut out.scales).map_err(quant_err(t))?;
            moestream_quant::encode_floats(sft, &biases, &mut out.biases).map_err(quant_err(t))?;
            Ok(out)
        }
    }
}

/// Encode every unit of `t` (experts of a stack, row blocks of a plain tensor, in order), spread over all cores.
/// Concatenated in order, the units' bytes are the tensor's bytes.
pub(crate) fn encode_all(t: &PlannedTensor, seed: u64, target: Target) -> Result<Vec<Encoded>, SynthError> {
    let n = t.units();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(n);
    if threads <= 1 {
        let mut vals = Vec::new();
        return (0..n).map(|u| encode_one(t, seed, u, target, &mut vals)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<Result<Encoded, SynthError>>> = (0..n).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut slots);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut vals = Vec::new();
                loop {
                    let e = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if e >= n {
                        break;
                    }
                    let r = encode_one(t, seed, e, target, &mut vals);
                    if let Ok(mut g) = results.lock() {
                        g[e] = Some(r);
                    }
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(SynthError::Invalid(format!("{}: an encoder thread failed", t.name)))))
        .collect()
}
