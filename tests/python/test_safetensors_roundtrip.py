"""synth (HF safetensors, f32/bf16, per-expert/fused, single file/sharded) -> safetensors + numpy, against
moestream's dequant of every canonical tensor. Exact: both sides read the same f32/bf16 bits."""

import json

import numpy as np
import pytest

from conftest import assert_bitexact, canonical_names
from st_util import as_f32, load_model

HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
PER_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
}
EXPS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}

CASES = [("hf-f32", "per-expert"), ("hf-f32", "fused"), ("hf-bf16", "per-expert"), ("hf-bf16", "fused")]


def reference_canonical(tensors: dict, config: dict, layout: str) -> dict[str, np.ndarray]:
    """Canonical tensors built from HF names by hand (no moestream code involved)."""
    L, E = config["num_hidden_layers"], config["num_experts"]
    inter, hidden = config["moe_intermediate_size"], config["hidden_size"]
    used: set[str] = set()

    def take(name):
        assert name in tensors, f"missing HF tensor {name}"
        used.add(name)
        return as_f32(tensors[name])

    ref = {c: take(h) for c, h in HF_NAMES.items()}
    for i in range(L):
        for c, h in PER_LAYER.items():
            ref[f"blk.{i}.{c}.weight"] = take(f"model.layers.{i}.{h}.weight")
        if layout == "per-expert":
            for c, p in EXPS.items():
                ref[f"blk.{i}.{c}.weight"] = np.stack(
                    [take(f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight") for e in range(E)])
        else:
            gu = take(f"model.layers.{i}.mlp.experts.gate_up_proj")
            assert gu.shape == (E, 2 * inter, hidden), gu.shape
            ref[f"blk.{i}.ffn_gate_exps.weight"] = gu[:, :inter, :]
            ref[f"blk.{i}.ffn_up_exps.weight"] = gu[:, inter:, :]
            ref[f"blk.{i}.ffn_down_exps.weight"] = take(f"model.layers.{i}.mlp.experts.down_proj")
            assert ref[f"blk.{i}.ffn_down_exps.weight"].shape == (E, hidden, inter)
    assert used == set(tensors), f"HF tensors not covered: {sorted(set(tensors) - used)}"
    assert set(ref) == set(canonical_names(L))
    return ref


_cache: dict = {}


def hf_reference(ms, fmt, layout, extra=()):
    key = (fmt, layout, tuple(extra))
    if key not in _cache:
        path = ms.synth(fmt, layout, extra=extra)
        config = json.loads((path / "config.json").read_text())
        tensors = load_model(path)
        want = "F32" if fmt == "hf-f32" else "BF16"
        assert {dt for dt, _ in tensors.values()} == {want}
        _cache[key] = (path, reference_canonical(tensors, config, layout))
    return _cache[key]


@pytest.mark.parametrize("fmt,layout", CASES)
def test_every_tensor_matches_dequant(ms, fmt, layout):
    path, ref = hf_reference(ms, fmt, layout)
    info = ms.tensors(path)
    assert set(info) == set(ref)
    enc = "F32" if fmt == "hf-f32" else "BF16"
    for name, want in ref.items():
        assert list(info[name]["shape"]) == list(want.shape), name
        assert info[name]["encoding"] == enc, name
        ours = ms.dequant(path, name)
        assert_bitexact(ours, want, f"{fmt}/{layout} {name}")


@pytest.mark.parametrize("fmt,layout", CASES)
def test_expert_slice(ms, fmt, layout):
    path, ref = hf_reference(ms, fmt, layout)
    for j, c in enumerate(EXPS):
        name = f"blk.1.{c}.weight"
        e = (2 * j + 5) % ref[name].shape[0]
        assert_bitexact(ms.dequant(path, name, expert=e), ref[name][e], f"{fmt}/{layout} {name} expert {e}")


def test_sharded_matches_single_file(ms):
    _, single = hf_reference(ms, "hf-bf16", "per-expert")
    path, sharded = hf_reference(ms, "hf-bf16", "per-expert", extra=("--shard-mib", "1"))
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1, "--shard-mib 1 did not shard the tiny model"
    for name, want in single.items():
        assert_bitexact(sharded[name], want, f"sharded file contents {name}")
        assert_bitexact(ms.dequant(path, name), want, f"sharded dequant {name}")


def test_fused_and_per_expert_layouts_agree(ms):
    for fmt in ("hf-f32", "hf-bf16"):
        _, per = hf_reference(ms, fmt, "per-expert")
        _, fused = hf_reference(ms, fmt, "fused")
        assert set(per) == set(fused)
        for name in per:
            assert_bitexact(fused[name], per[name], f"{fmt} fused vs per-expert {name}")


def f32_to_bf16_rne(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (finite inputs), the conversion torch/safetensors tooling uses."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_f32_and_bf16_agree_within_rounding(ms):
    """Same seed => same values in every format; the bf16 file is the f32 one rounded (to nearest, ties even)."""
    _, f32 = hf_reference(ms, "hf-f32", "per-expert")
    _, bf16 = hf_reference(ms, "hf-bf16", "per-expert")
    for name, a in f32.items():
        b = bf16[name]
        assert a.shape == b.shape, name
        assert np.isfinite(a).all(), name
        err = np.abs(a - b)
        assert (err <= np.abs(a) * 2.0 ** -8).all(), f"{name}: bf16 differs from f32 by up to {err.max()}"
        rounded = f32_to_bf16_rne(a)
        got = b.view(np.uint32) >> 16
        bad = np.flatnonzero(rounded.ravel() != got.ravel())
        assert bad.size == 0, f"{name}: {bad.size} values are not round-to-nearest-even of the f32 file"
        # Not vacuous: plain truncation would differ somewhere.
    assert any((np.ascontiguousarray(a).view(np.uint32) & 0xFFFF).any() for a in f32.values())
