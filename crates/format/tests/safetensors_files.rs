//! Broken safetensors files and checkpoint directories, and a round trip of our streaming writer through the
//! `safetensors` crate's own reader. Broken files are built as raw bytes (8-byte length, JSON header, data), so
//! the damage is exact; each test checks that the error names the file and the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moestream_format::safetensors::{SafetensorsFile, SafetensorsSet, SafetensorsWriter, StDtype};
use serde_json::{Value, json};

/// A valid header: `a` F32 [2, 3] at 0..24, `b` BF16 [4] at 24..32.
fn header() -> Value {
    json!({
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    })
}

/// Raw file bytes: little-endian header length, the header text padded with spaces to 8 bytes, then `data`.
fn raw(header_text: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header_text.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    [(h.len() as u64).to_le_bytes().as_slice(), &h, data].concat()
}

fn data32() -> Vec<u8> {
    (0u8..32).collect()
}

/// Open `bytes` written as `name` in a fresh directory; the error text, which must name the file.
fn open_err(name: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write");
    let err = match SafetensorsFile::open(&path) {
        Ok(f) => panic!("{name}: opened as {:?}", f.tensors),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "error does not name the file: {err}");
    err
}

fn assert_has(err: &str, want: &[&str]) {
    for w in want {
        assert!(err.contains(w), "error lacks `{w}`: {err}");
    }
}

#[test]
fn the_valid_raw_file_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ok.safetensors");
    let bytes = raw(&header().to_string(), &data32());
    std::fs::write(&path, &bytes).expect("write");
    let f = SafetensorsFile::open(&path).expect("valid file");
    let data_start = bytes.len() as u64 - 32;
    let got: Vec<_> = f.tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.clone(), t.offset, t.len)).collect();
    assert_eq!(
        got,
        vec![("a", StDtype::F32, vec![2, 3], data_start, 24), ("b", StDtype::BF16, vec![4], data_start + 24, 8)]
    );
    assert_eq!(f.metadata.get("format").map(String::as_str), Some("pt"));
}

#[test]
fn truncated_data() {
    let bytes = raw(&header().to_string(), &data32());
    let err = open_err("cut.safetensors", &bytes[..bytes.len() - 5]);
    assert_has(&err, &["truncated", "tensor data"]);
}

#[test]
fn shorter_than_the_length_prefix() {
    let err = open_err("tiny.safetensors", &[1, 2, 3]);
    assert_has(&err, &["truncated", "8-byte header length"]);
}

#[test]
fn header_length_past_end_of_file() {
    let mut bytes = raw(&header().to_string(), &data32());
    let past = bytes.len() as u64;
    bytes[..8].copy_from_slice(&past.to_le_bytes());
    let err = open_err("long-header.safetensors", &bytes);
    assert_has(&err, &["truncated", &format!("the {past}-byte JSON header")]);
}

#[test]
fn header_length_absurd() {
    let mut bytes = raw(&header().to_string(), &data32());
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open_err("absurd.safetensors", &bytes);
    assert_has(&err, &[&format!("header length {}", u64::MAX), "exceeds"]);
}

#[test]
fn malformed_json_header() {
    let err = open_err("bad-json.safetensors", &raw("{\"a\": {\"dtype\": \"F32\",", &data32()));
    assert_has(&err, &["malformed JSON"]);
}

#[test]
fn header_not_an_object() {
    let err = open_err("array.safetensors", &raw("[1, 2]", &data32()));
    assert_has(&err, &["header is not a JSON object"]);
}

#[test]
fn unknown_dtypes() {
    // F8_E4M3 is a dtype the safetensors format knows and we do not; I64 likewise; "Q4" is nobody's.
    for dtype in ["F8_E4M3", "I64", "Q4"] {
        let mut h = header();
        h["a"]["dtype"] = json!(dtype);
        let err = open_err(&format!("{dtype}.safetensors"), &raw(&h.to_string(), &data32()));
        assert_has(&err, &["tensor a", &format!("unknown dtype {dtype}")]);
    }
}

#[test]
fn shape_and_byte_size_disagree() {
    // [2, 4] F32 needs 32 bytes; the offsets give it 24.
    let mut h = header();
    h["a"]["shape"] = json!([2, 4]);
    let err = open_err("size.safetensors", &raw(&h.to_string(), &data32()));
    assert_has(&err, &["tensor a", "[2, 4]", "needs 32 bytes, found 24"]);
}

#[test]
fn overlapping_offsets() {
    let mut h = header();
    h["b"]["data_offsets"] = json!([16, 24]);
    h["b"]["shape"] = json!([4]);
    let err = open_err("overlap.safetensors", &raw(&h.to_string(), &data32()));
    assert_has(&err, &["invalid safetensors header", "invalid offset for tensor `b`"]);
}

#[test]
fn gap_between_tensors() {
    let mut h = header();
    h["b"]["data_offsets"] = json!([32, 40]);
    let err = open_err("gap.safetensors", &raw(&h.to_string(), &[0u8; 40]));
    assert_has(&err, &["invalid safetensors header", "invalid offset for tensor `b`"]);
}

/// A sharded checkpoint: `a` in shard 1, `b` in shard 2, and the index naming them.
fn sharded_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s1 = dir.path().join("model-00001-of-00002.safetensors");
    let s2 = dir.path().join("model-00002-of-00002.safetensors");
    let one = json!({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}});
    let two = json!({"b": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}});
    std::fs::write(&s1, raw(&one.to_string(), &[0u8; 24])).expect("write shard 1");
    std::fs::write(&s2, raw(&two.to_string(), &[0u8; 8])).expect("write shard 2");
    write_index(dir.path(), &json!({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}));
    (dir, s1, s2)
}

fn write_index(dir: &Path, weight_map: &Value) {
    let idx = json!({"metadata": {"total_size": 32}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).expect("write index");
}

fn open_dir_err(dir: &Path) -> String {
    match SafetensorsSet::open_dir(dir) {
        Ok(s) => panic!("opened {} files", s.files.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_dir_opens() {
    let (dir, s1, s2) = sharded_dir();
    let set = SafetensorsSet::open_dir(dir.path()).expect("valid sharded dir");
    let got: Vec<_> = set.files.iter().map(|f| (f.path.clone(), f.tensors[0].name.clone())).collect();
    assert_eq!(got, vec![(s1, "a".to_string()), (s2, "b".to_string())]);
}

#[test]
fn sharded_dir_with_a_missing_shard() {
    let (dir, _, s2) = sharded_dir();
    std::fs::remove_file(&s2).expect("remove shard");
    let err = open_dir_err(dir.path());
    assert_has(&err, &["model.safetensors.index.json", "shard `model-00002-of-00002.safetensors`", "missing", "`b`"]);
}

#[test]
fn index_names_a_tensor_absent_from_its_shard() {
    let (dir, s1, _) = sharded_dir();
    write_index(
        dir.path(),
        &json!({"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors"}),
    );
    let err = open_dir_err(dir.path());
    assert_has(&err, &[&s1.display().to_string(), "tensor `c` not found"]);
}

#[test]
fn index_malformed() {
    let (dir, _, _) = sharded_dir();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": {\"a\": ").expect("write");
    let err = open_dir_err(dir.path());
    assert_has(&err, &[&index.display().to_string(), "malformed JSON"]);

    std::fs::write(&index, "{\"metadata\": {}}").expect("write");
    let err = open_dir_err(dir.path());
    assert_has(&err, &[&index.display().to_string(), "missing required field `weight_map`"]);

    std::fs::write(&index, "{\"weight_map\": {\"a\": 3}}").expect("write");
    let err = open_dir_err(dir.path());
    assert_has(&err, &[&index.display().to_string(), "weight_map entry for `a` is not a file name"]);
}

#[test]
fn shard_names_with_path_separators() {
    for shard in ["../x.safetensors", "sub/x.safetensors", "..\\x.safetensors", ".."] {
        let (dir, _, _) = sharded_dir();
        write_index(dir.path(), &json!({"a": "model-00001-of-00002.safetensors", "b": shard}));
        let err = open_dir_err(dir.path());
        assert_has(&err, &["model.safetensors.index.json", &format!("shard name `{shard}` is not a plain file name")]);
    }
}

#[test]
fn broken_shard_is_named() {
    let (dir, _, s2) = sharded_dir();
    let bytes = std::fs::read(&s2).expect("read");
    std::fs::write(&s2, &bytes[..bytes.len() - 1]).expect("write");
    let err = open_dir_err(dir.path());
    assert_has(&err, &[&s2.display().to_string(), "truncated"]);
}

#[test]
fn writer_round_trips_through_the_safetensors_crate() {
    let tensors: Vec<(String, StDtype, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), StDtype::BF16, vec![5, 4]),
        ("z.last.in.name.order".into(), StDtype::F32, vec![3]),
        ("a.packed".into(), StDtype::U32, vec![2, 2]),
        ("scalar_bytes".into(), StDtype::U8, vec![7]),
        ("half".into(), StDtype::F16, vec![1, 1, 3]),
    ];
    let bytes_of = |i: usize, n: usize| (0..n).map(|k| (i * 31 + k * 7) as u8).collect::<Vec<u8>>();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = SafetensorsWriter::create(&path, &tensors, Some(meta)).expect("create");
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let b = bytes_of(i, shape.iter().product::<usize>() * dtype.size());
        // Odd-sized chunks, to exercise streaming.
        for chunk in b.chunks(3) {
            w.write(name, chunk).expect("write");
        }
    }
    w.finish().expect("finish");

    let file = std::fs::read(&path).expect("read back");
    let st = safetensors::SafeTensors::deserialize(&file).expect("the crate reads our file");
    let ours = SafetensorsFile::open(&path).expect("we read our file");
    assert_eq!(ours.metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(st.len(), tensors.len());
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let view = st.tensor(name).expect("tensor present");
        assert_eq!(format!("{:?}", view.dtype()), dtype.name(), "{name}");
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        let want = bytes_of(i, shape.iter().product::<usize>() * dtype.size());
        assert_eq!(view.data(), want.as_slice(), "{name}");
        let t = ours.tensors.iter().find(|t| &t.name == name).expect("indexed");
        assert_eq!(&file[t.offset as usize..(t.offset + t.len) as usize], want.as_slice(), "{name}: our range");
        assert_eq!((t.dtype, &t.shape), (*dtype, shape), "{name}");
    }
}

#[test]
fn writer_refuses_misuse() {
    let tensors: Vec<(String, StDtype, Vec<usize>)> =
        vec![("a".into(), StDtype::F32, vec![2]), ("b".into(), StDtype::U8, vec![3])];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.safetensors");
    let p = path.display().to_string();

    let mut w = SafetensorsWriter::create(&path, &tensors, None).expect("create");
    let err = w.write("b", &[0; 3]).expect_err("out of order").to_string();
    assert_has(&err, &[&p, "wrote `b` while `a` is due"]);

    let mut w = SafetensorsWriter::create(&path, &tensors, None).expect("create");
    let err = w.write("a", &[0; 9]).expect_err("overflow").to_string();
    assert_has(&err, &[&p, "tensor `a` overflows its 8 bytes"]);

    let mut w = SafetensorsWriter::create(&path, &tensors, None).expect("create");
    w.write("a", &[0; 8]).expect("a");
    w.write("b", &[0; 2]).expect("part of b");
    let err = w.finish().expect_err("b incomplete").to_string();
    assert_has(&err, &[&p, "finished before tensor `b` was complete"]);

    let mut w = SafetensorsWriter::create(&path, &tensors, None).expect("create");
    w.write("a", &[0; 8]).expect("a");
    w.write("b", &[0; 3]).expect("b");
    let err = w.write("c", &[0]).expect_err("past the end").to_string();
    assert_has(&err, &[&p, "write of `c` after the last tensor"]);
}

#[test]
fn shape_and_byte_size_mismatch_names_the_tensor() {
    // Same damage as `shape_and_byte_size_disagree`, on a tensor with a findable name: the error should say which
    // tensor and what sizes (FormatError::SizeMismatch exists for this), not only "invalid shape, data type, or
    // offset for tensor" from the safetensors crate.
    let h = json!({
        "model.layers.0.mlp.gate.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    });
    let err = open_err("size-named.safetensors", &raw(&h.to_string(), &data32()));
    assert_has(&err, &["model.layers.0.mlp.gate.weight", "[2, 4]", "32", "24"]);
}

#[test]
fn trailing_bytes_after_the_last_tensor() {
    // The safetensors format requires the data section to end exactly at the last tensor's end; the crate's own
    // `SafeTensors::deserialize` refuses this file ("incomplete metadata, file not fully covered"). A header that
    // describes less data than the file holds is a sign of a wrong header or a mis-joined file.
    let mut bytes = raw(&header().to_string(), &data32());
    bytes.extend([0u8; 16]);
    assert!(safetensors::SafeTensors::deserialize(&bytes).is_err(), "the reference reader refuses it");
    let err = open_err("trailing.safetensors", &bytes);
    assert_has(&err, &["32", "48"]);
}
