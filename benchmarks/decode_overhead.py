"""The engine's decode overhead: `LLM.generate` against a minimal JAX loop of the same model, in one run.

A random 2-layer, width-64 Llama (its compute per token is negligible, so what is measured is everything
around the model) is saved as a checkpoint and loaded through the public API on one instance; the minimal
loop runs the same weights with a dense cache, one jitted step per token, the sampled token fed back on
device and nothing read back until the end. Both decode greedily from the same prompts at batch 1 and 64;
the figure is decode tokens/s (the time of N tokens minus the time of the first, which includes the
prefill). Run: `python benchmarks/decode_overhead.py` (CPU; `--batches 1 64 --tokens 128`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from generation_cpu import timed

from checkpoints.orbax_dir import save
from loong_jax import LLM, SamplingParams
from loong_jax.model.config import tiny_config
from loong_jax.model.llama import Llama

CFG = tiny_config(vocab_size=512, eos_token_ids=(1,))  # 2 layers, width 64
PROMPT_LEN = 16


def minimal_loop(
    graphdef: nnx.GraphDef, state: nnx.State, prompts: np.ndarray, new_tokens: int
) -> tuple[np.ndarray, float]:
    """Greedy decode of prompts [B, P] with a dense cache: one jitted step per token, tokens stay on device.
    Returns the new tokens [B, new_tokens - 1] after the first and the seconds they took."""
    b, p = prompts.shape
    length = p + new_tokens
    shape = (CFG.num_layers, b, length, CFG.num_kv_heads, CFG.head_dim)

    def step(state, cache, tokens, pos):
        model = nnx.merge(graphdef, state)
        rows = jnp.arange(b)

        def attend(layer, q, k, v, cache):
            kc = cache[0].at[layer, rows, pos].set(k)
            vc = cache[1].at[layer, rows, pos].set(v)
            keys = jnp.repeat(kc[layer], CFG.num_heads // CFG.num_kv_heads, axis=2)  # [B, T, H, D]
            vals = jnp.repeat(vc[layer], CFG.num_heads // CFG.num_kv_heads, axis=2)
            s = jnp.einsum("bhd,bthd->bht", q, keys) / np.sqrt(CFG.head_dim)
            s = jnp.where(jnp.arange(length)[None, None, :] <= pos[:, None, None], s, -jnp.inf)
            return jnp.einsum("bht,bthd->bhd", jax.nn.softmax(s, axis=-1), vals), (kc, vc)

        h, cache = model.hidden_states(tokens, pos, pos + 1, attend, cache)
        return jnp.argmax(model.logits(h), axis=-1).astype(jnp.int32), cache

    step = jax.jit(step, donate_argnums=(1,))
    cache = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    tokens = jnp.asarray(prompts[:, 0])
    for i in range(p - 1):  # the prompt, a token at a time
        _, cache = step(state, cache, tokens, jnp.full((b,), i, jnp.int32))
        tokens = jnp.asarray(prompts[:, i + 1])
    tokens, cache = step(state, cache, tokens, jnp.full((b,), p - 1, jnp.int32))  # the first new token
    positions = [jnp.full((b,), i, jnp.int32) for i in range(p, length - 1)]
    jax.block_until_ready((tokens, cache, positions))
    t0 = time.perf_counter()
    out = []
    for pos in positions:
        tokens, cache = step(state, cache, tokens, pos)
        out.append(tokens)
    out = jax.device_get(out)
    return np.stack(out, axis=1), time.perf_counter() - t0


def generate(llm: LLM, prompts: np.ndarray, n: int) -> list:
    return llm.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8], help="the engine's burst sizes to try")
    ap.add_argument("--out", default="benchmarks/results/decode_overhead.json")
    args = ap.parse_args()

    model = Llama(CFG, jnp.float32, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(2, CFG.vocab_size, (b, PROMPT_LEN)).astype(np.int32) for b in args.batches}
    loop_speed, loop_tokens = {}, {}
    for b, p in prompts.items():
        loop_tokens[b], _ = minimal_loop(graphdef, state, p, args.tokens)  # compiles
        t = statistics.median(minimal_loop(graphdef, state, p, args.tokens)[1] for _ in range(args.repeats))
        loop_speed[b] = b * (args.tokens - 2) / t
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny")
        save(path, CFG, state, None)
        most = max(args.batches)
        for steps in args.decode_steps:
            llm = LLM(
                model=path,
                num_instances=1,
                max_num_seqs=most,
                decode_steps=steps,
                max_model_len=PROMPT_LEN + args.tokens + 16,
                kv_tokens_per_instance=most * (PROMPT_LEN + args.tokens + 32),
                compilation_cache_dir=None,
                seed=0,
            )
            for b, p in prompts.items():
                greedy = partial(generate, llm, p)
                outs = greedy(args.tokens)  # compiles every program on the way
                greedy(1)
                t = timed(partial(greedy, args.tokens), args.repeats) - timed(partial(greedy, 1), args.repeats)
                before, chained = llm.engine.stats.decode_launches, llm.engine.stats.chained_launches
                greedy(args.tokens)
                row = {
                    "decode_steps": steps,
                    "batch": b,
                    "new_tokens": args.tokens,
                    "engine_tokens_per_s": b * (args.tokens - 1) / t,
                    "minimal_loop_tokens_per_s": loop_speed[b],
                    "ratio": b * (args.tokens - 1) / t / loop_speed[b],
                    "decode_launches_per_run": llm.engine.stats.decode_launches - before,
                    "chained_launches_per_run": llm.engine.stats.chained_launches - chained,
                    "same_tokens": all(o.token_ids[1:] == loop_tokens[b][i].tolist() for i, o in enumerate(outs)),
                }
                results.append(row)
                print(
                    f"decode_steps {steps}, batch {b:3d}: engine {row['engine_tokens_per_s']:9.0f} tok/s, minimal "
                    f"loop {loop_speed[b]:9.0f} tok/s -> {row['ratio']:.2f}x ({row['decode_launches_per_run']} "
                    f"decode launches, {row['chained_launches_per_run']} chained; same tokens: {row['same_tokens']})"
                )
    out = {
        "benchmark": "decode_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "model": CFG.to_dict(),
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
