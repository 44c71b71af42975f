"""The engine end to end on one GPU, the Pallas attention backend against the XLA one in the same run.

Random weights of a model's shape (speed depends on the shapes, not the values): Llama-3-8B and SmolLM2-135M
in bfloat16, one instance. For each backend: the time of a prefill of 8K and 32K tokens (to the first
token; the prefix cache emptied first), a prefix-cache hit (a 32K prompt's next turn, 64 new tokens appended
to its cached K/V) against the same turn with the cache emptied, and decode tokens/s at batch 1, 32 and 128
(128-token prompts, 32 new tokens each; the prefill time of the same requests with one new token is
subtracted). Every shape runs once untimed first (compilation). Each measurement is guarded: a failure is
recorded in the JSON and the rest runs.

    python benchmarks/gpu_serving.py --out results/gpu_serving.json
    python benchmarks/gpu_serving.py --quick        # tiny shapes on CPU: checks the script itself
    python benchmarks/gpu_serving.py --profile DIR  # also a jax.profiler trace of decode at batch 1 and the
                                                    # largest batch, and its breakdown (step_profile.py)
    python benchmarks/gpu_serving.py --backends pallas --layers unrolled,scan   # weights in place vs sliced
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from step_profile import profile_decode, show  # noqa: E402

from loong_jax.engine import EngineConfig, build_engine  # noqa: E402
from loong_jax.model.config import ModelConfig  # noqa: E402
from loong_jax.model.llama import Llama  # noqa: E402
from loong_jax.model.sampling import SamplingParams  # noqa: E402

SHAPES = {
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        name="llama3-8b-shape",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        name="smollm2-shape",
    ),
}
TINY = ModelConfig(256, 64, 128, 2, 4, 2, 16, max_position_embeddings=4096, name="tiny")


def finish(engine, prompts, max_tokens: int) -> tuple[float, list]:
    """Seconds to finish the prompts, greedily, each with exactly max_tokens new tokens; and the requests."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    errors = [r.error for r in reqs if getattr(r, "error", None)]
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - t0, reqs


def run_requests(engine, prompts, max_tokens: int) -> float:
    """finish() with the prefix cache emptied first: every prompt computed whole."""
    engine.prefix_cache.flush()
    return finish(engine, prompts, max_tokens)[0]


def prefix_hit(engine, prompt: list[int], extra: list[int]) -> dict:
    """A prompt's next turn (the prompt, its first token and `extra` new ones) against the same next turn
    with the cache flushed: seconds to the first token each, the tokens the hit took from the cache, and
    whether both chose the same first token (the appending prefill on the GPU against the whole one)."""
    _, (first,) = finish(engine, [prompt], 1)
    turn = prompt + first.output_ids + extra
    finish(engine, [turn], 1)  # compiles what the hit runs
    engine.prefix_cache.flush()
    finish(engine, [prompt], 1)
    hit_s, (hit,) = finish(engine, [turn], 1)
    engine.prefix_cache.flush()
    cold_s, (cold,) = finish(engine, [turn], 1)
    return {
        "prompt_tokens": len(turn),
        "cached_tokens": hit.cached_tokens,
        "hit_seconds": hit_s,
        "cold_seconds": cold_s,
        "speedup": cold_s / hit_s,
        "same_first_token": hit.output_ids == cold.output_ids,
    }


def measure(engine, vocab: int, prefill_lengths, batches, prompt_len: int, new_tokens: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {"prefill_seconds": {}, "decode_tokens_per_s": {}}
    for n in prefill_lengths:
        try:
            prompt = [rng.integers(1, vocab, n).tolist()]
            run_requests(engine, prompt, 1)  # compiles
            out["prefill_seconds"][n] = min(run_requests(engine, prompt, 1) for _ in range(2))
        except Exception as e:
            out["prefill_seconds"][n] = f"error: {type(e).__name__}: {str(e)[:400]}"
    try:
        n = max(prefill_lengths) - 128  # the turn stays within max_model_len
        out["prefix_hit"] = prefix_hit(engine, rng.integers(1, vocab, n).tolist(), rng.integers(1, vocab, 63).tolist())
    except Exception as e:
        out["prefix_hit"] = f"error: {type(e).__name__}: {str(e)[:400]}"
    for b in batches:
        try:
            prompts = [rng.integers(1, vocab, prompt_len).tolist() for _ in range(b)]
            run_requests(engine, prompts, new_tokens + 1)  # compiles every decode bucket on the way
            t_prefill = run_requests(engine, prompts, 1)
            t_all = run_requests(engine, prompts, new_tokens + 1)
            out["decode_tokens_per_s"][b] = b * new_tokens / max(1e-9, t_all - t_prefill)
        except Exception as e:
            out["decode_tokens_per_s"][b] = f"error: {type(e).__name__}: {str(e)[:400]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="smollm2-135m,llama3-8b")
    ap.add_argument("--backends", default="pallas,xla")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_serving.json"))
    ap.add_argument("--profile", default=None, help="trace decode into this folder and report its breakdown")
    ap.add_argument(
        "--layers",
        default="default",
        help="comma-separated layer loops: default (unrolled on GPU), unrolled, scan (weights sliced per step)",
    )
    args = ap.parse_args()
    dev = jax.devices()[0]
    report: dict = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__, "runs": {}}
    models = {"tiny": TINY} if args.quick else {m: SHAPES[m] for m in args.models.split(",")}
    lengths, batches, prompt_len, new = (
        ([64, 200], [1, 4], 16, 4) if args.quick else ([8192, 32768], [1, 32, 128], 128, 32)
    )
    plan = [
        (name, backend, layers)
        for name in models
        for backend in args.backends.split(",")
        for layers in args.layers.split(",")
    ]
    for name, backend, layers in plan:
        cfg = models[name]
        key = f"{name}/{backend}" + ("" if layers == "default" else f"/{layers}")
        t0 = time.perf_counter()
        try:
            graphdef, state = nnx.split(Llama(cfg, jnp.bfloat16, nnx.Rngs(0)))
            ecfg = EngineConfig(
                max_model_len=max(lengths) + 64,
                max_num_seqs=max(batches),
                max_prefill_tokens=max(max(lengths), max(batches) * prompt_len),
                attention_backend=backend,
                unroll_layers={"default": None, "unrolled": True, "scan": False}[layers],
            )
            engine = build_engine(cfg, graphdef, state, None, ecfg, jnp.bfloat16, seed=0)
            del state
            row = {"attention": engine.executor.attention.name, "kv_capacity": engine.kv_capacity.as_dict()}
            row.update(measure(engine, cfg.vocab_size, lengths, batches, prompt_len, new))
            if args.profile:
                row["decode_profile"] = {}
                for b in sorted({1, max(batches)}):
                    where = os.path.join(args.profile, key.replace("/", "_"), f"b{b}")
                    row["decode_profile"][b] = got = profile_decode(engine, cfg.vocab_size, b, new, where)
                    show(f"{key} batch {b}", got)
            del engine
        except Exception:
            row = {"error": traceback.format_exc()[-3000:]}
        gc.collect()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report["runs"][key] = row
        print(key, json.dumps(row)[:1500], flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    for name in models:
        runs = report["runs"]
        p, x = runs.get(f"{name}/pallas", {}), runs.get(f"{name}/xla", {})
        ratios = {}
        hit_p, hit_x = p.get("prefix_hit"), x.get("prefix_hit")
        if isinstance(hit_p, dict) and isinstance(hit_x, dict):
            ratios["prefix_hit_speedup"] = hit_x["hit_seconds"] / hit_p["hit_seconds"]
        for n, t in p.get("prefill_seconds", {}).items():
            if isinstance(t, float) and isinstance(x.get("prefill_seconds", {}).get(n), float):
                ratios[f"prefill_{n}_speedup"] = x["prefill_seconds"][n] / t
        for b, r in p.get("decode_tokens_per_s", {}).items():
            if isinstance(r, float) and isinstance(x.get("decode_tokens_per_s", {}).get(b), float):
                ratios[f"decode_b{b}_speedup"] = r / x["decode_tokens_per_s"][b]
        report[f"{name}/pallas_over_xla"] = ratios
        print(name, "pallas over xla:", ratios)
        for backend in args.backends.split(","):
            u, sc = runs.get(f"{name}/{backend}/unrolled", {}), runs.get(f"{name}/{backend}/scan", {})
            decode_u, decode_s = u.get("decode_tokens_per_s", {}), sc.get("decode_tokens_per_s", {})
            layer_ratios = {
                f"decode_b{b}_speedup": r / decode_s[b]
                for b, r in decode_u.items()
                if isinstance(r, float) and isinstance(decode_s.get(b), float)
            }
            if layer_ratios:
                report[f"{name}/{backend}/unrolled_over_scan"] = layer_ratios
                print(name, backend, "unrolled over scan:", layer_ratios)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
