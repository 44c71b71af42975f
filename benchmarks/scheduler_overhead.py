"""How long one scheduling decision takes: 1,000 waiting requests on 64 instances (target: under 5 ms).

The view is what the engine hands the scheduler each iteration (waiting queue, decoding requests with
KV spread over the instances, per-instance pools); the decision is `ElasticScheduler.schedule(view)`.
The interim cost-free `IdleFirstPolicy` is timed on the same view as a peer.

    .venv/bin/python benchmarks/scheduler_overhead.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from loong_jax.model.sampling import SamplingParams
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.request import Request, Status
from loong_jax.scheduling.elastic import ElasticScheduler, SchedulerConfig
from loong_jax.scheduling.policy import IdleFirstPolicy, SchedulerView
from loong_jax.simulation.cluster_model import A800, LLAMA2_7B, ClusterModel
from loong_jax.simulation.workloads import zipf_lengths


def build_view(instances: int, waiting: int, decoding: int, seed: int) -> SchedulerView:
    rng = np.random.default_rng(seed)
    c = ClusterModel(A800, LLAMA2_7B, instances, 2)
    pools = [PagePool(c.kv_tokens_per_instance // 16, 16) for _ in range(instances)]
    params = SamplingParams(max_tokens=256, ignore_eos=True)
    rid = 0
    running = []
    for n in zipf_lengths(rng, 1.2, decoding, hi=100_000):
        req = Request(rid, [0] * int(n), params, 256, 0, ())
        req.status, req.output_ids, req.prefill_len, req.prefilled = Status.RUNNING, [0], int(n), int(n)
        first = int(rng.integers(0, instances - 1))
        spread = [first, first + 1] if rng.random() < 0.1 else [first]  # a few long ones on two neighbours
        for k, i in enumerate(spread):
            share = int(n) // len(spread) + (k == 0) * (int(n) % len(spread))
            if pools[i].pages_needed(rid, share) <= pools[i].free_pages:
                pools[i].append(rid, share)
        running.append(req)
        rid += 1
    queue = []
    for k, n in enumerate(zipf_lengths(rng, 1.2, waiting, hi=100_000)):
        req = Request(rid, [0] * int(n), params, 256, 0, ())
        req.arrival = float(k)
        queue.append(req)
        rid += 1
    reserved = sum(-(-(len(r.prompt_ids) + 256) // 16) + instances for r in running)
    return SchedulerView(queue, running, pools, 2048, 1 << 20, reserved, 16, frozenset(), len(running), 0.0)


def time_policy(policy, view: SchedulerView, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.schedule(view)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--waiting", type=int, default=1000)
    ap.add_argument("--decoding", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scheduler_overhead.json")
    args = ap.parse_args()
    view = build_view(args.instances, args.waiting, args.decoding, seed=0)
    cost = ClusterModel(A800, LLAMA2_7B, args.instances, 2).fitted_cost_model()
    results = {}
    for name, policy in [
        ("elastic_aligned", ElasticScheduler(args.instances, cost, SchedulerConfig(aligned_groups=True))),
        ("elastic_any_group", ElasticScheduler(args.instances, cost, SchedulerConfig(aligned_groups=False))),
        ("idle_first", IdleFirstPolicy(args.instances)),
    ]:
        it = policy.schedule(view)
        used = it.instances()
        assert len(used) == len(set(used)), f"{name}: an instance is in two groups"
        times = time_policy(policy, view, args.repeats)
        results[name] = {
            "median_ms": 1000 * float(np.median(times)),
            "p90_ms": 1000 * float(np.percentile(times, 90)),
            "prefill_groups": [len(w.group) for w in it.prefills],
            "prefill_requests": sum(len(w.requests) for w in it.prefills),
            "decode_groups": len(it.decodes),
        }
        r = results[name]
        print(
            f"{name:18s} median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms; prefill groups "
            f"{r['prefill_groups']} ({r['prefill_requests']} requests), {r['decode_groups']} decode groups"
        )
    doc = {"instances": args.instances, "waiting": args.waiting, "decoding": args.decoding, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"target: under 5 ms per decision; wrote {args.out}")


if __name__ == "__main__":
    main()
