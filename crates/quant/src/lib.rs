//! Weight encodings and their scalar reference codecs.
//!
//! This crate owns the bit layouts: GGUF block types (`ggml`), MLX affine groups (`mlx`) and plain floats.
//! Every decoder here is the *reference* that later SIMD kernels are tested against, so each one is written
//! for obviousness, not speed. It knows nothing about models, files or tensor names.

pub mod float;
pub mod ggml;
pub mod mlx;
pub mod packed;

pub use float::{FloatType, decode_floats, encode_floats};
pub use ggml::GgmlType;
pub use mlx::MlxAffine;

/// How a tensor's elements are stored: the one description of a weight's bit layout that the index, the
/// store and the kernels share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float(FloatType),
    /// A GGUF block type (never F32/F16/BF16: those are `Float`).
    Ggml(GgmlType),
    /// MLX affine groups: packed u32 words plus per-group scales and biases of `scale_type`.
    MlxAffine {
        params: MlxAffine,
        scale_type: FloatType,
    },
    /// ggml `Q4_0` regrouped 16 rows at a time for the int8 kernels ([`packed`]). Never in a file: the store and
    /// the model pack `Q4_0` matrices whose row count is a multiple of 16 when the q8 kernels will run them. Same
    /// bytes per row (amortized) as `Q4_0`, but a row is not contiguous.
    Q4_0x16,
    /// ggml `Q4_K` regrouped 16 rows at a time ([`packed`]), the same way and for the same reasons as `Q4_0x16`.
    Q4Kx16,
    /// ggml `Q6_K` regrouped 16 rows at a time ([`packed`]), for the same reasons.
    Q6Kx16,
}

impl Encoding {
    /// Bytes of one row of `cols` elements, or `None` when `cols` does not fit the encoding's blocks or groups.
    /// For MLX this counts the packed codes only; scales and biases are separate buffers.
    // Inline across crates: the matmul kernels size a row per call on the token path.
    #[inline]
    pub fn row_bytes(&self, cols: usize) -> Option<usize> {
        match self {
            Encoding::Float(f) => cols.checked_mul(f.size()),
            Encoding::Ggml(t) => t.row_bytes(cols),
            Encoding::Q4_0x16 => GgmlType::Q4_0.row_bytes(cols),
            Encoding::Q4Kx16 => GgmlType::Q4K.row_bytes(cols),
            Encoding::Q6Kx16 => GgmlType::Q6K.row_bytes(cols),
            Encoding::MlxAffine { params, .. } => {
                cols.is_multiple_of(params.group_size).then(|| params.packed_bytes(cols))
            }
        }
    }

    /// Decode whole rows of `cols` elements stored in this encoding into `out` (its length fixes the row count).
    /// `scales` and `biases` are the MLX side buffers as stored (ignored for other encodings). MLX group scales are
    /// decoded through a fixed stack buffer, so this allocates nothing and has no limit on the row width.
    pub fn dequantize(
        &self,
        data: &[u8],
        scales: &[u8],
        biases: &[u8],
        cols: usize,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        match *self {
            Encoding::Float(ft) => decode_floats(ft, data, out),
            Encoding::Ggml(ty) => ggml::dequantize(ty, data, out),
            Encoding::Q4_0x16 => packed::dequantize_q4_0x16(data, cols, out),
            Encoding::Q4Kx16 => packed::dequantize_q4_kx16(data, cols, out),
            Encoding::Q6Kx16 => packed::dequantize_q6_kx16(data, cols, out),
            Encoding::MlxAffine { params, scale_type } => {
                params.validate()?;
                let g = params.group_size;
                if cols == 0 || !cols.is_multiple_of(g) || !out.len().is_multiple_of(cols) {
                    return Err(QuantError::PartialBlock { ty: "MLX affine rows", elems: out.len(), block: cols });
                }
                let groups = out.len() / g;
                let sz = scale_type.size();
                for (what, buf) in [("scales", scales), ("biases", biases)] {
                    if buf.len() != groups * sz {
                        return Err(QuantError::GroupCount { what, expected: groups, got: buf.len() / sz });
                    }
                }
                if data.len() != params.packed_bytes(out.len()) {
                    let expected = params.packed_bytes(out.len());
                    return Err(QuantError::ByteLength { ty: "MLX affine packed", expected, got: data.len() });
                }
                // Groups are independent, so runs of up to CHUNK groups (crossing rows freely) decode alone.
                const CHUNK: usize = 64;
                let (mut sc, mut bi) = ([0f32; CHUNK], [0f32; CHUNK]);
                let mut at = 0;
                while at < groups {
                    let n = CHUNK.min(groups - at);
                    decode_floats(scale_type, &scales[at * sz..(at + n) * sz], &mut sc[..n])?;
                    decode_floats(scale_type, &biases[at * sz..(at + n) * sz], &mut bi[..n])?;
                    let packed = &data[params.packed_bytes(at * g)..params.packed_bytes((at + n) * g)];
                    mlx::dequantize(params, packed, &sc[..n], &bi[..n], n * g, &mut out[at * g..(at + n) * g])?;
                    at += n;
                }
                Ok(())
            }
        }
    }

    /// Whether this is one of the 16-row interleaved forms ([`packed`]), which are walked by group, not by row.
    #[inline]
    pub fn is_packed(&self) -> bool {
        matches!(self, Encoding::Q4_0x16 | Encoding::Q4Kx16 | Encoding::Q6Kx16)
    }

    pub fn name(&self) -> String {
        match self {
            Encoding::Float(f) => f.name().to_string(),
            Encoding::Ggml(t) => t.name().to_string(),
            Encoding::Q4_0x16 => "Q4_0x16".to_string(),
            Encoding::Q4Kx16 => "Q4_Kx16".to_string(),
            Encoding::Q6Kx16 => "Q6_Kx16".to_string(),
            Encoding::MlxAffine { params, .. } => format!("MLX_Q{}_G{}", params.bits, params.group_size),
        }
    }
}

/// Errors from decoding or encoding a buffer. They carry sizes, never file names: the caller knows the file.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{ty}: {elems} elements is not a whole number of {block}-element blocks")]
    PartialBlock { ty: &'static str, elems: usize, block: usize },
    #[error("{ty}: expected {expected} bytes, got {got}")]
    ByteLength { ty: &'static str, expected: usize, got: usize },
    #[error("{ty}: output holds {got} elements, input has {expected}")]
    OutputLength { ty: &'static str, expected: usize, got: usize },
    #[error("{0} has no packed (16-row interleaved) form")]
    NoPackedForm(String),
    #[error("{0} has no encoder")]
    NoEncoder(&'static str),
    #[error("MLX affine: expected {expected} {what}, got {got}")]
    GroupCount { what: &'static str, expected: usize, got: usize },
    #[error("MLX affine: unsupported {what} {value}")]
    MlxParams { what: &'static str, value: usize },
}
