#!/usr/bin/env python3
"""Regenerate tests/fixtures/mlx/: MLX 4-bit conversions of tiny HF fixtures, with mlx-lm's own logits.

Needs mlx and mlx-lm (`pip install mlx mlx-cpu mlx-lm numpy safetensors`; made with mlx 0.32.4, mlx-lm 0.32.2,
numpy 2.4.6, Python 3.11, on Linux CPU, in a throwaway venv). Runs in ~15 s; the output is deterministic
(regenerating gave byte-identical model.safetensors and logits). For each entry of CASES it reads
tests/fixtures/hf/<case>/ and writes <out>/<case>-<suffix>/ with:

  config.json          as mlx_lm.utils.save_config writes it (with the `quantization` block)
  model.safetensors    as mlx_lm.utils.save_model writes it: uint32 codes + float32 scales/biases for the `q4`
                       cases (the HF checkpoint is float32 and nothing casts it); for `q4-bf16` every float is cast
                       to bfloat16 first, as `convert(dtype="bfloat16")` does, so scales, biases and norms are bf16
                       as in most published mlx-community files (the hybrids' `cast_predicate` keeps A_log float32)
  logits.f32           raw little-endian float32 logits of mlx-lm for the prompt, [T, vocab], one forward pass
  greedy_logits.f32    [8, vocab]: the logits that chose each greedy token (step 0 = last prompt position of the
                       cached prefill, then one cached decode step per token)
  reference.json       prompt_tokens, logits_file, logits_shape, greedy_tokens, versions, quantization block,
                       `float_tensors` (what quantize_model left in float, layer numbers folded), the loader
                       overrides used, and the measured distances from the HF float64 reference: of mlx-lm's float32
                       model before quantizing (`mlx_unquantized_vs_hf_f64_rel_err`, asserted < 1e-4: checks the
                       conversion) and of its q4 logits (`mlx_vs_hf_f64_rel_err`: the quantization error)

Conversion. `mlx_lm.convert(hf_path=..., quantize=True, q_bits=4, q_group_size=32)` does not work on these
checkpoints with mlx-lm 0.32.2: its qwen3_moe ModelArgs requires `num_experts` and `rope_theta`, which the
transformers-5 config spells `num_local_experts` and `rope_parameters.rope_theta` (and convert() also loads a
tokenizer, which these checkpoints lack). So we do what convert() does, by hand: `mlx_lm.utils.load_model` with
the missing keys passed through `model_config` (`hf_compat`), `mlx_lm.utils.quantize_model(model, config, 32, 4)`
(which applies the model's own `quant_predicate`: the router `mlp.gate`, and for the hybrids `shared_expert_gate`,
get 8 bits, group 64), then `save_model` + `save_config`.

Group size 32: it divides every input dimension of the qwen3_moe models (hidden 64, o_proj input 4·24 = 96, expert
intermediate 32). quantize_model silently leaves a Linear in float when the group does not divide its input, so 64
would have left o_proj unquantized. 32 is MLX's smallest affine group (16 is rejected), so in the hybrids the
expert `switch_mlp.down_proj` (input moe_intermediate 16) stays float, and in qwen35moe_r3_fused_layout also
`linear_attn.out_proj` (input 6·12 = 72); everything else that is a Linear or the embedding is 4-bit. Always float:
the norms, conv1d (an nn.Conv1d, not quantizable), A_log and dt_bias. The files record it in `float_tensors`.

Hybrids (Qwen3.5-MoE, Qwen3-Next), mlx-lm 0.32.2's qwen3_5 / qwen3_5_moe / qwen3_next modules:
  - Layer pattern: mlx-lm places full attention by `full_attention_interval` alone ((i+1) % n == 0) and ignores
    `layer_types`, which transformers-5 configs carry without the interval. We pass the interval that reproduces
    `layer_types` (2 for the *_small cases, 3 for qwen35moe_r3_fused_layout). qwen3next_dense_first
    ([lin, full, lin, lin, full]) has no such interval, so mlx-lm cannot express it: not converted.
  - model_type: the text-only HF class saves `qwen3_5_moe_text`, which mlx-lm has no module for; we load it as
    `qwen3_5_moe` (whose ModelArgs takes a flat text config). The written config says `qwen3_5_moe`, flat, with
    `layer_types` and `full_attention_interval` both present (they agree); names are `language_model.model.*` and
    `language_model.lm_head`, as mlx-lm's Qwen3.5 writes them.
  - Experts: qwen3_5_moe's `sanitize` reads only the fused form transformers 5 writes (`mlp.experts.gate_up_proj`
    [E, 2I, H], `down_proj` [E, H, I]), so the per-expert qwen35moe_small is first stacked into that form
    (bit-exact re-layout, gate before up). qwen3_next's `sanitize` stacks per-expert tensors itself. Both write
    `mlp.switch_mlp.{gate,up,down}_proj` [E, out, in].
  - Norms and conv1d: qwen3_5's `sanitize` adds +1 to the zero-centred norms (input/post-attention/final, q/k
    norms; not the gated GDN norm) only when it sees an HF conv1d layout [C, 1, K] (last dim != 1), and moves the
    kernel to MLX's [C, K, 1]. qwen3_next's adds the +1 only when it finds per-expert HF experts to stack (as HF
    Qwen3-Next checkpoints, ours included, store them). Either way the written files hold (1 + w) and conv1d as
    [C, K, 1], so a reader must not add 1 again; moestream decides from the stored conv layout.
  - Cache: the cached greedy loop carries mlx-lm's ArraysCache (conv state + GDN recurrent state) for linear layers
    and KVCache for full attention; it matches the full-recompute loop in every case.
  - For q4-bf16 of the hybrid, MLX's CPU gather_mm is float32-only and the bf16 float expert down_proj goes through
    it, so MLX's own bf16 compute cannot run here (`mlx_native_bf16_compute_vs_reference_rel_err` says so); the
    float32 reference is unaffected.

All logits are computed from the model *reloaded from the written files* (`load_model(out)`), in float32; for
`q4-bf16` the reloaded bf16 parameters are upcast to float32 (exactly) first, so the reference isolates the
encoding from MLX's bf16 arithmetic (how far that arithmetic alone moves the logits is recorded, for scale).
Greedy decoding runs twice, by full recompute and with mlx-lm's cache (`generate_step`, argmax sampler), and the
two must agree; the top-1/top-2 gap at every greedy step is recorded.

    python3 scripts/reference/make_mlx_fixtures.py --hf tests/fixtures/hf --out tests/fixtures/mlx
"""

import argparse
import json
import re
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
    # Hybrids (Gated DeltaNet + gated attention + shared expert); see "Hybrids" in the docstring.
    ("qwen35moe_small", None, "q4"),
    ("qwen3next_small", None, "q4"),
    ("qwen35moe_r3_fused_layout", None, "q4"),
    # As mlx-community publishes Qwen3.5: bf16 scales, biases and norms, but A_log kept float32 (the model's
    # cast_predicate), so one file mixes float types.
    ("qwen35moe_small", "bfloat16", "q4-bf16"),
]
Q_BITS = 4
Q_GROUP = 32
N_GREEDY = 8


def full_attention_interval(layer_types: list) -> int:
    """mlx-lm's hybrids place full attention by `full_attention_interval` alone and ignore `layer_types`: find the
    period that reproduces the HF layer pattern, or refuse (mlx-lm cannot express the model)."""
    for p in range(1, len(layer_types) + 1):
        if all((t == "full_attention") == ((i + 1) % p == 0) for i, t in enumerate(layer_types)):
            return p
    raise ValueError(f"mlx-lm cannot express layer_types {layer_types} (no full_attention_interval reproduces it)")


def hf_compat(hf_dir: Path, work: Path) -> tuple:
    """The checkpoint directory and `model_config` overrides mlx-lm's loader needs for a transformers-5 save.

    Config keys only, plus one lossless re-layout: mlx-lm's qwen3_5_moe `sanitize` reads experts only in the fused
    form transformers 5 writes (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), so a
    per-expert Qwen3.5 checkpoint is first stacked into that form (bit-exact; gate first, as transformers fuses it).
    """
    c = json.loads((hf_dir / "config.json").read_text())
    extra = {}
    if "num_experts" not in c:
        extra["num_experts"] = c["num_local_experts"]
    if "rope_theta" not in c:
        extra["rope_theta"] = c["rope_parameters"]["rope_theta"]
    if "layer_types" in c:
        extra["full_attention_interval"] = full_attention_interval(c["layer_types"])
    if c["model_type"] == "qwen3_5_moe_text":
        # The text-only HF class; mlx-lm has no module of that name. Its qwen3_5_moe takes a flat (text) config too.
        extra["model_type"] = "qwen3_5_moe"
        weights = mx.load(str(hf_dir / "model.safetensors"))
        if any(".mlp.experts.0." in k for k in weights):
            work.mkdir(parents=True)
            for f in hf_dir.iterdir():
                if f.name != "model.safetensors":
                    shutil.copy(f, work / f.name)
            for layer in range(c["num_hidden_layers"]):
                pre = f"model.layers.{layer}.mlp.experts"
                take = lambda proj: [weights.pop(f"{pre}.{e}.{proj}.weight") for e in range(c["num_experts"])]
                gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
                weights[f"{pre}.gate_up_proj"] = mx.stack([mx.concatenate([g, u]) for g, u in zip(gate, up)])
                weights[f"{pre}.down_proj"] = mx.stack(down)
            mx.save_safetensors(str(work / "model.safetensors"), weights, metadata={"format": "pt"})
            hf_dir = work
    return hf_dir, extra


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

    src, compat = hf_compat(hf_dir, out.with_name(out.name + ".hf-tmp"))
    model, config = load_model(src, model_config=compat)
    if src != hf_dir:
        shutil.rmtree(src)
    # Before quantizing: mlx-lm's float32 model against transformers' float64 logits. This checks the conversion
    # (sanitize's norm +1 and conv1d transpose, the layer pattern, the expert re-layout), not the quantization.
    hf_logits = np.fromfile(hf_dir / ref_hf["logits_file"], dtype="<f4").reshape(ref_hf["logits_shape"])
    float_vs_hf = rel_err(f32_logits(model, prompt), hf_logits)
    assert float_vs_hf < 1e-4, f"{case}: mlx-lm's float model is {float_vs_hf:.3e} from the HF reference"
    if dtype is not None:
        cast_floats(model, getattr(mx, dtype))
    model, qconfig = quantize_model(model, config, Q_GROUP, Q_BITS)
    save_model(out, model)
    save_config(qconfig, out / "config.json")
    # A single shard: the index file adds nothing (moestream reads model.safetensors either way).
    (out / "model.safetensors.index.json").unlink()

    # Everything below uses the model reloaded from the files just written.
    model, config = load_model(out)
    written = mx.load(str(out / "model.safetensors"))
    scale_dtypes = sorted({str(v.dtype) for k, v in written.items() if k.endswith(".scales")})
    # What quantize_model left in float, layer numbers folded (`model.layers.N.` → `layers.*.`): norms, conv1d,
    # A_log/dt_bias, and every Linear whose input width the group (32) does not divide.
    quantized = {k.removesuffix(".scales") for k in written if k.endswith(".scales")}
    float_tensors = sorted(
        {
            re.sub(r"^.*?layers\.\d+\.", "layers.*.", k)
            for k, v in written.items()
            if k.removesuffix(".weight") not in quantized and not k.endswith((".scales", ".biases"))
        }
    )

    native = None
    if dtype is not None:
        # The bf16 variant checks that we read bf16 scales, biases and norms; its reference is computed in float32
        # from those exact bf16 values (the upcast is exact), so MLX's bf16 arithmetic stays out of the comparison.
        # For information, how far MLX's own bf16 compute is from that:
        try:
            native = f32_logits(model, prompt)
        except RuntimeError as e:
            # MLX's CPU gather_mm is float32-only, and a bf16 expert projection left in float (the hybrids'
            # down_proj, input 16 < group 32) runs through it. Only this for-information number is lost.
            native = f"not computed on CPU: {e}"
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
        "mlx_native_bf16_compute_vs_reference_rel_err": native if native is None or isinstance(native, str)
        else rel_err(native, logits),
        "scales_dtype": scale_dtypes,
        "quantization": qconfig["quantization"],
        "float_tensors": float_tensors,
        "mlx_lm_model_config_overrides": compat,
        "prompt_tokens": prompt,
        "logits_file": "logits.f32",
        "logits_shape": list(logits.shape),
        "max_abs_logit": float(np.abs(logits).max()),
        "greedy_tokens": greedy_cached,
        "greedy_logits_file": "greedy_logits.f32",
        "greedy_top_gaps": gaps,
        "hf_greedy_tokens": ref_hf["greedy_tokens"],
        "mlx_vs_hf_f64_rel_err": mlx_vs_hf,
        "mlx_unquantized_vs_hf_f64_rel_err": float_vs_hf,
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
            for k in ["greedy_tokens", "hf_greedy_tokens", "mlx_vs_hf_f64_rel_err", "mlx_unquantized_vs_hf_f64_rel_err",
                      "greedy_top_gaps", "scales_dtype",
                      "mlx_native_bf16_compute_vs_reference_rel_err"]
        }
        print(r["case"], json.dumps(summary[r["case"]]))
    (args.out / "manifest.json").write_text(
        json.dumps({"mlx_version": version("mlx"), "mlx_lm_version": version("mlx-lm"), "cases": summary}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main()
