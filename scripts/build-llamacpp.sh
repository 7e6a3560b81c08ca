#!/usr/bin/env bash
# Build llama.cpp (CPU only, native, Release) from the PyPI sdist of
# llama-cpp-python, which vendors a llama.cpp tree under vendor/llama.cpp.
#
# Idempotent: re-running skips the download/extract/configure steps that are
# already done and lets cmake rebuild incrementally.
#
# Env:
#   LLAMACPP_DIR   existing llama.cpp source tree to build instead of the sdist
#   LLAMACPP_CACHE cache dir (default: <repo>/.cache/llamacpp)
#   JOBS           parallel build jobs (default: 2)
#
# Output: binaries copied to $LLAMACPP_CACHE/bin/ (path printed at the end).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LLAMACPP_CACHE:-$REPO/.cache/llamacpp}"
JOBS="${JOBS:-2}"
mkdir -p "$CACHE"

log() { echo "[build-llamacpp] $*" >&2; }

# --- tools -----------------------------------------------------------------
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
if ((${#need_apt[@]})); then
    log "installing: ${need_apt[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_apt[@]}"
fi

# --- source ----------------------------------------------------------------
if [ -n "${LLAMACPP_DIR:-}" ]; then
    SRC="$LLAMACPP_DIR"
    [ -f "$SRC/CMakeLists.txt" ] || { log "LLAMACPP_DIR=$SRC has no CMakeLists.txt"; exit 1; }
else
    find_sdist() { find "$CACHE" -maxdepth 1 -name 'llama[-_]cpp[-_]python-*.tar.gz' | sort | tail -n1; }
    sdist="$(find_sdist)"
    if [ -z "$sdist" ]; then
        log "downloading llama-cpp-python sdist"
        # pip prepares sdist metadata; with build isolation and --no-binary :all:
        # it would compile ninja/cmake from source. Use the host's
        # scikit-build-core (a wheel) without isolation instead.
        python3 -c 'import scikit_build_core' 2>/dev/null ||
            python3 -m pip install --only-binary :all: scikit-build-core
        python3 -m pip download --no-binary llama-cpp-python --no-deps \
            --no-build-isolation -d "$CACHE" llama-cpp-python
        sdist="$(find_sdist)"
        [ -n "$sdist" ] || { log "sdist download failed"; exit 1; }
    fi
    top="$(basename "$sdist" .tar.gz)"
    if [ ! -f "$CACHE/$top/vendor/llama.cpp/CMakeLists.txt" ]; then
        log "extracting $(basename "$sdist")"
        tar xzf "$sdist" -C "$CACHE"
    fi
    SRC="$CACHE/$top/vendor/llama.cpp"
    ln -sfn "$SRC" "$CACHE/src"
fi
log "llama.cpp source: $SRC"

# --- version ---------------------------------------------------------------
version="unknown"
# Only trust git when $SRC is itself a checkout root (the sdist copy lives
# inside our repo, whose git would otherwise answer).
if [ "$(git -C "$SRC" rev-parse --show-toplevel 2>/dev/null)" = "$(cd "$SRC" && pwd -P)" ]; then
    version="commit $(git -C "$SRC" rev-parse --short HEAD)"
fi
# sdist has no .git: llama-cpp-python's package version pins a llama.cpp release.
pyver="$(grep -m1 -Eo '__version__ *= *"[^"]+"' "$SRC/../../llama_cpp/__init__.py" 2>/dev/null | cut -d'"' -f2 || true)"
[ -n "$pyver" ] && version="$version (llama-cpp-python $pyver)"
log "llama.cpp version: $version"
echo "$version" > "$CACHE/VERSION"

# --- configure -------------------------------------------------------------
# GGML_NATIVE=ON compiles with -march=native. On hosts whose CPU advertises AMX
# but whose kernel/VM does not enable the AMX tile state (e.g. firecracker VMs),
# ggml's AMX matmul for quantized types dies with SIGILL (`tilezero`), so AMX is
# disabled explicitly (GCC honours explicit -mno-* over -march). Set
# LLAMACPP_ALLOW_AMX=1 to keep it.
EXTRA_FLAGS=""
if [ "${LLAMACPP_ALLOW_AMX:-0}" != 1 ]; then
    EXTRA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
BUILD="$CACHE/build"
# Always (re)configure: cheap when nothing changed, and picks up flag changes.
log "configuring"
cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS" \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_HTTPLIB=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON >/dev/null

# --- build only the targets we need ---------------------------------------
want=(llama-quantize llama-cli llama-simple llama-completion llama-bench llama-eval-callback llama-gguf llama-tokenize)
avail="$(cmake --build "$BUILD" --target help 2>/dev/null || true)"
targets=()
for t in "${want[@]}"; do
    if grep -qE "(^|[ .:])$t(\$|[ :])" <<<"$avail"; then targets+=("$t"); fi
done
log "targets: ${targets[*]}"
start=$(date +%s)
cmake --build "$BUILD" --config Release -j"$JOBS" --target "${targets[@]}"
log "build took $(( $(date +%s) - start ))s"

# --- collect ---------------------------------------------------------------
mkdir -p "$CACHE/bin"
for t in "${targets[@]}"; do
    f="$BUILD/bin/$t"
    [ -x "$f" ] && cp -f "$f" "$CACHE/bin/$t"
done
log "binaries:"
ls -1 "$CACHE/bin" >&2
echo "$CACHE/bin"
