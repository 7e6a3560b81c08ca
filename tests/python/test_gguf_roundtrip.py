"""synth (GGUF) -> gguf-py's GGUFReader + gguf.quants.dequantize, against moestream's inspect and dequant.

Both sides decode the same bytes with the same formulas, so every tensor must agree bit for bit.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import assert_bitexact, canonical_names

FORMATS = {"gguf-q4_0": Q.Q4_0, "gguf-q8_0": Q.Q8_0, "gguf-f16": Q.F16}
# Tensors that stay F32 in every GGUF flavour (norms, router), as llama.cpp's converter does.
F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight")


@pytest.fixture(scope="module", params=list(FORMATS))
def gguf_model(request, ms):
    path = ms.synth(request.param)
    return request.param, path, GGUFReader(path)


def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"GGUF metadata key {key!r} missing"
    return f.contents()


def test_tensor_table_matches_inspect(gguf_model, ms):
    fmt, path, reader = gguf_model
    ours = ms.tensors(path)
    theirs = {t.name: t for t in reader.tensors}
    assert len(theirs) == len(reader.tensors), "duplicate tensor names in GGUF"
    layers = int(field(reader, "qwen3moe.block_count"))
    assert set(theirs) == set(canonical_names(layers))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        o = ours[name]
        # gguf-py reports ne (innermost first); inspect reports logical shape, outermost first.
        assert list(o["shape"]) == [int(x) for x in reversed(t.shape)], name
        assert o["encoding"] == t.tensor_type.name, name
        assert o["source"] == name, name
        assert o["bytes"] == int(t.n_bytes), name
        want = Q.F32 if name.endswith(F32_SUFFIXES) else FORMATS[fmt]
        assert t.tensor_type == want, f"{name}: {t.tensor_type.name}, expected {want.name}"


def test_every_tensor_dequantizes_bitexact(gguf_model, ms):
    fmt, path, reader = gguf_model
    for t in reader.tensors:
        ref = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        ours = ms.dequant(path, t.name)
        assert_bitexact(ours, ref.reshape(ours.shape), f"{fmt} {t.name}")
        assert np.isfinite(ours).all() and np.any(ours != 0), f"{fmt} {t.name}: degenerate values"


def test_single_expert_slice(gguf_model, ms):
    fmt, path, reader = gguf_model
    exps = [t for t in reader.tensors if t.name.endswith("_exps.weight")]
    assert exps, "no stacked expert tensors"
    n_exp = int(field(reader, "qwen3moe.expert_count"))
    for i, t in enumerate(exps):
        e = (3 * i + 1) % n_exp  # vary the expert across tensors, never only expert 0
        full = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        full = full.reshape([int(x) for x in reversed(t.shape)])
        one = ms.dequant(path, t.name, expert=e)
        assert one.ndim == 2
        assert_bitexact(one, full[e], f"{fmt} {t.name} expert {e}")
        assert not np.array_equal(full[e], full[(e + 1) % n_exp]), "experts are identical; slice check is vacuous"


def test_llama_cpp_metadata(gguf_model, ms):
    fmt, path, reader = gguf_model
    info = ms.inspect(path)
    assert field(reader, "general.architecture") == "qwen3moe"
    tensors = {t.name: t for t in reader.tensors}
    layers = field(reader, "qwen3moe.block_count")
    assert layers == info["layers"] == 2
    assert f"blk.{layers - 1}.attn_q.weight" in tensors and f"blk.{layers}.attn_q.weight" not in tensors
    n_exp = field(reader, "qwen3moe.expert_count")
    assert n_exp == info["experts"]
    assert list(reversed(tensors["blk.0.ffn_gate_exps.weight"].shape))[0] == n_exp
    assert list(reversed(tensors["blk.0.ffn_gate_inp.weight"].shape))[0] == n_exp
    assert field(reader, "qwen3moe.expert_used_count") == info["experts_per_token"]
    assert 0 < info["experts_per_token"] <= n_exp
    emb = field(reader, "qwen3moe.embedding_length")
    assert emb == info["hidden_size"]
    vocab_rows, emb_cols = reversed(tensors["token_embd.weight"].shape)
    assert emb_cols == emb
    assert field(reader, "qwen3moe.expert_feed_forward_length") == info["moe_intermediate_size"]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == vocab_rows == info["vocab_size"]
    assert len(field(reader, "tokenizer.ggml.token_type")) == len(tokens)
    assert len(set(tokens)) == len(tokens), "duplicate token strings (llama.cpp needs a bijective vocab)"
    ftype = {"gguf-q4_0": 2, "gguf-q8_0": 7, "gguf-f16": 1}[fmt]  # llama_ftype MOSTLY_*
    assert field(reader, "general.file_type") == ftype
