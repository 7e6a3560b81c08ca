//! Row-interleaved forms of ggml's `Q4_0`, `Q4_K` and `Q6_K`, 16 rows at a time, so that one 64-byte vector holds
//! 4 consecutive codes of 16 rows — the operand layout of a 16-lane `vpdpbusd` with a broadcast activation word (and,
//! for `Q4_0x16`, of an AMX `tdpbssd` B tile: K/4 rows × 16 columns × 4 bytes). All keep their source format's
//! bytes per matrix, so a slot or a band of rows keeps its size and offsets: group `g` (rows `16g..16g+16`)
//! occupies exactly the bytes its 16 rows did. Only whole groups exist: a matrix is packed only when its row count
//! is a multiple of 16. Each pack is a byte permutation (`unpack(pack(x)) == x`), so dequantizing a packed group
//! equals dequantizing its ggml rows.
//!
//! `Q4_0x16` (from `Q4_0`): block column `b` (elements `32b..32b+32` of every row) is 288 bytes at `288·b`:
//! - 16 little-endian f16 scales, row order (32 bytes);
//! - 4 chunks of 64 bytes; chunk `c`, bytes `4r..4r+4` are bytes `4c..4c+4` of row `r`'s 16 code bytes. A ggml
//!   code byte `j` holds element `j` (low nibble) and `j + 16` (high), so the low nibbles of chunk `c` are elements
//!   `4c..4c+4` and the high nibbles elements `16+4c..16+4c+4`, for each of the 16 rows.
//!
//! `Q4_Kx16` (from `Q4_K`): super-block column `s` (elements `256s..256s+256`) is 2304 bytes at `2304·s`:
//! - 16 f16 `d`, then 16 f16 `dmin` (row order, 64 bytes);
//! - the 12 packed 6-bit scale/min bytes of each row as three 64-byte words: word `w`, bytes `4r..4r+4` are bytes
//!   `4w..4w+4` of row `r`'s 12 (192 bytes), so ggml's 32-bit unpacking of scales and mins runs on 16 rows at once;
//! - 8 sub-blocks of 256 bytes, sub-block `j` (elements `32j..32j+32`) in `Q4_0x16`'s chunk layout: chunk `c`,
//!   byte `4r + i` holds element `32j + 4c + i` of row `r` in its low nibble and `32j + 16 + 4c + i` in its high
//!   one. (ggml's `Q4_K` pairs sub-blocks `2p` and `2p+1` in one byte's nibbles instead; the repack moves nibbles
//!   so that a sub-block lines up with one q8 activation block, as `Q4_0`'s do.)
//!
//! `Q6_Kx16` (from `Q6_K`): super-block column `s` (elements `256s..256s+256`) is 3360 bytes at `3360·s`:
//! - 16 f16 `d` (row order, 32 bytes);
//! - the 16 i8 scales of each row, scale-major: byte `32 + 16j + r` is row `r`'s scale `j` (elements
//!   `16j..16j+16`), so one 16-byte load widened to i32 is sub-block `j`'s scale for all 16 rows (256 bytes);
//! - 8 blocks of 384 bytes, block `b` (elements `32b..32b+32`, one q8 activation block): the low 4 bits of the
//!   6-bit codes in `Q4_0x16`'s chunk layout (4 chunks of 64 bytes: chunk `c`, byte `4r + i` holds element
//!   `32b + 4c + i` of row `r` in its low nibble and `32b + 16 + 4c + i` in its high one), then the high 2 bits
//!   as two 64-byte words: word `h`, byte `4r + i`, bits `2c..2c+2` are the high bits of element
//!   `32b + 16h + 4c + i` of row `r`.

use crate::ggml::{self, GgmlType};
use crate::{Encoding, QuantError};

/// Rows per group.
pub const GROUP: usize = 16;
/// Bytes of one ggml `Q4_K` super-block (256 elements).
const K_BLOCK: usize = 144;
/// Bytes of one super-block column of a `Q4_Kx16` group.
pub const K_GROUP_BLOCK: usize = GROUP * K_BLOCK;
/// Bytes of one ggml `Q6_K` super-block (256 elements).
const Q6_BLOCK: usize = 210;
/// Bytes of one super-block column of a `Q6_Kx16` group.
pub const Q6_GROUP_BLOCK: usize = GROUP * Q6_BLOCK;
/// Bytes of one ggml `Q4_0` block (f16 scale + 16 code bytes).
const BLOCK: usize = 18;
/// Bytes of one block column of a group.
pub const GROUP_BLOCK: usize = GROUP * BLOCK;

/// Checks a `[rows, cols]` matrix of `got` bytes in blocks of `elems` elements / `bytes` bytes (`Q4_0`: 32 / 18,
/// `Q4_K`: 256 / 144) against the packed forms' rules (whole groups, whole blocks); returns blocks per row.
fn check_blocks(
    rows: usize,
    cols: usize,
    got: usize,
    ty: &'static str,
    (elems, bytes): (usize, usize),
) -> Result<usize, QuantError> {
    if !cols.is_multiple_of(elems) {
        return Err(QuantError::PartialBlock { ty, elems: cols, block: elems });
    }
    if !rows.is_multiple_of(GROUP) {
        return Err(QuantError::PartialBlock { ty, elems: rows, block: GROUP });
    }
    let expected = rows * cols / elems * bytes;
    if got != expected {
        return Err(QuantError::ByteLength { ty, expected, got });
    }
    Ok(cols / elems)
}

fn check(rows: usize, cols: usize, got: usize, ty: &'static str) -> Result<usize, QuantError> {
    check_blocks(rows, cols, got, ty, (32, BLOCK))
}

/// Packs `rows` ggml `Q4_0` rows of `cols` elements (`src`) into `dst` (same length). `rows` must be a multiple of
/// 16 and `cols` of 32.
pub fn pack_q4_0x16(src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    let nb = check(rows, cols, src.len(), "Q4_0x16 pack source")?;
    if dst.len() != src.len() {
        return Err(QuantError::ByteLength { ty: "Q4_0x16 pack destination", expected: src.len(), got: dst.len() });
    }
    let rb = nb * BLOCK;
    for (sg, dg) in src.chunks_exact(GROUP * rb).zip(dst.chunks_exact_mut(GROUP * rb)) {
        for (b, out) in dg.chunks_exact_mut(GROUP_BLOCK).enumerate() {
            let (scales, codes) = out.split_at_mut(2 * GROUP);
            for r in 0..GROUP {
                let blk = &sg[r * rb + b * BLOCK..r * rb + (b + 1) * BLOCK];
                scales[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                for c in 0..4 {
                    codes[64 * c + 4 * r..64 * c + 4 * r + 4].copy_from_slice(&blk[2 + 4 * c..2 + 4 * c + 4]);
                }
            }
        }
    }
    Ok(())
}

/// The inverse of [`pack_q4_0x16`].
pub fn unpack_q4_0x16(src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    let nb = check(rows, cols, src.len(), "Q4_0x16 unpack source")?;
    if dst.len() != src.len() {
        return Err(QuantError::ByteLength { ty: "Q4_0x16 unpack destination", expected: src.len(), got: dst.len() });
    }
    let rb = nb * BLOCK;
    for (sg, dg) in src.chunks_exact(GROUP * rb).zip(dst.chunks_exact_mut(GROUP * rb)) {
        for (b, inp) in sg.chunks_exact(GROUP_BLOCK).enumerate() {
            let (scales, codes) = inp.split_at(2 * GROUP);
            for r in 0..GROUP {
                let blk = &mut dg[r * rb + b * BLOCK..r * rb + (b + 1) * BLOCK];
                blk[..2].copy_from_slice(&scales[2 * r..2 * r + 2]);
                for c in 0..4 {
                    blk[2 + 4 * c..2 + 4 * c + 4].copy_from_slice(&codes[64 * c + 4 * r..64 * c + 4 * r + 4]);
                }
            }
        }
    }
    Ok(())
}

/// Dequantizes whole packed groups (`out.len()` a multiple of `16·cols`), one group at a time through a stack
/// buffer of one block column: no allocation.
pub fn dequantize_q4_0x16(data: &[u8], cols: usize, out: &mut [f32]) -> Result<(), QuantError> {
    if cols == 0 || !out.len().is_multiple_of(GROUP * cols) {
        return Err(QuantError::PartialBlock { ty: "Q4_0x16 rows", elems: out.len(), block: GROUP * cols.max(1) });
    }
    let rows = out.len() / cols;
    let nb = check(rows, cols, data.len(), "Q4_0x16")?;
    let rb = nb * BLOCK;
    let mut blk = [0u8; BLOCK];
    let mut vals = [0f32; 32];
    for (sg, og) in data.chunks_exact(GROUP * rb).zip(out.chunks_exact_mut(GROUP * cols)) {
        for (b, inp) in sg.chunks_exact(GROUP_BLOCK).enumerate() {
            let (scales, codes) = inp.split_at(2 * GROUP);
            for r in 0..GROUP {
                blk[..2].copy_from_slice(&scales[2 * r..2 * r + 2]);
                for c in 0..4 {
                    blk[2 + 4 * c..2 + 4 * c + 4].copy_from_slice(&codes[64 * c + 4 * r..64 * c + 4 * r + 4]);
                }
                ggml::dequantize(GgmlType::Q4_0, &blk, &mut vals)?;
                og[r * cols + 32 * b..r * cols + 32 * b + 32].copy_from_slice(&vals);
            }
        }
    }
    Ok(())
}

/// Which encodings to store in their packed forms: a kernel table's choice (`Dispatch::pack_set` in
/// `moestream-cpu`), since a table may have fast packed kernels for some encodings only (AVX2: `Q4_0x16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackSet {
    pub q4_0: bool,
    pub q4_k: bool,
    pub q6_k: bool,
}

impl PackSet {
    pub const NONE: PackSet = PackSet { q4_0: false, q4_k: false, q6_k: false };
    pub const ALL: PackSet = PackSet { q4_0: true, q4_k: true, q6_k: true };

    /// Whether matrices encoded as `e` are to be stored packed (`e` has a [`packed_form`] in the set).
    pub fn packs(self, e: Encoding) -> bool {
        match e {
            Encoding::Ggml(GgmlType::Q4_0) => self.q4_0,
            Encoding::Ggml(GgmlType::Q4K) => self.q4_k,
            Encoding::Ggml(GgmlType::Q6K) => self.q6_k,
            _ => false,
        }
    }

    pub fn any(self) -> bool {
        self.q4_0 || self.q4_k || self.q6_k
    }
}

/// The packed form of `e` when there is one (`Q4_0` → `Q4_0x16`, `Q4_K` → `Q4_Kx16`, `Q6_K` → `Q6_Kx16`).
pub fn packed_form(e: Encoding) -> Option<Encoding> {
    match e {
        Encoding::Ggml(GgmlType::Q4_0) => Some(Encoding::Q4_0x16),
        Encoding::Ggml(GgmlType::Q4K) => Some(Encoding::Q4Kx16),
        Encoding::Ggml(GgmlType::Q6K) => Some(Encoding::Q6Kx16),
        _ => None,
    }
}

/// Whether a `[rows, cols]` matrix of `e` can be packed: `e` has a packed form and the shape is whole groups and
/// whole blocks.
pub fn packable(e: Encoding, rows: usize, cols: usize) -> bool {
    packed_form(e).is_some() && rows.is_multiple_of(GROUP) && e.row_bytes(cols).is_some()
}

/// Packs `rows` rows of `src` (encoded as `from`, which must have a [`packed_form`]) into `dst`, same length.
pub fn pack(from: Encoding, src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    match from {
        Encoding::Ggml(GgmlType::Q4_0) => pack_q4_0x16(src, dst, rows, cols),
        Encoding::Ggml(GgmlType::Q4K) => pack_q4_kx16(src, dst, rows, cols),
        Encoding::Ggml(GgmlType::Q6K) => pack_q6_kx16(src, dst, rows, cols),
        _ => Err(QuantError::NoPackedForm(from.name())),
    }
}

/// The inverse of [`pack`]: unpacks `rows` rows of `form` (a packed form) into its file encoding in `dst`, same
/// length. A sidecar stored packed is read through this when the kernels want the file encoding.
pub fn unpack(form: Encoding, src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    match form {
        Encoding::Q4_0x16 => unpack_q4_0x16(src, dst, rows, cols),
        Encoding::Q4Kx16 => unpack_q4_kx16(src, dst, rows, cols),
        Encoding::Q6Kx16 => unpack_q6_kx16(src, dst, rows, cols),
        _ => Err(QuantError::NoPackedForm(form.name())),
    }
}

fn check_k(rows: usize, cols: usize, got: usize, ty: &'static str) -> Result<usize, QuantError> {
    check_blocks(rows, cols, got, ty, (256, K_BLOCK))
}

/// The two sub-blocks `2p` (low nibbles) and `2p + 1` (high nibbles) of ggml's 32 code bytes `q` (elements
/// `0..32` of both in byte order), as `Q4_Kx16` code bytes: byte `k < 16` of each holds elements `k` and `k + 16`.
/// Whole 16-byte lanes of simple byte ops, so the compiler vectorizes it: packing runs on the I/O thread for
/// every streamed expert.
#[inline]
fn k_split(q: &[u8]) -> ([u8; 16], [u8; 16]) {
    let (mut lo, mut hi) = ([0u8; 16], [0u8; 16]);
    for k in 0..16 {
        let (a, b) = (q[k], q[16 + k]);
        lo[k] = (a & 0x0f) | (b << 4);
        hi[k] = (a >> 4) | (b & 0xf0);
    }
    (lo, hi)
}

/// The inverse of [`k_split`]: ggml's 32 code bytes from sub-blocks `2p` and `2p + 1`.
#[inline]
fn k_join(lo: &[u8; 16], hi: &[u8; 16], q: &mut [u8]) {
    for k in 0..16 {
        q[k] = (lo[k] & 0x0f) | (hi[k] << 4);
        q[16 + k] = (lo[k] >> 4) | (hi[k] & 0xf0);
    }
}

/// Packs `rows` ggml `Q4_K` rows of `cols` elements (`src`) into `dst` (same length). `rows` must be a multiple of
/// 16 and `cols` of 256.
pub fn pack_q4_kx16(src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    let nsb = check_k(rows, cols, src.len(), "Q4_Kx16 pack source")?;
    if dst.len() != src.len() {
        return Err(QuantError::ByteLength { ty: "Q4_Kx16 pack destination", expected: src.len(), got: dst.len() });
    }
    let rb = nsb * K_BLOCK;
    for (sg, dg) in src.chunks_exact(GROUP * rb).zip(dst.chunks_exact_mut(GROUP * rb)) {
        for (s, out) in dg.chunks_exact_mut(K_GROUP_BLOCK).enumerate() {
            for r in 0..GROUP {
                let blk = &sg[r * rb + s * K_BLOCK..r * rb + (s + 1) * K_BLOCK];
                out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                for w in 0..3 {
                    out[64 + 64 * w + 4 * r..64 + 64 * w + 4 * r + 4].copy_from_slice(&blk[4 + 4 * w..8 + 4 * w]);
                }
                for p in 0..4 {
                    let (lo, hi) = k_split(&blk[16 + 32 * p..48 + 32 * p]);
                    for (n, sub) in [lo, hi].iter().enumerate() {
                        let at = 256 + 256 * (2 * p + n) + 4 * r;
                        for c in 0..4 {
                            out[at + 64 * c..at + 64 * c + 4].copy_from_slice(&sub[4 * c..4 * c + 4]);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Row `r` of one `Q4_Kx16` super-block column (`col`, 2304 bytes) as its ggml `Q4_K` block.
fn unpack_k_block(col: &[u8], r: usize, blk: &mut [u8]) {
    blk[..2].copy_from_slice(&col[2 * r..2 * r + 2]);
    blk[2..4].copy_from_slice(&col[32 + 2 * r..32 + 2 * r + 2]);
    for w in 0..3 {
        blk[4 + 4 * w..8 + 4 * w].copy_from_slice(&col[64 + 64 * w + 4 * r..64 + 64 * w + 4 * r + 4]);
    }
    for p in 0..4 {
        let (mut lo, mut hi) = ([0u8; 16], [0u8; 16]);
        for (n, sub) in [&mut lo, &mut hi].into_iter().enumerate() {
            let at = 256 + 256 * (2 * p + n) + 4 * r;
            for c in 0..4 {
                sub[4 * c..4 * c + 4].copy_from_slice(&col[at + 64 * c..at + 64 * c + 4]);
            }
        }
        k_join(&lo, &hi, &mut blk[16 + 32 * p..48 + 32 * p]);
    }
}

/// The inverse of [`pack_q4_kx16`].
pub fn unpack_q4_kx16(src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    unpack_super_blocks(&Q4_KX16, src, dst, rows, cols)
}

/// Dequantizes whole `Q4_Kx16` groups (`out.len()` a multiple of `16·cols`) through a stack buffer of one
/// super-block: no allocation.
pub fn dequantize_q4_kx16(data: &[u8], cols: usize, out: &mut [f32]) -> Result<(), QuantError> {
    dequantize_super_blocks(&Q4_KX16, data, cols, out)
}

/// What the unpacking and dequantizing of a 256-element super-block form needs: its ggml source type and block
/// size, how to read row `r`'s ggml block out of a packed column, and the names its errors carry.
struct SuperBlockForm {
    ty: GgmlType,
    block: usize,
    unpack_block: fn(&[u8], usize, &mut [u8]),
    /// Error names: unpack source, unpack destination, dequantize rows, dequantize data.
    names: [&'static str; 4],
}

const Q4_KX16: SuperBlockForm = SuperBlockForm {
    ty: GgmlType::Q4K,
    block: K_BLOCK,
    unpack_block: unpack_k_block,
    names: ["Q4_Kx16 unpack source", "Q4_Kx16 unpack destination", "Q4_Kx16 rows", "Q4_Kx16"],
};

const Q6_KX16: SuperBlockForm = SuperBlockForm {
    ty: GgmlType::Q6K,
    block: Q6_BLOCK,
    unpack_block: q6_unpack_block,
    names: ["Q6_Kx16 unpack source", "Q6_Kx16 unpack destination", "Q6_Kx16 rows", "Q6_Kx16"],
};

fn unpack_super_blocks(
    f: &SuperBlockForm,
    src: &[u8],
    dst: &mut [u8],
    rows: usize,
    cols: usize,
) -> Result<(), QuantError> {
    let nsb = check_blocks(rows, cols, src.len(), f.names[0], (256, f.block))?;
    if dst.len() != src.len() {
        return Err(QuantError::ByteLength { ty: f.names[1], expected: src.len(), got: dst.len() });
    }
    let rb = nsb * f.block;
    for (sg, dg) in src.chunks_exact(GROUP * rb).zip(dst.chunks_exact_mut(GROUP * rb)) {
        for (s, col) in sg.chunks_exact(GROUP * f.block).enumerate() {
            for r in 0..GROUP {
                (f.unpack_block)(col, r, &mut dg[r * rb + s * f.block..r * rb + (s + 1) * f.block]);
            }
        }
    }
    Ok(())
}

fn dequantize_super_blocks(f: &SuperBlockForm, data: &[u8], cols: usize, out: &mut [f32]) -> Result<(), QuantError> {
    if cols == 0 || !out.len().is_multiple_of(GROUP * cols) {
        return Err(QuantError::PartialBlock { ty: f.names[2], elems: out.len(), block: GROUP * cols.max(1) });
    }
    let rows = out.len() / cols;
    let nsb = check_blocks(rows, cols, data.len(), f.names[3], (256, f.block))?;
    let rb = nsb * f.block;
    const _: () = assert!(Q6_BLOCK >= K_BLOCK);
    let mut buf = [0u8; Q6_BLOCK];
    let blk = &mut buf[..f.block];
    let mut vals = [0f32; 256];
    for (sg, og) in data.chunks_exact(GROUP * rb).zip(out.chunks_exact_mut(GROUP * cols)) {
        for (s, col) in sg.chunks_exact(GROUP * f.block).enumerate() {
            for r in 0..GROUP {
                (f.unpack_block)(col, r, blk);
                ggml::dequantize(f.ty, blk, &mut vals)?;
                og[r * cols + 256 * s..r * cols + 256 * s + 256].copy_from_slice(&vals);
            }
        }
    }
    Ok(())
}

fn check_q6(rows: usize, cols: usize, got: usize, ty: &'static str) -> Result<usize, QuantError> {
    check_blocks(rows, cols, got, ty, (256, Q6_BLOCK))
}

/// Element `e` (0..256) of a ggml `Q6_K` block: (byte of `ql`, its nibble shift, byte of `qh`, its bit shift).
/// ggml's order: per 128-element half `n`, `l < 32`: elements `l`, `l+32`, `l+64`, `l+96` take the low nibble of
/// `ql[64n+l]`, low of `ql[64n+l+32]`, high of `ql[64n+l]`, high of `ql[64n+l+32]`, and bits 0–1, 2–3, 4–5, 6–7 of
/// `qh[32n+l]`.
#[inline]
fn q6_source(e: usize) -> (usize, u32, usize, u32) {
    let (n, m) = (e / 128, e % 128);
    let (quarter, l) = (m / 32, m % 32);
    let ql = 64 * n + l + 32 * (quarter & 1);
    (ql, 4 * (quarter as u32 >> 1), 128 + 32 * n + l, 2 * quarter as u32)
}

/// Where element `e` (0..256) of row `r` goes in a `Q6_Kx16` super-block column: (low-bits byte, its nibble
/// shift, high-bits byte, its bit shift), offsets from the column start.
#[inline]
fn q6_dest(e: usize, r: usize) -> (usize, u32, usize, u32) {
    let (b, k) = (e / 32, e % 32);
    let (h, c, i) = (k / 16, (k % 16) / 4, k % 4);
    let blk = 288 + 384 * b;
    (blk + 64 * c + 4 * r + i, 4 * h as u32, blk + 256 + 64 * h + 4 * r + i, 2 * c as u32)
}

/// Row `r`'s ggml `Q6_K` block `blk` written into super-block column `col`. By whole bytes, not elements: a
/// 32-block `b` of the packed form is one quarter (`b % 4`) of one 128-half (`b / 4`) in ggml's, so its low bits are
/// one nibble of 32 consecutive `ql` bytes and its high bits one bit pair of 32 consecutive `qh` bytes. (It runs on
/// the I/O thread for every streamed `Q6_K` expert; [`q6_unpack_block`] goes element by element through the
/// layout maps and checks it in the round-trip tests.)
fn q6_pack_block(blk: &[u8], col: &mut [u8], r: usize) {
    col[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
    for j in 0..16 {
        col[32 + 16 * j + r] = blk[192 + j];
    }
    for b in 0..8 {
        let (n, quarter) = (b / 4, b % 4);
        let ql = &blk[64 * n + 32 * (quarter & 1)..][..32];
        let qh = &blk[128 + 32 * n..][..32];
        let (ns, hs) = (4 * (quarter >> 1), 2 * quarter);
        let dst = &mut col[288 + 384 * b..288 + 384 * (b + 1)];
        for c in 0..4 {
            for i in 0..4 {
                let k = 4 * c + i;
                dst[64 * c + 4 * r + i] = ((ql[k] >> ns) & 0x0f) | (((ql[16 + k] >> ns) & 0x0f) << 4);
            }
        }
        for h in 0..2 {
            for i in 0..4 {
                let mut v = 0u8;
                for c in 0..4 {
                    v |= ((qh[16 * h + 4 * c + i] >> hs) & 3) << (2 * c);
                }
                dst[256 + 64 * h + 4 * r + i] = v;
            }
        }
    }
}

/// The inverse of [`q6_pack_block`]: row `r`'s ggml `Q6_K` block from column `col`.
fn q6_unpack_block(col: &[u8], r: usize, blk: &mut [u8]) {
    blk.fill(0);
    blk[208..210].copy_from_slice(&col[2 * r..2 * r + 2]);
    for j in 0..16 {
        blk[192 + j] = col[32 + 16 * j + r];
    }
    for e in 0..256 {
        let (sl, ss, sh, hs) = q6_source(e);
        let (dl, ds, dh, dhs) = q6_dest(e, r);
        blk[sl] |= ((col[dl] >> ds) & 0x0f) << ss;
        blk[sh] |= ((col[dh] >> dhs) & 3) << hs;
    }
}

/// Packs `rows` ggml `Q6_K` rows of `cols` elements (`src`) into `dst` (same length). `rows` must be a multiple of
/// 16 and `cols` of 256.
pub fn pack_q6_kx16(src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    let nsb = check_q6(rows, cols, src.len(), "Q6_Kx16 pack source")?;
    if dst.len() != src.len() {
        return Err(QuantError::ByteLength { ty: "Q6_Kx16 pack destination", expected: src.len(), got: dst.len() });
    }
    let rb = nsb * Q6_BLOCK;
    for (sg, dg) in src.chunks_exact(GROUP * rb).zip(dst.chunks_exact_mut(GROUP * rb)) {
        for (s, col) in dg.chunks_exact_mut(Q6_GROUP_BLOCK).enumerate() {
            for r in 0..GROUP {
                q6_pack_block(&sg[r * rb + s * Q6_BLOCK..r * rb + (s + 1) * Q6_BLOCK], col, r);
            }
        }
    }
    Ok(())
}

/// The inverse of [`pack_q6_kx16`].
pub fn unpack_q6_kx16(src: &[u8], dst: &mut [u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    unpack_super_blocks(&Q6_KX16, src, dst, rows, cols)
}

/// Dequantizes whole `Q6_Kx16` groups (`out.len()` a multiple of `16·cols`) through a stack buffer of one
/// super-block: no allocation.
pub fn dequantize_q6_kx16(data: &[u8], cols: usize, out: &mut [f32]) -> Result<(), QuantError> {
    dequantize_super_blocks(&Q6_KX16, data, cols, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_rows(rows: usize, cols: usize) -> Vec<u8> {
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let mut q = vec![0u8; rows * cols / 32 * BLOCK];
        ggml::quantize(GgmlType::Q4_0, &x, &mut q).unwrap();
        q
    }

    type Repack = fn(&[u8], &mut [u8], usize, usize) -> Result<(), QuantError>;
    type Dequant = fn(&[u8], usize, &mut [f32]) -> Result<(), QuantError>;

    /// `ggml` rows `q` of `ty` through one packed form's functions: packing moves bytes, unpacking restores them,
    /// the packed form dequantizes like the rows, and `pack()` dispatches to `pack_fn`.
    fn check_round_trip(ty: GgmlType, q: &[u8], (rows, cols): (usize, usize), fns: (Repack, Repack, Dequant)) {
        let (pack_fn, unpack_fn, dequant_fn) = fns;
        let mut p = vec![0u8; q.len()];
        pack_fn(q, &mut p, rows, cols).unwrap();
        assert_ne!(p, q, "{ty:?}: packing must move bytes");
        let mut back = vec![0u8; q.len()];
        unpack_fn(&p, &mut back, rows, cols).unwrap();
        assert_eq!(back, q, "{ty:?}");
        let (mut a, mut b) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
        ggml::dequantize(ty, q, &mut a).unwrap();
        dequant_fn(&p, cols, &mut b).unwrap();
        assert_eq!(a, b, "{ty:?}");
        let mut via = vec![0u8; q.len()];
        pack(Encoding::Ggml(ty), q, &mut via, rows, cols).unwrap();
        assert_eq!(via, p, "pack() dispatches to the {ty:?} packer");
        let form = packed_form(Encoding::Ggml(ty)).expect("a packed form");
        let mut un = vec![0u8; q.len()];
        unpack(form, &p, &mut un, rows, cols).unwrap();
        assert_eq!(un, q, "unpack() dispatches to the {ty:?} unpacker");
    }

    /// Random bytes for `n` ggml blocks of `block` bytes, each then passed through `fix` (which keeps its f16
    /// scales finite: what the layouts must preserve is every bit, not meaningful values).
    fn random_blocks(n: usize, block: usize, seed: u64, fix: impl Fn(&mut [u8])) -> Vec<u8> {
        let mut state = seed;
        let mut q: Vec<u8> = (0..n * block)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        q.chunks_exact_mut(block).for_each(fix);
        q
    }

    #[test]
    fn pack_round_trips_and_dequantizes_like_the_rows() {
        for (rows, cols) in [(16, 32), (32, 96), (48, 64)] {
            let fns: (Repack, Repack, Dequant) = (pack_q4_0x16, unpack_q4_0x16, dequantize_q4_0x16);
            check_round_trip(GgmlType::Q4_0, &q4_rows(rows, cols), (rows, cols), fns);
        }
    }

    #[test]
    fn layout_puts_four_codes_of_each_row_in_one_word() {
        // Row r's block 0 code byte j = 16r + j: chunk c, word r must be bytes 4c..4c+4 of that row.
        let (rows, cols) = (16, 32);
        let mut q = vec![0u8; rows * BLOCK];
        for r in 0..rows {
            q[r * BLOCK] = r as u8;
            for j in 0..16 {
                q[r * BLOCK + 2 + j] = (16 * r + j) as u8;
            }
        }
        let mut p = vec![0u8; q.len()];
        pack_q4_0x16(&q, &mut p, rows, cols).unwrap();
        assert_eq!(p[2 * 5], 5);
        let at = 32 + 64 * 2 + 4 * 5;
        assert_eq!(&p[at..at + 4], &[16 * 5 + 8, 16 * 5 + 9, 16 * 5 + 10, 16 * 5 + 11]);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let q = q4_rows(16, 32);
        let mut p = vec![0u8; q.len()];
        assert!(pack_q4_0x16(&q, &mut p, 8, 64).is_err(), "8 rows is not a whole group");
        assert!(pack_q4_0x16(&q[1..], &mut p[1..], 16, 32).is_err(), "short source");
        assert!(pack_q4_0x16(&q, &mut p[1..], 16, 32).is_err(), "short destination");
        assert!(dequantize_q4_0x16(&q, 32, &mut [0f32; 8 * 32]).is_err(), "half a group");
    }

    /// Random `Q4_K` rows with finite f16 `d` and `dmin`.
    fn q4k_rows(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        random_blocks(rows * cols / 256, K_BLOCK, seed, |b| {
            b[1] &= 0x3b; // d, dmin: exponent below the f16 maximum, so finite
            b[3] &= 0x3b;
        })
    }

    #[test]
    fn q4_k_pack_round_trips_and_dequantizes_like_the_rows() {
        for (rows, cols) in [(16, 256), (32, 768), (48, 512)] {
            let q = q4k_rows(rows, cols, 0x9e37_79b9_7f4a_7c15 ^ (rows * cols) as u64);
            let fns: (Repack, Repack, Dequant) = (pack_q4_kx16, unpack_q4_kx16, dequantize_q4_kx16);
            check_round_trip(GgmlType::Q4K, &q, (rows, cols), fns);
        }
    }

    #[test]
    fn q4_k_layout_lines_a_sub_block_up_with_one_q8_block() {
        // Row 3, element 32·5 + 16 + 4·2 + 1 = 185: sub-block 5, chunk 2, byte 4·3 + 1, high nibble. In ggml it is
        // element 57 of chunk p = 2 (elements 128..192): byte 32·2 + 25 = 89 of qs, high nibble.
        let (rows, cols) = (16, 256);
        let mut q = vec![0u8; rows * K_BLOCK];
        q[3 * K_BLOCK + 16 + 89] = 0xa0;
        let mut p = vec![0u8; q.len()];
        pack_q4_kx16(&q, &mut p, rows, cols).unwrap();
        let at = 256 + 256 * 5 + 64 * 2 + 4 * 3 + 1;
        assert_eq!(p[at], 0xa0);
        assert_eq!(p.iter().filter(|&&b| b != 0).count(), 1);
    }

    /// Random `Q6_K` rows with a finite f16 `d`.
    fn q6k_rows(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        random_blocks(rows * cols / 256, Q6_BLOCK, seed, |b| b[209] &= 0x3b)
    }

    #[test]
    fn q6_k_pack_round_trips_and_dequantizes_like_the_rows() {
        for (rows, cols) in [(16, 256), (32, 768), (48, 512)] {
            let q = q6k_rows(rows, cols, 0x2545_f491_4f6c_dd1d ^ (rows * cols) as u64);
            let fns: (Repack, Repack, Dequant) = (pack_q6_kx16, unpack_q6_kx16, dequantize_q6_kx16);
            check_round_trip(GgmlType::Q6K, &q, (rows, cols), fns);
        }
    }

    #[test]
    fn q6_k_layout_puts_an_element_where_the_doc_says() {
        // Row 5, element 128 + 64 + 7 = 199: ggml half 1, quarter 2, l = 7 → high nibble of ql[64 + 7], bits 4–5
        // of qh[32 + 7]. Packed: block 6, k = 7 → low half (h 0), chunk 1, i 3: low nibble of byte 288 + 384·6 +
        // 64 + 4·5 + 3, and bits 2–3 of byte 288 + 384·6 + 256 + 4·5 + 3.
        let (rows, cols) = (16, 256);
        let mut q = vec![0u8; rows * Q6_BLOCK];
        q[5 * Q6_BLOCK + 64 + 7] = 0xb0;
        q[5 * Q6_BLOCK + 128 + 32 + 7] = 0x20;
        let mut p = vec![0u8; q.len()];
        pack_q6_kx16(&q, &mut p, rows, cols).unwrap();
        let blk = 288 + 384 * 6;
        assert_eq!(p[blk + 64 + 4 * 5 + 3], 0x0b);
        assert_eq!(p[blk + 256 + 4 * 5 + 3], 0x08);
        assert_eq!(p.iter().filter(|&&b| b != 0).count(), 2);
    }

    #[test]
    fn q6_k_bad_shapes_are_refused() {
        let q = q6k_rows(16, 256, 9);
        let mut p = vec![0u8; q.len()];
        assert!(pack_q6_kx16(&q, &mut p, 8, 512).is_err(), "8 rows is not a whole group");
        assert!(pack_q6_kx16(&q[1..], &mut p[1..], 16, 256).is_err(), "short source");
        assert!(pack_q6_kx16(&q, &mut p[1..], 16, 256).is_err(), "short destination");
        assert!(dequantize_q6_kx16(&q, 256, &mut [0f32; 8 * 256]).is_err(), "half a group");
        assert!(packable(Encoding::Ggml(GgmlType::Q6K), 32, 512));
        assert!(!packable(Encoding::Ggml(GgmlType::Q6K), 24, 512));
    }

    #[test]
    fn q4_k_bad_shapes_are_refused() {
        let q = q4k_rows(16, 256, 7);
        let mut p = vec![0u8; q.len()];
        assert!(pack_q4_kx16(&q, &mut p, 8, 512).is_err(), "8 rows is not a whole group");
        assert!(pack_q4_kx16(&q[1..], &mut p[1..], 16, 256).is_err(), "short source");
        assert!(pack_q4_kx16(&q, &mut p[1..], 16, 256).is_err(), "short destination");
        assert!(dequantize_q4_kx16(&q, 256, &mut [0f32; 8 * 256]).is_err(), "half a group");
        assert!(pack(Encoding::Ggml(GgmlType::Q5K), &q, &mut p, 16, 256).is_err(), "Q5_K has no packed form");
        assert!(packable(Encoding::Ggml(GgmlType::Q4K), 32, 512));
        assert!(!packable(Encoding::Ggml(GgmlType::Q4K), 24, 512));
        assert!(!packable(Encoding::Ggml(GgmlType::Q4K), 32, 500));
    }
}
