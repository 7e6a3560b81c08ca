#!/usr/bin/env bash
# Regenerate tests/fixtures/gguf/: GGUF files made by llama.cpp's own converter and
# llama-quantize, with llama.cpp's logits and a float64 transformers reference.
#
#   scripts/reference/make_gguf_fixtures.sh [LLAMACPP_DIR]
#
# LLAMACPP_DIR (default $LLAMACPP_DIR or /work/wt-llama/.cache/llamacpp) is what
# scripts/build-llamacpp.sh leaves: src/ (the llama.cpp tree: include/, ggml/include,
# convert_hf_to_gguf.py, gguf-py/), build/ (static libs), bin/llama-quantize.
# $PYTHON (default python3) must have torch (any build; the CPU is enough),
# transformers >= 5 and numpy: the converter imports torch, and the f64 reference
# runs transformers. What made the committed files: `python3 -m venv --system-site-packages V &&
# V/bin/pip install torch` (PyPI torch 2.15.0 with its CUDA runtime wheels; only the CPU is used),
# transformers 5.24.0, then PYTHON=V/bin/python scripts/reference/make_gguf_fixtures.sh (about 2 min).
#
# Per fixture NAME it writes tests/fixtures/gguf/
#   NAME.gguf                   the model (converter F32 output, or llama-quantize of it)
#   NAME.llama.logits.f32       llama.cpp prompt logits, f32 [T, V] (one batch, all positions)
#   NAME.llama.greedy_logits.f32  llama.cpp logits of the 8 greedy steps (KV-cached decode)
#   NAME.f64.logits.f32         transformers float64 on the GGUF's *dequantized* weights
#   NAME.reference.json         prompt, shapes, greedy tokens and gaps, router gaps,
#                               per-tensor types, llama.cpp commit, how it was made
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LL=${1:-${LLAMACPP_DIR:-/work/wt-llama/.cache/llamacpp}}
PY=${PYTHON:-python3}
OUT=$ROOT/tests/fixtures/gguf
HERE=$ROOT/scripts/reference
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

LLAMA_COMMIT=$(sed -n 's/^commit \([0-9a-f]*\).*/\1/p' "$LL/VERSION" 2>/dev/null || true)
LLAMA_VERSION=$(cat "$LL/VERSION" 2>/dev/null || echo unknown)

# 1. The logits dumper, linked statically against the built tree.
g++ -O2 -std=c++17 -I"$LL/src/include" -I"$LL/src/ggml/include" "$HERE/llama_logits.cpp" -o "$TMP/llama_logits" \
    "$LL/build/src/libllama.a" "$LL/build/ggml/src/libggml.a" "$LL/build/ggml/src/libggml-cpu.a" \
    "$LL/build/ggml/src/libggml-base.a" -lpthread -ldl -lm

# 2. Inputs: two HF fixtures (norm_topk_prob=true, all layers MoE: what llama.cpp's
#    qwen3moe graph computes) and a 256-wide synthetic model, so that Q4_K_M really
#    contains Q4_K/Q5_K/Q6_K tensors (K-quants need rows of 256; the fixtures are 64 wide).
MOESTREAM=$ROOT/target/release/moestream
[ -x "$MOESTREAM" ] || (cd "$ROOT" && cargo build -q --release --bin moestream)
"$MOESTREAM" synth --preset tiny-qwen3-moe --format hf-f32 --layers 1 --seed 0 --out "$TMP/synth_w256" --quiet
SYNTH_PROMPT=855,565,619,811,523,701,754,203,50,271,257,790,825,4,452,743  # numpy default_rng(7).integers(0, 905, 16)

hf_prompt() { "$PY" -c "import json,sys;print(','.join(map(str,json.load(open(sys.argv[1]))['prompt_tokens'])))" "$1"; }

convert() { # HF_DIR OUT.gguf
    "$PY" "$HERE/convert_tiny_hf_to_gguf.py" "$LL/src" "$1" "$2" f32 > "$TMP/convert.log" 2>&1 ||
        { cat "$TMP/convert.log"; exit 1; }
}

# make NAME SRC_F32_GGUF QTYPE HF_DIR PROMPT HF_F64_LOGITS SOURCE_NOTE
make_one() {
    local name=$1 f32=$2 qtype=$3 hf=$4 prompt=$5 hf_logits=$6 note=$7
    if [ "$qtype" = F32 ]; then
        cp "$f32" "$OUT/$name.gguf"
    else
        "$LL/bin/llama-quantize" "$f32" "$OUT/$name.gguf" "$qtype" 2 > "$TMP/$name.quantize.log" 2>&1 ||
            { cat "$TMP/$name.quantize.log"; exit 1; }
    fi
    "$TMP/llama_logits" "$OUT/$name.gguf" "$prompt" 8 "$TMP/$name.llama"
    mv "$TMP/$name.llama.logits.f32" "$OUT/$name.llama.logits.f32"
    mv "$TMP/$name.llama.greedy_logits.f32" "$OUT/$name.llama.greedy_logits.f32"
    "$PY" "$HERE/gguf_f64_reference.py" "$LL/src" "$hf" "$OUT/$name.gguf" "$prompt" 8 "$TMP/$name.f64" \
        2> "$TMP/$name.f64.log" || { cat "$TMP/$name.f64.log"; exit 1; }
    mv "$TMP/$name.f64.logits.f32" "$OUT/$name.f64.logits.f32"
    "$PY" - "$LL/src" "$OUT" "$name" "$qtype" "$prompt" "$TMP/$name.llama.greedy.txt" "$TMP/$name.f64.greedy.json" \
        "$hf_logits" "$note" "$LLAMA_COMMIT" "$LLAMA_VERSION" <<'EOF'
import collections, json, sys
from pathlib import Path
src, out, name, qtype, prompt, greedy_txt, f64_json, hf_logits, note, commit, version = sys.argv[1:12]
sys.path.insert(0, str(Path(src) / "gguf-py"))
import gguf
import numpy as np
out = Path(out)
r = gguf.GGUFReader(out / f"{name}.gguf")
types = {t.name: t.tensor_type.name for t in r.tensors}
prompt = [int(t) for t in prompt.split(",")]
f64 = json.loads(Path(f64_json).read_text())
ll = np.fromfile(out / f"{name}.llama.logits.f32", dtype="<f4").reshape(len(prompt), -1)
gl = np.fromfile(out / f"{name}.llama.greedy_logits.f32", dtype="<f4").reshape(8, -1)
top2 = np.sort(gl, axis=1)[:, -2:]
ref = {
    "name": name,
    "source": note,
    "llama_quantize_type": qtype,
    "llama_cpp_commit": commit,
    "llama_cpp_version": version,
    "llama_cpp_settings": "CPU, 2 threads, one batch for the prompt, flash attention off, f32 KV cache, default weight repacking (scripts/reference/llama_logits.cpp)",
    "prompt_tokens": prompt,
    "logits_file": f"{name}.llama.logits.f32",
    "logits_shape": list(ll.shape),
    "greedy_tokens": [int(t) for t in Path(greedy_txt).read_text().strip().split(",")],
    "greedy_logits_file": f"{name}.llama.greedy_logits.f32",
    "greedy_top1_top2_gaps": [float(g) for g in top2[:, 1] - top2[:, 0]],
    "f64_dequant_logits_file": f"{name}.f64.logits.f32",
    "f64_dequant_note": "transformers float64 forward with every weight replaced by gguf-py's dequantization of this file",
    "f64_dequant_greedy_tokens": f64["greedy_tokens"],
    "f64_dequant_greedy_top1_top2_gaps": f64["top1_top2_gaps"],
    "f64_dequant_prompt_router_gaps": f64["prompt_router_gaps"],
    "hf_f64_logits_file": hf_logits,
    "tensor_type_counts": dict(collections.Counter(types.values())),
    "tensor_types": types,
}
(out / f"{name}.reference.json").write_text(json.dumps(ref, indent=1) + "\n")
print(name, ref["tensor_type_counts"], "llama greedy", ref["greedy_tokens"])
EOF
}

HF=$ROOT/tests/fixtures/hf
G=$HF/qwen3moe_gqa_headdim
T=$HF/qwen3moe_tied
convert "$G" "$TMP/gqa_headdim-f32.gguf"
convert "$T" "$TMP/tied-f32.gguf"
convert "$TMP/synth_w256" "$TMP/synth_w256-f32.gguf"

GP=$(hf_prompt "$G/reference.json")
TP=$(hf_prompt "$T/reference.json")
for q in F32 Q8_0 Q4_0 Q4_K_M; do
    lq=$(echo "$q" | tr 'A-Z' 'a-z')
    make_one "gqa_headdim-$lq" "$TMP/gqa_headdim-f32.gguf" "$q" "$G" "$GP" ../hf/qwen3moe_gqa_headdim/logits.f32 \
        "tests/fixtures/hf/qwen3moe_gqa_headdim via convert_hf_to_gguf.py --outtype f32 (scripts/reference/convert_tiny_hf_to_gguf.py)"
done
make_one tied-q8_0 "$TMP/tied-f32.gguf" Q8_0 "$T" "$TP" ../hf/qwen3moe_tied/logits.f32 \
    "tests/fixtures/hf/qwen3moe_tied via convert_hf_to_gguf.py --outtype f32 (scripts/reference/convert_tiny_hf_to_gguf.py)"

# The synthetic model's HF f64 reference = the f64 forward of its F32 conversion (exact f32 weights).
"$PY" "$HERE/gguf_f64_reference.py" "$LL/src" "$TMP/synth_w256" "$TMP/synth_w256-f32.gguf" "$SYNTH_PROMPT" 8 \
    "$TMP/synth_hf" 2> "$TMP/synth_hf.log" || { cat "$TMP/synth_hf.log"; exit 1; }
mv "$TMP/synth_hf.logits.f32" "$OUT/synth_w256.hf_f64.logits.f32"
make_one synth_w256-q4_k_m "$TMP/synth_w256-f32.gguf" Q4_K_M "$TMP/synth_w256" "$SYNTH_PROMPT" synth_w256.hf_f64.logits.f32 \
    "moestream synth --preset tiny-qwen3-moe --format hf-f32 --layers 1 --seed 0, via convert_hf_to_gguf.py --outtype f32 (scripts/reference/convert_tiny_hf_to_gguf.py)"
du -ch "$OUT"/* | tail -1
