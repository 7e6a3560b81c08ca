#!/usr/bin/env python3
"""In-RAM decode benchmark: moestream `run` beside llama.cpp `llama-bench` on the same GGUF, same threads,
alternating, plus the machine's memory read bandwidth and the bound it implies.

    bench/in_ram.py MODEL.gguf [--threads 2] [--gen 64] [--repeat 3] [--llama-bin DIR] [--q8]

Prints a markdown table for BENCHMARKS.md. Needs a release build (`cargo build --release -p moestream`),
llama.cpp from scripts/build-llamacpp.sh, and a C compiler for bench/membw.c.
"""
import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@functools.cache
def membw_exe():
    """bench/membw.c, compiled once per process (the harness reads bandwidth beside every in-RAM run)."""
    exe = os.path.join(tempfile.gettempdir(), "moestream-membw")
    sh(["cc", "-O3", "-march=native", "-fopenmp", os.path.join(ROOT, "bench", "membw.c"), "-o", exe])
    return exe


def membw(threads, gib=4, runs=3):
    """Best GB/s of `runs` × 5 passes of bench/membw.c over `gib` GiB (1 GiB is already far past the L3's reach
    here: a 256 MiB array reads as fast as 1 GiB, 64 MiB twice as fast)."""
    return max(float(sh([membw_exe(), str(gib), str(threads)]).stdout) for _ in range(runs))


def bytes_per_token(ms, model):
    """Weight bytes one decode token reads: the trunk except the embedding table (one row is read), the top-k
    experts of every MoE layer, and the output head."""
    info = json.loads(sh([ms, "inspect", model, "--json", "--tensors"]).stdout)
    embd = next(t["bytes"] for t in info["tensors"] if t["name"] == "token_embd.weight")
    tied = not any(t["name"] == "output.weight" for t in info["tensors"])
    trunk = info["bytes_resident"] - (0 if tied else embd)
    return trunk + info["bytes_routed_per_token"], info


def moestream_decode(ms, model, threads, gen, q8):
    cmd = [ms, "run", "--model", model, "--tokens", "1,2,3,4,5,6,7,8", "-n", str(gen + 1), "--threads", str(threads)]
    if q8:
        cmd.append("--q8-activations")
    err = sh(cmd).stderr
    m = re.search(r"decode \d+ tokens: ([0-9.]+) tok/s", err)
    if not m:
        sys.exit(f"no decode rate in moestream output:\n{err}")
    return float(m.group(1))


def llama_decode(bin_dir, model, threads, gen):
    out = sh([os.path.join(bin_dir, "llama-bench"), "-m", model, "-p", "0", "-n", str(gen), "-t", str(threads),
              "-r", "1", "-o", "json"]).stdout
    rows = json.loads(out)
    return float(rows[0]["avg_ts"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llama-bin", default=os.path.join(ROOT, ".cache", "llamacpp", "bin"))
    ap.add_argument("--q8", action="store_true", help="also run moestream with --q8-activations")
    a = ap.parse_args()
    ms = os.path.join(ROOT, "target", "release", "moestream")
    bpt, info = bytes_per_token(ms, a.model)
    bw = membw(a.threads)
    runs = {"moestream": [], "llama.cpp": []}
    if a.q8:
        runs["moestream --q8-activations"] = []
    for _ in range(a.repeat):
        runs["llama.cpp"].append(llama_decode(a.llama_bin, a.model, a.threads, a.gen))
        runs["moestream"].append(moestream_decode(ms, a.model, a.threads, a.gen, False))
        if a.q8:
            runs["moestream --q8-activations"].append(moestream_decode(ms, a.model, a.threads, a.gen, True))
    bound = bw * 1e9 / bpt
    peer = statistics.median(runs["llama.cpp"])
    print(f"model: {a.model} ({info['bytes_total'] / 1e9:.2f} GB, {info['layers']} layers), threads {a.threads}, "
          f"decode {a.gen} tokens, {a.repeat} alternating repeats")
    print(f"memory read bandwidth (bench/membw.c, {a.threads} threads, best of 3): {bw:.1f} GB/s; "
          f"weight bytes per token {bpt / 1e6:.0f} MB; bound {bound:.2f} tok/s")
    print()
    print("| engine | decode tok/s (median) | runs | vs llama.cpp | % of bandwidth bound |")
    print("|---|---|---|---|---|")
    for k, v in runs.items():
        med = statistics.median(v)
        print(f"| {k} | {med:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {med / peer:.2f}x | {100 * med / bound:.0f}% |")


if __name__ == "__main__":
    main()
