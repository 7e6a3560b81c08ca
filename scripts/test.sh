#!/usr/bin/env bash
# The project's test command (README, and .ci/run calls it).
# 1. Rust unit and integration tests (built at opt-level 1, see Cargo.toml).
# 2. The aarch64 (NEON) kernels under qemu, where the tools can be installed.
# 3. Python cross-checks of our files and decoders against independent readers (gguf-py, safetensors, numpy,
#    tokenizers), in a virtual environment this script creates.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/python-env.sh
cargo build --locked -p moestream
cargo test --locked --workspace
# The NEON kernel tables against the scalar reference, built for aarch64 and run under qemu. The script exits 77
# (skip, with its reason on stderr) only when the target or the emulator cannot be installed.
rc=0
scripts/check-aarch64.sh >/dev/null || rc=$?
case "$rc" in
  0) echo "aarch64 (qemu): moestream-cpu tests passed" ;;
  77) echo "aarch64 (qemu): skipped" ;;
  *) echo "aarch64 (qemu): FAILED"; exit "$rc" ;;
esac
MOESTREAM_BIN="$PWD/target/debug/moestream" .venv/bin/python -m pytest tests/python -q -p no:cacheprovider
