"""synth (MLX affine q4/q8) -> safetensors + a numpy dequantizer written from MLX's documented formula
(tests/python/mlx_util.py), against moestream's dequant. Compared bit for bit (rtol 0, atol 0): both compute
scale * q rounded to f32, then + bias rounded to f32, from the same bf16 scales/biases and packed codes.
Optionally also against mlx.core.dequantize (f32 scales/biases, so it computes in f32 as well)."""

import json

import numpy as np
import pytest

from conftest import assert_bitexact, canonical_names
from mlx_util import dequantize, unpack
from st_util import bf16_to_f32, load_model

FORMATS = {"mlx-q4": 4, "mlx-q8": 8}
GROUP = 64


@pytest.fixture(scope="module", params=list(FORMATS))
def mlx_model(request, ms):
    fmt = request.param
    path = ms.synth(fmt)
    config = json.loads((path / "config.json").read_text())
    return fmt, path, config, load_model(path)


def quantized_modules(tensors):
    return sorted(k[: -len(".scales")] for k in tensors if k.endswith(".scales"))


def module_bits(config, module):
    q = config["quantization"]
    return q.get(module, {}).get("bits", q["bits"]), q.get(module, {}).get("group_size", q["group_size"])


def canonical_of(module: str) -> str:
    if module == "model.embed_tokens":
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    i, rest = module[len("model.layers."):].split(".", 1)
    return {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate": "ffn_gate_inp",
        "mlp.switch_mlp.gate_proj": "ffn_gate_exps", "mlp.switch_mlp.up_proj": "ffn_up_exps",
        "mlp.switch_mlp.down_proj": "ffn_down_exps",
    }[rest].join([f"blk.{i}.", ".weight"])


def reference(tensors, config, module):
    bits, gs = module_bits(config, module)
    w = tensors[module + ".weight"]
    s, b = tensors[module + ".scales"], tensors[module + ".biases"]
    assert (w[0], s[0], b[0]) == ("U32", "BF16", "BF16"), module
    return dequantize(w[1], bf16_to_f32(s[1]), bf16_to_f32(b[1]), bits, gs)


def test_quantization_config(mlx_model):
    fmt, path, config, tensors = mlx_model
    q = config["quantization"]
    assert q["bits"] == FORMATS[fmt] and q["group_size"] == GROUP
    assert q.get("mode", "affine") == "affine"
    if "quantization_config" in config:
        assert config["quantization_config"] == q
    L = config["num_hidden_layers"]
    overrides = {k for k, v in q.items() if isinstance(v, dict)}
    assert overrides == {f"model.layers.{i}.mlp.gate" for i in range(L)}
    for i in range(L):
        assert q[f"model.layers.{i}.mlp.gate"] == {"group_size": GROUP, "bits": 8}
    hidden, E = config["hidden_size"], config["num_experts"]
    for i in range(L):
        gate = tensors[f"model.layers.{i}.mlp.gate.weight"]
        assert gate[0] == "U32" and gate[1].shape == (E, hidden * 8 // 32), gate[1].shape
        assert tensors[f"model.layers.{i}.mlp.gate.scales"][1].shape == (E, hidden // GROUP)
    # Every other quantized module is packed at the global width.
    for m in quantized_modules(tensors):
        bits, gs = module_bits(config, m)
        w, s = tensors[m + ".weight"][1], tensors[m + ".scales"][1]
        assert w.shape[:-1] == s.shape[:-1] and w.shape[-1] * (32 // bits) == s.shape[-1] * gs, m


def test_tensor_table(mlx_model, ms):
    fmt, path, config, tensors = mlx_model
    info = ms.tensors(path)
    assert set(info) == set(canonical_names(config["num_hidden_layers"]))
    mods = quantized_modules(tensors)
    plain = [k for k in tensors if not any(k.startswith(m + ".") for m in mods)]
    assert all(k.endswith("norm.weight") for k in plain), plain
    assert len(mods) + len(plain) == len(info)
    for m in mods:
        c = canonical_of(m)
        bits, gs = module_bits(config, m)
        assert info[c]["source"] == m + ".weight", c
        assert info[c]["encoding"] == f"MLX_Q{bits}_G{gs}", c
        w = tensors[m + ".weight"][1]
        assert info[c]["shape"] == [*w.shape[:-1], w.shape[-1] * 32 // bits], c


def test_every_tensor_matches_numpy_dequant(mlx_model, ms):
    fmt, path, config, tensors = mlx_model
    mods = quantized_modules(tensors)
    for m in mods:
        ref = reference(tensors, config, m)
        assert_bitexact(ms.dequant(path, canonical_of(m)), ref, f"{fmt} {m}")
        if "switch_mlp" in m:
            e = (len(m) * 3) % ref.shape[0]
            assert_bitexact(ms.dequant(path, canonical_of(m), expert=e), ref[e], f"{fmt} {m} expert {e}")
    # Unquantized norms: bf16, widened exactly.
    info = ms.tensors(path)
    for c, t in info.items():
        if t["encoding"] == "BF16":
            dt, raw = tensors[t["source"]]
            assert dt == "BF16"
            assert_bitexact(ms.dequant(path, c), bf16_to_f32(raw), f"{fmt} {c}")


def test_codes_use_the_full_range(mlx_model):
    """Guards the reference: if packing were misread, codes would not span 0..2^bits-1 per group."""
    fmt, path, config, tensors = mlx_model
    m = "model.layers.0.mlp.switch_mlp.down_proj"
    bits, gs = module_bits(config, m)
    q = unpack(tensors[m + ".weight"][1], bits).reshape(-1, gs)
    assert q.max() == 2**bits - 1 and q.min() == 0
    assert (q.max(axis=1) - q.min(axis=1)).mean() > 0.8 * (2**bits - 1)


def test_against_mlx_dequantize(mlx_model, ms):
    mx = pytest.importorskip("mlx.core")
    fmt, path, config, tensors = mlx_model
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate", "model.layers.1.mlp.switch_mlp.up_proj"):
        bits, gs = module_bits(config, m)
        w = tensors[m + ".weight"][1]
        s = bf16_to_f32(tensors[m + ".scales"][1])
        b = bf16_to_f32(tensors[m + ".biases"][1])
        if w.ndim == 3:  # mx.dequantize is per matrix; do each expert
            ref = np.stack([np.array(mx.dequantize(mx.array(w[e]), mx.array(s[e]), mx.array(b[e]),
                                                   group_size=gs, bits=bits)) for e in range(w.shape[0])])
        else:
            ref = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=gs, bits=bits))
        assert ref.dtype == np.float32
        assert_bitexact(ms.dequant(path, canonical_of(m)), ref, f"{fmt} {m} vs mx.dequantize")
