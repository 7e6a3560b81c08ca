#!/usr/bin/env python3
"""N concurrent streaming chat clients against a running `moestream serve` (or any OpenAI-compatible server).

Each client sends `--requests` streaming chat completions one after another; all clients start together. Reports
time to first token (p50, p99, from sending the request to the first content chunk), aggregate output tok/s
(completion tokens from the usage chunk over wall time), per-request decode tok/s, and the error count.

    moestream serve --model M --parallel 4 &
    .venv/bin/python bench/clients.py --url http://127.0.0.1:8080/v1 --clients 16 --max-tokens 128

Needs the `openai` package (tests/python/requirements.txt; `scripts/python-env.sh` makes .venv). Prints a
Markdown table row for BENCHMARKS.md and, with --json, the raw numbers.
"""

import argparse
import asyncio
import json
import statistics
import time

import openai


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def one_request(client, args, i):
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": f"{args.prompt} (client request {i})"}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True} if args.ignore_eos else None,
    )
    async for chunk in stream:
        if chunk.choices and first is None and (chunk.choices[0].delta.content or
                                                getattr(chunk.choices[0].delta, "reasoning_content", None)):
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (first or end) - t0
    decode = tokens / (end - first) if first and end > first and tokens > 1 else float("nan")
    return ttft, tokens, decode


async def client_loop(client, args, cid, results, errors):
    for r in range(args.requests):
        try:
            results.append(await one_request(client, args, cid * args.requests + r))
        except Exception as e:  # noqa: BLE001 - every failure counts as an error, whatever its class
            errors.append(f"{type(e).__name__}: {e}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default="moestream")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1, help="requests per client, sequential")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    ap.add_argument("--ignore-eos", action="store_true", help="fixed-length outputs (vLLM/moestream extension)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    results, errors = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(client, args, c, results, errors) for c in range(args.clients)))
    wall = time.perf_counter() - t0

    ttfts = [r[0] for r in results]
    total = sum(r[1] for r in results)
    decodes = [r[2] for r in results if r[2] == r[2]]
    out = {
        "clients": args.clients,
        "requests": args.clients * args.requests,
        "ok": len(results),
        "errors": len(errors),
        "wall_s": wall,
        "completion_tokens": total,
        "aggregate_tok_s": total / wall if wall > 0 else 0.0,
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "decode_tok_s_per_request_median": statistics.median(decodes) if decodes else float("nan"),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    print("| clients | requests | errors | TTFT p50 (s) | TTFT p99 (s) | aggregate tok/s | per-request decode tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {out['clients']} | {out['requests']} | {out['errors']} | {out['ttft_p50_s']:.2f} | "
          f"{out['ttft_p99_s']:.2f} | {out['aggregate_tok_s']:.1f} | {out['decode_tok_s_per_request_median']:.1f} |")
    for e in errors[:5]:
        print("error:", e)


if __name__ == "__main__":
    asyncio.run(main())
