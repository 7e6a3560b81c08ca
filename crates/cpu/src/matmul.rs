//! Matrix-vector products over quantized weight rows: `gemv`, `gemm` (prefill) and the gathered MoE matmuls.
//!
//! This module owns the *shape* side: validating [`WeightView`]s, splitting rows into pool tasks, SwiGLU and the
//! weighted expert sum. The only arithmetic kernel is a per-row dot product (`RowRef · x`), chosen once per
//! process by runtime CPU detection ([`Dispatch::best`]) from:
//! - `scalar`: the reference (decode with `moestream_quant`, then dot in f32), used for every encoding;
//! - `x86::avx2` / `x86::avx512`: SIMD kernels for the encodings real checkpoints use, in two flavours: exact f32
//!   ([`Dispatch::new`]) and q8 activations ([`Dispatch::new_q8`]: `x` quantized once per call into a
//!   thread-local scratch, integer dot products for Q4_0/Q8_0/Q4_K/Q6_K/MLX q4; for Q4_K and Q6_K one activation
//!   scale per 256 values, ggml's `Q8_K`, so their sub-block scales are applied in integers);
//! - `arm::row_dot` / `arm::row_dot_q8`: NEON kernels for the same encodings on aarch64 (exact f32; the q8 table
//!   needs the `dotprod` extension for `sdot`).
//!
//! `Q4_0x16`, `Q4_Kx16` and `Q6_Kx16` views (ggml `Q4_0` / `Q4_K` / `Q6_K` regrouped 16 rows at a time, see
//! `packed`) have no rows to hand out: every entry point walks them by 16-row group instead, through `packed`'s
//! kernels (AVX-512 VNNI for one token and, for the K forms, four; AMX tiles for `Q4_0x16` `gemm` where the CPU and
//! OS allow; a scalar reference otherwise), which all give the same bits.
//!
//! It must not allocate on the per-call path, own weight memory, or know which model or expert a view belongs to.
//! Every output element is written by exactly one task with a fixed summation order, so results are bit-identical
//! for any thread count.

#[cfg(target_arch = "aarch64")]
mod arm;
mod packed;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;
use std::sync::OnceLock;

use moestream_quant::packed::{GROUP, PackSet};
use moestream_quant::{Encoding, QuantError};

use crate::pool::ThreadPool;

/// A row-major weight matrix `[rows, cols]` borrowed from someone else's memory (a slot, an mmap, a resident
/// tensor).
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub encoding: Encoding,
    pub rows: usize,
    pub cols: usize,
    /// `rows × encoding.row_bytes(cols)` bytes.
    pub data: &'a [u8],
    /// MLX only: `rows × cols / group_size` values of `scale_type`. Empty otherwise.
    pub scales: &'a [u8],
    /// MLX only: same shape as `scales`. Empty otherwise.
    pub biases: &'a [u8],
}

/// Why a matmul call was refused. Nothing is computed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatmulError {
    #[error("{}: {cols} columns is not a whole number of blocks or groups", .encoding.name())]
    Cols { encoding: Encoding, cols: usize },
    #[error("{}: {source}", .encoding.name())]
    Params { encoding: Encoding, source: QuantError },
    #[error("{} [{rows}, {cols}]: {what} holds {got} bytes, expected {expected}", .encoding.name())]
    Bytes { encoding: Encoding, what: &'static str, rows: usize, cols: usize, expected: usize, got: usize },
    #[error("{} [{rows}, {cols}]: byte size overflows usize", .encoding.name())]
    TooLarge { encoding: Encoding, rows: usize, cols: usize },
    #[error("{what}: expected {expected} values, got {got}")]
    Len { what: &'static str, expected: usize, got: usize },
    #[error("{what} slot {slot} is [{rows}, {cols}], expected [{expected_rows}, {expected_cols}]")]
    SlotShape { what: &'static str, slot: usize, rows: usize, cols: usize, expected_rows: usize, expected_cols: usize },
    #[error("gate_up slot has {rows} rows; a fused [2I, H] view needs an even count")]
    OddGateUp { rows: usize },
    #[error("{} [{rows}, {cols}]: {what} is not a whole number of 16-row groups", .encoding.name())]
    PackedRows { encoding: Encoding, what: &'static str, rows: usize, cols: usize },
    #[error("{what} slot {slot} is {got}, but slot 0 is {first}; packed slots cannot be mixed with other encodings")]
    MixedPacking { what: &'static str, slot: usize, got: String, first: String },
}

impl WeightView<'_> {
    /// Checks that the encoding's parameters are valid, `cols` fits its blocks or groups, and `data`, `scales`
    /// and `biases` hold exactly the bytes a `[rows, cols]` matrix needs. Never panics.
    pub fn validate(&self) -> Result<(), MatmulError> {
        let (encoding, rows, cols) = (self.encoding, self.rows, self.cols);
        let bytes = |what, expected: usize, got: usize| {
            if expected == got { Ok(()) } else { Err(MatmulError::Bytes { encoding, what, rows, cols, expected, got }) }
        };
        let too_large = MatmulError::TooLarge { encoding, rows, cols };
        if let Encoding::MlxAffine { params, .. } = encoding {
            params.validate().map_err(|source| MatmulError::Params { encoding, source })?;
        }
        let row_bytes = encoding.row_bytes(cols).ok_or(MatmulError::Cols { encoding, cols })?;
        if encoding.is_packed() && !rows.is_multiple_of(GROUP) {
            return Err(MatmulError::PackedRows { encoding, what: "the row count", rows, cols });
        }
        bytes("data", rows.checked_mul(row_bytes).ok_or(too_large.clone())?, self.data.len())?;
        let side = side_row_bytes(encoding, cols);
        let side = rows.checked_mul(side).ok_or(too_large)?;
        bytes("scales", side, self.scales.len())?;
        bytes("biases", side, self.biases.len())
    }

    /// Row `r` of a validated view.
    #[inline]
    fn row(&self, r: usize) -> RowRef<'_> {
        self.rows().get(r)
    }

    /// Row access with the row sizes computed once (the per-row form costs two encoding matches per row).
    #[inline]
    fn rows(&self) -> Rows<'_> {
        let rb = self.encoding.row_bytes(self.cols).unwrap_or(0);
        Rows { w: self, rb, sb: side_row_bytes(self.encoding, self.cols) }
    }
}

/// The rows of a validated view, sizes precomputed.
#[derive(Clone, Copy)]
struct Rows<'a> {
    w: &'a WeightView<'a>,
    rb: usize,
    sb: usize,
}

impl<'a> Rows<'a> {
    #[inline]
    fn get(&self, r: usize) -> RowRef<'a> {
        let (rb, sb) = (self.rb, self.sb);
        RowRef {
            encoding: self.w.encoding,
            data: &self.w.data[r * rb..(r + 1) * rb],
            scales: &self.w.scales[r * sb..(r + 1) * sb],
            biases: &self.w.biases[r * sb..(r + 1) * sb],
        }
    }
}

/// Bytes of scales (or of biases) per row: MLX only.
fn side_row_bytes(encoding: Encoding, cols: usize) -> usize {
    match encoding {
        Encoding::MlxAffine { params, scale_type } if params.group_size > 0 => {
            cols / params.group_size * scale_type.size()
        }
        _ => 0,
    }
}

/// One row of a validated [`WeightView`]: what a kernel sees. `x` (passed beside it) has the row's column count.
#[derive(Clone, Copy)]
pub(crate) struct RowRef<'a> {
    pub(crate) encoding: Encoding,
    pub(crate) data: &'a [u8],
    pub(crate) scales: &'a [u8],
    pub(crate) biases: &'a [u8],
}

/// The activations a row is dotted with: always the f32 values, plus their q8 blocks when the table quantizes
/// activations and the column count is a whole number of 32-blocks (empty otherwise). For Q4_K and Q6_K rows the
/// blocks come in groups of 8 sharing one scale ([`with_q8`] quantizes by the weights' encoding); their x86
/// kernels read the scale of a group's first block only.
pub(crate) struct Act<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) q8: &'a [Q8Block],
}

/// 32 activations quantized ggml-`Q8_0`-style (`x ≈ d·q`, `|q| ≤ 127`, round half away from zero), with an f32
/// scale (not f16: the scale costs nothing here and f16 would add error), the code sum (for formats with a zero
/// point, e.g. Q4_0's `-8`; ggml's `bsums` for Q4_K mins) and the exact f32 sum of the 32 inputs (for offsets:
/// MLX biases, and Q4_K mins in the aarch64 q8 kernel).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8Block {
    pub(crate) qs: [i8; 32],
    pub(crate) d: f32,
    pub(crate) qsum: i32,
    pub(crate) xsum: f32,
}

impl Q8Block {
    const ZERO: Q8Block = Q8Block { qs: [0; 32], d: 0.0, qsum: 0, xsum: 0.0 };
}

/// Quantizes whole 32-blocks of `x` into `out` (same block count), `group` consecutive blocks sharing one scale
/// (the largest magnitude over the group): 1 is ggml's `Q8_0`, 8 its `Q8_K` (one scale per 256, which is what
/// lets the K-quant kernels apply their sub-block scales in integers and one float multiply per super-block).
/// `x.len()` is a multiple of `32·group`. AVX-512 where available (activations of a 512-token prefill are
/// ~17 M values per layer), with the same bits as [`quantize_q8_scalar`].
fn quantize_q8(x: &[f32], out: &mut [Q8Block], group: usize) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512() {
        // SAFETY: AVX-512 F/BW/VL checked; same contract as the scalar version.
        return unsafe { x86::quantize_q8_avx512(x, out, group) };
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: AVX2 and FMA checked; same contract as the scalar version.
        return unsafe { x86::quantize_q8_avx2(x, out, group) };
    }
    quantize_q8_scalar(x, out, group)
}

/// The reference quantizer. `xsum` is summed pairwise (`x[i] + x[i+16]`, then halving), the order a 16-lane
/// reduction takes, so SIMD versions match it bit for bit.
fn quantize_q8_scalar(x: &[f32], out: &mut [Q8Block], group: usize) {
    for (bs, xs) in out.chunks_mut(group).zip(x.chunks(32 * group)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        for (b, xb) in bs.iter_mut().zip(xs.chunks_exact(32)) {
            let mut qsum = 0i32;
            for (q, &v) in b.qs.iter_mut().zip(xb) {
                *q = round_half_away(v * id) as i8;
                qsum += i32::from(*q);
            }
            let mut s: [f32; 16] = std::array::from_fn(|i| xb[i] + xb[i + 16]);
            for w in [8, 4, 2, 1] {
                for i in 0..w {
                    s[i] += s[i + w];
                }
            }
            (b.d, b.qsum, b.xsum) = (d, qsum, s[0]);
        }
    }
}

/// Blocks per shared activation scale for weights of encoding `e` (see [`quantize_q8`]): 8 for the K-quants
/// whose q8 kernels rely on it, 1 otherwise.
fn q8_group(e: Encoding) -> usize {
    use moestream_quant::GgmlType;
    if matches!(e, Encoding::Ggml(GgmlType::Q4K | GgmlType::Q6K) | Encoding::Q4Kx16 | Encoding::Q6Kx16) { 8 } else { 1 }
}

/// `r.round()` for `|r| < 2²³` without the libm call `round` becomes on baseline x86-64 (no SSE4.1): truncate,
/// then step away from zero when the exact remainder is at least one half.
#[inline]
fn round_half_away(r: f32) -> i32 {
    let t = r as i32;
    let f = r - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

thread_local! {
    /// Per calling thread, grown to the largest activation seen and then reused: the per-call path does not
    /// allocate once warm. Workers only read it, through the slice `run` lends them.
    static Q8_SCRATCH: RefCell<Vec<Q8Block>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `x` (a whole number of `cols`-long vectors) quantized to q8 blocks for weights of encoding `e`
/// when `enabled` and `cols` is a multiple of 32 (of 256 for K-quants, which always holds for a valid view);
/// otherwise (or if re-entered on the same thread) with no blocks, which selects the f32 kernels.
fn with_q8<R>(enabled: bool, x: &[f32], cols: usize, e: Encoding, f: impl FnOnce(&[Q8Block]) -> R) -> R {
    let group = q8_group(e);
    if !enabled || cols == 0 || !cols.is_multiple_of(32 * group) {
        return f(&[]);
    }
    Q8_SCRATCH.with(|cell| {
        let Ok(mut v) = cell.try_borrow_mut() else {
            return f(&[]);
        };
        let n = x.len() / 32;
        if v.len() < n {
            v.resize(n, Q8Block::ZERO);
        }
        quantize_q8(x, &mut v[..n], group);
        f(&v[..n])
    })
}

thread_local! {
    /// Per calling thread, like [`Q8_SCRATCH`]: the expert parts of the current [`Dispatch::gathered_down`].
    static PARTS_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch of `len` floats (contents unspecified), reused across calls on this thread.
fn with_parts<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    PARTS_SCRATCH.with(|cell| {
        let Ok(mut v) = cell.try_borrow_mut() else {
            // Re-entered on this thread (no caller does today): a buffer of its own rather than a panic.
            return f(&mut vec![0.0; len]);
        };
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per calling thread, like [`Q8_SCRATCH`]: the AMX activation tiles of the current `gemm`.
    static TILE_SCRATCH: RefCell<Vec<packed::ATile>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `n` tokens' q8 blocks (`nb` per token) regrouped as AMX activation tiles.
#[cfg(target_arch = "x86_64")]
fn with_tiles<R>(q8: &[Q8Block], n: usize, nb: usize, f: impl FnOnce(&[packed::ATile]) -> R) -> R {
    let need = n.div_ceil(GROUP) * nb;
    TILE_SCRATCH.with(|cell| {
        let Ok(mut v) = cell.try_borrow_mut() else {
            // Re-entered on this thread (no caller does today): a buffer of its own rather than a panic.
            let mut v = vec![packed::ATile::ZERO; need];
            packed::pack_tiles(q8, n, nb, &mut v);
            return f(&v);
        };
        if v.len() < need {
            v.resize(need, packed::ATile::ZERO);
        }
        packed::pack_tiles(q8, n, nb, &mut v[..need]);
        f(&v[..need])
    })
}

/// The q8 blocks of vector `i` of a batch of `cols`-long vectors (empty stays empty).
fn q8_part(q8: &[Q8Block], cols: usize, i: usize) -> &[Q8Block] {
    if q8.is_empty() { q8 } else { &q8[i * cols / 32..(i + 1) * cols / 32] }
}

/// A row dot kernel. Safety contract: the row comes from a validated view, `act.x.len()` is its column count,
/// `act.q8` is empty or holds `act.x`'s blocks, and the CPU supports the kernel's instruction set.
type RowDot = unsafe fn(&RowRef<'_>, &Act<'_>) -> f32;

/// A [`TILE_ROWS`]-row × 4-token q8 tile kernel (`out[r][t] = rows[r] · acts[t]`), bit-identical per pair to the
/// table's [`RowDot`]; returns false (computing nothing) for encodings it does not cover. Safety contract: the rows
/// come from one validated view, every `acts[t]` holds the q8 blocks of that view's column count, and the CPU
/// supports the kernel's instruction set.
type TileDot = unsafe fn(&[RowRef<'_>; TILE_ROWS], &[&[Q8Block]; 4], &mut [[f32; 4]; TILE_ROWS]) -> bool;

/// Rows per `gemm` tile call (× 4 tokens): each token's activation blocks are prepared once per this many rows.
const TILE_ROWS: usize = 4;

/// Four rows × one q8 activation (decode), bit-identical per row to the table's [`RowDot`]; same contract as
/// [`TileDot`].
type Rows4Dot = unsafe fn(&[RowRef<'_>; 4], &[Q8Block], &mut [f32; 4]) -> bool;

/// How activations enter the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activations {
    /// Exact f32 products.
    F32,
    /// Activations quantized per 32 to i8 (once per call) for integer dot products (`vpdpbusd` with AVX-512
    /// VNNI, `maddubs` with AVX2) on Q4_0, Q8_0, Q4_K and MLX 4-bit weights; other encodings stay f32.
    /// Error per row ≤ `Σ_c |W[r,c]|·d_b(c)/2` (d_b = max|x| of the 32-block / 127) plus f32 rounding.
    Q8,
}

/// The instruction sets a kernel table can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable reference, always available.
    Scalar,
    /// AVX2 + FMA + F16C, 8 f32 lanes.
    Avx2,
    /// AVX-512 F/BW/VL (plus the AVX2 set), 16 f32 lanes.
    Avx512,
    /// aarch64 Advanced SIMD (baseline on every aarch64 CPU), 4 f32 lanes × 4 accumulators.
    Neon,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU can run the kernels (runtime detection).
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::has_avx512(),
            // NEON is part of the aarch64 baseline: no detection.
            Isa::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }
}

/// A kernel table for one [`Isa`]. Cheap to copy; every matmul entry point is a method, and the free functions
/// use [`Dispatch::best`].
#[derive(Clone, Copy)]
pub struct Dispatch {
    isa: Isa,
    activations: Activations,
    row_dot: RowDot,
    /// Multi-token kernel for `gemm` (prefill); q8 tables on x86 only.
    tile: Option<TileDot>,
    /// Multi-row kernel for the one-token paths (decode); q8 tables on x86 only.
    rows4: Option<Rows4Dot>,
    /// 16-row group kernel for `Q4_0x16` weights (q8 tables with AVX-512 VNNI); others use the scalar one.
    dot16: Option<(Dot16, Option<Dot16K4>)>,
    /// The same for `Q4_Kx16`, one token and four.
    dot16k: Option<(Dot16, Dot16K4)>,
    /// The same for `Q6_Kx16`.
    dot16q6: Option<(Dot16, Dot16K4)>,
    /// Prefill of `Q4_0x16` weights through AMX tiles (q8 table, CPU and OS permitting).
    amx: bool,
}

/// A packed group kernel (`Q4_0x16`, `Q4_Kx16` or `Q6_Kx16`): 16 rows × one token's q8 blocks. Safety contract: the group comes from a validated
/// view, the q8 blocks are the token's (one per block column), and the CPU supports the kernel.
type Dot16 = unsafe fn(&[u8], &[Q8Block], &mut [f32; GROUP], *const u8);

/// A `Q4_Kx16` or `Q6_Kx16` group kernel for 4 tokens, bit-identical per token to the one-token [`Dot16`]; same contract.
type Dot16K4 = unsafe fn(&[u8], [&[Q8Block]; 4], &mut [[f32; GROUP]; 4]);

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch").field("isa", &self.isa).field("activations", &self.activations).finish()
    }
}

impl Dispatch {
    /// The table for `isa`, or `None` when this CPU does not support it.
    pub fn new(isa: Isa) -> Option<Dispatch> {
        if !isa.is_supported() {
            return None;
        }
        let row_dot: RowDot = match isa {
            Isa::Scalar => scalar_row_dot,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2::row_dot,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512::row_dot,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => arm::row_dot,
            // The ISAs of other architectures (unsupported, so already refused above).
            _ => return None,
        };
        Some(Dispatch::exact(isa, row_dot))
    }

    /// An exact-f32 table: one row kernel, no multi-row, tile or packed-group kernels.
    fn exact(isa: Isa, row_dot: RowDot) -> Dispatch {
        Dispatch {
            isa,
            activations: Activations::F32,
            row_dot,
            tile: None,
            rows4: None,
            dot16: None,
            dot16k: None,
            dot16q6: None,
            amx: false,
        }
    }

    /// The q8-activation table for `isa`, or `None` when the CPU lacks it (AVX2 uses `maddubs`; AVX-512 needs
    /// VNNI; NEON needs `dotprod` for `sdot`). There is no scalar q8 table: the f32 reference is what q8 is
    /// checked against.
    pub fn new_q8(isa: Isa) -> Option<Dispatch> {
        type K = Option<(Dot16, Dot16K4)>;
        type Q8Table = (RowDot, Option<TileDot>, Option<Rows4Dot>, Option<(Dot16, Option<Dot16K4>)>, K, K, bool);
        let (row_dot, tile, rows4, dot16, dot16k, dot16q6, amx): Q8Table = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if x86::has_avx2() => {
                // `Q4_0x16` only: its `maddubs` form is exact and ~2.7× fewer ops per weight block than the
                // row-major kernel (no per-row scale broadcast, no horizontal sums); the K forms have none yet.
                (
                    x86::avx2::row_dot_q8,
                    Some(x86::avx2::tile_q8),
                    Some(x86::avx2::rows4_q8),
                    Some((packed::x86::dot16_avx2, Some(packed::x86::dot16x4_avx2))),
                    None,
                    None,
                    false,
                )
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if x86::has_avx512_vnni() => (
                x86::avx512::row_dot_q8,
                Some(x86::avx512::tile_q8),
                Some(x86::avx512::rows4_q8),
                Some((packed::x86::dot16, Some(packed::x86::dot16x4))),
                Some((packed::x86::dot16k, packed::x86::dot16k4)),
                Some((packed::x86::dot16q6, packed::x86::dot16q6x4)),
                packed::x86::has_amx(),
            ),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon if arm::has_dotprod() => (arm::row_dot_q8, None, None, None, None, None, false),
            _ => return None,
        };
        Some(Dispatch { isa, activations: Activations::Q8, row_dot, tile, rows4, dot16, dot16k, dot16q6, amx })
    }

    /// The encodings this table has fast kernels for in their packed forms (`Q4_0x16`, `Q4_Kx16`, `Q6_Kx16`), i.e.
    /// which of its `Q4_0`, `Q4_K` and `Q6_K` matrices (those with a multiple of 16 rows) a model should pack for it.
    /// Packed weights run on every table, but only these are faster than row-major ones.
    pub fn pack_set(&self) -> PackSet {
        if !self.q8() {
            return PackSet::NONE;
        }
        PackSet { q4_0: self.dot16.is_some(), q4_k: self.dot16k.is_some(), q6_k: self.dot16q6.is_some() }
    }

    /// Whether this table packs any encoding (see [`Dispatch::pack_set`]).
    pub fn packs(&self) -> bool {
        self.pack_set().any()
    }

    /// Whether `gemm` on `Q4_0x16` weights uses AMX tiles (for reports and benchmarks).
    pub fn uses_amx(&self) -> bool {
        self.amx
    }

    /// This table without AMX (same results, bit for bit: for tests and A/B measurements).
    pub fn without_amx(self) -> Dispatch {
        Dispatch { amx: false, ..self }
    }

    /// Every table this CPU supports: the f32 ones (reference first), then the q8 ones.
    pub fn supported() -> impl Iterator<Item = Dispatch> {
        Isa::ALL.into_iter().filter_map(Dispatch::new).chain(Isa::ALL.into_iter().filter_map(Dispatch::new_q8))
    }

    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// `scalar`, `avx2`, `avx512`, `neon`, `avx2-q8`, `avx512-q8`, `neon-q8`.
    pub fn name(&self) -> &'static str {
        match (self.isa, self.activations) {
            (Isa::Avx2, Activations::Q8) => "avx2-q8",
            (Isa::Avx512, Activations::Q8) => "avx512-q8",
            (Isa::Neon, Activations::Q8) => "neon-q8",
            (isa, _) => isa.name(),
        }
    }

    fn q8(&self) -> bool {
        self.activations == Activations::Q8
    }

    /// The fastest supported table, detected once per process: q8 activations (AVX-512 VNNI, else AVX2; NEON
    /// with `dotprod` on aarch64), else the fastest exact table ([`Dispatch::best_exact`]). q8 is the default
    /// because the 4-bit formats are compute-bound in exact f32 on x86 (README: Q4_K gemv 3.4 → 11.6 GB/s hot) and
    /// the tested error bound holds; Q8_0 is memory-bound either way, and every other encoding runs the same f32
    /// kernels in both tables. On aarch64 the same choice is made by analogy, not yet measured.
    pub fn best() -> Dispatch {
        static BEST: OnceLock<Dispatch> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2, Isa::Neon]
                .into_iter()
                .find_map(Dispatch::new_q8)
                .unwrap_or_else(Dispatch::best_exact)
        })
    }

    /// The fastest exact-f32 table (no activation quantization), detected once per process.
    pub fn best_exact() -> Dispatch {
        static BEST: OnceLock<Dispatch> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2, Isa::Neon].into_iter().find_map(Dispatch::new).unwrap_or_else(Dispatch::scalar)
        })
    }

    /// The reference table, available everywhere.
    pub fn scalar() -> Dispatch {
        Dispatch::exact(Isa::Scalar, scalar_row_dot)
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    #[inline]
    fn dot(&self, row: &RowRef<'_>, act: &Act<'_>) -> f32 {
        // SAFETY: callers pass rows of views they validated and activations of the view's `cols` (q8 blocks from
        // `with_q8` over the same values); `Dispatch::new*` only build tables whose ISA the CPU supports.
        unsafe { (self.row_dot)(row, act) }
    }

    /// `y[r] = Σ_c W[r,c]·x[c]`.
    pub fn gemv(&self, pool: &ThreadPool, w: &WeightView, x: &[f32], y: &mut [f32]) -> Result<(), MatmulError> {
        self.gemv_many(pool, &[*w], x, &mut [y])
    }

    /// `ys[i] = ws[i] · x` for several weights over one input (attention's q, k and v), each value as
    /// [`Dispatch::gemv`] computes it. Weights of one encoding share one pool run and one quantization of `x`:
    /// a decode token runs ~8 matmuls per layer, and each run costs a hand-off, a barrier and a part-filled last
    /// task, which for k and v (0.6 MB each) was a quarter of their time (BENCHMARKS.md, seventh pass). Weights
    /// of different encodings (Q4_K_M's Q6_K v beside Q4_K q and k) run in one pool run per encoding.
    pub fn gemv_many(
        &self,
        pool: &ThreadPool,
        ws: &[WeightView],
        x: &[f32],
        ys: &mut [&mut [f32]],
    ) -> Result<(), MatmulError> {
        check_len("outputs", ws.len(), ys.len())?;
        for (w, y) in ws.iter().zip(ys.iter()) {
            w.validate()?;
            check_len("x", w.cols, x.len())?;
            check_len("y", w.rows, y.len())?;
        }
        let mut i = 0;
        while i < ws.len() {
            // The longest run of the same encoding from `i`, at most MAX_FUSED weights.
            let n = ws[i..].iter().take(MAX_FUSED).take_while(|w| w.encoding == ws[i].encoding).count();
            let (w, y) = (&ws[i..i + n], &mut ys[i..i + n]);
            with_q8(self.q8(), x, w[0].cols, w[0].encoding, |q8| {
                let act = Act { x, q8 };
                let rows4 = self.rows4_for(&w[0], q8);
                let plans: [Option<GemvPlan>; MAX_FUSED] = std::array::from_fn(|j| {
                    w.get(j).map(|wj| GemvPlan::new(wj, OutPtr(y[j].as_mut_ptr()), rows4, pool.n_threads()))
                });
                let total: usize = plans.iter().flatten().map(|p| p.tasks).sum();
                pool.run(total, &|mut t| {
                    for p in plans.iter().flatten() {
                        if t < p.tasks {
                            // SAFETY: `p` covers a validated view whose output (`rows` floats) it owns; `t` is one
                            // of its tasks, run once; `q8` holds x's blocks for the view's columns.
                            return unsafe { self.gemv_task(p, &act, t) };
                        }
                        t -= p.tasks;
                    }
                });
            });
            i += n;
        }
        Ok(())
    }

    /// Task `t` of a one-token matmul plan: a band of whole 16-row groups (packed), of rows by 4 (a q8 rows4
    /// table), or of rows one at a time.
    ///
    /// # Safety
    /// `p.w` is validated, `p.out` points at its `rows` outputs and no other task writes this task's rows, and
    /// `act` holds the input (and its q8 blocks for `p.w`'s encoding, or none).
    unsafe fn gemv_task(&self, p: &GemvPlan, act: &Act<'_>, t: usize) {
        let (w, out, per) = (p.w, p.out, p.per);
        if w.encoding.is_packed() {
            let groups = w.rows / GROUP;
            let mut r = [0f32; GROUP];
            for gi in t * per..((t + 1) * per).min(groups) {
                self.group_dot(w.encoding, group(w, gi), group_ptr(w, gi + 1), act, &mut r);
                for (i, &v) in r.iter().enumerate() {
                    // SAFETY: 16·gi + i < rows; group gi belongs to this task only.
                    unsafe { out.write(GROUP * gi + i, v) };
                }
            }
        } else if let Some(rows4) = p.rows4 {
            let rw = w.rows();
            let band = t * per..((t + 1) * per).min(w.rows);
            for r0 in band.clone().step_by(4) {
                // SAFETY: rows of the validated view, `q8` holds x's blocks; the table's ISA is supported.
                let res = unsafe { dot_rows4(rows4, |i| rw.get((r0 + i).min(band.end - 1)), act.q8) };
                for (i, &v) in res.iter().enumerate().take(band.end - r0) {
                    // SAFETY: r0 + i < band.end ≤ rows; rows of `band` belong to this task.
                    unsafe { out.write(r0 + i, v) };
                }
            }
        } else {
            for r in t * per..((t + 1) * per).min(w.rows) {
                // SAFETY: r < rows, and each r belongs to exactly one task.
                unsafe { out.write(r, self.dot(&w.row(r), act)) };
            }
        }
    }

    /// `y[t, r] = Σ_c W[r,c]·x[t,c]` for `n` tokens (`x` is `n × cols`, `y` is `n × rows`, both row-major).
    /// Each task owns a band of rows (≤ [`TASK_BYTES`] of weights, so the band stays in L1/L2) and applies it to
    /// all `n` tokens, so weights are read from memory once per call, not `n` times. With a tile kernel (q8 on
    /// x86) the band is walked 2 rows × 4 tokens at a time: each weight block is unpacked once per 4 tokens and
    /// each activation block loaded once per 2 rows. Results equal `gemv` per token bit for bit either way.
    pub fn gemm(
        &self,
        pool: &ThreadPool,
        w: &WeightView,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), MatmulError> {
        w.validate()?;
        check_len("x", n.saturating_mul(w.cols), x.len())?;
        check_len("y", n.saturating_mul(w.rows), y.len())?;
        if n == 0 {
            return Ok(());
        }
        let per = rows_per_task_up_to(GEMM_TASK_BYTES, w.rows, row_cost(w), pool.n_threads());
        let out = OutPtr(y.as_mut_ptr());
        if w.encoding.is_packed() {
            with_q8(self.q8(), x, w.cols, w.encoding, |q8| {
                let (groups, per) = (w.rows / GROUP, groups_per_task(per));
                #[cfg(target_arch = "x86_64")]
                if self.amx && !q8.is_empty() && w.encoding == Encoding::Q4_0x16 {
                    return with_tiles(q8, n, w.cols / 32, |tiles| {
                        pool.run(groups.div_ceil(per), &|t| {
                            // SAFETY: `amx` is only set when `has_amx` held; configured before and released after
                            // this task's groups, each a whole group of the validated view; `tiles` holds the n
                            // tokens; rows of this task's groups belong to it alone.
                            unsafe {
                                packed::x86::configure();
                                let band = t * per..((t + 1) * per).min(groups);
                                for gi in band {
                                    packed::x86::gemm16(
                                        group(w, gi),
                                        w.cols / 32,
                                        tiles,
                                        n,
                                        out.at(GROUP * gi),
                                        w.rows,
                                    );
                                }
                                packed::x86::release();
                            }
                        })
                    });
                }
                pool.run(groups.div_ceil(per), &|t| {
                    for gi in t * per..((t + 1) * per).min(groups) {
                        self.group_gemm(w.encoding, group(w, gi), w.cols, x, q8, n, out, w.rows, GROUP * gi);
                    }
                })
            });
            return Ok(());
        }
        with_q8(self.q8(), x, w.cols, w.encoding, |q8| {
            if let Some(tile) = self.tile.filter(|_| !q8.is_empty() && n > 1 && tile_covers(w.encoding)) {
                pool.run(w.rows.div_ceil(per), &|t| {
                    // SAFETY: rows from the validated view, q8 blocks of its columns; the table's ISA is supported.
                    let done = unsafe { gemm_band_tiled(tile, w, q8, n, t * per..((t + 1) * per).min(w.rows), out) };
                    debug_assert!(done, "tile_covers and the tile kernels disagree");
                });
                return;
            }
            pool.run(w.rows.div_ceil(per), &|t| {
                for r in t * per..((t + 1) * per).min(w.rows) {
                    let row = w.row(r);
                    for (tok, xt) in x.chunks_exact(w.cols.max(1)).take(n).enumerate() {
                        let act = Act { x: &xt[..w.cols], q8: q8_part(q8, w.cols, tok) };
                        // SAFETY: tok·rows + r < n·rows = y.len(); column r belongs to exactly one task.
                        unsafe { out.write(tok * w.rows + r, self.dot(&row, &act)) };
                    }
                }
            })
        });
        if w.cols == 0 {
            y.fill(0.0);
        }
        Ok(())
    }

    /// Fused SwiGLU over k expert slots, each a `[2I, H]` view (rows `0..I` gate, `I..2I` up):
    /// `out[j·I + i] = silu(gate_j[i]·x) · (up_j[i]·x)`. One pool run covers all k experts.
    pub fn gathered_gate_up(
        &self,
        pool: &ThreadPool,
        slots: &[WeightView],
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), MatmulError> {
        let Some(first) = slots.first() else {
            return check_len("out", 0, out.len());
        };
        if !first.rows.is_multiple_of(2) {
            return Err(MatmulError::OddGateUp { rows: first.rows });
        }
        check_slots("gate_up", slots, first.rows, first.cols)?;
        let inter = first.rows / 2;
        check_len("x", first.cols, x.len())?;
        check_len("out", slots.len() * inter, out.len())?;
        if first.encoding.is_packed() {
            check_packed("gate_up", slots)?;
            if !inter.is_multiple_of(GROUP) {
                return Err(MatmulError::PackedRows {
                    encoding: first.encoding,
                    what: "each half of gate_up",
                    rows: first.rows,
                    cols: first.cols,
                });
            }
            with_q8(self.q8(), x, first.cols, first.encoding, |q8| {
                let act = Act { x, q8 };
                let half = inter / GROUP;
                self.packed_swiglu(pool, slots.len(), inter, 2 * row_cost(first), out, &|j, gi, g, u| {
                    let w = &slots[j];
                    // After an expert's last pair comes the next expert's first (a pool stripe walks on).
                    let next = match slots.get(j + 1) {
                        Some(n) if gi + 1 == half => group_ptr(n, 0),
                        _ => group_ptr(w, gi + 1),
                    };
                    self.group_dot(w.encoding, group(w, gi), group_ptr(w, half + gi), &act, g);
                    self.group_dot(w.encoding, group(w, half + gi), next, &act, u);
                });
            });
            return Ok(());
        }
        with_q8(self.q8(), x, first.cols, first.encoding, |q8| {
            if let Some(rows4) = self.rows4_for(first, q8) {
                // Gate and up rows i, i+1 of one expert per call; the pair's second half is dropped at a band end.
                return self.swiglu_pairs(pool, slots.len(), inter, 2 * row_cost(first), out, &|j, i, last| {
                    let w = slots[j].rows();
                    let i1 = (i + 1).min(last);
                    let rows = [i, i1, inter + i, inter + i1];
                    // SAFETY: rows of a validated view, `q8` holds x's blocks; the table's ISA is supported.
                    let r = unsafe { dot_rows4(rows4, |q| w.get(rows[q]), q8) };
                    [(r[0], r[2]), (r[1], r[3])]
                });
            }
            let act = Act { x, q8 };
            self.swiglu_tasks(pool, slots.len(), inter, 2 * row_cost(first), out, &|j, i| {
                let w = &slots[j];
                (self.dot(&w.row(i), &act), self.dot(&w.row(inter + i), &act))
            })
        });
        Ok(())
    }

    /// The unfused form of [`Dispatch::gathered_gate_up`]: separate `[I, H]` gate and up views per expert.
    pub fn gathered_gate_up_split(
        &self,
        pool: &ThreadPool,
        gate: &[WeightView],
        up: &[WeightView],
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), MatmulError> {
        check_len("up slots", gate.len(), up.len())?;
        let Some(first) = gate.first() else {
            return check_len("out", 0, out.len());
        };
        check_slots("gate", gate, first.rows, first.cols)?;
        check_slots("up", up, first.rows, first.cols)?;
        let inter = first.rows;
        check_len("x", first.cols, x.len())?;
        check_len("out", gate.len() * inter, out.len())?;
        if first.encoding.is_packed() {
            check_packed("gate", gate)?;
            check_packed("up", up)?;
            with_q8(self.q8(), x, first.cols, first.encoding, |q8| {
                let act = Act { x, q8 };
                self.packed_swiglu(pool, gate.len(), inter, 2 * row_cost(first), out, &|j, gi, g, u| {
                    self.group_dot(gate[j].encoding, group(&gate[j], gi), group_ptr(&up[j], gi), &act, g);
                    self.group_dot(up[j].encoding, group(&up[j], gi), group_ptr(&gate[j], gi + 1), &act, u);
                });
            });
            return Ok(());
        }
        with_q8(self.q8(), x, first.cols, first.encoding, |q8| {
            let act = Act { x, q8 };
            self.swiglu_tasks(pool, gate.len(), inter, 2 * row_cost(first), out, &|j, i| {
                (self.dot(&gate[j].row(i), &act), self.dot(&up[j].row(i), &act))
            })
        });
        Ok(())
    }

    /// Splits k experts × `inter` rows into tasks and writes `silu(g)·u` two rows at a time: `rows(j, i, last)`
    /// returns the `(g, u)` pairs of rows `i` and `min(i + 1, last)`, `last` being the task's final row (a pair
    /// past it is dropped).
    fn swiglu_pairs(
        &self,
        pool: &ThreadPool,
        k: usize,
        inter: usize,
        cost: usize,
        out: &mut [f32],
        rows: &(dyn Fn(usize, usize, usize) -> [(f32, f32); 2] + Sync),
    ) {
        if inter == 0 {
            return;
        }
        let per = rows_per_task(k * inter, cost, pool.n_threads()).min(inter);
        let chunks = inter.div_ceil(per);
        let dst = OutPtr(out.as_mut_ptr());
        pool.run(k * chunks, &|t| {
            let (j, c) = (t / chunks, t % chunks);
            let end = ((c + 1) * per).min(inter);
            for i in (c * per..end).step_by(2) {
                let pair = rows(j, i, end - 1);
                for (q, (g, u)) in pair.into_iter().enumerate().take(end - i) {
                    // SAFETY: j < k and i + q < end ≤ inter, so in bounds; each (j, i) is in one task.
                    unsafe { dst.write(j * inter + i + q, silu(g) * u) };
                }
            }
        });
    }

    /// The rows-of-4 kernel when it applies: a q8 table that has one, activations quantized, a covered encoding.
    fn rows4_for(&self, w: &WeightView, q8: &[Q8Block]) -> Option<Rows4Dot> {
        self.rows4.filter(|_| !q8.is_empty() && tile_covers(w.encoding))
    }

    /// Splits k experts × `inter` rows into tasks and writes `silu(g)·u` for each `(g, u) = rows(j, i)`: the
    /// one-row form of [`Dispatch::swiglu_pairs`] (same tasks, each row computed once).
    fn swiglu_tasks(
        &self,
        pool: &ThreadPool,
        k: usize,
        inter: usize,
        cost: usize,
        out: &mut [f32],
        rows: &(dyn Fn(usize, usize) -> (f32, f32) + Sync),
    ) {
        self.swiglu_pairs(pool, k, inter, cost, out, &|j, i, last| {
            let first = rows(j, i);
            [first, if i < last { rows(j, i + 1) } else { first }]
        });
    }

    /// `out = Σ_j weights[j] · (down_j · h_j)` over k `[H, I]` slots, `h` being `k × I`: the experts' parts
    /// ([`Dispatch::gathered_down_parts`]) into a per-thread scratch, then summed in expert order from zero
    /// ([`sum_parts`]'s order), so the result does not depend on the thread count. Parts rather than a per-row
    /// sum over experts inside each task: a task then streams one expert's contiguous rows (up to
    /// [`TASK_BYTES`]) instead of 16 rows of each of the k experts in turn (7 KiB per jump at I = 768), which
    /// ran the down pass ~8% slower per byte than gate_up (BENCHMARKS.md, seventh pass).
    pub fn gathered_down(
        &self,
        pool: &ThreadPool,
        slots: &[WeightView],
        h: &[f32],
        weights: &[f32],
        out: &mut [f32],
    ) -> Result<(), MatmulError> {
        check_len("weights", slots.len(), weights.len())?;
        let Some(first) = slots.first() else {
            check_len("h", 0, h.len())?;
            out.fill(0.0);
            return Ok(());
        };
        check_slots("down", slots, first.rows, first.cols)?;
        let hidden = first.rows;
        check_len("out", hidden, out.len())?;
        with_parts(slots.len() * hidden, |parts| {
            self.gathered_down_parts(pool, slots, h, parts)?;
            out.fill(0.0);
            for (part, &wt) in parts.chunks_exact(hidden).zip(weights) {
                for (o, &v) in out.iter_mut().zip(part) {
                    *o += wt * v;
                }
            }
            Ok(())
        })
    }

    /// The unweighted parts of [`Dispatch::gathered_down`]: `parts[j·H + r] = down_j[r]·h_j` for each of the k
    /// `[H, I]` slots. [`sum_parts`] over them equals `gathered_down` bit for bit (same per-expert values, summed
    /// in the same order), so a caller can compute some experts' parts before others are resident.
    pub fn gathered_down_parts(
        &self,
        pool: &ThreadPool,
        slots: &[WeightView],
        h: &[f32],
        parts: &mut [f32],
    ) -> Result<(), MatmulError> {
        let Some(first) = slots.first() else {
            check_len("h", 0, h.len())?;
            return check_len("parts", 0, parts.len());
        };
        check_slots("down", slots, first.rows, first.cols)?;
        let (hidden, inter) = (first.rows, first.cols);
        check_len("h", slots.len() * inter, h.len())?;
        check_len("parts", slots.len() * hidden, parts.len())?;
        let per = rows_per_task(hidden, row_cost(first), pool.n_threads());
        let dst = OutPtr(parts.as_mut_ptr());
        if first.encoding.is_packed() {
            check_packed("down", slots)?;
            with_q8(self.q8(), h, inter, first.encoding, |q8| {
                let (groups, per) = (hidden / GROUP, groups_per_task(per));
                let chunks = groups.div_ceil(per);
                pool.run(slots.len() * chunks, &|t| {
                    let (j, c) = (t / chunks, t % chunks);
                    let act = Act { x: &h[j * inter..(j + 1) * inter], q8: q8_part(q8, inter, j) };
                    let mut r = [0f32; GROUP];
                    for gi in c * per..((c + 1) * per).min(groups) {
                        let w = &slots[j];
                        // After an expert's last group comes the next expert's first (a pool stripe walks on).
                        let next = match slots.get(j + 1) {
                            Some(n) if gi + 1 == groups => group_ptr(n, 0),
                            _ => group_ptr(w, gi + 1),
                        };
                        self.group_dot(w.encoding, group(w, gi), next, &act, &mut r);
                        for (i, &v) in r.iter().enumerate() {
                            // SAFETY: j·hidden + 16·gi + i < k·hidden = parts.len(); (j, gi) is this task's.
                            unsafe { dst.write(j * hidden + GROUP * gi + i, v) };
                        }
                    }
                })
            });
            return Ok(());
        }
        let chunks = hidden.div_ceil(per);
        with_q8(self.q8(), h, inter, first.encoding, |q8| {
            let rows4 = self.rows4_for(first, q8);
            pool.run(slots.len() * chunks, &|t| {
                let (j, c) = (t / chunks, t % chunks);
                let (w, band) = (&slots[j], c * per..((c + 1) * per).min(hidden));
                let act = Act { x: &h[j * inter..(j + 1) * inter], q8: q8_part(q8, inter, j) };
                if let Some(rows4) = rows4 {
                    let w = w.rows();
                    for r0 in band.clone().step_by(4) {
                        let row = |i: usize| w.get((r0 + i).min(band.end - 1));
                        // SAFETY: rows of validated views, q8 blocks of expert j's activations.
                        let res = unsafe { dot_rows4(rows4, row, act.q8) };
                        for (i, &v) in res.iter().enumerate().take(band.end - r0) {
                            // SAFETY: j·hidden + r0 + i < k·hidden = parts.len(); (j, band) is this task's.
                            unsafe { dst.write(j * hidden + r0 + i, v) };
                        }
                    }
                } else {
                    for r in band {
                        // SAFETY: as above.
                        unsafe { dst.write(j * hidden + r, self.dot(&w.row(r), &act)) };
                    }
                }
            })
        });
        Ok(())
    }

    /// One packed group (16 rows, `enc` is `Q4_0x16` or `Q4_Kx16`) · one token: the table's group kernel on q8
    /// blocks, the scalar one when the table has none, exact f32 when activations are not quantized.
    /// `next` is the group the caller computes after this one (a prefetch hint, see `packed::x86::dot16`).
    #[inline]
    fn group_dot(&self, enc: Encoding, g: &[u8], next: *const u8, act: &Act<'_>, out: &mut [f32; GROUP]) {
        if act.q8.is_empty() {
            return packed::dot16_f32(enc, g, act.x, out);
        }
        type Scalar = fn(&[u8], &[Q8Block], &mut [f32; GROUP]);
        let (kernel, scalar): (Option<Dot16>, Scalar) = match enc {
            Encoding::Q4Kx16 => (self.dot16k.map(|k| k.0), packed::dot16k_scalar),
            Encoding::Q6Kx16 => (self.dot16q6.map(|k| k.0), packed::dot16q6_scalar),
            _ => (self.dot16.map(|k| k.0), packed::dot16_scalar),
        };
        match kernel {
            // SAFETY: `g` is a whole group of a validated view and `act.q8` its token's blocks (one per block
            // column, or 8 per super-block column for the K forms, as `q8_group` makes them); `Dispatch::new_q8`
            // only sets the group kernels where the CPU supports them. `next` is only prefetched.
            Some(k) => unsafe { k(g, act.q8, out, next) },
            None => scalar(g, act.q8, out),
        }
    }

    /// One packed group × `n` tokens (`x`, `q8`: the call's activations), written to `out[t·ld + r0 + i]`, one
    /// group dot per token, or four per call where the table has a 4-token kernel for `enc`; the AMX path in `gemm`
    /// gives the same values for `Q4_0x16`.
    #[allow(clippy::too_many_arguments)]
    fn group_gemm(
        &self,
        enc: Encoding,
        g: &[u8],
        cols: usize,
        x: &[f32],
        q8: &[Q8Block],
        n: usize,
        out: OutPtr,
        ld: usize,
        r0: usize,
    ) {
        let mut first = 0;
        let four = match enc {
            Encoding::Q4Kx16 => self.dot16k.map(|k| k.1),
            Encoding::Q6Kx16 => self.dot16q6.map(|k| k.1),
            _ => self.dot16.and_then(|k| k.1),
        };
        if let Some(k4) = four.filter(|_| !q8.is_empty()) {
            let mut r4 = [[0f32; GROUP]; 4];
            // Four tokens per call; two or three left take one call with the last token repeated and its copies'
            // results dropped. Per token the 4-token kernels do the one-token arithmetic, so that changes no value;
            // on AVX2 one such call costs under two one-token calls (`gemm32` vs `hot` bench). A last single token goes below.
            while n - first >= 2 {
                let take = (n - first).min(4);
                let acts = std::array::from_fn(|i| q8_part(q8, cols, first + i.min(take - 1)));
                // SAFETY: as for `group_dot`, for each of the 4 tokens; every token index is below n.
                unsafe { k4(g, acts, &mut r4) };
                for (i, r) in r4.iter().take(take).enumerate() {
                    for (row, &v) in r.iter().enumerate() {
                        // SAFETY: (first + i)·ld + r0 + row < n·ld = out's length; the group's rows are this task's.
                        unsafe { out.write((first + i) * ld + r0 + row, v) };
                    }
                }
                first += take;
            }
        }
        let mut r = [0f32; GROUP];
        for t in first..n {
            let act = Act { x: &x[t * cols..(t + 1) * cols], q8: q8_part(q8, cols, t) };
            // The same group serves every token: prefetch past it, where the caller's next group usually is.
            self.group_dot(enc, g, g.as_ptr_range().end, &act, &mut r);
            for (i, &v) in r.iter().enumerate() {
                // SAFETY: t·ld + r0 + i < n·ld = out's length; the group's rows are this task's.
                unsafe { out.write(t * ld + r0 + i, v) };
            }
        }
    }

    /// SwiGLU over k packed experts: tasks of whole 16-row groups; `rows(j, gi, g, u)` fills the gate and up
    /// values of expert `j`'s group `gi`.
    #[allow(clippy::type_complexity)]
    fn packed_swiglu(
        &self,
        pool: &ThreadPool,
        k: usize,
        inter: usize,
        cost: usize,
        out: &mut [f32],
        rows: &(dyn Fn(usize, usize, &mut [f32; GROUP], &mut [f32; GROUP]) + Sync),
    ) {
        let groups = inter / GROUP;
        if groups == 0 {
            return;
        }
        let per = groups_per_task(rows_per_task(k * inter, cost, pool.n_threads())).min(groups);
        let chunks = groups.div_ceil(per);
        let dst = OutPtr(out.as_mut_ptr());
        pool.run(k * chunks, &|t| {
            let (j, c) = (t / chunks, t % chunks);
            let (mut g, mut u) = ([0f32; GROUP], [0f32; GROUP]);
            for gi in c * per..((c + 1) * per).min(groups) {
                rows(j, gi, &mut g, &mut u);
                for i in 0..GROUP {
                    // SAFETY: j < k and 16·gi + i < inter, so in bounds; each (j, gi) is in one task.
                    unsafe { dst.write(j * inter + GROUP * gi + i, silu(g[i]) * u[i]) };
                }
            }
        });
    }
}

/// Four rows (`row(0..4)`) dotted with one token's q8 blocks.
///
/// # Safety
/// As [`Rows4Dot`]; `rows4` must cover the rows' encoding (checked by [`tile_covers`] before).
#[inline]
unsafe fn dot_rows4<'a>(rows4: Rows4Dot, row: impl Fn(usize) -> RowRef<'a>, q8: &[Q8Block]) -> [f32; 4] {
    let mut res = [0f32; 4];
    // SAFETY: guaranteed by the caller.
    let done = unsafe { rows4(&[row(0), row(1), row(2), row(3)], q8, &mut res) };
    debug_assert!(done, "tile_covers and the tile kernels disagree");
    res
}

/// `out[r] = Σ_j weights[j]·parts[at[j]·H + r]`, summed over `j` in index order from zero exactly as
/// [`Dispatch::gathered_down`] sums its experts, so the two agree bit for bit whatever order the parts were
/// computed and stored in (`at[j]` says where expert `j`'s part is). `parts` is `k × H`.
pub fn sum_parts(parts: &[f32], at: &[usize], weights: &[f32], out: &mut [f32]) -> Result<(), MatmulError> {
    let h = out.len();
    check_len("parts", weights.len() * h, parts.len())?;
    check_len("at", weights.len(), at.len())?;
    if let Some(&bad) = at.iter().find(|&&p| p >= weights.len()) {
        return Err(MatmulError::Len { what: "part index", expected: weights.len(), got: bad });
    }
    out.fill(0.0);
    for (&p, &wt) in at.iter().zip(weights) {
        for (o, &v) in out.iter_mut().zip(&parts[p * h..(p + 1) * h]) {
            *o += wt * v;
        }
    }
    Ok(())
}

/// The encodings the x86 tile kernels cover (the others run row by row).
fn tile_covers(e: Encoding) -> bool {
    matches!(
        e,
        Encoding::Ggml(
            moestream_quant::GgmlType::Q4_0
                | moestream_quant::GgmlType::Q8_0
                | moestream_quant::GgmlType::Q4K
                | moestream_quant::GgmlType::Q6K
        )
    ) || matches!(e, Encoding::MlxAffine { params, .. } if params.bits == 4)
}

/// One task of a tiled `gemm`: rows `band` × all `n` tokens, 4 tokens (outer) by [`TILE_ROWS`] rows (inner), so
/// the band's weights are reused from cache for every token group while the group's activations sit in L1. A short
/// last row or token group is padded by repeating the last row or token; padded results are dropped. Returns
/// false when the tile kernel does not cover the encoding (nothing written).
///
/// # Safety
/// `tile` is a kernel the CPU supports, `w` is validated, `q8` holds `n` tokens' blocks of `w.cols` columns, `out`
/// points at `n × w.rows` floats, and no other task writes rows of `band`.
unsafe fn gemm_band_tiled(
    tile: TileDot,
    w: &WeightView,
    q8: &[Q8Block],
    n: usize,
    band: std::ops::Range<usize>,
    out: OutPtr,
) -> bool {
    let mut res = [[0f32; 4]; TILE_ROWS];
    let rw = w.rows();
    for t0 in (0..n).step_by(4) {
        let acts: [&[Q8Block]; 4] = std::array::from_fn(|i| q8_part(q8, w.cols, (t0 + i).min(n - 1)));
        for r0 in band.clone().step_by(TILE_ROWS) {
            let rows: [RowRef<'_>; TILE_ROWS] = std::array::from_fn(|i| rw.get((r0 + i).min(band.end - 1)));
            // SAFETY: guaranteed by the caller.
            if !unsafe { tile(&rows, &acts, &mut res) } {
                return false;
            }
            for (i, row_res) in res.iter().enumerate().take(band.end - r0) {
                for (j, &v) in row_res.iter().enumerate().take(n - t0) {
                    // SAFETY: (t0 + j) < n and r0 + i < band.end ≤ rows; rows of `band` belong to this task.
                    unsafe { out.write((t0 + j) * w.rows + r0 + i, v) };
                }
            }
        }
    }
    true
}

/// The reference kernel as a [`RowDot`] (it is safe; the pointer type is not).
pub(crate) unsafe fn scalar_row_dot(row: &RowRef<'_>, act: &Act<'_>) -> f32 {
    scalar::row_dot(row, act.x)
}

/// `gemv` with the best kernels for this CPU ([`Dispatch::best`]: q8 activations where supported). See
/// [`Dispatch::gemv`].
pub fn gemv(pool: &ThreadPool, w: &WeightView, x: &[f32], y: &mut [f32]) -> Result<(), MatmulError> {
    Dispatch::best().gemv(pool, w, x, y)
}

/// `gemm` with the best kernels for this CPU. See [`Dispatch::gemm`].
pub fn gemm(pool: &ThreadPool, w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), MatmulError> {
    Dispatch::best().gemm(pool, w, x, n, y)
}

/// Fused gate+up with SwiGLU over k slots. See [`Dispatch::gathered_gate_up`].
pub fn gathered_gate_up(
    pool: &ThreadPool,
    slots: &[WeightView],
    x: &[f32],
    out: &mut [f32],
) -> Result<(), MatmulError> {
    Dispatch::best().gathered_gate_up(pool, slots, x, out)
}

/// Unfused gate and up. See [`Dispatch::gathered_gate_up_split`].
pub fn gathered_gate_up_split(
    pool: &ThreadPool,
    gate: &[WeightView],
    up: &[WeightView],
    x: &[f32],
    out: &mut [f32],
) -> Result<(), MatmulError> {
    Dispatch::best().gathered_gate_up_split(pool, gate, up, x, out)
}

/// Weighted sum of k down projections. See [`Dispatch::gathered_down`].
pub fn gathered_down(
    pool: &ThreadPool,
    slots: &[WeightView],
    h: &[f32],
    weights: &[f32],
    out: &mut [f32],
) -> Result<(), MatmulError> {
    Dispatch::best().gathered_down(pool, slots, h, weights, out)
}

/// `g·sigmoid(g)`, as in transformers' `nn.SiLU` (in f32).
#[inline]
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), MatmulError> {
    if expected == got { Ok(()) } else { Err(MatmulError::Len { what, expected, got }) }
}

/// Validates every slot and checks they all share one shape.
fn check_slots(what: &'static str, slots: &[WeightView], rows: usize, cols: usize) -> Result<(), MatmulError> {
    for (slot, w) in slots.iter().enumerate() {
        if (w.rows, w.cols) != (rows, cols) {
            return Err(MatmulError::SlotShape {
                what,
                slot,
                rows: w.rows,
                cols: w.cols,
                expected_rows: rows,
                expected_cols: cols,
            });
        }
        w.validate()?;
    }
    Ok(())
}

/// Weight bytes one row costs to stream (codes plus MLX scales and biases).
fn row_cost(w: &WeightView) -> usize {
    w.encoding.row_bytes(w.cols).unwrap_or(0) + 2 * side_row_bytes(w.encoding, w.cols)
}

/// A one-token task streams at most this many weight bytes, so tasks balance across threads even when one thread
/// is descheduled (cores are shared). Not much less: such a task is one prefetched stream (see `group_dot`'s
/// `next`) and starts cold. 32 → 128 KiB gave +6% decode with the prefetch running across groups; 64 KiB and
/// 1 MiB were within noise of 128.
const TASK_BYTES: usize = 128 << 10;
/// The cap for `gemm` tasks: each weight byte serves many tokens there, so tasks are sized for balance, not for
/// streaming.
const GEMM_TASK_BYTES: usize = 32 << 10;
/// Every task streams at least this many bytes, so the claim (one atomic add) stays negligible next to the work.
const MIN_TASK_BYTES: usize = 4 << 10;

/// Rows per one-token task: about four tasks per thread, within [`MIN_TASK_BYTES`] and [`TASK_BYTES`].
fn rows_per_task(rows: usize, row_bytes: usize, threads: usize) -> usize {
    rows_per_task_up_to(TASK_BYTES, rows, row_bytes, threads)
}

/// [`rows_per_task`] with another cap on the bytes per task.
fn rows_per_task_up_to(cap: usize, rows: usize, row_bytes: usize, threads: usize) -> usize {
    let row_bytes = row_bytes.max(1);
    let max_rows = (cap / row_bytes).max(1);
    let min_rows = (MIN_TASK_BYTES / row_bytes).clamp(1, max_rows);
    rows.div_ceil(4 * threads.max(1)).clamp(min_rows, max_rows)
}

/// Group `gi` (rows `16·gi..16·gi + 16`) of a validated packed view.
#[inline]
fn group<'a>(w: &WeightView<'a>, gi: usize) -> &'a [u8] {
    let gb = group_bytes(w);
    &w.data[gi * gb..(gi + 1) * gb]
}

/// Where group `gi` of a packed view starts, for prefetch hints only: past the view's end it points at
/// whatever follows (never dereferenced, so any address will do).
#[inline]
fn group_ptr(w: &WeightView, gi: usize) -> *const u8 {
    w.data.as_ptr().wrapping_add(gi * group_bytes(w))
}

/// Bytes of one 16-row group of a packed view.
#[inline]
fn group_bytes(w: &WeightView) -> usize {
    GROUP * w.encoding.row_bytes(w.cols).unwrap_or(0)
}

/// Whole groups per task for a row count per task.
fn groups_per_task(rows: usize) -> usize {
    rows.div_ceil(GROUP).max(1)
}

/// Every slot after the first has the first's packed encoding too (the packed paths address groups, not rows).
fn check_packed(what: &'static str, slots: &[WeightView]) -> Result<(), MatmulError> {
    let first = slots.first().map_or(Encoding::Q4_0x16, |w| w.encoding);
    match slots.iter().position(|w| w.encoding != first) {
        Some(slot) => {
            Err(MatmulError::MixedPacking { what, slot, got: slots[slot].encoding.name(), first: first.name() })
        }
        None => Ok(()),
    }
}

/// Most weights [`Dispatch::gemv_many`] puts in one pool run (attention needs 3).
const MAX_FUSED: usize = 4;

/// One weight's share of a [`Dispatch::gemv_many`] run: its tasks and where they write.
struct GemvPlan<'a> {
    w: &'a WeightView<'a>,
    out: OutPtr,
    /// Groups (packed) or rows per task.
    per: usize,
    tasks: usize,
    rows4: Option<Rows4Dot>,
}

impl<'a> GemvPlan<'a> {
    fn new(w: &'a WeightView<'a>, out: OutPtr, rows4: Option<Rows4Dot>, threads: usize) -> Self {
        let per = rows_per_task(w.rows, row_cost(w), threads);
        if w.encoding.is_packed() {
            let per = groups_per_task(per);
            GemvPlan { w, out, per, tasks: (w.rows / GROUP).div_ceil(per), rows4: None }
        } else {
            GemvPlan { w, out, per, tasks: w.rows.div_ceil(per), rows4 }
        }
    }
}

/// The output buffer shared by the tasks of one run; each task writes disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks write disjoint indices (each caller documents why) of a buffer that outlives the pool run.
unsafe impl Send for OutPtr {}
// SAFETY: as above; no element is read or written by two tasks.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The address of element `i` (for kernels that write strided runs themselves).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    /// # Safety
    /// `i` is in bounds of the buffer and no other task touches element `i` during the run.
    #[inline]
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v };
    }
}

#[cfg(test)]
mod tests {
    use super::{Q8Block, quantize_q8, quantize_q8_scalar};

    /// The dispatched quantizer and every SIMD form this CPU runs against the reference, bit for bit: random values
    /// over many magnitudes, exact halves after scaling, zero blocks, groups of 1 and 8.
    #[test]
    fn quantizer_matches_the_scalar_reference() {
        let mut s = 0x1234_5678u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        for group in [1, 8] {
            let n = 32 * group * 6;
            let x: Vec<f32> = (0..n)
                .map(|i| match i / (32 * group) {
                    0 => 0.0,
                    // d = 1 (every block holds 127), so x/d is x itself: every half from -126.5 to 126.5.
                    1 if i % 32 == 0 => 127.0,
                    1 => ((i * 37) % 509) as f32 * 0.5 - 127.0,
                    b => rnd() * 10f32.powi(b as i32 - 3),
                })
                .collect();
            let mut b = vec![Q8Block::ZERO; n / 32];
            quantize_q8_scalar(&x, &mut b, group);
            type Quantize = fn(&[f32], &mut [Q8Block], usize);
            // Only x86 adds SIMD forms (NEON has none yet).
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut forms: Vec<(&str, Quantize)> = vec![("dispatched", quantize_q8)];
            #[cfg(target_arch = "x86_64")]
            {
                if super::x86::has_avx2() {
                    // SAFETY: AVX2 and FMA checked.
                    forms.push(("avx2", |x, o, g| unsafe { super::x86::quantize_q8_avx2(x, o, g) }));
                }
                if super::x86::has_avx512() {
                    // SAFETY: AVX-512 checked.
                    forms.push(("avx512", |x, o, g| unsafe { super::x86::quantize_q8_avx512(x, o, g) }));
                }
            }
            for (name, quantize) in forms {
                let mut a = vec![Q8Block::ZERO; n / 32];
                quantize(&x, &mut a, group);
                for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(p.qs, q.qs, "{name} group {group} block {i}");
                    assert_eq!(
                        (p.d.to_bits(), p.qsum, p.xsum.to_bits()),
                        (q.d.to_bits(), q.qsum, q.xsum.to_bits()),
                        "{name} group {group} block {i}"
                    );
                }
            }
        }
    }
    /// Against `f32::round` on every value the q8 quantizer can produce (|r| ≤ 127.5), halves and their
    /// neighbours included.
    #[test]
    fn round_half_away_equals_round() {
        let mut r = -128.0f32;
        while r <= 128.0 {
            for v in [r, r.next_up(), r.next_down()] {
                assert_eq!(super::round_half_away(v), v.round() as i32, "{v}");
            }
            r += 1.0 / 64.0;
        }
    }
}
