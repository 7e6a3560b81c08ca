"""Independent safetensors loading for the tests: the `safetensors` package where numpy can represent the dtype
(F32, U32), and a small raw-byte parser (the documented format: u64 LE header length, JSON header, data) for BF16,
which numpy lacks. BF16 is widened to f32 by shifting the u16 bit pattern left by 16 (exact)."""

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

RAW_DTYPES = {"BF16": np.dtype("<u2"), "F32": np.dtype("<f4"), "U32": np.dtype("<u4"), "F16": np.dtype("<f2")}


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / f for f in weight_map.values()})
    single = model_dir / "model.safetensors"
    assert single.exists(), f"no model.safetensors or index in {model_dir}"
    return [single]


def read_raw(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (dtype string, array of the stored bits, shaped)} straight from the file bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = memoryview(blob)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = RAW_DTYPES[info["dtype"]]
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(data[lo:hi], dtype=dt)
        assert arr.size == int(np.prod(info["shape"], dtype=np.int64)), name
        out[name] = (info["dtype"], arr.reshape(info["shape"]))
    return out


def load_model(model_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """All tensors of an HF/MLX directory (single file or shards). F32/U32 come from safetensors.numpy and are
    checked against the raw parse; BF16 is raw bits (u16)."""
    files = shard_files(model_dir)
    index = model_dir / "model.safetensors.index.json"
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for f in files:
        raw = read_raw(f)
        with safe_open(str(f), framework="numpy") as so:
            assert set(so.keys()) == set(raw), f"{f}: safetensors and raw parse disagree on names"
            assert so.metadata() == {"format": "pt"} or so.metadata() is None or "format" in so.metadata()
        numeric = {k for k, (dt, _) in raw.items() if dt in ("F32", "U32")}
        if numeric:
            lib = load_file(str(f)) if len(numeric) == len(raw) else None
            with safe_open(str(f), framework="numpy") as so:
                for k in numeric:
                    arr = lib[k] if lib is not None else so.get_tensor(k)
                    assert arr.shape == raw[k][1].shape and np.array_equal(
                        arr.view(np.uint32), raw[k][1].view(np.uint32)), k
        for k, v in raw.items():
            assert k not in tensors, f"{k} appears in more than one shard"
            tensors[k] = v
    if index.exists():
        assert set(json.loads(index.read_text())["weight_map"]) == set(tensors)
    return tensors


def as_f32(entry: tuple[str, np.ndarray]) -> np.ndarray:
    dt, arr = entry
    if dt == "BF16":
        return bf16_to_f32(arr)
    if dt == "F32":
        return arr.astype(np.float32, copy=False)
    raise AssertionError(f"unexpected dtype {dt}")
