#!/usr/bin/env python3
"""Issue 7's one-shot benchmark: moestream beside llama.cpp on one machine, in one run, written into BENCHMARKS.md.

    sudo bench/harness.py                      # full run on qwen3-30b-a3b (≈45 min + ≈24 min to make Q4_K_M)
    bench/harness.py --dry-run                 # the plan, every command, the time estimate; runs nothing
    bench/harness.py --quick --model /work/models/q30-4l-q4_0.gguf   # smoke test of the whole pipeline

What it does, in order:
1. Builds what is missing: llama.cpp through scripts/build-llamacpp.sh (skipped when llama-bench and
   llama-quantize are already in --llama-bin), and `cargo build --release -p moestream` (unless --no-build).
2. Measures the machine: memory read bandwidth (bench/membw.c, via in_ram.membw) and disk bandwidth (1 MiB
   O_DIRECT random reads at QD16, via bigger_than_memory.disk_bw).
3. Makes the test files, each only when missing or invalid, each after checking free disk space:
   - Q4_0: `moestream synth --preset qwen3-30b-a3b --format gguf-q4_0` (17.2 GB), or --model;
   - Q4_K_M: `llama-quantize --allow-requantize Q4_0 Q4_K_M` (18.6 GB). Requantized from Q4_0 because the disk
     has no room for an f16 source (57 GB); the weights are random anyway, so only the encoding matters here;
   - skewed Q4_0: `moestream synth ... --routing-skew S`, only when this synth has the flag (labelled synthetic);
   - each file moestream reads under a limit (Q4_0, skewed Q4_0) gets a `moestream pack --layout auto` sidecar
     when the disk has room, as a user's would (without one, every miss is packed on the compute cores).
4. Runs the scenarios, llama.cpp and moestream alternating within each repeat (A B A B …), same threads, same
   prompt and generation lengths unless a row says otherwise:
   - in_ram: decode (and a short prefill) on Q4_0 and Q4_K_M; moestream with and without --q8-activations
     (llama.cpp always quantizes activations, so --q8-activations is the comparable row);
   - limit_half / limit_quarter: cgroup v1 limits of ½ and ¼ of the file size (bench/limited.sh, page cache
     dropped), llama.cpp mmap (`--repack 0 -lm mmap`), moestream `--direct-io` with an expert budget that fits;
   - prefill: 512 prompt tokens in RAM and under the ½ limit;
   - skew: the limit scenarios again on the skewed file (both engines; hit rate and routing reuse).
5. Writes the results between `<!-- harness:begin -->` and `<!-- harness:end -->` in BENCHMARKS.md (the rest of
   the file is left alone) and the raw numbers to bench/results/harness-DATE.json.

Run lengths per scenario (chosen so that the full run fits in about 45 minutes on the 2-core development VM, see
`estimate_run`; the one-time Q4_K_M requantization adds about 24 minutes there):
- in_ram: prompt 32, generate --gen (64); llama-bench `-p 32 -n 64`.
- limits: moestream prompt 8, generate 32; llama.cpp decodes 8 tokens at ½ and 4 at ¼ (`-p 0`; at ~0.1 tok/s a
  longer run would take minutes per repeat, and its rate does not change with length).
- prefill: --prompt (512) tokens, then 2 generated (the least `moestream bench` accepts); llama-bench `-p 512 -n 0`.
The prefill scenarios repeat min(--repeat, 2) times (--prefill-repeat): at ~7 tok/s a 512-token moestream bench run
(cold and warm) takes ~2.5 minutes, and three repeats of both prefill scenarios alone would take ~26 minutes.
Every run has a wall-time cap (--run-timeout, default 4× its estimate and at least 3 minutes); a run past its cap
is killed and reported as a timeout.

Two measurements sit beside the runs they judge, because this machine's memory bandwidth drifts by ±15% within
minutes (the same code read 95% and 81% of a bound taken once at the start):
- every in-RAM run gets a bench/membw.c reading (1 GiB, best of 5 passes) right before and right after it; the
  in-RAM bound target is judged on each run against the mean of its two readings ("% of bound beside"), and the
  start-of-run figure is still shown beside it;
- under the ½ limit, moestream's command also runs without the limit and the expert budget right before each
  limited run ("no limit" rows); the ½ target is the median of those pairs' ratios, and the ratio against the
  in-RAM scenario is still shown beside it.

Token input matches llama-bench's: it feeds random ids to every prompt and generation test, fresh ones each
repeat (`std::rand()` runs on), so moestream's runs feed pseudo-random ids too (`bench --decode-input random`;
greedy output of random weights can lock onto one token and repeat its routing). Under the ½ limit the target is
judged on the row whose warm run starts from another prompt than the cold run ("other prompt"; llama-bench's
measured repeats also meet tokens its warmup never saw); the row whose warm run repeats the cold run's tokens
exactly is shown beside it.

moestream's numbers are `moestream bench --json`'s *warm* runs (the model and expert cache the cold run left,
like llama-bench after its warmup run); the cold runs are reported beside them.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bigger_than_memory  # noqa: E402  (bench/ is not a package)
import in_ram  # noqa: E402

LIMITED = os.path.join(ROOT, "bench", "limited.sh")
BEGIN, END = "<!-- harness:begin -->", "<!-- harness:end -->"
SCENARIOS = ("in_ram", "limit_half", "limit_quarter", "prefill", "skew")
LIMIT_FRACTIONS = {"limit_half": 0.5, "limit_quarter": 0.25}
GIB = 1 << 30
MIB = 1 << 20

# The preset's facts, for planning before the Q4_0 file exists (`moestream inspect` of the synth file).
PRESET_FACTS = {
    "bytes_file": 17221723872, "bytes_total": 17218297856, "bytes_resident": 910843904,
    "bytes_experts": 16307453952, "bytes_routed_per_token": 1019215872, "bytes_per_token": 1755e6,
    "params_total": 30532122624, "layers": 48, "moe_layers": 48, "experts_per_token": 8,
    "bytes_per_expert": 2654208,
}
KQUANT_SIZE_RATIO = 17691.34 / 16420.65  # llama-quantize --dry-run: Q4_0 → Q4_K_M size of qwen3-30b-a3b

# Rates measured on the development VM (2 threads) on the 30B Q4_0 file, for the time estimate only; they are
# scaled by weight bytes per token for other files and by threads/2 for other thread counts.
REF = {
    "bytes_per_token": 1755e6,
    "llama_decode": 6.5, "llama_prefill": 18.0, "ms_decode": 4.5, "ms_prefill": 7.0,
    "llama_limit": {0.5: 0.14, 0.25: 0.06}, "ms_limit_decode": 2.6,
    "load_gbps": 1.2, "disk_gbps": 1.0, "synth_gbps": 0.25,
    "quantize_cpu_s_per_gparam": 93.0,  # llama-quantize Q4_0 → Q4_K_M: 290 CPU-s for the 3.1 B-param 4-layer file
}


# ---------------------------------------------------------------------------------------------------------------
# Options and lengths


def lengths(a):
    """Prompt and generation lengths per scenario (see the module doc for why)."""
    if a.quick:
        return {"decode_prompt": 8, "decode_gen": a.gen or 8, "limit_prompt": 4, "limit_gen": 6,
                "llama_limit_gen": {0.5: 4, 0.25: 2}, "prefill_prompt": a.prompt or 64}
    return {"decode_prompt": 32, "decode_gen": a.gen or 64, "limit_prompt": 8, "limit_gen": 32,
            "llama_limit_gen": {0.5: 8, 0.25: 4}, "prefill_prompt": a.prompt or 512}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default="/work/models", help="where test files are found and written")
    ap.add_argument("--model", help="use this Q4_0 GGUF as the base file instead of the qwen3-30b-a3b synth one")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines (all cores)")
    ap.add_argument("--repeat", type=int, help="alternating repeats per configuration (3; --quick: 1)")
    ap.add_argument("--prefill-repeat", type=int, help="repeats of the two prefill scenarios (min(--repeat, 2): "
                    "a 512-token prefill run takes minutes, see the module doc)")
    ap.add_argument("--prompt", type=int, help="prefill scenario prompt length (512; --quick: 64)")
    ap.add_argument("--gen", type=int, help="in-RAM decode length (64; --quick: 8)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--no-kquant", action="store_true", help="in RAM, run the Q4_0 file only: no Q4_K_M file is "
                    "made or used (llama-quantize's requantization took ~80 min on a 2-core AVX2 VM); its targets "
                    "then read 'not measured'")
    ap.add_argument("--no-sidecar", action="store_true", help="do not make or require the base file's packed "
                    "sidecar (`moestream pack --layout packed`); an existing one is still used")
    ap.add_argument("--routing-skew", type=float, default=1.0, help="synth --routing-skew value for the skew file")
    ap.add_argument("--overhead-mib", type=int, help="memory under a limit kept out of moestream's expert budget "
                    "(768; --quick: 160)")
    ap.add_argument("--run-timeout", type=float, help="wall-time cap of every run, seconds (default: 4× its "
                    "estimate, at least 180 s; --quick: at least 60 s)")
    keep = ap.add_mutually_exclusive_group()
    keep.add_argument("--keep", action="store_true", help="keep the files this run generates (a later run reuses "
                      "them; on a 25 GB disk the skew file then has no room beside Q4_K_M)")
    keep.add_argument("--delete", action="store_true", help="delete each generated file after its last scenario "
                      "(the default)")
    ap.add_argument("--delete-found", action="store_true", help="also delete the derived files (Q4_K_M, skew) "
                    "found on disk after their last scenario, to make room for the next one (never the Q4_0 file)")
    ap.add_argument("--quick", action="store_true", help="smoke test: small lengths, repeat 1, 4-layer model")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, the commands and the time estimate")
    ap.add_argument("--render", metavar="RAW.json", help="only rewrite the BENCHMARKS.md section from a raw results "
                    "file of an earlier run (after a change to the report code)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--moestream", default=os.path.join(ROOT, "target", "release", "moestream"))
    ap.add_argument("--llama-bin", default=os.path.join(ROOT, ".cache", "llamacpp", "bin"))
    ap.add_argument("--benchmarks-md", help="file to write the section into (BENCHMARKS.md; --quick: "
                    "bench/results/quick-BENCHMARKS.md, so a smoke test never touches BENCHMARKS.md)")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args(argv)
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in a.scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {', '.join(bad)}; choose from {', '.join(SCENARIOS)}")
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.prefill_repeat = a.prefill_repeat or min(a.repeat, 2)
    a.overhead_mib = a.overhead_mib if a.overhead_mib is not None else (160 if a.quick else 768)
    if a.benchmarks_md is None:
        a.benchmarks_md = (os.path.join(a.results_dir, "quick-BENCHMARKS.md") if a.quick
                           else os.path.join(ROOT, "BENCHMARKS.md"))
    if a.quick and not a.model:
        a.model = os.path.join(a.models_dir, "q30-4l-q4_0.gguf")
    return a


# ---------------------------------------------------------------------------------------------------------------
# Processes


def run_capped(cmd, timeout):
    """Run `cmd` in its own process group, killed (group and all) after `timeout` seconds.
    Returns (rc, stdout, stderr, wall seconds, timed_out)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err, time.time() - t0, False
    except KeyboardInterrupt:  # the child has its own session, so the terminal's ^C did not reach it
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = p.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                out, err = "", ""
        # limited.sh names its cgroup after its own pid; a killed script leaves the (empty) group behind.
        cg = f"/sys/fs/cgroup/memory/moestream-bench-{p.pid}"
        if os.path.isdir(cg):
            try:
                os.rmdir(cg)
            except OSError:
                pass
        return None, out or "", err or "", time.time() - t0, True


def sh(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def q(cmd):
    return " ".join(shlex.quote(str(c)) for c in cmd)


def short(path):
    """A command for the report: binaries and bench scripts relative to the repository."""
    s, prefix = str(path), os.path.join(ROOT, "")
    return s[len(prefix):] if s.startswith(prefix) else s


# ---------------------------------------------------------------------------------------------------------------
# Files


class ModelFile:
    """One GGUF the scenarios use: where it is, how to make it, and whether this run made it."""

    def __init__(self, label, path, make=None, est_bytes=0, note=""):
        self.label, self.path, self.make, self.est_bytes, self.note = label, path, make, est_bytes, note
        self.generated = False
        self.facts = None
        self.skip_reason = None

    def exists(self):
        return os.path.isfile(self.path)


def inspect(ms, path):
    """Facts about a GGUF from `moestream inspect` (None when it is missing or does not open)."""
    if not os.path.isfile(path):
        return None
    try:
        info = json.loads(sh([ms, "inspect", path, "--json", "--tensors"]))
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return None
    embd = next((t["bytes"] for t in info["tensors"] if t["name"] == "token_embd.weight"), 0)
    tied = not any(t["name"] == "output.weight" for t in info["tensors"])
    info.pop("tensors")
    info["bytes_file"] = os.path.getsize(path)
    # Same arithmetic as in_ram.bytes_per_token: the trunk but the embedding table, the top-k experts per layer.
    info["bytes_per_token"] = info["bytes_resident"] - (0 if tied else embd) + info["bytes_routed_per_token"]
    return info


def synth_has_skew(ms):
    try:
        return "--routing-skew" in sh([ms, "synth", "--help"])
    except (OSError, subprocess.CalledProcessError):
        return False


def kquant_size(llama_bin, src, fallback):
    """Q4_K_M size from `llama-quantize --dry-run` (reads the header only), else the 30B ratio."""
    exe = os.path.join(llama_bin, "llama-quantize")
    if os.path.isfile(src) and os.path.isfile(exe):
        p = subprocess.run([exe, "--dry-run", "--allow-requantize", src, "Q4_K_M"], capture_output=True, text=True)
        m = re.search(r"quant size\s*=\s*([0-9.]+) MiB", p.stdout + p.stderr)
        if m:
            return int(float(m.group(1)) * MIB)
    return int(fallback * KQUANT_SIZE_RATIO)


def plan_files(a, ms, llama_bin):
    """The base Q4_0 file, its Q4_K_M requantization and (when synth can) the routing-skew file."""
    if a.model:
        base_path = os.path.abspath(a.model)
        stem = re.sub(r"[-_.]q4_0$", "", os.path.splitext(os.path.basename(base_path))[0], flags=re.I)
    else:
        base_path = os.path.join(a.models_dir, "qwen3-30b-a3b-q4_0.gguf")
        stem = "qwen3-30b-a3b"
    facts = inspect(ms, base_path)
    layers = facts["layers"] if facts else PRESET_FACTS["layers"]
    layer_args = [] if layers == PRESET_FACTS["layers"] else ["--layers", str(layers)]
    base_bytes = facts["bytes_file"] if facts else PRESET_FACTS["bytes_file"]

    def synth(out, extra):
        return [ms, "synth", "--preset", "qwen3-30b-a3b", "--format", "gguf-q4_0", *layer_args, *extra,
                "--out", out, "--quiet"]

    base = ModelFile("Q4_0", base_path, None if facts or a.model else lambda out: [synth(out, [])], base_bytes,
                    "given with --model" if a.model else "moestream synth, random weights")
    base.facts = facts
    kq_path = os.path.join(a.models_dir, f"{stem}-q4_k_m.gguf")
    kq = ModelFile("Q4_K_M", kq_path,
                  lambda out: [[os.path.join(llama_bin, "llama-quantize"), "--allow-requantize", base_path, out,
                                "Q4_K_M", str(a.threads)]],
                  kquant_size(llama_bin, base_path, base_bytes),
                  "llama-quantize --allow-requantize from the Q4_0 file (no disk room for an f16 source)")
    kq.facts = inspect(ms, kq_path)
    if kq.facts and not any(t.startswith("Q4_K") for t in kq.facts.get("bytes_by_type", {})):
        kq.facts = None  # not a K-quant file: remake it
    files = {"Q4_0": base, "Q4_K_M": kq}
    if "skew" in a.scenarios:
        s = f"{a.routing_skew:g}"
        sk = ModelFile(f"Q4_0 skew {s}", os.path.join(a.models_dir, f"{stem}-q4_0-skew{s}.gguf"),
                      lambda out: [synth(out, ["--routing-skew", s])], base_bytes,
                      f"moestream synth --routing-skew {s}: synthetic routing skew, random weights")
        sk.facts = inspect(ms, sk.path)
        if not synth_has_skew(ms):
            sk.skip_reason = "this moestream's synth has no --routing-skew flag"
        files["skew"] = sk
    return files


def facts_of(f, files):
    """Facts for planning: the file's own, else the base file's (scaled for Q4_K_M), else the preset's."""
    if f.facts:
        return f.facts
    base = files["Q4_0"].facts or dict(PRESET_FACTS)
    if f.label == "Q4_K_M":
        b = dict(base)
        for k in ("bytes_file", "bytes_total", "bytes_resident", "bytes_experts", "bytes_routed_per_token",
                  "bytes_per_token"):
            b[k] = base[k] * KQUANT_SIZE_RATIO
        return b
    return base


# ---------------------------------------------------------------------------------------------------------------
# The plan


class Run:
    def __init__(self, scenario, case, engine, variant, file, limit, prompt, gen, cmd, est_s):
        self.scenario, self.case, self.engine, self.variant = scenario, case, engine, variant
        self.file, self.limit, self.prompt, self.gen, self.cmd, self.est_s = file, limit, prompt, gen, cmd, est_s


def estimate_run(engine, facts, threads, prompt, gen, limit_frac=None, prefill_only=False):
    """Seconds one run takes on the development VM, scaled (see REF)."""
    scale = REF["bytes_per_token"] / facts["bytes_per_token"] * threads / 2
    load = facts["bytes_total"] / (REF["load_gbps"] * 1e9)
    if engine == "llama.cpp":
        if limit_frac is None:
            # load, warmup prompt + prompt (llama-bench warms up with the whole prompt), warmup token + tokens.
            return load + 2 * prompt / (REF["llama_prefill"] * scale) + (gen + 1) / (REF["llama_decode"] * scale)
        if prefill_only:  # each pass pages the whole file in through the limit
            return 2 * (2 * load + prompt / (REF["llama_prefill"] * scale))
        return 5 + (gen + 1) / (REF["llama_limit"][limit_frac] * scale)
    # moestream bench --repeat 1: a cold and a warm run.
    if limit_frac is None:
        return load + 2 * (prompt / (REF["ms_prefill"] * scale) + gen / (REF["ms_decode"] * scale))
    trunk = facts["bytes_resident"] / (REF["load_gbps"] * 1e9)
    reads = min(prompt * facts["bytes_routed_per_token"], facts["bytes_experts"]) / (REF["disk_gbps"] * 1e9)
    decode = gen / (REF["ms_limit_decode"] * scale) if not prefill_only else 0
    return trunk + 2 * (reads + prompt / (REF["ms_prefill"] * scale) + decode)


def moestream_bench_cmd(ms, path, prompt, gen, threads, q8, budget_mib=None):
    cmd = [ms, "bench", "--model", path, "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--repeat", "1",
           "--json", "--threads", str(threads), "--ctx", str(prompt + gen), "--decode-input", "random"]
    if budget_mib is not None:
        cmd += ["--direct-io", "--expert-cache", f"{budget_mib}MiB"]
    if q8:
        cmd.append("--q8-activations")
    return cmd


def llama_bench_cmd(llama_bin, path, prompt, gen, threads, mmap=False):
    cmd = [os.path.join(llama_bin, "llama-bench"), "-m", path, "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", "1", "-o", "json"]
    if mmap:
        cmd += ["--repack", "0", "-lm", "mmap"]
    return cmd


def limit_budget(facts, limit, overhead_mib):
    """moestream's expert budget (MiB) under `limit` bytes, or (None, why) when trunk + top-k slots do not fit."""
    budget = bigger_than_memory.expert_budget(limit, facts["bytes_resident"], overhead_mib)
    least = facts["experts_per_token"] * facts["bytes_per_expert"] * facts["moe_layers"]
    if budget < least:
        return None, (f"does not fit: {limit / GIB:.2f} GiB − trunk {facts['bytes_resident'] / GIB:.2f} GiB − "
                      f"overhead {overhead_mib} MiB leaves {budget / MIB:.0f} MiB, less than the "
                      f"{least / MIB:.0f} MiB of top-k slots per layer")
    return budget // MIB, None


def plan(a, files, ms, llama_bin):
    """Steps in order: ('make', file), ('runs', [Run per repeat…]), ('delete', file), ('note', text)."""
    L = lengths(a)
    T = a.threads
    steps = []

    def block(scenario, case_runs):
        """case_runs: list of (case, engine, variant, file, limit, prompt, gen, cmd, est); alternated per repeat."""
        for r in range(a.prefill_repeat if scenario.startswith("prefill") else a.repeat):
            for c in case_runs:
                steps.append(("run", Run(scenario, *c[:8], c[8]), r))

    base, kq = files["Q4_0"], files["Q4_K_M"]
    if base.make:
        steps.append(("make", base))

    def in_ram_cases(f):
        fa = facts_of(f, files)
        P, G = L["decode_prompt"], L["decode_gen"]
        out = [(f"{f.label} llama.cpp", "llama.cpp", None, f, None, P, G,
                llama_bench_cmd(llama_bin, f.path, P, G, T), estimate_run("llama.cpp", fa, T, P, G))]
        for q8 in (False, True):
            v = "q8" if q8 else "f32"
            out.append((f"{f.label} moestream {v}", "moestream", v, f, None, P, G,
                        moestream_bench_cmd(ms, f.path, P, G, T, q8), estimate_run("moestream", fa, T, P, G)))
        return out

    def limit_cases(scenario, f, frac, prefill=False, llama=True):
        fa = facts_of(f, files)
        limit = int(fa["bytes_file"] * frac)
        out = []
        if prefill:
            P, G, GL, PL = L["prefill_prompt"], 2, 0, L["prefill_prompt"]
        else:
            P, G, GL, PL = L["limit_prompt"], L["limit_gen"], L["llama_limit_gen"][frac], 0
        if llama:
            out.append((f"{f.label} llama.cpp", "llama.cpp", None, f, limit, PL, GL,
                        [LIMITED, str(limit), *llama_bench_cmd(llama_bin, f.path, PL, GL, T, mmap=True)],
                        estimate_run("llama.cpp", fa, T, PL, GL, frac, prefill)))
        budget, why = limit_budget(fa, limit, a.overhead_mib)
        if budget is None:
            steps.append(("note", f"{scenario} on {f.label}: moestream not run, {why}"))
        else:
            if scenario in ("limit_half", "skew_half"):
                # The warm run starts on another prompt than the cold run, so the cache was warmed by other work
                # (llama-bench's repeats, too, meet tokens its warmup never saw); under ½ it is the verdict's row.
                # The plain row's warm run repeats the cold run's tokens exactly, and finds their experts cached if
                # they fit.
                out.append((f"{f.label} moestream q8{OTHER}", "moestream", "q8", f, limit, P, G,
                            [LIMITED, str(limit), *moestream_bench_cmd(ms, f.path, P, G, T, True, budget),
                             "--warm-prompt", "other"],
                            estimate_run("moestream", fa, T, P, G, frac, prefill)))
            if scenario == "limit_half":
                # The ½ target is a ratio to our own in-RAM decode: the same command without the limit, run right
                # before each limited one, makes each repeat a pair measured minutes apart (see `paired_ratio`).
                out.append((f"{f.label} moestream q8{PAIR}", "moestream", "q8", f, None, P, G,
                            moestream_bench_cmd(ms, f.path, P, G, T, True), estimate_run("moestream", fa, T, P, G)))
            out.append((f"{f.label} moestream q8", "moestream", "q8", f, limit, P, G,
                        [LIMITED, str(limit), *moestream_bench_cmd(ms, f.path, P, G, T, True, budget)],
                        estimate_run("moestream", fa, T, P, G, frac, prefill)))
        return out

    if "in_ram" in a.scenarios:
        block("in_ram", in_ram_cases(base))
    for sc in ("limit_half", "limit_quarter"):
        if sc in a.scenarios:
            block(sc, limit_cases(sc, base, LIMIT_FRACTIONS[sc]))
    if "prefill" in a.scenarios:
        fa = facts_of(base, files)
        P = L["prefill_prompt"]
        block("prefill_in_ram", [
            ("Q4_0 llama.cpp", "llama.cpp", None, base, None, P, 0, llama_bench_cmd(llama_bin, base.path, P, 0, T),
             estimate_run("llama.cpp", fa, T, P, 0)),
            ("Q4_0 moestream q8", "moestream", "q8", base, None, P, 2,
             moestream_bench_cmd(ms, base.path, P, 2, T, True), estimate_run("moestream", fa, T, P, 2))])
        block("prefill_half", limit_cases("prefill_half", base, 0.5, prefill=True))
    # Q4_K_M last among the in-RAM work: it is made, used and (by default) deleted before the skew file needs room.
    if "in_ram" in a.scenarios and getattr(a, "no_kquant", False):
        steps.append(("note", "in_ram on Q4_K_M: not run (--no-kquant)"))
    elif "in_ram" in a.scenarios:
        if kq.facts is None:
            steps.append(("make", kq))
        else:
            kq.make = None
        block("in_ram", in_ram_cases(kq))
        steps.append(("delete", kq))
    if "skew" in files:
        sk = files["skew"]
        if sk.skip_reason:
            steps.append(("note", f"skew: not run, {sk.skip_reason}"))
        else:
            if sk.facts is None:
                steps.append(("make", sk))
            else:
                sk.make = None
            if not a.no_sidecar:
                steps.append(("sidecar", sk))
            for sc, frac in (("skew_half", 0.5), ("skew_quarter", 0.25)):
                block(sc, limit_cases(sc, sk, frac))
            steps.append(("delete", sk))
    if base.make:
        steps.append(("delete", base))
    return steps


def make_estimate(f, files, threads):
    fa = facts_of(f, files)
    if f.label == "Q4_K_M":
        return fa.get("params_total", PRESET_FACTS["params_total"]) / 1e9 * REF["quantize_cpu_s_per_gparam"] / threads
    return f.est_bytes / (REF["synth_gbps"] * 1e9)


def timeout_for(a, est):
    if a.run_timeout:
        return a.run_timeout
    return max(60 if a.quick else 180, 4 * est)


def print_plan(a, steps, files, out=sys.stdout):
    total = 30.0  # membw + disk bandwidth
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"plan ({'quick smoke test' if a.quick else 'full run'}; threads {a.threads}, repeat {a.repeat}, "
      f"scenarios {','.join(a.scenarios)}):")
    p("  measure: memory bandwidth (bench/membw.c) and disk bandwidth (1 MiB O_DIRECT random reads, QD16) ~30 s")
    made_s = 0.0
    for st in steps:
        kind = st[0]
        if kind == "make":
            f = st[1]
            est = make_estimate(f, files, a.threads)
            made_s += est
            total += est
            p(f"  make {f.label}: {f.path} (~{f.est_bytes / 1e9:.1f} GB, ~{est / 60:.0f} min; {f.note})")
            d = os.path.dirname(f.path)
            free = shutil.disk_usage(d).free if os.path.isdir(d) else None
            if free is not None and free < f.est_bytes + GIB:
                p(f"      ! {free / 1e9:.1f} GB free on {d} now, it needs ~{f.est_bytes / 1e9:.1f} GB + 1 GiB: unless "
                  f"files made earlier in the run are deleted first, it will be refused and its runs skipped")
            for c in f.make(f.path + ".partial"):
                p(f"      {q(c)}")
        elif kind == "sidecar":
            f = st[1]
            total += 60.0
            p(f"  pack sidecar of {f.label} when missing or stale (~1 min, ~{f.est_bytes / 1e9:.1f} GB; skipped if the "
              f"disk has no room): {q([a.moestream, 'pack', f.path, '--layout', 'auto', '--quiet'])}")
        elif kind == "delete":
            f = st[1]
            p(f"  delete {f.label} after its last run, if this run made it (or --delete-found) and --keep is not given")
        elif kind == "note":
            p(f"  note: {st[1]}")
        else:
            r, rep = st[1], st[2]
            total += r.est_s
            if rep == 0:
                lim = f" under {r.limit / GIB:.2f} GiB" if r.limit else ""
                n = a.prefill_repeat if r.scenario.startswith("prefill") else a.repeat
                p(f"  {r.scenario} {r.case}{lim}: ~{r.est_s:.0f} s × {n} (cap {timeout_for(a, r.est_s):.0f} s)")
                p(f"      {q(r.cmd)}")
    p()
    p(f"estimated wall time: ~{total / 60:.0f} min (of which ~{made_s / 60:.0f} min making files), plus any build; "
      f"estimates use rates measured on the 2-core development VM (REF in bench/harness.py)")
    return total


# ---------------------------------------------------------------------------------------------------------------
# Parsing results


def parse_llama(stdout):
    rows = json.loads(stdout)
    out = {}
    for r in rows:
        if r.get("n_gen", 0) > 0:
            out["decode_tok_s"] = float(r["avg_ts"])
        elif r.get("n_prompt", 0) > 0:
            out["prefill_tok_s"] = float(r["avg_ts"])
    return out


def find_key(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            v = obj[key]
            return v.get("median") if isinstance(v, dict) else v
        for v in obj.values():
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def parse_moestream(stdout):
    j = json.loads(stdout)
    out = {"page_cache_dropped": j.get("page_cache_dropped")}
    for phase in ("cold", "warm"):
        s = j[phase]
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "hit_rate", "read_bytes_per_token",
                  "read_latency_p50_us", "read_latency_p99_us"):
            out[f"{phase}_{k}"] = s[k]["median"]
        # Decode-only miss and stall figures (moestream bench ≥ c5e20ce); absent from older binaries' JSON.
        for k in ("decode_misses_per_token", "decode_stall_ms_per_token"):
            if isinstance(s.get(k), dict):
                out[f"{phase}_{k}"] = s[k]["median"]
        reuse = find_key(s, "routing_reuse")
        if reuse is not None:
            out[f"{phase}_routing_reuse"] = reuse
    reuse = find_key({k: v for k, v in j.items() if k not in ("cold", "warm")}, "routing_reuse")
    if reuse is not None:
        out["routing_reuse"] = reuse
    return out


def execute_run(a, r, rep):
    to = timeout_for(a, r.est_s)
    lim = f" under {r.limit / GIB:.2f} GiB" if r.limit else ""
    n = a.prefill_repeat if r.scenario.startswith("prefill") else a.repeat
    print(f"[{time.strftime('%H:%M:%S')}] {r.scenario} {r.case}{lim} (repeat {rep + 1}/{n}, ~{r.est_s:.0f} s, "
          f"cap {to:.0f} s)", flush=True)
    # In RAM the bound is memory bandwidth, which drifts here by ±15% within minutes (other tenants): measure it
    # right before and right after each run, so the run can be held against the bandwidth it actually had.
    beside = [in_ram.membw(a.threads, gib=1, runs=1)] if r.scenario == "in_ram" else []
    rc, out, err, wall, timed_out = run_capped(r.cmd, to)
    if beside:
        beside.append(in_ram.membw(a.threads, gib=1, runs=1))
    rec = {"scenario": r.scenario, "case": r.case, "engine": r.engine, "variant": r.variant, "file": r.file.label,
           "path": r.file.path, "limit_bytes": r.limit, "prompt": r.prompt, "gen": r.gen, "cmd": [str(c) for c in r.cmd],
           "repeat_index": rep, "rc": rc, "timed_out": timed_out, "wall_s": round(wall, 2), "timeout_s": to}
    if beside:
        rec["membw_beside_gbps"] = beside
    m = re.search(r"peak usage (\d+) MiB, failcnt (\d+)", err)
    if m:
        rec["cgroup_peak_mib"], rec["cgroup_failcnt"] = int(m.group(1)), int(m.group(2))
    if timed_out:
        rec["error"] = f"timeout after {to:.0f} s"
    elif rc != 0:
        tail = " / ".join(err.strip().splitlines()[-3:])
        rec["error"] = f"exit {rc}" + (" (killed: out of memory under the limit?)" if rc in (137, -9) else "") + \
            (f": {tail}" if tail else "")
    else:
        try:
            rec["result"] = parse_llama(out) if r.engine == "llama.cpp" else parse_moestream(out)
            rec["raw"] = json.loads(out)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            rec["error"] = f"unparsable output ({e})"
    shown = ("prefill_tok_s", "decode_tok_s", "warm_prefill_tok_s", "warm_decode_tok_s", "warm_hit_rate",
             "warm_routing_reuse")
    print("    " + (rec.get("error") or ", ".join(f"{k} {rec['result'][k]:.4g}" for k in shown
                                                  if rec["result"].get(k) is not None)), flush=True)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# Summaries, bounds and targets (pure functions of the raw JSON, so they can be tested with canned results)


def cases(results):
    """(scenario, case) → list of run records, in run order."""
    out = {}
    for r in results["runs"]:
        out.setdefault((r["scenario"], r["case"]), []).append(r)
    return out


def stat(runs, key):
    """(median, min, max, n, failures) of `key` over the runs that produced it."""
    xs = [r["result"][key] for r in runs if "result" in r and r["result"].get(key) is not None]
    fails = [r["error"] for r in runs if "error" in r]
    if not xs:
        return None, None, None, 0, fails
    return statistics.median(xs), min(xs), max(xs), len(xs), fails


def headline_key(engine, what):
    """The number a row stands for: llama-bench's, or moestream bench's warm run."""
    return f"{what}_tok_s" if engine == "llama.cpp" else f"warm_{what}_tok_s"


def median_of(results, scenario, case, key):
    runs = cases(results).get((scenario, case))
    return stat(runs, key)[0] if runs else None


def scenario_what(scenario):
    return "prefill" if scenario.startswith("prefill") else "decode"


def bound(results, scenario, case):
    """(tok/s, how) the physical bound of one moestream row, or (None, why not)."""
    m = results["machine"]
    runs = cases(results).get((scenario, case), [])
    if not runs:
        return None, ""
    f = results["files"].get(runs[0]["file"], {})
    if scenario == "in_ram":
        if not f.get("bytes_per_token") or not m.get("membw_gbps"):
            return None, "–"
        return m["membw_gbps"] * 1e9 / f["bytes_per_token"], "memory bandwidth / weight bytes per token"
    if scenario == "prefill_in_ram":
        if not f.get("bytes_total") or not m.get("membw_gbps"):
            return None, "–"
        P = runs[0]["prompt"]
        return (m["membw_gbps"] * 1e9 * P / f["bytes_total"],
                "memory bandwidth, all weights read once per prompt (prefill is compute-bound: far out of reach)")
    if runs[0]["engine"] != "moestream" or not m.get("disk_gbps") or runs[0].get("limit_bytes") is None:
        return None, "–"
    if scenario == "prefill_half":
        rb = stat(runs, "warm_read_bytes_per_token")[0]
        if not rb:
            return None, "–"
        return m["disk_gbps"] * 1e9 / rb, "disk bandwidth / bytes read per token"
    hit = stat(runs, "warm_hit_rate")[0]
    if hit is None or not f.get("bytes_routed_per_token"):
        return None, "–"
    miss = (1 - hit) * f["bytes_routed_per_token"]
    if miss <= 0:
        return None, "–"  # no misses: the disk does not bound the run (compute does)
    return m["disk_gbps"] * 1e9 / miss, "disk bandwidth / ((1 − hit rate) · routed bytes per token)"


def beside_bound(results, scenario, case):
    """(median fraction of the bound, median GB/s) with each in-RAM run held against the memory bandwidth measured
    right before and after it (`membw_beside_gbps`), or (None, None) when the runs carry no such measurement."""
    runs = cases(results).get((scenario, case), [])
    if not runs or scenario != "in_ram":
        return None, None
    bpt = results["files"].get(runs[0]["file"], {}).get("bytes_per_token")
    key = headline_key(runs[0]["engine"], "decode")
    fracs, bws = [], []
    for r in runs:
        v, bw = r.get("result", {}).get(key), r.get("membw_beside_gbps")
        if v is None or not bw or not bpt:
            continue
        bw = statistics.mean(bw)
        fracs.append(v * bpt / (bw * 1e9))
        bws.append(bw)
    if not fracs:
        return None, None
    return statistics.median(fracs), statistics.median(bws)


PAIR = " no limit"
OTHER = " other prompt"


def paired_ratio(results, scenario, case, free_case=None):
    """(median of limited / unlimited warm decode over repeats, pairs) where the scenario also ran `case` without
    its limit (`free_case`, by default `case + PAIR`: the same command minus the limit and the expert budget) in
    each repeat; (None, 0) otherwise. Pairs are matched by repeat index, so each ratio compares two runs minutes
    apart."""
    by = cases(results)
    lim, free = by.get((scenario, case), []), by.get((scenario, free_case or case + PAIR), [])
    key = headline_key("moestream", "decode")
    free_at = {r["repeat_index"]: r["result"][key] for r in free
               if r.get("result", {}).get(key) and "repeat_index" in r}
    ratios = [r["result"][key] / free_at[r["repeat_index"]] for r in lim
              if r.get("result", {}).get(key) is not None and r.get("repeat_index") in free_at]
    return (statistics.median(ratios), len(ratios)) if ratios else (None, 0)


def fmt(x, prec=2):
    return "–" if x is None else f"{x:.{prec}f}"


def fmt_spread(runs, key, prec=2, scale=1.0):
    med, lo, hi, n, fails = stat(runs, key)
    if med is None:
        return "; ".join(sorted(set(fails))) or "–"
    s = f"{med * scale:.{prec}f}" + (f" [{lo * scale:.{prec}f}–{hi * scale:.{prec}f}]" if n > 1 else "")
    if fails:
        s += f" ({len(fails)} failed: {fails[0]})"
    return s


SCENARIO_TITLES = {
    "in_ram": "In RAM: decode (and a short prefill)",
    "limit_half": "Bigger than memory: ½ of the file size",
    "limit_quarter": "Bigger than memory: ¼ of the file size",
    "prefill_in_ram": "Prefill in RAM",
    "prefill_half": "Prefill under ½ of the file size",
    "skew_half": "Synthetic routing skew, ½ of the file size",
    "skew_quarter": "Synthetic routing skew, ¼ of the file size",
}


def peer_case(case):
    """The llama.cpp case on the same file: "Q4_0 skew 1 moestream q8" → "Q4_0 skew 1 llama.cpp"."""
    return re.sub(r" (moestream.*|llama\.cpp)$", "", case) + " llama.cpp"


def scenario_table(results, scenario):
    cs = [(c, runs) for (s, c), runs in cases(results).items() if s == scenario]
    if not cs:
        return ""
    what = scenario_what(scenario)
    limited = scenario != "in_ram" and scenario != "prefill_in_ram"
    lines = [f"#### {SCENARIO_TITLES.get(scenario, scenario)}", ""]
    r0 = cs[0][1][0]
    lim = f", limit {r0['limit_bytes'] / GIB:.2f} GiB" if r0.get("limit_bytes") else ""
    n = len(cs[0][1])
    lines.append(f"Median [min–max] over {n} run{'s' if n != 1 else ''}{lim}.")
    lines.append("")
    head = ["file, engine", "prompt / gen", f"{what} tok/s (warm)", "cold", "vs llama.cpp", "bound tok/s",
            "% of bound"]
    if limited:
        head += ["hit rate (warm)", "read MB/token (warm)", "decode misses/token (warm)",
                 "decode read stall ms/token (warm)"]
    elif what == "decode":
        head.append("prefill tok/s (warm)")
    if scenario == "in_ram":
        head.append("% of bound beside (GB/s)")
    head.append("routing reuse (warm)")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for case, runs in cs:
        eng = runs[0]["engine"]
        key = headline_key(eng, what)
        med = stat(runs, key)[0]
        peer = peer_case(case)
        pm = median_of(results, scenario, peer, headline_key("llama.cpp", what)) if peer else None
        ratio = f"{med / pm:.2f}×" if med is not None and pm else "–"
        # A pair row (the limited command run without its limit) has no peer; `bound` gives it no disk bound, as
        # it gives none to llama.cpp under a limit (that needs moestream's hit rate).
        if limited and runs[0].get("limit_bytes") is None:
            ratio = "–"
        b, _ = bound(results, scenario, case)
        pct = f"{100 * med / b:.0f}%" if med is not None and b else "–"
        cold = fmt_spread(runs, f"cold_{what}_tok_s") if eng == "moestream" else "–"
        row = [case, f"{runs[0]['prompt']} / {runs[0]['gen']}", fmt_spread(runs, key, 3 if limited else 2), cold,
               ratio, fmt(b), pct]
        if limited:
            row += ([fmt_spread(runs, "warm_hit_rate", 1, 100) + ("%" if stat(runs, "warm_hit_rate")[0] is not None
                                                                    else ""),
                     fmt_spread(runs, "warm_read_bytes_per_token", 0, 1e-6),
                     fmt_spread(runs, "warm_decode_misses_per_token", 2),
                     fmt_spread(runs, "warm_decode_stall_ms_per_token", 1)] if eng == "moestream" else ["–"] * 4)
        elif what == "decode":
            row.append(fmt_spread(runs, headline_key(eng, "prefill")))
        if scenario == "in_ram":
            frac, bw = beside_bound(results, scenario, case)
            row.append(f"{100 * frac:.0f}% ({bw:.1f})" if frac is not None else "–")
        if eng == "moestream":
            reuse = stat(runs, "warm_routing_reuse")[0] or stat(runs, "routing_reuse")[0]
            row.append(f"{100 * reuse:.1f}%" if reuse is not None else "not reported")
        else:
            row.append("–")
        lines.append("| " + " | ".join(row) + " |")
    hows = [bound(results, scenario, c)[1] for c, r in cs if r[0]["engine"] == "moestream"]
    how = next((h for h in hows if h and h != "–"), "")
    if how:
        lines += ["", f"Bound: {how}."]
    if scenario == "in_ram" and any(beside_bound(results, scenario, c)[0] is not None for c, _ in cs):
        lines += ["", "\"% of bound beside\": each run against the mean of two bench/membw.c readings (1 GiB, best "
                  "of 5 passes) taken right before and right after it; median over the runs, median bandwidth in "
                  "brackets. \"% of bound\" uses the one reading at the start of the harness run."]
    if any(c.endswith(OTHER) for c, _ in cs):
        lines += ["", f"\"{OTHER.strip()}\" rows: the warm run decodes from another prompt than the cold run before "
                  "it (`bench --warm-prompt other`), so the expert cache holds another prompt's experts; other rows' "
                  "warm runs repeat the cold run's prompt."]
    if any(c.endswith(PAIR) for c, _ in cs):
        lines += ["", f"\"{PAIR.strip()}\" rows: the moestream command of the row below without the limit and the "
                  "expert budget (the whole file in RAM), run right before it in every repeat."]
    return "\n".join(lines) + "\n"


TARGETS = [
    # (target, scenario, moestream case, compare to, threshold)
    ("In-RAM decode ≥ 1.0× llama.cpp, Q4_0", "in_ram", "Q4_0 moestream q8", "peer", 1.0),
    ("In-RAM decode ≥ 1.0× llama.cpp, Q4_K_M", "in_ram", "Q4_K_M moestream q8", "peer", 1.0),
    ("In-RAM decode ≥ 90% of the bandwidth bound, Q4_0", "in_ram", "Q4_0 moestream q8", "bound", 0.9),
    ("In-RAM decode ≥ 90% of the bandwidth bound, Q4_K_M", "in_ram", "Q4_K_M moestream q8", "bound", 0.9),
    ("Prefill of 512 in RAM ≥ 2× llama.cpp", "prefill_in_ram", "Q4_0 moestream q8", "peer", 2.0),
    ("½-memory decode ≥ 90% of our own in-RAM decode", "limit_half", "Q4_0 moestream q8", "own_in_ram", 0.9),
    ("¼-memory decode ≥ 10× llama.cpp", "limit_quarter", "Q4_0 moestream q8", "peer", 10.0),
    ("¼-memory decode ≥ 80% of the disk bound", "limit_quarter", "Q4_0 moestream q8", "bound", 0.8),
]


def target_rows(results):
    """[(target, measured text, ratio or None, met text)] for the issue-7 targets."""
    rows = []
    for name, scenario, case, against, threshold in TARGETS:
        what = scenario_what(scenario)
        ours = median_of(results, scenario, case, headline_key("moestream", what))
        ref, ref_text = None, ""
        if against == "peer":
            ref = median_of(results, scenario, peer_case(case), headline_key("llama.cpp", what))
            ref_text = "llama.cpp"
        elif against == "bound":
            ref, _ = bound(results, scenario, case)
            ref_text = "bound"
        elif against == "own_in_ram":
            ref = median_of(results, "in_ram", case, headline_key("moestream", "decode"))
            ref_text = "in RAM"
        if ours is None or not ref:
            rows.append((name, "not measured", None, "–"))
            continue
        ratio = ours / ref
        shown = f"{100 * ratio:.0f}%" if against in ("bound", "own_in_ram") else f"{ratio:.2f}×"
        text = f"{shown} ({ours:.3g} vs {ref_text} {ref:.3g} tok/s)"
        # Where the runs carry a measurement taken beside them, the verdict uses it (the closer comparison) and
        # the text still shows the scenario-level figure.
        if against == "bound":
            frac, bw = beside_bound(results, scenario, case)
            if frac is not None:
                text = (f"{100 * frac:.0f}% of the bandwidth measured beside each run (median {bw:.1f} GB/s); "
                        f"{shown} of the start-of-run {results['machine']['membw_gbps']:.1f} GB/s "
                        f"({ours:.3g} vs {ref:.3g} tok/s)")
                ratio = frac
        elif against == "own_in_ram":
            pr, n = paired_ratio(results, scenario, case)
            po, no = paired_ratio(results, scenario, case + OTHER, case + PAIR)
            pairs = lambda k: f"median of {k} pair{'s' if k != 1 else ''}"  # noqa: E731
            if po is not None:
                # The verdict's row (see the module doc): the warm run starts from another prompt.
                other = median_of(results, scenario, case + OTHER, headline_key("moestream", "decode"))
                text = (f"{100 * po:.0f}% with the warm run on another prompt than the cold one ({other:.3g} tok/s, "
                        f"{pairs(no)}, each beside an unlimited run of the same command)")
                if pr is not None:
                    text += f"; {100 * pr:.0f}% when it repeats the cold run's tokens ({pairs(n)})"
                text += f"; the latter is {shown} of the in-RAM scenario ({ours:.3g} vs {ref:.3g} tok/s)"
                ratio = po
            elif pr is not None:
                text = (f"{100 * pr:.0f}% ({pairs(n)}, each beside an unlimited run of the same command); "
                        f"{shown} against the in-RAM scenario ({ours:.3g} vs {ref:.3g} tok/s)")
                ratio = pr
        rows.append((name, text, ratio, "**met**" if ratio >= threshold else "not met"))
    return rows


def targets_table(results):
    lines = ["| issue-7 target | measured (moestream --q8-activations, warm) | met? |", "|---|---|---|"]
    for name, measured, _, met in target_rows(results):
        lines.append(f"| {name} | {measured} | {met} |")
    return "\n".join(lines) + "\n"


def render(results):
    """The Markdown that goes between the markers."""
    m, o = results["machine"], results["options"]
    quick = o.get("quick")
    out = ["## Issue 7: moestream beside llama.cpp, one command (`bench/harness.py`)", ""]
    if quick:
        out += ["**Smoke test (`--quick`): tiny lengths on a small file, one repeat. Not a benchmark.**", ""]
    out += [f"`{results['command']}`, {results['started']} – {results['finished']} "
            f"({results['wall_s'] / 60:.0f} min). Files made by `moestream synth` have random weights, so their hit "
            f"rates say nothing about a trained model's routing. llama.cpp {m.get('llama_version', '?')}, moestream "
            f"{m.get('moestream_version', '?')}.", ""]
    out += ["### Machine", "", "| what | value |", "|---|---|",
            f"| CPU | {m.get('cpu')} ({m.get('cores')} cores, {o.get('threads')} threads used) |",
            f"| RAM | {m.get('ram_gib', 0):.1f} GiB |",
            f"| kernel | {m.get('kernel')} |",
            f"| memory read bandwidth | {fmt(m.get('membw_gbps'), 1)} GB/s (bench/membw.c, {o.get('threads')} "
            f"threads, best of 3) |",
            f"| disk read bandwidth | {fmt(m.get('disk_gbps'), 2)} GB/s (1 MiB O_DIRECT random reads, QD16) |", ""]
    out += ["### Files", "", "| file | size | how | weight bytes per decode token |", "|---|---|---|---|"]
    for label, f in results["files"].items():
        if f.get("bytes_file"):
            out.append(f"| {label}: `{os.path.basename(f['path'])}` | {f['bytes_file'] / 1e9:.2f} GB | {f['note']}"
                       f"{' (made by this run)' if f.get('generated') else ''} | "
                       f"{fmt((f.get('bytes_per_token') or 0) / 1e6, 0)} MB |")
    sidecars = [("Q4_0", results.get("sidecar"))] + [
        (k.removeprefix("sidecar "), v) for k, v in results.items() if k.startswith("sidecar ")]
    for label, sc in sidecars:
        if not sc:
            continue
        if sc.get("skipped"):
            out += ["", f"No pack sidecar for the {label} file ({sc['skipped']}): moestream read its experts from the "
                    "GGUF, and an I/O thread packed each miss on the cores the matmuls use."]
        else:
            made = f", made by this run in {sc['made_s']} s" if sc.get("made_s") is not None else ""
            out += ["", f"moestream read the {label} file's experts from its pack sidecar `{os.path.basename(sc['path'])}` "
                    f"(`moestream pack --layout {sc.get('layout')}`{made}): each expert one 4 KiB-aligned slab, "
                    + ("stored in the 16-row form the int8 kernels read, so a miss is read by O_DIRECT straight into "
                       "its slot. " if sc.get("layout") == "packed" else
                       "in the file's own encoding (this machine's kernels read row-major), one read per expert. ")
                    + "llama.cpp reads the GGUF."]
    out += ["", "Q4_K_M is requantized from the Q4_0 file (`--allow-requantize`): there is no disk room for an f16 "
            "source (57 GB), and with random weights only the encoding matters for speed.", ""]
    out += ["### Commands", "", "One command per row, each run alternating llama.cpp and moestream within a repeat "
            "(limits through `bench/limited.sh LIMIT_BYTES …`, which drops the page cache first):", "", "```"]
    seen = set()
    for r in results["runs"]:
        if (r["scenario"], r["case"]) not in seen:
            seen.add((r["scenario"], r["case"]))
            out.append(f"# {r['scenario']}, {r['case']}")
            out.append(q([short(c) for c in r["cmd"]]))
    out += ["```", ""]
    out += ["moestream's rows are `moestream bench`'s warm runs (the model and expert cache its cold run left; "
            "llama-bench also measures after a warmup run); cold runs are beside them. `--q8-activations` is the "
            "row comparable with llama.cpp, which always quantizes activations; the default exact-f32 row is shown "
            "in RAM. Under a limit llama.cpp decodes fewer tokens than moestream (its rate there is ~0.1 tok/s, so "
            "a longer run costs minutes per repeat without changing the rate); its prompt is 0 there, since a "
            "prompt test under the limit pages the whole file in.", ""]
    out += ["### Results", ""]
    for sc in ("in_ram", "limit_half", "limit_quarter", "prefill_in_ram", "prefill_half", "skew_half",
               "skew_quarter"):
        t = scenario_table(results, sc)
        if t:
            out += [t]
    if results.get("notes"):
        out += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    out += ["### Targets", "", targets_table(results)]
    return "\n".join(out).rstrip() + "\n"


def replace_section(text, body):
    """`text` with everything between the harness markers replaced by `body` (markers appended when missing)."""
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    # Markers count only on a line of their own: prose may quote them (BENCHMARKS.md's intro does).
    mb = re.search(rf"^{re.escape(BEGIN)}$", text, re.M)
    me = re.search(rf"^{re.escape(END)}$", text, re.M)
    b, e = (mb.start() if mb else -1), (me.start() if me else -1)
    if b != -1 and e != -1 and e > b:
        return text[:b] + block + text[e + len(END):]
    if b != -1 or e != -1:
        raise ValueError(f"only one of {BEGIN} and {END} is in the file; fix it by hand")
    return text.rstrip("\n") + "\n\n" + block + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main


def machine_facts():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram = int(re.search(r"MemTotal:\s+(\d+) kB", f.read()).group(1)) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram / GIB, "kernel": platform.release()}


def ensure_built(a):
    tools = [os.path.join(a.llama_bin, t) for t in ("llama-bench", "llama-quantize")]
    if not all(os.path.isfile(t) for t in tools):
        if a.no_build:
            sys.exit(f"harness: llama.cpp is not built in {a.llama_bin} (run scripts/build-llamacpp.sh)")
        print("building llama.cpp (scripts/build-llamacpp.sh)", flush=True)
        subprocess.run([os.path.join(ROOT, "scripts", "build-llamacpp.sh")], check=True)
    if not a.no_build:
        print("cargo build --release -p moestream", flush=True)
        subprocess.run(["cargo", "build", "--release", "-p", "moestream"], cwd=ROOT, check=True)
    if not os.path.isfile(a.moestream):
        sys.exit(f"harness: no moestream binary at {a.moestream}")


def make_file(a, f, files):
    """Write `f` (through a .partial name, renamed when complete) if the disk has room; else record why not."""
    free = shutil.disk_usage(os.path.dirname(f.path) or ".").free
    need = f.est_bytes + GIB
    if free < need:
        f.skip_reason = (f"not enough disk for {f.path}: needs ~{f.est_bytes / 1e9:.1f} GB + 1 GiB margin, "
                         f"{free / 1e9:.1f} GB free on {os.path.dirname(f.path)} (delete files or drop --keep)")
        print("harness: " + f.skip_reason, flush=True)
        return False
    tmp = f.path + ".partial"
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] making {f.label}: ~{make_estimate(f, files, a.threads) / 60:.0f} min, "
          f"{free / 1e9:.1f} GB free", flush=True)
    try:
        for cmd in f.make(tmp):
            print("    " + q(cmd), flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                tail = " / ".join(p.stderr.strip().splitlines()[-3:])
                f.skip_reason = f"making it failed (exit {p.returncode}): {tail}"
                print("harness: " + f.skip_reason, flush=True)
                return False
        os.replace(tmp, f.path)
    finally:
        if os.path.exists(tmp):  # failed or interrupted: never leave a partial file that could look valid
            os.remove(tmp)
    f.generated = True
    f.facts = inspect(a.moestream, f.path)
    f.make_s = time.time() - t0
    print(f"    done in {f.make_s:.0f} s", flush=True)
    return True


def ensure_sidecar(a, base, results, key="sidecar"):
    """moestream reads a limited file's experts (the base file's, and the skew file's) from a `moestream pack
    --layout auto` sidecar, as a user with a model bigger than memory would (one write of ~the file's size;
    llama.cpp has no counterpart and reads the GGUF). Without one, every miss is read from the GGUF and packed by
    an I/O thread on the cores the matmuls use: on an AVX-512 VNNI machine (2026-12-08) the skew file's ½
    other-prompt decode ran 7.9 tok/s with 53-57 ms read stall per token without a sidecar, 11.4-13.5 with 8-11
    ms with one. Made here when missing, stale or in another layout than `auto` picks on this machine (`packed`
    where the kernels read the 16-row form, AVX-512 VNNI; `file` elsewhere, where a packed sidecar is unpacked on
    every read); recorded in the results under `key` either way."""
    facts = inspect(a.moestream, base.path) or {}
    note = {"path": base.path + ".moestream-pack", "made_s": None}
    want = facts.get("pack_layout_auto", "packed")
    if facts.get("pack_layout") != want:
        free = shutil.disk_usage(os.path.dirname(base.path) or ".").free
        need = facts.get("bytes_experts", base.est_bytes) + GIB
        if free < need:
            note["skipped"] = f"not enough disk: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
            print("harness: no pack sidecar: " + note["skipped"], flush=True)
            results[key] = note
            return
        cmd = [a.moestream, "pack", base.path, "--layout", want, "--quiet"]
        print(f"[{time.strftime('%H:%M:%S')}] packing experts: " + q(cmd), flush=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            note["skipped"] = "moestream pack failed: " + " / ".join(p.stderr.strip().splitlines()[-3:])
            print("harness: " + note["skipped"], flush=True)
            results[key] = note
            return
        note["made_s"] = round(time.time() - t0)
        facts = inspect(a.moestream, base.path) or {}
    note["layout"] = facts.get("pack_layout")
    base.facts = facts or base.facts
    results[key] = note


def main(argv=None):
    a = parse_args(argv)
    if a.render:
        results = json.load(open(a.render))
        text = open(a.benchmarks_md).read() if os.path.exists(a.benchmarks_md) else "# Benchmarks\n"
        with open(a.benchmarks_md, "w") as f:
            f.write(replace_section(text, render(results)))
        print(f"section rewritten in {a.benchmarks_md} from {a.render}")
        return
    a.moestream = os.path.abspath(a.moestream)
    needs_root = any(s != "in_ram" for s in a.scenarios)
    if not a.dry_run:
        if needs_root and os.geteuid() != 0:
            sys.exit("harness: the limit, prefill and skew scenarios need root (cgroup v1 memory limits and "
                     "/proc/sys/vm/drop_caches); run as root or pass --scenarios in_ram")
        if needs_root and not os.path.isdir("/sys/fs/cgroup/memory"):
            sys.exit("harness: no cgroup v1 memory controller at /sys/fs/cgroup/memory (bench/limited.sh needs it)")
        ensure_built(a)
    elif not os.path.isfile(a.moestream):
        sys.exit(f"harness: --dry-run still needs a moestream binary to read the files ({a.moestream})")
    if a.quick and not os.path.isfile(a.model):
        sys.exit(f"harness: --quick needs a small Q4_0 file: {a.model} is missing (make one with `moestream synth "
                 f"--preset qwen3-30b-a3b --layers 4 --format gguf-q4_0 --out {a.model}`)")
    files = plan_files(a, a.moestream, a.llama_bin)
    steps = plan(a, files, a.moestream, a.llama_bin)
    est_total = print_plan(a, steps, files)
    if a.dry_run:
        return
    if files["Q4_0"].make is None and files["Q4_0"].facts is None:
        sys.exit(f"harness: {files['Q4_0'].path} does not open as a model (moestream inspect failed)")

    started = datetime.datetime.now()
    t0 = time.time()
    results = {"harness": 1, "command": "bench/harness.py " + q(argv if argv is not None else sys.argv[1:]),
               "started": started.strftime("%Y-%m-%d %H:%M"), "estimated_s": round(est_total),
               "options": {"threads": a.threads, "repeat": a.repeat, "prefill_repeat": a.prefill_repeat, "quick": a.quick, "scenarios": a.scenarios,
                           "lengths": {k: v if not isinstance(v, dict) else {str(kk): vv for kk, vv in v.items()}
                                       for k, v in lengths(a).items()},
                           "overhead_mib": a.overhead_mib, "routing_skew": a.routing_skew},
               "machine": machine_facts(), "files": {}, "runs": [], "notes": []}
    m = results["machine"]
    try:
        m["llama_version"] = open(os.path.join(a.llama_bin, "..", "VERSION")).read().strip()
    except OSError:
        m["llama_version"] = "?"
    rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    m["moestream_version"] = rev.stdout.strip() or "?"
    print(f"[{time.strftime('%H:%M:%S')}] measuring memory bandwidth", flush=True)
    m["membw_gbps"] = in_ram.membw(a.threads)

    base = files["Q4_0"]
    if base.make and not make_file(a, base, files):
        sys.exit("harness: no base Q4_0 file: " + base.skip_reason)
    if needs_root:
        print(f"[{time.strftime('%H:%M:%S')}] measuring disk bandwidth on {base.path}", flush=True)
        subprocess.run(["sync"])
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        m["disk_gbps"] = bigger_than_memory.disk_bw(base.path)
    print(f"memory {m['membw_gbps']:.1f} GB/s, disk {m.get('disk_gbps', 0):.2f} GB/s", flush=True)

    def record_file(f):
        fa = f.facts or {}
        results["files"][f.label] = {
            "path": f.path, "note": f.note, "generated": f.generated, "make_s": round(getattr(f, "make_s", 0)),
            **{k: fa.get(k) for k in ("bytes_file", "bytes_total", "bytes_resident", "bytes_experts",
                                      "bytes_routed_per_token", "bytes_per_token", "layers", "bytes_by_type")}}

    if needs_root and not a.no_sidecar:
        ensure_sidecar(a, base, results)
    record_file(base)
    try:
        run_steps(a, steps, files, results, record_file, t0)
    except KeyboardInterrupt:
        results["interrupted"] = True
        raw = write_raw(a, results, started)
        sys.exit(f"harness: interrupted; the runs so far are in {raw} (BENCHMARKS.md left alone)")
    results["finished"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results["wall_s"] = time.time() - t0
    write_outputs(a, results, started)


def run_steps(a, steps, files, results, record_file, t0):
    base = files["Q4_0"]
    for st in steps:
        kind = st[0]
        if kind == "note":
            results["notes"].append(st[1])
        elif kind == "make":
            f = st[1]
            if f is not base and make_file(a, f, files):
                record_file(f)
            elif f.skip_reason:
                results["notes"].append(f"{f.label}: not made, {f.skip_reason}")
        elif kind == "sidecar":
            f = st[1]
            if not f.skip_reason and f.exists():
                ensure_sidecar(a, f, results, key=f"sidecar {f.label}")
        elif kind == "delete":
            f = st[1]
            if (f.generated or (a.delete_found and f is not base)) and not a.keep:
                os.remove(f.path)
                print(f"deleted {f.path} (made by this run; --keep keeps it)", flush=True)
                sc = results.get(f"sidecar {f.label}", {})
                if sc.get("made_s") is not None:  # made by this run, like the file
                    os.remove(sc["path"])
                results["files"][f.label]["deleted"] = True
        else:
            r, rep = st[1], st[2]
            if r.file.skip_reason or not r.file.exists():
                continue
            if r.file.label not in results["files"]:  # a file found on disk rather than made by this run
                record_file(r.file)
            results["runs"].append(execute_run(a, r, rep))
            results["wall_s"] = time.time() - t0


def write_raw(a, results, started):
    os.makedirs(a.results_dir, exist_ok=True)
    raw = os.path.join(a.results_dir, f"{'quick-' if a.quick else ''}harness-{started:%Y%m%d-%H%M}.json")
    with open(raw, "w") as f:
        json.dump(results, f, indent=1)
    return raw


def write_outputs(a, results, started):
    raw = write_raw(a, results, started)
    body = render(results)
    text = open(a.benchmarks_md).read() if os.path.exists(a.benchmarks_md) else "# Benchmarks\n"
    with open(a.benchmarks_md, "w") as f:
        f.write(replace_section(text, body))
    print()
    print(body)
    print(f"raw results: {raw}; section written to {a.benchmarks_md}; wall time {results['wall_s'] / 60:.1f} min "
          f"(estimated {results['estimated_s'] / 60:.0f})")


if __name__ == "__main__":
    main()
