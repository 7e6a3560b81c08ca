#!/usr/bin/env python3
"""Regenerate tests/fixtures/mlx/: MLX 4-bit conversions of two tiny HF fixtures, with mlx-lm's own logits.

Needs mlx and mlx-lm (`pip install mlx mlx-cpu mlx-lm`; made with mlx 0.32.4, mlx-lm 0.32.2, on Linux CPU).
For each entry of CASES it reads tests/fixtures/hf/<case>/ and writes <out>/<case>-<suffix>/ with:

  config.json          as mlx_lm.utils.save_config writes it (with the `quantization` block)
  model.safetensors    as mlx_lm.utils.save_model writes it: uint32 codes + float32 scales/biases for the `q4`
                       cases (the HF checkpoint is float32 and nothing casts it); for `q4-bf16` every float is cast
                       to bfloat16 first, as `convert(dtype="bfloat16")` does, so scales, biases and norms are bf16
                       as in most published mlx-community files
  logits.f32           raw little-endian float32 logits of mlx-lm for the prompt, [T, vocab], one forward pass
  greedy_logits.f32    [8, vocab]: the logits that chose each greedy token (step 0 = last prompt position of the
                       cached prefill, then one cached decode step per token)
  reference.json       prompt_tokens, logits_file, logits_shape, greedy_tokens, versions, quantization block, and
                       the measured distance of mlx-lm's logits from the HF float64 reference

Conversion. `mlx_lm.convert(hf_path=..., quantize=True, q_bits=4, q_group_size=32)` does not work on these
checkpoints with mlx-lm 0.32.2: its qwen3_moe ModelArgs requires `num_experts` and `rope_theta`, which the
transformers-5 config spells `num_local_experts` and `rope_parameters.rope_theta` (and convert() also loads a
tokenizer, which these checkpoints lack). So we do what convert() does, by hand: `mlx_lm.utils.load_model` with
those two keys passed through `model_config`, `mlx_lm.utils.quantize_model(model, config, 32, 4)` (which applies the
model's own `quant_predicate`: the router `mlp.gate` gets 8 bits, group 64), then `save_model` + `save_config`.

Group size 32: it divides every input dimension of these models (hidden 64, o_proj input 4·24 = 96, expert
intermediate 32). quantize_model silently leaves a module in float when the group does not divide its input, so
64 would have left o_proj unquantized.

All logits are computed from the model *reloaded from the written files* (`load_model(out)`), in float32; for
`q4-bf16` the reloaded bf16 parameters are upcast to float32 (exactly) first, so the reference isolates the
encoding from MLX's bf16 arithmetic (how far that arithmetic alone moves the logits is recorded, for scale).
Greedy decoding runs twice, by full recompute and with mlx-lm's KV cache (`generate_step`, argmax sampler), and the
two must agree; the top-1/top-2 gap at every greedy step is recorded.

    python3 scripts/reference/make_mlx_fixtures.py --hf tests/fixtures/hf --out tests/fixtures/mlx
"""

import argparse
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx.utils import tree_map_with_path
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

# (HF case, dtype to cast to before quantizing as convert(dtype=...) does, output suffix)
CASES = [
    ("qwen3moe_gqa_headdim", None, "q4"),
    ("qwen3moe_no_norm_topk", None, "q4"),
    ("qwen3moe_gqa_headdim", "bfloat16", "q4-bf16"),
    # tied: no lm_head; mlx-lm computes the output through the *quantized* embedding (embed_tokens.as_linear).
    ("qwen3moe_tied", None, "q4"),
    # sparse step: dense MLP layers between MoE layers (their mlp.gate_proj is not a router: stays 4-bit).
    ("qwen3moe_sparse_step", None, "q4"),
]
Q_BITS = 4
Q_GROUP = 32
N_GREEDY = 8


def hf_compat(hf_dir: Path) -> dict:
    """The keys mlx-lm's qwen3_moe ModelArgs needs that a transformers-5 config spells differently."""
    c = json.loads((hf_dir / "config.json").read_text())
    extra = {}
    if "num_experts" not in c:
        extra["num_experts"] = c["num_local_experts"]
    if "rope_theta" not in c:
        extra["rope_theta"] = c["rope_parameters"]["rope_theta"]
    return extra


def f32_logits(model, tokens) -> np.ndarray:
    out = model(mx.array([tokens]))
    mx.eval(out)
    return np.array(out[0].astype(mx.float32))


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Worst over positions of max|a - ref| / max|ref| per row (the measure the Rust tests use)."""
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float((np.abs(a - ref).max(axis=-1) / np.abs(ref).max(axis=-1)).max())


def cast_floats(model, dtype):
    """What convert(dtype=...) does: cast every floating parameter (the model's cast_predicate permitting)."""
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(
        tree_map_with_path(
            lambda k, v: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )


def top_gap(row: np.ndarray) -> float:
    s = np.sort(row.astype(np.float64))
    return float(s[-1] - s[-2])


def make_case(hf_dir: Path, out: Path, case: str, dtype, suffix: str) -> dict:
    ref_hf = json.loads((hf_dir / "reference.json").read_text())
    prompt = [int(t) for t in ref_hf["prompt_tokens"]]
    if out.exists():
        shutil.rmtree(out)

    model, config = load_model(hf_dir, model_config=hf_compat(hf_dir))
    if dtype is not None:
        cast_floats(model, getattr(mx, dtype))
    model, qconfig = quantize_model(model, config, Q_GROUP, Q_BITS)
    save_model(out, model)
    save_config(qconfig, out / "config.json")
    # A single shard: the index file adds nothing (moestream reads model.safetensors either way).
    (out / "model.safetensors.index.json").unlink()

    # Everything below uses the model reloaded from the files just written.
    model, config = load_model(out)
    scale_dtypes = sorted(
        {str(v.dtype) for k, v in mx.load(str(out / "model.safetensors")).items() if k.endswith(".scales")}
    )

    native = None
    if dtype is not None:
        # The bf16 variant checks that we read bf16 scales, biases and norms; its reference is computed in float32
        # from those exact bf16 values (the upcast is exact), so MLX's bf16 arithmetic stays out of the comparison.
        # For information, how far MLX's own bf16 compute is from that:
        native = f32_logits(model, prompt)
        cast_floats(model, mx.float32)
    logits = f32_logits(model, prompt)  # [T, V]
    assert logits.shape == (len(prompt), config["vocab_size"]), logits.shape
    logits.astype("<f4").tofile(out / "logits.f32")

    # Greedy by full recompute (no cache).
    seq = list(prompt)
    greedy_nocache = []
    for _ in range(N_GREEDY):
        nxt = int(np.argmax(f32_logits(model, seq)[-1]))
        greedy_nocache.append(nxt)
        seq.append(nxt)

    # Greedy with mlx-lm's KV cache; generate_step yields (token, logprobs), logprobs = logits - logsumexp, so keep
    # the logits themselves from a manual cached loop that mirrors it (prefill, then one token at a time).
    steps = []
    for tok, _ in generate_step(
        mx.array(prompt), model, max_tokens=N_GREEDY, sampler=lambda lp: mx.argmax(lp, axis=-1)
    ):
        steps.append(int(tok))
    cache = make_prompt_cache(model)
    row = model(mx.array([prompt]), cache=cache)[0, -1]
    greedy_rows, greedy_cached = [], []
    for _ in range(N_GREEDY):
        r = np.array(row.astype(mx.float32))
        greedy_rows.append(r)
        nxt = int(np.argmax(r))
        greedy_cached.append(nxt)
        row = model(mx.array([[nxt]]), cache=cache)[0, -1]
    assert steps == greedy_cached == greedy_nocache, (steps, greedy_cached, greedy_nocache)
    np.stack(greedy_rows).astype("<f4").tofile(out / "greedy_logits.f32")
    gaps = [top_gap(r) for r in greedy_rows]

    # Distance of mlx-lm's q4 logits from the HF float64 reference of the unquantized checkpoint.
    hf_logits = np.fromfile(hf_dir / ref_hf["logits_file"], dtype="<f4").reshape(ref_hf["logits_shape"])
    mlx_vs_hf = rel_err(logits, hf_logits.astype(np.float64))

    reference = {
        "case": f"{case}-{suffix}",
        "source": f"tests/fixtures/hf/{case}",
        "mlx_version": version("mlx"),
        "mlx_lm_version": version("mlx-lm"),
        "converter": "mlx_lm.utils.load_model + "
        + ("" if dtype is None else f"cast to {dtype} + ")
        + "quantize_model(group_size=32, bits=4) + save_model/save_config",
        "dtype": dtype or "float32",
        "reference_compute_dtype": "float32",
        "mlx_native_bf16_compute_vs_reference_rel_err": None if native is None else rel_err(native, logits),
        "scales_dtype": scale_dtypes,
        "quantization": qconfig["quantization"],
        "prompt_tokens": prompt,
        "logits_file": "logits.f32",
        "logits_shape": list(logits.shape),
        "max_abs_logit": float(np.abs(logits).max()),
        "greedy_tokens": greedy_cached,
        "greedy_logits_file": "greedy_logits.f32",
        "greedy_top_gaps": gaps,
        "hf_greedy_tokens": ref_hf["greedy_tokens"],
        "mlx_vs_hf_f64_rel_err": mlx_vs_hf,
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    return reference


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", default="tests/fixtures/hf", type=Path)
    ap.add_argument("--out", default="tests/fixtures/mlx", type=Path)
    args = ap.parse_args()
    mx.random.seed(0)  # nothing here is random; set anyway
    summary = {}
    for case, dtype, suffix in CASES:
        r = make_case(args.hf / case, args.out / f"{case}-{suffix}", case, dtype, suffix)
        summary[r["case"]] = {
            k: r[k]
            for k in ["greedy_tokens", "hf_greedy_tokens", "mlx_vs_hf_f64_rel_err", "greedy_top_gaps", "scales_dtype",
                      "mlx_native_bf16_compute_vs_reference_rel_err"]
        }
        print(r["case"], json.dumps(summary[r["case"]]))
    (args.out / "manifest.json").write_text(
        json.dumps({"mlx_version": version("mlx"), "mlx_lm_version": version("mlx-lm"), "cases": summary}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main()
