#!/usr/bin/env bash
# Smoke-test a GGUF with llama.cpp: one-shot greedy generation of N tokens.
#
#   scripts/llamacpp-smoke.sh MODEL.gguf [N]      (N defaults to 8)
#
# Runs llama-completion (falls back to llama-simple) on CPU with 2 threads,
# --temp 0, a fixed prompt, EOS ignored. Exit 0 only if exactly N tokens were
# generated (parsed from llama.cpp's perf lines). Exit 77 if llama.cpp is not
# built. Binaries are looked up in $LLAMACPP_BIN, then <repo>/.cache/llamacpp/bin.
# Env: SMOKE_PROMPT (default "The capital of France is"), SMOKE_VERBOSE=1.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${LLAMACPP_BIN:-$REPO/.cache/llamacpp/bin}"
MODEL="${1:-}"
N="${2:-8}"
PROMPT="${SMOKE_PROMPT:-The capital of France is}"

if [ -z "$MODEL" ]; then
    echo "usage: $0 MODEL.gguf [N]" >&2
    exit 2
fi
if [ ! -f "$MODEL" ]; then
    echo "llamacpp-smoke: no such model: $MODEL" >&2
    exit 2
fi
case "$N" in ''|*[!0-9]*) echo "llamacpp-smoke: N must be a positive integer" >&2; exit 2 ;; esac

LOG="$(mktemp -t llamacpp-smoke.XXXXXX)"
trap 'rm -f "$LOG"' EXIT

if [ -x "$BIN/llama-completion" ]; then
    tool=llama-completion
    "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n "$N" \
        --temp 0 --top-k 1 --seed 0 -t 2 -tb 2 -c 512 -ngl 0 \
        --ignore-eos -no-cnv --no-display-prompt --no-warmup \
        </dev/null >"$LOG" 2>&1
    rc=$?
elif [ -x "$BIN/llama-simple" ]; then
    # llama-simple is always greedy and stops at EOS (cannot ignore it).
    tool=llama-simple
    "$BIN/llama-simple" -m "$MODEL" -n "$N" "$PROMPT" </dev/null >"$LOG" 2>&1
    rc=$?
else
    echo "llama.cpp not built: run scripts/build-llamacpp.sh (looked in $BIN)" >&2
    exit 77
fi

[ "${SMOKE_VERBOSE:-0}" = 1 ] && cat "$LOG" >&2

if [ $rc -ne 0 ]; then
    echo "llamacpp-smoke: $tool exited $rc on $MODEL; last lines:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
fi

got=""
if [ "$tool" = llama-completion ]; then
    # "llama_perf_sampler_print:    samplers time = X ms / N runs" (one per sampled token)
    got="$(grep -Eo 'samplers? time *= *[0-9.]+ ms */ *[0-9]+ runs' "$LOG" | tail -n1 | grep -Eo '[0-9]+ runs' | grep -Eo '[0-9]+')"
    if [ -z "$got" ]; then
        # "eval time = X ms / K runs": tokens decoded after the prompt = N-1
        k="$(grep -Eo ' eval time *= *[0-9.]+ ms */ *[0-9]+ runs' "$LOG" | tail -n1 | grep -Eo '[0-9]+ runs' | grep -Eo '[0-9]+')"
        [ -n "$k" ] && got=$((k + 1))
    fi
else
    # "main: decoded N tokens in X s, speed: ..."
    got="$(grep -Eo 'decoded [0-9]+ tokens' "$LOG" | tail -n1 | grep -Eo '[0-9]+')"
fi

speed="$(grep -E ' eval time' "$LOG" | tail -n1 | grep -Eo '[0-9.]+ tokens per second' || true)"
if [ -z "$got" ]; then
    echo "llamacpp-smoke: could not find a timings line in $tool output; last lines:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
fi
if [ "$got" -ne "$N" ]; then
    echo "llamacpp-smoke: FAIL $MODEL: generated $got tokens, wanted $N ($tool)" >&2
    tail -n 25 "$LOG" >&2
    exit 1
fi
echo "llamacpp-smoke: OK $MODEL: $got tokens ($tool${speed:+, $speed})"
