#!/usr/bin/env bash
# The project's test command (README, and .ci/run calls it).
# 1. Rust unit and integration tests (built at opt-level 1, see Cargo.toml).
# 2. Python cross-checks of our files and decoders against independent readers (gguf-py, safetensors, numpy,
#    tokenizers), in a virtual environment this script creates.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/python-env.sh
cargo build --locked -p moestream
cargo test --locked --workspace
MOESTREAM_BIN="$PWD/target/debug/moestream" .venv/bin/python -m pytest tests/python -q -p no:cacheprovider
