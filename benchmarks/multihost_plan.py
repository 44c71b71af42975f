"""What a multi-host step costs in control traffic: the plan channel's round trip (the leader publishes a
decode step's host inputs, every follower answers with its sampled tokens) with 2 and 4 processes on this
machine, beside the time of a decode step at batch 16 of SmolLM2 in one process (the peer).

    .venv/bin/python benchmarks/multihost_plan.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from worker_processes import ROOT, leader_result

RESULTS = os.path.join(ROOT, "benchmarks", "results")
BATCH, PAGES, STEPS = 16, 64, 300


def worker(coordinator: str, num: int, pid: int) -> None:
    """One process: join, then lead (process 0) or follow STEPS plans; process 0 prints its timings."""
    import numpy as np

    from loong_jax.multihost import Distributed, initialize, shutdown
    from loong_jax.multihost.channel import PlanChannel

    initialize(Distributed(coordinator, num, pid), local_cpu_devices=1, timeout_s=60)
    channel = PlanChannel.from_jax(timeout_s=30)
    rng = np.random.default_rng(0)
    seconds = []
    for seq in range(STEPS):
        if pid == 0:
            plan = {
                "kind": "decode",
                "group": list(range(num)),
                "tokens": rng.integers(0, 49152, BATCH).astype(np.int32),
                "positions": rng.integers(0, 8192, BATCH).astype(np.int32),
                "slots": rng.integers(0, 1 << 20, BATCH).astype(np.int32),
                "page_table": rng.integers(0, 1 << 16, (BATCH, PAGES)).astype(np.int32),
                "kv_lens": rng.integers(0, 8192, BATCH).astype(np.int32),
            }
            t0 = time.perf_counter()
            channel.publish(seq, plan)
            channel.replies(seq)
            seconds.append(time.perf_counter() - t0)
            channel.forget(seq)
        else:
            got = channel.receive(seq)
            channel.reply(seq, {"tokens": got["tokens"]})
    if pid == 0:
        print("RESULT " + json.dumps(seconds[20:]), flush=True)  # the first ones warm up the connections
    shutdown()


def round_trips(num: int) -> list[float]:
    return leader_result(__file__, [], num, timeout=300)


def decode_step_seconds() -> float:
    """One process, one instance, SmolLM2: seconds per decode step at batch 16 (64 steps, prefill excluded)."""
    from loong_jax import LLM, SamplingParams

    llm = LLM(num_instances=1, kv_tokens_per_instance=16384, max_model_len=2048, max_num_seqs=BATCH, policy="shared")
    prompts = [[1 + (i * 7 + j) % 4000 for j in range(64)] for i in range(BATCH)]

    def run(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - t0

    run(65)  # compiles
    return (run(65) - run(1)) / 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", default=os.path.join(RESULTS, "multihost_plan.json"))
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return
    step = decode_step_seconds()
    report = {"decode_step_ms_batch16": step * 1000, "plan": {}}
    print(f"decode step at batch {BATCH}, one process: {step * 1000:.1f} ms")
    for n in args.processes:
        times = round_trips(n)
        median = statistics.median(times)
        report["plan"][n] = {
            "round_trip_ms_median": median * 1000,
            "round_trip_ms_p99": sorted(times)[int(0.99 * (len(times) - 1))] * 1000,
            "share_of_decode_step": median / step,
        }
        print(
            f"{n} processes: plan round trip median {median * 1000:.2f} ms "
            f"(p99 {report['plan'][n]['round_trip_ms_p99']:.2f}), {median / step:.1%} of a decode step",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
