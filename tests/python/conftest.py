"""Shared fixtures for the synth -> reader/dequantizer cross-checks.

The tests drive the `moestream` binary (found via $MOESTREAM_BIN, else target/release, else target/debug) and
compare what it reads and dequantizes against independent Python readers (gguf-py, safetensors, tokenizers,
numpy). A missing binary is a failure, not a skip: build it with `cargo build --release -p moestream`.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PRESET = "tiny-qwen3-moe"


def _find_binary() -> Path | None:
    env = os.environ.get("MOESTREAM_BIN")
    if env:
        return Path(env) if Path(env).is_file() else None
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "moestream"
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="session")
def moestream_bin() -> Path:
    b = _find_binary()
    if b is None:
        where = os.environ.get("MOESTREAM_BIN") or f"{ROOT}/target/{{release,debug}}/moestream"
        pytest.fail(
            f"moestream binary not found (looked at {where}). Build it first: "
            f"`cd {ROOT} && cargo build --release -p moestream`, or set MOESTREAM_BIN.",
            pytrace=False,
        )
    return b


class Moestream:
    """Thin wrapper over the CLI, with a per-session cache of synthesized models."""

    def __init__(self, binary: Path, tmp: Path):
        self.bin = binary
        self.tmp = tmp
        self._synth: dict[tuple, Path] = {}
        self._inspect: dict[Path, dict] = {}
        self._n = 0

    def run(self, *args) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.bin), *map(str, args)], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"moestream {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr}")
        return r

    def synth(self, fmt: str, layout: str = "per-expert", seed: int = 0, fresh: bool = False,
              extra: tuple = ()) -> Path:
        """Synthesize (once per (format, layout, seed, extra), unless fresh) and return the path."""
        key = (fmt, layout, seed, tuple(map(str, extra)))
        if not fresh and key in self._synth:
            return self._synth[key]
        self._n += 1
        name = f"{fmt}-{layout}-s{seed}" + (f"-{self._n}" if fresh else "")
        if extra:
            # Different extras are different models: never let one overwrite another's cached file.
            name += "-" + re.sub(r"[^A-Za-z0-9_.]+", "_", "-".join(map(str, extra)))
        out = self.tmp / (name + (".gguf" if fmt.startswith("gguf") else ""))
        args = ["synth", "--preset", PRESET, "--format", fmt, "--out", out, "--seed", seed, "--quiet"]
        if fmt.startswith("hf"):
            args += ["--expert-layout", layout]
        args += list(extra)
        self.run(*args)
        if not fresh:
            self._synth[key] = out
        return out

    def inspect(self, model: Path) -> dict:
        if model not in self._inspect:
            self._inspect[model] = json.loads(self.run("inspect", model, "--json", "--tensors").stdout)
        return self._inspect[model]

    def tensors(self, model: Path) -> dict[str, dict]:
        return {t["name"]: t for t in self.inspect(model)["tensors"]}

    def dequant(self, model: Path, tensor: str, expert: int | None = None) -> np.ndarray:
        """moestream's dequantized tensor as f32, reshaped to the shape `inspect` reports (or [rows, cols])."""
        self._n += 1
        out = self.tmp / f"dq-{self._n}.f32"
        args = ["dequant", model, tensor, "--out", out]
        if expert is not None:
            args += ["--expert", expert]
        self.run(*args)
        data = np.fromfile(out, dtype="<f4")
        out.unlink()
        shape = list(self.tensors(model)[tensor]["shape"])
        if expert is not None:
            shape = shape[1:]
        assert data.size == int(np.prod(shape)), (tensor, expert, data.size, shape)
        return data.reshape(shape)


@pytest.fixture(scope="session")
def ms(moestream_bin, tmp_path_factory) -> Moestream:
    return Moestream(moestream_bin, tmp_path_factory.mktemp("moestream"))


def canonical_names(layers: int) -> list[str]:
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    names += [f"blk.{i}.{n}.weight" for i in range(layers) for n in per_layer]
    return names


def assert_bitexact(actual: np.ndarray, expected: np.ndarray, what: str):
    """Exact f32 equality, comparing bit patterns (so -0.0 vs 0.0 and NaN payloads count)."""
    a = np.ascontiguousarray(actual, dtype=np.float32)
    e = np.ascontiguousarray(expected, dtype=np.float32)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    av, ev = a.view(np.uint32), e.view(np.uint32)
    bad = np.flatnonzero(av != ev)
    if bad.size:
        i = np.unravel_index(bad[0], a.shape)
        raise AssertionError(
            f"{what}: {bad.size}/{a.size} elements differ; first at {tuple(map(int, i))}: "
            f"moestream {a[i]!r} vs reference {e[i]!r}"
        )
