//! Write → read round trips through `GgufWriter` and `GgufFile`: every metadata type, nested and string arrays,
//! tensors of several ggml types with raw bytes, and the writer's own refusals.

use std::path::Path;

use moestream_format::FormatError;
use moestream_format::gguf::{GgmlType, GgufArray, GgufFile, GgufValue, GgufWriter};

/// Deterministic bytes that differ per tensor, so a tensor read from the wrong offset is caught.
fn pattern(seed: u64, n: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn all_kinds_metadata() -> Vec<(String, GgufValue)> {
    let nested = GgufArray::Array(vec![
        GgufArray::U8(vec![1, 2, 3]),
        GgufArray::String(vec!["x".into(), "".into()]),
        GgufArray::Array(vec![GgufArray::F64(vec![1.5, -2.25]), GgufArray::Bool(vec![])]),
        GgufArray::I32(vec![]),
    ]);
    let kv = |k: &str, v: GgufValue| (k.to_string(), v);
    vec![
        kv("t.u8", GgufValue::U8(250)),
        kv("t.i8", GgufValue::I8(-120)),
        kv("t.u16", GgufValue::U16(65000)),
        kv("t.i16", GgufValue::I16(-32000)),
        kv("t.u32", GgufValue::U32(4_000_000_000)),
        kv("t.i32", GgufValue::I32(-2_000_000_000)),
        kv("t.f32", GgufValue::F32(1e-6)),
        kv("t.bool_true", GgufValue::Bool(true)),
        kv("t.bool_false", GgufValue::Bool(false)),
        kv("t.string", GgufValue::String("héllo ✓ {{ chat }}".into())),
        kv("t.empty_string", GgufValue::String(String::new())),
        kv("t.u64", GgufValue::U64(u64::MAX)),
        kv("t.i64", GgufValue::I64(i64::MIN)),
        kv("t.f64", GgufValue::F64(std::f64::consts::PI)),
        kv("a.u8", GgufValue::Array(GgufArray::U8(vec![0, 255]))),
        kv("a.i8", GgufValue::Array(GgufArray::I8(vec![-128, 127]))),
        kv("a.u16", GgufValue::Array(GgufArray::U16(vec![1, 65535]))),
        kv("a.i16", GgufValue::Array(GgufArray::I16(vec![-1, 2]))),
        kv("a.u32", GgufValue::Array(GgufArray::U32(vec![7; 5]))),
        kv("a.i32", GgufValue::Array(GgufArray::I32(vec![-7, 0, 7]))),
        kv("a.f32", GgufValue::Array(GgufArray::F32(vec![0.5, -0.0, f32::MAX]))),
        kv("a.bool", GgufValue::Array(GgufArray::Bool(vec![true, false, true]))),
        kv("a.string", GgufValue::Array(GgufArray::String(vec!["Ġthe".into(), "".into(), "Ġ t".into()]))),
        kv("a.u64", GgufValue::Array(GgufArray::U64(vec![u64::MAX, 0]))),
        kv("a.i64", GgufValue::Array(GgufArray::I64(vec![i64::MIN, i64::MAX]))),
        kv("a.f64", GgufValue::Array(GgufArray::F64(vec![1e300, -1e-300]))),
        kv("a.empty", GgufValue::Array(GgufArray::F32(vec![]))),
        kv("a.nested", GgufValue::Array(nested)),
    ]
}

/// (name, shape outermost first, type)
fn sample_tensors() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("f32", vec![3, 5], GgmlType::F32),
        ("f16", vec![7], GgmlType::F16),
        ("bf16", vec![2, 3], GgmlType::BF16),
        ("q4_0", vec![3, 64], GgmlType::Q4_0),
        ("q8_0", vec![2, 2, 32], GgmlType::Q8_0),
        ("q4_k", vec![2, 256], GgmlType::Q4K),
        ("q6_k", vec![1, 1, 1, 512], GgmlType::Q6K),
        ("mxfp4", vec![4, 32], GgmlType::MXFP4),
        ("q5_1", vec![32], GgmlType::Q5_1),
    ]
}

fn expected_bytes(shape: &[u64], ty: GgmlType) -> u64 {
    let elems: u64 = shape.iter().product();
    elems / ty.block_elems() as u64 * ty.block_bytes() as u64
}

fn write_sample(path: &Path, extra: &[(String, GgufValue)]) -> u64 {
    let mut w = GgufWriter::create(path).unwrap();
    for (k, v) in all_kinds_metadata().into_iter().chain(extra.iter().cloned()) {
        w.add_kv(&k, v).unwrap();
    }
    for (name, shape, ty) in sample_tensors() {
        w.add_tensor(name, &shape, ty).unwrap();
    }
    let mut d = w.finish_header().unwrap();
    for (i, (name, shape, ty)) in sample_tensors().into_iter().enumerate() {
        d.write_tensor(name, &pattern(i as u64, expected_bytes(&shape, ty))).unwrap();
    }
    d.finish().unwrap()
}

fn check_sample(path: &Path, alignment: u64, written_len: u64, extra: &[(String, GgufValue)]) {
    let f = GgufFile::open(path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, alignment);
    assert_eq!(f.file_len, written_len);
    assert_eq!(std::fs::metadata(path).unwrap().len(), written_len);
    assert_eq!(f.data_offset % alignment, 0);
    let want: Vec<(String, GgufValue)> = all_kinds_metadata().into_iter().chain(extra.iter().cloned()).collect();
    assert_eq!(f.metadata, want);

    let file = std::fs::read(path).unwrap();
    assert_eq!(f.tensors.len(), sample_tensors().len());
    for (i, ((name, shape, ty), t)) in sample_tensors().into_iter().zip(&f.tensors).enumerate() {
        assert_eq!(t.name, name);
        assert_eq!(t.shape(), shape, "{name}");
        assert_eq!(t.ne, shape.iter().rev().copied().collect::<Vec<_>>(), "{name}");
        assert_eq!(t.ty, ty, "{name}");
        assert_eq!(t.n_bytes, expected_bytes(&shape, ty), "{name}");
        assert_eq!((t.offset - f.data_offset) % alignment, 0, "{name}");
        let got = &file[t.offset as usize..(t.offset + t.n_bytes) as usize];
        assert_eq!(got, pattern(i as u64, t.n_bytes).as_slice(), "{name} bytes");
    }
    // The data section is a whole number of aligned tensors, as ggml expects.
    let last = f.tensors.last().unwrap();
    assert_eq!(written_len, (last.offset + last.n_bytes).next_multiple_of(alignment));
}

#[test]
fn round_trip_every_value_type_and_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.gguf");
    let len = write_sample(&path, &[]);
    check_sample(&path, 32, len, &[]);
}

#[test]
fn round_trip_with_custom_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned.gguf");
    let extra = vec![("general.alignment".to_string(), GgufValue::U32(256))];
    let len = write_sample(&path, &extra);
    check_sample(&path, 256, len, &extra);
}

#[test]
fn typed_getters_accept_any_fitting_width_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("getters.gguf");
    write_sample(&path, &[]);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u32("t.u8").unwrap(), 250);
    assert_eq!(f.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_i64("t.i8").unwrap(), -120);
    assert_eq!(f.get_i32("t.u16").unwrap(), 65000);
    assert_eq!(f.get_f32("t.f32").unwrap(), 1e-6);
    assert_eq!(f.get_f64("t.f64").unwrap(), std::f64::consts::PI);
    assert!(f.get_bool("t.bool_true").unwrap());
    assert_eq!(f.get_str("t.string").unwrap(), "héllo ✓ {{ chat }}");
    assert_eq!(f.get_str_array("a.string").unwrap(), ["Ġthe", "", "Ġ t"]);
    assert_eq!(f.get_i64_array("a.u16").unwrap(), vec![1, 65535]);
    assert_eq!(f.get_array("a.f32").unwrap().len(), 3);
    assert_eq!(f.tensor("q8_0").unwrap().shape(), vec![2, 2, 32]);
    assert!(f.tensor("nope").is_none());

    let p = path.display().to_string();
    let cases: Vec<(FormatError, &str)> = vec![
        (f.get_u32("t.u64").unwrap_err(), "key `t.u64`: value 18446744073709551615 does not fit in u32"),
        (f.get_u64("t.i8").unwrap_err(), "key `t.i8`: value -120 does not fit in u64"),
        (f.get_u32("t.string").unwrap_err(), "key `t.string`: expected u32, found string"),
        (f.get_str("a.string").unwrap_err(), "key `a.string`: expected string, found array of 3 string"),
        (f.get_f32("t.u8").unwrap_err(), "key `t.u8`: expected a float, found u8"),
        (f.get_str_array("a.u8").unwrap_err(), "key `a.u8`: expected array of string, found array of 2 u8"),
        (f.get_i64_array("a.u64").unwrap_err(), "key `a.u64`: expected array of integers fitting i64"),
        (f.get_str("no.such.key").unwrap_err(), "missing required field `no.such.key`"),
    ];
    for (e, want) in cases {
        let msg = e.to_string();
        assert!(msg.starts_with(&p) && msg.contains(want), "{msg:?} should name {p} and say {want:?}");
    }
}

#[test]
fn write_tensor_from_streams_exact_byte_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.gguf");
    let mut w = GgufWriter::create(&path).unwrap();
    w.add_tensor("big", &[64, 256], GgmlType::Q4K).unwrap();
    w.add_tensor("small", &[5], GgmlType::F32).unwrap();
    let mut d = w.finish_header().unwrap();
    let big = pattern(9, 64 * 144);
    // A source longer than the tensor: only the tensor's bytes are taken.
    let mut src = std::io::Cursor::new([big.clone(), vec![0xEE; 100]].concat());
    d.write_tensor_from("big", &mut src).unwrap();
    let small = pattern(10, 20);
    // A source shorter than the tensor is refused.
    let short = d.write_tensor_from("small", &mut &small[..19]).unwrap_err().to_string();
    assert!(short.contains("tensor small") && short.contains("needs 20 bytes, found 19"), "{short}");
    // The short copy already wrote 19 bytes, so the layout is broken: everything after is refused.
    assert_err(d.write_tensor("small", &small), &path, "an earlier write to this file failed part-way");
    assert_err(d.finish(), &path, "the file is incomplete");
    streamed_file_reads_back(&path, &big, &small);
}

/// Writes the same two tensors properly from readers, then checks the bytes landed where the reader says.
fn streamed_file_reads_back(path: &Path, big: &[u8], small: &[u8]) {
    let mut w = GgufWriter::create(path).unwrap();
    w.add_tensor("big", &[64, 256], GgmlType::Q4K).unwrap();
    w.add_tensor("small", &[5], GgmlType::F32).unwrap();
    let mut d = w.finish_header().unwrap();
    d.write_tensor_from("big", &mut &big[..]).unwrap();
    d.write_tensor_from("small", &mut &small[..]).unwrap();
    d.finish().unwrap();
    let f = GgufFile::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let t = f.tensor("big").unwrap();
    assert_eq!(&bytes[t.offset as usize..][..t.n_bytes as usize], big);
    let t = f.tensor("small").unwrap();
    assert_eq!(&bytes[t.offset as usize..][..t.n_bytes as usize], small);
}

#[test]
fn file_with_no_tensors_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    let mut w = GgufWriter::create(&path).unwrap();
    w.add_kv("general.architecture", GgufValue::String("qwen3moe".into())).unwrap();
    w.finish_header().unwrap().finish().unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert!(f.tensors.is_empty());
    assert_eq!(f.get_str("general.architecture").unwrap(), "qwen3moe");
}

fn assert_err(r: Result<impl std::fmt::Debug, FormatError>, path: &Path, want: &str) {
    let msg = r.unwrap_err().to_string();
    let p = path.display().to_string();
    assert!(msg.starts_with(&p) && msg.contains(want), "{msg:?} should name {p} and say {want:?}");
}

#[test]
fn writer_refuses_bad_metadata_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refuse.gguf");
    let mut w = GgufWriter::create(&path).unwrap();
    w.add_kv("k", GgufValue::U8(1)).unwrap();
    assert_err(w.add_kv("k", GgufValue::U8(2)), &path, "duplicate key `k`");
    assert_err(w.add_kv("general.alignment", GgufValue::U32(48)), &path, "must be a u32 power of two");
    assert_err(w.add_kv("general.alignment", GgufValue::U64(64)), &path, "must be a u32 power of two");
    let deep = (0..5).fold(GgufArray::U8(vec![1]), |a, _| GgufArray::Array(vec![a]));
    assert_err(w.add_kv("deep", GgufValue::Array(deep)), &path, "key `deep`: arrays nested deeper than 4");
    w.add_tensor("t", &[2, 32], GgmlType::Q8_0).unwrap();
    assert_err(w.add_tensor("t", &[1], GgmlType::F32), &path, "duplicate tensor name `t`");
    assert_err(w.add_tensor("odd", &[2, 33], GgmlType::Q8_0), &path, "ne[0] = 33 is not a multiple of the Q8_0 block");
    assert_err(w.add_tensor("five", &[1, 1, 1, 1, 1], GgmlType::F32), &path, "has 5 dimensions");
    assert_err(w.add_tensor("zero", &[0, 4], GgmlType::F32), &path, "dimension ne[1] is 0");
    assert_err(w.add_tensor(&"n".repeat(64), &[1], GgmlType::F32), &path, "name is 64 bytes");
}

#[test]
fn data_writer_checks_order_size_and_completeness() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.gguf");
    let mut w = GgufWriter::create(&path).unwrap();
    w.add_tensor("first", &[2, 32], GgmlType::Q8_0).unwrap();
    w.add_tensor("second", &[4], GgmlType::F16).unwrap();
    let mut d = w.finish_header().unwrap();
    assert_err(d.write_tensor("second", &[0; 8]), &path, "tensor `second` written out of order: `first` comes next");
    assert_err(
        d.write_tensor("first", &[0; 67]),
        &path,
        "tensor first: shape [2, 32] as Q8_0 needs 68 bytes, found 67",
    );
    d.write_tensor("first", &[0; 68]).unwrap();
    assert_err(d.finish(), &path, "finished with 1 tensors unwritten: second");

    let mut w = GgufWriter::create(&path).unwrap();
    w.add_tensor("only", &[4], GgmlType::F16).unwrap();
    let mut d = w.finish_header().unwrap();
    d.write_tensor("only", &[0; 8]).unwrap();
    assert_err(d.write_tensor("only", &[0; 8]), &path, "all 1 tensors are already written");
    d.finish().unwrap();
}

/// Qwen-sized tokenizer arrays (151k tokens, 151k merges, token types) round trip, through the typed vectors.
#[test]
fn large_tokenizer_arrays_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    let n: i32 = 151_936;
    let tokens: Vec<String> = (0..n).map(|i| format!("Ġtok{i}")).collect();
    let merges: Vec<String> = (0..n).map(|i| format!("Ġ t{i}")).collect();
    let types: Vec<i32> = (0..n).map(|i| i % 4).collect();
    let mut w = GgufWriter::create(&path).unwrap();
    w.add_kv("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens.clone()))).unwrap();
    w.add_kv("tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(merges.clone()))).unwrap();
    w.add_kv("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(types.clone()))).unwrap();
    w.finish_header().unwrap().finish().unwrap();
    let t0 = std::time::Instant::now();
    let f = GgufFile::open(&path).unwrap();
    let took = t0.elapsed();
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap(), tokens.as_slice());
    assert_eq!(f.get_str_array("tokenizer.ggml.merges").unwrap(), merges.as_slice());
    assert_eq!(
        f.get_i64_array("tokenizer.ggml.token_type").unwrap(),
        types.iter().map(|&t| t as i64).collect::<Vec<_>>()
    );
    eprintln!("opened a {n}-token vocabulary header in {took:?}");
}
