#!/usr/bin/env python3
"""Eviction policies for the shared expert slot pool, replayed on routing traces: misses per decode token for LFU
with the engine's decay (`lfu:H`, H in tokens), LRU, ARC, and Belady's offline optimum (`opt`, evict the expert
needed furthest ahead: no real policy can beat it). One pool of SLOTS experts over all MoE layers, as
`ExpertStore::open_with_sharing` keeps it; a token's own experts in a layer are pinned while that layer loads them.

    bench/pool_policy.py --slots 2597,975 [--policies lfu:64,lfu:16,lru,arc,opt] [--prompt-tokens 8]
                         FIRST.json [SECOND.json]

Traces are what `moestream run --tokens IDS -n 1 --trace-out FILE` writes (prompt routing is per token and
causal, so a prompt of N ids routes as N decoded ones would). With one trace: misses per token over its second
half (one long context, the cache warm). With two: FIRST fills the cache, and the figure is SECOND's misses per
token after its first --prompt-tokens (a new context on a cache warmed by another one: `bench --warm-prompt
other`). `--make-traces MODEL N` writes `bench`'s own token ids instead: N ids of the cold prompt's sequence
(`cold.json`) and of the other prompt's (`other.json`), into the current directory.

This is a model of the pool, not the pool: prefill waves and prefetch are not modelled, and LFU ties go to the
least recently used. It agreed with the engine within 5% where both were measured (BENCHMARKS, tenth pass).
"""
import argparse
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_ids(start, n, vocab):
    """`moestream bench`'s pseudo-random token ids (crates/cli/src/bench.rs)."""
    return [((i * 0x9E3779B97F4A7C15 % 2**64) >> 17) % vocab for i in range(start, start + n)]


def load(path):
    t = json.load(open(path))
    L, k, E = t["moe_layers"], t["top_k"], t["num_experts"]
    e = t["experts"]
    tokens = len(e) // (L * k)
    # One request per (token, layer): the pool keys of its top-k experts.
    return [[l * E + e[(t_ * L + l) * k + j] for j in range(k)] for t_ in range(tokens) for l in range(L)], L


class Lfu:
    """Decayed use counts per expert (kept while not resident), half-life in tokens; ties to the least recent."""

    def __init__(self, cap, half_life, layers):
        self.cap, self.slots, self.freq = cap, {}, {}
        # Counts grow by decay^-i instead of all decaying by decay each step: the same order, no sweep.
        self.growth = 2.0 ** (1.0 / (half_life * layers))

    def evict(self, pinned):
        """Drop the unpinned expert with the lowest count (ties: least recently used); return its count."""
        v = min((c for c in self.slots if c not in pinned), key=lambda c: (self.freq[c], self.slots[c]))
        del self.slots[v]
        return self.freq[v]

    def access(self, k, i, pinned):
        hit = k in self.slots
        if not hit and len(self.slots) >= self.cap:
            self.evict(pinned)
        self.slots[k] = i
        self.freq[k] = self.freq.get(k, 0.0) + self.growth ** i
        return hit


class LfuDa(Lfu):
    """LFU with dynamic aging (Arlitt et al.): a miss enters at least at the count of the last victim, so a new
    context's experts compete with the old context's stale but high counts instead of being the next victims."""

    def __init__(self, cap, half_life, layers):
        super().__init__(cap, half_life, layers)
        self.age = 0.0

    def access(self, k, i, pinned):
        hit = k in self.slots
        if not hit:
            if len(self.slots) >= self.cap:
                self.age = self.evict(pinned)
            self.freq[k] = max(self.freq.get(k, 0.0), self.age)
        self.slots[k] = i
        self.freq[k] = self.freq.get(k, 0.0) + self.growth ** i
        return hit


class Lru:
    def __init__(self, cap):
        self.cap, self.slots = cap, OrderedDict()

    def access(self, k, i, pinned):
        hit = k in self.slots
        if hit:
            self.slots.move_to_end(k)
            return True
        if len(self.slots) >= self.cap:
            del self.slots[next(c for c in self.slots if c not in pinned)]
        self.slots[k] = i
        return False


class Arc:
    """Megiddo and Modha's ARC, with pinned entries skipped when a list's LRU end is evicted."""

    def __init__(self, cap):
        self.c, self.p = cap, 0.0
        self.t1, self.t2, self.b1, self.b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()

    def _replace(self, k, pinned):
        v1 = next((c for c in self.t1 if c not in pinned), None)
        v2 = next((c for c in self.t2 if c not in pinned), None)
        if v1 is not None and (v2 is None or len(self.t1) > self.p or (k in self.b2 and len(self.t1) == int(self.p))):
            del self.t1[v1]
            self.b1[v1] = 1
        else:
            del self.t2[v2]
            self.b2[v2] = 1

    def access(self, k, i, pinned):
        if k in self.t1:
            del self.t1[k]
            self.t2[k] = 1
            return True
        if k in self.t2:
            self.t2.move_to_end(k)
            return True
        full = len(self.t1) + len(self.t2) >= self.c
        if k in self.b1 or k in self.b2:
            if k in self.b1:
                self.p = min(self.c, self.p + max(len(self.b2) / len(self.b1), 1))
            else:
                self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
            if full:
                self._replace(k, pinned)
            (self.b1 if k in self.b1 else self.b2).pop(k)
            self.t2[k] = 1
            return False
        if len(self.t1) + len(self.b1) >= self.c:
            if len(self.t1) < self.c:
                self.b1.popitem(last=False)
                if full:
                    self._replace(k, pinned)
            else:
                del self.t1[next(c for c in self.t1 if c not in pinned)]
        elif full or len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) >= self.c:
            if len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) >= 2 * self.c:
                self.b2.popitem(last=False)
            if full:
                self._replace(k, pinned)
        self.t1[k] = 1
        return False


class Opt:
    """Belady: needs the whole request sequence up front."""

    def __init__(self, cap, requests):
        self.cap, self.slots = cap, {}
        self.next_use, later = [None] * len(requests), {}
        for i in range(len(requests) - 1, -1, -1):
            self.next_use[i] = {k: later.get(k, math.inf) for k in requests[i]}
            for k in requests[i]:
                later[k] = i

    def access(self, k, i, pinned):
        hit = k in self.slots
        if not hit and len(self.slots) >= self.cap:
            del self.slots[max((c for c in self.slots if c not in pinned), key=lambda c: self.slots[c])]
        self.slots[k] = self.next_use[i][k]
        return hit


def misses_per_token(policy, cap, requests, layers, count_from_request):
    kind, _, arg = policy.partition(":")
    if kind == "lfu":
        pool = Lfu(cap, float(arg or 64), layers)
    elif kind == "lfuda":
        pool = LfuDa(cap, float(arg or 64), layers)
    elif kind == "lru":
        pool = Lru(cap)
    elif kind == "arc":
        pool = Arc(cap)
    elif kind == "opt":
        pool = Opt(cap, requests)
    else:
        sys.exit(f"unknown policy {policy}: lfu:H, lru, arc or opt")
    misses = 0
    for i, ks in enumerate(requests):
        pinned = set(ks)
        for k in ks:
            if not pool.access(k, i, pinned) and i >= count_from_request:
                misses += 1
    return misses / ((len(requests) - count_from_request) / layers)


def make_traces(model, n):
    exe = os.path.join(ROOT, "target", "release", "moestream")
    vocab = json.loads(subprocess.run([exe, "inspect", model, "--json"], check=True, capture_output=True,
                                      text=True).stdout).get("vocab_size", 151936)
    for name, start in (("cold.json", 0), ("other.json", 1 << 20)):
        ids = ",".join(map(str, bench_ids(start, n, vocab)))
        subprocess.run([exe, "run", "--model", model, "--tokens", ids, "-n", "1", "--trace-out", name], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"wrote {name} ({n} tokens)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*")
    ap.add_argument("--slots", default="2597,975", help="pool sizes in experts (2597 and 975: the harness's ½ and "
                    "¼ budgets on the Qwen3-30B-A3B Q4_0 file)")
    ap.add_argument("--policies", default="lfu:64,lfu:16,lru,arc,opt")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="SECOND's prompt, not counted (bench's 8)")
    ap.add_argument("--make-traces", nargs=2, metavar=("MODEL", "N"))
    a = ap.parse_args()
    if a.make_traces:
        make_traces(a.make_traces[0], int(a.make_traces[1]))
        return
    if not 1 <= len(a.traces) <= 2:
        ap.error("one or two traces")
    first, layers = load(a.traces[0])
    if len(a.traces) == 1:
        requests, count_from, what = first, (len(first) // layers // 2) * layers, "second half of one context"
    else:
        second, _ = load(a.traces[1])
        requests, count_from = first + second, len(first) + a.prompt_tokens * layers
        what = "a new context after another"
    print(f"| slots | policy | decode misses per token ({what}) |\n|---|---|---|")
    for cap in map(int, a.slots.split(",")):
        for p in a.policies.split(","):
            print(f"| {cap} | {p} | {misses_per_token(p, cap, requests, layers, count_from):.2f} |")


if __name__ == "__main__":
    main()
