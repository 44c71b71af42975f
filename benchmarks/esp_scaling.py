"""Elastic sequence parallelism: prefill latency by degree, decode step time by degree and batch,
proactive scale-down overhead, and peak memory of a long prefill.

Run on N devices (CPU: virtual devices share the machine's cores, so compare overheads and memory, not
speed-ups; GPU: real scaling). Writes JSON to benchmarks/results/esp_scaling.json.

    python benchmarks/esp_scaling.py                       # CPU defaults: 8 virtual instances
    python benchmarks/esp_scaling.py --prompts 1024 8192 32768 --memory-tokens 131072   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--memory-tokens", type=int, default=32768, help="prompt length of the memory analysis")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "esp_scaling.json"))
    args = ap.parse_args()

    import jax
    import numpy as np

    from loong_jax import use_virtual_cpu_devices

    use_virtual_cpu_devices(args.instances)  # only the CPU backend is affected; must precede any JAX work

    from loong_jax import LLM, SamplingParams
    from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

    max_prompt = max(args.prompts)
    llm = LLM(
        num_instances=args.instances,
        kv_tokens_per_instance=max(max_prompt, args.decode_context * max(args.decode_batches)) + 1024,
        max_num_seqs=max(args.decode_batches),
        max_prefill_tokens=max_prompt,
        compilation_cache_dir=None,
    )
    engine = llm.engine
    rng = np.random.default_rng(0)
    once = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def timed_prefill(prompt, group, plan_kind):
        d = len(group)
        n = len(prompt)
        plans = {
            "local": np.arange(n, dtype=np.int32) % d,  # each rank keeps its own stripe: no scale-down
            "scale_down": np.zeros(n, np.int32),  # everything lands on the group's first instance
            "none": np.full(n, d, np.int32),  # nothing kept (rank d does not exist): pure ring attention
        }
        times = []
        for _ in range(args.repeats + 1):
            req = engine.add_request(prompt, once)
            t0 = time.perf_counter()
            engine.execute(Iteration(prefills=[PrefillWork(group, [req], [plans[plan_kind]])]))
            times.append(time.perf_counter() - t0)
            engine.abort(req.rid)
        return statistics.median(times[1:])  # the first run compiles

    results: dict = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "instances": args.instances,
        "model": llm.config.name,
        "prefill": [],
        "scale_down_overhead": [],
        "decode": [],
    }
    degrees = [d for d in args.degrees if d <= args.instances]
    for n in args.prompts:
        n = min(n, engine.ecfg.max_model_len - 2)  # room for the sampled tokens
        prompt = rng.integers(3, llm.config.vocab_size, n).tolist()
        for d in degrees:
            group = tuple(range(d))
            t_local = timed_prefill(prompt, group, "local")
            row = {"prompt_tokens": n, "degree": d, "seconds": t_local}
            results["prefill"].append(row)
            print(f"prefill {n:6d} tokens, degree {d}: {t_local * 1e3:8.1f} ms", flush=True)
            if d > 1 and n == min(args.prompts[0], engine.ecfg.max_model_len - 2):
                t_down = timed_prefill(prompt, group, "scale_down")
                t_none = timed_prefill(prompt, group, "none")
                results["scale_down_overhead"].append(
                    {
                        "prompt_tokens": n,
                        "degree": d,
                        "local_plan_s": t_local,
                        "scale_down_plan_s": t_down,
                        "no_store_s": t_none,
                        "scale_down_vs_local": t_down / t_local,
                        "store_vs_no_store": t_down / t_none,
                    }
                )
                print(
                    f"  scale-down plan {t_down * 1e3:.1f} ms vs local plan {t_local * 1e3:.1f} ms "
                    f"({(t_down / t_local - 1) * 100:+.1f}%), vs storing nothing {(t_down / t_none - 1) * 100:+.1f}%",
                    flush=True,
                )

    ctx = args.decode_context
    for d in degrees:
        group = tuple(range(d))
        for b in args.decode_batches:
            params = SamplingParams(max_tokens=args.repeats + 3, temperature=0, ignore_eos=True)
            reqs = [engine.add_request(rng.integers(3, llm.config.vocab_size, ctx).tolist(), params) for _ in range(b)]
            plans = [np.arange(ctx, dtype=np.int32) % d for _ in reqs]  # KV spread evenly over the group
            engine.execute(Iteration(prefills=[PrefillWork(group, reqs, plans)]))
            masters = [i % d for i in range(b)]
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                engine.execute(Iteration(decodes=[DecodeWork(group, reqs, masters)]))
                times.append(time.perf_counter() - t0)
            for r in reqs:
                engine.abort(r.rid)
            step = statistics.median(times[1:])
            results["decode"].append({"degree": d, "batch": b, "context": ctx, "step_s": step})
            print(f"decode degree {d}, batch {b:3d}, context {ctx}: {step * 1e3:7.1f} ms/step", flush=True)

    results["prefill_memory"] = memory_analysis(args.memory_tokens, degrees, llm.config)
    results["compiled_programs"] = engine.executor.programs.compiles
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


def memory_analysis(tokens: int, degrees: list[int], base_cfg) -> list[dict]:
    """Per-device memory of a `tokens`-token ring prefill at each degree, read from the compiled program
    (random weights of the default model's shape, with a context that long)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from loong_jax.engine import EngineConfig, build_engine
    from loong_jax.model.llama import Llama

    cfg = dataclasses.replace(base_cfg, max_position_embeddings=tokens)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, jnp.float32, nnx.Rngs(0))))
    state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
    out = []
    for d in degrees:
        per_rank = -(-tokens // d)
        ecfg = EngineConfig(max_model_len=tokens, num_instances=d, kv_tokens_per_instance=per_rank + 64)
        engine = build_engine(cfg, graphdef, state, None, ecfg, jnp.float32, seed=0)
        mem = engine.executor.compiled("prefill", tuple(range(d)), per_rank, 1).memory_analysis()
        row = {
            "prompt_tokens": tokens,
            "degree": d,
            "temp_bytes_per_device": int(mem.temp_size_in_bytes),
            "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        }
        out.append(row)
        print(
            f"memory {tokens} tokens, degree {d}: temporaries {row['temp_bytes_per_device'] / 2**20:.0f} MiB "
            f"per device, arguments (weights + pool) {row['argument_bytes_per_device'] / 2**20:.0f} MiB",
            flush=True,
        )
        del engine
    return out


if __name__ == "__main__":
    main()
