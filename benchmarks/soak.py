"""Soak: thousands of short requests over HTTP, a share of them abandoned mid-way, against one server
process. Reports the server's resident memory after warm-up and at the end (a long run must not grow it),
and that the engine ends idle with its KV cache empty.

    .venv/bin/python benchmarks/soak.py --requests 3000 --abort-share 0.3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time

import httpx
from server_process import ROOT, rss_bytes, serve

RESULTS = os.path.join(ROOT, "benchmarks", "results")
SERVER = ["--num-instances", "2", "--kv-tokens-per-instance", "8192", "--max-num-seqs", "32"]
SERVER += ["--max-model-len", "1024", "--max-prefill-tokens", "512", "--policy", "shared"]
MiB = 1 << 20


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, abort: bool) -> str:
    words = ["cats", "rivers", "stars", "maps", "rain"]
    body = {
        "prompt": "Tell me about " + " ".join(rng.choice(words) for _ in range(8)),
        "max_tokens": rng.randint(1, 12),
        "temperature": rng.choice([0.0, 0.7]),
        "seed": rng.randint(0, 1000),
        "stream": abort or rng.random() < 0.5,
    }
    if rng.random() < 0.1:
        body |= {"logprobs": 2}
    if not body["stream"]:
        r = await client.post(f"{url}/v1/completions", json=body)
        return "ok" if r.status_code == 200 else f"http {r.status_code}"
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if abort and line.startswith("data: {"):
                return "aborted"  # hang up after the first token
    return "ok"


async def load(url: str, n: int, concurrency: int, abort_share: float, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    queue = list(range(n))

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            while queue:
                queue.pop()
                outcome = await one(client, url, rng, rng.random() < abort_share)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--abort-share", type=float, default=0.3)
    ap.add_argument("--out", default=os.path.join(RESULTS, "soak.json"))
    args = ap.parse_args()
    with serve(SERVER) as (url, proc):
        asyncio.run(load(url, 200, args.concurrency, args.abort_share, seed=0))  # compile what the load uses
        start = rss_bytes(proc.pid)
        t0 = time.monotonic()
        samples = []
        outcomes: dict[str, int] = {}
        for part in range(10):
            got = asyncio.run(load(url, args.requests // 10, args.concurrency, args.abort_share, seed=part + 1))
            for k, v in got.items():
                outcomes[k] = outcomes.get(k, 0) + v
            samples.append(rss_bytes(proc.pid))
            print(f"{(part + 1) * args.requests // 10} requests: RSS {samples[-1] / MiB:.0f} MiB", flush=True)
        seconds = time.monotonic() - t0
        time.sleep(2)
        text = httpx.get(f"{url}/metrics").text
        end = rss_bytes(proc.pid)
    row = {
        "requests": args.requests,
        "abort_share": args.abort_share,
        "outcomes": outcomes,
        "seconds": seconds,
        "rss_start_bytes": start,
        "rss_end_bytes": end,
        "rss_samples_bytes": samples,
        "running_at_end": metric(text, "loong:num_requests_running"),
        "waiting_at_end": metric(text, "loong:num_requests_waiting"),
        "kv_usage_at_end": metric(text, "loong:kv_cache_usage_perc "),
        "aborts_counted": metric(text, 'loong:request_success_total{finished_reason="abort"}'),
    }
    print(
        f"{args.requests} requests in {seconds:.0f}s ({outcomes}); RSS {start / MiB:.0f} MiB after warm-up, "
        f"{end / MiB:.0f} MiB at the end ({(end - start) / MiB:+.0f} MiB); running {row['running_at_end']:.0f}, "
        f"waiting {row['waiting_at_end']:.0f}, KV in use {row['kv_usage_at_end']:.3f}; aborts counted "
        f"{row['aborts_counted']:.0f}"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
