"""Do running streams stall when another request arrives? Two cases, measured over HTTP on a real server:

* a multi-megabyte prompt (tokenising and templating it must not block the event loop);
* the first request with a sampler variant no program has been compiled for (logprobs, penalties, logit
  bias: its program must not hold up every other stream while it compiles).

Eight streams run; the disturbing request is sent while they do. Reported per case: the streams' median
inter-token gap before the disturbance and the longest gap after it (the stall). With --baseline-tree (a
checkout of an earlier version) the same run is made against it first, for a before/after ratio.

    .venv/bin/python benchmarks/server_stalls.py
    git worktree add /tmp/before <commit> && .venv/bin/python benchmarks/server_stalls.py --baseline-tree /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx
from server_process import ROOT, serve

RESULTS = os.path.join(ROOT, "benchmarks", "results")
SERVER = ["--num-instances", "2", "--kv-tokens-per-instance", "8192", "--max-num-seqs", "16"]
SERVER += ["--max-model-len", "2048", "--max-prefill-tokens", "1024", "--policy", "shared"]


async def stream(client: httpx.AsyncClient, url: str, i: int, times: list[float]) -> None:
    body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 160, "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.monotonic())


async def disturbed(url: str, disturbance: dict, settle: float) -> dict:
    """Eight streams; after `settle` seconds the disturbing request; gaps before and after it."""
    async with httpx.AsyncClient(timeout=600) as client:
        times: list[list[float]] = [[] for _ in range(8)]
        tasks = [asyncio.create_task(stream(client, url, i, times[i])) for i in range(8)]
        await asyncio.sleep(settle)
        sent = time.monotonic()
        r = await client.post(f"{url}{disturbance['path']}", json=disturbance["body"])
        answered = time.monotonic() - sent
        await asyncio.gather(*tasks)
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b < sent]
    after = [b - a for t in times for a, b in zip(t, t[1:]) if b >= sent]
    return {
        "status": r.status_code,
        "answered_s": answered,
        "median_gap_before_s": statistics.median(before) if before else float("nan"),
        "max_gap_after_s": max(after) if after else float("nan"),
    }


def cases() -> dict[str, dict]:
    huge = "All work and no play makes Jack a dull boy. " * 100_000  # 4.4 MB, far past the context
    return {
        "huge_prompt": {"path": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": huge}]}},
        "new_sampler_variant": {
            "path": "/v1/completions",
            "body": {"prompt": "Hello", "max_tokens": 4, "logprobs": 5, "presence_penalty": 0.5},
        },
    }


def run(tree: str, label: str) -> dict:
    out = {}
    with serve(SERVER, tree=tree) as (url, _):
        plain = {"path": "/v1/completions", "body": {"prompt": "warm", "max_tokens": 2}}
        asyncio.run(disturbed(url, plain, 1.0))  # the streams' own shapes compile here, unmeasured
        for name, case in cases().items():
            out[name] = m = asyncio.run(disturbed(url, case, 3.0))
            before, after = m["median_gap_before_s"] * 1000, m["max_gap_after_s"] * 1000
            print(
                f"{label} {name}: answered {m['status']} in {m['answered_s']:.2f}s; streams' median gap "
                f"{before:.0f} ms before it, longest gap after {after:.0f} ms",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-tree", default=None, help="a checkout of an earlier version to compare with")
    ap.add_argument("--out", default=os.path.join(RESULTS, "server_stalls.json"))
    args = ap.parse_args()
    result = {}
    if args.baseline_tree:
        result["before"] = run(args.baseline_tree, "before")
    result["after"] = run(ROOT, "after")
    if "before" in result:
        for name in result["after"]:
            b, a = result["before"][name]["max_gap_after_s"], result["after"][name]["max_gap_after_s"]
            print(f"{name}: longest stall {b * 1000:.0f} ms before -> {a * 1000:.0f} ms after ({b / a:.1f}x shorter)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
