//! `Q4_0x16`: ggml `Q4_0` rows regrouped 16 at a time so that one 64-byte vector holds 4 consecutive codes of 16
//! rows — the operand layout of a 16-lane `vpdpbusd` with a broadcast activation word and of an AMX `tdpbssd` B
//! tile (K/4 rows × 16 columns × 4 bytes). Same bytes per matrix as `Q4_0`, so a slot or a band of rows keeps its
//! size and offsets: group `g` (rows `16g..16g+16`) occupies exactly the bytes its 16 rows did.
//!
//! Within a group, block column `b` (elements `32b..32b+32` of every row) is 288 bytes at `288·b`:
//! - 16 little-endian f16 scales, row order (32 bytes);
//! - 4 chunks of 64 bytes; chunk `c`, bytes `4r..4r+4` are bytes `4c..4c+4` of row `r`'s 16 code bytes. A ggml
//!   code byte `j` holds element `j` (low nibble) and `j + 16` (high), so the low nibbles of chunk `c` are elements
//!   `4c..4c+4` and the high nibbles elements `16+4c..16+4c+4`, for each of the 16 rows.
//!
//! Only whole groups exist: a matrix is packed only when its row count is a multiple of 16. The pack is a byte
//! permutation, so `unpack(pack(x)) == x` and dequantizing a packed group equals dequantizing its ggml rows.

use crate::QuantError;
use crate::ggml::{self, GgmlType};

/// Rows per group.
pub const GROUP: usize = 16;
/// Bytes of one ggml `Q4_0` block (f16 scale + 16 code bytes).
const BLOCK: usize = 18;
/// Bytes of one block column of a group.
pub const GROUP_BLOCK: usize = GROUP * BLOCK;

fn check(rows: usize, cols: usize, got: usize, ty: &'static str) -> Result<usize, QuantError> {
    if !cols.is_multiple_of(32) {
        return Err(QuantError::PartialBlock { ty, elems: cols, block: 32 });
    }
    if !rows.is_multiple_of(GROUP) {
        return Err(QuantError::PartialBlock { ty, elems: rows, block: GROUP });
    }
    let expected = rows * cols / 32 * BLOCK;
    if got != expected {
        return Err(QuantError::ByteLength { ty, expected, got });
    }
    Ok(cols / 32)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_rows(rows: usize, cols: usize) -> Vec<u8> {
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let mut q = vec![0u8; rows * cols / 32 * BLOCK];
        ggml::quantize(GgmlType::Q4_0, &x, &mut q).unwrap();
        q
    }

    #[test]
    fn pack_round_trips_and_dequantizes_like_the_rows() {
        for (rows, cols) in [(16, 32), (32, 96), (48, 64)] {
            let q = q4_rows(rows, cols);
            let mut p = vec![0u8; q.len()];
            pack_q4_0x16(&q, &mut p, rows, cols).unwrap();
            assert_ne!(p, q, "packing must move bytes");
            let mut back = vec![0u8; q.len()];
            unpack_q4_0x16(&p, &mut back, rows, cols).unwrap();
            assert_eq!(back, q);
            let (mut a, mut b) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
            ggml::dequantize(GgmlType::Q4_0, &q, &mut a).unwrap();
            dequantize_q4_0x16(&p, cols, &mut b).unwrap();
            assert_eq!(a, b);
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
}
