#!/usr/bin/env python3
"""Eviction-policy hit rates: replays routing traces through the expert-cache simulator
(`crates/store/examples/simulate_trace.rs`, the cache's own pinning rule) for LRU and LFU with aging.

    bench/eviction.py [TRACE.json ...] [--slots 8,16,32,64] [--policies lru,lfu:16,lfu:64,lfu:256]
                      [--tokens 2048] [--layers 16] [--no-synthetic] [--seed 1]

TRACE.json files are what `moestream run --trace-out FILE` writes. Unless --no-synthetic, three synthetic traces
(128 experts, top-8, labelled "synthetic") are generated too:
  * zipf s with reuse r: per layer a Zipf(s) expert popularity over a random permutation of the experts, and each
    of the previous token's experts is kept with probability r (the rest are drawn from the popularity, excluding
    the previous token's experts, so the measured repeat rate is r);
printed with the measured repeat rate. Prints a markdown table, one row per trace and slot count.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic(tokens, layers, experts, k, s, reuse, seed):
    rng = np.random.default_rng(seed)
    out = np.zeros((tokens, layers, k), dtype=np.int64)
    repeats = 0
    for layer in range(layers):
        perm = rng.permutation(experts)
        w = 1.0 / np.arange(1, experts + 1) ** s
        pop = np.empty(experts)
        pop[perm] = w / w.sum()
        prev = None
        for t in range(tokens):
            keep = [] if prev is None else [x for x in prev if rng.random() < reuse]
            repeats += len(keep)
            p = pop.copy()
            if prev is not None:
                p[list(prev)] = 0.0
            p /= p.sum()
            fresh = rng.choice(experts, size=k - len(keep), replace=False, p=p)
            cur = keep + [int(x) for x in fresh]
            out[t, layer] = cur
            prev = cur
    rate = repeats / ((tokens - 1) * layers * k)
    return out.reshape(-1).tolist(), rate


def reuse_rate(j):
    k, layers = j["top_k"], j["moe_layers"]
    e = np.array(j["experts"]).reshape(-1, layers, k)
    same = sum(len(set(e[t, l]) & set(e[t - 1, l])) for t in range(1, len(e)) for l in range(layers))
    return same / ((len(e) - 1) * layers * k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="*")
    ap.add_argument("--slots", default="8,16,32,64")
    ap.add_argument("--policies", default="lru,lfu:16,lfu:64,lfu:256")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "moestream-store", "--example", "simulate_trace"],
                   check=True, cwd=ROOT)
    exe = os.path.join(ROOT, "target", "release", "examples", "simulate_trace")
    tmp = tempfile.mkdtemp(prefix="moestream-evict-")
    runs = []  # (label, path, reuse)
    for p in a.traces:
        j = json.load(open(p))
        runs.append((f"engine trace `{os.path.basename(p)}` ({len(j['experts']) // (j['top_k'] * j['moe_layers'])} "
                     f"tokens × {j['moe_layers']} layers)", p, reuse_rate(j)))
    if not a.no_synthetic:
        for s, r in [(0.8, 0.45), (1.2, 0.45), (1.0, 0.0)]:
            trace, rate = synthetic(a.tokens, a.layers, 128, 8, s, r, a.seed)
            p = os.path.join(tmp, f"zipf{s}-reuse{r}.json")
            json.dump({"num_experts": 128, "top_k": 8, "moe_layers": a.layers, "experts": trace}, open(p, "w"))
            runs.append((f"synthetic: Zipf s={s}, reuse {r:.0%} ({a.tokens} tokens × {a.layers} layers)", p, rate))

    policies = a.policies.split(",")
    print("| trace | repeat rate | slots | " + " | ".join(policies) + " | best LFU − LRU |")
    print("|---|---|---|" + "---|" * len(policies) + "---|")
    for label, p, rate in runs:
        out = subprocess.run([exe, p, "--slots", a.slots, "--policies", a.policies], check=True,
                             capture_output=True, text=True).stdout
        rows = {}
        for line in out.splitlines():
            r = json.loads(line)
            rows.setdefault(r["slots"], {})[r["policy"]] = r["hit_rate"]
        for slots, by in rows.items():
            lfu = max(v for q, v in by.items() if q != "lru")
            cells = " | ".join(f"{100 * by[q]:.1f}%" for q in policies)
            print(f"| {label} | {100 * rate:.0f}% | {slots}/128 | {cells} | {100 * (lfu - by['lru']):+.1f} pp |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
