#!/usr/bin/env bash
# Does llama.cpp load and run what `moestream synth` writes? Synthesises a tiny-qwen3-moe, a 2-layer
# real-width qwen3-30b-a3b and a tiny-qwen3.5-moe (arch qwen35moe) in gguf-q4_0 and generates 8 tokens from each
# with llama.cpp.
#
#   scripts/check-llamacpp-loads.sh [WORKDIR]
#
# Needs llama.cpp from scripts/build-llamacpp.sh; exits 77 (skip) with a message when it is not built.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d -t moestream-llamacpp.XXXXXX)}"
mkdir -p "$work"
bin="${LLAMACPP_BIN:-$PWD/.cache/llamacpp/bin}"
if [ ! -x "$bin/llama-completion" ] && [ ! -x "$bin/llama-simple" ]; then
    echo "llama.cpp not built: run scripts/build-llamacpp.sh (looked in $bin)" >&2
    exit 77
fi
cargo build --release -q -p moestream
ms=target/release/moestream
"$ms" synth --preset tiny-qwen3-moe --format gguf-q4_0 --out "$work/tiny-q4_0.gguf" --quiet
"$ms" synth --preset qwen3-30b-a3b --layers 2 --format gguf-q4_0 --out "$work/qwen3-30b-a3b-2l-q4_0.gguf" --quiet
"$ms" synth --preset tiny-qwen3.5-moe --format gguf-q4_0 --out "$work/tiny-qwen3.5-q4_0.gguf" --quiet
for m in "$work/tiny-q4_0.gguf" "$work/qwen3-30b-a3b-2l-q4_0.gguf" "$work/tiny-qwen3.5-q4_0.gguf"; do
    scripts/llamacpp-smoke.sh "$m" 8
done
echo "llama.cpp loaded and generated from all three synthetic models in $work"
