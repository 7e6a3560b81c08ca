//! Hostile and broken GGUF files. Each is built byte by byte with `Raw` (so the damage is exact and independent of
//! our writer), and each test checks that `GgufFile::open` fails with a message naming the file and the problem.

use std::path::PathBuf;

use moestream_format::FormatError;
use moestream_format::gguf::GgufFile;

const F32: u32 = 0;
const Q8_0: u32 = 8;
const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

fn s(x: &str) -> Vec<u8> {
    [(x.len() as u64).to_le_bytes().as_slice(), x.as_bytes()].concat()
}

fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    [s(key), ty.to_le_bytes().to_vec(), value.to_vec()].concat()
}

fn tinfo(name: &str, ne: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut v = s(name);
    v.extend((ne.len() as u32).to_le_bytes());
    ne.iter().for_each(|n| v.extend(n.to_le_bytes()));
    v.extend(ty.to_le_bytes());
    v.extend(offset.to_le_bytes());
    v
}

/// A GGUF file as parts; `n_tensors`/`n_kv` default to the real counts.
struct Raw {
    magic: [u8; 4],
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kvs: Vec<Vec<u8>>,
    tinfos: Vec<Vec<u8>>,
    data_len: u64,
}

impl Raw {
    /// A valid file: one string key, tensor `a` (F32, 8 elements, 32 bytes at 0) and tensor `b` (Q8_0, ne
    /// [32, 2], 68 bytes at 32), data section 128 bytes (the last tensor padded to 32).
    fn valid() -> Raw {
        Raw {
            magic: *b"GGUF",
            version: 3,
            n_tensors: None,
            n_kv: None,
            kvs: vec![kv("general.name", T_STRING, &s("tiny"))],
            tinfos: vec![tinfo("a", &[8], F32, 0), tinfo("b", &[32, 2], Q8_0, 32)],
            data_len: 128,
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut v = self.magic.to_vec();
        v.extend(self.version.to_le_bytes());
        v.extend(self.n_tensors.unwrap_or(self.tinfos.len() as u64).to_le_bytes());
        v.extend(self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        self.kvs.iter().for_each(|k| v.extend(k));
        self.tinfos.iter().for_each(|t| v.extend(t));
        v
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = self.header();
        v.resize(v.len().next_multiple_of(32), 0);
        let data_start = v.len();
        v.extend((0..self.data_len).map(|i| i as u8));
        assert_eq!(data_start % 32, 0);
        v
    }
}

struct Scratch {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(bytes: &[u8]) -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-model.gguf");
    std::fs::write(&path, bytes).unwrap();
    Scratch { _dir: dir, path }
}

/// Opens `bytes` as a file, expects failure, checks the message names the file and contains every `want`.
fn open_err(bytes: &[u8], want: &[&str]) -> FormatError {
    let f = write(bytes);
    let e = match GgufFile::open(&f.path) {
        Ok(g) => panic!("expected an error containing {want:?}, got a file with {} tensors", g.tensors.len()),
        Err(e) => e,
    };
    let msg = e.to_string();
    let p = f.path.display().to_string();
    assert!(msg.starts_with(&p), "{msg:?} does not name the file {p}");
    for w in want {
        assert!(msg.contains(w), "{msg:?} does not say {w:?}");
    }
    e
}

#[test]
fn the_valid_base_file_opens() {
    let f = write(&Raw::valid().bytes());
    let g = GgufFile::open(&f.path).unwrap();
    assert_eq!(g.tensors.len(), 2);
    assert_eq!(g.get_str("general.name").unwrap(), "tiny");
    assert_eq!(g.tensors[1].n_bytes, 68);
    assert_eq!(g.tensors[1].offset, g.data_offset + 32);
}

#[test]
fn bad_magic() {
    let mut r = Raw::valid();
    r.magic = *b"GGML";
    open_err(&r.bytes(), &["bad magic", "not a GGUF file"]);
}

#[test]
fn empty_file_is_truncated_at_magic() {
    let e = open_err(&[], &["truncated: magic needs bytes 0..4 but the file has 0"]);
    assert!(matches!(e, FormatError::Truncated { .. }));
}

#[test]
fn version_1_is_rejected() {
    let mut r = Raw::valid();
    r.version = 1;
    open_err(&r.bytes(), &["GGUF version 1 is not supported"]);
}

#[test]
fn unknown_version_is_rejected() {
    let mut r = Raw::valid();
    r.version = 4;
    open_err(&r.bytes(), &["unsupported GGUF version 4, expected 2 or 3"]);
}

#[test]
fn big_endian_file_is_named_as_such() {
    let mut r = Raw::valid();
    r.version = 3u32.swap_bytes();
    open_err(&r.bytes(), &["big-endian"]);
}

#[test]
fn version_2_is_accepted() {
    let mut r = Raw::valid();
    r.version = 2;
    let f = write(&r.bytes());
    assert_eq!(GgufFile::open(&f.path).unwrap().version, 2);
}

#[test]
fn truncated_mid_header() {
    let full = Raw::valid().bytes();
    let header_len = Raw::valid().header().len();
    // Cut inside the last tensor info (its offset field).
    let e = open_err(&full[..header_len - 3], &["truncated", "tensor `b`"]);
    assert!(matches!(e, FormatError::Truncated { .. }));
}

#[test]
fn truncated_mid_tensor_data() {
    let full = Raw::valid().bytes();
    // Tensor b spans data bytes 32..100; keep 50 of them.
    let data_start = full.len() - 128;
    let cut = data_start + 50;
    let e = open_err(&full[..cut], &["truncated", "tensor `b`", &format!("but the file has {cut}")]);
    assert!(matches!(e, FormatError::Truncated { .. }));
}

#[test]
fn every_truncation_before_the_last_tensor_end_fails_cleanly() {
    let full = Raw::valid().bytes();
    let last_end = full.len() - 128 + 100;
    for cut in 0..last_end {
        open_err(&full[..cut], &["truncated"]);
    }
    // Only the final padding may be missing.
    let f = write(&full[..last_end]);
    GgufFile::open(&f.path).unwrap();
}

#[test]
fn counts_past_the_end_of_the_file() {
    let mut r = Raw::valid();
    r.n_kv = Some(1000);
    open_err(&r.bytes(), &["truncated", "2 tensor infos and 1000 key-values"]);
}

#[test]
fn absurd_n_tensors() {
    let mut r = Raw::valid();
    r.n_tensors = Some(u64::MAX);
    open_err(&r.bytes(), &["n_tensors = 18446744073709551615 exceeds the limit"]);
}

#[test]
fn absurd_n_kv() {
    let mut r = Raw::valid();
    r.n_kv = Some(u64::MAX / 2);
    open_err(&r.bytes(), &["n_kv = 9223372036854775807 exceeds the limit"]);
}

#[test]
fn string_length_past_eof() {
    let mut r = Raw::valid();
    // The value claims 5000 bytes; the file has a few hundred.
    let mut v = 5000u64.to_le_bytes().to_vec();
    v.extend(b"tiny");
    r.kvs = vec![kv("general.name", T_STRING, &v)];
    open_err(&r.bytes(), &["truncated", "key `general.name` (5000-byte string)"]);
}

#[test]
fn absurd_string_length() {
    let mut r = Raw::valid();
    r.kvs = vec![kv("general.name", T_STRING, &u64::MAX.to_le_bytes())];
    open_err(&r.bytes(), &["key `general.name`: string length 18446744073709551615 exceeds the limit"]);
}

#[test]
fn absurd_key_length() {
    let mut r = Raw::valid();
    r.kvs = vec![[u64::MAX.to_le_bytes().to_vec(), b"abc".to_vec()].concat()];
    open_err(&r.bytes(), &["key of key-value 0: string length 18446744073709551615 exceeds the limit"]);
}

#[test]
fn absurd_array_length() {
    let mut r = Raw::valid();
    let v = [T_U32.to_le_bytes().as_slice(), &u64::MAX.to_le_bytes()].concat();
    r.kvs.push(kv("tokenizer.ggml.token_type", T_ARRAY, &v));
    open_err(&r.bytes(), &["key `tokenizer.ggml.token_type`: array length 18446744073709551615 exceeds the limit"]);
}

#[test]
fn array_length_past_eof() {
    let mut r = Raw::valid();
    // 100k strings need at least 800 000 bytes.
    let v = [T_STRING.to_le_bytes().as_slice(), &100_000u64.to_le_bytes()].concat();
    r.kvs.push(kv("tokenizer.ggml.tokens", T_ARRAY, &v));
    open_err(&r.bytes(), &["truncated", "key `tokenizer.ggml.tokens` (array of 100000 string, at least 800000 bytes)"]);
}

#[test]
fn string_array_element_length_past_eof() {
    let mut r = Raw::valid();
    let mut v = [T_STRING.to_le_bytes().as_slice(), &2u64.to_le_bytes()].concat();
    v.extend(s("ok"));
    v.extend(1_000_000u64.to_le_bytes());
    r.kvs.push(kv("tokenizer.ggml.merges", T_ARRAY, &v));
    open_err(&r.bytes(), &["truncated", "key `tokenizer.ggml.merges`[1] (1000000-byte string)"]);
}

#[test]
fn arrays_nested_too_deep() {
    let mut r = Raw::valid();
    // Five levels of array-of-array, each of length 1, around a u8 array.
    let mut v = [T_U8.to_le_bytes().as_slice(), &1u64.to_le_bytes(), &[7]].concat();
    for _ in 0..5 {
        v = [T_ARRAY.to_le_bytes().as_slice(), &1u64.to_le_bytes(), &v].concat();
    }
    r.kvs.push(kv("deep", T_ARRAY, &v));
    open_err(&r.bytes(), &["key `deep`[0][0][0]: arrays nested deeper than 4 levels"]);
}

#[test]
fn unknown_value_type() {
    let mut r = Raw::valid();
    r.kvs.push(kv("weird", 13, &[0; 8]));
    open_err(&r.bytes(), &["key `weird`: unknown value type id 13"]);
}

#[test]
fn bool_byte_other_than_0_or_1() {
    let mut r = Raw::valid();
    r.kvs.push(kv("flag", T_BOOL, &[2]));
    open_err(&r.bytes(), &["key `flag`: bool byte is 2"]);
}

#[test]
fn key_not_utf8() {
    let mut r = Raw::valid();
    r.kvs.push([2u64.to_le_bytes().as_slice(), &[0xC3, 0x28], &T_U8.to_le_bytes(), &[1]].concat());
    open_err(&r.bytes(), &["key of key-value 1: string is not UTF-8"]);
}

#[test]
fn duplicate_key() {
    let mut r = Raw::valid();
    r.kvs.push(kv("general.name", T_STRING, &s("again")));
    open_err(&r.bytes(), &["duplicate key `general.name`"]);
}

#[test]
fn alignment_not_a_power_of_two() {
    let mut r = Raw::valid();
    r.kvs.push(kv("general.alignment", T_U32, &48u32.to_le_bytes()));
    open_err(&r.bytes(), &["`general.alignment` is U32(48), expected a power of two"]);
}

#[test]
fn unknown_dtype_names_the_tensor() {
    let mut r = Raw::valid();
    r.tinfos[1] = tinfo("blk.0.ffn_down_exps.weight", &[32, 2], 4, 32); // 4 was Q4_2, long removed
    let e = open_err(&r.bytes(), &["tensor blk.0.ffn_down_exps.weight: unknown dtype ggml type id 4"]);
    assert!(matches!(e, FormatError::UnknownDtype { .. }));
}

#[test]
fn row_not_a_whole_number_of_blocks() {
    let mut r = Raw::valid();
    r.tinfos[1] = tinfo("b", &[33, 2], Q8_0, 32);
    open_err(&r.bytes(), &["tensor `b`: ne[0] = 33 is not a multiple of the Q8_0 block of 32 elements"]);
}

#[test]
fn n_dims_out_of_range() {
    for n_dims in [0usize, 5] {
        let mut r = Raw::valid();
        r.tinfos[0] = tinfo("a", &vec![1; n_dims], F32, 0);
        open_err(&r.bytes(), &[&format!("tensor `a`: n_dims = {n_dims}, expected 1..=4")]);
    }
}

#[test]
fn zero_dimension() {
    let mut r = Raw::valid();
    r.tinfos[0] = tinfo("a", &[8, 0], F32, 0);
    open_err(&r.bytes(), &["tensor `a`: dimension ne[1] is 0"]);
}

#[test]
fn element_count_overflow() {
    let mut r = Raw::valid();
    r.tinfos[0] = tinfo("a", &[1 << 32, 1 << 32], F32, 0);
    open_err(&r.bytes(), &["tensor `a`: element count", "overflows i64"]);
}

#[test]
fn duplicate_tensor_name() {
    let mut r = Raw::valid();
    r.tinfos[1] = tinfo("a", &[8], F32, 32);
    open_err(&r.bytes(), &["duplicate tensor name `a`"]);
}

#[test]
fn tensor_range_out_of_bounds() {
    let mut r = Raw::valid();
    r.tinfos[1] = tinfo("b", &[32, 2], Q8_0, 1 << 20);
    let e = open_err(&r.bytes(), &["truncated", "tensor `b` (Q8_0, ne [32, 2], 68 bytes at data offset 1048576)"]);
    assert!(matches!(e, FormatError::Truncated { .. }));
}

#[test]
fn tensor_offset_overflowing_u64() {
    let mut r = Raw::valid();
    r.tinfos[1] = tinfo("b", &[32, 2], Q8_0, u64::MAX - 31);
    open_err(&r.bytes(), &["truncated", "tensor `b`"]);
}

#[test]
fn misaligned_tensor_offset() {
    let mut r = Raw::valid();
    r.tinfos[1] = tinfo("b", &[32, 2], Q8_0, 36);
    open_err(&r.bytes(), &["tensor `b`: offset 36 is not a multiple of the alignment 32"]);
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::valid();
    r.tinfos[0] = tinfo("a", &[16], F32, 0); // 64 bytes, into b at 32
    open_err(&r.bytes(), &["tensors `a` (bytes", "and `b`", "overlap"]);
}

#[test]
fn tensor_name_too_long_for_ggml() {
    let mut r = Raw::valid();
    let name = "x".repeat(64);
    r.tinfos[0] = tinfo(&name, &[8], F32, 0);
    open_err(&r.bytes(), &["name is 64 bytes, ggml allows at most 63"]);
}

/// Every single-byte corruption of the header must give Ok or an error, never a panic or a huge allocation.
#[test]
fn corrupting_any_header_byte_never_panics() {
    let full = Raw::valid().bytes();
    let header_len = Raw::valid().header().len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzzed.gguf");
    let mut errors = 0;
    for i in 0..header_len {
        for v in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
            let mut b = full.clone();
            if b[i] == v {
                continue;
            }
            b[i] = v;
            std::fs::write(&path, &b).unwrap();
            if let Err(e) = GgufFile::open(&path) {
                assert!(e.to_string().starts_with(&path.display().to_string()), "{e}");
                errors += 1;
            }
        }
    }
    assert!(errors > header_len, "most corruptions should be caught, only {errors} were");
}
