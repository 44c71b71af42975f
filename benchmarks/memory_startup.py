"""KV capacity chosen at start-up with the defaults, and the peak memory measured, for 1, 4 and 8 instances.

Each configuration runs in a fresh process (as a user starts it): `LLM(num_instances=n)` with the default
memory_utilization, optionally the full warm-up (every program the policy uses), then a batch of
generations. It reports the KV pool size chosen, the budget it was derived from, and the process's peak
resident memory: the peak must stay within the budget.

    .venv/bin/python benchmarks/memory_startup.py                 # 1, 4 and 8 instances, with warm-up
    .venv/bin/python benchmarks/memory_startup.py --instances 8 --no-warmup
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 1 << 30
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def child(n: int, warmup: bool, requests: int, max_tokens: int) -> None:
    """One configuration, in this (fresh) process; prints one JSON line."""
    from loong_jax import LLM, SamplingParams, use_virtual_cpu_devices
    from loong_jax.runtime.memory import peak_rss_bytes

    if n > 1:
        use_virtual_cpu_devices(n)
    t0 = time.perf_counter()
    llm = LLM(num_instances=n)
    start = time.perf_counter() - t0
    after_start = peak_rss_bytes()
    programs = llm.warmup(show_progress=False) if warmup else 0
    after_warmup = peak_rss_bytes()
    prompts = [f"Request {i}: tell me a long story about the sea." for i in range(requests)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    row = {
        "num_instances": n,
        **llm.kv_capacity.as_dict(),
        "start_seconds": round(start, 1),
        "programs_warmed": programs,
        "generated_tokens": sum(len(o.token_ids) for o in outs),
        "peak_rss_after_start": after_start,
        "peak_rss_after_warmup": after_warmup,
        "peak_rss": peak_rss_bytes(),
    }
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(RESULTS, "memory_startup.json"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, not args.no_warmup, args.requests, args.max_tokens)
        return
    rows = []
    for n in args.instances:
        cmd = [sys.executable, __file__, "--child", str(n), "--requests", str(args.requests)]
        cmd += ["--max-tokens", str(args.max_tokens)] + (["--no-warmup"] if args.no_warmup else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{n} instance(s) failed:\n{proc.stderr[-3000:]}")
        row = json.loads(line[len("RESULT ") :])
        row["peak_over_budget"] = row["peak_rss"] / row["budget_bytes"]
        rows.append(row)
        print(
            f"{n} instance(s): {row['tokens_per_instance']:,} KV tokens per instance ({row['total_tokens']:,} in all, "
            f"{row['bytes_per_instance'] * n / GiB:.2f} GiB), {row['how']}; budget {row['budget_bytes'] / GiB:.2f} GiB "
            f"(memory_utilization {row['utilization']:g}); peak RSS {row['peak_rss'] / GiB:.2f} GiB "
            f"= {row['peak_over_budget']:.2f} of the budget (after start {row['peak_rss_after_start'] / GiB:.2f}, "
            f"after warming {row['programs_warmed']} programs {row['peak_rss_after_warmup'] / GiB:.2f}); "
            f"start {row['start_seconds']} s",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "warmup": not args.no_warmup}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
