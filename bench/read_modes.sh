#!/usr/bin/env bash
# Read modes and kernel paths, cold page cache each run: one read per missed expert (pack sidecar) vs one read per
# range (the GGUF as written: gate, up, down), for stacked+fused (default), stacked unfused (--no-fuse-gate-up) and
# legacy per-expert calls (--no-stacked). Each cell is the mean of RUNS runs; prints a markdown table.
#
#   bench/read_modes.sh [DIR]        (default DIR /tmp/rm; needs root for drop_caches and a release build)
#
# Writes a 4-layer qwen3-30b-a3b-width synthetic GGUF (q4_0) to DIR, hard-links it to a second name and packs that
# name, so the two variants share the model bytes and differ only in the sidecar. Remove DIR afterwards.
set -euo pipefail
dir="${1:-/tmp/rm}"
bin="${BIN:-target/release/moestream}"
runs="${RUNS:-3}"
args=(--tokens 1,2,3,4,5,6,7,8 -n 33 --threads 2 --expert-cache 1GiB)
[ -x "$bin" ] || { echo "read_modes.sh: build first: cargo build --release -p moestream" >&2; exit 1; }
mkdir -p "$dir"
if [ ! -f "$dir/m.gguf" ]; then
    "$bin" synth --preset qwen3-30b-a3b --layers 4 --format gguf-q4_0 --out "$dir/m.gguf" --quiet
fi
ln -f "$dir/m.gguf" "$dir/p.gguf"
[ -f "$dir/p.gguf.moestream-pack" ] || "$bin" pack "$dir/p.gguf" --quiet >/dev/null
rm -f "$dir/m.gguf.moestream-pack"

echo "| reads | kernel path | decode tok/s (mean of $runs) | runs | hit rate | reads per miss |"
echo "|---|---|---|---|---|---|"
for variant in unpacked packed; do
    model="$dir/m.gguf"
    [ "$variant" = packed ] && model="$dir/p.gguf"
    for mode in stacked+fused stacked legacy; do
        flags=()
        case "$mode" in
            stacked) flags=(--no-fuse-gate-up) ;;
            legacy) flags=(--no-stacked) ;;
        esac
        toks=() hit="" rpm=""
        for _ in $(seq "$runs"); do
            sync
            echo 3 > /proc/sys/vm/drop_caches
            err=$("$bin" run --model "$model" "${args[@]}" "${flags[@]}" 2>&1 >/dev/null)
            toks+=("$(sed -n 's/.*decode [0-9]* tokens: \([0-9.]*\) tok\/s.*/\1/p' <<<"$err")")
            hit=$(sed -n 's/.*hit rate \([0-9.]*%\).*/\1/p' <<<"$err")
            misses=$(sed -n 's/.*hits, \([0-9]*\) misses).*/\1/p' <<<"$err")
            reads=$(sed -n 's/.* in \([0-9]*\) reads,.*/\1/p' <<<"$err")
            rpm=$(awk -v r="$reads" -v m="$misses" 'BEGIN { printf (m > 0 ? "%.2f" : "-"), r / (m > 0 ? m : 1) }')
        done
        what="one per range"
        [ "$variant" = packed ] && what="one per expert (packed)"
        mean=$(printf '%s\n' "${toks[@]}" | awk '{ s += $1 } END { printf "%.2f", s / NR }')
        echo "| $what | $mode | $mean | ${toks[*]} | $hit | $rpm |"
    done
done
