"""What multi-host costs the real engine on this machine: a decode step of SmolLM2 at batch 16 on a group of
N instances, with the instances in one process (the peer) and with one instance per process (every step's
plan goes to N - 1 followers and their sampled rows come back), for N = 2 and 4; the leader's own control
time per step (publishing the plan, and waiting for answers after its own part was ready); and the time
to warm up the same programs in one process and across N processes.

Virtual CPU devices of all processes share this machine's cores, and the collectives of a group that spans
processes go over gloo instead of within one process: the step-time ratio is an upper bound on what the
plan costs; the leader's control time is the plan's own share.

    .venv/bin/python benchmarks/multihost_engine.py          # N = 2 and 4, JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from worker_processes import ROOT, leader_result

RESULTS = os.path.join(ROOT, "benchmarks", "results")
BATCH, STEPS, WARM_STEPS = 16, 40, 5


def worker(coordinator: str, num: int, pid: int, instances: int) -> None:
    """One process of a run of `instances` instances over `num` processes; process 0 prints its timings."""
    import numpy as np

    from loong_jax import LLM, SamplingParams
    from loong_jax.multihost import Distributed, initialize, shutdown
    from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

    initialize(Distributed(coordinator, num, pid), local_cpu_devices=instances // num, timeout_s=120)
    llm = LLM(
        num_instances=instances,
        kv_tokens_per_instance=4096,
        max_model_len=512,
        max_num_seqs=BATCH,
        max_prefill_tokens=512,
        seed=0,
        compilation_cache_dir=None,
    )
    if llm.is_follower:
        llm.follow()
        shutdown()
        return
    t0 = time.perf_counter()
    compiled = llm.warmup(show_progress=False)
    warmup_s = time.perf_counter() - t0
    engine, group = llm.engine, tuple(range(instances))
    params = SamplingParams(max_tokens=STEPS + WARM_STEPS + 1, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(0)
    reqs = [engine.add_request(rng.integers(100, 20000, 24).tolist(), params) for _ in range(BATCH)]
    plans = [np.full(24, i % instances, np.int32) for i in range(BATCH)]  # KV spread over every instance
    engine.execute(Iteration(prefills=[PrefillWork(group, reqs, plans)]))
    masters = [i % instances for i in range(BATCH)]
    peers = engine.executor.peers
    seconds = []
    for step in range(STEPS + WARM_STEPS):
        if step == WARM_STEPS and peers is not None:
            peers.send_s = peers.reply_wait_s = 0.0
        t0 = time.perf_counter()
        engine.execute(Iteration(decodes=[DecodeWork(group, reqs, masters)]))
        seconds.append(time.perf_counter() - t0)
    out = {
        "processes": num,
        "instances": instances,
        "warmup_s": warmup_s,
        "programs_compiled": compiled,
        "decode_step_ms": [s * 1000 for s in seconds[WARM_STEPS:]],
    }
    if peers is not None:
        out["send_ms_per_step"] = peers.send_s * 1000 / STEPS
        out["reply_wait_ms_per_step"] = peers.reply_wait_s * 1000 / STEPS
    llm.close()
    print("RESULT " + json.dumps(out), flush=True)
    shutdown()


def run(num: int, instances: int, timeout: float) -> dict:
    return leader_result(__file__, [str(instances)], num, timeout)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        coordinator, num, instances, pid = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        worker(coordinator, num, pid, instances)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default="2,4", help="comma-separated N")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=os.path.join(RESULTS, "multihost_engine.json"))
    args = parser.parse_args()
    report = []
    for n in (int(x) for x in args.instances.split(",")):
        one, spread = run(1, n, args.timeout), run(n, n, args.timeout)
        step1, stepn = statistics.median(one["decode_step_ms"]), statistics.median(spread["decode_step_ms"])
        control = spread["send_ms_per_step"] + spread["reply_wait_ms_per_step"]
        row = {
            "instances": n,
            "one_process": {"decode_step_ms_median": step1, "warmup_s": one["warmup_s"]},
            f"{n}_processes": {
                "decode_step_ms_median": stepn,
                "warmup_s": spread["warmup_s"],
                "send_ms_per_step": spread["send_ms_per_step"],
                "reply_wait_ms_per_step": spread["reply_wait_ms_per_step"],
            },
            "step_ratio": stepn / step1,
            "control_ms_per_step": control,
            "control_share_of_one_process_step": control / step1,
            "programs_compiled": one["programs_compiled"],
        }
        report.append(row)
        print(
            f"N={n}: decode step (batch {BATCH}) {step1:.1f} ms in one process, {stepn:.1f} ms over {n} processes "
            f"({stepn / step1:.2f}x); leader control {control:.2f} ms/step ({spread['send_ms_per_step']:.2f} publish"
            f" + {spread['reply_wait_ms_per_step']:.2f} waiting for answers) = {100 * control / step1:.1f}% of the "
            f"one-process step; warm-up of {one['programs_compiled']} programs {one['warmup_s']:.1f} s in one "
            f"process, {spread['warmup_s']:.1f} s over {n}",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch": BATCH, "steps": STEPS, "results": report}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
