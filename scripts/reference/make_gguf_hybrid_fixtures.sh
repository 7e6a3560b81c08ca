#!/usr/bin/env bash
# Hybrid (qwen35moe / qwen3next) GGUF fixtures for crates/models/tests/gguf_parity.rs:
# llama.cpp's own converter output (F32), llama-quantize Q8_0 of it, and llama.cpp's logits.
#
#   scripts/reference/make_gguf_hybrid_fixtures.sh CONVERTED_DIR [LLAMACPP_DIR]
#
# Step 1 needs torch (the converter imports it), which the dev machine lacks; it ran on the lent device
# machine (torch 2.11, transformers 5.17), from a copy of the converter's Python files (convert_hf_to_gguf.py,
# conversion/, gguf-py/ of the built llama.cpp tree) plus scripts/reference/convert_tiny_hf_to_gguf.py:
#
#   for c in qwen35moe_r3_fused_layout qwen3next_small; do
#     python3 convert_tiny_hf_to_gguf.py LLAMA_PY_DIR tests/fixtures/hf/$c $OUT/$c-f32.gguf f32 --no-mtp; done
#   for c in qwen35moe_small qwen3next_small; do    # dv = dk variants that llama.cpp can load
#     python3 scripts/reference/narrow_value_heads.py tests/fixtures/hf/$c HF/${c}_dv
#     python3 convert_tiny_hf_to_gguf.py LLAMA_PY_DIR HF/${c}_dv $OUT/${c}_dv-f32.gguf f32 --no-mtp; done
#
# (`qwen3next_dense_first` does not convert: the converter cannot map a Qwen3-Next dense MLP.)
# Step 2 (this script, on the dev machine): CONVERTED_DIR holds those *-f32.gguf files. LLAMACPP_DIR (default
# <repo>/.cache/llamacpp) is what scripts/build-llamacpp.sh leaves.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IN=$1
LL=${2:-$ROOT/.cache/llamacpp}
OUT=$ROOT/tests/fixtures/gguf
HERE=$ROOT/scripts/reference
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LLAMA_VERSION=$(cat "$LL/VERSION" 2>/dev/null || echo unknown)

g++ -O2 -std=c++17 -I"$LL/src/include" -I"$LL/src/ggml/include" "$HERE/llama_logits.cpp" -o "$TMP/llama_logits" \
    "$LL/build/src/libllama.a" "$LL/build/ggml/src/libggml.a" "$LL/build/ggml/src/libggml-cpu.a" \
    "$LL/build/ggml/src/libggml-base.a" -lpthread -ldl -lm

hf_prompt() { python3 -c "import json,sys;print(','.join(map(str,json.load(open(sys.argv[1]))['prompt_tokens'])))" "$1"; }

# make_one NAME HF_CASE QTYPE: from $IN/${HF_CASE}_dv-f32.gguf, with HF_CASE's prompt
make_one() {
    local name=$1 hf=$2 qtype=$3
    local src=$IN/${hf}_dv-f32.gguf prompt
    prompt=$(hf_prompt "$ROOT/tests/fixtures/hf/$hf/reference.json")
    if [ "$qtype" = F32 ]; then
        cp "$src" "$OUT/$name.gguf"
    else
        "$LL/bin/llama-quantize" "$src" "$OUT/$name.gguf" "$qtype" 2 > "$TMP/q.log" 2>&1 || { cat "$TMP/q.log"; exit 1; }
    fi
    "$TMP/llama_logits" "$OUT/$name.gguf" "$prompt" 8 "$TMP/$name.llama"
    mv "$TMP/$name.llama.logits.f32" "$TMP/$name.llama.greedy_logits.f32" "$OUT/"
    if [ "$qtype" != F32 ]; then
        # The exact model of the quantized file: every weight dequantized (llama-quantize to F32), f32 activations.
        "$LL/bin/llama-quantize" --allow-requantize "$OUT/$name.gguf" "$TMP/deq.gguf" F32 2 > "$TMP/q.log" 2>&1 ||
            { cat "$TMP/q.log"; exit 1; }
        "$TMP/llama_logits" "$TMP/deq.gguf" "$prompt" 8 "$TMP/$name.llama_dequant"
        mv "$TMP/$name.llama_dequant.logits.f32" "$TMP/$name.llama_dequant.greedy_logits.f32" "$OUT/"
    fi
    python3 - "$LL/src" "$OUT" "$name" "$hf" "$qtype" "$prompt" "$TMP/$name.llama.greedy.txt" "$LLAMA_VERSION" <<'EOF'
import collections, json, sys
from pathlib import Path
src, out, name, hf, qtype, prompt, greedy_txt, version = sys.argv[1:9]
sys.path.insert(0, str(Path(src) / "gguf-py"))
import gguf
import numpy as np
out = Path(out)
r = gguf.GGUFReader(out / f"{name}.gguf")
types = {t.name: t.tensor_type.name for t in r.tensors}
prompt = [int(t) for t in prompt.split(",")]
ll = np.fromfile(out / f"{name}.llama.logits.f32", dtype="<f4").reshape(len(prompt), -1)
gl = np.fromfile(out / f"{name}.llama.greedy_logits.f32", dtype="<f4").reshape(8, -1)
top2 = np.sort(gl, axis=1)[:, -2:]
ref = {
    "name": name,
    "source": f"tests/fixtures/hf/{hf} narrowed to value_head_dim = key_head_dim (scripts/reference/narrow_value_heads.py), "
              "then convert_hf_to_gguf.py --outtype f32 --no-mtp (scripts/reference/convert_tiny_hf_to_gguf.py)"
              + ("" if qtype == "F32" else f", then llama-quantize {qtype}"),
    "prompt_from": f"tests/fixtures/hf/{hf}",
    "llama_quantize_type": qtype,
    "llama_cpp_version": version,
    "llama_cpp_settings": "CPU, 2 threads, one batch for the prompt, flash attention off, f32 KV cache, default weight repacking (scripts/reference/llama_logits.cpp)",
    "prompt_tokens": prompt,
    "logits_file": f"{name}.llama.logits.f32",
    "logits_shape": list(ll.shape),
    "greedy_tokens": [int(t) for t in Path(greedy_txt).read_text().strip().split(",")],
    "greedy_logits_file": f"{name}.llama.greedy_logits.f32",
    "greedy_top1_top2_gaps": [float(g) for g in top2[:, 1] - top2[:, 0]],
    "tensor_type_counts": dict(collections.Counter(types.values())),
    "tensor_types": types,
}
if qtype != "F32":
    ref["llama_dequant_logits_file"] = f"{name}.llama_dequant.logits.f32"
    ref["llama_dequant_greedy_logits_file"] = f"{name}.llama_dequant.greedy_logits.f32"
    ref["llama_dequant_greedy_tokens"] = [int(t) for t in Path(greedy_txt.replace(".llama.greedy", ".llama_dequant.greedy")).read_text().strip().split(",")]
    ref["llama_dequant_note"] = "llama.cpp on `llama-quantize --allow-requantize THIS.gguf F32` (every weight dequantized exactly, activations f32): the exact model this file describes"
(out / f"{name}.reference.json").write_text(json.dumps(ref, indent=1) + "\n")
print(name, ref["tensor_type_counts"], "llama greedy", ref["greedy_tokens"])
EOF
}

# Unnarrowed F32 conversions, compared with our HF load of the same checkpoint (no llama.cpp logits).
cp "$IN/qwen35moe_r3_fused_layout-f32.gguf" "$OUT/qwen35moe_r3-f32.gguf"
cp "$IN/qwen3next_small-f32.gguf" "$OUT/qwen3next_small-f32.gguf"
make_one qwen35moe_dv16-f32 qwen35moe_small F32
make_one qwen35moe_dv16-q8_0 qwen35moe_small Q8_0
make_one qwen3next_dv16-f32 qwen3next_small F32
make_one qwen3next_dv16-q8_0 qwen3next_small Q8_0
