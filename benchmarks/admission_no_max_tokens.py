"""Requests that give no max_tokens: how many run at once, and how fast they all finish, when admission
plans for an estimate of their output (preempting, exactly, if one outgrows it) against when it reserves
the whole rest of the context for each (the earlier behaviour: `output_estimate` = max_model_len).

Same engine shape as the server where this was observed (4 virtual instances of 4,096 KV tokens, context
2,048); chat requests answered until the model's end of turn, greedily, in the same run for both.

    .venv/bin/python benchmarks/admission_no_max_tokens.py --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOPICS = ["rivers", "volcanoes", "bread", "chess", "owls", "tides", "glass", "bees", "clocks", "maps"]


def run(llm, prompts, label: str) -> dict:
    from loong_jax import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=None, temperature=0.0)
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    running, kv = [], []
    total = sum(p.num_slots for p in engine.pools)
    while engine.has_unfinished():
        engine.step()
        running.append(len(engine.running))
        kv.append(engine.kv_used_tokens / total)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in reqs)
    row = {
        "label": label,
        "output_estimate": engine.ecfg.output_estimate,
        "seconds": seconds,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "max_running": max(running),
        "mean_running": statistics.mean(running),
        "max_kv_usage": max(kv),
        "preemptions": engine.stats.preemptions,
        "finish_reasons": sorted({r.finish_reason for r in reqs}),
    }
    print(
        f"{label}: {len(reqs)} requests, {tokens} output tokens in {seconds:.1f}s "
        f"({row['output_tokens_per_s']:.1f}/s); "
        f"running at once max {row['max_running']}, mean {row['mean_running']:.1f}; KV use max "
        f"{row['max_kv_usage']:.0%}; preemptions {row['preemptions']}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--policy", default="shared", choices=["shared", "elastic"])
    ap.add_argument("--out", default=os.path.join(RESULTS, "admission_no_max_tokens.json"))
    args = ap.parse_args()
    from loong_jax import LLM, use_virtual_cpu_devices

    use_virtual_cpu_devices(4)
    rows = []
    for label, estimate in (("whole context reserved", 2048), ("estimate (default)", None)):
        kw = {} if estimate is None else {"output_estimate": estimate}
        llm = LLM(
            num_instances=4,
            kv_tokens_per_instance=4096,
            max_model_len=2048,
            max_num_seqs=64,
            policy=args.policy,
            seed=0,
            **kw,
        )
        llm.warmup(show_progress=False)
        prompts = [
            llm.chat_prompt_ids([{"role": "user", "content": f"Tell me three facts about {TOPICS[i % 10]} ({i})."}])
            for i in range(args.requests)
        ]
        rows.append(run(llm, prompts, label))
        del llm
    before, after = rows
    print(
        f"estimate vs whole context: {after['mean_running'] / before['mean_running']:.1f}x the requests running at "
        f"once, {after['output_tokens_per_s'] / before['output_tokens_per_s']:.2f}x the output tokens/s"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
