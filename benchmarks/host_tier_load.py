"""Loading prefix pages from the host tier: the engine loop's time and the whole load, in one run.

An engine of one instance whose KV pages have Llama-3-8B's shape (32 layers, 8 KV heads of 128, pages of 16
tokens; the platform's default type: float32 on CPU, 256 KiB a token, where XLA would widen a bfloat16 pool
to float32 on every write; bfloat16 elsewhere) and a host tier filled with random K/V; prefixes of several lengths are
loaded into the pool by the engine's own path (`JaxExecutor.load_pages`: the store's memory handed to the
transfer as it is, in power-of-two runs of consecutive slots) from consecutive slots (pages evicted together)
and from scattered ones (copied into one array first), against the copying path of the first version (the
pages gathered into a new array, padded to a power of two, then transferred) in the same run. The figures:
the seconds the engine loop spends dispatching a load (what stalls every other group's launches) and the
seconds until the pages are in the pool. Every load is checked against the store.

Run: `python benchmarks/host_tier_load.py` (CPU; `--tokens 1024 4096 8192 --repeats 3`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax.engine import EngineConfig, build_engine
from loong_jax.model.config import tiny_config
from loong_jax.model.llama import Llama
from loong_jax.runtime.kv_pool import KVCache
from loong_jax.runtime.platform import default_dtype

PAGE = 16
# Llama-3-8B's K/V geometry on a small, random model: only the pages' shape matters here
CFG = tiny_config(num_layers=32, num_kv_heads=8, num_heads=8, head_dim=128, hidden_size=256, name="kv-8b-shape")


def copying_load(executor, pages: list[int], slots: list[int]):
    """The first version's load: the pages copied out of the store, padded to a power of two, transferred."""
    store, inst = executor.host_store, executor.instances
    k, v = store.k[slots], store.v[slots]
    at = executor._page_slots(pages)
    pad = ((0, len(at) - len(pages)),) + ((0, 0),) * (k.ndim - 1)
    sharding = inst.sharding((0,), inst.pool_spec)
    new = KVCache(*(jax.device_put(np.pad(x, pad), sharding) for x in (k, v)))
    pool, done = executor._page_program("scatter", 0, len(pages))(inst.pools[0], at, new)
    inst.pools[0] = pool
    return [done]


def timed_load(executor, load, pages: list[int], slots: list[int]) -> tuple[float, float]:
    """Seconds dispatching the load and seconds until it is done."""
    t0 = time.perf_counter()
    done = load(pages, slots)
    t1 = time.perf_counter()
    jax.block_until_ready(done)
    return t1 - t0, time.perf_counter() - t0


def check(executor, pages: list[int], slots: list[int]) -> bool:
    """Whether the pool's pages hold the store's slots (a sample of them)."""
    pool, store = executor.instances.pools[0], executor.host_store
    for j in np.linspace(0, len(pages) - 1, 4).astype(int):
        got = np.asarray(pool.k[0, :, :, pages[j] * PAGE : (pages[j] + 1) * PAGE])
        if not np.array_equal(got, store.k[slots[j]]):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/host_tier_load.json")
    args = ap.parse_args()

    most = max(args.tokens) // PAGE
    dtype = default_dtype()
    graphdef, state = nnx.split(Llama(CFG, dtype, nnx.Rngs(0)))
    page_bytes = 2 * CFG.num_layers * CFG.num_kv_heads * PAGE * CFG.head_dim * jnp.dtype(dtype).itemsize
    ecfg = EngineConfig(
        num_instances=1,
        page_size=PAGE,
        kv_tokens_per_instance=(most + 2) * PAGE,
        max_model_len=most * PAGE,
        max_prefill_tokens=1024,
        max_num_seqs=1,
        host_kv_cache_gib=2 * most * page_bytes / 2**30,
    )
    engine = build_engine(CFG, graphdef, state, None, ecfg, dtype, seed=0)
    ex, store = engine.executor, engine.executor.host_store
    rng = np.random.default_rng(0)
    for at in range(0, store.capacity, 64):
        n = min(64, store.capacity - at)
        shape = (n, *store.k.shape[1:])
        store.write(
            range(at, at + n), *(rng.standard_normal(shape, np.float32).astype(store.k.dtype) for _ in range(2))
        )
    pool = engine.pools[0]
    engine_load = lambda pages, slots: ex.load_pages({0: (pages, slots)})  # noqa: E731
    rows = []
    for tokens in args.tokens:
        n = tokens // PAGE
        held = pool.append(-1, n * PAGE)
        pages = (held[::PAGE] // PAGE).tolist()
        layouts = {
            "consecutive": list(range(store.capacity - n, store.capacity)),
            "scattered": rng.permutation(store.capacity)[:n].tolist(),
        }
        for layout, slots in layouts.items():
            for name, load in (("in place", engine_load), ("copying", lambda p, s: copying_load(ex, p, s))):
                timed_load(ex, load, pages, slots)  # compiles
                times = [timed_load(ex, load, pages, slots) for _ in range(args.repeats)]
                row = {
                    "tokens": tokens,
                    "gib": n * page_bytes / 2**30,
                    "slots": layout,
                    "path": name,
                    "dispatch_s": statistics.median(t for t, _ in times),
                    "total_s": statistics.median(t for _, t in times),
                    "correct": check(ex, pages, slots),
                }
                rows.append(row)
                print(
                    f"{tokens:6d} tokens ({row['gib']:.2f} GiB), {layout:11s} slots, {name:8s}: engine loop "
                    f"{row['dispatch_s'] * 1000:8.1f} ms, loaded after {row['total_s'] * 1000:8.1f} ms "
                    f"(correct: {row['correct']})"
                )
        pool.release(-1)
    for tokens in args.tokens:
        for layout in ("consecutive", "scattered"):
            a, b = (
                next(r for r in rows if (r["tokens"], r["slots"], r["path"]) == (tokens, layout, p))
                for p in ("in place", "copying")
            )
            print(
                f"{tokens:6d} tokens, {layout:11s}: engine loop {b['dispatch_s'] / a['dispatch_s']:6.1f}x less than "
                f"copying; whole load {b['total_s'] / a['total_s']:.2f}x"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"platform": platform.platform(), "device": str(jax.devices()[0]), "jax": jax.__version__, "page": PAGE}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "model_kv": f"Llama-3-8B shape, {jnp.dtype(dtype).name}", "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
