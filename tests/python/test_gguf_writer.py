"""Independent checks of moestream's GGUF writer and reader against gguf-py (llama.cpp's Python package).

- Our writer -> gguf-py's GGUFReader: `crates/format/examples/gguf_write_sample.rs` writes a file whose contents
  are restated by hand below (EXPECTED_KV, EXPECTED_TENSORS, sample_byte); gguf-py must read exactly that.
- gguf-py's GGUFWriter -> our reader: gguf-py writes metadata and F32/F16/Q8_0/Q4_0 tensors (quantized with
  gguf.quants, bit-exact with ggml); `crates/format/examples/gguf_dump.rs` prints what we parsed as JSON, and it
  must match what gguf-py wrote, down to each tensor's raw bytes at the offset we report.

Run from anywhere: `pytest tests/python/test_gguf_writer.py` (needs `pip install gguf numpy pytest` and cargo).
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402
from gguf.quants import quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def cargo_example(name: str, *args: str) -> str:
    out = subprocess.run(
        ["cargo", "run", "-q", "-p", "moestream-format", "--example", name, "--", *map(str, args)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )
    return out.stdout


# ---------------------------------------------------------------------------------------------------------------
# Our writer, gguf-py's reader.

V = GGUFValueType
# (key, gguf-py type list, value); must match `metadata()` in gguf_write_sample.rs.
EXPECTED_KV = [
    ("general.architecture", [V.STRING], "qwen3moe"),
    ("general.name", [V.STRING], "moestream sample ✓"),
    ("qwen3moe.block_count", [V.UINT32], 1),
    ("qwen3moe.expert_count", [V.UINT32], 2),
    ("qwen3moe.rope.freq_base", [V.FLOAT32], np.float32(1_000_000.0)),
    ("qwen3moe.attention.layer_norm_rms_epsilon", [V.FLOAT32], np.float32(1e-6)),
    ("test.u8", [V.UINT8], 200),
    ("test.i8", [V.INT8], -100),
    ("test.u16", [V.UINT16], 60000),
    ("test.i16", [V.INT16], -30000),
    ("test.i32", [V.INT32], -123456),
    ("test.u64", [V.UINT64], 1 << 40),
    ("test.i64", [V.INT64], -(1 << 40)),
    ("test.f64", [V.FLOAT64], 0.125),
    ("test.bool", [V.BOOL], True),
    ("tokenizer.ggml.model", [V.STRING], "gpt2"),
    ("tokenizer.ggml.tokens", [V.ARRAY, V.STRING], ["a", "Ġb", "<|im_end|>"]),
    ("tokenizer.ggml.token_type", [V.ARRAY, V.INT32], [1, 1, 3]),
    ("tokenizer.ggml.merges", [V.ARRAY, V.STRING], ["Ġ b"]),
    ("test.f32_array", [V.ARRAY, V.FLOAT32], [0.5, -1.0, 2.0]),
    ("test.u64_array", [V.ARRAY, V.UINT64], [1, 2, 3]),
    ("test.bool_array", [V.ARRAY, V.BOOL], [True, False]),
    # gguf-py flattens nested arrays in contents(); the type list still shows the nesting.
    ("test.nested_array", [V.ARRAY, V.ARRAY, V.UINT32], [1, 2, 3]),
]

# (name, numpy shape, type, bytes); must match TENSORS in gguf_write_sample.rs.
EXPECTED_TENSORS = [
    ("token_embd.weight", (4, 64), Q.F16, 4 * 64 * 2),
    ("output_norm.weight", (64,), Q.F32, 64 * 4),
    ("blk.0.ffn_gate_exps.weight", (2, 3, 64), Q.Q8_0, 2 * 3 * 2 * 34),
    ("blk.0.ffn_down_exps.weight", (2, 64, 96), Q.Q4_0, 2 * 64 * 3 * 18),
    ("blk.0.attn_q.weight", (2, 256), Q.Q4_K, 2 * 144),
    ("blk.0.attn_v.weight", (1, 256), Q.Q6_K, 210),
    ("blk.0.ffn_gate_inp.weight", (2, 64), Q.BF16, 2 * 64 * 2),
]


def sample_bytes(k: int, n: int) -> bytes:
    j = np.arange(n, dtype=np.uint64)
    return ((j * 7 + k * 13) % 251).astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def sample_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ours") / "sample.gguf"
    cargo_example("gguf_write_sample", path)
    return path


def test_gguf_py_reads_our_metadata(sample_path):
    r = GGUFReader(sample_path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert [k for k, _, _ in EXPECTED_KV] == list(fields)
    assert r.fields["GGUF.version"].contents() == 3
    for key, types, value in EXPECTED_KV:
        f = fields[key]
        assert f.types == types, key
        got = f.contents()
        if types[-1] == V.FLOAT32 and types[0] != V.ARRAY:
            assert np.float32(got) == value, key
        else:
            assert got == value, key


def test_gguf_py_reads_our_tensors(sample_path):
    r = GGUFReader(sample_path)
    raw = sample_path.read_bytes()
    assert len(r.tensors) == len(EXPECTED_TENSORS)
    for k, (t, (name, shape, ty, n_bytes)) in enumerate(zip(r.tensors, EXPECTED_TENSORS)):
        assert t.name == name
        assert t.tensor_type == ty, name
        assert tuple(int(d) for d in reversed(t.shape)) == shape, name
        assert t.n_bytes == n_bytes, name
        assert t.data_offset % 32 == 0, name
        assert raw[t.data_offset:t.data_offset + n_bytes] == sample_bytes(k, n_bytes), name
        assert t.data.tobytes() == sample_bytes(k, n_bytes), name
    # The data section ends with the last tensor padded to the alignment, as ggml writes it.
    last = r.tensors[-1]
    assert len(raw) == -(-(last.data_offset + int(last.n_bytes)) // 32) * 32


# ---------------------------------------------------------------------------------------------------------------
# gguf-py's writer, our reader.

OUR_TYPE = {
    V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32", V.INT32: "i32",
    V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string", V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64",
}


def write_with_gguf_py(path: Path, alignment: int | None):
    """Writes a file with gguf-py; returns (kv list of (key, our type name, value), tensor list)."""
    rng = np.random.default_rng(7)
    w = GGUFWriter(path, "qwen3moe")  # adds general.architecture
    if alignment is not None:
        w.add_custom_alignment(alignment)
    kv = [("general.architecture", "string", "qwen3moe")]
    if alignment is not None:
        kv.append(("general.alignment", "u32", alignment))
    w.add_block_count(2)
    kv.append(("qwen3moe.block_count", "u32", 2))
    w.add_float32("qwen3moe.rope.freq_base", 1e6)
    kv.append(("qwen3moe.rope.freq_base", "f32", 1e6))
    w.add_float64("test.f64", -2.5)
    kv.append(("test.f64", "f64", -2.5))
    w.add_int64("test.i64", -(1 << 50))
    kv.append(("test.i64", "i64", -(1 << 50)))
    w.add_uint8("test.u8", 9)
    kv.append(("test.u8", "u8", 9))
    w.add_int16("test.i16", -9)
    kv.append(("test.i16", "i16", -9))
    w.add_bool("test.bool", False)
    kv.append(("test.bool", "bool", False))
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    kv.append(("tokenizer.chat_template", "string", "{% for m in messages %}{{ m.content }}{% endfor %}"))
    tokens = [f"tok{i}" for i in range(1000)] + ["Ġ", "<|endoftext|>"]
    w.add_token_list(tokens)
    kv.append(("tokenizer.ggml.tokens", "array[string]", tokens))
    types = [1] * 1001 + [3]
    w.add_token_types(types)
    kv.append(("tokenizer.ggml.token_type", "array[i32]", types))
    w.add_array("test.f32s", [0.25, 0.5])
    kv.append(("test.f32s", "array[f32]", [0.25, 0.5]))

    tensors = []  # (name, numpy shape, our type name, raw bytes)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("f32", f32)
    tensors.append(("f32", [3, 64], "F32", f32.tobytes()))
    f16 = rng.standard_normal((2, 32)).astype(np.float16)
    w.add_tensor("f16", f16)
    tensors.append(("f16", [2, 32], "F16", f16.tobytes()))
    for name, qt, ours, shape in [("q8_0", Q.Q8_0, "Q8_0", (2, 4, 64)), ("q4_0", Q.Q4_0, "Q4_0", (5, 96))]:
        x = rng.standard_normal(shape).astype(np.float32)
        q = quantize(x, qt)
        w.add_tensor(name, q, raw_dtype=qt)
        tensors.append((name, list(shape), ours, q.tobytes()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kv, tensors


@pytest.mark.parametrize("alignment", [None, 64])
def test_our_reader_reads_gguf_py_writer(tmp_path, alignment):
    path = tmp_path / "from_gguf_py.gguf"
    kv, tensors = write_with_gguf_py(path, alignment)
    dump = json.loads(cargo_example("gguf_dump", path))
    raw = path.read_bytes()
    align = alignment or 32

    assert dump["version"] == 3
    assert dump["alignment"] == align
    assert dump["file_len"] == len(raw)
    assert dump["data_offset"] % align == 0

    got_kv = [(m["key"], m["type"], m["value"]) for m in dump["metadata"]]
    assert [k for k, _, _ in got_kv] == [k for k, _, _ in kv]
    for (key, ty, value), (gkey, gty, gvalue) in zip(kv, got_kv):
        assert gty == ty, key
        if ty == "f32":
            assert np.float32(gvalue) == np.float32(value), key
        else:
            assert gvalue == value, key

    # gguf-py's own reader agrees on types and tensor offsets.
    r = GGUFReader(path)
    for key, ty, _ in got_kv:
        types = r.fields[key].types
        want = OUR_TYPE[types[0]] if types[0] != V.ARRAY else f"array[{OUR_TYPE[types[-1]]}]"
        assert ty == want, key
    assert [t.data_offset for t in r.tensors] == [t["offset"] for t in dump["tensors"]]

    assert len(dump["tensors"]) == len(tensors)
    for t, (name, shape, ty, data) in zip(dump["tensors"], tensors):
        assert t["name"] == name
        assert t["shape"] == shape, name
        assert t["ne"] == shape[::-1], name
        assert t["type"] == ty, name
        assert t["n_bytes"] == len(data), name
        assert t["offset"] % align == 0, name
        assert raw[t["offset"]:t["offset"] + t["n_bytes"]] == data, name


def test_gguf_dump_rejects_a_corrupt_gguf_py_file(tmp_path):
    path = tmp_path / "cut.gguf"
    write_with_gguf_py(path, None)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 200])  # cut into the last tensor
    out = subprocess.run(
        ["cargo", "run", "-q", "-p", "moestream-format", "--example", "gguf_dump", "--", str(path)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode != 0
    assert str(path) in out.stderr and "truncated" in out.stderr and "tensor `q4_0`" in out.stderr
