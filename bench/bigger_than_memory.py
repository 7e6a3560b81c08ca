#!/usr/bin/env python3
"""Bigger-than-memory decode: moestream and llama.cpp on the same GGUF inside cgroup v1 memory limits.

    bench/bigger_than_memory.py MODEL.gguf [--limits 8G,4G] [--gen 32] [--threads 2]

For each limit: llama.cpp `llama-bench -p 0 -n GEN --repack 0` (mmap; its default repack copies the model into
anonymous memory and is OOM-killed under a limit) and moestream `run` with an expert budget that fits the limit,
each started cold (page cache dropped) through bench/limited.sh. Also measures the disk (1 MiB O_DIRECT random
reads at queue depth 16) and reports the disk bound `disk_bw / miss_bytes_per_token` for moestream's measured
hit rate. Prints a markdown table. Needs root, cgroup v1, a release build and llama.cpp (scripts/build-llamacpp.sh).
"""
import argparse
import json
import mmap
import os
import random
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MS = os.path.join(ROOT, "target", "release", "moestream")
LIMITED = os.path.join(ROOT, "bench", "limited.sh")


def size_bytes(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def disk_bw(path, seconds=8.0, depth=16, block=1 << 20):
    """1 MiB O_DIRECT random reads at queue depth `depth` (threads), GB/s."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    total = [0]
    lock = threading.Lock()
    stop = time.time() + seconds

    def worker(seed):
        buf = mmap.mmap(-1, block)
        rnd = random.Random(seed)
        n = 0
        while time.time() < stop:
            off = rnd.randrange(0, size - block) // 4096 * 4096
            n += os.preadv(fd, [buf], off)
        with lock:
            total[0] += n

    t0 = time.time()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    os.close(fd)
    return total[0] / (time.time() - t0) / 1e9


def expert_budget(limit_bytes, trunk_bytes, overhead_mib):
    """Expert-cache bytes that fit a memory limit: what the limit leaves after the dense trunk and `overhead_mib`
    (trunk scratch, KV, the binary, page cache). Can be ≤ 0: the limit is too small for this model."""
    return limit_bytes - trunk_bytes - overhead_mib * (1 << 20)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--limits", default="8G,4G")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", default=os.path.join(ROOT, ".cache", "llamacpp", "bin"))
    ap.add_argument("--overhead-mib", type=int, default=768,
                    help="memory kept out of the expert budget for trunk scratch, KV, binary and page cache")
    ap.add_argument("--prefetch", default="none",
                    help="comma-separated moestream --prefetch modes to run at each limit (none, prev, lookahead)")
    ap.add_argument("--skip-llama", action="store_true", help="run moestream only")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each moestream configuration")
    a = ap.parse_args()
    info = json.loads(subprocess.run([MS, "inspect", a.model, "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    trunk = info["bytes_resident"]
    routed = info["bytes_routed_per_token"]
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    bw = disk_bw(a.model)
    print(f"model {a.model}: {info['bytes_total'] / 1e9:.2f} GB, trunk {trunk / 1e9:.2f} GB, routed expert bytes per "
          f"token {routed / 1e6:.0f} MB; disk: {bw:.2f} GB/s (1 MiB O_DIRECT random reads, QD16)")
    print()
    print("| limit | engine | decode tok/s | hit rate | read MB/token | disk bound tok/s | peak cgroup MiB | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for lim in a.limits.split(","):
        lb = size_bytes(lim)
        if not a.skip_llama:
            llama(a, lim)
        budget = expert_budget(lb, trunk, a.overhead_mib)
        for _ in range(a.repeat):
            for pf in a.prefetch.split(","):
                moestream(a, lim, budget, pf, routed, bw)


def llama(a, lim):
    rc, out, err = run([LIMITED, lim, os.path.join(a.llama_bin, "llama-bench"), "-m", a.model, "-p", "0",
                        "-n", str(a.gen), "-t", str(a.threads), "-r", "1", "--repack", "0", "-o", "json"])
    peak = re.search(r"peak usage (\d+) MiB", err)
    if rc == 0:
        ts = json.loads(out)[0]["avg_ts"]
        print(f"| {lim} | llama.cpp mmap --repack 0 | {ts:.3f} | – | – | – | {peak.group(1) if peak else '?'} | |")
    else:
        print(f"| {lim} | llama.cpp mmap --repack 0 | failed (exit {rc}) | | | | {peak.group(1) if peak else '?'} | |")


def moestream(a, lim, budget, pf, routed, bw):
    cmd = [LIMITED, lim, MS, "run", "--model", a.model, "--tokens", "1,2,3,4,5,6,7,8", "-n", str(a.gen + 1),
           "--threads", str(a.threads), "--expert-cache", f"{max(budget, 1) // (1 << 20)}MiB", "--prefetch", pf]
    rc, out, err = run(cmd)
    peak = re.search(r"peak usage (\d+) MiB", err)
    m = re.search(r"decode \d+ tokens: ([0-9.]+) tok/s", err)
    h = re.search(r"hit rate ([0-9.]+)%", err)
    if rc == 0 and m and h:
        ts = float(m.group(1))
        hit = float(h.group(1)) / 100
        miss_bytes = (1 - hit) * routed
        bound = bw * 1e9 / miss_bytes if miss_bytes > 0 else float("inf")
        rd = re.search(r"read ([0-9.]+) MB", err)
        pfl = re.search(r"prefetch \w+: (\d+) experts read ahead \(([0-9.]+) MB\), (\d+) used, (\d+) wasted; "
                        r"waited ([0-9.]+) ms", err)
        note = f"all reads {float(rd.group(1)) / (a.gen + 9):.0f} MB/token" if rd else ""
        if pfl:
            note += (f"; prefetched {pfl.group(1)} ({pfl.group(3)} used, {pfl.group(4)} wasted), "
                     f"waited {pfl.group(5)} ms")
        print(f"| {lim} | moestream --expert-cache {budget >> 20}MiB --prefetch {pf} | {ts:.3f} | {100 * hit:.1f}% | "
              f"{miss_bytes / 1e6:.0f} | {bound:.2f} | {peak.group(1) if peak else '?'} | {note} |")
    else:
        tail = err.strip().splitlines()[-3:]
        print(f"| {lim} | moestream | failed (exit {rc}) | | | | {peak.group(1) if peak else '?'} | {' / '.join(tail)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
