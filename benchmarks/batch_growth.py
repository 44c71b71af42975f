"""Decode batches that grow: requests arriving one per engine step at one instance, the scheduler's pause
rule weighing the whole queue (`weigh_queue`, the default) against the admitted batch alone, in one run.

A tiny random Llama on one CPU instance (room for every request) serves 64 requests of 200-token prompts
and 64 new tokens, one added per engine step, in bursts of 4 decode steps; both rules use the built-in cost
model. Reported per rule: the decode batch sizes (the engine's statistics), output tokens/s, and time to
first token. Run: `python benchmarks/batch_growth.py` (CPU; `--requests 64 --prompt 200 --tokens 64`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax import SamplingParams
from loong_jax.engine import EngineConfig, build_engine, warmup_jobs
from loong_jax.model.config import tiny_config
from loong_jax.model.llama import Llama
from loong_jax.scheduling.elastic import ElasticScheduler, SchedulerConfig


def serve(weigh_queue: bool, requests: int, prompt: int, tokens: int, per_step: int) -> dict:
    """One run of the arrival pattern; what the engine measured."""
    cfg = tiny_config()
    graphdef, state = nnx.split(Llama(cfg, jnp.float32, nnx.Rngs(7)))
    ecfg = EngineConfig(
        max_model_len=prompt + tokens + 16,
        kv_tokens_per_instance=requests * (prompt + tokens + 32),
        page_size=4,
        max_num_seqs=requests,
        max_prefill_tokens=2048,
        decode_steps=4,
    )
    engine = build_engine(cfg, graphdef, state, None, ecfg, jnp.float32, seed=0)
    engine.policy = ElasticScheduler(1, engine.policy.cost, SchedulerConfig(weigh_queue=weigh_queue))
    engine.executor.warmup(warmup_jobs(engine.ecfg), show=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, prompt).tolist() for _ in range(requests)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    reqs = []
    t0 = time.perf_counter()
    while len(reqs) < requests or engine.has_unfinished():
        for p in prompts[len(reqs) : len(reqs) + per_step]:
            reqs.append(engine.add_request(p, params))
        engine.step()
    elapsed = time.perf_counter() - t0
    ttft = [r.first_token_time - r.arrival for r in reqs]
    batches = engine.stats.decode_batches
    return {
        "weigh_queue": weigh_queue,
        "seconds": elapsed,
        "output_tokens_per_s": requests * tokens / elapsed,
        "max_decode_batch": max(batches),
        "mean_decode_batch": sum(b * n for b, n in batches.items()) / sum(batches.values()),
        "decode_batches": dict(sorted(batches.items())),
        "ttft_mean_s": float(np.mean(ttft)),
        "ttft_max_s": float(np.max(ttft)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--per-step", type=int, default=1, help="requests added per engine step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "batch_growth.json"))
    args = ap.parse_args()
    jax.config.update("jax_platforms", "cpu")
    runs = [serve(w, args.requests, args.prompt, args.tokens, args.per_step) for w in (False, True)]
    old, new = runs
    for r in runs:
        print(
            f"weigh_queue={r['weigh_queue']!s:5}  decode batches max {r['max_decode_batch']:3d}"
            f" mean {r['mean_decode_batch']:5.1f}"
            f"  {r['output_tokens_per_s']:7.0f} tok/s  TTFT mean {r['ttft_mean_s']:.3f} s max {r['ttft_max_s']:.3f} s"
        )
    ratio = new["output_tokens_per_s"] / old["output_tokens_per_s"]
    print(f"tokens/s ratio (queue-weighed / batch-only): {ratio:.2f}x")
    result = {
        "benchmark": "batch_growth",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "args": vars(args),
        "runs": runs,
        "tokens_per_s_ratio": ratio,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
